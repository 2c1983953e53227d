/*
 * buzon._core: rings of variable-length records in named shared-memory segments.
 *
 * Theory of operation (docs/shm.md has the byte tables and the crash-safety argument)
 * ---------------------------------------------------------------------------------
 * A segment is one POSIX shared-memory object: a 4 KiB header page followed by a data
 * area of CAPACITY bytes (a power of two). The data area is mapped twice, back to back,
 * so a record that runs past the end continues at the start without any wrap logic and
 * every access at (pos & mask) of up to CAPACITY bytes stays inside the mapping.
 *
 * Three 64-bit cursors only ever grow: tail <= rd <= head, head - tail <= LIMIT (the
 * capacity, or less for rings of fixed-size records: BoundedBuffer).
 *   head  end of the last *reserved* record (published under the reservation lock)
 *   rd    end of the last record a consumer *claimed*
 *   tail  end of the last record whose space was *freed*
 * Every record starts with a 16-byte header: a 64-bit state word (kind in the low byte,
 * the lap of its position in the next 24 bits, so no CAS can mistake a later lap's
 * record for it, and the token of the process that set it in the high 32 bits), the
 * payload length and the producer's flags. A producer takes the reservation lock (a futex word holding its
 * token), writes the header RESERVED, publishes head, drops the lock, copies the payload
 * outside the lock, then stores COMMITTED. A consumer claims the record at rd by CAS on
 * its state word (COMMITTED -> READING), anybody advances rd past a claimed record,
 * the claimer copies the payload out and stores FREE, and anybody advances tail over
 * FREE records, which makes the space available to producers again.
 *
 * Liveness. Each attached Ring object owns one participant slot: it holds an OFD write
 * lock (F_OFD_SETLK) on byte SLOT of its own open file description of the segment. The
 * kernel drops the lock when the process dies, however it dies. A token is
 * (generation << 8) | (slot + 1); a token is alive while its slot's generation is
 * unchanged and its lock is held. When a waiter finds a reservation lock held, a
 * RESERVED record or a READING record whose token is dead, it steals the lock, turns
 * the record ABANDONED, or frees it: a dead producer's half-written message is skipped
 * (never delivered) and a dead consumer's message is dropped (at most once).
 *
 * Trust. Another process writes this memory, so every value read from it (sizes,
 * cursors, lengths, kinds, slot numbers) is checked before it is used as an offset or a
 * length; a violation raises buzon.errors.ProtocolError, never an out-of-bounds access.
 *
 * Waiting: an adaptive spin (cpu_relax), then FUTEX_WAIT (shared, not private) on a
 * sequence word, in slices of at most 50 ms so a death is noticed without a wake-up.
 * Every operation first tries once with the GIL held; only if it must wait is the GIL
 * released, and also while copying payloads of 64 KiB or more. No PyObject is touched
 * with the GIL released; the core functions below take and return plain C.
 *
 * Also here: Loan (a record lent out for zero-copy filling or reading), and Block (a
 * plain data area with the same header page at its end, whose reservation lock serves
 * as a robust process-shared mutex: shared_array, shared_value, out-of-line messages).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x474e52204e5a5542ULL /* "BUZN RNG" little-endian */
#define BLOCK_MAGIC 0x4b4c42204e5a5542ULL /* "BUZN BLK" little-endian */
#define META_OFFSET 3072u /* Block: caller's metadata at [3072, 4096) of the header page */
#define META_SIZE (HEADER_SIZE - META_OFFSET)
#define VERSION 1u
#define HEADER_SIZE 4096u
#define MAX_SLOTS 128u
#define MIN_CAPACITY 4096ULL
#define MAX_CAPACITY (1ULL << 40)
#define REC_HDR 16u
#define SLICE_NS 50000000LL     /* longest single futex sleep: death detection bound */
#define LARGE_COPY 65536        /* copies at least this big release the GIL */
#define SPIN_MIN 0
#define SPIN_MAX 20000
#define SPIN_START 2000

enum kind { K_RESERVED = 1, K_COMMITTED = 2, K_READING = 3, K_FREE = 4, K_ABANDONED = 5 };

/* Result codes of the GIL-free core. */
enum rc { RC_OK = 0, RC_AGAIN = 1, RC_INTR = 2, RC_CORRUPT = 3, RC_CLOSED = 4, RC_GONE = 5 };
/* RC_CLOSED: shut down (by a peer); RC_GONE: this object is being closed by another thread */

typedef struct {
    _Atomic uint32_t pid;
    _Atomic uint32_t gen;
    uint32_t reserved[2];
} slot_t;

typedef struct {
    /* 0: identity, written once by the creator */
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t capacity;
    uint32_t nslots;
    _Atomic uint32_t flags_atomic; /* Block: 1 after the lock was taken from a dead holder */
    uint32_t creator_pid;
    uint32_t creator_uid;
    uint64_t created_ns;
    uint8_t pad0[64 - 48];
    /* 64 */ _Atomic uint64_t head;
    uint8_t pad1[56];
    /* 128 */ _Atomic uint64_t rd;
    uint8_t pad2[56];
    /* 192 */ _Atomic uint64_t tail;
    uint8_t pad3[56];
    /* 256 */ _Atomic uint32_t rlock;
    _Atomic uint32_t rlock_waiters;
    uint8_t pad4[56];
    /* 320 */ _Atomic uint32_t data_seq;
    _Atomic uint32_t data_waiters;
    _Atomic uint32_t data_armed;
    uint8_t pad5[52];
    /* 384 */ _Atomic uint32_t space_seq;
    _Atomic uint32_t space_waiters;
    _Atomic uint32_t space_armed;
    uint8_t pad6[52];
    /* 448 */ _Atomic uint32_t closed;
    uint32_t pad7;
    _Atomic uint64_t committed;
    _Atomic uint64_t consumed;
    _Atomic uint64_t abandoned;
    uint64_t limit;       /* bytes the ring may hold: capacity, or less (BoundedBuffer) */
    uint64_t record_size; /* 0: variable records; else every record takes exactly this */
    uint8_t pad8[16];
    /* 512 */ slot_t slots[MAX_SLOTS];
    /* 2560 */ char label[64]; /* what the ring is for (e.g. "shm:jobs a>b"), NUL-padded */
} header_t;

_Static_assert(sizeof(header_t) <= HEADER_SIZE, "header fits its page");
_Static_assert(offsetof(header_t, head) == 64, "layout");
_Static_assert(offsetof(header_t, rd) == 128, "layout");
_Static_assert(offsetof(header_t, tail) == 192, "layout");
_Static_assert(offsetof(header_t, rlock) == 256, "layout");
_Static_assert(offsetof(header_t, data_seq) == 320, "layout");
_Static_assert(offsetof(header_t, space_seq) == 384, "layout");
_Static_assert(offsetof(header_t, closed) == 448, "layout");
_Static_assert(offsetof(header_t, limit) == 480, "layout");
_Static_assert(offsetof(header_t, slots) == 512, "layout");
_Static_assert(offsetof(header_t, label) == 2560, "layout");

typedef struct {
    _Atomic uint64_t state; /* kind | token << 32 */
    uint32_t len;
    uint32_t flags; /* the producer's, opaque to the ring (shm: bit 0 = out of line) */
} rec_t;

/* ---- fault points (tests only): kill this process at step k ---------------- */

enum fault {
    F_LOCKED = 1,         /* holding the reservation lock */
    F_HEADER = 2,         /* record header written, head not yet published (lock held) */
    F_RESERVED = 3,       /* head published, lock still held */
    F_UNLOCKED = 4,       /* after reserve, lock released, nothing copied */
    F_MID_PAYLOAD = 5,    /* half the payload copied */
    F_BEFORE_COMMIT = 6,  /* payload complete, not committed */
    F_COMMITTED = 7,      /* committed, consumers not yet woken */
    F_CLAIMED = 8,        /* consumer: record claimed, rd maybe not advanced */
    F_COPIED = 9,         /* consumer: payload copied, record not freed */
    F_MAX = 9
};

