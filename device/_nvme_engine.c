/*
 * mqrt.device._nvme_engine - the NVMe controller's I/O command path, compiled.
 *
 * One Engine serves a fixed set of I/O queue pairs of the emulated controller: it is
 * one of the controller's device workers, run by a thread of the device process with
 * the GIL released (Engine.run()).  What a command goes through lives here:
 *
 *   read SQ tail doorbells -> copy SQEs out (arbitration: round robin or weighted
 *   round robin with an urgent class, burst) -> check the command (opcode, namespace,
 *   LBA range, a command id already in service) -> the service model (latency draw,
 *   channels, IOPS and bandwidth buckets) -> the fault draws -> a timer heap of
 *   commands in service -> CQEs posted with the phase tag (held back while the CQ is
 *   full) -> interrupts (coalescing THR/TIME per vector, the vector's pending bit, one
 *   byte on the vector's pipe) -> arm the per-queue event index and sleep.
 *
 * What is rare and worth reading stays in Python (mqrt/device/controller.py and
 * nvme_admin.py): the admin queue, identify, features, queue creation and deletion,
 * Abort, reset, the fault knobs' policy, counter publication.  Python calls the
 * methods below from another thread; they take the engine's mutex, which the worker
 * holds while it runs a pass and drops while it sleeps (and between passes when a
 * caller waits for it).
 *
 * Memory ordering against the host (CPU processes, other address spaces):
 *   SQ tail doorbell   load-acquire, then plain reads of the entries it covers
 *                      (pairs with the host's fully ordered doorbell store).
 *   CQE                the first 12 bytes plain, then the last dword (cid | status
 *                      with the phase tag) with a release store (pairs with the
 *                      host's load-acquire of that dword).
 *   CQ head doorbell   load-acquire (the host released it after reading entries).
 *   event index        store, then a full fence, then the tail doorbells are read
 *                      again; the host stores its tail with a full barrier and then
 *                      reads the event index: one side always sees the other.
 *   pending bit        xchg (full barrier); the host's handler clears it with xchg.
 *   CSTS.CFS           store-release when a fatal fault hits, load-acquire per pass.
 *
 * Service model: a xoshiro256** generator seeded through splitmix64 from the device
 * seed (a second stream for the fault draws, so enabling a fault does not shift the
 * latency sequence).  Distributions: fixed, uniform(0.5m, 1.5m), exponential(mean m),
 * lognormal with mean m and shape sigma (mu = ln m - sigma^2 / 2, normal deviates by
 * Box-Muller).  The channels and the IOPS/bandwidth buckets are shared by the engines
 * of one controller (Engine(..., group=first_engine)).
 *
 * sq_write_rw and cq_reap: the host side's mechanics of the same formats, for the nvme
 * driver in each CPU: writing a read/write SQE and reaping the CQEs whose phase tag
 * matches (the locks, doorbells and what a CQE means stay in device/nvme.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(__aarch64__)
#error "mqrt's NVMe engine supports x86-64 and aarch64 only"
#endif

/* ---- wire formats (mirrors nvme_defs.SQE_LAYOUT / CQE_LAYOUT, checked in Python) ---- */
#define SQE_SIZE 64
#define SQE_OPCODE 0
#define SQE_CID 2
#define SQE_NSID 4
#define SQE_CDW10 40
#define SQE_CDW11 44
#define SQE_CDW12 48
#define CQE_SIZE 16
#define CQE_LAST_DWORD 12

#define OP_FLUSH 0x00
#define OP_WRITE 0x01
#define OP_READ 0x02

#define SC_INVALID_OPCODE 0x001
#define SC_CMDID_CONFLICT 0x003
#define SC_INTERNAL 0x006
#define SC_ABORT_REQ 0x007
#define SC_ABORT_QUEUE 0x008
#define SC_INVALID_NS 0x00B
#define SC_LBA_RANGE 0x080
#define SC_WRITE_FAULT 0x280
#define SC_READ_ERROR 0x281
#define SC_DNR 0x4000

#define DIST_FIXED 0
#define DIST_UNIFORM 1
#define DIST_EXPONENTIAL 2
#define DIST_LOGNORMAL 3

#define CQ_FULL_POLL_NS 20000 /* a full CQ: look at its head doorbell again this soon */

/* ---- counters: one array per engine, written by its worker under the mutex ---- */
#define COUNTERS(X)                                                                    \
    X(commands)        /* I/O commands fetched */                                      \
    X(completions)     /* CQEs posted */                                               \
    X(interrupts)      /* vector pipe writes */                                        \
    X(coalesced)       /* CQEs that rode on another CQE's interrupt */                 \
    X(irq_merged)      /* interrupts not sent: the vector was still pending */         \
    X(kicks)           /* wake-ups by a doorbell kick */                               \
    X(doorbell_writes) /* host doorbell writes (kicks) that reached this worker */     \
    X(sleeps)          /* times the worker blocked with nothing to do */               \
    X(doorbell_reads)  /* SQ tail doorbell reads */                                    \
    X(cq_full_stalls)  /* times a CQE had to wait for room in its CQ */                \
    X(aborts)          /* commands completed with Abort Requested */                   \
    X(sq_delete_aborts) /* commands completed with Aborted due to SQ Deletion */       \
    X(cmdid_conflicts) /* commands refused: their id was already in service */         \
    X(internal_errors) /* commands failed for want of memory in the device */         \
    X(dropped)         /* completions dropped (fault) */                               \
    X(lost_irqs)       /* interrupts not delivered (fault) */                          \
    X(errors)          /* error statuses injected */                                   \
    X(fatal_errors)    /* fatal faults (CSTS.CFS set) */                               \
    X(stale_event_idx) /* event index left stale before a sleep (fault) */             \
    X(busy_ns)         /* wall time not blocked */                                     \
    X(cpu_ns)          /* CPU time of the worker thread (user and kernel) */

enum {
#define X(name) C_##name,
    COUNTERS(X)
#undef X
    NR_COUNTERS
};
static const char *counter_names[] = {
#define X(name) #name,
    COUNTERS(X)
#undef X
};

/* ---- state ---- */
typedef struct {
    uint64_t done;
    uint64_t seq;
    uint16_t sqid, cid, status;
    uint8_t drop, aborted;
} cmd_t;

typedef struct {
    uint32_t result;
    uint16_t sqid, cid, status;
} pend_t;

typedef struct {
    int live;
    uint16_t cqid;
    uint32_t depth, head;
    size_t base, tail_db, evt_idx, head_pub;
    int prio; /* 0 urgent, 1 high, 2 medium, 3 low */
    uint64_t *cid_map; /* command ids in service (65536 bits) */
    uint16_t *abort_pending; /* ids an Abort found still in the SQ */
    int n_abort, cap_abort;
} sq_t;

typedef struct {
    int live;
    uint32_t depth, tail, phase;
    size_t base, head_db, tail_pub, phase_pub;
    int iv, ien;
    pend_t *pend; /* a ring of CQEs waiting for room */
    size_t pend_head, pend_len, pend_cap;
    uint64_t irq_count, irq_first_ns;
    int stalled;
} cq_t;

/* Shared by the engines of one controller: channels and the rate buckets. */
typedef struct {
    pthread_mutex_t lock;
    int64_t inflight; /* commands in service (atomic) */
    double iops_tokens, bw_tokens, short_ns;
    uint64_t last_refill;
    int refs;
    /* An engine that sleeps with commands waiting in its SQs because every channel is
     * taken sets `starved` (atomic); whichever engine frees a channel then wakes the
     * group's other engines (their wake eventfds, under the lock). */
    int starved;
    int *wake_fds, n_wake;
} caps_t;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    char *buf;
    size_t len;
    pthread_mutex_t lock;
    int waiters; /* Python callers waiting for the lock (atomic) */
    int stop;    /* atomic */
    int running;
    int kick_fd, wake_fd;
    int nr_qids, nr_vectors;
    int *irq_fds;
    size_t *irq_pending; /* offset of each vector's pending word */
    uint8_t *vec_cd;     /* Interrupt Vector Configuration: coalescing disabled */
    size_t cfs_off;
    sq_t *sqs;
    cq_t *cqs;
    int *order; /* scratch: SQ qids in arbitration order */
    int nr_ns;
    uint64_t *ns_blocks;
    int *ns_shift;
    /* service model */
    int64_t latency_ns;
    int dist;
    double sigma, mu;
    int64_t channels, iops_max, dev_mbps;
    uint64_t rng[4], frng[4];
    int have_spare;
    double spare;
    /* faults (percent) */
    double error_pct, delay_pct, drop_pct, fatal_pct, lost_irq_pct, stale_evt_pct;
    int64_t delay_ns;
    int command_faults;
    int64_t timer_slack_ns; /* the worker thread's timer slack (-1: inherited) */
    /* features */
    int coalesce_thr;
    int64_t coalesce_time_ns;
    int64_t burst;
    int wrr;
    int64_t wrr_weight[3];
    int64_t class_credit[3]; /* what each weighted class may still start this round */
    unsigned class_rr[3];    /* round robin within each weighted class */
    /* in service */
    cmd_t *heap;
    size_t heap_n, heap_cap;
    uint64_t seq;
    int rr;
    int capped;
    caps_t *caps;
    uint64_t counters[NR_COUNTERS];
} Engine;

