/* CRC-32C (Castagnoli) for buzon's reliable datagrams.
 *
 * One function, crc32c(data, crc=0) -> int, with the semantics of
 * buzon.protocol.crc32c.crc32c (pass a previous result to continue it). It uses the
 * SSE4.2 crc32 instruction when the CPU has it (checked once at import) and a
 * slicing-by-1 table otherwise. The GIL is released for large inputs. Small and boring
 * on purpose: the pure-Python module stays the reference the tests compare against.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static uint32_t table[256];
static int have_sse42 = 0;

static void make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
}

static uint32_t crc_table(uint32_t reg, const unsigned char *p, size_t n) {
    while (n--)
        reg = table[(reg ^ *p++) & 0xFF] ^ (reg >> 8);
    return reg;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc_sse42(uint32_t reg, const unsigned char *p, size_t n) {
    uint64_t r = reg;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        r = __builtin_ia32_crc32di(r, v);
        p += 8;
        n -= 8;
    }
    uint32_t r32 = (uint32_t)r;
    while (n--)
        r32 = __builtin_ia32_crc32qi(r32, *p++);
    return r32;
}
#endif

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
#if defined(__x86_64__)
    if (have_sse42)
        reg = crc_sse42(reg, p, n);
    else
#endif
        reg = crc_table(reg, p, n);
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
    make_table();
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2") != 0;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "HARDWARE", have_sse42) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
