/* Frames with header fields (protocol/frames.py, the FIELDS block), in C.
 *
 * RPC messages (rpc/_wire.py) are small DATA frames whose call id, correlation and
 * deadline ride in the FIELDS block. The Python decoder takes them apart on its general
 * path (header checks, a copy, a split, a dict of fields: several microseconds); these
 * calls do it in one go. Anything that is not such a frame is left to the Python decoder,
 * which stays the reference (and raises the errors).
 *
 *   bind(frame_type)
 *       The Frame class to build (frames.Frame), set once at import.
 *
 *   fields_frame(data, max_frame) -> Frame | None
 *       ``data`` must be exactly one DATA frame with a FIELDS block, no out-of-band
 *       buffers, not CHUNKED, a known codec, at most ``max_frame`` bytes, its fields
 *       well-formed: then the Frame (body: a bytes copy; fields: {tag: bytes}).
 *       Otherwise None (the general path decides).
 *
 *   fields_run(data, pos, stop, limit, append) -> int
 *       Hand out the run of complete small DATA frames without buffers that starts at
 *       ``data[pos]``: a plain one as ``(flags, body)`` (as _stream.plain_run does), one
 *       with header fields as a Frame. Each at most ``limit`` bytes. Returns where the
 *       run stopped (a frame of another shape, a malformed one, or one cut short).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VERSION 1
#define KIND_DATA 1
#define CODEC_MASK 0x07
#define RECEIPT 0x08
#define CHUNKED 0x10
#define FIELDS 0x20
#define RESERVED 0xC0
#define NOT_FAST 0xF4 /* frames.py _NOT_FAST: flags a plain frame never has */
#define MAX_CODEC 3   /* raw, msgpack, json, pickle */

static PyObject *frame_type = NULL;
/* Frame's attributes, in its field order: set directly on a new instance (its
 * dataclass __init__ is Python code, which would cost more than the rest of the call) */
static const char *const slot_names[7] = {"kind",   "codec",   "body",  "buffers",
                                          "sunk",   "receipt", "fields"};
static PyObject *slots[7] = {NULL};

static uint32_t u32le(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* The dict of a FIELDS block of ``len`` bytes at ``p``; NULL and no exception if it is
 * malformed (the Python decoder raises), NULL with an exception on memory errors. */
static PyObject *parse_fields(const unsigned char *p, Py_ssize_t len) {
    PyObject *fields = PyDict_New();
    if (fields == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    while (pos < len) {
        if (len - pos < 2 || p[pos] == 0 || pos + 2 + p[pos + 1] > len) {
            Py_DECREF(fields);
            return NULL;
        }
        unsigned n = p[pos + 1];
        PyObject *key = PyLong_FromLong(p[pos]); /* small ints: cached */
        PyObject *value = PyBytes_FromStringAndSize((const char *)p + pos + 2, n);
        if (key == NULL || value == NULL || PyDict_SetItem(fields, key, value) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            Py_DECREF(fields);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
        pos += 2 + (Py_ssize_t)n;
    }
    return fields;
}

/* The total length of the fields frame at ``h`` (``avail`` bytes there), or -1 if it is
 * not one this file takes (or is cut short). */
static Py_ssize_t fields_total(const unsigned char *h, Py_ssize_t avail, Py_ssize_t limit) {
    if (avail < 10 || h[0] != VERSION || h[1] != KIND_DATA || h[3] != 0)
        return -1;
    unsigned flags = h[2];
    if (!(flags & FIELDS) || (flags & (RESERVED | CHUNKED)) || (flags & CODEC_MASK) > MAX_CODEC)
        return -1;
    Py_ssize_t flen = (Py_ssize_t)h[8] | ((Py_ssize_t)h[9] << 8);
    Py_ssize_t total = 10 + flen + (Py_ssize_t)u32le(h + 4);
    if (total > avail || total > limit)
        return -1;
    return total;
}

/* The Frame of the fields frame at ``h`` (``total`` bytes); NULL and no exception if
 * its fields are malformed. */
static PyObject *make_frame(const unsigned char *h, Py_ssize_t total) {
    Py_ssize_t flen = (Py_ssize_t)h[8] | ((Py_ssize_t)h[9] << 8);
    PyObject *fields = parse_fields(h + 10, flen);
    if (fields == NULL)
        return NULL;
    unsigned flags = h[2];
    PyObject *body =
        PyBytes_FromStringAndSize((const char *)h + 10 + flen, total - 10 - flen);
    PyObject *buffers = PyList_New(0);
    PyObject *kind = PyLong_FromLong(KIND_DATA);
    PyObject *codec = PyLong_FromLong(flags & CODEC_MASK);
    PyObject *frame = NULL;
    if (body != NULL && buffers != NULL && kind != NULL && codec != NULL) {
        PyObject *values[7] = {
            kind, codec, body, buffers, Py_False, (flags & RECEIPT) ? Py_True : Py_False,
            fields,
        };
        PyTypeObject *type = (PyTypeObject *)frame_type;
        frame = type->tp_alloc(type, 0);
        for (int i = 0; frame != NULL && i < 7; i++) {
            if (PyObject_GenericSetAttr(frame, slots[i], values[i]) < 0)
                Py_CLEAR(frame);
        }
    }
    Py_XDECREF(body);
    Py_XDECREF(buffers);
    Py_XDECREF(kind);
    Py_XDECREF(codec);
    Py_DECREF(fields);
    return frame;
}

static int need_type(void) {
    if (frame_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "buzon.protocol._fields: bind(Frame) first");
        return -1;
    }
    return 0;
}

static PyObject *bind(PyObject *self, PyObject *type) {
    (void)self;
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind(frame_type): a class");
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        if (slots[i] == NULL && (slots[i] = PyUnicode_InternFromString(slot_names[i])) == NULL)
            return NULL;
        /* each must be a data descriptor of the class (a __slots__ member) */
        PyObject *d = PyObject_GetAttr(type, slots[i]);
        if (d == NULL)
            return NULL;
        int ok = Py_TYPE(d)->tp_descr_set != NULL;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "bind(frame_type): %s is not a slot", slot_names[i]);
            return NULL;
        }
    }
    Py_INCREF(type);
    Py_XSETREF(frame_type, type);
    Py_RETURN_NONE;
}