static volatile int fault_point = 0;

static inline void
fault(int k)
{
    if (__builtin_expect(fault_point == k, 0)) {
        raise(SIGKILL);
    }
}

/* ---- fork: a child gets its own participant slot -------------------------- */

static _Atomic uint32_t fork_epoch = 0;

static void
after_fork_child(void)
{
    atomic_fetch_add(&fork_epoch, 1);
}

/* ---- the ring object -------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;               /* our own open file description; holds the slot lock */
    uint8_t *base;        /* header page + data + data again */
    size_t map_len;
    header_t *h;
    uint8_t *data;
    uint64_t cap, mask;
    unsigned shift;        /* log2(cap): a position's lap is pos >> shift */
    uint64_t limit, rsize; /* copied from the header once, after validation */
    uint32_t nslots;
    int slot;             /* -1 before a slot is taken */
    uint32_t token;
    uint32_t epoch;
    int spin;             /* adaptive spin budget (iterations) */
    int spin_enabled;
    int notify_data;      /* eventfd written when a consumer armed data_armed */
    int notify_space;
    PyObject *name;
    Py_ssize_t exports; /* live buffer views or loans: no unmapping under them */
    int busy;           /* operations that released the GIL and are not back yet */
    _Atomic int closing; /* close() was called while busy: the last one out unmaps */
    uint64_t counts[4];  /* frames sent, their bytes, frames received, their bytes (the
                            try_*_frame calls only; updated with the GIL held) */
    int frames_off;      /* stop_frames() was called: those calls take the general way */
    unsigned long lock_thread; /* Block: the thread that took the lock through us (GIL) */
} Ring;

static void ring_unmap(Ring *r);

static PyTypeObject LoanType;

static PyObject *ProtocolError, *TimeoutErr, *FullErr, *EmptyErr, *TooLarge, *ClosedErr,
    *EndErr;

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
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep on *addr while it equals val, at most ns. 0 woken/changed/timeout, RC_INTR. */
static int
futex_wait(_Atomic uint32_t *addr, uint32_t val, int64_t ns)
{
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, val, &ts, NULL, 0);
    if (r < 0 && errno == EINTR) {
        return RC_INTR;
    }
    return 0;
}

static void
futex_wake_n(_Atomic uint32_t *addr, int n)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

static void
futex_wake(_Atomic uint32_t *addr)
{
    futex_wake_n(addr, INT_MAX);
}

/* Wake a producer that waits for POLLOUT on the write end of a one-slot pipe: empty
 * the pipe (the producer fills it again before it waits). */
static void
drain(int fd)
{
    if (fd >= 0) {
        char buf[4096];
        while (read(fd, buf, sizeof buf) > 0) {
        }
    }
}

static void
notify(int fd)
{
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(fd, &one, sizeof one);
        (void)w; /* EAGAIN: the counter is already non-zero, which is all we need */
    }
}

/* ---- slots and liveness ------------------------------------------------------ */

static int
lock_byte(int fd, int cmd, short type, off_t start, off_t len, struct flock *out)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    int r = fcntl(fd, cmd, &fl);
    if (out) {
        *out = fl;
    }
    return r;
}

/* 1 if some open file description (not ours) holds a lock in [start, start+len). */
static int
lock_held(int fd, off_t start, off_t len)
{
    struct flock fl;
    if (lock_byte(fd, F_OFD_GETLK, F_WRLCK, start, len, &fl) < 0) {
        return 1; /* cannot tell: assume alive, never reclaim on doubt */
    }
    return fl.l_type != F_UNLCK;
}

static int
token_alive(Ring *r, uint32_t token)
{
    uint32_t slot = (token & 0xff);
    if (slot == 0 || slot > r->nslots) {
        return 0; /* no such participant: nobody can complete it */
    }
    slot -= 1;
    uint32_t gen = token >> 8;
    if ((atomic_load_explicit(&r->h->slots[slot].gen, memory_order_acquire) & 0xffffff) != gen) {
        return 0;
    }
    if ((int)slot == r->slot) {
        return token == r->token;
    }
    return lock_held(r->fd, (off_t)slot, 1);
}

/* Take a free participant slot for this open file description. 0, or -1 with errno. */
static int
take_slot(Ring *r)
{
    for (uint32_t i = 0; i < r->nslots; i++) {
        if (lock_byte(r->fd, F_OFD_SETLK, F_WRLCK, (off_t)i, 1, NULL) == 0) {
            uint32_t gen = (atomic_fetch_add(&r->h->slots[i].gen, 1) + 1) & 0xffffff;
            atomic_store(&r->h->slots[i].pid, (uint32_t)getpid());
            r->slot = (int)i;
            r->token = (gen << 8) | (i + 1);
            return 0;
        }
        if (errno != EAGAIN && errno != EACCES) {
            return -1;
        }
    }
    errno = EUSERS;
    return -1;
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

/* ---- the reservation lock ---------------------------------------------------- */

static int
rlock_acquire(Ring *r, int64_t deadline)
{
    header_t *h = r->h;
    for (int i = 0;; i++) {
        uint32_t exp = 0;
        if (atomic_compare_exchange_weak(&h->rlock, &exp, r->token)) {
            return RC_OK;
        }
        if (exp == 0) {
            continue;
        }
        if (i < 200) {
            cpu_relax();
            continue;
        }
        if (!token_alive(r, exp)) {
            /* the holder died inside the critical section; its effects are either
             * invisible (head not published) or a RESERVED record (skipped later) */
            if (atomic_compare_exchange_strong(&h->rlock, &exp, r->token)) {
                atomic_store(&h->flags_atomic, 1); /* for Block.lock(): it was abandoned */
                return RC_OK;
            }
            continue;
        }
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
            return RC_GONE;
        }
        int64_t left = SLICE_NS / 50; /* 1 ms: the lock is only held for a few stores */
        if (deadline >= 0) {
            int64_t rem = deadline - now_ns();
            if (rem <= 0) {
                /* we may have been the one woken: if the lock is free, wake another */
                if (atomic_load(&h->rlock) == 0 && atomic_load(&h->rlock_waiters)) {
                    futex_wake_n(&h->rlock, 1);
                }
                return RC_AGAIN;
            }
            if (rem < left) {
                left = rem;
            }
        }
        atomic_fetch_add(&h->rlock_waiters, 1);
        int rc = futex_wait(&h->rlock, exp, left);
        atomic_fetch_sub(&h->rlock_waiters, 1);
        if (rc == RC_INTR) {
            if (atomic_load(&h->rlock) == 0 && atomic_load(&h->rlock_waiters)) {
                futex_wake_n(&h->rlock, 1); /* pass on a wake we may have taken */
            }
            return RC_INTR;
        }
    }
}

static void
rlock_release(Ring *r)
{
    atomic_store_explicit(&r->h->rlock, 0, memory_order_release);
    if (atomic_load(&r->h->rlock_waiters)) {
        futex_wake_n(&r->h->rlock, 1); /* one can take it; see rlock_acquire's pass-on */
    }
}

/* ---- helpers on untrusted records ------------------------------------------- */

static inline uint64_t
rec_size(uint32_t len)
{
    return ((uint64_t)REC_HDR + len + 7) & ~7ULL;
}

/* Bytes a record of len payload bytes takes in this ring. */
static inline uint64_t
footprint(Ring *r, uint32_t len)
{
    return r->rsize ? r->rsize : rec_size(len);
}

