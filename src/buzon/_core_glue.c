/*
 * buzon._core, the Python glue every object shares: the rc -> exception map, the one
 * GIL-release/EINTR retry loop, deadlines, the open/busy/close bookkeeping, the send of
 * parts and the copy of a record into bytes, the C API other extension modules use to
 * put and take records (_core_api.h: what a record holds is theirs to know), and
 * opening, validating and inspecting segments (rings and blocks alike).
 */
#include "_core.h"

PyObject *ProtocolError, *TimeoutErr, *FullErr, *EmptyErr, *TooLarge, *ClosedErr, *EndErr;

/* ---- the one rc -> exception map ------------------------------------------------ */

/* Per operation: the message when it would not wait or when it timed out, and the class
 * for "would not wait" (Timeout is the other); the messages for a ring shut down by a peer and for one
 * closed by another thread of ours. %S is the segment's name. */
static const struct {
    PyObject **now_exc;
    const char *now, *timed, *closed, *gone;
} OPS[] = {
    [OP_SEND] = {&FullErr, "the ring %S is full", "sending to %S timed out (the ring is full)",
                 "the ring %S was shut down", "the ring %S was closed while sending"},
    [OP_RECV] = {&EmptyErr, "the ring %S is empty", "receiving from %S timed out",
                 "the ring %S was closed by its writer and is empty",
                 "the ring %S was closed while receiving"},
    [OP_RESERVE] = {&FullErr, "no room in the ring %S", "no room in the ring %S",
                    "the ring %S was shut down", "the ring %S was closed while reserving"},
    [OP_RECV_VIEW] = {&EmptyErr, "nothing to receive from %S", "nothing to receive from %S",
                      "the ring %S was closed by its writer and is empty",
                      "the ring %S was closed while receiving"},
    [OP_LOCK] = {&TimeoutErr, "the lock of %S is held by another process or thread",
                 "the lock of %S is held by another process or thread",
                 "the ring %S was shut down", "%S was closed while waiting for its lock"},
};

/* The same for a ring with a title (a mailbox's): %S is the title, which says what the
 * user opened ("mailbox 'jobs'"); the segment name is an implementation detail. */
static const struct {
    const char *now, *timed, *closed, *gone;
} TITLED[] = {
    [OP_SEND] = {"%S is full", "sending to %S timed out (it is full)", "%S was removed",
                 "%S was closed while sending"},
    [OP_RECV] = {"%S is empty", "receiving from %S timed out",
                 "%S was removed and is empty", "%S was closed while receiving"},
    [OP_RESERVE] = {"no room in %S", "no room in %S", "%S was removed",
                    "%S was closed while reserving"},
    [OP_RECV_VIEW] = {"nothing to receive from %S", "nothing to receive from %S",
                      "%S was removed and is empty", "%S was closed while receiving"},
    [OP_LOCK] = {"the lock of %S is held by another process or thread",
                 "the lock of %S is held by another process or thread", "%S was removed",
                 "%S was closed while waiting for its lock"},
};

PyObject *
raise_rc(Ring *r, int rc, enum op op, int waiting)
{
    PyObject *what = r->title != NULL ? r->title : r->name;
    int titled = r->title != NULL;
    switch (rc) {
    case RC_RAISED:
        return NULL; /* a signal handler's exception is already set */
    case RC_AGAIN:
        if (!waiting) {
            PyErr_Format(*OPS[op].now_exc, titled ? TITLED[op].now : OPS[op].now, what);
        }
        else {
            PyErr_Format(TimeoutErr, titled ? TITLED[op].timed : OPS[op].timed, what);
        }
        return NULL;
    case RC_CLOSED:
        PyErr_Format(EndErr, titled ? TITLED[op].closed : OPS[op].closed, what);
        return NULL;
    case RC_GONE:
        PyErr_Format(ClosedErr, titled ? TITLED[op].gone : OPS[op].gone, what);
        return NULL;
    default:
        return corrupt(r);
    }
}

/* ---- the one GIL-release/EINTR retry loop --------------------------------------- */

int
run_released(Ring *r, released_fn fn, void *arg, int64_t deadline)
{
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = fn(r, arg, deadline);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTR) {
            return rc;
        }
        if (PyErr_CheckSignals() < 0) {
            return RC_RAISED;
        }
    }
}