/* ---- small helpers ---- */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint32_t ld_acq32(Engine *e, size_t off) {
    return __atomic_load_n((uint32_t *)(e->buf + off), __ATOMIC_ACQUIRE);
}
static inline void st_rel32(Engine *e, size_t off, uint32_t v) {
    __atomic_store_n((uint32_t *)(e->buf + off), v, __ATOMIC_RELEASE);
}
static inline void st32(Engine *e, size_t off, uint32_t v) {
    __atomic_store_n((uint32_t *)(e->buf + off), v, __ATOMIC_RELAXED);
}
static inline uint32_t xchg32(Engine *e, size_t off, uint32_t v) {
    uint32_t old = __atomic_exchange_n((uint32_t *)(e->buf + off), v, __ATOMIC_SEQ_CST);
#if defined(__aarch64__)
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    return old;
}
static inline uint32_t rd32(Engine *e, size_t off) {
    uint32_t v;
    memcpy(&v, e->buf + off, 4);
    return v;
}
static inline uint16_t rd16(Engine *e, size_t off) {
    uint16_t v;
    memcpy(&v, e->buf + off, 2);
    return v;
}

/* splitmix64 seeds xoshiro256** */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static void rng_seed(uint64_t s[4], uint64_t seed) {
    for (int i = 0; i < 4; i++)
        s[i] = splitmix64(&seed);
}
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static inline uint64_t rng_next(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}
/* uniform in [0, 1) with 53 bits */
static inline double rng_unit(uint64_t s[4]) { return (rng_next(s) >> 11) * 0x1.0p-53; }
static inline int rng_pct(uint64_t s[4], double pct) { return pct > 0 && rng_unit(s) * 100.0 < pct; }

static double rng_normal(Engine *e) {
    if (e->have_spare) {
        e->have_spare = 0;
        return e->spare;
    }
    double u1 = 1.0 - rng_unit(e->rng), u2 = rng_unit(e->rng); /* u1 in (0, 1] */
    double r = sqrt(-2.0 * log(u1)), th = 2.0 * M_PI * u2;
    e->spare = r * sin(th);
    e->have_spare = 1;
    return r * cos(th);
}

static int64_t service_ns(Engine *e) {
    double m = (double)e->latency_ns;
    if (e->latency_ns <= 0)
        return 0;
    switch (e->dist) {
    case DIST_FIXED:
        return e->latency_ns;
    case DIST_UNIFORM:
        return (int64_t)(0.5 * m + rng_unit(e->rng) * m);
    case DIST_EXPONENTIAL:
        return (int64_t)(-log(1.0 - rng_unit(e->rng)) * m);
    default:
        return (int64_t)exp(e->mu + e->sigma * rng_normal(e));
    }
}

/* ---- the shared buckets (a millisecond's worth banked at most) ---- */
static void caps_refill(Engine *e, caps_t *c, uint64_t now) {
    if (now <= c->last_refill)
        return; /* another worker's pass, with a later clock, refilled them already */
    uint64_t dt = c->last_refill ? now - c->last_refill : 0;
    c->last_refill = now;
    if (e->iops_max) {
        double cap = e->iops_max / 1000.0;
        c->iops_tokens = fmin(cap, c->iops_tokens + (double)dt * e->iops_max / 1e9);
    }
    if (e->dev_mbps) {
        double cap_b = e->dev_mbps * 1000.0;
        c->bw_tokens = fmin(cap_b, c->bw_tokens + (double)dt * e->dev_mbps / 1000.0);
    }
}

/* Take one command of nbytes from the buckets (caps lock held), or refuse. */
static int caps_admit(Engine *e, caps_t *c, uint64_t nbytes) {
    if (e->iops_max && c->iops_tokens < 1.0) {
        c->short_ns = (1.0 - c->iops_tokens) * 1e9 / e->iops_max;
        return 0;
    }
    if (e->dev_mbps) {
        double need = fmin((double)nbytes, e->dev_mbps * 1000.0);
        if (c->bw_tokens < need) {
            c->short_ns = (need - c->bw_tokens) * 1000.0 / e->dev_mbps;
            return 0;
        }
        c->bw_tokens -= (double)nbytes;
    }
    if (e->iops_max)
        c->iops_tokens -= 1.0;
    return 1;
}

/* n channels come free: if an engine of the group sleeps waiting for one, wake the
 * group's other engines.  The fully ordered RMW on inflight, then the look at
 * `starved`, pairs with the sleeper's store of `starved`, then its look at inflight
 * (arm_and_recheck()): one side always sees the other. */
static void caps_release(Engine *e, int64_t n) {
    caps_t *c = e->caps;
    __atomic_sub_fetch(&c->inflight, n, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&c->starved, __ATOMIC_SEQ_CST) ||
        !__atomic_exchange_n(&c->starved, 0, __ATOMIC_SEQ_CST))
        return;
    uint64_t one = 1;
    pthread_mutex_lock(&c->lock);
    for (int i = 0; i < c->n_wake; i++)
        if (c->wake_fds[i] != e->wake_fd) {
            ssize_t r = write(c->wake_fds[i], &one, sizeof one);
            (void)r; /* EAGAIN: it has a wake-up pending already */
        }
    pthread_mutex_unlock(&c->lock);
}

