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
#include <stdatomic.h>
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

/* ---- MailboxCore: a mailbox object's hot path in one object --------------------------
 * What Mailbox.send and Mailbox.recv do for the common record, without a Python frame
 * between the call and the ring: the body made here (a bytes object as it is, codec 0;
 * any other object through a msgspec encoder without hooks, codec 1, so an object it
 * cannot encode -- a numpy array, a custom class -- goes the general way, where the
 * codec's hooks handle it), the record built (mailbox_send's bytes), the message id
 * drawn from this object's counter (the general path draws from it too: one sequence
 * per mailbox object), counted. recv decodes a codec 0/1 common record here (msgspec
 * decoder given by the mailbox) and hands anything else back to the general path. */


#define REPLY_SEEN 8
#define PEER_SEEN 8

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
    /* core_peer: the PeerInfo of (peer_pid[k], peer_uid[k]) for the last PEER_SEEN
     * processes met (NULL: none), replaced in turn (peer_next): a sender's receipts name
     * the 4 receivers of a 4x4 in turn, and peer_fn is a Python call */
    PyObject *peer[PEER_SEEN];
    uint32_t peer_pid[PEER_SEEN], peer_uid[PEER_SEEN];
    unsigned peer_next;
    /* acknowledge(): the last REPLY_SEEN acknowledgement names met and their entries of
     * replies (NULL: none yet), most recent first: 4 senders take turns in a 4x4 */
    PyObject *last_reply[REPLY_SEEN];
    PyObject *last_ring[REPLY_SEEN];
    PyObject *acks, *acks_table; /* set_acks: our acknowledgement ring and its table... */
    PyObject *acks_acquire, *acks_release; /* ...and the lock guarding both */
    uint32_t acks_pid;  /* the process that made that ring (a forked child's is its own) */
    Py_buffer acktab;   /* set_acks: our acknowledgement table (see below), or .obj NULL */
    PyObject *reply_name; /* set_acks: b"#" + our ring's name (send_async's REPLY_TO) */
    PyObject *box_ref;  /* bind(): a weak reference to the Mailbox, for receipt_send */
    int hot_async;      /* bind(): receipt_send and box_send may take the hot path (cleared
                         * by close) */
    int hot_recv;       /* bind(): box_recv may take the hot path (policy "any", open) */
    int tabled;         /* bind(): receipt_send may ask for the table (REPLY_TO "#": the
                         * mailbox's label says every receiver knows it) */
} MailboxCore;

static PyObject *core_peer(MailboxCore *c, uint32_t pid, uint32_t uid);
static uint64_t get64(const uint8_t *p);
static PyTypeObject MailboxCoreType;

/* ---- MailboxReceipt: the fate of one message sent with Mailbox.send_async ------------
 * A C type so that the common receipt (one receiver, acknowledged in the sender's table)
 * is made by send_async and read by wait/done without a Python frame. What the hot path
 * cannot answer (waiting, a broadcast's several receivers, the general way's receipts)
 * goes to _mailbox's Python functions (receipt_ways). Not tracked by the collector: its
 * references are its mailbox, that mailbox's core and a tuple of PeerInfo, none of which
 * refers back to a receipt (with 256 receipts in flight the collector otherwise ran
 * every few hundred sends). */
typedef struct {
    PyObject_HEAD
    PyObject *box;       /* the Mailbox it was sent through */
    PyObject *receivers; /* tuple of PeerInfo: who took it so far (written by _mailbox) */
    PyObject *core;      /* box._core, or NULL until first needed */
    unsigned long long id;
    Py_ssize_t expected; /* receivers it went to (broadcast: several; 0: none) */
    Py_ssize_t lost;     /* broadcast: copies a receiver lost (its backlog dropped it, or it
                          * closed or died before taking it), found by _mailbox */
} Receipt;

static PyTypeObject ReceiptType;
static PyObject *receipt_done_fn, *receipt_wait_fn; /* receipt_ways: the general way */
static PyObject *empty_tuple;

static Receipt *
new_receipt(PyObject *box, unsigned long long id, Py_ssize_t expected, PyObject *core)
{
    Receipt *r = PyObject_New(Receipt, &ReceiptType);
    if (r == NULL) {
        return NULL;
    }
    r->box = Py_NewRef(box);
    r->receivers = Py_NewRef(empty_tuple);
    r->core = Py_XNewRef(core);
    r->id = id;
    r->expected = expected;
    r->lost = 0;
    return r;
}

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

/* ---- the acknowledgement table -------------------------------------------------------
 * A receipt record of send_async's hot path names its sender's acknowledgement ring with
 * a leading '#' (_mailbox._TABLED): its receiver writes the acknowledgement into the
 * sender's table (a Block named after the ring, _mailbox._TABLE_SUFFIX) instead of the
 * ring, a few plain stores instead of a record reserved, committed, claimed and freed
 * across CPUs. Entry (message id % ACKTAB_SLOTS): u64 id, u32 pid, u32 uid. Message ids
 * are one object's counter, so entries are direct-mapped. A receiver claims the entry by
 * CAS of its id word to (id | ACK_BUSY) only if the id there is older, stores pid and uid,
 * then the id (release); the sender reads id, pid, uid, id again (a seqlock). An entry
 * that already holds a later message's id (ACKTAB_SLOTS receipts behind) refuses the
 * older one, which then goes into the ring as before (nothing lost while the ring has
 * room). The head's u32 at offset 0 counts the sender's threads waiting for an
 * acknowledgement (take_ack_impl, under the mailbox's lock: one at a time), the u64 at
 * offset 8 is the id it waits for: a receiver that sees a waiter for its id after its
 * store also puts a doorbell (the id with ACK_DOORBELL) into the ring, whose wake-ups
 * are the waiter's (futex, asyncio's FIFO). Store then load on one side, increment then
 * load on the other, both sequentially consistent: a waiter misses neither. The table is the
 * sender's process's shared memory, written by any process of its user: a scribbled
 * entry names a wrong receiver at worst, and never makes a read go out of bounds. */
