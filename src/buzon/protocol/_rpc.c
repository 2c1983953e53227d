/* The RPC messages' common case (rpc/_wire.py), framed in C.
 *
 * A call of add(1, 2) is a small DATA frame: the header, a FIELDS block with the call
 * id (and the deadline), and a msgpack body ``[0, "add", [1, 2]]``; its reply the same
 * with the correlation and ``[1, nil, 3]``. Building one through the codec and
 * ``struct`` costs several Python calls; these functions write the whole frame in one
 * go when every value is a plain scalar (int, float, str, bytes, bool, None, of those
 * exact types). Anything else returns None and the caller takes the general path (the
 * codec: enc_hook, out-of-band buffers, errors), which stays the reference: the bytes
 * written here are the ones msgspec writes (tests/protocol/test_rpc_c.py).
 *
 *   request(method, args, call_id, ms) -> bytes | None
 *       ``[0, method, args]`` with MESSAGE_ID = call_id and, when ``ms`` >= 0, a
 *       DEADLINE of ``ms`` milliseconds. ``args``: a tuple or list.
 *
 *   reply(call_id, result) -> bytes | None
 *       ``[1, nil, result]`` with CORRELATION = call_id.
 *
 * Both give None when a value is not plain, an int does not fit 64 bits, a str does
 * not encode, or the frame would pass SMALL bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VERSION 1
#define KIND_DATA 1
#define CODEC_MSGPACK 1
#define FIELDS 0x20
#define F_MESSAGE_ID 1
#define F_CORRELATION 3
#define F_DEADLINE 4
#define SMALL 4096
#define HEAD 8

typedef struct {
    unsigned char *p;
    Py_ssize_t n;
    Py_ssize_t cap;
} Out;

static int room(Out *o, Py_ssize_t k) { return o->n + k <= o->cap; }

static void put_be(Out *o, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--)
        o->p[o->n++] = (unsigned char)(v >> (8 * i));
}

/* 1: written; 0: not plain / too big (no exception); -1: exception set. */
static int put_scalar(Out *o, PyObject *v) {
    if (v == Py_None || v == Py_True || v == Py_False) {
        if (!room(o, 1))
            return 0;
        o->p[o->n++] = v == Py_None ? 0xc0 : v == Py_True ? 0xc3 : 0xc2;
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (!room(o, 9))
            return 0;
        if (overflow < 0)
            return 0;
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear(); /* past 64 bits: the codec says what is wrong */
                return 0;
            }
            o->p[o->n++] = 0xcf;
            put_be(o, u, 8);
            return 1;
        }
        if (x >= 0) {
            if (x < 128) {
                o->p[o->n++] = (unsigned char)x;
            } else if (x <= 0xff) {
                o->p[o->n++] = 0xcc;
                put_be(o, (uint64_t)x, 1);
            } else if (x <= 0xffff) {
                o->p[o->n++] = 0xcd;
                put_be(o, (uint64_t)x, 2);
            } else if (x <= 0xffffffffLL) {
                o->p[o->n++] = 0xce;
                put_be(o, (uint64_t)x, 4);
            } else {
                o->p[o->n++] = 0xcf;
                put_be(o, (uint64_t)x, 8);
            }
        } else if (x >= -32) {
            o->p[o->n++] = (unsigned char)(0xe0 | (x + 32));
        } else if (x >= -128) {
            o->p[o->n++] = 0xd0;
            put_be(o, (uint64_t)x, 1);
        } else if (x >= -32768) {
            o->p[o->n++] = 0xd1;
            put_be(o, (uint64_t)x, 2);
        } else if (x >= -2147483648LL) {
            o->p[o->n++] = 0xd2;
            put_be(o, (uint64_t)x, 4);
        } else {
            o->p[o->n++] = 0xd3;
            put_be(o, (uint64_t)x, 8);
        }
        return 1;
    }
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        if (!room(o, 9))
            return 0;
        o->p[o->n++] = 0xcb;
        put_be(o, bits, 8);
        return 1;
    }
    const char *data;
    Py_ssize_t len;
    int is_str = PyUnicode_CheckExact(v);
    if (is_str) {
        data = PyUnicode_AsUTF8AndSize(v, &len);
        if (data == NULL) {
            PyErr_Clear(); /* lone surrogates: the codec raises its own error */
            return 0;
        }
    } else if (PyBytes_CheckExact(v)) {
        data = PyBytes_AS_STRING(v);
        len = PyBytes_GET_SIZE(v);
    } else {
        return 0;
    }
    if (len > SMALL || !room(o, 5 + len))
        return 0;
    if (is_str) {
        if (len < 32) {
            o->p[o->n++] = (unsigned char)(0xa0 | len);
        } else if (len <= 0xff) {
            o->p[o->n++] = 0xd9;
            put_be(o, (uint64_t)len, 1);
        } else if (len <= 0xffff) {
            o->p[o->n++] = 0xda;
            put_be(o, (uint64_t)len, 2);
        } else {
            o->p[o->n++] = 0xdb;
            put_be(o, (uint64_t)len, 4);
        }
    } else {
        if (len <= 0xff) {
            o->p[o->n++] = 0xc4;
            put_be(o, (uint64_t)len, 1);
        } else if (len <= 0xffff) {
            o->p[o->n++] = 0xc5;
            put_be(o, (uint64_t)len, 2);
        } else {
            o->p[o->n++] = 0xc6;
            put_be(o, (uint64_t)len, 4);
        }
    }
    memcpy(o->p + o->n, data, (size_t)len);
    o->n += len;
    return 1;
}

