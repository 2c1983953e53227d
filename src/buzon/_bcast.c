/*
 * buzon._bcast: the shared broadcast ring of a ``"broadcast"`` mailbox (used by
 * buzon._mailbox_bcast). One ring per mailbox, one copy of each message: the senders
 * write each message once, and each attached receiver reads it at its own cursor.
 *
 * Theory of operation
 * -------------------
 * The segment (a POSIX shared-memory file the Python side creates and passes as a fd)
 * is a header of HDR_SIZE bytes, then NSLOTS slots of SLOT bytes each (NSLOTS a power
 * of two: the mailbox's capacity rounded up; SLOT: 16 + max_inline rounded to 8).
 *
 *   0     magic, version, nslots, slot size, max receivers, created (ns), limit (the
 *         backlog: the capacity; NSLOTS is it rounded up to a power of two)
 *   64    head: u64, messages published so far (message n lives in slot n % NSLOTS);
 *         its low 32 bits are the futex word sleeping receivers wait on
 *   128   lock: u32, the pid of the sender writing a slot now (0: free)
 *   192   waiters: u32 1 while a receiver may sleep on head (the sender that
 *         clears it wakes them all: one system call per sleep, not per message); armed: u32 a waiter of buzon.wait /
 *         asyncio armed the mailbox's wake-up FIFO; closed: u32 (remove() shut it down)
 *   256   retired counts: u64 reached, taken, dropped, lost of receivers gone; at 288
 *         high: u32, 1 + the highest entry ever attached (the sender's look is that short)
 *   1024  MAX_RX receiver entries of 64 bytes: cursor (u64, the next message number it
 *         reads), start (u64, head when it attached), dropped (u64), pid (u32), state
 *         (u32: 0 free, 1 attached)
 *   HDR_SIZE  the slots: seq (u64: n + 1 for message n, 0 while being written or never
 *         written), len (u32), flags (u32: bit 0, an out-of-line record), payload
 *
 * A sender takes the lock (CAS 0 -> its pid), stores seq 0 into slot head % NSLOTS,
 * copies the record, stores seq head + 1, publishes head + 1, drops the lock, and wakes
 * receivers only if one sleeps (waiters) or armed the FIFO (armed): no system call
 * otherwise. It never waits for a receiver: the overflow rule is drop-oldest, and a
 * receiver NSLOTS or more messages behind has lost the oldest ones (the slot was
 * reused). A receiver at cursor c reads slot c (seqlock: seq must be c + 1 before and
 * after its copy), so a record being rewritten is never returned: the receiver counts
 * it dropped and moves on. A receiver's cursor, drops and state are its own (one cache
 * line), written by it alone; nobody waits for a receiver, so a receiver that dies or
 * closes holds nobody back.
 *
 * Crash safety. A sender killed while writing leaves the lock holding its pid, its
 * slot's seq 0 and head unchanged: no receiver reads past head, so the half-written
 * record is never seen; the next sender finds the holder dead (kill(pid, 0): ESRCH)
 * and takes the lock over, and writes the same slot again. Every value read from the
 * segment (lengths, cursors, entry numbers) is checked before use: a scribbled segment
 * gives ProtocolError, never an out-of-bounds access.
 *
 * Records are buzon frames as the mailbox's other rings carry them (the 40-byte common
 * head: MESSAGE_ID, SENDER, SENT_AT; or anything else for the general way); an
 * out-of-line record is "\0OOL" + the block's name, with flag bit 0 set so that the
 * sender that reuses its slot hands the name back (the block is then unlinked: a
 * receiver that had not opened it yet lost that message, as if the slot was reused).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x534342204e5a5542ULL /* "BUZN BCS" little-endian */
#define BC_VERSION 1u
#define HDR_SIZE 16384u
#define MAX_RX 128u
#define RX_OFF 1024u
#define SLOT_HDR 16u
#define MAX_SLOTS (1u << 20)
#define MAX_SLOT ((1u << 20) + 64u)
#define SLICE_NS 50000000LL /* longest futex sleep: a shutdown or signal is seen by then */
#define SPIN 200            /* looks at head before a receiver sleeps */

#define MB_HEAD 40u
#define FR_VERSION 1
#define KIND_DATA 1
#define FLAG_FIELDS 0x20
#define F_OOL 1u

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t nslots;
    uint32_t slot;
    uint32_t max_rx;
    uint64_t created_ns;
    uint32_t limit; /* the backlog: messages a receiver may lag before it loses the oldest */
    uint8_t pad0[64 - 36];
    /* 64 */ _Atomic uint64_t head;
    uint8_t pad1[56];
    /* 128 */ _Atomic uint32_t lock;
    uint8_t pad2[60];
    /* 192 */ _Atomic uint32_t waiters;
    _Atomic uint32_t armed;
    _Atomic uint32_t closed;
    uint8_t pad3[52];
    /* 256 */ _Atomic uint64_t retired[4]; /* reached, taken, dropped, lost */
    /* 288 */ _Atomic uint32_t high; /* 1 + the highest entry ever attached */
} bc_header;

typedef struct {
    _Atomic uint64_t cursor;
    _Atomic uint64_t start;
    _Atomic uint64_t dropped;
    _Atomic uint32_t pid;
    _Atomic uint32_t state;
    uint8_t pad[32];
} bc_entry;

typedef struct {
    _Atomic uint64_t seq;
    _Atomic uint32_t len;
    _Atomic uint32_t flags;
} bc_slot;

_Static_assert(sizeof(bc_header) <= RX_OFF, "header fits");
_Static_assert(sizeof(bc_entry) == 64, "an entry is one cache line");
_Static_assert(RX_OFF + MAX_RX * sizeof(bc_entry) <= HDR_SIZE, "entries fit");
_Static_assert(offsetof(bc_header, head) == 64, "layout");
_Static_assert(offsetof(bc_header, lock) == 128, "layout");
_Static_assert(offsetof(bc_header, waiters) == 192, "layout");
_Static_assert(offsetof(bc_header, retired) == 256, "layout");

static uint32_t cached_pid;
static PyObject *err_protocol, *err_empty, *err_timeout, *err_end, *err_closed;

