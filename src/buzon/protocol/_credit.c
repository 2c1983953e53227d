/* Receipts' hot path (protocol/credit.py, ChannelCore), in C.
 *
 *   ReceiptCore(channel, flow, number)
 *       The data of a buzon.Receipt (its Python subclass in _channel.py has the
 *       methods): the channel it was sent on, its SendFlow and its message number, as
 *       read-only members ``_channel``, ``_flow``, ``number``. A C base so the writer
 *       below makes one without running Python code.
 *
 *   ReceiptWriter(fd, core, lock, make_flow, channel, receipt_type, on_part, reap,
 *                 fallback, finish, sock=False)(data[, timeout][, priority=]) -> Receipt
 *       The blocking ``send_bytes_async`` itself (the sync driver puts it in the
 *       channel's instance dict, where it shadows the method): ``data`` alone, bytes of
 *       at most the core's ``small_limit`` (-1 while the stream is not quiet), goes as
 *       one plain DATA frame asking for a receipt (flags 8) in one write (``sock``: one
 *       send with MSG_DONTWAIT: a socket transport's socket may be in blocking mode;
 *       _writer.h put_once) when the
 *       channel is quiet: ``lock`` (the driver's write lock) is
 *       free (taken with acquire(False), held from the checks to the count; a write
 *       the kernel takes whole or not at all, a pipe's of at most PIPE_BUF bytes or a
 *       Unix stream socket's of at most 2 KiB, only finds it free: _writer.h
 *       lock_held, whole_limit), the core
 *       owes nothing (``pending`` empty, ``credit_out`` None; fields read from the
 *       core's ``__dict__``, ``pending`` a deque the core keeps for good) and is open,
 *       and ``flow`` (the core's SendFlow, which numbers the messages; made by
 *       ``make_flow()`` at the first call) has credit (``sent < limit``). Written whole: the message is counted in ``flow.sent`` and
 *       here (``counts()``; the core adds them to its statistics) and a new
 *       ``receipt_type(channel, flow, number)`` is returned. Written in part: it is
 *       counted, ``on_part(8, data, n)`` keeps the tail as the core does for its own
 *       writes and returns the frame's serial, and ``finish(number, serial)`` (the
 *       engine finishing the frame) gives the receipt. Anything else (other
 *       arguments, not small bytes, not quiet, no credit, no room, an error): nothing
 *       is written and ``fallback`` (the driver's general way, which meets the same
 *       error) is called with the same arguments. Before every 256th call ``reap()``
 *       reads the acknowledgements that arrived, never waiting (before the write, so
 *       what it raises loses nothing): a long stream of receipts stays bounded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <structmember.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "_slots.h"
#include "_writer.h"

#define RECEIPT_FLAG 8

/* -- ReceiptCore ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *channel;
    PyObject *flow;
    Py_ssize_t number;
} ReceiptCore;

static int receipt_init(ReceiptCore *self, PyObject *args, PyObject *kwds) {
    PyObject *channel, *flow;
    Py_ssize_t number;
    static char *kwlist[] = {"channel", "flow", "number", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn:Receipt", kwlist, &channel, &flow,
                                     &number))
        return -1;
    Py_XSETREF(self->channel, Py_NewRef(channel));
    Py_XSETREF(self->flow, Py_NewRef(flow));
    self->number = number;
    return 0;
}

/* Not GC-tracked (cheaper to make and free): a receipt refers to its channel and flow,
 * and neither refers to receipts, so it is never part of a cycle. */
static void receipt_dealloc(ReceiptCore *self) {
    Py_CLEAR(self->channel);
    Py_CLEAR(self->flow);
    Py_TYPE(self)->tp_free((PyObject *)self); /* a Python subclass's dealloc drops its type */
}

