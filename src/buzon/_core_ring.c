/*
 * buzon._core, the ring: cursors, records, the reservation lock, participant slots and
 * waiting (the theory of operation is in _core.h). Plain C: nothing here touches a
 * PyObject, so every function may run with the GIL released; results are enum rc.
 */
#include "_core.h"

_Atomic uint32_t fork_epoch = 0;

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

void
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

int
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
int
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
int
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

/* ---- the reservation lock ---------------------------------------------------- */

int
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

void
rlock_release(Ring *r)
{
    atomic_store_explicit(&r->h->rlock, 0, memory_order_release);
    if (atomic_load(&r->h->rlock_waiters)) {
        futex_wake_n(&r->h->rlock, 1); /* one can take it; see rlock_acquire's pass-on */
    }
}

/* ---- waking, and moving the cursors over records that carry no message ------- */

void
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

void
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
int
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
int
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

/* Reserve a record for len bytes. deadline: -1 forever, 0 try once, else ns. */
int
reserve(Ring *r, uint32_t len, uint32_t flags, int64_t deadline, rec_t **out)
{
    header_t *h = r->h;
    uint64_t need = footprint(r, len);
    for (;;) {
        /* a free lock first: a try (deadline 0) reads the clock only if it must wait */
        uint32_t unlocked = 0;
        int rc = atomic_compare_exchange_strong(&h->rlock, &unlocked, r->token)
                     ? RC_OK
                     : rlock_acquire(r, deadline == 0 ? now_ns() + 2000000 : deadline);
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
            r->last_pos = head;
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

void
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

void
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
int
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
                    if (atomic_load_explicit(&h->rv_waiting, memory_order_relaxed)) {
                        atomic_store_explicit(&h->rv_waiting, 0, memory_order_relaxed);
                    }
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

int
release_rec(Ring *r, rec_t *rec)
{
    fault(F_COPIED);
    /* ours while READING (we are alive): keep the lap, mark it free */
    uint64_t st = atomic_load_explicit(&rec->state, memory_order_relaxed);
    atomic_store_explicit(&rec->state, with_kind(st, K_FREE), memory_order_release);
    atomic_fetch_add_explicit(&r->h->consumed, 1, memory_order_relaxed);
    return advance_tail(r);
}
