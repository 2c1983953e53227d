/* A blocking channel's plain receive and send of bytes, with no Python frame (the sync
 * driver, sync/_channel.py: Channel._make_take and _make_put).
 *
 *   Take(channel, core, lock, kind, wait, fallback, rest, failed, max_frame)
 *       Made for a channel with ``spin=0`` and no ``idle_timeout`` whose receive takes
 *       one C wait (ChannelCore.wait_read / wait_message): it becomes the channel's
 *       ``recv_bytes``. ``kind`` 0: a stream read with read(2) (``wait`` is
 *       ``(wait_frame, fd, 0)``, protocol._stream.wait_frame on a pipe or another plain
 *       fd); 1: a message transport's Receiver.wait or a fifo: reader's
 *       FifoWaiter.wait (``wait(deadline, spin, limit, wake)``); 2: a stream socket
 *       (``wait`` is ``(wait_frame, fd, wait_mode)``): wait_frame in the mode that
 *       ``wait_mode()`` (the transport's) gives for each wait, as the driver's
 *       _wait_take: with MODE_BLOCK the sleep is recv itself, and the channel's
 *       ``_blocking_reader`` is set for the wait's duration (a close() in another
 *       thread then shuts the reading side down: Channel.close); without it (a socket
 *       another process holds too, which a shutdown would reach) a poll and a read.
 *
 *   take(timeout=None) -> bytes
 *       What ``Channel.recv_bytes(timeout)`` does on its spin=0 path with no deadline,
 *       written once more without its Python frames: the read lock taken without
 *       waiting, the checks of ChannelCore.buffered/wait_read/wait_message and of the
 *       driver's _receive (nothing read ahead, open, not at the end, no takes to
 *       number, a wake fd made, a receive that sleeps first: ``_sleep_first``), the
 *       driver's waiter bookkeeping around the wait (``_waiters``, so that a close()
 *       in another thread wakes it and releases the fds only after it left), the wait
 *       itself, and the counts of a lone plain frame (after_wait / after_message:
 *       ``core.taken`` there, the statistics here: ``counts()``, which
 *       ChannelCore.statistics adds to messages_received and bytes_received).
 *       Anything else goes to Python, which stays the reference: any argument but a
 *       missing or None timeout, or a check that fails, calls ``fallback(channel,
 *       *args, **kwargs)`` (the class's recv_bytes) from the start; what the wait
 *       returned when it is not a lone plain frame (None, a byte count for the
 *       decoder, a whole message for the Python path) goes to ``rest(got, room)``,
 *       an OSError of the wait to ``failed(exc)`` (which raises the typed error), both
 *       called with the lock still held, as the Python path holds it. Any other
 *       exception of the wait (what a signal handler raised) propagates.
 *
 *   Put(channel, core, fallback, partial)(data) -> None
 *       What ``Channel.send_bytes(data)`` does first, without its Python frame: when the
 *       core's ``small_send`` (the C writer of a quiet channel's small frames:
 *       protocol/_stream.c SmallWriter, protocol/_dgram.c MessageSender; None when it
 *       does not apply) is set, call it: True, done; an int (the kernel took part of
 *       the frame), ``partial(serial)`` finishes it (the driver's _send_slow). Anything
 *       else — a timeout or priority argument, no ``small_send``, or False (nothing
 *       written) — calls ``fallback(channel, *args, **kwargs)`` (the class's
 *       send_bytes, which meets the same condition and goes the general way).
 *
 *       With no ``small_send``, a shared-memory ring's send (the core's ``fast_send``,
 *       RingFrames.try_send_frame; set only on a ring, which has no decoder and so no
 *       ``small_send`` nor rendezvous stream, whose checks come first in the method):
 *       exact bytes of at most ``fast_bytes_limit`` go to ``fast_send(data, 0)``;
 *       True, done (the ring counts); anything else calls the fallback, which tries
 *       the ring once more and then goes the general way. One C call per send, as
 *       the roadmap asks of the shm fast path.
 *
 *   RingTake(channel, core, fallback, rest)(timeout=None) -> bytes
 *       ``Channel.recv_bytes``' first step on a shared-memory ring, without its Python
 *       frame: while the core's ``fast_recv`` (RingFrames.try_recv_frame) is set and
 *       its ``inbox`` empty, take one record: a plain frame's body comes back as it is
 *       (the ring counted it); another record goes to ``rest(got, timeout)``, the
 *       driver's ``_after_fast``; an empty ring (or a keyword argument, or no
 *       ``fast_recv``) calls ``fallback(channel, *args, **kwargs)``, the method, which
 *       looks at the ring again and then spins and waits.
 *
 * The fields read are the drivers' and the core's own: ``_closing``, ``_wake``,
 * ``_sleep_first``, ``_waiters``, ``_pumpers`` (and, written, ``_blocking_reader``) of
 * the channel; ``closed``, ``eof``,
 * ``taking``, ``inbox``, ``taken``, ``decoder``, ``_wait_buf`` and
 * ``_wait_limit`` of the core (read from their ``__dict__`` each call: a missing one
 * raises AttributeError, never a wrong answer).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stddef.h>

#include "_writer.h"

enum { KIND_STREAM = 0, KIND_MESSAGE = 1, KIND_SOCKET = 2 };
#define WAIT_BLOCK 2 /* wait_frame's mode bit: the sleep is recv itself (_stream.c) */

