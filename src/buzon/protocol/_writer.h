/* What the C writers of small frames share (protocol/_stream.c SmallWriter, _rv.c RvStream,
 * protocol/_credit.c ReceiptWriter, protocol/_dgram.c MessageSender): a look at the
 * channel core's fields, the plain DATA frame's header, and the driver's write lock
 * taken without waiting. Header-only: each extension module includes it once. */
#ifndef BUZON_PROTOCOL_WRITER_H
#define BUZON_PROTOCOL_WRITER_H

#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define BUZON_FRAME_VERSION 1
#define BUZON_KIND_DATA 1

/* 1: the core's field ``name`` is set (``not_none``: not None, else True); 0: not;
 * -1: error (the field is missing) */
static inline int core_flag(PyObject *state, PyObject *name, int not_none) {
    PyObject *v = PyDict_GetItemWithError(state, name); /* borrowed */
    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_AttributeError, "the channel core has no %R", name);
        return -1;
    }
    return not_none ? v != Py_None : v == Py_True;
}

/* The 8-byte header of a plain DATA frame of ``len`` payload bytes (little-endian u32
 * length, as frames.HEADER packs it) */
static inline void data_header(unsigned char header[8], unsigned char flags, uint32_t len) {
    header[0] = BUZON_FRAME_VERSION;
    header[1] = BUZON_KIND_DATA;
    header[2] = flags;
    header[3] = 0;
    header[4] = (unsigned char)(len & 0xFF);
    header[5] = (unsigned char)((len >> 8) & 0xFF);
    header[6] = (unsigned char)((len >> 16) & 0xFF);
    header[7] = (unsigned char)((len >> 24) & 0xFF);
}

/* The write lock's ``acquire(False)``: 1 taken, 0 another thread holds it, -1 error */
static inline int try_lock(PyObject *acquire) {
    PyObject *no = Py_False;
    PyObject *held = PyObject_Vectorcall(acquire, &no, 1, NULL);
    if (held == NULL)
        return -1;
    int got = held == Py_True;
    Py_DECREF(held);
    return got;
}

/* The write lock's ``locked()``: 1 held, 0 free, -1 error. A writer that finds it free
 * and then keeps the GIL and runs no Python code (no callback, no allocation that may
 * collect, its system call made with the GIL held) may write as if it held the lock,
 * provided that write is whole or nothing (writes_whole): another thread may still
 * take the lock meanwhile (one blocked in acquire() takes it without the GIL), but it
 * runs only after this write, which then happened before its turn. A write that may
 * be taken in part keeps a tail for Python code to finish, which needs the lock: such
 * writers take it (try_lock). This saves the acquire(False) call's argument parsing
 * and the release call. */
static inline int lock_held(PyObject *locked) {
    PyObject *held = PyObject_CallNoArgs(locked);
    if (held == NULL)
        return -1;
    int out = held != Py_False;
    Py_DECREF(held);
    return out;
}

/* try_lock of a lock lock_held found free, for a write taken in part after all (which
 * writes_whole rules out): 0 taken, -1 error (RuntimeError if another thread took it) */
static inline int take_free_lock(PyObject *acquire) {
    int got = try_lock(acquire);
    if (got == 0)
        PyErr_SetString(PyExc_RuntimeError, "the write lock was taken during a C write");
    return got > 0 ? 0 : -1;
}

/* 1 if ``fd`` is a pipe or FIFO (fstat), whose non-blocking writes of at most PIPE_BUF
 * bytes are whole or nothing (POSIX), else 0 */
static inline int is_fifo(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode);
}

/* 1 if a write of ``n`` bytes to the file is whole or nothing: a pipe (``fifo``) and at
 * most PIPE_BUF bytes; never in a free-threaded build (no GIL: see lock_held) */
static inline int writes_whole(int fifo, Py_ssize_t n) {
#ifdef Py_GIL_DISABLED
    (void)fifo;
    (void)n;
    return 0;
#else
    return fifo && n <= PIPE_BUF;
#endif
}

/* Frames up to this many bytes (header included) go to the kernel from one contiguous
 * copy on the stack, in a write(2) or send(2): importing a two-entry iovec costs the
 * kernel more than the copy (a 72-byte frame: about 250 ns of a unix socket's
 * 1.5 us sendmsg, 150-250 ns of a pipe's 0.5 us writev; tests/bench/put_floor.c). */
