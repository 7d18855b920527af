/* mqrt.block._rq: the mechanics of a request's hot cache line, in one call each.
 *
 * A request of the shared pool is one cache line (mqrt/block/blk_mq_structs.py,
 * _RQ_FIELDS; the offsets below are checked against it at import).  Its life on the
 * hot path is three steps, each of which in Python was several calls (an atomic read,
 * a cmpxchg, struct.pack_into or unpack_from of up to 13 fields, the clock):
 *
 *   setup(base, start, sector, nr_sectors, nr_segs, cpu, hctx, q, op, rq_flags)
 *       the allocating CPU owns a request its tag names (IDLE -> IDLE|ALLOCATED, a
 *       fully ordered cmpxchg: no tag is handed out twice), then writes the setup
 *       block (plain stores: the request reaches a driver only through the issuing
 *       CPU, or a ctx list's lock, both of which order these stores before it).
 *       None, or the state word found when the request was not free (a violation
 *       the caller reports; the block is written all the same, as before).
 *   start(base, timeout_ns[, now])
 *       blk_mq_start_request(): deadline and io_start_time_ns from ``now`` or, without
 *       it (or 0), CLOCK_MONOTONIC (time.monotonic_ns()'s clock), then the state word to IN_FLIGHT with release
 *       (timeout work that sees IN_FLIGHT sees the deadline).  None, or the state word
 *       found when it was not ALLOCATED and IDLE.
 *   end(base[, now[, status]])
 *       the free at blk_mq_end_request(): a fully ordered cmpxchg to the next
 *       generation's IDLE, then what the end hands on.  Once the request was freed
 *       here, a tuple (info, state, cpu, hctx, q, rq_flags, now): info is the bio's
 *       (op, nr_bios, bytes, start, issue, status) for a request started once and never
 *       handed back (its issue: io_start_time_ns), None otherwise (the caller works
 *       the issue out); status is ``status`` unless None, else the request's; now is
 *       ``now`` unless 0, else the clock.  The state word (an int) when the request
 *       was not allocated; None when another end or a reuse won the cmpxchg.
 *
 * Nothing here decides anything about races: the state machine (which transitions
 * exist, who may make them) is the Python caller's; this file only does the loads,
 * stores and the one CAS of each step with the orderings the Python did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define OFF_STATE 0
#define OFF_DEADLINE 8
#define OFF_IO_START 16
#define OFF_START 24
#define OFF_SECTOR 32
#define OFF_NR_SECTORS 40
#define OFF_NR_BIOS 44
#define OFF_SEGS 46
#define OFF_CPU 48
#define OFF_HCTX 50
#define OFF_Q 52
#define OFF_OP 54
#define OFF_PAD 55
#define OFF_FLAGS 56
#define OFF_STATUS 60
#define RQ_LINE 64

/* The state word: MQ_RQ_* in the low bits, RQ_ALLOCATED, the generation above. */
#define STATE_MASK 0x3ULL
#define IN_FLIGHT 0x1ULL
#define ALLOCATED 0x4ULL
#define GEN_SHIFT 8
#define RQF_REQUEUED (1U << 8)
#define SECTOR_SHIFT 9

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *mem; /* NULL until initialised and once released */
    Py_ssize_t len;
} RqLines;

static inline char *
line_at(RqLines *self, PyObject *arg)
{
    Py_ssize_t off;

    if (self->mem == NULL) {
        PyErr_SetString(PyExc_ValueError, "operation on a released RqLines");
        return NULL;
    }
    off = PyLong_AsSsize_t(arg);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (off < 0 || off > self->len - RQ_LINE || (off & 63)) {
        PyErr_Format(PyExc_IndexError, "no request line at offset %zd of %zd bytes", off,
                     self->len);
        return NULL;
    }
    return self->mem + off;
}

