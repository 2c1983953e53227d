/* The fifo: envelope's hot paths in C (buzon.protocol._envelope).
 *
 * buzon/protocol/fifo.py is the reference: it defines the envelope (byte table in its
 * docstring and in docs/frames.md) and does everything in Python when this module is
 * not built. This module does only the common cases, one call for many bytes, and
 * must give byte for byte what the Python code gives (tests/protocol/
 * test_fifo_envelope.py compares them under hypothesis):
 *
 *   piece(flags, bufs, pid, nonce, seq) -> bytes
 *       one enveloped piece whose payload is the buffers of bufs joined;
 *   pack(messages, start, pid, nonce, seq, limit) -> (bytes, next, seq)
 *       messages[start:next] (each a sequence of buffers, each small enough to be one
 *       piece) as FIRST|LAST pieces joined, at most limit bytes, and the next seq;
 *   scan(buf, start, end, dst, filled, max_frame, codecs) -> (pos, filled)
 *       from buf[start:end], whole FIRST|LAST pieces whose payload is exactly one plain
 *       buzon DATA frame (no buffers, no header fields, not chunked, a codec whose bit
 *       is set in codecs, at most max_frame bytes) are checked (piece CRC) and their
 *       payloads copied to dst[filled:], until anything else comes (bytes that are no
 *       such piece, a piece not all there, a payload dst has no room for): the Python
 *       reassembler then takes over at pos, for as long as it needs to. dst may be
 *       buf itself with filled <= start (in place: each payload moves left, behind
 *       the input still to scan).
 *
 * Integers are little-endian on the wire, written byte by byte (any host).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../_crc32c.h"

#define HEADER_SIZE 28
#define OVERHEAD 32
#define VERSION 1
#define FIRST 0x01
#define LAST 0x02
#define ABORT 0x04
#define MAX_PIECE_PAYLOAD (256 * 1024)
#define MAX_PAYLOAD (4096 - OVERHEAD) /* the payload of a piece of at most PIPE_BUF */
#define MAX_PACK (1024 * 1024)

static const unsigned char MAGIC[4] = {0xF1, 0xF0, 0xB0, 0x7A};

static int nargs_ok(const char *name, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
    return 0;
}

static inline void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int as_u32(PyObject *o, const char *what, uint32_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError, "%s must be a 32-bit value", what);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int as_size(PyObject *o, const char *what, Py_ssize_t *out) {
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative", what);
        return -1;
    }
    *out = v;
    return 0;
}

/* The buffers of one message: a sequence of buffer objects, or one bytes object. */
typedef struct {
    PyObject *fast; /* PySequence_Fast of the message, or NULL for a single bytes */
    PyObject *single;
    Py_ssize_t count;
    Py_ssize_t size;
} Message;

static PyObject *message_item(Message *m, Py_ssize_t i) {
    return m->fast != NULL ? PySequence_Fast_GET_ITEM(m->fast, i) : m->single;
}

/* Open a message and measure it; 0 on success (then message_close), -1 on error. */
static int message_open(Message *m, PyObject *obj) {
    m->fast = NULL;
    m->single = NULL;
    m->size = 0;
    if (PyBytes_CheckExact(obj)) {
        m->single = obj;
        m->count = 1;
        m->size = PyBytes_GET_SIZE(obj);
        return 0;
    }
    m->fast = PySequence_Fast(obj, "a message must be a sequence of buffers");
    if (m->fast == NULL)
        return -1;
    m->count = PySequence_Fast_GET_SIZE(m->fast);
    for (Py_ssize_t i = 0; i < m->count; i++) {
        PyObject *item = message_item(m, i);
        if (PyBytes_CheckExact(item)) {
            m->size += PyBytes_GET_SIZE(item);
            continue;
        }
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(m->fast);
            return -1;
        }
        m->size += view.len;
        PyBuffer_Release(&view);
    }
    return 0;
}

static void message_close(Message *m) { Py_CLEAR(m->fast); }

