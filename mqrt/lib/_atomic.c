/*
 * mqrt.lib._atomic - word-level atomics on a shared-memory buffer.
 *
 * The user-space counterpart of the kernel's <linux/atomic.h> and <linux/bitops.h>,
 * for words that live in a multiprocessing.shared_memory segment mapped by several
 * processes.  Only word-level primitives live here; rings, sbitmap and everything
 * above them are Python (mqrt/lib/ring.py, mqrt/lib/sbitmap.py), so they can be read,
 * instrumented and deliberately broken.  The exceptions are sbitmap's hot steps that
 * the kernel too does as one helper on one word (find_and_set_zero_bit*: the word
 * search; deferred_clear_bit_at: sbitmap_queue_clear up to its wake-up), each with
 * its Python counterpart beside the call (Sbitmap._get, SbitmapQueue._clear).
 *
 * Memory-ordering model (GCC __atomic builtins):
 *   read / read32                    relaxed load            (READ_ONCE)
 *   set / set32                      relaxed store           (WRITE_ONCE)
 *   load_acquire / load_acquire32    acquire load            (smp_load_acquire)
 *   store_release / store_release32  release store           (smp_store_release)
 *   cmpxchg, xchg, fetch_*           fully ordered: a full barrier, like the kernel's
 *                                    value-returning atomics (see Architectures)
 *   test_and_set_bit, test_and_clear_bit   fully ordered
 *   test_and_set_bit_lock            acquire                 (lock a bit)
 *   clear_bit_unlock                 release                 (unlock a bit)
 *   set_bit, clear_bit               relaxed (like the kernel's non-returning bitops)
 *   find_and_set_zero_bit            relaxed scan, acquire test-and-set (sbitmap's
 *                                    find_next_zero_bit + test_and_set_bit_lock loop)
 *   find_and_set_zero_bit_at         the same, on the word of a bitmap that holds a bit
 *   deferred_clear_bit_at            fully ordered fetch_or of a bit in `cleared`, then
 *                                    relaxed: the ws_active load, and if 0 the hint
 *                                    store (sbitmap_queue_clear up to its wake-up)
 *   fence()                          full barrier            (smp_mb)
 *
 * 64-bit operations work on unsigned words (unsigned long: bitmap words, ring
 * counters); 32-bit operations work on signed words (atomic_t: ws_active, wait_cnt,
 * nr_active).  Arguments wrap modulo the word size, as kernel atomics do.
 *
 * A view made with readonly=True takes a read-only buffer (a PROT_READ mapping: an
 * inspector of a live run) and refuses every operation that writes, with
 * PermissionError, before touching the word; loads work as on any view.
 *
 * Every access is checked against the buffer: an offset outside it raises IndexError,
 * a misaligned one ValueError, and a view that is released or was never initialised
 * ValueError - never a segfault.  Arguments are converted before the address is
 * checked and taken: converting one can run Python code (__index__), which may release
 * or re-initialise the view, and nothing but C runs between the check and the access.
 * Calling __init__ again rebinds a view to a new buffer (a failed call leaves it as it
 * was); every rebinding and release bumps the view's generation, and a TraceWriter
 * writes only while the generation it was bound at is current.
 *
 * Architectures: x86-64 and aarch64; anything else is refused at build time.
 *   The fully ordered read-modify-writes must be full barriers for the relaxed
 *   accesses around them, as the kernel's value-returning atomics are: sbitmap's
 *   wake-up does a fetch_or on `cleared` and then a plain read of `ws_active`, and
 *   relies on the read not being satisfied before the fetch_or is visible.  C11 does
 *   not promise that: a seq_cst RMW is only ordered against other seq_cst operations.
 *   x86-64   every RMW is a LOCK-prefixed instruction (or XCHG, implicitly locked),
 *            itself a full barrier: nothing is added.
 *   aarch64  GCC emits an LDAXR/STLXR loop, an LSE LDxxAL/SWPAL/CASAL, or a call to an
 *            outline helper that picks one at run time.  Acquire + release is not a
 *            full barrier with LL/SC: a later load may be satisfied before the STLXR's
 *            store is visible.  So each fully ordered RMW is followed by DMB ISH
 *            (__atomic_thread_fence(__ATOMIC_SEQ_CST)), as the kernel's arm64 LL/SC
 *            atomics are (stlxr; dmb ish).  No leading barrier is needed: the RMW's
 *            release half orders every earlier access before its store.  A failed
 *            cmpxchg stores nothing, so, as in the kernel, it does not order earlier
 *            accesses before its own load (the trailing barrier still orders them
 *            before later ones).  The acquire/release/relaxed operations need nothing.
 *   others   POWER, RISC-V, ... each need their own argument (POWER, for one, needs a
 *            trailing sync, not GCC's isync), so they are refused rather than guessed.
 *   Words shared between processes must be lock-free (address-free): checked below.
 *
 * One writer sits above the words: TraceWriter, which appends the event trace's
 * 32-byte records (mqrt/lib/trace.py has the format and the ordering argument).  It is
 * here because tracing is meant to stay on: in CPython, struct.pack_into + the clock +
 * the head store cost ~500 ns an event, in C ~100 ns.  Readers stay in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#define SMP_MB_AFTER_RMW() ((void)0) /* the LOCKed instruction is the barrier */
#elif defined(__aarch64__)
#define SMP_MB_AFTER_RMW() __atomic_thread_fence(__ATOMIC_SEQ_CST) /* dmb ish */
#else
#error "mqrt.lib._atomic supports x86-64 and aarch64 only (see Architectures above)"
#endif

_Static_assert(__atomic_always_lock_free(4, 0) && __atomic_always_lock_free(8, 0),
               "cross-process atomics need lock-free 32- and 64-bit words");

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;          /* NULL until initialised and once released */
    Py_ssize_t len;
    uint64_t gen;        /* bumped by every (re)initialisation and release */
    int readonly;        /* bound to a read-only buffer: loads only */
} AtomicView;