/* ---- the timer heap of commands in service (by done time, then sequence) ---- */
static inline int cmd_before(const cmd_t *a, const cmd_t *b) {
    return a->done < b->done || (a->done == b->done && a->seq < b->seq);
}
static int heap_push(Engine *e, const cmd_t *c) {
    if (e->heap_n == e->heap_cap) {
        size_t cap = e->heap_cap ? e->heap_cap * 2 : 256;
        cmd_t *h = realloc(e->heap, cap * sizeof(cmd_t));
        if (!h)
            return -1;
        e->heap = h;
        e->heap_cap = cap;
    }
    size_t i = e->heap_n++;
    while (i) {
        size_t p = (i - 1) / 2;
        if (!cmd_before(c, &e->heap[p]))
            break;
        e->heap[i] = e->heap[p];
        i = p;
    }
    e->heap[i] = *c;
    return 0;
}
static cmd_t heap_pop(Engine *e) {
    cmd_t top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cmd_t *best = &last;
        if (l < n && cmd_before(&e->heap[l], best)) {
            m = l;
            best = &e->heap[l];
        }
        if (r < n && cmd_before(&e->heap[r], best))
            m = r;
        if (m == i)
            break;
        e->heap[i] = e->heap[m];
        i = m;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

/* ---- command ids in service, per SQ ---- */
static inline int cid_test(sq_t *sq, uint16_t cid) { return (sq->cid_map[cid >> 6] >> (cid & 63)) & 1; }
static inline void cid_set(sq_t *sq, uint16_t cid) { sq->cid_map[cid >> 6] |= 1ull << (cid & 63); }
static inline void cid_clear(sq_t *sq, uint16_t cid) { sq->cid_map[cid >> 6] &= ~(1ull << (cid & 63)); }

/* ---- completions ---- */
static int cq_queue(Engine *e, cq_t *cq, uint16_t sqid, uint16_t cid, uint16_t status, uint32_t result) {
    if (cq->pend_len == cq->pend_cap) {
        size_t cap = cq->pend_cap ? cq->pend_cap * 2 : 64;
        pend_t *p = malloc(cap * sizeof(pend_t));
        if (!p)
            return -1;
        for (size_t i = 0; i < cq->pend_len; i++)
            p[i] = cq->pend[(cq->pend_head + i) % cq->pend_cap];
        free(cq->pend);
        cq->pend = p;
        cq->pend_cap = cap;
        cq->pend_head = 0;
    }
    pend_t *slot = &cq->pend[(cq->pend_head + cq->pend_len) % cq->pend_cap];
    slot->result = result;
    slot->sqid = sqid;
    slot->cid = cid;
    slot->status = status;
    cq->pend_len++;
    return 0;
}

/* A CQE for the command cid of sq: into its CQ's pending ring. */
static void post(Engine *e, sq_t *sq, uint16_t sqid, uint16_t cid, uint16_t status) {
    cq_t *cq = &e->cqs[sq->cqid];
    if (cq->live)
        cq_queue(e, cq, sqid, cid, status, 0);
}

/* Write pending CQEs while the CQ has room; the phase dword goes last. */
static void drain_cq(Engine *e, int qid) {
    cq_t *cq = &e->cqs[qid];
    uint32_t head = ld_acq32(e, cq->head_db);
    uint32_t room = (head + cq->depth - cq->tail - 1) % cq->depth;
    size_t n = cq->pend_len < room ? cq->pend_len : room;
    if (n) {
        uint32_t tail = cq->tail, phase = cq->phase;
        for (size_t i = 0; i < n; i++) {
            pend_t *p = &cq->pend[cq->pend_head];
            cq->pend_head = (cq->pend_head + 1) % cq->pend_cap;
            char *ent = e->buf + cq->base + (size_t)tail * CQE_SIZE;
            sq_t *sq = p->sqid < e->nr_qids ? &e->sqs[p->sqid] : NULL;
            uint32_t dw[2] = {p->result, 0};
            uint16_t hw[2] = {(uint16_t)(sq && sq->live ? sq->head : 0), p->sqid};
            memcpy(ent, dw, 8);
            memcpy(ent + 8, hw, 4);
            uint32_t last = (uint32_t)p->cid | ((uint32_t)(((p->status & 0x7FFF) << 1) | phase) << 16);
            __atomic_store_n((uint32_t *)(ent + CQE_LAST_DWORD), last, __ATOMIC_RELEASE);
            if (++tail == cq->depth) {
                tail = 0;
                phase ^= 1;
            }
        }
        cq->pend_len -= n;
        cq->tail = tail;
        cq->phase = phase;
        e->counters[C_completions] += n;
        if (cq->irq_count == 0)
            cq->irq_first_ns = now_ns();
        cq->irq_count += n;
        st32(e, cq->tail_pub, tail);
        st32(e, cq->phase_pub, phase);
    }
    if (cq->pend_len) {
        if (!cq->stalled) {
            cq->stalled = 1;
            e->counters[C_cq_full_stalls]++;
        }
    } else {
        cq->stalled = 0;
    }
}

static void raise_irq(Engine *e, cq_t *cq) {
    e->counters[C_coalesced] += cq->irq_count - 1;
    cq->irq_count = 0;
    if (rng_pct(e->frng, e->lost_irq_pct)) {
        e->counters[C_lost_irqs]++;
        return;
    }
    /* A vector still pending (its handler has not acknowledged it) is not signalled
     * again: the handler finds these CQEs too. */
    if (xchg32(e, e->irq_pending[cq->iv], 1)) {
        e->counters[C_irq_merged]++;
        return;
    }
    e->counters[C_interrupts]++;
    char one = 1;
    ssize_t r = write(e->irq_fds[cq->iv], &one, 1);
    (void)r; /* EAGAIN: the pipe already holds bytes the handler has not read */
}

static inline int cq_coalesces(Engine *e, cq_t *cq) {
    return e->coalesce_thr && e->coalesce_time_ns && !e->vec_cd[cq->iv];
}

/* Raise the vectors whose condition holds; the earliest held-back deadline (0: none). */
static uint64_t interrupts(Engine *e, uint64_t now) {
    uint64_t due = 0;
    for (int q = 1; q < e->nr_qids; q++) {
        cq_t *cq = &e->cqs[q];
        if (!cq->live || !cq->irq_count || !cq->ien)
            continue;
        if (!cq_coalesces(e, cq) || cq->irq_count >= (uint64_t)e->coalesce_thr + 1 ||
            (int64_t)(now - cq->irq_first_ns) >= e->coalesce_time_ns) {
            raise_irq(e, cq);
        } else {
            uint64_t t = cq->irq_first_ns + (uint64_t)e->coalesce_time_ns;
            if (!due || t < due)
                due = t;
        }
    }
    return due;
}

/* ---- serving ---- */
static int complete_due(Engine *e, uint64_t now) {
    int n = 0;
    while (e->heap_n && e->heap[0].done <= now) {
        cmd_t c = heap_pop(e);
        caps_release(e, 1);
        n++;
        if (c.aborted)
            continue; /* completed already, by its Abort or its SQ's deletion */
        sq_t *sq = &e->sqs[c.sqid];
        if (!sq->live)
            continue;
        cid_clear(sq, c.cid);
        if (c.drop) {
            e->counters[C_dropped]++;
            continue;
        }
        post(e, sq, c.sqid, c.cid, c.status);
    }
    return n;
}

/* A command enters service: check it, draw its time and its faults.  *in_service says
 * whether it holds the channel its fetch reserved (it completed at once otherwise).
 * 0, or -1 on a fatal fault (the pass stops). */
static int start_cmd(Engine *e, sq_t *sq, int sqid, uint64_t now, uint8_t opcode, uint16_t cid,
                     uint32_t nsid, uint64_t slba, uint32_t nlb0, int *in_service) {
    *in_service = 0;
    e->counters[C_commands]++;
    uint16_t status = 0;
    if (opcode != OP_READ && opcode != OP_WRITE && opcode != OP_FLUSH)
        status = SC_INVALID_OPCODE;
    else if (nsid == 0 || nsid > (uint32_t)e->nr_ns) /* FFFFFFFFh (broadcast) too */
        status = SC_INVALID_NS;
    else if (opcode != OP_FLUSH &&
             (slba >= e->ns_blocks[nsid - 1] || nlb0 >= e->ns_blocks[nsid - 1] - slba))
        status = SC_LBA_RANGE;
    if (cid_test(sq, cid)) {
        /* the id of a command still in service: refuse this one, leave that one */
        e->counters[C_cmdid_conflicts]++;
        post(e, sq, (uint16_t)sqid, cid, SC_CMDID_CONFLICT);
        return 0;
    }
    int64_t service = e->latency_ns ? service_ns(e) : 0;
    int drop = 0, fatal = 0;
    if (e->command_faults) {
        if (rng_pct(e->frng, e->error_pct)) {
            status = SC_DNR | (opcode == OP_READ ? SC_READ_ERROR : SC_WRITE_FAULT);
            e->counters[C_errors]++;
        }
        if (rng_pct(e->frng, e->delay_pct))
            service += e->delay_ns;
        if (rng_pct(e->frng, e->drop_pct))
            drop = 1;
        if (rng_pct(e->frng, e->fatal_pct))
            fatal = 1;
    }
    if (!service && !drop) {
        post(e, sq, (uint16_t)sqid, cid, status);
    } else {
        cmd_t c = {now + (uint64_t)service, ++e->seq, (uint16_t)sqid, cid, status, (uint8_t)drop, 0};
        if (heap_push(e, &c) == 0) {
            cid_set(sq, cid);
            *in_service = 1;
        } else {
            e->counters[C_internal_errors]++; /* no memory for it: fail it, never lose it */
            post(e, sq, (uint16_t)sqid, cid, SC_INTERNAL);
        }
    }
    if (fatal) {
        e->counters[C_fatal_errors]++;
        st_rel32(e, e->cfs_off, 1);
        return -1;
    }
    return 0;
}

static inline uint32_t sq_new(Engine *e, sq_t *sq) {
    e->counters[C_doorbell_reads]++;
    uint32_t tail = ld_acq32(e, sq->tail_db);
    if (tail >= sq->depth)
        return 0; /* a doorbell beyond the queue: ignored (an invalid write) */
    return (tail + sq->depth - sq->head) % sq->depth;
}

static int abort_pending_take(sq_t *sq, uint16_t cid) {
    for (int i = 0; i < sq->n_abort; i++)
        if (sq->abort_pending[i] == cid) {
            sq->abort_pending[i] = sq->abort_pending[--sq->n_abort];
            return 1;
        }
    return 0;
}

/* Take up to `take` commands from one SQ; how many entries were consumed, or -1 on a
 * fatal fault.  e->capped says the buckets held one back. */
static int fetch_sq(Engine *e, int qid, uint32_t take, uint64_t now, int64_t *free_ch) {
    sq_t *sq = &e->sqs[qid];
    caps_t *caps = e->caps;
    int used = 0, gated = e->iops_max || e->dev_mbps;
    if (gated) {
        pthread_mutex_lock(&caps->lock);
        caps_refill(e, caps, now);
    }
    int ret = 0;
    int64_t unreserve = 0; /* channels reserved by commands that completed at once */
    for (uint32_t i = 0; i < take; i++) {
        const char *ent = e->buf + sq->base + (size_t)sq->head * SQE_SIZE;
        uint16_t cid = rd16(e, (size_t)(ent - e->buf) + SQE_CID);
        if (sq->n_abort && abort_pending_take(sq, cid)) {
            if (++sq->head == sq->depth)
                sq->head = 0;
            used++;
            e->counters[C_commands]++;
            e->counters[C_aborts]++;
            post(e, sq, (uint16_t)qid, cid, SC_ABORT_REQ);
            continue;
        }
        size_t off = (size_t)(ent - e->buf);
        uint8_t opcode = (uint8_t)e->buf[off + SQE_OPCODE];
        uint32_t nsid = rd32(e, off + SQE_NSID);
        uint32_t cdw12 = rd32(e, off + SQE_CDW12);
        uint64_t slba = rd32(e, off + SQE_CDW10) | (uint64_t)rd32(e, off + SQE_CDW11) << 32;
        int shift = nsid && nsid <= (uint32_t)e->nr_ns ? e->ns_shift[nsid - 1] : 9;
        uint64_t nbytes = ((uint64_t)(cdw12 & 0xFFFF) + 1) << shift;
        /* a channel of the controller's, reserved atomically: the workers share them */
        if (__atomic_add_fetch(&caps->inflight, 1, __ATOMIC_SEQ_CST) > e->channels) {
            __atomic_sub_fetch(&caps->inflight, 1, __ATOMIC_SEQ_CST);
            *free_ch = 0;
            break;
        }
        if (gated && !caps_admit(e, caps, nbytes)) {
            __atomic_sub_fetch(&caps->inflight, 1, __ATOMIC_SEQ_CST);
            e->capped = 1;
            break;
        }
        if (++sq->head == sq->depth)
            sq->head = 0;
        used++;
        (*free_ch)--;
        int in_service;
        int r = start_cmd(e, sq, qid, now, opcode, cid, nsid, slba, cdw12 & 0xFFFF, &in_service);
        unreserve += !in_service;
        if (r < 0) {
            ret = -1;
            break;
        }
    }
    if (gated)
        pthread_mutex_unlock(&caps->lock);
    if (unreserve)
        caps_release(e, unreserve); /* after the caps lock: it may take it to wake others */
    st32(e, sq->head_pub, sq->head);
    return ret < 0 ? -1 : used;
}

static int by_prio(Engine *e, int a, int b) {
    int pa = e->sqs[a].prio, pb = e->sqs[b].prio;
    return pa != pb ? pa - pb : a - b;
}

/* Weighted round robin with an urgent class (NVMe Base 2.0, 3.4.4.2).  The urgent
 * SQs come strictly first, round robin among them, a burst per turn: while one of
 * them still holds a command, no weighted SQ starts one (if the channels or the
 * buckets run out first, the pass ends there).  Then the high, medium and low
 * classes, in that order in each sweep, each spending the credit of its class's
 * weight; within a class its SQs take turns round robin, a burst per turn.  A new
 * round (every class's credit back to its weight) only once every class that holds
 * commands has spent its credit.  Commands started. */
static int wrr_pass(Engine *e, int nsq, uint64_t now, int64_t *free_ch, int *fatal) {
    /* insertion sort by priority class (urgent first), qid within a class */
    for (int i = 1; i < nsq; i++) {
        int v = e->order[i], j = i - 1;
        while (j >= 0 && by_prio(e, e->order[j], v) > 0) {
            e->order[j + 1] = e->order[j];
            j--;
        }
        e->order[j + 1] = v;
    }
    int nu = 0; /* the urgent SQs: order[0 .. nu) */
    while (nu < nsq && e->sqs[e->order[nu]].prio == 0)
        nu++;
    int started = 0, first = nu ? (int)((unsigned)e->rr++ % (unsigned)nu) : 0;
    for (;;) {
        int waiting = 0;
        for (int j = 0; j < nu; j++) {
            int q = e->order[(first + j) % nu];
            uint32_t n = sq_new(e, &e->sqs[q]);
            if (!n)
                continue;
            waiting = 1;
            if (*free_ch <= 0 || e->capped)
                return started; /* urgent commands wait: nothing for the others */
            int64_t take = n < (uint64_t)*free_ch ? n : *free_ch;
            if (take > e->burst)
                take = e->burst;
            int got = fetch_sq(e, q, (uint32_t)take, now, free_ch);
            if (got < 0) {
                *fatal = 1;
                return started;
            }
            started += got;
        }
        if (!waiting)
            break;
    }
    /* the weighted classes: order[lo[c] .. lo[c + 1]) holds class c + 1's SQs */
    int lo[4], i = nu;
    for (int c = 0; c < 3; c++) {
        lo[c] = i;
        while (i < nsq && e->sqs[e->order[i]].prio == c + 1)
            i++;
    }
    lo[3] = nsq;
    for (;;) {
        int fetched = 0, spent = 0; /* spent: classes with commands and no credit left */
        for (int c = 0; c < 3; c++) {
            int n_in = lo[c + 1] - lo[c];
            if (!n_in)
                continue;
            unsigned start = e->class_rr[c];
            for (int j = 0; j < n_in; j++) {
                int q = e->order[lo[c] + (int)((start + (unsigned)j) % (unsigned)n_in)];
                uint32_t n = sq_new(e, &e->sqs[q]);
                if (!n)
                    continue;
                if (e->class_credit[c] <= 0) {
                    spent = 1;
                    break;
                }
                if (*free_ch <= 0 || e->capped)
                    return started;
                int64_t take = n < (uint64_t)*free_ch ? n : *free_ch;
                if (take > e->burst)
                    take = e->burst;
                if (take > e->class_credit[c])
                    take = e->class_credit[c];
                int got = fetch_sq(e, q, (uint32_t)take, now, free_ch);
                if (got < 0) {
                    *fatal = 1;
                    return started;
                }
                e->class_credit[c] -= got;
                e->class_rr[c] = start + (unsigned)j + 1; /* the next SQ's turn is next */
                started += got;
                fetched += got;
            }
        }
        if (fetched)
            continue;
        if (!spent)
            return started; /* no weighted SQ holds a command */
        for (int c = 0; c < 3; c++) /* a new round */
            e->class_credit[c] = e->wrr_weight[c];
    }
}

/* Arbitrate over the SQs and start what channels and caps allow; commands started. */
static int io_pass(Engine *e, uint64_t now, int *fatal) {
    e->capped = 0;
    int nsq = 0;
    for (int q = 1; q < e->nr_qids; q++)
        if (e->sqs[q].live)
            e->order[nsq++] = q;
    if (!nsq)
        return 0;
    int64_t free_ch = e->channels - __atomic_load_n(&e->caps->inflight, __ATOMIC_RELAXED);
    if (free_ch <= 0)
        return 0;
    int started = 0;
    if (e->wrr)
        return wrr_pass(e, nsq, now, &free_ch, fatal);
    int k = e->rr++ % nsq;
    for (int j = 0; j < nsq && free_ch > 0 && !e->capped; j++) {
        int q = e->order[(k + j) % nsq];
        uint32_t n = sq_new(e, &e->sqs[q]);
        if (!n)
            continue;
        int64_t take = n < (uint64_t)free_ch ? n : free_ch;
        if (take > e->burst)
            take = e->burst;
        int got = fetch_sq(e, q, (uint32_t)take, now, &free_ch);
        if (got < 0) {
            *fatal = 1;
            return started;
        }
        started += got;
    }
    return started;
}

static inline int sq_has_new(Engine *e, sq_t *sq) {
    if (!sq->live)
        return 0;
    uint32_t tail = ld_acq32(e, sq->tail_db);
    return tail < sq->depth && tail != sq->head; /* as sq_new() reads it */
}

/* Before sleeping: ask for a kick at the next entry of every SQ (the event index),
 * then look at the doorbells once more.  True if something arrived meanwhile that
 * this worker can start now (or a channel came free for it). */
static int arm_and_recheck(Engine *e) {
    for (int q = 1; q < e->nr_qids; q++) {
        sq_t *sq = &e->sqs[q];
        if (!sq->live)
            continue;
        if (rng_pct(e->frng, e->stale_evt_pct)) {
            e->counters[C_stale_event_idx]++; /* the fault: the index stays where it was */
            continue;
        }
        st32(e, sq->evt_idx, sq->head);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (e->capped)
        return 0; /* the buckets' refill is a deadline of its own */
    int waiting = 0;
    for (int q = 1; q < e->nr_qids && !waiting; q++)
        waiting = sq_has_new(e, &e->sqs[q]);
    if (!waiting)
        return 0;
    caps_t *c = e->caps;
    if (__atomic_load_n(&c->inflight, __ATOMIC_SEQ_CST) < e->channels)
        return 1; /* new commands and a free channel: another pass */
    /* Every channel of the controller is taken and an SQ of ours holds commands.  The
     * channels may be held by another engine's commands, whose completions would not
     * wake this one (its own timer heap may be empty, and the host does not kick again
     * for commands already in the SQ): ask the group to wake it when a channel comes
     * free (caps_release), then look once more.  One engine alone holds every channel
     * itself: its next completion is its deadline. */
    if (__atomic_load_n(&c->n_wake, __ATOMIC_RELAXED) < 2)
        return 0;
    __atomic_store_n(&c->starved, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&c->inflight, __ATOMIC_SEQ_CST) < e->channels;
}

static void drain_fd(Engine *e, int fd, int count) {
    uint64_t v;
    if (read(fd, &v, sizeof v) == sizeof v && count) {
        e->counters[C_kicks]++;
        e->counters[C_doorbell_writes] += v;
    }
}

static void engine_loop(Engine *e) {
    if (e->timer_slack_ns >= 0)
        prctl(PR_SET_TIMERSLACK, (unsigned long)(e->timer_slack_ns ? e->timer_slack_ns : 1), 0, 0, 0);
    pthread_mutex_lock(&e->lock);
    uint64_t busy_from = now_ns(), cpu_start = thread_cpu_ns();
    while (!__atomic_load_n(&e->stop, __ATOMIC_ACQUIRE)) {
        if (__atomic_load_n(&e->waiters, __ATOMIC_ACQUIRE)) { /* let a Python caller in */
            pthread_mutex_unlock(&e->lock);
            while (__atomic_load_n(&e->waiters, __ATOMIC_ACQUIRE))
                sched_yield();
            pthread_mutex_lock(&e->lock);
            continue;
        }
        uint64_t now = now_ns();
        int failed = ld_acq32(e, e->cfs_off) != 0;
        int progressed = 0, fatal = 0;
        if (!failed) {
            progressed += complete_due(e, now);
            progressed += io_pass(e, now, &fatal);
            failed = fatal;
            if (!failed)
                for (int q = 1; q < e->nr_qids; q++)
                    if (e->cqs[q].live && e->cqs[q].pend_len)
                        drain_cq(e, q);
        }
        uint64_t irq_due = failed ? 0 : interrupts(e, now_ns());
        if (progressed)
            continue;
        uint64_t deadline = irq_due ? irq_due : UINT64_MAX;
        if (!failed) {
            if (e->heap_n && e->heap[0].done < deadline)
                deadline = e->heap[0].done;
            for (int q = 1; q < e->nr_qids; q++)
                if (e->cqs[q].live && e->cqs[q].pend_len && now + CQ_FULL_POLL_NS < deadline)
                    deadline = now + CQ_FULL_POLL_NS;
            if (e->capped) {
                uint64_t w = e->caps->short_ns > 1000 ? (uint64_t)e->caps->short_ns : 1000;
                if (now + w < deadline)
                    deadline = now + w;
            }
            if (arm_and_recheck(e))
                continue;
        }
        e->counters[C_sleeps]++;
        uint64_t t = now_ns();
        e->counters[C_busy_ns] += t - busy_from;
        struct timespec ts, *tsp = NULL;
        if (deadline != UINT64_MAX) {
            uint64_t d = deadline > t ? deadline - t : 0;
            ts.tv_sec = (time_t)(d / 1000000000ull);
            ts.tv_nsec = (long)(d % 1000000000ull);
            tsp = &ts;
        }
        struct pollfd fds[2] = {{e->kick_fd, POLLIN, 0}, {e->wake_fd, POLLIN, 0}};
        pthread_mutex_unlock(&e->lock);
        int r = ppoll(fds, 2, tsp, NULL);
        pthread_mutex_lock(&e->lock);
        busy_from = now_ns();
        /* all of the thread's CPU time, the kernel's sleeping and waking included */
        e->counters[C_cpu_ns] = thread_cpu_ns() - cpu_start;
        if (r > 0) {
            if (fds[0].revents & POLLIN)
                drain_fd(e, e->kick_fd, 1);
            if (fds[1].revents & POLLIN)
                drain_fd(e, e->wake_fd, 0);
        }
    }
    e->counters[C_busy_ns] += now_ns() - busy_from;
    e->counters[C_cpu_ns] = thread_cpu_ns() - cpu_start;
    pthread_mutex_unlock(&e->lock);
}

/* ---- Python glue ---- */
#define ENGINE_LOCK(e)                                                                 \
    do {                                                                               \
        __atomic_add_fetch(&(e)->waiters, 1, __ATOMIC_ACQ_REL);                        \
        Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&(e)->lock);                         \
        Py_END_ALLOW_THREADS __atomic_sub_fetch(&(e)->waiters, 1, __ATOMIC_ACQ_REL);   \
    } while (0)
#define ENGINE_UNLOCK(e) pthread_mutex_unlock(&(e)->lock)

static void engine_wake(Engine *e) {
    if (!e->have_view || e->wake_fd <= 0)
        return; /* not initialised: no worker to wake */
    uint64_t one = 1;
    ssize_t r = write(e->wake_fd, &one, sizeof one);
    (void)r;
}

static int check_off(Engine *e, Py_ssize_t off, Py_ssize_t size, const char *what) {
    if (off < 0 || (size_t)(off + size) > e->len || (off & 3)) {
        PyErr_Format(PyExc_ValueError, "%s: offset %zd outside the buffer or misaligned", what, off);
        return -1;
    }
    return 0;
}

static int check_qid(Engine *e, int qid) {
    if (qid < 1 || qid >= e->nr_qids) {
        PyErr_Format(PyExc_ValueError, "qid %d: expected 1..%d", qid, e->nr_qids - 1);
        return -1;
    }
    return 0;
}

static void free_sq(sq_t *sq) {
    free(sq->cid_map);
    free(sq->abort_pending);
    memset(sq, 0, sizeof *sq);
}
static void free_cq(cq_t *cq) {
    free(cq->pend);
    memset(cq, 0, sizeof *cq);
}

static void Engine_dealloc(Engine *e) {
    if (e->sqs)
        for (int q = 0; q < e->nr_qids; q++)
            free_sq(&e->sqs[q]);
    if (e->cqs)
        for (int q = 0; q < e->nr_qids; q++)
            free_cq(&e->cqs[q]);
    free(e->sqs);
    free(e->cqs);
    free(e->order);
    free(e->irq_fds);
    free(e->irq_pending);
    free(e->vec_cd);
    free(e->ns_blocks);
    free(e->ns_shift);
    free(e->heap);
    if (e->caps) {
        caps_t *c = e->caps;
        pthread_mutex_lock(&c->lock);
        for (int i = 0; i < c->n_wake; i++)
            if (c->wake_fds[i] == e->wake_fd) {
                c->wake_fds[i] = c->wake_fds[c->n_wake - 1];
                __atomic_store_n(&c->n_wake, c->n_wake - 1, __ATOMIC_RELAXED);
                break;
            }
        pthread_mutex_unlock(&c->lock);
        if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_destroy(&c->lock);
            free(c->wake_fds);
            free(c);
        }
    }
    if (e->wake_fd > 0)
        close(e->wake_fd);
    if (e->have_view)
        PyBuffer_Release(&e->view);
    pthread_mutex_destroy(&e->lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyTypeObject EngineType;

static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buf", "kick_fd", "irq_fds", "irq_pending", "cfs_off", "nr_qids",
                             "namespaces", "latency_ns", "latency_dist", "latency_sigma",
                             "channels", "iops_max", "dev_mbps", "seed", "group", "error_pct",
                             "delay_pct", "delay_ns", "drop_pct", "fatal_pct", "lost_irq_pct",
                             "stale_event_idx_pct", "timer_slack_ns", NULL};
    PyObject *irq_fds, *irq_pending, *namespaces, *group = Py_None;
    int kick_fd, nr_qids, dist;
    Py_ssize_t cfs_off;
    long long latency_ns, channels, iops_max, dev_mbps, delay_ns = 0;
    unsigned long long seed;
    double sigma, error_pct = 0, delay_pct = 0, drop_pct = 0, fatal_pct = 0, lost_pct = 0, stale_pct = 0;
    long long slack = -1;
    if (e->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "w*iOOniOLidLLLK|$OddLddddL", kwlist, &e->view,
                                     &kick_fd, &irq_fds, &irq_pending, &cfs_off, &nr_qids,
                                     &namespaces, &latency_ns, &dist, &sigma, &channels, &iops_max,
                                     &dev_mbps, &seed, &group, &error_pct, &delay_pct, &delay_ns,
                                     &drop_pct, &fatal_pct, &lost_pct, &stale_pct, &slack))
        return -1;
    e->have_view = 1;
    e->buf = e->view.buf;
    e->len = (size_t)e->view.len;
    pthread_mutex_init(&e->lock, NULL);
    e->kick_fd = kick_fd;
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->wake_fd < 0) {
        e->wake_fd = 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (nr_qids < 2 || nr_qids > 65536 || dist < 0 || dist > 3 || channels < 1) {
        PyErr_SetString(PyExc_ValueError, "nr_qids, latency_dist or channels out of range");
        return -1;
    }
    if (check_off(e, cfs_off, 4, "cfs_off"))
        return -1;
    e->cfs_off = (size_t)cfs_off;
    e->nr_qids = nr_qids;
    PyObject *fds = PySequence_Fast(irq_fds, "irq_fds: a sequence of file descriptors");
    if (!fds)
        return -1;
    PyObject *pend = PySequence_Fast(irq_pending, "irq_pending: a sequence of offsets");
    if (!pend) {
        Py_DECREF(fds);
        return -1;
    }
    Py_ssize_t nv = PySequence_Fast_GET_SIZE(fds);
    if (nv != PySequence_Fast_GET_SIZE(pend) || nv < 1) {
        PyErr_SetString(PyExc_ValueError, "irq_fds and irq_pending: one entry per vector");
        Py_DECREF(fds);
        Py_DECREF(pend);
        return -1;
    }
    e->nr_vectors = (int)nv;
    e->irq_fds = calloc(nv, sizeof(int));
    e->irq_pending = calloc(nv, sizeof(size_t));
    e->vec_cd = calloc(nv, 1);
    for (Py_ssize_t i = 0; i < nv && !PyErr_Occurred(); i++) {
        e->irq_fds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fds, i));
        Py_ssize_t off = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(pend, i));
        if (!PyErr_Occurred() && check_off(e, off, 4, "irq_pending") == 0)
            e->irq_pending[i] = (size_t)off;
    }
    Py_DECREF(fds);
    Py_DECREF(pend);
    if (PyErr_Occurred())
        return -1;
    PyObject *ns = PySequence_Fast(namespaces, "namespaces: a sequence of (nr_blocks, lba_shift)");
    if (!ns)
        return -1;
    e->nr_ns = (int)PySequence_Fast_GET_SIZE(ns);
    e->ns_blocks = calloc(e->nr_ns + 1, sizeof(uint64_t));
    e->ns_shift = calloc(e->nr_ns + 1, sizeof(int));
    for (int i = 0; i < e->nr_ns; i++) {
        unsigned long long blocks;
        int shift;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ns, i), "Ki", &blocks, &shift)) {
            Py_DECREF(ns);
            return -1;
        }
        e->ns_blocks[i] = blocks;
        e->ns_shift[i] = shift;
    }
    Py_DECREF(ns);
    e->sqs = calloc(nr_qids, sizeof(sq_t));
    e->cqs = calloc(nr_qids, sizeof(cq_t));
    e->order = calloc(nr_qids, sizeof(int));
    if (!e->sqs || !e->cqs || !e->order || !e->irq_fds || !e->irq_pending || !e->vec_cd) {
        PyErr_NoMemory();
        return -1;
    }
    e->latency_ns = latency_ns;
    e->dist = dist;
    e->sigma = sigma;
    double mean = latency_ns > 1 ? (double)latency_ns : 1.0;
    e->mu = log(mean) - sigma * sigma / 2;
    e->channels = channels;
    e->iops_max = iops_max;
    e->dev_mbps = dev_mbps;
    rng_seed(e->rng, seed);
    rng_seed(e->frng, seed * 7919 + 1);
    e->error_pct = error_pct;
    e->delay_pct = delay_pct;
    e->delay_ns = delay_ns;
    e->drop_pct = drop_pct;
    e->fatal_pct = fatal_pct;
    e->lost_irq_pct = lost_pct;
    e->stale_evt_pct = stale_pct;
    e->timer_slack_ns = slack;
    e->command_faults = error_pct > 0 || delay_pct > 0 || drop_pct > 0 || fatal_pct > 0;
    e->burst = 1;
    e->wrr_weight[0] = 8;
    e->wrr_weight[1] = 4;
    e->wrr_weight[2] = 1;
    if (group != Py_None) {
        if (!PyObject_TypeCheck(group, &EngineType) || !((Engine *)group)->caps) {
            PyErr_SetString(PyExc_TypeError, "group: an initialised Engine");
            return -1;
        }
        e->caps = ((Engine *)group)->caps;
        __atomic_add_fetch(&e->caps->refs, 1, __ATOMIC_ACQ_REL);
    } else {
        e->caps = calloc(1, sizeof(caps_t));
        if (!e->caps) {
            PyErr_NoMemory();
            return -1;
        }
        pthread_mutex_init(&e->caps->lock, NULL);
        e->caps->refs = 1;
        e->caps->iops_tokens = iops_max / 1000 > 1 ? (double)(iops_max / 1000) : 1.0;
        e->caps->bw_tokens = dev_mbps * 1000.0;
    }
    caps_t *c = e->caps; /* join the group's wake-ups (arm_and_recheck) */
    pthread_mutex_lock(&c->lock);
    int *wfds = realloc(c->wake_fds, (c->n_wake + 1) * sizeof(int));
    if (wfds) {
        c->wake_fds = wfds;
        c->wake_fds[c->n_wake] = e->wake_fd;
        __atomic_store_n(&c->n_wake, c->n_wake + 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&c->lock);
    if (!wfds) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *Engine_run(Engine *e, PyObject *noargs) {
    if (!e->have_view || e->running) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.run: not initialised, or already running");
        return NULL;
    }
    e->running = 1; /* a stop() that came first stays: run() returns at once */
    Py_BEGIN_ALLOW_THREADS engine_loop(e);
    Py_END_ALLOW_THREADS e->running = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *e, PyObject *noargs) {
    __atomic_store_n(&e->stop, 1, __ATOMIC_RELEASE);
    engine_wake(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_wake(Engine *e, PyObject *noargs) {
    engine_wake(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_features(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"coalesce_thr", "coalesce_time_ns", "burst", "wrr", "weights", NULL};
    int thr, wrr;
    long long time_ns, burst, w0, w1, w2;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iLLp(LLL)", kwlist, &thr, &time_ns, &burst, &wrr,
                                     &w0, &w1, &w2))
        return NULL;
    ENGINE_LOCK(e);
    e->coalesce_thr = thr;
    e->coalesce_time_ns = time_ns;
    e->burst = burst < 1 ? 1 : burst;
    e->wrr = wrr;
    e->wrr_weight[0] = w0;
    e->wrr_weight[1] = w1;
    e->wrr_weight[2] = w2;
    ENGINE_UNLOCK(e);
    engine_wake(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_set_vector(Engine *e, PyObject *args) {
    int iv, cd;
    if (!PyArg_ParseTuple(args, "ip", &iv, &cd))
        return NULL;
    if (iv < 0 || iv >= e->nr_vectors) {
        PyErr_Format(PyExc_ValueError, "vector %d: expected 0..%d", iv, e->nr_vectors - 1);
        return NULL;
    }
    ENGINE_LOCK(e);
    e->vec_cd[iv] = (uint8_t)cd;
    ENGINE_UNLOCK(e);
    engine_wake(e); /* CQEs held back for coalescing may go now */
    Py_RETURN_NONE;
}

static PyObject *Engine_create_cq(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"qid", "depth", "base", "head_db", "tail_pub", "phase_pub", "iv", "ien", NULL};
    int qid, depth, iv, ien;
    Py_ssize_t base, head_db, tail_pub, phase_pub;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iinnnnip", kwlist, &qid, &depth, &base, &head_db,
                                     &tail_pub, &phase_pub, &iv, &ien))
        return NULL;
    if (check_qid(e, qid) || check_off(e, base, (Py_ssize_t)depth * CQE_SIZE, "cq base") ||
        check_off(e, head_db, 4, "head_db") || check_off(e, tail_pub, 4, "tail_pub") ||
        check_off(e, phase_pub, 4, "phase_pub"))
        return NULL;
    if (iv < 0 || iv >= e->nr_vectors || depth < 2) {
        PyErr_SetString(PyExc_ValueError, "create_cq: vector or depth out of range");
        return NULL;
    }
    ENGINE_LOCK(e);
    cq_t *cq = &e->cqs[qid];
    free_cq(cq);
    cq->live = 1;
    cq->depth = (uint32_t)depth;
    cq->base = (size_t)base;
    cq->head_db = (size_t)head_db;
    cq->tail_pub = (size_t)tail_pub;
    cq->phase_pub = (size_t)phase_pub;
    cq->iv = iv;
    cq->ien = ien;
    cq->phase = 1;
    ENGINE_UNLOCK(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_create_sq(Engine *e, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"qid", "cqid", "depth", "base", "tail_db", "event_idx", "head_pub", "prio", NULL};
    int qid, cqid, depth, prio;
    Py_ssize_t base, tail_db, evt, head_pub;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiinnnni", kwlist, &qid, &cqid, &depth, &base,
                                     &tail_db, &evt, &head_pub, &prio))
        return NULL;
    if (check_qid(e, qid) || check_qid(e, cqid) ||
        check_off(e, base, (Py_ssize_t)depth * SQE_SIZE, "sq base") ||
        check_off(e, tail_db, 4, "tail_db") || check_off(e, evt, 4, "event_idx") ||
        check_off(e, head_pub, 4, "head_pub"))
        return NULL;
    if (depth < 2 || prio < 0 || prio > 3) {
        PyErr_SetString(PyExc_ValueError, "create_sq: depth or priority out of range");
        return NULL;
    }
    uint64_t *map = calloc(65536 / 64, sizeof(uint64_t));
    if (!map)
        return PyErr_NoMemory();
    ENGINE_LOCK(e);
    if (!e->cqs[cqid].live) {
        ENGINE_UNLOCK(e);
        free(map);
        PyErr_Format(PyExc_ValueError, "create_sq: CQ %d is not served by this engine", cqid);
        return NULL;
    }
    sq_t *sq = &e->sqs[qid];
    free_sq(sq);
    sq->live = 1;
    sq->cqid = (uint16_t)cqid;
    sq->depth = (uint32_t)depth;
    sq->base = (size_t)base;
    sq->tail_db = (size_t)tail_db;
    sq->evt_idx = (size_t)evt;
    sq->head_pub = (size_t)head_pub;
    sq->prio = prio;
    sq->cid_map = map;
    st32(e, sq->evt_idx, 0); /* kick me at the first entry */
    ENGINE_UNLOCK(e);
    engine_wake(e);
    Py_RETURN_NONE;
}