static PyMemberDef receipt_members[] = {
    {"_channel", T_OBJECT, offsetof(ReceiptCore, channel), READONLY,
     "the channel the message was sent on"},
    {"_flow", T_OBJECT, offsetof(ReceiptCore, flow), READONLY,
     "the SendFlow its number is read against"},
    {"number", T_PYSSIZET, offsetof(ReceiptCore, number), READONLY,
     "the message's number in its direction (1, 2, ...)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReceiptCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._credit.ReceiptCore",
    .tp_basicsize = sizeof(ReceiptCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "ReceiptCore(channel, flow, number): a receipt's data (see the module's "
              "comment)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)receipt_init,
    .tp_dealloc = (destructor)receipt_dealloc,
    .tp_members = receipt_members,
};

/* -- ReceiptWriter ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    int sock;          /* a socket: send(MSG_DONTWAIT) (it may be in blocking mode) */
    Py_ssize_t whole;  /* writes of at most this many bytes are whole or nothing (whole_limit) */
    PyObject *coreref; /* the core and the channel, weakly: they keep this writer */
    PyObject *chref;   /* (_writer.h); both held during a call */
    PyObject *state;   /* core.__dict__ (borrowed): its fields read without attribute lookups */
    PyObject *pending; /* core.pending, a deque the core never replaces */
    PyObject *acquire; /* the write lock's bound methods */
    PyObject *release;
    PyObject *locked;
    PyObject *flow;
    PyObject *channel; /* borrowed */
    PyTypeObject *receipt_type;
    PyObject *on_part;
    PyObject *reap;
    PyObject *fallback;
    PyObject *finish;
    PyObject *make_flow;
    unsigned long long calls;
    unsigned long long sent;
    unsigned long long sent_bytes;
    unsigned long long would_block;
    count_cache limit_cache; /* the flow's last limit and its value (_writer.h) */
    vectorcallfunc vectorcall;
} ReceiptWriter;

static PyObject *s_pending, *s_credit_out, *s_closed, *s_sent, *s_limit, *s_small_limit;

/* SendFlow's ``sent`` and ``limit``, read and written in place (_slots.h) */
static slot_cache sendflow_slots;
static PyObject *sendflow_names[2];
enum { SF_SENT, SF_LIMIT };

/* flow.<name> as flow_count reads it (_writer.h), from its slot when the flow's class
 * keeps it in one: no attribute lookup */
static int flow_slot_count(PyObject *flow, int i, unsigned long long *out, count_cache *cache) {
    if (slots_of(&sendflow_slots, flow, sendflow_names, 2)) {
        PyObject *v = *SLOT(flow, &sendflow_slots, i);
        if (v != NULL && PyLong_CheckExact(v)) {
            if (cache != NULL && v == cache->obj) {
                *out = cache->value;
                return 0;
            }
            *out = PyLong_AsUnsignedLongLong(v);
            if (*out == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            if (cache != NULL) {
                Py_XSETREF(cache->obj, Py_NewRef(v));
                cache->value = *out;
            }
            return 0;
        }
    }
    return flow_count(flow, sendflow_names[i], out, cache);
}



static PyObject *make_receipt(ReceiptWriter *self, unsigned long long number) {
    PyTypeObject *type = self->receipt_type;
    ReceiptCore *r = (ReceiptCore *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->channel = Py_NewRef(self->channel);
    r->flow = Py_NewRef(self->flow);
    r->number = (Py_ssize_t)number;
    return (PyObject *)r;
}

/* The write itself, under the write lock (``have_lock``; else found free for a write
 * that is whole or nothing: _writer.h lock_held, whole_limit): -1 error, 0 nothing written, 1 written
 * whole, 2 written in part (``*serial``: the frame's serial); ``*number``: its number */
static int receipt_write(ReceiptWriter *self, PyObject *data, unsigned long long *number,
                         PyObject **serial, int have_lock) {
    unsigned long long sent, limit;
    Py_ssize_t owed = PyObject_Length(self->pending);
    if (owed != 0)
        return owed < 0 ? -1 : 0;
    int r;
    if ((r = core_flag(self->state, s_credit_out, 1)) != 0 ||
        (r = core_flag(self->state, s_closed, 0)) != 0)
        return r < 0 ? -1 : 0;
    if (flow_slot_count(self->flow, SF_SENT, &sent, NULL) < 0 ||
        flow_slot_count(self->flow, SF_LIMIT, &limit, &self->limit_cache) < 0)
        return -1;
    if (sent >= limit)
        return 0; /* the general way tells the receiver, and the engine waits */
    /* the new count made before the write: nothing can fail between write and count */
    PyObject *next = PyLong_FromUnsignedLongLong(sent + 1);
    if (next == NULL)
        return -1;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    unsigned char header[8];
    data_header(header, RECEIPT_FLAG, (uint32_t)n);
    /* one write from a stack copy (a socket: never blocks, whatever its mode) */
    ssize_t got = put_once(self->fd, self->sock, header, PyBytes_AS_STRING(data), (size_t)n);
    if (got < 0) {
        Py_DECREF(next);
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            self->would_block++;
        return 0; /* the general way writes again and reports what it meets */
    }
    /* a slot's setattr of an int: no Python code runs */
    if (slots_of(&sendflow_slots, self->flow, sendflow_names, 2) &&
        *SLOT(self->flow, &sendflow_slots, SF_SENT) != NULL) {
        slot_set(SLOT(self->flow, &sendflow_slots, SF_SENT), next);
        Py_DECREF(next);
    } else {
        int set = PyObject_SetAttr(self->flow, s_sent, next);
        Py_DECREF(next);
        if (set < 0)
            return -1;
    }
    *number = sent + 1;
    if (got == n + 8) {
        self->sent++;
        self->sent_bytes += (unsigned long long)got;
        return 1;
    }
    *serial = NULL;
    if (!have_lock && take_free_lock(self->acquire) < 0)
        return -1;
    PyObject *flags = PyLong_FromLong(RECEIPT_FLAG);
    PyObject *wrote = PyLong_FromSsize_t(got);
    if (flags != NULL && wrote != NULL) {
        PyObject *call[3] = {flags, data, wrote};
        *serial = PyObject_Vectorcall(self->on_part, call, 3, NULL);
    }
    Py_XDECREF(flags);
    Py_XDECREF(wrote);
    if (!have_lock) {
        PyObject *released = PyObject_CallNoArgs(self->release);
        if (released == NULL) {
            Py_CLEAR(*serial);
            return -1;
        }
        Py_DECREF(released);
    }
    return *serial == NULL ? -1 : 2;
}

static PyObject *receipt_writer_call(PyObject *op, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames);

/* the call, with the core and the channel held for its duration (held weakly) */
static PyObject *receipt_writer_enter(PyObject *op, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames) {
    ReceiptWriter *self = (ReceiptWriter *)op;
    PyObject *core = owner_enter(self->coreref);
    PyObject *channel = core == NULL ? NULL : owner_enter(self->chref);
    PyObject *out = channel == NULL ? NULL : receipt_writer_call(op, args, nargsf, kwnames);
    Py_XDECREF(channel);
    Py_XDECREF(core);
    return out;
}

static PyObject *receipt_writer_call(PyObject *op, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    ReceiptWriter *self = (ReceiptWriter *)op;
    PyObject *data = PyVectorcall_NARGS(nargsf) == 1 ? args[0] : NULL;
    if (data == NULL || kwnames != NULL || !PyBytes_CheckExact(data))
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    PyObject *small = PyDict_GetItemWithError(self->state, s_small_limit); /* borrowed */
    if (small == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "the channel core has no small_limit");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(small);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (PyBytes_GET_SIZE(data) > limit) /* -1: the stream is not quiet (see the core) */
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    if (self->flow == Py_None) { /* the first receipt: the core makes the flow */
        PyObject *flow = PyObject_CallNoArgs(self->make_flow);
        if (flow == NULL)
            return NULL;
        Py_SETREF(self->flow, flow);
    }
    if (!(++self->calls & 255)) {
        /* now and then, before the write (what it raises then loses nothing): read
         * the acknowledgements that came meanwhile (Python code: the checks follow) */
        PyObject *done = PyObject_CallNoArgs(self->reap);
        if (done == NULL)
            return NULL;
        Py_DECREF(done);
    }
    /* the write lock, held from the checks to the count (a partial write's tail kept):
     * no other thread writes between, whatever Python code runs meanwhile; a write
     * never partial (a pipe's of at most PIPE_BUF bytes, a Unix stream socket's of at
     * most 2 KiB: whole_limit) only finds it free (this thread keeps the GIL and runs
     * no Python code: _writer.h lock_held) */
    unsigned long long number = 0;
    PyObject *serial = NULL;
    int done;
    if (writes_whole_upto(self->whole, PyBytes_GET_SIZE(data) + 8)) {
        int held = lock_held(self->locked);
        if (held < 0)
            return NULL;
        if (held) /* another thread writes: the general way waits for the lock */
            return PyObject_Vectorcall(self->fallback, args, 1, NULL);
        done = receipt_write(self, data, &number, &serial, 0);
    } else {
        int locked = try_lock(self->acquire);
        if (locked < 0)
            return NULL;
        if (!locked) /* another thread writes: the general way waits for the lock */
            return PyObject_Vectorcall(self->fallback, args, 1, NULL);
        done = receipt_write(self, data, &number, &serial, 1);
        PyObject *released = PyObject_CallNoArgs(self->release);
        if (released == NULL) {
            Py_XDECREF(serial);
            return NULL;
        }
        Py_DECREF(released);
    }
    switch (done) {
    case 0: /* not quiet, no credit, no room: the general way */
        return PyObject_Vectorcall(self->fallback, args, 1, NULL);
    case 1: /* made after the lock is free: a collection here may run finalizers */
        return make_receipt(self, number);
    case 2: { /* the kernel took part of it: the engine finishes the frame */
        PyObject *out = PyObject_CallFunction(self->finish, "KO", number, serial);
        Py_DECREF(serial);
        return out;
    }
    default:
        return NULL;
    }
}

static PyObject *receipt_writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int fd, sock = 0;
    PyObject *core, *lock, *make_flow, *channel, *receipt_type, *on_part, *reap, *fallback,
        *finish;
    static char *kwlist[] = {"fd",      "core", "lock",     "make_flow", "channel", "receipt_type",
                             "on_part", "reap", "fallback", "finish",    "sock",    NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOOOOOOO|p:ReceiptWriter", kwlist, &fd,
                                     &core, &lock, &make_flow, &channel, &receipt_type,
                                     &on_part, &reap, &fallback, &finish, &sock))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be non-negative");
        return NULL;
    }
    if (!PyType_Check(receipt_type) ||
        !PyType_IsSubtype((PyTypeObject *)receipt_type, &ReceiptCoreType)) {
        PyErr_SetString(PyExc_TypeError, "receipt_type must be a ReceiptCore type");
        return NULL;
    }
    writer_refs w;
    if (writer_refs_take(&w, core, s_pending, lock) < 0)
        return NULL;
    PyObject *locked = PyObject_GetAttrString(lock, "locked");
    ReceiptWriter *self = locked == NULL ? NULL : (ReceiptWriter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(locked);
        writer_refs_drop(&w);
        return NULL;
    }
    self->locked = locked;
    if (writer_refs_weaken(&w, core, &self->coreref) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->state = w.state;
    self->pending = w.extra;
    self->fd = fd;
    self->sock = sock;
    self->whole = whole_limit(fd, sock);
    self->flow = Py_NewRef(Py_None);
    self->make_flow = Py_NewRef(make_flow);
    self->acquire = w.acquire;
    self->release = w.release;
    self->channel = channel;
    if ((self->chref = PyWeakref_NewRef(channel, NULL)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->receipt_type = (PyTypeObject *)Py_NewRef(receipt_type);
    self->on_part = Py_NewRef(on_part);
    self->reap = Py_NewRef(reap);
    self->fallback = Py_NewRef(fallback);
    self->finish = Py_NewRef(finish);
    self->vectorcall = receipt_writer_enter;
    return (PyObject *)self;
}

static int receipt_writer_traverse(ReceiptWriter *self, visitproc visit, void *arg) {
    Py_VISIT(self->coreref);
    Py_VISIT(self->chref);
    Py_VISIT(self->pending);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->locked);
    Py_VISIT(self->flow);
    Py_VISIT(self->receipt_type);
    Py_VISIT(self->on_part);
    Py_VISIT(self->reap);
    Py_VISIT(self->fallback);
    Py_VISIT(self->finish);
    Py_VISIT(self->make_flow);
    return 0;
}

static int receipt_writer_clear(ReceiptWriter *self) {
    Py_CLEAR(self->coreref);
    Py_CLEAR(self->chref);
    self->state = NULL; /* borrowed */
    Py_CLEAR(self->pending);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->locked);
    Py_CLEAR(self->flow);
    self->channel = NULL; /* borrowed */
    Py_CLEAR(self->receipt_type);
    Py_CLEAR(self->on_part);
    Py_CLEAR(self->reap);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->make_flow);
    Py_CLEAR(self->limit_cache.obj);
    return 0;
}