/* Cold: the error for a view with no buffer. */
static void
set_unbound_error(AtomicView *self)
{
    PyErr_SetString(PyExc_ValueError, self->gen ? "operation on a released AtomicView"
                                                : "operation on an uninitialised AtomicView");
}

/* The address of the `width`-byte word at byte offset `off`, or NULL with an exception. */
static inline void *
word_addr_at(AtomicView *self, Py_ssize_t off, Py_ssize_t width)
{
    if (self->base == NULL) {
        set_unbound_error(self);
        return NULL;
    }
    if (off < 0 || off > self->len - width) {
        PyErr_Format(PyExc_IndexError,
                     "offset %zd out of range for a %zd-byte word in a %zd-byte buffer",
                     off, width, self->len);
        return NULL;
    }
    if (off & (width - 1)) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, width);
        return NULL;
    }
    return self->base + off;
}

/* word_addr_at() for an offset given as a Python int. */
static inline void *
word_addr(AtomicView *self, PyObject *arg, Py_ssize_t width)
{
    Py_ssize_t off;

    if (self->base == NULL) {
        set_unbound_error(self);
        return NULL;
    }
    off = PyLong_AsSsize_t(arg); /* an int or nothing: runs no Python code */
    if (off == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_IndexError,
                         "offset out of range for a %zd-byte word in a %zd-byte buffer",
                         width, self->len);
        }
        return NULL;
    }
    return word_addr_at(self, off, width);
}

/* The address of a word this operation writes: word_addr(), refused on a read-only
 * view (a PROT_READ mapping would fault). */
static inline void *
word_waddr(AtomicView *self, PyObject *arg, Py_ssize_t width)
{
    if (self->readonly && self->base != NULL) {
        PyErr_SetString(PyExc_PermissionError, "write through a read-only AtomicView");
        return NULL;
    }
    return word_addr(self, arg, width);
}

static inline void *
word_waddr_at(AtomicView *self, Py_ssize_t off, Py_ssize_t width)
{
    if (self->readonly && self->base != NULL) {
        PyErr_SetString(PyExc_PermissionError, "write through a read-only AtomicView");
        return NULL;
    }
    return word_addr_at(self, off, width);
}

