/* The stream hot path of buzon's frames (protocol/frames.py), in C.
 *
 * Two calls, each the C twin of a few lines of Python that run once per message:
 *
 *   write_frame(fd, flags, data) -> int
 *       One plain DATA frame (version 1, kind DATA, ``flags``, no out-of-band
 *       buffers) of the payload ``data``: its 8-byte header and the payload in one
 *       write(2) from a stack copy (a frame of at most 2 KiB; a larger one: one
 *       writev(2); _writer.h put_once). Returns the bytes the kernel took (possibly fewer than 8 +
 *       len(data)); raises OSError as os.write does (BlockingIOError when the
 *       non-blocking fd has no room). The GIL stays held: the fd never blocks.
 *
 *   send_frame(fd, flags, data) -> int
 *       write_frame for a socket: one send(2) (larger: sendmsg) with MSG_DONTWAIT, which never
 *       blocks even when the socket is in blocking mode (the socket transports keep
 *       theirs so: see wait_frame's MODE_BLOCK).
 *
 *   plain_run(data, pos, stop, limit, append) -> int
 *       Hand out the run of complete plain DATA frames (version 1, kind DATA, none
 *       of the flags in NOT_FAST, no buffers, at most ``limit`` bytes each) that
 *       starts at ``data[pos]`` and ends before ``stop``: ``append((flags, body))``
 *       for each, ``body`` a bytes copy. Returns where the run stopped (the first
 *       byte of a frame that is not plain, or is cut short). Anything else is left
 *       to the Python decoder, which stays the reference.
 *
 *   wait_frame(fd, buf, deadline, spin, limit[, wake[, mode]]) -> (flags, body) | int | None
 *       The wait and the read of a plain blocking receive, in one call (the engine's
 *       INPUT step on the read fd, then the read the take does: see _engine.py
 *       recv_steps and ChannelCore.wait_read). Spin ``spin`` seconds with poll(fd, 0)
 *       (data it sees is read at once, without the sleep's poll),
 *       then sleep in poll(fd) until ``deadline`` (time.monotonic() seconds; None: no
 *       limit), then read(2) once into ``buf`` (the frame decoder's empty read buffer)
 *       from its start; the GIL is released meanwhile. Returns ``(flags, body)`` when
 *       the read brought exactly one plain DATA frame (as plain_run defines it, at most
 *       ``limit`` bytes: ``buf`` is then free again), else the number of bytes now in
 *       ``buf[:n]`` for the decoder (0: end of stream), or None when the deadline
 *       passed with nothing read, or when ``wake`` (an fd, -1: none; the channel's
 *       wake eventfd, written by a ``close()`` in another thread) became readable
 *       first: the sleep polls it with ``fd`` and never reads it. A failed poll or read
 *       raises OSError. A signal that interrupts the wait runs its Python handler (with
 *       the GIL), and an exception the handler raises (KeyboardInterrupt) propagates;
 *       otherwise the wait goes on (or ends with None if ``wake`` is readable: the
 *       handler closed the channel). ``mode`` (default 0): bit 1 (MODE_SOCKET), ``fd``
 *       is a stream socket, read with recv(MSG_DONTWAIT) (the socket transports keep
 *       their sockets in blocking mode and pass that flag on every call that must not
 *       wait); bit 2 (MODE_BLOCK), with no deadline, after the spin the sleep is a
 *       blocking recv itself: one system call, and the kernel wakes the reader with the
 *       data (a poll then a read costs a second call and a slower wake-up: measured in
 *       docs/benchmarks.md). Nothing but data, the end of the stream, an error or a
 *       signal ends that recv, so a close() in another thread that must end it writes
 *       ``wake`` and then shuts the socket's reading side down (shutdown(SHUT_RD)):
 *       the recv returns 0 and ``wake``, readable, says it was the close (None). The
 *       caller sets MODE_BLOCK only for a socket no other process holds (a shutdown
 *       would reach that process too). If the file turns out non-blocking (EAGAIN:
 *       O_NONBLOCK is a property of the open file, which another process may share),
 *       the wait sleeps in poll as without the bit.
 *
 *   SmallWriter(fd, core, lock, limit, on_part[, sock])(data[, framed]) -> True | False | int
 *       The hot path of a blocking ``send_bytes`` (ChannelCore.small_send): ``data``,
 *       bytes of at most ``limit``, as one plain DATA frame in one write, when the
 *       channel is quiet (``sock`` true: one send with MSG_DONTWAIT, as write_frame):
 *       ``lock`` (the driver's write lock) is free (taken with acquire(False) and held
 *       from the checks until a partial write's tail is kept: the Python code of
 *       ``on_part`` may let another thread run, which must find the tail owed or
 *       wait for the lock; a write that is never partial, on a pipe of at most
 *       PIPE_BUF bytes, on a Unix stream socket of at most 2 KiB, only finds it free:
 *       _writer.h lock_held, whole_limit), and ``core`` owes
 *       nothing (``pending`` empty, ``credit_out`` None), is open and, if it numbers its
 *       sends (``sflow``: receipts, a capacity), has credit (the write is then counted
 *       in ``sflow.sent``, as ChannelCore.send_small counts it): fields read from the core's ``__dict__`` (``closed`` must be
 *       a bool), ``pending`` a deque the core keeps for good. True: written whole, counted here (``sent``,
 *       ``sent_bytes``; the core adds them to its statistics). False: nothing written
 *       (not quiet, not small bytes, no room, an error): the caller goes the general
 *       way, which meets the same error. Written in part: ``on_part(flags, data, n)``
 *       keeps the tail as the core does for its own writes and returns the frame's
 *       serial, which this call returns for the engine to finish the frame.
 *       ``framed`` true: ``data`` is a whole encoded frame already (at most ``limit`` + 8
 *       bytes, header included: ``Channel._send_frame``, RPC's frames made in C),
 *       written as it is; a partial write's ``on_part`` gets flags -1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#include "_wait.h"
#include "_writer.h"

#define VERSION BUZON_FRAME_VERSION
#define KIND_DATA BUZON_KIND_DATA
#define NOT_FAST 0xF4 /* protocol/frames.py _NOT_FAST: flags a plain frame never has */
#define MODE_SOCKET 1 /* wait_frame: fd is a stream socket: reads are recv(MSG_DONTWAIT) */
#define MODE_BLOCK 2  /* wait_frame: with no deadline, the sleep may be a blocking recv */