/* Bits 8-31 of a state word: the lap of the record's position, so that a state read
 * for one lap can never be mistaken (by a CAS) for the record of a later lap at the
 * same offset. */
#define LAP_MASK 0xffffff00ULL
static inline uint64_t
lap_bits(Ring *r, uint64_t pos)
{
    return ((pos >> r->shift) & 0xffffffULL) << 8;
}

static inline uint64_t
with_kind(uint64_t st, unsigned kind)
{
    return (st & ~0xffULL) | kind;
}

static inline rec_t *
rec_at(Ring *r, uint64_t pos)
{
    return (rec_t *)(r->data + (pos & r->mask));
}

static void
wake_data(Ring *r)
{
    header_t *h = r->h;
    atomic_fetch_add(&h->data_seq, 1);
    if (atomic_load(&h->data_waiters)) {
        /* one record, one consumer: waking them all only puts the others back to
         * sleep (8 processes on 2 CPUs spent most of their time doing that). A
         * consumer that leaves without a record passes the wake on (pass_on_data). */
        futex_wake_n(&h->data_seq, 1);
    }
    if (atomic_load(&h->data_armed) && atomic_exchange(&h->data_armed, 0)) {
        notify(r->notify_data);
    }
}

static void
wake_space(Ring *r)
{
    header_t *h = r->h;
    atomic_fetch_add(&h->space_seq, 1);
    if (atomic_load(&h->space_waiters)) {
        futex_wake(&h->space_seq);
    }
    if (atomic_load(&h->space_armed) && atomic_exchange(&h->space_armed, 0)) {
        drain(r->notify_space);
    }
}

/* Move tail over freed (or abandoned) records; free READING records of dead readers.
 * Returns RC_OK or RC_CORRUPT. */
static int
advance_tail(Ring *r)
{
    header_t *h = r->h;
    int moved = 0;
    for (;;) {
        uint64_t t = atomic_load_explicit(&h->tail, memory_order_acquire);
        uint64_t d = atomic_load_explicit(&h->rd, memory_order_acquire);
        if (d == t) {
            break;
        }
        if (d - t > r->limit || ((d | t) & 7)) {
            if (atomic_load(&h->tail) != t) {
                continue;
            }
            return RC_CORRUPT;
        }
        rec_t *rec = rec_at(r, t);
        uint64_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t len = rec->len;
        uint64_t size = footprint(r, len);
        if (size > d - t || size < rec_size(len) || (st & LAP_MASK) != lap_bits(r, t)) {
            if (atomic_load(&h->tail) != t) {
                continue; /* reused under us: someone else moved tail */
            }
            return RC_CORRUPT;
        }
        unsigned kind = (unsigned)(st & 0xff);
        if (kind == K_READING) {
            if (token_alive(r, (uint32_t)(st >> 32))) {
                break;
            }
            /* the consumer died while copying: its message is dropped */
            if (atomic_compare_exchange_strong(&rec->state, &st, with_kind(st, K_FREE))) {
                atomic_fetch_add(&h->abandoned, 1);
            }
            continue;
        }
        if (kind != K_FREE && kind != K_ABANDONED) {
            if (atomic_load(&h->tail) != t) {
                continue;
            }
            if (kind == K_COMMITTED || kind == K_RESERVED) {
                break; /* rd moved past it only after a claim: a concurrent claimer */
            }
            return RC_CORRUPT;
        }
        if (atomic_compare_exchange_strong(&h->tail, &t, t + size)) {
            moved = 1;
        }
    }
    if (moved) {
        wake_space(r);
    }
    return RC_OK;
}

/* Move rd past records that carry no message (ABANDONED, or RESERVED by a dead
 * producer), so that a producer facing a full ring does not need a consumer to reclaim
 * their space. Returns RC_OK or RC_CORRUPT. */
static int
skip_dead(Ring *r)
{
    header_t *h = r->h;
    for (;;) {
        uint64_t d = atomic_load_explicit(&h->rd, memory_order_acquire);
        uint64_t hd = atomic_load_explicit(&h->head, memory_order_acquire);
        if (d == hd) {
            return RC_OK;
        }
        if (hd - d > r->limit || ((hd | d) & 7)) {
            return atomic_load(&h->rd) != d ? RC_OK : RC_CORRUPT;
        }
        rec_t *rec = rec_at(r, d);
        uint64_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
        uint32_t len = rec->len;
        uint64_t size = footprint(r, len);
        if (size > hd - d || size < rec_size(len) || (st & LAP_MASK) != lap_bits(r, d)) {
            return atomic_load(&h->rd) != d ? RC_OK : RC_CORRUPT;
        }
        unsigned kind = (unsigned)(st & 0xff);
        if (kind == K_RESERVED && !token_alive(r, (uint32_t)(st >> 32))) {
            if (atomic_compare_exchange_strong(&rec->state, &st, with_kind(st, K_ABANDONED))) {
                atomic_fetch_add(&h->abandoned, 1);
            }
            continue;
        }
        if (kind != K_ABANDONED) {
            return RC_OK;
        }
        uint64_t exp = d;
        atomic_compare_exchange_strong(&h->rd, &exp, d + size);
    }
}

/* Wait until *seq changes (or a slice passes). RC_OK, RC_AGAIN (deadline), RC_INTR. */
static int
wait_seq(Ring *r, _Atomic uint32_t *seq, _Atomic uint32_t *waiters, uint32_t seen,
         int64_t deadline)
{
    (void)r;
    int64_t left = SLICE_NS;
    if (deadline >= 0) {
        int64_t rem = deadline - now_ns();
        if (rem <= 0) {
            return RC_AGAIN;
        }
        if (rem < left) {
            left = rem;
        }
    }
    atomic_fetch_add(waiters, 1);
    int rc = RC_OK;
    if (atomic_load(seq) == seen) {
        rc = futex_wait(seq, seen, left);
    }
    atomic_fetch_sub(waiters, 1);
    return rc;
}

