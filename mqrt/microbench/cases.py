"""The ``mqrt microbench`` cases and the :data:`CASES` list, in the order the table
prints them: atomics against the PyPI ``atomics`` package, rings against
``multiprocessing`` and ``faster-fifo``, sbitmap alone and contended, one trace
event, a bench CPU's work per I/O in one process (with and without the trace), and
the NVMe path's references (:mod:`mqrt.microbench.refs`).

Each case function takes a scale (1.0 full, 0.1 ``--quick``) and returns one
measurement in its case's unit.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from mqrt.block.mq_deadline import DeadlineData
from mqrt.lib.ring import MpscRing, SpscRing
from mqrt.lib.sbitmap import SbitmapQueue
from mqrt.lib.shm import Layout, cacheline_struct
from mqrt.lib.wait import Waiters
from mqrt.microbench.harness import (
    CHILD_TIMEOUT_S,
    Case,
    fork,
    parties,
    per_op_ns,
    pin,
    scratch_arena,
)
from mqrt.microbench.refs import ref_loop, ref_wakeup

ENTRY_SIZE = 64
BATCH = 32


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


def _one_word(layout: Layout) -> Any:
    return layout.add("w", cacheline_struct([("w", "<u8")]))


def _ours(op: str) -> Callable[[float], float]:
    def run(scale: float) -> float:
        with scratch_arena(_one_word) as (arena, _):
            return per_op_ns(_ATOMIC_STMTS[op], {"a": arena.atomic}, int(200_000 * scale))

    return run


def _peer(op: str) -> Callable[[float], float]:
    def run(scale: float) -> float:
        import atomics

        with scratch_arena(_one_word) as (arena, _):
            word = arena.buf[0:8]
            try:
                with atomics.atomicview(buffer=word, atype=atomics.UINT) as a:
                    return per_op_ns(_PEER_STMTS[op], {"a": a}, int(5_000 * scale))
            finally:
                word.release()

    return run


# -- rings -----------------------------------------------------------------------------------

_BATCH_OF_ENTRIES = [bytes([i]) * ENTRY_SIZE for i in range(BATCH)]


def _declare_ring(ring_cls) -> Callable[[Layout], Any]:
    return lambda lay: ring_cls.declare(lay, "r", 1024, ENTRY_SIZE)


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
    with scratch_arena(_declare_ring(SpscRing)) as (arena, (spec,)):
        _, rate = parties(
            (_ring_producer, (SpscRing, arena, spec, n), pin(0)),
            (_ring_consumer, (SpscRing, arena, spec, n), pin(1)),
        )
        return rate


def _mpsc(scale: float) -> float:
    n = int(200_000 * scale) // BATCH * BATCH
    with scratch_arena(_declare_ring(MpscRing)) as (arena, (spec,)):
        MpscRing.init(arena, spec)
        *_, rate = parties(
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
    q = fork.Queue()
    try:
        _, rate = parties((_mpq_producer, (q, n), pin(0)), (_mpq_consumer, (q, n), pin(1)))
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
    r, w = fork.Pipe(duplex=False)
    try:
        _, rate = parties((_pipe_producer, (w, n), pin(0)), (_pipe_consumer, (r, n), pin(1)))
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
        _, rate = parties((_ff_producer, (q, n), pin(0)), (_ff_consumer, (q, n), pin(1)))
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
    with scratch_arena(
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


def _dd_insert_dispatch(scale: float) -> float:
    """One request through mq-deadline: insert (sort and FIFO lists), dispatch (the
    batch's next in sector order), finish; 32 scheduler requests, a sequential read
    stream, one process."""
    n = int(100_000 * scale)
    with scratch_arena(lambda lay: DeadlineData.declare(lay, "q", 32)) as (arena, (spec,)):
        DeadlineData.init(arena, spec)
        dd = DeadlineData(arena, spec)
        insert, dispatch, finish = dd.insert, dd.dispatch, dd.finish
        try:
            t0 = time.perf_counter()
            for i in range(n):
                insert(i & 31, 0, i * 8, 8, False, i)
                finish(dispatch(i))
            return (time.perf_counter() - t0) / n * 1e9
        finally:
            dd.close()


def _trace_emit(scale: float) -> float:
    """One trace event as the data path writes it (``if trace.on: trace.emit(...)``)."""
    from mqrt.lib import trace

    n = int(200_000 * scale)
    with scratch_arena(lambda lay: trace.TraceSpec.declare(lay, 1, 4096)) as (arena, (spec,)):
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
                    scratch_arena(lambda lay: trace.TraceSpec.declare(lay, 1, 4096))
                )
                trace.install(trace.Tracer(tarena, tspec, 0))
                stack.callback(trace.install, None)
            mq = rig.mq
            q = mq.queues[0]
            spec = JobSpec.from_options({})
            job = IoJob(spec, 0, 0, cfg.gb << 30, 0)
            mq.end_io = [job.done]
            mq.end_io_merged = [job.done_merged]
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
                    job.mark_submit(depth)  # as the CPU's loop counts its batch
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
        costs = parties(
            *[(_sbq_loop, (rig, cpu, int(50_000 * scale)), pin(cpu)) for cpu in range(nproc)]
        )
        return statistics.median(costs)


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
        "mq_deadline.insert_dispatch",
        "ns/op",
        _dd_insert_dispatch,
        what="mq-deadline insert + dispatch + finish of one request, 1 process",
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
        ref_loop,
        what="bare SQ -> polling device -> CQ, eventfd interrupts, 2 workers x qd32 "
        "(the reference for mqrt bench --driver nvme)",
    ),
    Case(
        "ref.wakeup_rtt",
        "ns/op",
        ref_wakeup,
        what="blocking eventfd wake-up round trip between two cores (median)",
    ),
]
