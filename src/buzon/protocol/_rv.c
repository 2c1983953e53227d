/* The rendezvous (capacity=0) send and receive of a blocking channel on a framed
 * stream (pipe:, unix:, tcp:), in C: what protocol/credit.py and the engine's
 * send_steps/recv_steps do for it in the common case, one call each.
 *
 *   RvStream(rfd, wfd, core, lock, limit, on_part[, sock])
 *       ``core`` the ChannelCore (its fields read and written through its __dict__,
 *       its SendFlow/RecvFlow/FrameDecoder/Statistics through their slots), ``lock``
 *       the driver's write lock (held around every write: acquire(False) for the
 *       message, a blocking acquire for a CREDIT, as emit_credit does), ``limit`` the
 *       largest payload this call sends, ``on_part(offer, flags, data, written)`` keeps
 *       the tail of a message the kernel took in part (the core's own way) and returns
 *       its serial; ``sock``: the fds are a stream socket (recv/sendmsg with
 *       MSG_DONTWAIT, which never block even in blocking mode).
 *
 *   send(data, whole, deadline, spin, wake) -> int
 *       A rendezvous send_bytes (``whole`` false: ``data`` is the payload) or send
 *       (``whole`` true: ``data`` is an encoded plain frame). The caller holds the read
 *       lock. Only on a quiet channel (nothing owed, nothing read and not taken, the
 *       receiver's offer known: sflow.sent < sflow.limit): else 0 and nothing changed.
 *       Then: the offer of this end (it receives next) and the message in one write,
 *       the wait (spin ``spin`` seconds, then sleep in poll with ``wake`` until
 *       ``deadline``, GIL released) for the CREDIT that says it was taken, then, when a
 *       reply is expected (the channel spins and its receives follow its sends), a spin
 *       of ``spin`` for it and one read; the offer is withdrawn if no reply came.
 *       Returns 1 done; 3 written in part (``number``/``serial``: the engine finishes);
 *       4 the deadline passed before the take; 5 ``wake`` became readable (a close()
 *       in another thread); 6 a read this call does not handle (``n`` bytes left at the
 *       start of the decoder's buffer, 0: end of stream, -1 with ``err``: the read
 *       failed) before the take; 7 the same after the take (the reply's read). A signal
 *       handler's exception propagates (the message is then number ``number``).
 *       Reads are handled here when they are exactly a run of plain CREDIT frames and
 *       at most one plain DATA frame, the CREDIT legal (SendFlow.on_credit's checks),
 *       the read shorter than the buffer; a DATA frame met is kept in decoder.frames.
 *
 *   take() -> (flags, body) | None
 *       recv's first half alone: a message in hand taken if the gate is open, else None
 *       (nothing changed).
 *
 *   recv(deadline, spin, wake) -> (flags, body) | int
 *       A rendezvous receive, the read lock held by the caller: a message in hand taken
 *       if the gate is open (offer standing, a read after it found the link empty, no
 *       withdrawn message pending), else (nothing in hand, the decoder idle) the offer
 *       written, the wait, the read, the take, and its CREDIT. Returns the message, or
 *       0 (not applicable, nothing changed), 4, 5, 6 (as send; 6 with ``n`` -1 and
 *       ``err`` 0: the offer is owed, the engine goes on).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <pythread.h>
#include <time.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <structmember.h> /* T_OBJECT_EX, READONLY */

#include "_wait.h"
#include "_writer.h"

#define KIND_CREDIT 6
#define NOT_FAST 0xFC /* a plain DATA frame the rendezvous path takes: no receipt either */
#define CREDIT_SIZE 24
#define UNLIMITED UINT64_MAX

enum { RV_NA = 0, RV_DONE = 1, RV_PART = 3, RV_TIMEOUT = 4, RV_WOKEN = 5, RV_HANDOVER = 6,
       RV_REPLY = 7 };

typedef struct {
    PyObject_HEAD
    int rfd, wfd, sock, fifo;
    Py_ssize_t limit;
    PyObject *core, *state, *acquire, *release, *locked, *on_part;
    long long number, serial; /* the message of the last send() */
    Py_ssize_t n;             /* bytes left for the decoder (codes 6, 7) */
    int err;                  /* errno of a failed read (n == -1) */
    /* the deferred take (the confirmer's view, read without the GIL): ``hint`` a take's
     * CREDIT may be owed, ``takes`` deferred takes so far; the confirmer's list */
    int hint;
    unsigned long takes, seen;
    int registered, due;
    void *next, *prev;
    /* the channel (RvCall binds it, weakly; its __dict__ borrowed): a CREDIT calls the
     * core's ``on_credit`` only while a thread waits for another's reads (``_pumpers``) */
    PyObject *chref, *chd;
    /* the statistics this object's calls add (counts(): ChannelCore.statistics adds
     * them to the core's), kept here: a Python int per count per call costs more than
     * the rest of the count's use */
    uint64_t cnt[7];
    PyObject *peer_seen, *pid_seen; /* core.peer and its pid, as last read */
} RvStream;

enum { C_MSENT, C_BSENT, C_CSENT, C_CRECV, C_BRECV, C_MRECV, C_RWB };

static PyObject *s_pending, *s_credit_out, *s_closed, *s_eof, *s_sflow, *s_rflow, *s_decoder,
    *s_stats, *s_serial, *s_taken, *s_rv_valid, *s_rv_void, *s_rv_reply, *s_rv_after_send,
    *s_credit_blocked, *s_on_credit, *s_peer, *s_pid, *s_sent, *s_limit, *s_receiver,
    *s_granted, *s_offering, *s_reported, *s_report_due, *s_peer_blocked, *s_unreported,
    *s_end, *s_big, *s_error, *s_frames, *s_buf, *s_messages_sent, *s_bytes_sent,
    *s_messages_received, *s_bytes_received, *s_credits_sent, *s_credits_received,
    *s_popleft, *s_append, *s_recv_would_block, *s_pumpers, *s_wake, *s_waiters, *s_closing,
    *s_timeout, *s_drop_wake, *s_wake_pumpers, *s_failed_code;

/* collections.deque's append and popleft (method descriptors, found at import): a
 * call on an exact deque skips the method look-up; anything else looks it up */
static PyObject *deque_type, *d_append, *d_popleft;

static PyObject *deque_call(PyObject *method, PyObject *name, PyObject *obj, PyObject *arg) {
    if (method != NULL && (PyObject *)Py_TYPE(obj) == deque_type) {
        PyObject *args[2] = {obj, arg};
        return PyObject_Vectorcall(method, args, arg == NULL ? 1 : 2, NULL);
    }
    return arg == NULL ? PyObject_CallMethodNoArgs(obj, name)
                       : PyObject_CallMethodOneArg(obj, name, arg);
}

/* -- field access ---------------------------------------------------------------- */

static PyObject *field(RvStream *self, PyObject *name) { /* borrowed */
    PyObject *v = PyDict_GetItemWithError(self->state, name);
    if (v == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_AttributeError, "the channel core has no %R", name);
    return v;
}

static int set_field(RvStream *self, PyObject *name, PyObject *v) {
    if ((v == Py_True || v == Py_False) && PyDict_GetItemWithError(self->state, name) == v)
        return 0; /* a flag that is so already: a look-up costs less than a store */
    return PyErr_Occurred() ? -1 : PyDict_SetItem(self->state, name, v);
}

/* The flows, the decoder and the statistics keep their fields in __slots__: their
 * member descriptors' offsets, found once per (type, name) and kept in a small cache,
 * read and write them directly (a generic attribute look-up costs more than the rest of
 * a field's use). Anything that is not a plain writable object slot takes the generic
 * way. */
typedef struct {
    PyTypeObject *type;
    PyObject *name;
    unsigned int version; /* the type's version tag when the entry was made */
    Py_ssize_t off;       /* -1: not a plain slot */
} SlotEntry;

#define SLOT_CACHE 1024
static SlotEntry slot_cache[SLOT_CACHE];

static Py_ssize_t slot_offset(PyTypeObject *type, PyObject *name) {
    /* a multiplicative hash of both pointers (the names are interned strings, the
     * types few: the 30-odd pairs of a channel must not evict one another) */
    uint64_t k = ((uint64_t)(uintptr_t)type * 0x9E3779B97F4A7C15ull) ^ (uint64_t)(uintptr_t)name;
    size_t h = (size_t)((k * 0xBF58476D1CE4E5B9ull) >> 54) & (SLOT_CACHE - 1);
    SlotEntry *e = &slot_cache[h];
    int tagged = PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG);
    if (tagged && e->type == type && e->name == name && e->version == type->tp_version_tag)
        return e->off;
    Py_ssize_t off = -1;
    PyObject *d = _PyType_Lookup(type, name); /* borrowed */
    if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY))
            off = m->offset;
    }
    /* the entry holds no references: a type that goes away leaves a stale pointer, and
     * a new type at the same address has another version tag (a changed type too) */
    if (PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) {
        e->type = type;
        e->name = name;
        e->version = type->tp_version_tag;
        e->off = off;
    }
    return off;
}

/* getattr(obj, name), a new reference */
static PyObject *slot_get(PyObject *obj, PyObject *name) {
    Py_ssize_t off = slot_offset(Py_TYPE(obj), name);
    if (off < 0)
        return PyObject_GetAttr(obj, name);
    PyObject *v = *(PyObject **)((char *)obj + off);
    if (v == NULL) {
        PyErr_Format(PyExc_AttributeError, "%R has no %U", obj, name);
        return NULL;
    }
    return Py_NewRef(v);
}

/* setattr(obj, name, v) */
static int slot_set(PyObject *obj, PyObject *name, PyObject *v) {
    Py_ssize_t off = slot_offset(Py_TYPE(obj), name);
    if (off < 0)
        return PyObject_SetAttr(obj, name, v);
    PyObject **at = (PyObject **)((char *)obj + off);
    PyObject *old = *at;
    *at = Py_NewRef(v);
    Py_XDECREF(old);
    return 0;
}

static int get_u64(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = slot_get(obj, name);
    if (v == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)x;
    return 0;
}

static int set_u64(PyObject *obj, PyObject *name, uint64_t x) {
    PyObject *v = PyLong_FromUnsignedLongLong((unsigned long long)x);
    if (v == NULL)
        return -1;
    int r = slot_set(obj, name, v);
    Py_DECREF(v);
    return r;
}

static int add_u64(PyObject *obj, PyObject *name, uint64_t delta) {
    uint64_t x;
    if (get_u64(obj, name, &x) < 0)
        return -1;
    return set_u64(obj, name, x + delta);
}

/* 1 the attribute is true, 0 false, -1 error */
static int get_bool(PyObject *obj, PyObject *name) {
    PyObject *v = slot_get(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

static int set_bool(PyObject *obj, PyObject *name, int b) {
    return slot_set(obj, name, b ? Py_True : Py_False);
}

/* -- wire ------------------------------------------------------------------------- */

static void put_u64(unsigned char *p, uint64_t x) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(x >> (8 * i));
}

static uint64_t read_u64(const unsigned char *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--)
        x = (x << 8) | p[i];
    return x;
}

