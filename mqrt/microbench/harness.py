"""The microbench harness: what a case is, its samples, the children a case runs in,
and the timing helpers the cases share.

A case is a function of a scale (1.0 for a full repetition, 0.1 for ``--quick``)
returning one measurement.  Multi-process cases run their parties in forked children
started together by a barrier (:func:`parties`); :func:`run` repeats every case,
interleaved, and keeps what was measured when Ctrl-C stops it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import threading
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from mqrt.lib import signals
from mqrt.lib.proc import child_init
from mqrt.lib.shm import Arena, Layout

#: A child that takes longer than this is hung, not slow.
CHILD_TIMEOUT_S = 120.0

fork = mp.get_context("fork")


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


@contextlib.contextmanager
def scratch_arena(*declare: Callable[[Layout], Any]) -> Iterator[tuple[Arena, list[Any]]]:
    """An arena holding what each ``declare(layout)`` declares; yields it and the specs."""
    layout = Layout()
    specs = [d(layout) for d in declare]
    with Arena.create(layout, guard=True) as arena:
        yield arena, specs


def host_cpus() -> list[int]:
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


def parties(*jobs: tuple[Callable[..., float], tuple, int | None]) -> list[float]:
    """Run each ``(fn, args, cpu)`` in its own forked process, started together by a
    barrier; return what each fn returned.  Children are killed on any failure."""
    barrier = fork.Barrier(len(jobs))
    pipes = [fork.Pipe(duplex=False) for _ in jobs]
    procs = [
        fork.Process(target=_child_main, args=(w, barrier, cpu, fn, args, os.getpid()), daemon=True)
        for (fn, args, cpu), (_, w) in zip(jobs, pipes, strict=True)
    ]
    failed = False
    try:
        with signals.forking():  # a Ctrl-C in the at-fork hooks is raised after them
            for p in procs:
                p.start()
        for _, w in pipes:
            w.close()
        out = []
        # a stop signal is only recorded while the parties run (never raised in the
        # middle of a finalizer), and ends the wait here
        with signals.deferred(), signals.wakeup() as stop:
            for (r, _), p in zip(pipes, procs, strict=True):
                ready = wait([r, stop], CHILD_TIMEOUT_S)
                if stop in ready or signals.received():
                    raise signals.Stop(signals.received()[0])
                if not ready:
                    raise RuntimeError(f"microbench child {p.pid} hung or died (exit {p.exitcode})")
                out.append(r.recv())
        return out
    except BaseException:
        failed = True  # (Ctrl-C included) what they measure is lost: no waiting for them
        barrier.abort()  # children still waiting at the barrier leave at once
        raise
    finally:
        for p in procs:
            if p.pid is None:  # interrupted before it was started
                continue
            p.join(0 if failed else 5)

            if p.is_alive():
                p.kill()
                p.join()
            p.close()
        for r, _ in pipes:
            r.close()


def pin(i: int) -> int | None:
    """The host CPU for party ``i`` (round-robin), or None on a one-CPU host."""
    cpus = host_cpus()
    return cpus[i % len(cpus)] if len(cpus) > 1 else None


def per_op_ns(stmt: str, ns: dict[str, Any], number: int) -> float:
    return timeit.Timer(stmt, globals=ns).timeit(number) / number * 1e9


def available(case: Case) -> bool:
    """Whether the optional module the case needs (if any) can be imported."""
    if case.needs is None:
        return True
    try:
        __import__(case.needs)
    except ImportError:
        return False
    return True


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
