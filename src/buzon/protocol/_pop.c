/* The take of a message a stream read already brought (ChannelCore._pop), in C.
 *
 *   pop(core, frames) -> item
 *       ``frames`` is the core's FrameDecoder.frames (a deque, not empty). Takes its
 *       first item and counts the take as ChannelCore._pop does, which stays the
 *       reference (tests/test_receipt_take_c.py runs both): ``stats.messages_received``
 *       and ``core.taken`` go up by one; a plain frame's ``(flags, body)`` comes back
 *       as it is, and ``core._took(False, more)`` numbers it when the core numbers its
 *       takes (``taking``); a frame that asks for a receipt (flags > 7: RECEIPT_FLAG)
 *       comes back as ``(flags & 7, body)`` and is counted in the core's RecvFlow
 *       (``rflow``): while another message is in hand, no capacity is set and fewer
 *       than REPORT_EVERY - 1 receipt-asking takes are unreported, only counted here
 *       (``taken``, ``report_due``, ``unreported``: RecvFlow.on_take's common case,
 *       which writes nothing); otherwise ``core._took(True, more)``, which may write
 *       the acknowledgement (a CREDIT) under the core's rules. Any other item (a
 *       Frame) goes to ``core._take(item, more)``. ``more``: another item is left.
 *
 *       The fields are the core's (its ``__dict__``: ``stats``, ``taken``, ``taking``,
 *       ``rflow``) and the RecvFlow's slots; a missing one raises AttributeError,
 *       never a wrong count. One receipt-asking message costs a few attribute
 *       updates and no Python frame: on a busy stream with receipts this is the
 *       receiver's whole per-message bookkeeping.
 *
 *   Head(channel, core, lock, fallback, *, bound=False)(timeout=None) -> bytes
 *       A blocking channel's ``recv_bytes`` (sync/_channel.py puts it in the channel's
 *       instance dict, where it shadows the method) when a message is already in hand:
 *       what ``Channel.recv_bytes`` does then (a stream's read brought several
 *       messages and this one is next), without its Python frames. When the core is a
 *       stream's (``fast_recv`` None, no rendezvous: ``_rv`` False and the channel's
 *       ``_rv_stream`` None), its decoder holds a message (``decoder.frames`` not
 *       empty) and the read lock is free (``acquire(False)``): take it with pop()
 *       above, release the lock, wake the channel's pumpers if some wait
 *       (``_pumpers``: ``_wake_pumpers()``), and return the body (a Frame:
 *       ``core.item_bytes(frame)``). Anything else, or other arguments than one
 *       timeout (a message in hand is returned whatever the timeout), calls
 *       ``fallback(channel, *args, **kwargs)`` (the class's recv_bytes, the
 *       reference), or with ``bound=True`` ``fallback(*args, **kwargs)``: a callable
 *       that needs no channel, the C receive of a spin=0 channel (protocol/_take.c
 *       Take), which then only runs when no message is in hand. The channel is held
 *       weakly, as the writers hold it (_writer.h).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "_slots.h"
#include "_writer.h"

#define RECEIPT_FLAG 8
#define REPORT_EVERY 256 /* protocol/credit.py REPORT_EVERY */

static PyObject *s_stats, *s_messages_received, *s_taken, *s_taking, *s_rflow, *s_capacity,
    *s_unreported, *s_report_due, *s_took, *s_take, *s_popleft, *s_decoder, *s_frames,
    *s_fast_recv, *s_rv, *s_rv_stream, *s_pumpers, *s_wake_pumpers, *s_item_bytes;
static PyObject *one;

/* the dict's value for ``name``, borrowed; NULL with AttributeError if missing */
static PyObject *field(PyObject *d, PyObject *name) {
    PyObject *v = PyDict_GetItemWithError(d, name);
    if (v == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_AttributeError, "no field %R", name);
    return v;
}

/* ``obj.name += 1`` */
static int bump_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(v, one);
    Py_DECREF(v);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