static void credit_frame(unsigned char f[CREDIT_SIZE], uint64_t taken, uint64_t limit) {
    static const unsigned char head[8] = {BUZON_FRAME_VERSION, KIND_CREDIT, 0, 0, 16, 0, 0, 0};
    memcpy(f, head, 8);
    put_u64(f + 8, taken);
    put_u64(f + 16, limit);
}

static int is_credit(const unsigned char *h) {
    static const unsigned char head[8] = {BUZON_FRAME_VERSION, KIND_CREDIT, 0, 0, 16, 0, 0, 0};
    return memcmp(h, head, 8) == 0;
}

/* a vectored write that never blocks; EINTR retried */
static ssize_t put_vec(RvStream *self, struct iovec *iov, int n) {
    ssize_t got;
    do {
        if (self->sock) {
            struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
            got = sendmsg(self->wfd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            got = writev(self->wfd, iov, n);
        }
    } while (got < 0 && errno == EINTR);
    return got;
}

/* one read that never blocks; EINTR retried */
static ssize_t get_bytes(RvStream *self, unsigned char *buf, size_t room) {
    ssize_t got;
    do
        got = self->sock ? recv(self->rfd, buf, room, MSG_DONTWAIT) : read(self->rfd, buf, room);
    while (got < 0 && errno == EINTR);
    return got;
}

/* -- the flows (protocol/credit.py) ------------------------------------------------- */

/* RecvFlow._announce after ``limit`` was set: the counts reported; the CREDIT in ``f`` */
static int announce(PyObject *rflow, uint64_t taken, uint64_t limit, unsigned char *f) {
    uint64_t granted;
    PyObject *zero = PyLong_FromLong(0); /* a cached small int */
    int r = slot_set(rflow, s_unreported, zero);
    Py_DECREF(zero);
    if (r < 0 || set_u64(rflow, s_reported, taken) < 0 || set_bool(rflow, s_report_due, 0) < 0 ||
        set_bool(rflow, s_peer_blocked, 0) < 0 || get_u64(rflow, s_granted, &granted) < 0)
        return -1;
    if (limit > granted && set_u64(rflow, s_granted, limit) < 0)
        return -1;
    credit_frame(f, taken, limit);
    return 0;
}

/* RecvFlow.before_wait for capacity 0: offer one message. 1 the CREDIT is in ``f``, 0
 * an offer stands already, -1 error */
static int offer(RvStream *self, PyObject *rflow, unsigned char *f) {
    int offering = get_bool(rflow, s_offering);
    if (offering != 0)
        return offering < 0 ? -1 : 0;
    uint64_t taken;
    if (get_u64(rflow, s_taken, &taken) < 0 || set_bool(rflow, s_offering, 1) < 0 ||
        set_u64(rflow, s_limit, taken + 1) < 0)
        return -1;
    __atomic_store_n(&self->hint, 0, __ATOMIC_SEQ_CST); /* it carries a deferred take */
    return announce(rflow, taken, taken + 1, f) < 0 ? -1 : 1;
}

/* RecvFlow.on_wait_end for capacity 0 (the offer withdrawn): the CREDIT in ``f``. 1
 * done, -1 error (a take is take(): deferred) */
static int offer_end(RvStream *self, PyObject *rflow, unsigned char *f) {
    uint64_t taken;
    if (get_u64(rflow, s_taken, &taken) < 0)
        return -1;
    if (set_bool(rflow, s_offering, 0) < 0 || set_u64(rflow, s_limit, taken) < 0)
        return -1;
    __atomic_store_n(&self->hint, 0, __ATOMIC_SEQ_CST);
    return announce(rflow, taken, taken, f) < 0 ? -1 : 1;
}

/* ChannelCore.emit_credit of the CREDIT in ``f`` (the channel is open): under the write
 * lock, written now unless bytes are owed ahead of it; what cannot be written stays
 * owed (``credit_out``), a tail in ``pending``. 0 ok, -1 error */
static int write_credit_locked(RvStream *self, const unsigned char *f);

static int emit_credit(RvStream *self, const unsigned char *f) {
    PyObject *held = PyObject_CallNoArgs(self->acquire);
    if (held == NULL)
        return -1;
    Py_DECREF(held);
    int rc = write_credit_locked(self, f);
    return unlock_with(self->release, Py_None) == NULL ? -1 : rc;
}

/* emit_credit's write, the write lock held */
static int write_credit_locked(RvStream *self, const unsigned char *f) {
    PyObject *frame = NULL; /* made only if it is kept */
    int rc = -1;
    PyObject *pending = field(self, s_pending);
    Py_ssize_t owed = pending == NULL ? -1 : PyObject_Length(pending);
    if (owed < 0)
        goto out;
    ssize_t got = -1;
    int e = EAGAIN;
    if (owed == 0) {
        struct iovec iov = {.iov_base = (void *)f, .iov_len = CREDIT_SIZE};
        got = put_vec(self, &iov, 1);
        e = got < 0 ? errno : 0;
    }
    if (got < 0 && e != EAGAIN && e != EWOULDBLOCK) {
        rc = set_field(self, s_credit_out, Py_None); /* nobody left to tell */
        goto out;
    }
    if (got < CREDIT_SIZE) /* owed, or written in part: the frame is kept */
        frame = PyBytes_FromStringAndSize((const char *)f, CREDIT_SIZE);
    if (got < CREDIT_SIZE && frame == NULL)
        goto out;
    if (got < 0) { /* behind bytes of ours, or no room: the next flush writes it */
        rc = set_field(self, s_credit_out, frame);
        goto out;
    }
    if (set_field(self, s_credit_out, Py_None) < 0)
        goto out;
    if (got < CREDIT_SIZE) {
        PyObject *r = PyObject_CallMethod(self->core, "_keep_tail", "[O]n",
                                          frame, (Py_ssize_t)got);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    self->cnt[C_CSENT]++;
    rc = 0;
out:
    Py_XDECREF(frame);
    return rc;
}

/* -- deferred takes and the confirmer ----------------------------------------------
 *
 * A take's CREDIT is not written at the take (take() below): it rides with this end's
 * next CREDIT, which every path writes before its next message or wait (the offer
 * carries ``taken``), so a request/response costs two writes. For an end that makes no
 * further call on the channel (it computes, or waits elsewhere, maybe for the very
 * sender), one thread per process, started at the first deferred take, writes what is
 * owed between one and two ticks (``confirm_delay``, 1 ms) after the take: it looks at
 * the RvStreams' ``hint``/``takes`` without the GIL, and only when a take stayed owed
 * for a whole tick takes the GIL and confirm()s it (the write lock taken without
 * waiting; busy: the next tick). Idle for CF_IDLE_TICKS ticks with nothing owed, it
 * sleeps until the next deferred take wakes it. Fork: the child forgets the list and
 * the thread (its owed takes are the parent's to confirm); at_exit() confirms what is
 * owed and stops the thread before the interpreter finalizes. */

#define CF_IDLE_TICKS 200

static pthread_mutex_t cf_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cf_cv; /* cf_cond_init(), at the first deferred take */
static RvStream *cf_list;
static int cf_running, cf_idle, cf_stop, cf_atfork;
static unsigned long cf_takes;
static long cf_tick_ns = 1000000;

static int confirm(RvStream *self);

/* the cond on the monotonic clock (a new tick or a stop wakes the sleep) */
static void cf_cond_init(void) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&cf_cv, &attr);
    pthread_condattr_destroy(&attr);
}

/* one tick's sleep, cf_mu held (released meanwhile) */
static void cf_sleep_tick(void) {
    long ns = __atomic_load_n(&cf_tick_ns, __ATOMIC_RELAXED);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ns / 1000000000L;
    ts.tv_nsec += ns % 1000000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&cf_cv, &cf_mu, &ts);
}

/* marks the entries owed for a whole tick ``due``; returns how many, and in
 * ``*hinted`` whether any take is owed at all (cf_mu held) */
static int cf_scan(int *hinted) {
    int due = 0;
    *hinted = 0;
    for (RvStream *e = cf_list; e != NULL; e = (RvStream *)e->next) {
        if (!__atomic_load_n(&e->hint, __ATOMIC_SEQ_CST))
            continue;
        *hinted = 1;
        unsigned long t = __atomic_load_n(&e->takes, __ATOMIC_SEQ_CST);
        if (t == e->seen) {
            e->due = 1;
            due++;
        } else {
            e->seen = t;
        }
    }
    return due;
}

#define CF_BATCH 64

/* the GIL held, cf_mu not: confirm the entries marked due (or, ``all``, every hinted) */
static void cf_confirm_marked(int all) {
    RvStream *batch[CF_BATCH];
    int n;
    do {
        n = 0;
        pthread_mutex_lock(&cf_mu);
        for (RvStream *e = cf_list; e != NULL && n < CF_BATCH; e = (RvStream *)e->next) {
            if (e->due || (all && __atomic_load_n(&e->hint, __ATOMIC_SEQ_CST))) {
                e->due = 0;
                if (all)
                    __atomic_store_n(&e->hint, 0, __ATOMIC_SEQ_CST);
                Py_INCREF(e);
                batch[n++] = e;
            }
        }
        pthread_mutex_unlock(&cf_mu);
        for (int i = 0; i < n; i++) {
            if (confirm(batch[i]) < 0)
                PyErr_WriteUnraisable((PyObject *)batch[i]);
            Py_DECREF(batch[i]);
        }
    } while (n == CF_BATCH);
}

static void *cf_main(void *unused) {
    (void)unused;
    unsigned long last = 0;
    int quiet_ticks = 0;
    pthread_mutex_lock(&cf_mu);
    while (!cf_stop) {
        int hinted;
        int due = cf_scan(&hinted);
        unsigned long t = __atomic_load_n(&cf_takes, __ATOMIC_SEQ_CST);
        quiet_ticks = t != last ? 0 : quiet_ticks + 1;
        last = t;
        if (due) {
            pthread_mutex_unlock(&cf_mu);
            if (!__atomic_load_n(&cf_stop, __ATOMIC_SEQ_CST) && Py_IsInitialized()) {
                PyGILState_STATE g = PyGILState_Ensure();
                cf_confirm_marked(0);
                PyGILState_Release(g);
            }
            pthread_mutex_lock(&cf_mu);
            continue;
        }
        if (!hinted && quiet_ticks >= CF_IDLE_TICKS) {
            /* going idle: a take that stores its hint after our last look sees
             * cf_idle and wakes us (both seq_cst: one of the two sees the other) */
            __atomic_store_n(&cf_idle, 1, __ATOMIC_SEQ_CST);
            cf_scan(&hinted);
            if (!hinted && !cf_stop)
                pthread_cond_wait(&cf_cv, &cf_mu);
            __atomic_store_n(&cf_idle, 0, __ATOMIC_SEQ_CST);
            quiet_ticks = 0;
            continue;
        }
        cf_sleep_tick();
    }
    __atomic_store_n(&cf_running, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&cf_mu);
    return NULL;
}