static PyObject *put_frame(PyObject *const *args, Py_ssize_t nargs, int sock) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "write_frame(fd, flags, data) takes 3 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd must be a non-negative int");
        return NULL;
    }
    long flags = PyLong_AsLong(args[1]);
    if (flags == -1 && PyErr_Occurred())
        return NULL;
    if (flags < 0 || flags > 255) {
        PyErr_SetString(PyExc_ValueError, "flags must be 0..255");
        return NULL;
    }
    if (!PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(args[2]);
    if (n > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "payload too large for one frame");
        return NULL;
    }
    unsigned char header[8];
    data_header(header, (unsigned char)flags, (uint32_t)n);
    for (;;) {
        ssize_t got = put_once((int)fd, sock, header, PyBytes_AS_STRING(args[2]), (size_t)n);
        if (got >= 0)
            return PyLong_FromSsize_t(got);
        if (errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *write_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return put_frame(args, nargs, 0);
}

static PyObject *send_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return put_frame(args, nargs, 1);
}

static PyObject *plain_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "plain_run(data, pos, stop, limit, append) takes 5 arguments");
        return NULL;
    }
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = pos == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[2]);
    Py_ssize_t limit = stop == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[3]);
    PyObject *append = args[4];
    if (limit == -1 && PyErr_Occurred()) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (pos < 0 || stop < pos || stop > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos and stop must lie within the data");
        return NULL;
    }
    const unsigned char *p = buf.buf;
    while (stop - pos >= 8) {
        const unsigned char *h = p + pos;
        uint32_t blen = (uint32_t)h[4] | ((uint32_t)h[5] << 8) | ((uint32_t)h[6] << 16) |
                        ((uint32_t)h[7] << 24);
        Py_ssize_t total = 8 + (Py_ssize_t)blen;
        if (h[0] != VERSION || h[1] != KIND_DATA || (h[2] & NOT_FAST) || h[3] ||
            total > stop - pos || total > limit)
            break;
        PyObject *body = PyBytes_FromStringAndSize((const char *)h + 8, (Py_ssize_t)blen);
        if (body == NULL)
            goto fail;
        PyObject *item = PyTuple_New(2);
        PyObject *flags = PyLong_FromLong(h[2]); /* a small int: cached, never fails */
        if (item == NULL || flags == NULL) {
            Py_XDECREF(item);
            Py_XDECREF(flags);
            Py_DECREF(body);
            goto fail;
        }
        PyTuple_SET_ITEM(item, 0, flags);
        PyTuple_SET_ITEM(item, 1, body);
        PyObject *r = PyObject_CallOneArg(append, item);
        Py_DECREF(item);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
        pos += total;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(pos);
fail:
    PyBuffer_Release(&buf);
    return NULL;
}