static void
atfork_child(void)
{
    cached_pid = (uint32_t)getpid();
}

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void
put32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static void
put64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static uint32_t
get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

typedef struct {
    PyObject_HEAD
    uint8_t *base;   /* the mapping, or NULL once closed */
    size_t size;
    bc_header *h;
    uint32_t nslots, mask, slot, payload; /* payload: the most a slot's record holds */
    uint32_t limit;  /* the backlog (<= nslots): a receiver further behind lost the oldest */
    uint64_t seen_head; /* the head as this object last read it (never more than it is) */
    int busy;        /* threads asleep in a receive (the GIL released): close() waits... */
    _Atomic int closing; /* ...for them: set, they wake, the last one out unmaps */
    long bound;      /* bind(): the receiver entry next() reads (-1: none) ... */
    PyObject *fallback, *general; /* ... Mailbox.recv, and what a non-common record takes */
    uint8_t *buf;    /* one record copied out (payload bytes) */
    PyObject *encode, *decode; /* msgspec encode/decode (no hooks), or None */
    Py_ssize_t fast_max; /* the largest body that goes as a common record */
    uint32_t uid;
    int notify_fd;   /* the mailbox's wake-up FIFO: written when a waiter armed it */
    int mark_fd;     /* the same FIFO: its mtime/atime mark the last send/take (buzon ls) */
    uint64_t marked[2];
    unsigned long long next_id, sent, received, dropped, overwritten;
    uint64_t last;   /* the message number of this object's last publish */
    long pending;    /* the entry whose cursor moves past a record handed to the general
                      * way only after it (commit): a receipt's acknowledgement is then
                      * written before the cursor says the message was read; -1: none */
    uint64_t pending_cursor;
    PyObject *title; /* what a timeout names ("mailbox 'news'"), or NULL/None */
} Bcast;

/* Move the pending entry's cursor past the record handed to the general way (see
 * Bcast.pending): by commit(), or by the next receive, arm or close. */
static void
commit_pending(Bcast *b)
{
    if (b->pending >= 0) {
        if (b->base != NULL) {
            bc_entry *e = (bc_entry *)(b->base + RX_OFF + (size_t)b->pending * sizeof(bc_entry));
            atomic_store_explicit(&e->cursor, b->pending_cursor, memory_order_release);
        }
        b->pending = -1;
    }
}

static void unmap(Bcast *b);

static bc_slot *
slot_at(Bcast *b, uint64_t n)
{
    return (bc_slot *)(b->base + HDR_SIZE + (size_t)(n & b->mask) * b->slot);
}

static bc_entry *
entry_at(Bcast *b, uint32_t i)
{
    return (bc_entry *)(b->base + RX_OFF + (size_t)i * sizeof(bc_entry));
}

static int
check_open(Bcast *b)
{
    if (b->base == NULL || atomic_load_explicit(&b->closing, memory_order_relaxed)) {
        PyErr_SetString(err_closed, "the broadcast ring was closed");
        return -1;
    }
    return 0;
}

/* The entry number argument, checked. */
static int
entry_arg(Bcast *b, PyObject *arg, uint32_t *out)
{
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (i < 0 || (unsigned long)i >= MAX_RX) {
        PyErr_SetString(PyExc_ValueError, "no such receiver entry");
        return -1;
    }
    (void)b;
    *out = (uint32_t)i;
    return 0;
}

static void
mark_use(Bcast *b, int kind)
{
    if (b->mark_fd < 0) {
        return;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME_COARSE, &now);
    uint64_t ns = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
    if (ns - b->marked[kind] < 1000000000ULL) {
        return;
    }
    b->marked[kind] = ns;
    struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
    ts[kind] = now;
    (void)futimens(b->mark_fd, ts); /* best effort: a statistic */
}

/* ---- the sender ------------------------------------------------------------------ */

#define LOCK_STUCK_NS 2000000000LL /* a live holder keeps the lock for a few stores */

/* Take the senders' lock. 0, or -1 with ProtocolError: held for LOCK_STUCK_NS by a
 * process that lives (a scribbled lock word, or a sender stopped inside a send). */
static int
lock_take(Bcast *b)
{
    bc_header *h = b->h;
    int64_t since = -1;
    for (int i = 0;; i++) {
        uint32_t exp = 0;
        if (atomic_compare_exchange_weak(&h->lock, &exp, cached_pid)) {
            return 0;
        }
        if (exp == 0) {
            continue;
        }
        if (i < 100) {
            cpu_relax();
            continue;
        }
        /* ours: a dead process with our pid, as no thread of ours is in a send (the
         * GIL is held from take to release); not a pid: scribbled; else ask the kernel */
        if (exp == cached_pid || exp > (uint32_t)INT_MAX ||
            (kill((pid_t)exp, 0) < 0 && errno == ESRCH)) {
            /* its holder died mid-send: its slot is written again by us */
            if (atomic_compare_exchange_strong(&h->lock, &exp, cached_pid)) {
                return 0;
            }
            continue;
        }
        int64_t now = mono_ns();
        if (since < 0) {
            since = now;
        }
        else if (now - since > LOCK_STUCK_NS) {
            PyErr_Format(err_protocol,
                         "broadcast ring: pid %u has held the senders' lock for over 2 s",
                         (unsigned)exp);
            return -1;
        }
        sched_yield(); /* the holder was preempted inside a few stores */
        i = 0;
    }
}

/* Every COURTESY_EVERY sends a sender looks at the receivers' cursors: if one that
 * keeps up (at most 2 x limit behind: a dead or idle one is further and not looked at)
 * is more than half its backlog behind, the sender offers its CPU (sched_yield: not a
 * wait; it returns at once when nobody else is runnable). With more processes than
 * CPUs, a sender that runs on meanwhile only writes messages the receivers will lose:
 * the CPU is theirs. */
#define COURTESY_EVERY 16

static void
courtesy(Bcast *b, uint64_t head)
{
    uint32_t high = atomic_load_explicit(&b->h->high, memory_order_relaxed);
    if (high > MAX_RX) {
        high = MAX_RX;
    }
    uint64_t half = b->limit / 2, far = 2ULL * b->limit;
    for (uint32_t i = 0; i < high; i++) {
        bc_entry *e = entry_at(b, i);
        if (atomic_load_explicit(&e->state, memory_order_relaxed) != 1) {
            continue;
        }
        uint64_t lag = head - atomic_load_explicit(&e->cursor, memory_order_relaxed);
        if (lag > half && lag <= far) {
            sched_yield();
            return;
        }
    }
}