static PyObject *fields_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fields_frame(data, max_frame) takes 2 arguments");
        return NULL;
    }
    if (need_type() < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *frame = NULL;
    Py_ssize_t total = fields_total(buf.buf, buf.len, limit);
    if (total == buf.len)
        frame = make_frame(buf.buf, total);
    PyBuffer_Release(&buf);
    if (frame == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return frame;
}

static PyObject *fields_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "fields_run(data, pos, stop, limit, append) takes 5 arguments");
        return NULL;
    }
    if (need_type() < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = pos == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[2]);
    Py_ssize_t limit = stop == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[3]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *append = args[4];
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (pos < 0 || stop < pos || stop > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos and stop must lie within the data");
        return NULL;
    }
    const unsigned char *p = buf.buf;
    while (stop - pos >= 8) {
        const unsigned char *h = p + pos;
        PyObject *item;
        Py_ssize_t total;
        if (h[0] == VERSION && h[1] == KIND_DATA && !(h[2] & NOT_FAST) && h[3] == 0) {
            total = 8 + (Py_ssize_t)u32le(h + 4); /* a plain frame */
            if (total > stop - pos || total > limit)
                break;
            PyObject *body = PyBytes_FromStringAndSize((const char *)h + 8, total - 8);
            if (body == NULL)
                goto fail;
            item = PyTuple_New(2);
            PyObject *flags = PyLong_FromLong(h[2]);
            if (item == NULL || flags == NULL) {
                Py_XDECREF(item);
                Py_XDECREF(flags);
                Py_DECREF(body);
                goto fail;
            }
            PyTuple_SET_ITEM(item, 0, flags);
            PyTuple_SET_ITEM(item, 1, body);
        } else {
            total = fields_total(h, stop - pos, limit);
            if (total < 0)
                break;
            item = make_frame(h, total);
            if (item == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                break; /* malformed fields: the Python decoder says so */
            }
        }
        PyObject *r = PyObject_CallOneArg(append, item);
        Py_DECREF(item);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
        pos += total;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(pos);
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)bind, METH_O, "bind(frame_type): the Frame class to build"},
    {"fields_frame", (PyCFunction)(void (*)(void))fields_frame, METH_FASTCALL,
     "fields_frame(data, max_frame) -> Frame | None: one whole DATA frame with fields"},
    {"fields_run", (PyCFunction)(void (*)(void))fields_run, METH_FASTCALL,
     "fields_run(data, pos, stop, limit, append) -> int: a run of small DATA frames"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._fields",
    "DATA frames with header fields, in C (see protocol/frames.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fields(void) { return PyModule_Create(&module); }
