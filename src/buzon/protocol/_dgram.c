/* The receive of a message transport (datagram sockets, POSIX queues), in C.
 *
 * One object per receiving end, the only way that end reads, so the facts about the
 * last message (who sent it, its priority, what the kernel dropped) have one home:
 *
 *   Receiver(fd, kind, size, connected, counts_drops)
 *       ``kind`` 0: a datagram socket (``fd`` non-blocking; ``connected``: the
 *       sender is not asked for; ``counts_drops``: ask for the kernel's running
 *       count of datagrams dropped for a full queue, SO_RXQ_OVFL); 1: a POSIX queue
 *       descriptor (O_NONBLOCK; ``size`` its mq_msgsize). A datagram longer than
 *       ``size`` is never delivered cut: it is dropped and counted (``truncated``).
 *       The object never owns ``fd``: its transport closes it (``close()`` here first).
 *
 *   recv() -> bytes | None
 *       One message now (the transport's recv_message), None when there is none.
 *
 *   wait(deadline, spin, limit[, wake]) -> (flags, body) | bytes | None
 *       The wait and the read of a plain blocking receive, in one call (the engine's
 *       INPUT step on the read fd and the take's read: _engine.py recv_steps, and
 *       ChannelCore.wait_message). Try to receive for ``spin`` seconds, then sleep in
 *       poll(fd, wake) until ``deadline`` (time.monotonic() seconds; None: no limit),
 *       then receive; the GIL is released meanwhile. Returns ``(flags, body)`` when the
 *       message is one plain DATA frame (version 1, kind DATA, codec 0..3, no other
 *       flag, no buffers, at most ``limit`` bytes) and nothing about the link changed
 *       since the Python side last looked (same sender, same priority, no drop);
 *       else the message as bytes, for the Python path (recv_message's caller), which
 *       stays the reference; None when the deadline passed, or ``wake`` (an fd, -1:
 *       none; the channel's close eventfd) became readable first (it is never read).
 *       A failed poll or receive raises OSError. A signal that interrupts the wait
 *       runs its Python handler (with the GIL), and what the handler raises ends the
 *       call; otherwise the wait goes on.
 *
 *       With ``blocks`` (a socket or queue descriptor in blocking mode, set by the
 *       transport) and no deadline, the sleep is the receive itself (recvmsg,
 *       mq_timedreceive with no expiry), one system call (``in_block`` while it
 *       lasts); the transport ends it for a close() (interrupt_reads: a KICK
 *       datagram to a bound socket or message to the queue, a shutdown of a
 *       connected socket), and the wake fd, readable then, says so (None). A KICK
 *       is never a message in any receive.
 *
 *   sender: the raw sockaddr of the last datagram (bytes; None: connected or none
 *   yet), priority, overflows, truncated: the facts about the last message.
 *
 *   MessageSender(fd, kind, core, lock, limit[, receiver])(data) -> bool
 *       The hot path of a blocking ``send_bytes`` on a message transport (the twin of
 *       protocol/_stream.c SmallWriter, ChannelCore.small_send): ``data``, bytes of at
 *       most ``limit``, as one plain DATA frame in one datagram (sendmsg, header and
 *       payload gathered; a bound socket: to ``receiver``'s last sender) or one queue
 *       message (mq_timedsend, never sleeping), or one enveloped piece (kind FIFO:
 *       ``piece`` numbered by ``writer``'s encoder, one write(2), while the writer
 *       has nothing in progress, batched or corked), when the channel is quiet: ``lock``
 *       (the driver's write lock) is free (taken with acquire(False) and held from
 *       the checks to the count: the fifo's numbering reads and sets the encoder's seq)
 *       and ``core`` owes nothing (``backlog`` empty, ``credit_out`` None), is open
 *       and numbers no sends (``sflow`` None). True: sent, counted here
 *       (``counts()``; the core adds them to its statistics). False: nothing sent
 *       (not quiet, not small bytes, no room, no sender yet, an error): the caller goes
 *       the general way, which meets the same condition and reports it.
 *
 *   wait_fifo(fd, buf, deadline, spin, limit, wake, scan, max_frame, codecs)
 *       -> (flags, body) | (n, pos, filled) | None
 *       The wait and the read of a plain blocking receive on a ``fifo:`` reader
 *       (transport/fifo.py FifoWaiter): as Receiver.wait, then read(2) once into
 *       ``buf`` (the frame decoder's empty read buffer) and unwrap the envelopes there
 *       with ``scan`` (protocol/_envelope.c scan, called as the reassembler calls it:
 *       ``scan(buf, 0, n, buf, 0, max_frame, codecs)``). Returns ``(flags, body)``
 *       when the read brought exactly one piece holding one plain DATA frame (at most
 *       ``limit`` bytes); else ``(n, pos, filled)`` for the Python reassembler (n: the
 *       bytes read, 0 at the end; pos: where the scan stopped; filled: the frame bytes
 *       now at the start of ``buf``); None as Receiver.wait.
 *
 * A message goes to the Python path while ``dirty``: something the channel reports
 * changed (a new sender, priority or drop count) and no message other than a CREDIT
 * (which the channel applies without looking at them) went that way since.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <mqueue.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "structmember.h"

#ifndef SO_RXQ_OVFL
#define SO_RXQ_OVFL 40
#endif

#include "_wait.h"
#include "_writer.h"

#define VERSION BUZON_FRAME_VERSION
#define KIND_DATA BUZON_KIND_DATA
#define KIND_CREDIT 6 /* protocol/frames.py Kind.CREDIT */
#define NOT_PLAIN 0xFC /* flags a fast message never has: only codec bits 0..1 */

