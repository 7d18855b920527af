"""Port of ``lib/sbitmap.c`` and ``include/linux/sbitmap.h``: the scalable bitmap and
the tag allocator's ``sbitmap_queue``, shared by real processes.

Design
    A tag space of ``depth`` bits is spread over ``map_nr`` words of
    ``1 << shift`` bits, each word on its own cache line with its ``cleared`` mask on
    the next, so CPUs allocating from different words do not bounce lines.  Each
    CPU keeps an allocation hint (``alloc_hint[cpu]``) and starts searching at its
    word; a freed tag's bit goes back as that CPU's hint (cache locality).  Frees
    are *deferred*: a free sets the bit in ``cleared``; an allocator that finds a
    word full folds ``cleared`` back into ``word`` under the word's ``swap_lock``
    (one xchg and one andnot instead of one atomic per free).

    ``sbitmap_queue`` adds sleeping: 8 wait states (``ws``) with a wait queue each,
    ``ws_active`` counting sleepers (so a free with nobody asleep costs one load),
    and ``wake_batch``: waiters are woken only once that many bits have been freed.

Generations (:class:`SbqGeneration`, ``mqrt bench --sbitmap``)
    Each names the kernel release whose ``lib/sbitmap.c`` it follows (read for the
    port: v6.1; a 6.5-6.10 tree that is v6.6's code; 42e6c6ce03fd's patch on top of
    it for v6.17).  A fix that landed after that release is carried by default and
    is a switch: its catalogue entry (:mod:`mqrt.race.catalogue`) puts the old code
    back.  (The stable series took some of these later, e.g. 4f1731df60f9 went to
    6.3.y and 72d04bdcf3f7 to several; a generation is the release, not its
    stable tree.)

    * ``LEGACY``, v6.1: a per-wait-state ``wait_cnt`` counts frees down; the free
      that takes it to zero wakes ``wake_batch`` waiters on that state, advances
      ``wake_index`` and resets the count (040b83fcecfb, 4acb83417cad, 48c033314f37
      are all in 6.1).  It keeps the lost wake-up 30514bd2dd4e accepts (a free skips
      a wait state whose count a waker holds at 0; with only that one holding
      sleepers it wakes nobody), which 4f8126bb2308 (6.2) removes with the counts;
      the woken tasks' eventfds are written after the reset, so a waker does not
      hand its host core away while it holds a count at 0.  A shallow depth limits
      each word; ``wake_batch`` counts the bits usable per word under
      ``min_shallow_depth``.  Later fixes it carries:
      b5fcf7871acb (6.3, no floor of 4 on the recalculated batch:
      ``wake_batch_min4``), 4f1731df60f9 (6.5, active_queues and wake_batch changed
      under tags->lock, in :mod:`mqrt.block.blk_mq_tag`: ``active_queues_unlocked``),
      72d04bdcf3f7 (6.11, the ``cleared`` fold under ``swap_lock``:
      ``cleared_race``).
    * ``CURRENT``, v6.6: global ``completion_cnt``/``wakeup_cnt`` (4f8126bb2308,
      6.2); every ``wake_batch`` frees wake up to ``wake_batch`` waiters, scanning
      the wait states from ``wake_index`` and advancing the index first
      (106397376c03, 6.5).  Shallow depth and ``wake_batch`` as in 6.1.  Later fix it
      carries: 72d04bdcf3f7 (6.11: ``cleared_race``).
    * ``NEWEST``, v6.17: as v6.6, but a shallow depth is of the whole bitmap, spread
      over the words in proportion (``__map_depth_with_shallow``; a word whose share
      is 0 is not searched), and ``wake_batch = clamp(min(depth,
      min_shallow_depth) / 8, 1, 8)`` (42e6c6ce03fd, "lib/sbitmap: convert
      shallow_depth from one word to the whole sbitmap", 6.17).  No later fix.

    Older bugs the catalogue can switch on in any generation: 180dccb0dba4,
    10825410b956, 6c0ca7ae292a (``wake_batch_fair_share``,
    ``wake_batch_above_depth``, ``resize_wakeup_hang``), min_shallow_depth of 4.18
    (``shallow_missed_wakeup``), 4acb83417cad and 48c033314f37 in the legacy wake-up
    (``batch_counted_once``, ``wait_cnt_left_at_zero``).  The code keeps the kernel's
    shape (same function boundaries, same names) so each fix has one place.
    ``tests/test_sbitmap_kernel.py`` runs random operation sequences on this port and
    on a plain transcription of each release's functions (``tests/kernel_sbitmap.py``).

Deviations from Linux
    * Per-CPU variables are per *emulated* CPU slots in shared memory, each on its
      own cache line; "this CPU" is the ``cpu`` the handle was built for.
    * ``resize`` cannot grow the bitmap past the depth it was declared with (the
      kernel sizes ``map`` at init too).
    * Sleeping uses :mod:`mqrt.lib.wait` (eventfds, real processes); wait states refer to
      waiters by slot.
    * The word search loop (``__sbitmap_get_word``: find_next_zero_bit +
      test_and_set_bit_lock) is one C call, :meth:`AtomicView.find_and_set_zero_bit`
      (``find_and_set_zero_bit_at`` on the word of a hint, for :meth:`Sbitmap.get`'s
      fast path).
    * :meth:`SbitmapQueue.clear` up to its wake-up (the deferred clear bit, the
      ``ws_active`` test, and with nobody asleep the hint update) is one C call,
      :meth:`AtomicView.deferred_clear_bit_at`; :meth:`SbitmapQueue._clear` is the
      same in steps (run when fault injection is armed).
    * ``__map_depth`` in get()'s fast path is ``min(bits_per_word, depth - first bit of
      the word)``, from ``depth`` alone; the kernel tests ``index == map_nr - 1``.  The
      two differ only while a resize has stored one of depth and map_nr and not yet
      the other.

Concurrency (who writes what; every RMW through :mod:`mqrt.lib._atomic`)
    * ``word``: any CPU; bits set by test_and_set_bit_lock (acquire), cleared in
      bulk by the fold (andnot, fully ordered) or directly by :meth:`Sbitmap.clear_bit`
      and ``clear_batch``.
    * ``cleared``: any CPU sets bits (fetch_or, fully ordered: it doubles as the
      kernel's smp_mb__after_atomic before the ``ws_active`` check); only the fold,
      under ``swap_lock``, takes it (xchg).  Invariant: a bit set in ``cleared`` is
      in use in ``word`` until the fold.
    * ``alloc_hint[cpu]``: written by that CPU (get) and by whoever frees a tag it
      allocated (clear: sbitmap_update_cpu_hint), plain 32-bit stores racing as in
      the kernel (it is a hint); read by that CPU, and by anyone for show().
    * ``depth``, ``map_nr``, ``wake_batch``, ``min_shallow_depth``: written by the
      configuring process (init, resize, recalculate), read by all with relaxed
      loads (READ_ONCE); like the kernel, a resize under load is not atomic with
      concurrent gets.
    * ``ws_active``, ``wake_index``, ``completion_cnt``, ``wakeup_cnt``,
      ``ws[i].wait_cnt``: atomics; the wait queues: see :mod:`mqrt.lib.wait`.
    * Every retry branch (a lost cmpxchg, a wake-up going round again, a search
      after a fold) counts in :mod:`mqrt.lib.retries`: the livelock detector's
      evidence, outside the algorithms the race catalogue swaps.

How to benchmark
    ``mqrt microbench`` reports ``sbitmap.get_put`` (one process) and
    ``sbitmap.get_put.contended`` (several processes on one bitmap).
"""

