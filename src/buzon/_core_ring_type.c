/*
 * buzon._core, the Ring type: create and attach a ring, send and receive whole records,
 * arm the notifications, report (info). The loans are in _core_loan.c, the C API other
 * extension modules use to put and take records in _core_glue.c; the ring itself is in
 * _core_ring.c.
 */
#include "_core.h"

static void
adapt_spin(Ring *r, int spun_ok)
{
    if (spun_ok) {
        r->spin = r->spin * 2 > SPIN_MAX ? SPIN_MAX : r->spin * 2;
    }
    else if (r->spin > SPIN_MIN + 64) {
        r->spin /= 2;
    }
}

static int
map_ring(Ring *r, uint64_t cap)
{
    size_t total = HEADER_SIZE + 2 * (size_t)cap;
    uint8_t *reserve_ = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserve_ == MAP_FAILED) {
        return -1;
    }
    if (mmap(reserve_, HEADER_SIZE + cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, r->fd,
             0) == MAP_FAILED ||
        mmap(reserve_ + HEADER_SIZE + cap, cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             r->fd, HEADER_SIZE) == MAP_FAILED) {
        int e = errno;
        munmap(reserve_, total);
        errno = e;
        return -1;
    }
    r->base = reserve_;
    r->map_len = total;
    r->h = (header_t *)reserve_;
    r->data = reserve_ + HEADER_SIZE;
    r->cap = cap;
    r->mask = cap - 1;
    r->shift = (unsigned)__builtin_ctzll(cap);
    r->limit = cap;
    r->rsize = 0;
    return 0;
}


static int
get_parts(PyObject *data, Py_buffer *views, part_t *parts, int max, int *n, size_t *total)
{
    *n = 0;
    *total = 0;
    if (PyList_Check(data) || PyTuple_Check(data)) {
        Py_ssize_t cnt = PySequence_Fast_GET_SIZE(data);
        if (cnt > max) {
            PyErr_Format(PyExc_ValueError, "at most %d buffers per message", max);
            return -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(data);
        for (Py_ssize_t i = 0; i < cnt; i++) {
            if (PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE) < 0) {
                for (int j = 0; j < *n; j++) {
                    PyBuffer_Release(&views[j]);
                }
                *n = 0;
                return -1;
            }
            parts[i].p = views[i].buf;
            parts[i].n = (size_t)views[i].len;
            *total += parts[i].n;
            *n += 1;
        }
        return 0;
    }
    if (PyObject_GetBuffer(data, &views[0], PyBUF_SIMPLE) < 0) {
        return -1;
    }
    parts[0].p = views[0].buf;
    parts[0].n = (size_t)views[0].len;
    *total = parts[0].n;
    *n = 1;
    return 0;
}

#define MAX_PARTS 64

static PyObject *
do_send_impl(Ring *r, PyObject *data, PyObject *timeout, int mode, uint32_t flags);

/* The GIL may be released inside: count the operation so that close() from
 * another thread defers the unmapping until it is back. */
static PyObject *
do_send(Ring *r, PyObject *data, PyObject *timeout, int mode, uint32_t flags)
{
    r->busy++;
    PyObject *res = do_send_impl(r, data, timeout, mode, flags);
    leave(r);
    return res;
}

static PyObject *
do_send_impl(Ring *r, PyObject *data, PyObject *timeout, int mode, uint32_t flags)
{
    /* mode 0: try (bool), 1: nowait (Full), 2: blocking with timeout */
    if (check_open(r) < 0) {
        return NULL;
    }
    int64_t deadline = 0;
    if (mode == 2 && deadline_from(timeout, &deadline) < 0) {
        return NULL;
    }
    Py_buffer views[MAX_PARTS];
    part_t parts[MAX_PARTS];
    int n;
    size_t total;
    if (get_parts(data, views, parts, MAX_PARTS, &n, &total) < 0) {
        return NULL;
    }
    int rc = send_parts(r, parts, n, total, flags, deadline);
    for (int i = 0; i < n; i++) {
        PyBuffer_Release(&views[i]);
    }
    if (rc < 0) {
        return NULL;
    }
    if (rc == 0) {
        if (mode == 0) {
            Py_RETURN_FALSE;
        }
        return raise_rc(r, RC_AGAIN, OP_SEND, 0);
    }
    if (mode == 0) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_NONE;
}

static PyObject *
do_recv_impl(Ring *r, PyObject *timeout, int mode, int want_flags);

