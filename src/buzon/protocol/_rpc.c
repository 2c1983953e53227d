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
 *   request(method, args, call_id, ms[, key]) -> bytes | None
 *       ``[0, method, args]`` with MESSAGE_ID = call_id and, when ``ms`` >= 0, a
 *       DEADLINE of ``ms`` milliseconds. ``args``: a tuple or list. With ``key``
 *       (an exactly-once key, a list of plain values; None: none):
 *       ``[0, method, args, nil, key]``.
 *
 *   reply(call_id, result) -> bytes | None
 *       ``[1, nil, result]`` with CORRELATION = call_id.
 *
 * Both give None when a value is not plain, an int does not fit 64 bits, a str does
 * not encode, or the frame would pass SMALL bytes.
 *
 * And the way back, for a received message of that shape:
 *
 *   parse(data, max_frame[, n]) -> tuple | None
 *       ``data`` (its first ``n`` bytes, when given: a stream's read buffer, as
 *       ``Channel.recv_parsed`` offers it) exactly one DATA frame with header fields, msgpack, no out-of-band
 *       buffers, not CHUNKED, no receipt asked, at most ``max_frame`` bytes:
 *       a request ``[0, str, [plain...]]`` with a MESSAGE_ID gives
 *       ``(0, call_id, ms, method, args)`` (``ms`` the DEADLINE field, -1 if none,
 *       ``args`` a list); a reply ``[1, nil, plain]`` with a CORRELATION gives
 *       ``(1, call_id, -1, result, None)``. Anything else: None (the channel's own
 *       decoder and the RPC code's checks decide, and raise).
 *
 *   parse_parts(fields, body) -> tuple | None
 *       The same for a frame the channel already split: its fields dict and body.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <limits.h>
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
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "request(method, args, call_id, ms[, key])");
        return NULL;
    }
    PyObject *key = nargs == 5 ? args[4] : Py_None;
    if (key != Py_None && !PyList_CheckExact(key) && !PyTuple_CheckExact(key))
        Py_RETURN_NONE;
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
    o.p[o.n++] = key == Py_None ? 0x93 : 0x95;
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
    if (key != Py_None) { /* exactly-once: no keywords, then the key's plain values */
        Py_ssize_t kcount = PySequence_Fast_GET_SIZE(key);
        PyObject **kitems = PySequence_Fast_ITEMS(key);
        if (!room(&o, 1)) {
            r = 0;
            goto out;
        }
        o.p[o.n++] = 0xc0;
        if ((r = put_array_head(&o, kcount)) != 1)
            goto out;
        for (Py_ssize_t i = 0; i < kcount; i++) {
            if (i >= PySequence_Fast_GET_SIZE(key)) {
                r = 0;
                goto out;
            }
            if ((r = put_scalar(&o, kitems[i])) != 1)
                goto out;
        }
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


/* ---- the way back ---------------------------------------------------------------- */

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_ssize_t pos;
} In;