static PyObject *s_closing, *s_wake, *s_sleep_first, *s_waiters, *s_pumpers, *s_closed, *s_eof,
    *s_taking, *s_inbox, *s_taken, *s_decoder, *s_wait_buf, *s_wait_limit,
    *s_idle_buffer, *s_drop_wake, *s_wake_pumpers, *s_small_send, *s_blocks, *s_fast_send,
    *s_fast_bytes_limit, *s_fast_recv, *s_max_frame;
static PyObject *s_blocking_reader;
static PyObject *zero_float, *one, *zero_int; /* the spin 0.0; 1; 0 */

typedef struct {
    PyObject_HEAD
    PyObject *chref;   /* the channel, weakly: its __dict__ keeps this (_writer.h) */
    PyObject *channel; /* borrowed, as its __dict__: held during a call */
    PyObject *chd;  /* the channel's __dict__ */
    PyObject *cored; /* the core's __dict__ */
    PyObject *acquire, *release;
    PyObject *wait, *fallback, *rest, *failed;
    PyObject *max_frame; /* an int: the limit of a message transport's wait */
    PyObject *drop_wake, *wake_pumpers; /* the class's functions (of the channel) */
    PyObject *receiver; /* kind 1: the wait's object (its ``blocks``), or NULL */
    int kind;
    unsigned long long received, received_bytes; /* folded in by statistics() */
    vectorcallfunc vectorcall;
} Take;

/* the dict's value for ``name``, borrowed; NULL with AttributeError if missing */
static PyObject *field(PyObject *d, PyObject *name) {
    PyObject *v = PyDict_GetItemWithError(d, name);
    if (v == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_AttributeError, "no field %R", name);
    return v;
}

/* 1: the fast path applies (the lock is then held), 0: it does not (the lock free
 * again), -1: error (the lock free again). ``*wake``, ``*buf``, ``*limit`` for the wait. */
