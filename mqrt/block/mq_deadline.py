"""mq-deadline: the deadline I/O scheduler's core of one request queue, in the arena.

Follows Linux v6.1 ``block/mq-deadline.c`` with every request in one priority class:
mqrt has no ioprio, so every request is ``IOPRIO_CLASS_NONE``, which v6.1 maps to the
best-effort level (``DD_BE_PRIO``, index 1).  With one level in use the v6.1 paths
that only matter between levels do nothing and are left out: priority aging
(``dd_dispatch_prio_aged_requests`` returns nothing below two levels in use, so
``prio_aging_expire`` is not a knob here) and the ``started_after`` test (the latest
start a one-level dispatch passes is ``now``, after which no queued request started
as long as the callers' clocks do not go back).  Zoned devices are not modelled (no
zone write locks).  What the elevator core does around the scheduler stays the
caller's: the ``q->last_merge`` one-hit cache, the merge limits
(``elv_bio_merge_ok``, the queue's limits), the insert merge
(``blk_mq_sched_try_insert_merge``), the scheduler tags and their shallow depth.

The data (:data:`DD_DATA`, one per request queue, and :data:`DD_RQ`, one per
scheduler request ``0..nr_requests-1``, the ids the caller's sched_tags hand out):

* per direction (:data:`DD_READ`, :data:`DD_WRITE`) the FIFO list (doubly linked
  through the requests' ``fifo_next``/``fifo_prev``, oldest first, each request with
  its ``fifo_time``: the insert time plus ``read_expire``/``write_expire``) and the
  sort list (doubly linked through ``sort_next``/``sort_prev``, by start sector; of
  equal sectors the one added last is last, as ``elv_rb_add`` puts equal keys to the
  right), ``next_rq``, the request after the last dispatched one in sector order;
* ``batching``, ``starved``, ``last_dir``;
* the dispatch list (at-head inserts and requeues: list_add at its head, taken
  first), linked through ``fifo_next``/``fifo_prev`` as the kernel's ``queuelist``;
* the statistics of ``struct io_stats_per_prio``: ``inserted``, ``merged``,
  ``dispatched`` (under the lock) and ``completed`` (an atomic: ``finish`` runs
  without the lock); debugfs's ``queued`` is inserted - completed and
  ``owned_by_driver`` dispatched + merged - completed (a requeued request is
  dispatched, and counted, again: v6.1's mq-deadline has no requeue op, so it stays
  in ``owned_by_driver``);
* the knobs (sysfs: ``read_expire``, ``write_expire`` in ms, ``writes_starved``,
  ``front_merges``, ``fifo_batch``, ``async_depth``).

A sorted doubly linked list for the sort order rather than the kernel's rbtree: at the
sizes of a scheduler tag set (``nr_requests`` is at most a few hundred) a scan from the
tail costs a few steps for the sequential streams the scheduler exists for (a new
request lands at or near the tail) and needs no rebalancing, and every pointer is one
int64 in the request's line.  The merge lookups scan the sort list (the kernel uses the
elevator's hash for back merges and the rbtree for front merges); of several requests
that fit, the first in sector order is taken.

Ownership and ordering (also in docs/ARCHITECTURE.md): every :data:`DD_DATA` field
but the lock and ``completed``, and every :data:`DD_RQ` field, is written and read
under ``dd->lock`` (a bit spinlock: acquire on taking, release on dropping), by
whichever process inserts, dispatches, merges or stores a knob.  Outside it:

* ``has_work`` reads the dispatch and FIFO list heads lockless (relaxed 64-bit loads:
  the kernel's ``list_empty_careful``).  A stale "empty" loses nothing: whoever
  inserts runs the hardware queue after its insert (``blk_mq_sched_insert_requests``
  then ``blk_mq_run_hw_queue``), and that run takes the lock, so it sees the insert; a
  stale "not empty" costs one dispatch that returns -1.
* ``completed`` is a fetch_add by the process that frees a request (``finish``), the
  kernel's ``atomic_inc``; debugfs reads it relaxed.
* a request's ``INSERTED`` flag (the kernel's ``rq->elv.priv[0]`` mark) is cleared by
  ``finish`` without the lock: the request is on no list then and only its owner
  touches it; the next insert of that id comes after the tag's free and allocation,
  which order it.

``limit_depth`` reads ``async_depth`` lockless (a relaxed load, as ``dd_limit_depth``).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from mqrt.lib.knobs import Knob, KnobError
from mqrt.lib.lockstat import LockClass
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct, field_offset
from mqrt.lib.wait import spin_lock, spin_unlock

#: rq_data_dir(): READ or WRITE (op_is_write: the op's low bit)
DD_READ, DD_WRITE = 0, 1
DIR_NAMES = ("read", "write")
NIL = -1
NSEC_PER_MSEC = 1_000_000
INT_MAX = 2**31 - 1
INT_MIN = -(2**31)
U32 = 0xFFFF_FFFF

#: v6.1's defaults (HZ-independent: the kernel's jiffies, here nanoseconds)
READ_EXPIRE_NS = 500 * NSEC_PER_MSEC
WRITE_EXPIRE_NS = 5000 * NSEC_PER_MSEC
WRITES_STARVED = 2
FIFO_BATCH = 16

#: The priority level every request is in (DD_BE_PRIO): the debugfs names carry it.
DD_BE_PRIO = 1


class ElvMerge(enum.IntEnum):
    """enum elv_merge."""

    NO_MERGE = 0
    FRONT_MERGE = 1
    BACK_MERGE = 2


# -- per-request flags (DD_RQ.flags) ------------------------------------------------------
RQ_WRITE = 1  #: data direction
RQ_ON_FIFO = 2  #: on its direction's FIFO and sort lists
RQ_ON_DISPATCH = 4  #: on the dispatch list
RQ_INSERTED = 8  #: counted in ``inserted`` (rq->elv.priv[0]), until finish

_DIR_FIELDS = ("fifo_first", "fifo_last", "sort_first", "sort_last", "next_rq", "nr_queued")

#: struct deadline_data: one per request queue.  Every field is an int64 so the state
#: reads as one int64 memoryview.
DD_DATA = cacheline_struct(
    [("lock", "<i8")],
    # under the lock (the dispatch and FIFO heads also read lockless by has_work)
    [(f"{d}_{f}", "<i8") for d in DIR_NAMES for f in _DIR_FIELDS]
    + [("dispatch_first", "<i8"), ("dispatch_last", "<i8"), ("nr_dispatch", "<i8"),
       ("batching", "<i8"), ("starved", "<i8"), ("last_dir", "<i8"),
       ("inserted", "<i8"), ("merged", "<i8"), ("dispatched", "<i8")],
    # any process freeing a request: fetch_add
    [("completed", "<i8")],
    # the knobs: stored under the lock; async_depth also read lockless (limit_depth)
    [("read_expire_ns", "<i8"), ("write_expire_ns", "<i8"), ("fifo_batch", "<i8"),
     ("writes_starved", "<i8"), ("front_merges", "<i8"), ("async_depth", "<i8"),
     ("nr_requests", "<i8")],
)  # fmt: skip

#: The scheduler's part of one request (the kernel's queuelist, rb_node, fifo_time and
#: elv.priv[0], with the sectors the sort needs): one line each, under the lock.
DD_RQ = cacheline_struct(
    [("fifo_next", "<i8"), ("fifo_prev", "<i8"), ("sort_next", "<i8"), ("sort_prev", "<i8"),
     ("sector", "<i8"), ("end_sector", "<i8"), ("fifo_time", "<i8"), ("flags", "<i8")]
)  # fmt: skip
assert DD_RQ.itemsize == 64

_W = 8  # bytes per field


def _idx(name: str) -> int:
    return field_offset(DD_DATA, name) // _W


_RQ_FIELDS = DD_RQ.itemsize // _W
_RQ_NAMES = ("fifo_next", "fifo_prev", "sort_next", "sort_prev", "sector", "end_sector",
             "fifo_time", "flags")  # fmt: skip
_FN, _FP, _SN, _SP, _SEC, _END, _FT, _FL = (field_offset(DD_RQ, n) // _W for n in _RQ_NAMES)

_FIFO_FIRST = (_idx("read_fifo_first"), _idx("write_fifo_first"))
_FIFO_LAST = (_idx("read_fifo_last"), _idx("write_fifo_last"))
_SORT_FIRST = (_idx("read_sort_first"), _idx("write_sort_first"))
_SORT_LAST = (_idx("read_sort_last"), _idx("write_sort_last"))
_NEXT_RQ = (_idx("read_next_rq"), _idx("write_next_rq"))
_NR_QUEUED = (_idx("read_nr_queued"), _idx("write_nr_queued"))
_DISP_FIRST, _DISP_LAST, _NR_DISP = (
    _idx("dispatch_first"),
    _idx("dispatch_last"),
    _idx("nr_dispatch"),
)
_BATCHING, _STARVED, _LAST_DIR = _idx("batching"), _idx("starved"), _idx("last_dir")
_INSERTED, _MERGED, _DISPATCHED = _idx("inserted"), _idx("merged"), _idx("dispatched")
_EXPIRE = (_idx("read_expire_ns"), _idx("write_expire_ns"))
_FIFO_BATCH, _WRITES_STARVED = _idx("fifo_batch"), _idx("writes_starved")
_FRONT_MERGES, _ASYNC_DEPTH, _NR_REQUESTS = (
    _idx("front_merges"),
    _idx("async_depth"),
    _idx("nr_requests"),
)

#: The sysfs attributes (v6.1's deadline_attrs but prio_aging_expire), in the
#: kernel's units and ranges: expiries in ms.
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("read_expire", "int", 500, "deadline of a read, ms (default 500)", 0, INT_MAX),
        Knob("write_expire", "int", 5000, "deadline of a write, ms (default 5000)", 0, INT_MAX),
        Knob(
            "writes_starved",
            "int",
            WRITES_STARVED,
            "read batches before a write batch while writes wait (default 2)",
            INT_MIN,
            INT_MAX,
        ),
        Knob("front_merges", "int", 1, "look up front merges, 0 or 1 (default 1)", 0, 1),
        Knob(
            "fifo_batch",
            "int",
            FIFO_BATCH,
            "requests of a batch in sector order (default 16)",
            0,
            INT_MAX,
        ),
        Knob(
            "async_depth",
            "int",
            0,
            "scheduler tags writes and async reads may take (default 3/4 of nr_requests)",
            1,
            INT_MAX,
        ),
    )
}
_KNOB_INDEX = {
    "read_expire": _EXPIRE[DD_READ],
    "write_expire": _EXPIRE[DD_WRITE],
    "writes_starved": _WRITES_STARVED,
    "front_merges": _FRONT_MERGES,
    "fifo_batch": _FIFO_BATCH,
    "async_depth": _ASYNC_DEPTH,
}
_MS_KNOBS = ("read_expire", "write_expire")

#: debugfs attributes, the kernel's names for the one level in use (BE: 1), plus
#: mqrt's read/write sort lists (the kernel has no debugfs file for them).
DEBUGFS = (
    "async_depth",
    "batching",
    "starved",
    "read_next_rq",
    "write_next_rq",
    f"read{DD_BE_PRIO}_fifo_list",
    f"write{DD_BE_PRIO}_fifo_list",
    f"dispatch{DD_BE_PRIO}",
    "queued",
    "owned_by_driver",
    "read_sort_list",
    "write_sort_list",
)


def async_depth_for(nr_requests: int) -> int:
    """dd_depth_updated(): 3/4 of the scheduler tags, at least 1."""
    return max(1, 3 * nr_requests // 4)


@dataclass(frozen=True)
class DeadlineSpec:
    """Where one request queue's deadline_data and its requests' lines are."""

    name: str
    nr_requests: int
    data: Region
    rqs: Region


class DeadlineData:
    """One process's handle on a request queue's mq-deadline state.

    ``insert``, ``dispatch``, ``finish``, ``limit_depth``, ``depth_updated``,
    ``has_work``, ``show_knob``/``store_knob``, ``debugfs`` and ``check`` take the
    lock themselves (or need none); the merge steps (``find_merge``,
    ``request_merged``, ``requests_merged``, ``former_request``, ``latter_request``)
    run with the lock held by the caller (``with dd.locked():``), as ``dd_bio_merge``
    holds ``dd->lock`` around the whole bio merge.
    """

    def __init__(self, arena: Arena, spec: DeadlineSpec):
        self.spec = spec
        self.a = arena.atomic
        self.nr = spec.nr_requests
        d = spec.data
        self._lock_off = d.addr(0, "lock")
        self._off = d.offset
        self._d = arena.buf[d.offset : d.offset + d.nbytes].cast("q")
        self._r = arena.buf[spec.rqs.offset : spec.rqs.offset + spec.rqs.nbytes].cast("q")
        self._completed_off = d.addr(0, "completed")
        self._held = False

    # -- set-up ----------------------------------------------------------------------

    @staticmethod
    def declare(layout: Layout, name: str, nr_requests: int) -> DeadlineSpec:
        """Declare the deadline_data of one request queue and the lines of its
        ``nr_requests`` scheduler requests."""
        if nr_requests < 1:
            raise ValueError(f"{name}: nr_requests must be >= 1, got {nr_requests}")
        data = layout.add(f"{name}.dd", DD_DATA)
        rqs = layout.add(f"{name}.dd_rq", DD_RQ, nr_requests)
        return DeadlineSpec(name, nr_requests, data, rqs)

    @staticmethod
    def init(arena: Arena, spec: DeadlineSpec, nr_requests: int = 0) -> None:
        """dd_init_sched() and dd_depth_updated(), in the owner before anyone else
        attaches: empty lists, v6.1's default knobs, ``last_dir`` WRITE, and
        ``nr_requests`` (default: every request line) with its ``async_depth``."""
        nr = nr_requests or spec.nr_requests
        if not 1 <= nr <= spec.nr_requests:
            raise ValueError(f"{spec.name}: nr_requests must be 1..{spec.nr_requests}, got {nr}")
        v = arena.view(spec.data)
        v[0] = 0
        for d in DIR_NAMES:
            for f in ("fifo_first", "fifo_last", "sort_first", "sort_last", "next_rq"):
                v[f"{d}_{f}"] = NIL
        v["dispatch_first"] = v["dispatch_last"] = NIL
        v["last_dir"] = DD_WRITE
        v["read_expire_ns"] = READ_EXPIRE_NS
        v["write_expire_ns"] = WRITE_EXPIRE_NS
        v["writes_starved"] = WRITES_STARVED
        v["front_merges"] = 1
        v["fifo_batch"] = FIFO_BATCH
        v["nr_requests"] = nr
        v["async_depth"] = async_depth_for(nr)
        r = arena.view(spec.rqs)
        for name in ("fifo_next", "fifo_prev", "sort_next", "sort_prev"):
            r[name] = NIL
        for name in ("sector", "end_sector", "fifo_time", "flags"):
            r[name] = 0
        del v, r

    def reinit(self) -> None:
        """dd_init_sched() again on a live queue (an elevator switch, the queue frozen
        and quiesced by the caller: no request is queued): empty lists, the default
        knobs, the statistics from 0."""
        d, r = self._d, self._r
        with self.locked():
            for i in range(1, len(d)):
                d[i] = 0
            for dd_dir in (DD_READ, DD_WRITE):
                for idx in (_FIFO_FIRST, _FIFO_LAST, _SORT_FIRST, _SORT_LAST, _NEXT_RQ):
                    d[idx[dd_dir]] = NIL
            d[_DISP_FIRST] = d[_DISP_LAST] = NIL
            d[_LAST_DIR] = DD_WRITE
            d[_EXPIRE[DD_READ]], d[_EXPIRE[DD_WRITE]] = READ_EXPIRE_NS, WRITE_EXPIRE_NS
            d[_WRITES_STARVED], d[_FRONT_MERGES] = WRITES_STARVED, 1
            d[_FIFO_BATCH], d[_NR_REQUESTS] = FIFO_BATCH, self.nr
            d[_ASYNC_DEPTH] = async_depth_for(self.nr)
            for b in range(0, len(r), _RQ_FIELDS):
                r[b + _FN] = r[b + _FP] = r[b + _SN] = r[b + _SP] = NIL
                r[b + _SEC] = r[b + _END] = r[b + _FT] = r[b + _FL] = 0

    def close(self) -> None:
        self._d.release()
        self._r.release()

    # -- the lock --------------------------------------------------------------------

    def lock(self) -> None:
        spin_lock(self.a, self._lock_off, LockClass.DD_LOCK)
        self._held = True

    def unlock(self) -> None:
        self._held = False
        spin_unlock(self.a, self._lock_off)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold dd->lock for the merge steps."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def _assert_held(self) -> None:
        if not self._held:
            raise RuntimeError(f"{self.spec.name}: dd->lock is not held by this process")

    def _rq(self, rq: int) -> int:
        if not 0 <= rq < self.nr:
            raise IndexError(f"{self.spec.name}: request {rq} out of range 0..{self.nr - 1}")
        return rq * _RQ_FIELDS

    # -- list mechanics (lock held) --------------------------------------------------

    def _fifo_add_tail(self, rq: int, first: int, last: int) -> None:
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        tail = d[last]
        r[b + _FN] = NIL
        r[b + _FP] = tail
        if tail == NIL:
            d[first] = rq
        else:
            r[tail * _RQ_FIELDS + _FN] = rq
        d[last] = rq

    def _fifo_add_head(self, rq: int, first: int, last: int) -> None:
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        head = d[first]
        r[b + _FP] = NIL
        r[b + _FN] = head
        if head == NIL:
            d[last] = rq
        else:
            r[head * _RQ_FIELDS + _FP] = rq
        d[first] = rq

    def _fifo_add_after(self, rq: int, pos: int, first: int, last: int) -> None:
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        nxt = r[pos * _RQ_FIELDS + _FN]
        r[b + _FP] = pos
        r[b + _FN] = nxt
        r[pos * _RQ_FIELDS + _FN] = rq
        if nxt == NIL:
            d[last] = rq
        else:
            r[nxt * _RQ_FIELDS + _FP] = rq

    def _fifo_del(self, rq: int, first: int, last: int) -> None:
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        nxt, prv = r[b + _FN], r[b + _FP]
        if prv == NIL:
            d[first] = nxt
        else:
            r[prv * _RQ_FIELDS + _FN] = nxt
        if nxt == NIL:
            d[last] = prv
        else:
            r[nxt * _RQ_FIELDS + _FP] = prv
        r[b + _FN] = r[b + _FP] = NIL

    def _sort_add(self, rq: int, dd_dir: int) -> None:
        """elv_rb_add(): after every request of a sector <= its own (scan from the
        tail: a sequential stream lands there)."""
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        sector = r[b + _SEC]
        pos = d[_SORT_LAST[dd_dir]]
        while pos != NIL and r[pos * _RQ_FIELDS + _SEC] > sector:
            pos = r[pos * _RQ_FIELDS + _SP]
        nxt = d[_SORT_FIRST[dd_dir]] if pos == NIL else r[pos * _RQ_FIELDS + _SN]
        r[b + _SP] = pos
        r[b + _SN] = nxt
        if pos == NIL:
            d[_SORT_FIRST[dd_dir]] = rq
        else:
            r[pos * _RQ_FIELDS + _SN] = rq
        if nxt == NIL:
            d[_SORT_LAST[dd_dir]] = rq
        else:
            r[nxt * _RQ_FIELDS + _SP] = rq

    def _sort_del(self, rq: int, dd_dir: int) -> None:
        """elv_rb_del()."""
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        nxt, prv = r[b + _SN], r[b + _SP]
        if prv == NIL:
            d[_SORT_FIRST[dd_dir]] = nxt
        else:
            r[prv * _RQ_FIELDS + _SN] = nxt
        if nxt == NIL:
            d[_SORT_LAST[dd_dir]] = prv
        else:
            r[nxt * _RQ_FIELDS + _SP] = prv
        r[b + _SN] = r[b + _SP] = NIL

    def _remove_request(self, rq: int) -> None:
        """deadline_remove_request() of a request on the FIFO and sort lists (with
        deadline_del_rq_rb()'s next_rq step)."""
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        dd_dir = r[b + _FL] & RQ_WRITE
        self._fifo_del(rq, _FIFO_FIRST[dd_dir], _FIFO_LAST[dd_dir])
        if d[_NEXT_RQ[dd_dir]] == rq:
            d[_NEXT_RQ[dd_dir]] = r[b + _SN]
        self._sort_del(rq, dd_dir)
        d[_NR_QUEUED[dd_dir]] -= 1
        r[b + _FL] &= ~RQ_ON_FIFO

    # -- insert and dispatch ---------------------------------------------------------

    def insert(
        self,
        rq: int,
        op: int,
        sector: int,
        nr_sectors: int,
        at_head: bool = False,
        now_ns: int = 0,
    ) -> None:
        """dd_insert_request() under dd->lock: ``at_head`` (a requeue, a flush) goes to
        the head of the dispatch list; otherwise the request joins its direction's
        sort list by ``sector`` and its FIFO with the deadline ``now_ns`` + its
        direction's expiry.  ``inserted`` counts a request once however often it is
        inserted (a requeue is not counted again)."""
        b = self._rq(rq)
        if nr_sectors < 0 or sector < 0:
            raise ValueError(f"{self.spec.name}: bad range {sector}+{nr_sectors}")
        self.lock()
        try:
            if self._r[b + _FL] & (RQ_ON_FIFO | RQ_ON_DISPATCH):
                raise ValueError(f"{self.spec.name}: request {rq} is already queued")
            self._insert(rq, op & 1, sector, nr_sectors, at_head, now_ns)
        finally:
            self.unlock()

    def insert_requests(
        self, rqs: Sequence[tuple[int, int, int, int]], at_head: bool = False, now_ns: int = 0
    ) -> None:
        """dd_insert_requests(): ``(rq, op, sector, nr_sectors)`` of each request, in
        order, under one hold of dd->lock (at the head, each goes before the ones
        inserted before it, as list_add puts them).  Checked whole before any is
        inserted: a ValueError changes nothing."""
        for rq, _, sector, nr_sectors in rqs:
            self._rq(rq)
            if nr_sectors < 0 or sector < 0:
                raise ValueError(f"{self.spec.name}: bad range {sector}+{nr_sectors}")
        if len({rq for rq, *_ in rqs}) != len(rqs):
            raise ValueError(f"{self.spec.name}: a request twice in one insert")
        self.lock()
        try:
            r = self._r
            for rq, *_ in rqs:
                if r[rq * _RQ_FIELDS + _FL] & (RQ_ON_FIFO | RQ_ON_DISPATCH):
                    raise ValueError(f"{self.spec.name}: request {rq} is already queued")
            for rq, op, sector, nr_sectors in rqs:
                self._insert(rq, op & 1, sector, nr_sectors, at_head, now_ns)
        finally:
            self.unlock()

    def _insert(
        self, rq: int, dd_dir: int, sector: int, nr_sectors: int, at_head: bool, now_ns: int
    ) -> None:
        """dd_insert_request(), lock held, arguments checked."""
        d, r, b = self._d, self._r, rq * _RQ_FIELDS
        flags = r[b + _FL]
        if not flags & RQ_INSERTED:
            d[_INSERTED] += 1
            flags |= RQ_INSERTED
        r[b + _SEC] = sector
        r[b + _END] = sector + nr_sectors
        flags = (flags & ~RQ_WRITE) | dd_dir
        if at_head:
            r[b + _FT] = now_ns
            r[b + _FL] = flags | RQ_ON_DISPATCH
            self._fifo_add_head(rq, _DISP_FIRST, _DISP_LAST)
            d[_NR_DISP] += 1
        else:
            r[b + _FL] = flags | RQ_ON_FIFO
            self._sort_add(rq, dd_dir)
            r[b + _FT] = now_ns + d[_EXPIRE[dd_dir]]
            self._fifo_add_tail(rq, _FIFO_FIRST[dd_dir], _FIFO_LAST[dd_dir])
            d[_NR_QUEUED[dd_dir]] += 1

    def dispatch(self, now_ns: int) -> int:
        """dd_dispatch_request(): the next request to hand to the driver, or -1."""
        self.lock()
        try:
            return self._dispatch(now_ns)
        finally:
            self.unlock()

    def dispatch_batch(self, now_ns: int, nr: int) -> list[int]:
        """Up to ``nr`` dd_dispatch_request()s in one hold of dd->lock, in order."""
        out: list[int] = []
        self.lock()
        try:
            while len(out) < nr:
                rq = self._dispatch(now_ns)
                if rq == NIL:
                    break
                out.append(rq)
        finally:
            self.unlock()
        return out

    def _dispatch(self, now_ns: int) -> int:
        """__dd_dispatch_request() for the one level in use, lock held."""
        d, r = self._d, self._r
        rq = d[_DISP_FIRST]
        if rq != NIL:
            self._fifo_del(rq, _DISP_FIRST, _DISP_LAST)
            d[_NR_DISP] -= 1
            r[rq * _RQ_FIELDS + _FL] &= ~RQ_ON_DISPATCH
            d[_DISPATCHED] += 1
            return rq
        # a batch is reads XOR writes: go on in the last direction's sector order
        rq = d[_NEXT_RQ[d[_LAST_DIR]]]
        if rq == NIL or d[_BATCHING] >= d[_FIFO_BATCH]:
            # no batch: choose a direction
            if d[_FIFO_FIRST[DD_READ]] != NIL:
                dd_dir = DD_READ
                if d[_FIFO_FIRST[DD_WRITE]] != NIL:
                    # starved is unsigned and compared with the int knob as unsigned
                    starved = d[_STARVED]
                    d[_STARVED] = (starved + 1) & U32
                    if starved >= d[_WRITES_STARVED] & U32:
                        dd_dir = DD_WRITE
                        d[_STARVED] = 0
            elif d[_FIFO_FIRST[DD_WRITE]] != NIL:
                dd_dir = DD_WRITE
                d[_STARVED] = 0
            else:
                return NIL
            # the FIFO's oldest when it expired or nothing follows in sector order
            next_rq = d[_NEXT_RQ[dd_dir]]
            oldest = d[_FIFO_FIRST[dd_dir]]
            if next_rq == NIL or now_ns >= r[oldest * _RQ_FIELDS + _FT]:
                rq = oldest
            else:
                rq = next_rq
            d[_LAST_DIR] = dd_dir
            d[_BATCHING] = 0
        d[_BATCHING] += 1
        # deadline_move_request(): the next in sector order, then off both lists
        dd_dir = r[rq * _RQ_FIELDS + _FL] & RQ_WRITE
        d[_NEXT_RQ[dd_dir]] = r[rq * _RQ_FIELDS + _SN]
        self._remove_request(rq)
        d[_DISPATCHED] += 1
        return rq

    def has_work(self) -> bool:
        """dd_has_work(): lockless, relaxed loads of the three list heads (see the
        module docstring for why a stale answer is safe)."""
        a, base = self.a, self._off
        return (
            a.read(base + _DISP_FIRST * _W) != U64_NIL
            or a.read(base + _FIFO_FIRST[DD_READ] * _W) != U64_NIL
            or a.read(base + _FIFO_FIRST[DD_WRITE] * _W) != U64_NIL
        )

    def finish(self, rq: int) -> None:
        """dd_finish_request(): a request the scheduler saw is freed (completed after
        dispatch, or merged into another); ``completed`` counts it once."""
        b = self._rq(rq)
        r = self._r
        flags = r[b + _FL]
        if flags & (RQ_ON_FIFO | RQ_ON_DISPATCH):
            raise ValueError(f"{self.spec.name}: request {rq} is still queued")
        if flags & RQ_INSERTED:
            r[b + _FL] = flags & ~RQ_INSERTED
            self.a.fetch_add(self._completed_off, 1)

    # -- merges (lock held by the caller) --------------------------------------------

    def find_merge(
        self,
        op: int,
        sector: int,
        nr_sectors: int,
        ok: Callable[[int], bool] | None = None,
    ) -> tuple[ElvMerge, int]:
        """The scheduler's half of elv_merge() for a bio: a queued request of the
        bio's direction that ends where the bio starts (a back merge), else, with
        ``front_merges``, one that starts where the bio ends (dd_request_merge).
        ``ok(rq)`` is the caller's elv_bio_merge_ok(); a back candidate it refuses
        leaves the front lookup."""
        self._assert_held()
        d, r = self._d, self._r
        dd_dir = op & 1
        end = sector + nr_sectors
        pos = d[_SORT_FIRST[dd_dir]]
        while pos != NIL:
            b = pos * _RQ_FIELDS
            if r[b + _END] == sector:
                if ok is None or ok(pos):
                    return ElvMerge.BACK_MERGE, pos
                break
            if r[b + _SEC] >= sector:  # sorted by start: none later ends at it
                break
            pos = r[b + _SN]
        if d[_FRONT_MERGES]:
            pos = d[_SORT_FIRST[dd_dir]]
            while pos != NIL:
                s = r[pos * _RQ_FIELDS + _SEC]
                if s == end:
                    if ok is None or ok(pos):
                        return ElvMerge.FRONT_MERGE, pos
                    break
                if s > end:
                    break
                pos = r[pos * _RQ_FIELDS + _SN]
        return ElvMerge.NO_MERGE, NIL

    def former_request(self, rq: int) -> int:
        """elv_rb_former_request(): the request before ``rq`` in sector order, or -1."""
        self._assert_held()
        return self._r[self._rq(rq) + _SP]

    def latter_request(self, rq: int) -> int:
        """elv_rb_latter_request(): the request after ``rq`` in sector order, or -1."""
        self._assert_held()
        return self._r[self._rq(rq) + _SN]

    def rq_range(self, rq: int) -> tuple[int, int]:
        """(sector, nr_sectors) of a request the scheduler holds, as its last insert or
        merge left them (lock held, or the request dispatched to the caller)."""
        b = self._rq(rq)
        return self._r[b + _SEC], self._r[b + _END] - self._r[b + _SEC]

    def request_merged(self, rq: int, new_sector: int, new_nr_sectors: int) -> None:
        """A bio merged into queued ``rq``, which now covers ``new_sector`` +
        ``new_nr_sectors``; a front merge (its start moved) repositions it in the
        sort list (dd_request_merged)."""
        self._assert_held()
        b = self._rq(rq)
        r = self._r
        if not r[b + _FL] & RQ_ON_FIFO:
            raise ValueError(f"{self.spec.name}: request {rq} is not on the sort list")
        new_end = new_sector + new_nr_sectors
        if new_sector > r[b + _SEC] or new_end < r[b + _END]:
            raise ValueError(f"{self.spec.name}: a merge cannot shrink request {rq}")
        front = new_sector != r[b + _SEC]
        r[b + _SEC] = new_sector
        r[b + _END] = new_end
        if front:
            dd_dir = r[b + _FL] & RQ_WRITE
            self._sort_del(rq, dd_dir)
            self._sort_add(rq, dd_dir)

    def requests_merged(self, rq: int, next_rq: int) -> None:
        """``next_rq``, which starts where ``rq`` ends, was merged into ``rq``
        (dd_merged_requests): ``rq`` keeps the earlier deadline (and takes
        ``next_rq``'s place in the FIFO when that one's is earlier), ``next_rq``
        leaves every list; the caller frees it (``finish``)."""
        self._assert_held()
        b, nb = self._rq(rq), self._rq(next_rq)
        d, r = self._d, self._r
        if rq == next_rq or not r[b + _FL] & r[nb + _FL] & RQ_ON_FIFO:
            raise ValueError(f"{self.spec.name}: {rq} and {next_rq} are not both queued")
        dd_dir = r[b + _FL] & RQ_WRITE
        if r[nb + _FL] & RQ_WRITE != dd_dir or r[b + _END] != r[nb + _SEC]:
            raise ValueError(f"{self.spec.name}: request {next_rq} does not follow {rq}")
        d[_MERGED] += 1
        if r[nb + _FT] < r[b + _FT]:
            first, last = _FIFO_FIRST[dd_dir], _FIFO_LAST[dd_dir]
            self._fifo_del(rq, first, last)
            self._fifo_add_after(rq, next_rq, first, last)
            r[b + _FT] = r[nb + _FT]
        r[b + _END] = r[nb + _END]
        self._remove_request(next_rq)

    # -- depth -------------------------------------------------------------------------

    def limit_depth(self, op: int, sync: bool) -> int:
        """dd_limit_depth(): the shallow depth for a scheduler tag of ``op``: none (0)
        for a sync read, ``async_depth`` for writes and async I/O."""
        if sync and not op & 1:
            return 0
        return self.a.read(self._off + _ASYNC_DEPTH * _W)

    def nr_requests(self) -> int:
        """q->nr_requests as the scheduler last heard it (a relaxed load)."""
        return self._d[_NR_REQUESTS]

    def depth_updated(self, nr_requests: int) -> int:
        """dd_depth_updated(): ``async_depth`` from the scheduler's ``nr_requests``;
        returns it, for the caller's sbitmap_queue_min_shallow_depth()."""
        if not 1 <= nr_requests <= self.nr:
            raise ValueError(
                f"{self.spec.name}: nr_requests must be 1..{self.nr}, got {nr_requests}"
            )
        depth = async_depth_for(nr_requests)
        with self.locked():
            self._d[_NR_REQUESTS] = nr_requests
            self._d[_ASYNC_DEPTH] = depth
        return depth

    # -- sysfs and debugfs -------------------------------------------------------------

    def show_knob(self, name: str) -> str:
        """The sysfs attribute ``name`` as the kernel shows it (``"%d\\n"``; expiries
        in ms), read without the lock as the kernel's show does."""
        idx = _knob_index(name)
        value = self._d[idx]
        if name in _MS_KNOBS:
            value //= NSEC_PER_MSEC
        return f"{value}\n"

    def store_knob(self, name: str, text: str) -> None:
        """Write sysfs attribute ``name``: an integer in the knob's range (the
        kernel clamps an out-of-range value; mqrt refuses it with a KnobError that
        names the knob and its range)."""
        idx = _knob_index(name)
        value = KNOBS[name].parse(str(text).strip())
        if name in _MS_KNOBS:
            value *= NSEC_PER_MSEC
        with self.locked():
            self._d[idx] = value

    def debugfs(self, name: str) -> str:
        """The debugfs attribute ``name`` of :data:`DEBUGFS` (the kernel's formats;
        a request is shown ``{.op=READ, .internal_tag=N, .sector=S, .nr_sectors=K,
        .fifo_time=T}``, one a line)."""
        if name not in DEBUGFS:
            raise KeyError(f"no debugfs attribute {name!r}; one of {', '.join(DEBUGFS)}")
        with self.locked():
            d = self._d
            if name in ("async_depth", "batching", "starved"):
                idx = {"async_depth": _ASYNC_DEPTH, "batching": _BATCHING, "starved": _STARVED}
                return f"{d[idx[name]]}\n"
            if name.endswith("_next_rq"):
                rq = d[_NEXT_RQ[DIR_NAMES.index(name[: -len("_next_rq")])]]
                return "" if rq == NIL else self._rq_line(rq)
            if name.endswith("_fifo_list"):
                dd_dir = DD_READ if name.startswith("read") else DD_WRITE
                return "".join(self._rq_line(rq) for rq in self._walk(d[_FIFO_FIRST[dd_dir]], _FN))
            if name.startswith("dispatch"):
                return "".join(self._rq_line(rq) for rq in self._walk(d[_DISP_FIRST], _FN))
            if name.endswith("_sort_list"):
                dd_dir = DD_READ if name.startswith("read") else DD_WRITE
                return "".join(self._rq_line(rq) for rq in self._walk(d[_SORT_FIRST[dd_dir]], _SN))
            completed = self.a.read(self._completed_off)
            if name == "queued":
                count = d[_INSERTED] - completed
            else:  # owned_by_driver
                count = d[_DISPATCHED] + d[_MERGED] - completed
            levels = [0, 0, 0]
            levels[DD_BE_PRIO] = count & U32
            return " ".join(map(str, levels)) + "\n"

    def _rq_line(self, rq: int) -> str:
        r, b = self._r, rq * _RQ_FIELDS
        op = "WRITE" if r[b + _FL] & RQ_WRITE else "READ"
        return (
            f"{{.op={op}, .internal_tag={rq}, .sector={r[b + _SEC]}, "
            f".nr_sectors={r[b + _END] - r[b + _SEC]}, .fifo_time={r[b + _FT]}}}\n"
        )

    def _walk(self, first: int, link: int) -> Iterator[int]:
        r, rq, steps = self._r, first, 0
        while rq != NIL and steps <= self.nr:
            yield rq
            rq = r[rq * _RQ_FIELDS + link]
            steps += 1

    def counters(self) -> dict[str, int]:
        """inserted, merged, dispatched, completed, and debugfs's queued and
        owned_by_driver, as numbers (one snapshot under the lock)."""
        with self.locked():
            d = self._d
            c = {
                "inserted": d[_INSERTED],
                "merged": d[_MERGED],
                "dispatched": d[_DISPATCHED],
                "completed": self.a.read(self._completed_off),
            }
        c["queued"] = c["inserted"] - c["completed"]
        c["owned_by_driver"] = c["dispatched"] + c["merged"] - c["completed"]
        return c

    def state(self) -> dict[str, object]:
        """Everything the dispatch order depends on, as plain values (one snapshot
        under the lock): the FIFO, sort and dispatch lists as ids, ``next_rq``,
        ``batching``, ``starved``, ``last_dir``."""
        with self.locked():
            d, r = self._d, self._r
            return {
                "fifo": [list(self._walk(d[_FIFO_FIRST[i]], _FN)) for i in (0, 1)],
                "sort": [list(self._walk(d[_SORT_FIRST[i]], _SN)) for i in (0, 1)],
                "dispatch": list(self._walk(d[_DISP_FIRST], _FN)),
                "next_rq": [d[_NEXT_RQ[0]], d[_NEXT_RQ[1]]],
                "batching": d[_BATCHING],
                "starved": d[_STARVED],
                "last_dir": d[_LAST_DIR],
                "ranges": {
                    rq: (r[b + _SEC], r[b + _END], r[b + _FT])
                    for rq in range(self.nr)
                    if r[(b := rq * _RQ_FIELDS) + _FL] & RQ_ON_FIFO
                },
            }

    # -- invariants --------------------------------------------------------------------

    def check(self) -> list[str]:
        """The lists' invariants, under the lock; the problems found (empty: clean).

        Every request with ON_FIFO is on exactly its direction's FIFO and sort list,
        every ON_DISPATCH one on the dispatch list, no other request on any list;
        links agree both ways and with first/last; the sort lists are in sector
        order; ``next_rq`` is on its sort list; the counts match.  (A FIFO is in
        insertion order, not always in deadline order: an expiry lowered between
        two inserts gives the later one the earlier deadline, as in the kernel.)"""
        with self.locked():
            return self._check()

    def _check(self) -> list[str]:
        d, r, nr = self._d, self._r, self.nr
        bad: list[str] = []
        seen: dict[int, str] = {}

        def walk(what: str, first: int, last: int, nxt: int, prv: int) -> list[int]:
            out: list[int] = []
            rq, prev = d[first], NIL
            inside: set[int] = set()
            while rq != NIL:
                if not 0 <= rq < nr:
                    bad.append(f"{what}: id {rq} out of range")
                    return out
                if rq in seen and seen[rq] != what.split(maxsplit=1)[0]:
                    bad.append(f"{what}: request {rq} also on {seen[rq]}")
                if rq in inside:
                    bad.append(f"{what}: loop at request {rq}")
                    return out
                inside.add(rq)
                if r[rq * _RQ_FIELDS + prv] != prev:
                    bad.append(f"{what}: request {rq}'s back link is {r[rq * _RQ_FIELDS + prv]}")
                out.append(rq)
                prev, rq = rq, r[rq * _RQ_FIELDS + nxt]
            if d[last] != prev:
                bad.append(f"{what}: last is {d[last]}, the walk ended at {prev}")
            return out

        disp = walk("dispatch", _DISP_FIRST, _DISP_LAST, _FN, _FP)
        for rq in disp:
            seen[rq] = "dispatch"
        if len(disp) != d[_NR_DISP]:
            bad.append(f"dispatch: {len(disp)} requests, counted {d[_NR_DISP]}")
        queued: set[int] = set()
        for i, name in enumerate(DIR_NAMES):
            fifo = walk(f"{name} fifo", _FIFO_FIRST[i], _FIFO_LAST[i], _FN, _FP)
            for rq in fifo:
                seen[rq] = f"{name}"
            sort = walk(f"{name} sort", _SORT_FIRST[i], _SORT_LAST[i], _SN, _SP)
            if set(fifo) != set(sort) or len(fifo) != len(sort):
                bad.append(f"{name}: fifo {sorted(fifo)} and sort {sorted(sort)} differ")
            if len(fifo) != d[_NR_QUEUED[i]]:
                bad.append(f"{name}: {len(fifo)} on the fifo, counted {d[_NR_QUEUED[i]]}")
            sectors = [r[rq * _RQ_FIELDS + _SEC] for rq in sort]
            if sectors != sorted(sectors):
                bad.append(f"{name} sort: out of sector order {sectors}")
            for rq in fifo:
                fl = r[rq * _RQ_FIELDS + _FL]
                if fl & RQ_WRITE != i or not fl & RQ_ON_FIFO or fl & RQ_ON_DISPATCH:
                    bad.append(f"{name} fifo: request {rq} has flags {fl:#x}")
                if r[rq * _RQ_FIELDS + _END] < r[rq * _RQ_FIELDS + _SEC]:
                    bad.append(f"{name}: request {rq} ends before it starts")
            nxt = d[_NEXT_RQ[i]]
            if nxt != NIL and nxt not in sort:
                bad.append(f"{name}: next_rq {nxt} is not on the sort list")
            queued.update(fifo)
        for rq in range(nr):
            fl = r[rq * _RQ_FIELDS + _FL]
            if fl & RQ_ON_FIFO and rq not in queued:
                bad.append(f"request {rq} is marked queued but on no fifo")
            if fl & RQ_ON_DISPATCH and rq not in disp:
                bad.append(f"request {rq} is marked for dispatch but not on the list")
            if fl & (RQ_ON_FIFO | RQ_ON_DISPATCH) and not fl & RQ_INSERTED:
                bad.append(f"request {rq} is queued but was not counted as inserted")
        on_lists = len(queued) + len(disp)
        completed = self.a.read(self._completed_off)
        owned = d[_INSERTED] - completed - on_lists
        if owned < 0:
            bad.append(
                f"counts: inserted {d[_INSERTED]} - completed {completed} < {on_lists} queued"
            )
        if d[_DISPATCHED] + d[_MERGED] - completed < 0:
            bad.append("counts: more completed than dispatched and merged")
        if d[_LAST_DIR] not in (DD_READ, DD_WRITE):
            bad.append(f"last_dir is {d[_LAST_DIR]}")
        return bad


#: NIL as a relaxed 64-bit load returns it (AtomicView's 64-bit words are unsigned).
U64_NIL = 2**64 - 1


def _knob_index(name: str) -> int:
    if name not in _KNOB_INDEX:
        raise KnobError(f"unknown mq-deadline attribute {name!r}; one of {', '.join(KNOBS)}")
    return _KNOB_INDEX[name]