static uint64_t get_be(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_le(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* A new reference to the plain scalar at in->pos; NULL without an exception: not a
 * plain scalar or cut short; NULL with one: memory. */
static PyObject *get_scalar(In *in) {
    if (in->pos >= in->n)
        return NULL;
    unsigned char b = in->p[in->pos++];
    Py_ssize_t left = in->n - in->pos;
    const unsigned char *q = in->p + in->pos;
    if (b <= 0x7f)
        return PyLong_FromLong(b);
    if (b >= 0xe0)
        return PyLong_FromLong((long)(signed char)b);
    if (b == 0xc0)
        Py_RETURN_NONE;
    if (b == 0xc2)
        Py_RETURN_FALSE;
    if (b == 0xc3)
        Py_RETURN_TRUE;
    int width = 0;
    switch (b) {
    case 0xcc: case 0xd0: case 0xc4: case 0xd9: width = 1; break;
    case 0xcd: case 0xd1: case 0xc5: case 0xda: width = 2; break;
    case 0xce: case 0xd2: case 0xc6: case 0xdb: case 0xca: width = 4; break;
    case 0xcf: case 0xd3: case 0xcb: width = 8; break;
    default:
        if ((b & 0xe0) == 0xa0) { /* fixstr */
            Py_ssize_t len = b & 0x1f;
            if (left < len)
                return NULL;
            in->pos += len;
            PyObject *s = PyUnicode_DecodeUTF8((const char *)q, len, NULL);
            if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                PyErr_Clear();
            return s;
        }
        return NULL; /* maps, arrays, ext, reserved: not plain */
    }
    if (left < width)
        return NULL;
    uint64_t v = get_be(q, width);
    in->pos += width;
    switch (b) {
    case 0xcc: case 0xcd: case 0xce:
        return PyLong_FromUnsignedLongLong(v);
    case 0xcf:
        return PyLong_FromUnsignedLongLong(v);
    case 0xd0:
        return PyLong_FromLong((long)(int8_t)v);
    case 0xd1:
        return PyLong_FromLong((long)(int16_t)v);
    case 0xd2:
        return PyLong_FromLong((long)(int32_t)v);
    case 0xd3:
        return PyLong_FromLongLong((long long)(int64_t)v);
    case 0xca: {
        uint32_t bits = (uint32_t)v;
        float f;
        memcpy(&f, &bits, 4);
        return PyFloat_FromDouble((double)f);
    }
    case 0xcb: {
        double d;
        memcpy(&d, &v, 8);
        return PyFloat_FromDouble(d);
    }
    default: { /* str8/16/32, bin8/16/32: v is the length */
        if ((uint64_t)(in->n - in->pos) < v)
            return NULL;
        Py_ssize_t len = (Py_ssize_t)v;
        const char *data = (const char *)(in->p + in->pos);
        in->pos += len;
        if (b == 0xc4 || b == 0xc5 || b == 0xc6)
            return PyBytes_FromStringAndSize(data, len);
        PyObject *s = PyUnicode_DecodeUTF8(data, len, NULL);
        if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
        return s;
    }
    }
}

/* The length of the array whose header is at in->pos, or -1. */
static Py_ssize_t get_array_head(In *in) {
    if (in->pos >= in->n)
        return -1;
    unsigned char b = in->p[in->pos++];
    if ((b & 0xf0) == 0x90)
        return b & 0x0f;
    int width = b == 0xdc ? 2 : b == 0xdd ? 4 : 0;
    if (width == 0 || in->n - in->pos < width)
        return -1;
    Py_ssize_t count = (Py_ssize_t)get_be(in->p + in->pos, width);
    in->pos += width;
    return count;
}

#define NOT_OURS ((PyObject *)1) /* not the common shape: the caller returns None */

static PyObject *parse_once(In *in, long long req_id, long long ms); /* exactly-once, below */

/* The body of a message whose call id is ``id`` (-1: no id field) and deadline ``ms``
 * (-1: none): the tuple, NOT_OURS, or NULL with an exception. */
static PyObject *parse_body(const unsigned char *p, Py_ssize_t n, long long req_id,
                            long long rep_id, long long ms) {
    In in = {p, n, 0};
    Py_ssize_t top = get_array_head(&in);
    if (top == 5)
        return parse_once(&in, req_id, ms);
    if (top != 3 || in.pos >= in.n)
        return NOT_OURS;
    unsigned char kind = in.p[in.pos++];
    if (kind == 0x01) { /* a reply: [1, nil, plain] */
        if (rep_id < 0 || in.pos >= in.n || in.p[in.pos++] != 0xc0)
            return NOT_OURS;
        PyObject *result = get_scalar(&in);
        if (result == NULL)
            return PyErr_Occurred() ? NULL : NOT_OURS;
        if (in.pos != in.n) {
            Py_DECREF(result);
            return NOT_OURS;
        }
        PyObject *id = PyLong_FromUnsignedLongLong((unsigned long long)rep_id);
        if (id == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        return Py_BuildValue("(iNiNO)", 1, id, -1, result, Py_None);
    }
    if (kind != 0x00 || req_id < 0)
        return NOT_OURS;
    /* a request: [0, str, [plain...]] */
    Py_ssize_t before = in.pos;
    if (before >= in.n || !((in.p[before] & 0xe0) == 0xa0 || in.p[before] == 0xd9 ||
                            in.p[before] == 0xda || in.p[before] == 0xdb))
        return NOT_OURS;
    PyObject *method = get_scalar(&in);
    if (method == NULL)
        return PyErr_Occurred() ? NULL : NOT_OURS;
    Py_ssize_t count = get_array_head(&in);
    if (count < 0 || count > in.n - in.pos) { /* each value takes a byte at least */
        Py_DECREF(method);
        return NOT_OURS;
    }
    PyObject *args = PyList_New(count);
    if (args == NULL) {
        Py_DECREF(method);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = get_scalar(&in);
        if (v == NULL) {
            Py_DECREF(method);
            Py_DECREF(args);
            return PyErr_Occurred() ? NULL : NOT_OURS;
        }
        PyList_SET_ITEM(args, i, v);
    }
    if (in.pos != in.n) {
        Py_DECREF(method);
        Py_DECREF(args);
        return NOT_OURS;
    }
    PyObject *id = PyLong_FromUnsignedLongLong((unsigned long long)req_id);
    if (id == NULL) {
        Py_DECREF(method);
        Py_DECREF(args);
        return NULL;
    }
    return Py_BuildValue("(iNLNN)", 0, id, ms, method, args);
}

/* The ids of a FIELDS block: 0, or -1 if it is malformed (the general path raises).
 * A tag seen twice counts as its last value (as the Python decoder's dict does). */
static int parse_fields(const unsigned char *p, Py_ssize_t len, long long *req_id,
                        long long *rep_id, long long *ms) {
    Py_ssize_t pos = 0;
    *req_id = *rep_id = *ms = -1;
    while (pos < len) {
        if (len - pos < 2 || p[pos] == 0 || pos + 2 + p[pos + 1] > len)
            return -1;
        unsigned char tag = p[pos], flen = p[pos + 1];
        const unsigned char *v = p + pos + 2;
        if (tag == F_MESSAGE_ID || tag == F_CORRELATION) {
            long long id = -1;
            if (flen == 8) {
                uint64_t u = get_le(v, 8);
                id = u > (uint64_t)LLONG_MAX ? -2 : (long long)u;
            }
            if (tag == F_MESSAGE_ID)
                *req_id = id;
            else
                *rep_id = id;
        } else if (tag == F_DEADLINE) {
            *ms = flen == 4 ? (long long)get_le(v, 4) : -1;
        }
        pos += 2 + flen;
    }
    return 0;
}

static PyObject *finish_parse(PyObject *got) {
    if (got == NOT_OURS)
        Py_RETURN_NONE;
    return got;
}

static PyObject *py_parse(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse(data, max_frame[, n])");
        return NULL;
    }
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[1]);
    if (max_frame == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = -1;
    if (nargs == 3) {
        size = PyLong_AsSsize_t(args[2]);
        if (size == -1 && PyErr_Occurred())
            return NULL;
        if (size < 0) {
            PyErr_SetString(PyExc_ValueError, "n must be non-negative");
            return NULL;
        }
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    if (size >= 0) {
        if (size > n) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "n is past the end of data");
            return NULL;
        }
        n = size;
    }
    PyObject *out = NOT_OURS;
    if (n >= HEAD + 2 && n <= max_frame && p[0] == VERSION && p[1] == KIND_DATA &&
        p[2] == (CODEC_MSGPACK | FIELDS) && p[3] == 0) {
        Py_ssize_t blen = (Py_ssize_t)get_le(p + 4, 4);
        Py_ssize_t flen = (Py_ssize_t)get_le(p + 8, 2);
        long long req_id, rep_id, ms;
        if (HEAD + 2 + flen + blen == n &&
            parse_fields(p + HEAD + 2, flen, &req_id, &rep_id, &ms) == 0)
            out = parse_body(p + HEAD + 2 + flen, blen, req_id, rep_id, ms);
    }
    PyBuffer_Release(&view);
    return out == NULL ? NULL : finish_parse(out);
}

/* One id field of a dict of fields: -1 if absent or not 8 bytes, -2 past i64. */
static long long dict_id(PyObject *fields, int tag, int size) {
    PyObject *key = PyLong_FromLong(tag);
    if (key == NULL)
        return -3;
    PyObject *v = PyDict_GetItemWithError(fields, key);
    Py_DECREF(key);
    if (v == NULL)
        return PyErr_Occurred() ? -3 : -1;
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != size)
        return -1;
    uint64_t u = get_le((const unsigned char *)PyBytes_AS_STRING(v), size);
    return u > (uint64_t)LLONG_MAX ? -2 : (long long)u;
}