static int take_checks(Take *self, long *wake, PyObject **buf, PyObject **limit) {
    PyObject *chd = self->chd, *cored = self->cored, *v;
    int held = try_lock(self->acquire);
    if (held <= 0)
        return held;
    if ((v = field(chd, s_closing)) == NULL)
        goto error;
    if (v != Py_False)
        goto no;
    if ((v = field(chd, s_wake)) == NULL)
        goto error;
    if (!PyLong_CheckExact(v) || (*wake = PyLong_AsLong(v)) < 0)
        goto no;
    if ((v = field(chd, s_sleep_first)) == NULL)
        goto error;
    long sleep_first = PyLong_CheckExact(v) ? PyLong_AsLong(v) : 0;
    /* a receiver that sleeps in recvmsg itself never reads first; nor a stream socket's
     * wait (recv itself, or poll then recv when the socket is shared: at once either way
     * when data is there) */
    int blocking = self->kind == KIND_SOCKET;
    if (self->receiver != NULL) {
        PyObject *b = PyObject_GetAttr(self->receiver, s_blocks);
        if (b == NULL)
            goto error;
        blocking = b == Py_True;
        Py_DECREF(b);
    }
    if (sleep_first <= 0 && !blocking)
        goto no; /* the driver's _receive reads first (and counts again) */
    if ((v = field(cored, s_closed)) == NULL)
        goto error;
    if (v != Py_False)
        goto no;
    if ((v = field(cored, s_eof)) == NULL)
        goto error;
    if (v != Py_False)
        goto no;
    if ((v = field(cored, s_taking)) == NULL)
        goto error;
    if (v != Py_False)
        goto no;
    if ((v = field(cored, s_inbox)) == NULL)
        goto error;
    Py_ssize_t n = PyObject_Length(v);
    if (n < 0)
        goto error;
    if (n)
        goto no;
    if (self->kind != KIND_MESSAGE) {
        PyObject *decoder = field(cored, s_decoder);
        if (decoder == NULL)
            goto error;
        PyObject *idle = PyObject_CallMethodNoArgs(decoder, s_idle_buffer);
        if (idle == NULL)
            goto error;
        PyObject *known = PyDict_GetItemWithError(cored, s_wait_buf);
        Py_DECREF(idle); /* the decoder keeps it: compared by identity only */
        if (known == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto no;
        }
        if (idle != known || idle == Py_None)
            goto no; /* not idle, or a new buffer: wait_read notes it */
        if ((*limit = field(cored, s_wait_limit)) == NULL)
            goto error;
        *buf = known;
    } else {
        *buf = NULL;
        *limit = self->max_frame;
    }
    if (blocking)
        return 1;
    PyObject *left = PyLong_FromLong(sleep_first - 1);
    if (left == NULL || PyDict_SetItem(chd, s_sleep_first, left) < 0) {
        Py_XDECREF(left);
        goto error;
    }
    Py_DECREF(left);
    return 1;
no:
    if (unlock_with(self->release, Py_NewRef(Py_None)) == NULL)
        return -1;
    Py_DECREF(Py_None);
    return 0;
error: {
    PyObject *t, *val, *tb;
    PyErr_Fetch(&t, &val, &tb);
    PyObject *r = PyObject_CallNoArgs(self->release);
    Py_XDECREF(r);
    if (r == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(val);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(t, val, tb);
    return -1;
}
}

/* remove the first item equal to ``me`` from the list ``waiters`` (list.remove) */
static int remove_waiter(PyObject *waiters, PyObject *me) {
    if (!PyList_Check(waiters)) {
        PyErr_SetString(PyExc_TypeError, "_waiters must be a list");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(waiters); i++) {
        int eq = PyObject_RichCompareBool(PyList_GET_ITEM(waiters, i), me, Py_EQ);
        if (eq < 0)
            return -1;
        if (eq)
            return PyList_SetSlice(waiters, i, i + 1, NULL);
    }
    PyErr_SetString(PyExc_ValueError, "the waiting thread is not in _waiters");
    return -1;
}

/* ``d[name] += 1`` for an int field of a ``__dict__`` */
static int increment(PyObject *d, PyObject *name) {
    PyObject *old = field(d, name);
    if (old == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(old, one);
    if (sum == NULL)
        return -1;
    int r = PyDict_SetItem(d, name, sum);
    Py_DECREF(sum);
    return r;
}

/* the counts of a lone plain frame taken (ChannelCore.after_wait's first branch): the
 * statistics here (``counts()``, which ChannelCore.statistics adds), ``core.taken``
 * (receipts number from it) in the core */
static int count_taken(Take *self, Py_ssize_t body) {
    if (increment(self->cored, s_taken) < 0)
        return -1;
    self->received++;
    self->received_bytes += (unsigned long long)body + 8;
    return 0;
}

/* the exception being raised, kept while ``release`` runs (and dropped if it fails) */
static PyObject *release_raising(PyObject *release) {
    PyObject *t, *val, *tb;
    PyErr_Fetch(&t, &val, &tb);
    PyObject *r = PyObject_CallNoArgs(release);
    if (r == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(val);
        Py_XDECREF(tb);
        return NULL;
    }
    Py_DECREF(r);
    PyErr_Restore(t, val, tb);
    return NULL;
}

/* ``fallback(channel, *args, **kwargs)`` */
static PyObject *call_method(PyObject *channel, PyObject *fallback, PyObject *const *args,
                             size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *small[8];
    PyObject **all = small;
    if (nargs + nkw + 1 > 8) {
        all = PyMem_Malloc((size_t)(nargs + nkw + 1) * sizeof(PyObject *));
        if (all == NULL)
            return PyErr_NoMemory();
    }
    all[0] = channel;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        all[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(fallback, all, (size_t)(nargs + 1), kwnames);
    if (all != small)
        PyMem_Free(all);
    return r;
}

static PyObject *take_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames);

/* the call, with the channel held for its duration (the Take holds it weakly) */
static PyObject *take_enter(PyObject *callable, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames) {
    PyObject *channel = owner_enter(((Take *)callable)->chref);
    if (channel == NULL)
        return NULL;
    PyObject *out = take_call(callable, args, nargsf, kwnames);
    Py_DECREF(channel);
    return out;
}

static PyObject *take_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    Take *self = (Take *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (self->channel == NULL) {
        PyErr_SetString(PyExc_ValueError, "the Take was cleared");
        return NULL;
    }
    if (nargs > 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) ||
        (nargs == 1 && args[0] != Py_None))
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    long wake = -1;
    PyObject *buf = NULL, *limit = NULL;
    int ok = take_checks(self, &wake, &buf, &limit);
    if (ok < 0)
        return NULL;
    if (ok == 0)
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    /* the lock is held from here on; buf and limit are borrowed from the core's dict,
     * which the wait's release of the GIL may change: hold our own references */
    Py_XINCREF(buf);
    Py_INCREF(limit);
    Py_ssize_t room = buf == NULL ? 0 : PyObject_Length(buf);
    PyObject *waiters = Py_XNewRef(field(self->chd, s_waiters));
    PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    PyObject *wakeobj = PyLong_FromLong(wake);
    PyObject *got = NULL;
    if (room < 0 || waiters == NULL || me == NULL || wakeobj == NULL ||
        !PyList_Check(waiters) || PyList_Append(waiters, me) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_waiters must be a list");
        Py_XDECREF(buf);
        Py_DECREF(limit);
        Py_XDECREF(waiters);
        Py_XDECREF(me);
        Py_XDECREF(wakeobj);
        return release_raising(self->release);
    }
    /* a stream socket's wait takes the transport's wait_mode() of the moment: it sleeps
     * in recv itself (WAIT_BLOCK) unless another process holds the socket too (the
     * close's shutdown would reach it), as the driver's _wait_take; such a wait is
     * marked (``_blocking_reader``) before the look below, so that a close() that
     * finds this thread among the waiters shuts the reading side down to end it */
    PyObject *mode = NULL;
    if (self->kind == KIND_SOCKET) {
        mode = PyObject_CallNoArgs(PyTuple_GET_ITEM(self->wait, 2));
        long bits = mode == NULL ? -1 : PyLong_AsLong(mode);
        if (bits == -1 && PyErr_Occurred()) {
            Py_CLEAR(mode);
        } else if (PyDict_SetItem(self->chd, s_blocking_reader,
                                  bits & WAIT_BLOCK ? Py_True : Py_False) < 0) {
            Py_CLEAR(mode);
        }
    }
    /* a close() in another thread may have run while the checks called Python code
     * (idle_buffer): among the waiters now, look again, as the driver does after it
     * joined them; closing, the wait is over before it began (rest raises) */
    PyObject *closing_now = self->kind == KIND_SOCKET && mode == NULL
                                ? NULL
                                : field(self->chd, s_closing);
    if (closing_now == NULL) {
        got = NULL;
    } else if (closing_now != Py_False) {
        got = Py_NewRef(Py_None);
    } else if (self->kind != KIND_MESSAGE) {
        /* self->wait is (wait_frame, fd, mode) (a socket: (wait_frame, fd, wait_mode)):
         * wait_frame(fd, buf, deadline, spin, limit, wake, mode) */
        PyObject *bound = self->wait;
        PyObject *argv[7] = {PyTuple_GET_ITEM(bound, 1), buf, Py_None, zero_float, limit,
                             wakeobj, mode != NULL ? mode : PyTuple_GET_ITEM(bound, 2)};
        got = PyObject_Vectorcall(PyTuple_GET_ITEM(bound, 0), argv, 7, NULL);
    } else {
        PyObject *argv[4] = {Py_None, zero_float, limit, wakeobj};
        got = PyObject_Vectorcall(self->wait, argv, 4, NULL);
    }
    Py_DECREF(wakeobj);
    Py_XDECREF(buf);
    Py_DECREF(limit);
    Py_XDECREF(mode);
    /* the driver's finally: leave the waiters; a close() meanwhile releases the wake fd */
    {
        PyObject *t, *val, *tb;
        PyErr_Fetch(&t, &val, &tb);
        int bad = self->kind == KIND_SOCKET
                      ? PyDict_SetItem(self->chd, s_blocking_reader, Py_False)
                      : 0;
        if (bad == 0)
            bad = remove_waiter(waiters, me);
        PyObject *closing = bad < 0 ? NULL : field(self->chd, s_closing);
        if (closing == Py_True) {
            PyObject *r = PyObject_CallOneArg(self->drop_wake, self->channel);
            if (r == NULL)
                bad = -1;
            Py_XDECREF(r);
        } else if (closing == NULL) {
            bad = -1;
        }
        if (bad < 0) {
            Py_XDECREF(t);
            Py_XDECREF(val);
            Py_XDECREF(tb);
            Py_XDECREF(got);
            got = NULL;
        } else {
            PyErr_Restore(t, val, tb);
        }
    }
    Py_DECREF(waiters);
    Py_DECREF(me);
    PyObject *out = NULL;
    if (got == NULL) {
        if (PyErr_ExceptionMatches(PyExc_OSError)) {
            PyObject *t, *val, *tb;
            PyErr_Fetch(&t, &val, &tb);
            PyErr_NormalizeException(&t, &val, &tb);
            if (tb != NULL)
                PyException_SetTraceback(val, tb);
            PyObject *r = PyObject_CallOneArg(self->failed, val); /* raises */
            Py_XDECREF(r);
            Py_XDECREF(t);
            Py_XDECREF(val);
            Py_XDECREF(tb);
            if (r != NULL)
                PyErr_SetString(PyExc_SystemError, "failed() returned");
        }
        return release_raising(self->release);
    }
    if (PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2 &&
        PyLong_CheckExact(PyTuple_GET_ITEM(got, 0)) &&
        PyBytes_CheckExact(PyTuple_GET_ITEM(got, 1))) {
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(got, 0));
        if (flags >= 0 && flags <= 7) { /* a lone plain frame, no receipt asked */
            PyObject *body = PyTuple_GET_ITEM(got, 1);
            if (count_taken(self, PyBytes_GET_SIZE(body)) == 0)
                out = Py_NewRef(body);
            Py_DECREF(got);
            goto done;
        }
    }
    {
        PyObject *rargs[2] = {got, NULL};
        PyObject *roomobj = PyLong_FromSsize_t(room);
        if (roomobj != NULL) {
            rargs[1] = roomobj;
            out = PyObject_Vectorcall(self->rest, rargs, 2, NULL);
            Py_DECREF(roomobj);
        }
        Py_DECREF(got);
    }
done:
    if (out == NULL)
        return release_raising(self->release);
    out = unlock_with(self->release, out);
    if (out == NULL)
        return NULL;
    PyObject *pumpers = field(self->chd, s_pumpers);
    int busy = pumpers == NULL ? -1 : PyObject_IsTrue(pumpers);
    if (busy) {
        PyObject *r = busy < 0 ? NULL : PyObject_CallOneArg(self->wake_pumpers, self->channel);
        if (r == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(r);
    }
    return out;
}

static PyObject *take_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"channel", "core", "lock", "kind", "wait", "fallback",
                             "rest", "failed", "max_frame", NULL};
    PyObject *channel, *core, *lock, *wait, *fallback, *rest, *failed, *max_frame;
    int kind;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOiOOOOO!:Take", kwlist, &channel, &core,
                                     &lock, &kind, &wait, &fallback, &rest, &failed,
                                     &PyLong_Type, &max_frame))
        return NULL;
    if (kind != KIND_STREAM && kind != KIND_MESSAGE && kind != KIND_SOCKET) {
        PyErr_SetString(PyExc_ValueError,
                        "kind must be 0 (stream), 1 (message) or 2 (stream socket)");
        return NULL;
    }
    if (kind == KIND_SOCKET &&
        !(PyTuple_CheckExact(wait) && PyTuple_GET_SIZE(wait) == 3 &&
          PyLong_CheckExact(PyTuple_GET_ITEM(wait, 1)))) {
        PyErr_SetString(PyExc_TypeError,
                        "a stream socket's wait is (wait_frame, fd, wait_mode)");
        return NULL;
    }
    if (kind == KIND_STREAM &&
        !(PyTuple_CheckExact(wait) && PyTuple_GET_SIZE(wait) == 3 &&
          PyLong_CheckExact(PyTuple_GET_ITEM(wait, 1)) &&
          PyLong_CheckExact(PyTuple_GET_ITEM(wait, 2)))) {
        PyErr_SetString(PyExc_TypeError, "a stream's wait is (wait_frame, fd, mode)");
        return NULL;
    }
    PyObject *chd = PyObject_GenericGetDict(channel, NULL);
    PyObject *cored = chd == NULL ? NULL : PyObject_GenericGetDict(core, NULL);
    PyObject *acquire = cored == NULL ? NULL : PyObject_GetAttrString(lock, "acquire");
    PyObject *release = acquire == NULL ? NULL : PyObject_GetAttrString(lock, "release");
    PyObject *cls = (PyObject *)Py_TYPE(channel);
    PyObject *drop = release == NULL ? NULL : PyObject_GetAttr(cls, s_drop_wake);
    PyObject *pump = drop == NULL ? NULL : PyObject_GetAttr(cls, s_wake_pumpers);
    PyObject *chref = pump == NULL ? NULL : PyWeakref_NewRef(channel, NULL);
    Take *self = chref == NULL ? NULL : (Take *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(chref);
        Py_XDECREF(chd);
        Py_XDECREF(cored);
        Py_XDECREF(acquire);
        Py_XDECREF(release);
        Py_XDECREF(drop);
        Py_XDECREF(pump);
        return NULL;
    }
    self->chref = chref;
    self->channel = channel;
    self->chd = chd;
    Py_DECREF(chd); /* borrowed: the channel keeps it */
    self->cored = cored;
    self->acquire = acquire;
    self->release = release;
    self->wait = Py_NewRef(wait);
    self->fallback = Py_NewRef(fallback);
    self->rest = Py_NewRef(rest);
    self->failed = Py_NewRef(failed);
    self->max_frame = Py_NewRef(max_frame);
    self->drop_wake = drop;
    self->wake_pumpers = pump;
    self->kind = kind;
    if (kind == KIND_MESSAGE) { /* a Receiver's wait: its ``blocks`` (a FifoWaiter: no) */
        PyObject *owner = PyObject_GetAttrString(wait, "__self__");
        if (owner == NULL) {
            PyErr_Clear();
        } else if (PyObject_HasAttr(owner, s_blocks)) {
            self->receiver = owner;
        } else {
            Py_DECREF(owner);
        }
    }
    self->vectorcall = take_enter;
    return (PyObject *)self;
}