static void cf_prepare(void) { pthread_mutex_lock(&cf_mu); }
static void cf_parent(void) { pthread_mutex_unlock(&cf_mu); }
static void cf_child(void) {
    /* no thread here: forget the list (the owed takes are the parent's) */
    pthread_mutex_init(&cf_mu, NULL);
    cf_cond_init();
    for (RvStream *e = cf_list; e != NULL;) {
        RvStream *next = (RvStream *)e->next;
        e->registered = e->due = e->hint = 0;
        e->next = e->prev = NULL;
        e = next;
    }
    cf_list = NULL;
    cf_running = cf_idle = 0;
}

/* a take was deferred (the GIL held): the confirmer watches it */
static int defer_take(RvStream *self) {
    __atomic_add_fetch(&self->takes, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&self->hint, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&cf_takes, 1, __ATOMIC_SEQ_CST);
    if (self->registered && __atomic_load_n(&cf_running, __ATOMIC_SEQ_CST) &&
        !__atomic_load_n(&cf_idle, __ATOMIC_SEQ_CST) &&
        !__atomic_load_n(&cf_stop, __ATOMIC_SEQ_CST))
        return 0;
    int rc = 0;
    pthread_mutex_lock(&cf_mu);
    if (!cf_atfork) {
        cf_cond_init();
        if (pthread_atfork(cf_prepare, cf_parent, cf_child) != 0)
            rc = -1;
        cf_atfork = 1;
    }
    if (!self->registered) {
        self->next = cf_list;
        self->prev = NULL;
        if (cf_list != NULL)
            cf_list->prev = self;
        cf_list = self;
        self->registered = 1;
        self->seen = 0;
    }
    if (!cf_running && !cf_stop) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, cf_main, NULL) == 0)
            __atomic_store_n(&cf_running, 1, __ATOMIC_SEQ_CST);
        else
            rc = -1;
        pthread_attr_destroy(&attr);
    }
    if (cf_stop)
        rc = -1; /* the interpreter exits (at_exit ran) */
    if (cf_idle)
        pthread_cond_signal(&cf_cv);
    pthread_mutex_unlock(&cf_mu);
    if (rc < 0) /* no confirmer (exiting, or no thread to be had): the CREDIT goes now */
        return confirm(self) < 0 ? -1 : 0;
    return 0;
}

static void cf_unregister(RvStream *self) {
    if (!self->registered)
        return;
    pthread_mutex_lock(&cf_mu);
    if (self->registered) {
        RvStream *prev = (RvStream *)self->prev, *next = (RvStream *)self->next;
        if (prev != NULL)
            prev->next = next;
        else
            cf_list = next;
        if (next != NULL)
            next->prev = prev;
        self->registered = 0;
        self->next = self->prev = NULL;
    }
    pthread_mutex_unlock(&cf_mu);
}

/* Write the CREDIT a deferred take owes (RecvFlow.confirm), under the GIL, without
 * waiting for the write lock. 1 done (or left owed to the next flush, as emit_credit
 * leaves it), 0 nothing owed (or closed), 2 the lock was busy (the hint stays: the
 * confirmer tries again), -1 error */
static int confirm(RvStream *self) {
    __atomic_store_n(&self->hint, 0, __ATOMIC_SEQ_CST);
    if (self->state == NULL)
        return 0;
    int closed = core_flag(self->state, s_closed, 0);
    if (closed != 0)
        return closed < 0 ? -1 : 0;
    PyObject *rflow = field(self, s_rflow);
    if (rflow == NULL)
        return -1;
    if (rflow == Py_None)
        return 0;
    uint64_t taken, reported, limit;
    if (get_u64(rflow, s_taken, &taken) < 0 || get_u64(rflow, s_reported, &reported) < 0 ||
        get_u64(rflow, s_limit, &limit) < 0)
        return -1;
    if (taken <= reported)
        return 0;
    int locked = try_lock(self->acquire);
    if (locked <= 0) {
        if (locked == 0)
            __atomic_store_n(&self->hint, 1, __ATOMIC_SEQ_CST);
        return locked < 0 ? -1 : 2;
    }
    unsigned char f[CREDIT_SIZE];
    int rc = announce(rflow, taken, limit, f);
    if (rc == 0)
        rc = write_credit_locked(self, f);
    if (unlock_with(self->release, Py_None) == NULL)
        return -1;
    return rc < 0 ? -1 : 1;
}

/* -- reads ------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *credit; /* the run's last CREDIT body, or NULL */
    const unsigned char *data;   /* a plain DATA frame, or NULL */
    Py_ssize_t data_len;         /* its payload */
} Parsed;

/* 1 the ``n`` bytes are exactly a run of plain CREDITs and at most one plain DATA frame
 * (a payload of at most ``limit``), the CREDIT legal for ``sflow``; 0 not (the decoder's
 * way); -1 error */
static int parse(const unsigned char *p, Py_ssize_t n, Py_ssize_t limit, PyObject *sflow,
                 Parsed *out) {
    out->credit = out->data = NULL;
    out->data_len = 0;
    Py_ssize_t pos = 0;
    while (n - pos >= CREDIT_SIZE && is_credit(p + pos)) {
        out->credit = p + pos + 8;
        pos += CREDIT_SIZE;
    }
    if (pos < n) {
        const unsigned char *h = p + pos;
        if (n - pos < 8)
            return 0;
        uint32_t blen = (uint32_t)h[4] | ((uint32_t)h[5] << 8) | ((uint32_t)h[6] << 16) |
                        ((uint32_t)h[7] << 24);
        if (h[0] != BUZON_FRAME_VERSION || h[1] != BUZON_KIND_DATA || (h[2] & NOT_FAST) ||
            h[3] || (Py_ssize_t)blen != n - pos - 8 || (Py_ssize_t)blen > limit)
            return 0;
        out->data = h;
        out->data_len = (Py_ssize_t)blen;
    }
    if (out->credit != NULL) { /* SendFlow.on_credit's checks (capacity 0) */
        uint64_t taken = read_u64(out->credit), limit_c = read_u64(out->credit + 8);
        uint64_t sent, had;
        if (get_u64(sflow, s_sent, &sent) < 0 || get_u64(sflow, s_taken, &had) < 0)
            return -1;
        if (taken < had || (limit_c != UNLIMITED && limit_c > taken + 1))
            return 0;
        if (taken > sent)
            return 2; /* ahead of this end's count: see parse_read */
    }
    return 1;
}

/* parse() of a read of ``n`` bytes at the start of ``buf`` (borrowed). A CREDIT that
 * takes more messages than this end counts as sent is legal while another thread's
 * send has written its message and not yet counted it (the Python send counts after
 * its write, the GIL possibly released in between; it holds the write lock until
 * it has counted): when the write lock is held, wait for it and parse again. Still
 * ahead, or the lock free: 0 (the decoder's way reports it). */
static int parse_read(RvStream *self, PyObject *buf, Py_ssize_t n, PyObject *sflow,
                      Parsed *pr) {
    int ok = parse((const unsigned char *)PyByteArray_AS_STRING(buf), n, self->limit, sflow,
                   pr);
    if (ok != 2)
        return ok;
    int held = lock_held(self->locked);
    if (held <= 0)
        return held < 0 ? -1 : 0;
    Py_INCREF(buf);
    Py_INCREF(sflow);
    PyObject *r = PyObject_CallNoArgs(self->acquire); /* the GIL released meanwhile */
    if (r != NULL) {
        Py_DECREF(r);
        r = unlock_with(self->release, Py_None);
    }
    if (r != NULL)
        ok = parse((const unsigned char *)PyByteArray_AS_STRING(buf), n, self->limit, sflow,
                   pr);
    Py_DECREF(sflow);
    Py_DECREF(buf);
    if (r == NULL)
        return -1;
    return ok == 2 ? 0 : ok;
}

/* ChannelCore._apply_credit of a plain CREDIT body (checked by parse) */
static int apply_credit(RvStream *self, PyObject *sflow, const unsigned char *body) {
    PyObject *peer = field(self, s_peer);
    if (peer == NULL)
        return -1;
    if (peer != self->peer_seen || self->pid_seen == NULL) { /* the handshake's: kept */
        PyObject *pid = PyObject_GetAttr(peer, s_pid);
        if (pid == NULL)
            return -1;
        Py_XSETREF(self->pid_seen, pid);
        Py_XSETREF(self->peer_seen, Py_NewRef(peer));
    }
    PyObject *had = slot_get(sflow, s_receiver);
    if (had == NULL)
        return -1;
    Py_DECREF(had);
    int r = had == self->pid_seen ? 0 : slot_set(sflow, s_receiver, self->pid_seen);
    if (r < 0 || set_u64(sflow, s_taken, read_u64(body)) < 0 ||
        set_u64(sflow, s_limit, read_u64(body + 8)) < 0 ||
        set_field(self, s_credit_blocked, Py_False) < 0)
        return -1;
    self->cnt[C_CRECV]++;
    if (self->chref != NULL) { /* bound: the callback only wakes pumpers; none, no call */
        PyObject *ch = PyWeakref_GetObject(self->chref); /* borrowed */
        if (ch == NULL)
            return -1;
        if (ch != Py_None) {
            PyObject *pumpers = PyDict_GetItemWithError(self->chd, s_pumpers);
            if (pumpers == NULL && PyErr_Occurred())
                return -1;
            int any = pumpers == NULL ? 1 : PyObject_IsTrue(pumpers);
            if (any <= 0)
                return any;
        }
    }
    PyObject *wake = field(self, s_on_credit);
    if (wake == NULL)
        return -1;
    if (wake != Py_None) {
        PyObject *done = PyObject_CallNoArgs(wake);
        if (done == NULL)
            return -1;
        Py_DECREF(done);
    }
    return 0;
}

/* What a read of ``n`` bytes (n < room) of the parsed shape does to the core (as
 * _read_bytes and _apply_control): counts, the rendezvous gate's "found empty", the
 * CREDIT applied. */
static int took_read(RvStream *self, PyObject *sflow, Py_ssize_t n, const Parsed *pr) {
    PyObject *owed = field(self, s_credit_out);
    if (owed == NULL)
        return -1;
    self->cnt[C_BRECV] += (uint64_t)n;
    if (owed == Py_None && set_field(self, s_rv_valid, Py_True) < 0)
        return -1;
    if (pr->credit != NULL && apply_credit(self, sflow, pr->credit) < 0)
        return -1;
    return 0;
}

/* The decoder's empty read buffer (FrameDecoder.idle_buffer), or NULL with no error
 * when it holds anything */