/* ---- the write path (no GIL) -------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t n;
} part_t;

/* Reserve a record for len bytes. deadline: -1 forever, 0 try once, else ns. */
static int
reserve(Ring *r, uint32_t len, uint32_t flags, int64_t deadline, rec_t **out)
{
    header_t *h = r->h;
    uint64_t need = footprint(r, len);
    for (;;) {
        int rc = rlock_acquire(r, deadline == 0 ? now_ns() + 2000000 : deadline);
        if (rc != RC_OK) {
            return rc;
        }
        fault(F_LOCKED);
        /* read before tail: a free that our tail read misses bumps it after this */
        uint32_t seen = atomic_load(&h->space_seq);
        uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
        uint64_t tail = atomic_load(&h->tail);
        if (head - tail > r->limit || ((head | tail) & 7)) {
            rlock_release(r);
            return RC_CORRUPT;
        }
        if (atomic_load(&h->closed)) {
            rlock_release(r);
            return RC_CLOSED;
        }
        if (head + need - tail <= r->limit) {
            rec_t *rec = rec_at(r, head);
            rec->len = len;
            rec->flags = flags;
            atomic_store_explicit(&rec->state,
                                  K_RESERVED | lap_bits(r, head) | ((uint64_t)r->token << 32),
                                  memory_order_relaxed);
            fault(F_HEADER);
            atomic_store_explicit(&h->head, head + need, memory_order_release);
            /* statistics, exact because the lock is held (no read-modify-write) */
            atomic_store_explicit(&h->committed,
                                  atomic_load_explicit(&h->committed, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
            fault(F_RESERVED);
            rlock_release(r);
            fault(F_UNLOCKED);
            *out = rec;
            return RC_OK;
        }
        rlock_release(r);
        /* full: maybe dead producers or consumers hold space */
        if (skip_dead(r) != RC_OK || advance_tail(r) != RC_OK) {
            return RC_CORRUPT;
        }
        if (atomic_load(&h->space_seq) != seen) {
            continue;
        }
        if (deadline == 0) {
            return RC_AGAIN;
        }
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
            return RC_GONE;
        }
        /* spin briefly for a consumer on the other CPU */
        int spun = 0;
        if (r->spin_enabled) {
            for (int i = 1; i <= r->spin; i++) {
                cpu_relax();
                if (atomic_load_explicit(&h->space_seq, memory_order_relaxed) != seen) {
                    spun = 1;
                    break;
                }
                if ((i & 63) == 0) {
                    sched_yield(); /* see claim */
                }
            }
        }
        if (spun) {
            continue;
        }
        rc = wait_seq(r, &h->space_seq, &h->space_waiters, seen, deadline);
        if (rc != RC_OK) {
            return rc;
        }
    }
}

static void
fill(rec_t *rec, const part_t *parts, int nparts, uint32_t len)
{
    uint8_t *dst = (uint8_t *)rec + REC_HDR;
    size_t half = len / 2, done = 0;
    int halfway = 0;
    for (int i = 0; i < nparts; i++) {
        const uint8_t *src = parts[i].p;
        size_t n = parts[i].n;
        if (!halfway && done + n > half && half > 0) {
            size_t a = half - done;
            memcpy(dst + done, src, a);
            fault(F_MID_PAYLOAD);
            halfway = 1;
            memcpy(dst + done + a, src + a, n - a);
        }
        else {
            memcpy(dst + done, src, n);
        }
        done += n;
    }
    if (!halfway) {
        fault(F_MID_PAYLOAD);
    }
}

static void
commit(Ring *r, rec_t *rec)
{
    fault(F_BEFORE_COMMIT);
    /* ours while RESERVED: nobody else writes it (we are alive) */
    uint64_t st = atomic_load_explicit(&rec->state, memory_order_relaxed);
    atomic_store_explicit(&rec->state, with_kind(st, K_COMMITTED), memory_order_release);
    fault(F_COMMITTED);
    wake_data(r);
}

/* ---- the read path (no GIL) ---------------------------------------------------- */

static int claim_impl(Ring *r, int64_t deadline, rec_t **out, uint32_t *lenp, int *spun_ok);

/* Claim the next committed record. RC_OK with *out and *lenp, RC_AGAIN (empty or deadline),
 * RC_CLOSED (empty and closed), RC_INTR, RC_CORRUPT.
 * A commit wakes one sleeping consumer (wake_data). One that leaves without a record (its
 * deadline, a signal, close) may have been that one: it passes the wake on. */
static int
claim(Ring *r, int64_t deadline, rec_t **out, uint32_t *lenp, int *spun_ok)
{
    int rc = claim_impl(r, deadline, out, lenp, spun_ok);
    if (rc != RC_OK && deadline != 0 && r->base != NULL) {
        header_t *h = r->h;
        if (atomic_load(&h->data_waiters) && atomic_load(&h->head) != atomic_load(&h->rd)) {
            futex_wake_n(&h->data_seq, 1);
        }
    }
    return rc;
}

static int
claim_impl(Ring *r, int64_t deadline, rec_t **out, uint32_t *lenp, int *spun_ok)
{
    header_t *h = r->h;
    int spins = 0;
    for (;;) {
        uint32_t seen = atomic_load(&h->data_seq);
        uint64_t d = atomic_load_explicit(&h->rd, memory_order_acquire);
        uint64_t hd = atomic_load_explicit(&h->head, memory_order_acquire);
        int blocked = 0;
        if (hd - d > r->limit || ((hd | d) & 7)) {
            if (atomic_load(&h->rd) != d) {
                continue;
            }
            return RC_CORRUPT;
        }
        if (d == hd) {
            if (atomic_load(&h->closed)) {
                return RC_CLOSED;
            }
            blocked = 1;
        }
        else {
            rec_t *rec = rec_at(r, d);
            uint64_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
            uint32_t len = rec->len;
            uint64_t size = footprint(r, len);
            unsigned kind = (unsigned)(st & 0xff);
            if (size > hd - d || size < rec_size(len) || (st & LAP_MASK) != lap_bits(r, d)) {
                if (atomic_load(&h->rd) != d) {
                    continue; /* we looked at a later lap's record: rd moved meanwhile */
                }
                return RC_CORRUPT;
            }
            if (kind == K_COMMITTED) {
                uint64_t want = K_READING | (st & LAP_MASK) | ((uint64_t)r->token << 32);
                if (atomic_compare_exchange_strong(&rec->state, &st, want)) {
                    fault(F_CLAIMED);
                    uint64_t exp = d;
                    atomic_compare_exchange_strong(&h->rd, &exp, d + size);
                    *out = rec;
                    *lenp = len;
                    *spun_ok = spins > 0;
                    return RC_OK;
                }
                continue;
            }
            if (kind == K_READING || kind == K_ABANDONED || kind == K_FREE) {
                /* claimed (or skipped) but rd not moved yet: help */
                uint64_t exp = d;
                atomic_compare_exchange_strong(&h->rd, &exp, d + size);
                if (kind != K_READING) {
                    if (advance_tail(r) != RC_OK) {
                        return RC_CORRUPT;
                    }
                }
                continue;
            }
            if (kind == K_RESERVED) {
                if (!token_alive(r, (uint32_t)(st >> 32))) {
                    /* the producer died before committing: skip its record */
                    if (atomic_compare_exchange_strong(&rec->state, &st,
                                                       with_kind(st, K_ABANDONED))) {
                        atomic_fetch_add(&h->abandoned, 1);
                    }
                    continue;
                }
                blocked = 1;
            }
            else {
                if (atomic_load(&h->rd) != d) {
                    continue;
                }
                return RC_CORRUPT;
            }
        }
        (void)blocked;
        if (deadline == 0) {
            return RC_AGAIN;
        }
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
            return RC_GONE;
        }
        if (r->spin_enabled && spins < r->spin) {
            int i = 0;
            for (; i < 64 && atomic_load_explicit(&h->data_seq, memory_order_relaxed) == seen;
                 i++) {
                cpu_relax();
            }
            if (i == 64) {
                /* with more processes than CPUs (4 producers and 4 consumers on 2), the
                 * one we wait for may be waiting for our CPU: offer it, every 64 pauses
                 * (a no-op when nothing else is runnable). Measured: 4p4c 0.8-1.4M ->
                 * 1.6-1.8M msg/s, `buzon bench --only 4p4c` */
                sched_yield();
            }
            spins += i + 1;
            continue;
        }
        int rc = wait_seq(r, &h->data_seq, &h->data_waiters, seen, deadline);
        if (rc != RC_OK) {
            return rc;
        }
        if (deadline > 0 && now_ns() >= deadline) {
            /* one last look before giving up */
            deadline = 0;
        }
    }
}

static int
release_rec(Ring *r, rec_t *rec)
{
    fault(F_COPIED);
    /* ours while READING (we are alive): keep the lap, mark it free */
    uint64_t st = atomic_load_explicit(&rec->state, memory_order_relaxed);
    atomic_store_explicit(&rec->state, with_kind(st, K_FREE), memory_order_release);
    atomic_fetch_add_explicit(&r->h->consumed, 1, memory_order_relaxed);
    return advance_tail(r);
}

/* ---- Python glue ------------------------------------------------------------- */

static int
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

static int
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
static int
timeout_only(Ring *r, PyObject *args, PyObject *kw, const char *format, int64_t *deadline)
{
    static char *kwlist[] = {"timeout", NULL};
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, format, kwlist, &timeout) || check_open(r) < 0) {
        return -1;
    }
    return deadline_from(timeout, deadline);
}