#define ACKTAB_SLOTS 65536u /* _mailbox._MAX_ACKS: receipts a sender may leave unread */
#define ACKTAB_HEAD 64u
#define ACKTAB_BYTES (ACKTAB_HEAD + 16u * ACKTAB_SLOTS) /* _mailbox._ACKTAB_BYTES */
#define ACK_BUSY (1ULL << 63)
#define ACK_DOORBELL (1ULL << 63)

typedef struct {
    _Atomic uint64_t id;
    _Atomic uint32_t pid, uid;
} ack_entry;

static _Atomic uint32_t *
tab_waiters(uint8_t *tab)
{
    return (_Atomic uint32_t *)tab;
}

static _Atomic uint64_t *
tab_want(uint8_t *tab)
{
    return (_Atomic uint64_t *)(tab + 8);
}

static ack_entry *
tab_entry(uint8_t *tab, uint64_t mid)
{
    return (ack_entry *)(tab + ACKTAB_HEAD) + (mid % ACKTAB_SLOTS);
}

/* A receiver's store: 1 written, 0 the entry holds a later message's (not written). */
static int
tab_put(uint8_t *tab, uint64_t mid, uint32_t pid, uint32_t uid)
{
    ack_entry *e = tab_entry(tab, mid);
    uint64_t cur = atomic_load_explicit(&e->id, memory_order_relaxed);
    do {
        if ((cur & ~ACK_BUSY) >= mid) {
            return 0;
        }
    } while (!atomic_compare_exchange_weak(&e->id, &cur, mid | ACK_BUSY));
    atomic_store_explicit(&e->pid, pid, memory_order_relaxed);
    atomic_store_explicit(&e->uid, uid, memory_order_relaxed);
    atomic_store_explicit(&e->id, mid, memory_order_release);
    return 1;
}

/* The sender's read: 1 with *pid, *uid if mid's acknowledgement is there. */
static int
tab_get(uint8_t *tab, uint64_t mid, uint32_t *pid, uint32_t *uid)
{
    ack_entry *e = tab_entry(tab, mid);
    if (atomic_load_explicit(&e->id, memory_order_acquire) != mid) {
        return 0;
    }
    *pid = atomic_load_explicit(&e->pid, memory_order_relaxed);
    *uid = atomic_load_explicit(&e->uid, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    return atomic_load_explicit(&e->id, memory_order_relaxed) == mid;
}

/* Our table (set_acks) if ring is our acknowledgement ring, else NULL. */
static uint8_t *
own_table(MailboxCore *c, PyObject *ring)
{
    return (c->acktab.obj != NULL && ring == c->acks && c->acks_pid == cached_pid)
               ? (uint8_t *)c->acktab.buf
               : NULL;
}

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

/* send_async and receipt_send: obj as a receipt record whose receiver acknowledges to
 * reply, and its receipt (for box); Py_None: not a common record (nothing sent); NULL
 * with an exception (sent all the same if the receipt is what failed). */
static PyObject *
send_receipted(MailboxCore *c, PyObject *obj, PyObject *timeout, PyObject *reply, PyObject *box)
{
    uint64_t mid = 0;
    int rc = core_put(c, obj, timeout, reply, &mid);
    if (rc <= 0) {
        return rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    return (PyObject *)new_receipt(box, (unsigned long long)mid, 1, (PyObject *)c);
}

static PyObject *
core_send_async(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* send_async(obj, timeout, reply_to, box) -> MailboxReceipt(box, id) | None (nothing
     * sent: the general way) */
    if (nargs != 4 || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "send_async(obj, timeout, reply_to: bytes, box)");
        return NULL;
    }
    return send_receipted(c, args[0], args[1], args[2], args[3]);
}

static PyObject *
core_bind(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* bind(box, hot) | bind(None, False): receipt_send's mailbox (weakly) and whether it
     * may take the hot path */
    if (nargs < 2 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "bind(box, hot, hot_recv=False, tabled)");
        return NULL;
    }
    int hot = PyObject_IsTrue(args[1]);
    if (hot < 0) {
        return NULL;
    }
    if (args[0] != Py_None) {
        PyObject *ref = PyWeakref_NewRef(args[0], NULL);
        if (ref == NULL) {
            return NULL;
        }
        Py_XSETREF(c->box_ref, ref);
    }
    c->hot_async = hot;
    int flags[2] = {0, 0}; /* hot_recv, tabled */
    for (Py_ssize_t k = 2; k < nargs; k++) {
        if ((flags[k - 2] = PyObject_IsTrue(args[k])) < 0) {
            return NULL;
        }
    }
    c->hot_recv = flags[0];
    if (nargs == 4) {
        c->tabled = flags[1];
    }
    Py_RETURN_NONE;
}

/* The bound Mailbox (a new reference), or NULL with ReferenceError. */
static PyObject *
bound_box(MailboxCore *c, const char *what)
{
    PyObject *box = c->box_ref == NULL ? NULL : PyWeakref_GetObject(c->box_ref);
    if (box == NULL || box == Py_None) {
        PyErr_Format(PyExc_ReferenceError, "%s: the mailbox object is gone", what);
        return NULL;
    }
    return Py_NewRef(box);
}

/* (obj, timeout=None) of a bound method; 0, or -1 with TypeError. */
static int
obj_timeout_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int nobj,
                 const char *usage, PyObject **obj, PyObject **timeout)
{
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < nobj || nargs + nkw > nobj + 1 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout"))) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    *obj = nobj ? args[0] : NULL;
    *timeout = nargs + nkw == nobj + 1 ? args[nobj] : Py_None;
    return 0;
}

