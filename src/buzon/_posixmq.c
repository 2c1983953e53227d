/*
 * buzon._posixmq: a thin, boring binding of POSIX message queues (mq_overview(7)).
 *
 * Theory of operation
 * -------------------
 * Every function maps to one mq_* call and raises OSError with the real errno when
 * it fails. On Linux a queue descriptor is a file descriptor, so it works with
 * select/poll/epoll: readable while the queue holds a message, writable while it has
 * room. buzon opens every descriptor O_NONBLOCK and close-on-exec.
 *
 * "Would block" is not an error here: send() and sendv() return False when the queue
 * is full and receive() returns None when it is empty.
 *
 * The GIL is held for the first attempt of every send/receive. That attempt uses
 * mq_timedsend/mq_timedreceive with an expiry in the past, so it never sleeps: a
 * non-blocking descriptor answers EAGAIN and a blocking one (see setblocking) answers
 * ETIMEDOUT. Only in the second case do we release the GIL and wait in the plain
 * call. Non-blocking descriptors therefore never pay for releasing and re-taking
 * the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <mqueue.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef MQ_PRIO_MAX
#define BUZON_MQ_PRIO_MAX_FALLBACK MQ_PRIO_MAX
#else
#define BUZON_MQ_PRIO_MAX_FALLBACK 32 /* the POSIX minimum */
#endif

/* sendv() joins parts here when they fit, on the heap otherwise. */
#define SCRATCH_SIZE 4096
/* sendv() keeps this many buffer views on the stack. */
#define SMALL_VIEWS 8

static long prio_max = BUZON_MQ_PRIO_MAX_FALLBACK; /* set once at import */

/* An absolute CLOCK_REALTIME instant long past: the timed calls then never sleep. */
static const struct timespec already_expired = {0, 0};

/* ---- argument helpers ---------------------------------------------------- */

static int
get_mqd(PyObject *obj, mqd_t *out)
{
    int fd = PyObject_AsFileDescriptor(obj);
    if (fd < 0) {
        return -1;
    }
    *out = (mqd_t)fd;
    return 0;
}