int
claim_released(Ring *r, void *arg, int64_t deadline)
{
    claim_args *a = arg;
    return claim(r, deadline, &a->rec, &a->len, &a->spun_ok);
}

int
reserve_released(Ring *r, void *arg, int64_t deadline)
{
    reserve_args *a = arg;
    return reserve(r, a->len, a->flags, deadline, &a->rec);
}

/* ---- deadlines, open checks, busy operations ------------------------------------ */

int
deadline_from(PyObject *timeout, int64_t *out)
{
    if (timeout == NULL || timeout == Py_None) {
        *out = -1;
        return 0;
    }
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (t != t) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number");
        return -1;
    }
    if (t <= 0) {
        *out = 0;
        return 0;
    }
    if (t > 1e9) {
        *out = -1;
        return 0;
    }
    *out = now_ns() + (int64_t)(t * 1e9);
    return 0;
}

/* In a forked child the inherited description (and its lock) is the parent's: open
 * our own and take a new slot. Called with the GIL held. */
static int
check_fork(Ring *r)
{
    uint32_t e = atomic_load_explicit(&fork_epoch, memory_order_relaxed);
    if (__builtin_expect(e == r->epoch, 1)) {
        return 0;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", r->fd);
    int nfd = open(path, O_RDWR | O_CLOEXEC); /* a /proc magic link: follow it */
    if (nfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    close(r->fd); /* not the last reference: the parent's lock stays */
    r->fd = nfd;
    r->slot = -1;
    r->epoch = e;
    /* the notify fds were inherited with the same numbers: they stay valid */
    if (take_slot(r) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

int
check_open(Ring *r)
{
    if (r->base == NULL || atomic_load(&r->closing)) {
        PyErr_SetString(ClosedErr, "the shared-memory ring is closed");
        return -1;
    }
    return check_fork(r);
}

/* The arguments of a method taking only (timeout=None): parsed, the ring checked open,
 * the timeout made a deadline (see deadline_from). */
int
timeout_only(Ring *r, PyObject *args, PyObject *kw, const char *format, int64_t *deadline)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &timeout) || check_open(r) < 0) {
        return -1;
    }
    return deadline_from(timeout, deadline);
}


/* Close now, or (another thread is inside an operation) mark closing, wake our own
 * sleepers, and let the last operation out unmap. */
void
close_or_defer(Ring *r)
{
    if (r->busy > 0 && r->base != NULL) {
        atomic_store(&r->closing, 1);
        futex_wake(&r->h->data_seq);
        futex_wake(&r->h->space_seq);
        futex_wake(&r->h->rlock);
        return;
    }
    ring_unmap(r);
}

PyObject *
corrupt(Ring *r)
{
    PyErr_Format(ProtocolError,
                 "shared-memory segment %S is corrupt (a cursor or record header is out of "
                 "range); it was written by something other than buzon",
                 r->name);
    return NULL;
}

/* ---- sending parts, copying a record out ---------------------------------------- */

/* Send parts (with the GIL held on entry and exit). 1 sent, 0 would block (only
 * when deadline == 0), -1 error. */
int
send_parts(Ring *r, const part_t *parts, int nparts, size_t total, uint32_t flags,
           int64_t deadline)
{
    uint64_t most = (r->rsize ? r->rsize : r->limit) - REC_HDR;
    if (total > most || total > UINT32_MAX - 16) {
        PyErr_Format(TooLarge,
                     "a message of %zu bytes does not fit the ring of %S (at most %llu "
                     "bytes); create it with a larger capacity",
                     total, r->name, (unsigned long long)most);
        return -1;
    }
    reserve_args a = {(uint32_t)total, flags, NULL};
    /* one attempt with the GIL held: releasing it costs more than a send */
    int rc = reserve(r, a.len, flags, 0, &a.rec);
    if (rc == RC_AGAIN && deadline != 0) {
        rc = run_released(r, reserve_released, &a, deadline);
    }
    if (rc == RC_AGAIN && deadline == 0) {
        return 0;
    }
    if (rc != RC_OK) {
        raise_rc(r, rc, OP_SEND, deadline != 0);
        return -1;
    }
    if (total >= LARGE_COPY) {
        Py_BEGIN_ALLOW_THREADS
        fill(a.rec, parts, nparts, a.len);
        commit(r, a.rec);
        Py_END_ALLOW_THREADS
    }
    else {
        fill(a.rec, parts, nparts, a.len);
        commit(r, a.rec);
    }
    return 1;
}

/* The payload of a claimed record from byte skip on as a new bytes object (the GIL
 * released to copy 64 KiB or more), then the record freed. NULL with an exception if
 * the bytes could not be allocated (the record is freed all the same: the message is
 * lost, as for any receive that fails to allocate) or the ring is corrupt. */
PyObject *
take_bytes(Ring *r, rec_t *rec, uint32_t skip, uint32_t len)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len - skip));
    if (out != NULL) {
        const uint8_t *src = (const uint8_t *)rec + REC_HDR + skip;
        if (len >= LARGE_COPY) {
            Py_BEGIN_ALLOW_THREADS
            memcpy(PyBytes_AS_STRING(out), src, len - skip);
            Py_END_ALLOW_THREADS
        }
        else {
            memcpy(PyBytes_AS_STRING(out), src, len - skip);
        }
    }
    if (release_rec(r, rec) != RC_OK) {
        Py_XDECREF(out);
        return corrupt(r);
    }
    return out;
}