/* The GIL may be released inside: count the operation so that close() from
 * another thread defers the unmapping until it is back. */
static PyObject *
do_recv(Ring *r, PyObject *timeout, int mode, int want_flags)
{
    r->busy++;
    PyObject *res = do_recv_impl(r, timeout, mode, want_flags);
    leave(r);
    return res;
}

static PyObject *
do_recv_impl(Ring *r, PyObject *timeout, int mode, int want_flags)
{
    /* mode 0: try (None when empty), 1: nowait (Empty), 2: blocking */
    if (check_open(r) < 0) {
        return NULL;
    }
    int64_t deadline = 0;
    if (mode == 2 && deadline_from(timeout, &deadline) < 0) {
        return NULL;
    }
    claim_args a = {NULL, 0, 0};
    /* one attempt with the GIL held: releasing it costs more than a receive */
    int rc = claim(r, 0, &a.rec, &a.len, &a.spun_ok);
    if (rc == RC_AGAIN && deadline != 0) {
        rc = run_released(r, claim_released, &a, deadline);
        if (rc == RC_RAISED) {
            return NULL;
        }
        adapt_spin(r, a.spun_ok || rc == RC_OK);
    }
    if (rc == RC_AGAIN && mode == 0) {
        Py_RETURN_NONE;
    }
    if (rc != RC_OK) {
        return raise_rc(r, rc, OP_RECV, mode == 2);
    }
    uint32_t flags = a.rec->flags;
    PyObject *out = take_bytes(r, a.rec, 0, a.len);
    if (want_flags && out != NULL) {
        return Py_BuildValue("(NI)", out, flags);
    }
    return out;
}

static PyObject *
ring_create(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "capacity", "slots", "label", "records", "record_size",
                             NULL};
    PyObject *name;
    unsigned long long cap, records = 0, record_payload = 0;
    unsigned int nslots = 64;
    const char *label = "";
    Py_ssize_t label_len = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "UK|Is#KK:create", kwlist, &name, &cap, &nslots,
                                     &label, &label_len, &records, &record_payload)) {
        return NULL;
    }
    /* fixed records: `records` of at most `record_size` payload bytes, all usable */
    uint64_t rsize = 0, limit = cap;
    if (records || record_payload) {
        if (!records || record_payload > cap || records > cap) {
            PyErr_SetString(PyExc_ValueError, "records and record_size go together, >= 1");
            return NULL;
        }
        rsize = rec_size((uint32_t)record_payload);
        if (rsize * records > cap) {
            PyErr_Format(PyExc_ValueError, "%llu records of %llu bytes need more than %llu",
                         records, (unsigned long long)rsize, cap);
            return NULL;
        }
        limit = rsize * records;
    }
    if (label_len >= 64) {
        PyErr_SetString(PyExc_ValueError, "label is at most 63 bytes");
        return NULL;
    }
    if (cap < MIN_CAPACITY || cap > MAX_CAPACITY || (cap & (cap - 1)) ||
        cap % (unsigned long long)sysconf(_SC_PAGESIZE)) {
        PyErr_Format(PyExc_ValueError,
                     "capacity must be a power of two from %llu to 2**40 bytes, not %llu",
                     (unsigned long long)MIN_CAPACITY, cap);
        return NULL;
    }
    if (nslots < 1 || nslots > MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError, "slots must be 1..%u", MAX_SLOTS);
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    Ring *r = ring_new(type, name);
    if (r == NULL) {
        return NULL;
    }
    if (create_segment(r, cname, name, nslots, (off_t)(HEADER_SIZE + cap), map_ring, cap) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    header_t *h = r->h;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->created_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    memcpy(h->label, label, (size_t)label_len);
    h->version = RING_VERSION;
    h->limit = limit;
    h->record_size = rsize;
    r->limit = limit;
    r->rsize = rsize;
    own_first_slot(r);
    atomic_thread_fence(memory_order_release);
    __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE); /* valid from now on */
    return (PyObject *)r;
}

