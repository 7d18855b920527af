"""``mqrt microbench``: the foundation's costs, measured side by side with the peers a
user would otherwise reach for, in one run on this machine.

Every case is repeated (``--repeat``, default 5) and the median is reported with the
spread; compare ratios within one run, not absolute numbers across runs.

Cases
    atomic.*                   one mqrt.lib._atomic call from Python on shared memory
    peer.atomics.*             the same operation with the PyPI ``atomics`` package
    ring.spsc.batch            SpscRing, 64-byte entries, batches of 32, producer and
                               consumer pinned to different cores
    ring.mpsc.2producers       MpscRing, 2 producer processes, batches of 32
    peer.mp_queue              multiprocessing.Queue put/get of 64-byte bytes
    peer.mp_pipe               multiprocessing.Pipe send_bytes/recv_bytes, 64 bytes
    peer.faster_fifo.batch     faster-fifo put_many/get_many of 32 x 64 bytes, with
                               identity dumps/loads (no pickling)
    sbitmap.get_put            sbitmap_queue get + clear, one process
    sbitmap.get_put.contended  the same from 2 processes on one bitmap (per-process
                               cost per get+clear)
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mqrt import __version__
from mqrt.errors import UsageError
from mqrt.lib.proc import child_init
from mqrt.lib.ring import MpscRing, SpscRing
from mqrt.lib.sbitmap import SbitmapQueue
from mqrt.lib.shm import Arena, Layout, cacheline_struct, exit_on_sigterm
from mqrt.lib.wait import Waiters

SCHEMA = "mqrt.microbench/1"
ENTRY_SIZE = 64
BATCH = 32
#: A child that takes longer than this is hung, not slow.
CHILD_TIMEOUT_S = 120.0

_fork = mp.get_context("fork")


@dataclass
class Case:
    name: str
    unit: str  #: "ns/op" (lower is better) or "ops/s" (higher is better)
    run: Callable[[float], float]  #: scale (1.0 full, 0.1 quick) -> one measurement
    needs: str | None = None  #: optional module the case needs
    what: str = ""


@dataclass
class Result:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return statistics.median(self.samples)


# -- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _arena(*declare: Callable[[Layout], Any]) -> Iterator[tuple[Arena, list[Any]]]:
    layout = Layout()
    specs = [d(layout) for d in declare]
    with Arena.create(layout) as arena:
        yield arena, specs


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _child_main(
    conn, barrier, cpu: int | None, fn: Callable[..., float], args: tuple, parent: int
) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what stops,
    # and a child never outlives it.
    child_init(parent, cpu)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:  # the parent gave up before the start
        return
    conn.send(fn(*args))
    conn.close()


def _parties(*jobs: tuple[Callable[..., float], tuple, int | None]) -> list[float]:
    """Run each ``(fn, args, cpu)`` in its own forked process, started together by a
    barrier; return what each fn returned.  Children are killed on any failure."""
    barrier = _fork.Barrier(len(jobs))
    pipes = [_fork.Pipe(duplex=False) for _ in jobs]
    procs = [
        _fork.Process(
            target=_child_main, args=(w, barrier, cpu, fn, args, os.getpid()), daemon=True
        )
        for (fn, args, cpu), (_, w) in zip(jobs, pipes, strict=True)
    ]
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        out = []
        for (r, _), p in zip(pipes, procs, strict=True):
            if not r.poll(CHILD_TIMEOUT_S):
                raise RuntimeError(f"microbench child {p.pid} hung or died (exit {p.exitcode})")
            out.append(r.recv())
        return out
    except BaseException:
        barrier.abort()  # children still waiting at the barrier leave at once
        raise
    finally:
        for p in procs:
            if p.pid is None:  # interrupted before it was started
                continue
            p.join(5)

            if p.is_alive():
                p.kill()
                p.join()
            p.close()
        for r, _ in pipes:
            r.close()


def _pin(i: int) -> int | None:
    cpus = _cpus()
    return cpus[i % len(cpus)] if len(cpus) > 1 else None


def _per_op_ns(stmt: str, ns: dict[str, Any], number: int) -> float:
    return timeit.Timer(stmt, globals=ns).timeit(number) / number * 1e9


# -- atomics -------------------------------------------------------------------------------

_ATOMIC_STMTS = {
    "cmpxchg": "a.cmpxchg(0, 0, 0)",
    "fetch_add": "a.fetch_add(0, 1)",
    "test_and_set_bit": "a.test_and_set_bit(0, 5)",
}
_PEER_STMTS = {
    "cmpxchg": "a.cmpxchg_strong(0, 0)",
    "fetch_add": "a.fetch_add(1)",
    "test_and_set_bit": "a.bit_test_set(5)",
}


def _ours(op: str) -> Callable[[float], float]:
    def run(scale: float) -> float:
        with _arena(lambda lay: lay.add("w", cacheline_struct([("w", "<u8")]))) as (arena, _):
            return _per_op_ns(_ATOMIC_STMTS[op], {"a": arena.atomic}, int(200_000 * scale))

    return run


def _peer(op: str) -> Callable[[float], float]:
    def run(scale: float) -> float:
        import atomics

        with _arena(lambda lay: lay.add("w", cacheline_struct([("w", "<u8")]))) as (arena, _):
            word = arena.buf[0:8]
            try:
                with atomics.atomicview(buffer=word, atype=atomics.UINT) as a:
                    return _per_op_ns(_PEER_STMTS[op], {"a": a}, int(5_000 * scale))
            finally:
                word.release()

    return run


# -- rings -----------------------------------------------------------------------------------

_BATCH_OF_ENTRIES = [bytes([i]) * ENTRY_SIZE for i in range(BATCH)]


def _ring_producer(ring_cls, arena, spec, n: int) -> float:
    ring = ring_cls(arena, spec)
    sent = 0
    batch = _BATCH_OF_ENTRIES
    while sent < n:
        took = ring.put_many(batch)
        if not took:
            os.sched_yield()
        sent += took
    return 0.0


def _ring_consumer(ring_cls, arena, spec, n: int) -> float:
    ring = ring_cls(arena, spec)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        entries = ring.get_many(BATCH)
        if not entries:
            os.sched_yield()
        got += len(entries)
    return n / (time.perf_counter() - t0)


def _spsc(scale: float) -> float:
    n = int(400_000 * scale) // BATCH * BATCH
    with _arena(lambda lay: SpscRing.declare(lay, "r", 1024, ENTRY_SIZE)) as (arena, (spec,)):
        _, rate = _parties(
            (_ring_producer, (SpscRing, arena, spec, n), _pin(0)),
            (_ring_consumer, (SpscRing, arena, spec, n), _pin(1)),
        )
        return rate


def _mpsc(scale: float) -> float:
    n = int(200_000 * scale) // BATCH * BATCH
    with _arena(lambda lay: MpscRing.declare(lay, "r", 1024, ENTRY_SIZE)) as (arena, (spec,)):
        MpscRing.init(arena, spec)
        *_, rate = _parties(
            (_ring_producer, (MpscRing, arena, spec, n), None),
            (_ring_producer, (MpscRing, arena, spec, n), None),
            (_ring_consumer, (MpscRing, arena, spec, 2 * n), None),
        )
        return rate


# -- peers: multiprocessing and faster-fifo ---------------------------------------------------


def _mpq_producer(q, n: int) -> float:
    msg = bytes(ENTRY_SIZE)
    for _ in range(n):
        q.put(msg)
    return 0.0


def _mpq_consumer(q, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        q.get()
    return n / (time.perf_counter() - t0)


def _mp_queue(scale: float) -> float:
    n = int(50_000 * scale)
    q = _fork.Queue()
    try:
        _, rate = _parties((_mpq_producer, (q, n), _pin(0)), (_mpq_consumer, (q, n), _pin(1)))
        return rate
    finally:
        q.close()
        q.join_thread()


def _pipe_producer(conn, n: int) -> float:
    msg = bytes(ENTRY_SIZE)
    for _ in range(n):
        conn.send_bytes(msg)
    return 0.0


def _pipe_consumer(conn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        conn.recv_bytes()
    return n / (time.perf_counter() - t0)


def _mp_pipe(scale: float) -> float:
    n = int(100_000 * scale)
    r, w = _fork.Pipe(duplex=False)
    try:
        _, rate = _parties((_pipe_producer, (w, n), _pin(0)), (_pipe_consumer, (r, n), _pin(1)))
        return rate
    finally:
        r.close()
        w.close()


def _identity(x: Any) -> Any:
    return x


def _ff_producer(q, n: int) -> float:
    batch = _BATCH_OF_ENTRIES
    for _ in range(n // BATCH):
        q.put_many(batch, timeout=CHILD_TIMEOUT_S)
    return 0.0


def _ff_consumer(q, n: int) -> float:
    got = 0
    t0 = time.perf_counter()
    while got < n:
        got += len(q.get_many(timeout=CHILD_TIMEOUT_S, max_messages_to_get=BATCH))
    return n / (time.perf_counter() - t0)


def _faster_fifo(scale: float) -> float:
    from faster_fifo import Queue

    n = int(400_000 * scale) // BATCH * BATCH
    q = Queue(max_size_bytes=1024 * (ENTRY_SIZE + 8), loads=_identity, dumps=_identity)
    try:
        _, rate = _parties((_ff_producer, (q, n), _pin(0)), (_ff_consumer, (q, n), _pin(1)))
        return rate
    finally:
        q.close()


# -- sbitmap -----------------------------------------------------------------------------------

SBITMAP_DEPTH = 64


def _sbq_loop(rig: tuple, cpu: int, n: int) -> float:
    arena, wspec, eventfds, spec = rig
    q = SbitmapQueue(arena, spec, Waiters(arena, wspec, eventfds, cpu), cpu=cpu)
    get, clear = q.get, q.clear
    t0 = time.perf_counter()
    for _ in range(n):
        nr = get()
        if nr >= 0:
            clear(nr, cpu)
    return (time.perf_counter() - t0) / n * 1e9


@contextlib.contextmanager
def _sbq_rig(nr_cpus: int) -> Iterator[tuple]:
    with _arena(
        lambda lay: Waiters.declare(lay, nr_cpus),
        lambda lay: SbitmapQueue.declare(lay, "tags", SBITMAP_DEPTH, nr_cpus),
    ) as (arena, (wspec, spec)):
        Waiters.init(arena, wspec)
        SbitmapQueue.init(arena, spec)
        eventfds = Waiters.create_eventfds(wspec)
        try:
            yield arena, wspec, eventfds, spec
        finally:
            for fd in eventfds:
                os.close(fd)


def _sbitmap(scale: float) -> float:
    with _sbq_rig(1) as rig:
        return _sbq_loop(rig, 0, int(100_000 * scale))


def _trace_emit(scale: float) -> float:
    """One trace event as the data path writes it (``if trace.on: trace.emit(...)``)."""
    from mqrt.lib import trace

    n = int(200_000 * scale)
    with _arena(lambda lay: trace.TraceSpec.declare(lay, 1, 4096)) as (arena, (spec,)):
        trace.install(trace.Tracer(arena, spec, 0))
        try:
            t0 = time.perf_counter_ns()
            for i in range(n):
                if trace.on:
                    trace.emit(10, i, 3, 0, 0, 0)
            return (time.perf_counter_ns() - t0) / n
        finally:
            trace.install(None)


#: I/Os per burst of the in-process data-path cases, and bursts per sample (the
#: sample is the fastest burst: the host's noise only ever adds time).
IO_BURST = 20_000
IO_BURSTS = 5


def _blk_mq_io(traced: bool) -> Callable[[float], float]:
    """ns of CPU per I/O as a bench CPU does it, minus its event loop, in this
    process: fio's default job (4k randread, iodepth 32 submitted in one plug) ->
    submit_bio -> tag get -> request -> ->queue_rq (null_blk irqmode=none, which ends
    it at once) -> end -> tag free -> the job's completion accounting, with or
    without the event trace."""

    def run(scale: float) -> float:
        from mqrt.device import null_blk
        from mqrt.lib import trace
        from mqrt.testing import Rig
        from mqrt.workers.ioengine import IoJob, JobSpec

        cfg = null_blk.parse_config({"irqmode": 0})
        with contextlib.ExitStack() as stack:
            rig = Rig(lambda layout, topology: null_blk.setup(cfg, layout, topology))
            stack.callback(rig.close)
            if traced:
                # The trace gets an arena of its own, beside the rig's.
                tarena, (tspec,) = stack.enter_context(
                    _arena(lambda lay: trace.TraceSpec.declare(lay, 1, 4096))
                )
                trace.install(trace.Tracer(tarena, tspec, 0))
                stack.callback(trace.install, None)
            mq = rig.mq
            q = mq.queues[0]
            spec = JobSpec.from_options({})
            job = IoJob(spec, 0, 0, cfg.gb << 30, 0)
            mq.end_io = [job.done]
            submit, clock, next_bio = mq.submit_bio, time.monotonic_ns, job.next_bio
            start_plug, finish_plug = mq.start_plug, mq.finish_plug
            depth = spec.iodepth
            rounds = max(int(IO_BURST * scale) // depth, 4)
            best = float("inf")
            for _ in range(IO_BURSTS):
                before = job.dirs[0].ios
                t0 = time.perf_counter_ns()
                for _ in range(rounds):
                    start_plug(depth)
                    for _ in range(depth):
                        op, sector, nr_sectors = next_bio()
                        submit(q, op, sector, nr_sectors, clock())
                    finish_plug()
                job.fold()
                best = min(best, (time.perf_counter_ns() - t0) / (rounds * depth))
                if job.dirs[0].ios - before != rounds * depth or job.inflight:
                    raise RuntimeError(f"blk_mq.io: {job.dirs[0].ios - before} I/Os ended")
            return best

    return run


def _sbitmap_contended(scale: float) -> float:
    nproc = 2
    with _sbq_rig(nproc) as rig:
        costs = _parties(
            *[(_sbq_loop, (rig, cpu, int(50_000 * scale)), _pin(cpu)) for cpu in range(nproc)]
        )
        return statistics.median(costs)


# -- references for the NVMe path: a bare loop and a bare wake-up ----------------------

REF_QD = 32
_SQE = bytes(64)
_CQE = bytes(16)


def _ref_worker(arena, sq_spec, cq_spec, efd: int, n: int) -> float:
    """Keep REF_QD entries outstanding: submit, sleep on the eventfd "interrupt",
    reap the CQ, refill; ops/s."""
    sq, cq = SpscRing(arena, sq_spec), SpscRing(arena, cq_spec)
    done = inflight = 0
    t0 = time.perf_counter()
    while done < n:
        room = min(REF_QD - inflight, n - done - inflight)
        if room > 0:
            inflight += sq.put_many(_SQE * room)
        got = len(cq.get_many_raw(REF_QD)) // 16
        if not got:
            os.eventfd_read(efd)  # blocks until the device's interrupt
            continue
        done += got
        inflight -= got
    return n / (time.perf_counter() - t0)


def _ref_device(arena, specs: list, efds: list[int], total: int) -> float:
    """Poll every SQ, complete at once into its CQ, one eventfd write per batch."""
    rings = [
        (SpscRing(arena, s), SpscRing(arena, c), e) for (s, c), e in zip(specs, efds, strict=True)
    ]
    done = 0
    while done < total:
        idle = True
        for sq, cq, efd in rings:
            n = len(sq.get_many_raw(REF_QD)) // 64
            if n:
                idle = False
                cq.put_many(_CQE * n)
                os.eventfd_write(efd, 1)
                done += n
        if idle:
            os.sched_yield()
    return 0.0


def _ref_loop(scale: float) -> float:
    nr = 2
    n = int(100_000 * scale)
    decl = []
    for i in range(nr):
        decl.append(lambda lay, i=i: SpscRing.declare(lay, f"sq{i}", 64, 64))
        decl.append(lambda lay, i=i: SpscRing.declare(lay, f"cq{i}", 64, 16))
    with _arena(*decl) as (arena, specs):
        pairs = [(specs[2 * i], specs[2 * i + 1]) for i in range(nr)]
        efds = [os.eventfd(0) for _ in range(nr)]
        try:
            rates = _parties(
                *[(_ref_worker, (arena, *pairs[i], efds[i], n), _pin(i)) for i in range(nr)],
                (_ref_device, (arena, pairs, efds, n * nr), None),
            )
        finally:
            for fd in efds:
                os.close(fd)
    return sum(rates)


def _ref_pong(efd_in: int, efd_out: int, n: int) -> float:
    for _ in range(n):
        os.eventfd_read(efd_in)
        os.eventfd_write(efd_out, 1)
    return 0.0


def _ref_ping(efd_out: int, efd_in: int, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        os.eventfd_write(efd_out, 1)
        os.eventfd_read(efd_in)
        samples.append(time.perf_counter_ns() - t0)
    return float(statistics.median(samples))


def _ref_wakeup(scale: float) -> float:
    n = max(200, int(5_000 * scale))
    a, b = os.eventfd(0), os.eventfd(0)
    try:
        rtt, _ = _parties((_ref_ping, (a, b, n), _pin(0)), (_ref_pong, (a, b, n), _pin(1)))
    finally:
        os.close(a)
        os.close(b)
    return rtt


def reference_figures(loop: bool) -> dict[str, float]:
    """The bare references ``mqrt bench`` prints next to a device run, measured in
    that run: the eventfd wake-up round trip (median ns, always: ~0.1 s) and, with
    ``loop``, the bare SQ -> device -> CQ loop's IOPS (~1 s)."""
    out = {"wakeup_rtt_ns": _ref_wakeup(0.04)}
    if loop:
        out["sq_cq_loop_iops"] = _ref_loop(1.0)
    return out