enum { KIND_SOCKET = 0, KIND_MQ = 1, KIND_FIFO = 2 };

typedef struct {
    PyObject_HEAD
    int fd;
    int kind;
    int connected;
    int counts_drops;
    int busy;  /* a wait is in progress (the GIL released): recv() finds nothing */
    int dirty; /* see the top of the file */
    int blocks;   /* a wait with no deadline may sleep in recvmsg / mq_timedreceive */
    int in_block; /* a wait sleeps in recvmsg itself now (set and cleared with the GIL) */
    Py_ssize_t size;
    char *buf; /* size + 1 bytes: a longer datagram shows */
    struct sockaddr_storage sender;
    socklen_t sender_len;
    unsigned int priority;
    uint32_t overflows;
    Py_ssize_t truncated;
} Receiver;

static const struct timespec already_expired = {0, 0};

/* The datagram a closing channel sends its own bound socket to end a wait asleep in
 * recvmsg (transport/_dgram.py interrupt_reads): never a frame (no frame begins with
 * 0xFF), never delivered, never a sender. */
static const char KICK[16] = {(char)0xFF, 'b', 'u', 'z', 'o', 'n', '-', 'k',
                              'i',        'c', 'k', '-', 'w', 'a', 'i', 't'};
#define KICKED (-2)


/* What one receive learnt about its message, kept aside while the GIL may be released
 * and applied to the Receiver (commit) with the GIL held: a MessageSender in another
 * thread reads ``sender`` (the GIL held) and must never see it half written. */
typedef struct {
    struct sockaddr_storage from;
    socklen_t from_len;
    unsigned int prio;
    int has_count;
    uint32_t count;
    Py_ssize_t truncated;
} Facts;

/* One receive, no Python object touched and no Receiver field written but buf (may
 * run without the GIL); it never sleeps unless ``block`` (a socket in blocking mode:
 * recvmsg without MSG_DONTWAIT). Returns the length of the message now in buf, -1
 * with errno (EAGAIN: none); drops datagrams longer than size, counted in
 * facts->truncated, and a KICK (skipped; ``block``: KICKED, the caller looks at its
 * wake fd). */
static ssize_t receive_once(Receiver *self, Facts *facts, int block) {
    for (;;) {
        if (self->kind == KIND_MQ) {
            ssize_t n = block ? mq_receive((mqd_t)self->fd, self->buf, (size_t)self->size,
                                           &facts->prio)
                              : mq_timedreceive((mqd_t)self->fd, self->buf, (size_t)self->size,
                                                &facts->prio, &already_expired);
            if (n < 0 && errno == ETIMEDOUT) /* a blocking descriptor: nothing there */
                errno = EAGAIN;
            if (n == (ssize_t)sizeof KICK && memcmp(self->buf, KICK, sizeof KICK) == 0) {
                if (block)
                    return KICKED;
                continue;
            }
            return n;
        }
        struct iovec iov = {.iov_base = self->buf, .iov_len = (size_t)self->size + 1};
        union {
            char space[CMSG_SPACE(sizeof(uint32_t))];
            struct cmsghdr align;
        } control;
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        if (!self->connected) {
            m.msg_name = &facts->from;
            m.msg_namelen = sizeof facts->from;
        }
        if (self->counts_drops) {
            m.msg_control = control.space;
            m.msg_controllen = sizeof control.space;
        }
        ssize_t n = recvmsg(self->fd, &m, block ? 0 : MSG_DONTWAIT);
        if (n < 0)
            return -1;
        if (self->counts_drops) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL &&
                    c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
                    memcpy(&facts->count, CMSG_DATA(c), sizeof facts->count);
                    facts->has_count = 1;
                }
            }
        }
        if (n > self->size || (m.msg_flags & MSG_TRUNC)) {
            facts->truncated++; /* over our unit: never deliver a cut datagram */
            continue;
        }
        if (n == (ssize_t)sizeof KICK && memcmp(self->buf, KICK, sizeof KICK) == 0) {
            if (block)
                return KICKED;
            continue;
        }
        if (!self->connected)
            facts->from_len = m.msg_namelen > sizeof facts->from ? sizeof facts->from
                                                                 : m.msg_namelen;
        return n;
    }
}