static void
leave(Ring *r)
{
    if (--r->busy == 0 && atomic_load(&r->closing)) {
        ring_unmap(r);
    }
}

/* Close now, or (another thread is inside an operation) mark closing, wake our own
 * sleepers, and let the last operation out unmap. */
static void
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

static PyObject *
corrupt(Ring *r)
{
    PyErr_Format(ProtocolError,
                 "shared-memory segment %S is corrupt (a cursor or record header is out of "
                 "range); it was written by something other than buzon",
                 r->name);
    return NULL;
}

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

/* Send parts (with the GIL held on entry and exit). 1 sent, 0 would block (only
 * when deadline == 0), -1 error. */
static int
send_parts(Ring *r, part_t *parts, int nparts, size_t total, uint32_t flags, int64_t deadline)
{
    uint64_t most = (r->rsize ? r->rsize : r->limit) - REC_HDR;
    if (total > most || total > UINT32_MAX - 16) {
        PyErr_Format(TooLarge,
                     "a message of %zu bytes does not fit the ring of %S (at most %llu "
                     "bytes); create it with a larger capacity",
                     total, r->name, (unsigned long long)most);
        return -1;
    }
    uint32_t len = (uint32_t)total;
    rec_t *rec = NULL;
    int rc;
    /* one attempt with the GIL held: releasing it costs more than a send */
    rc = reserve(r, len, flags, 0, &rec);
    while (rc == RC_AGAIN && deadline != 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = reserve(r, len, flags, deadline, &rec);
        Py_END_ALLOW_THREADS
        if (rc == RC_INTR) {
            if (PyErr_CheckSignals() < 0) {
                return -1;
            }
            rc = RC_AGAIN;
        }
        else {
            break;
        }
    }
    if (rc == RC_AGAIN) {
        if (deadline == 0) {
            return 0;
        }
        PyErr_Format(TimeoutErr, "sending to %S timed out (the ring is full)", r->name);
        return -1;
    }
    if (rc == RC_CLOSED) {
        PyErr_Format(EndErr, "the ring %S was shut down", r->name);
        return -1;
    }
    if (rc == RC_GONE) {
        PyErr_Format(ClosedErr, "the ring %S was closed while sending", r->name);
        return -1;
    }
    if (rc == RC_CORRUPT) {
        corrupt(r);
        return -1;
    }
    if (total >= LARGE_COPY) {
        Py_BEGIN_ALLOW_THREADS
        fill(rec, parts, nparts, len);
        commit(r, rec);
        Py_END_ALLOW_THREADS
    }
    else {
        fill(rec, parts, nparts, len);
        commit(r, rec);
    }
    return 1;
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
        PyErr_Format(FullErr, "the ring %S is full", r->name);
        return NULL;
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
    rec_t *rec = NULL;
    uint32_t len = 0;
    int rc, spun_ok = 0;
    /* one attempt with the GIL held: releasing it costs more than a receive */
    rc = claim(r, 0, &rec, &len, &spun_ok);
    if (rc == RC_AGAIN && deadline != 0) {
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            rc = claim(r, deadline, &rec, &len, &spun_ok);
            Py_END_ALLOW_THREADS
            if (rc != RC_INTR) {
                break;
            }
            if (PyErr_CheckSignals() < 0) {
                return NULL;
            }
        }
        adapt_spin(r, spun_ok || rc == RC_OK);
    }
    switch (rc) {
    case RC_OK:
        break;
    case RC_AGAIN:
        if (mode == 0) {
            Py_RETURN_NONE;
        }
        if (mode == 1) {
            PyErr_Format(EmptyErr, "the ring %S is empty", r->name);
        }
        else {
            PyErr_Format(TimeoutErr, "receiving from %S timed out", r->name);
        }
        return NULL;
    case RC_CLOSED:
        PyErr_Format(EndErr, "the ring %S was closed by its writer and is empty", r->name);
        return NULL;
    case RC_GONE:
        PyErr_Format(ClosedErr, "the ring %S was closed while receiving", r->name);
        return NULL;
    default:
        return corrupt(r);
    }
    uint32_t flags = rec->flags;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (out != NULL) {
        const uint8_t *src = (const uint8_t *)rec + REC_HDR;
        if (len >= LARGE_COPY) {
            Py_BEGIN_ALLOW_THREADS
            memcpy(PyBytes_AS_STRING(out), src, len);
            Py_END_ALLOW_THREADS
        }
        else {
            memcpy(PyBytes_AS_STRING(out), src, len);
        }
    }
    if (release_rec(r, rec) != RC_OK) {
        Py_XDECREF(out);
        return corrupt(r);
    }
    if (want_flags && out != NULL) {
        return Py_BuildValue("(NI)", out, flags);
    }
    return out;
}

static void
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