CASES: list[Case] = [
    Case("atomic.cmpxchg", "ns/op", _ours("cmpxchg"), what="mqrt.lib._atomic cmpxchg"),
    Case("atomic.fetch_add", "ns/op", _ours("fetch_add"), what="mqrt.lib._atomic fetch_add"),
    Case(
        "atomic.test_and_set_bit",
        "ns/op",
        _ours("test_and_set_bit"),
        what="mqrt.lib._atomic test_and_set_bit",
    ),
    Case("peer.atomics.cmpxchg", "ns/op", _peer("cmpxchg"), "atomics", "atomics cmpxchg_strong"),
    Case("peer.atomics.fetch_add", "ns/op", _peer("fetch_add"), "atomics", "atomics fetch_add"),
    Case(
        "peer.atomics.test_and_set_bit",
        "ns/op",
        _peer("test_and_set_bit"),
        "atomics",
        "atomics bit_test_set",
    ),
    Case("ring.spsc.batch", "ops/s", _spsc, what="SpscRing 64 B x32, 2 processes"),
    Case("ring.mpsc.2producers", "ops/s", _mpsc, what="MpscRing 64 B x32, 2 producers"),
    Case("peer.mp_queue", "ops/s", _mp_queue, what="multiprocessing.Queue 64 B"),
    Case("peer.mp_pipe", "ops/s", _mp_pipe, what="multiprocessing.Pipe 64 B"),
    Case(
        "peer.faster_fifo.batch",
        "ops/s",
        _faster_fifo,
        "faster_fifo",
        "faster-fifo put_many/get_many 64 B x32, no pickling",
    ),
    Case("sbitmap.get_put", "ns/op", _sbitmap, what="sbitmap_queue get + clear, 1 process"),
    Case(
        "sbitmap.get_put.contended",
        "ns/op",
        _sbitmap_contended,
        what="sbitmap_queue get + clear, 2 processes, one bitmap",
    ),
    Case(
        "trace.emit",
        "ns/op",
        _trace_emit,
        what="one event into this CPU's trace ring, as the data path writes it",
    ),
    Case(
        "blk_mq.io",
        "ns/op",
        _blk_mq_io(traced=False),
        what="a bench CPU's work per I/O (fio job, blk-mq, null_blk irqmode=none), in-process",
    ),
    Case(
        "blk_mq.io.traced",
        "ns/op",
        _blk_mq_io(traced=True),
        what="the same with the event trace on (tag get, dispatch, end per I/O)",
    ),
    Case(
        "ref.sq_cq_loop.qd32",
        "ops/s",
        _ref_loop,
        what="bare SQ -> polling device -> CQ, eventfd interrupts, 2 workers x qd32 "
        "(the reference for mqrt bench --driver nvme)",
    ),
    Case(
        "ref.wakeup_rtt",
        "ns/op",
        _ref_wakeup,
        what="blocking eventfd wake-up round trip between two cores (median)",
    ),
]