/* ``fd`` is readable now (a poll that never sleeps) */
static int fd_ready_now(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    return poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

static void facts_init(Facts *facts) {
    facts->from_len = 0;
    facts->prio = 0;
    facts->has_count = 0;
    facts->truncated = 0;
}

/* Apply what receive_once learnt (the GIL held); ``got``: a message was received. */
static void commit(Receiver *self, const Facts *facts, ssize_t got) {
    if (facts->truncated) {
        self->truncated += facts->truncated;
        self->dirty = 1;
    }
    if (facts->has_count && facts->count != self->overflows) {
        self->overflows = facts->count;
        self->dirty = 1;
    }
    if (got < 0)
        return;
    if (self->kind == KIND_MQ) {
        if (facts->prio != self->priority) {
            self->priority = facts->prio;
            self->dirty = 1;
        }
    } else if (!self->connected) {
        socklen_t len = facts->from_len;
        if (len != self->sender_len || memcmp(&facts->from, &self->sender, len) != 0) {
            memcpy(&self->sender, &facts->from, len);
            self->sender_len = len;
            self->dirty = 1;
        }
    }
}

/* The message in buf[:n] for the Python path: bytes; a non-CREDIT clears dirty. */
static PyObject *as_bytes(Receiver *self, ssize_t n) {
    if (!(n >= 2 && (unsigned char)self->buf[1] == KIND_CREDIT))
        self->dirty = 0;
    return PyBytes_FromStringAndSize(self->buf, n);
}

static int check_open(Receiver *self) {
    if (self->fd < 0) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Receiver_recv(Receiver *self, PyObject *unused) {
    (void)unused;
    if (check_open(self) < 0)
        return NULL;
    if (self->busy) /* another thread waits in this receiver: its message */
        Py_RETURN_NONE;
    for (;;) {
        Facts facts;
        facts_init(&facts);
        ssize_t n = receive_once(self, &facts, 0);
        int saved = errno;
        commit(self, &facts, n);
        errno = saved;
        if (n >= 0)
            return as_bytes(self, n);
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

/* flags of the one plain DATA frame filling buf[0:n] exactly, else -1 */
static int plain_flags(const unsigned char *h, ssize_t n, Py_ssize_t limit) {
    if (n < 8 || n > limit)
        return -1;
    uint32_t blen = (uint32_t)h[4] | ((uint32_t)h[5] << 8) | ((uint32_t)h[6] << 16) |
                    ((uint32_t)h[7] << 24);
    if (h[0] != VERSION || h[1] != KIND_DATA || (h[2] & NOT_PLAIN) || h[3] ||
        8 + (ssize_t)blen != n)
        return -1;
    return h[2];
}

static PyObject *Receiver_wait(Receiver *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "wait(deadline, spin, limit[, wake]) takes 3 or 4 arguments");
        return NULL;
    }
    int forever = args[0] == Py_None;
    double deadline = forever ? 0.0 : PyFloat_AsDouble(args[0]);
    if (!forever && deadline == -1.0 && PyErr_Occurred())
        return NULL;
    double spin = PyFloat_AsDouble(args[1]);
    if (spin == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    long wake = -1;
    if (nargs == 4) {
        wake = PyLong_AsLong(args[3]);
        if (wake == -1 && PyErr_Occurred())
            return NULL;
        if (wake < -1 || wake > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "wake must be an fd or -1");
            return NULL;
        }
    }
    if (check_open(self) < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "another thread waits in this receiver");
        return NULL;
    }
    struct pollfd pfds[2] = {
        {.fd = self->fd, .events = POLLIN, .revents = 0},
        {.fd = (int)wake, .events = POLLIN, .revents = 0},
    };
    nfds_t nfds = wake >= 0 ? 2 : 1;
    ssize_t got = -1;
    int err = 0, timed_out = 0;
    Facts facts;
    facts_init(&facts);
    self->busy = 1;
    if (spin > 0.0) { /* the spin budget: receive attempts, no sleep */
        Py_BEGIN_ALLOW_THREADS
        double end = monotonic_now() + spin;
        do {
            got = receive_once(self, &facts, 0);
            if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                err = errno;
        } while (got < 0 && !err && monotonic_now() < end);
        Py_END_ALLOW_THREADS
        /* a signal that came while spinning interrupted nothing: its handler runs now */
        if (got < 0 && !err && PyErr_CheckSignals() < 0) {
            commit(self, &facts, -1);
            self->busy = 0;
            return NULL;
        }
    }
    /* no deadline, a socket in blocking mode: sleep in recvmsg itself, one system call
     * (the transport ends it for a close() in another thread: interrupt_reads) */
    int block = forever && self->blocks;
    while (got < 0 && !err && !timed_out) {
        if (block) {
            self->in_block = 1;
            Py_BEGIN_ALLOW_THREADS
            for (;;) {
                got = receive_once(self, &facts, 1);
                if (got > 0)
                    break;
                if (got == 0 || got == KICKED) {
                    /* a kick, a shutdown (0) or an empty datagram: the wake fd tells */
                    if (wake >= 0 && fd_ready_now((int)wake)) {
                        got = -1;
                        timed_out = 1;
                        break;
                    }
                    if (got == 0) /* an empty datagram: a message (not a frame) */
                        break;
                    continue; /* a kick meant for another wait */
                }
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    block = 0; /* O_NONBLOCK after all (another process set it): poll */
                else
                    err = errno;
                break;
            }
            Py_END_ALLOW_THREADS
            self->in_block = 0;
        } else {
            Py_BEGIN_ALLOW_THREADS
            for (;;) {
                int r = sleep_readable(pfds, nfds, forever, deadline);
                if (r < 0) {
                    err = errno;
                    break;
                }
                if (r == 0) { /* the deadline, or only the wake fd: a close() in another thread */
                    timed_out = 1;
                    break;
                }
                got = receive_once(self, &facts, 0);
                if (got >= 0)
                    break;
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    err = errno;
                    break;
                }
                /* readable, yet nothing to take (another reader, a dropped datagram) */
                if (pfds[0].revents & POLLNVAL) {
                    err = EBADF;
                    break;
                }
            }
            Py_END_ALLOW_THREADS
        }
        if (err == EINTR) {
            err = 0; /* a signal: its handler runs now; what it raises ends the wait */
            if (PyErr_CheckSignals() < 0) {
                commit(self, &facts, -1);
                self->busy = 0;
                return NULL;
            }
        }
    }
    commit(self, &facts, got);
    self->busy = 0;
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (timed_out)
        Py_RETURN_NONE;
    const unsigned char *h = (const unsigned char *)self->buf;
    int flags = self->dirty ? -1 : plain_flags(h, got, limit);
    if (flags < 0)
        return as_bytes(self, got);
    PyObject *body = PyBytes_FromStringAndSize(self->buf + 8, got - 8);
    if (body == NULL)
        return NULL;
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(body);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, PyLong_FromLong(flags)); /* a cached small int */
    PyTuple_SET_ITEM(out, 1, body);
    return out;
}