static PyObject *idle_buffer(PyObject *decoder) {
    PyObject *end = slot_get(decoder, s_end);
    if (end == NULL)
        return NULL;
    long e = PyLong_AsLong(end);
    Py_DECREF(end);
    if (e == -1 && PyErr_Occurred())
        return NULL;
    if (e != 0)
        return NULL;
    PyObject *big = slot_get(decoder, s_big);
    if (big == NULL)
        return NULL;
    Py_DECREF(big);
    PyObject *error = slot_get(decoder, s_error);
    if (error == NULL)
        return NULL;
    Py_DECREF(error);
    if (big != Py_None || error != Py_None)
        return NULL;
    PyObject *frames = slot_get(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    Py_ssize_t held = PyObject_Length(frames);
    Py_DECREF(frames);
    if (held != 0)
        return NULL;
    PyObject *buf = slot_get(decoder, s_buf);
    if (buf != NULL && !PyByteArray_CheckExact(buf)) {
        Py_DECREF(buf);
        return NULL;
    }
    return buf;
}

/* The wait and the read in one: into the decoder's empty buffer, spin ``spin`` seconds
 * (looks with poll, which takes no lock a read would contend for with the writer, then
 * the read), then (``sleep``) sleep in poll with ``wake`` until
 * ``deadline`` and read. The GIL is released meanwhile (the read lock keeps the decoder
 * ours). Returns 1 with ``*rd`` the read's result (-1: ``*err``, EAGAIN when nothing came
 * and ``sleep`` is false) and ``*bufp`` the buffer (a new reference), RV_HANDOVER (the
 * decoder is not empty), RV_TIMEOUT, RV_WOKEN, or -1 (a signal handler raised). */
static int read_wait(RvStream *self, PyObject *decoder, int sleep, int forever,
                     double deadline, double spin, int wake, PyObject **bufp, ssize_t *rd,
                     int *err) {
    PyObject *buf = idle_buffer(decoder);
    if (buf == NULL)
        return PyErr_Occurred() ? -1 : RV_HANDOVER;
    unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(buf);
    size_t room = (size_t)PyByteArray_GET_SIZE(buf);
    ssize_t got = -1;
    int e = EAGAIN;
    int empty = 0; /* the first look found nothing: statistics().recv_would_block */
    if (spin > 0.0) {
        /* readiness looks (a poll takes no lock: a read would contend with the
         * writer's), then the read */
        struct pollfd look = {.fd = self->rfd, .events = POLLIN, .revents = 0};
        Py_BEGIN_ALLOW_THREADS
        double end = monotonic_now() + spin;
        for (;;) {
            int ready = poll(&look, 1, 0) > 0;
            if (!ready)
                empty = 1;
            if (ready) {
                got = get_bytes(self, p, room);
                if (got >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                    e = got < 0 ? errno : 0;
                    break;
                }
            }
            if (monotonic_now() >= end)
                break;
        }
        Py_END_ALLOW_THREADS
        if (got < 0 && e == EAGAIN && PyErr_CheckSignals() < 0) {
            Py_DECREF(buf);
            return -1;
        }
    } else if (!sleep) {
        got = get_bytes(self, p, room);
        e = got < 0 ? errno : 0;
        empty = got < 0 && (e == EAGAIN || e == EWOULDBLOCK);
    } else {
        empty = 1; /* spin 0: the engine's read would find nothing first, then wait */
    }
    if (empty) { /* counted as the engine's reads count it */
        self->cnt[C_RWB]++;
    }
    if (got < 0 && (e == EAGAIN || e == EWOULDBLOCK) && sleep) {
        struct pollfd pfds[2] = {{.fd = self->rfd, .events = POLLIN, .revents = 0},
                                 {.fd = wake, .events = POLLIN, .revents = 0}};
        for (;;) {
            int r;
            Py_BEGIN_ALLOW_THREADS
            for (;;) {
                r = sleep_readable(pfds, wake >= 0 ? 2 : 1, forever, deadline);
                if (r <= 0) {
                    e = r < 0 ? errno : 0;
                    break;
                }
                got = get_bytes(self, p, room);
                e = got < 0 ? errno : 0;
                if (got >= 0 || (e != EAGAIN && e != EWOULDBLOCK))
                    break;
                if (pfds[0].revents & POLLNVAL) {
                    e = EBADF;
                    break;
                }
            }
            Py_END_ALLOW_THREADS
            if (r == 0) {
                Py_DECREF(buf);
                return wake >= 0 && pfds[1].revents ? RV_WOKEN : RV_TIMEOUT;
            }
            if (r > 0 || e != EINTR)
                break;
            if (PyErr_CheckSignals() < 0) { /* a signal: its handler runs now */
                Py_DECREF(buf);
                return -1;
            }
        }
    }
    *bufp = buf;
    *rd = got;
    *err = got < 0 ? e : 0;
    return 1;
}

static PyObject *data_item(const unsigned char *h, Py_ssize_t len) {
    PyObject *body = PyBytes_FromStringAndSize((const char *)h + 8, len);
    if (body == NULL)
        return NULL;
    PyObject *item = PyTuple_New(2);
    if (item == NULL) {
        Py_DECREF(body);
        return NULL;
    }
    PyTuple_SET_ITEM(item, 0, PyLong_FromLong(h[2])); /* a cached small int */
    PyTuple_SET_ITEM(item, 1, body);
    return item;
}

static int append_frame(PyObject *decoder, const unsigned char *h, Py_ssize_t len) {
    PyObject *item = data_item(h, len);
    if (item == NULL)
        return -1;
    PyObject *frames = slot_get(decoder, s_frames);
    PyObject *r = frames == NULL ? NULL : deque_call(d_append, s_append, frames, item);
    Py_XDECREF(frames);
    Py_DECREF(item);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* -- send ------------------------------------------------------------------------- */

static int parse_wait_args(PyObject *const *args, int *forever, double *deadline,
                           double *spin, int *wake) {
    *forever = args[0] == Py_None;
    *deadline = *forever ? 0.0 : PyFloat_AsDouble(args[0]);
    if (!*forever && *deadline == -1.0 && PyErr_Occurred())
        return -1;
    *spin = PyFloat_AsDouble(args[1]);
    if (*spin == -1.0 && PyErr_Occurred())
        return -1;
    long w = PyLong_AsLong(args[2]);
    if (w == -1 && PyErr_Occurred())
        return -1;
    if (w < -1 || w > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "wake must be an fd or -1");
        return -1;
    }
    *wake = (int)w;
    return 0;
}

/* the channel is quiet for the C path: open, nothing owed, no withdrawn message
 * pending. 1 yes, 0 no, -1 error */
static int quiet(RvStream *self) {
    PyObject *pending = field(self, s_pending);
    if (pending == NULL)
        return -1;
    Py_ssize_t owed = PyObject_Length(pending);
    if (owed != 0)
        return owed < 0 ? -1 : 0;
    int r;
    if ((r = core_flag(self->state, s_credit_out, 1)) != 0 ||
        (r = core_flag(self->state, s_closed, 0)) != 0 ||
        (r = core_flag(self->state, s_eof, 0)) != 0)
        return r < 0 ? -1 : 0;
    PyObject *void_ = field(self, s_rv_void);
    if (void_ == NULL)
        return -1;
    long v = PyLong_AsLong(void_);
    if (v == -1 && PyErr_Occurred())
        return -1;
    return v == 0;
}

/* The reply phase of a send that was taken (send_steps after the take: reply_expected,
 * the SPIN step, finish_with_reply; else send_finished). */
static PyObject *finish_send(RvStream *self, PyObject *rflow, PyObject *sflow,
                             PyObject *decoder, double spin) {
    PyObject *frames = slot_get(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    Py_ssize_t held = PyObject_Length(frames);
    Py_DECREF(frames);
    if (held < 0)
        return NULL;
    int expect = 0;
    if (held == 0 && spin > 0.0) {
        expect = core_flag(self->state, s_rv_reply, 0);
        if (expect < 0)
            return NULL;
    }
    if (expect) {
        PyObject *buf = NULL;
        ssize_t got;
        int e;
        int w = read_wait(self, decoder, 0, 0, 0.0, spin, -1, &buf, &got, &e);
        if (w < 0)
            return NULL;
        if (w != 1) {
            self->n = -1;
            self->err = 0;
            return PyLong_FromLong(RV_REPLY);
        }
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(buf);
        Py_ssize_t room = PyByteArray_GET_SIZE(buf);
        Py_DECREF(buf);
        if (got < 0 && e != EAGAIN && e != EWOULDBLOCK) {
            self->n = -1;
            self->err = e;
            return PyLong_FromLong(RV_REPLY);
        }
        if (got < 0) { /* nothing came: the link found empty */
            PyObject *owed = field(self, s_credit_out);
            if (owed == NULL || (owed == Py_None && set_field(self, s_rv_valid, Py_True) < 0))
                return NULL;
        } else {
            Parsed pr;
            int ok = got > 0 && got < room ? parse_read(self, buf, got, sflow, &pr) : 0;
            if (ok < 0)
                return NULL;
            if (!ok) {
                self->n = got;
                self->err = 0;
                return PyLong_FromLong(RV_REPLY);
            }
            if (took_read(self, sflow, got, &pr) < 0)
                return NULL;
            if (pr.data != NULL && append_frame(decoder, pr.data, pr.data_len) < 0)
                return NULL;
            held = pr.data != NULL;
        }
        if (!held && set_field(self, s_rv_reply, Py_False) < 0) /* pump_reply */
            return NULL;
    }
    /* send_finished */
    int offering = get_bool(rflow, s_offering);
    if (offering < 0)
        return NULL;
    if (!offering)
        return PyLong_FromLong(RV_DONE);
    if (held) {
        if (set_field(self, s_rv_reply, Py_True) < 0)
            return NULL;
        return PyLong_FromLong(RV_DONE);
    }
    if (set_field(self, s_rv_after_send, Py_True) < 0)
        return NULL;
    unsigned char f[CREDIT_SIZE];
    if (offer_end(self, rflow, f) < 0 || emit_credit(self, f) < 0)
        return NULL;
    return PyLong_FromLong(RV_DONE);
}

static PyObject *do_send(RvStream *self, PyObject *data, int whole, int forever,
                         double deadline, double spin, int wake);

static PyObject *rv_send(RvStream *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "send(data, whole, deadline, spin, wake)");
        return NULL;
    }
    self->number = 0; /* set once this call's message is written (an error before: 0) */
    int whole = PyObject_IsTrue(args[1]);
    int forever, wake;
    double deadline, spin;
    if (whole < 0 || parse_wait_args(args + 2, &forever, &deadline, &spin, &wake) < 0)
        return NULL;
    return do_send(self, args[0], whole, forever, deadline, spin, wake);
}

