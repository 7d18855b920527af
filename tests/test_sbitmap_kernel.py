"""Differential test: mqrt's sbitmap port (in a real shared-memory arena) against a
plain-Python transcription of each named kernel's ``lib/sbitmap.c``
(:mod:`tests.kernel_sbitmap`), on random single-process operation sequences.

After every operation both must agree on the return value, every word's ``word``
and ``cleared``, the CPUs' allocation hints, depth and map_nr, wake_batch and
min_shallow_depth, wake_index and ws_active, the wake-up counts of the generation
(6.1: each wait state's wait_cnt; 6.6+: completion_cnt / wakeup_cnt), and which fake
sleepers are queued where and which were woken.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqrt.lib.sbitmap import (
    SBQ_WAIT_QUEUES,
    UINT_MAX,
    SbitmapQueue,
    SbitmapWarning,
    SbqGeneration,
    SbqWait,
)
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import TaskState, Waiters
from tests.kernel_sbitmap import KernelSbq

NR_CPUS = 2
BITS_PER_LONG = 64
NR_SLEEPERS = 5  #: waiter slots 1..NR_SLEEPERS (slot 0 is the CPUs', which never sleep)

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Operations, as often as they are drawn.
OP_NAMES = (
    ["get"] * 3
    + ["fill", "get_shallow", "get_batch", "get_batch"]
    + ["clear"] * 5
    + ["clear_batch"] * 2
    + ["resize", "min_shallow", "recalculate", "wake_all"]
    + ["sleep"] * 5
    + ["finish"] * 2
)

#: Operations per sequence.
NR_OPS = 100


def _ops(seed: int) -> list[tuple[str, int, int]]:
    """A random sequence of (operation, a, b): a and b are raw numbers each operation
    maps onto the state at the time (which CPU, which tag, which wait state...).
    Drawn from a seed rather than built by Hypothesis element by element: Hypothesis
    favours small, repetitive numbers, which rarely line sleepers up on one wait
    state with a batch of frees to count."""
    rng = random.Random(seed)
    return [
        (rng.choice(OP_NAMES), rng.randrange(1 << 16), rng.randrange(1 << 16))
        for _ in range(NR_OPS)
    ]


class Pair:
    """The port (one handle per CPU and per sleeper) and the model, side by side."""

    def __init__(self, gen: SbqGeneration, depth: int, shift: int, round_robin: bool):
        layout = Layout()
        wspec = Waiters.declare(layout, NR_SLEEPERS + 1)
        self.spec = SbitmapQueue.declare(
            layout, "t", depth, NR_CPUS, shift=shift, round_robin=round_robin, generation=gen
        )
        self.arena = Arena.create(layout)
        Waiters.init(self.arena, wspec)
        SbitmapQueue.init(self.arena, self.spec, seed=depth)
        self.fds = Waiters.create_eventfds(wspec)
        self.waiters = [Waiters(self.arena, wspec, self.fds, me) for me in range(NR_SLEEPERS + 1)]
        self.cpu = [
            SbitmapQueue(self.arena, self.spec, self.waiters[0], cpu, seed=cpu)
            for cpu in range(NR_CPUS)
        ]
        self.sleeper = [
            SbitmapQueue(self.arena, self.spec, self.waiters[me], 0, seed=0)
            for me in range(NR_SLEEPERS + 1)
        ]
        self.waits: dict[int, tuple[int, SbqWait]] = {}  #: sleeper -> (ws index, wait)
        self.declared = depth
        self.k = KernelSbq(
            gen.value, depth, self.spec.sb.shift, round_robin, self.cpu[0].sb.alloc_hints()
        )
        self.allocated: list[int] = []

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.arena.close()

    # -- one operation on both ------------------------------------------------------------------

    def step(self, op: str, a: int, b: int) -> None:
        port, k = self.cpu[a % NR_CPUS], self.k
        cpu = a % NR_CPUS
        if op == "get":
            got = (port.get(), k.get(cpu))
            self._took(got)
        elif op == "get_shallow":
            shallow = 1 + b % self.declared
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SbitmapWarning)
                got = (port.get_shallow(shallow), k.get_shallow(cpu, shallow))
            self._took(got)
        elif op == "get_batch":
            nr_tags = 1 + b % (2 if a & 16 else 8)
            got_p, got_k = port.get_batch(nr_tags), k.get_batch(cpu, nr_tags)
            assert got_p == got_k, (op, got_p, got_k)
            mask, offset = got_p
            self.allocated += [offset + i for i in range(BITS_PER_LONG) if mask >> i & 1]
        elif op == "clear" and self.allocated:
            tag = self.allocated.pop(b % len(self.allocated))
            port.clear(tag, cpu)
            k.clear(tag, cpu)
        elif op == "clear_batch" and self.allocated:
            n = 1 + b % min(len(self.allocated), 12)
            tags = [self.allocated.pop((b >> 3) % len(self.allocated)) for _ in range(n)]
            port.clear_batch(0, tags)
            k.clear_batch(0, tags, cpu)
        elif op == "resize":
            depth = 1 + b % self.declared
            port.resize(depth)
            k.resize(depth)
        elif op == "min_shallow":
            v = 1 + b % (self.declared + 4) if b & 1 else UINT_MAX
            port.set_min_shallow_depth(v)
            k.set_min_shallow_depth(v)
        elif op == "recalculate":
            users = 1 + b % (4 if b & 1 else 12)
            port.recalculate_wake_batch(users)
            k.recalculate_wake_batch(users)
        elif op == "sleep":
            me = 1 + b % NR_SLEEPERS
            if me not in self.waits:
                ws_index = a % (SBQ_WAIT_QUEUES if a & 8 else 2)  # often a shared one
                wait = SbqWait()
                self.sleeper[me].prepare_to_wait(ws_index, wait)
                k.prepare_to_wait(ws_index, me)
                self.waits[me] = (ws_index, wait)
        elif op == "finish" and self.waits:
            me = sorted(self.waits)[b % len(self.waits)]
            ws_index, wait = self.waits.pop(me)
            self.sleeper[me].finish_wait(ws_index, wait)
            k.finish_wait(ws_index, me)
        elif op == "fill":  # get until the map is full (or b gets)
            for _ in range(b % 150):
                got = (port.get(), k.get(cpu))
                self._took(got)
                if got[0] < 0:
                    break
        elif op == "wake_all":
            port.wake_all()
            k.wake_all()

    def _took(self, got: tuple[int, int]) -> None:
        assert got[0] == got[1], got
        if got[0] >= 0:
            self.allocated.append(got[0])

    # -- the comparison -------------------------------------------------------------------------

    def check(self, where: str) -> None:
        q, k = self.cpu[0], self.k
        sb, a = q.sb, q.a
        o = self.spec.sb.header.offsets()
        assert (sb.depth, sb.map_nr) == (k.depth, k.map_nr), where
        words = [a.read(sb._word[i]) for i in range(len(k.word))]
        cleared = [a.read(sb._cleared[i]) for i in range(len(k.word))]
        assert words == k.word, (where, "word")
        assert cleared == k.cleared, (where, "cleared")
        assert sb.alloc_hints() == k.alloc_hint, (where, "alloc_hint")
        assert q.wake_batch == k.wake_batch, (where, "wake_batch")
        assert q.min_shallow_depth == k.min_shallow_depth, (where, "min_shallow_depth")
        assert a.read32(o.wake_index) == k.wake_index, (where, "wake_index")
        assert a.read32(o.ws_active) == k.ws_active, (where, "ws_active")
        if k.gen == "legacy":
            wait_cnt = [a.read32(self.spec.ws.addr(i, "wait_cnt")) for i in range(8)]
            assert wait_cnt == [ws.wait_cnt for ws in k.ws], (where, "wait_cnt")
        else:
            counts = (a.read32(o.completion_cnt), a.read32(o.wakeup_cnt))
            assert counts == (k.completion_cnt, k.wakeup_cnt), (where, "completion/wakeup")
        queued = [q.ws[i].waiters() for i in range(SBQ_WAIT_QUEUES)]
        assert queued == [ws.sleepers for ws in k.ws], (where, "wait queues")
        for me in self.waits:
            state = self.waiters[me].a.read32(self.waiters[me].entry(me) + self.waiters[me]._state)
            running = state == TaskState.RUNNING
            assert running == (me in k.woken and not _queued(k, me)), (where, "woken", me)


def _queued(k: KernelSbq, me: int) -> bool:
    return any(me in ws.sleepers for ws in k.ws)


@pytest.mark.parametrize("gen", list(SbqGeneration), ids=lambda g: g.value)
@SETTINGS
@given(
    depth=st.one_of(st.integers(1, 140), st.sampled_from([16, 32, 63, 64, 65, 128])),
    shift=st.sampled_from([-1, -1, -1, 0, 1, 2, 3, 4, 5, 6]),
    round_robin=st.sampled_from([False, False, False, True]),
    seed=st.integers(0, (1 << 32) - 1),
)
def test_port_matches_kernel(gen, depth, shift, round_robin, seed):
    pair = Pair(gen, depth, shift, round_robin)
    try:
        pair.check("init")
        for i, (op, a, b) in enumerate(_ops(seed)):
            pair.step(op, a, b)
            pair.check(f"step {i}: {op}({a}, {b})")
    finally:
        pair.close()
