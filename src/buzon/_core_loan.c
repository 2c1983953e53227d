/*
 * buzon._core, loans: the Loan type, and the Ring methods that lend a record
 * (reserve, recv_view); Block.view lends block bytes through the same type.
 *
 * A Loan lends bytes of a ring or block through the buffer protocol (memoryview,
 * numpy.frombuffer) until it is finished; finishing refuses while buffer views are
 * still exported, so no view can outlive the memory it points into, and the ring or
 * block stays mapped while a loan lives (an export). Four kinds:
 * - Ring.reserve(n): the payload of a RESERVED record, writable; commit() publishes it,
 *   abort() turns it ABANDONED (consumers skip it).
 * - Ring.recv_view(): a claimed (READING) record, read-only; release() frees its space.
 * - Block.view(offset, n, readonly=False): block bytes, writable; release() ends it.
 * - Block.view(offset, n): block bytes, read-only; release() *returns the block's
 *   lease*: the lease word (the header's `head` field, unused by blocks) is stored 0,
 *   which tells the block's owner, in another process, that the reader is done with it
 *   and the block may carry the next message (the owner stores a nonzero lease before
 *   it hands the block over; no PyObject crosses the segment).
 * A Loan dropped unfinished is aborted/released. A process that dies holding one is
 * handled like any producer or consumer death (or, for a block, its lease holder's).
 */
#include "_core.h"

/* Lend [ptr, ptr + len) of owner through the buffer protocol, counting the export
 * (whoever finishes or unmaps refuses while exports are out). */
int
lend_buffer(PyObject *owner, Py_buffer *view, uint8_t *ptr, uint64_t len, int readonly,
            int flags, Py_ssize_t *exports)
{
    if (PyBuffer_FillInfo(view, owner, ptr, (Py_ssize_t)len, readonly, flags) < 0) {
        return -1;
    }
    *exports += 1;
    return 0;
}

typedef struct {
    PyObject_HEAD
    Ring *ring; /* the ring or block lending its memory */
    rec_t *rec; /* the record (ring kinds) */
    uint8_t *ptr;
    uint64_t len;
    int kind;
    int done;
    Py_ssize_t exports;
} Loan;

PyObject *
loan_new(Ring *r, rec_t *rec, uint8_t *ptr, uint64_t len, int kind)
{
    Loan *l = PyObject_New(Loan, &LoanType);
    if (l == NULL) {
        return NULL;
    }
    Py_INCREF(r);
    l->ring = r;
    l->rec = rec;
    l->ptr = ptr;
    l->len = len;
    l->kind = kind;
    l->done = 0;
    l->exports = 0;
    r->exports++;
    return (PyObject *)l;
}

static int
loan_finish(Loan *l, int commit_it)
{
    if (l->done) {
        PyErr_SetString(PyExc_ValueError, "the loan is already finished");
        return -1;
    }
    if (l->exports > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "release every view of the loan (del the array) before finishing it");
        return -1;
    }
    Ring *r = l->ring;
    l->done = 1;
    r->exports--;
    if (r->base == NULL) {
        return 0;
    }
    switch (l->kind) {
    case LENT_READ:
        if (release_rec(r, l->rec) != RC_OK) {
            corrupt(r);
            return -1;
        }
        break;
    case LENT_WRITE:
        if (commit_it) {
            commit(r, l->rec);
        }
        else {
            uint64_t st = atomic_load(&l->rec->state);
            if ((st & 0xff) == K_RESERVED && (uint32_t)(st >> 32) == r->token &&
                atomic_compare_exchange_strong(&l->rec->state, &st,
                                               with_kind(st, K_ABANDONED))) {
                atomic_fetch_add(&r->h->abandoned, 1);
            }
            wake_data(r); /* a consumer may be waiting on this very record */
        }
        break;
    case LENT_BLOCK_READ:
        atomic_store(&r->h->head, 0); /* the lease goes back to the block's owner */
        break;
    default:
        break;
    }
    return 0;
}