static PyObject *do_send(RvStream *self, PyObject *data, int whole, int forever,
                         double deadline, double spin, int wake) {
    self->number = 0;
    double budget = spin; /* the reply's spin (the SPIN step) is the whole budget */
    if (!PyBytes_CheckExact(data))
        return PyLong_FromLong(RV_NA);
    const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    unsigned char flags = 0;
    if (whole) { /* an encoded frame: a plain DATA frame of at most limit */
        if (n < 8)
            return PyLong_FromLong(RV_NA);
        uint32_t blen = (uint32_t)bytes[4] | ((uint32_t)bytes[5] << 8) |
                        ((uint32_t)bytes[6] << 16) | ((uint32_t)bytes[7] << 24);
        if (bytes[0] != BUZON_FRAME_VERSION || bytes[1] != BUZON_KIND_DATA ||
            (bytes[2] & NOT_FAST) || bytes[3] || (Py_ssize_t)blen != n - 8)
            return PyLong_FromLong(RV_NA);
        flags = bytes[2];
        bytes += 8;
        n -= 8;
    }
    if (n > self->limit)
        return PyLong_FromLong(RV_NA);
    int r = quiet(self);
    if (r <= 0)
        return r < 0 ? NULL : PyLong_FromLong(RV_NA);
    PyObject *sflow = field(self, s_sflow), *rflow = field(self, s_rflow);
    PyObject *decoder = field(self, s_decoder);
    if (sflow == NULL || rflow == NULL || decoder == NULL)
        return NULL;
    if (sflow == Py_None || rflow == Py_None || decoder == Py_None)
        return PyLong_FromLong(RV_NA);
    uint64_t sent, limit;
    if (get_u64(sflow, s_sent, &sent) < 0 || get_u64(sflow, s_limit, &limit) < 0)
        return NULL;
    if (sent >= limit) /* no offer known: the engine waits for one */
        return PyLong_FromLong(RV_NA);
    PyObject *frames = slot_get(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    Py_ssize_t held = PyObject_Length(frames);
    Py_DECREF(frames);
    if (held != 0)
        return held < 0 ? NULL : PyLong_FromLong(RV_NA);
    int offering = get_bool(rflow, s_offering);
    if (offering < 0)
        return NULL;
#define UNLOCK(out) (nolock ? (out) : unlock_with(self->release, (out)))
    /* a pipe's write of at most PIPE_BUF is whole or nothing: the write lock found
     * free is as good as taken (_writer.h lock_held: the GIL is kept, no Python code
     * runs, until the state is updated); else it is taken without waiting */
    int nolock = writes_whole(self->fifo, (offering ? 0 : CREDIT_SIZE) + 8 + n);
    int locked = nolock ? lock_held(self->locked) : try_lock(self->acquire);
    if (nolock && locked >= 0)
        locked = !locked;
    if (locked <= 0)
        return locked < 0 ? NULL : PyLong_FromLong(RV_NA);
    /* offer_with_send + try_send: this end's offer (if none stands) and the message in
     * one write; nothing changes unless the kernel takes some of it */
    unsigned char f[CREDIT_SIZE], header[8];
    uint64_t rtaken = 0;
    if (!offering && get_u64(rflow, s_taken, &rtaken) < 0)
        return UNLOCK(NULL);
    credit_frame(f, rtaken, rtaken + 1);
    data_header(header, flags, (uint32_t)n);
    struct iovec iov[3] = {{.iov_base = f, .iov_len = CREDIT_SIZE},
                           {.iov_base = header, .iov_len = 8},
                           {.iov_base = (void *)bytes, .iov_len = (size_t)n}};
    struct iovec *v = offering ? iov + 1 : iov;
    int cnt = (offering ? 2 : 3) - (n == 0);
    Py_ssize_t total = (offering ? 0 : CREDIT_SIZE) + 8 + n;
    ssize_t got = put_vec(self, v, cnt);
    if (got <= 0) /* no room (or an error the general way meets again): nothing changed */
        return UNLOCK(PyLong_FromLong(RV_NA));
    PyObject *serial_o = field(self, s_serial);
    long long serial = serial_o == NULL ? -1 : PyLong_AsLongLong(serial_o);
    if (serial == -1 && PyErr_Occurred())
        return UNLOCK(NULL);
    if (!offering) { /* RecvFlow.before_wait's offer, as offer_with_send makes it */
        unsigned char g[CREDIT_SIZE];
        if (offer(self, rflow, g) < 0 || set_field(self, s_rv_valid, Py_False) < 0)
            return UNLOCK(NULL);
        self->cnt[C_CSENT]++;
    }
    int part = got < total;
    if (part && nolock) { /* not whole after all: the tail's keeper needs the lock */
        if (take_free_lock(self->acquire) < 0)
            return NULL;
        nolock = 0;
    }
    if (part) { /* the kernel took part of it: the core keeps the tail (on_part) */
        PyObject *offer_b = offering ? Py_NewRef(Py_None)
                                     : PyBytes_FromStringAndSize((const char *)f, CREDIT_SIZE);
        PyObject *fl = PyLong_FromLong(flags);
        PyObject *payload = whole ? PyBytes_FromStringAndSize((const char *)bytes, n)
                                  : Py_NewRef(data);
        PyObject *wrote = PyLong_FromSsize_t(got);
        PyObject *out = NULL;
        if (offer_b != NULL && fl != NULL && payload != NULL && wrote != NULL) {
            PyObject *call[4] = {offer_b, fl, payload, wrote};
            out = PyObject_Vectorcall(self->on_part, call, 4, NULL);
        }
        Py_XDECREF(offer_b);
        Py_XDECREF(fl);
        Py_XDECREF(payload);
        Py_XDECREF(wrote);
        if (out == NULL)
            return UNLOCK(NULL);
        serial = PyLong_AsLongLong(out);
        Py_DECREF(out);
        if (serial == -1 && PyErr_Occurred())
            return UNLOCK(NULL);
    } else {
        serial += 1;
        PyObject *s = PyLong_FromLongLong(serial);
        if (s == NULL || set_field(self, s_serial, s) < 0) {
            Py_XDECREF(s);
            return UNLOCK(NULL);
        }
        Py_DECREF(s);
        self->cnt[C_MSENT]++;
        self->cnt[C_BSENT] += (uint64_t)n + 8;
    }
    if (set_u64(sflow, s_sent, sent + 1) < 0)
        return UNLOCK(NULL);
    self->number = (long long)(sent + 1);
    self->serial = serial;
    if (UNLOCK(Py_None) == NULL)
        return NULL;
    if (part)
        return PyLong_FromLong(RV_PART);
#undef UNLOCK
    /* the wait for the take (send_steps' CREDIT step) */
    for (;;) {
        uint64_t taken;
        if (get_u64(sflow, s_taken, &taken) < 0)
            return NULL;
        if (taken >= sent + 1)
            break;
        PyObject *buf = NULL;
        ssize_t rd;
        int e;
        int w = read_wait(self, decoder, 1, forever, deadline, spin, wake, &buf, &rd, &e);
        if (w < 0)
            return NULL;
        if (w != 1) {
            self->n = -1;
            self->err = 0;
            return PyLong_FromLong(w);
        }
        spin = 0.0; /* spun once: later waits sleep */
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(buf);
        Py_ssize_t room = PyByteArray_GET_SIZE(buf);
        Py_DECREF(buf);
        if (rd < 0 && (e == EAGAIN || e == EWOULDBLOCK))
            continue;
        if (rd < 0) {
            self->n = -1;
            self->err = e;
            return PyLong_FromLong(RV_HANDOVER);
        }
        Parsed pr;
        int ok = rd > 0 && rd < room ? parse_read(self, buf, rd, sflow, &pr) : 0;
        if (ok < 0)
            return NULL;
        if (!ok) {
            self->n = rd;
            self->err = 0;
            return PyLong_FromLong(RV_HANDOVER);
        }
        if (took_read(self, sflow, rd, &pr) < 0)
            return NULL;
        if (pr.data != NULL && append_frame(decoder, pr.data, pr.data_len) < 0)
            return NULL;
    }
    return finish_send(self, rflow, sflow, decoder, budget);
}

/* -- receive ---------------------------------------------------------------------- */

/* The take of a plain message (ChannelCore._pop and _took, RecvFlow.on_take for
 * capacity 0 with defer=True): the counts, the offer used up, its CREDIT owed (it
 * rides with this end's next CREDIT, or the confirmer writes it). 1 done, 0 on_take
 * would raise (nothing changed: the Python way raises it), -1 error */
static int take(RvStream *self, PyObject *rflow) {
    uint64_t n, granted;
    if (get_u64(rflow, s_taken, &n) < 0 || get_u64(rflow, s_granted, &granted) < 0)
        return -1;
    if (n + 1 > granted)
        return 0;
    if (set_u64(rflow, s_taken, n + 1) < 0 || set_bool(rflow, s_offering, 0) < 0 ||
        set_u64(rflow, s_limit, n + 1) < 0)
        return -1;
    int r;
    PyObject *taken = field(self, s_taken);
    if (taken == NULL)
        return -1;
    self->cnt[C_MRECV]++;
    PyObject *one = PyLong_FromLong(1);
    PyObject *more = one == NULL ? NULL : PyNumber_Add(taken, one);
    Py_XDECREF(one);
    if (more == NULL)
        return -1;
    r = set_field(self, s_taken, more);
    Py_DECREF(more);
    if (r < 0)
        return -1;
    return defer_take(self) < 0 ? -1 : 1; /* its CREDIT rides with the next one */
}

/* a message in hand is a plain one (flags <= 7): 1, else 0, -1 error */
static int plain_item(PyObject *item) {
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 ||
        !PyLong_CheckExact(PyTuple_GET_ITEM(item, 0)) ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 1)))
        return 0;
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
    if (flags == -1 && PyErr_Occurred())
        return -1;
    return flags >= 0 && flags <= 7;
}

static PyObject *receive(RvStream *self, int forever, double deadline, double spin, int wake,
                         int in_hand_only);

static PyObject *rv_recv(RvStream *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "recv(deadline, spin, wake)");
        return NULL;
    }
    int forever, wake;
    double deadline, spin;
    if (parse_wait_args(args, &forever, &deadline, &spin, &wake) < 0)
        return NULL;
    return receive(self, forever, deadline, spin, wake, 0);
}

static PyObject *rv_take(RvStream *self, PyObject *unused) {
    (void)unused;
    PyObject *got = receive(self, 1, 0.0, 0.0, -1, 1);
    if (got == NULL || PyTuple_CheckExact(got))
        return got;
    Py_DECREF(got);
    Py_RETURN_NONE;
}