/* ---- the C API (_core_api.h): opaque records for other extension modules --------
 * Here, beside check_open, send_parts and take_bytes, so the compiler may inline them:
 * the shm: channel's every small send and receive passes through put and take, a
 * mailbox's through put_wait and take_wait. */

static int
api_put(PyObject *o, const buzon_part *parts, int nparts, size_t total, uint32_t flags)
{
    Ring *r = (Ring *)o;
    if (nparts < 0 || nparts > 64) {
        PyErr_SetString(PyExc_ValueError, "a record is put as 0 to 64 parts");
        return -1;
    }
    if (check_open_fast(r) < 0) {
        return -1;
    }
    if (total > (r->rsize ? r->rsize : r->limit) - REC_HDR) {
        return 0; /* more than the ring ever takes: the caller goes another way */
    }
    r->busy++;
    int rc = send_parts(r, parts, nparts, total, flags, 0);
    leave(r);
    return rc;
}

static PyObject *
api_take(PyObject *o, buzon_peek_fn peek, void *ctx)
{
    Ring *r = (Ring *)o;
    if (check_open_fast(r) < 0) {
        return NULL;
    }
    r->busy++;
    rec_t *rec = NULL;
    uint32_t len = 0;
    int spun_ok = 0;
    PyObject *res;
    int rc = claim(r, 0, &rec, &len, &spun_ok);
    if (rc == RC_AGAIN) {
        res = Py_NewRef(Py_None);
    }
    else if (rc != RC_OK) {
        res = raise_rc(r, rc, OP_RECV, 0);
    }
    else {
        uint32_t skip = peek(ctx, (const uint8_t *)rec + REC_HDR, len, rec->flags);
        res = take_bytes(r, rec, skip > len ? len : skip, len);
    }
    leave(r);
    return res;
}

static int
api_put_wait(PyObject *o, const buzon_part *parts, int nparts, size_t total, uint32_t flags,
             PyObject *timeout)
{
    Ring *r = (Ring *)o;
    int64_t deadline;
    if (nparts < 0 || nparts > 64) {
        PyErr_SetString(PyExc_ValueError, "a record is put as 0 to 64 parts");
        return -1;
    }
    if (deadline_from(timeout, &deadline) < 0 || check_open_fast(r) < 0) {
        return -1;
    }
    r->busy++;
    int rc = send_parts(r, parts, nparts, total, flags, deadline);
    if (rc == 0) { /* only when deadline == 0: no room now */
        raise_rc(r, RC_AGAIN, OP_SEND, 0);
        rc = -1;
    }
    leave(r);
    return rc;
}

static PyObject *
api_take_wait(PyObject *o, buzon_peek_fn peek, void *ctx, PyObject *timeout)
{
    Ring *r = (Ring *)o;
    int64_t deadline;
    if (deadline_from(timeout, &deadline) < 0 || check_open_fast(r) < 0) {
        return NULL;
    }
    r->busy++;
    PyObject *res;
    claim_args a = {NULL, 0, 0};
    int rc = claim(r, 0, &a.rec, &a.len, &a.spun_ok); /* once with the GIL held */
    if (rc == RC_AGAIN && deadline != 0) {
        rc = run_released(r, claim_released, &a, deadline);
    }
    if (rc != RC_OK) {
        res = raise_rc(r, rc, OP_RECV, deadline != 0);
    }
    else {
        uint32_t skip = peek(ctx, (const uint8_t *)a.rec + REC_HDR, a.len, a.rec->flags);
        res = take_bytes(r, a.rec, skip > a.len ? a.len : skip, a.len);
    }
    leave(r);
    return res;
}

