"""mqrt.lib.ring: scripted interleavings in one process, exact delivery across processes."""

from __future__ import annotations

import os
import struct

import pytest

from mqrt.lib.ring import MpscRing, RingError, SpscRing
from mqrt.lib.shm import Arena, Layout
from tests.helpers import run_processes

ENTRY = struct.Struct("<QQ48x")  # (producer, sequence) padded to 64 bytes


def entry(producer: int, seq: int) -> bytes:
    return ENTRY.pack(producer, seq)


@pytest.fixture
def rings():
    layout = Layout()
    spsc = SpscRing.declare(layout, "spsc", 8, 64)
    mpsc = MpscRing.declare(layout, "mpsc", 8, 64)
    with Arena.create(layout) as arena:
        MpscRing.init(arena, mpsc)
        yield arena, spsc, mpsc


@pytest.mark.parametrize("cls", [SpscRing, MpscRing])
def test_fifo_full_and_empty(rings, cls):
    arena, spsc, mpsc = rings
    spec = spsc if cls is SpscRing else mpsc
    prod, cons = cls(arena, spec), cls(arena, spec)
    assert cons.get() is None and cons.get_many(4) == []
    assert prod.put_many([entry(0, i) for i in range(6)]) == 6
    assert prod.put_many([entry(0, i) for i in range(6, 12)]) == 2  # partial: 2 slots left
    assert not prod.put(entry(0, 99))  # full
    assert len(prod) == 8
    assert cons.get() == entry(0, 0)
    assert cons.get_many(3) == [entry(0, i) for i in range(1, 4)]
    # Wrap around several laps with odd batch sizes.
    expected = 4
    sent = 8
    for _ in range(50):
        sent += prod.put_many([entry(0, sent + i) for i in range(3)])
        for e in cons.get_many(5):
            assert ENTRY.unpack(e) == (0, expected)
            expected += 1
    assert expected + len(prod) == sent


@pytest.mark.parametrize("cls", [SpscRing, MpscRing])
def test_raw_blob_roundtrip(rings, cls):
    arena, spsc, mpsc = rings
    spec = spsc if cls is SpscRing else mpsc
    prod, cons = cls(arena, spec), cls(arena, spec)
    blob = b"".join(entry(1, i) for i in range(5))
    assert prod.put_many(blob) == 5
    assert cons.get_many_raw(8) == blob


@pytest.mark.parametrize("cls", [SpscRing, MpscRing])
def test_wrong_entry_size_is_refused(rings, cls):
    arena, spsc, mpsc = rings
    prod = cls(arena, spsc if cls is SpscRing else mpsc)
    with pytest.raises(RingError, match="entry 1 is 3 bytes, the ring takes 64"):
        prod.put_many([entry(0, 0), b"abc"])
    with pytest.raises(RingError, match="not a whole number"):
        prod.put_many(b"x" * 65)


@pytest.mark.parametrize(
    ("nr", "size", "match"),
    [(6, 64, "nr_entries must be a power of two"), (8, 12, "entry_size must be a multiple")],
)
def test_bad_geometry(nr, size, match):
    with pytest.raises(RingError, match=match):
        SpscRing.declare(Layout(), "r", nr, size)


def test_mpsc_stalled_producer_holds_consumer_at_its_slot(rings):
    """A reserves, B reserves and publishes, A publishes: the consumer sees nothing
    until A's slot is filled, then both in position order."""
    arena, _, mpsc = rings
    a, b, cons = MpscRing(arena, mpsc), MpscRing(arena, mpsc), MpscRing(arena, mpsc)
    pos_a, n_a = a.reserve(1)
    assert (pos_a, n_a) == (0, 1)
    assert b.put(entry(2, 0))
    assert cons.get_many(8) == []
    a.publish(pos_a, entry(1, 0))
    assert cons.get_many(8) == [entry(1, 0), entry(2, 0)]


def test_mpsc_reservation_race_moves_to_the_next_run(rings):
    arena, _, mpsc = rings
    a, b = MpscRing(arena, mpsc), MpscRing(arena, mpsc)
    assert b.reserve(3) == (0, 3)
    assert a.reserve(3) == (3, 3)  # a read tail after b's CAS
    assert a.reserve(4) == (6, 2)  # only two slots left this lap


N_SPSC = 60_000
N_MPSC = 30_000
BATCH = 16


def _yield() -> int:
    os.sched_yield()
    return 0


def _spsc_producer(handle, layout, spec):
    with Arena.attach(handle, layout) as arena:
        ring = SpscRing(arena, spec)
        sent = 0
        while sent < N_SPSC:
            n = min(BATCH, N_SPSC - sent)
            sent += ring.put_many([entry(0, sent + i) for i in range(n)]) or _yield()


def _spsc_consumer(handle, layout, spec):
    with Arena.attach(handle, layout) as arena:
        ring = SpscRing(arena, spec)
        expected = 0
        while expected < N_SPSC:
            got = ring.get_many(BATCH * 2)
            if not got:
                _yield()
            for e in got:
                assert ENTRY.unpack(e) == (0, expected), (ENTRY.unpack(e), expected)
                expected += 1
        assert ring.get() is None


def _mpsc_producer(handle, layout, spec, producer):
    with Arena.attach(handle, layout) as arena:
        ring = MpscRing(arena, spec)
        sent = 0
        while sent < N_MPSC:
            n = min(1 + sent % BATCH, N_MPSC - sent)  # mix single puts and batches
            sent += ring.put_many([entry(producer, sent + i) for i in range(n)]) or _yield()


def _mpsc_consumer(handle, layout, spec, nr_producers):
    with Arena.attach(handle, layout) as arena:
        ring = MpscRing(arena, spec)
        nxt = [0] * nr_producers
        total = 0
        while total < N_MPSC * nr_producers:
            got = ring.get_many(64)
            if not got:
                _yield()
            for e in got:
                producer, seq = ENTRY.unpack(e)
                assert seq == nxt[producer], (producer, seq, nxt[producer])
                nxt[producer] += 1
                total += 1
        assert nxt == [N_MPSC] * nr_producers
        assert ring.get() is None


@pytest.mark.slow
def test_spsc_every_entry_once_and_in_order_across_processes():
    layout = Layout()
    spec = SpscRing.declare(layout, "spsc", 64, 64)
    with Arena.create(layout) as arena:
        args = (arena.handle, layout, spec)
        run_processes((_spsc_producer, args), (_spsc_consumer, args))


@pytest.mark.slow
def test_mpsc_every_entry_once_and_in_order_per_producer():
    nr_producers = 3
    layout = Layout()
    spec = MpscRing.declare(layout, "mpsc", 64, 64)
    with Arena.create(layout) as arena:
        MpscRing.init(arena, spec)
        args = (arena.handle, layout, spec)
        run_processes(
            *[(_mpsc_producer, (*args, p)) for p in range(nr_producers)],
            (_mpsc_consumer, (*args, nr_producers)),
        )
        assert len(MpscRing(arena, spec)) == 0