#: (case, peer or None, how many times better it must be, or an absolute bound)
TARGETS: list[tuple[str, str | None, float]] = [
    ("atomic.cmpxchg", None, 80.0),
    ("atomic.fetch_add", None, 80.0),
    ("atomic.test_and_set_bit", None, 80.0),
    ("atomic.cmpxchg", "peer.atomics.cmpxchg", 50.0),
    ("atomic.fetch_add", "peer.atomics.fetch_add", 50.0),
    ("atomic.test_and_set_bit", "peer.atomics.test_and_set_bit", 50.0),
    ("ring.spsc.batch", "peer.mp_queue", 15.0),
    ("ring.spsc.batch", "peer.faster_fifo.batch", 4.0),
    ("ring.mpsc.2producers", None, 1e6),
    ("sbitmap.get_put", None, 1500.0),
]

#: (case, baseline, the most it may cost over the baseline, in %).  The trace's cost
#: on a CPU's per-I/O work without its event loop is an upper bound of its IOPS cost
#: in ``mqrt bench``, where each I/O also pays for the event loop.
OVERHEADS: list[tuple[str, str, float]] = [
    ("blk_mq.io.traced", "blk_mq.io", 10.0),
]


def _available(case: Case) -> bool:
    if case.needs is None:
        return True
    try:
        __import__(case.needs)
    except ImportError:
        return False
    return True