static PyObject *py_parse_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_parts(fields, body)");
        return NULL;
    }
    PyObject *fields = args[0];
    if (!PyDict_Check(fields))
        Py_RETURN_NONE;
    long long req_id = dict_id(fields, F_MESSAGE_ID, 8);
    long long rep_id = dict_id(fields, F_CORRELATION, 8);
    long long ms = dict_id(fields, F_DEADLINE, 4);
    if (req_id == -3 || rep_id == -3 || ms == -3)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = parse_body(view.buf, view.len, req_id, rep_id, ms < 0 ? -1 : ms);
    PyBuffer_Release(&view);
    return out == NULL ? NULL : finish_parse(out);
}

/* ---- exactly-once requests ------------------------------------------------------
 *
 * A request of an exactly-once call is ``[0, method, args, nil, [client, seq, acked]]``
 * (rpc/_client.py frames it with ``request(..., key)``). ``parse`` and ``parse_parts``
 * give, for one whose method is a str, whose arguments are plain, whose keywords are
 * nil and whose key is well formed (``client`` bytes of 1 to 64, ``seq`` and ``acked``
 * ints with 0 <= acked <= seq), with a MESSAGE_ID:
 *
 *     (16, call_id, ms, method, (args, client, seq, acked, enc))
 *
 * ``enc``: the msgpack of ``[method, args, nil]`` exactly as msgspec encodes those
 * values (re-encoded here, so an unusual but valid encoding on the wire gives the same
 * bytes): what identifies the call's arguments in the completion table
 * (rpc/_completion.py ``_digest``, which hashes it when it is 32 bytes or more). Any
 * other five-element body: None, and the general path decides and raises.
 */