static PyObject *
ring_attach(PyTypeObject *type, PyObject *args)
{
    PyObject *name;
    header_t copy;
    Ring *r = attach_begin(type, args, SEG_RING, &copy, &name);
    if (r == NULL) {
        return NULL;
    }
    uint64_t cap = copy.capacity;
    if (map_ring(r, cap) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    /* re-check on the live mapping: the values we use from now on come from here */
    r->limit = copy.limit;
    r->rsize = copy.record_size;
    if (r->h->capacity != cap || r->h->nslots != r->nslots || r->h->limit != r->limit ||
        r->h->record_size != r->rsize) {
        Py_DECREF(r);
        PyErr_Format(ProtocolError, "segment %S changed while attaching", name);
        return NULL;
    }
    if (attach_slot(r) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static PyObject *
ring_send(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "timeout", NULL};
    PyObject *data, *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:send", kwlist, &data, &timeout)) {
        return NULL;
    }
    return do_send(r, data, timeout, 2, 0);
}

static PyObject *
ring_send_nowait(Ring *r, PyObject *data)
{
    return do_send(r, data, NULL, 1, 0);
}

static PyObject *
ring_try_send(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    /* try_send(data, flags=0): fastcall, this is the transport's hot path */
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "try_send(data, flags=0)");
        return NULL;
    }
    uint32_t flags = 0;
    if (nargs == 2) {
        unsigned long f = PyLong_AsUnsignedLong(args[1]);
        if (f == (unsigned long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        flags = (uint32_t)f;
    }
    return do_send(r, args[0], NULL, 0, flags);
}

static PyObject *
ring_recv(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:recv", kwlist, &timeout)) {
        return NULL;
    }
    return do_recv(r, timeout, 2, 0);
}

static PyObject *
ring_recv_nowait(Ring *r, PyObject *Py_UNUSED(a))
{
    return do_recv(r, NULL, 1, 0);
}

static PyObject *
ring_try_recv(Ring *r, PyObject *Py_UNUSED(a))
{
    return do_recv(r, NULL, 0, 0);
}

static PyObject *
ring_try_recv_flags(Ring *r, PyObject *Py_UNUSED(a))
{
    return do_recv(r, NULL, 0, 1);
}

static PyObject *
ring_spin_wait(Ring *r, PyObject *arg)
{
    /* spin_wait(seconds) -> bool: wait with the GIL released, without sleeping or arming,
     * until a record is published (True) or the time is up (False) */
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (check_open(r) < 0) {
        return NULL;
    }
    header_t *h = r->h;
    if (atomic_load_explicit(&h->head, memory_order_acquire) !=
        atomic_load_explicit(&h->rd, memory_order_acquire)) {
        Py_RETURN_TRUE;
    }
    rv_mark_waiting(r);
    if (!(t > 0)) {
        Py_RETURN_FALSE;
    }
    int64_t budget = t > 1.0 ? 1000000000 : (int64_t)(t * 1e9);
    int got = 0;
    r->busy++;
    Py_BEGIN_ALLOW_THREADS
    int64_t end = now_ns() + budget;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(&h->head, memory_order_acquire) !=
            atomic_load_explicit(&h->rd, memory_order_acquire)) {
            got = 1;
            break;
        }
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
            break;
        }
        cpu_relax();
        if ((i & 63) == 0) {
            if (now_ns() >= end) {
                break;
            }
            sched_yield(); /* see claim */
        }
    }
    Py_END_ALLOW_THREADS
    leave(r);
    return PyBool_FromLong(got);
}


static PyObject *
ring_close(Ring *r, PyObject *Py_UNUSED(a))
{
    if (r->exports > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot close the ring while loans of it are unfinished");
        return NULL;
    }
    close_or_defer(r);
    Py_RETURN_NONE;
}

static PyObject *
ring_shutdown(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    atomic_store(&r->h->closed, 1);
    wake_data(r);
    wake_space(r);
    Py_RETURN_NONE;
}

/* Arm the data (or space) notification: the next commit (free) writes the notify fd.
 * Returns True if the condition already holds (do not wait). */