static int take_traverse(Take *self, visitproc visit, void *arg) {
    Py_VISIT(self->chref);
    Py_VISIT(self->cored);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->wait);
    Py_VISIT(self->fallback);
    Py_VISIT(self->rest);
    Py_VISIT(self->failed);
    Py_VISIT(self->max_frame);
    Py_VISIT(self->drop_wake);
    Py_VISIT(self->wake_pumpers);
    Py_VISIT(self->receiver);
    return 0;
}

static int take_clear(Take *self) {
    Py_CLEAR(self->chref);
    self->channel = self->chd = NULL; /* borrowed */
    Py_CLEAR(self->cored);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->wait);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->rest);
    Py_CLEAR(self->failed);
    Py_CLEAR(self->max_frame);
    Py_CLEAR(self->drop_wake);
    Py_CLEAR(self->wake_pumpers);
    Py_CLEAR(self->receiver);
    return 0;
}

static void take_dealloc(Take *self) {
    PyObject_GC_UnTrack(self);
    take_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Put and RingTake: one shape, one constructor and one GC protocol (put_new, ...);
 * ``then`` is Put's ``partial`` and RingTake's ``rest`` */
typedef struct {
    PyObject_HEAD
    PyObject *chref;   /* the channel, weakly: its __dict__ keeps this (_writer.h) */
    PyObject *channel; /* borrowed: held during a call */
    PyObject *cored;
    PyObject *fallback, *then;
    vectorcallfunc vectorcall;
} Put;

static PyTypeObject RingTakeType;

static PyObject *put_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                          PyObject *kwnames);

