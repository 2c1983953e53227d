/*
 * buzon._core, admin: the module's functions (inspect a segment without attaching, the
 * participant-lock probes `buzon ls`/`clean` use, unlink, the tests' fault points) and
 * the module's initialisation. The types are in _core_ring_type.c, _core_loan.c and
 * _core_block.c; _core.h lists the units.
 */
#include "_core.h"

volatile int fault_point = 0;

static void
after_fork_child(void)
{
    atomic_fetch_add(&fork_epoch, 1);
}

static PyObject *
mod_inspect(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:inspect", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    header_t copy;
    int fd = open_checked(cname, name, O_RDONLY, SEG_RING, &copy);
    if (fd < 0) {
        /* not a ring: maybe a block (header page last); else the ring's error */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        fd = open_checked(cname, name, O_RDONLY, SEG_BLOCK, &copy);
        if (fd < 0) {
            PyErr_Clear();
            PyErr_Restore(et, ev, tb);
            return NULL;
        }
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        memcpy(copy.label, "block", 6);
        copy.limit = copy.capacity;
    }
    PyObject *parts = participants(fd, &copy, copy.nslots, -1);
    close(fd);
    if (parts == NULL) {
        return NULL;
    }
    return info_dict(&copy, parts);
}

static PyObject *
mod_in_use(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* in_use(fd): True if any open file description holds a participant lock */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    return PyBool_FromLong(lock_held(fd, 0, MAX_SLOTS));
}

static PyObject *
mod_hold(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* hold(fd): take participant lock 0 on fd (segments that are not rings) */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    if (lock_byte(fd, F_OFD_SETLK, F_WRLCK, 0, 1, NULL) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_claim_all(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* claim_all(fd): lock every participant byte; True if nobody held any (then no one
     * can attach until fd is closed), False if somebody is alive */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    if (lock_byte(fd, F_OFD_SETLK, F_WRLCK, 0, MAX_SLOTS, NULL) < 0) {
        if (errno == EAGAIN || errno == EACCES) {
            Py_RETURN_FALSE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

static PyObject *
mod_unlink(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:unlink", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    if (shm_unlink(cname) < 0) {
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_fault(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (k < 0 || k > F_MAX) {
        PyErr_Format(PyExc_ValueError, "fault point must be 0..%d", F_MAX);
        return NULL;
    }
    fault_point = (int)k;
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"inspect", mod_inspect, METH_VARARGS,
     "inspect(name): a validated copy of a ring's header, without attaching."},
    {"in_use", mod_in_use, METH_O, "in_use(fd): is any participant lock held?"},
    {"hold", mod_hold, METH_O, "hold(fd): take participant lock 0 through fd."},
    {"unlink", mod_unlink, METH_VARARGS, "unlink(name): shm_unlink."},
    {"claim_all", mod_claim_all, METH_O,
     "claim_all(fd): lock all participant slots; False if any is held by someone."},
    {"_set_fault", mod_fault, METH_O,
     "_set_fault(k): tests only: SIGKILL this process at fault point k (0: none)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "buzon._core",
    "Shared-memory rings for buzon (see src/buzon/_core.h and docs/shm.md).", -1, mod_methods,
    NULL, NULL, NULL, NULL,
};

/* The C API for other extension modules (_core_api.h) as the capsule _RING_API. */
static int
add_api(PyObject *m)
{
    PyObject *cap = PyCapsule_New((void *)&ring_api, BUZON_RING_API_NAME, NULL);
    if (cap == NULL) {
        return -1;
    }
    if (PyModule_AddObject(m, "_RING_API", cap) < 0) {
        Py_DECREF(cap);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__core(void)
{
    static int atfork_done = 0;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    PyObject *errors = PyImport_ImportModule("buzon.errors");
    if (errors == NULL) {
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&ProtocolError, "ProtocolError"}, {&TimeoutErr, "Timeout"},     {&FullErr, "Full"},
        {&EmptyErr, "Empty"},              {&TooLarge, "MessageTooLarge"},
        {&ClosedErr, "ChannelClosed"},     {&EndErr, "EndOfChannel"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyObject_GetAttrString(errors, names[i].name);
        if (*names[i].slot == NULL) {
            Py_DECREF(errors);
            return NULL;
        }
    }
    Py_DECREF(errors);
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&BlockType) < 0 ||
        PyType_Ready(&LoanType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RingType);
    Py_INCREF(&BlockType);
    Py_INCREF(&LoanType);
    Py_INCREF(&LoanType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "Block", (PyObject *)&BlockType) < 0 ||
        PyModule_AddObject(m, "Loan", (PyObject *)&LoanType) < 0 ||
        PyModule_AddObject(m, "BlockView", (PyObject *)&LoanType) < 0 || /* the same */
        add_api(m) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_HEADER", REC_HDR) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "F_LOCKED", F_LOCKED) < 0 ||
        PyModule_AddIntConstant(m, "F_HEADER", F_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "F_RESERVED", F_RESERVED) < 0 ||
        PyModule_AddIntConstant(m, "F_UNLOCKED", F_UNLOCKED) < 0 ||
        PyModule_AddIntConstant(m, "F_MID_PAYLOAD", F_MID_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "F_BEFORE_COMMIT", F_BEFORE_COMMIT) < 0 ||
        PyModule_AddIntConstant(m, "F_COMMITTED", F_COMMITTED) < 0 ||
        PyModule_AddIntConstant(m, "F_CLAIMED", F_CLAIMED) < 0 ||
        PyModule_AddIntConstant(m, "F_COPIED", F_COPIED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
