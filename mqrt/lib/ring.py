"""Bounded lock-free rings of fixed-size binary entries in the shared-memory arena.

The transport under mqrt's hardware queues, submission and completion queues: the
role ``include/linux/ptr_ring.h`` and an NVMe SQ/CQ pair play in the kernel.

Two rings, both non-blocking (a full ring refuses, an empty ring returns nothing);
sleeping and waking are layered above them (doorbells, interrupts), never inside:

:class:`SpscRing` — one producer, one consumer.
    ``tail`` and ``head`` are monotonic 64-bit counters, never wrapped:
    ``slot = counter & (nr_entries - 1)``, empty is ``tail == head``, full is
    ``tail - head == nr_entries``, with no ambiguity and no wasted slot.  Lock-free
    in the single-writer sense: only the producer writes ``tail`` and the slots
    between ``head`` and ``tail + room``; only the consumer writes ``head``.  Each
    side keeps a private cached copy of the other side's counter and re-reads the
    shared one only when the cache says full (producer) or empty (consumer), so a
    batch costs one acquire load and one release store per side.

:class:`MpscRing` — several producers, one consumer (Vyukov's bounded queue).
    Each slot has a sequence number: ``seq == pos`` means free for position ``pos``;
    ``seq == pos + 1`` means filled for the consumer.  A producer reserves a run of
    ``n`` positions with one CAS on ``tail`` after checking that the *last* slot of
    the run is free for this lap (the consumer frees in order, so then all of them
    are), copies its entries, and publishes each slot's sequence with a release
    store.  The consumer reads slots in order while their sequence says filled and
    hands each back as ``pos + nr_entries``.  A producer stalled between reservation
    and publication holds up the consumer at its slot: lock-free for producers,
    blocking for the consumer at that point, as every bounded MPSC ring is.

Memory ordering (who writes, who reads, what pairs with what):

============  ==================  ==================  ===========================================
field         written by          read by             ordering
============  ==================  ==================  ===========================================
SPSC tail     producer            consumer            store_release after the entries are copied;
                                                      pairs with the consumer's load_acquire
                                                      before it copies them out
SPSC head     consumer            producer            store_release after the entries are copied
                                                      out; pairs with the producer's load_acquire
                                                      before it overwrites those slots
MPSC tail     any producer (CAS)  producers           fully ordered CAS; reservation only
MPSC seq[i]   reserving producer  consumer            store_release after the entry is copied;
              then consumer       producers           pairs with the consumer's load_acquire.
                                                      Consumer's store_release(pos + n) after
                                                      copying out pairs with the producers'
                                                      load_acquire before reserving
MPSC head     consumer            producers           store_release; used only to size a
                                                      partial batch when the ring is nearly full
============  ==================  ==================  ===========================================

Entry bytes themselves are copied with plain memoryview slices: they are only ever
touched by the side that currently owns the slot.

XX: a ring carries bytes; typed entries (SQE/CQE) are packed by their users with
``struct``/numpy so the ring stays one concern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mqrt.lib import lockstat
from mqrt.lib.lockstat import LockClass
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct

#: SPSC control words, each on its own cache line (written by different processes).
SPSC_HEADER = cacheline_struct(
    [("tail", "<u8")],  # producer only
    [("head", "<u8")],  # consumer only
)

#: MPSC control words.
MPSC_HEADER = cacheline_struct(
    [("tail", "<u8")],  # producers, by CAS
    [("head", "<u8")],  # consumer only
)


_RING_TAIL = int(LockClass.RING_TAIL)


class RingError(ValueError):
    """A ring used with the wrong sizes."""


def _check_geometry(name: str, nr_entries: int, entry_size: int) -> None:
    if nr_entries < 2 or nr_entries & (nr_entries - 1):
        raise RingError(f"{name}: nr_entries must be a power of two >= 2, got {nr_entries}")
    if entry_size < 8 or entry_size % 8:
        raise RingError(f"{name}: entry_size must be a multiple of 8 >= 8, got {entry_size}")


@dataclass(frozen=True)
class RingSpec:
    """Where a ring lives in the arena and its geometry; picklable, data-free."""

    name: str
    nr_entries: int  #: slots, a power of two
    entry_size: int  #: bytes per entry, a multiple of 8
    header: Region
    data: Region
    seq: Region | None = None  #: MPSC only: one sequence number per slot


def _join(entries: Sequence[bytes] | bytes | bytearray | memoryview, entry_size: int) -> bytes:
    """One contiguous blob of whole entries, from a blob or a sequence of entries."""
    if isinstance(entries, (bytes, bytearray, memoryview)):
        blob = bytes(entries)
    else:
        blob = b"".join(entries)
        if len(blob) != len(entries) * entry_size:
            bad = next(i for i, e in enumerate(entries) if len(e) != entry_size)
            raise RingError(
                f"entry {bad} is {len(entries[bad])} bytes, the ring takes {entry_size}"
            )
    if len(blob) % entry_size:
        raise RingError(f"{len(blob)} bytes is not a whole number of {entry_size}-byte entries")
    return blob


def _split(blob: bytes, entry_size: int) -> list[bytes]:
    return [blob[i : i + entry_size] for i in range(0, len(blob), entry_size)]


class _RingBase:
    def __init__(self, arena: Arena, spec: RingSpec):
        self.spec = spec
        self._a = arena.atomic
        self._buf = arena.buf
        self._mask = spec.nr_entries - 1
        self._es = spec.entry_size
        self._data = spec.data.offset
        self._data_end = spec.data.offset + spec.nr_entries * spec.entry_size
        o = spec.header.offsets()
        self._tail_off: int = o.tail
        self._head_off: int = o.head

    def _copy_in(self, pos: int, blob: bytes) -> None:
        """Copy whole entries into the slots starting at position ``pos`` (may wrap)."""
        start = self._data + (pos & self._mask) * self._es
        first = min(len(blob), self._data_end - start)
        self._buf[start : start + first] = blob[:first] if first < len(blob) else blob
        if first < len(blob):
            self._buf[self._data : self._data + len(blob) - first] = blob[first:]

    def _copy_out(self, pos: int, n: int) -> bytes:
        """The bytes of ``n`` entries starting at position ``pos`` (may wrap)."""
        start = self._data + (pos & self._mask) * self._es
        nbytes = n * self._es
        end = start + nbytes
        if end <= self._data_end:
            return bytes(self._buf[start:end])
        return bytes(self._buf[start : self._data_end]) + bytes(
            self._buf[self._data : self._data + end - self._data_end]
        )

    def put_many(self, entries: Sequence[bytes] | bytes) -> int:
        raise NotImplementedError

    def get_many_raw(self, max_entries: int) -> bytes:
        raise NotImplementedError

    def put(self, entry: bytes) -> bool:
        """Publish one entry; False if the ring is full."""
        return self.put_many(entry) == 1

    def get(self) -> bytes | None:
        """One entry, or None if the ring is empty."""
        return self.get_many_raw(1) or None

    def get_many(self, max_entries: int) -> list[bytes]:
        """Up to ``max_entries`` entries, oldest first."""
        return _split(self.get_many_raw(max_entries), self._es)

    def __len__(self) -> int:
        """Entries published (or, MPSC, reserved) and not yet consumed: a snapshot."""
        return self._a.load_acquire(self._tail_off) - self._a.load_acquire(self._head_off)


class SpscRing(_RingBase):
    """Single-producer, single-consumer ring (see the module docstring).

    Build one object per process; a process uses it as producer (``put*``) or as
    consumer (``get*``), never both from two processes at once.
    """

    @staticmethod
    def declare(layout: Layout, name: str, nr_entries: int, entry_size: int) -> RingSpec:
        """Reserve the ring's regions in ``layout``."""
        _check_geometry(name, nr_entries, entry_size)
        header = layout.add(f"{name}.header", SPSC_HEADER)
        data = layout.add(f"{name}.data", np.dtype((np.void, entry_size)), nr_entries)
        return RingSpec(name, nr_entries, entry_size, header, data)

    def __init__(self, arena: Arena, spec: RingSpec):
        super().__init__(arena, spec)
        # Producer-private: our tail, and the consumer's head as last seen.
        self._tail = self._a.read(self._tail_off)
        self._head_cache = self._a.load_acquire(self._head_off)
        # Consumer-private: our head, and the producer's tail as last seen.
        self._head = self._a.read(self._head_off)
        self._tail_cache = self._a.load_acquire(self._tail_off)

    # -- producer ------------------------------------------------------------------

    def room(self) -> int:
        """Free slots as the producer sees them (refreshes the cached head)."""
        self._head_cache = self._a.load_acquire(self._head_off)
        return self.spec.nr_entries - (self._tail - self._head_cache)

    def put_many(self, entries: Sequence[bytes] | bytes) -> int:
        """Copy as many whole entries as fit, publish them with one release store, and
        return how many were taken (0 when full)."""
        blob = _join(entries, self._es)
        n = len(blob) // self._es
        free = self.spec.nr_entries - (self._tail - self._head_cache)
        if free < n:
            free = self.room()
            if free <= 0:
                return 0
            if free < n:
                n = free
                blob = blob[: n * self._es]
        self._copy_in(self._tail, blob)
        self._tail += n
        # Publish after the copy; pairs with load_acquire(tail) in get_many_raw().
        self._a.store_release(self._tail_off, self._tail)
        return n

    # -- consumer ------------------------------------------------------------------

    def get_many_raw(self, max_entries: int) -> bytes:
        """Up to ``max_entries`` entries as one blob (for struct/numpy parsing)."""
        avail = self._tail_cache - self._head
        if avail < max_entries:
            self._tail_cache = self._a.load_acquire(self._tail_off)
            avail = self._tail_cache - self._head
            if avail <= 0:
                return b""
        n = min(avail, max_entries)
        blob = self._copy_out(self._head, n)
        self._head += n
        # Free the slots after copying out; pairs with load_acquire(head) in room().
        self._a.store_release(self._head_off, self._head)
        return blob