static PyObject *wait_fifo(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "wait_fifo(fd, buf, deadline, spin, limit, wake, scan, "
                                         "max_frame, codecs[, bfd]) takes 9 or 10 arguments");
        return NULL;
    }
    long bfd = -1; /* a blocking descriptor of the same FIFO: a wait with no deadline
                    * sleeps in read(2) itself */
    if (nargs == 10 && (bfd = PyLong_AsLong(args[9])) == -1 && PyErr_Occurred())
        return NULL;
    if (bfd < -1 || bfd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bfd must be an fd or -1");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    int forever = args[2] == Py_None;
    double deadline = forever ? 0.0 : PyFloat_AsDouble(args[2]);
    if (!forever && deadline == -1.0 && PyErr_Occurred())
        return NULL;
    double spin = PyFloat_AsDouble(args[3]);
    if (spin == -1.0 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    long wake = PyLong_AsLong(args[5]);
    if (wake == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX || wake < -1 || wake > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd must be an fd, wake an fd or -1");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    struct pollfd pfds[2] = {
        {.fd = (int)fd, .events = POLLIN, .revents = 0},
        {.fd = (int)wake, .events = POLLIN, .revents = 0},
    };
    nfds_t nfds = wake >= 0 ? 2 : 1;
    ssize_t got = -1;
    int err = 0, timed_out = 0;
    if (spin > 0.0) { /* the spin budget: read attempts, no sleep */
        Py_BEGIN_ALLOW_THREADS
        double end = monotonic_now() + spin;
        do {
            got = read((int)fd, buf.buf, (size_t)buf.len);
            if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                err = errno;
        } while (got < 0 && !err && monotonic_now() < end);
        Py_END_ALLOW_THREADS
        if (got < 0 && !err && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buf);
            return NULL;
        }
    }
    int block = forever && bfd >= 0;
    while (got < 0 && !err && !timed_out) {
        if (block) { /* the reader ends it for a close(): a nudge (interrupt_reads) */
            Py_BEGIN_ALLOW_THREADS
            got = read((int)bfd, buf.buf, (size_t)buf.len);
            if (got < 0)
                err = errno;
            Py_END_ALLOW_THREADS
            if (got < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
                block = 0; /* O_NONBLOCK after all (another process set it): poll */
                err = 0;
            }
            if (err == EINTR) {
                err = 0; /* a signal: its handler runs now; what it raises ends the wait */
                if (PyErr_CheckSignals() < 0) {
                    PyBuffer_Release(&buf);
                    return NULL;
                }
            }
            continue;
        }
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            int r = sleep_readable(pfds, nfds, forever, deadline);
            if (r < 0) {
                err = errno;
                break;
            }
            if (r == 0) { /* the deadline, or only the wake fd: a close() in another thread */
                timed_out = 1;
                break;
            }
            got = read((int)fd, buf.buf, (size_t)buf.len);
            if (got >= 0)
                break;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                err = errno;
                break;
            }
            if (pfds[0].revents & POLLNVAL) {
                err = EBADF;
                break;
            }
        }
        Py_END_ALLOW_THREADS
        if (err != EINTR)
            break;
        err = 0; /* a signal: its handler runs now; what it raises ends the wait */
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buf);
            return NULL;
        }
    }
    if (err) {
        PyBuffer_Release(&buf);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (timed_out) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    Py_ssize_t pos = 0, filled = 0;
    if (got > 0) {
        PyObject *n_obj = PyLong_FromSsize_t(got);
        PyObject *zero = PyLong_FromLong(0);
        PyObject *out = NULL;
        if (n_obj != NULL && zero != NULL) {
            PyObject *call[7] = {args[1], zero, n_obj, args[1], zero, args[7], args[8]};
            out = PyObject_Vectorcall(args[6], call, 7, NULL);
        }
        Py_XDECREF(n_obj);
        Py_XDECREF(zero);
        if (out == NULL) {
            PyBuffer_Release(&buf);
            return NULL;
        }
        if (!PyArg_ParseTuple(out, "nn", &pos, &filled) || pos < 0 || pos > got ||
            filled < 0 || filled > buf.len) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "scan returned positions out of range");
            Py_DECREF(out);
            PyBuffer_Release(&buf);
            return NULL;
        }
        Py_DECREF(out);
        int flags = pos == got ? plain_flags((const unsigned char *)buf.buf, filled, limit) : -1;
        if (flags >= 0) {
            PyObject *body = PyBytes_FromStringAndSize((const char *)buf.buf + 8, filled - 8);
            PyObject *res = body == NULL ? NULL : PyTuple_New(2);
            if (res == NULL) {
                Py_XDECREF(body);
            } else {
                PyTuple_SET_ITEM(res, 0, PyLong_FromLong(flags)); /* a cached small int */
                PyTuple_SET_ITEM(res, 1, body);
            }
            PyBuffer_Release(&buf);
            return res;
        }
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("(nnn)", (Py_ssize_t)got, pos, filled);
}