#define ONCE_KIND 16

/* 1: 0 <= acked <= seq; 0: not; -1: exception set. */
static int key_in_order(PyObject *seq, PyObject *acked) {
    int overflow = 0;
    long long a = PyLong_AsLongLongAndOverflow(acked, &overflow);
    if (a == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (overflow == 0 && a < 0))
        return 0;
    return PyObject_RichCompareBool(acked, seq, Py_LE);
}

/* The body after its five-element array header (``in`` at the kind). */
static PyObject *parse_once(In *in, long long req_id, long long ms) {
    PyObject *method = NULL, *args = NULL, *client = NULL, *seq = NULL, *acked = NULL;
    PyObject *enc = NULL, *id = NULL, *once = NULL, *out = NULL;
    unsigned char buf[SMALL + 64];
    Out o = {buf, 0, (Py_ssize_t)sizeof(buf)};
    int r;
    if (req_id < 0 || in->pos >= in->n || in->p[in->pos++] != 0x00)
        return NOT_OURS;
    if (in->pos >= in->n)
        return NOT_OURS;
    unsigned char head = in->p[in->pos];
    if (!((head & 0xe0) == 0xa0 || head == 0xd9 || head == 0xda || head == 0xdb))
        return NOT_OURS;
    if ((method = get_scalar(in)) == NULL)
        goto end;
    Py_ssize_t count = get_array_head(in);
    if (count < 0 || count > in->n - in->pos) /* each value takes a byte at least */
        goto end;
    if ((args = PyList_New(count)) == NULL)
        goto end;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v = get_scalar(in);
        if (v == NULL)
            goto end;
        PyList_SET_ITEM(args, i, v);
    }
    if (in->pos >= in->n || in->p[in->pos++] != 0xc0 || get_array_head(in) != 3)
        goto end;
    if ((client = get_scalar(in)) == NULL || (seq = get_scalar(in)) == NULL ||
        (acked = get_scalar(in)) == NULL)
        goto end;
    if (in->pos != in->n || !PyBytes_CheckExact(client) || PyBytes_GET_SIZE(client) < 1 ||
        PyBytes_GET_SIZE(client) > 64 || !PyLong_CheckExact(seq) || !PyLong_CheckExact(acked))
        goto end;
    if ((r = key_in_order(seq, acked)) != 1)
        goto end;
    /* [method, args, nil] as msgspec writes it: the digest's source */
    o.p[o.n++] = 0x93;
    if ((r = put_scalar(&o, method)) != 1 || (r = put_array_head(&o, count)) != 1)
        goto end;
    for (Py_ssize_t i = 0; i < count; i++)
        if ((r = put_scalar(&o, PyList_GET_ITEM(args, i))) != 1)
            goto end;
    if (!room(&o, 1))
        goto end;
    o.p[o.n++] = 0xc0;
    if ((enc = PyBytes_FromStringAndSize((const char *)buf, o.n)) == NULL)
        goto end;
    if ((id = PyLong_FromUnsignedLongLong((unsigned long long)req_id)) == NULL)
        goto end;
    if ((once = PyTuple_New(5)) == NULL)
        goto end;
    PyTuple_SET_ITEM(once, 0, args);
    PyTuple_SET_ITEM(once, 1, client);
    PyTuple_SET_ITEM(once, 2, seq);
    PyTuple_SET_ITEM(once, 3, acked);
    PyTuple_SET_ITEM(once, 4, enc);
    args = client = seq = acked = enc = NULL;
    out = Py_BuildValue("(iOLOO)", ONCE_KIND, id, ms, method, once);