static PyObject *
loan_commit(Loan *l, PyObject *Py_UNUSED(a))
{
    if (l->kind != LENT_WRITE) {
        PyErr_SetString(PyExc_TypeError, "only a reserved record is committed; release this");
        return NULL;
    }
    if (loan_finish(l, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
loan_abort(Loan *l, PyObject *Py_UNUSED(a))
{
    if (loan_finish(l, 0) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static void
loan_dealloc(Loan *l)
{
    if (!l->done) {
        l->exports = 0; /* no view can exist: each holds a reference to us */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (loan_finish(l, 0) < 0) {
            PyErr_WriteUnraisable((PyObject *)l);
        }
        PyErr_Restore(et, ev, tb);
    }
    Py_DECREF(l->ring);
    PyObject_Free(l);
}

static int
loan_getbuffer(Loan *l, Py_buffer *view, int flags)
{
    if (l->done || l->ring->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "the loan is finished");
        return -1;
    }
    int readonly = l->kind == LENT_READ || l->kind == LENT_BLOCK_READ;
    return lend_buffer((PyObject *)l, view, l->ptr, l->len, readonly, flags, &l->exports);
}

static void
loan_releasebuffer(Loan *l, Py_buffer *Py_UNUSED(v))
{
    l->exports--;
}

static PyBufferProcs loan_as_buffer = {
    (getbufferproc)loan_getbuffer,
    (releasebufferproc)loan_releasebuffer,
};

static Py_ssize_t
loan_length(Loan *l)
{
    return (Py_ssize_t)l->len;
}

static PySequenceMethods loan_as_sequence = {.sq_length = (lenfunc)loan_length};

static PyObject *
loan_enter(Loan *l, PyObject *Py_UNUSED(a))
{
    Py_INCREF(l);
    return (PyObject *)l;
}

static PyObject *
loan_exit(Loan *l, PyObject *args)
{
    PyObject *et = PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : Py_None;
    /* a write loan commits on a clean exit and aborts on an exception */
    if (!l->done && loan_finish(l, et == Py_None) < 0) {
        return NULL;
    }
    Py_RETURN_FALSE;
}

static PyObject *
loan_get_done(Loan *l, void *Py_UNUSED(c))
{
    return PyBool_FromLong(l->done);
}

static PyMethodDef loan_methods[] = {
    {"commit", (PyCFunction)loan_commit, METH_NOARGS, "publish the filled record."},
    {"abort", (PyCFunction)loan_abort, METH_NOARGS, "drop a write loan unpublished."},
    {"release", (PyCFunction)loan_abort, METH_NOARGS,
     "end it: free a received record's space, return a block's lease."},
    {"__enter__", (PyCFunction)loan_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)loan_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *
loan_get_flags(Loan *l, void *Py_UNUSED(c))
{
    int ring_kind = l->kind == LENT_WRITE || l->kind == LENT_READ;
    return PyLong_FromUnsignedLong(l->done || !ring_kind ? 0 : l->rec->flags);
}

static PyGetSetDef loan_getset[] = {
    {"done", (getter)loan_get_done, NULL, "committed, aborted or released", NULL},
    {"flags", (getter)loan_get_flags, NULL, "the record's producer flags", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject LoanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon._core.Loan",
    .tp_basicsize = sizeof(Loan),
    .tp_dealloc = (destructor)loan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory of a ring or block lent out: a reserved record until commit() "
              "(Ring.reserve), a received one until release() (Ring.recv_view), or block "
              "bytes until release() (Block.view). Supports the buffer protocol.",
    .tp_methods = loan_methods,
    .tp_getset = loan_getset,
    .tp_as_buffer = &loan_as_buffer,
    .tp_as_sequence = &loan_as_sequence,
};

BUSY_METHOD_EXPORTED(ring_reserve)

static PyObject *
ring_reserve_impl(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"nbytes", "timeout", "flags", NULL};
    Py_ssize_t n;
    PyObject *timeout = Py_None;
    unsigned int flags = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|OI:reserve", kwlist, &n, &timeout, &flags)) {
        return NULL;
    }
    if (check_open(r) < 0) {
        return NULL;
    }
    int64_t deadline;
    if (deadline_from(timeout, &deadline) < 0) {
        return NULL;
    }
    uint64_t most = (r->rsize ? r->rsize : r->limit) - REC_HDR;
    if (n < 0 || (uint64_t)n > most) {
        PyErr_Format(TooLarge, "a loan of %zd bytes does not fit the ring of %S (at most %llu)",
                     n, r->name, (unsigned long long)most);
        return NULL;
    }
    reserve_args a = {(uint32_t)n, flags, NULL};
    int rc = run_released(r, reserve_released, &a, deadline);
    if (rc != RC_OK) {
        return raise_rc(r, rc, OP_RESERVE, deadline != 0);
    }
    return loan_new(r, a.rec, (uint8_t *)a.rec + REC_HDR, (uint32_t)n, LENT_WRITE);
}

BUSY_METHOD_EXPORTED(ring_recv_view)

static PyObject *
ring_recv_view_impl(Ring *r, PyObject *args, PyObject *kw)
{
    int64_t deadline;
    if (timeout_only(r, args, kw, "|O:recv_view", &deadline) < 0) {
        return NULL;
    }
    claim_args a = {NULL, 0, 0};
    int rc = run_released(r, claim_released, &a, deadline);
    if (rc != RC_OK) {
        return raise_rc(r, rc, OP_RECV_VIEW, deadline != 0);
    }
    return loan_new(r, a.rec, (uint8_t *)a.rec + REC_HDR, a.len, LENT_READ);
}
