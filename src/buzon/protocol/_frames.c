/*
 * buzon.protocol._frames: the C speedup of the frame format (docs/frames.md) for the
 * shm: channel's hot path. A shm: channel puts one buzon frame in each record of its
 * rings; buzon._core moves the records as opaque bytes (its C API, _core_api.h), and
 * this module is what knows that a record holds a frame.
 *
 * The common frame, a DATA frame with no out-of-band buffers, is an 8-byte header and
 * the body (protocol/frames.py, HEADER):
 *   [0] version 1, [1] kind 1 (DATA), [2] flags = the codec (0..7 taken as plain on
 *   receive: no receipt, not CHUNKED, no FIELDS), [3] buffer count 0,
 *   [4..8) u32 LE body length (= record length - 8);
 * and such a record has producer flags 0 (a nonzero flag, e.g. out of line, is not one).
 * RingFrames builds and takes that frame in one call from Python, so the channel's
 * small send or receive costs one C call instead of a chain of Python ones. Anything
 * else goes through the general path (protocol/frames.py).
 *
 * Also here, for every channel (protocol/frames.py re-exports them): data_frame, a small
 * DATA frame built in one allocation, and plain_data_flags, the check that a message is one
 * plain DATA frame (the message transports' receive fast path).
 *
 * And the hot path of buzon.mailbox (src/buzon/_mailbox.py): mailbox_send and
 * mailbox_recv put or take a mailbox's common record in one call, waiting for room or a
 * record through the C API's put_wait and take_wait (a mailbox has no driver loop).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <pthread.h>
#include <structmember.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "_core_api.h"

#define HDR 8 /* the header of a DATA frame without buffers or fields */
#define VERSION 1
#define KIND_DATA 1
#define PLAIN_FLAGS_MAX 7 /* flags 0..7: a codec alone */

static const buzon_ring_api *api; /* buzon._core's, imported by the first RingFrames */

static uint32_t cached_pid; /* getpid() is a system call: read once, and after a fork */

static void
frames_atfork_child(void)
{
    cached_pid = (uint32_t)getpid();
}

typedef struct {
    PyObject_HEAD
    PyObject *ring;       /* the buzon._core.Ring whose records are frames */
    uint64_t counts[4];   /* frames sent, their bytes, frames received, their bytes (the
                             calls of this object only; updated with the GIL held) */
    int off;              /* stop() was called: the calls take the general way */
} RingFrames;

/* One frame (codec -1: item is a whole frame already). 1 sent, 0 no room now (or larger
 * than the ring: the channel's general path sends it out of line), -1 error. */
