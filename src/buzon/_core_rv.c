/*
 * buzon._core, the ring-level rendezvous (capacity=0 over shm:). docs/shm.md and
 * docs/semantics.md ("Rendezvous on shm:") have the contract; the theory is here.
 *
 * A rendezvous send puts its record as any send does, then waits until the record is
 * taken. The record itself is the rendezvous: its state word says where it is.
 *   ticket   the position the record starts at (Ring.last_put() right after the put,
 *            under the sender's write lock); with the lap bits of the state word it
 *            names this record and no later one at the same offset.
 *   taken    a consumer claimed it (COMMITTED -> READING, then FREE), or tail moved
 *            past it (freed; the space may hold a later lap's record by now).
 *   withdrawn  the sender gave up (deadline, cancellation, interrupt, peer gone) and
 *            won the CAS COMMITTED -> ABANDONED, which races the consumer's claim
 *            COMMITTED -> READING on the same word: exactly one of them succeeds, so
 *            the message is either taken (the send returns) or never delivered (the
 *            send raises). ABANDONED records are what consumers skip already (a loan
 *            aborted, a dead producer's record), so a withdrawn record needs no new
 *            kind; the ring's format version (2) marks the rendezvous all the same,
 *            because a format-1 peer would not know that a receiver must not expect
 *            CREDIT frames.
 * Waiting for the take (rv_wait, GIL released): spin on the state word for the
 * channel's spin budget, then sleep in ppoll on the space pipe (a consumer that frees
 * while space_armed is set empties it: POLLOUT), the Unix socket to the peer (POLLRDHUP:
 * the peer closed or died) and the channel's wake eventfd (a close() in another
 * thread). The consumer's free comes after its claim, so "armed, then the state still
 * COMMITTED" means the free that follows empties the pipe (seq_cst on both sides).
 * The receiver-waiting word (header rv_waiting): a receive on a ring in rendezvous
 * mode sets it when it begins to wait (spin_wait, arm_data), a claim clears it, and so
 * does a receive that ends without a message (stop_waiting); send_nowait sends only
 * while it is set and no record is pending.
 */
#include "_core.h"

#include <poll.h>

enum { RV_PENDING = 0, RV_TAKEN = 1, RV_WITHDRAWN = 2 };

/* What became of the record put at pos (by this process, which is alive). */
static int
rv_check(Ring *r, uint64_t pos)
{
    header_t *h = r->h;
    uint64_t t = atomic_load_explicit(&h->tail, memory_order_acquire);
    if ((int64_t)(t - pos) > 0) {
        return RV_TAKEN; /* freed (a withdrawn record is never asked about again) */
    }
    rec_t *rec = rec_at(r, pos);
    uint64_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
    if ((st & LAP_MASK) != lap_bits(r, pos)) {
        return RV_TAKEN; /* freed and its space reused */
    }
    switch ((unsigned)(st & 0xff)) {
    case K_RESERVED:
    case K_COMMITTED:
        return RV_PENDING;
    case K_ABANDONED:
        return RV_WITHDRAWN;
    default:
        return RV_TAKEN; /* READING or FREE */
    }
}

static int
ticket_of(Ring *r, PyObject *arg, uint64_t *pos)
{
    if (check_open_fast(r) < 0) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (v & 7) {
        PyErr_SetString(PyExc_ValueError, "not a ticket of this ring");
        return -1;
    }
    *pos = (uint64_t)v;
    return 0;
}

PyObject *
ring_last_put(Ring *r, PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLongLong(r->last_pos);
}

PyObject *
ring_rv_state(Ring *r, PyObject *arg)
{
    uint64_t pos;
    if (ticket_of(r, arg, &pos) < 0) {
        return NULL;
    }
    return PyLong_FromLong(rv_check(r, pos));
}

PyObject *
ring_rv_withdraw(Ring *r, PyObject *arg)
{
    uint64_t pos;
    if (ticket_of(r, arg, &pos) < 0) {
        return NULL;
    }
    header_t *h = r->h;
    uint64_t t = atomic_load_explicit(&h->tail, memory_order_acquire);
    if ((int64_t)(t - pos) > 0) {
        Py_RETURN_FALSE;
    }
    rec_t *rec = rec_at(r, pos);
    uint64_t st = atomic_load_explicit(&rec->state, memory_order_acquire);
    for (;;) {
        if ((st & LAP_MASK) != lap_bits(r, pos)) {
            Py_RETURN_FALSE;
        }
        unsigned kind = (unsigned)(st & 0xff);
        if (kind == K_ABANDONED) {
            Py_RETURN_TRUE; /* withdrawn already */
        }
        if (kind != K_COMMITTED) {
            Py_RETURN_FALSE; /* claimed: the consumer won */
        }
        if (atomic_compare_exchange_strong(&rec->state, &st, with_kind(st, K_ABANDONED))) {
            break;
        }
    }
    /* reclaim its space now if it is next (else the consumer skips it when it gets there) */
    if (skip_dead(r) != RC_OK || advance_tail(r) != RC_OK) {
        return corrupt(r);
    }
    Py_RETURN_TRUE;
}