def _speedup(results: dict[str, Result], ours: str, peer: str) -> float:
    a, b = results[ours], results[peer]
    return b.value / a.value if a.unit == "ns/op" else a.value / b.value


def check_targets(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on this run's medians."""
    checks = []
    for case, peer, bound in TARGETS:
        if case not in results or (peer is not None and peer not in results):
            continue
        r = results[case]
        if peer is not None:
            ratio = _speedup(results, case, peer)
            checks.append(
                {
                    "check": f"{case} vs {peer}",
                    "value": round(ratio, 1),
                    "target": f">= {bound:g}x",
                    "met": ratio >= bound,
                }
            )
        elif r.unit == "ns/op":
            checks.append(
                {
                    "check": case,
                    "value": round(r.value, 1),
                    "target": f"<= {bound:g} ns/op",
                    "met": r.value <= bound,
                }
            )
        else:
            checks.append(
                {
                    "check": case,
                    "value": round(r.value),
                    "target": f">= {bound:,.0f} ops/s",
                    "met": r.value >= bound,
                }
            )
    for case, base, pct in OVERHEADS:
        if case in results and base in results:
            cost = (results[case].value / results[base].value - 1.0) * 100.0
            checks.append(
                {
                    "check": f"{case} over {base}",
                    "value": round(cost, 1),
                    "target": f"<= {pct:g} %",
                    "met": cost <= pct,
                }
            )
    return checks


def run(
    cases: list[Case],
    repeat: int,
    scale: float,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Result], bool]:
    """Every case ``repeat`` times, interleaved (case A, B, ..., A, B, ...) so that
    a noisy moment does not land on all repetitions of one case.  Ctrl-C stops the
    run and keeps what was measured; the flag says whether that happened."""
    results: dict[str, Result] = {}
    total = len(cases) * repeat
    done = 0
    try:
        for _ in range(repeat):
            for case in cases:
                if progress:
                    progress(case.name, done, total)
                sample = case.run(scale)
                results.setdefault(case.name, Result(case.name, case.unit)).samples.append(sample)
                done += 1
    except KeyboardInterrupt:
        return results, True
    return results, False


