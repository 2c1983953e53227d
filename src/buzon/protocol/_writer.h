/* What the C writers of small frames share (protocol/_stream.c SmallWriter, _rv.c RvStream,
 * protocol/_credit.c ReceiptWriter, protocol/_dgram.c MessageSender): a look at the
 * channel core's fields, the plain DATA frame's header, and the driver's write lock
 * taken without waiting. Header-only: each extension module includes it once. */
#ifndef BUZON_PROTOCOL_WRITER_H
#define BUZON_PROTOCOL_WRITER_H

#include <Python.h>
#include <stdint.h>

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