static PyObject *Receiver_close(Receiver *self, PyObject *unused) {
    (void)unused;
    self->fd = -1; /* the transport closes the fd itself */
    Py_RETURN_NONE;
}

static PyObject *Receiver_get_sender(Receiver *self, void *closure) {
    (void)closure;
    if (self->connected || self->sender_len == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)&self->sender, self->sender_len);
}

static PyObject *Receiver_get_priority(Receiver *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLong(self->priority);
}

static PyObject *Receiver_get_overflows(Receiver *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLong(self->overflows);
}

static PyObject *Receiver_get_truncated(Receiver *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->truncated);
}

static int Receiver_init(Receiver *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "kind", "size", "connected", "counts_drops", NULL};
    int fd, kind, connected = 1, counts_drops = 0;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iin|pp", kwlist, &fd, &kind, &size, &connected,
                                     &counts_drops))
        return -1;
    if (fd < 0 || (kind != KIND_SOCKET && kind != KIND_MQ) || size < 0 ||
        size > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "bad Receiver arguments");
        return -1;
    }
    if (self->buf != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Receiver is made once");
        return -1;
    }
    self->buf = PyMem_Malloc((size_t)size + 1);
    if (self->buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->fd = fd;
    self->kind = kind;
    self->size = size;
    self->connected = kind == KIND_MQ ? 1 : connected;
    self->counts_drops = kind == KIND_SOCKET && counts_drops;
    self->busy = 0;
    self->dirty = 0;
    self->blocks = 0;
    self->in_block = 0;
    self->sender_len = 0;
    self->priority = 0;
    self->overflows = 0;
    self->truncated = 0;
    return 0;
}

static void Receiver_dealloc(Receiver *self) {
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Receiver_methods[] = {
    {"recv", (PyCFunction)Receiver_recv, METH_NOARGS,
     "One message now (bytes), or None when there is none."},
    {"wait", (PyCFunction)(void (*)(void))Receiver_wait, METH_FASTCALL,
     "wait(deadline, spin, limit[, wake]) -> (flags, body) | bytes | None"},
    {"close", (PyCFunction)Receiver_close, METH_NOARGS,
     "Forget the fd (the transport closes it); later calls raise OSError(EBADF)."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Receiver_get_blocks(Receiver *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->blocks);
}

static int Receiver_set_blocks(Receiver *self, PyObject *value, void *closure) {
    (void)closure;
    int on = value == NULL ? -1 : PyObject_IsTrue(value);
    if (on < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "blocks cannot be deleted");
        return -1;
    }
    self->blocks = on;
    return 0;
}

static PyObject *Receiver_get_in_block(Receiver *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->in_block);
}