/* box.name(args...) */
static PyObject *
call_box(PyObject *box, const char *name, PyObject *a, PyObject *b, PyObject *c3, int n)
{
    PyObject *call[4] = {box, a, b, c3};
    PyObject *meth = PyUnicode_InternFromString(name);
    PyObject *out = meth == NULL ? NULL : PyObject_VectorcallMethod(meth, call, (size_t)n + 1, NULL);
    Py_XDECREF(meth);
    return out;
}

enum take_answer { AS_OBJECT, AS_MESSAGE, AS_OBJECT_FROM };
static PyObject *take_as(MailboxCore *c, PyObject *ring, PyObject *timeout,
                         enum take_answer as, unsigned long pid);

static PyObject *
core_box_send(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    /* box_send(obj, timeout=None): the bound Mailbox's send without a Python frame (each
     * plain Mailbox has it as its own send): a common record in one call; else the box's
     * _send_general(obj, timeout) (not a common record) or _send_py (the method: closed,
     * or no hot path); Full and the end of the ring become the mailbox's errors
     * through its _send_async_failed, as in send_async */
    PyObject *obj, *timeout;
    if (obj_timeout_args(args, nargs, kwnames, 1, "send(obj, timeout=None)", &obj, &timeout) <
        0) {
        return NULL;
    }
    PyObject *box = bound_box(c, "send");
    if (box == NULL) {
        return NULL;
    }
    PyObject *out;
    if (c->hot_async) {
        uint64_t mid;
        int rc = core_put(c, obj, timeout, NULL, &mid);
        if (rc == 1) {
            Py_DECREF(box);
            Py_RETURN_NONE;
        }
        if (rc < 0) {
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            if (tb != NULL && exc != NULL) {
                PyException_SetTraceback(exc, tb);
            }
            Py_XDECREF(type);
            Py_XDECREF(tb);
            out = exc == NULL ? NULL : call_box(box, "_send_async_failed", exc, NULL, NULL, 1);
            Py_XDECREF(exc);
            Py_DECREF(box);
            return out;
        }
        out = call_box(box, "_send_general", obj, timeout, NULL, 2);
    }
    else {
        out = call_box(box, "_send_py", obj, timeout, NULL, 2);
    }
    Py_DECREF(box);
    return out;
}

static PyObject *
core_box_recv(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    /* box_recv(timeout=None): the bound Mailbox's recv without a Python frame (each open
     * "any" mailbox of frames has it as its own recv): a common record taken and decoded
     * in one call; what else the ring gives, the box's _recv_rest(got, timeout); a
     * closed box, a timeout <= 0 or no hot path, its _recv_py(timeout) (the method) */
    PyObject *unused, *timeout;
    if (obj_timeout_args(args, nargs, kwnames, 0, "recv(timeout=None)", &unused, &timeout) < 0) {
        return NULL;
    }
    int hot = c->hot_recv;
    if (hot && timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear(); /* the method says what is wrong with it */
            hot = 0;
        }
        else if (!(t > 0)) {
            hot = 0;
        }
    }
    if (hot) {
        PyObject *got = take_as(c, c->ring, timeout, AS_OBJECT, 0);
        if (got == NULL || !PyTuple_CheckExact(got)) {
            return got;
        }
        PyObject *box = bound_box(c, "recv");
        PyObject *out = box == NULL ? NULL : call_box(box, "_recv_rest", got, timeout, NULL, 2);
        Py_XDECREF(box);
        Py_DECREF(got);
        return out;
    }
    PyObject *box = bound_box(c, "recv");
    if (box == NULL) {
        return NULL;
    }
    PyObject *out = call_box(box, "_recv_py", timeout, NULL, NULL, 1);
    Py_DECREF(box);
    return out;
}