/* Delete I/O SQ: its commands in service, and those still in it, complete with
 * Command Aborted due to SQ Deletion; how many. */
static PyObject *Engine_delete_sq(Engine *e, PyObject *args) {
    int qid;
    if (!PyArg_ParseTuple(args, "i", &qid) || check_qid(e, qid))
        return NULL;
    ENGINE_LOCK(e);
    sq_t *sq = &e->sqs[qid];
    long n = 0;
    if (sq->live) {
        for (size_t i = 0; i < e->heap_n; i++) {
            cmd_t *c = &e->heap[i];
            if (c->sqid != qid || c->aborted)
                continue;
            c->aborted = 1;
            if (!c->drop) {
                post(e, sq, (uint16_t)qid, c->cid, SC_ABORT_QUEUE);
                n++;
            }
        }
        uint32_t tail = ld_acq32(e, sq->tail_db);
        if (tail < sq->depth)
            for (uint32_t i = sq->head; i != tail; i = (i + 1) % sq->depth) {
                post(e, sq, (uint16_t)qid, rd16(e, sq->base + (size_t)i * SQE_SIZE + SQE_CID),
                     SC_ABORT_QUEUE);
                n++;
            }
        e->counters[C_sq_delete_aborts] += n;
        /* "After all commands submitted to the indicated I/O Submission Queue are
         * either completed or aborted, a completion queue entry is posted to the
         * Admin Completion Queue": their CQEs go to the CQ now (room permitting),
         * before the caller completes the Delete, not at the worker's next pass. */
        if (e->cqs[sq->cqid].live && e->cqs[sq->cqid].pend_len)
            drain_cq(e, sq->cqid);
        free_sq(sq);
    }
    ENGINE_UNLOCK(e);
    engine_wake(e);
    return PyLong_FromLong(n);
}