from __future__ import annotations

import enum
import io
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from mqrt.lib import inject, lockstat, retries, trace
from mqrt.lib._atomic import AtomicView, fence
from mqrt.lib.lockstat import LockClass
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct
from mqrt.lib.trace import Ev
from mqrt.lib.wait import WAIT_QUEUE_HEAD, Waiters, WaitQueue, spin_lock_contended

#: Number of wait queues in a sbitmap_queue.
SBQ_WAIT_QUEUES = 8
#: Maximum number of bits freed before waiters are woken.
SBQ_WAKE_BATCH = 8
BITS_PER_LONG = 64
UINT_MAX = 0xFFFFFFFF
_WORD_MASK = (1 << BITS_PER_LONG) - 1

#: struct sbitmap_word: the bits, then ``cleared`` and its lock on the next line.
SBITMAP_WORD = cacheline_struct(
    [("word", "<u8")],
    [("cleared", "<u8"), ("swap_lock", "<u8")],
)

#: The scalar part of struct sbitmap + struct sbitmap_queue.
SBQ_HEADER = cacheline_struct(
    # Read-mostly configuration (written by init/resize/recalculate only).
    [
        ("depth", "<u4"),  # number of bits used in the whole bitmap
        ("shift", "<u4"),  # log2(number of bits used per word)
        ("map_nr", "<u4"),  # number of words in use
        ("round_robin", "<u4"),  # allocate bits in strict round-robin order
        ("wake_batch", "<u4"),  # bits to free before waking waiters
        ("min_shallow_depth", "<u4"),  # smallest shallow depth ever passed to get_shallow
    ],
    [("ws_active", "<i4")],  # sleepers on any wait state
    [("wake_index", "<i4")],  # next wait state to wake
    [("completion_cnt", "<i4"), ("wakeup_cnt", "<i4")],  # CURRENT generation only
    # instrumentation for the race detectors, never read by the wait logic: bits freed
    # back to this map, and frees under way (their clear and wake-up not yet returned),
    # counted by the block layer's free paths while SbitmapQueue.count_frees is on
    [("frees", "<u4"), ("freeing", "<u4")],
)

#: Per-CPU allocation hint, one cache line each.
ALLOC_HINT = cacheline_struct([("hint", "<u4")])

#: struct sbq_wait_state.
SBQ_WAIT_STATE = cacheline_struct([("wait_cnt", "<i4"), ("wait", WAIT_QUEUE_HEAD)])


_EV_WAKE_UP, _EV_WAKE_BATCH = int(Ev.WAKE_UP), int(Ev.WAKE_BATCH)


class SbqGeneration(enum.Enum):
    """Which kernel's sbitmap_queue a bitmap runs (see the module docstring)."""

    LEGACY = "legacy"  #: v6.1: per wait state wait_cnt, per-word shallow depth
    CURRENT = "current"  #: v6.6: completion_cnt / wakeup_cnt, per-word shallow depth
    NEWEST = "newest"  #: v6.17: as v6.6, with a shallow depth of the whole bitmap

    @property
    def wait_cnt(self) -> bool:
        """True: the <= 6.1 wake-up (a wait_cnt per wait state)."""
        return self is SbqGeneration.LEGACY

    @property
    def whole_map_shallow(self) -> bool:
        """True: shallow depths are of the whole bitmap (42e6c6ce03fd, 6.17)."""
        return self is SbqGeneration.NEWEST


class SbitmapWarning(RuntimeWarning):
    """The kernel would WARN_ON_ONCE here."""


def calculate_shift(depth: int) -> int:
    """sbitmap_calculate_shift(): bits per word as log2, spreading a small bitmap
    over at least 4 words (cache lines)."""
    shift = BITS_PER_LONG.bit_length() - 1
    if depth >= 4:
        while (4 << shift) > depth:
            shift -= 1
    return shift


@dataclass(frozen=True)
class SbitmapSpec:
    """Geometry and placement of one sbitmap (picklable, data-free)."""

    name: str
    depth: int  #: bits allocated; resize may lower the depth in use, never raise it
    shift: int
    nr_cpus: int
    round_robin: bool
    header: Region
    words: Region
    hints: Region

    @property
    def map_nr(self) -> int:
        return (self.depth + (1 << self.shift) - 1) >> self.shift


@dataclass(frozen=True)
class SbitmapQueueSpec:
    sb: SbitmapSpec
    generation: SbqGeneration
    ws: Region


#: addresses(): per spec (by identity), its offsets; bounded (tests make many runs)
_ADDRESSES: dict[int, tuple[SbitmapSpec, tuple[list[int], list[int], list[int], list[int]]]] = {}


def addresses(spec: SbitmapSpec) -> tuple[list[int], list[int], list[int], list[int]]:
    """The offsets of ``spec``'s per-CPU hints and of its words' ``word``, ``cleared``
    and ``swap_lock``: the same for every CPU, computed once per spec and shared by
    its handles (read only).  The runtime computes them before it forks the CPUs,
    which inherit them: a CPU's handle on a map is then O(1), not O(CPUs + words)."""
    hit = _ADDRESSES.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    w = spec.words
    out = (
        [spec.hints.addr(c) for c in range(spec.nr_cpus)],
        [w.addr(i, "word") for i in range(w.count)],
        [w.addr(i, "cleared") for i in range(w.count)],
        [w.addr(i, "swap_lock") for i in range(w.count)],
    )
    if len(_ADDRESSES) >= 4096:
        _ADDRESSES.clear()
    _ADDRESSES[id(spec)] = (spec, out)
    return out