static PyGetSetDef Receiver_getset[] = {
    {"blocks", (getter)Receiver_get_blocks, (setter)Receiver_set_blocks,
     "a socket in blocking mode: a wait with no deadline sleeps in recvmsg itself", NULL},
    {"in_block", (getter)Receiver_get_in_block, NULL,
     "a wait sleeps in recvmsg itself now (interrupt_reads ends it)", NULL},
    {"sender", (getter)Receiver_get_sender, NULL, "raw sockaddr of the last datagram", NULL},
    {"priority", (getter)Receiver_get_priority, NULL, "priority of the last queue message",
     NULL},
    {"overflows", (getter)Receiver_get_overflows, NULL, "the kernel's SO_RXQ_OVFL count", NULL},
    {"truncated", (getter)Receiver_get_truncated, NULL, "datagrams over size, dropped", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._dgram.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The receiving end of a datagram socket or POSIX queue (see the module).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Receiver_init,
    .tp_dealloc = (destructor)Receiver_dealloc,
    .tp_methods = Receiver_methods,
    .tp_getset = Receiver_getset,
};

typedef struct {
    PyObject_HEAD
    int fd;
    int kind;
    Py_ssize_t limit;
    PyObject *coreref; /* the core, weakly: it keeps this sender (_writer.h) */
    PyObject *state;   /* core.__dict__ (borrowed): its fields read without attribute lookups */
    PyObject *backlog; /* core.backlog, a deque the core never replaces */
    PyObject *lock;
    PyObject *acquire; /* the lock's bound methods */
    PyObject *release;
    PyObject *receiver; /* a bound socket: where replies go (its last sender); or NULL */
    char *scratch;      /* a queue message: header and payload joined (8 + limit) */
    PyObject *tstate;   /* fifo: the writer's __dict__ (nothing in progress?) */
    PyObject *encoder;  /* fifo: its envelope Encoder (pid, nonce, seq) */
    PyObject *piece;    /* fifo: protocol/_envelope.c piece(flags, bufs, pid, nonce, seq) */
    unsigned long long sent;
    unsigned long long sent_bytes;
    unsigned long long would_block;
    vectorcallfunc vectorcall;
} MessageSender;

static PyObject *s_backlog, *s_credit_out, *s_closed, *s_sflow;
static PyObject *s_job, *s_batch, *s_corked, *s_framed, *s_pid, *s_nonce, *s_seq;

/* fifo: the piece of one small frame (header + data), numbered with the encoder's
 * next seq (*seq set), or NULL with an exception; Py_None: not now (no exception) */
static PyObject *fifo_piece(MessageSender *self, const unsigned char *header, PyObject *data,
                            PyObject **seq) {
    PyObject *v = PyDict_GetItemWithError(self->tstate, s_job); /* borrowed */
    if (v == NULL)
        return PyErr_Occurred() ? NULL : Py_None;
    if (v != Py_None)
        return Py_None;
    int r;
    if ((r = core_flag(self->tstate, s_corked, 0)) != 0)
        return r < 0 ? NULL : Py_None;
    if ((r = core_flag(self->tstate, s_framed, 0)) != 1)
        return r < 0 ? NULL : Py_None;
    v = PyDict_GetItemWithError(self->tstate, s_batch);
    if (v == NULL)
        return PyErr_Occurred() ? NULL : Py_None;
    if ((r = PyObject_IsTrue(v)) != 0)
        return r < 0 ? NULL : Py_None;
    PyObject *pid = PyObject_GetAttr(self->encoder, s_pid);
    PyObject *nonce = pid == NULL ? NULL : PyObject_GetAttr(self->encoder, s_nonce);
    *seq = nonce == NULL ? NULL : PyObject_GetAttr(self->encoder, s_seq);
    PyObject *head = *seq == NULL ? NULL : PyBytes_FromStringAndSize((const char *)header, 8);
    PyObject *bufs = head == NULL ? NULL : PyTuple_Pack(2, head, data);
    PyObject *flags = bufs == NULL ? NULL : PyLong_FromLong(3); /* FIRST | LAST */
    PyObject *out = NULL;
    if (flags != NULL) {
        PyObject *call[5] = {flags, bufs, pid, nonce, *seq};
        out = PyObject_Vectorcall(self->piece, call, 5, NULL);
    }
    Py_XDECREF(flags);
    Py_XDECREF(bufs);
    Py_XDECREF(head);
    Py_XDECREF(nonce);
    Py_XDECREF(pid);
    if (out == NULL)
        Py_CLEAR(*seq);
    return out;
}


static PyObject *sender_write(MessageSender *self, PyObject *data, Receiver *to);

static PyObject *sender_call(PyObject *op, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames);

/* the call, with the core held for its duration (the sender holds it weakly) */
static PyObject *sender_enter(PyObject *op, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames) {
    PyObject *core = owner_enter(((MessageSender *)op)->coreref);
    if (core == NULL)
        return NULL;
    PyObject *out = sender_call(op, args, nargsf, kwnames);
    Py_DECREF(core);
    return out;
}

static PyObject *sender_call(PyObject *op, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    MessageSender *self = (MessageSender *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "MessageSender(data) takes one argument");
        return NULL;
    }
    PyObject *data = args[0];
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > self->limit)
        Py_RETURN_FALSE;
    Receiver *to = (Receiver *)self->receiver;
    if (to != NULL && to->sender_len == 0)
        Py_RETURN_FALSE; /* nobody to reply to yet: the general way says so */
    /* the write lock, held from the checks to the count: the fifo's numbering reads and
     * sets the encoder's seq, and no other thread may send between */
    int locked = try_lock(self->acquire);
    if (locked <= 0) /* another thread writes: the general way waits for the lock */
        return locked < 0 ? NULL : Py_NewRef(Py_False);
    return unlock_with(self->release, sender_write(self, data, to));
}

