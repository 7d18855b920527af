"""RCU grace periods across processes and the percpu_ref they protect
(:mod:`mqrt.lib.rcu`, :mod:`mqrt.lib.percpu_ref`), with real processes.

Each worker plays a CPU: its loop takes references on its own per-CPU line inside a
read-side section (sometimes held open across a short sleep, the window a straggler
needs), holds a few, puts them (also on other CPUs' references' behalf: only the sum
means anything), and takes the grace period's IPIs (a pipe) only at the top of its
loop, outside any section, as a CPU worker does.  The test process is the updater:
kill, grace period, fold, wait for zero, check that no worker holds a reference,
resurrect -- again and again.  A fold that missed a straggler's add would let the
count reach zero while a worker still holds a reference."""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import time

import pytest

from mqrt.lib import rcu
from mqrt.lib.percpu_ref import PercpuRef
from mqrt.lib.shm import Arena, Layout, cacheline_struct
from mqrt.lib.wait import Waiters, WaitEvent, run_task
from tests.helpers import DEADLOCK_TIMEOUT

pytestmark = pytest.mark.timing

ctx = multiprocessing.get_context("fork")

#: per worker: references held now, taken and put
WORKER = cacheline_struct([("held", "<i8"), ("got", "<u8"), ("puts", "<u8")])
CONTROL = cacheline_struct([("stop", "<u8")])


class Rig:
    def __init__(self, nr_workers: int):
        self.n = nr_workers
        layout = Layout()
        self.ref_spec = PercpuRef.declare(layout, "q_usage", nr_workers + 1)
        self.rcu_spec = rcu.declare(layout, nr_workers + 1)
        self.wspec = Waiters.declare(layout, nr_workers + 1)
        self.workers = layout.add("workers", WORKER, nr_workers)
        self.control = layout.add("control", CONTROL)
        self.arena = Arena.create(layout)
        PercpuRef.init(self.arena, self.ref_spec)
        rcu.init(self.arena, self.rcu_spec)
        Waiters.init(self.arena, self.wspec)
        self.eventfds = Waiters.create_eventfds(self.wspec)
        self.pipes = [os.pipe2(os.O_NONBLOCK) for _ in range(nr_workers)]

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.arena.close()


def _worker(rig: Rig, cpu: int, seed: int, straggle: float) -> None:
    a = rig.arena.atomic
    waiters = Waiters(rig.arena, rig.wspec, rig.eventfds, cpu)
    reader = rcu.RcuReader(rig.arena, rig.rcu_spec, cpu, waiters)
    ref = PercpuRef(rig.arena, rig.ref_spec, cpu)
    me = rig.workers.offsets(cpu)
    stop = rig.control.offsets().stop
    ipi_r = rig.pipes[cpu][0]
    rnd = random.Random(seed)
    held = 0
    while not a.read(stop):
        # the loop's top: interrupts (the grace period's IPI) are taken here only
        if select.select([ipi_r], [], [], 0)[0]:
            os.read(ipi_r, 4096)
            reader.note_qs()
        reader.lock()  # tryget_live's section, held open across a sleep now and then
        flags = a.read(ref.flags_off)
        if not flags and rnd.random() < straggle:
            time.sleep(0.0002)
        if not flags:
            a.fetch_add(ref.mine, 1)
            got = True
        else:
            got = ref.tryget_live()
        reader.unlock()
        if got:
            held += 1
            a.set(me.held, held)
            a.set(me.got, a.read(me.got) + 1)
        if held and (held > 4 or rnd.random() < 0.5):
            held -= 1
            a.set(me.held, held)  # no longer held, then the put
            ref.put()
            a.set(me.puts, a.read(me.puts) + 1)
    while held:
        held -= 1
        a.set(me.held, held)
        ref.put()
        a.set(me.puts, a.read(me.puts) + 1)