/* Write one record (the parts) as the next message; the name of an out-of-line record
 * whose slot it reused (a new reference), or Py_None (a new reference); NULL on error. */
static PyObject *
publish(Bcast *b, const uint8_t *const *p, const size_t *n, int nparts, size_t total,
        uint32_t flags)
{
    bc_header *h = b->h;
    if (total > b->payload) {
        PyErr_SetString(PyExc_ValueError, "the record is larger than a slot");
        return NULL;
    }
    if (atomic_load_explicit(&h->closed, memory_order_relaxed)) {
        PyErr_SetString(err_end, "the mailbox was removed");
        return NULL;
    }
    if (lock_take(b) < 0) {
        return NULL;
    }
    uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    bc_slot *s = slot_at(b, head);
    PyObject *old = NULL;
    if (head >= b->nslots && (atomic_load_explicit(&s->flags, memory_order_relaxed) & F_OOL)) {
        uint32_t olen = atomic_load_explicit(&s->len, memory_order_relaxed);
        if (olen <= b->payload) {
            old = PyBytes_FromStringAndSize((const char *)(s + 1), olen);
            /* (NULL: MemoryError, reported after the write; the block then stays until
             * remove() or buzon clean) */
        }
    }
    atomic_store_explicit(&s->seq, 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&s->len, (uint32_t)total, memory_order_relaxed);
    atomic_store_explicit(&s->flags, flags, memory_order_relaxed);
    uint8_t *dst = (uint8_t *)(s + 1);
    for (int i = 0; i < nparts; i++) {
        memcpy(dst, p[i], n[i]);
        dst += n[i];
    }
    atomic_store_explicit(&s->seq, head + 1, memory_order_release);
    if (b->limit < b->nslots && head >= b->limit) {
        /* a backlog that is not a power of two: message head - limit leaves the
         * backlog now but keeps its slot a while; a receiver that has not read the new
         * head must not find it there (with limit == NSLOTS the rewrite does this) */
        atomic_store_explicit(&slot_at(b, head - b->limit)->seq, 0, memory_order_release);
    }
    atomic_store_explicit(&h->head, head + 1, memory_order_seq_cst);
    atomic_store_explicit(&h->lock, 0, memory_order_release);
    b->last = head;
    /* one wake per sleep: the first sender to see the flag clears it (a receiver that
     * sleeps later sets it again; its futex_wait sees the new head and returns) */
    if (atomic_load_explicit(&h->waiters, memory_order_seq_cst) &&
        atomic_exchange(&h->waiters, 0)) {
        syscall(SYS_futex, (uint32_t *)&h->head, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
    if (atomic_load_explicit(&h->armed, memory_order_relaxed) && atomic_exchange(&h->armed, 0) &&
        b->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(b->notify_fd, &one, sizeof one);
        (void)w; /* full: readable anyway */
    }
    b->sent++;
    if ((b->sent & (COURTESY_EVERY - 1)) == 0) {
        courtesy(b, head + 1);
    }
    mark_use(b, 1);
    if (old == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    b->overwritten++;
    return old;
}

/* The body of obj for a common record (a new reference, *codec set), NULL without an
 * exception when it is not one (the general way), NULL with one on error. */
static PyObject *
body_of(Bcast *b, PyObject *obj, long *codec)
{
    if (PyBytes_CheckExact(obj)) {
        if (PyBytes_GET_SIZE(obj) > b->fast_max) {
            return NULL;
        }
        *codec = 0;
        return Py_NewRef(obj);
    }
    if (b->encode == NULL || b->encode == Py_None || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        return NULL;
    }
    PyObject *body = PyObject_CallOneArg(b->encode, obj);
    if (body == NULL) {
        PyErr_Clear(); /* the codec's hooks may know it (numpy), or say why not */
        return NULL;
    }
    if (!PyBytes_CheckExact(body) || PyBytes_GET_SIZE(body) > b->fast_max) {
        Py_DECREF(body);
        return NULL;
    }
    *codec = 1;
    return body;
}

static PyObject *
bc_send(Bcast *b, PyObject *obj)
{
    /* send(obj) -> None | bytes (an out-of-line record whose slot it reused: the caller
     * removes the block) | False (not a common record: nothing sent, the general way) */
    if (check_open(b) < 0) {
        return NULL;
    }
    long codec = 0;
    PyObject *body = body_of(b, obj, &codec);
    if (body == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_FALSE;
    }
    uint8_t hd[MB_HEAD];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    Py_ssize_t len = PyBytes_GET_SIZE(body);
    memset(hd, 0, MB_HEAD);
    hd[0] = FR_VERSION;
    hd[1] = KIND_DATA;
    hd[2] = (uint8_t)(codec | FLAG_FIELDS);
    put32(hd + 4, (uint32_t)len);
    hd[8] = 30;
    hd[10] = 1; /* MESSAGE_ID */
    hd[11] = 8;
    put64(hd + 12, b->next_id + 1);
    hd[20] = 2; /* SENDER */
    hd[21] = 8;
    put32(hd + 22, cached_pid);
    put32(hd + 26, b->uid);
    hd[30] = 6; /* SENT_AT */
    hd[31] = 8;
    put64(hd + 32, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
    const uint8_t *p[2] = {hd, (const uint8_t *)PyBytes_AS_STRING(body)};
    size_t n[2] = {MB_HEAD, (size_t)len};
    PyObject *out = publish(b, p, n, 2, MB_HEAD + (size_t)len, 0);
    Py_DECREF(body);
    if (out != NULL) {
        b->next_id++;
    }
    return out;
}

static PyObject *
bc_put(Bcast *b, PyObject *const *args, Py_ssize_t nargs)
{
    /* put(record, out_of_line) -> None | bytes: a record the general way built (a whole
     * frame, or "\0OOL" + a block's name with out_of_line true), as send */
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "put(record, out_of_line, numbered=False)");
        return NULL;
    }
    if (check_open(b) < 0) {
        return NULL;
    }
    int ool = PyObject_IsTrue(args[1]);
    if (ool < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const uint8_t *p[1] = {view.buf};
    size_t n[1] = {(size_t)view.len};
    PyObject *out = publish(b, p, n, 1, (size_t)view.len, ool ? F_OOL : 0);
    PyBuffer_Release(&view);
    if (out != NULL && nargs == 3 && PyObject_IsTrue(args[2]) == 1) {
        /* (message number, reused record): publish wrote message head - 1 under the
         * lock, and nothing of ours ran since (the GIL is held) */
        Py_SETREF(out, Py_BuildValue("(KN)", (unsigned long long)(b->last), out));
    }
    return out;
}

/* ---- the receiver ---------------------------------------------------------------- */

/* Copy message *cur of entry e into b->buf if it is still there. 1 got it (*len,
 * *flags), 0 nothing new, -1 the segment is corrupt (ProtocolError set). Messages lost
 * (lapped, or rewritten under the copy) are counted in e->dropped and skipped. */
static int
take_one(Bcast *b, bc_entry *e, uint32_t *lenp, uint32_t *flagsp, uint64_t *curp)
{
    bc_header *h = b->h;
    for (;;) {
        uint64_t c = atomic_load_explicit(&e->cursor, memory_order_relaxed);
        /* the head as last read while we are behind it (the line the sender writes
         * each message: not read again per message); a lap is then seen in the slot */
        uint64_t hd = b->seen_head;
        if (c >= hd || hd - c > b->limit) {
            hd = b->seen_head = atomic_load_explicit(&h->head, memory_order_acquire);
        }
        if (c >= hd) {
            if (c > hd) {
                PyErr_SetString(err_protocol, "broadcast ring: a cursor past the head");
                return -1;
            }
            return 0;
        }
        if (hd - c > b->limit) { /* lapped: the oldest went */
            uint64_t lost = hd - b->limit - c;
            atomic_store_explicit(&e->dropped, atomic_load(&e->dropped) + lost,
                                  memory_order_relaxed);
            b->dropped += lost;
            c = hd - b->limit;
            atomic_store_explicit(&e->cursor, c, memory_order_relaxed);
        }
        bc_slot *s = slot_at(b, c);
        uint64_t s1 = atomic_load_explicit(&s->seq, memory_order_acquire);
        uint32_t len = atomic_load_explicit(&s->len, memory_order_relaxed);
        uint32_t flags = atomic_load_explicit(&s->flags, memory_order_relaxed);
        int ok = s1 == c + 1;
        if (ok && len <= b->payload) {
            memcpy(b->buf, (const uint8_t *)(s + 1), len);
        }
        atomic_thread_fence(memory_order_acquire);
        uint64_t s2 = atomic_load_explicit(&s->seq, memory_order_relaxed);
        if (!ok || s2 != s1) {
            uint64_t now = atomic_load_explicit(&h->head, memory_order_acquire);
            if (now != hd) { /* lapped since we read the head: look again with this one */
                b->seen_head = now;
                continue;
            }
            /* head unchanged, slot rewritten: a sender is writing message head into
             * slot c (c == head - NSLOTS), so message c is gone. Reading on from c + 1
             * would chase that sender round the ring (each slot rewritten under our
             * copy: a drop each); the next limit/8 go the same way within a few sends,
             * so they are dropped now and we read ahead of it. A receiver lapped by a
             * sender that paused never comes here: it keeps exactly its newest
             * `limit` messages. */
            uint64_t skip = c + 1 + (b->limit >> 3);
            if (skip > now) {
                skip = now;
            }
            if (skip <= c) {
                skip = c + 1;
            }
            atomic_store_explicit(&e->dropped, atomic_load(&e->dropped) + (skip - c),
                                  memory_order_relaxed);
            b->dropped += skip - c;
            atomic_store_explicit(&e->cursor, skip, memory_order_relaxed);
            continue;
        }
        if (len > b->payload) {
            PyErr_SetString(err_protocol, "broadcast ring: a record longer than its slot");
            return -1;
        }
        *curp = c; /* the caller moves the cursor past it (at once, or by commit) */
        *lenp = len;
        *flagsp = flags;
        return 1;
    }
}

/* Wait until entry e has a message, the ring is shut down or the deadline (-1: none)
 * passes. 1 there may be one, 0 deadline, -1 error (a signal handler's, or closed). */
static int
wait_message(Bcast *b, bc_entry *e, int64_t deadline)
{
    bc_header *h = b->h;
    uint64_t c = atomic_load_explicit(&e->cursor, memory_order_relaxed);
    for (int i = 0; i < SPIN; i++) {
        if (atomic_load_explicit(&h->head, memory_order_acquire) != c) {
            return 1;
        }
        cpu_relax();
    }
    for (;;) {
        if (atomic_load(&h->closed)) {
            PyErr_SetString(err_end, "the mailbox was removed");
            return -1;
        }
        int64_t left = SLICE_NS;
        if (deadline >= 0) {
            int64_t rem = deadline - mono_ns();
            if (rem <= 0) {
                return 0;
            }
            if (rem < left) {
                left = rem;
            }
        }
        uint64_t hd;
        int intr = 0;
        b->busy++; /* (the mapping stays while we sleep on it: see bc_close) */
        Py_BEGIN_ALLOW_THREADS
        atomic_store_explicit(&h->waiters, 1, memory_order_seq_cst);
        hd = atomic_load_explicit(&h->head, memory_order_seq_cst);
        if (hd == c && !atomic_load(&h->closed) && !atomic_load(&b->closing)) {
            struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
            long r = syscall(SYS_futex, (uint32_t *)&h->head, FUTEX_WAIT, (uint32_t)c, &ts,
                             NULL, 0);
            intr = r < 0 && errno == EINTR;
            hd = atomic_load_explicit(&h->head, memory_order_acquire);
        }
        Py_END_ALLOW_THREADS
        if (--b->busy == 0 && atomic_load(&b->closing)) {
            unmap(b); /* closed meanwhile: the last sleeper out unmaps */
        }
        if (b->base == NULL || atomic_load(&b->closing)) {
            PyErr_SetString(err_closed, "the broadcast ring was closed");
            return -1;
        }
        if (hd != c || atomic_load_explicit(&e->cursor, memory_order_relaxed) != c) {
            return 1; /* (another thread of ours may have taken it: the caller looks) */
        }
        if (intr && PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

/* The next record of entry i as a new bytes object in *rec; or the common record's
 * object in *obj. timeout: None for ever, <= 0 no wait (Empty), else seconds (Timeout).
 * 0, or -1 with an exception. */
static int
receive(Bcast *b, PyObject *ientry, PyObject *timeout, int decode, PyObject **obj,
        PyObject **rec)
{
    *obj = *rec = NULL;
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return -1;
    }
    bc_entry *e = entry_at(b, i);
    if (atomic_load_explicit(&e->pid, memory_order_relaxed) != cached_pid ||
        atomic_load_explicit(&e->state, memory_order_relaxed) != 1) {
        PyErr_SetString(err_protocol, "broadcast ring: this receiver entry is not ours");
        return -1;
    }
    int64_t deadline = -1;
    int nowait = 0;
    if (timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        if (t <= 0) {
            nowait = 1;
        }
        else {
            deadline = -2; /* read the clock only if it must wait */
            (void)t;
        }
    }
    commit_pending(b);
    uint32_t len = 0, flags = 0;
    uint64_t cur = 0;
    for (;;) {
        int got = take_one(b, e, &len, &flags, &cur);
        if (got < 0) {
            return -1;
        }
        if (got) {
            break;
        }
        if (atomic_load(&b->h->closed)) {
            PyErr_SetString(err_end, "the mailbox was removed");
            return -1;
        }
        if (nowait) {
            PyErr_SetString(err_empty, "no message");
            return -1;
        }
        if (deadline == -2) {
            deadline = mono_ns() + (int64_t)(PyFloat_AsDouble(timeout) * 1e9);
        }
        int w = wait_message(b, e, deadline);
        if (w < 0) {
            return -1;
        }
        if (w == 0) {
            if ((got = take_one(b, e, &len, &flags, &cur)) != 0) { /* one last look */
                if (got < 0) {
                    return -1;
                }
                break;
            }
            if (b->title != NULL && PyUnicode_Check(b->title)) {
                PyErr_Format(err_timeout, "receiving from %S timed out", b->title);
            }
            else {
                PyErr_SetString(err_timeout, "no message came in time");
            }
            return -1;
        }
    }
    b->received++;
    mark_use(b, 0);
    /* a record for the general way (it may be a receipt record, acknowledged there)
     * moves the cursor on commit(); a common record at once */
    b->pending = (long)i;
    b->pending_cursor = cur + 1;
    const uint8_t *p = b->buf;
    if (decode && !(flags & F_OOL) && len >= MB_HEAD && p[0] == FR_VERSION &&
        p[1] == KIND_DATA && (p[2] & 0xF8) == FLAG_FIELDS && p[3] == 0 && p[8] == 30 &&
        p[9] == 0 && p[10] == 1 && p[11] == 8 && p[20] == 2 && p[21] == 8 && p[30] == 6 &&
        p[31] == 8 && get32(p + 4) == len - MB_HEAD) {
        long codec = p[2] & 7;
        PyObject *body = PyBytes_FromStringAndSize((const char *)p + MB_HEAD, len - MB_HEAD);
        if (body == NULL) {
            return -1;
        }
        if (codec == 0) {
            commit_pending(b);
            *obj = body;
            return 0;
        }
        if (codec == 1 && b->decode != NULL && b->decode != Py_None) {
            *obj = PyObject_CallOneArg(b->decode, body);
            if (*obj != NULL) {
                commit_pending(b);
                Py_DECREF(body);
                return 0;
            }
            PyErr_Clear(); /* the general way says why it does not decode */
        }
        Py_DECREF(body);
    }
    *rec = PyBytes_FromStringAndSize((const char *)p, len);
    return *rec == NULL ? -1 : 0;
}

static PyObject *
bc_recv(Bcast *b, PyObject *const *args, Py_ssize_t nargs)
{
    /* recv(entry, timeout) -> the object of a common record (codec 0: its bytes; 1:
     * decoded), else (record,) for the general way */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv(entry, timeout)");
        return NULL;
    }
    PyObject *obj, *rec;
    if (receive(b, args[0], args[1], 1, &obj, &rec) < 0) {
        return NULL;
    }
    if (obj != NULL) {
        return obj;
    }
    PyObject *t = PyTuple_New(1);
    if (t == NULL) {
        Py_DECREF(rec);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, rec);
    return t;
}

static PyObject *
bc_next(Bcast *b, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    /* next(timeout=None): Mailbox.recv of a bound broadcast receiver, in one call: the
     * common record's object; anything else -- a timeout, another process (forked), a
     * record the general way decodes, closed -- goes to the Python side it was bound
     * with (fallback(*args), or general(record, None)) */
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    int plain = nargs + nkw == 0 || (nargs == 1 && nkw == 0 && args[0] == Py_None);
    if (b->fallback == NULL) {
        PyErr_SetString(err_closed, "the mailbox was closed");
        return NULL;
    }
    if (!plain || b->base == NULL || b->bound < 0 ||
        atomic_load_explicit(&entry_at(b, (uint32_t)b->bound)->pid, memory_order_relaxed) !=
            cached_pid) {
        return PyObject_Vectorcall(b->fallback, args, (size_t)nargs, kwnames);
    }
    PyObject *idx = PyLong_FromLong(b->bound), *obj, *rec;
    if (idx == NULL) {
        return NULL;
    }
    int rc = receive(b, idx, Py_None, 1, &obj, &rec);
    Py_DECREF(idx);
    if (rc < 0) {
        return NULL;
    }
    if (obj != NULL) {
        return obj;
    }
    PyObject *general = Py_NewRef(b->general);
    PyObject *out = PyObject_CallFunctionObjArgs(general, rec, Py_None, NULL);
    Py_DECREF(general);
    Py_DECREF(rec);
    return out;
}

static PyObject *
bc_bind(Bcast *b, PyObject *const *args, Py_ssize_t nargs)
{
    /* bind(entry, fallback, general) | bind(-1, None, None): what next() reads and
     * hands on */
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bind(entry, fallback, general)");
        return NULL;
    }
    long i = PyLong_AsLong(args[0]);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i >= (long)MAX_RX || (i >= 0 && (!PyCallable_Check(args[1]) || !PyCallable_Check(args[2])))) {
        PyErr_SetString(PyExc_ValueError, "bind: an entry and two callables");
        return NULL;
    }
    b->bound = i < 0 ? -1 : i;
    Py_XSETREF(b->fallback, i < 0 ? NULL : Py_NewRef(args[1]));
    Py_XSETREF(b->general, i < 0 ? NULL : Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static PyObject *
bc_take(Bcast *b, PyObject *const *args, Py_ssize_t nargs)
{
    /* take(entry, timeout, deferred=False) -> the next record (bytes), as recv waits;
     * deferred: the cursor moves past it on commit() (or the next receive), not now */
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "take(entry, timeout, deferred=False)");
        return NULL;
    }
    int deferred = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (deferred < 0) {
        return NULL;
    }
    PyObject *obj, *rec;
    if (receive(b, args[0], args[1], 0, &obj, &rec) < 0) {
        return NULL;
    }
    if (!deferred) {
        commit_pending(b);
    }
    return rec;
}

static PyObject *
bc_commit(Bcast *b, PyObject *Py_UNUSED(ignored))
{
    /* commit(): the record last handed to the general way is read (see pending) */
    commit_pending(b);
    Py_RETURN_NONE;
}

static PyObject *
bc_cursor(Bcast *b, PyObject *ientry)
{
    /* cursor(i) -> (state, pid, start, cursor) of entry i, as they are (a receipt's
     * sender tells from them whether a receiver it counted is past its message) */
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return NULL;
    }
    bc_entry *e = entry_at(b, i);
    uint64_t c = atomic_load_explicit(&e->cursor, memory_order_acquire);
    uint64_t start = atomic_load(&e->start);
    uint32_t state = atomic_load(&e->state), pid = atomic_load(&e->pid);
    return Py_BuildValue("(IIKK)", state, pid, (unsigned long long)start,
                         (unsigned long long)c);
}

static PyObject *
bc_arm(Bcast *b, PyObject *ientry)
{
    /* arm(entry) -> True if a message (or the end) is there for entry; else arm the
     * wake-up: the next send writes the notify fd */
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return NULL;
    }
    commit_pending(b);
    bc_header *h = b->h;
    bc_entry *e = entry_at(b, i);
    if (atomic_load(&h->closed) || atomic_load(&e->cursor) != atomic_load(&h->head)) {
        Py_RETURN_TRUE;
    }
    atomic_store(&h->armed, 1);
    if (atomic_load(&h->closed) || atomic_load(&e->cursor) != atomic_load(&h->head)) {
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* ---- the receiver table (the Python side holds the lock that orders these) ---- */

static PyObject *
bc_attach(Bcast *b, PyObject *ientry)
{
    /* attach(entry): make entry ours, starting at the current head */
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return NULL;
    }
    bc_entry *e = entry_at(b, i);
    atomic_store(&e->state, 0);
    uint64_t hd = atomic_load(&b->h->head);
    atomic_store(&e->cursor, hd);
    atomic_store(&e->start, hd);
    atomic_store(&e->dropped, 0);
    atomic_store(&e->pid, cached_pid);
    atomic_store(&e->state, 1);
    uint32_t high = atomic_load(&b->h->high);
    while (high < i + 1 && !atomic_compare_exchange_weak(&b->h->high, &high, i + 1)) {
    }
    Py_RETURN_NONE;
}

static PyObject *
bc_entry_info(Bcast *b, PyObject *ientry)
{
    /* entry(i) -> (state, pid, reached, taken, dropped, depth): reached = messages sent
     * since it attached, depth = those it has yet to read (at most the ring's slots) */
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return NULL;
    }
    bc_entry *e = entry_at(b, i);
    uint64_t hd = atomic_load(&b->h->head);
    uint64_t start = atomic_load(&e->start), c = atomic_load(&e->cursor);
    uint64_t dropped = atomic_load(&e->dropped);
    uint32_t state = atomic_load(&e->state), pid = atomic_load(&e->pid);
    if (state == 0) {
        return Py_BuildValue("(IIKKKK)", 0u, 0u, 0ULL, 0ULL, 0ULL, 0ULL);
    }
    if (start > c || c > hd || dropped > c - start) { /* scribbled, or torn read: clamp */
        start = c = hd < c ? hd : c;
        dropped = 0;
    }
    uint64_t taken = c - start - dropped;
    uint64_t depth = hd - c;
    if (depth > b->limit) { /* lapped, not yet counted by the receiver */
        dropped += depth - b->limit;
        depth = b->limit;
    }
    return Py_BuildValue("(IIKKKK)", state, pid, (unsigned long long)(hd - start),
                         (unsigned long long)taken, (unsigned long long)dropped,
                         (unsigned long long)depth);
}