/* the call, with the channel held for its duration (the Put holds it weakly) */
static PyObject *put_enter(PyObject *callable, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    PyObject *channel = owner_enter(((Put *)callable)->chref);
    if (channel == NULL)
        return NULL;
    PyObject *out = put_call(callable, args, nargsf, kwnames);
    Py_DECREF(channel);
    return out;
}

static PyObject *put_call(PyObject *callable, PyObject *const *args, size_t nargsf,
                          PyObject *kwnames) {
    Put *self = (Put *)callable;
    if (self->channel == NULL) {
        PyErr_SetString(PyExc_ValueError, "the Put was cleared");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) == 1 && (kwnames == NULL || !PyTuple_GET_SIZE(kwnames))) {
        PyObject *small = PyDict_GetItemWithError(self->cored, s_small_send);
        if (small == NULL && PyErr_Occurred())
            return NULL;
        if (small != NULL && small != Py_None) {
            Py_INCREF(small);
            PyObject *done = PyObject_Vectorcall(small, args, 1, NULL);
            Py_DECREF(small);
            if (done == NULL)
                return NULL;
            if (done == Py_True) {
                Py_DECREF(done);
                Py_RETURN_NONE;
            }
            if (done != Py_False) { /* written in part: its serial */
                PyObject *r = PyObject_CallOneArg(self->then, done);
                Py_DECREF(done);
                if (r == NULL)
                    return NULL;
                Py_DECREF(r);
                Py_RETURN_NONE;
            }
            Py_DECREF(done);
        } else {
            PyObject *data = args[0];
            PyObject *fast = PyDict_GetItemWithError(self->cored, s_fast_send);
            if (fast == NULL && PyErr_Occurred())
                return NULL;
            if (fast != NULL && fast != Py_None && PyBytes_CheckExact(data)) {
                PyObject *lim = field(self->cored, s_fast_bytes_limit);
                if (lim == NULL)
                    return NULL;
                Py_ssize_t limit = PyLong_AsSsize_t(lim);
                if (limit == -1 && PyErr_Occurred())
                    return NULL;
                if (PyBytes_GET_SIZE(data) <= limit) {
                    PyObject *argv[2] = {data, zero_int};
                    Py_INCREF(fast);
                    PyObject *done = PyObject_Vectorcall(fast, argv, 2, NULL);
                    Py_DECREF(fast);
                    if (done == NULL)
                        return NULL;
                    int sent = done == Py_True;
                    Py_DECREF(done);
                    if (sent)
                        Py_RETURN_NONE;
                }
            }
        }
    }
    return call_method(self->channel, self->fallback, args, nargsf, kwnames);
}