/* Copy the message's bytes to out (exactly m->size of them); -1 if a buffer changed
 * size since message_open. */
static int message_copy(Message *m, unsigned char *out) {
    Py_ssize_t done = 0;
    for (Py_ssize_t i = 0; i < m->count; i++) {
        PyObject *item = message_item(m, i);
        if (PyBytes_CheckExact(item)) {
            Py_ssize_t n = PyBytes_GET_SIZE(item);
            if (n > m->size - done)
                goto changed;
            memcpy(out + done, PyBytes_AS_STRING(item), (size_t)n);
            done += n;
            continue;
        }
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0)
            return -1;
        if (view.len > m->size - done) {
            PyBuffer_Release(&view);
            goto changed;
        }
        memcpy(out + done, view.buf, (size_t)view.len);
        done += view.len;
        PyBuffer_Release(&view);
    }
    if (done == m->size)
        return 0;
changed:
    PyErr_SetString(PyExc_ValueError, "a buffer of the message changed size");
    return -1;
}

/* Header at out (its payload already at out + 28), then both CRCs. */
static void seal(unsigned char *out, unsigned flags, uint32_t n, uint32_t pid, uint32_t nonce,
                 uint32_t seq) {
    memcpy(out, MAGIC, 4);
    out[4] = VERSION;
    out[5] = (unsigned char)flags;
    out[6] = 0;
    out[7] = 0;
    put32(out + 8, n);
    put32(out + 12, pid);
    put32(out + 16, nonce);
    put32(out + 20, seq);
    put32(out + 24, crc32c_value(0, out, 24));
    put32(out + HEADER_SIZE + n, crc32c_value(0, out, HEADER_SIZE + (size_t)n));
}

static PyObject *piece(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok("piece", nargs, 5))
        return NULL;
    uint32_t flags, pid, nonce, seq;
    if (as_u32(args[0], "flags", &flags) < 0 || as_u32(args[2], "pid", &pid) < 0 ||
        as_u32(args[3], "nonce", &nonce) < 0 || as_u32(args[4], "seq", &seq) < 0)
        return NULL;
    if (flags > 0xFF) {
        PyErr_SetString(PyExc_ValueError, "flags must fit one byte");
        return NULL;
    }
    Message m;
    if (message_open(&m, args[1]) < 0)
        return NULL;
    if (m.size > MAX_PIECE_PAYLOAD) {
        message_close(&m);
        PyErr_Format(PyExc_ValueError, "a piece carries at most %d bytes", MAX_PIECE_PAYLOAD);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, OVERHEAD + m.size);
    if (out == NULL) {
        message_close(&m);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    if (message_copy(&m, p + HEADER_SIZE) < 0) {
        message_close(&m);
        Py_DECREF(out);
        return NULL;
    }
    message_close(&m);
    seal(p, flags, (uint32_t)m.size, pid, nonce, seq);
    return out;
}

static PyObject *pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok("pack", nargs, 6))
        return NULL;
    Py_ssize_t start, limit;
    uint32_t pid, nonce, seq;
    if (as_size(args[1], "start", &start) < 0 || as_u32(args[2], "pid", &pid) < 0 ||
        as_u32(args[3], "nonce", &nonce) < 0 || as_u32(args[4], "seq", &seq) < 0 ||
        as_size(args[5], "limit", &limit) < 0)
        return NULL;
    if (limit > MAX_PACK)
        limit = MAX_PACK;
    PyObject *messages = PySequence_Fast(args[0], "messages must be a sequence");
    if (messages == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(messages);
    Py_ssize_t i = start < count ? start : count;
    PyObject *out = PyBytes_FromStringAndSize(NULL, limit);
    if (out == NULL) {
        Py_DECREF(messages);
        return NULL;
    }
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out);
    Py_ssize_t used = 0;
    for (; i < count; i++) {
        Message m;
        if (message_open(&m, PySequence_Fast_GET_ITEM(messages, i)) < 0)
            goto fail;
        if (m.size > MAX_PAYLOAD || m.size + OVERHEAD > limit - used) {
            message_close(&m);
            break; /* a large message, or no room left: the caller goes on from here */
        }
        unsigned char *p = base + used;
        int rc = message_copy(&m, p + HEADER_SIZE);
        message_close(&m);
        if (rc < 0)
            goto fail;
        seal(p, FIRST | LAST, (uint32_t)m.size, pid, nonce, seq);
        seq++; /* wraps at 2^32 like the Python encoder's */
        used += OVERHEAD + m.size;
    }
    Py_DECREF(messages);
    if (_PyBytes_Resize(&out, used) < 0)
        return NULL;
    PyObject *result = Py_BuildValue("(NnI)", out, i, (unsigned int)seq);
    return result;