static PyObject *
core_receipt_send(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    /* receipt_send(obj, timeout=None) -> MailboxReceipt: Mailbox.send_async without a
     * Python frame (each bound Mailbox has it as its send_async): a receipt record in one
     * call, else the box's _send_async (the general way; Full and the end of the ring
     * become the mailbox's errors there too) */
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 1 || nargs + nkw > 2 ||
        (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout"))) {
        PyErr_SetString(PyExc_TypeError, "send_async(obj, timeout=None)");
        return NULL;
    }
    PyObject *obj = args[0], *timeout = nargs + nkw == 2 ? args[1] : Py_None;
    PyObject *box = c->box_ref == NULL ? NULL : PyWeakref_GetObject(c->box_ref);
    if (box == NULL || box == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "send_async: the mailbox object is gone");
        return NULL;
    }
    Py_INCREF(box);
    int general = 1; /* 1: the general way from the start, 2: not a common record */
    if (c->hot_async && c->tabled && c->reply_name != NULL && c->acks != NULL &&
        c->acks_pid == cached_pid) {
        PyObject *r = send_receipted(c, obj, timeout, c->reply_name, box);
        if (r != NULL && r != Py_None) {
            Py_DECREF(box);
            return r;
        }
        if (r == NULL) { /* the mailbox says what it means (Full, removed) */
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            if (tb != NULL && exc != NULL) {
                PyException_SetTraceback(exc, tb);
            }
            Py_XDECREF(type);
            Py_XDECREF(tb);
            PyObject *out =
                exc == NULL ? NULL : PyObject_CallMethod(box, "_send_async_failed", "O", exc);
            Py_XDECREF(exc);
            Py_DECREF(box);
            return out;
        }
        Py_DECREF(r);
        general = 2;
    }
    PyObject *call[4] = {box, obj, timeout, general == 2 ? Py_False : Py_True};
    PyObject *name = PyUnicode_InternFromString("_send_async");
    PyObject *out = name == NULL ? NULL : PyObject_VectorcallMethod(name, call, 4, NULL);
    Py_XDECREF(name);
    Py_DECREF(box);
    return out;
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
    uint8_t *tab = own_table(c, ring);
    uint32_t tpid, tuid;
    if (tab != NULL && tab_get(tab, want, &tpid, &tuid)) {
        return core_peer(c, tpid, tuid);
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
            if (tab != NULL) { /* counted in: receivers ring the doorbell from now on */
                atomic_store(tab_want(tab), want);
                atomic_fetch_add(tab_waiters(tab), 1);
                if (tab_get(tab, want, &tpid, &tuid)) {
                    atomic_fetch_sub(tab_waiters(tab), 1);
                    return core_peer(c, tpid, tuid);
                }
            }
            out = api->take_wait(args[0], peek_ack, ack, timeout);
            if (tab != NULL) {
                atomic_fetch_sub(tab_waiters(tab), 1);
            }
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
        if (mid & ACK_DOORBELL) { /* it is in the table: ours, maybe */
            if (tab != NULL && tab_get(tab, want, &tpid, &tuid)) {
                return core_peer(c, tpid, tuid);
            }
            continue;
        }
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
    /* set_acks(ring, table, lock, acktab) | set_acks(None, None, None, None): receipt_ready's
     * ring, and our acknowledgement table (a writable buffer of ACKTAB_BYTES, or None) */
    if (nargs != 4 || (args[0] != Py_None && !PyDict_CheckExact(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "set_acks(ring, table: dict, lock, acktab)");
        return NULL;
    }
    PyObject *acq = NULL, *rel = NULL;
    Py_buffer tab = {0};
    if (args[0] != Py_None) {
        if (ring_arg(args[0]) < 0) {
            return NULL;
        }
        if (args[3] != Py_None) {
            if (PyObject_GetBuffer(args[3], &tab, PyBUF_WRITABLE) < 0) {
                return NULL;
            }
            if (tab.len < (Py_ssize_t)ACKTAB_BYTES || ((uintptr_t)tab.buf & 63) != 0) {
                PyBuffer_Release(&tab);
                PyErr_SetString(PyExc_ValueError, "set_acks: the table is too small");
                return NULL;
            }
        }
        acq = PyObject_GetAttrString(args[2], "acquire");
        rel = acq == NULL ? NULL : PyObject_GetAttrString(args[2], "release");
        if (rel == NULL) {
            Py_XDECREF(acq);
            if (tab.obj != NULL) {
                PyBuffer_Release(&tab);
            }
            return NULL;
        }
    }
    PyObject *reply = NULL;
    if (args[0] != Py_None) {
        PyObject *name = PyObject_GetAttrString(args[0], "name");
        if (name != NULL && PyUnicode_Check(name)) {
            reply = PyUnicode_FromFormat("#%U", name);
            Py_SETREF(reply, reply == NULL ? NULL : PyUnicode_AsASCIIString(reply));
        }
        Py_XDECREF(name);
        if (reply == NULL) {
            PyErr_Clear(); /* receipt_send takes the general way */
        }
    }
    Py_XSETREF(c->reply_name, reply);
    if (c->acktab.obj != NULL) {
        PyBuffer_Release(&c->acktab);
    }
    c->acktab = tab;
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

/* A one-receiver receipt nobody took yet: its acknowledgement, from our table (no lock)
 * or from the ring (take_ack) under the mailbox's lock if that lock is free now; the
 * receipt records it. A new reference to the PeerInfo, Py_None (not here yet, or the
 * general way must look: lock held, ring not ours, closed, another kind of receipt), or
 * NULL with an exception. */
static PyObject *
receipt_ready(MailboxCore *c, Receipt *r)
{
    if (c->acks == NULL || c->acks_pid != cached_pid || c->peer_fn == NULL ||
        r->expected != 1 || !PyTuple_CheckExact(r->receivers) ||
        PyTuple_GET_SIZE(r->receivers) != 0) {
        Py_RETURN_NONE;
    }
    uint8_t *tab = own_table(c, c->acks);
    PyObject *who;
    uint32_t pid, uid;
    if (tab != NULL && tab_get(tab, r->id, &pid, &uid)) {
        who = core_peer(c, pid, uid); /* the common case: no lock needed */
    }
    else {
        PyObject *got = PyObject_CallOneArg(c->acks_acquire, Py_False);
        if (got != Py_True) { /* held (a waiting receipt, close): the general way waits */
            Py_XDECREF(got);
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        Py_DECREF(got);
        PyObject *ring = Py_NewRef(c->acks), *table = Py_NewRef(c->acks_table);
        PyObject *id = PyLong_FromUnsignedLongLong(r->id);
        who = id == NULL ? NULL : take_ack_impl(c, ring, id, table, NULL);
        Py_XDECREF(id);
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
    }
    if (who != NULL && who != Py_None) {
        PyObject *t = PyTuple_Pack(1, who);
        if (t == NULL) {
            Py_DECREF(who);
            return NULL;
        }
        Py_SETREF(r->receivers, t);
    }
    return who;
}

static PyObject *
core_receipt_ready(MailboxCore *c, PyObject *receipt)
{
    /* receipt_ready(receipt) -> PeerInfo | None: receipt_ready() above */
    if (!Py_IS_TYPE(receipt, &ReceiptType)) {
        Py_RETURN_NONE;
    }
    return receipt_ready(c, (Receipt *)receipt);
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

/* Write the acknowledgement of message mid (taken by this process) for its sender: into
 * the sender's table if block is one (then into ring only as a doorbell, or when the
 * table refused it), else into ring. Waits at most ACK_WAIT_S for the ring; a drop is
 * counted. */
static void
put_ack(MailboxCore *c, PyObject *ring, PyObject *block, uint64_t mid)
{
    uint64_t rec_id = mid;
    if (block != NULL) {
        Py_buffer v;
        if (PyObject_GetBuffer(block, &v, PyBUF_WRITABLE) < 0) {
            PyErr_Clear(); /* closed: the ring, as for a sender without a table */
        }
        else {
            if (v.len >= (Py_ssize_t)ACKTAB_BYTES && ((uintptr_t)v.buf & 63) == 0 &&
                tab_put(v.buf, mid, cached_pid, (uint32_t)c->uid)) {
                atomic_thread_fence(memory_order_seq_cst);
                int waited = atomic_load(tab_waiters(v.buf)) != 0 &&
                             atomic_load(tab_want(v.buf)) == mid;
                PyBuffer_Release(&v);
                if (!waited) {
                    return;
                }
                rec_id |= ACK_DOORBELL;
            }
            else {
                PyBuffer_Release(&v);
            }
        }
    }
    uint8_t ack[16]; /* message id, pid, uid: _mailbox._ACK */
    put64(ack, rec_id);
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
        return;
    }
    int put = api->put(ring, &part, 1, sizeof ack, 0); /* the common case: no clock read */
    if (put < 0) {
        PyErr_Clear(); /* closed or gone: put_wait finds it so too */
        put = 0;
    }
    if (put == 0 && api->put_wait(ring, &part, 1, sizeof ack, 0, ack_wait) < 0) {
        PyErr_Clear();
        c->acks_dropped++;
    }
}

/* Tell the sender of message mid, whose record named reply[0..rlen), who took it: 1 done
 * (or dropped and counted), 0 its acknowledgement ring is not attached here yet (the
 * general way attaches it). replies maps the name to its Ring, or to (Ring, Block) for a
 * '#' name (the sender's table). */
static int
acknowledge(MailboxCore *c, const uint8_t *reply, uint32_t rlen, uint64_t mid)
{
    if (c->replies == NULL || !PyDict_CheckExact(c->replies)) { /* deleted, or not set */
        return 0;
    }
    PyObject *entry = NULL;
    int k = 0;
    for (; k < REPLY_SEEN && c->last_reply[k] != NULL; k++) {
        PyObject *seen = c->last_reply[k];
        if ((uint32_t)PyBytes_GET_SIZE(seen) == rlen &&
            memcmp(PyBytes_AS_STRING(seen), reply, rlen) == 0) {
            /* a sender met lately: its entry, if replies still holds it */
            if (PyDict_GetItemWithError(c->replies, seen) == c->last_ring[k]) {
                entry = c->last_ring[k];
            }
            PyErr_Clear();
            break;
        }
    }
    if (entry != NULL) {
        if (k > 0) { /* most recent first */
            PyObject *name = c->last_reply[k], *ring = c->last_ring[k];
            memmove(c->last_reply + 1, c->last_reply, (size_t)k * sizeof(PyObject *));
            memmove(c->last_ring + 1, c->last_ring, (size_t)k * sizeof(PyObject *));
            c->last_reply[0] = name;
            c->last_ring[0] = ring;
        }
    }
    else {
        PyObject *name = PyBytes_FromStringAndSize((const char *)reply, rlen);
        if (name == NULL) {
            PyErr_Clear();
            return 0;
        }
        entry = PyDict_GetItemWithError(c->replies, name); /* borrowed */
        if (entry == NULL) {
            Py_DECREF(name);
            PyErr_Clear();
            return 0;
        }
        if (k == REPLY_SEEN) { /* the oldest goes (else: a stale one, or a free place) */
            k = REPLY_SEEN - 1;
        }
        Py_CLEAR(c->last_reply[k]);
        Py_CLEAR(c->last_ring[k]);
        memmove(c->last_reply + 1, c->last_reply, (size_t)k * sizeof(PyObject *));
        memmove(c->last_ring + 1, c->last_ring, (size_t)k * sizeof(PyObject *));
        c->last_reply[0] = name;
        c->last_ring[0] = Py_NewRef(entry);
    }
    PyObject *ring = entry, *block = NULL;
    if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2) {
        ring = PyTuple_GET_ITEM(entry, 0);
        block = PyTuple_GET_ITEM(entry, 1);
    }
    if (!PyObject_TypeCheck(ring, api->ring_type)) {
        return 0;
    }
    Py_INCREF(entry); /* a wait releases the GIL: the table may drop it meanwhile */
    put_ack(c, ring, block, mid);
    Py_DECREF(entry);
    return 1;
}

static PyObject *
core_ack(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* ack(reply_to, message_id) -> bool: acknowledge (the general way's receiver) */
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || PyBytes_GET_SIZE(args[0]) > 255) {
        PyErr_SetString(PyExc_TypeError, "ack(reply_to: bytes, message_id)");
        return NULL;
    }
    unsigned long long mid = PyLong_AsUnsignedLongLong(args[1]);
    if (mid == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (need_api() < 0) {
        return NULL;
    }
    return PyBool_FromLong(acknowledge(c, (const uint8_t *)PyBytes_AS_STRING(args[0]),
                                       (uint32_t)PyBytes_GET_SIZE(args[0]), mid));
}

/* The whole record the general way needs, rebuilt from the copies peek_message made
 * (the head, the reply field) and the body it took (stolen); NULL on error. */
static PyObject *
whole_record(const peek_ctx_mb *m, PyObject *body)
{
    uint32_t extra = m->receipt ? 2u + m->rlen : 0u;
    Py_ssize_t n = PyBytes_GET_SIZE(body);
    PyObject *whole = PyBytes_FromStringAndSize(NULL, MB_HEAD + extra + n);
    if (whole != NULL) {
        uint8_t *w = (uint8_t *)PyBytes_AS_STRING(whole);
        memcpy(w, m->head, MB_HEAD);
        if (m->receipt) {
            w[MB_HEAD] = TAG_REPLY_TO;
            w[MB_HEAD + 1] = (uint8_t)m->rlen;
            memcpy(w + MB_HEAD + 2, m->reply, m->rlen);
        }
        memcpy(w + MB_HEAD + extra, PyBytes_AS_STRING(body), (size_t)n);
    }
    Py_DECREF(body);
    return whole;
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
    if (!m->receipt || acknowledge(c, m->reply, m->rlen, get64(m->head + 12))) {
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
    *whole = whole_record(m, out);
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

/* The shared PeerInfo of (pid, uid): the last PEER_SEEN kept here, others from peer_fn. */
static PyObject *
core_peer(MailboxCore *c, uint32_t pid, uint32_t uid)
{
    for (int k = 0; k < PEER_SEEN && c->peer[k] != NULL; k++) {
        if (c->peer_pid[k] == pid && c->peer_uid[k] == uid) {
            return Py_NewRef(c->peer[k]);
        }
    }
    PyObject *peer = PyObject_CallFunction(c->peer_fn, "kk", (unsigned long)pid,
                                           (unsigned long)uid);
    if (peer == NULL) {
        return NULL;
    }
    unsigned k = c->peer_next++ % PEER_SEEN;
    Py_XSETREF(c->peer[k], Py_NewRef(peer));
    c->peer_pid[k] = pid;
    c->peer_uid[k] = uid;
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
    for (int k = 0; k < PEER_SEEN; k++) {
        Py_CLEAR(c->peer[k]);
    }
    c->peer_next = 0;
    Py_RETURN_NONE;
}


/* recv, recv_message and recv_from: the next record of ring, taken (take_message) and
 * answered as the method says; (record,) for the general way. */
static PyObject *
take_as(MailboxCore *c, PyObject *ring, PyObject *timeout, enum take_answer as,
        unsigned long pid)
{
    peek_ctx_mb m;
    PyObject *obj, *whole;
    if (take_message(c, ring, timeout, &m, &obj, &whole) < 0) {
        return NULL;
    }
    if (obj == NULL) {
        return one_tuple(whole);
    }
    switch (as) {
    case AS_OBJECT:
        return obj;
    case AS_OBJECT_FROM:
        /* the object itself only when it cannot be taken for one of the other answers */
        if (get32(m.head + 22) == pid && !PyTuple_Check(obj) &&
            !PyObject_TypeCheck(obj, (PyTypeObject *)c->msg_type)) {
            return obj;
        }
        return new_message(c, obj, &m);
    case AS_MESSAGE:
    default:
        if (c->msg_type != NULL) {
            return new_message(c, obj, &m);
        }
        return Py_BuildValue("(NKkkK)", obj, (unsigned long long)get64(m.head + 12),
                             (unsigned long)get32(m.head + 22),
                             (unsigned long)get32(m.head + 26),
                             (unsigned long long)get64(m.head + 32));
    }
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
    return take_as(c, args[0], args[1], AS_OBJECT, 0);
}

static PyObject *
core_recv_message(MailboxCore *c, PyObject *const *args, Py_ssize_t nargs)
{
    /* recv_message(ring, timeout) -> (object, message id, pid, uid, sent_at ns) of a common
     * record (a Message after set_message), else (record,) for the general way */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_message(ring, timeout)");
        return NULL;
    }
    return take_as(c, args[0], args[1], AS_MESSAGE, 0);
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
    return take_as(c, args[0], args[1], AS_OBJECT_FROM, pid);
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
    for (int k = 0; k < PEER_SEEN; k++) {
        Py_XDECREF(c->peer[k]);
    }
    for (int k = 0; k < REPLY_SEEN; k++) {
        Py_XDECREF(c->last_reply[k]);
        Py_XDECREF(c->last_ring[k]);
    }
    Py_XDECREF(c->acks);
    Py_XDECREF(c->acks_table);
    Py_XDECREF(c->acks_acquire);
    Py_XDECREF(c->acks_release);
    if (c->acktab.obj != NULL) {
        PyBuffer_Release(&c->acktab);
    }
    Py_XDECREF(c->reply_name);
    Py_XDECREF(c->box_ref);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef core_methods[] = {
    {"send", (PyCFunction)(void (*)(void))core_send, METH_FASTCALL,
     "send(obj, timeout) -> bool: obj as a common record (bytes as they are, else msgpack "
     "without hooks), put into the ring waiting like Ring.send (nowait: Full at once); "
     "False (nothing sent) if it is not one: the caller's general way."},
    {"send_async", (PyCFunction)(void (*)(void))core_send_async, METH_FASTCALL,
     "send_async(obj, timeout, reply_to, box) -> MailboxReceipt | None: obj sent as a "
     "receipt record whose receiver acknowledges to reply_to, and its receipt; None: "
     "nothing sent (not a common record), the general way."},
    {"bind", (PyCFunction)(void (*)(void))core_bind, METH_FASTCALL,
     "bind(box, hot, hot_recv=False, tabled=<kept>): receipt_send's, box_send's and "
     "box_recv's Mailbox (a weak reference; None keeps it), whether send_async and send may "
     "take the hot path (a plain mailbox that is open), whether recv may (an open \"any\" "
     "mailbox of frames), and whether send_async may ask for the acknowledgement table."},
    {"box_send", (PyCFunction)(void (*)(void))core_box_send, METH_FASTCALL | METH_KEYWORDS,
     "box_send(obj, timeout=None): the bound Mailbox's send in one call (a common record); "
     "else its general way."},
    {"box_recv", (PyCFunction)(void (*)(void))core_box_recv, METH_FASTCALL | METH_KEYWORDS,
     "box_recv(timeout=None): the bound Mailbox's recv in one call (a common record); else "
     "its general way."},
    {"receipt_send", (PyCFunction)(void (*)(void))core_receipt_send,
     METH_FASTCALL | METH_KEYWORDS,
     "receipt_send(obj, timeout=None) -> MailboxReceipt: the bound Mailbox's send_async "
     "(after bind and set_acks) in one call; else its _send_async(obj, timeout, hot)."},
    {"ack", (PyCFunction)(void (*)(void))core_ack, METH_FASTCALL,
     "ack(reply_to, message_id) -> bool: tell the sender of a receipt record (its REPLY_TO "
     "reply_to, registered in replies) that this process took message_id; False if "
     "reply_to is not in replies."},
    {"take_ack", (PyCFunction)(void (*)(void))core_take_ack, METH_FASTCALL,
     "take_ack(acks, message_id, table) -> PeerInfo | None: message_id's acknowledgement from "
     "table (a dict of id -> list of PeerInfo, oldest first) or read from the ring until it "
     "comes, the others into table (None: not there). Never waits. After set_message."},
    {"wait_ack", (PyCFunction)(void (*)(void))core_wait_ack, METH_FASTCALL,
     "wait_ack(acks, message_id, table, timeout) -> PeerInfo | None: take_ack, waiting up "
     "to timeout once the ring is empty (Timeout, or Empty for timeout <= 0, if nothing "
     "came); None: only others' acknowledgements came (into table)."},
    {"set_acks", (PyCFunction)(void (*)(void))core_set_acks, METH_FASTCALL,
     "set_acks(ring, table, lock, acktab) | set_acks(None, None, None, None): this "
     "process's acknowledgement ring, its table and the lock guarding both, and its "
     "acknowledgement table (a Block, or None), for receipt_ready, take_ack, wait_ack."},
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
     "dict: acknowledgement ring name (bytes) -> Ring, or (Ring, Block) for a '#' name "
     "(the sender's table), for receipt records (or None)"},
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

/* ---- the module's mailbox functions: one record, through the core's helpers -------- */

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
    uint8_t h[MB_HEAD];
    /* a body too large for any record (4 GiB) makes put_wait raise MessageTooLarge before
     * anything is written, so a truncated length here is never seen */
    build_head(h, codec, (uint32_t)len, mid, (uint32_t)uid);
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

static PyObject *
mailbox_recv(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    /* mailbox_recv(ring, timeout) -> (codec, body) | bytes: a common record's codec and
     * body; anything else (a receipt record too: nobody acknowledges it here) whole */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "mailbox_recv(ring, timeout)");
        return NULL;
    }
    if (ring_arg(args[0]) < 0) {
        return NULL;
    }
    peek_ctx_mb m;
    m.codec = -1;
    m.receipt = 0;
    PyObject *out = api->take_wait(args[0], peek_message, &m, args[1]);
    if (out == NULL || m.codec < 0) {
        return out;
    }
    if (m.receipt) {
        return whole_record(&m, out);
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, PyLong_FromLong(m.codec)); /* 0-7: small ints, cannot fail */
    PyTuple_SET_ITEM(pair, 1, out);
    return pair;
}

/* ---- MailboxReceipt's methods ---------------------------------------------------------- */

/* The mailbox's core (a new reference), or NULL with no exception if it has none. */
static MailboxCore *
rc_core(Receipt *r)
{
    if (r->core == NULL) {
        PyObject *core = PyObject_GetAttrString(r->box, "_core");
        if (core == NULL || !Py_IS_TYPE(core, &MailboxCoreType)) {
            Py_XDECREF(core);
            PyErr_Clear();
            return NULL;
        }
        r->core = core;
    }
    return (MailboxCore *)Py_NewRef(r->core);
}

/* Who took it, if that is known without waiting or Python: a new reference to the first
 * PeerInfo, Py_None (the general way must say), or NULL with an exception. */
static PyObject *
rc_known(Receipt *r)
{
    if (!PyTuple_CheckExact(r->receivers)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(r->receivers);
    if (r->expected > 0 && n > 0 && n + r->lost >= r->expected) {
        return Py_NewRef(PyTuple_GET_ITEM(r->receivers, 0));
    }
    if (r->expected != 1 || n != 0) {
        Py_RETURN_NONE;
    }
    MailboxCore *c = rc_core(r);
    if (c == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *who = receipt_ready(c, r);
    Py_DECREF(c);
    return who;
}

static PyObject *
rc_done(Receipt *r, PyObject *Py_UNUSED(a))
{
    PyObject *who = rc_known(r);
    if (who != Py_None) {
        Py_XDECREF(who);
        return who == NULL ? NULL : Py_NewRef(Py_True);
    }
    Py_DECREF(who);
    if (receipt_done_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "receipt_ways() was not called");
        return NULL;
    }
    return PyObject_CallOneArg(receipt_done_fn, (PyObject *)r);
}

static PyObject *
rc_wait(Receipt *r, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout = Py_None;
    if (nargs > 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0 &&
                      (nargs + PyTuple_GET_SIZE(kwnames) != 1 ||
                       !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)) ||
                       PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0))) {
        PyErr_SetString(PyExc_TypeError, "wait(timeout=None)");
        return NULL;
    }
    if (nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0) == 1) {
        timeout = args[0];
    }
    PyObject *who = rc_known(r);
    if (who != Py_None) {
        return who;
    }
    Py_DECREF(who);
    if (receipt_wait_fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "receipt_ways() was not called");
        return NULL;
    }
    PyObject *call[2] = {(PyObject *)r, timeout};
    return PyObject_Vectorcall(receipt_wait_fn, call, 2, NULL);
}

