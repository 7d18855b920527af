"""Model-based tests (Hypothesis stateful): random operation sequences against a
plain-Python model, invariants checked after every step."""

from __future__ import annotations

import collections
import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mqrt.lib.ring import MpscRing, SpscRing
from mqrt.lib.sbitmap import SbitmapQueue, SbqGeneration
from mqrt.lib.shm import Arena, Layout
from mqrt.lib.wait import Waiters

SETTINGS = settings(
    max_examples=40,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class SbitmapMachine(RuleBasedStateMachine):
    """sbitmap_queue vs a set of allocated tags."""

    def __init__(self):
        super().__init__()
        self.arena = None

    @rule(
        depth=st.integers(1, 130),
        round_robin=st.booleans(),
        generation=st.sampled_from(list(SbqGeneration)),
    )
    @precondition(lambda self: self.arena is None)
    def setup(self, depth, round_robin, generation):
        layout = Layout()
        wspec = Waiters.declare(layout, 2)
        spec = SbitmapQueue.declare(
            layout, "t", depth, 2, round_robin=round_robin, generation=generation
        )
        self.arena = Arena.create(layout)
        Waiters.init(self.arena, wspec)
        SbitmapQueue.init(self.arena, spec, seed=depth)
        self.fds = Waiters.create_eventfds(wspec)
        self.q = [
            SbitmapQueue(self.arena, spec, Waiters(self.arena, wspec, self.fds, c), c)
            for c in (0, 1)
        ]
        self.depth = depth
        self.round_robin = round_robin
        self.allocated: dict[int, int] = {}  # tag -> cpu

    def teardown(self):
        if self.arena is not None:
            self.q = []
            for fd in self.fds:
                os.close(fd)
            self.arena.close()

    @rule(cpu=st.integers(0, 1))
    @precondition(lambda self: self.arena is not None)
    def get(self, cpu):
        nr = self.q[cpu].get()
        if nr == -1:
            if not self.round_robin:  # round-robin may miss bits below the hint
                assert len(self.allocated) == self.depth
        else:
            assert 0 <= nr < self.depth
            assert nr not in self.allocated, f"tag {nr} handed out twice"
            self.allocated[nr] = cpu

    @rule(data=st.data())
    @precondition(lambda self: self.arena is not None and self.allocated)
    def clear(self, data):
        nr = data.draw(st.sampled_from(sorted(self.allocated)))
        cpu = self.allocated.pop(nr)
        self.q[cpu].clear(nr, cpu)

    @rule(nr_tags=st.integers(1, 8))
    @precondition(lambda self: self.arena is not None)
    def get_batch(self, nr_tags):
        mask, offset = self.q[0].get_batch(nr_tags)
        tags = [offset + i for i in range(nr_tags) if mask >> i & 1]
        for t in tags:
            assert t not in self.allocated and t < self.depth
            self.allocated[t] = 0

    @rule(data=st.data())
    @precondition(lambda self: self.arena is not None and len(self.allocated) >= 2)
    def clear_batch(self, data):
        tags = data.draw(
            st.lists(st.sampled_from(sorted(self.allocated)), min_size=1, max_size=4, unique=True)
        )
        for t in tags:
            del self.allocated[t]
        self.q[1].clear_batch(0, tags)

    @invariant()
    def weight_matches_model(self):
        if self.arena is not None:
            sb = self.q[0].sb
            assert sb.weight() == len(self.allocated)
            assert all(sb.test_bit(t) for t in self.allocated)


class RingMachine(RuleBasedStateMachine):
    """SPSC and MPSC rings vs a deque."""

    ENTRY = struct.Struct("<Q56x")

    def __init__(self):
        super().__init__()
        self.arena = None

    @rule(mpsc=st.booleans(), order=st.integers(1, 4))
    @precondition(lambda self: self.arena is None)
    def setup(self, mpsc, order):
        self.size = 1 << order
        cls = MpscRing if mpsc else SpscRing
        layout = Layout()
        spec = cls.declare(layout, "r", self.size, 64)
        self.arena = Arena.create(layout)
        if mpsc:
            MpscRing.init(self.arena, spec)
        self.prod = cls(self.arena, spec)
        self.cons = cls(self.arena, spec)
        self.model: collections.deque[int] = collections.deque()
        self.next = 0

    def teardown(self):
        if self.arena is not None:
            self.prod = self.cons = None
            self.arena.close()

    @rule(n=st.integers(0, 20))
    @precondition(lambda self: self.arena is not None)
    def put_many(self, n):
        entries = [self.ENTRY.pack(self.next + i) for i in range(n)]
        took = self.prod.put_many(entries)
        assert took == min(n, self.size - len(self.model))
        self.model.extend(range(self.next, self.next + took))
        self.next += took

    @rule(n=st.integers(1, 20))
    @precondition(lambda self: self.arena is not None)
    def get_many(self, n):
        got = [self.ENTRY.unpack(e)[0] for e in self.cons.get_many(n)]
        want = [self.model.popleft() for _ in range(min(n, len(self.model)))]
        assert got == want

    @invariant()
    def length(self):
        if self.arena is not None:
            assert len(self.prod) == len(self.model)


TestSbitmapModel = SbitmapMachine.TestCase
TestSbitmapModel.settings = SETTINGS
TestRingModel = RingMachine.TestCase
TestRingModel.settings = SETTINGS
