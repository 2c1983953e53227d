/*
 * buzon._core, mailbox: the hot path of buzon.mailbox (src/buzon/_mailbox.py), two
 * module functions that build or take a mailbox's common record in one call.
 *
 * A mailbox record is one buzon frame (docs/frames.md) with the header fields
 * MESSAGE_ID, SENDER and SENT_AT. The common one (no out-of-band buffers, no receipt,
 * exactly those fields) is 40 bytes and the body:
 *   [0] version 1  [1] kind 1 (DATA)  [2] codec | 0x20 (FIELDS)  [3] 0 buffers
 *   [4..8) u32 body length  [8..10) u16 30 (the fields block)
 *   [10] tag 1 [11] 8 [12..20) u64 message id
 *   [20] tag 2 [21] 8 [22..26) u32 pid [26..30) u32 uid
 *   [30] tag 6 [31] 8 [32..40) u64 ns since the epoch
 * All little-endian. _mailbox.py builds the very same bytes in Python (a test compares
 * them with protocol/frames.py); anything else goes through its general path.
 *
 *   mailbox_send(ring, body, codec, message_id, uid, timeout) -> None
 *       the record for body (pid and time read here); waits for room like Ring.send
 *       (timeout None: for ever; <= 0: Full at once)
 *   mailbox_recv(ring, timeout) -> (codec, body) | bytes
 *       the next record: (codec, body) if it is the common one, else the record's bytes
 *       (out of line, a receipt, other fields: the caller's general path); timeout like
 *       Ring.recv (<= 0: Empty at once)
 */
#include "_core.h"

#define MB_HEAD 40u

static void
put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static void
put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static uint32_t
get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static Ring *
ring_arg(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &RingType)) {
        PyErr_SetString(PyExc_TypeError, "the first argument must be a buzon._core.Ring");
        return NULL;
    }
    return (Ring *)o;
}

static PyObject *
mailbox_send(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "mailbox_send(ring, body, codec, message_id, uid, timeout)");
        return NULL;
    }
    Ring *r = ring_arg(args[0]);
    if (r == NULL) {
        return NULL;
    }
    long codec = PyLong_AsLong(args[2]);
    unsigned long long mid = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long uid = PyLong_AsUnsignedLong(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (codec < 0 || codec > 7) {
        PyErr_SetString(PyExc_ValueError, "codec must be 0-7");
        return NULL;
    }
    int64_t deadline;
    if (deadline_from(args[5], &deadline) < 0 || check_open(r) < 0) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if ((uint64_t)view.len > UINT32_MAX - MB_HEAD) {
        PyBuffer_Release(&view);
        PyErr_SetString(TooLarge, "a mailbox message body is at most 4 GiB");
        return NULL;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    uint8_t h[MB_HEAD] = {1, 1, (uint8_t)(codec | 0x20), 0};
    put32(h + 4, (uint32_t)view.len);
    h[8] = 30;
    h[9] = 0;
    h[10] = 1;
    h[11] = 8;
    put64(h + 12, mid);
    h[20] = 2;
    h[21] = 8;
    put32(h + 22, (uint32_t)getpid());
    put32(h + 26, (uint32_t)uid);
    h[30] = 6;
    h[31] = 8;
    put64(h + 32, ns);
    part_t parts[2] = {{h, MB_HEAD}, {view.buf, (size_t)view.len}};
    r->busy++;
    int rc = send_parts(r, parts, 2, MB_HEAD + (size_t)view.len, 0, deadline);
    leave(r);
    PyBuffer_Release(&view);
    if (rc < 0) {
        return NULL;
    }
    if (rc == 0) {
        raise_rc(r, RC_AGAIN, OP_SEND, 0);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
recv_impl(Ring *r, PyObject *timeout)
{
    int64_t deadline;
    if (deadline_from(timeout, &deadline) < 0 || check_open(r) < 0) {
        return NULL;
    }
    claim_args a = {NULL, 0, 0};
    int rc = claim(r, 0, &a.rec, &a.len, &a.spun_ok); /* once with the GIL held */
    if (rc == RC_AGAIN && deadline != 0) {
        rc = run_released(r, claim_released, &a, deadline);
        if (rc == RC_RAISED) {
            return NULL;
        }
    }
    if (rc != RC_OK) {
        return raise_rc(r, rc, OP_RECV, deadline != 0);
    }
    const uint8_t *p = (const uint8_t *)a.rec + REC_HDR;
    uint32_t n = a.len;
    if (n >= MB_HEAD && a.rec->flags == 0 && p[0] == 1 && p[1] == 1 && (p[2] & 0xF8) == 0x20 &&
        p[3] == 0 && p[8] == 30 && p[9] == 0 && p[10] == 1 && p[11] == 8 && p[20] == 2 &&
        p[21] == 8 && p[30] == 6 && p[31] == 8 && get32(p + 4) == n - MB_HEAD) {
        long codec = p[2] & 7;
        PyObject *body = take_bytes(r, a.rec, MB_HEAD, n);
        if (body == NULL) {
            return NULL;
        }
        return Py_BuildValue("(lN)", codec, body);
    }
    return take_bytes(r, a.rec, 0, n);
}

static PyObject *
mailbox_recv(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "mailbox_recv(ring, timeout)");
        return NULL;
    }
    Ring *r = ring_arg(args[0]);
    if (r == NULL) {
        return NULL;
    }
    r->busy++;
    PyObject *res = recv_impl(r, args[1]);
    leave(r);
    return res;
}

PyMethodDef mailbox_functions[] = {
    {"mailbox_send", (PyCFunction)(void (*)(void))mailbox_send, METH_FASTCALL,
     "mailbox_send(ring, body, codec, message_id, uid, timeout): a mailbox's common "
     "record (_core_mailbox.c), waiting for room like Ring.send."},
    {"mailbox_recv", (PyCFunction)(void (*)(void))mailbox_recv, METH_FASTCALL,
     "mailbox_recv(ring, timeout) -> (codec, body) for a mailbox's common record, else "
     "the record's bytes; waits like Ring.recv."},
    {NULL, NULL, 0, NULL},
};