/* ``d[name] += 1`` */
static int bump_field(PyObject *d, PyObject *name) {
    PyObject *v = field(d, name);
    if (v == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(v, one);
    if (sum == NULL)
        return -1;
    int r = PyDict_SetItem(d, name, sum);
    Py_DECREF(sum);
    return r;
}

/* ``core.<method>(arg, more)`` -> new reference or NULL */
static PyObject *call2(PyObject *core, PyObject *method, PyObject *arg, int more) {
    PyObject *argv[4] = {NULL, core, arg, more ? Py_True : Py_False}; /* argv[0]: free */
    return PyObject_VectorcallMethod(method, argv + 1, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

static slot_cache flow_slots;  /* RecvFlow: taken, report_due, unreported, capacity */
static slot_cache stats_slots; /* Statistics: messages_received */
enum { F_TAKEN, F_REPORT_DUE, F_UNREPORTED, F_CAPACITY, F_COUNT };

/* ``obj.<slot> += 1`` for a filled slot holding an int: 1 done, 0 not an int or empty
 * (nothing changed), -1 error */
static int slot_bump(PyObject **slot) {
    PyObject *old = *slot;
    if (old == NULL || !PyLong_CheckExact(old))
        return 0;
    PyObject *sum = PyNumber_Add(old, one);
    if (sum == NULL)
        return -1;
    *slot = sum;
    Py_DECREF(old);
    return 1;
}

static PyObject *flow_names[F_COUNT], *stats_names[1];

/* ``stats.messages_received += 1`` */
static int count_message(PyObject *stats) {
    if (slots_of(&stats_slots, stats, stats_names, 1)) {
        int r = slot_bump(SLOT(stats, &stats_slots, 0));
        if (r != 0)
            return r < 0 ? -1 : 0;
    }
    return bump_attr(stats, s_messages_received);
}

/* RecvFlow.on_take's common case for a receipt-asking take with another message in
 * hand, on the flow's slots: 1 counted, 0 not the common case or not slots (nothing
 * changed), -1 error */
static int count_receipt_slots(PyObject *rflow) {
    if (!slots_of(&flow_slots, rflow, flow_names, F_COUNT))
        return 0;
    PyObject **cap = SLOT(rflow, &flow_slots, F_CAPACITY);
    PyObject **unrep = SLOT(rflow, &flow_slots, F_UNREPORTED);
    PyObject **taken = SLOT(rflow, &flow_slots, F_TAKEN);
    PyObject **due = SLOT(rflow, &flow_slots, F_REPORT_DUE);
    if (*cap != Py_None || *unrep == NULL || *taken == NULL || *due == NULL ||
        !PyLong_CheckExact(*unrep) || !PyLong_CheckExact(*taken))
        return 0;
    long n = PyLong_AsLong(*unrep);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 0 || n >= REPORT_EVERY - 1)
        return 0;
    PyObject *next = PyLong_FromLong(n + 1);
    if (next == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(*taken, one);
    if (sum == NULL) {
        Py_DECREF(next);
        return -1;
    }
    /* no Python code runs from here on: the three fields change together */
    PyObject *old = *taken;
    *taken = sum;
    Py_DECREF(old);
    slot_set(due, Py_True);
    old = *unrep;
    *unrep = next;
    Py_DECREF(old);
    return 1;
}

/* RecvFlow.on_take's common case for a receipt-asking take with another message in
 * hand: 1 counted, 0 not the common case (nothing changed), -1 error */
static int count_receipt(PyObject *rflow) {
    int fast = count_receipt_slots(rflow);
    if (fast != 0)
        return fast;
    PyObject *cap = PyObject_GetAttr(rflow, s_capacity);
    if (cap == NULL)
        return -1;
    Py_DECREF(cap); /* compared by identity only */
    if (cap != Py_None)
        return 0;
    PyObject *unrep = PyObject_GetAttr(rflow, s_unreported);
    if (unrep == NULL)
        return -1;
    long n = PyLong_AsLong(unrep);
    if (n == -1 && PyErr_Occurred()) {
        Py_DECREF(unrep);
        return -1;
    }
    if (n < 0 || n >= REPORT_EVERY - 1) {
        Py_DECREF(unrep);
        return 0;
    }
    PyObject *next = PyNumber_Add(unrep, one);
    Py_DECREF(unrep);
    if (next == NULL)
        return -1;
    int r = bump_attr(rflow, s_taken);
    if (r == 0)
        r = PyObject_SetAttr(rflow, s_report_due, Py_True);
    if (r == 0)
        r = PyObject_SetAttr(rflow, s_unreported, next);
    Py_DECREF(next);
    return r < 0 ? -1 : 1;
}

/* pop() itself; ``body_only`` (the Head): a (flags, body) item's body comes back
 * (``*is_body`` set), not the item */
static PyObject *pop_one(PyObject *core, PyObject *frames, int body_only, int *is_body) {
    *is_body = 0;
    PyObject *argv[2] = {NULL, frames}; /* argv[0]: free for the call (OFFSET) */
    PyObject *item =
        PyObject_VectorcallMethod(s_popleft, argv + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (item == NULL)
        return NULL;
    Py_ssize_t left = PyObject_Length(frames);
    if (left < 0) {
        Py_DECREF(item);
        return NULL;
    }
    int more = left > 0;
    if (!(PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2 &&
          PyLong_CheckExact(PyTuple_GET_ITEM(item, 0)))) { /* a Frame: the Python way */
        PyObject *r = call2(core, s_take, item, more);
        Py_DECREF(item);
        return r;
    }
    PyObject *cored = PyObject_GenericGetDict(core, NULL);
    if (cored == NULL) {
        Py_DECREF(item);
        return NULL;
    }
    PyObject *out = NULL;
    PyObject *stats = field(cored, s_stats);
    if (stats == NULL || count_message(stats) < 0 || bump_field(cored, s_taken) < 0)
        goto done;
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
    if (flags == -1 && PyErr_Occurred())
        goto done;
    if (flags >= RECEIPT_FLAG) { /* a receipt is asked for */
        PyObject *stripped;
        if (body_only) {
            stripped = Py_NewRef(PyTuple_GET_ITEM(item, 1));
        } else {
            PyObject *codec = PyLong_FromLong(flags & (RECEIPT_FLAG - 1));
            if (codec == NULL)
                goto done;
            stripped = PyTuple_Pack(2, codec, PyTuple_GET_ITEM(item, 1));
            Py_DECREF(codec);
            if (stripped == NULL)
                goto done;
        }
        int counted = 0;
        if (more) {
            PyObject *rflow = field(cored, s_rflow);
            if (rflow == NULL)
                counted = -1;
            else if (rflow != Py_None)
                counted = count_receipt(rflow);
        }
        if (counted == 0) {
            PyObject *r = call2(core, s_took, Py_True, more);
            counted = r == NULL ? -1 : 1;
            Py_XDECREF(r);
        }
        if (counted < 0) {
            Py_DECREF(stripped);
        } else {
            out = stripped;
            *is_body = body_only;
        }
        goto done;
    }
    PyObject *taking = field(cored, s_taking);
    if (taking == NULL)
        goto done;
    if (taking != Py_False) {
        int yes = PyObject_IsTrue(taking);
        if (yes < 0)
            goto done;
        if (yes) {
            PyObject *r = call2(core, s_took, Py_False, more);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
        }
    }
    if (body_only) {
        out = Py_NewRef(PyTuple_GET_ITEM(item, 1));
        *is_body = 1;
    } else {
        out = Py_NewRef(item);
    }
done:
    Py_DECREF(cored);
    Py_DECREF(item);
    return out;
}

static PyObject *pop(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pop(core, frames) takes 2 arguments");
        return NULL;
    }
    int is_body;
    return pop_one(args[0], args[1], 0, &is_body);
}

/* -- Head: recv_bytes with a message in hand ---------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *chref;   /* the channel, weakly: its __dict__ keeps this (_writer.h) */
    PyObject *channel; /* borrowed, as its __dict__: held during a call */
    PyObject *chd;     /* the channel's __dict__ (borrowed) */
    PyObject *core;
    PyObject *cored; /* the core's __dict__ */
    PyObject *acquire, *release, *fallback, *wake_pumpers;
    int bound; /* the fallback is called without the channel (a bound or C callable) */
    vectorcallfunc vectorcall;
} Head;

/* ``fallback(channel, *args, **kwargs)``, or ``fallback(*args, **kwargs)`` if bound */
static PyObject *call_fallback(Head *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    if (self->bound)
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *small[8];
    PyObject **all = small;
    if (nargs + nkw + 1 > 8) {
        all = PyMem_Malloc((size_t)(nargs + nkw + 1) * sizeof(PyObject *));
        if (all == NULL)
            return PyErr_NoMemory();
    }
    all[0] = self->channel;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        all[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(self->fallback, all, (size_t)(nargs + 1), kwnames);
    if (all != small)
        PyMem_Free(all);
    return r;
}

/* the decoder's frames (a new reference) when a message is in hand and the fast way
 * applies; NULL without an exception when it does not, with one on error */
static PyObject *frames_in_hand(Head *self) {
    PyObject *v;
    if ((v = field(self->cored, s_fast_recv)) == NULL || v != Py_None)
        return NULL;
    if ((v = field(self->cored, s_rv)) == NULL || v != Py_False)
        return NULL;
    if ((v = field(self->chd, s_rv_stream)) == NULL || v != Py_None)
        return NULL;
    PyObject *decoder = field(self->cored, s_decoder);
    if (decoder == NULL || decoder == Py_None)
        return NULL;
    PyObject *frames = PyObject_GetAttr(decoder, s_frames);
    if (frames == NULL)
        return NULL;
    Py_ssize_t n = PyObject_Length(frames);
    if (n > 0)
        return frames;
    Py_DECREF(frames);
    return NULL;
}

static PyObject *head_call(Head *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) > 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)))
        return call_fallback(self, args, nargsf, kwnames);
    PyObject *frames = frames_in_hand(self);
    if (frames == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return call_fallback(self, args, nargsf, kwnames);
    }
    int held = try_lock(self->acquire);
    if (held <= 0) {
        Py_DECREF(frames);
        return held < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    }
    /* another thread may have taken the last message before we held the lock */
    Py_ssize_t n = PyObject_Length(frames);
    if (n <= 0) {
        Py_DECREF(frames);
        if (unlock_with(self->release, Py_NewRef(Py_None)) == NULL)
            return NULL;
        Py_DECREF(Py_None);
        return n < 0 ? NULL : call_fallback(self, args, nargsf, kwnames);
    }
    int is_body;
    PyObject *item = pop_one(self->core, frames, 1, &is_body);
    Py_DECREF(frames);
    if (item == NULL) {
        PyObject *t, *val, *tb;
        PyErr_Fetch(&t, &val, &tb);
        PyObject *r = PyObject_CallNoArgs(self->release);
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
    item = unlock_with(self->release, item);
    if (item == NULL)
        return NULL;
    PyObject *pumpers = field(self->chd, s_pumpers);
    int busy = pumpers == NULL ? -1 : PyObject_IsTrue(pumpers);
    if (busy) {
        PyObject *r = busy < 0 ? NULL : PyObject_CallOneArg(self->wake_pumpers, self->channel);
        if (r == NULL) {
            Py_DECREF(item);
            return NULL;
        }
        Py_DECREF(r);
    }
    if (is_body)
        return item;
    PyObject *out = PyObject_CallMethodOneArg(self->core, s_item_bytes, item);
    Py_DECREF(item);
    return out;
}

