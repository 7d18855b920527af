"""mqrt.lib._atomic: semantics in one process, exact totals across real processes."""

from __future__ import annotations

import mmap
import random
import re
import subprocess
import sys
import textwrap

import pytest

from mqrt.lib import _atomic
from mqrt.lib._atomic import AtomicView, TraceWriter
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


def test_percpu_add_adds_only_while_the_flags_word_is_zero(view):
    # flags at 0, the counter at 64
    assert view.percpu_add(0, 64, 3) is True and view.read(64) == 3
    assert view.percpu_add(0, 64, -1 % (1 << 64)) is True and view.read(64) == 2
    view.set(0, 1)  # atomic mode: nothing changes
    assert view.percpu_add(0, 64, 5) is False and view.read(64) == 2
    view.set(0, 0)
    assert view.percpu_add(0, 64, -3 % (1 << 64)) is True and view.read(64) == (1 << 64) - 1


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


def test_find_and_set_zero_bit_at(view):
    # a map of 40 bits in words 128 bytes apart from 256, 16 bits to a word: the last
    # word (2) holds bits 32..39
    at = view.find_and_set_zero_bit_at
    assert [at(256, 128, 4, 40, 35) for _ in range(9)] == [*range(32, 40), -1]
    assert view.read(256 + 2 * 128) == 0xFF
    assert [at(256, 128, 4, 40, 17) for _ in range(3)] == [16, 17, 18]  # from bit 0
    view.set(256 + 128, 0xFFFF)
    assert at(256, 128, 4, 40, 20) == -1  # word 1 full
    assert at(256, 128, 4, 40, 0) == 0
    with pytest.raises(ValueError, match="hint 40 out of range"):
        at(256, 128, 4, 40, 40)
    with pytest.raises(ValueError, match="bad map geometry"):
        at(256, 100, 4, 40, 0)
    with pytest.raises(IndexError, match="offset 6016 out of range"):
        at(256, 1920, 4, 64, 48)  # word 3 past the buffer
    with pytest.raises(IndexError, match="out of range"):
        at(2**70, 128, 4, 40, 0)


def test_deferred_clear_bit_at(view):
    # cleared masks 128 bytes apart from 256, 16 bits to a word; ws_active at 0, the
    # hint at 8, depth at 16
    clear = view.deferred_clear_bit_at
    view.set32(16, 40)
    assert clear(256, 128, 4, 35, 0, 8, 16) == 0
    assert view.read(256 + 2 * 128) == 1 << 3
    assert view.read32(8) == 35  # nobody asleep: the hint follows
    view.set32(16, 30)  # a resize below the bit: sbitmap_update_cpu_hint() leaves it
    assert clear(256, 128, 4, 17, 0, 8, 16) == 0 and view.read32(8) == 17
    assert clear(256, 128, 4, 33, 0, 8, 16) == 0 and view.read32(8) == 17
    view.set32(0, 2)  # sleepers: ws_active returned, the hint left to the caller
    assert clear(256, 128, 4, 1, 0, 8, 16) == 2
    assert view.read(256) == 1 << 1 and view.read32(8) == 17
    view.set32(0, 0)
    assert clear(256, 128, 4, 2, 0, -1, 16) == 0  # round-robin: no hint
    assert view.read(256) == 0b110 and view.read32(8) == 17
    with pytest.raises(ValueError, match="bit -1"):
        clear(256, 128, 4, -1, 0, 8, 16)
    with pytest.raises(IndexError, match="out of range"):
        clear(256, 128, 4, 35, 4096, 8, 16)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda v: v.read(4096), IndexError, "offset 4096 out of range"),
        (lambda v: v.read(-8), IndexError, "out of range"),
        (lambda v: v.read(sys.maxsize), IndexError, "out of range"),  # off + 8 overflows
        (lambda v: v.read32(sys.maxsize - 3), IndexError, "out of range"),
        (lambda v: v.fetch_add(2**64, 1), IndexError, "out of range"),  # no Py_ssize_t
        (lambda v: v.test_and_set_bit(-(2**70), 0), IndexError, "out of range"),
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