def _cycles(rig: Rig, nr: int, honest: bool) -> int:
    """``nr`` kill / grace period / fold / drain / resurrect cycles by the updater
    (CPU ``rig.n``); the number of times a worker still held a reference when the
    count said zero."""
    a = rig.arena.atomic
    waiters = Waiters(rig.arena, rig.wspec, rig.eventfds, rig.n)
    reader = rcu.RcuReader(
        rig.arena, rig.rcu_spec, rig.n, waiters, lambda cpu: os.write(rig.pipes[cpu][1], b"r")
    )
    ref = PercpuRef(rig.arena, rig.ref_spec, rig.n)
    held_offs = [rig.workers.addr(c, "held") for c in range(rig.n)]
    got_offs = [rig.workers.addr(c, "got") for c in range(rig.n)]
    broken = 0
    for _ in range(nr):
        ref.kill()
        if honest:
            run_task(rcu.synchronize_rcu_expedited(reader), waiters)
        zero = ref.fold()
        # the workers put what they hold (they cannot take more): wait for zero
        # (a fold that missed a straggler's add goes below zero when it puts)
        while not zero and _signed(a.read(ref.count_off)) > 0:
            time.sleep(0.0005)
        broken += sum(1 for off in held_offs if _signed(a.read(off)) > 0)
        ref.resurrect()
        # live again: let the workers take a few references before the next kill
        target = sum(a.read(off) for off in got_offs) + 4 * rig.n
        while sum(a.read(off) for off in got_offs) < target:
            time.sleep(0.0002)
    return broken


def _signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


def _run(nr_workers: int, cycles: int, honest: bool, straggle: float) -> tuple[int, Rig]:
    rig = Rig(nr_workers)
    procs = [
        ctx.Process(target=_worker, args=(rig, cpu, 1000 + cpu, straggle))
        for cpu in range(nr_workers)
    ]
    for p in procs:
        p.start()
    try:
        broken = _cycles(rig, cycles, honest)
    finally:
        rig.arena.atomic.set(rig.control.offsets().stop, 1)
        for p in procs:
            p.join(DEADLOCK_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * nr_workers
    return broken, rig


def test_fold_after_grace_period_never_misses_a_reference():
    broken, rig = _run(nr_workers=3, cycles=150, honest=True, straggle=0.05)
    try:
        ref = PercpuRef(rig.arena, rig.ref_spec, 0)
        v = rig.arena.view(rig.workers)
        got, puts = int(v["got"].sum()), int(v["puts"].sum())
        del v
        assert broken == 0
        assert got == puts > 1000  # every reference taken was put, and there were many
        assert ref.outstanding() == 1  # the initial reference only
        reader = rcu.RcuReader(
            rig.arena, rig.rcu_spec, 0, Waiters(rig.arena, rig.wspec, rig.eventfds, None)
        )
        assert reader.grace_periods() == 150
    finally:
        rig.close()


def test_without_the_grace_period_the_fold_misses_stragglers():
    """The control: the same cycles with the grace period skipped are caught."""
    broken, rig = _run(nr_workers=3, cycles=150, honest=False, straggle=0.2)
    rig.close()
    assert broken > 0


def test_deferred_quiescent_state_waits_for_the_section():
    """An IPI taken inside a read-side section reports only when it ends."""
    layout = Layout()
    spec = rcu.declare(layout, 2)
    wspec = Waiters.declare(layout, 2)
    with Arena.create(layout) as arena:
        rcu.init(arena, spec)
        Waiters.init(arena, wspec)
        efds = Waiters.create_eventfds(wspec)
        try:
            other = rcu.RcuReader(arena, spec, 1, Waiters(arena, wspec, efds, 1))
            asked: list[int] = []
            me = rcu.RcuReader(arena, spec, 0, Waiters(arena, wspec, efds, 0), asked.append)
            gp = rcu.synchronize_rcu_expedited(me)
            event = next(gp)
            assert isinstance(event, WaitEvent) and asked == [1] and not event.cond()
            other.lock()
            other.note_qs()  # the IPI nested in a section: deferred
            assert not event.cond()
            other.unlock()  # the section ends: reported
            assert event.cond()
            with pytest.raises(StopIteration):
                gp.send(None)
            assert me.grace_periods() == 1
        finally:
            for fd in efds:
                os.close(fd)