#define BUZON_COPY_MAX 2048

/* The largest write to ``fd`` (``sock``: a socket) that the kernel takes whole or not at
 * all, or 0: a pipe or FIFO, PIPE_BUF (POSIX); a Unix stream socket, BUZON_COPY_MAX
 * (one send(2) of the stack copy: put_once). Linux queues a Unix stream send in
 * buffers of at most half the send buffer less 64 bytes (unix_stream_sendmsg, since
 * 2.6), and the send buffer is never under SOCK_MIN_SNDBUF (two 2 KiB buffers and their
 * heads): a send of at most 2 KiB is one buffer, queued whole, or an error with nothing
 * sent (EAGAIN: no room; EPIPE). TCP may take part of any write (its send queue's last
 * segment has room for part), so a TCP socket's limit is 0. */
static inline Py_ssize_t whole_limit(int fd, int sock) {
    if (!sock)
        return is_fifo(fd) ? PIPE_BUF : 0;
#ifdef __linux__
    int domain = 0, type = 0;
    socklen_t dl = sizeof domain, tl = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &dl) == 0 &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && domain == AF_UNIX &&
        type == SOCK_STREAM)
        return BUZON_COPY_MAX;
#endif
    return 0;
}

/* 1 if a write of ``n`` bytes is whole or nothing, the file's whole_limit ``whole``;
 * never in a free-threaded build (no GIL: see lock_held) */
static inline int writes_whole_upto(Py_ssize_t whole, Py_ssize_t n) {
#ifdef Py_GIL_DISABLED
    (void)whole;
    (void)n;
    return 0;
#else
    return n <= whole;
#endif
}

/* flow.<name> (a SendFlow count) as an unsigned 64-bit count; -1 (with an exception)
 * on error. ``cache`` (may be NULL) holds the last int object seen (a strong
 * reference: an identity match is that very object) and its value: a count that did not
 * change (``limit``, often UNLIMITED = 2**64 - 1, whose conversion takes the slow path)
 * is read without converting it again. The owner drops ``cache->obj`` when it is
 * cleared (Py_CLEAR). */
typedef struct {
    PyObject *obj;
    unsigned long long value;
} count_cache;

static inline int flow_count(PyObject *flow, PyObject *name, unsigned long long *out,
                             count_cache *cache) {
    PyObject *v = PyObject_GetAttr(flow, name);
    if (v == NULL)
        return -1;
    if (cache != NULL && v == cache->obj) {
        *out = cache->value;
        Py_DECREF(v);
        return 0;
    }
    *out = PyLong_AsUnsignedLongLong(v);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        Py_DECREF(v);
        return -1;
    }
    if (cache != NULL) {
        Py_XSETREF(cache->obj, v); /* our reference moves into the cache */
        cache->value = *out;
    } else
        Py_DECREF(v);
    return 0;
}

/* ``release()`` of a lock try_lock took; ``out`` (the caller's result, may be NULL) is
 * returned, or dropped and NULL returned when the release fails */
static inline PyObject *unlock_with(PyObject *release, PyObject *out) {
    PyObject *released = PyObject_CallNoArgs(release);
    if (released == NULL) {
        Py_XDECREF(out);
        return NULL;
    }
    Py_DECREF(released);
    return out;
}

/* A writer's references to the channel core and the driver's write lock: the core's
 * ``__dict__`` (where core_flag looks), ``core.<extra>`` unless ``extra`` is NULL (the
 * stream's pending tail, a message transport's backlog), and the lock's ``acquire`` and
 * ``release``; all new references. */
typedef struct {
    PyObject *state, *extra, *acquire, *release;
} writer_refs;

static inline void writer_refs_drop(writer_refs *w) {
    Py_CLEAR(w->state);
    Py_CLEAR(w->extra);
    Py_CLEAR(w->acquire);
    Py_CLEAR(w->release);
}

/* 0 with every reference taken; -1 with an exception and none kept */
static inline int writer_refs_take(writer_refs *w, PyObject *core, PyObject *extra,
                                   PyObject *lock) {
    w->extra = w->acquire = w->release = NULL;
    w->state = PyObject_GenericGetDict(core, NULL);
    if (w->state == NULL || (extra != NULL && (w->extra = PyObject_GetAttr(core, extra)) == NULL) ||
        (w->acquire = PyObject_GetAttrString(lock, "acquire")) == NULL ||
        (w->release = PyObject_GetAttrString(lock, "release")) == NULL) {
        writer_refs_drop(w);
        return -1;
    }
    return 0;
}