static PyObject *receive(RvStream *self, int forever, double deadline, double spin, int wake,
                         int in_hand_only) {
    int r = quiet(self);
    if (r <= 0)
        return r < 0 ? NULL : PyLong_FromLong(RV_NA);
    PyObject *sflow = field(self, s_sflow), *rflow = field(self, s_rflow);
    PyObject *decoder = field(self, s_decoder);
    if (sflow == NULL || rflow == NULL || decoder == NULL)
        return NULL;
    if (sflow == Py_None || rflow == Py_None || decoder == Py_None)
        return PyLong_FromLong(RV_NA);
    PyObject *frames = slot_get(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    Py_ssize_t held = PyObject_Length(frames);
    if (held != 0) { /* a message in hand (a reply read by the send): the gate */
        PyObject *first = held < 0 ? NULL : PySequence_GetItem(frames, 0);
        int ok = first == NULL ? -1 : plain_item(first);
        Py_XDECREF(first);
        if (ok > 0)
            ok = get_bool(rflow, s_offering);
        if (ok > 0)
            ok = core_flag(self->state, s_rv_valid, 0);
        if (ok <= 0) {
            Py_DECREF(frames);
            return ok < 0 ? NULL : PyLong_FromLong(RV_NA);
        }
        PyObject *item = deque_call(d_popleft, s_popleft, frames, NULL);
        Py_DECREF(frames);
        if (item == NULL)
            return NULL;
        r = take(self, rflow);
        if (r > 0)
            return item;
        if (r == 0) { /* on_take raises: put it back for the Python way */
            PyObject *back = PyObject_CallMethod(frames, "appendleft", "(O)", item);
            Py_DECREF(item);
            if (back == NULL)
                return NULL;
            Py_DECREF(back);
            return PyLong_FromLong(RV_NA);
        }
        Py_DECREF(item);
        return NULL;
    }
    Py_DECREF(frames);
    if (in_hand_only || held < 0)
        return held < 0 ? NULL : PyLong_FromLong(RV_NA);
    PyObject *buf = idle_buffer(decoder);
    if (buf == NULL)
        return PyErr_Occurred() ? NULL : PyLong_FromLong(RV_NA);
    Py_DECREF(buf);
    /* before_wait: a receive follows a rendezvous send (replies come), and the offer */
    if (core_flag(self->state, s_rv_after_send, 0) > 0) {
        if (set_field(self, s_rv_after_send, Py_False) < 0 ||
            set_field(self, s_rv_reply, Py_True) < 0)
            return NULL;
    }
    if (PyErr_Occurred())
        return NULL;
    unsigned char f[CREDIT_SIZE];
    r = offer(self, rflow, f);
    if (r < 0)
        return NULL;
    if (r > 0) {
        if (set_field(self, s_rv_valid, Py_False) < 0 || emit_credit(self, f) < 0)
            return NULL;
        int owed = core_flag(self->state, s_credit_out, 1);
        if (owed != 0) { /* not written yet: the engine's wait writes it */
            if (owed < 0)
                return NULL;
            self->n = -1;
            self->err = 0;
            return PyLong_FromLong(RV_HANDOVER);
        }
    }
    for (;;) {
        ssize_t rd;
        int e;
        buf = NULL;
        int w = read_wait(self, decoder, 1, forever, deadline, spin, wake, &buf, &rd, &e);
        if (w < 0)
            return NULL;
        if (w != 1) {
            self->n = -1;
            self->err = 0;
            return PyLong_FromLong(w);
        }
        spin = 0.0;
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(buf);
        Py_ssize_t room = PyByteArray_GET_SIZE(buf);
        if (rd < 0 && (e == EAGAIN || e == EWOULDBLOCK)) {
            Py_DECREF(buf);
            PyObject *owed = field(self, s_credit_out);
            if (owed == NULL || (owed == Py_None && set_field(self, s_rv_valid, Py_True) < 0))
                return NULL;
            continue;
        }
        if (rd < 0) {
            Py_DECREF(buf);
            self->n = -1;
            self->err = e;
            return PyLong_FromLong(RV_HANDOVER);
        }
        Parsed pr;
        int ok = rd > 0 && rd < room ? parse_read(self, buf, rd, sflow, &pr) : 0;
        if (ok <= 0) {
            Py_DECREF(buf);
            if (ok < 0)
                return NULL;
            self->n = rd;
            self->err = 0;
            return PyLong_FromLong(RV_HANDOVER);
        }
        PyObject *item = pr.data == NULL ? NULL : data_item(pr.data, pr.data_len);
        Py_DECREF(buf);
        if (pr.data != NULL && item == NULL)
            return NULL;
        if (took_read(self, sflow, rd, &pr) < 0) {
            Py_XDECREF(item);
            return NULL;
        }
        if (item == NULL)
            continue; /* CREDITs only: the offer stands, wait on */
        r = take(self, rflow);
        if (r > 0)
            return item;
        if (r == 0) { /* on_take raises: the message goes in hand, the Python way raises */
            PyObject *fr = slot_get(decoder, s_frames);
            PyObject *back = fr == NULL ? NULL : PyObject_CallMethodOneArg(fr, s_append, item);
            Py_XDECREF(fr);
            Py_DECREF(item);
            if (back == NULL)
                return NULL;
            Py_DECREF(back);
            self->n = -1;
            self->err = 0;
            return PyLong_FromLong(RV_HANDOVER);
        }
        Py_DECREF(item);
        return NULL;
    }
}

/* -- the type ------------------------------------------------------------------------ */

static PyObject *rv_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int rfd, wfd, sock = 0;
    PyObject *core, *lock, *on_part;
    Py_ssize_t limit;
    static char *kwlist[] = {"rfd", "wfd", "core", "lock", "limit", "on_part", "sock", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOOnO|p:RvStream", kwlist, &rfd, &wfd,
                                     &core, &lock, &limit, &on_part, &sock))
        return NULL;
    if (rfd < 0 || wfd < 0 || limit < 0 || limit > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fds and limit must be non-negative");
        return NULL;
    }
    writer_refs w;
    if (writer_refs_take(&w, core, NULL, lock) < 0)
        return NULL;
    PyObject *locked = PyObject_GetAttrString(lock, "locked");
    RvStream *self = locked == NULL ? NULL : (RvStream *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(locked);
        writer_refs_drop(&w);
        return NULL;
    }
    self->rfd = rfd;
    self->wfd = wfd;
    self->sock = sock;
    self->limit = limit;
    self->core = Py_NewRef(core);
    self->state = w.state;
    self->acquire = w.acquire;
    self->release = w.release;
    self->locked = locked;
    self->fifo = !sock && is_fifo(wfd);
    self->on_part = Py_NewRef(on_part);
    return (PyObject *)self;
}

static int rv_traverse(RvStream *self, visitproc visit, void *arg) {
    Py_VISIT(self->chref);
    Py_VISIT(self->core);
    Py_VISIT(self->state);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->locked);
    Py_VISIT(self->on_part);
    Py_VISIT(self->peer_seen);
    Py_VISIT(self->pid_seen);
    return 0;
}

static int rv_clear(RvStream *self) {
    cf_unregister(self);
    Py_CLEAR(self->chref);
    self->chd = NULL; /* borrowed */
    Py_CLEAR(self->core);
    Py_CLEAR(self->state);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->locked);
    Py_CLEAR(self->on_part);
    Py_CLEAR(self->peer_seen);
    Py_CLEAR(self->pid_seen);
    return 0;
}