def _fmt(value: float, unit: str) -> str:
    if unit == "ops/s":
        return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.0f} k"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def render_table(results: dict[str, Result], cases: list[Case], checks, repeat: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mqrt microbench (median of {repeat}; spread = min..max)")
    table.add_column("case")
    table.add_column("median", justify="right")
    table.add_column("unit")
    table.add_column("spread", justify="right")
    for case in cases:
        r = results.get(case.name)
        if r is None:
            continue
        spread = f"{_fmt(min(r.samples), r.unit)}..{_fmt(max(r.samples), r.unit)}"
        table.add_row(case.name, _fmt(r.value, r.unit), r.unit, spread)
    console = Console(width=max(100, Console().width))
    console.print(table)
    if checks:
        t = Table(title="targets")
        t.add_column("check")
        t.add_column("this run", justify="right")
        t.add_column("target")
        t.add_column("")
        for c in checks:
            t.add_row(c["check"], f"{c['value']:,}", c["target"], "met" if c["met"] else "MISSED")
        console.print(t)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "microbench",
        help="measure atomics, rings and sbitmap against their peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema mqrt.microbench/1)")
    p.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="repetitions per case; the median is reported. Default: 5",
    )
    p.add_argument(
        "--quick", action="store_true", help="a tenth of the work per repetition (a smoke test)"
    )
    p.add_argument(
        "--case",
        action="append",
        metavar="PATTERN",
        help="run only cases matching this glob (repeatable), e.g. 'ring.*'",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:

    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1, got {args.repeat}")
    cases = CASES
    if args.case:
        cases = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, pat) for pat in args.case)]
        if not cases:
            names = ", ".join(c.name for c in CASES)
            raise UsageError(f"--case {' '.join(args.case)} matches no case; cases: {names}")
    skipped = [c for c in cases if not _available(c)]
    cases = [c for c in cases if c not in skipped]
    notes = [f"{c.name} skipped: the '{c.needs}' package is not installed" for c in skipped]
    scale = 0.1 if args.quick else 1.0

    progress_cb = None
    status_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if sys.stderr.isatty() and not args.json:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        prog = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
        )
        task = prog.add_task("microbench", total=len(cases) * args.repeat)

        def progress_cb(name: str, done: int, total: int) -> None:
            prog.update(task, completed=done, description=name)

        status_ctx = prog

    with exit_on_sigterm(), status_ctx:
        results, interrupted = run(cases, args.repeat, scale, progress_cb)
    if interrupted:
        notes.append("interrupted: partial results (fewer repetitions for some cases)")
    checks = check_targets(results)
    if args.json:
        doc = {
            "schema": SCHEMA,
            "mqrt_version": __version__,
            "repeat": args.repeat,
            "quick": args.quick,
            "cpus": _cpus(),
            "results": {
                name: {"value": r.value, "unit": r.unit, "samples": r.samples}
                for name, r in results.items()
            },
            "checks": checks,
            "notes": notes,
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_table(results, cases, checks, args.repeat)
        for note in notes:
            print(f"note: {note}")
    return 130 if interrupted else 0