/* One write of a frame that never blocks: ``header`` (8 bytes; NULL: ``data`` is the
 * whole frame already) and then ``n`` bytes of ``data``. A socket (``sock``) is written
 * with MSG_DONTWAIT | MSG_NOSIGNAL (the socket transports keep their sockets in
 * blocking mode); anything else (a non-blocking pipe) with write/writev. A frame of at
 * most BUZON_COPY_MAX bytes is copied to the stack and written with one write/send,
 * a larger one as a two-part writev/sendmsg. EINTR is retried. Returns what the
 * syscall returned (bytes taken, or -1 with errno). */
static inline ssize_t put_once(int fd, int sock, const unsigned char *header, const char *data,
                               size_t n) {
    size_t hn = header != NULL ? 8 : 0;
    ssize_t got;
    if (hn + n <= BUZON_COPY_MAX) {
        unsigned char frame[BUZON_COPY_MAX];
        if (hn)
            memcpy(frame, header, 8);
        if (n)
            memcpy(frame + hn, data, n);
        do
            got = sock ? send(fd, frame, hn + n, MSG_DONTWAIT | MSG_NOSIGNAL)
                       : write(fd, frame, hn + n);
        while (got < 0 && errno == EINTR);
        return got;
    }
    struct iovec iov[2] = {
        {.iov_base = (void *)header, .iov_len = hn},
        {.iov_base = (void *)data, .iov_len = n},
    };
    struct iovec *v = hn ? iov : iov + 1;
    int nv = hn ? 2 : 1;
    do {
        if (sock) {
            struct msghdr msg = {.msg_iov = v, .msg_iovlen = (size_t)nv};
            got = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else
            got = writev(fd, v, nv);
    } while (got < 0 && errno == EINTR);
    return got;
}

/* -- owners held weakly ------------------------------------------------------------
 * A writer sits in its owner's ``__dict__`` (the channel's: the sync driver's shadowing
 * methods; or the core's: ``small_send``). Holding the owner, or its ``__dict__``,
 * strongly would make a reference cycle, and a channel dropped without close() would
 * then live (with its fds) until the cyclic GC ran. So a writer keeps a weak reference
 * to its owner and borrows the owner's ``__dict__`` (the owner keeps it, and never
 * replaces it); each call holds the owner (owner_enter) for its duration, so a drop in
 * another thread while the GIL is released cannot free what the call uses. */

/* ChannelClosed: the owner was dropped (a method taken from the channel outlived it) */
static inline void owner_gone(void) {
    PyObject *m = PyImport_ImportModule("buzon.errors");
    PyObject *cls = m == NULL ? NULL : PyObject_GetAttrString(m, "ChannelClosed");
    Py_XDECREF(m);
    if (cls == NULL)
        return;
    PyErr_SetString(cls, "the channel was dropped without close() (no reference to it was "
                         "left): keep the channel, not only its methods");
    Py_DECREF(cls);
}

/* the owner behind the weak reference ``ref``: a new reference, or NULL with
 * ChannelClosed once it is gone (ValueError if the writer was cleared) */
static inline PyObject *owner_enter(PyObject *ref) {
    if (ref == NULL) {
        PyErr_SetString(PyExc_ValueError, "the writer was cleared");
        return NULL;
    }
    PyObject *o = PyWeakref_GetObject(ref); /* borrowed; None once the owner is gone */
    if (o == NULL)
        return NULL;
    if (o == Py_None) {
        owner_gone();
        return NULL;
    }
    return Py_NewRef(o);
}

/* after writer_refs_take: ``*ref`` a weak reference to ``core`` (a new reference) and
 * ``w->state`` borrowed from then on (see above); -1 with every reference dropped */
static inline int writer_refs_weaken(writer_refs *w, PyObject *core, PyObject **ref) {
    *ref = PyWeakref_NewRef(core, NULL);
    if (*ref == NULL) {
        writer_refs_drop(w);
        return -1;
    }
    Py_DECREF(w->state); /* the core keeps its __dict__ */
    return 0;
}

#endif