PyObject *
ring_rv_arm(Ring *r, PyObject *arg)
{
    uint64_t pos;
    if (ticket_of(r, arg, &pos) < 0) {
        return NULL;
    }
    atomic_store(&r->h->space_armed, 1);
    return PyLong_FromLong(rv_check(r, pos));
}

PyObject *
ring_set_rendezvous(Ring *r, PyObject *Py_UNUSED(a))
{
    r->rv = 1;
    Py_RETURN_NONE;
}

PyObject *
ring_stop_waiting(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open_fast(r) < 0) {
        return NULL;
    }
    if (atomic_load_explicit(&r->h->rv_waiting, memory_order_relaxed)) {
        atomic_store(&r->h->rv_waiting, 0);
    }
    Py_RETURN_NONE;
}

PyObject *
ring_receiver_waiting(Ring *r, PyObject *Py_UNUSED(a))
{
    if (check_open_fast(r) < 0) {
        return NULL;
    }
    header_t *h = r->h;
    if (!atomic_load(&h->rv_waiting)) {
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(atomic_load(&h->head) == atomic_load(&h->rd));
}

typedef struct {
    uint64_t pos;
    int64_t spin_ns;
    int space_fd, sock_fd, wake_fd;
    int result; /* 1 taken, 0 deadline, 2 woken: the peer is gone or a close() */
} rv_args;

static int
rv_wait_released(Ring *r, void *arg, int64_t deadline)
{
    rv_args *a = arg;
    header_t *h = r->h;
    if (a->spin_ns > 0) {
        int64_t end = now_ns() + a->spin_ns;
        a->spin_ns = 0; /* once: not again after a signal */
        for (unsigned i = 1;; i++) {
            if (rv_check(r, a->pos) != RV_PENDING) {
                a->result = 1;
                return RC_OK;
            }
            if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
                return RC_GONE;
            }
            cpu_relax();
            if ((i & 63) == 0) {
                if (now_ns() >= end || (deadline >= 0 && now_ns() >= deadline)) {
                    break;
                }
                sched_yield(); /* see claim */
            }
        }
    }
    for (;;) {
        if (a->space_fd >= 0) {
            /* fill the one-slot pipe: it turns writable when a consumer empties it */
            char zero = 0;
            if (write(a->space_fd, &zero, 1) < 0 && errno == EPIPE) {
                a->result = rv_check(r, a->pos) != RV_PENDING ? 1 : 2;
                return RC_OK;
            }
        }
        atomic_store(&h->space_armed, 1);
        if (rv_check(r, a->pos) != RV_PENDING) {
            a->result = 1;
            return RC_OK;
        }
        if (atomic_load(&h->closed)) {
            a->result = 2; /* the peer shut the ring down: nobody takes it now */
            return RC_OK;
        }
        if (atomic_load_explicit(&r->closing, memory_order_relaxed)) {
            return RC_GONE;
        }
        int64_t left = SLICE_NS;
        if (deadline >= 0) {
            int64_t rem = deadline - now_ns();
            if (rem <= 0) {
                a->result = 0;
                return RC_OK;
            }
            if (rem < left) {
                left = rem;
            }
        }
        struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
        struct pollfd p[3] = {
            {a->space_fd, POLLOUT, 0},
            {a->sock_fd, POLLRDHUP, 0},
            {a->wake_fd, POLLIN, 0},
        };
        int n = ppoll(p, 3, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR) {
                return RC_INTR;
            }
            a->result = 2;
            return RC_OK;
        }
        if (p[2].revents || (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) ||
            (p[0].revents & (POLLERR | POLLHUP | POLLNVAL))) {
            a->result = rv_check(r, a->pos) != RV_PENDING ? 1 : 2;
            return RC_OK;
        }
    }
}

BUSY_METHOD_EXPORTED(ring_rv_wait)
static PyObject *
ring_rv_wait_impl(Ring *r, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ticket", "timeout", "spin", "space_fd", "sock_fd", "wake_fd",
                             NULL};
    PyObject *ticket, *timeout;
    double spin = 0.0;
    rv_args a = {0, 0, -1, -1, -1, 0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|diii:rv_wait", kwlist, &ticket, &timeout,
                                     &spin, &a.space_fd, &a.sock_fd, &a.wake_fd)) {
        return NULL;
    }
    int64_t deadline;
    if (ticket_of(r, ticket, &a.pos) < 0 || deadline_from(timeout, &deadline) < 0) {
        return NULL;
    }
    if (rv_check(r, a.pos) != RV_PENDING) {
        return PyLong_FromLong(1);
    }
    if (deadline == 0) {
        return PyLong_FromLong(0);
    }
    a.spin_ns = spin > 1.0 ? 1000000000LL : spin > 0 ? (int64_t)(spin * 1e9) : 0;
    int rc = run_released(r, rv_wait_released, &a, deadline);
    if (rc == RC_RAISED) {
        return NULL;
    }
    if (rc == RC_GONE) {
        return PyLong_FromLong(2);
    }
    return PyLong_FromLong(a.result);
}