static PyObject *
rc_receiver(Receipt *r, void *Py_UNUSED(c))
{
    if (!PyTuple_CheckExact(r->receivers) || PyTuple_GET_SIZE(r->receivers) == 0) {
        PyObject *done = rc_done(r, NULL);
        if (done == NULL) {
            return NULL;
        }
        Py_DECREF(done);
    }
    if (PyTuple_CheckExact(r->receivers) && PyTuple_GET_SIZE(r->receivers) > 0) {
        return Py_NewRef(PyTuple_GET_ITEM(r->receivers, 0));
    }
    Py_RETURN_NONE;
}

static PyObject *
rc_receivers(Receipt *r, void *Py_UNUSED(c))
{
    PyObject *done = rc_done(r, NULL);
    if (done == NULL) {
        return NULL;
    }
    Py_DECREF(done);
    return PySequence_List(r->receivers);
}

static PyObject *
rc_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"box", "message_id", "expected", NULL};
    PyObject *box;
    unsigned long long id;
    Py_ssize_t expected = 1;
    (void)type;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OK|n:MailboxReceipt", kwlist, &box, &id,
                                     &expected)) {
        return NULL;
    }
    if (expected < 0) {
        PyErr_SetString(PyExc_ValueError, "expected must be >= 0");
        return NULL;
    }
    return (PyObject *)new_receipt(box, id, expected, NULL);
}