/* 1 if ``fd`` (-1: none) is readable right now (the wake eventfd: a close() wrote it) */
static int readable_now(int fd) {
    if (fd < 0)
        return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    return poll(&p, 1, 0) > 0;
}

/* A single plain DATA frame filling buf[0:n] exactly: its flags, else -1. */
static int single_plain(const unsigned char *h, Py_ssize_t n, Py_ssize_t limit) {
    if (n < 8)
        return -1;
    uint32_t blen = (uint32_t)h[4] | ((uint32_t)h[5] << 8) | ((uint32_t)h[6] << 16) |
                    ((uint32_t)h[7] << 24);
    if (h[0] != VERSION || h[1] != KIND_DATA || (h[2] & NOT_FAST) || h[3] ||
        8 + (Py_ssize_t)blen != n || n > limit)
        return -1;
    return h[2];
}

static PyObject *wait_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 5 || nargs > 7) {
        PyErr_SetString(PyExc_TypeError, "wait_frame(fd, buf, deadline, spin, limit[, wake[, "
                                         "mode]]) takes 5 to 7 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd must be a non-negative int");
        return NULL;
    }
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
    long wake = -1;
    if (nargs >= 6) {
        wake = PyLong_AsLong(args[5]);
        if (wake == -1 && PyErr_Occurred())
            return NULL;
        if (wake < -1 || wake > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "wake must be an fd or -1");
            return NULL;
        }
    }
    long mode = 0;
    if (nargs == 7) {
        mode = PyLong_AsLong(args[6]);
        if (mode == -1 && PyErr_Occurred())
            return NULL;
        if (mode & ~(long)(MODE_SOCKET | MODE_BLOCK)) {
            PyErr_SetString(PyExc_ValueError, "mode must be a combination of 1 and 2");
            return NULL;
        }
    }
    int sock = (mode & MODE_SOCKET) != 0;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    if (buf.len < 8) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "buf must hold at least a frame header");
        return NULL;
    }
    /* pfd[1]: the wake fd, polled only by the sleep (a spin is bounded anyway) */
    struct pollfd pfds[2] = {
        {.fd = (int)fd, .events = POLLIN, .revents = 0},
        {.fd = (int)wake, .events = POLLIN, .revents = 0},
    };
    struct pollfd *pfd = &pfds[0];
    nfds_t nfds = wake >= 0 ? 2 : 1;
    ssize_t got = -1;
    int err = 0, timed_out = 0;
    if (spin > 0.0) { /* the spin budget: readiness checks, no sleep, no EINTR */
        int ready = 0, e = 0;
        Py_BEGIN_ALLOW_THREADS
        double end = monotonic_now() + spin;
        while ((ready = poll(pfd, 1, 0)) == 0 && monotonic_now() < end)
            ;
        if (ready > 0 && (pfd->revents & POLLIN)) { /* data seen: read it now (the sleep's
                                                      * poll would only say so again) */
            got = sock ? recv((int)fd, buf.buf, (size_t)buf.len, MSG_DONTWAIT)
                       : read((int)fd, buf.buf, (size_t)buf.len);
            if (got < 0)
                e = errno;
        }
        Py_END_ALLOW_THREADS
        /* a signal that came while spinning interrupted nothing: its handler runs now */
        if (ready <= 0 && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&buf);
            return NULL;
        }
        if (got > 0)
            goto done;
        if (got == 0) { /* the end of the stream, or a close()'s shutdown (MODE_BLOCK) */
            timed_out = readable_now((int)wake);
            goto done;
        }
        if (e != 0 && e != EAGAIN && e != EWOULDBLOCK && e != EINTR) {
            err = e;
            goto done;
        }
        got = -1; /* nothing after all: wait as usual */
    }
    if ((mode & MODE_BLOCK) && forever) {
        /* the sleep is the read: a blocking recv, woken by the data itself (a poll then a
         * read costs a second system call and a slower wake-up). A close() in another
         * thread writes ``wake`` and then shuts the socket's reading side down (see the
         * module's comment), which ends this recv with 0: ``wake`` tells it from the end
         * of the stream. EAGAIN: the file is non-blocking after all (O_NONBLOCK belongs
         * to the open file, which another process may share): sleep in poll instead. */
        for (;;) {
            int e = 0;
            Py_BEGIN_ALLOW_THREADS
            got = recv((int)fd, buf.buf, (size_t)buf.len, 0);
            if (got < 0)
                e = errno;
            Py_END_ALLOW_THREADS
            if (got > 0)
                break;
            if (got == 0) {
                timed_out = readable_now((int)wake);
                break;
            }
            if (e == EINTR) { /* a signal: its handler runs now; what it raises ends the wait */
                if (PyErr_CheckSignals() < 0) {
                    PyBuffer_Release(&buf);
                    return NULL;
                }
                if (readable_now((int)wake)) { /* the handler closed the channel */
                    timed_out = 1;
                    break;
                }
                continue;
            }
            if (e != EAGAIN && e != EWOULDBLOCK)
                err = e;
            break;
        }
        if (got >= 0 || err || timed_out)
            goto done;
        got = -1; /* EAGAIN: a non-blocking file; sleep in poll */
    }
    for (;;) {
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
            got = sock ? recv((int)fd, buf.buf, (size_t)buf.len, MSG_DONTWAIT)
                       : read((int)fd, buf.buf, (size_t)buf.len);
            if (got == 0 && readable_now((int)wake)) { /* the close's shutdown (MODE_BLOCK) */
                timed_out = 1;
                break;
            }
            if (got >= 0)
                break;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                err = errno;
                break;
            }
            /* readable, yet nothing to read (an error the read did not report): wait on */
            if (pfd->revents & POLLNVAL) {
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
done:
    if (err) {
        PyBuffer_Release(&buf);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (timed_out) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE;
    }
    const unsigned char *h = buf.buf;
    int flags = single_plain(h, (Py_ssize_t)got, limit);
    PyObject *out;
    if (flags >= 0) {
        PyObject *body = PyBytes_FromStringAndSize((const char *)h + 8, (Py_ssize_t)got - 8);
        out = body == NULL ? NULL : PyTuple_New(2);
        if (out == NULL) {
            Py_XDECREF(body);
        } else {
            PyTuple_SET_ITEM(out, 0, PyLong_FromLong(flags)); /* a cached small int */
            PyTuple_SET_ITEM(out, 1, body);
        }
    } else {
        out = PyLong_FromSsize_t((Py_ssize_t)got);
    }
    PyBuffer_Release(&buf);
    return out;
}