/* MessageSender's send, under the write lock: True sent, False not (the general way),
 * NULL an error */
static PyObject *sender_write(MessageSender *self, PyObject *data, Receiver *to) {
    Py_ssize_t owed = PyObject_Length(self->backlog);
    if (owed != 0)
        return owed < 0 ? NULL : Py_NewRef(Py_False);
    int r;
    if ((r = core_flag(self->state, s_credit_out, 1)) != 0 ||
        (r = core_flag(self->state, s_closed, 0)) != 0 ||
        (r = core_flag(self->state, s_sflow, 1)) != 0)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    uint32_t len = (uint32_t)n;
    unsigned char header[8];
    data_header(header, 0, len);
    ssize_t got;
    if (self->kind == KIND_FIFO) {
        PyObject *seq = NULL;
        PyObject *piece = fifo_piece(self, header, data, &seq);
        if (piece == NULL || piece == Py_None)
            return piece == NULL ? NULL : Py_NewRef(Py_False);
        if (!PyBytes_Check(piece)) {
            Py_DECREF(piece);
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "piece() must return bytes");
            return NULL;
        }
        do /* at most PIPE_BUF bytes to a pipe: all or nothing */
            got = write(self->fd, PyBytes_AS_STRING(piece), (size_t)PyBytes_GET_SIZE(piece));
        while (got < 0 && errno == EINTR);
        int whole = got == PyBytes_GET_SIZE(piece);
        Py_DECREF(piece);
        if (got >= 0 && !whole) { /* never for PIPE_BUF bytes; the reader drops a stump */
            Py_DECREF(seq);
            PyErr_SetString(PyExc_OSError, "a fifo piece was written in part");
            return NULL;
        }
        if (got >= 0) { /* the next piece gets the next number */
            unsigned long next = (PyLong_AsUnsignedLong(seq) + 1) & 0xFFFFFFFFul;
            PyObject *n = PyErr_Occurred() ? NULL : PyLong_FromUnsignedLong(next);
            Py_DECREF(seq);
            if (n == NULL || PyObject_SetAttr(self->encoder, s_seq, n) < 0) {
                Py_XDECREF(n);
                return NULL;
            }
            Py_DECREF(n);
        } else {
            Py_DECREF(seq);
        }
    } else if (self->kind == KIND_MQ) {
        memcpy(self->scratch, header, sizeof header);
        memcpy(self->scratch + 8, PyBytes_AS_STRING(data), (size_t)n);
        do
            got = mq_timedsend((mqd_t)self->fd, self->scratch, (size_t)n + 8, 0,
                               &already_expired) == 0
                      ? n + 8
                      : -1;
        while (got < 0 && errno == EINTR);
        if (got < 0 && errno == ETIMEDOUT) /* a blocking descriptor: the queue is full */
            errno = EAGAIN;
    } else {
        struct iovec iov[2] = {
            {.iov_base = header, .iov_len = sizeof header},
            {.iov_base = PyBytes_AS_STRING(data), .iov_len = (size_t)n},
        };
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = n ? 2 : 1;
        if (to != NULL) {
            m.msg_name = &to->sender;
            m.msg_namelen = to->sender_len;
        }
        do
            got = sendmsg(self->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (got < 0 && errno == EINTR);
    }
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            self->would_block++;
        Py_RETURN_FALSE; /* the general way sends again and reports what it meets */
    }
    self->sent++;
    self->sent_bytes += (unsigned long long)n + 8;
    Py_RETURN_TRUE;
}

