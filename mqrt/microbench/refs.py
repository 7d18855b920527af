"""The references for the NVMe path: a bare SQ -> polling device -> CQ loop with
eventfd interrupts, and a blocking eventfd wake-up round trip between two cores.

They are ``mqrt microbench`` cases (``ref.*``) and ``mqrt bench --driver nvme``
measures them right after its run (:func:`reference_figures`), to show how far the
driver is from the bare loop on the same machine.
"""

from __future__ import annotations

import os
import statistics
import time

from mqrt.lib.ring import SpscRing
from mqrt.microbench.harness import parties, pin, scratch_arena

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


def ref_loop(scale: float) -> float:
    """The bare loop's ops/s: 2 workers at qd 32 against one polling device process."""
    nr = 2
    n = int(100_000 * scale)
    decl = []
    for i in range(nr):
        decl.append(lambda lay, i=i: SpscRing.declare(lay, f"sq{i}", 64, 64))
        decl.append(lambda lay, i=i: SpscRing.declare(lay, f"cq{i}", 64, 16))
    with scratch_arena(*decl) as (arena, specs):
        pairs = [(specs[2 * i], specs[2 * i + 1]) for i in range(nr)]
        efds = [os.eventfd(0) for _ in range(nr)]
        try:
            rates = parties(
                *[(_ref_worker, (arena, *pairs[i], efds[i], n), pin(i)) for i in range(nr)],
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


def ref_wakeup(scale: float) -> float:
    """The median ns of a blocking eventfd wake-up round trip between two cores."""
    n = max(200, int(5_000 * scale))
    a, b = os.eventfd(0), os.eventfd(0)
    try:
        rtt, _ = parties((_ref_ping, (a, b, n), pin(0)), (_ref_pong, (a, b, n), pin(1)))
    finally:
        os.close(a)
        os.close(b)
    return rtt


def reference_figures(loop: bool) -> dict[str, float]:
    """The bare references ``mqrt bench`` prints next to a device run, measured in
    that run: the eventfd wake-up round trip (median ns, always: ~0.1 s) and, with
    ``loop``, the bare SQ -> device -> CQ loop's IOPS (~1 s)."""
    out = {"wakeup_rtt_ns": ref_wakeup(0.04)}
    if loop:
        out["sq_cq_loop_iops"] = ref_loop(1.0)
    return out