static int put_array_head(Out *o, Py_ssize_t count) {
    if (!room(o, 5))
        return 0;
    if (count < 16) {
        o->p[o->n++] = (unsigned char)(0x90 | count);
    } else if (count <= 0xffff) {
        o->p[o->n++] = 0xdc;
        put_be(o, (uint64_t)count, 2);
    } else {
        return 0;
    }
    return 1;
}

static void put_le(unsigned char *p, uint64_t v, int bytes) {
    for (int i = 0; i < bytes; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* The frame's header and FIELDS block at the front of ``buf`` (``fields`` bytes of
 * fields after the 8-byte header and its u16 length), the body ``body`` bytes long. */
static void put_head(unsigned char *buf, Py_ssize_t body, int tag, uint64_t id, long long ms) {
    int flen = ms >= 0 ? 16 : 10;
    buf[0] = VERSION;
    buf[1] = KIND_DATA;
    buf[2] = CODEC_MSGPACK | FIELDS;
    buf[3] = 0;
    put_le(buf + 4, (uint64_t)body, 4);
    put_le(buf + 8, (uint64_t)flen, 2);
    buf[10] = (unsigned char)tag;
    buf[11] = 8;
    put_le(buf + 12, id, 8);
    if (ms >= 0) {
        buf[20] = F_DEADLINE;
        buf[21] = 4;
        put_le(buf + 22, (uint64_t)ms, 4);
    }
}

static PyObject *finish(unsigned char *buf, Out *o, Py_ssize_t start, int tag, uint64_t id,
                        long long ms) {
    put_head(buf, o->n - start, tag, id, ms);
    return PyBytes_FromStringAndSize((const char *)buf, o->n);
}

static PyObject *py_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "request(method, args, call_id, ms)");
        return NULL;
    }
    PyObject *method = args[0], *seq = args[1];
    unsigned long long id = PyLong_AsUnsignedLongLong(args[2]);
    if (id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long long ms = PyLong_AsLongLong(args[3]);
    if (ms == -1 && PyErr_Occurred())
        return NULL;
    if (ms > 0xffffffffLL)
        ms = 0xffffffffLL;
    if (!PyTuple_CheckExact(seq) && !PyList_CheckExact(seq))
        Py_RETURN_NONE;
    unsigned char buf[HEAD + 2 + 16 + SMALL + 64];
    Py_ssize_t start = ms >= 0 ? 26 : 20;
    Out o = {buf, start, (Py_ssize_t)sizeof(buf)};
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int r;
    o.p[o.n++] = 0x93;
    o.p[o.n++] = 0x00;
    if ((r = put_scalar(&o, method)) != 1 || !PyUnicode_CheckExact(method))
        goto out;
    if ((r = put_array_head(&o, count)) != 1)
        goto out;
    for (Py_ssize_t i = 0; i < count; i++) {
        /* a list's items may change if a value's conversion ran Python code: it
         * cannot (exact scalar types only), but stay within the current size */
        if (i >= PySequence_Fast_GET_SIZE(seq)) {
            r = 0;
            goto out;
        }
        if ((r = put_scalar(&o, items[i])) != 1)
            goto out;
    }
    return finish(buf, &o, start, F_MESSAGE_ID, id, ms);
out:
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_reply(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "reply(call_id, result)");
        return NULL;
    }
    unsigned long long id = PyLong_AsUnsignedLongLong(args[0]);
    if (id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned char buf[HEAD + 2 + 16 + SMALL + 64];
    Py_ssize_t start = 20;
    Out o = {buf, start, (Py_ssize_t)sizeof(buf)};
    o.p[o.n++] = 0x93;
    o.p[o.n++] = 0x01;
    o.p[o.n++] = 0xc0;
    int r = put_scalar(&o, args[1]);
    if (r < 0)
        return NULL;
    if (r == 0)
        Py_RETURN_NONE;
    return finish(buf, &o, start, F_CORRELATION, id, -1);
}

static PyMethodDef methods[] = {
    {"request", (PyCFunction)(void (*)(void))py_request, METH_FASTCALL,
     "request(method, args, call_id, ms) -> bytes | None: a call's whole frame"},
    {"reply", (PyCFunction)(void (*)(void))py_reply, METH_FASTCALL,
     "reply(call_id, result) -> bytes | None: a reply's whole frame"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._rpc",
    "The RPC messages' common case framed in C (see rpc/_wire.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rpc(void) { return PyModule_Create(&module); }
