#ifndef BUZON_CORE_H
#define BUZON_CORE_H

/*
 * buzon._core: rings of variable-length records in named shared-memory segments.
 * This header is shared by the units of the one extension module (setup.py lists them):
 *   _core_ring.c       the ring itself: cursors, records, the reservation lock, liveness
 *                      and waiting; plain C, called with or without the GIL
 *   _core_glue.c       what every Python object shares: the rc -> exception map, the one
 *                      GIL-release/EINTR retry loop, deadlines, opening, validating and
 *                      mapping segments, and the C API other extensions use to put and
 *                      take records (_core_api.h)
 *   _core_ring_type.c  the Ring type (create, attach, send, recv, arming, info)
 *   _core_loan.c       the Loan type (reserve, recv_view, block views)
 *   _core_block.c      the Block type (shared_array, shared_value, out-of-line messages)
 *   _core_admin.c      module functions (inspect, in_use, hold, claim_all, unlink,
 *                      fault points) and the module's initialisation
 *   _core_rv.c         the ring-level rendezvous (capacity=0 over shm:): tickets, the
 *                      wait for a record's take, its withdrawal, the receiver-waiting word
 * Nothing here changes the bytes in a segment: docs/shm.md has the tables. A record's
 * payload is opaque here: what it means (a buzon frame, for shm: channels) is the
 * business of the module that puts and takes it (buzon.protocol._frames, through the
 * C API of _core_api.h).
 *
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
 * with the GIL released; the ring's functions (_core_ring.c) take and return plain C.
 *
 * Also here: Loan (a record lent out for zero-copy filling or reading), and Block (a
 * plain data area with the same header page at its end, whose reservation lock serves
 * as a robust process-shared mutex: shared_array, shared_value, out-of-line messages).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_core_api.h"

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
#define VERSION 1u      /* blocks */
#define RING_VERSION 2u /* rings: 2 added the ring-level rendezvous (_core_rv.c) */
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
    _Atomic uint32_t rv_waiting; /* rendezvous: a receiver began to wait, took nothing since */
    uint8_t pad5[48];
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
_Static_assert(offsetof(header_t, rv_waiting) == 332, "layout");
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

extern volatile int fault_point; /* _core_admin.c (_set_fault) */

static inline void
fault(int k)
{
    if (__builtin_expect(fault_point == k, 0)) {
        raise(SIGKILL);
    }
}

/* fork: a child gets its own participant slot. Bumped in the child (_core_admin.c). */
extern _Atomic uint32_t fork_epoch;

/* ---- the object behind Ring and Block ------------------------------------------ */

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
    PyObject *title;    /* what errors call it ("mailbox 'jobs'"); NULL: "the ring NAME" */
    Py_ssize_t exports; /* live buffer views or loans: no unmapping under them */
    int busy;           /* operations that released the GIL and are not back yet */
    _Atomic int closing; /* close() was called while busy: the last one out unmaps */
    unsigned long lock_thread; /* Block: the thread that took the lock through us (GIL) */
    uint64_t last_pos;  /* where the last record this object reserved starts (a ticket) */
    int rv;             /* rendezvous mode: waiting receives raise rv_waiting (_core_rv.c) */
} Ring;

extern PyTypeObject RingType, BlockType, LoanType;

/* buzon.errors classes, looked up once by the module's initialisation */
extern PyObject *ProtocolError, *TimeoutErr, *FullErr, *EmptyErr, *TooLarge, *ClosedErr,
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

static inline int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}


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

/* ---- the ring (_core_ring.c): plain C, no PyObject; results are enum rc ---------- */

typedef buzon_part part_t; /* a piece of a payload (_core_api.h) */

void futex_wake(_Atomic uint32_t *addr);
int lock_byte(int fd, int cmd, short type, off_t start, off_t len, struct flock *out);
int lock_held(int fd, off_t start, off_t len);
int take_slot(Ring *r);
int rlock_acquire(Ring *r, int64_t deadline);
void rlock_release(Ring *r);
void wake_data(Ring *r);
void wake_space(Ring *r);
int advance_tail(Ring *r);
int reserve(Ring *r, uint32_t len, uint32_t flags, int64_t deadline, rec_t **out);
void fill(rec_t *rec, const part_t *parts, int nparts, uint32_t len);
void commit(Ring *r, rec_t *rec);
int claim(Ring *r, int64_t deadline, rec_t **out, uint32_t *lenp, int *spun_ok);
int release_rec(Ring *r, rec_t *rec);
int skip_dead(Ring *r);

/* ---- the ring-level rendezvous (_core_rv.c) -------------------------------------- */

/* Ring methods, listed in _core_ring_type.c's table. */
PyObject *ring_last_put(Ring *r, PyObject *a);
PyObject *ring_rv_state(Ring *r, PyObject *arg);
PyObject *ring_rv_withdraw(Ring *r, PyObject *arg);
PyObject *ring_rv_arm(Ring *r, PyObject *arg);
PyObject *ring_rv_wait(Ring *r, PyObject *args, PyObject *kw);
PyObject *ring_set_rendezvous(Ring *r, PyObject *a);
PyObject *ring_receiver_waiting(Ring *r, PyObject *a);
PyObject *ring_stop_waiting(Ring *r, PyObject *a);
/* a waiting receive on a rendezvous ring says so (spin_wait, arm_data) */
static inline void
rv_mark_waiting(Ring *r)
{
    if (r->rv && !atomic_load_explicit(&r->h->rv_waiting, memory_order_relaxed)) {
        atomic_store(&r->h->rv_waiting, 1);
    }
}