static PyObject *
bc_free_entry(Bcast *b, PyObject *ientry)
{
    /* free_entry(i): entry i is free again */
    uint32_t i;
    if (check_open(b) < 0 || entry_arg(b, ientry, &i) < 0) {
        return NULL;
    }
    atomic_store(&entry_at(b, i)->state, 0);
    Py_RETURN_NONE;
}

static PyObject *
bc_retire(Bcast *b, PyObject *args)
{
    /* retire(reached, taken, dropped, lost): add a departed receiver's counts */
    unsigned long long v[4];
    if (!PyArg_ParseTuple(args, "KKKK", &v[0], &v[1], &v[2], &v[3]) || check_open(b) < 0) {
        return NULL;
    }
    for (int k = 0; k < 4; k++) {
        atomic_fetch_add(&b->h->retired[k], v[k]);
    }
    Py_RETURN_NONE;
}

static PyObject *
bc_info(Bcast *b, PyObject *Py_UNUSED(ignored))
{
    if (check_open(b) < 0) {
        return NULL;
    }
    bc_header *h = b->h;
    return Py_BuildValue("{sKsIsIsIsIsKsKsKsKsI}", "head", (unsigned long long)atomic_load(&h->head),
                         "limit", b->limit, "slots", b->nslots, "slot_size", b->slot, "payload", b->payload,
                         "reached", (unsigned long long)atomic_load(&h->retired[0]), "taken",
                         (unsigned long long)atomic_load(&h->retired[1]), "dropped",
                         (unsigned long long)atomic_load(&h->retired[2]), "lost",
                         (unsigned long long)atomic_load(&h->retired[3]), "closed",
                         (unsigned)atomic_load(&h->closed));
}