const buzon_ring_api ring_api = {
    .version = BUZON_RING_API_VERSION,
    .ring_type = &RingType,
    .put = api_put,
    .take = api_take,
    .put_wait = api_put_wait,
    .take_wait = api_take_wait,
};

/* ---- the object: new, unmapped, freed ------------------------------------------- */

void
ring_unmap(Ring *r)
{
    if (r->base != NULL) {
        if (r->slot >= 0 && r->epoch == atomic_load(&fork_epoch)) {
            /* a clean goodbye: nothing of ours is RESERVED or READING any more */
            atomic_store(&r->h->slots[r->slot].pid, 0);
        }
        munmap(r->base, r->map_len);
        r->base = NULL;
        r->h = NULL;
        r->data = NULL;
    }
    if (r->fd >= 0) {
        close(r->fd); /* releases our slot lock (the last reference to it) */
        r->fd = -1;
    }
}

void
ring_dealloc(Ring *r)
{
    ring_unmap(r);
    Py_XDECREF(r->name);
    Py_XDECREF(r->title);
    Py_TYPE(r)->tp_free((PyObject *)r);
}


Ring *
ring_new(PyTypeObject *type, PyObject *name)
{
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r == NULL) {
        return NULL;
    }
    r->fd = -1;
    r->slot = -1;
    r->notify_data = r->notify_space = -1;
    r->spin = SPIN_START;
    r->spin_enabled = 1;
    r->epoch = atomic_load(&fork_epoch);
    Py_INCREF(name);
    r->name = name;
    return r;
}

/* ---- segments: opening and validating (rings and blocks), inspecting ------------- */

/* Validate a header copy. NULL if fine, else the reason. */
static const char *
validate(const header_t *h, uint64_t file_size)
{
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != MAGIC) {
        return "bad magic (not a buzon ring, or not initialised yet)";
    }
    if (h->version != RING_VERSION) {
        if (h->version == 1) {
            return "ring format 1, made by an older buzon (this one reads format 2, which "
                   "added the ring-level rendezvous): use the same buzon version at both "
                   "ends, or remove the old segment (buzon clean)";
        }
        return "unknown ring format version";
    }
    if (h->header_size != HEADER_SIZE) {
        return "bad header size";
    }
    uint64_t cap = h->capacity;
    if (cap < MIN_CAPACITY || cap > MAX_CAPACITY || (cap & (cap - 1))) {
        return "bad capacity";
    }
    if (file_size != HEADER_SIZE + cap) {
        return "the segment's size does not match its capacity";
    }
    if (h->nslots < 1 || h->nslots > MAX_SLOTS) {
        return "bad slot count";
    }
    if (h->record_size % 8 || (h->record_size && h->record_size < REC_HDR) ||
        h->record_size > cap) {
        return "bad record size";
    }
    if (h->limit > cap || h->limit < REC_HDR + 8 ||
        (h->record_size && h->limit % h->record_size)) {
        return "bad limit";
    }
    uint64_t head = atomic_load(&((header_t *)h)->head);
    uint64_t rd = atomic_load(&((header_t *)h)->rd);
    uint64_t tail = atomic_load(&((header_t *)h)->tail);
    if (head - tail > h->limit || rd - tail > head - tail) {
        return "cursors out of range";
    }
    return NULL;
}


uint64_t
page_round(uint64_t n)
{
    uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
    return (n + ps - 1) / ps * ps;
}

/* Validate a block's header copy; data is the file size minus the header page. */
static const char *
validate_block(const header_t *h, uint64_t data)
{
    if (h->magic != BLOCK_MAGIC) {
        return "bad magic (not a buzon block, or not initialised yet)";
    }
    if (h->version != VERSION || h->header_size != HEADER_SIZE) {
        return "unknown version or header size";
    }
    if (h->capacity > MAX_CAPACITY || page_round(h->capacity ? h->capacity : 1) != data) {
        return "the segment's size does not match the block size";
    }
    if (h->nslots < 1 || h->nslots > MAX_SLOTS) {
        return "bad slot count";
    }
    return NULL;
}

