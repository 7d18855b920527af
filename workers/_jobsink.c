/* mqrt.workers._jobsink: an fio job's bi_end_io, the step every completed I/O takes.
 *
 * BioSink.done(info, now) is IoJob.done() (workers/ioengine.py) without a Python frame:
 * the request's bios leave the job's depth (inflight -= info[1]) and, once the
 * measured part began (now >= record_from_ns), the row (op, nr_bios, bytes, start,
 * issue, status) and its completion time are stored as seven int64 in a flat buffer,
 * which the job folds into its histograms in bulk (numpy, from take()'s bytes) every
 * ``fold_every`` rows by calling ``fold()``: no tuple is kept, no list grows, and
 * numpy reads the rows as an array instead of walking Python ints.  The sink lives in
 * one process (the CPU that submitted the bios) and is touched by nothing else: no
 * atomics.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <structmember.h>

#define ROW 7 /* op, nr_bios, bytes, start, issue, status, completion time */

typedef struct {
    PyObject_HEAD
    long long inflight;       /* I/Os submitted and not completed */
    long long record_from_ns; /* completions before it are not recorded (ramp_time) */
    Py_ssize_t fold_every;    /* rows the buffer holds */
    Py_ssize_t n;             /* rows in it */
    int64_t *rows;            /* fold_every rows of ROW int64 */
    PyObject *fold;           /* called when the buffer is full */
} BioSink;

/* An int as int64: PyLong_AsLongLongAndOverflow, as PyLong_AsLongLong takes a slow
 * byte-array path for every int of more than one digit (every time stamp). */
static inline long long
as_i64(PyObject *o)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "a completion field does not fit in int64");
        return -1;
    }
    return v;
}

/* Store (row[0..5], now) as the next row; fold when full.  New reference or NULL. */
static PyObject *
store(BioSink *self, PyObject *row, long long now)
{
    int64_t *r = self->rows + self->n * ROW;

    for (int i = 0; i < 6; i++) {
        long long v = as_i64(PyTuple_GET_ITEM(row, i));
        if (v == -1 && PyErr_Occurred())
            return NULL;
        r[i] = v;
    }
    r[6] = now;
    if (++self->n >= self->fold_every)
        return PyObject_CallNoArgs(self->fold);
    Py_RETURN_NONE;
}

static int
check_row(PyObject *row)
{
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "a completion row is a tuple (op, nr_bios, bytes, start, issue, status)");
        return -1;
    }
    return 0;
}

static PyObject *
sink_done(BioSink *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *info;
    long long nr, now;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "done() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    info = args[0];
    if (check_row(info) < 0)
        return NULL;
    nr = as_i64(PyTuple_GET_ITEM(info, 1));
    if (nr == -1 && PyErr_Occurred())
        return NULL;
    now = as_i64(args[1]);
    if (now == -1 && PyErr_Occurred())
        return NULL;
    self->inflight -= nr;
    if (now >= self->record_from_ns)
        return store(self, info, now);
    Py_RETURN_NONE;
}

static PyObject *
sink_record(BioSink *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long now;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "record() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (check_row(args[0]) < 0)
        return NULL;
    now = as_i64(args[1]);
    if (now == -1 && PyErr_Occurred())
        return NULL;
    return store(self, args[0], now);
}

/* The rows stored (bytes: n rows of ROW little-endian int64), and the buffer emptied. */
static PyObject *
sink_take(BioSink *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyBytes_FromStringAndSize((const char *)self->rows,
                                              self->n * ROW * (Py_ssize_t)sizeof(int64_t));
    if (out != NULL)
        self->n = 0;
    return out;
}

static int
sink_init(BioSink *self, PyObject *args, PyObject *kwds)
{
    PyObject *fold;
    Py_ssize_t fold_every;
    int64_t *rows;
    static char *kwlist[] = {"fold_every", "fold", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nO:BioSink", kwlist, &fold_every, &fold))
        return -1;
    if (fold_every < 1 || fold_every > (1 << 24) || !PyCallable_Check(fold)) {
        PyErr_SetString(PyExc_ValueError, "BioSink: fold_every in 1..2**24 and a callable fold");
        return -1;
    }
    rows = PyMem_Calloc((size_t)fold_every * ROW, sizeof(int64_t));
    if (rows == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(self->rows);
    self->rows = rows;
    self->n = 0;
    Py_XSETREF(self->fold, Py_NewRef(fold));
    self->fold_every = fold_every;
    return 0;
}

static int
sink_traverse(BioSink *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fold);
    return 0;
}

static int
sink_clear(BioSink *self)
{
    Py_CLEAR(self->fold);
    return 0;
}

static void
sink_dealloc(BioSink *self)
{
    PyObject_GC_UnTrack(self);
    sink_clear(self);
    PyMem_Free(self->rows);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef sink_methods[] = {
    {"done", (PyCFunction)(void (*)(void))sink_done, METH_FASTCALL,
     "done(info, now): the bios of one request finished (IoJob.done)."},
    {"record", (PyCFunction)(void (*)(void))sink_record, METH_FASTCALL,
     "record(row, now): store a row (op, nr_bios, bytes, start, issue, status)."},
    {"take", (PyCFunction)sink_take, METH_NOARGS,
     "take() -> bytes: the rows stored (int64 x 7 each, the time last); empties them."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef sink_members[] = {
    {"inflight", T_LONGLONG, offsetof(BioSink, inflight), 0, "I/Os in flight."},
    {"record_from_ns", T_LONGLONG, offsetof(BioSink, record_from_ns), 0,
     "Completions from this time on are recorded."},
    {"pending", T_PYSSIZET, offsetof(BioSink, n), READONLY, "Rows stored."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BioSinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqrt.workers._jobsink.BioSink",
    .tp_basicsize = sizeof(BioSink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "BioSink(fold_every, fold): an fio job's bi_end_io.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sink_init,
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_traverse = (traverseproc)sink_traverse,
    .tp_clear = (inquiry)sink_clear,
    .tp_methods = sink_methods,
    .tp_members = sink_members,
};

static struct PyModuleDef jobsink_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mqrt.workers._jobsink",
    .m_doc = "An fio job's bi_end_io in C (see workers/ioengine.py, IoJob.done).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__jobsink(void)
{
    PyObject *m;

    if (PyType_Ready(&BioSinkType) < 0)
        return NULL;
    m = PyModule_Create(&jobsink_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "BioSink", (PyObject *)&BioSinkType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