static void rv_dealloc(RvStream *self) {
    PyObject_GC_UnTrack(self);
    cf_unregister(self);
    rv_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *rv_confirm(RvStream *self, PyObject *unused) {
    (void)unused;
    int r = self->acquire == NULL ? 0 : confirm(self);
    if (r < 0)
        return NULL;
    if (r == 2) { /* another thread writes: wait for the lock (a close, an exit) */
        PyObject *held = PyObject_CallNoArgs(self->acquire);
        if (held == NULL)
            return NULL;
        Py_DECREF(held);
        if (unlock_with(self->release, Py_None) == NULL)
            return NULL;
        r = confirm(self);
        if (r < 0)
            return NULL;
    }
    return PyBool_FromLong(r == 1);
}

static PyObject *rv_counts(RvStream *self, PyObject *unused) {
    (void)unused;
    const uint64_t *c = self->cnt;
    return Py_BuildValue("(KKKKKKK)", (unsigned long long)c[C_MSENT],
                         (unsigned long long)c[C_BSENT], (unsigned long long)c[C_CSENT],
                         (unsigned long long)c[C_CRECV], (unsigned long long)c[C_BRECV],
                         (unsigned long long)c[C_MRECV], (unsigned long long)c[C_RWB]);
}

static PyObject *rv_get_number(RvStream *self, void *unused) {
    (void)unused;
    return PyLong_FromLongLong(self->number);
}

static PyObject *rv_get_serial(RvStream *self, void *unused) {
    (void)unused;
    return PyLong_FromLongLong(self->serial);
}

static PyObject *rv_get_n(RvStream *self, void *unused) {
    (void)unused;
    return PyLong_FromSsize_t(self->n);
}

static PyObject *rv_get_err(RvStream *self, void *unused) {
    (void)unused;
    return PyLong_FromLong(self->err);
}

static PyGetSetDef rv_getset[] = {
    {"number", (getter)rv_get_number, NULL, "the last send's message number", NULL},
    {"serial", (getter)rv_get_serial, NULL, "the last send's frame serial", NULL},
    {"n", (getter)rv_get_n, NULL, "bytes left for the decoder (codes 6, 7); -1: none", NULL},
    {"err", (getter)rv_get_err, NULL, "errno of a failed read (n == -1), else 0", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef rv_methods[] = {
    {"send", (PyCFunction)(void (*)(void))rv_send, METH_FASTCALL,
     "send(data, whole, deadline, spin, wake) -> int: a rendezvous send (see the module)"},
    {"recv", (PyCFunction)(void (*)(void))rv_recv, METH_FASTCALL,
     "recv(deadline, spin, wake) -> (flags, body) | int: a rendezvous receive"},
    {"confirm", (PyCFunction)rv_confirm, METH_NOARGS,
     "confirm() -> bool: write the CREDIT a deferred take still owes (True: one was "
     "owed); before a close"},
    {"counts", (PyCFunction)rv_counts, METH_NOARGS,
     "counts() -> (messages_sent, bytes_sent, credits_sent, credits_received, "
     "bytes_received, messages_received, recv_would_block): what this object's calls "
     "counted (ChannelCore.statistics adds them)"},
    {"take", (PyCFunction)rv_take, METH_NOARGS,
     "take() -> (flags, body) | None: recv's first half, a message in hand taken (None: "
     "none, or the gate is shut; recv goes on)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RvStreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._rv.RvStream",
    .tp_basicsize = sizeof(RvStream),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RvStream(rfd, wfd, core, lock, limit, on_part[, sock]): the rendezvous send "
              "and receive of a framed stream (see the module's comment)",
    .tp_new = rv_new,
    .tp_dealloc = (destructor)rv_dealloc,
    .tp_traverse = (traverseproc)rv_traverse,
    .tp_clear = (inquiry)rv_clear,
    .tp_methods = rv_methods,
    .tp_getset = rv_getset,
};

/* -- send_bytes and recv_bytes in one C call each ---------------------------------
 *
 *   RvCall(channel, rv, fallback, tail, spin, recv)
 *       The sync driver's ``send_bytes`` (``recv`` false) or ``recv_bytes`` (true) of a
 *       rendezvous channel on a framed stream, installed as the channel's own attribute
 *       (it shadows the method), without a Python frame on the common path: what
 *       Channel._send_rv_stream / recv_bytes do before and after ``rv``'s C send and
 *       receive (the read lock taken without waiting, the wake fd, the thread counted in
 *       ``_waiters`` for close(), the ``_closing`` check, the deadline). Anything
 *       unusual calls ``fallback(channel, *args, **kwargs)`` (the class's method) from
 *       the start: an argument other than the data and a None or non-negative number
 *       ``timeout`` (``priority``, a non-bytes payload), the read lock busy, no wake fd
 *       yet, a close() begun, or ``rv`` declining (code 0, nothing
 *       done). What ``rv`` hands back otherwise (a deadline, a close, a read it does not
 *       handle, a signal handler's exception) goes to ``tail(channel, rv, got, timeout
 *       or deadline, ...)`` (Channel._rv_sent / _rv_received) with the read lock held,
 *       which finishes it in the engine as the Python path does. The channel is held
 *       weakly (_writer.h); binding also tells ``rv`` where the channel's ``_pumpers``
 *       is, so that a CREDIT calls the core's ``on_credit`` only when a thread waits for
 *       another's reads. */

typedef struct {
    PyObject_HEAD
    PyObject *chref;   /* the channel, weakly */
    PyObject *chd;     /* borrowed: the channel's __dict__ (it keeps it) */
    PyObject *channel; /* borrowed: held during a call */
    RvStream *rv;
    PyObject *acquire, *release; /* the read lock's */
    PyObject *fallback, *tail;
    double spin;
    int recv;
    unsigned long ident;  /* the thread ident ``ident_o`` holds (the last caller's) */
    PyObject *ident_o;
    vectorcallfunc vectorcall;
} RvCall;

/* ``fallback(channel, *args, **kwargs)`` */
static PyObject *call_fallback(RvCall *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *small[8];
    PyObject **all = small;
    if (nargs + nkw + 1 > 8) {
        all = PyMem_Malloc((size_t)(nargs + nkw + 1) * sizeof(PyObject *));
        if (all == NULL)
            return PyErr_NoMemory();
    }
    all[0] = self->channel;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        all[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(self->fallback, all, (size_t)(nargs + 1), kwnames);
    if (all != small)
        PyMem_Free(all);
    return r;
}

/* The arguments: ``data`` (send) and ``timeout``. 1 plain (``*forever`` or
 * ``*deadline``), 0 anything else (the fallback's), -1 error */
static int call_args(RvCall *self, PyObject *const *args, size_t nargsf, PyObject *kwnames,
                     PyObject **data, PyObject **timeout, int *forever, double *deadline,
                     double *span) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    Py_ssize_t first = self->recv ? 0 : 1; /* where timeout may stand */
    *data = NULL;
    *timeout = Py_None;
    if (nargs < first || nargs + nkw > first + 1)
        return 0;
    if (!self->recv)
        *data = args[0];
    if (nkw == 1) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, 0);
        if (k != s_timeout && PyUnicode_Compare(k, s_timeout) != 0)
            return PyErr_Occurred() ? -1 : 0;
        *timeout = args[nargs];
    } else if (nargs == first + 1) {
        *timeout = args[first];
    }
    *forever = *timeout == Py_None;
    *deadline = *span = 0.0;
    if (!*forever) {
        if (!PyFloat_CheckExact(*timeout) && !PyLong_CheckExact(*timeout))
            return 0;
        double t = PyFloat_AsDouble(*timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear(); /* too large an int: the fallback says so */
            return 0;
        }
        if (!(t >= 0.0) || t > 1e9) /* negative or NaN: the fallback's ValueError */
            return 0;
        *deadline = monotonic_now() + t;
        *span = t;
    }
    return 1;
}

/* the channel's ``_wake`` if this thread may wait on it (counted in ``_waiters``,
 * ``*me`` its ident): 1; 0 not now (no wake fd yet, a close() begun: the fallback's);
 * -1 error */
static int wait_enter(RvCall *self, int *wake, PyObject **me) {
    PyObject *w = PyDict_GetItemWithError(self->chd, s_wake);
    PyObject *waiters = w == NULL ? NULL : PyDict_GetItemWithError(self->chd, s_waiters);
    if (waiters == NULL)
        return PyErr_Occurred() ? -1 : 0;
    long fd = PyLong_AsLong(w);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX || !PyList_CheckExact(waiters))
        return 0;
    int closing = core_flag(self->chd, s_closing, 0); /* the channel's dict */
    if (closing != 0)
        return closing < 0 ? -1 : 0;
    unsigned long ident = PyThread_get_thread_ident();
    if (self->ident_o == NULL || self->ident != ident) {
        PyObject *o = PyLong_FromUnsignedLong(ident);
        if (o == NULL)
            return -1;
        Py_XSETREF(self->ident_o, o);
        self->ident = ident;
    }
    *me = Py_NewRef(self->ident_o);
    if (PyList_Append(waiters, *me) < 0) {
        Py_CLEAR(*me);
        return -1;
    }
    *wake = (int)fd;
    return 1;
}

/* _leave_wait: this thread out of ``_waiters``; the last one out of a closing channel
 * frees the wake fd. Keeps a pending exception. 0 ok, -1 error */
static int wait_leave(RvCall *self, PyObject *me) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    int rc = -1;
    PyObject *waiters = PyDict_GetItemWithError(self->chd, s_waiters);
    Py_ssize_t last = waiters != NULL && PyList_CheckExact(waiters) ? PyList_GET_SIZE(waiters) - 1
                                                                    : -1;
    if (last >= 0 && PyList_GET_ITEM(waiters, last) == me) { /* ours, appended last */
        rc = PyList_SetSlice(waiters, last, last + 1, NULL);
    } else if (waiters != NULL && PyList_CheckExact(waiters)) {
        for (Py_ssize_t i = PyList_GET_SIZE(waiters) - 1; i >= 0; i--) {
            int eq = PyObject_RichCompareBool(PyList_GET_ITEM(waiters, i), me, Py_EQ);
            if (eq < 0)
                break;
            if (eq) {
                rc = PyList_SetSlice(waiters, i, i + 1, NULL);
                break;
            }
        }
    }
    if (rc == 0) {
        int closing = core_flag(self->chd, s_closing, 0);
        if (closing > 0) {
            PyObject *r = PyObject_CallMethodNoArgs(self->channel, s_drop_wake);
            Py_XDECREF(r);
            rc = r == NULL ? -1 : 0;
        } else if (closing < 0)
            rc = -1;
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_RuntimeError, "a waiting thread left the channel's waiters");
    }
    Py_DECREF(me);
    if (t != NULL || v != NULL) { /* the call's own exception wins */
        if (rc < 0)
            PyErr_Clear();
        PyErr_Restore(t, v, tb);
        return -1;
    }
    return rc;
}

/* the read lock's release, a pending exception kept; ``out`` returned (NULL if the
 * release failed) */
static PyObject *rlock_release(RvCall *self, PyObject *out) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *r = PyObject_CallNoArgs(self->release);
    if (t != NULL || v != NULL) {
        Py_XDECREF(r);
        if (r == NULL)
            PyErr_Clear();
        PyErr_Restore(t, v, tb);
        Py_XDECREF(out);
        return NULL;
    }
    if (r == NULL) {
        Py_XDECREF(out);
        return NULL;
    }
    Py_DECREF(r);
    return out;
}

/* the pending exception, normalized, with its traceback (a new reference) */
static PyObject *take_exception(void) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/* tail(channel, rv, got, timeout, deadline) (recv), tail(channel, rv, code, failed,
 * deadline) (send: ``got`` a code, or the exception raised after the write) */
static PyObject *call_tail(RvCall *self, PyObject *got, PyObject *timeout, int forever,
                           double deadline) {
    PyObject *dl = forever ? Py_NewRef(Py_None) : PyFloat_FromDouble(deadline);
    if (dl == NULL) {
        Py_DECREF(got);
        return rlock_release(self, NULL);
    }
    PyObject *call[5] = {self->channel, (PyObject *)self->rv, got, timeout, dl};
    if (!self->recv) {
        int failed = !PyLong_CheckExact(got);
        if (failed) {
            call[2] = s_failed_code;
            call[3] = got;
        } else {
            call[3] = Py_None;
        }
    }
    PyObject *r = PyObject_Vectorcall(self->tail, call, 5, NULL);
    Py_DECREF(got);
    Py_DECREF(dl);
    return r;
}