static void receipt_writer_dealloc(ReceiptWriter *self) {
    PyObject_GC_UnTrack(self);
    receipt_writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *receipt_writer_counts(ReceiptWriter *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(KKK)", self->sent, self->sent_bytes, self->would_block);
}

static PyMethodDef receipt_writer_methods[] = {
    {"counts", (PyCFunction)receipt_writer_counts, METH_NOARGS,
     "counts() -> (sent, sent_bytes, would_block): what this writer moved and met"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReceiptWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._credit.ReceiptWriter",
    .tp_basicsize = sizeof(ReceiptWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "ReceiptWriter(fd, core, lock, make_flow, channel, receipt_type, on_part, "
              "reap, fallback, finish): send_bytes_async's hot path (see the module's "
              "comment)",
    .tp_new = receipt_writer_new,
    .tp_dealloc = (destructor)receipt_writer_dealloc,
    .tp_traverse = (traverseproc)receipt_writer_traverse,
    .tp_clear = (inquiry)receipt_writer_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(ReceiptWriter, vectorcall),
    .tp_methods = receipt_writer_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._credit",
    "Receipts' hot path (see protocol/credit.py).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__credit(void) {
    if ((s_pending = PyUnicode_InternFromString("pending")) == NULL ||
        (s_credit_out = PyUnicode_InternFromString("credit_out")) == NULL ||
        (s_closed = PyUnicode_InternFromString("closed")) == NULL ||
        (s_sent = PyUnicode_InternFromString("sent")) == NULL ||
        (s_limit = PyUnicode_InternFromString("limit")) == NULL ||
        (s_small_limit = PyUnicode_InternFromString("small_limit")) == NULL)
        return NULL;
    sendflow_names[SF_SENT] = s_sent;
    sendflow_names[SF_LIMIT] = s_limit;
    if (PyType_Ready(&ReceiptCoreType) < 0 || PyType_Ready(&ReceiptWriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "ReceiptCore", (PyObject *)&ReceiptCoreType) < 0 ||
        PyModule_AddObjectRef(m, "ReceiptWriter", (PyObject *)&ReceiptWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