/* the call, with the channel held for its duration (the Head holds it weakly) */
static PyObject *head_enter(PyObject *callable, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames) {
    Head *self = (Head *)callable;
    if (self->chd == NULL) {
        PyErr_SetString(PyExc_ValueError, "the Head was cleared");
        return NULL;
    }
    PyObject *channel = owner_enter(self->chref);
    if (channel == NULL)
        return NULL;
    PyObject *out = head_call(self, args, nargsf, kwnames);
    Py_DECREF(channel);
    return out;
}

static PyObject *head_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"channel", "core", "lock", "fallback", "bound", NULL};
    PyObject *channel, *core, *lock, *fallback;
    int bound = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$p:Head", kwlist, &channel, &core,
                                     &lock, &fallback, &bound))
        return NULL;
    PyObject *chd = PyObject_GenericGetDict(channel, NULL);
    PyObject *cored = chd == NULL ? NULL : PyObject_GenericGetDict(core, NULL);
    PyObject *acquire = cored == NULL ? NULL : PyObject_GetAttrString(lock, "acquire");
    PyObject *release = acquire == NULL ? NULL : PyObject_GetAttrString(lock, "release");
    PyObject *pump =
        release == NULL ? NULL : PyObject_GetAttr((PyObject *)Py_TYPE(channel), s_wake_pumpers);
    PyObject *chref = pump == NULL ? NULL : PyWeakref_NewRef(channel, NULL);
    Head *self = chref == NULL ? NULL : (Head *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_XDECREF(chref);
        Py_XDECREF(chd);
        Py_XDECREF(cored);
        Py_XDECREF(acquire);
        Py_XDECREF(release);
        Py_XDECREF(pump);
        return NULL;
    }
    self->chref = chref;
    self->channel = channel;
    self->chd = chd;
    Py_DECREF(chd); /* borrowed: the channel keeps it */
    self->core = Py_NewRef(core);
    self->cored = cored;
    self->acquire = acquire;
    self->release = release;
    self->fallback = Py_NewRef(fallback);
    self->wake_pumpers = pump;
    self->bound = bound;
    self->vectorcall = (vectorcallfunc)head_enter;
    return (PyObject *)self;
}