def test_uninitialised_view_raises_everywhere():
    v = AtomicView.__new__(AtomicView)
    assert v.released and v.nbytes == 0
    calls = [
        lambda: v.read(0),
        lambda: v.set(0, 1),
        lambda: v.load_acquire(0),
        lambda: v.store_release(0, 1),
        lambda: v.cmpxchg(0, 0, 1),
        lambda: v.xchg(0, 1),
        lambda: v.fetch_add(0, 1),
        lambda: v.fetch_sub(0, 1),
        lambda: v.fetch_or(0, 1),
        lambda: v.fetch_and(0, 1),
        lambda: v.fetch_andnot(0, 1),
        lambda: v.read32(0),
        lambda: v.set32(0, 1),
        lambda: v.load_acquire32(0),
        lambda: v.store_release32(0, 1),
        lambda: v.cmpxchg32(0, 0, 1),
        lambda: v.xchg32(0, 1),
        lambda: v.fetch_add32(0, 1),
        lambda: v.fetch_sub32(0, 1),
        lambda: v.fetch_or32(0, 1),
        lambda: v.fetch_and32(0, 1),
        lambda: v.test_bit(0, 1),
        lambda: v.set_bit(0, 1),
        lambda: v.clear_bit(0, 1),
        lambda: v.clear_bit_unlock(0, 1),
        lambda: v.test_and_set_bit(0, 1),
        lambda: v.test_and_set_bit_lock(0, 1),
        lambda: v.test_and_clear_bit(0, 1),
        lambda: v.find_and_set_zero_bit(0, 64, 0, True),
        lambda: TraceWriter(v, 0, 2, 0, 0, 0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="uninitialised"):
            call()
    v.release()  # idempotent, also before any __init__
    with v:
        pass


def test_reinitialised_view_uses_the_new_buffer_and_a_failed_one_changes_nothing():
    big, small = mmap.mmap(-1, 4096), mmap.mmap(-1, 64)
    v = AtomicView(small)
    v.set(56, 7)
    v.__init__(big)
    assert v.nbytes == 4096 and v.read(56) == 0
    v.set(4088, 1)
    small.close()  # the first buffer's export went with the re-initialisation
    with pytest.raises(BufferError):
        v.__init__(b"read-only")
    assert v.nbytes == 4096 and v.read(4088) == 1  # still on big
    v.release()
    big.close()


def test_trace_writer_reinitialised_rebinds_and_a_failed_one_changes_nothing():
    m1, m2 = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
    v1, v2 = AtomicView(m1), AtomicView(m2)
    w = TraceWriter(v1, 64, 8, 0, 0, 0)
    w.emit(1)
    w.__init__(v2, 64, 8, 0, 0, 10)
    w.emit(1)
    assert (v1.read(0), v2.read(0), w.position) == (1, 11, 11)
    with pytest.raises(ValueError, match="does not fit"):
        w.__init__(v1, 4096 - 64, 8, 0, 0, 0)
    w.emit(1)
    assert (v1.read(0), v2.read(0), w.position) == (1, 12, 12)
    v1.release()
    v2.release()
    with pytest.raises(ValueError, match="released"):
        w.emit(1)
    m1.close()
    m2.close()


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


#: A bitmap for the sbitmap primitives: 40 bits over 3 words of 16 (the last partial),
#: their cleared masks on the next line, a swap lock per word.
SB_WORDS, SB_DEPTH, SB_SHIFT = 3, 40, 4
SB_WORD = cacheline_struct([("word", "<u8")], [("cleared", "<u8"), ("swap_lock", "<u8")])
SB_STATE = cacheline_struct(
    [("ws_active", "<i4")], [("depth", "<u4")], [("taken", "<u8")], [("freed", "<u8")]
)
SB_HINTS = cacheline_struct([("hint", "<u4")])
SB_OWNERS = cacheline_struct([("owners", "<u8")])


def _sbitmap_hammer(handle, layout, cpu):
    """Take bits with find_and_set_zero_bit_at from the hint's word, folding a full word
    (xchg of cleared + andnot under the swap lock), and give them back with
    deferred_clear_bit_at; a per-bit owner count catches a bit handed out twice."""
    words, state, hints, owners = (layout[n] for n in ("words", "state", "hints", "owners"))
    so = state.offsets()
    stride = words.stride
    rng = random.Random(cpu)
    with Arena.attach(handle, layout) as arena:
        a = arena.atomic
        held: list[int] = []
        for _ in range(LOOPS):
            if len(held) < 6 and rng.random() < 0.6:
                hint = a.read32(hints.addr(cpu))
                nr = a.find_and_set_zero_bit_at(words.addr(0), stride, SB_SHIFT, SB_DEPTH, hint)
                if nr == -1:
                    index = hint >> SB_SHIFT
                    lock = words.addr(index, "swap_lock")
                    while a.test_and_set_bit_lock(lock, 0):
                        _atomic.cpu_relax()
                    mask = a.xchg(words.addr(index, "cleared"), 0)
                    a.fetch_andnot(words.addr(index, "word"), mask)
                    a.clear_bit_unlock(lock, 0)
                    a.set32(hints.addr(cpu), rng.randrange(SB_DEPTH))
                    continue
                assert a.fetch_add(owners.addr(nr), 1) == 0, f"bit {nr} owned twice"
                a.fetch_add(so.taken, 1)
                held.append(nr)
            elif held:
                nr = held.pop(rng.randrange(len(held)))
                assert a.fetch_sub(owners.addr(nr), 1) == 1
                a.fetch_add(so.freed, 1)
                assert not a.deferred_clear_bit_at(
                    words.addr(0, "cleared"), stride, SB_SHIFT, nr, so.ws_active,
                    hints.addr(cpu), so.depth,
                )  # fmt: skip
                assert a.read32(hints.addr(cpu)) == nr  # nobody asleep: the hint is nr
        for nr in held:
            a.fetch_sub(owners.addr(nr), 1)
            a.fetch_add(so.freed, 1)
            a.deferred_clear_bit_at(
                words.addr(0, "cleared"), stride, SB_SHIFT, nr, so.ws_active, -1, so.depth
            )


@pytest.mark.slow
def test_sbitmap_primitives_exact_totals_across_processes():
    layout = Layout()
    words = layout.add("words", SB_WORD, SB_WORDS)
    state = layout.add("state", SB_STATE)
    layout.add("hints", SB_HINTS, NPROC)
    owners = layout.add("owners", SB_OWNERS, SB_DEPTH)
    with Arena.create(layout) as arena:
        a = arena.atomic
        a.set32(state.offsets().depth, SB_DEPTH)
        run_processes(*[(_sbitmap_hammer, (arena.handle, layout, i)) for i in range(NPROC)])
        so = state.offsets()
        assert a.read(so.taken) == a.read(so.freed) > NPROC * LOOPS // 4
        # every bit taken was given back: each word's set bits are its cleared ones
        for i in range(SB_WORDS):
            assert a.read(words.addr(i, "word")) == a.read(words.addr(i, "cleared"))
        assert all(a.read(owners.addr(nr)) == 0 for nr in range(SB_DEPTH))


# Paths that would write through a NULL or stale pointer without their checks: each runs
# in a child, so a regression fails the test (with the signal in its message) instead
# of killing the test process.  The child prints "ExceptionType: message" per call.

_PRELUDE = """
import mmap
from mqrt.lib._atomic import AtomicView, TraceWriter

def outcome(call):
    try:
        call()
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
    else:
        print("no exception", flush=True)

class Index:
    \"\"\"An integer whose conversion runs code (`then`) first.\"\"\"
    def __init__(self, value, then):
        self.value, self.then = value, then
    def __index__(self):
        self.then()
        return self.value
"""


def _run_isolated(body: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (negative: killed by that signal)\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return proc.stdout.splitlines()


def _assert_raised(lines: list[str], *expected: tuple[type[BaseException], str]) -> None:
    assert len(lines) == len(expected), lines
    for line, (exc, pattern) in zip(lines, expected, strict=True):
        assert line.startswith(f"{exc.__name__}: "), line
        assert re.search(pattern, line), line


def test_unbound_trace_writer_raises():
    lines = _run_isolated("""
        w = TraceWriter.__new__(TraceWriter)
        outcome(lambda: w.emit(1))
        outcome(lambda: w.emit(1, 2, 3, 4, 5, 6))
        outcome(lambda: w.emit(ev=1, arg=2))
        print(w.position)
    """)
    assert lines[-1] == "0"
    _assert_raised(lines[:-1], *[(ValueError, "TraceWriter is not bound")] * 3)


def test_trace_writer_on_a_view_reinitialised_smaller_raises():
    # The ring sat at 512 KiB of the first buffer; the view now holds 4 KiB.
    lines = _run_isolated("""
        big, small = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 4096)
        v = AtomicView(big)
        w = TraceWriter(v, 1 << 19, 1024, 0, 0, 0)
        w.emit(1)
        v.__init__(small)
        big.close()
        for _ in range(3):
            outcome(lambda: w.emit(1))
        print(w.position, v.read(0), bytes(small) == bytes(4096))
    """)
    assert lines[-1] == "1 0 True"  # nothing written, not even to the new buffer
    _assert_raised(lines[:-1], *[(ValueError, "re-initialised")] * 3)


# Each call converts an argument whose __index__ releases the view and unmaps its
# buffer: the operation must notice, not write to the unmapped address it had computed.
_RELEASE_AND_UNMAP = """
    m = mmap.mmap(-1, 1 << 20)
    v = AtomicView(m)
    w = TraceWriter(v, 1 << 19, 1024, 64, 0, 0)
    def gone():
        v.release()
        m.close()
    x = Index(1, gone)
"""


@pytest.mark.parametrize(
    "call",
    [
        "v.set(8, x)",
        "v.store_release32(8, x)",
        "v.fetch_add(8, x)",
        "v.fetch_andnot(8, x)",
        "v.xchg32(8, x)",
        "v.cmpxchg(8, x, 2)",
        "v.cmpxchg32(8, 0, x)",
        "v.test_bit(8, x)",
        "v.test_and_set_bit(8, x)",
        "v.clear_bit_unlock(8, x)",
        "v.find_and_set_zero_bit(8, x, 0, True)",
        "v.find_and_set_zero_bit(8, 64, x, True)",
        "v.find_and_set_zero_bit_at(8, 128, 4, 40, x)",
        "v.deferred_clear_bit_at(8, 128, 4, x, 0, 16, 24)",
        "v.deferred_clear_bit_at(8, 128, x, 1, 0, 16, 24)",
        "w.emit(1, x)",
        "w.emit(1, arg=x)",
    ],
)
def test_argument_conversion_that_releases_the_view_raises(call):
    lines = _run_isolated(textwrap.dedent(_RELEASE_AND_UNMAP) + f"outcome(lambda: {call})\n")
    _assert_raised(lines, (ValueError, "released"))


def test_argument_conversion_that_reinitialises_the_view_smaller_raises():
    lines = _run_isolated("""
        big, small = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 4096)
        v = AtomicView(big)
        w = TraceWriter(v, 1 << 19, 1024, 64, 0, 0)
        def shrink():
            v.__init__(small)
            big.close()
        outcome(lambda: v.set(1 << 19, Index(1, shrink)))
        print(bytes(small) == bytes(4096))
        v.__init__(big := mmap.mmap(-1, 1 << 20))
        w = TraceWriter(v, 1 << 19, 1024, 64, 0, 0)
        outcome(lambda: w.emit(1, Index(2, shrink)))
        print(bytes(small) == bytes(4096))
    """)
    assert lines[1] == lines[3] == "True"
    _assert_raised(
        [lines[0], lines[2]], (IndexError, "out of range"), (ValueError, "re-initialised")
    )
