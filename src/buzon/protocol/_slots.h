/* Fields of a __slots__ class read and written in place (protocol/_pop.c for RecvFlow
 * and Statistics, protocol/_credit.c for SendFlow): the slots' offsets in the class's
 * objects, found once per class from its member descriptors and trusted while the
 * class is not changed (its version tag, which CPython renews on any change to the
 * class or its bases). A field read there costs no attribute lookup (_PyType_Lookup,
 * the descriptor call). A class whose fields are not plain object slots, or an object
 * whose slot is empty, goes the generic way (PyObject_GetAttr/SetAttr): callers fall
 * back when slots_of returns 0 or the slot is NULL. Header-only. */
#ifndef BUZON_PROTOCOL_SLOTS_H
#define BUZON_PROTOCOL_SLOTS_H

#include <Python.h>
#include <structmember.h>

#define BUZON_MAX_SLOTS 4

typedef struct {
    PyTypeObject *type; /* strong; NULL: not looked up yet */
    unsigned int version;
    int usable;
    Py_ssize_t off[BUZON_MAX_SLOTS];
} slot_cache;

/* 1: the offsets of ``names`` (at most BUZON_MAX_SLOTS) in ``obj``'s class are in
 * ``c``; 0: go the generic way */
static inline int slots_of(slot_cache *c, PyObject *obj, PyObject *const *names, int n) {
    PyTypeObject *type = Py_TYPE(obj);
    if (c->type == type && c->version == type->tp_version_tag &&
        PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return c->usable;
    c->usable = n <= BUZON_MAX_SLOTS;
    for (int i = 0; i < n && c->usable; i++) {
        PyObject *d = _PyType_Lookup(type, names[i]); /* borrowed */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) {
            c->usable = 0;
            break;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
            c->usable = 0;
            break;
        }
        c->off[i] = m->offset;
    }
    /* the lookups gave the class a version tag (the type cache's): none, no trust */
    if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        c->usable = 0;
    Py_XSETREF(c->type, (PyTypeObject *)Py_NewRef(type));
    c->version = type->tp_version_tag;
    return c->usable;
}

/* the slot ``i`` of ``obj`` (after slots_of returned 1): its value may be NULL (empty) */
#define SLOT(obj, c, i) ((PyObject **)((char *)(obj) + (c)->off[i]))

/* ``*slot = value`` (a new reference is taken); no Python code runs, unless the old
 * value's deallocation runs some (an int's never does) */
static inline void slot_set(PyObject **slot, PyObject *value) {
    PyObject *old = *slot;
    *slot = Py_NewRef(value);
    Py_XDECREF(old);
}

#endif