static int
get_priority(PyObject *obj, unsigned int *out)
{
    long prio = PyLong_AsLong(obj);
    if (prio == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (prio < 0 || prio >= prio_max) {
        PyErr_Format(PyExc_ValueError, "priority must be in 0..%ld, not %ld", prio_max - 1,
                     prio);
        return -1;
    }
    *out = (unsigned int)prio;
    return 0;
}

/* ---- send/receive cores -------------------------------------------------- */

/* 1 if sent, 0 if the queue is full (EAGAIN), -1 with an exception set. */
static int
send_message(mqd_t mqd, const char *data, size_t len, unsigned int prio)
{
    for (;;) {
        int rc = mq_timedsend(mqd, data, len, prio, &already_expired);
        int err = errno;
        if (rc == 0) {
            return 1;
        }
        if (err == ETIMEDOUT) {
            /* A blocking descriptor with a full queue: wait without the GIL. */
            Py_BEGIN_ALLOW_THREADS
            rc = mq_send(mqd, data, len, prio);
            err = errno;
            Py_END_ALLOW_THREADS
            if (rc == 0) {
                return 1;
            }
        }
        if (err == EAGAIN) {
            return 0;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
            continue; /* PEP 475: retry after a signal whose handler did not raise */
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

/* Bytes received, -2 if the queue is empty (EAGAIN), -1 with an exception set. */
static Py_ssize_t
receive_message(mqd_t mqd, char *buf, size_t size, unsigned int *prio)
{
    for (;;) {
        ssize_t n = mq_timedreceive(mqd, buf, size, prio, &already_expired);
        int err = errno;
        if (n >= 0) {
            return (Py_ssize_t)n;
        }
        if (err == ETIMEDOUT) {
            /* A blocking descriptor with an empty queue: wait without the GIL. */
            Py_BEGIN_ALLOW_THREADS
            n = mq_receive(mqd, buf, size, prio);
            err = errno;
            Py_END_ALLOW_THREADS
            if (n >= 0) {
                return (Py_ssize_t)n;
            }
        }
        if (err == EAGAIN) {
            return -2;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
            continue;
        }
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

/* ---- module functions ---------------------------------------------------- */

PyDoc_STRVAR(open_doc,
"open(name, flags, mode=0o600, maxmsg=0, msgsize=0) -> int\n\n"
"mq_open(3). flags are os.O_* values. With O_CREAT, maxmsg and msgsize (both or\n"
"neither) size the new queue; 0 takes the system defaults. The descriptor is\n"
"close-on-exec.");

static PyObject *
posixmq_open(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "flags", "mode", "maxmsg", "msgsize", NULL};
    PyObject *name = NULL;
    int flags;
    unsigned int mode = 0600;
    long maxmsg = 0;
    long msgsize = 0;
    struct mq_attr attr;
    struct mq_attr *attrp = NULL;
    mqd_t mqd;
    int fdflags;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&i|Ill:open", kwlist,
                                     PyUnicode_FSConverter, &name, &flags, &mode, &maxmsg,
                                     &msgsize)) {
        return NULL;
    }
    if (maxmsg < 0 || msgsize < 0) {
        PyErr_SetString(PyExc_ValueError, "maxmsg and msgsize must not be negative");
        goto error;
    }
    if ((flags & O_CREAT) && (maxmsg > 0 || msgsize > 0)) {
        if (maxmsg == 0 || msgsize == 0) {
            PyErr_SetString(PyExc_ValueError, "give both maxmsg and msgsize, or neither");
            goto error;
        }
        memset(&attr, 0, sizeof(attr));
        attr.mq_maxmsg = maxmsg;
        attr.mq_msgsize = msgsize;
        attrp = &attr;
    }
    mqd = mq_open(PyBytes_AS_STRING(name), flags, (mode_t)mode, attrp);
    if (mqd == (mqd_t)-1) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, PyBytes_AS_STRING(name));
        goto error;
    }
    /* Linux already sets close-on-exec on queue descriptors; make sure of it. */
    fdflags = fcntl((int)mqd, F_GETFD);
    if (fdflags == -1 || fcntl((int)mqd, F_SETFD, fdflags | FD_CLOEXEC) == -1) {
        int err = errno;
        mq_close(mqd);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto error;
    }
    Py_DECREF(name);
    return PyLong_FromLong((long)mqd);

error:
    Py_DECREF(name);
    return NULL;
}

PyDoc_STRVAR(close_doc, "close(mqd) -> None\n\nmq_close(3).");

static PyObject *
posixmq_close(PyObject *Py_UNUSED(module), PyObject *arg)
{
    mqd_t mqd;
    if (get_mqd(arg, &mqd) < 0) {
        return NULL;
    }
    /* Never retried on EINTR: on Linux the descriptor is gone either way. */
    if (mq_close(mqd) == -1) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(unlink_doc, "unlink(name) -> None\n\nmq_unlink(3).");

static PyObject *
posixmq_unlink(PyObject *Py_UNUSED(module), PyObject *arg)
{
    PyObject *name = NULL;
    if (!PyUnicode_FSConverter(arg, &name)) {
        return NULL;
    }
    if (mq_unlink(PyBytes_AS_STRING(name)) == -1) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, PyBytes_AS_STRING(name));
        Py_DECREF(name);
        return NULL;
    }
    Py_DECREF(name);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(send_doc,
"send(mqd, data, priority=0, /) -> bool\n\n"
"mq_send(3) of one buffer. False if the queue is full; OSError otherwise\n"
"(EMSGSIZE when data is larger than the queue's msgsize).");

static PyObject *
posixmq_send(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    mqd_t mqd;
    unsigned int prio = 0;
    Py_buffer view;
    int rc;

    if (nargs < 2 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "send() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_mqd(args[0], &mqd) < 0) {
        return NULL;
    }
    if (nargs == 3 && get_priority(args[2], &prio) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    rc = send_message(mqd, view.buf, (size_t)view.len, prio);
    PyBuffer_Release(&view);
    if (rc < 0) {
        return NULL;
    }
    return PyBool_FromLong(rc);
}

PyDoc_STRVAR(sendv_doc,
"sendv(mqd, buffers, priority=0, /) -> bool\n\n"
"Join a sequence of buffers into one message and mq_send(3) it. Same results\n"
"as send().");

static PyObject *
posixmq_sendv(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    mqd_t mqd;
    unsigned int prio = 0;
    PyObject *seq;
    PyObject **items;
    Py_ssize_t count;
    Py_ssize_t held = 0;
    Py_ssize_t i;
    size_t total = 0;
    Py_buffer small_views[SMALL_VIEWS];
    Py_buffer *views = small_views;
    char scratch[SCRATCH_SIZE];
    char *heap = NULL;
    const char *message;
    int rc = -1;

    if (nargs < 2 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "sendv() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_mqd(args[0], &mqd) < 0) {
        return NULL;
    }
    if (nargs == 3 && get_priority(args[2], &prio) < 0) {
        return NULL;
    }
    seq = PySequence_Fast(args[1], "sendv() expects a sequence of buffers");
    if (seq == NULL) {
        return NULL;
    }
    count = PySequence_Fast_GET_SIZE(seq);
    items = PySequence_Fast_ITEMS(seq);
    if (count > SMALL_VIEWS) {
        views = PyMem_New(Py_buffer, (size_t)count);
        if (views == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (i = 0; i < count; i++) {
        if (PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE) < 0) {
            goto done;
        }
        held++;
        if ((size_t)views[i].len > (size_t)PY_SSIZE_T_MAX - total) {
            PyErr_SetString(PyExc_OverflowError, "sendv(): message too large");
            goto done;
        }
        total += (size_t)views[i].len;
    }
    if (count == 1) {
        message = views[0].buf; /* nothing to join */
    }
    else {
        char *out;
        if (total <= SCRATCH_SIZE) {
            out = scratch;
        }
        else {
            heap = PyMem_Malloc(total);
            if (heap == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            out = heap;
        }
        message = out;
        for (i = 0; i < count; i++) {
            if (views[i].len > 0) {
                memcpy(out, views[i].buf, (size_t)views[i].len);
                out += views[i].len;
            }
        }
    }
    rc = send_message(mqd, message, total, prio);

done:
    for (i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
    }
    if (views != small_views) {
        PyMem_Free(views);
    }
    PyMem_Free(heap);
    Py_DECREF(seq);
    if (rc < 0) {
        return NULL;
    }
    return PyBool_FromLong(rc);
}

PyDoc_STRVAR(receive_doc,
"receive(mqd, msgsize, /) -> tuple[bytes, int] | None\n\n"
"mq_receive(3) of the oldest message of the highest priority, as (data, priority);\n"
"None if the queue is empty. msgsize must be at least the queue's msgsize.");

static PyObject *
posixmq_receive(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    mqd_t mqd;
    Py_ssize_t size;
    Py_ssize_t got;
    unsigned int prio = 0;
    PyObject *data;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "receive() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_mqd(args[0], &mqd) < 0) {
        return NULL;
    }
    size = PyLong_AsSsize_t(args[1]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "msgsize must not be negative");
        return NULL;
    }
    data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL) {
        return NULL;
    }
    got = receive_message(mqd, PyBytes_AS_STRING(data), (size_t)size, &prio);
    if (got == -2) {
        Py_DECREF(data);
        Py_RETURN_NONE;
    }
    if (got < 0) {
        Py_DECREF(data);
        return NULL;
    }
    if (got != size && _PyBytes_Resize(&data, got) < 0) {
        return NULL; /* _PyBytes_Resize released data */
    }
    return Py_BuildValue("(NI)", data, prio);
}

PyDoc_STRVAR(getattr_doc,
"getattr(mqd) -> tuple[int, int, int, int]\n\n"
"mq_getattr(3) as (flags, maxmsg, msgsize, curmsgs).");

static PyObject *
posixmq_getattr(PyObject *Py_UNUSED(module), PyObject *arg)
{
    mqd_t mqd;
    struct mq_attr attr;
    if (get_mqd(arg, &mqd) < 0) {
        return NULL;
    }
    if (mq_getattr(mqd, &attr) == -1) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(llll)", (long)attr.mq_flags, (long)attr.mq_maxmsg,
                         (long)attr.mq_msgsize, (long)attr.mq_curmsgs);
}

