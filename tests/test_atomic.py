"""mqrt.lib._atomic: semantics in one process, exact totals across real processes."""

from __future__ import annotations

import mmap

import pytest

from mqrt.lib import _atomic
from mqrt.lib._atomic import AtomicView
from mqrt.lib.shm import Arena, Layout, cacheline_struct
from tests.helpers import run_processes

COUNTERS = cacheline_struct(
    [("fetch_add", "<u8")],
    [("cmpxchg", "<u8")],
    [("locked", "<u8"), ("lock", "<u8")],
    [("bits", "<u8")],
    [("signed", "<i4")],
)
NPROC = 4
LOOPS = 20_000


@pytest.fixture
def view():
    m = mmap.mmap(-1, 4096)
    v = AtomicView(m)
    yield v
    v.release()
    m.close()


def test_rmw_return_old_values(view):
    assert view.fetch_add(0, 5) == 0
    assert view.fetch_sub(0, 2) == 5
    assert view.read(0) == 3
    assert view.cmpxchg(0, 3, 10) == 3 and view.read(0) == 10
    assert view.cmpxchg(0, 3, 99) == 10 and view.read(0) == 10  # failed: unchanged
    assert view.xchg(0, 0xF0) == 10
    assert view.fetch_or(0, 0x0F) == 0xF0
    assert view.fetch_and(0, 0x3C) == 0xFF
    assert view.fetch_andnot(0, 0x0C) == 0x3C
    assert view.read(0) == 0x30


def test_64bit_words_are_unsigned_and_wrap(view):
    view.set(8, -1)
    assert view.read(8) == 2**64 - 1
    assert view.fetch_add(8, 1) == 2**64 - 1
    assert view.load_acquire(8) == 0
    view.store_release(8, 2**64 + 7)
    assert view.read(8) == 7


def test_32bit_words_are_signed(view):
    assert view.fetch_sub32(16, 1) == 0
    assert view.read32(16) == -1
    assert view.read(16) == 0xFFFFFFFF  # the neighbouring 32 bits are untouched
    assert view.cmpxchg32(16, -1, 2**31 - 1) == -1
    assert view.fetch_add32(16, 1) == 2**31 - 1
    assert view.read32(16) == -(2**31)  # wraps like atomic_t
    view.set32(20, 3)
    assert view.xchg32(20, 4) == 3 and view.load_acquire32(20) == 4
    view.store_release32(20, 6)
    assert view.fetch_or32(20, 1) == 6 and view.fetch_and32(20, 3) == 7


def test_bitops(view):
    assert view.test_and_set_bit(24, 63) is False
    assert view.test_and_set_bit(24, 63) is True
    assert view.test_bit(24, 63) and not view.test_bit(24, 0)
    assert view.test_and_set_bit_lock(24, 0) is False
    view.clear_bit_unlock(24, 0)
    view.set_bit(24, 5)
    assert view.test_and_clear_bit(24, 5) is True
    view.clear_bit(24, 63)
    assert view.read(24) == 0
    with pytest.raises(ValueError, match="bit number 64"):
        view.set_bit(24, 64)


def test_find_and_set_zero_bit(view):
    off = 32
    assert view.find_and_set_zero_bit(off, 4, 0, True) == 0
    assert view.find_and_set_zero_bit(off, 4, 2, False) == 2
    assert view.find_and_set_zero_bit(off, 4, 2, False) == 3
    assert view.find_and_set_zero_bit(off, 4, 2, False) == -1  # no wrap: bit 1 not seen
    assert view.find_and_set_zero_bit(off, 4, 2, True) == 1  # wrap finds it
    assert view.find_and_set_zero_bit(off, 4, 0, True) == -1  # full
    assert view.read(off) == 0b1111
    view.set(off, 0)
    for nr in range(64):
        assert view.find_and_set_zero_bit(off, 64, 0, True) == nr
    assert view.find_and_set_zero_bit(off, 64, 17, True) == -1
    assert view.find_and_set_zero_bit(off, 0, 0, True) == -1


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda v: v.read(4096), IndexError, "offset 4096 out of range"),
        (lambda v: v.read(-8), IndexError, "out of range"),
        (lambda v: v.set(4092, 1), IndexError, "out of range"),
        (lambda v: v.read32(4096), IndexError, "out of range"),
        (lambda v: v.fetch_add(3, 1), ValueError, "not 8-byte aligned"),
        (lambda v: v.cmpxchg32(2, 0, 1), ValueError, "not 4-byte aligned"),
        (lambda v: v.find_and_set_zero_bit(0, 65, 0, True), ValueError, "depth 65"),
        (lambda v: v.read("x"), TypeError, "integer"),
        (lambda v: v.cmpxchg(0, 1), TypeError, "takes 3 arguments"),
    ],
)
def test_bad_access_raises_never_crashes(view, call, exc, match):
    with pytest.raises(exc, match=match):
        call(view)


def test_released_view_raises():
    m = mmap.mmap(-1, 64)
    with AtomicView(m) as v:
        v.set(0, 1)
    assert v.released and v.nbytes == 0
    with pytest.raises(ValueError, match="released"):
        v.read(0)
    m.close()  # the export is gone, so the mapping can close


def test_readonly_buffer_is_refused():
    with pytest.raises(BufferError):
        AtomicView(b"x" * 64)


def test_fence_and_cpu_relax():
    assert _atomic.fence() is None
    assert _atomic.cpu_relax() is None


def _hammer(handle, layout, index):
    region = layout["counters"]
    o = region.offsets()
    with Arena.attach(handle, layout) as arena:
        a = arena.atomic
        for _ in range(LOOPS):
            a.fetch_add(o.fetch_add, 1)
            old = a.read(o.cmpxchg)
            while (seen := a.cmpxchg(o.cmpxchg, old, old + 1)) != old:
                old = seen
            # A bit spinlock around a plain, non-atomic read-modify-write.
            while a.test_and_set_bit_lock(o.lock, 0):
                _atomic.cpu_relax()
            arena.buf[o.locked : o.locked + 8] = (
                int.from_bytes(arena.buf[o.locked : o.locked + 8], "little") + 1
            ).to_bytes(8, "little")
            a.clear_bit_unlock(o.lock, 0)
            a.fetch_sub32(o.signed, 1)
        assert not a.test_and_set_bit(o.bits, index)


def test_exact_totals_across_processes():
    layout = Layout()
    region = layout.add("counters", COUNTERS)
    with Arena.create(layout) as arena:
        run_processes(*[(_hammer, (arena.handle, layout, i)) for i in range(NPROC)])
        (row,) = arena.view(region)
        assert int(row["fetch_add"]) == NPROC * LOOPS
        assert int(row["cmpxchg"]) == NPROC * LOOPS
        assert int(row["locked"]) == NPROC * LOOPS
        assert int(row["lock"]) == 0
        assert int(row["bits"]) == (1 << NPROC) - 1
        assert int(row["signed"]) == -NPROC * LOOPS
        del row