#: Lock classes of this module's own locks and counters, and this process's
#: acquisition counts (:mod:`mqrt.lib.lockstat`).
_SWAP_LOCK, _WAKE_CNT = int(LockClass.TAGS_SWAP_LOCK), int(LockClass.SBQ_WAKE_CNT)
_acq = lockstat.acq


def _u32(v: int) -> int:
    return v & UINT_MAX


class Sbitmap:
    """A handle on a shared sbitmap for one emulated CPU (``cpu`` picks the hint)."""

    @staticmethod
    def declare(
        layout: Layout,
        name: str,
        depth: int,
        nr_cpus: int,
        *,
        shift: int = -1,
        round_robin: bool = False,
    ) -> SbitmapSpec:
        """Reserve the bitmap's regions (sbitmap_init_node's allocation)."""
        if depth < 1 or depth > 1 << 24:
            raise ValueError(f"{name}: depth must be in 1..{1 << 24}, got {depth}")
        if nr_cpus < 1:
            raise ValueError(f"{name}: nr_cpus must be >= 1, got {nr_cpus}")
        if shift < 0:
            shift = calculate_shift(depth)
        if shift > 6:
            raise ValueError(f"{name}: shift must be in 0..6, got {shift}")
        map_nr = (depth + (1 << shift) - 1) >> shift
        header = layout.add(f"{name}.header", SBQ_HEADER)
        words = layout.add(f"{name}.map", SBITMAP_WORD, map_nr)
        hints = layout.add(f"{name}.alloc_hint", ALLOC_HINT, nr_cpus)
        return SbitmapSpec(name, depth, shift, nr_cpus, round_robin, header, words, hints)

    @staticmethod
    def init(arena: Arena, spec: SbitmapSpec, seed: int = 0) -> None:
        """Owner only: an empty bitmap; hints random per CPU (zero when round-robin)."""
        a = arena.atomic
        o = spec.header.offsets()
        a.set32(o.depth, spec.depth)
        a.set32(o.shift, spec.shift)
        a.set32(o.map_nr, spec.map_nr)
        a.set32(o.round_robin, int(spec.round_robin))
        rng = random.Random(seed)
        for cpu in range(spec.nr_cpus):
            hint = 0 if spec.round_robin else rng.randrange(spec.depth)
            a.set32(spec.hints.addr(cpu), hint)

    def __init__(
        self,
        arena: Arena,
        spec: SbitmapSpec,
        cpu: int = 0,
        seed: int | None = None,
        lock_class: int = LockClass.TAGS_BITMAP,
    ):
        if not 0 <= cpu < spec.nr_cpus:
            raise ValueError(f"{spec.name}: cpu {cpu} out of range 0..{spec.nr_cpus - 1}")
        self.spec = spec
        self.cpu = cpu
        self.a: AtomicView = arena.atomic
        self.shift = spec.shift
        self.bits_per_word = 1 << spec.shift
        self.round_robin = spec.round_robin
        o = spec.header.offsets()
        self._depth = o.depth
        self._map_nr = o.map_nr
        # the same for every CPU: computed once (the runtime does it before it forks)
        self._hints, self._word, self._cleared, self._swap_lock = addresses(spec)
        self._hint = self._hints[cpu]
        w = spec.words
        #: the words (and cleared masks) as a map for the C calls
        self._map, self._cleared_map, self._map_stride = self._word[0], self._cleared[0], w.stride
        self._rng = random.Random(cpu if seed is None else seed)
        #: the lock class of the words (the tags' or the sched tags') and where this
        #: process counts it: the C searches' ``stat_off`` (-1: not counted; taken when
        #: the handle is made, so a CPU installs its counters before its handles)
        self.lock_class = int(lock_class)
        self._stat = lockstat.stat_off(lock_class)

    # -- geometry ---------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.a.read32(self._depth)

    @property
    def map_nr(self) -> int:
        return self.a.read32(self._map_nr)

    def map_depth(self, index: int) -> int:
        """__map_depth(): bits in word ``index`` (the last word may be partial)."""
        if index == self.a.read32(self._map_nr) - 1:
            return self.a.read32(self._depth) - (index << self.shift)
        return self.bits_per_word

    # -- allocation hints (this CPU's) -------------------------------------------------

    def _hint_before_get(self, depth: int) -> int:
        """update_alloc_hint_before_get()."""
        hint = self.a.read32(self._hint)
        if hint >= depth:
            hint = self._rng.randrange(depth) if depth else 0
            self.a.set32(self._hint, hint)
        return hint

    def _hint_after_get(self, depth: int, hint: int, nr: int) -> None:
        """update_alloc_hint_after_get(): zero after a failure; past the bit we took
        if we used the hint (or always, round-robin)."""
        if nr == -1:
            self.a.set32(self._hint, 0)
        elif nr == hint or self.round_robin:
            hint = nr + 1
            if hint >= depth - 1:
                hint = 0
            self.a.set32(self._hint, hint)

    def update_cpu_hint(self, cpu: int, nr: int) -> None:
        """sbitmap_update_cpu_hint(): a freed bit becomes ``cpu``'s next hint."""
        if not self.round_robin and nr < self.a.read32(self._depth):
            self.a.set32(self._hints[cpu], nr)

    # -- the search --------------------------------------------------------------------

    def deferred_clear(self, index: int, depth: int, alloc_hint: int, wrap: bool) -> bool:
        """sbitmap_deferred_clear(): fold word ``index``'s ``cleared`` bits back into
        ``word`` under ``swap_lock``.  True if the caller should search again: bits
        were folded, or (nothing to fold) the word still has a free bit in the range
        being searched."""
        a = self.a
        lock = self._swap_lock[index]
        if a.test_and_set_bit_lock(lock, 0):  # spin_lock(), its first try inlined
            spin_lock_contended(a, lock, _SWAP_LOCK)
        _acq[_SWAP_LOCK] += 1
        try:
            if not a.read(self._cleared[index]):
                if depth == 0:
                    return False
                word_mask = (1 << depth) - 1
                if not wrap and alloc_hint:
                    word_mask &= ~((1 << alloc_hint) - 1)
                return (a.read(self._word[index]) & word_mask) != word_mask
            mask = a.xchg(self._cleared[index], 0)
            if inject.armed:
                inject.hit("sbitmap.fold.after_xchg")
            a.fetch_andnot(self._word[index], mask)
            return True
        finally:
            a.clear_bit_unlock(lock, 0)  # spin_unlock(), inlined

    def _find_bit_in_word(self, index: int, depth: int, alloc_hint: int, wrap: bool) -> int:
        """sbitmap_find_bit_in_word()."""
        while True:
            nr = self.a.find_and_set_zero_bit(
                self._word[index], depth, alloc_hint, wrap, self._stat
            )
            if nr != -1:
                return nr
            if inject.armed:
                inject.hit("sbitmap.get.before_fold")
            if not self.deferred_clear(index, depth, alloc_hint, wrap):
                return -1
            retries.retry()

    def _find_bit(
        self,
        word_depth: Callable[[int], int],
        index: int,
        alloc_hint: int,
        wrap: bool,
        skip_empty: bool = False,
    ) -> int:
        """sbitmap_find_bit(): every word once, starting at ``index``.  With
        ``skip_empty`` (6.17) a word whose depth is 0 is not searched (so its
        deferred clears are not folded either)."""
        map_nr = self.a.read32(self._map_nr)
        for _ in range(map_nr):
            depth = word_depth(index)
            if depth or not skip_empty:
                nr = self._find_bit_in_word(index, depth, alloc_hint, wrap)
                if nr != -1:
                    return nr + (index << self.shift)
            alloc_hint = 0
            index += 1
            if index >= map_nr:
                index = 0
        return -1

    def get(self) -> int:
        """sbitmap_get(): a free bit, set, or -1 when the bitmap is full.

        The hot path, __sbitmap_get() unrolled once: update_alloc_hint_before_get(),
        then sbitmap_find_bit()'s first word, the hint's, searched from bit 0 with
        one C call (:meth:`AtomicView.find_and_set_zero_bit_at`: __map_depth() and
        __sbitmap_get_word()), then update_alloc_hint_after_get().  Anything else
        (round-robin, a hint out of range, a full word) goes to :meth:`_get`, the
        whole __sbitmap_get(); a word found full is searched again there before it
        is folded, which is one more pass of __sbitmap_get_word()'s loop.
        """
        a = self.a
        depth = a.read32(self._depth)
        hint = a.read32(self._hint)
        if hint >= depth or self.round_robin:
            return self._get(depth, hint)
        nr = a.find_and_set_zero_bit_at(
            self._map, self._map_stride, self.shift, depth, hint, self._stat
        )
        if nr == -1:
            return self._get(depth, hint)
        if nr == hint:  # update_alloc_hint_after_get(): the hint was used, move past it
            hint = nr + 1
            a.set32(self._hint, 0 if hint >= depth - 1 else hint)
        return nr

    def _get(self, depth: int, hint: int) -> int:
        """__sbitmap_get() whole, for the ``depth`` and this CPU's ``hint`` get() read:
        update_alloc_hint_before_get(), sbitmap_find_bit() inlined (every word once
        from the hint's, folding a full word's deferred clears:
        :meth:`_find_bit_in_word`), update_alloc_hint_after_get()."""
        if hint >= depth:
            hint = self._hint_before_get(depth)
        map_nr = self.a.read32(self._map_nr)
        shift = self.shift
        index = hint >> shift
        if self.round_robin:
            alloc_hint, wrap = hint & (self.bits_per_word - 1), False
        else:
            alloc_hint, wrap = 0, True
        nr = -1
        for _ in range(map_nr):
            if index == map_nr - 1:
                word_depth = depth - (index << shift)
            else:
                word_depth = self.bits_per_word
            nr = self._find_bit_in_word(index, word_depth, alloc_hint, wrap)
            if nr != -1:
                nr += index << shift
                break
            alloc_hint = 0
            index += 1
            if index >= map_nr:
                index = 0
        self._hint_after_get(depth, hint, nr)
        return nr

    def get_shallow(self, shallow_depth: int, whole_map: bool = False) -> int:
        """sbitmap_get_shallow(): like :meth:`get` but limited to ``shallow_depth``:
        bits per word (``whole_map=False``, up to 6.16), or of the whole bitmap,
        spread proportionally over the words (``whole_map=True``, 6.17:
        42e6c6ce03fd)."""
        depth = self.a.read32(self._depth)
        hint = self._hint_before_get(depth)
        index = hint >> self.shift
        if whole_map:

            def word_depth(i: int) -> int:
                return self.map_depth_with_shallow(i, shallow_depth)
        else:

            def word_depth(i: int) -> int:
                return min(self.map_depth(i), shallow_depth)

        nr = self._find_bit(
            word_depth, index, hint & (self.bits_per_word - 1), True, skip_empty=whole_map
        )
        self._hint_after_get(depth, hint, nr)
        return nr

    def map_depth_with_shallow(self, index: int, shallow_depth: int) -> int:
        """__map_depth_with_shallow(): word ``index``'s share of a whole-bitmap
        shallow depth, the remainder going to the leading words."""
        word_depth = self.map_depth(index)
        depth = self.a.read32(self._depth)
        if shallow_depth >= depth:
            return word_depth
        shallow_word_depth, remainder = divmod(word_depth * shallow_depth, depth)
        if remainder >= (index + 1) * word_depth:
            shallow_word_depth += 1
        return shallow_word_depth

    # -- freeing ------------------------------------------------------------------------

    def clear_bit(self, bitnr: int) -> None:
        """sbitmap_clear_bit(): free a bit immediately."""
        self.a.clear_bit(self._word[bitnr >> self.shift], bitnr & (self.bits_per_word - 1))

    def test_bit(self, bitnr: int) -> bool:
        return self.a.test_bit(self._word[bitnr >> self.shift], bitnr & (self.bits_per_word - 1))

    # -- whole-map operations ---------------------------------------------------------------

    def resize(self, depth: int) -> None:
        """sbitmap_resize(): fold every word, then use ``depth`` bits (at most the
        declared depth)."""
        if not 1 <= depth <= self.spec.depth:
            raise ValueError(
                f"{self.spec.name}: resize depth must be in 1..{self.spec.depth}, got {depth}"
            )
        for i in range(self.a.read32(self._map_nr)):
            self.deferred_clear(i, 0, 0, False)
        self.a.set32(self._depth, depth)
        self.a.set32(self._map_nr, (depth + self.bits_per_word - 1) >> self.shift)

    def _weight(self, set_bits: bool) -> int:
        """__sbitmap_weight(): bits set in ``word`` (or in ``cleared``)."""
        total = 0
        offs = self._word if set_bits else self._cleared
        for i in range(self.a.read32(self._map_nr)):
            total += (self.a.read(offs[i]) & ((1 << self.map_depth(i)) - 1)).bit_count()
        return total

    def for_each_set(self, fn: Callable[[int], bool]) -> None:
        """sbitmap_for_each_set(): ``fn(bitnr)`` for every bit in use (set in its word
        and not pending a deferred clear), word by word from bit 0, until it returns
        False.  Each word is read once (a snapshot): a bit freed or taken after its
        word was read is seen as it was."""
        a = self.a
        shift = self.shift
        for index in range(a.read32(self._map_nr)):
            word = a.read(self._word[index]) & ~a.read(self._cleared[index])
            word &= (1 << self.map_depth(index)) - 1
            while word:
                low = word & -word
                word ^= low
                if not fn((index << shift) + low.bit_length() - 1):
                    return

    def weight(self) -> int:
        """sbitmap_weight(): bits in use (set and not pending a deferred clear)."""
        return self._weight(True) - self._weight(False)

    def cleared_weight(self) -> int:
        """Bits freed and not yet folded back (set in ``cleared``): the ``cleared=``
        of sbitmap_show()."""
        return self._weight(False)

    def alloc_hints(self) -> list[int]:
        return [_u32(self.a.read32(self.spec.hints.addr(c))) for c in range(self.spec.nr_cpus)]

    def show(self) -> str:
        """sbitmap_show(): for debugging; the format may change at any time."""
        return (
            f"depth={self.depth}\n"
            f"busy={self.weight()}\n"
            f"cleared={self._weight(False)}\n"
            f"bits_per_word={self.bits_per_word}\n"
            f"map_nr={self.map_nr}\n"
        )

    def bitmap_show(self) -> str:
        """sbitmap_bitmap_show(): the bits in use as a hex dump, 16 bytes a line,
        bytes grouped in pairs, bit 0 the least significant bit of byte 0."""
        bits = 0
        nbits = 0
        for i in range(self.map_nr):
            word = self.a.read(self._word[i]) & ~self.a.read(self._cleared[i])
            width = self.map_depth(i)
            bits |= (word & ((1 << width) - 1)) << nbits
            nbits += width
        out = io.StringIO()
        for offset in range((nbits + 7) // 8):
            byte = (bits >> (offset * 8)) & 0xFF
            if offset % 16 == 0:
                if offset:
                    out.write("\n")
                out.write(f"{offset:08x}:")
            if offset % 2 == 0:
                out.write(" ")
            out.write(f"{byte:02x}")
        if nbits:
            out.write("\n")
        return out.getvalue()


class SbitmapQueue:
    """A handle on a shared sbitmap_queue for one emulated CPU.

    ``waiters`` is this process's :class:`~mqrt.lib.wait.Waiters` (its slot is the one
    that sleeps in :meth:`prepare_to_wait`).
    """

    @staticmethod
    def declare(
        layout: Layout,
        name: str,
        depth: int,
        nr_cpus: int,
        *,
        shift: int = -1,
        round_robin: bool = False,
        generation: SbqGeneration = SbqGeneration.CURRENT,
    ) -> SbitmapQueueSpec:
        """Reserve a sbitmap_queue's regions (sbitmap_queue_init_node's allocation)."""
        sb = Sbitmap.declare(layout, name, depth, nr_cpus, shift=shift, round_robin=round_robin)
        ws = layout.add(f"{name}.ws", SBQ_WAIT_STATE, SBQ_WAIT_QUEUES)
        return SbitmapQueueSpec(sb, SbqGeneration(generation), ws)

    @classmethod
    def init(
        cls,
        arena: Arena,
        spec: SbitmapQueueSpec,
        seed: int = 0,
        min_shallow_depth: int = UINT_MAX,
    ) -> None:
        """Owner only: sbitmap_queue_init_node(), then, with a ``min_shallow_depth``,
        sbitmap_queue_min_shallow_depth() before any user."""
        Sbitmap.init(arena, spec.sb, seed)
        a = arena.atomic
        o = spec.sb.header.offsets()
        a.set32(o.min_shallow_depth, min_shallow_depth)
        a.set32(o.ws_active, 0)
        a.set32(o.wake_index, 0)
        a.set32(o.completion_cnt, 0)
        a.set32(o.wakeup_cnt, 0)
        a.set32(o.frees, 0)
        a.set32(o.freeing, 0)
        wake_batch = _calc_wake_batch(spec, spec.sb.depth, min_shallow_depth)
        a.set32(o.wake_batch, wake_batch)
        for i in range(SBQ_WAIT_QUEUES):
            a.set32(spec.ws.addr(i, "wait_cnt"), wake_batch)
            WaitQueue.init(arena, spec.ws.addr(i, "wait"))

    def __init__(
        self,
        arena: Arena,
        spec: SbitmapQueueSpec,
        waiters: Waiters,
        cpu: int = 0,
        seed: int | None = None,
        lock_class: int = LockClass.TAGS_BITMAP,
    ):
        self.spec = spec
        self.sb = Sbitmap(arena, spec.sb, cpu, seed, lock_class)
        self.a = arena.atomic
        self.cpu = cpu
        self.generation = spec.generation
        self.legacy = spec.generation.wait_cnt  #: the <= 6.1 wake-up (wait_cnt)
        o = spec.sb.header.offsets()
        self._wake_batch = o.wake_batch
        self._min_shallow_depth = o.min_shallow_depth
        self._ws_active = o.ws_active
        self._wake_index = o.wake_index
        self._completion_cnt = o.completion_cnt
        self._wakeup_cnt = o.wakeup_cnt
        self.frees_off = o.frees
        self.freeing_off = o.freeing
        self._wait_cnt = [spec.ws.addr(i, "wait_cnt") for i in range(SBQ_WAIT_QUEUES)]
        # the bitmap's geometry and offsets for clear(); its hint offsets by CPU, -1
        # for none (round-robin keeps no hint)
        sb = self.sb
        self._cleared_map, self._map_stride, self._shift = sb._cleared_map, sb._map_stride, sb.shift
        self._depth = sb._depth
        self._hint_off = [-1 if sb.round_robin else h for h in sb._hints]
        #: __sbitmap_queue_get() is sbitmap_get(): the bitmap's bound method itself
        #: (one call less on the allocation path)
        self.get = self.sb.get
        self.ws = [WaitQueue(waiters, spec.ws.addr(i, "wait")) for i in range(SBQ_WAIT_QUEUES)]
        self._warned_shallow = False

    #: Count frees in ``frees`` (the detectors' evidence): set in the owner before the
    #: CPUs fork when a run is watched, off otherwise (nothing on the free path then
    #: but this test).
    count_frees = False

    def free_begin(self) -> None:
        """A free of this map starts (instrumentation, outside the algorithm: the race
        catalogue's buggy versions of clear and wake-up cannot skip it)."""
        self.a.fetch_add32(self.freeing_off, 1)

    def free_end(self, nr: int) -> None:
        """The free begun last by this task returned, its clear and wake-up done:
        ``nr`` bits counted as freed, then the free no longer under way (in that
        order: a reader that sees ``freeing`` at 0 after reading ``frees`` knows every
        free it counted has finished its wake-up)."""
        a = self.a
        a.fetch_add32(self.frees_off, nr)
        a.fetch_sub32(self.freeing_off, 1)

    @property
    def frees(self) -> int:
        return _u32(self.a.read32(self.frees_off))

    @property
    def freeing(self) -> int:
        """Frees under way: a waker among them may hold the wake-up its frees owe
        (one preempted between counting a batch down and waking the sleepers)."""
        return _u32(self.a.read32(self.freeing_off))

    # -- configuration --------------------------------------------------------------------

    @property
    def wake_batch(self) -> int:
        return self.a.read32(self._wake_batch)

    @property
    def min_shallow_depth(self) -> int:
        return _u32(self.a.read32(self._min_shallow_depth))

    def _update_wake_batch(self, wake_batch: int) -> None:
        """Store a new wake_batch; the legacy scheme also resets every wait_cnt to 1
        so sleepers on a count above the new batch are not stranded (6c0ca7ae292a)."""
        if self.a.read32(self._wake_batch) == wake_batch:
            return
        self.a.set32(self._wake_batch, wake_batch)
        if trace.on:
            trace.emit(_EV_WAKE_BATCH, -1, 0, 0, 0, wake_batch)
        if self.legacy:
            fence()  # pairs with the fence in _legacy_wake_up before wait_cnt is reset
            if inject.armed:
                inject.hit("sbq.batch.between_stores")
            for off in self._wait_cnt:
                self.a.set32(off, 1)

    def set_min_shallow_depth(self, min_shallow_depth: int) -> None:
        """sbitmap_queue_min_shallow_depth(): declare the smallest shallow depth that
        will be used, and size wake_batch so such waiters can still be woken."""
        self.a.set32(self._min_shallow_depth, min_shallow_depth)
        self._update_wake_batch(_calc_wake_batch(self.spec, self.sb.depth, min_shallow_depth))

    def recalculate_wake_batch(self, users: int) -> None:
        """sbitmap_queue_recalculate_wake_batch(): size wake_batch to each of
        ``users``' fair share of the depth (shared tags)."""
        depth = self.sb.depth
        share = (depth + users - 1) // users
        self._update_wake_batch(max(1, min(share // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH)))

    def resize(self, depth: int) -> None:
        """sbitmap_queue_resize()."""
        self._update_wake_batch(_calc_wake_batch(self.spec, depth, self.min_shallow_depth))
        self.sb.resize(depth)

    # -- allocation ---------------------------------------------------------------------------

    def get_shallow(self, shallow_depth: int) -> int:
        """sbitmap_queue_get_shallow(): a free tag below the shallow limit, or -1."""
        if shallow_depth < self.min_shallow_depth and not self._warned_shallow:
            self._warned_shallow = True
            warnings.warn(
                f"{self.spec.sb.name}: shallow depth {shallow_depth} is below "
                f"min_shallow_depth {self.min_shallow_depth}: wake-ups may be missed",
                SbitmapWarning,
                stacklevel=2,
            )
        return self.sb.get_shallow(shallow_depth, self.generation.whole_map_shallow)

    def get_batch(self, nr_tags: int) -> tuple[int, int]:
        """__sbitmap_queue_get_batch(): up to ``nr_tags`` free bits of one word taken at
        once; returns ``(mask, offset)``: bit i of mask set means tag offset + i was
        taken.  ``(0, 0)`` if none (and always with round-robin)."""
        sb, a = self.sb, self.a
        if sb.round_robin or nr_tags < 1:
            return 0, 0
        depth = a.read32(sb._depth)
        hint = sb._hint_before_get(depth)
        map_nr = a.read32(sb._map_nr)
        shift = sb.shift
        index = hint >> shift
        for _ in range(map_nr):
            # __map_depth(), with the depth and map_nr read once
            map_depth = depth - (index << shift) if index == map_nr - 1 else sb.bits_per_word
            sb.deferred_clear(index, 0, 0, False)
            # No run of nr_tags bits fits in a word of fewer bits, whatever it holds:
            # the kernel finds that out after the tests below, which have no effect.
            if nr_tags <= map_depth:
                word_off = sb._word[index]
                val = a.read(word_off)
                # The kernel's test for a full word, as it is in 6.1 to 6.17: every bit
                # but the top one set.  A really full word fails the fit test below.
                if val != (1 << (map_depth - 1)) - 1:
                    free = ~val & ((1 << map_depth) - 1)
                    nr = (free & -free).bit_length() - 1 if free else map_depth  # first zero
                    if nr + nr_tags <= map_depth:
                        get_mask = (((1 << nr_tags) - 1) << nr) & _WORD_MASK
                        lost = t0 = 0
                        while True:
                            found = a.cmpxchg(word_off, val, val | get_mask)
                            if found == val:
                                break
                            retries.retry()
                            if not lost:
                                t0 = lockstat.clock()
                            lost += 1
                            val = found
                        if lost:
                            lockstat.contended(sb.lock_class, lockstat.clock() - t0, lost)
                        get_mask = (get_mask & ~val) >> nr
                        if get_mask:
                            # the words' acquisitions are tags taken (C counts the rest)
                            lockstat.acquired(sb.lock_class, get_mask.bit_count())
                            offset = nr + (index << sb.shift)
                            sb._hint_after_get(depth, hint, offset + nr_tags - 1)
                            return get_mask, offset
            index += 1
            if index >= map_nr:
                index = 0
        return 0, 0

    # -- freeing ----------------------------------------------------------------------------

    def clear(self, nr: int, cpu: int) -> None:
        """sbitmap_queue_clear(): free tag ``nr`` allocated on ``cpu``, wake waiters
        if a batch is complete, and make the tag ``cpu``'s next hint.

        The hot path: one C call (:meth:`AtomicView.deferred_clear_bit_at`) does the
        steps of :meth:`_clear` up to the wake-up, and the hint update too when
        nobody sleeps; with sleepers, the wake-up and the hint follow here.  With
        injection armed, :meth:`_clear` runs instead (its point sits between the
        steps)."""
        if inject.armed:
            self._clear(nr, cpu)
            return
        if self.a.deferred_clear_bit_at(
            self._cleared_map, self._map_stride, self._shift, nr, self._ws_active,
            self._hint_off[cpu], self._depth,
        ):  # fmt: skip
            self.wake_up(1)
            self.sb.update_cpu_hint(cpu, nr)

    def _clear(self, nr: int, cpu: int) -> None:
        """:meth:`clear` step by step, as the kernel writes it."""
        # The fully ordered fetch_or is the kernel's smp_mb__before_atomic +
        # set_bit + smp_mb__after_atomic: the request's last use happens before the
        # bit can be reused, and the bit is visible before ws_active is read in
        # wake_up (pairs with the barrier in prepare_to_wait's state change).
        # sbitmap_deferred_clear_bit(): marks the bit in ``cleared``; the next
        # allocator that finds the word full folds it back.
        sb, a = self.sb, self.a
        a.fetch_or(sb._cleared[nr >> sb.shift], 1 << (nr & (sb.bits_per_word - 1)))
        if inject.armed:
            inject.hit("sbq.clear.before_wake")
        if a.read32(self._ws_active):  # both generations return at once if 0
            self.wake_up(1)
        sb.update_cpu_hint(cpu, nr)

    def clear_batch(self, offset: int, tags: list[int]) -> None:
        """sbitmap_queue_clear_batch(): free many tags at once, straight from ``word``
        (not deferred), then one wake-up for all of them."""
        self._clear_bits(offset, tags)
        self.wake_up(len(tags))
        self.sb.update_cpu_hint(self.cpu, tags[-1] - offset)

    def _clear_bits(self, offset: int, tags: list[int]) -> None:
        """Clear the bits of ``tags`` (numbered from ``offset``) from ``word``, one
        andnot per word touched."""
        sb, a = self.sb, self.a
        addr = -1
        mask = 0
        for tag in tags:
            t = tag - offset
            this = sb._word[t >> sb.shift]
            if addr != this:
                if mask:
                    a.fetch_andnot(addr, mask)
                mask = 0
                addr = this
            mask |= 1 << (t & (sb.bits_per_word - 1))
        if mask:
            a.fetch_andnot(addr, mask)

    # -- waking -------------------------------------------------------------------------------

    def wake_up(self, nr: int) -> None:
        """sbitmap_queue_wake_up(): account ``nr`` freed bits; wake waiters when a
        batch is complete."""
        if self.legacy:
            again, nr = self._legacy_wake_up_once(nr)
            while again:
                retries.retry()
                again, nr = self._legacy_wake_up_once(nr)
            return
        a = self.a
        if not a.read32(self._ws_active):
            return
        wake_batch = a.read32(self._wake_batch)
        a.fetch_add32(self._completion_cnt, nr)
        wakeups = a.read32(self._wakeup_cnt)
        lost = t0 = 0
        while True:
            if _s32(a.read32(self._completion_cnt) - wakeups) < wake_batch:
                if lost:
                    lockstat.contended(_WAKE_CNT, lockstat.clock() - t0, lost)
                return
            found = a.cmpxchg32(self._wakeup_cnt, wakeups, wakeups + wake_batch)
            if found == wakeups:
                break
            retries.retry()
            if not lost:
                t0 = lockstat.clock()
            lost += 1
            wakeups = found
        if lost:
            lockstat.contended(_WAKE_CNT, lockstat.clock() - t0, lost)
        _acq[_WAKE_CNT] += 1
        if inject.armed:
            inject.hit("sbq.wake.before_wakeup")
        self._wake_up_ws(wake_batch)

    def _wake_up_ws(self, nr: int) -> None:
        """__sbitmap_queue_wake_up(): wake up to ``nr`` waiters across the wait
        states, starting at wake_index and advancing it before each state."""
        a = self.a
        if not a.read32(self._ws_active):
            return
        wake_index = a.read32(self._wake_index)
        for _ in range(SBQ_WAIT_QUEUES):
            ws = self.ws[wake_index]
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES
            if ws.active():
                woken = ws.wake_up_nr(nr)
                if trace.on and woken:
                    trace.emit(_EV_WAKE_UP, -1, 0, 0, 0, woken)
                if woken == nr:
                    break
                nr -= woken
        if wake_index != a.read32(self._wake_index):
            a.set32(self._wake_index, wake_index)

    def _legacy_wake_ptr(self) -> int:
        """sbq_wake_ptr(): the first wait state from wake_index with sleepers and a
        non-zero wait_cnt, or -1."""
        a = self.a
        if not a.read32(self._ws_active):
            return -1
        wake_index = a.read32(self._wake_index)
        for _ in range(SBQ_WAIT_QUEUES):
            if self.ws[wake_index].active() and a.read32(self._wait_cnt[wake_index]):
                if wake_index != a.read32(self._wake_index):
                    a.set32(self._wake_index, wake_index)
                return wake_index
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES
        return -1

    def _legacy_wake_up_once(self, nr: int) -> tuple[bool, int]:
        """__sbq_wake_up() (<= 6.1): count ``nr`` frees down on one wait state's
        wait_cnt; at zero, wake wake_batch waiters there, advance wake_index and
        reset the count.  Returns (go round again?, frees still to count)."""
        a = self.a
        if nr <= 0:
            return False, nr
        i = self._legacy_wake_ptr()
        if i < 0:
            return False, nr
        ws = self.ws[i]
        cnt_off = self._wait_cnt[i]
        cur = a.read32(cnt_off)
        lost = t0 = 0
        while True:
            if cur == 0:
                if lost:
                    lockstat.contended(_WAKE_CNT, lockstat.clock() - t0, lost)
                return True, nr  # a concurrent waker is resetting this one: try another
            sub = min(nr, cur)
            wait_cnt = cur - sub
            found = a.cmpxchg32(cnt_off, cur, wait_cnt)
            if found == cur:
                break
            retries.retry()
            if not lost:
                t0 = lockstat.clock()
            lost += 1
            cur = found
        if lost:
            lockstat.contended(_WAKE_CNT, lockstat.clock() - t0, lost)
        _acq[_WAKE_CNT] += 1
        if wait_cnt > 0:
            # Counted on a queue that may have emptied meanwhile: go again so the
            # free is not lost.
            return not ws.active(), nr
        nr -= sub
        ret = not ws.active()
        if inject.armed:
            inject.hit("sbq.wake.before_reset")
        wake_batch = a.read32(self._wake_batch)
        # The woken tasks are set running and dequeued now; their eventfds are
        # written once the count is reset (wake_q).  From the zero above to the
        # reset every other free skips this wait state (sbq_wake_ptr), and one that
        # finds no other with sleepers wakes nobody: the lost wake-up 30514bd2dd4e
        # accepts.  The kernel runs this stretch as one short sequence, usually in
        # interrupt context; a process writing an eventfd here would hand its host
        # core to the task it woke and keep the count at 0 for a whole slice.
        wake_q: list[int] = []
        woken = ws.wake_up_nr(wake_batch, wake_q)
        if trace.on and woken:
            trace.emit(_EV_WAKE_UP, -1, 0, 0, 0, woken)
        if inject.armed:
            inject.hit("sbq.wake.before_cnt_reset")
        fence()  # pairs with _update_wake_batch: see the new batch before the reset
        # sbq_index_atomic_inc(): advance wake_index unless someone else just did.
        old = a.read32(self._wake_index)
        a.cmpxchg32(self._wake_index, old, (old + 1) % SBQ_WAIT_QUEUES)
        a.set32(cnt_off, wake_batch)
        if wake_q:
            ws.w.wake_up_q(wake_q)
        return ret or nr > 0, nr

    def wake_all(self) -> None:
        """sbitmap_queue_wake_all(): wake every waiter on every wait state."""
        fence()
        wake_index = self.a.read32(self._wake_index)
        for _ in range(SBQ_WAIT_QUEUES):
            ws = self.ws[wake_index]
            if ws.active():
                ws.wake_up()
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES

    # -- sleeping ------------------------------------------------------------------------------

    def wait_ptr(self, wait_index: int) -> int:
        """sbq_wait_ptr(): the wait state at the atomic_t ``wait_index`` (an offset:
        in blk-mq the hctx's, shared by its CPUs), which then moves on by one with a
        single cmpxchg (sbq_index_atomic_inc(): not retried, so callers racing may
        both take the same wait state, as in the kernel)."""
        a = self.a
        i = a.read32(wait_index)
        a.cmpxchg32(wait_index, i, (i + 1) & (SBQ_WAIT_QUEUES - 1))
        return i & (SBQ_WAIT_QUEUES - 1)

    def prepare_to_wait(self, ws_index: int, wait: SbqWait) -> None:
        """sbitmap_prepare_to_wait(): count this sleeper in ws_active (once per wait)
        and queue it exclusively on wait state ``ws_index``."""
        if not wait.active:
            self.a.fetch_add32(self._ws_active, 1)
            wait.active = True
        self.ws[ws_index].prepare_to_wait_exclusive()

    def finish_wait(self, ws_index: int, wait: SbqWait) -> None:
        """sbitmap_finish_wait()."""
        self.ws[ws_index].finish_wait()
        if wait.active:
            self.a.fetch_sub32(self._ws_active, 1)
            wait.active = False

    # -- debugfs ---------------------------------------------------------------------------------

    def nr_ws_active(self) -> int:
        """atomic_read(&sbq->ws_active): tasks counted asleep on the wait states now
        (a plain read)."""
        return _s32(self.a.read32(self._ws_active))

    def show(self) -> str:
        """sbitmap_queue_show(): the body of debugfs ``hctxN/tags`` after
        ``bitmap_tags:``.  For debugging; the format may change at any time."""
        a = self.a
        lines = [self.sb.show().rstrip("\n")]
        lines.append("alloc_hint={" + ", ".join(str(h) for h in self.sb.alloc_hints()) + "}")
        lines.append(f"wake_batch={self.wake_batch}")
        lines.append(f"wake_index={a.read32(self._wake_index)}")
        lines.append(f"ws_active={a.read32(self._ws_active)}")
        lines.append("ws={")
        for i, ws in enumerate(self.ws):
            state = "active" if ws.active() else "inactive"
            if self.legacy:
                lines.append(f"\t{{.wait_cnt={a.read32(self._wait_cnt[i])}, .wait={state}}},")
            else:
                lines.append(f"\t{{.wait={state}}},")
        lines.append("}")
        lines.append(f"round_robin={int(self.sb.round_robin)}")
        lines.append(f"min_shallow_depth={self.min_shallow_depth}")
        return "\n".join(lines) + "\n"


class SbqWait:
    """struct sbq_wait: whether this wait is counted in ws_active."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


def _s32(v: int) -> int:
    """Wrap to a signed 32-bit value (atomic_t arithmetic)."""
    v &= UINT_MAX
    return v - (1 << 32) if v & 0x80000000 else v


def _calc_wake_batch(spec: SbitmapQueueSpec, depth: int, min_shallow_depth: int) -> int:
    """sbq_calc_wake_batch() for the queue's generation: up to 6.16 the usable depth
    is every full word limited to min_shallow_depth bits plus the partial last word
    so limited; from 6.17 (42e6c6ce03fd) it is min(depth, min_shallow_depth)."""
    if spec.generation.whole_map_shallow:
        depth = min(depth, min_shallow_depth)
    else:
        shift = spec.sb.shift
        shallow = min(1 << shift, min_shallow_depth)
        depth = (depth >> shift) * shallow + min(depth & ((1 << shift) - 1), shallow)
    return max(1, min(depth // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH))
