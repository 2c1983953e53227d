/*
 * buzon._core, blocks: the Block type, a plain data area plus a trailing header page
 * whose reservation lock is a robust process-shared mutex (shared_array, shared_value,
 * shm: out-of-line messages).
 */
#include "_core.h"

/* Layout: [data: size bytes, rounded up to the page size][header page]. The data starts at
 * offset 0 so that multiprocessing.shared_memory.SharedMemory(name).buf[:size] is the
 * data. The header page has the ring header's layout (magic "BUZN BLK", capacity =
 * size, the participant slots) and the reservation lock word serves as a robust
 * process-shared mutex: a holder that dies is detected through its slot's OFD lock and
 * the lock is taken over. [3072, 4096) of the page holds the caller's metadata.
 */

static int
map_block(Ring *r, uint64_t size)
{
    uint64_t data = page_round(size ? size : 1);
    size_t total = (size_t)(data + HEADER_SIZE);
    uint8_t *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (p == MAP_FAILED) {
        return -1;
    }
    r->base = p;
    r->map_len = total;
    r->data = p;
    r->h = (header_t *)(p + data);
    r->cap = size;
    r->mask = 0;
    r->limit = size;
    r->rsize = 0;
    return 0;
}

static PyObject *
block_create(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "size", "meta", "slots", NULL};
    PyObject *name;
    unsigned long long size;
    Py_buffer meta = {0};
    unsigned int nslots = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "UKy*|I:create", kwlist, &name, &size, &meta,
                                     &nslots)) {
        return NULL;
    }
    if (meta.len > (Py_ssize_t)META_SIZE || size > MAX_CAPACITY || nslots < 1 ||
        nslots > MAX_SLOTS) {
        PyBuffer_Release(&meta);
        PyErr_Format(PyExc_ValueError, "meta is at most %u bytes, size at most 2**40, "
                     "slots 1..%u", META_SIZE, MAX_SLOTS);
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    Ring *r = cname ? ring_new(type, name) : NULL;
    if (r == NULL) {
        PyBuffer_Release(&meta);
        return NULL;
    }
    off_t bytes = (off_t)(page_round(size ? size : 1) + HEADER_SIZE);
    if (create_segment(r, cname, name, nslots, bytes, map_block, size) < 0) {
        PyBuffer_Release(&meta);
        Py_DECREF(r);
        return NULL;
    }
    header_t *h = r->h;
    memcpy((uint8_t *)h + META_OFFSET, meta.buf, (size_t)meta.len);
    PyBuffer_Release(&meta);
    own_first_slot(r);
    __atomic_store_n(&h->magic, BLOCK_MAGIC, __ATOMIC_RELEASE);
    return (PyObject *)r;
}

static PyObject *
block_attach(PyTypeObject *type, PyObject *args)
{
    PyObject *name;
    header_t copy;
    Ring *r = attach_begin(type, args, SEG_BLOCK, &copy, &name);
    if (r == NULL) {
        return NULL;
    }
    if (map_block(r, copy.capacity) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    if (attach_slot(r) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static int
lock_released(Ring *r, void *Py_UNUSED(arg), int64_t deadline)
{
    return rlock_acquire(r, deadline);
}

/* lock(timeout=None) -> bool: True if the previous holder had died holding it. */
BUSY_METHOD(block_lock)

static PyObject *
block_lock_impl(Ring *r, PyObject *args, PyObject *kw)
{
    int64_t deadline;
    if (timeout_only(r, args, kw, "|O:lock", &deadline) < 0) {
        return NULL;
    }
    /* Every thread of this process shares our token, so rlock_acquire waits for
     * another of our threads like for another process (our own token is alive);
     * only the thread that holds the lock must not wait for itself. */
    unsigned long me = PyThread_get_thread_ident();
    if (atomic_load(&r->h->rlock) == r->token && r->lock_thread == me) {
        PyErr_SetString(PyExc_RuntimeError, "this thread already holds the lock");
        return NULL;
    }
    int rc = run_released(r, lock_released, NULL, deadline == 0 ? now_ns() : deadline);
    if (rc == RC_AGAIN || rc == RC_GONE || rc == RC_RAISED) {
        return raise_rc(r, rc, OP_LOCK, 1);
    }
    r->lock_thread = me;
    /* taken over from a dead holder: flag it so the caller can repair the data */
    int recovered = atomic_exchange(&r->h->flags_atomic, 0) != 0;
    return PyBool_FromLong(recovered);
}

static PyObject *
block_unlock(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    if (atomic_load(&r->h->rlock) != r->token) {
        PyErr_SetString(PyExc_RuntimeError, "this process does not hold the lock");
        return NULL;
    }
    r->lock_thread = 0;
    rlock_release(r);
    Py_RETURN_NONE;
}

static PyObject *
block_meta(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)r->h + META_OFFSET, META_SIZE);
}

static PyObject *
block_close(Ring *r, PyObject *Py_UNUSED(a))
{
    if (r->exports > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot close the block while views of it exist (release them first)");
        return NULL;
    }
    close_or_defer(r);
    Py_RETURN_NONE;
}

static int
block_getbuffer(Ring *r, Py_buffer *view, int flags)
{
    if (r->base == NULL) {
        PyErr_SetString(ClosedErr, "the shared block is closed");
        return -1;
    }
    return lend_buffer((PyObject *)r, view, r->data, r->cap, 0, flags, &r->exports);
}

static void
block_releasebuffer(Ring *r, Py_buffer *Py_UNUSED(view))
{
    r->exports--;
}

static PyBufferProcs block_as_buffer = {
    (getbufferproc)block_getbuffer,
    (releasebufferproc)block_releasebuffer,
};

static PyObject *
block_get_size(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap);
}