static int
send_frame(RingFrames *f, PyObject *item, long codec)
{
    Py_buffer view = {0};
    const uint8_t *src;
    Py_ssize_t len;
    if (PyBytes_CheckExact(item)) { /* the common body: no buffer export to pay */
        src = (const uint8_t *)PyBytes_AS_STRING(item);
        len = PyBytes_GET_SIZE(item);
    }
    else {
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        src = view.buf;
        len = view.len;
    }
    int whole = codec < 0;
    uint64_t total = (whole ? 0 : HDR) + (uint64_t)len;
    int rc = 0;
    /* larger than any ring, or stopped: the general path */
    if (total <= UINT32_MAX - 64 && !f->off) {
        uint32_t n = (uint32_t)len;
        uint8_t hdr[HDR] = {VERSION, KIND_DATA, (uint8_t)codec, 0, (uint8_t)n,
                            (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
        buzon_part parts[2] = {{hdr, HDR}, {src, (size_t)len}};
        /* counted before put may release the GIL (to copy a large payload), so whoever
         * reads the counts (a channel starting receipts) sees every frame that went
         * this way; uncounted again if it did not go */
        f->counts[0] += 1;
        f->counts[1] += total;
        rc = api->put(f->ring, parts + whole, 2 - whole, (size_t)total, 0);
        if (rc <= 0) {
            f->counts[0] -= 1;
            f->counts[1] -= total;
        }
    }
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
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
rf_try_send_frame(RingFrames *f, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "try_send_frame(body, codec)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    if (codec == -2) {
        return NULL;
    }
    int rc = send_frame(f, args[0], codec);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *
rf_try_send_frames(RingFrames *f, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !(PyList_Check(args[0]) || PyTuple_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "try_send_frames(list or tuple of bodies, codec, start)");
        return NULL;
    }
    long codec = frame_codec(args[1]);
    Py_ssize_t i = PyLong_AsSsize_t(args[2]);
    if (codec == -2 || (i == -1 && PyErr_Occurred())) {
        return NULL;
    }
    PyObject *seq = args[0];
    int rc = 1;
    for (i = i < 0 ? 0 : i; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        rc = PyObject_CheckBuffer(item) ? send_frame(f, item, codec) : 0;
        if (rc <= 0) {
            break;
        }
    }
    return rc < 0 ? NULL : PyLong_FromSsize_t(i);
}

typedef struct {
    RingFrames *f;
    Py_ssize_t max_frame;
    long code; /* the codec of a plain DATA frame, else -1 - the record's flags */
} peek_ctx;

/* Is the claimed record a plain DATA frame? Then skip its header. */
static uint32_t
peek_frame(void *arg, const uint8_t *payload, uint32_t len, uint32_t flags)
{
    peek_ctx *c = arg;
    uint8_t hdr[HDR] = {0};
    if (len >= HDR) {
        memcpy(hdr, payload, HDR); /* once: the peer may be rewriting it (untrusted) */
    }
    uint32_t blen = (uint32_t)hdr[4] | (uint32_t)hdr[5] << 8 | (uint32_t)hdr[6] << 16 |
                    (uint32_t)hdr[7] << 24;
    int plain = flags == 0 && len >= HDR && hdr[0] == VERSION && hdr[1] == KIND_DATA &&
                hdr[2] <= PLAIN_FLAGS_MAX && hdr[3] == 0 && (uint64_t)blen + HDR == len &&
                (Py_ssize_t)len <= c->max_frame && !c->f->off;
    if (!plain) {
        c->code = -1L - (long)flags;
        return 0;
    }
    c->code = (long)hdr[2];
    /* counted before the copy may release the GIL (see send_frame) */
    c->f->counts[2] += 1;
    c->f->counts[3] += len;
    return HDR;
}

static PyObject *
rf_try_recv_frame(RingFrames *f, PyObject *arg)
{
    peek_ctx c = {f, PyLong_AsSsize_t(arg), 0};
    if (c.max_frame == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *out = api->take(f->ring, peek_frame, &c);
    if (out == NULL || out == Py_None) {
        return out;
    }
    PyObject *code = PyLong_FromLong(c.code);
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
rf_stop(RingFrames *f, PyObject *Py_UNUSED(a))
{
    f->off = 1;
    Py_RETURN_NONE;
}

static PyObject *
rf_counts(RingFrames *f, PyObject *Py_UNUSED(a))
{
    return Py_BuildValue("(KKKK)", (unsigned long long)f->counts[0],
                         (unsigned long long)f->counts[1], (unsigned long long)f->counts[2],
                         (unsigned long long)f->counts[3]);
}

/* The core's C API, imported on first use: importing this module for the stream
 * calls below (every channel does) must not load the shared-memory core. */
static int
need_api(void)
{
    if (api != NULL) {
        return 0;
    }
    const buzon_ring_api *got = PyCapsule_Import(BUZON_RING_API_NAME, 0);
    if (got == NULL) {
        return -1;
    }
    if (got->version != BUZON_RING_API_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "buzon._core offers ring API version %u, buzon.protocol._frames needs %u "
                     "(rebuild buzon)",
                     got->version, BUZON_RING_API_VERSION);
        return -1;
    }
    api = got;
    return 0;
}

static PyObject *
rf_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", NULL};
    PyObject *ring;
    if (need_api() < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!:RingFrames", kwlist, api->ring_type,
                                     &ring)) {
        return NULL;
    }
    RingFrames *f = (RingFrames *)type->tp_alloc(type, 0);
    if (f == NULL) {
        return NULL;
    }
    f->ring = Py_NewRef(ring);
    return (PyObject *)f;
}

static void
rf_dealloc(RingFrames *f)
{
    Py_XDECREF(f->ring);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *
rf_get_ring(RingFrames *f, void *Py_UNUSED(c))
{
    return Py_NewRef(f->ring);
}

static PyMethodDef rf_methods[] = {
    {"try_send_frame", (PyCFunction)(void (*)(void))rf_try_send_frame, METH_FASTCALL,
     "try_send_frame(body, codec) -> bool: a DATA frame of body (codec 0-255; -1: body is "
     "a whole frame already) as one record; False if there is no room now, if it is "
     "larger than the ring, or after stop()."},
    {"try_send_frames", (PyCFunction)(void (*)(void))rf_try_send_frames, METH_FASTCALL,
     "try_send_frames(bodies, codec, start) -> int: try_send_frame for bodies[start:] of a "
     "list or tuple, in order, until one does not go (no room, larger than the ring, or not "
     "a buffer: the caller sends it the general way); the index reached."},
    {"try_recv_frame", (PyCFunction)rf_try_recv_frame, METH_O,
     "try_recv_frame(max_frame): None if the ring is empty; (codec, body) for a plain DATA "
     "frame of at most max_frame bytes; else (-1 - record flags, record) for the general "
     "path."},
    {"stop", (PyCFunction)rf_stop, METH_NOARGS,
     "from now on try_send_frame(s) send nothing and try_recv_frame returns every record "
     "whole: a channel that starts numbering its messages (receipts) counts them all."},
    {"counts", (PyCFunction)rf_counts, METH_NOARGS,
     "(frames sent, bytes, frames received, bytes) by this object's calls."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rf_getset[] = {
    {"ring", (getter)rf_get_ring, NULL, "the buzon._core.Ring", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingFramesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._frames.RingFrames",
    .tp_basicsize = sizeof(RingFrames),
    .tp_dealloc = (destructor)rf_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RingFrames(ring): buzon frames as the records of a buzon._core.Ring, one C "
              "call per small send or receive (the shm: channel's hot path).",
    .tp_methods = rf_methods,
    .tp_getset = rf_getset,
    .tp_new = rf_new,
};

/* ---- the channel core's small frames (protocol/frames.py re-exports these) -------- */

static PyObject *
data_frame(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    /* data_frame(body, flags) -> bytes: the 8-byte DATA header (no buffers, no fields)
     * and body, joined in one allocation */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "data_frame(body, flags)");
        return NULL;
    }
    long flags = PyLong_AsLong(args[1]);
    if (flags == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (flags < 0 || flags > 255) {
        PyErr_SetString(PyExc_ValueError, "frame flags must fit a byte");
        return NULL;
    }
    const char *src;
    Py_ssize_t n;
    Py_buffer view = {0};
    PyObject *body = args[0];
    if (PyBytes_CheckExact(body)) {
        src = PyBytes_AS_STRING(body);
        n = PyBytes_GET_SIZE(body);
    }
    else {
        if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        src = view.buf;
        n = view.len;
    }
    PyObject *out = NULL;
    if ((uint64_t)n > UINT32_MAX - HDR) {
        PyErr_SetString(PyExc_OverflowError, "a frame body is at most 4 GiB (u32)");
    }
    else if ((out = PyBytes_FromStringAndSize(NULL, HDR + n)) != NULL) {
        uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
        uint32_t u = (uint32_t)n;
        p[0] = VERSION;
        p[1] = KIND_DATA;
        p[2] = (uint8_t)flags;
        p[3] = 0;
        p[4] = (uint8_t)u;
        p[5] = (uint8_t)(u >> 8);
        p[6] = (uint8_t)(u >> 16);
        p[7] = (uint8_t)(u >> 24);
        memcpy(p + HDR, src, (size_t)n);
    }
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    return out;
}

/* flags 0-3 (a codec), with or without the receipt bit 0x08: what plain_data_flags takes */
#define PLAIN_MESSAGE_MASK 0xF4

static PyObject *
plain_data_flags(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    /* plain_data_flags(message, max_frame) -> int: the flags byte of a message that is one
     * plain DATA frame (no buffers, no fields, not chunked, a known codec, with or
     * without the receipt bit, at most max_frame bytes), else -1 */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plain_data_flags(message, max_frame)");
        return NULL;
    }
    Py_ssize_t max_frame = PyLong_AsSsize_t(args[1]);
    if (max_frame == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const uint8_t *p;
    Py_ssize_t n;
    Py_buffer view = {0};
    PyObject *msg = args[0];
    if (PyBytes_CheckExact(msg)) {
        p = (const uint8_t *)PyBytes_AS_STRING(msg);
        n = PyBytes_GET_SIZE(msg);
    }
    else {
        if (PyObject_GetBuffer(msg, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        p = view.buf;
        n = view.len;
    }
    long flags = -1;
    if (n >= HDR && n <= max_frame && p[0] == VERSION && p[1] == KIND_DATA &&
        !(p[2] & PLAIN_MESSAGE_MASK) && p[3] == 0) {
        uint32_t blen = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 |
                        (uint32_t)p[7] << 24;
        if ((uint64_t)blen + HDR == (uint64_t)n) {
            flags = p[2];
        }
    }
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    return PyLong_FromLong(flags);
}

/* ---- buzon.mailbox's common record (src/buzon/_mailbox.py) ----------------------
 * A mailbox record is one buzon frame with the header fields MESSAGE_ID, SENDER and
 * SENT_AT (protocol/frames.py, Field). The common one (no out-of-band buffers, no receipt,
 * exactly those fields) is a 40-byte head and the body:
 *   [0] version 1  [1] kind 1 (DATA)  [2] codec | 0x20 (FIELDS)  [3] 0 buffers
 *   [4..8) u32 body length  [8..10) u16 30 (the fields block)
 *   [10] tag 1 [11] 8 [12..20) u64 message id
 *   [20] tag 2 [21] 8 [22..26) u32 pid [26..30) u32 uid
 *   [30] tag 6 [31] 8 [32..40) u64 ns since the epoch
 * All little-endian. _mailbox.py builds the very same bytes in Python (a test compares
 * them with protocol/frames.py); anything else goes through its general path. */

#define MB_HEAD 40u
#define FLAG_FIELDS 0x20

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

/* The Ring argument of a mailbox call: 0, or -1 with TypeError (or the import's error). */
static int
ring_arg(PyObject *o)
{
    if (need_api() < 0) {
        return -1;
    }
    if (!PyObject_TypeCheck(o, api->ring_type)) {
        PyErr_SetString(PyExc_TypeError, "the first argument must be a buzon._core.Ring");
        return -1;
    }
    return 0;
}

static PyObject *
mailbox_send(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    /* mailbox_send(ring, body, codec, message_id, uid, timeout) */
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "mailbox_send(ring, body, codec, message_id, uid, timeout)");
        return NULL;
    }
    if (ring_arg(args[0]) < 0) {
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
    Py_buffer view = {0};
    const uint8_t *src;
    Py_ssize_t len;
    if (PyBytes_CheckExact(args[1])) { /* the common body: no buffer export to pay */
        src = (const uint8_t *)PyBytes_AS_STRING(args[1]);
        len = PyBytes_GET_SIZE(args[1]);
    }
    else {
        if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        src = view.buf;
        len = view.len;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    uint8_t h[MB_HEAD] = {VERSION, KIND_DATA, (uint8_t)(codec | FLAG_FIELDS), 0};
    /* a body too large for any record (4 GiB) makes put_wait raise MessageTooLarge before
     * anything is written, so a truncated length here is never seen */
    put32(h + 4, (uint32_t)len);
    h[8] = 30; /* the fields block: three fields of 8 bytes, 2 + 8 each */
    h[10] = 1; /* MESSAGE_ID */
    h[11] = 8;
    put64(h + 12, mid);
    h[20] = 2; /* SENDER */
    h[21] = 8;
    put32(h + 22, cached_pid);
    put32(h + 26, (uint32_t)uid);
    h[30] = 6; /* SENT_AT */
    h[31] = 8;
    put64(h + 32, ns);
    buzon_part parts[2] = {{h, MB_HEAD}, {src, (size_t)len}};
    int rc = api->put_wait(args[0], parts, 2, MB_HEAD + (size_t)len, 0, args[5]);
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Is the claimed record a mailbox's common record? Then skip its head. *ctx: its codec,
 * or -1 (the caller's general path). */
static uint32_t
peek_mailbox(void *ctx, const uint8_t *payload, uint32_t len, uint32_t flags)
{
    long *codec = ctx;
    uint8_t p[MB_HEAD] = {0};
    if (len >= MB_HEAD) {
        memcpy(p, payload, MB_HEAD); /* once: the peer may be rewriting it (untrusted) */
    }
    if (flags == 0 && len >= MB_HEAD && p[0] == VERSION && p[1] == KIND_DATA &&
        (p[2] & 0xF8) == FLAG_FIELDS && p[3] == 0 && p[8] == 30 && p[9] == 0 && p[10] == 1 &&
        p[11] == 8 && p[20] == 2 && p[21] == 8 && p[30] == 6 && p[31] == 8 &&
        get32(p + 4) == len - MB_HEAD) {
        *codec = p[2] & 7;
        return MB_HEAD;
    }
    *codec = -1;
    return 0;
}

static PyObject *
mailbox_recv(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    /* mailbox_recv(ring, timeout) -> (codec, body) | bytes */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "mailbox_recv(ring, timeout)");
        return NULL;
    }
    if (ring_arg(args[0]) < 0) {
        return NULL;
    }
    long codec = -1;
    PyObject *out = api->take_wait(args[0], peek_mailbox, &codec, args[1]);
    if (out == NULL || codec < 0) {
        return out;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, PyLong_FromLong(codec)); /* 0-7: small ints, cannot fail */
    PyTuple_SET_ITEM(pair, 1, out);
    return pair;
}


/* ---- MailboxCore: a mailbox object's hot path in one object --------------------------
 * What Mailbox.send and Mailbox.recv do for the common record, without a Python frame
 * between the call and the ring: the body made here (a bytes object as it is, codec 0;
 * any other object through a msgspec encoder without hooks, codec 1, so an object it
 * cannot encode -- a numpy array, a custom class -- goes the general way, where the
 * codec's hooks handle it), the record built (mailbox_send's bytes), the message id
 * drawn from this object's counter (the general path draws from it too: one sequence
 * per mailbox object), counted. recv decodes a codec 0/1 common record here (msgspec
 * decoder given by the mailbox) and hands anything else back to the general path. */


typedef struct {
    PyObject_HEAD
    PyObject *ring;     /* the mailbox's ring: where send puts */
    PyObject *encode;   /* msgspec.msgpack.Encoder().encode (no hooks), or None */
    PyObject *decode;   /* msgspec.msgpack.Decoder(ext_hook=...).decode, or None */
    Py_ssize_t fast_max; /* the largest body that goes as a common record */
    unsigned long long next_id;
    unsigned long long sent, received, acks_dropped;
    unsigned long uid;
    int nowait;         /* capacity=None: a send never waits (Full at once) */
    PyObject *replies;  /* dict: acknowledgement ring name (bytes) -> Ring, or None */
    int mark_fd;        /* the mailbox's wake-up FIFO (-1: none): last use, for buzon ls */
    uint64_t marked[2]; /* ns of our last mark: [0] a take (atime), [1] a send (mtime) */
    PyObject *msg_type; /* buzon.Message (set_message), or NULL: recv_message's tuples */
    Py_ssize_t msg_off[4]; /* its slots' offsets: body, id, sender, sent_at */
    PyObject *peer_fn;  /* _mailbox._peer(pid, uid) -> the shared PeerInfo */
    PyObject *last_peer; /* the PeerInfo of (last_pid, last_uid), or NULL */
    uint32_t last_pid, last_uid;
    PyObject *rc_type;  /* buzon.MailboxReceipt (set_receipt), or NULL */
    Py_ssize_t rc_off[4]; /* its slots' offsets: _box, _receivers, expected, id */
    PyObject *last_reply; /* acknowledge(): the last acknowledgement ring's name... */
    PyObject *last_ring;  /* ...and that ring (both NULL: none yet) */
    PyObject *acks, *acks_table; /* set_acks: our acknowledgement ring and its table... */
    PyObject *acks_acquire, *acks_release; /* ...and the lock guarding both */
    uint32_t acks_pid;  /* the process that made that ring (a forked child's is its own) */
} MailboxCore;

static PyObject *core_peer(MailboxCore *c, uint32_t pid, uint32_t uid);
static uint64_t get64(const uint8_t *p);

#define MARK_EVERY_NS 1000000000ULL /* at most one mark a second per object and kind */

/* buzon ls shows a mailbox's last use from its wake-up FIFO's times: atime the last
 * take, mtime the last send. Set at most once a second per object (one futimens), so
 * the hot path pays a comparison. */
static void
mark_use(MailboxCore *c, int kind, uint64_t ns)
{
    if (c->mark_fd < 0 || ns - c->marked[kind] < MARK_EVERY_NS) {
        return;
    }
    c->marked[kind] = ns;
    struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
    ts[kind].tv_sec = (time_t)(ns / 1000000000ULL);
    ts[kind].tv_nsec = (long)(ns % 1000000000ULL);
    (void)futimens(c->mark_fd, ts); /* best effort: a statistic */
}

static uint64_t
coarse_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t
build_head(uint8_t *h, long codec, uint32_t len, uint64_t mid, uint32_t uid)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    memset(h, 0, MB_HEAD);
    h[0] = VERSION;
    h[1] = KIND_DATA;
    h[2] = (uint8_t)(codec | FLAG_FIELDS);
    put32(h + 4, len);
    h[8] = 30;
    h[10] = 1;
    h[11] = 8;
    put64(h + 12, mid);
    h[20] = 2;
    h[21] = 8;
    put32(h + 22, cached_pid);
    put32(h + 26, uid);
    h[30] = 6;
    h[31] = 8;
    put64(h + 32, ns);
    return ns;
}

/* The body of obj for a common record: a new reference and its codec, NULL with no
 * exception (not a common record: the general way), NULL with an exception (a real
 * error, e.g. MemoryError... which the general way would meet too). */
static PyObject *
core_body(MailboxCore *c, PyObject *obj, long *codec)
{
    if (PyBytes_CheckExact(obj)) {
        if (PyBytes_GET_SIZE(obj) > c->fast_max) {
            return NULL;
        }
        *codec = 0;
        return Py_NewRef(obj);
    }
    if (c->encode == Py_None || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        return NULL; /* buffers: the codec decides what goes out of band */
    }
    PyObject *body = PyObject_CallOneArg(c->encode, obj);
    if (body == NULL) {
        PyErr_Clear(); /* the codec's hooks may know it (numpy), or say why not */
        return NULL;
    }
    if (!PyBytes_CheckExact(body) || PyBytes_GET_SIZE(body) > c->fast_max) {
        Py_DECREF(body);
        return NULL;
    }
    *codec = 1;
    return body;
}

#define TAG_REPLY_TO 5
#define ACK_WAIT_S 0.05 /* _mailbox._ACK_WAIT */
#define FLAG_RECEIPT 0x08

/* obj as a common record (reply: NULL, or the acknowledgement ring's name for a receipt
 * record), put waiting like Ring.send. 1 sent (*mid its id), 0 not a common record
 * (nothing sent), -1 error. */
static int
core_put(MailboxCore *c, PyObject *obj, PyObject *timeout, PyObject *reply, uint64_t *mid)
{
    Py_ssize_t rlen = 0;
    if (reply != NULL) {
        rlen = PyBytes_GET_SIZE(reply);
        if (rlen < 1 || rlen > 255) {
            return 0; /* the general way says what is wrong with it */
        }
    }
    long codec = 0;
    PyObject *body = core_body(c, obj, &codec);
    if (body == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_ssize_t len = PyBytes_GET_SIZE(body);
    if (len + 2 + rlen > c->fast_max + 0 && reply != NULL) {
        Py_DECREF(body);
        return 0; /* with its reply field it no longer fits a record: the general way */
    }
    uint8_t h[MB_HEAD];
    uint8_t field[2] = {TAG_REPLY_TO, (uint8_t)rlen};
    *mid = ++c->next_id;
    uint64_t ns = build_head(h, codec, (uint32_t)len, *mid, (uint32_t)c->uid);
    buzon_part parts[4];
    int n = 0;
    parts[n++] = (buzon_part){h, MB_HEAD};
    if (reply != NULL) {
        h[2] |= FLAG_RECEIPT;
        h[8] = (uint8_t)(30 + 2 + rlen);
        h[9] = (uint8_t)((30 + 2 + rlen) >> 8);
        parts[n++] = (buzon_part){field, 2};
        parts[n++] = (buzon_part){(const uint8_t *)PyBytes_AS_STRING(reply), (size_t)rlen};
    }
    parts[n++] = (buzon_part){(const uint8_t *)PyBytes_AS_STRING(body), (size_t)len};
    size_t total = MB_HEAD + (reply != NULL ? 2 + (size_t)rlen : 0) + (size_t)len;
    static PyObject *zero;
    if (zero == NULL && (zero = PyLong_FromLong(0)) == NULL) {
        Py_DECREF(body);
        return -1;
    }
    int rc = api->put_wait(c->ring, parts, n, total, 0, c->nowait ? zero : timeout);
    Py_DECREF(body);
    if (rc < 0) {
        return -1;
    }
    c->sent++;
    mark_use(c, 1, ns);
    return 1;
}

static PyObject *
core_send(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* send(obj, timeout) -> True (sent) | False (not a common record: the general way) */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(obj, timeout)");
        return NULL;
    }
    uint64_t mid;
    int rc = core_put(c, args[0], args[1], NULL, &mid);
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *
core_send_receipt(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* send_receipt(obj, timeout, reply_to) -> the message id | 0 (the general way) */
    if (nargs != 3 || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "send_receipt(obj, timeout, reply_to: bytes)");
        return NULL;
    }
    uint64_t mid = 0;
    int rc = core_put(c, args[0], args[1], args[2], &mid);
    return rc < 0 ? NULL : PyLong_FromUnsignedLongLong(rc ? mid : 0);
}

/* The slot offsets of names[0..n) in type, or -1 with TypeError. */
static int
slot_offsets(PyTypeObject *type, const char *const *names, int n, Py_ssize_t *off)
{
    for (int i = 0; i < n; i++) {
        PyObject *d = PyDict_GetItemString(type->tp_dict, names[i]); /* borrowed */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            PyErr_Format(PyExc_TypeError, "%s has no slot %s", type->tp_name, names[i]);
            return -1;
        }
        off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    return 0;
}

static PyObject *
core_set_receipt(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* set_receipt(MailboxReceipt): send_async makes the receipt itself */
    static const char *const names[4] = {"_box", "_receivers", "expected", "id"};
    if (nargs != 1 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "set_receipt(MailboxReceipt type)");
        return NULL;
    }
    if (slot_offsets((PyTypeObject *)args[0], names, 4, c->rc_off) < 0) {
        return NULL;
    }
    Py_XSETREF(c->rc_type, Py_NewRef(args[0]));
    Py_RETURN_NONE;
}

static PyObject *
core_send_async(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* send_async(obj, timeout, reply_to, box) -> MailboxReceipt(box, id) | None (nothing
     * sent: the general way) */
    if (nargs != 4 || !PyBytes_CheckExact(args[2]) || c->rc_type == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "send_async(obj, timeout, reply_to: bytes, box), after set_receipt");
        return NULL;
    }
    uint64_t mid = 0;
    int rc = core_put(c, args[0], args[1], args[2], &mid);
    if (rc <= 0) {
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyTypeObject *type = (PyTypeObject *)c->rc_type;
    PyObject *vals[4] = {Py_NewRef(args[3]), PyTuple_New(0), PyLong_FromLong(1),
                         PyLong_FromUnsignedLongLong((unsigned long long)mid)};
    PyObject *receipt = NULL;
    if (vals[1] != NULL && vals[2] != NULL && vals[3] != NULL) {
        receipt = type->tp_alloc(type, 0);
    }
    if (receipt == NULL) { /* sent all the same: the receipt is what failed */
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(vals[i]);
        }
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        *(PyObject **)((char *)receipt + c->rc_off[i]) = vals[i];
    }
    /* it cannot be part of a cycle (its slots are these four; receivers, a tuple of
     * PeerInfo): the collector need not visit it, and with 256 receipts in flight it
     * otherwise ran every few hundred sends */
    if (PyObject_IS_GC(receipt)) {
        PyObject_GC_UnTrack(receipt);
    }
    return receipt;
}

static uint32_t
peek_ack(void *ctx, const uint8_t *payload, uint32_t len, uint32_t flags)
{
    uint8_t *ack = ctx; /* [0..16) the acknowledgement, [16] 1 if it was one */
    (void)flags;
    ack[16] = len == 16;
    if (len == 16) {
        memcpy(ack, payload, 16);
    }
    return len; /* nothing copied out */
}

static PyObject *take_ack_impl(MailboxCore *c, PyObject *ring, PyObject *id, PyObject *table,
                               PyObject *timeout);

static PyObject *
core_take_ack(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* take_ack(acks, message_id, table) -> PeerInfo | None: read the acknowledgement
     * ring until message_id's comes (its receiver's PeerInfo) or it is empty (None); the
     * others go into table (a dict: id -> [PeerInfo, ...]). Never waits. */
    if (nargs != 3 || !PyDict_CheckExact(args[2]) || c->peer_fn == NULL) {
        PyErr_SetString(PyExc_TypeError, "take_ack(acks, message_id, table: dict)");
        return NULL;
    }
    if (ring_arg(args[0]) < 0) {
        return NULL;
    }
    return take_ack_impl(c, args[0], args[1], args[2], NULL);
}

static PyObject *
core_wait_ack(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* wait_ack(acks, message_id, table, timeout) -> PeerInfo | None: take_ack, but once
     * the ring is empty, wait up to timeout for one more acknowledgement (Timeout or
     * Empty if none came); None: others' came (into the table), not this one */
    if (nargs != 4 || !PyDict_CheckExact(args[2]) || c->peer_fn == NULL) {
        PyErr_SetString(PyExc_TypeError, "wait_ack(acks, message_id, table: dict, timeout)");
        return NULL;
    }
    if (ring_arg(args[0]) < 0) {
        return NULL;
    }
    return take_ack_impl(c, args[0], args[1], args[2], args[3]);
}

#define MAX_ACKS 65536 /* _mailbox._MAX_ACKS: acknowledgements kept for unread receipts */

static PyObject *
take_ack_impl(MailboxCore *c, PyObject *ring, PyObject *id, PyObject *table,
              PyObject *timeout)
{
    PyObject *args[3] = {ring, id, table};
    unsigned long long want = PyLong_AsUnsignedLongLong(args[1]);
    if (want == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (PyDict_GET_SIZE(args[2]) > 0) { /* read before, behind another's: the oldest */
        PyObject *got = PyDict_GetItemWithError(args[2], args[1]); /* borrowed */
        if (got == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (got != NULL && PyList_Check(got) && PyList_GET_SIZE(got) > 0) {
            PyObject *who = Py_NewRef(PyList_GET_ITEM(got, 0));
            if (PySequence_DelItem(got, 0) < 0 ||
                (PyList_GET_SIZE(got) == 0 && PyDict_DelItem(args[2], args[1]) < 0)) {
                Py_DECREF(who);
                return NULL;
            }
            return who;
        }
    }
    for (;;) {
        uint8_t ack[17] = {0};
        PyObject *out = api->take(args[0], peek_ack, ack);
        if (out == Py_None && timeout != NULL) { /* empty: wait once (wait_ack) */
            Py_DECREF(out);
            out = api->take_wait(args[0], peek_ack, ack, timeout);
            timeout = NULL;
        }
        if (out == NULL || out == Py_None) {
            return out;
        }
        Py_DECREF(out);
        if (!ack[16]) {
            continue; /* not an acknowledgement: skipped, as the general way does */
        }
        uint64_t mid = get64(ack);
        PyObject *peer = core_peer(c, get32(ack + 8), get32(ack + 12));
        if (peer == NULL || mid == want) {
            return peer;
        }
        PyObject *key = PyLong_FromUnsignedLongLong((unsigned long long)mid);
        PyObject *list = key == NULL ? NULL : PyDict_GetItemWithError(args[2], key);
        int bad;
        if (list != NULL) {
            bad = !PyList_Check(list) || PyList_Append(list, peer) < 0;
        }
        else if (key == NULL || PyErr_Occurred() || (list = PyList_New(1)) == NULL) {
            bad = 1;
        }
        else {
            PyList_SET_ITEM(list, 0, Py_NewRef(peer));
            bad = PyDict_SetItem(args[2], key, list) < 0;
            Py_DECREF(list);
        }
        Py_XDECREF(key);
        Py_DECREF(peer);
        while (!bad && PyDict_GET_SIZE(args[2]) > MAX_ACKS) { /* forget the oldest */
            Py_ssize_t pos = 0;
            PyObject *old, *v;
            if (!PyDict_Next(args[2], &pos, &old, &v)) {
                break;
            }
            Py_INCREF(old);
            bad = PyDict_DelItem(args[2], old) < 0;
            Py_DECREF(old);
        }
        if (bad) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "the table holds lists of PeerInfo");
            }
            return NULL;
        }
    }
}

static PyObject *
core_set_acks(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* set_acks(ring, table, lock) | set_acks(None, None, None): receipt_ready's ring */
    if (nargs != 3 || (args[0] != Py_None && !PyDict_CheckExact(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "set_acks(ring, table: dict, lock)");
        return NULL;
    }
    PyObject *acq = NULL, *rel = NULL;
    if (args[0] != Py_None) {
        if (ring_arg(args[0]) < 0) {
            return NULL;
        }
        acq = PyObject_GetAttrString(args[2], "acquire");
        rel = acq == NULL ? NULL : PyObject_GetAttrString(args[2], "release");
        if (rel == NULL) {
            Py_XDECREF(acq);
            return NULL;
        }
    }
    Py_CLEAR(c->acks);
    Py_CLEAR(c->acks_table);
    Py_XSETREF(c->acks_acquire, acq);
    Py_XSETREF(c->acks_release, rel);
    if (args[0] != Py_None) {
        c->acks = Py_NewRef(args[0]);
        c->acks_table = Py_NewRef(args[1]);
        c->acks_pid = cached_pid;
    }
    Py_RETURN_NONE;
}

static PyObject *
core_receipt_ready(MailboxCore *c, PyObject *receipt)
{
    /* receipt_ready(receipt) -> PeerInfo | None: a MailboxReceipt's hot path (nobody
     * took it yet, one receiver expected): its acknowledgement from the table or the
     * ring (take_ack) under the mailbox's lock, if that lock is free now; the receipt
     * records it. None: not here yet, or the general way must look (lock held, ring not
     * ours, closed, another kind of receipt). */
    if (c->acks == NULL || c->acks_pid != cached_pid || c->rc_type == NULL ||
        !Py_IS_TYPE(receipt, (PyTypeObject *)c->rc_type) || c->peer_fn == NULL) {
        Py_RETURN_NONE;
    }
    PyObject **slot_rx = (PyObject **)((char *)receipt + c->rc_off[1]);
    PyObject *expected = *(PyObject **)((char *)receipt + c->rc_off[2]);
    PyObject *id = *(PyObject **)((char *)receipt + c->rc_off[3]);
    if (*slot_rx == NULL || !PyTuple_CheckExact(*slot_rx) || PyTuple_GET_SIZE(*slot_rx) != 0 ||
        expected == NULL || !PyLong_CheckExact(expected) || PyLong_AsLong(expected) != 1 ||
        id == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *got = PyObject_CallOneArg(c->acks_acquire, Py_False);
    if (got != Py_True) { /* held (a waiting receipt, close): the general way waits */
        Py_XDECREF(got);
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Py_DECREF(got);
    PyObject *ring = Py_NewRef(c->acks), *table = Py_NewRef(c->acks_table);
    Py_INCREF(id);
    PyObject *who = take_ack_impl(c, ring, id, table, NULL);
    Py_DECREF(id);
    Py_DECREF(ring);
    Py_DECREF(table);
    if (who == NULL) {
        PyErr_Clear(); /* the ring shut down, say: the general way says what happened */
        who = Py_NewRef(Py_None);
    }
    PyObject *done = PyObject_CallNoArgs(c->acks_release);
    if (done == NULL) {
        Py_DECREF(who);
        return NULL;
    }
    Py_DECREF(done);
    if (who != Py_None) {
        PyObject *t = PyTuple_Pack(1, who);
        if (t == NULL) {
            Py_DECREF(who);
            return NULL;
        }
        Py_XSETREF(*slot_rx, t);
    }
    return who;
}

typedef struct {
    long codec;            /* 0-7: a common record (its head skipped); -1: the general way */
    int receipt;           /* the receipt variant: reply[0..rlen) names the ack ring */
    uint32_t rlen;
    uint8_t head[MB_HEAD]; /* copied once (the peer may rewrite the record: untrusted) */
    uint8_t reply[255];
} peek_ctx_mb;

/* The common record (40-byte head, then the body) or its receipt variant (the head
 * with the receipt flag and a FIELDS block 2 + L longer, then REPLY_TO: tag 5, L, the
 * name, then the body). Everything checked on private copies; skip = head + field. */
static uint32_t
peek_message(void *ctx, const uint8_t *payload, uint32_t len, uint32_t flags)
{
    peek_ctx_mb *m = ctx;
    uint8_t *p = m->head;
    m->codec = -1;
    if (flags != 0 || len < MB_HEAD) {
        return 0;
    }
    memcpy(p, payload, MB_HEAD);
    uint32_t extra = 0;
    int receipt = (p[2] & FLAG_RECEIPT) != 0;
    uint32_t fields = (uint32_t)p[8] | (uint32_t)p[9] << 8;
    if (receipt) {
        uint8_t f[2];
        if (len < MB_HEAD + 2) {
            return 0;
        }
        memcpy(f, payload + MB_HEAD, 2);
        if (f[0] != TAG_REPLY_TO || f[1] == 0 || len < MB_HEAD + 2 + f[1] ||
            fields != 32u + f[1]) {
            return 0;
        }
        m->rlen = f[1];
        memcpy(m->reply, payload + MB_HEAD + 2, f[1]);
        extra = 2u + f[1];
    }
    else if (fields != 30) {
        return 0;
    }
    if (p[0] == VERSION && p[1] == KIND_DATA && (p[2] & 0xF0) == FLAG_FIELDS && p[3] == 0 &&
        p[10] == 1 && p[11] == 8 && p[20] == 2 && p[21] == 8 && p[30] == 6 && p[31] == 8 &&
        get32(p + 4) == len - MB_HEAD - extra) {
        m->codec = p[2] & 7;
        m->receipt = receipt;
        return MB_HEAD + extra;
    }
    return 0;
}

static uint64_t
get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Tell the sender of a receipt record who took it: 1 done (or dropped and counted),
 * 0 its acknowledgement ring is not attached here yet (the general way attaches it). */
static int
acknowledge(MailboxCore *c, peek_ctx_mb *m)
{
    if (c->replies == NULL || !PyDict_CheckExact(c->replies)) { /* deleted, or not set */
        return 0;
    }
    PyObject *ring;
    if (c->last_reply != NULL && (uint32_t)PyBytes_GET_SIZE(c->last_reply) == m->rlen &&
        memcmp(PyBytes_AS_STRING(c->last_reply), m->reply, m->rlen) == 0 &&
        PyDict_GetItemWithError(c->replies, c->last_reply) == c->last_ring) {
        ring = c->last_ring; /* the same sender as last time (still in the table) */
    }
    else {
        PyErr_Clear();
        PyObject *name = PyBytes_FromStringAndSize((const char *)m->reply, m->rlen);
        if (name == NULL) {
            PyErr_Clear();
            return 0;
        }
        ring = PyDict_GetItemWithError(c->replies, name); /* borrowed */
        if (ring == NULL || !PyObject_TypeCheck(ring, api->ring_type)) {
            Py_DECREF(name);
            PyErr_Clear();
            return 0;
        }
        Py_XSETREF(c->last_reply, name);
        Py_XSETREF(c->last_ring, Py_NewRef(ring));
    }
    uint8_t ack[16]; /* message id, pid, uid: _mailbox._ACK */
    put64(ack, get64(m->head + 12));
    put32(ack + 8, cached_pid);
    put32(ack + 12, (uint32_t)c->uid);
    buzon_part part = {ack, sizeof ack};
    /* a bounded wait (_mailbox._ACK_WAIT): a put that does not wait gives up after 2 ms
     * on the ring's reservation lock, and under load a preempted holder keeps it longer:
     * the acknowledgement was lost and its receipt never completed */
    static PyObject *ack_wait;
    if (ack_wait == NULL && (ack_wait = PyFloat_FromDouble(ACK_WAIT_S)) == NULL) {
        PyErr_Clear();
        c->acks_dropped++;
        return 1;
    }
    Py_INCREF(ring); /* a wait releases the GIL: the table may drop it meanwhile */
    int put = api->put(ring, &part, 1, sizeof ack, 0); /* the common case: no clock read */
    if (put < 0) {
        PyErr_Clear(); /* closed or gone: put_wait finds it so too */
        put = 0;
    }
    if (put == 0 && api->put_wait(ring, &part, 1, sizeof ack, 0, ack_wait) < 0) {
        PyErr_Clear();
        c->acks_dropped++;
    }
    Py_DECREF(ring);
    return 1;
}

/* The next record of ring: *obj the common record's object (decoded), or NULL with no
 * exception and *whole the record for the general way; NULL with an exception on error. */
static int
take_message(MailboxCore *c, PyObject *ring, PyObject *timeout, peek_ctx_mb *m,
             PyObject **obj, PyObject **whole)
{
    *obj = *whole = NULL;
    if (ring_arg(ring) < 0) {
        return -1;
    }
    m->codec = -1;
    m->receipt = 0;
    PyObject *out = api->take_wait(ring, peek_message, m, timeout);
    if (out == NULL) {
        return -1;
    }
    if (c->mark_fd >= 0) {
        mark_use(c, 0, coarse_now_ns());
    }
    if (m->codec < 0) {
        *whole = out;
        return 0;
    }
    if (!m->receipt || acknowledge(c, m)) {
        if (m->codec == 0) {
            *obj = out;
            c->received++;
            return 0;
        }
        if (m->codec == 1 && c->decode != Py_None) {
            *obj = PyObject_CallOneArg(c->decode, out);
            if (*obj != NULL) {
                Py_DECREF(out);
                c->received++;
                return 0;
            }
            PyErr_Clear();
            if (m->receipt) {
                /* acknowledged already: the general way must not do it again, and it
                 * only has to say why the body does not decode */
                m->receipt = 0;
                m->head[2] &= (uint8_t)~FLAG_RECEIPT;
                m->head[8] = 30;
                m->head[9] = 0;
                m->rlen = 0;
            }
        }
    }
    /* the general way needs the whole record: rebuild it from the copies */
    uint32_t extra = m->receipt ? 2u + m->rlen : 0u;
    Py_ssize_t n = PyBytes_GET_SIZE(out);
    *whole = PyBytes_FromStringAndSize(NULL, MB_HEAD + extra + n);
    if (*whole != NULL) {
        uint8_t *w = (uint8_t *)PyBytes_AS_STRING(*whole);
        memcpy(w, m->head, MB_HEAD);
        if (m->receipt) {
            w[MB_HEAD] = TAG_REPLY_TO;
            w[MB_HEAD + 1] = (uint8_t)m->rlen;
            memcpy(w + MB_HEAD + 2, m->reply, m->rlen);
        }
        memcpy(w + MB_HEAD + extra, PyBytes_AS_STRING(out), (size_t)n);
    }
    Py_DECREF(out);
    return *whole == NULL ? -1 : 0;
}

static PyObject *
one_tuple(PyObject *whole)
{
    PyObject *t = PyTuple_New(1);
    if (t == NULL) {
        Py_DECREF(whole);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, whole);
    return t;
}

/* The shared PeerInfo of (pid, uid): the last one kept here, others from peer_fn. */
static PyObject *
core_peer(MailboxCore *c, uint32_t pid, uint32_t uid)
{
    if (c->last_peer != NULL && c->last_pid == pid && c->last_uid == uid) {
        return Py_NewRef(c->last_peer);
    }
    PyObject *peer = PyObject_CallFunction(c->peer_fn, "kk", (unsigned long)pid,
                                           (unsigned long)uid);
    if (peer == NULL) {
        return NULL;
    }
    Py_XSETREF(c->last_peer, Py_NewRef(peer));
    c->last_pid = pid;
    c->last_uid = uid;
    return peer;
}

/* A buzon.Message of obj (stolen) and the fields of m's head, made through its slots
 * (the frozen dataclass's __init__ costs several times more). */
static PyObject *
new_message(MailboxCore *c, PyObject *obj, peek_ctx_mb *m)
{
    PyTypeObject *type = (PyTypeObject *)c->msg_type;
    PyObject *vals[4] = {obj, NULL, NULL, NULL};
    vals[1] = PyLong_FromUnsignedLongLong((unsigned long long)get64(m->head + 12));
    vals[2] = core_peer(c, get32(m->head + 22), get32(m->head + 26));
    vals[3] = PyFloat_FromDouble((double)get64(m->head + 32) / 1e9);
    PyObject *msg = NULL;
    if (vals[1] != NULL && vals[2] != NULL && vals[3] != NULL) {
        msg = type->tp_alloc(type, 0);
    }
    if (msg == NULL) {
        for (int i = 0; i < 4; i++) {
            Py_XDECREF(vals[i]);
        }
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        *(PyObject **)((char *)msg + c->msg_off[i]) = vals[i]; /* the new slots: empty */
    }
    return msg;
}

static PyObject *
core_set_message(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* set_message(Message, peer): recv_message makes Message objects itself */
    static const char *const names[4] = {"body", "id", "sender", "sent_at"};
    if (nargs != 2 || !PyType_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_message(Message type, peer function)");
        return NULL;
    }
    if (slot_offsets((PyTypeObject *)args[0], names, 4, c->msg_off) < 0) {
        return NULL;
    }
    Py_XSETREF(c->msg_type, Py_NewRef(args[0]));
    Py_XSETREF(c->peer_fn, Py_NewRef(args[1]));
    Py_CLEAR(c->last_peer);
    Py_RETURN_NONE;
}

static PyObject *
core_recv(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* recv(ring, timeout) -> the object of a common record (codec 0: its bytes; codec 1:
     * decoded; a receipt record acknowledged), else (record,) for the general way */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv(ring, timeout)");
        return NULL;
    }
    peek_ctx_mb m;
    PyObject *obj, *whole;
    if (take_message(c, args[0], args[1], &m, &obj, &whole) < 0) {
        return NULL;
    }
    return obj != NULL ? obj : one_tuple(whole);
}

static PyObject *
core_recv_message(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* recv_message(ring, timeout) -> (object, message id, pid, uid, sent_at ns) of a common
     * record, else (record,) for the general way */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_message(ring, timeout)");
        return NULL;
    }
    peek_ctx_mb m;
    PyObject *obj, *whole;
    if (take_message(c, args[0], args[1], &m, &obj, &whole) < 0) {
        return NULL;
    }
    if (obj == NULL) {
        return one_tuple(whole);
    }
    if (c->msg_type != NULL) {
        return new_message(c, obj, &m);
    }
    return Py_BuildValue("(NKkkK)", obj, (unsigned long long)get64(m.head + 12),
                         (unsigned long)get32(m.head + 22), (unsigned long)get32(m.head + 26),
                         (unsigned long long)get64(m.head + 32));
}

static PyObject *
core_recv_from(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* recv_from(ring, timeout, pid) -> the object of a common record sent by pid | a
     * Message of a common record another pid sent | (record,) for the general way */
    if (nargs != 3 || c->msg_type == NULL) {
        PyErr_SetString(PyExc_TypeError, "recv_from(ring, timeout, pid), after set_message");
        return NULL;
    }
    unsigned long pid = PyLong_AsUnsignedLong(args[2]);
    if (pid == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    peek_ctx_mb m;
    PyObject *obj, *whole;
    if (take_message(c, args[0], args[1], &m, &obj, &whole) < 0) {
        return NULL;
    }
    if (obj == NULL) {
        return one_tuple(whole);
    }
    /* the object itself only when it cannot be taken for one of the other two answers */
    if (get32(m.head + 22) == pid && !PyTuple_Check(obj) &&
        !PyObject_TypeCheck(obj, (PyTypeObject *)c->msg_type)) {
        return obj;
    }
    return new_message(c, obj, &m);
}

static PyObject *
core_next_id(MailboxCore *c, PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLongLong(++c->next_id);
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", "encode", "decode", "fast_max", "uid", "nowait", NULL};
    PyObject *ring, *encode, *decode;
    Py_ssize_t fast_max;
    unsigned long uid;
    int nowait;
    if (need_api() < 0) {
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OOnkp:MailboxCore", kwlist, api->ring_type,
                                     &ring, &encode, &decode, &fast_max, &uid, &nowait)) {
        return NULL;
    }
    MailboxCore *c = (MailboxCore *)type->tp_alloc(type, 0);
    if (c == NULL) {
        return NULL;
    }
    c->ring = Py_NewRef(ring);
    c->encode = Py_NewRef(encode);
    c->decode = Py_NewRef(decode);
    c->fast_max = fast_max;
    c->uid = uid;
    c->nowait = nowait;
    c->replies = Py_NewRef(Py_None);
    c->mark_fd = -1;
    return (PyObject *)c;
}

static void
core_dealloc(MailboxCore *c)
{
    Py_XDECREF(c->ring);
    Py_XDECREF(c->encode);
    Py_XDECREF(c->decode);
    Py_XDECREF(c->replies);
    Py_XDECREF(c->msg_type);
    Py_XDECREF(c->peer_fn);
    Py_XDECREF(c->last_peer);
    Py_XDECREF(c->rc_type);
    Py_XDECREF(c->last_reply);
    Py_XDECREF(c->last_ring);
    Py_XDECREF(c->acks);
    Py_XDECREF(c->acks_table);
    Py_XDECREF(c->acks_acquire);
    Py_XDECREF(c->acks_release);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef core_methods[] = {
    {"send_receipt", (PyCFunction)(void (*)(void))core_send_receipt, METH_FASTCALL,
     "send_receipt(obj, timeout, reply_to) -> int: send, as a receipt record whose "
     "receiver acknowledges to the ring named reply_to; the message id, or 0 (nothing "
     "sent) if it is not a common record."},
    {"send", (PyCFunction)(void (*)(void))core_send, METH_FASTCALL,
     "send(obj, timeout) -> bool: obj as a common record (bytes as they are, else msgpack "
     "without hooks), put into the ring waiting like Ring.send (nowait: Full at once); "
     "False (nothing sent) if it is not one: the caller's general way."},
    {"send_async", (PyCFunction)(void (*)(void))core_send_async, METH_FASTCALL,
     "send_async(obj, timeout, reply_to, box) -> MailboxReceipt | None: send_receipt, and "
     "the receipt made here (after set_receipt); None: nothing sent, the general way."},
    {"set_receipt", (PyCFunction)(void (*)(void))core_set_receipt, METH_FASTCALL,
     "set_receipt(MailboxReceipt): send_async makes receipts through its slots."},
    {"take_ack", (PyCFunction)(void (*)(void))core_take_ack, METH_FASTCALL,
     "take_ack(acks, message_id, table) -> PeerInfo | None: message_id's acknowledgement from "
     "table (a dict of id -> list of PeerInfo, oldest first) or read from the ring until it "
     "comes, the others into table (None: not there). Never waits. After set_message."},
    {"wait_ack", (PyCFunction)(void (*)(void))core_wait_ack, METH_FASTCALL,
     "wait_ack(acks, message_id, table, timeout) -> PeerInfo | None: take_ack, waiting up "
     "to timeout once the ring is empty (Timeout, or Empty for timeout <= 0, if nothing "
     "came); None: only others' acknowledgements came (into table)."},
    {"set_acks", (PyCFunction)(void (*)(void))core_set_acks, METH_FASTCALL,
     "set_acks(ring, table, lock) | set_acks(None, None, None): this process's "
     "acknowledgement ring, its table and the lock guarding both, for receipt_ready."},
    {"receipt_ready", (PyCFunction)core_receipt_ready, METH_O,
     "receipt_ready(receipt) -> PeerInfo | None: a one-receiver receipt nobody took yet: "
     "its acknowledgement (take_ack) if it is here and the lock is free, recorded in the "
     "receipt; None otherwise (the general way)."},
    {"recv", (PyCFunction)(void (*)(void))core_recv, METH_FASTCALL,
     "recv(ring, timeout) -> object | (record,) | (codec, body): the next record of ring, "
     "waiting like Ring.recv; a common record's object, else what the general way needs."},
    {"recv_message", (PyCFunction)(void (*)(void))core_recv_message, METH_FASTCALL,
     "recv_message(ring, timeout) -> (object, id, pid, uid, sent_at ns) | (record,): like "
     "recv, with the common record's fields (a Message instead of the tuple after "
     "set_message)."},
    {"recv_from", (PyCFunction)(void (*)(void))core_recv_from, METH_FASTCALL,
     "recv_from(ring, timeout, pid) -> object | Message | (record,): like recv_message; a "
     "common record pid sent gives its object alone, one another pid sent its Message."},
    {"set_message", (PyCFunction)(void (*)(void))core_set_message, METH_FASTCALL,
     "set_message(Message, peer): recv_message and recv_from make Message objects (peer(pid, "
     "uid) gives the sender's PeerInfo) instead of tuples."},
    {"next_id", (PyCFunction)core_next_id, METH_NOARGS,
     "The next message id of this mailbox object (the general way's sends)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"fast_max", T_PYSSIZET, offsetof(MailboxCore, fast_max), 0,
     "the largest body sent as a common record"},
    {"sent", T_ULONGLONG, offsetof(MailboxCore, sent), READONLY, "messages send sent"},
    {"received", T_ULONGLONG, offsetof(MailboxCore, received), READONLY,
     "common records recv took"},
    {"acks_dropped", T_ULONGLONG, offsetof(MailboxCore, acks_dropped), READONLY,
     "acknowledgements that found their ring full or gone"},
    {"mark_fd", T_INT, offsetof(MailboxCore, mark_fd), 0,
     "the fd whose atime/mtime mark the last take/send (at most once a second), or -1"},
    {"replies", T_OBJECT, offsetof(MailboxCore, replies), 0,
     "dict: acknowledgement ring name (bytes) -> Ring, for receipt records (or None)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject MailboxCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._frames.MailboxCore",
    .tp_basicsize = sizeof(MailboxCore),
    .tp_dealloc = (destructor)core_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "MailboxCore(ring, encode, decode, fast_max, uid, nowait): a mailbox object's "
              "hot path (buzon._mailbox): common records sent and received in "
              "one C call each.",
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_new = core_new,
};

static PyMethodDef module_functions[] = {
    {"data_frame", (PyCFunction)(void (*)(void))data_frame, METH_FASTCALL,
     "data_frame(body, flags) -> bytes: a DATA frame without buffers or fields, header "
     "and body joined."},
    {"plain_data_flags", (PyCFunction)(void (*)(void))plain_data_flags, METH_FASTCALL,
     "plain_data_flags(message, max_frame) -> int: the flags of a message that is exactly one "
     "plain DATA frame (codec 0-3, maybe the receipt bit; no buffers, fields or chunks; at "
     "most max_frame bytes), else -1."},
    {"mailbox_send", (PyCFunction)(void (*)(void))mailbox_send, METH_FASTCALL,
     "mailbox_send(ring, body, codec, message_id, uid, timeout): a mailbox's common record "
     "(the sender's pid and the time read here) put into the ring, waiting for room like "
     "Ring.send (timeout None: for ever; <= 0: Full at once)."},
    {"mailbox_recv", (PyCFunction)(void (*)(void))mailbox_recv, METH_FASTCALL,
     "mailbox_recv(ring, timeout) -> (codec, body) for a mailbox's common record, else the "
     "record's bytes (the general path); waits like Ring.recv (<= 0: Empty at once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "buzon.protocol._frames",
    .m_doc = "The frame format's C speedups (docs/frames.md): small DATA frames for the "
             "channel core, frames as the records of shared-memory rings, and a mailbox's "
             "common record.",
    .m_size = -1,
    .m_methods = module_functions,
};

PyMODINIT_FUNC
PyInit__frames(void)
{
    if (PyType_Ready(&RingFramesType) < 0 || PyType_Ready(&MailboxCoreType) < 0) {
        return NULL;
    }
    cached_pid = (uint32_t)getpid();
    if (pthread_atfork(NULL, NULL, frames_atfork_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RingFramesType);
    if (PyModule_AddObject(m, "RingFrames", (PyObject *)&RingFramesType) < 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HDR) < 0 ||
        PyModule_AddObjectRef(m, "MailboxCore", (PyObject *)&MailboxCoreType) < 0) {
        Py_DECREF(&RingFramesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