static PyObject *
bc_shutdown(Bcast *b, PyObject *Py_UNUSED(ignored))
{
    /* shutdown(): receivers get EndOfChannel from now on (sleepers woken) */
    if (check_open(b) < 0) {
        return NULL;
    }
    atomic_store(&b->h->closed, 1);
    syscall(SYS_futex, (uint32_t *)&b->h->head, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    if (b->notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(b->notify_fd, &one, sizeof one);
        (void)w;
    }
    Py_RETURN_NONE;
}

static PyObject *
bc_out_of_line(Bcast *b, PyObject *Py_UNUSED(ignored))
{
    /* out_of_line() -> the out-of-line records still in the slots (remove() unlinks
     * their blocks) */
    if (check_open(b) < 0) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    uint64_t hd = atomic_load(&b->h->head);
    uint64_t n = hd < b->nslots ? hd : b->nslots;
    for (uint64_t k = 0; out != NULL && k < n; k++) {
        bc_slot *s = slot_at(b, hd - 1 - k);
        uint32_t len = atomic_load(&s->len);
        if ((atomic_load(&s->flags) & F_OOL) && len <= b->payload) {
            PyObject *rec = PyBytes_FromStringAndSize((const char *)(s + 1), len);
            if (rec == NULL || PyList_Append(out, rec) < 0) {
                Py_CLEAR(out);
            }
            Py_XDECREF(rec);
        }
    }
    return out;
}

static void
unmap(Bcast *b)
{
    if (b->base != NULL) {
        munmap(b->base, b->size);
        b->base = NULL;
        b->h = NULL;
    }
}

static PyObject *
bc_close(Bcast *b, PyObject *Py_UNUSED(ignored))
{
    /* close(): unmap, or, while other threads sleep in a receive, wake them (they raise
     * ChannelClosed) and let the last one unmap */
    commit_pending(b);
    if (b->busy > 0 && b->base != NULL) {
        atomic_store(&b->closing, 1);
        syscall(SYS_futex, (uint32_t *)&b->h->head, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        Py_RETURN_NONE;
    }
    unmap(b);
    Py_RETURN_NONE;
}

/* ---- the type ------------------------------------------------------------------- */

static PyObject *
bc_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    /* Bcast(fd, create, limit, payload, encode, decode, fast_max, uid) */
    static char *names[] = {"fd", "create", "limit", "payload", "encode",
                            "decode", "fast_max", "uid", NULL};
    int fd, create;
    unsigned int limit = 0, payload = 0, uid = 0;
    PyObject *encode, *decode;
    Py_ssize_t fast_max;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ipIIOOnI", names, &fd, &create, &limit,
                                     &payload, &encode, &decode, &fast_max, &uid)) {
        return NULL;
    }
    uint32_t nslots = 1;
    while (nslots < limit && nslots < MAX_SLOTS) {
        nslots <<= 1;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (create) {
        if (limit < 1 || limit > MAX_SLOTS || payload < MB_HEAD || payload > MAX_SLOT - SLOT_HDR) {
            PyErr_SetString(PyExc_ValueError, "limit: 1 to 2**20 messages; payload: 40 to 1 MiB");
            return NULL;
        }
        uint32_t slot = (SLOT_HDR + payload + 7u) & ~7u;
        size_t size = HDR_SIZE + (size_t)nslots * slot;
        if (ftruncate(fd, (off_t)size) < 0) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        st.st_size = (off_t)size;
    }
    if ((size_t)st.st_size < HDR_SIZE) {
        PyErr_SetString(err_protocol, "not a broadcast ring: too short");
        return NULL;
    }
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    bc_header *h = (bc_header *)base;
    if (create) {
        h->nslots = nslots;
        h->limit = limit;
        h->slot = (SLOT_HDR + payload + 7u) & ~7u;
        h->max_rx = MAX_RX;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        h->created_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        h->version = BC_VERSION;
        atomic_thread_fence(memory_order_release);
        h->magic = MAGIC;
    }
    /* everything read once, checked, then kept: another process may scribble later */
    uint32_t ns = h->nslots, sl = h->slot, lim = h->limit;
    if (h->magic != MAGIC || h->version != BC_VERSION || ns < 1 || ns > MAX_SLOTS ||
        lim < 1 || lim > ns ||
        (ns & (ns - 1)) || sl < SLOT_HDR + MB_HEAD || sl > MAX_SLOT || (sl & 7) ||
        (size_t)st.st_size < HDR_SIZE + (size_t)ns * sl) {
        munmap(base, (size_t)st.st_size);
        PyErr_SetString(err_protocol, "not a buzon broadcast ring (bad header)");
        return NULL;
    }
    Bcast *b = (Bcast *)type->tp_alloc(type, 0);
    if (b == NULL) {
        munmap(base, (size_t)st.st_size);
        return NULL;
    }
    b->base = base;
    b->size = (size_t)st.st_size;
    b->h = h;
    b->nslots = ns;
    b->mask = ns - 1;
    b->limit = lim;
    b->slot = sl;
    b->payload = sl - SLOT_HDR;
    b->buf = PyMem_Malloc(b->payload);
    b->encode = Py_NewRef(encode);
    b->decode = Py_NewRef(decode);
    b->fast_max = fast_max < (Py_ssize_t)(b->payload - MB_HEAD) ? fast_max
                                                                  : (Py_ssize_t)(b->payload - MB_HEAD);
    b->uid = uid;
    b->notify_fd = -1;
    b->mark_fd = -1;
    b->bound = -1;
    b->pending = -1;
    if (b->buf == NULL) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    return (PyObject *)b;
}