static inline int
get_u64(PyObject *arg, uint64_t *out)
{
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(arg);
    return (*out == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static inline int
get_i32(PyObject *arg, int32_t *out)
{
    uint64_t v = (uint64_t)PyLong_AsUnsignedLongLongMask(arg);
    if (v == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    *out = (int32_t)(uint32_t)v;
    return 0;
}

static inline int
get_bitnr(PyObject *arg, unsigned *out)
{
    long nr = PyLong_AsLong(arg);
    if (nr == -1 && PyErr_Occurred())
        return -1;
    if (nr < 0 || nr > 63) {
        PyErr_Format(PyExc_ValueError, "bit number %ld out of range 0..63", nr);
        return -1;
    }
    *out = (unsigned)nr;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

/* ---- loads and stores ------------------------------------------------------------ */

/* In every operation the values are converted first and word_addr() comes last, right
 * before the access (see the note at the top). */

#define DEFINE_LOAD(fn, type, width, order, box)                                        \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        type *p;                                                                      \
        if (check_nargs(#fn, nargs, 1) < 0)                                           \
            return NULL;                                                              \
        if (!(p = word_addr(self, args[0], width)))                                   \
            return NULL;                                                              \
        return box(__atomic_load_n(p, order));                                        \
    }

#define DEFINE_STORE(fn, type, width, order, unbox)                                     \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        type *p;                                                                      \
        type v;                                                                       \
        if (check_nargs(#fn, nargs, 2) < 0)                                           \
            return NULL;                                                              \
        if (unbox(args[1], &v) < 0 || !(p = word_waddr(self, args[0], width)))         \
            return NULL;                                                              \
        __atomic_store_n(p, v, order);                                                \
        Py_RETURN_NONE;                                                               \
    }

/* ---- read-modify-write: fully ordered --------------------------------------------- */

#define DEFINE_RMW(fn, type, width, builtin, box, unbox)                                \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        type *p;                                                                      \
        type v, old;                                                                  \
        if (check_nargs(#fn, nargs, 2) < 0)                                           \
            return NULL;                                                              \
        if (unbox(args[1], &v) < 0 || !(p = word_waddr(self, args[0], width)))         \
            return NULL;                                                              \
        old = builtin(p, v, __ATOMIC_SEQ_CST);                                        \
        SMP_MB_AFTER_RMW();                                                           \
        return box(old);                                                              \
    }

#define DEFINE_FETCH_ANDNOT(fn, type, width, box, unbox)                                \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        type *p;                                                                      \
        type v, old;                                                                  \
        if (check_nargs(#fn, nargs, 2) < 0)                                           \
            return NULL;                                                              \
        if (unbox(args[1], &v) < 0 || !(p = word_waddr(self, args[0], width)))         \
            return NULL;                                                              \
        old = __atomic_fetch_and(p, (type)~v, __ATOMIC_SEQ_CST);                      \
        SMP_MB_AFTER_RMW();                                                           \
        return box(old);                                                              \
    }

/* cmpxchg(off, old, new) returns the value found; it succeeded iff that equals old. */
#define DEFINE_CMPXCHG(fn, type, width, box, unbox)                                     \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        type *p;                                                                      \
        type expected, desired;                                                       \
        if (check_nargs(#fn, nargs, 3) < 0)                                           \
            return NULL;                                                              \
        if (unbox(args[1], &expected) < 0 || unbox(args[2], &desired) < 0             \
            || !(p = word_waddr(self, args[0], width)))                               \
            return NULL;                                                              \
        __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,       \
                                    __ATOMIC_SEQ_CST);                                \
        SMP_MB_AFTER_RMW();                                                           \
        return box(expected);                                                         \
    }

#define BOX_U64(v) PyLong_FromUnsignedLongLong((unsigned long long)(v))
#define BOX_I32(v) PyLong_FromLong((long)(v))

DEFINE_LOAD(av_read, uint64_t, 8, __ATOMIC_RELAXED, BOX_U64)
DEFINE_LOAD(av_load_acquire, uint64_t, 8, __ATOMIC_ACQUIRE, BOX_U64)
DEFINE_STORE(av_set, uint64_t, 8, __ATOMIC_RELAXED, get_u64)
DEFINE_STORE(av_store_release, uint64_t, 8, __ATOMIC_RELEASE, get_u64)
DEFINE_CMPXCHG(av_cmpxchg, uint64_t, 8, BOX_U64, get_u64)
DEFINE_RMW(av_xchg, uint64_t, 8, __atomic_exchange_n, BOX_U64, get_u64)
DEFINE_RMW(av_fetch_add, uint64_t, 8, __atomic_fetch_add, BOX_U64, get_u64)
DEFINE_RMW(av_fetch_sub, uint64_t, 8, __atomic_fetch_sub, BOX_U64, get_u64)
DEFINE_RMW(av_fetch_or, uint64_t, 8, __atomic_fetch_or, BOX_U64, get_u64)
DEFINE_RMW(av_fetch_and, uint64_t, 8, __atomic_fetch_and, BOX_U64, get_u64)
DEFINE_FETCH_ANDNOT(av_fetch_andnot, uint64_t, 8, BOX_U64, get_u64)

DEFINE_LOAD(av_read32, int32_t, 4, __ATOMIC_RELAXED, BOX_I32)
DEFINE_LOAD(av_load_acquire32, int32_t, 4, __ATOMIC_ACQUIRE, BOX_I32)
DEFINE_STORE(av_set32, int32_t, 4, __ATOMIC_RELAXED, get_i32)
DEFINE_STORE(av_store_release32, int32_t, 4, __ATOMIC_RELEASE, get_i32)
DEFINE_CMPXCHG(av_cmpxchg32, int32_t, 4, BOX_I32, get_i32)
DEFINE_RMW(av_xchg32, int32_t, 4, __atomic_exchange_n, BOX_I32, get_i32)
DEFINE_RMW(av_fetch_add32, int32_t, 4, __atomic_fetch_add, BOX_I32, get_i32)
DEFINE_RMW(av_fetch_sub32, int32_t, 4, __atomic_fetch_sub, BOX_I32, get_i32)
DEFINE_RMW(av_fetch_or32, int32_t, 4, __atomic_fetch_or, BOX_I32, get_i32)
DEFINE_RMW(av_fetch_and32, int32_t, 4, __atomic_fetch_and, BOX_I32, get_i32)

/* percpu_add(flags_off, off, v) -> bool: a percpu_ref's per-CPU step
 * (mqrt.lib.percpu_ref): if the 64-bit word at flags_off reads 0 (relaxed, as the
 * kernel's __ref_is_percpu() reads it), add v to the 64-bit word at off (fully ordered,
 * as fetch_add) and return True; otherwise change nothing and return False. */
static PyObject *
av_percpu_add(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *flags, *p;
    uint64_t v;
    if (check_nargs("percpu_add", nargs, 3) < 0)
        return NULL;
    if (get_u64(args[2], &v) < 0 || !(flags = word_addr(self, args[0], 8))
        || !(p = word_waddr(self, args[1], 8)))
        return NULL;
    if (__atomic_load_n(flags, __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    SMP_MB_AFTER_RMW();
    Py_RETURN_TRUE;
}

/* ---- bit operations on 64-bit words ------------------------------------------------ */

static PyObject *
av_test_bit(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *p;
    unsigned nr;
    if (check_nargs("test_bit", nargs, 2) < 0)
        return NULL;
    if (get_bitnr(args[1], &nr) < 0 || !(p = word_addr(self, args[0], 8)))
        return NULL;
    return PyBool_FromLong((__atomic_load_n(p, __ATOMIC_RELAXED) >> nr) & 1);
}

/* __ATOMIC_SEQ_CST marks the fully ordered ones: test_and_set_bit, test_and_clear_bit. */
#define DEFINE_BITOP(fn, builtin, order, make_mask, returns_old)                        \
    static PyObject *fn(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                 \
        uint64_t *p;                                                                  \
        uint64_t old;                                                                 \
        unsigned nr;                                                                  \
        if (check_nargs(#fn, nargs, 2) < 0)                                           \
            return NULL;                                                              \
        if (get_bitnr(args[1], &nr) < 0 || !(p = word_waddr(self, args[0], 8)))       \
            return NULL;                                                              \
        old = builtin(p, make_mask(nr), order);                                       \
        if (order == __ATOMIC_SEQ_CST)                                                \
            SMP_MB_AFTER_RMW();                                                       \
        if (returns_old)                                                              \
            return PyBool_FromLong((old >> nr) & 1);                                  \
        Py_RETURN_NONE;                                                               \
    }

#define BIT(nr) ((uint64_t)1 << (nr))
#define NOTBIT(nr) (~((uint64_t)1 << (nr)))

DEFINE_BITOP(av_set_bit, __atomic_fetch_or, __ATOMIC_RELAXED, BIT, 0)
DEFINE_BITOP(av_clear_bit, __atomic_fetch_and, __ATOMIC_RELAXED, NOTBIT, 0)
DEFINE_BITOP(av_clear_bit_unlock, __atomic_fetch_and, __ATOMIC_RELEASE, NOTBIT, 0)
DEFINE_BITOP(av_test_and_set_bit, __atomic_fetch_or, __ATOMIC_SEQ_CST, BIT, 1)
DEFINE_BITOP(av_test_and_set_bit_lock, __atomic_fetch_or, __ATOMIC_ACQUIRE, BIT, 1)
DEFINE_BITOP(av_test_and_clear_bit, __atomic_fetch_and, __ATOMIC_SEQ_CST, NOTBIT, 1)

/* First zero bit at or above `from` among bits [0, depth) of val, or depth if none. */
static inline unsigned
next_zero_bit(uint64_t val, unsigned depth, unsigned from)
{
    uint64_t free;
    if (from >= depth)
        return depth;
    free = ~val & (depth == 64 ? ~(uint64_t)0 : BIT(depth) - 1) & (~(uint64_t)0 << from);
    return free ? (unsigned)__builtin_ctzll(free) : depth;
}

/*
 * find_and_set_zero_bit(off, depth, hint, wrap[, stat_off]) -> bit number or -1
 *
 * Find a zero bit among bits [0, depth) of the word at `off`, starting the search at
 * `hint`, and set it with acquire ordering; on a lost race move past the bit and
 * search again.  With `wrap` (and a non-zero hint) the search restarts from bit 0
 * once it runs off the end.  This is the word loop of sbitmap's __sbitmap_get_word():
 * the same hint handling, including moving back to 0 when the next hint would reach
 * depth - 1.
 *
 * Contention accounting (mqrt/lib/lockstat.py): with `stat_off` >= 0 (the calling
 * process's lock_stat counters of the word's class, LS_NR_FIELDS u64 from there), a
 * call that lost a race at least once adds to them: contentions += 1, retries += the
 * races lost, wait_ns += the time from its first lost race to its return (a relaxed
 * CLOCK_MONOTONIC read at the first lost race and one at the end), wait_max_ns
 * raised to that time if above it, and every call that set a bit adds 1 to
 * acquisitions.  One writer per block (the process whose counters they are): plain
 * relaxed loads and stores, read relaxed by the others.  A call that lost no race
 * reads no clock and touches only its acquisitions word.
 */
enum { LS_CONTENTIONS, LS_ACQUISITIONS, LS_WAIT_NS, LS_WAIT_MAX_NS, LS_RETRIES, LS_NR_FIELDS };

static inline uint64_t
ls_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void
ls_add(uint64_t *w, uint64_t v)
{
    __atomic_store_n(w, __atomic_load_n(w, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

/* The lock_stat counters after a call that lost `lost` races since `t0` (and found a
 * bit or not: `got`); `st` NULL: not counted. */
static void
ls_account(uint64_t *st, unsigned long lost, uint64_t t0, int got)
{
    uint64_t waited;

    if (got)
        ls_add(&st[LS_ACQUISITIONS], 1);
    if (!lost)
        return;
    waited = ls_now_ns() - t0;
    ls_add(&st[LS_CONTENTIONS], 1);
    ls_add(&st[LS_RETRIES], lost);
    ls_add(&st[LS_WAIT_NS], waited);
    if (waited > __atomic_load_n(&st[LS_WAIT_MAX_NS], __ATOMIC_RELAXED))
        __atomic_store_n(&st[LS_WAIT_MAX_NS], waited, __ATOMIC_RELAXED);
}

/* The lock_stat block of an optional `stat_off` argument (an int, -1 for none; converting
 * it runs no Python code): *out is NULL for none.  -1 with an exception if it is not an
 * int or the block is not inside the buffer. */
static int
ls_block(AtomicView *self, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t at, uint64_t **out)
{
    Py_ssize_t off;

    *out = NULL;
    if (nargs <= at)
        return 0;
    off = PyLong_AsSsize_t(args[at]);
    if (off == -1) {
        if (PyErr_Occurred())
            return -1;
        return 0;
    }
    if (!(*out = word_addr_at(self, off, 8)) || !word_addr_at(self, off + 8 * (LS_NR_FIELDS - 1), 8))
        return -1;
    return 0;
}

static long
get_word(uint64_t *p, unsigned depth, unsigned hint, int wrap, uint64_t *st)
{
    uint64_t val, t0 = 0;
    unsigned long lost = 0;
    unsigned nr;

    wrap = wrap && hint; /* don't wrap if starting from 0 */
    for (;;) {
        val = __atomic_load_n(p, __ATOMIC_RELAXED);
        nr = next_zero_bit(val, depth, hint);
        if (nr >= depth) {
            if (hint && wrap) {
                hint = 0;
                continue;
            }
            if (st)
                ls_account(st, lost, t0, 0);
            return -1;
        }
        if (!(__atomic_fetch_or(p, BIT(nr), __ATOMIC_ACQUIRE) & BIT(nr))) {
            if (st)
                ls_account(st, lost, t0, 1);
            return (long)nr;
        }
        /* lost a race for bit nr: the contended branch, the only one that counts */
        if (st && !lost++)
            t0 = ls_now_ns();
        hint = nr + 1;
        if (hint >= depth - 1)
            hint = 0;
    }
}

static PyObject *
av_find_and_set_zero_bit(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *p, *st;
    long depth, hint;
    int wrap;

    if (nargs != 5 && check_nargs("find_and_set_zero_bit", nargs, 4) < 0)
        return NULL;
    depth = PyLong_AsLong(args[1]);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    hint = PyLong_AsLong(args[2]);
    if (hint == -1 && PyErr_Occurred())
        return NULL;
    if ((wrap = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    if (depth < 0 || depth > 64) {
        PyErr_Format(PyExc_ValueError, "depth %ld out of range 0..64", depth);
        return NULL;
    }
    if (hint < 0) {
        PyErr_Format(PyExc_ValueError, "hint %ld is negative", hint);
        return NULL;
    }
    if (ls_block(self, args, nargs, 4, &st) < 0 || !(p = word_waddr(self, args[0], 8)))
        return NULL;
    return PyLong_FromLong(
        get_word(p, (unsigned)depth, hint < 64 ? (unsigned)hint : 64, wrap, st));
}

/*
 * The offset of word `index` of a map of words `stride` bytes apart from the offset in
 * `arg` (an int: converting it runs no Python code); for word_addr_at() to check.  An
 * offset out of the buffer stays as it is (or -1 if it does not fit a Py_ssize_t), so
 * the sum cannot overflow.  -1 with an exception if `arg` is not an int.
 */
static Py_ssize_t
map_word_off(AtomicView *self, PyObject *arg, long index, long stride)
{
    Py_ssize_t off = PyLong_AsSsize_t(arg);

    if (off == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* out of range: word_addr_at() says so */
        return -1;
    }
    if (off >= 0 && off <= self->len)
        off += (Py_ssize_t)index * stride;
    return off;
}

/*
 * find_and_set_zero_bit_at(map_off, stride, shift, depth, hint[, stat_off])
 *     -> bit number or -1
 *
 * find_and_set_zero_bit() on the word that holds bit `hint` of a bitmap of `depth`
 * bits spread over words `stride` bytes apart from `map_off`, `1 << shift` bits to a
 * word but the last, which has what is left of depth (sbitmap's __map_depth()): the
 * search starts at the word's bit 0 and wraps (sbitmap's non-round-robin
 * __sbitmap_get_word() call).  Returns the bit's number in the bitmap, or -1 if that
 * word is full.  `stat_off`: as find_and_set_zero_bit()'s.
 */
static PyObject *
av_find_and_set_zero_bit_at(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *p, *st;
    long stride, shift, depth, hint, index, word_depth, nr;
    Py_ssize_t map_off;

    if (nargs != 6 && check_nargs("find_and_set_zero_bit_at", nargs, 5) < 0)
        return NULL;
    if ((stride = PyLong_AsLong(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    if ((shift = PyLong_AsLong(args[2])) == -1 && PyErr_Occurred())
        return NULL;
    if ((depth = PyLong_AsLong(args[3])) == -1 && PyErr_Occurred())
        return NULL;
    if ((hint = PyLong_AsLong(args[4])) == -1 && PyErr_Occurred())
        return NULL;
    if (stride < 8 || stride > 4096 || stride % 8 || shift < 0 || shift > 6) {
        PyErr_Format(PyExc_ValueError, "bad map geometry: stride %ld, shift %ld", stride, shift);
        return NULL;
    }
    if (hint < 0 || hint >= depth || depth > (1L << 24)) {
        PyErr_Format(PyExc_ValueError, "hint %ld out of range for depth %ld", hint, depth);
        return NULL;
    }
    index = hint >> shift;
    word_depth = depth - (index << shift);
    if (word_depth > (1L << shift))
        word_depth = 1L << shift;
    /* the map's offset, an int or nothing (runs no Python code), comes last */
    if (ls_block(self, args, nargs, 5, &st) < 0)
        return NULL;
    if ((map_off = map_word_off(self, args[0], index, stride)) == -1 && PyErr_Occurred())
        return NULL;
    if (!(p = word_waddr_at(self, map_off, 8)))
        return NULL;
    nr = get_word(p, (unsigned)word_depth, 0, 1, st);
    return PyLong_FromLong(nr == -1 ? -1 : (index << shift) + nr);
}

/*
 * deferred_clear_bit_at(map_off, stride, shift, nr, ws_active_off, hint_off, depth_off)
 *     -> int
 *
 * sbitmap_queue_clear() up to its wake-up, for bit `nr` of a bitmap whose `cleared`
 * words are `stride` bytes apart from `map_off`, `1 << shift` bits to a word:
 *   1. set the bit in its word's `cleared` mask, fully ordered (smp_mb__before_atomic
 *      + set_bit + smp_mb__after_atomic: sbitmap_deferred_clear_bit());
 *   2. load the 32-bit `ws_active` (relaxed; ordered after 1 by its full barrier):
 *      sbitmap_queue_wake_up()'s first test;
 *   3. only if that is 0 (the wake-up would return at once): sbitmap_update_cpu_hint(),
 *      a relaxed store of nr at `hint_off` if nr is below the unsigned 32-bit depth at
 *      `depth_off` (relaxed load); no store if `hint_off` is negative (round-robin).
 * Returns ws_active: if it is not 0 the caller wakes up and then updates the hint
 * itself, in the kernel's order.
 */
static PyObject *
av_deferred_clear_bit_at(AtomicView *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t *p;
    int32_t *ws_active, active;
    uint32_t *hint = NULL, *depth = NULL;
    long stride, shift, nr;
    Py_ssize_t map_off, hint_off;

    if (check_nargs("deferred_clear_bit_at", nargs, 7) < 0)
        return NULL;
    if ((stride = PyLong_AsLong(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    if ((shift = PyLong_AsLong(args[2])) == -1 && PyErr_Occurred())
        return NULL;
    if ((nr = PyLong_AsLong(args[3])) == -1 && PyErr_Occurred())
        return NULL;
    if (stride < 8 || stride > 4096 || stride % 8 || shift < 0 || shift > 6) {
        PyErr_Format(PyExc_ValueError, "bad map geometry: stride %ld, shift %ld", stride, shift);
        return NULL;
    }
    if (nr < 0 || nr >= (1L << 24)) {
        PyErr_Format(PyExc_ValueError, "bit %ld out of range", nr);
        return NULL;
    }
    /* offsets last: ints or nothing, they run no Python code */
    if ((map_off = map_word_off(self, args[0], nr >> shift, stride)) == -1 && PyErr_Occurred())
        return NULL;
    if (!(p = word_waddr_at(self, map_off, 8)) || !(ws_active = word_addr(self, args[4], 4)))
        return NULL;
    hint_off = PyLong_AsSsize_t(args[5]);
    if (hint_off == -1 && PyErr_Occurred())
        return NULL;
    if (hint_off >= 0
        && (!(hint = word_waddr_at(self, hint_off, 4)) || !(depth = word_addr(self, args[6], 4))))
        return NULL;
    __atomic_fetch_or(p, BIT(nr & ((1L << shift) - 1)), __ATOMIC_SEQ_CST);
    SMP_MB_AFTER_RMW();
    active = __atomic_load_n(ws_active, __ATOMIC_RELAXED);
    if (!active && hint != NULL && (uint64_t)nr < __atomic_load_n(depth, __ATOMIC_RELAXED))
        __atomic_store_n(hint, (uint32_t)nr, __ATOMIC_RELAXED);
    return BOX_I32(active);
}

/* ---- object plumbing ---------------------------------------------------------------- */

/* Detach the buffer, then release it: releasing can run Python code (an exporter's
 * __release_buffer__), which must find the view already released. */
static PyObject *
av_release(AtomicView *self, PyObject *Py_UNUSED(ignored))
{
    Py_buffer old;

    if (self->base != NULL) {
        old = self->view;
        memset(&self->view, 0, sizeof self->view);
        self->base = NULL;
        self->len = 0;
        self->gen++;
        PyBuffer_Release(&old);
    }
    Py_RETURN_NONE;
}

static PyObject *
av_enter(AtomicView *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self);
}

static PyObject *
av_exit(AtomicView *self, PyObject *args)
{
    return av_release(self, NULL);
}

/* The new buffer is taken (which can run Python code) and checked before the view
 * changes; then the view switches to it in one step and the old one is released. */
static int
av_init(AtomicView *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    Py_buffer nv, old;
    int had, readonly = 0;
    static char *kwlist[] = {"buffer", "readonly", NULL};

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$p:AtomicView", kwlist, &obj, &readonly))
        return -1;
    if (PyObject_GetBuffer(obj, &nv, (readonly ? 0 : PyBUF_WRITABLE) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (nv.buf == NULL || ((uintptr_t)nv.buf & 7) != 0) {
        const char *why = nv.buf == NULL ? "buffer has no memory" : "buffer is not 8-byte aligned";
        PyBuffer_Release(&nv);
        PyErr_SetString(PyExc_ValueError, why);
        return -1;
    }
    had = self->base != NULL;
    old = self->view;
    self->view = nv;
    self->base = nv.buf;
    self->len = nv.len;
    self->readonly = readonly;
    self->gen++;
    if (had)
        PyBuffer_Release(&old);
    return 0;
}

static void
av_dealloc(AtomicView *self)
{
    av_release(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
av_get_nbytes(AtomicView *self, void *closure)
{
    return PyLong_FromSsize_t(self->len);
}

static PyObject *
av_get_readonly(AtomicView *self, void *closure)
{
    return PyBool_FromLong(self->readonly);
}

static PyObject *
av_get_released(AtomicView *self, void *closure)
{
    return PyBool_FromLong(self->base == NULL);
}

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef av_methods[] = {
    FAST("read", av_read, "read(off) -> int: relaxed 64-bit load (READ_ONCE)."),
    FAST("set", av_set, "set(off, v): relaxed 64-bit store (WRITE_ONCE)."),
    FAST("load_acquire", av_load_acquire, "load_acquire(off) -> int: acquire 64-bit load."),
    FAST("store_release", av_store_release, "store_release(off, v): release 64-bit store."),
    FAST("cmpxchg", av_cmpxchg,
         "cmpxchg(off, old, new) -> int: value found; the swap happened iff it equals old."),
    FAST("xchg", av_xchg, "xchg(off, v) -> int: store v, return the old value."),
    FAST("fetch_add", av_fetch_add, "fetch_add(off, v) -> int: old value."),
    FAST("percpu_add", av_percpu_add,
         "percpu_add(flags_off, off, v) -> bool: if the word at flags_off is 0, fetch_add v "
         "at off and True; else False."),
    FAST("fetch_sub", av_fetch_sub, "fetch_sub(off, v) -> int: old value."),
    FAST("fetch_or", av_fetch_or, "fetch_or(off, mask) -> int: old value."),
    FAST("fetch_and", av_fetch_and, "fetch_and(off, mask) -> int: old value."),
    FAST("fetch_andnot", av_fetch_andnot, "fetch_andnot(off, mask) -> int: old value."),
    FAST("read32", av_read32, "read32(off) -> int: relaxed signed 32-bit load (atomic_read)."),
    FAST("set32", av_set32, "set32(off, v): relaxed signed 32-bit store (atomic_set)."),
    FAST("load_acquire32", av_load_acquire32, "load_acquire32(off) -> int"),
    FAST("store_release32", av_store_release32, "store_release32(off, v)"),
    FAST("cmpxchg32", av_cmpxchg32, "cmpxchg32(off, old, new) -> int: value found."),
    FAST("xchg32", av_xchg32, "xchg32(off, v) -> int: old value."),
    FAST("fetch_add32", av_fetch_add32, "fetch_add32(off, v) -> int: old value."),
    FAST("fetch_sub32", av_fetch_sub32, "fetch_sub32(off, v) -> int: old value."),
    FAST("fetch_or32", av_fetch_or32, "fetch_or32(off, mask) -> int: old value."),
    FAST("fetch_and32", av_fetch_and32, "fetch_and32(off, mask) -> int: old value."),
    FAST("test_bit", av_test_bit, "test_bit(off, nr) -> bool: relaxed."),
    FAST("set_bit", av_set_bit, "set_bit(off, nr): atomic, relaxed."),
    FAST("clear_bit", av_clear_bit, "clear_bit(off, nr): atomic, relaxed."),
    FAST("clear_bit_unlock", av_clear_bit_unlock, "clear_bit_unlock(off, nr): release."),
    FAST("test_and_set_bit", av_test_and_set_bit,
         "test_and_set_bit(off, nr) -> bool: old bit; fully ordered."),
    FAST("test_and_set_bit_lock", av_test_and_set_bit_lock,
         "test_and_set_bit_lock(off, nr) -> bool: old bit; acquire."),
    FAST("test_and_clear_bit", av_test_and_clear_bit,
         "test_and_clear_bit(off, nr) -> bool: old bit; fully ordered."),
    FAST("find_and_set_zero_bit", av_find_and_set_zero_bit,
         "find_and_set_zero_bit(off, depth, hint, wrap[, stat_off]) -> int: the bit set, or "
         "-1; with stat_off >= 0 the call counts itself in the lock_stat block there."),
    FAST("find_and_set_zero_bit_at", av_find_and_set_zero_bit_at,
         "find_and_set_zero_bit_at(map_off, stride, shift, depth, hint[, stat_off]) -> int: "
         "find_and_set_zero_bit(word, word_depth, 0, True[, stat_off]) on the word of bit hint of a "
         "map of words; the bit's number in the map, or -1."),
    FAST("deferred_clear_bit_at", av_deferred_clear_bit_at,
         "deferred_clear_bit_at(map_off, stride, shift, nr, ws_active_off, hint_off, "
         "depth_off) -> int: sbitmap_queue_clear() up to its wake-up; ws_active."),
    {"release", (PyCFunction)av_release, METH_NOARGS,
     "Release the buffer (idempotent); later operations raise ValueError."},
    {"__enter__", (PyCFunction)av_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)av_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef av_getset[] = {
    {"nbytes", (getter)av_get_nbytes, NULL, "Size of the buffer in bytes (0 once released).", NULL},
    {"released", (getter)av_get_released, NULL, "True once release() was called.", NULL},
    {"readonly", (getter)av_get_readonly, NULL,
     "True if bound read-only (AtomicView(buf, readonly=True)): loads only.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AtomicViewType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqrt.lib._atomic.AtomicView",
    .tp_basicsize = sizeof(AtomicView),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "AtomicView(buffer, *, readonly=False): atomic word operations at byte offsets\n"
              "of a writable buffer (with readonly=True, loads on a read-only one).\n\n"
              "Holds a buffer export until release(); a SharedMemory cannot close while\n"
              "a view on it is alive.  Calling __init__ again rebinds the view to a new\n"
              "buffer (TraceWriters bound before then refuse to write); if it fails, the\n"
              "view is unchanged.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)av_init,
    .tp_dealloc = (destructor)av_dealloc,
    .tp_methods = av_methods,
    .tp_getset = av_getset,
};

/* ---- the event trace's record writer ---------------------------------------------------- */

/* The record of mqrt/lib/trace.py (struct "<QHHHHiIq"); the layout is little-endian, so
 * this struct is it on the little-endian hosts mqrt runs on (checked at import). */
typedef struct {
    uint64_t t_ns;
    uint16_t cpu, ev, hctx, q;
    int32_t tag;
    uint32_t gen;
    int64_t arg;
} TraceRecord;

_Static_assert(sizeof(TraceRecord) == 32, "trace record must be 32 bytes");

/* ring and head point into the view's buffer as it was at binding (generation gen):
 * they are used only while view->gen == gen, i.e. until the view is released or
 * rebound.  An unbound writer (view NULL: __init__ never called) writes nothing. */
typedef struct {
    PyObject_HEAD
    AtomicView *view;    /* strong reference: the buffer is the view's */
    uint64_t gen;        /* view->gen when bound */
    char *ring;          /* slot 0 of this CPU's ring */
    uint64_t *head;      /* this CPU's head word */
    uint64_t mask;       /* entries - 1 */
    uint64_t n;          /* records written so far (the next record's number) */
    uint16_t cpu;
    int barrier;         /* publish with xchg (full barrier) instead of a release store */
} TraceWriter;

static const char *const tw_fields[] = {"ev", "tag", "gen", "hctx", "q", "arg"};
#define TW_NFIELDS 6

static int
tw_init(TraceWriter *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"view", "ring_off", "entries", "head_off", "cpu", "position",
                             "barrier", NULL};
    PyObject *view;
    Py_ssize_t ring_off, entries, head_off;
    int cpu, barrier = 0;
    unsigned long long position;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nnniK|p:TraceWriter", kwlist,
                                     &AtomicViewType, &view, &ring_off, &entries, &head_off,
                                     &cpu, &position, &barrier))
        return -1;
    /* Checked after parsing: parsing can run Python code (__index__). */
    AtomicView *av = (AtomicView *)view;
    if (av->base == NULL) {
        PyErr_SetString(PyExc_ValueError,
                        av->gen ? "TraceWriter on a released AtomicView"
                                : "TraceWriter on an uninitialised AtomicView");
        return -1;
    }
    if (av->readonly) {
        PyErr_SetString(PyExc_PermissionError, "TraceWriter on a read-only AtomicView");
        return -1;
    }
    if (entries < 2 || (entries & (entries - 1))) {
        PyErr_Format(PyExc_ValueError, "entries must be a power of two >= 2, got %zd", entries);
        return -1;
    }
    if (ring_off < 0 || (ring_off & 7) || entries > (av->len - ring_off) / 32) {
        PyErr_Format(PyExc_ValueError,
                     "a ring of %zd records at offset %zd does not fit, aligned, in %zd bytes",
                     entries, ring_off, av->len);
        return -1;
    }
    if (head_off < 0 || (head_off & 7) || head_off > av->len - 8) {
        PyErr_Format(PyExc_ValueError, "head offset %zd is not an aligned word in %zd bytes",
                     head_off, av->len);
        return -1;
    }
    if (cpu < 0 || cpu > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "cpu must be 0..65535, got %d", cpu);
        return -1;
    }
    /* Every field first, the view last: dropping the old view can run Python code. */
    self->gen = av->gen;
    self->ring = av->base + ring_off;
    self->head = (uint64_t *)(av->base + head_off);
    self->mask = (uint64_t)entries - 1;
    self->n = (uint64_t)position;
    self->cpu = (uint16_t)cpu;
    self->barrier = barrier;
    Py_XSETREF(self->view, (AtomicView *)Py_NewRef(view));
    return 0;
}

static void
tw_dealloc(TraceWriter *self)
{
    Py_CLEAR(self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Cold: why this writer cannot write. */
static PyObject *
tw_unbound_error(TraceWriter *self)
{
    if (self->view == NULL)
        PyErr_SetString(PyExc_ValueError, "TraceWriter is not bound (__init__ was not called)");
    else if (self->view->base == NULL)
        PyErr_SetString(PyExc_ValueError, "emit() on a released AtomicView");
    else
        PyErr_SetString(PyExc_ValueError,
                        "emit() after its AtomicView was re-initialised: bind a new TraceWriter");
    return NULL;
}

/*
 * emit(ev, tag=-1, gen=0, hctx=0, q=0, arg=0): append one record, then publish it.
 *
 * Fields are cut to their width like a C assignment.  A field that is not an integer
 * is written as 0; the record is still written and published, then TypeError names
 * the bad fields - a bad call never leaves a torn or unpublished record.
 */
static PyObject *
tw_emit(TraceWriter *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *given[TW_NFIELDS] = {NULL, NULL, NULL, NULL, NULL, NULL};
    uint64_t v[TW_NFIELDS] = {0, (uint64_t)-1, 0, 0, 0, 0};
    int bad[TW_NFIELDS] = {0};
    int nbad = 0;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    struct timespec ts;
    TraceRecord rec;

    if (nargs > TW_NFIELDS) {
        PyErr_Format(PyExc_TypeError, "emit() takes at most 6 arguments (%zd given)", nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        given[i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int i;
        for (i = 0; i < TW_NFIELDS; i++)
            if (PyUnicode_CompareWithASCIIString(name, tw_fields[i]) == 0)
                break;
        if (i == TW_NFIELDS || given[i] != NULL) {
            PyErr_Format(PyExc_TypeError, "emit() got %s keyword argument '%U'",
                         i == TW_NFIELDS ? "an unexpected" : "a repeated", name);
            return NULL;
        }
        given[i] = args[nargs + k];
    }
    if (given[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "emit() missing required argument 'ev'");
        return NULL;
    }
    for (int i = 0; i < TW_NFIELDS; i++) {
        if (given[i] == NULL)
            continue;
        v[i] = (uint64_t)PyLong_AsUnsignedLongLongMask(given[i]);
        if (v[i] == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError))
                return NULL;
            PyErr_Clear();
            v[i] = 0;
            bad[i] = 1;
            nbad++;
        }
    }
    /* After the conversions (they can run Python code), and nothing but C from here. */
    if (self->view == NULL || self->view->gen != self->gen)
        return tw_unbound_error(self);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    rec.t_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    rec.cpu = self->cpu;
    rec.ev = (uint16_t)v[0];
    rec.tag = (int32_t)(uint32_t)v[1];
    rec.gen = (uint32_t)v[2];
    rec.hctx = (uint16_t)v[3];
    rec.q = (uint16_t)v[4];
    rec.arg = (int64_t)v[5];
    memcpy(self->ring + ((self->n & self->mask) << 5), &rec, sizeof rec);
    self->n++;
    if (self->barrier) {
        __atomic_exchange_n(self->head, self->n, __ATOMIC_SEQ_CST);
        SMP_MB_AFTER_RMW();
    } else {
        __atomic_store_n(self->head, self->n, __ATOMIC_RELEASE);
    }
    if (nbad) {
        PyObject *names = PyUnicode_FromString("");
        for (int i = 0; names != NULL && i < TW_NFIELDS; i++)
            if (bad[i])
                Py_SETREF(names, PyUnicode_FromFormat("%U%s%s", names,
                                                      PyUnicode_GET_LENGTH(names) ? ", " : "",
                                                      tw_fields[i]));
        if (names != NULL) {
            PyErr_Format(PyExc_TypeError, "trace emit: %U must be integers", names);
            Py_DECREF(names);
        }
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tw_get_position(TraceWriter *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->n);
}

static PyMethodDef tw_methods[] = {
    {"emit", (PyCFunction)(void (*)(void))tw_emit, METH_FASTCALL | METH_KEYWORDS,
     "emit(ev, tag=-1, gen=0, hctx=0, q=0, arg=0): append one record and publish it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tw_getset[] = {
    {"position", (getter)tw_get_position, NULL,
     "Records written to this ring so far: the head this writer publishes.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TraceWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mqrt.lib._atomic.TraceWriter",
    .tp_basicsize = sizeof(TraceWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TraceWriter(view, ring_off, entries, head_off, cpu, position, barrier=False):\n"
              "the single writer of one CPU's trace ring (see mqrt/lib/trace.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tw_init,
    .tp_dealloc = (destructor)tw_dealloc,
    .tp_methods = tw_methods,
    .tp_getset = tw_getset,
};

/* ---- module functions ----------------------------------------------------------------- */

static PyObject *
mod_fence(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
mod_cpu_relax(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
#if defined(__x86_64__)
    __builtin_ia32_pause();
#else /* __aarch64__: the only other architecture this file builds for */
    __asm__ __volatile__("yield" ::: "memory");
#endif
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"fence", mod_fence, METH_NOARGS, "fence(): full memory barrier (smp_mb)."},
    {"cpu_relax", mod_cpu_relax, METH_NOARGS, "cpu_relax(): spin-wait hint (PAUSE / YIELD)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mqrt.lib._atomic",
    .m_doc = "Word-level atomics on shared memory: the user-space <linux/atomic.h> and "
             "<linux/bitops.h>.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    PyObject *m;

    if (PyType_Ready(&AtomicViewType) < 0 || PyType_Ready(&TraceWriterType) < 0)
        return NULL;
    m = PyModule_Create(&atomic_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "AtomicView", (PyObject *)&AtomicViewType) < 0
        || PyModule_AddObjectRef(m, "TraceWriter", (PyObject *)&TraceWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