/* ---- Python glue shared by every object (_core_glue.c) -------------------------- */

/* What a failed operation was doing: picks the exception and the message for an rc. */
enum op { OP_SEND, OP_RECV, OP_RESERVE, OP_RECV_VIEW, OP_LOCK };

/* RC_RAISED: a signal handler raised while an operation waited (the exception is set). */
#define RC_RAISED (-1)

/* The one rc -> exception map: sets the exception for rc (not RC_OK) and returns NULL.
 * waiting 0: the caller would not wait, so RC_AGAIN is Full or Empty, not Timeout. */
PyObject *raise_rc(Ring *r, int rc, enum op op, int waiting);
PyObject *corrupt(Ring *r);

/* The one GIL-release/EINTR retry loop: runs fn(r, arg, deadline) with the GIL released
 * until it returns anything but RC_INTR, running signal handlers in between (RC_RAISED
 * if one raised). Must be called with the GIL held and the operation counted busy. */
typedef int (*released_fn)(Ring *r, void *arg, int64_t deadline);
int run_released(Ring *r, released_fn fn, void *arg, int64_t deadline);
typedef struct {
    rec_t *rec;
    uint32_t len;
    int spun_ok;
} claim_args;
int claim_released(Ring *r, void *arg, int64_t deadline); /* arg: claim_args */
typedef struct {
    uint32_t len, flags;
    rec_t *rec;
} reserve_args;
int reserve_released(Ring *r, void *arg, int64_t deadline); /* arg: reserve_args */

int deadline_from(PyObject *timeout, int64_t *out);
int check_open(Ring *r);
/* check_open's common case inline (open, and in the process that mapped it): the C API
 * calls (put, take) pass here on every small send and receive of a shm: channel. */
static inline int
check_open_fast(Ring *r)
{
    if (__builtin_expect(r->base != NULL && !atomic_load(&r->closing) &&
                             r->epoch == atomic_load_explicit(&fork_epoch, memory_order_relaxed),
                         1)) {
        return 0;
    }
    return check_open(r);
}
int timeout_only(Ring *r, PyObject *args, PyObject *kw, const char *format, int64_t *deadline);
void close_or_defer(Ring *r);
int send_parts(Ring *r, const part_t *parts, int nparts, size_t total, uint32_t flags,
               int64_t deadline);
PyObject *take_bytes(Ring *r, rec_t *rec, uint32_t skip, uint32_t len);

Ring *ring_new(PyTypeObject *type, PyObject *name);
void ring_unmap(Ring *r);

/* The end of an operation counted busy (r->busy++ before it may release the GIL): the
 * last one out unmaps if close() was called meanwhile (close_or_defer). Inline: every
 * send and receive passes here. */
static inline void
leave(Ring *r)
{
    if (--r->busy == 0 && atomic_load(&r->closing)) {
        ring_unmap(r);
    }
}
void ring_dealloc(Ring *r);
uint64_t page_round(uint64_t n);

/* Segments: a ring has its header page first, a block last. */
enum seg_kind { SEG_RING, SEG_BLOCK };
int open_checked(const char *cname, PyObject *name, int flags, enum seg_kind kind,
                 header_t *copy);
int attach_slot(Ring *r);
int create_segment(Ring *r, const char *cname, PyObject *name, uint32_t nslots, off_t bytes,
                   int (*map)(Ring *, uint64_t), uint64_t capacity);
void own_first_slot(Ring *r);
Ring *attach_begin(PyTypeObject *type, PyObject *args, enum seg_kind kind, header_t *copy,
                   PyObject **name);
PyObject *participants(int fd, const header_t *h, uint32_t nslots, int my_slot);
PyObject *info_dict(const header_t *h, PyObject *parts);

/* A method that may release the GIL: count the operation so that close() from
 * another thread defers the unmapping until it is back. NAME_impl does the work. */
#define BUSY_METHOD_(STORAGE, NAME)                                          \
    static PyObject *NAME##_impl(Ring *r, PyObject *args, PyObject *kw);     \
    STORAGE PyObject *NAME(Ring *r, PyObject *args, PyObject *kw)            \
    {                                                                        \
        r->busy++;                                                           \
        PyObject *res = NAME##_impl(r, args, kw);                            \
        leave(r);                                                            \
        return res;                                                          \
    }
#define BUSY_METHOD(NAME) BUSY_METHOD_(static, NAME)
#define BUSY_METHOD_EXPORTED(NAME) BUSY_METHOD_(, NAME) /* listed in another unit */

/* The C API lent to other extension modules (_core_glue.c; the capsule is made
 * by the module's initialisation, _core_admin.c). */
extern const buzon_ring_api ring_api;

/* Methods defined in one unit and listed in another's method table. */
PyObject *ring_reserve(Ring *r, PyObject *args, PyObject *kw);
PyObject *ring_recv_view(Ring *r, PyObject *args, PyObject *kw);
PyObject *ring_info(Ring *r, PyObject *a);
PyObject *ring_fileno(Ring *r, PyObject *a);
PyObject *ring_get_name(Ring *r, void *c);
PyObject *ring_get_closed(Ring *r, void *c);
PyObject *loan_new(Ring *r, rec_t *rec, uint8_t *ptr, uint64_t len, int kind);
int lend_buffer(PyObject *owner, Py_buffer *view, uint8_t *ptr, uint64_t len, int readonly,
                int flags, Py_ssize_t *exports);
enum { LENT_WRITE, LENT_READ, LENT_BLOCK, LENT_BLOCK_READ };

#endif /* BUZON_CORE_H */