static void
ring_dealloc(Ring *r)
{
    ring_unmap(r);
    Py_XDECREF(r->name);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Map the header page and the data area twice. 0 or -1 with errno. */
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

static Ring *
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
    r->fd = shm_open(cname, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (r->fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    /* take slot 0 before the segment has a size: `buzon clean` sees it alive at once */
    r->nslots = nslots;
    if (lock_byte(r->fd, F_OFD_SETLK, F_WRLCK, 0, 1, NULL) < 0 ||
        fchmod(r->fd, 0600) < 0 ||
        ftruncate(r->fd, (off_t)(HEADER_SIZE + cap)) < 0 || map_ring(r, cap) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        shm_unlink(cname);
        Py_DECREF(r);
        return NULL;
    }
    header_t *h = r->h;
    h->version = VERSION;
    h->header_size = HEADER_SIZE;
    h->capacity = cap;
    h->nslots = nslots;
    h->creator_pid = (uint32_t)getpid();
    h->creator_uid = (uint32_t)getuid();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->created_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    memcpy(h->label, label, (size_t)label_len);
    h->limit = limit;
    h->record_size = rsize;
    r->limit = limit;
    r->rsize = rsize;
    atomic_store(&h->slots[0].gen, 1);
    atomic_store(&h->slots[0].pid, (uint32_t)getpid());
    r->slot = 0;
    r->token = (1u << 8) | 1u;
    atomic_thread_fence(memory_order_release);
    __atomic_store_n(&h->magic, MAGIC, __ATOMIC_RELEASE); /* valid from now on */
    return (PyObject *)r;
}

/* Validate a header copy. NULL if fine, else the reason. */
static const char *
validate(const header_t *h, uint64_t file_size)
{
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != MAGIC) {
        return "bad magic (not a buzon ring, or not initialised yet)";
    }
    if (h->version != VERSION) {
        return "unknown version";
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

/* Open an existing segment and check it before mapping it fully. */
static int
open_checked(const char *cname, PyObject *name, int flags, uint64_t *cap_out, header_t *copy)
{
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
        PyErr_Format(PyExc_PermissionError,
                     "segment %S belongs to uid %u with mode %o; buzon attaches only its own "
                     "user's segments with mode 0600",
                     name, (unsigned)st.st_uid, (unsigned)(st.st_mode & 0777));
        close(fd);
        return -1;
    }
    if ((uint64_t)st.st_size < HEADER_SIZE) {
        PyErr_Format(ProtocolError, "segment %S is too small to be a buzon ring", name);
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, HEADER_SIZE, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        close(fd);
        return -1;
    }
    memcpy(copy, p, sizeof *copy);
    const char *why = validate((const header_t *)p, (uint64_t)st.st_size);
    munmap(p, HEADER_SIZE);
    if (why != NULL) {
        PyErr_Format(ProtocolError, "segment %S is not a valid buzon ring: %s", name, why);
        close(fd);
        return -1;
    }
    *cap_out = copy->capacity;
    return fd;
}

static PyObject *
ring_attach(PyTypeObject *type, PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:attach", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    if (strncmp(cname, "/proc/", 6) == 0) {
        PyErr_SetString(PyExc_ValueError, "attach takes a segment name (inspect takes more)");
        return NULL;
    }
    header_t copy;
    uint64_t cap;
    int fd = open_checked(cname, name, O_RDWR, &cap, &copy);
    if (fd < 0) {
        return NULL;
    }
    Ring *r = ring_new(type, name);
    if (r == NULL) {
        close(fd);
        return NULL;
    }
    r->fd = fd;
    r->nslots = copy.nslots;
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
    if (take_slot(r) < 0) {
        if (errno == EUSERS) {
            PyErr_Format(PyExc_OSError, "segment %S: all %u participant slots are in use", name,
                         r->nslots);
        }
        else {
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        }
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

/* ---- the channel's hot path: buzon DATA frames (transport/shm.py) -----------------
 *
 * A shm: channel puts one buzon frame in each record (docs/frames.md). The common one,
 * a DATA frame with no out-of-band buffers, is an 8-byte header (version 1, kind 1,
 * flags = codec, 0 buffers, u32 LE body length) and the body. These two methods build
 * and take that frame in one call, so the channel's small send or receive costs one C
 * call instead of a chain of Python ones. Anything else goes through the general path.
 */

/* One frame (codec -1: item is a whole frame already). 1 sent, 0 no room now (or larger
 * than the ring: the channel's general path sends it out of line), -1 error. */
static int
send_frame(Ring *r, PyObject *item, long codec)
{
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    int whole = codec < 0;
    uint64_t most = (r->rsize ? r->rsize : r->limit) - REC_HDR;
    uint64_t total = (whole ? 0 : 8) + (uint64_t)view.len;
    int rc = 0;
    if (total <= most && !r->frames_off) {
        uint32_t n = (uint32_t)view.len;
        uint8_t hdr[8] = {1, 1, (uint8_t)codec, 0, (uint8_t)n, (uint8_t)(n >> 8),
                          (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
        part_t parts[2] = {{hdr, 8}, {view.buf, (size_t)view.len}};
        /* counted before send_parts may release the GIL (to copy a large payload), so
         * whoever reads the counts (a channel starting receipts) sees every frame that
         * went this way; uncounted again if it did not go */
        r->counts[0] += 1;
        r->counts[1] += total;
        rc = send_parts(r, parts + whole, 2 - whole, (size_t)total, 0, 0);
        if (rc <= 0) {
            r->counts[0] -= 1;
            r->counts[1] -= total;
        }
    }
    PyBuffer_Release(&view);
    return rc;
}

static long
frame_codec(PyObject *arg)
{
    long codec = PyLong_AsLong(arg);
    if (codec == -1 && PyErr_Occurred()) {
        return -2;
    }
    if (codec < -1 || codec > 255) {
        PyErr_SetString(PyExc_ValueError, "codec must fit a byte (or be -1: a whole frame)");
        return -2;
    }
    return codec;
}

static PyObject *
ring_try_send_frame(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    /* try_send_frame(body, codec) -> bool: header + body as one record; False if there
     * is no room now or it is larger than the ring */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "try_send_frame(body, codec)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    if (codec == -2 || check_open(r) < 0) {
        return NULL;
    }
    r->busy++;
    int rc = send_frame(r, args[0], codec);
    leave(r);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *
ring_try_send_frames(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    /* try_send_frames(bodies, codec, start) -> int: send_frame for bodies[start:] of a
     * list or tuple, in order, until one does not go (no room, larger than the ring, or
     * not a buffer: the caller sends it the general way); the index reached */
    if (nargs != 3 || !(PyList_Check(args[0]) || PyTuple_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "try_send_frames(list or tuple of bodies, codec, start)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    Py_ssize_t i = PyLong_AsSsize_t(args[2]);
    if (codec == -2 || (i == -1 && PyErr_Occurred()) || check_open(r) < 0) {
        return NULL;
    }
    PyObject *seq = args[0];
    int rc = 1;
    r->busy++;
    for (i = i < 0 ? 0 : i; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        rc = PyObject_CheckBuffer(item) ? send_frame(r, item, codec) : 0;
        if (rc <= 0) {
            break;
        }
    }
    leave(r);
    return rc < 0 ? NULL : PyLong_FromSsize_t(i);
}

static PyObject *
ring_try_recv_frame_impl(Ring *r, Py_ssize_t max_frame)
{
    rec_t *rec = NULL;
    uint32_t len = 0;
    int spun_ok = 0;
    int rc = claim(r, 0, &rec, &len, &spun_ok);
    if (rc == RC_AGAIN) {
        Py_RETURN_NONE;
    }
    if (rc == RC_CLOSED) {
        PyErr_Format(EndErr, "the ring %S was closed by its writer and is empty", r->name);
        return NULL;
    }
    if (rc != RC_OK) {
        return corrupt(r);
    }
    uint32_t flags = rec->flags;
    const uint8_t *src = (const uint8_t *)rec + REC_HDR;
    uint8_t hdr[8] = {0};
    if (len >= 8) {
        memcpy(hdr, src, 8); /* once: the peer may be rewriting it (untrusted memory) */
    }
    uint32_t blen = (uint32_t)hdr[4] | (uint32_t)hdr[5] << 8 | (uint32_t)hdr[6] << 16 |
                    (uint32_t)hdr[7] << 24;
    int plain = flags == 0 && len >= 8 && hdr[0] == 1 && hdr[1] == 1 && hdr[2] <= 7 &&
                hdr[3] == 0 && (uint64_t)blen + 8 == len && (Py_ssize_t)len <= max_frame &&
                !r->frames_off;
    uint32_t skip = plain ? 8 : 0;
    if (plain) { /* counted before the copy may release the GIL (see send_frame) */
        r->counts[2] += 1;
        r->counts[3] += len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(len - skip));
    if (out != NULL) {
        if (len >= LARGE_COPY) {
            Py_BEGIN_ALLOW_THREADS
            memcpy(PyBytes_AS_STRING(out), src + skip, len - skip);
            Py_END_ALLOW_THREADS
        }
        else {
            memcpy(PyBytes_AS_STRING(out), src + skip, len - skip);
        }
    }
    if (release_rec(r, rec) != RC_OK) {
        Py_XDECREF(out);
        return corrupt(r);
    }
    if (out == NULL) {
        return NULL; /* the message is lost, as for any receive that fails to allocate */
    }
    PyObject *code = PyLong_FromLong(plain ? (long)hdr[2] : -1L - (long)flags);
    PyObject *pair = code == NULL ? NULL : PyTuple_New(2);
    if (pair == NULL) {
        Py_XDECREF(code);
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, code);
    PyTuple_SET_ITEM(pair, 1, out);
    return pair;
}

static PyObject *
ring_try_recv_frame(Ring *r, PyObject *arg)
{
    /* try_recv_frame(max_frame): None if empty; (codec, body) for a plain DATA frame of
     * at most max_frame bytes; else (-1 - record flags, record) for the general path */
    Py_ssize_t max_frame = PyLong_AsSsize_t(arg);
    if (max_frame == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (check_open(r) < 0) {
        return NULL;
    }
    r->busy++;
    PyObject *res = ring_try_recv_frame_impl(r, max_frame);
    leave(r);
    return res;
}

static PyObject *
ring_stop_frames(Ring *r, PyObject *Py_UNUSED(a))
{
    r->frames_off = 1;
    Py_RETURN_NONE;
}

static PyObject *
ring_frame_counts(Ring *r, PyObject *Py_UNUSED(a))
{
    return Py_BuildValue("(KKKK)", (unsigned long long)r->counts[0],
                         (unsigned long long)r->counts[1], (unsigned long long)r->counts[2],
                         (unsigned long long)r->counts[3]);
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


/* ---- loans: memory lent out (zero-copy writes and reads) -----------------------
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

/* Lend [ptr, ptr + len) of owner through the buffer protocol, counting the export
 * (whoever finishes or unmaps refuses while exports are out). */
static int
lend_buffer(PyObject *owner, Py_buffer *view, uint8_t *ptr, uint64_t len, int readonly,
            int flags, Py_ssize_t *exports)
{
    if (PyBuffer_FillInfo(view, owner, ptr, (Py_ssize_t)len, readonly, flags) < 0) {
        return -1;
    }
    *exports += 1;
    return 0;
}

enum { LENT_WRITE, LENT_READ, LENT_BLOCK, LENT_BLOCK_READ };

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

static PyObject *
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

static PyTypeObject LoanType = {
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

/* A method that may release the GIL: count the operation so that close() from
 * another thread defers the unmapping until it is back. NAME_impl does the work. */
#define BUSY_METHOD(NAME)                                                    \
    static PyObject *NAME##_impl(Ring *r, PyObject *args, PyObject *kw);     \
    static PyObject *NAME(Ring *r, PyObject *args, PyObject *kw)             \
    {                                                                        \
        r->busy++;                                                           \
        PyObject *res = NAME##_impl(r, args, kw);                            \
        leave(r);                                                            \
        return res;                                                          \
    }

BUSY_METHOD(ring_reserve)

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
    rec_t *rec = NULL;
    int rc;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = reserve(r, (uint32_t)n, flags, deadline, &rec);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    switch (rc) {
    case RC_OK:
        return loan_new(r, rec, (uint8_t *)rec + REC_HDR, (uint32_t)n, LENT_WRITE);
    case RC_AGAIN:
        PyErr_Format(deadline == 0 ? FullErr : TimeoutErr, "no room in the ring %S", r->name);
        return NULL;
    case RC_CLOSED:
        PyErr_Format(EndErr, "the ring %S was shut down", r->name);
        return NULL;
    case RC_GONE:
        PyErr_Format(ClosedErr, "the ring %S was closed while reserving", r->name);
        return NULL;
    default:
        return corrupt(r);
    }
}

BUSY_METHOD(ring_recv_view)

static PyObject *
ring_recv_view_impl(Ring *r, PyObject *args, PyObject *kw)
{
    int64_t deadline;
    if (timeout_only(r, args, kw, "|O:recv_view", &deadline) < 0) {
        return NULL;
    }
    rec_t *rec = NULL;
    uint32_t len = 0;
    int rc, spun = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        rc = claim(r, deadline, &rec, &len, &spun);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    switch (rc) {
    case RC_OK:
        return loan_new(r, rec, (uint8_t *)rec + REC_HDR, len, LENT_READ);
    case RC_AGAIN:
        PyErr_Format(deadline == 0 ? EmptyErr : TimeoutErr, "nothing to receive from %S",
                     r->name);
        return NULL;
    case RC_CLOSED:
        PyErr_Format(EndErr, "the ring %S was closed by its writer and is empty", r->name);
        return NULL;
    case RC_GONE:
        PyErr_Format(ClosedErr, "the ring %S was closed while receiving", r->name);
        return NULL;
    default:
        return corrupt(r);
    }
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

static PyObject *
participants(Ring *r, int fd, const header_t *h, uint32_t nslots, int my_slot)
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
    (void)r;
    return list;
}

static PyObject *
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

static PyObject *
ring_info(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open(r) < 0) {
        return NULL;
    }
    PyObject *parts = participants(r, r->fd, r->h, r->nslots, r->slot);
    if (parts == NULL) {
        return NULL;
    }
    return info_dict(r->h, parts);
}

static PyObject *
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

static PyObject *
ring_get_name(Ring *r, void *Py_UNUSED(c))
{
    Py_INCREF(r->name);
    return r->name;
}

static PyObject *
ring_get_closed(Ring *r, void *Py_UNUSED(c))
{
    return PyBool_FromLong(r->base == NULL || atomic_load(&r->closing));
}

static PyObject *
ring_get_slot(Ring *r, void *Py_UNUSED(c))
{
    return PyLong_FromLong(r->slot);
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
    {"try_send_frame", (PyCFunction)(void (*)(void))ring_try_send_frame, METH_FASTCALL,
     "try_send_frame(body, codec): a buzon DATA frame in one record; False if full."},
    {"try_send_frames", (PyCFunction)(void (*)(void))ring_try_send_frames, METH_FASTCALL,
     "try_send_frames(bodies, codec, start): try_send_frame each from start; the index "
     "of the first that did not go."},
    {"try_recv_frame", (PyCFunction)ring_try_recv_frame, METH_O,
     "try_recv_frame(max_frame): None, (codec, body) of a plain DATA frame, or "
     "(-1 - record flags, record) for anything else."},
    {"stop_frames", (PyCFunction)ring_stop_frames, METH_NOARGS,
     "from now on try_send_frame(s) send nothing and try_recv_frame returns every record "
     "whole: a channel that starts numbering its messages (receipts) counts them all."},
    {"frame_counts", (PyCFunction)ring_frame_counts, METH_NOARGS,
     "(frames sent, bytes, frames received, bytes) by try_send_frame/try_recv_frame."},
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
    {"__enter__", (PyCFunction)ring_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)ring_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"capacity", (getter)ring_get_capacity, NULL, "data bytes", NULL},
    {"max_message", (getter)ring_get_max_message, NULL, "largest payload", NULL},
    {"name", (getter)ring_get_name, NULL, "segment name", NULL},
    {"closed", (getter)ring_get_closed, NULL, "closed by this process", NULL},
    {"slot", (getter)ring_get_slot, NULL, "our participant slot", NULL},
    {"used", (getter)ring_get_used, NULL, "bytes between tail and head", NULL},
    {"spin", (getter)ring_get_spin, (setter)ring_set_spin, "spin before sleeping", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon._core.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A multi-producer multi-consumer ring of variable-length records in a "
              "shared-memory segment. Make one with Ring.create or Ring.attach.",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
};


/* ---- blocks: a plain data area plus a trailing header page ---------------------
 *
 * [data: size bytes, rounded up to the page size][header page]. The data starts at
 * offset 0 so that multiprocessing.shared_memory.SharedMemory(name).buf[:size] is the
 * data. The header page has the ring header's layout (magic "BUZN BLK", capacity =
 * size, the participant slots) and the reservation lock word serves as a robust
 * process-shared mutex: a holder that dies is detected through its slot's OFD lock and
 * the lock is taken over. [3072, 4096) of the page holds the caller's metadata.
 */

static uint64_t
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
    r->fd = shm_open(cname, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (r->fd < 0) {
        PyBuffer_Release(&meta);
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    r->nslots = nslots;
    if (lock_byte(r->fd, F_OFD_SETLK, F_WRLCK, 0, 1, NULL) < 0 || fchmod(r->fd, 0600) < 0 ||
        ftruncate(r->fd, (off_t)(page_round(size ? size : 1) + HEADER_SIZE)) < 0 ||
        map_block(r, size) < 0) {
        PyBuffer_Release(&meta);
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        shm_unlink(cname);
        Py_DECREF(r);
        return NULL;
    }
    header_t *h = r->h;
    h->version = VERSION;
    h->header_size = HEADER_SIZE;
    h->capacity = size;
    h->nslots = nslots;
    h->creator_pid = (uint32_t)getpid();
    h->creator_uid = (uint32_t)getuid();
    memcpy((uint8_t *)h + META_OFFSET, meta.buf, (size_t)meta.len);
    PyBuffer_Release(&meta);
    atomic_store(&h->slots[0].gen, 1);
    atomic_store(&h->slots[0].pid, (uint32_t)getpid());
    r->slot = 0;
    r->token = (1u << 8) | 1u;
    __atomic_store_n(&h->magic, BLOCK_MAGIC, __ATOMIC_RELEASE);
    return (PyObject *)r;
}

static PyObject *
block_attach(PyTypeObject *type, PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:attach", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    int fd = shm_open(cname, O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0);
    if (fd < 0) {
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_uid != geteuid() || (st.st_mode & 077) ||
        (uint64_t)st.st_size < HEADER_SIZE + 4096) {
        close(fd);
        PyErr_Format(PyExc_PermissionError,
                     "segment %S is not a block of this user with mode 0600", name);
        return NULL;
    }
    uint64_t data = (uint64_t)st.st_size - HEADER_SIZE;
    header_t copy;
    if (pread(fd, &copy, sizeof copy, (off_t)data) != (ssize_t)sizeof copy) {
        close(fd);
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    }
    const char *why = validate_block(&copy, data);
    if (why != NULL) {
        close(fd);
        PyErr_Format(ProtocolError, "segment %S is not a valid buzon block: %s", name, why);
        return NULL;
    }
    Ring *r = ring_new(type, name);
    if (r == NULL) {
        close(fd);
        return NULL;
    }
    r->fd = fd;
    r->nslots = copy.nslots;
    if (map_block(r, copy.capacity) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    if (take_slot(r) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
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
    int rc;
    uint32_t before;
    for (;;) {
        before = atomic_load(&r->h->rlock);
        Py_BEGIN_ALLOW_THREADS
        rc = rlock_acquire(r, deadline == 0 ? now_ns() : deadline);
        Py_END_ALLOW_THREADS
        if (rc != RC_INTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    if (rc == RC_AGAIN) {
        PyErr_Format(TimeoutErr, "the lock of %S is held by another process or thread",
                     r->name);
        return NULL;
    }
    if (rc == RC_GONE) {
        PyErr_Format(ClosedErr, "%S was closed while waiting for its lock", r->name);
        return NULL;
    }
    r->lock_thread = me;
    /* taken over from a dead holder: flag it so the caller can repair the data */
    int recovered = atomic_exchange(&r->h->flags_atomic, 0) != 0;
    (void)before;
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

static PyTypeObject BlockType = {
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

/* ---- module functions ------------------------------------------------------- */

static PyObject *
mod_inspect(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:inspect", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    header_t copy;
    uint64_t cap;
    int fd = open_checked(cname, name, O_RDONLY, &cap, &copy);
    if (fd < 0) {
        /* not a ring: maybe a block (header page last) */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        fd = shm_open(cname, O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0 || st.st_uid != geteuid() ||
            (uint64_t)st.st_size < HEADER_SIZE + 4096 ||
            pread(fd, &copy, sizeof copy, st.st_size - HEADER_SIZE) != (ssize_t)sizeof copy ||
            validate_block(&copy, (uint64_t)st.st_size - HEADER_SIZE) != NULL) {
            if (fd >= 0) {
                close(fd);
            }
            PyErr_Restore(et, ev, tb);
            return NULL;
        }
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        memcpy(copy.label, "block", 6);
        copy.limit = copy.capacity;
    }
    PyObject *parts = participants(NULL, fd, &copy, copy.nslots, -1);
    close(fd);
    if (parts == NULL) {
        return NULL;
    }
    return info_dict(&copy, parts);
}

static PyObject *
mod_in_use(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* in_use(fd): True if any open file description holds a participant lock */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    return PyBool_FromLong(lock_held(fd, 0, MAX_SLOTS));
}

static PyObject *
mod_hold(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* hold(fd): take participant lock 0 on fd (segments that are not rings) */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    if (lock_byte(fd, F_OFD_SETLK, F_WRLCK, 0, 1, NULL) < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_claim_all(PyObject *Py_UNUSED(m), PyObject *arg)
{
    /* claim_all(fd): lock every participant byte; True if nobody held any (then no one
     * can attach until fd is closed), False if somebody is alive */
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    if (lock_byte(fd, F_OFD_SETLK, F_WRLCK, 0, MAX_SLOTS, NULL) < 0) {
        if (errno == EAGAIN || errno == EACCES) {
            Py_RETURN_FALSE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

static PyObject *
mod_unlink(PyObject *Py_UNUSED(m), PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:unlink", &name)) {
        return NULL;
    }
    const char *cname = PyUnicode_AsUTF8(name);
    if (cname == NULL) {
        return NULL;
    }
    if (shm_unlink(cname) < 0) {
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
    }
    Py_RETURN_NONE;
}

static PyObject *
mod_fault(PyObject *Py_UNUSED(m), PyObject *arg)
{
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (k < 0 || k > F_MAX) {
        PyErr_Format(PyExc_ValueError, "fault point must be 0..%d", F_MAX);
        return NULL;
    }
    fault_point = (int)k;
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"inspect", mod_inspect, METH_VARARGS,
     "inspect(name): a validated copy of a ring's header, without attaching."},
    {"in_use", mod_in_use, METH_O, "in_use(fd): is any participant lock held?"},
    {"hold", mod_hold, METH_O, "hold(fd): take participant lock 0 through fd."},
    {"unlink", mod_unlink, METH_VARARGS, "unlink(name): shm_unlink."},
    {"claim_all", mod_claim_all, METH_O,
     "claim_all(fd): lock all participant slots; False if any is held by someone."},
    {"_set_fault", mod_fault, METH_O,
     "_set_fault(k): tests only: SIGKILL this process at fault point k (0: none)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "buzon._core",
    "Shared-memory rings for buzon (see src/buzon/_core.c and docs/shm.md).", -1, mod_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    static int atfork_done = 0;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    PyObject *errors = PyImport_ImportModule("buzon.errors");
    if (errors == NULL) {
        return NULL;
    }
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&ProtocolError, "ProtocolError"}, {&TimeoutErr, "Timeout"},     {&FullErr, "Full"},
        {&EmptyErr, "Empty"},              {&TooLarge, "MessageTooLarge"},
        {&ClosedErr, "ChannelClosed"},     {&EndErr, "EndOfChannel"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyObject_GetAttrString(errors, names[i].name);
        if (*names[i].slot == NULL) {
            Py_DECREF(errors);
            return NULL;
        }
    }
    Py_DECREF(errors);
    if (PyType_Ready(&RingType) < 0 || PyType_Ready(&BlockType) < 0 ||
        PyType_Ready(&LoanType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RingType);
    Py_INCREF(&BlockType);
    Py_INCREF(&LoanType);
    Py_INCREF(&LoanType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(m, "Block", (PyObject *)&BlockType) < 0 ||
        PyModule_AddObject(m, "Loan", (PyObject *)&LoanType) < 0 ||
        PyModule_AddObject(m, "BlockView", (PyObject *)&LoanType) < 0 || /* the same */
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "RECORD_HEADER", REC_HDR) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "F_LOCKED", F_LOCKED) < 0 ||
        PyModule_AddIntConstant(m, "F_HEADER", F_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "F_RESERVED", F_RESERVED) < 0 ||
        PyModule_AddIntConstant(m, "F_UNLOCKED", F_UNLOCKED) < 0 ||
        PyModule_AddIntConstant(m, "F_MID_PAYLOAD", F_MID_PAYLOAD) < 0 ||
        PyModule_AddIntConstant(m, "F_BEFORE_COMMIT", F_BEFORE_COMMIT) < 0 ||
        PyModule_AddIntConstant(m, "F_COMMITTED", F_COMMITTED) < 0 ||
        PyModule_AddIntConstant(m, "F_CLAIMED", F_CLAIMED) < 0 ||
        PyModule_AddIntConstant(m, "F_COPIED", F_COPIED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