static PyObject *
ring_arm_data(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    header_t *h = r->h;
    rv_mark_waiting(r);
    atomic_store(&h->data_armed, 1);
    uint64_t d = atomic_load(&h->rd), hd = atomic_load(&h->head);
    if (d != hd || atomic_load(&h->closed)) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
ring_arm_space(Ring *r, PyObject *arg)
{
    if (check_open(r) < 0) {
        return NULL;
    }
    unsigned long long want = PyLong_AsUnsignedLongLong(arg);
    if (want == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    header_t *h = r->h;
    atomic_store(&h->space_armed, 1);
    uint64_t hd = atomic_load(&h->head), t = atomic_load(&h->tail);
    if (hd - t + footprint(r, (uint32_t)(want > r->cap ? r->cap : want)) <= r->limit ||
        atomic_load(&h->closed)) {
        Py_RETURN_TRUE;
    }
    if (advance_tail(r) != RC_OK) {
        return corrupt(r);
    }
    t = atomic_load(&h->tail);
    if (hd - t + footprint(r, (uint32_t)(want > r->cap ? r->cap : want)) <= r->limit) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
ring_set_notify(Ring *r, PyObject *args)
{
    int dfd, sfd;
    if (!PyArg_ParseTuple(args, "ii:set_notify", &dfd, &sfd)) {
        return NULL;
    }
    r->notify_data = dfd;
    r->notify_space = sfd;
    Py_RETURN_NONE;
}
PyObject *
ring_info(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    PyObject *parts = participants(r->fd, r->h, r->nslots, r->slot);
    if (parts == NULL) {
        return NULL;
    }
    return info_dict(r->h, parts);
}

PyObject *
ring_fileno(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    return PyLong_FromLong(r->fd);
}

static PyObject *
ring_enter(Ring *r, PyObject *Py_UNUSED(a))
{
    Py_INCREF(r);
    return (PyObject *)r;
}

static PyObject *
ring_exit(Ring *r, PyObject *Py_UNUSED(a))
{
    if (r->exports > 0) {
        PyErr_SetString(PyExc_BufferError,
                        "cannot close the ring while loans of it are unfinished");
        return NULL;
    }
    close_or_defer(r);
    Py_RETURN_FALSE;
}

static PyObject *
ring_get_capacity(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong(r->cap);
}

static PyObject *
ring_get_max_message(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromUnsignedLongLong((r->rsize ? r->rsize : r->limit) - REC_HDR);
}

PyObject *
ring_get_name(Ring *r, void *Py_UNUSED(c))
{
    Py_INCREF(r->name);
    return r->name;
}

PyObject *
ring_get_closed(Ring *r, void *Py_UNUSED(c))
{
    return PyBool_FromLong(r->base == NULL || atomic_load(&r->closing));
}

static PyObject *
ring_get_slot(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromLong(r->slot);
}

/* loans: this object's loans and received views not finished yet (an end of a shm:
 * channel with one open is not passed to another process) */
static PyObject *
ring_get_loans(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(r->exports);
}

static PyObject *
ring_get_used(Ring *r, void *Py_UNUSED(c))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load(&r->h->head) - atomic_load(&r->h->tail));
}

static PyObject *
ring_get_spin(Ring *r, void *Py_UNUSED(c))
{
    return PyBool_FromLong(r->spin_enabled);
}

static int
ring_set_spin(Ring *r, PyObject *v, void *Py_UNUSED(c))
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete spin");
        return -1;
    }
    int b = PyObject_IsTrue(v);
    if (b < 0) {
        return -1;
    }
    r->spin_enabled = b;
    return 0;
}