/* -- RingTake: recv_bytes' first step on a shared-memory ring ------------------------ */

static PyObject *ring_take_call(Put *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs > 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)))
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    PyObject *recv = PyDict_GetItemWithError(self->cored, s_fast_recv);
    if (recv == NULL && PyErr_Occurred())
        return NULL;
    if (recv == NULL || recv == Py_None)
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    PyObject *inbox = field(self->cored, s_inbox);
    if (inbox == NULL)
        return NULL;
    Py_ssize_t queued = PyObject_Length(inbox);
    if (queued < 0)
        return NULL;
    if (queued)
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    PyObject *max_frame = field(self->cored, s_max_frame);
    if (max_frame == NULL)
        return NULL;
    Py_INCREF(recv);
    PyObject *got = PyObject_CallOneArg(recv, max_frame);
    Py_DECREF(recv);
    if (got == NULL)
        return NULL;
    if (got == Py_None) {
        Py_DECREF(got);
        return call_method(self->channel, self->fallback, args, nargsf, kwnames);
    }
    if (PyTuple_CheckExact(got) && PyTuple_GET_SIZE(got) == 2 &&
        PyLong_CheckExact(PyTuple_GET_ITEM(got, 0))) {
        long codec = PyLong_AsLong(PyTuple_GET_ITEM(got, 0));
        if (codec == -1 && PyErr_Occurred()) {
            Py_DECREF(got);
            return NULL;
        }
        if (codec >= 0) {
            PyObject *body = Py_NewRef(PyTuple_GET_ITEM(got, 1));
            Py_DECREF(got);
            return body;
        }
    }
    /* a record that is not a plain frame: the driver's _after_fast finishes it */
    PyObject *argv[2] = {got, nargs ? args[0] : Py_None};
    PyObject *out = PyObject_Vectorcall(self->then, argv, 2, NULL);
    Py_DECREF(got);
    return out;
}

