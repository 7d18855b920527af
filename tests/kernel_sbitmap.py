"""A plain-Python, single-threaded transcription of the kernel's ``lib/sbitmap.c``,
one per kernel version mqrt names (:class:`mqrt.lib.sbitmap.SbqGeneration`):

* ``legacy``: v6.1 (per wait state ``wait_cnt``; shallow depth per word; the
  recalculated ``wake_batch`` has a floor of 4 on maps of 32 bits or more).
* ``current``: v6.6 (``completion_cnt``/``wakeup_cnt``, 106397376c03's batching
  wake-up over the wait queues; shallow depth per word).
* ``newest``: v6.17 (42e6c6ce03fd: a shallow depth of the whole map, spread over
  the words; ``sbq_calc_wake_batch`` from ``min(depth, min_shallow_depth)``).

mqrt's port carries by default the fixes that landed after a generation's kernel
(each one a catalogue entry that ``mqrt race`` switches back off); ``carried``
names the ones this model applies on top of the version:

* ``b5fcf7871acb`` (6.3): no floor of 4 in ``sbitmap_queue_recalculate_wake_batch``
  (catalogue ``wake_batch_min4``; only 6.1 lacks it).
* ``72d04bdcf3f7`` (6.11): ``sbitmap_deferred_clear`` under ``swap_lock``, and a word
  with nothing to fold is searched again if it still has a free bit in range
  (catalogue ``cleared_race``; 6.1 and 6.6 lack it).  Single-threaded, both
  versions give the same results; the model has both.

It is written from the kernel's code (read for v6.1, a 6.5-6.10 tree consistent with
v6.6, and 42e6c6ce03fd's patch for 6.17) as plain integers and lists, with none of
mqrt's shared memory, so that ``tests/test_sbitmap_kernel.py`` can run the same
operations on both and compare.  Wait queues hold fake sleepers (ids), exclusive,
oldest first; a woken sleeper leaves its queue (autoremove) but stays counted in
``ws_active`` until it calls :meth:`KernelSbq.finish_wait`.

The random source (``prandom_u32_max`` / ``get_random_u32_below``) is a
``random.Random`` per CPU, so the model draws what mqrt's handle for that CPU draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SBQ_WAIT_QUEUES = 8
SBQ_WAKE_BATCH = 8
BITS_PER_LONG = 64
UINT_MAX = 0xFFFFFFFF
WORD_MASK = (1 << BITS_PER_LONG) - 1

#: The fixes mqrt's port carries on top of each generation's kernel by default.
CARRIED: dict[str, frozenset[str]] = {
    "legacy": frozenset({"b5fcf7871acb", "72d04bdcf3f7"}),
    "current": frozenset({"72d04bdcf3f7"}),
    "newest": frozenset(),
}


@dataclass
class WaitState:
    """struct sbq_wait_state: wait_cnt (6.1 only) and the sleepers, oldest first."""

    wait_cnt: int = 0
    sleepers: list[int] = field(default_factory=list)


class KernelSbq:
    """struct sbitmap_queue (with its struct sbitmap) of one kernel version."""

    def __init__(
        self,
        gen: str,
        depth: int,
        shift: int,
        round_robin: bool,
        hints: list[int],
        carried: frozenset[str] | None = None,
    ):
        assert gen in CARRIED
        self.gen = gen
        self.carried = CARRIED[gen] if carried is None else carried
        # sbitmap_init_node()
        self.shift = shift
        self.depth = depth
        self.map_nr = (depth + (1 << shift) - 1) >> shift
        self.round_robin = round_robin
        self.word = [0] * self.map_nr
        self.cleared = [0] * self.map_nr
        self.alloc_hint = list(hints)
        self.rng = [random.Random(cpu) for cpu in range(len(hints))]
        # sbitmap_queue_init_node()
        self.min_shallow_depth = UINT_MAX
        self.wake_batch = self.calc_wake_batch(depth)
        self.wake_index = 0
        self.ws_active = 0
        self.completion_cnt = 0
        self.wakeup_cnt = 0
        self.ws = [WaitState(self.wake_batch if gen == "legacy" else 0) for _ in range(8)]
        #: sleepers counted in ws_active (struct sbq_wait with ->sbq set)
        self.counted: set[int] = set()
        #: sleepers woken so far, in order
        self.woken: list[int] = []

    # -- helpers -----------------------------------------------------------------------------

    def map_depth(self, index: int) -> int:
        """__map_depth()."""
        if index == self.map_nr - 1:
            return self.depth - (index << self.shift)
        return 1 << self.shift

    def _random_below(self, cpu: int, n: int) -> int:
        return self.rng[cpu].randrange(n)

    def hint_before_get(self, cpu: int, depth: int) -> int:
        """update_alloc_hint_before_get()."""
        hint = self.alloc_hint[cpu]
        if hint >= depth:
            hint = self._random_below(cpu, depth) if depth else 0
            self.alloc_hint[cpu] = hint
        return hint

    def hint_after_get(self, cpu: int, depth: int, hint: int, nr: int) -> None:
        """update_alloc_hint_after_get()."""
        if nr == -1:
            self.alloc_hint[cpu] = 0
        elif nr == hint or self.round_robin:
            hint = nr + 1
            if hint >= depth - 1:
                hint = 0
            self.alloc_hint[cpu] = hint

    # -- the word search -----------------------------------------------------------------------

    def get_word(self, index: int, depth: int, hint: int, wrap: bool) -> int:
        """__sbitmap_get_word() (single-threaded: test_and_set_bit_lock never loses)."""
        wrap = wrap and hint != 0
        while True:
            nr = hint
            while nr < depth and self.word[index] >> nr & 1:
                nr += 1  # find_next_zero_bit()
            if nr >= depth:
                if hint and wrap:
                    hint = 0
                    continue
                return -1
            self.word[index] |= 1 << nr
            return nr

    def deferred_clear(self, index: int, depth: int, alloc_hint: int, wrap: bool) -> bool:
        """sbitmap_deferred_clear(): 6.17's (72d04bdcf3f7) or the older one."""
        if "72d04bdcf3f7" in self.carried or self.gen == "newest":
            if not self.cleared[index]:
                if depth == 0:
                    return False
                word_mask = WORD_MASK >> (BITS_PER_LONG - depth)
                if not wrap and alloc_hint:
                    word_mask &= ~((1 << alloc_hint) - 1)
                return (self.word[index] & word_mask) != word_mask
        elif not self.cleared[index]:
            return False
        mask, self.cleared[index] = self.cleared[index], 0
        self.word[index] &= ~mask
        return True

    def find_bit_in_word(self, index: int, depth: int, alloc_hint: int, wrap: bool) -> int:
        """sbitmap_find_bit_in_word() (6.1: sbitmap_find_bit_in_index())."""
        while True:
            nr = self.get_word(index, depth, alloc_hint, wrap)
            if nr != -1:
                return nr
            if not self.deferred_clear(index, depth, alloc_hint, wrap):
                return -1

    def map_depth_with_shallow(self, index: int, shallow_depth: int) -> int:
        """__map_depth_with_shallow() (6.17)."""
        word_depth = self.map_depth(index)
        if shallow_depth >= self.depth:
            return word_depth
        q, reminder = divmod(word_depth * shallow_depth, self.depth)
        if reminder >= (index + 1) * word_depth:
            q += 1
        return q

    def find_bit(self, shallow_depth: int, index: int, alloc_hint: int, wrap: bool) -> int:
        """sbitmap_find_bit() (6.6: a per-word limit; 6.17: a whole-map one)."""
        nr = -1
        for _ in range(self.map_nr):
            if self.gen == "newest":
                depth = self.map_depth_with_shallow(index, shallow_depth)
                if depth:
                    nr = self.find_bit_in_word(index, depth, alloc_hint, wrap)
            else:
                depth = min(self.map_depth(index), shallow_depth)
                nr = self.find_bit_in_word(index, depth, alloc_hint, wrap)
            if nr != -1:
                return nr + (index << self.shift)
            alloc_hint = 0
            index += 1
            if index >= self.map_nr:
                index = 0
        return nr

    # -- allocation ------------------------------------------------------------------------------

    def get(self, cpu: int) -> int:
        """sbitmap_get() (via __sbitmap_get())."""
        depth = self.depth
        hint = self.hint_before_get(cpu, depth)
        index = hint >> self.shift
        alloc_hint = hint & ((1 << self.shift) - 1) if self.round_robin else 0
        if self.gen == "legacy":  # 6.1's own loop
            nr = -1
            for _ in range(self.map_nr):
                nr = self.find_bit_in_word(
                    index, self.map_depth(index), alloc_hint, not self.round_robin
                )
                if nr != -1:
                    nr += index << self.shift
                    break
                alloc_hint = 0
                index += 1
                if index >= self.map_nr:
                    index = 0
        else:
            nr = self.find_bit(UINT_MAX, index, alloc_hint, not self.round_robin)
        self.hint_after_get(cpu, depth, hint, nr)
        return nr

    def get_shallow(self, cpu: int, shallow_depth: int) -> int:
        """sbitmap_get_shallow() (sbitmap_queue_get_shallow())."""
        depth = self.depth
        hint = self.hint_before_get(cpu, depth)
        if self.gen == "legacy":  # 6.1's __sbitmap_get_shallow(), with its goto again
            index = hint >> self.shift
            alloc_hint = hint
            nr = -1
            for _ in range(self.map_nr):
                while True:
                    nr = self.get_word(
                        index,
                        min(self.map_depth(index), shallow_depth),
                        alloc_hint & ((1 << self.shift) - 1),
                        True,
                    )
                    if nr != -1:
                        break
                    if not self.deferred_clear_for_shallow(index, shallow_depth, alloc_hint):
                        break
                if nr != -1:
                    nr += index << self.shift
                    break
                index += 1
                alloc_hint = index << self.shift
                if index >= self.map_nr:
                    index = 0
                    alloc_hint = 0
        else:
            nr = self.find_bit(
                shallow_depth, hint >> self.shift, hint & ((1 << self.shift) - 1), True
            )
        self.hint_after_get(cpu, depth, hint, nr)
        return nr

    def deferred_clear_for_shallow(self, index: int, shallow_depth: int, alloc_hint: int) -> bool:
        """6.1's shallow get calls sbitmap_deferred_clear(map); with 72d04bdcf3f7
        backported it passes the word's limited depth, hint bit and wrap=true."""
        return self.deferred_clear(
            index,
            min(self.map_depth(index), shallow_depth),
            alloc_hint & ((1 << self.shift) - 1),
            True,
        )

    def get_batch(self, cpu: int, nr_tags: int) -> tuple[int, int]:
        """__sbitmap_queue_get_batch(): (mask, offset), (0, 0) if none."""
        if self.round_robin:
            return 0, 0
        depth = self.depth
        hint = self.hint_before_get(cpu, depth)
        index = hint >> self.shift
        for _ in range(self.map_nr):
            map_depth = self.map_depth(index)
            self.deferred_clear(index, 0, 0, False)
            if self.word[index] != (1 << (map_depth - 1)) - 1:
                nr = 0
                while nr < map_depth and self.word[index] >> nr & 1:
                    nr += 1  # find_first_zero_bit()
                if nr + nr_tags <= map_depth:
                    get_mask = (((1 << nr_tags) - 1) << nr) & WORD_MASK
                    val = self.word[index]
                    self.word[index] = val | get_mask
                    get_mask = (get_mask & ~val) >> nr
                    if get_mask:
                        offset = nr + (index << self.shift)
                        self.hint_after_get(cpu, depth, hint, offset + nr_tags - 1)
                        return get_mask, offset
            index += 1
            if index >= self.map_nr:
                index = 0
        return 0, 0

    # -- wake_batch ------------------------------------------------------------------------------

    def calc_wake_batch(self, depth: int) -> int:
        """sbq_calc_wake_batch()."""
        if self.gen == "newest":
            usable = min(depth, self.min_shallow_depth)
        else:
            shallow = min(1 << self.shift, self.min_shallow_depth)
            usable = (depth >> self.shift) * shallow + min(depth & ((1 << self.shift) - 1), shallow)
        return max(1, min(usable // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH))

    def set_wake_batch(self, wake_batch: int) -> None:
        """__sbitmap_queue_update_wake_batch() (6.1: wait counts reset to 1)."""
        if self.wake_batch != wake_batch:
            self.wake_batch = wake_batch
            if self.gen == "legacy":
                for ws in self.ws:
                    ws.wait_cnt = 1

    def update_wake_batch(self, depth: int) -> None:
        """sbitmap_queue_update_wake_batch()."""
        self.set_wake_batch(self.calc_wake_batch(depth))

    def recalculate_wake_batch(self, users: int) -> None:
        """sbitmap_queue_recalculate_wake_batch()."""
        depth = (self.depth + users - 1) // users
        min_batch = 1
        if self.gen == "legacy" and "b5fcf7871acb" not in self.carried:
            min_batch = 4 if self.depth >= 4 * SBQ_WAIT_QUEUES else 1
        wake_batch = max(min_batch, min(depth // SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH))
        if self.gen == "legacy":
            self.set_wake_batch(wake_batch)
        else:
            self.wake_batch = wake_batch  # WRITE_ONCE, changed or not

    def set_min_shallow_depth(self, min_shallow_depth: int) -> None:
        """sbitmap_queue_min_shallow_depth()."""
        self.min_shallow_depth = min_shallow_depth
        self.update_wake_batch(self.depth)

    def resize(self, depth: int) -> None:
        """sbitmap_queue_resize(): wake_batch, then sbitmap_resize()."""
        self.update_wake_batch(depth)
        for i in range(self.map_nr):
            self.deferred_clear(i, 0, 0, False)
        self.depth = depth
        self.map_nr = (depth + (1 << self.shift) - 1) >> self.shift

    # -- freeing ---------------------------------------------------------------------------------

    def update_cpu_hint(self, cpu: int, tag: int) -> None:
        """sbitmap_update_cpu_hint()."""
        if not self.round_robin and tag < self.depth:
            self.alloc_hint[cpu] = tag

    def clear(self, nr: int, cpu: int) -> None:
        """sbitmap_queue_clear(): deferred clear, wake-up, hint."""
        self.cleared[nr >> self.shift] |= 1 << (nr & ((1 << self.shift) - 1))
        self.wake_up(1)
        self.update_cpu_hint(cpu, nr)

    def clear_batch(self, offset: int, tags: list[int], cpu: int) -> None:
        """sbitmap_queue_clear_batch(): straight from the words, one wake-up."""
        addr = -1
        mask = 0
        for t in tags:
            tag = t - offset
            this = tag >> self.shift
            if addr == -1:
                addr = this
            elif addr != this:
                self.word[addr] &= ~mask
                mask = 0
                addr = this
            mask |= 1 << (tag & ((1 << self.shift) - 1))
        if mask:
            self.word[addr] &= ~mask
        self.wake_up(len(tags))
        self.update_cpu_hint(cpu, tags[-1] - offset)

    # -- waking ----------------------------------------------------------------------------------

    def _wake_up_nr(self, ws: WaitState, nr: int) -> int:
        """wake_up_nr() on exclusive sleepers: the oldest ``nr`` leave and run."""
        woken = ws.sleepers[:nr]
        del ws.sleepers[:nr]
        self.woken.extend(woken)
        return len(woken)

    def wake_up(self, nr: int) -> None:
        """sbitmap_queue_wake_up()."""
        if self.gen == "legacy":
            while True:
                again, nr = self._sbq_wake_up(nr)
                if not again:
                    return
        wake_batch = self.wake_batch
        if not self.ws_active:
            return
        self.completion_cnt += nr
        wakeups = self.wakeup_cnt
        if self.completion_cnt - wakeups < wake_batch:
            return
        self.wakeup_cnt = wakeups + wake_batch
        self._sbitmap_queue_wake_up(wake_batch)

    def _sbitmap_queue_wake_up(self, nr: int) -> None:
        """__sbitmap_queue_wake_up() (6.5+)."""
        if not self.ws_active:
            return
        wake_index = self.wake_index
        for _ in range(SBQ_WAIT_QUEUES):
            ws = self.ws[wake_index]
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES
            if ws.sleepers:
                woken = self._wake_up_nr(ws, nr)
                if woken == nr:
                    break
                nr -= woken
        self.wake_index = wake_index

    def _sbq_wake_ptr(self) -> int:
        """sbq_wake_ptr() (6.1)."""
        if not self.ws_active:
            return -1
        wake_index = self.wake_index
        for _ in range(SBQ_WAIT_QUEUES):
            ws = self.ws[wake_index]
            if ws.sleepers and ws.wait_cnt:
                self.wake_index = wake_index
                return wake_index
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES
        return -1

    def _sbq_wake_up(self, nr: int) -> tuple[bool, int]:
        """__sbq_wake_up() (6.1): (call again?, frees left)."""
        if nr <= 0:
            return False, nr
        i = self._sbq_wake_ptr()
        if i < 0:
            return False, nr
        ws = self.ws[i]
        cur = ws.wait_cnt
        if cur == 0:
            return True, nr
        sub = min(nr, cur)
        wait_cnt = cur - sub
        ws.wait_cnt = wait_cnt
        if wait_cnt > 0:
            return not ws.sleepers, nr
        nr -= sub
        ret = not ws.sleepers
        wake_batch = self.wake_batch
        self._wake_up_nr(ws, wake_batch)
        self.wake_index = (self.wake_index + 1) % SBQ_WAIT_QUEUES  # sbq_index_atomic_inc
        ws.wait_cnt = wake_batch
        return ret or nr > 0, nr

    def wake_all(self) -> None:
        """sbitmap_queue_wake_all(): one exclusive sleeper per wait state."""
        wake_index = self.wake_index
        for _ in range(SBQ_WAIT_QUEUES):
            ws = self.ws[wake_index]
            if ws.sleepers:
                self._wake_up_nr(ws, 1)
            wake_index = (wake_index + 1) % SBQ_WAIT_QUEUES

    # -- sleeping --------------------------------------------------------------------------------

    def prepare_to_wait(self, ws_index: int, sleeper: int) -> None:
        """sbitmap_prepare_to_wait(): counted once, queued exclusively at the tail."""
        if sleeper not in self.counted:
            self.counted.add(sleeper)
            self.ws_active += 1
        ws = self.ws[ws_index]
        if sleeper not in ws.sleepers:
            ws.sleepers.append(sleeper)

    def finish_wait(self, ws_index: int, sleeper: int) -> None:
        """sbitmap_finish_wait()."""
        ws = self.ws[ws_index]
        if sleeper in ws.sleepers:
            ws.sleepers.remove(sleeper)
        if sleeper in self.counted:
            self.counted.discard(sleeper)
            self.ws_active -= 1