class MpscRing(_RingBase):
    """Multi-producer, single-consumer ring with per-slot sequence numbers."""

    @staticmethod
    def declare(layout: Layout, name: str, nr_entries: int, entry_size: int) -> RingSpec:
        """Reserve the ring's regions in ``layout``; the owner must call :meth:`init`."""
        _check_geometry(name, nr_entries, entry_size)
        header = layout.add(f"{name}.header", MPSC_HEADER)
        seq = layout.add(f"{name}.seq", "<u8", nr_entries)
        data = layout.add(f"{name}.data", np.dtype((np.void, entry_size)), nr_entries)
        return RingSpec(name, nr_entries, entry_size, header, data, seq)

    @staticmethod
    def init(arena: Arena, spec: RingSpec) -> None:
        """Owner only, before any producer or consumer runs: slot i is free for
        position i."""
        assert spec.seq is not None
        arena.view(spec.seq)[:] = np.arange(spec.nr_entries, dtype="<u8")

    def __init__(self, arena: Arena, spec: RingSpec):
        super().__init__(arena, spec)
        assert spec.seq is not None
        self._seq = spec.seq.offset
        self._head = self._a.read(self._head_off)  # consumer-private

    def _seq_off(self, pos: int) -> int:
        return self._seq + (pos & self._mask) * 8

    # -- producers -----------------------------------------------------------------

    def put_many(self, entries: Sequence[bytes] | bytes) -> int:
        """Reserve a run of slots with one CAS, copy, publish; return how many were
        taken (0 when full)."""
        blob = _join(entries, self._es)
        pos, n = self.reserve(len(blob) // self._es)
        if n:
            self.publish(pos, blob[: n * self._es])
        return n

    def reserve(self, n: int) -> tuple[int, int]:
        """Claim up to ``n`` consecutive positions; return ``(first position, count)``
        with count 0 when the ring is full.  The caller must :meth:`publish` them."""
        a = self._a
        size = self.spec.nr_entries
        n = min(n, size)
        if n <= 0:
            return 0, 0
        pos = a.read(self._tail_off)
        lost = t0 = 0
        while True:
            last = pos + n - 1
            seq = a.load_acquire(self._seq_off(last))
            if seq == last:
                found = a.cmpxchg(self._tail_off, pos, pos + n)
                if found == pos:
                    if lost:  # lock_stat: the reservation CAS was contended
                        lockstat.contended(_RING_TAIL, lockstat.clock() - t0, lost)
                    lockstat.acq[_RING_TAIL] += 1
                    return pos, n
                if not lost:
                    t0 = lockstat.clock()
                lost += 1
                pos = found  # another producer reserved first
            elif seq < last:
                # The last slot is still full from the previous lap: shrink the run
                # to the room the consumer has made, if any.
                free = size - (pos - a.load_acquire(self._head_off))
                if free <= 0:
                    return 0, 0
                n = min(n, free)
                pos = a.read(self._tail_off)
            else:
                pos = a.read(self._tail_off)  # our view of tail is stale

    def publish(self, pos: int, blob: bytes) -> None:
        """Copy whole entries into positions reserved at ``pos`` and hand them to the
        consumer."""
        self._copy_in(pos, blob)
        a = self._a
        for p in range(pos, pos + len(blob) // self._es):
            # Publish each slot after the copy; pairs with load_acquire in get_many_raw().
            a.store_release(self._seq_off(p), p + 1)

    # -- consumer ------------------------------------------------------------------

    def get_many_raw(self, max_entries: int) -> bytes:
        """Up to ``max_entries`` published entries, in position order, as one blob."""
        a = self._a
        head = self._head
        n = 0
        while n < max_entries and a.load_acquire(self._seq_off(head + n)) == head + n + 1:
            n += 1
        if n == 0:
            return b""
        blob = self._copy_out(head, n)
        size = self.spec.nr_entries
        for p in range(head, head + n):
            # Hand the slot to the next lap's producer after copying out.
            a.store_release(self._seq_off(p), p + size)
        self._head = head + n
        a.store_release(self._head_off, self._head)
        return blob