static inline int
args_u64(PyObject *const *args, Py_ssize_t n, uint64_t *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = (uint64_t)PyLong_AsUnsignedLongLongMask(args[i]);
        if (out[i] == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static inline uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A tuple of ``n`` new references (stolen), or NULL if any is NULL (all released). */
static PyObject *
tuple_steal(PyObject **items, Py_ssize_t n)
{
    PyObject *t = NULL;
    Py_ssize_t i;

    for (i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    t = PyTuple_New(n);
    if (t == NULL)
        goto fail;
    for (i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

#define U16(p, off) (*(uint16_t *)((p) + (off)))
#define U32(p, off) (*(uint32_t *)((p) + (off)))
#define U64(p, off) (*(uint64_t *)((p) + (off)))

static PyObject *
rl_setup(RqLines *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t v[9];
    uint64_t st, want;
    char *p;
    int bad;

    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "setup() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    if (args_u64(args + 1, 9, v) < 0 || (p = line_at(self, args[0])) == NULL)
        return NULL;
    /* _own(): the request must be free; mark it allocated */
    st = __atomic_load_n((uint64_t *)p, __ATOMIC_RELAXED);
    want = st;
    bad = (st & (ALLOCATED | STATE_MASK)) != 0
          || !__atomic_compare_exchange_n((uint64_t *)p, &want, st | ALLOCATED, 0,
                                          __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    U64(p, OFF_START) = v[0];
    U64(p, OFF_SECTOR) = v[1];
    U32(p, OFF_NR_SECTORS) = (uint32_t)v[2];
    U16(p, OFF_NR_BIOS) = 1;
    U16(p, OFF_SEGS) = (uint16_t)v[3];
    U16(p, OFF_CPU) = (uint16_t)v[4];
    U16(p, OFF_HCTX) = (uint16_t)v[5];
    U16(p, OFF_Q) = (uint16_t)v[6];
    p[OFF_OP] = (char)(uint8_t)v[7];
    p[OFF_PAD] = 0;
    U32(p, OFF_FLAGS) = (uint32_t)v[8];
    U32(p, OFF_STATUS) = 0;
    if (bad)
        return PyLong_FromUnsignedLongLong(st);
    Py_RETURN_NONE;
}

static PyObject *
rl_start(RqLines *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t timeout, st, now;
    char *p;

    uint64_t given[2] = {0, 0};

    if (nargs != 2 && nargs != 3) {
        PyErr_Format(PyExc_TypeError, "start() takes 2 or 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (args_u64(args + 1, nargs - 1, given) < 0 || (p = line_at(self, args[0])) == NULL)
        return NULL;
    timeout = given[0];
    st = __atomic_load_n((uint64_t *)p, __ATOMIC_RELAXED);
    now = given[1] ? given[1] : now_ns();
    U64(p, OFF_DEADLINE) = now + timeout;
    U64(p, OFF_IO_START) = now;
    __atomic_store_n((uint64_t *)p, (st & ~STATE_MASK) | IN_FLIGHT, __ATOMIC_RELEASE);
    if ((st & (ALLOCATED | STATE_MASK)) != ALLOCATED)
        return PyLong_FromUnsignedLongLong(st);
    Py_RETURN_NONE;
}

static PyObject *
rl_end(RqLines *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t st, want, given = 0, issue, t;
    uint32_t rq_flags;
    int32_t status;
    char *p;
    PyObject *info, *out;

    if (nargs < 1 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "end() takes 1 to 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nargs > 1 && args_u64(args + 1, 1, &given) < 0)
        return NULL;
    if (nargs > 2 && args[2] != Py_None) {
        long v = PyLong_AsLong(args[2]);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        status = (int32_t)v;
    } else {
        status = INT32_MIN; /* the request's own, read below */
    }
    if ((p = line_at(self, args[0])) == NULL)
        return NULL;
    st = __atomic_load_n((uint64_t *)p, __ATOMIC_RELAXED);
    if (!(st & ALLOCATED))
        return PyLong_FromUnsignedLongLong(st);
    want = st;
    if (!__atomic_compare_exchange_n((uint64_t *)p, &want, ((st >> GEN_SHIFT) + 1) << GEN_SHIFT,
                                     0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        Py_RETURN_NONE;
    /* Freed: nobody else writes the line until its tag is put back (the caller's
     * next step), so these plain loads see the setup and start of this instance. */
    t = given ? given : now_ns();
    rq_flags = U32(p, OFF_FLAGS);
    if (status == INT32_MIN)
        status = (int32_t)U32(p, OFF_STATUS);
    if ((st & STATE_MASK) && !(rq_flags & RQF_REQUEUED)) {
        issue = U64(p, OFF_IO_START); /* the common case: started once */
        PyObject *f[6] = {
            PyLong_FromLong((uint8_t)p[OFF_OP]),
            PyLong_FromLong(U16(p, OFF_NR_BIOS)),
            PyLong_FromUnsignedLongLong((uint64_t)U32(p, OFF_NR_SECTORS) << SECTOR_SHIFT),
            PyLong_FromUnsignedLongLong(U64(p, OFF_START)),
            PyLong_FromUnsignedLongLong(issue),
            PyLong_FromLong(status),
        };
        info = tuple_steal(f, 6);
        if (info == NULL)
            return NULL;
    } else {
        info = Py_NewRef(Py_None); /* the caller works out the issue */
    }
    {
        PyObject *f[7] = {
            info,
            PyLong_FromUnsignedLongLong(st),
            PyLong_FromLong(U16(p, OFF_CPU)),
            PyLong_FromLong(U16(p, OFF_HCTX)),
            PyLong_FromLong(U16(p, OFF_Q)),
            PyLong_FromUnsignedLong(rq_flags),
            PyLong_FromUnsignedLongLong(t),
        };
        out = tuple_steal(f, 7);
    }
    return out;
}

static PyObject *
rl_release(RqLines *self, PyObject *Py_UNUSED(ignored))
{
    Py_buffer old;

    if (self->mem != NULL) {
        old = self->view;
        memset(&self->view, 0, sizeof self->view);
        self->mem = NULL;
        self->len = 0;
        PyBuffer_Release(&old);
    }
    Py_RETURN_NONE;
}

static int
rl_init(RqLines *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    Py_buffer nv;
    static char *kwlist[] = {"buffer", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:RqLines", kwlist, &obj))
        return -1;
    if (PyObject_GetBuffer(obj, &nv, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (nv.buf == NULL || ((uintptr_t)nv.buf & 63) != 0) {
        PyBuffer_Release(&nv);
        PyErr_SetString(PyExc_ValueError, "buffer is not cache-line aligned");
        return -1;
    }
    rl_release(self, NULL);
    self->view = nv;
    self->mem = nv.buf;
    self->len = nv.len;
    return 0;
}

static void
rl_dealloc(RqLines *self)
{
    rl_release(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef rl_methods[] = {
    FAST("setup", rl_setup,
         "setup(base, start, sector, nr_sectors, nr_segs, cpu, hctx, q, op, rq_flags) -> "
         "None | int: own the request, write its setup block."),
    FAST("start", rl_start,
         "start(base, timeout_ns[, now]) -> None | int: blk_mq_start_request()."),
    FAST("end", rl_end,
         "end(base[, now[, status]]) -> tuple | int | None: free the request; what its "
         "end hands on."),
    {"release", (PyCFunction)rl_release, METH_NOARGS, "Release the buffer (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RqLinesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqrt.block._rq.RqLines",
    .tp_basicsize = sizeof(RqLines),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RqLines(buffer): a request's hot steps on a pool in a writable, "
              "cache-line aligned buffer (request bases are byte offsets into it).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rl_init,
    .tp_dealloc = (destructor)rl_dealloc,
    .tp_methods = rl_methods,
};

static struct PyModuleDef rq_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mqrt.block._rq",
    .m_doc = "A request's hot steps (own + set up, start, end) on the shared pool.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__rq(void)
{
    PyObject *m;

    if (PyType_Ready(&RqLinesType) < 0)
        return NULL;
    m = PyModule_Create(&rq_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RqLines", (PyObject *)&RqLinesType) < 0
        || PyModule_AddIntConstant(m, "OFF_START", OFF_START) < 0
        || PyModule_AddIntConstant(m, "OFF_STATUS", OFF_STATUS) < 0
        || PyModule_AddIntConstant(m, "OFF_FLAGS", OFF_FLAGS) < 0
        || PyModule_AddIntConstant(m, "OFF_IO_START", OFF_IO_START) < 0
        || PyModule_AddIntConstant(m, "OFF_Q", OFF_Q) < 0
        || PyModule_AddIntConstant(m, "ALLOCATED", (long)ALLOCATED) < 0
        || PyModule_AddIntConstant(m, "STATE_MASK", (long)STATE_MASK) < 0
        || PyModule_AddIntConstant(m, "IN_FLIGHT", (long)IN_FLIGHT) < 0
        || PyModule_AddIntConstant(m, "GEN_SHIFT", GEN_SHIFT) < 0
        || PyModule_AddIntConstant(m, "RQF_REQUEUED", RQF_REQUEUED) < 0
        || PyModule_AddIntConstant(m, "SECTOR_SHIFT", SECTOR_SHIFT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