static void
rc_dealloc(Receipt *r)
{
    Py_XDECREF(r->box);
    Py_XDECREF(r->receivers);
    Py_XDECREF(r->core);
    PyObject_Free(r);
}

static PyObject *
rc_repr(Receipt *r)
{
    PyObject *who = PySequence_List(r->receivers);
    if (who == NULL) {
        return NULL;
    }
    PyObject *out = PyUnicode_FromFormat("<MailboxReceipt id=%llu receivers=%R>", r->id, who);
    Py_DECREF(who);
    return out;
}

static PyObject *
receipt_ways(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "receipt_ways(done, wait)");
        return NULL;
    }
    Py_XSETREF(receipt_done_fn, Py_NewRef(args[0]));
    Py_XSETREF(receipt_wait_fn, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef rc_methods[] = {
    {"done", (PyCFunction)rc_done, METH_NOARGS,
     "True once the receiver (broadcast: every receiver it went to) took the message; "
     "reads acknowledgements that already arrived, never waits."},
    {"wait", (PyCFunction)(void (*)(void))rc_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout=None) -> PeerInfo: wait until a receiver (broadcast: every one) took the "
     "message and return the first; Timeout if timeout seconds pass first, Undelivered if "
     "the mailbox was removed first (or a broadcast went to no receiver)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef rc_members[] = {
    {"id", T_ULONGLONG, offsetof(Receipt, id), READONLY,
     "the message's id (unique per sending mailbox object)"},
    {"expected", T_PYSSIZET, offsetof(Receipt, expected), READONLY,
     "how many receivers the message went to (1; broadcast: those attached; 0: none)"},
    {"_box", T_OBJECT, offsetof(Receipt, box), READONLY, "the mailbox it was sent through"},
    {"_receivers", T_OBJECT_EX, offsetof(Receipt, receivers), 0,
     "tuple of PeerInfo: who took it so far"},
    {"lost", T_PYSSIZET, offsetof(Receipt, lost), 0,
     "broadcast: how many of the receivers it went to lost their copy (their backlog "
     "dropped it, the overflow rule, or they closed or died before taking it); the "
     "receipt is done once len(receivers) + lost == expected"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef rc_getset[] = {
    {"receiver", (getter)rc_receiver, NULL,
     "The (first) process that took the message (PeerInfo), or None while nobody has.", NULL},
    {"receivers", (getter)rc_receivers, NULL,
     "Every process that took the message so far (broadcast: one per receiver).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReceiptType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.MailboxReceipt",
    .tp_basicsize = sizeof(Receipt),
    .tp_dealloc = (destructor)rc_dealloc,
    .tp_repr = (reprfunc)rc_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "MailboxReceipt(box, message_id, expected=1): the fate of one message sent with "
              "Mailbox.send_async.\n\ndone() says whether a receiver took it (never waits), "
              "wait() waits (Timeout when timeout passes), and receiver names the process that "
              "took it (PeerInfo with .pid and .uid). On a broadcast mailbox the message went "
              "to expected receivers: receivers lists those that took it so far, and "
              "done/wait mean all of them.",
    .tp_methods = rc_methods,
    .tp_members = rc_members,
    .tp_getset = rc_getset,
    .tp_new = rc_new,
};

static PyMethodDef module_functions[] = {
    {"receipt_ways", (PyCFunction)(void (*)(void))receipt_ways, METH_FASTCALL,
     "receipt_ways(done, wait): the general way of MailboxReceipt.done(receipt) and "
     "wait(receipt, timeout), called when the hot path cannot answer."},
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
    if (PyType_Ready(&RingFramesType) < 0 || PyType_Ready(&MailboxCoreType) < 0 ||
        PyType_Ready(&ReceiptType) < 0) {
        return NULL;
    }
    if (empty_tuple == NULL && (empty_tuple = PyTuple_New(0)) == NULL) {
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
        PyModule_AddObjectRef(m, "MailboxCore", (PyObject *)&MailboxCoreType) < 0 ||
        PyModule_AddObjectRef(m, "MailboxReceipt", (PyObject *)&ReceiptType) < 0) {
        Py_DECREF(&RingFramesType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