static int head_traverse(Head *self, visitproc visit, void *arg) {
    Py_VISIT(self->chref);
    Py_VISIT(self->core);
    Py_VISIT(self->cored);
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->fallback);
    Py_VISIT(self->wake_pumpers);
    return 0;
}

static int head_clear(Head *self) {
    Py_CLEAR(self->chref);
    self->channel = self->chd = NULL; /* borrowed */
    Py_CLEAR(self->core);
    Py_CLEAR(self->cored);
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->wake_pumpers);
    return 0;
}

static void head_dealloc(Head *self) {
    PyObject_GC_UnTrack(self);
    head_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject HeadType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "buzon.protocol._pop.Head",
    .tp_basicsize = sizeof(Head),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Head(channel, core, lock, fallback, *, bound=False): recv_bytes with a message in hand, "
              "without Python frames (see the module's comment)",
    .tp_new = head_new,
    .tp_dealloc = (destructor)head_dealloc,
    .tp_traverse = (traverseproc)head_traverse,
    .tp_clear = (inquiry)head_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Head, vectorcall),
};

static PyMethodDef methods[] = {
    {"pop", (PyCFunction)(void (*)(void))pop, METH_FASTCALL,
     "pop(core, frames) -> item: ChannelCore._pop in C (see the module's comment)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "buzon.protocol._pop",
    "The take of a message already read, receipts counted, in C (ChannelCore._pop).", -1,
    methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC PyInit__pop(void) {
    INTERN(s_stats, "stats");
    INTERN(s_messages_received, "messages_received");
    INTERN(s_taken, "taken");
    INTERN(s_taking, "taking");
    INTERN(s_rflow, "rflow");
    INTERN(s_capacity, "capacity");
    INTERN(s_unreported, "unreported");
    INTERN(s_report_due, "report_due");
    INTERN(s_took, "_took");
    INTERN(s_take, "_take");
    INTERN(s_popleft, "popleft");
    INTERN(s_decoder, "decoder");
    INTERN(s_frames, "frames");
    INTERN(s_fast_recv, "fast_recv");
    INTERN(s_rv, "_rv");
    INTERN(s_rv_stream, "_rv_stream");
    INTERN(s_pumpers, "_pumpers");
    INTERN(s_wake_pumpers, "_wake_pumpers");
    INTERN(s_item_bytes, "item_bytes");
    flow_names[F_TAKEN] = s_taken;
    flow_names[F_REPORT_DUE] = s_report_due;
    flow_names[F_UNREPORTED] = s_unreported;
    flow_names[F_CAPACITY] = s_capacity;
    stats_names[0] = s_messages_received;
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (PyType_Ready(&HeadType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Head", (PyObject *)&HeadType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