static PyMethodDef ring_methods[] = {
    {"create", (PyCFunction)(void (*)(void))ring_create,
     METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "create(name, capacity, slots=64): create the segment (O_EXCL, 0600) and its ring."},
    {"attach", (PyCFunction)ring_attach, METH_VARARGS | METH_CLASS,
     "attach(name): open an existing ring after validating its header."},
    {"send", (PyCFunction)(void (*)(void))ring_send, METH_VARARGS | METH_KEYWORDS,
     "send(data, timeout=None): data is bytes-like or a list/tuple of them."},
    {"send_nowait", (PyCFunction)ring_send_nowait, METH_O, "send or raise Full."},
    {"try_send", (PyCFunction)(void (*)(void))ring_try_send, METH_FASTCALL,
     "try_send(data, flags=0): send; False if the ring is full."},
    {"try_recv_flags", (PyCFunction)ring_try_recv_flags, METH_NOARGS,
     "(payload, flags) of the next message, or None if the ring is empty."},
    {"spin_wait", (PyCFunction)ring_spin_wait, METH_O,
     "spin_wait(seconds): busy-wait (GIL released, nothing armed) for a record; True if one."},
    {"recv", (PyCFunction)(void (*)(void))ring_recv, METH_VARARGS | METH_KEYWORDS,
     "recv(timeout=None) -> bytes."},
    {"recv_nowait", (PyCFunction)ring_recv_nowait, METH_NOARGS, "recv or raise Empty."},
    {"try_recv", (PyCFunction)ring_try_recv, METH_NOARGS, "recv; None if the ring is empty."},
    {"shutdown", (PyCFunction)ring_shutdown, METH_NOARGS,
     "mark the ring closed: readers drain it, then get EndOfChannel; sends fail."},
    {"arm_data", (PyCFunction)ring_arm_data, METH_NOARGS,
     "ask the next commit to write the data notify fd; True if data is already there."},
    {"arm_space", (PyCFunction)ring_arm_space, METH_O,
     "arm_space(nbytes): ask the next free to write the space notify fd; True if room."},
    {"set_notify", (PyCFunction)ring_set_notify, METH_VARARGS,
     "set_notify(data_fd, space_fd): when a peer armed, a commit writes 1 to the eventfd "
     "data_fd and a free empties the (non-blocking, one-slot) pipe read end space_fd."},
    {"info", (PyCFunction)ring_info, METH_NOARGS, "header fields and participants."},
    {"fileno", (PyCFunction)ring_fileno, METH_NOARGS, "the segment's fd (ours)."},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "unmap and release our slot."},
    {"reserve", (PyCFunction)(void (*)(void))ring_reserve, METH_VARARGS | METH_KEYWORDS,
     "reserve(nbytes, timeout=None) -> Loan: fill it in place, then commit()."},
    {"recv_view", (PyCFunction)(void (*)(void))ring_recv_view, METH_VARARGS | METH_KEYWORDS,
     "recv_view(timeout=None) -> Loan: read the next message in place, then release()."},
    {"last_put", (PyCFunction)ring_last_put, METH_NOARGS,
     "where the last record this object reserved starts: a rendezvous ticket."},
    {"rv_state", (PyCFunction)ring_rv_state, METH_O,
     "rv_state(ticket): 0 not taken yet, 1 taken, 2 withdrawn."},
    {"rv_withdraw", (PyCFunction)ring_rv_withdraw, METH_O,
     "rv_withdraw(ticket): True withdrawn (never delivered), False taken first."},
    {"rv_arm", (PyCFunction)ring_rv_arm, METH_O,
     "rv_arm(ticket): arm the space notification, then rv_state(ticket)."},
    {"rv_wait", (PyCFunction)(void (*)(void))ring_rv_wait, METH_VARARGS | METH_KEYWORDS,
     "rv_wait(ticket, timeout, spin, space_fd, sock_fd, wake_fd): 1 taken, 0 timed "
     "out, 2 woken (peer gone, wake fd); GIL released."},
    {"set_rendezvous", (PyCFunction)ring_set_rendezvous, METH_NOARGS,
     "rendezvous mode: this object's waiting receives set the receiver-waiting word."},
    {"stop_waiting", (PyCFunction)ring_stop_waiting, METH_NOARGS,
     "a receive on this ring ended without a message: clear the receiver-waiting word."},
    {"receiver_waiting", (PyCFunction)ring_receiver_waiting, METH_NOARGS,
     "a receiver began to wait and has taken nothing since, and no record is pending."},
    {"__enter__", (PyCFunction)ring_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)ring_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *
ring_get_title(Ring *r, void *Py_UNUSED(c))
{
    PyObject *t = r->title != NULL ? r->title : Py_None;
    Py_INCREF(t);
    return t;
}

static int
ring_set_title(Ring *r, PyObject *value, void *Py_UNUSED(c))
{
    if (value != NULL && value != Py_None && !PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "title must be a str or None");
        return -1;
    }
    PyObject *old = r->title;
    r->title = value == NULL || value == Py_None ? NULL : Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef ring_getset[] = {
    {"capacity", (getter)ring_get_capacity, NULL, "data bytes", NULL},
    {"max_message", (getter)ring_get_max_message, NULL, "largest payload", NULL},
    {"name", (getter)ring_get_name, NULL, "segment name", NULL},
    {"title", (getter)ring_get_title, (setter)ring_set_title,
     "what errors call this ring (the name of what owns it, as its user knows it); None: "
     "the ring and its segment name",
     NULL},
    {"closed", (getter)ring_get_closed, NULL, "closed by this process", NULL},
    {"slot", (getter)ring_get_slot, NULL, "our participant slot", NULL},
    {"used", (getter)ring_get_used, NULL, "bytes between tail and head", NULL},
    {"loans", (getter)ring_get_loans, NULL, "loans and views of ours not finished", NULL},
    {"spin", (getter)ring_get_spin, (setter)ring_set_spin, "spin before sleeping", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon._core.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A multi-producer multi-consumer ring of variable-length records in a "
              "shared-memory segment. Make one with Ring.create or Ring.attach.",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
};