PyDoc_STRVAR(setblocking_doc,
"setblocking(mqd, blocking, /) -> None\n\n"
"Clear (True) or set (False) O_NONBLOCK with mq_setattr(3).");

static PyObject *
posixmq_setblocking(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    mqd_t mqd;
    int blocking;
    struct mq_attr attr;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "setblocking() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_mqd(args[0], &mqd) < 0) {
        return NULL;
    }
    blocking = PyObject_IsTrue(args[1]);
    if (blocking < 0) {
        return NULL;
    }
    if (mq_getattr(mqd, &attr) == -1) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (blocking) {
        attr.mq_flags &= ~(long)O_NONBLOCK;
    }
    else {
        attr.mq_flags |= O_NONBLOCK;
    }
    /* mq_setattr only looks at mq_flags. */
    if (mq_setattr(mqd, &attr, NULL) == -1) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef posixmq_methods[] = {
    {"open", (PyCFunction)(void (*)(void))posixmq_open, METH_VARARGS | METH_KEYWORDS,
     open_doc},
    {"close", posixmq_close, METH_O, close_doc},
    {"unlink", posixmq_unlink, METH_O, unlink_doc},
    {"send", (PyCFunction)(void (*)(void))posixmq_send, METH_FASTCALL, send_doc},
    {"sendv", (PyCFunction)(void (*)(void))posixmq_sendv, METH_FASTCALL, sendv_doc},
    {"receive", (PyCFunction)(void (*)(void))posixmq_receive, METH_FASTCALL, receive_doc},
    {"getattr", posixmq_getattr, METH_O, getattr_doc},
    {"setblocking", (PyCFunction)(void (*)(void))posixmq_setblocking, METH_FASTCALL,
     setblocking_doc},
    {NULL, NULL, 0, NULL},
};

static int
posixmq_exec(PyObject *module)
{
    long value = sysconf(_SC_MQ_PRIO_MAX);
    if (value > 0) {
        prio_max = value;
    }
    if (PyModule_AddIntConstant(module, "PRIO_MAX", prio_max) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot posixmq_slots[] = {
    {Py_mod_exec, posixmq_exec},
    {0, NULL},
};

PyDoc_STRVAR(module_doc,
"POSIX message queues (mq_open & co.), non-blocking, for buzon.transport.mq.");

static struct PyModuleDef posixmq_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "buzon._posixmq",
    .m_doc = module_doc,
    .m_size = 0,
    .m_methods = posixmq_methods,
    .m_slots = posixmq_slots,
};

PyMODINIT_FUNC
PyInit__posixmq(void)
{
    return PyModuleDef_Init(&posixmq_module);
}