/* view(offset, nbytes, readonly=True) -> a Loan of data[offset:offset+nbytes] (see loans) */
static PyObject *
block_view(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"offset", "nbytes", "readonly", NULL};
    unsigned long long offset, n;
    int readonly = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KK|p:view", kwlist, &offset, &n, &readonly)) {
        return NULL;
    }
    if (check_open(r) < 0) {
        return NULL;
    }
    if (offset > r->cap || n > r->cap - offset) {
        PyErr_Format(PyExc_ValueError, "bytes %llu..%llu are outside the block of %llu bytes",
                     offset, offset + n, (unsigned long long)r->cap);
        return NULL;
    }
    return loan_new(r, NULL, r->data + offset, n, readonly ? LENT_BLOCK_READ : LENT_BLOCK);
}

/* write(offset, data) -> None: copy a buffer into data[offset:], the GIL released for
 * 64 KiB or more (the block cannot be closed meanwhile: it counts as an export). */
static PyObject *
block_write(Ring *r, PyObject *args)
{
    unsigned long long offset;
    Py_buffer src = {0};
    if (!PyArg_ParseTuple(args, "Ky*:write", &offset, &src)) {
        return NULL;
    }
    if (check_open(r) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    uint64_t n = (uint64_t)src.len;
    if (offset > r->cap || n > r->cap - offset) {
        PyErr_Format(PyExc_ValueError, "bytes %llu..%llu are outside the block of %llu bytes",
                     offset, offset + n, (unsigned long long)r->cap);
        PyBuffer_Release(&src);
        return NULL;
    }
    uint8_t *dst = r->data + offset;
    if (n >= LARGE_COPY) {
        r->exports++;
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src.buf, (size_t)n);
        Py_END_ALLOW_THREADS
        r->exports--;
    }
    else {
        memcpy(dst, src.buf, (size_t)n);
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyObject *
block_get_lease(Ring *r, void *Py_UNUSED(c))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load(&r->h->head));
}

static int
block_set_lease(Ring *r, PyObject *value, void *Py_UNUSED(c))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the lease cannot be deleted");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (check_open(r) < 0) {
        return -1;
    }
    atomic_store(&r->h->head, (uint64_t)v);
    return 0;
}

static PyMethodDef block_methods[] = {
    {"create", (PyCFunction)(void (*)(void))block_create,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "create(name, size, meta, slots=64): a data block of size bytes (O_EXCL, 0600)."},
    {"attach", (PyCFunction)block_attach, METH_VARARGS | METH_CLASS,
     "attach(name): open an existing block after validating its header."},
    {"lock", (PyCFunction)(void (*)(void))block_lock, METH_VARARGS | METH_KEYWORDS,
     "lock(timeout=None) -> True if taken over from a holder that died."},
    {"unlock", (PyCFunction)block_unlock, METH_NOARGS, "release the lock."},
    {"meta", (PyCFunction)block_meta, METH_NOARGS, "the 1024 metadata bytes."},
    {"info", (PyCFunction)ring_info, METH_NOARGS, "header fields and participants."},
    {"close", (PyCFunction)block_close, METH_NOARGS, "unmap and release our slot."},
    {"view", (PyCFunction)(void (*)(void))block_view, METH_VARARGS | METH_KEYWORDS,
     "view(offset, nbytes, readonly=True) -> a Loan lending those bytes."},
    {"fileno", (PyCFunction)ring_fileno, METH_NOARGS, "the segment's fd (ours)."},
    {"write", (PyCFunction)block_write, METH_VARARGS,
     "write(offset, data): copy a buffer in (the GIL released for 64 KiB or more)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef block_getset[] = {
    {"size", (getter)block_get_size, NULL, "data bytes", NULL},
    {"lease", (getter)block_get_lease, (setter)block_set_lease,
     "the lease word: nonzero while lent out; a released read-only view stores 0", NULL},
    {"name", (getter)ring_get_name, NULL, "segment name", NULL},
    {"closed", (getter)ring_get_closed, NULL, "closed by this process", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon._core.Block",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A block of shared memory (data first, header page last) with a robust "
              "process-shared lock. Make one with Block.create or Block.attach.",
    .tp_methods = block_methods,
    .tp_getset = block_getset,
    .tp_as_buffer = &block_as_buffer,
};