typedef struct {
    PyObject_HEAD
    int fd;
    int sock; /* a socket: send(MSG_DONTWAIT) (it may be in blocking mode) */
    Py_ssize_t whole; /* writes of at most this many bytes are whole or nothing (whole_limit) */
    Py_ssize_t limit;
    PyObject *coreref; /* the core, weakly: it keeps this writer (_writer.h) */
    PyObject *state; /* core.__dict__ (borrowed): its fields read without attribute lookups */
    PyObject *pending; /* core.pending, a deque the core never replaces */
    PyObject *lock;
    PyObject *acquire; /* the lock's bound methods */
    PyObject *release;
    PyObject *locked;
    PyObject *on_part;
    unsigned long long sent;
    unsigned long long sent_bytes;
    unsigned long long would_block;
    count_cache limit_cache; /* the flow's last limit and its value (_writer.h) */
    vectorcallfunc vectorcall;
} SmallWriter;

static PyObject *s_pending, *s_credit_out, *s_closed, *s_sflow, *s_sent, *s_limit;



static PyObject *small_write(SmallWriter *self, PyObject *data, int framed, int have_lock);

static PyObject *small_writer_call(PyObject *op, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames);

/* the call, with the core held for its duration (the writer holds it weakly) */
static PyObject *small_writer_enter(PyObject *op, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    PyObject *core = owner_enter(((SmallWriter *)op)->coreref);
    if (core == NULL)
        return NULL;
    PyObject *out = small_writer_call(op, args, nargsf, kwnames);
    Py_DECREF(core);
    return out;
}

