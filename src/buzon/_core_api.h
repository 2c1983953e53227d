#ifndef BUZON_CORE_API_H
#define BUZON_CORE_API_H

/*
 * The C API buzon._core lends other extension modules: records of a Ring as opaque
 * bytes, one call to put a record and one to take the next. buzon._core knows nothing
 * of what a record holds; a module that gives records a meaning (buzon.protocol._frames:
 * one buzon frame per record, docs/frames.md) builds and reads them through this table.
 *
 * Getting it (with the GIL held, once, in the module's initialisation):
 *
 *     const buzon_ring_api *api = PyCapsule_Import(BUZON_RING_API_NAME, 0);
 *     if (api == NULL || api->version != BUZON_RING_API_VERSION) ... fail
 *
 * Every call is made with the GIL held and returns with it held (a call may release it
 * meanwhile, to copy 64 KiB or more, or to wait). put and take never wait for room or
 * for a record: the caller's driver waits (the ring's fds), then calls again. put_wait
 * and take_wait wait as Ring.send and Ring.recv do (with the GIL released, running
 * signal handlers when a signal interrupts the wait), for a caller that has no driver
 * loop of its own (a mailbox). Each checks the ring open (and takes a new participant
 * slot in a forked child), counts itself busy so a close from another thread defers
 * the unmapping, and maps failures to buzon.errors exactly as the Ring's own methods do.
 *
 * Version 2 added put_wait and take_wait (version 1 had put and take only).
 */
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#define BUZON_RING_API_NAME "buzon._core._RING_API"
#define BUZON_RING_API_VERSION 2u

/* One piece of a record's payload; put() writes the pieces back to back. */
typedef struct {
    const uint8_t *p;
    size_t n;
} buzon_part;

/* Told about a claimed record before it is copied out (with the GIL held, no Python
 * call allowed, must not fail): ``payload`` points into the shared segment, which
 * another process may still be writing, so read what you need ONCE into your own
 * memory. Returns how many leading bytes to leave out of the copy (at most ``len``). */
typedef uint32_t (*buzon_peek_fn)(void *ctx, const uint8_t *payload, uint32_t len,
                                  uint32_t flags);

typedef struct {
    unsigned version;         /* BUZON_RING_API_VERSION */
    PyTypeObject *ring_type; /* buzon._core.Ring: check objects before calling */
    /* put(ring, parts, nparts, total, flags): one record of ``total`` payload bytes
     * (the sum of the parts, at most 64 of them) with the producer's ``flags``,
     * reserved, filled and committed. 1 put, 0 not now (no room, or more than the
     * ring ever takes: Ring.max_message), -1 with an exception set. */
    int (*put)(PyObject *ring, const buzon_part *parts, int nparts, size_t total,
               uint32_t flags);
    /* take(ring, peek, ctx): the next record, claimed without waiting; peek(ctx, ...)
     * says how many leading bytes to skip, then the rest is copied into a new bytes
     * object and the record freed. Py_None (a new reference) if there is none, NULL
     * with an exception set on failure (the record, if claimed, is freed all the same,
     * as for any receive that fails to allocate). */
    PyObject *(*take)(PyObject *ring, buzon_peek_fn peek, void *ctx);
    /* put_wait(ring, parts, nparts, total, flags, timeout): put, but waiting for room as
     * Ring.send(timeout=...) does: ``timeout`` is a Python number of seconds or None (for
     * ever); <= 0 does not wait. 1 put, -1 with an exception set: Full (timeout <= 0 and
     * no room now), Timeout, MessageTooLarge (more than the ring ever takes), a signal
     * handler's exception, or what Ring.send raises for a closed or removed ring. Never 0. */
    int (*put_wait)(PyObject *ring, const buzon_part *parts, int nparts, size_t total,
                    uint32_t flags, PyObject *timeout);
    /* take_wait(ring, peek, ctx, timeout): take, but waiting for a record as
     * Ring.recv(timeout=...) does (``timeout`` as for put_wait). The record's bytes (peek
     * as for take), or NULL with an exception set: Empty (timeout <= 0 and no record
     * now), Timeout, a signal handler's exception, or what Ring.recv raises. Never
     * Py_None. */
    PyObject *(*take_wait)(PyObject *ring, buzon_peek_fn peek, void *ctx, PyObject *timeout);
} buzon_ring_api;

#endif /* BUZON_CORE_API_H */