end:
    Py_XDECREF(method);
    Py_XDECREF(args);
    Py_XDECREF(client);
    Py_XDECREF(seq);
    Py_XDECREF(acked);
    Py_XDECREF(enc);
    Py_XDECREF(id);
    Py_XDECREF(once);
    if (out == NULL && !PyErr_Occurred())
        return NOT_OURS;
    return out;
}

static PyMethodDef methods[] = {
    {"request", (PyCFunction)(void (*)(void))py_request, METH_FASTCALL,
     "request(method, args, call_id, ms[, key]) -> bytes | None: a call's whole frame"},
    {"reply", (PyCFunction)(void (*)(void))py_reply, METH_FASTCALL,
     "reply(call_id, result) -> bytes | None: a reply's whole frame"},
    {"parse", (PyCFunction)(void (*)(void))py_parse, METH_FASTCALL,
     "parse(data, max_frame[, n]) -> tuple | None: a whole frame (data[:n]) of the common shape, taken apart"},
    {"parse_parts", (PyCFunction)(void (*)(void))py_parse_parts, METH_FASTCALL,
     "parse_parts(fields, body) -> tuple | None: the same for a split frame"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._rpc",
    "The RPC messages' common case framed in C (see rpc/_wire.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rpc(void) { return PyModule_Create(&module); }