/* Open an existing segment of the given kind and check it before mapping it fully: our
 * own user's, mode 0600, large enough, and a header (first page of a ring, last page of a
 * block) that validates; *copy is the validated header. The fd, or -1 with an exception. */
int
open_checked(const char *cname, PyObject *name, int flags, enum seg_kind kind, header_t *copy)
{
    const char *what = kind == SEG_RING ? "ring" : "block";
    /* "/proc/PID/fd/N": a segment another process of ours holds after its name was
     * removed (shm: channels unlink their rings once attached); only inspect() is
     * given such a path (buzon ls), and the checks below apply to it as to any name */
    int fd = strncmp(cname, "/proc/", 6) == 0 ? open(cname, flags | O_CLOEXEC)
                                               : shm_open(cname, flags | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        close(fd);
        return -1;
    }
    if (st.st_uid != geteuid() || (st.st_mode & 077)) {
        char mode[8]; /* PyErr_Format has no %o */
        snprintf(mode, sizeof mode, "%o", (unsigned)(st.st_mode & 0777));
        PyErr_Format(PyExc_PermissionError,
                     "segment %S belongs to uid %u with mode %s; buzon attaches only its own "
                     "user's segments with mode 0600",
                     name, (unsigned)st.st_uid, mode);
        close(fd);
        return -1;
    }
    uint64_t size = (uint64_t)st.st_size;
    uint64_t least = kind == SEG_RING ? HEADER_SIZE : HEADER_SIZE + 4096;
    /* a block's header page follows its page-rounded data */
    uint64_t at = kind == SEG_RING ? 0 : size - HEADER_SIZE;
    if (size < least || at % (uint64_t)sysconf(_SC_PAGESIZE)) {
        PyErr_Format(ProtocolError, "segment %S is too small to be a buzon %s", name, what);
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, HEADER_SIZE, PROT_READ, MAP_SHARED, fd, (off_t)at);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        close(fd);
        return -1;
    }
    /* the magic first (the creator stores it last, with release), then the copy that is
     * validated and used: never a value read again from memory another process writes */
    uint64_t magic = __atomic_load_n(&((const header_t *)p)->magic, __ATOMIC_ACQUIRE);
    memcpy(copy, p, sizeof *copy);
    munmap(p, HEADER_SIZE);
    const char *why;
    if (magic != (kind == SEG_RING ? MAGIC : BLOCK_MAGIC)) {
        why = kind == SEG_RING ? "bad magic (not a buzon ring, or not initialised yet)"
                               : "bad magic (not a buzon block, or not initialised yet)";
    }
    else {
        why = kind == SEG_RING ? validate(copy, size) : validate_block(copy, at);
    }
    if (why != NULL) {
        PyErr_Format(ProtocolError, "segment %S is not a valid buzon %s: %s", name, what, why);
        close(fd);
        return -1;
    }
    return fd;
}

/* Make the segment `cname` of a new object (from ring_new): O_EXCL, 0600, slot 0's
 * lock taken before the segment has a size (so `buzon clean` sees it alive at once),
 * `bytes` long, mapped by `map` for `capacity`, its header holding what every segment
 * carries (version, sizes, creator). -1 with an exception set, the name unlinked. */