static int
bc_traverse(Bcast *b, visitproc visit, void *arg)
{
    Py_VISIT(b->encode);
    Py_VISIT(b->decode);
    Py_VISIT(b->fallback); /* (a bound mailbox: it holds next(), next() holds it) */
    Py_VISIT(b->general);
    Py_VISIT(b->title);
    return 0;
}

static int
bc_clear(Bcast *b)
{
    Py_CLEAR(b->encode);
    Py_CLEAR(b->decode);
    Py_CLEAR(b->fallback);
    Py_CLEAR(b->general);
    Py_CLEAR(b->title);
    b->bound = -1;
    return 0;
}

static void
bc_dealloc(Bcast *b)
{
    PyObject_GC_UnTrack(b);
    unmap(b);
    PyMem_Free(b->buf);
    bc_clear(b);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyMethodDef bc_methods[] = {
    {"send", (PyCFunction)bc_send, METH_O,
     "send(obj) -> None | bytes | False: obj as one common record, written once for every "
     "receiver (bytes: the out-of-line record whose slot it reused; False: not a common "
     "record, nothing sent)"},
    {"put", (PyCFunction)(void (*)(void))bc_put, METH_FASTCALL,
     "put(record, out_of_line, numbered=False) -> None | bytes: a record the general way "
     "built, as send; numbered: (its message number, that)"},
    {"commit", (PyCFunction)bc_commit, METH_NOARGS,
     "commit(): the record last handed to the general way was read (its cursor moves)"},
    {"cursor", (PyCFunction)bc_cursor, METH_O,
     "cursor(i) -> (state, pid, start, cursor) of receiver entry i"},
    {"recv", (PyCFunction)(void (*)(void))bc_recv, METH_FASTCALL,
     "recv(entry, timeout) -> object | (record,): the next message of receiver entry"},
    {"next", (PyCFunction)(void (*)(void))bc_next, METH_FASTCALL | METH_KEYWORDS,
     "next(timeout=None): the bound receiver's next object (Mailbox.recv in one call)"},
    {"bind", (PyCFunction)(void (*)(void))bc_bind, METH_FASTCALL,
     "bind(entry, fallback, general) | bind(-1, None, None): what next() reads"},
    {"take", (PyCFunction)(void (*)(void))bc_take, METH_FASTCALL,
     "take(entry, timeout, deferred=False) -> bytes: the next record of receiver entry "
     "(deferred: its cursor moves on commit())"},
    {"arm", (PyCFunction)bc_arm, METH_O,
     "arm(entry) -> bool: a message is there, else the next send writes the notify fd"},
    {"attach", (PyCFunction)bc_attach, METH_O, "attach(entry): take entry, from the head on"},
    {"entry", (PyCFunction)bc_entry_info, METH_O,
     "entry(i) -> (state, pid, reached, taken, dropped, depth)"},
    {"free_entry", (PyCFunction)bc_free_entry, METH_O, "free_entry(i): entry i is free"},
    {"retire", (PyCFunction)bc_retire, METH_VARARGS,
     "retire(reached, taken, dropped, lost): a departed receiver's counts join the totals"},
    {"info", (PyCFunction)bc_info, METH_NOARGS, "info() -> dict: head, sizes, totals, closed"},
    {"shutdown", (PyCFunction)bc_shutdown, METH_NOARGS,
     "shutdown(): receivers get EndOfChannel (sleepers woken)"},
    {"out_of_line", (PyCFunction)bc_out_of_line, METH_NOARGS,
     "out_of_line() -> list of the out-of-line records still in the slots"},
    {"close", (PyCFunction)bc_close, METH_NOARGS, "close(): unmap (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef bc_members[] = {
    {"notify_fd", T_INT, offsetof(Bcast, notify_fd), 0, "fd written when a waiter armed"},
    {"mark_fd", T_INT, offsetof(Bcast, mark_fd), 0, "fd whose times mark the last use"},
    {"next_id", T_ULONGLONG, offsetof(Bcast, next_id), 0, "the last message id drawn"},
    {"sent", T_ULONGLONG, offsetof(Bcast, sent), READONLY, "records written by this object"},
    {"received", T_ULONGLONG, offsetof(Bcast, received), READONLY, "records read"},
    {"dropped", T_ULONGLONG, offsetof(Bcast, dropped), READONLY,
     "messages this object's receiver lost to the overflow rule"},
    {"slots", T_UINT, offsetof(Bcast, nslots), READONLY, "slots in the ring"},
    {"limit", T_UINT, offsetof(Bcast, limit), READONLY, "the backlog, in messages"},
    {"payload", T_UINT, offsetof(Bcast, payload), READONLY, "the largest record"},
    {"title", T_OBJECT, offsetof(Bcast, title), 0, "what a timeout names, or None"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BcastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon._bcast.Bcast",
    .tp_basicsize = sizeof(Bcast),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)bc_traverse,
    .tp_clear = (inquiry)bc_clear,
    .tp_doc = "The shared broadcast ring of a broadcast mailbox (one mapping of its "
              "segment): Bcast(fd, create, slots, payload, encode, decode, fast_max, uid).",
    .tp_new = bc_new,
    .tp_dealloc = (destructor)bc_dealloc,
    .tp_methods = bc_methods,
    .tp_members = bc_members,
};

static struct PyModuleDef bcast_module = {
    PyModuleDef_HEAD_INIT, "buzon._bcast",
    "The shared broadcast ring of broadcast mailboxes (see _bcast.c).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__bcast(void)
{
    cached_pid = (uint32_t)getpid();
    if (pthread_atfork(NULL, NULL, atfork_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *errors = PyImport_ImportModule("buzon.errors");
    if (errors == NULL) {
        return NULL;
    }
    err_protocol = PyObject_GetAttrString(errors, "ProtocolError");
    err_empty = PyObject_GetAttrString(errors, "Empty");
    err_timeout = PyObject_GetAttrString(errors, "Timeout");
    err_end = PyObject_GetAttrString(errors, "EndOfChannel");
    err_closed = PyObject_GetAttrString(errors, "ChannelClosed");
    Py_DECREF(errors);
    if (!err_protocol || !err_empty || !err_timeout || !err_end || !err_closed) {
        return NULL;
    }
    if (PyType_Ready(&BcastType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&bcast_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Bcast", (PyObject *)&BcastType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER", HDR_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_RECEIVERS", MAX_RX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