static PyObject *Engine_delete_cq(Engine *e, PyObject *args) {
    int qid;
    if (!PyArg_ParseTuple(args, "i", &qid) || check_qid(e, qid))
        return NULL;
    ENGINE_LOCK(e);
    free_cq(&e->cqs[qid]);
    ENGINE_UNLOCK(e);
    Py_RETURN_NONE;
}

/* Abort (08h) of command cid of SQ sqid: 0 completed now (it was in service), 1 it
 * will be when fetched (still in its SQ), 2 not aborted (dropped by a fault, or not
 * here). */
static PyObject *Engine_abort(Engine *e, PyObject *args) {
    int sqid, cid;
    if (!PyArg_ParseTuple(args, "ii", &sqid, &cid) || check_qid(e, sqid))
        return NULL;
    int ret = 2;
    ENGINE_LOCK(e);
    sq_t *sq = &e->sqs[sqid];
    if (sq->live) {
        for (size_t i = 0; i < e->heap_n; i++) {
            cmd_t *c = &e->heap[i];
            if (c->sqid != sqid || c->cid != (uint16_t)cid || c->aborted)
                continue;
            if (c->drop) {
                ret = 2;
                goto out;
            }
            c->aborted = 1;
            cid_clear(sq, (uint16_t)cid);
            e->counters[C_aborts]++;
            post(e, sq, (uint16_t)sqid, (uint16_t)cid, SC_ABORT_REQ);
            /* post it and raise its vector now, in the caller's thread: the host's
             * next timeout of this command must find it completed, however late
             * the worker gets a core */
            if (e->cqs[sq->cqid].live) {
                drain_cq(e, sq->cqid);
                interrupts(e, now_ns());
            }
            ret = 0;
            goto out;
        }
        uint32_t tail = ld_acq32(e, sq->tail_db);
        if (tail < sq->depth)
            for (uint32_t i = sq->head; i != tail; i = (i + 1) % sq->depth)
                if (rd16(e, sq->base + (size_t)i * SQE_SIZE + SQE_CID) == (uint16_t)cid) {
                    if (sq->n_abort == sq->cap_abort) {
                        int cap = sq->cap_abort ? sq->cap_abort * 2 : 8;
                        uint16_t *p = realloc(sq->abort_pending, cap * sizeof(uint16_t));
                        if (!p)
                            break;
                        sq->abort_pending = p;
                        sq->cap_abort = cap;
                    }
                    sq->abort_pending[sq->n_abort++] = (uint16_t)cid;
                    ret = 1;
                    break;
                }
    }
out:
    ENGINE_UNLOCK(e);
    engine_wake(e);
    return PyLong_FromLong(ret);
}