static PyObject *sender_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int fd, kind;
    PyObject *core, *lock, *receiver = Py_None, *writer = Py_None, *piece = Py_None;
    Py_ssize_t limit;
    static char *kwlist[] = {"fd", "kind", "core", "lock", "limit", "receiver", "writer",
                             "piece", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOOn|OOO:MessageSender", kwlist, &fd, &kind,
                                     &core, &lock, &limit, &receiver, &writer, &piece))
        return NULL;
    if (fd < 0 || (kind != KIND_SOCKET && kind != KIND_MQ && kind != KIND_FIFO) || limit < 0 ||
        limit > 1 << 20 || (kind == KIND_FIFO && (writer == Py_None || !PyCallable_Check(piece)))) {
        PyErr_SetString(PyExc_ValueError, "bad MessageSender arguments");
        return NULL;
    }
    if (receiver != Py_None && !PyObject_TypeCheck(receiver, &ReceiverType)) {
        PyErr_SetString(PyExc_TypeError, "receiver must be a Receiver or None");
        return NULL;
    }
    writer_refs w;
    if (writer_refs_take(&w, core, s_backlog, lock) < 0)
        return NULL;
    MessageSender *self = (MessageSender *)type->tp_alloc(type, 0);
    if (self == NULL) {
        writer_refs_drop(&w);
        return NULL;
    }
    if (writer_refs_weaken(&w, core, &self->coreref) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->state = w.state;
    self->backlog = w.extra;
    self->fd = fd;
    self->kind = kind;
    self->limit = limit;
    self->lock = Py_NewRef(lock);
    self->acquire = w.acquire;
    self->release = w.release;
    self->receiver = receiver == Py_None || kind == KIND_MQ ? NULL : Py_NewRef(receiver);
    self->vectorcall = sender_enter;
    if (kind == KIND_FIFO) {
        self->tstate = PyObject_GenericGetDict(writer, NULL);
        self->encoder = self->tstate == NULL ? NULL : PyObject_GetAttrString(writer, "encoder");
        if (self->encoder == NULL) {
            Py_DECREF(self);
            return NULL;
        }
        self->piece = Py_NewRef(piece);
    }
    if (kind == KIND_MQ && (self->scratch = PyMem_Malloc((size_t)limit + 8)) == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static int sender_traverse(MessageSender *self, visitproc visit, void *arg) {
    Py_VISIT(self->coreref);
    Py_VISIT(self->backlog);
    Py_VISIT(self->lock);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->receiver);
    Py_VISIT(self->tstate);
    Py_VISIT(self->encoder);
    Py_VISIT(self->piece);
    return 0;
}

static int sender_clear(MessageSender *self) {
    Py_CLEAR(self->coreref);
    self->state = NULL; /* borrowed */
    Py_CLEAR(self->backlog);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->receiver);
    Py_CLEAR(self->tstate);
    Py_CLEAR(self->encoder);
    Py_CLEAR(self->piece);
    return 0;
}

static void sender_dealloc(MessageSender *self) {
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *sender_counts(MessageSender *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(KKK)", self->sent, self->sent_bytes, self->would_block);
}

static PyMethodDef sender_methods[] = {
    {"counts", (PyCFunction)sender_counts, METH_NOARGS,
     "counts() -> (sent, sent_bytes, would_block): what this sender moved and met"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MessageSenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._dgram.MessageSender",
    .tp_basicsize = sizeof(MessageSender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "MessageSender(fd, kind, core, lock, limit[, receiver]): send_bytes' hot path "
              "on a message transport (see the module's comment)",
    .tp_new = sender_new,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(MessageSender, vectorcall),
    .tp_methods = sender_methods,
};

static PyMethodDef module_methods[] = {
    {"wait_fifo", (PyCFunction)(void (*)(void))wait_fifo, METH_FASTCALL,
     "wait_fifo(fd, buf, deadline, spin, limit, wake, scan, max_frame, codecs): a fifo: "
     "reader's plain receive, wait and read and unwrap in one call"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_methods = module_methods,
    .m_name = "buzon.protocol._dgram",
    .m_doc = "The receive of datagram sockets and POSIX queues, wait included (C).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__dgram(void) {
    if ((s_backlog = PyUnicode_InternFromString("backlog")) == NULL ||
        (s_credit_out = PyUnicode_InternFromString("credit_out")) == NULL ||
        (s_closed = PyUnicode_InternFromString("closed")) == NULL ||
        (s_sflow = PyUnicode_InternFromString("sflow")) == NULL ||
        (s_job = PyUnicode_InternFromString("_job")) == NULL ||
        (s_batch = PyUnicode_InternFromString("_batch")) == NULL ||
        (s_corked = PyUnicode_InternFromString("_corked")) == NULL ||
        (s_framed = PyUnicode_InternFromString("framed")) == NULL ||
        (s_pid = PyUnicode_InternFromString("pid")) == NULL ||
        (s_nonce = PyUnicode_InternFromString("nonce")) == NULL ||
        (s_seq = PyUnicode_InternFromString("seq")) == NULL)
        return NULL;
    if (PyType_Ready(&ReceiverType) < 0 || PyType_Ready(&MessageSenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReceiverType);
    if (PyModule_AddObject(m, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(&ReceiverType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "MessageSender", (PyObject *)&MessageSenderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "KICK", PyBytes_FromStringAndSize(KICK, sizeof KICK)) < 0 ||
        PyModule_AddIntConstant(m, "SOCKET", KIND_SOCKET) < 0 ||
        PyModule_AddIntConstant(m, "MQ", KIND_MQ) < 0 ||
        PyModule_AddIntConstant(m, "FIFO", KIND_FIFO) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