static PyObject *small_writer_call(PyObject *op, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    SmallWriter *self = (SmallWriter *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || nargs > 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "SmallWriter(data[, framed]) takes one or two arguments");
        return NULL;
    }
    PyObject *data = args[0];
    int framed = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (framed < 0)
        return NULL;
    /* framed: ``data`` is a whole encoded frame (header included), of at most limit + 8 */
    if (!PyBytes_CheckExact(data) || PyBytes_GET_SIZE(data) > self->limit + (framed ? 8 : 0) ||
        (framed && PyBytes_GET_SIZE(data) < 8))
        Py_RETURN_FALSE;
    /* the write lock, held from the checks until a partial write's tail is kept (Python
     * code, during which another thread may run: it must find the tail owed, or wait);
     * a write never partial (a pipe's of at most PIPE_BUF bytes, a Unix stream
     * socket's of at most 2 KiB: whole_limit) only finds it free
     * (this thread keeps the GIL and runs no Python code: _writer.h lock_held) */
    if (writes_whole_upto(self->whole, PyBytes_GET_SIZE(data) + (framed ? 0 : 8))) {
        int held = lock_held(self->locked);
        if (held != 0) /* another thread writes: the general way waits for the lock */
            return held < 0 ? NULL : Py_NewRef(Py_False);
        return small_write(self, data, framed, 0);
    }
    int locked = try_lock(self->acquire);
    if (locked <= 0) /* another thread writes: the general way waits for the lock */
        return locked < 0 ? NULL : Py_NewRef(Py_False);
    return unlock_with(self->release, small_write(self, data, framed, 1));
}

/* SmallWriter's write, the write lock free (``have_lock``: held by this call): True
 * written whole, False nothing written (the general way), an int (a partial write: the
 * frame's serial), NULL an error */
static PyObject *small_write(SmallWriter *self, PyObject *data, int framed, int have_lock) {
    Py_ssize_t owed = PyObject_Length(self->pending);
    if (owed != 0)
        return owed < 0 ? NULL : Py_NewRef(Py_False);
    int r;
    if ((r = core_flag(self->state, s_credit_out, 1)) != 0 ||
        (r = core_flag(self->state, s_closed, 0)) != 0)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    /* a channel that numbers its sends (receipts, a capacity: ``sflow``) counts this one
     * in flow.sent, as send_small does, while it has credit (sent < limit) */
    PyObject *flow = PyDict_GetItemWithError(self->state, s_sflow); /* borrowed */
    if (flow == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_False);
    PyObject *next = NULL; /* flow.sent + 1, made before the write: nothing can fail after */
    if (flow != Py_None) {
        unsigned long long sent, limit;
        if (flow_count(flow, s_sent, &sent, NULL) < 0 ||
            flow_count(flow, s_limit, &limit, &self->limit_cache) < 0)
            return NULL;
        if (sent >= limit) /* the general way tells the receiver, and the engine waits */
            return Py_NewRef(Py_False);
        next = PyLong_FromUnsignedLongLong(sent + 1);
        if (next == NULL)
            return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    unsigned char header[8];
    data_header(header, 0, (uint32_t)n);
    Py_ssize_t whole = framed ? n : n + 8;
    ssize_t got = put_once(self->fd, self->sock, framed ? NULL : header, PyBytes_AS_STRING(data),
                           (size_t)n);
    if (got < 0) {
        Py_XDECREF(next);
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            self->would_block++;
        Py_RETURN_FALSE; /* the general way writes again and reports what it meets */
    }
    if (next != NULL) { /* a slot's setattr of an int: no Python code runs */
        int set = PyObject_SetAttr(flow, s_sent, next);
        Py_DECREF(next);
        if (set < 0)
            return NULL;
    }
    if (got == whole) {
        self->sent++;
        self->sent_bytes += (unsigned long long)got;
        Py_RETURN_TRUE;
    }
    /* the tail is kept by Python code: under the write lock (free: see the caller) */
    if (!have_lock && take_free_lock(self->acquire) < 0)
        return NULL;
    PyObject *flags = PyLong_FromLong(framed ? -1 : 0); /* -1: the tail of a whole frame */
    PyObject *wrote = PyLong_FromSsize_t(got);
    PyObject *out = NULL;
    if (flags != NULL && wrote != NULL) {
        PyObject *call[3] = {flags, data, wrote};
        out = PyObject_Vectorcall(self->on_part, call, 3, NULL);
    }
    Py_XDECREF(flags);
    Py_XDECREF(wrote);
    return have_lock ? out : unlock_with(self->release, out);
}

static PyObject *small_writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    int fd, sock = 0;
    PyObject *core, *lock, *on_part;
    Py_ssize_t limit;
    static char *kwlist[] = {"fd", "core", "lock", "limit", "on_part", "sock", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOnO|p:SmallWriter", kwlist, &fd, &core,
                                     &lock, &limit, &on_part, &sock))
        return NULL;
    if (fd < 0 || limit < 0 || limit > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fd and limit must be non-negative");
        return NULL;
    }
    writer_refs w;
    if (writer_refs_take(&w, core, s_pending, lock) < 0)
        return NULL;
    PyObject *locked = PyObject_GetAttrString(lock, "locked");
    SmallWriter *self = locked == NULL ? NULL : (SmallWriter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(locked);
        writer_refs_drop(&w);
        return NULL;
    }
    self->locked = locked;
    if (writer_refs_weaken(&w, core, &self->coreref) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->state = w.state;
    self->pending = w.extra;
    self->acquire = w.acquire;
    self->release = w.release;
    self->fd = fd;
    self->sock = sock;
    self->whole = whole_limit(fd, sock);
    self->limit = limit;
    self->lock = Py_NewRef(lock);
    self->on_part = Py_NewRef(on_part);
    self->vectorcall = small_writer_enter;
    return (PyObject *)self;
}

