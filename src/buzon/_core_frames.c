/*
 * buzon._core, frames: the ONLY code in the C core that reads or writes buzon frame
 * bytes (docs/frames.md). Everything else moves opaque records. When the frame format
 * changes, this unit (and the Ring methods it defines: try_send_frame, try_send_frames,
 * try_recv_frame, stop_frames, frame_counts) is what is replaced.
 *
 * The channel's hot path (transport/shm/_ring.py): a shm: channel puts one buzon frame in
 * each record. The common one, a DATA frame with no out-of-band buffers, is an 8-byte
 * header and the body:
 *   [0] version 1, [1] kind 1 (DATA), [2] flags = the codec (0..7 taken as plain on
 *   receive), [3] buffer count 0, [4..8) u32 LE body length (= record length - 8);
 * and such a record has producer flags 0 (a nonzero flag, e.g. out of line, is not
 * one). These methods build and take that frame in one call, so the channel's small
 * send or receive costs one C call instead of a chain of Python ones. Anything else
 * goes through the general path.
 */
#include "_core.h"

/* One frame (codec -1: item is a whole frame already). 1 sent, 0 no room now (or larger
 * than the ring: the channel's general path sends it out of line), -1 error. */
static int
send_frame(Ring *r, PyObject *item, long codec)
{
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    int whole = codec < 0;
    uint64_t most = (r->rsize ? r->rsize : r->limit) - REC_HDR;
    uint64_t total = (whole ? 0 : 8) + (uint64_t)view.len;
    int rc = 0;
    if (total <= most && !r->frames_off) {
        uint32_t n = (uint32_t)view.len;
        uint8_t hdr[8] = {1, 1, (uint8_t)codec, 0, (uint8_t)n, (uint8_t)(n >> 8),
                          (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
        part_t parts[2] = {{hdr, 8}, {view.buf, (size_t)view.len}};
        /* counted before send_parts may release the GIL (to copy a large payload), so
         * whoever reads the counts (a channel starting receipts) sees every frame that
         * went this way; uncounted again if it did not go */
        r->counts[0] += 1;
        r->counts[1] += total;
        rc = send_parts(r, parts + whole, 2 - whole, (size_t)total, 0, 0);
        if (rc <= 0) {
            r->counts[0] -= 1;
            r->counts[1] -= total;
        }
    }
    PyBuffer_Release(&view);
    return rc;
}

static long
frame_codec(PyObject *arg)
{
    long codec = PyLong_AsLong(arg);
    if (codec == -1 && PyErr_Occurred()) {
        return -2;
    }
    if (codec < -1 || codec > 255) {
        PyErr_SetString(PyExc_ValueError, "codec must fit a byte (or be -1: a whole frame)");
        return -2;
    }
    return codec;
}

static PyObject *
ring_try_send_frame(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    /* try_send_frame(body, codec) -> bool: header + body as one record; False if there
     * is no room now or it is larger than the ring */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "try_send_frame(body, codec)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    if (codec == -2 || check_open(r) < 0) {
        return NULL;
    }
    r->busy++;
    int rc = send_frame(r, args[0], codec);
    leave(r);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *
ring_try_send_frames(Ring *r, PyObject *const *args, Py_ssize_t nargs)
{
    /* try_send_frames(bodies, codec, start) -> int: send_frame for bodies[start:] of a
     * list or tuple, in order, until one does not go (no room, larger than the ring, or
     * not a buffer: the caller sends it the general way); the index reached */
    if (nargs != 3 || !(PyList_Check(args[0]) || PyTuple_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "try_send_frames(list or tuple of bodies, codec, start)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    Py_ssize_t i = PyLong_AsSsize_t(args[2]);
    if (codec == -2 || (i == -1 && PyErr_Occurred()) || check_open(r) < 0) {
        return NULL;
    }
    PyObject *seq = args[0];
    int rc = 1;
    r->busy++;
    for (i = i < 0 ? 0 : i; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        rc = PyObject_CheckBuffer(item) ? send_frame(r, item, codec) : 0;
        if (rc <= 0) {
            break;
        }
    }
    leave(r);
    return rc < 0 ? NULL : PyLong_FromSsize_t(i);
}

static PyObject *
ring_try_recv_frame_impl(Ring *r, Py_ssize_t max_frame)
{
    rec_t *rec = NULL;
    uint32_t len = 0;
    int spun_ok = 0;
    int rc = claim(r, 0, &rec, &len, &spun_ok);
    if (rc == RC_AGAIN) {
        Py_RETURN_NONE;
    }
    if (rc != RC_OK) {
        return raise_rc(r, rc, OP_RECV, 0);
    }
    uint32_t flags = rec->flags;
    const uint8_t *src = (const uint8_t *)rec + REC_HDR;
    uint8_t hdr[8] = {0};
    if (len >= 8) {
        memcpy(hdr, src, 8); /* once: the peer may be rewriting it (untrusted memory) */
    }
    uint32_t blen = (uint32_t)hdr[4] | (uint32_t)hdr[5] << 8 | (uint32_t)hdr[6] << 16 |
                    (uint32_t)hdr[7] << 24;
    int plain = flags == 0 && len >= 8 && hdr[0] == 1 && hdr[1] == 1 && hdr[2] <= 7 &&
                hdr[3] == 0 && (uint64_t)blen + 8 == len && (Py_ssize_t)len <= max_frame &&
                !r->frames_off;
    uint32_t skip = plain ? 8 : 0;
    if (plain) { /* counted before the copy may release the GIL (see send_frame) */
        r->counts[2] += 1;
        r->counts[3] += len;
    }
    PyObject *out = take_bytes(r, rec, skip, len);
    if (out == NULL) {
        return NULL; /* the message is lost, as for any receive that fails to allocate */
    }
    PyObject *code = PyLong_FromLong(plain ? (long)hdr[2] : -1L - (long)flags);
    PyObject *pair = code == NULL ? NULL : PyTuple_New(2);
    if (pair == NULL) {
        Py_XDECREF(code);
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, code);
    PyTuple_SET_ITEM(pair, 1, out);
    return pair;
}

static PyObject *
ring_try_recv_frame(Ring *r, PyObject *arg)
{
    /* try_recv_frame(max_frame): None if empty; (codec, body) for a plain DATA frame of
     * at most max_frame bytes; else (-1 - record flags, record) for the general path */
    Py_ssize_t max_frame = PyLong_AsSsize_t(arg);
    if (max_frame == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (check_open(r) < 0) {
        return NULL;
    }
    r->busy++;
    PyObject *res = ring_try_recv_frame_impl(r, max_frame);
    leave(r);
    return res;
}

static PyObject *
ring_stop_frames(Ring *r, PyObject *Py_UNUSED(a))
{
    r->frames_off = 1;
    Py_RETURN_NONE;
}

static PyObject *
ring_frame_counts(Ring *r, PyObject *Py_UNUSED(a))
{
    return Py_BuildValue("(KKKK)", (unsigned long long)r->counts[0],
                         (unsigned long long)r->counts[1], (unsigned long long)r->counts[2],
                         (unsigned long long)r->counts[3]);
}

static const PyMethodDef frame_methods[] = {
    {"try_send_frame", (PyCFunction)(void (*)(void))ring_try_send_frame, METH_FASTCALL,
     "try_send_frame(body, codec): a buzon DATA frame in one record; False if full."},
    {"try_send_frames", (PyCFunction)(void (*)(void))ring_try_send_frames, METH_FASTCALL,
     "try_send_frames(bodies, codec, start): try_send_frame each from start; the index "
     "of the first that did not go."},
    {"try_recv_frame", (PyCFunction)ring_try_recv_frame, METH_O,
     "try_recv_frame(max_frame): None, (codec, body) of a plain DATA frame, or "
     "(-1 - record flags, record) for anything else."},
    {"stop_frames", (PyCFunction)ring_stop_frames, METH_NOARGS,
     "from now on try_send_frame(s) send nothing and try_recv_frame returns every record "
     "whole: a channel that starts numbering its messages (receipts) counts them all."},
    {"frame_counts", (PyCFunction)ring_frame_counts, METH_NOARGS,
     "(frames sent, bytes, frames received, bytes) by try_send_frame/try_recv_frame."},
    {NULL, NULL, 0, NULL},
};

int
frames_init(void)
{
    static int added = 0; /* once per process, as the module's initialisation */
    if (!added && ring_add_methods(frame_methods) < 0) {
        return -1;
    }
    added = 1;
    return 0;
}