/* the call, with the channel held for its duration (the RingTake holds it weakly) */
static PyObject *ring_take_enter(PyObject *callable, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    Put *self = (Put *)callable;
    if (self->cored == NULL) {
        PyErr_SetString(PyExc_ValueError, "the RingTake was cleared");
        return NULL;
    }
    PyObject *channel = owner_enter(self->chref);
    if (channel == NULL)
        return NULL;
    PyObject *out = ring_take_call(self, args, nargsf, kwnames);
    Py_DECREF(channel);
    return out;
}

static PyObject *put_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *put_kw[] = {"channel", "core", "fallback", "partial", NULL};
    static char *ring_kw[] = {"channel", "core", "fallback", "rest", NULL};
    int ring = type == &RingTakeType;
    PyObject *channel, *core, *fallback, *then;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ring ? "OOOO:RingTake" : "OOOO:Put",
                                     ring ? ring_kw : put_kw, &channel, &core, &fallback,
                                     &then))
        return NULL;
    PyObject *cored = PyObject_GenericGetDict(core, NULL);
    if (cored == NULL)
        return NULL;
    PyObject *chref = PyWeakref_NewRef(channel, NULL);
    Put *self = chref == NULL ? NULL : (Put *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(chref);
        Py_DECREF(cored);
        return NULL;
    }
    self->chref = chref;
    self->channel = channel;
    self->cored = cored;
    self->fallback = Py_NewRef(fallback);
    self->then = Py_NewRef(then);
    self->vectorcall = ring ? ring_take_enter : put_enter;
    return (PyObject *)self;
}