fail:
    Py_DECREF(messages);
    Py_DECREF(out);
    return NULL;
}

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!nargs_ok("scan", nargs, 7))
        return NULL;
    Py_ssize_t start, end, filled, max_frame;
    uint32_t codecs;
    if (as_size(args[1], "start", &start) < 0 || as_size(args[2], "end", &end) < 0 ||
        as_size(args[4], "filled", &filled) < 0 || as_size(args[5], "max_frame", &max_frame) < 0 ||
        as_u32(args[6], "codecs", &codecs) < 0)
        return NULL;
    Py_buffer src, dst;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &dst, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (start > end || end > src.len || filled > dst.len ||
        (src.buf == dst.buf && filled > start)) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "scan: offsets out of range");
        return NULL;
    }
    const unsigned char *b = src.buf;
    unsigned char *d = dst.buf;
    Py_ssize_t pos = start;
    while (end - pos >= OVERHEAD) {
        const unsigned char *h = b + pos;
        if (memcmp(h, MAGIC, 4) != 0 || h[4] != VERSION || h[5] != (FIRST | LAST) || h[6] ||
            h[7])
            break;
        uint32_t n = get32(h + 8);
        if (n > MAX_PIECE_PAYLOAD || (Py_ssize_t)n > end - pos - OVERHEAD)
            break;
        const unsigned char *p = h + HEADER_SIZE;
        /* exactly one plain DATA frame: version 1, kind DATA, a known codec, maybe the
         * receipt bit, no chunking, no fields, no buffers, its body filling the piece */
        if (n < 8 || p[0] != 1 || p[1] != 1 || (p[2] & 0xF0) || !((codecs >> (p[2] & 7)) & 1) ||
            p[3] != 0 || (uint64_t)get32(p + 4) + 8 != n || (Py_ssize_t)n > max_frame)
            break;
        if ((Py_ssize_t)n > dst.len - filled)
            break;
        if (crc32c_value(0, h, HEADER_SIZE + (size_t)n) != get32(p + n))
            break;
        memmove(d + filled, p, n); /* in place when dst is buf: the output lags */
        filled += n;
        pos += OVERHEAD + n;
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return Py_BuildValue("(nn)", pos, filled);
}

static PyMethodDef methods[] = {
    {"piece", (PyCFunction)(void (*)(void))piece, METH_FASTCALL,
     "piece(flags, bufs, pid, nonce, seq, /) -> bytes\n--\n\n"
     "One enveloped piece whose payload is the buffers of bufs joined."},
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL,
     "pack(messages, start, pid, nonce, seq, limit, /) -> (bytes, next, seq)\n--\n\n"
     "Small messages from start on as one-piece messages joined (at most limit bytes)."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, start, end, dst, filled, max_frame, codecs, /) -> (pos, filled)\n--\n\n"
     "Unwrap whole one-piece plain frames from buf[start:end] into dst[filled:]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "buzon.protocol._envelope",
    .m_doc = "The fifo: envelope's hot paths in C (buzon.protocol.fifo is the reference).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__envelope(void) {
    crc32c_setup();
    return PyModule_Create(&module);
}