/* CC.EN 1 -> 0: every queue and every command in service is dropped. */
static PyObject *Engine_reset(Engine *e, PyObject *noargs) {
    ENGINE_LOCK(e);
    if (e->heap_n)
        caps_release(e, (int64_t)e->heap_n);
    e->heap_n = 0;
    for (int q = 0; q < e->nr_qids; q++) {
        free_sq(&e->sqs[q]);
        free_cq(&e->cqs[q]);
    }
    memset(e->vec_cd, 0, e->nr_vectors);
    ENGINE_UNLOCK(e);
    engine_wake(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_counters(Engine *e, PyObject *noargs) {
    uint64_t snap[NR_COUNTERS];
    ENGINE_LOCK(e);
    memcpy(snap, e->counters, sizeof snap);
    int64_t inflight = (int64_t)e->heap_n;
    ENGINE_UNLOCK(e);
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < NR_COUNTERS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(snap[i]);
        if (!v || PyDict_SetItemString(d, counter_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *v = PyLong_FromLongLong(inflight);
    if (!v || PyDict_SetItemString(d, "in_service", v) < 0) {
        Py_XDECREF(v);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(v);
    return d;
}

/* n service times from a fresh generator seeded like the engine's (for tests). */
static PyObject *service_samples(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"latency_ns", "latency_dist", "latency_sigma", "seed", "n", NULL};
    long long latency_ns;
    int dist;
    double sigma;
    unsigned long long seed;
    Py_ssize_t n;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LidKn", kwlist, &latency_ns, &dist, &sigma, &seed, &n))
        return NULL;
    if (n < 0 || dist < 0 || dist > 3) {
        PyErr_SetString(PyExc_ValueError, "n or latency_dist out of range");
        return NULL;
    }
    Engine tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.latency_ns = latency_ns;
    tmp.dist = dist;
    tmp.sigma = sigma;
    tmp.mu = log(latency_ns > 1 ? (double)latency_ns : 1.0) - sigma * sigma / 2;
    rng_seed(tmp.rng, seed);
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(service_ns(&tmp));
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *layout(PyObject *mod, PyObject *noargs) {
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "sqe_size", SQE_SIZE, "opcode",
                         SQE_OPCODE, "cid", SQE_CID, "nsid", SQE_NSID, "cdw10", SQE_CDW10, "cdw11",
                         SQE_CDW11, "cdw12", SQE_CDW12, "cqe_size", CQE_SIZE, "cqe_last_dword",
                         CQE_LAST_DWORD);
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS, "Serve the queues until stop() (releases the GIL)."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Make run() return."},
    {"wake", (PyCFunction)Engine_wake, METH_NOARGS, "Wake the worker to look again."},
    {"set_features", (PyCFunction)(void (*)(void))Engine_set_features, METH_VARARGS | METH_KEYWORDS,
     "Interrupt coalescing and arbitration."},
    {"set_vector", (PyCFunction)Engine_set_vector, METH_VARARGS,
     "Interrupt Vector Configuration: set_vector(iv, coalescing_disabled)."},
    {"create_cq", (PyCFunction)(void (*)(void))Engine_create_cq, METH_VARARGS | METH_KEYWORDS,
     "Serve an I/O completion queue."},
    {"create_sq", (PyCFunction)(void (*)(void))Engine_create_sq, METH_VARARGS | METH_KEYWORDS,
     "Serve an I/O submission queue (its CQ first)."},
    {"delete_sq", (PyCFunction)Engine_delete_sq, METH_VARARGS,
     "Stop serving an SQ; its commands complete with Aborted due to SQ Deletion."},
    {"delete_cq", (PyCFunction)Engine_delete_cq, METH_VARARGS, "Stop serving a CQ."},
    {"abort", (PyCFunction)Engine_abort, METH_VARARGS, "Abort a command: 0 done, 1 when fetched, 2 not."},
    {"reset", (PyCFunction)Engine_reset, METH_NOARGS, "Drop every queue and command (CC.EN 1 -> 0)."},
    {"counters", (PyCFunction)Engine_counters, METH_NOARGS, "A snapshot of the counters."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mqrt.device._nvme_engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One device worker: the I/O command path of a set of NVMe queue pairs.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* ---- the host side's wire mechanics (the buffer is borrowed for the call only) ---- */
static int host_buf(PyObject *obj, Py_buffer *view, long long off, long long size) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (off < 0 || off + size > (long long)view->len || (off & 3)) {
        PyErr_Format(PyExc_IndexError, "offset %lld outside the buffer or misaligned", off);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* sq_write_rw(buf, off, opcode, cid, nsid, slba, nlb0): a read/write SQE at off. */
static PyObject *sq_write_rw(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "sq_write_rw(buf, off, opcode, cid, nsid, slba, nlb0)");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[1]);
    long opcode = PyLong_AsLong(args[2]), cid = PyLong_AsLong(args[3]);
    unsigned long long nsid = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long slba = PyLong_AsUnsignedLongLong(args[5]);
    long nlb0 = PyLong_AsLong(args[6]);
    Py_buffer view;
    if (PyErr_Occurred() || host_buf(args[0], &view, off, SQE_SIZE))
        return NULL;
    char *e = (char *)view.buf + off;
    memset(e, 0, SQE_SIZE);
    e[SQE_OPCODE] = (char)opcode;
    uint16_t c = (uint16_t)cid;
    uint32_t n = (uint32_t)nsid, lo = (uint32_t)slba, hi = (uint32_t)(slba >> 32);
    uint32_t l = (uint32_t)(nlb0 & 0xFFFF);
    memcpy(e + SQE_CID, &c, 2);
    memcpy(e + SQE_NSID, &n, 4);
    memcpy(e + SQE_CDW10, &lo, 4);
    memcpy(e + SQE_CDW11, &hi, 4);
    memcpy(e + SQE_CDW12, &l, 4);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* cq_reap(buf, base, head, phase, depth, budget): the CQEs from `head` whose phase tag
 * is `phase` (each one's last dword load-acquired before the rest is read), at most
 * `budget`: ([(cid, status, result, sq_head, sq_id), ...], head, phase) after them. */
static PyObject *cq_reap(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "cq_reap(buf, base, head, phase, depth, budget)");
        return NULL;
    }
    long long base = PyLong_AsLongLong(args[1]);
    long head = PyLong_AsLong(args[2]), phase = PyLong_AsLong(args[3]);
    long depth = PyLong_AsLong(args[4]);
    long long budget = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    if (depth < 1 || head < 0 || head >= depth) /* a queue not created (yet) */
        return Py_BuildValue("(Nll)", out, head, phase);
    Py_buffer view;
    if (host_buf(args[0], &view, base, (long long)depth * CQE_SIZE)) {
        Py_DECREF(out);
        return NULL;
    }
    const char *ring = (const char *)view.buf + base;
    for (long long i = 0; i < budget; i++) {
        const char *ent = ring + (size_t)head * CQE_SIZE;
        uint32_t last = __atomic_load_n((const uint32_t *)(ent + CQE_LAST_DWORD), __ATOMIC_ACQUIRE);
        if (((last >> 16) & 1) != (uint32_t)phase)
            break;
        uint32_t result;
        uint16_t hw[2];
        memcpy(&result, ent, 4);
        memcpy(hw, ent + 8, 4);
        PyObject *t = Py_BuildValue("(kkkkk)", (unsigned long)(last & 0xFFFF),
                                    (unsigned long)((last >> 17) & 0x7FFF), (unsigned long)result,
                                    (unsigned long)hw[0], (unsigned long)hw[1]);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(t);
        if (++head == depth) {
            head = 0;
            phase ^= 1;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nll)", out, head, phase);
}

static PyMethodDef module_methods[] = {
    {"sq_write_rw", (PyCFunction)(void (*)(void))sq_write_rw, METH_FASTCALL,
     "sq_write_rw(buf, off, opcode, cid, nsid, slba, nlb0): a read/write SQE at off."},
    {"cq_reap", (PyCFunction)(void (*)(void))cq_reap, METH_FASTCALL,
     "cq_reap(buf, base, head, phase, depth, budget) -> (cqes, head, phase)."},
    {"service_samples", (PyCFunction)(void (*)(void))service_samples, METH_VARARGS | METH_KEYWORDS,
     "Service times drawn as an engine seeded with `seed` draws them."},
    {"layout", (PyCFunction)layout, METH_NOARGS, "The entry offsets the engine was built with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mqrt.device._nvme_engine",
    .m_doc = "The NVMe controller's compiled I/O command path.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__nvme_engine(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *names = PyTuple_New(NR_COUNTERS);
    for (int i = 0; i < NR_COUNTERS && names; i++)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(counter_names[i]));
    if (!names || PyModule_AddObject(m, "COUNTERS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