static int small_writer_traverse(SmallWriter *self, visitproc visit, void *arg) {
    Py_VISIT(self->coreref);
    Py_VISIT(self->pending);
    Py_VISIT(self->lock);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->locked);
    Py_VISIT(self->on_part);
    return 0;
}

static int small_writer_clear(SmallWriter *self) {
    Py_CLEAR(self->coreref);
    self->state = NULL; /* borrowed */
    Py_CLEAR(self->pending);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->locked);
    Py_CLEAR(self->on_part);
    Py_CLEAR(self->limit_cache.obj);
    return 0;
}

static void small_writer_dealloc(SmallWriter *self) {
    PyObject_GC_UnTrack(self);
    small_writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *small_writer_counts(SmallWriter *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(KKK)", self->sent, self->sent_bytes, self->would_block);
}

static PyMethodDef small_writer_methods[] = {
    {"counts", (PyCFunction)small_writer_counts, METH_NOARGS,
     "counts() -> (sent, sent_bytes, would_block): what this writer moved and met"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SmallWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._stream.SmallWriter",
    .tp_basicsize = sizeof(SmallWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "SmallWriter(fd, core, lock, limit, on_part[, sock]): send_bytes' hot path "
              "(see the module's comment)",
    .tp_new = small_writer_new,
    .tp_dealloc = (destructor)small_writer_dealloc,
    .tp_traverse = (traverseproc)small_writer_traverse,
    .tp_clear = (inquiry)small_writer_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SmallWriter, vectorcall),
    .tp_methods = small_writer_methods,
};

static PyMethodDef methods[] = {
    {"write_frame", (PyCFunction)(void (*)(void))write_frame, METH_FASTCALL,
     "write_frame(fd, flags, data) -> int: one plain DATA frame in one writev"},
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL,
     "send_frame(fd, flags, data) -> int: write_frame on a socket, one sendmsg with "
     "MSG_DONTWAIT"},
    {"plain_run", (PyCFunction)(void (*)(void))plain_run, METH_FASTCALL,
     "plain_run(data, pos, stop, limit, append) -> int: hand out a run of plain frames"},
    {"wait_frame", (PyCFunction)(void (*)(void))wait_frame, METH_FASTCALL,
     "wait_frame(fd, buf, deadline, spin, limit[, wake[, mode]]) -> (flags, body) | int | "
     "None: wait, "
     "read and parse a plain receive in one call"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._stream",
    "The stream hot path of buzon's frames (see protocol/frames.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__stream(void) {
    if ((s_pending = PyUnicode_InternFromString("pending")) == NULL ||
        (s_credit_out = PyUnicode_InternFromString("credit_out")) == NULL ||
        (s_closed = PyUnicode_InternFromString("closed")) == NULL ||
        (s_sflow = PyUnicode_InternFromString("sflow")) == NULL ||
        (s_sent = PyUnicode_InternFromString("sent")) == NULL ||
        (s_limit = PyUnicode_InternFromString("limit")) == NULL)
        return NULL;
    if (PyType_Ready(&SmallWriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "SmallWriter", (PyObject *)&SmallWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