static PyObject *rvcall_send(RvCall *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    PyObject *data, *timeout, *me = NULL;
    int forever, wake;
    double deadline, span;
    int ok = call_args(self, args, nargsf, kwnames, &data, &timeout, &forever, &deadline,
                       &span);
    if (ok <= 0 || !PyBytes_CheckExact(data))
        return ok < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    ok = try_lock(self->acquire);
    if (ok <= 0)
        return ok < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    ok = wait_enter(self, &wake, &me);
    if (ok <= 0) {
        if (ok < 0)
            return rlock_release(self, NULL);
        if (rlock_release(self, Py_None) == NULL)
            return NULL;
        return call_fallback(self, args, nargsf, kwnames);
    }
    PyObject *got = do_send(self->rv, data, 0, forever, deadline, self->spin, wake);
    if (got == NULL && self->rv->number > 0) /* written: the engine finishes (a handler's) */
        got = take_exception();
    if (wait_leave(self, me) < 0) {
        Py_XDECREF(got);
        return rlock_release(self, NULL);
    }
    if (got == NULL)
        return rlock_release(self, NULL);
    if (PyLong_CheckExact(got)) {
        long code = PyLong_AsLong(got);
        if (code == RV_DONE || code == RV_NA) {
            Py_DECREF(got);
            if (rlock_release(self, Py_None) == NULL)
                return NULL;
            if (code == RV_DONE)
                Py_RETURN_NONE;
            return call_fallback(self, args, nargsf, kwnames);
        }
    }
    PyObject *r = call_tail(self, got, timeout, forever, deadline); /* it releases the lock */
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

/* ``recv_bytes``' end: the pumpers woken, the payload */
static PyObject *recv_done(RvCall *self, PyObject *item) {
    PyObject *pumpers = PyDict_GetItemWithError(self->chd, s_pumpers);
    if (pumpers == NULL && PyErr_Occurred()) {
        Py_DECREF(item);
        return NULL;
    }
    int any = pumpers == NULL ? 0 : PyObject_IsTrue(pumpers);
    if (any > 0) {
        PyObject *r = PyObject_CallMethodNoArgs(self->channel, s_wake_pumpers);
        Py_XDECREF(r);
        any = r == NULL ? -1 : 0;
    }
    if (any < 0) {
        Py_DECREF(item);
        return NULL;
    }
    PyObject *body = Py_NewRef(PyTuple_GET_ITEM(item, 1));
    Py_DECREF(item);
    return body;
}

static PyObject *rvcall_recv(RvCall *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    PyObject *data, *timeout, *me = NULL;
    int forever, wake;
    double deadline, span;
    int ok = call_args(self, args, nargsf, kwnames, &data, &timeout, &forever, &deadline,
                       &span);
    if (ok <= 0)
        return ok < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    ok = try_lock(self->acquire);
    if (ok <= 0)
        return ok < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    PyObject *got = receive(self->rv, 1, 0.0, 0.0, -1, 1); /* a message in hand */
    if (got == NULL)
        return rlock_release(self, NULL);
    if (PyTuple_CheckExact(got)) {
        if (rlock_release(self, Py_None) == NULL) {
            Py_DECREF(got);
            return NULL;
        }
        return recv_done(self, got);
    }
    Py_DECREF(got);
    ok = wait_enter(self, &wake, &me);
    if (ok <= 0) {
        if (ok < 0)
            return rlock_release(self, NULL);
        if (rlock_release(self, Py_None) == NULL)
            return NULL;
        return call_fallback(self, args, nargsf, kwnames);
    }
    double spin = !forever && span == 0.0 ? 0.0 : self->spin; /* timeout=0: no spin */
    got = receive(self->rv, forever, deadline, spin, wake, 0);
    if (got != NULL && PyTuple_CheckExact(got)) {
        if (wait_leave(self, me) < 0) {
            Py_DECREF(got);
            return rlock_release(self, NULL);
        }
        if (rlock_release(self, Py_None) == NULL) {
            Py_DECREF(got);
            return NULL;
        }
        return recv_done(self, got);
    }
    if (got == NULL)
        got = take_exception();
    if (got == NULL) {
        wait_leave(self, me);
        return rlock_release(self, NULL);
    }
    Py_DECREF(me); /* the tail leaves the wait (_rv_got) */
    return call_tail(self, got, timeout, forever, deadline); /* it releases the lock */
}

/* the call, with the channel held for its duration (weakly bound) */
static PyObject *rvcall_enter(PyObject *callable, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames) {
    RvCall *self = (RvCall *)callable;
    PyObject *channel = owner_enter(self->chref);
    if (channel == NULL)
        return NULL;
    if (self->rv == NULL) {
        Py_DECREF(channel);
        PyErr_SetString(PyExc_ValueError, "the RvCall was cleared");
        return NULL;
    }
    PyObject *out = self->recv ? rvcall_recv(self, args, nargsf, kwnames)
                               : rvcall_send(self, args, nargsf, kwnames);
    Py_DECREF(channel);
    return out;
}

static PyObject *rvcall_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"channel", "rv", "fallback", "tail", "spin", "recv", NULL};
    PyObject *channel, *rv, *fallback, *tail;
    double spin;
    int recv;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOdp:RvCall", kwlist, &channel,
                                     &RvStreamType, &rv, &fallback, &tail, &spin, &recv))
        return NULL;
    PyObject *lock = PyObject_GetAttrString(channel, "_rlock");
    if (lock == NULL)
        return NULL;
    PyObject *acquire = PyObject_GetAttrString(lock, "acquire");
    PyObject *release = acquire == NULL ? NULL : PyObject_GetAttrString(lock, "release");
    Py_DECREF(lock);
    PyObject *chd = release == NULL ? NULL : PyObject_GenericGetDict(channel, NULL);
    PyObject *chref = chd == NULL ? NULL : PyWeakref_NewRef(channel, NULL);
    PyObject *rvref = chref == NULL ? NULL : PyWeakref_NewRef(channel, NULL);
    RvCall *self = rvref == NULL ? NULL : (RvCall *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(acquire);
        Py_XDECREF(release);
        Py_XDECREF(chd);
        Py_XDECREF(chref);
        Py_XDECREF(rvref);
        return NULL;
    }
    Py_DECREF(chd); /* borrowed from now on: the channel keeps its __dict__ */
    RvStream *stream = (RvStream *)rv;
    Py_XSETREF(stream->chref, rvref);
    stream->chd = chd;
    self->chref = chref;
    self->chd = chd;
    self->channel = channel;
    self->rv = (RvStream *)Py_NewRef(rv);
    self->acquire = acquire;
    self->release = release;
    self->fallback = Py_NewRef(fallback);
    self->tail = Py_NewRef(tail);
    self->spin = spin;
    self->recv = recv;
    self->vectorcall = rvcall_enter;
    return (PyObject *)self;
}

static int rvcall_traverse(RvCall *self, visitproc visit, void *arg) {
    Py_VISIT(self->chref);
    Py_VISIT(self->rv);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->fallback);
    Py_VISIT(self->tail);
    return 0;
}

static int rvcall_clear(RvCall *self) {
    Py_CLEAR(self->chref);
    self->chd = self->channel = NULL; /* borrowed */
    Py_CLEAR(self->rv);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->tail);
    Py_CLEAR(self->ident_o);
    return 0;
}

static void rvcall_dealloc(RvCall *self) {
    PyObject_GC_UnTrack(self);
    rvcall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RvCallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._rv.RvCall",
    .tp_basicsize = sizeof(RvCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "RvCall(channel, rv, fallback, tail, spin, recv): a rendezvous channel's "
              "send_bytes or recv_bytes in one C call (see the module's comment)",
    .tp_new = rvcall_new,
    .tp_dealloc = (destructor)rvcall_dealloc,
    .tp_traverse = (traverseproc)rvcall_traverse,
    .tp_clear = (inquiry)rvcall_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RvCall, vectorcall),
};

static PyObject *mod_at_exit(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    cf_confirm_marked(1); /* every owed take confirmed, then the thread stops */
    pthread_mutex_lock(&cf_mu);
    __atomic_store_n(&cf_stop, 1, __ATOMIC_SEQ_CST);
    if (cf_atfork)
        pthread_cond_broadcast(&cf_cv);
    pthread_mutex_unlock(&cf_mu);
    Py_RETURN_NONE;
}

static PyObject *mod_confirm_delay(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    (void)m;
    double old = (double)__atomic_load_n(&cf_tick_ns, __ATOMIC_RELAXED) / 1e9;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "confirm_delay([seconds])");
        return NULL;
    }
    if (nargs == 1) {
        double v = PyFloat_AsDouble(args[0]);
        if (v == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(v >= 1e-5 && v <= 10.0)) {
            PyErr_SetString(PyExc_ValueError, "confirm_delay must be in [1e-5, 10] seconds");
            return NULL;
        }
        __atomic_store_n(&cf_tick_ns, (long)(v * 1e9), __ATOMIC_RELAXED);
        pthread_mutex_lock(&cf_mu);
        if (cf_atfork)
            pthread_cond_broadcast(&cf_cv); /* a sleeping tick takes the new length */
        pthread_mutex_unlock(&cf_mu);
    }
    return PyFloat_FromDouble(old);
}

static PyObject *mod_confirm_all(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    cf_confirm_marked(1);
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"confirm_all", (PyCFunction)mod_confirm_all, METH_NOARGS,
     "confirm_all(): confirm every deferred take still owed (before a fork: a child "
     "must not inherit a take both processes would confirm)"},
    {"at_exit", (PyCFunction)mod_at_exit, METH_NOARGS,
     "at_exit(): confirm every deferred take still owed and stop the confirmer (the "
     "interpreter's exit)"},
    {"confirm_delay", (PyCFunction)(void (*)(void))mod_confirm_delay, METH_FASTCALL,
     "confirm_delay([seconds]) -> float: the confirmer's tick (a take not confirmed by "
     "the taker's own next write is written one to two ticks after it); returns the old "
     "value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._rv",
    "The rendezvous (capacity=0) send and receive of a framed stream, in C "
    "(see protocol/credit.py).",
    -1, mod_methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                  \
        return NULL;

PyMODINIT_FUNC PyInit__rv(void) {
    INTERN(s_pending, "pending")
    INTERN(s_credit_out, "credit_out")
    INTERN(s_closed, "closed")
    INTERN(s_eof, "eof")
    INTERN(s_sflow, "sflow")
    INTERN(s_rflow, "rflow")
    INTERN(s_decoder, "decoder")
    INTERN(s_stats, "stats")
    INTERN(s_serial, "serial")
    INTERN(s_taken, "taken")
    INTERN(s_rv_valid, "_rv_valid")
    INTERN(s_rv_void, "_rv_void")
    INTERN(s_rv_reply, "_rv_reply")
    INTERN(s_rv_after_send, "_rv_after_send")
    INTERN(s_credit_blocked, "credit_blocked")
    INTERN(s_on_credit, "on_credit")
    INTERN(s_peer, "peer")
    INTERN(s_pid, "pid")
    INTERN(s_sent, "sent")
    INTERN(s_limit, "limit")
    INTERN(s_receiver, "receiver")
    INTERN(s_granted, "granted")
    INTERN(s_offering, "offering")
    INTERN(s_reported, "reported")
    INTERN(s_report_due, "report_due")
    INTERN(s_peer_blocked, "peer_blocked")
    INTERN(s_unreported, "unreported")
    INTERN(s_end, "_end")
    INTERN(s_big, "_big")
    INTERN(s_error, "_error")
    INTERN(s_frames, "frames")
    INTERN(s_buf, "_buf")
    INTERN(s_messages_sent, "messages_sent")
    INTERN(s_bytes_sent, "bytes_sent")
    INTERN(s_messages_received, "messages_received")
    INTERN(s_bytes_received, "bytes_received")
    INTERN(s_credits_sent, "credits_sent")
    INTERN(s_credits_received, "credits_received")
    INTERN(s_popleft, "popleft")
    INTERN(s_append, "append")
    INTERN(s_recv_would_block, "recv_would_block")
    INTERN(s_pumpers, "_pumpers")
    INTERN(s_wake, "_wake")
    INTERN(s_waiters, "_waiters")
    INTERN(s_closing, "_closing")
    INTERN(s_timeout, "timeout")
    INTERN(s_drop_wake, "_drop_wake")
    INTERN(s_wake_pumpers, "_wake_pumpers")
    if ((s_failed_code = PyLong_FromLong(-1)) == NULL) /* Channel._rv_sent's _RV_FAILED */
        return NULL;
    if (PyType_Ready(&RvStreamType) < 0 || PyType_Ready(&RvCallType) < 0)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    deque_type = collections == NULL ? NULL : PyObject_GetAttrString(collections, "deque");
    Py_XDECREF(collections);
    if (deque_type == NULL || (d_append = PyObject_GetAttr(deque_type, s_append)) == NULL ||
        (d_popleft = PyObject_GetAttr(deque_type, s_popleft)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RvStream", (PyObject *)&RvStreamType) < 0 ||
        PyModule_AddObjectRef(m, "RvCall", (PyObject *)&RvCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
