/* CRC-32C (Castagnoli) for buzon's reliable datagrams.
 *
 * One function, crc32c(data, crc=0) -> int, with the semantics of
 * buzon.protocol.crc32c.crc32c (pass a previous result to continue it). It uses the
 * SSE4.2 crc32 instruction when the CPU has it (checked once at import) and a
 * slicing-by-1 table otherwise (both in _crc32c.h, shared with protocol/_envelope.c).
 * The GIL is released for large inputs. Small and boring on purpose: the pure-Python
 * module stays the reference the tests compare against.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "_crc32c.h"

static PyObject *crc32c(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    unsigned long long start = 0;
    if (!PyArg_ParseTuple(args, "y*|K:crc32c", &buf, &start))
        return NULL;
    if (start > 0xFFFFFFFFull) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "crc must be a 32-bit value");
        return NULL;
    }
    uint32_t reg = (uint32_t)start ^ 0xFFFFFFFFu;
    const unsigned char *p = buf.buf;
    size_t n = (size_t)buf.len;
    int release = n >= 65536;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    reg = crc32c_update(reg, p, n);
    if (release)
        PyEval_RestoreThread(ts);
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(reg ^ 0xFFFFFFFFu);
}

static PyMethodDef methods[] = {
    {"crc32c", crc32c, METH_VARARGS,
     "crc32c(data, crc=0, /) -> int\n--\n\nCRC-32C of data, continuing from crc."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "buzon._crc32c",
    .m_doc = "CRC-32C in C (SSE4.2 when available).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__crc32c(void) {
    crc32c_setup();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "HARDWARE", crc32c_hw) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