static int put_traverse(Put *self, visitproc visit, void *arg) {
    Py_VISIT(self->chref);
    Py_VISIT(self->cored);
    Py_VISIT(self->fallback);
    Py_VISIT(self->then);
    return 0;
}

static int put_clear(Put *self) {
    Py_CLEAR(self->chref);
    self->channel = NULL; /* borrowed */
    Py_CLEAR(self->cored);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->then);
    return 0;
}

static void put_dealloc(Put *self) {
    PyObject_GC_UnTrack(self);
    put_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject PutType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._take.Put",
    .tp_basicsize = sizeof(Put),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Put(channel, core, fallback, partial): send_bytes' first step without its "
              "Python frame (see the module's comment)",
    .tp_new = put_new,
    .tp_dealloc = (destructor)put_dealloc,
    .tp_traverse = (traverseproc)put_traverse,
    .tp_clear = (inquiry)put_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Put, vectorcall),
};

static PyTypeObject RingTakeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._take.RingTake",
    .tp_basicsize = sizeof(Put),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "RingTake(channel, core, fallback, rest): recv_bytes' first step on a "
              "shared-memory ring without its Python frame (see the module's comment)",
    .tp_new = put_new,
    .tp_dealloc = (destructor)put_dealloc,
    .tp_traverse = (traverseproc)put_traverse,
    .tp_clear = (inquiry)put_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Put, vectorcall),
};

static PyObject *take_counts(Take *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(KK)", self->received, self->received_bytes);
}

static PyMethodDef take_methods[] = {
    {"counts", (PyCFunction)take_counts, METH_NOARGS,
     "counts() -> (messages, bytes): what this receive took (frame bytes, headers too)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TakeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._take.Take",
    .tp_basicsize = sizeof(Take),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Take(channel, core, lock, kind, wait, fallback, rest, failed, max_frame): "
              "a spin=0 channel's recv_bytes without Python frames (see the module's "
              "comment)",
    .tp_new = take_new,
    .tp_dealloc = (destructor)take_dealloc,
    .tp_traverse = (traverseproc)take_traverse,
    .tp_clear = (inquiry)take_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Take, vectorcall),
    .tp_methods = take_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._take",
    "The blocking driver's recv_bytes and send_bytes hot paths in C (sync/_channel.py).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC PyInit__take(void) {
    INTERN(s_closing, "_closing");
    INTERN(s_wake, "_wake");
    INTERN(s_sleep_first, "_sleep_first");
    INTERN(s_waiters, "_waiters");
    INTERN(s_pumpers, "_pumpers");
    INTERN(s_closed, "closed");
    INTERN(s_eof, "eof");
    INTERN(s_taking, "taking");
    INTERN(s_inbox, "inbox");
    INTERN(s_taken, "taken");
    INTERN(s_decoder, "decoder");
    INTERN(s_wait_buf, "_wait_buf");
    INTERN(s_wait_limit, "_wait_limit");
    INTERN(s_idle_buffer, "idle_buffer");
    INTERN(s_drop_wake, "_drop_wake");
    INTERN(s_wake_pumpers, "_wake_pumpers");
    INTERN(s_small_send, "small_send");
    INTERN(s_blocks, "blocks");
    INTERN(s_blocking_reader, "_blocking_reader");
    INTERN(s_fast_send, "fast_send");
    INTERN(s_fast_bytes_limit, "fast_bytes_limit");
    INTERN(s_fast_recv, "fast_recv");
    INTERN(s_max_frame, "max_frame");
    if ((zero_float = PyFloat_FromDouble(0.0)) == NULL || (one = PyLong_FromLong(1)) == NULL ||
        (zero_int = PyLong_FromLong(0)) == NULL)
        return NULL;
    if (PyType_Ready(&TakeType) < 0 || PyType_Ready(&PutType) < 0 ||
        PyType_Ready(&RingTakeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Take", (PyObject *)&TakeType) < 0 ||
        PyModule_AddObjectRef(m, "Put", (PyObject *)&PutType) < 0 ||
        PyModule_AddObjectRef(m, "RingTake", (PyObject *)&RingTakeType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