int
create_segment(Ring *r, const char *cname, PyObject *name, uint32_t nslots, off_t bytes,
               int (*map)(Ring *, uint64_t), uint64_t capacity)
{
    r->fd = shm_open(cname, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (r->fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return -1;
    }
    r->nslots = nslots;
    if (lock_byte(r->fd, F_OFD_SETLK, F_WRLCK, 0, 1, NULL) < 0 || fchmod(r->fd, 0600) < 0 ||
        ftruncate(r->fd, bytes) < 0 || map(r, capacity) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        shm_unlink(cname);
        return -1;
    }
    header_t *h = r->h;
    h->version = VERSION;
    h->header_size = HEADER_SIZE;
    h->capacity = capacity;
    h->nslots = nslots;
    h->creator_pid = (uint32_t)getpid();
    h->creator_uid = (uint32_t)getuid();
    return 0;
}

/* The creator holds slot 0 (its lock was taken by create_segment). */
void
own_first_slot(Ring *r)
{
    atomic_store(&r->h->slots[0].gen, 1);
    atomic_store(&r->h->slots[0].pid, (uint32_t)getpid());
    r->slot = 0;
    r->token = (1u << 8) | 1u;
}

/* The start both Ring.attach and Block.attach share: parse the name (a borrowed
 * reference in *name), refuse a /proc path other than "/proc/self/fd/N" (attach takes
 * names, or a segment this process holds by an fd: the end of a shm: channel passed to
 * another process, whose rings have no name any more; inspect takes more), open the
 * segment checked as `kind` (its header copied to *copy), and make the object with its
 * fd and slot count. NULL with an exception set on failure. */
Ring *
attach_begin(PyTypeObject *type, PyObject *args, enum seg_kind kind, header_t *copy,
             PyObject **name)
{
    if (!PyArg_ParseTuple(args, "U:attach", name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(*name);
    if (cname == NULL) {
        return NULL;
    }
    if (strncmp(cname, "/proc/", 6) == 0 && strncmp(cname, "/proc/self/fd/", 14) != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "attach takes a segment name or /proc/self/fd/N (inspect takes more)");
        return NULL;
    }
    int fd = open_checked(cname, *name, O_RDWR, kind, copy);
    if (fd < 0) {
        return NULL;
    }
    Ring *r = ring_new(type, *name);
    if (r == NULL) {
        close(fd);
        return NULL;
    }
    r->fd = fd;
    r->nslots = copy->nslots;
    return r;
}

/* Take a participant slot for a newly attached object (rings and blocks alike). 0, or
 * -1 with an exception: OSError(EUSERS) naming the segment when every slot is taken. */
int
attach_slot(Ring *r)
{
    if (take_slot(r) == 0) {
        return 0;
    }
    if (errno == EUSERS) {
        PyObject *msg = PyUnicode_FromFormat("segment %S: all %u participant slots are in use",
                                             r->name, r->nslots);
        PyObject *exc = msg ? PyObject_CallFunction(PyExc_OSError, "iN", EUSERS, msg) : NULL;
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    else {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, r->name);
    }
    return -1;
}

PyObject *
participants(int fd, const header_t *h, uint32_t nslots, int my_slot)
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    for (uint32_t i = 0; i < nslots; i++) {
        uint32_t pid = atomic_load(&((header_t *)h)->slots[i].pid);
        int alive = ((int)i == my_slot) ? 1 : lock_held(fd, (off_t)i, 1);
        if (!alive && pid == 0) {
            continue;
        }
        PyObject *t = Py_BuildValue("(IIO)", i, pid, alive ? Py_True : Py_False);
        if (t == NULL || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    return list;
}

PyObject *
info_dict(const header_t *h, PyObject *parts)
{
    header_t *hh = (header_t *)h;
    char label[64];
    size_t n = 0;
    for (; n < sizeof label - 1 && h->label[n]; n++) {
        char c = h->label[n];
        label[n] = (c >= 0x20 && c < 0x7f) ? c : '?'; /* untrusted: printable ASCII only */
    }
    label[n] = 0;
    uint64_t head = atomic_load(&hh->head), tail = atomic_load(&hh->tail);
    return Py_BuildValue("{s:s,s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:I,s:I,s:K,s:O,s:K,s:K,s:K,s:N}",
                         "kind", h->magic == BLOCK_MAGIC ? "block" : "ring", "label", label, "limit", (unsigned long long)h->limit, "record_size",
                         (unsigned long long)h->record_size, "capacity",
                         (unsigned long long)h->capacity, "used",
                         (unsigned long long)(head - tail), "head", (unsigned long long)head,
                         "rd", (unsigned long long)atomic_load(&hh->rd), "tail",
                         (unsigned long long)tail, "creator_pid", h->creator_pid, "creator_uid",
                         h->creator_uid, "created_ns", (unsigned long long)h->created_ns,
                         "closed", atomic_load(&hh->closed) ? Py_True : Py_False, "committed",
                         (unsigned long long)atomic_load(&hh->committed), "consumed",
                         (unsigned long long)atomic_load(&hh->consumed), "abandoned",
                         (unsigned long long)atomic_load(&hh->abandoned), "participants",
                         parts);
}
