"""The structs of ``include/linux/blk-mq.h`` and ``block/blk-mq.h`` and their
shared-memory layout: the tag set, the request queue, requests, hctxs, ctx lists,
and each CPU's handles on them.

The functions that build them (``blk_mq_alloc_tag_set``, ``blk_mq_init_queue``) are in
:mod:`mqrt.block.blk_mq_setup`; the data path that uses them is in
:mod:`mqrt.block.blk_mq` and :mod:`mqrt.block.blk_mq_complete`.

Shared layout (one numpy dtype per struct, contended words on their own lines):

=====================  ====================================  ============================
struct                 fields (shared part)                  written by
=====================  ====================================  ============================
request (pool)         state, deadline, io_start, setup;     see :func:`request_dtype`
                       issue_time, pdu
blk_mq_hw_ctx          state bits, nr_active/max_active,     atomics (any CPU)
                       dispatch_busy
hctx->ctx_map          an sbitmap of shift 3: 8 ctxs a       under the ctx list's lock
                       word, a word a cache line
request_queue          queue_flags, nr_active (shared tags)  atomics (any CPU)
lists (ctx rq_lists,   lock, head, tail, ids                 under the list's lock
dispatch, requeue)
=====================  ====================================  ============================

The owner builds the structs (:class:`TagSet`, :class:`RequestQueue` with one
:class:`HwCtxSpec` per hctx); each CPU makes its handles on them (:class:`Queue`,
:class:`HwCtx`, :class:`Request`) from its forked copy.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mqrt.block import _rq
from mqrt.block import blk_mq_types as _types
from mqrt.block.blk_mq_cpumap import HctxType, QueueMap, Topology
from mqrt.block.blk_mq_tag import Tags, TagsSpec
from mqrt.block.blk_mq_types import (
    BLK_DEFAULT_TIMEOUT_MS,
    BLK_MQ_CPU_WORK_BATCH,
    BLK_MQ_DISPATCH_BUSY_EWMA_FACTOR,
    BLK_MQ_DISPATCH_BUSY_EWMA_WEIGHT,
    NUMA_NO_NODE,
    SECTOR_SHIFT,
    BlkMqFlag,
    BlkMqOps,
    BlkStatus,
    HctxState,
    QueueFlag,
    ReqOp,
    Rqf,
    RqState,
)
from mqrt.block.blk_settings import QueueLimits
from mqrt.block.mq_deadline import DeadlineData, DeadlineSpec
from mqrt.lib._atomic import AtomicView
from mqrt.lib.idr import Ida
from mqrt.lib.lockstat import LockClass
from mqrt.lib.percpu_ref import PercpuRef, PercpuRefSpec
from mqrt.lib.sbitmap import SbitmapSpec, SbqGeneration
from mqrt.lib.shm import (
    CACHELINE,
    Arena,
    Layout,
    Region,
    cacheline_struct,
    field_dtype,
    field_offset,
    struct_of,
)
from mqrt.lib.wait import WAIT_QUEUE_HEAD, Waiters, WaitQueue, spin_lock, spin_unlock

#: The statuses with which a driver refuses a request for now.
_BUSY = (int(BlkStatus.RESOURCE), int(BlkStatus.DEV_RESOURCE))
# Plain ints for the hot path (enum arithmetic costs a Python call each).
_IN_FLIGHT = int(RqState.IN_FLIGHT)
_RQF_MQ_INFLIGHT = int(Rqf.MQ_INFLIGHT)
_RQF_RESV = int(Rqf.RESV)
_RQF_POLLED = int(Rqf.POLLED)
_RQF_REQUEUED = int(Rqf.REQUEUED)
_RQF_ELV = int(Rqf.ELV)
_RQF_MIGRATED = int(Rqf.MIGRATED)
_STOPPED = 1 << HctxState.STOPPED
_INACTIVE = 1 << HctxState.INACTIVE
_SCHED_RESTART = 1 << HctxState.SCHED_RESTART
_QUIESCED = 1 << QueueFlag.QUIESCED


class BlkMqError(ValueError):
    """A tag set or queue the kernel would refuse, named: the message starts with the
    errno the kernel returns (``EINVAL: ...``, ``ENOMEM: ...``, ``EBUSY: ...``)."""


# -- shared-memory layout ------------------------------------------------------------------

#: rq.state: bits 0-1 MQ_RQ_*, bit 2 "allocated" (a tag owns it), bits 8+ generation
#: (defined with the types, so that the tag iterators can read it too).
RQ_STATE_MASK = _types.RQ_STATE_MASK
RQ_ALLOCATED = _types.RQ_ALLOCATED
RQ_GEN_SHIFT = _types.RQ_GEN_SHIFT

_OWNED_OR_BUSY = RQ_ALLOCATED | RQ_STATE_MASK

#: struct request, the block layer's part: (name, format) in offset order.  One cache
#: line; a second line starts with ``issue_time_ns`` and the driver's PDU (``cmd_size``
#: bytes) follows it.
_RQ_FIELDS = [
    ("state", "<u8"),  # MQ_RQ_* | RQ_ALLOCATED | generation << RQ_GEN_SHIFT
    ("deadline_ns", "<u8"),
    ("io_start_time_ns", "<u8"),
    # The setup block, written at once by the allocating CPU (RQ_SETUP):
    ("start_time_ns", "<u8"),
    ("sector", "<u8"),
    ("nr_sectors", "<u4"),
    ("nr_bios", "<u2"),  # bios merged into it, itself included (at most max_segments)
    ("nr_phys_segments", "<u2"),  # at most max_segments, itself at most USHRT_MAX
    ("cpu", "<u2"),  # the submitting CPU
    ("hctx", "<u2"),  # hctx->queue_num (alloc_tag_set keeps nr_hw_queues <= 65536)
    ("q", "<u2"),  # q->id (the queue ida's range is 0..65535)
    ("op", "<u1"),
    ("pad", "<u1"),
    ("rq_flags", "<u4"),
    ("status", "<i4"),
]
#: The block layer's field on the second line, read and written only when a request
#: goes back to the block layer (RQF_REQUEUED): off the hot line.
_RQ_ISSUE_FIELDS = [("issue_time_ns", "<u8")]
#: A scheduler request's tags, on the second line: ``tag`` its driver tag
#: (:data:`RQ_NO_TAG` while it has none), ``internal_tag`` its sched tag.
_RQ_SCHED_FIELDS = [("tag", "<i4"), ("internal_tag", "<i4")]
#: ``rq->tag`` of a scheduler request holding no driver tag (BLK_MQ_NO_TAG).
RQ_NO_TAG = -1


def request_dtype(cmd_size: int) -> np.dtype:
    """struct request + its driver PDU (``cmd_size`` bytes), one request a line or more.

    ================  =====================================================
    field             owner
    ================  =====================================================
    state             cmpxchg by whoever moves it (see the module docstring)
    deadline_ns       the CPU that started it; read by timeout work
    io_start_time_ns  the CPU that started it (each time: the kernel's
                      blk_mq_start_request() stamps every start)
    setup block       the allocating CPU (RQ_SETUP), before issue; merges on that
                      CPU grow it (plugged, or on its ctx list under the lock)
    issue_time_ns     the CPU that hands the request back to the block layer
                      the first time (RQF_REQUEUED): when it was first issued,
                      its first start or, refused before starting, the refusal
    tag               a scheduler request's driver tag: the dispatching CPU
                      that took it (blk_mq_get_driver_tag()), before
                      ->queue_rq; reset by whoever puts it back (requeue, end)
    internal_tag      a scheduler request's sched tag: fixed at set-up
    pdu               the driver, while it owns the request
    ================  =====================================================

    ``issue_time_ns`` is mqrt's (the kernel keeps no such time; fio keeps it in the
    io_u): a retried request's stall is completion latency, as fio sees it, while
    ``io_start_time_ns`` stays the kernel's, the last start.
    """
    second = [*_RQ_ISSUE_FIELDS, *_RQ_SCHED_FIELDS]
    if cmd_size:
        second.append(("pdu", f"V{cmd_size}"))
    return cacheline_struct(_RQ_FIELDS, second)


#: The request's layout without a PDU: the source of every offset below.
REQUEST = request_dtype(0)
#: Byte offsets of struct request's fields from the request's base (``rq.base``, which
#: addresses the state word).  Hot paths add these to a base: no other module writes
#: an offset into a request.
RQ_OFF_DEADLINE = field_offset(REQUEST, "deadline_ns")
RQ_OFF_IO_START = field_offset(REQUEST, "io_start_time_ns")
RQ_OFF_SETUP = field_offset(REQUEST, "start_time_ns")
RQ_OFF_SECTOR = field_offset(REQUEST, "sector")
RQ_OFF_NR_SECTORS = field_offset(REQUEST, "nr_sectors")
RQ_OFF_CPU = field_offset(REQUEST, "cpu")
RQ_OFF_HCTX = field_offset(REQUEST, "hctx")
RQ_OFF_Q = field_offset(REQUEST, "q")
RQ_OFF_OP = field_offset(REQUEST, "op")
RQ_OFF_FLAGS = field_offset(REQUEST, "rq_flags")
RQ_OFF_STATUS = field_offset(REQUEST, "status")
RQ_OFF_ISSUE = field_offset(REQUEST, "issue_time_ns")
RQ_OFF_TAG = field_offset(REQUEST, "tag")
RQ_OFF_INTERNAL_TAG = field_offset(REQUEST, "internal_tag")
#: The 16-bit fields as indexes into a ``cast("H")`` view of the arena, from the
#: request's ``base >> 1`` (hot paths read cpu, hctx and q whole, with one index).
RQ_U16_CPU = RQ_OFF_CPU >> 1
RQ_U16_HCTX = RQ_OFF_HCTX >> 1
RQ_U16_Q = RQ_OFF_Q >> 1
#: Largest number of hw queues, CPUs and queue ids the 16-bit fields hold.
RQ_U16_LIMIT = 1 << 16
#: The setup block (at RQ_OFF_SETUP), written once by the allocating CPU (one
#: pack_into): start_time_ns, sector, nr_sectors, nr_bios, nr_phys_segments, cpu, hctx,
#: q, op, rq_flags, status.
RQ_SETUP = struct_of(REQUEST, "start_time_ns", "status")
#: deadline_ns, io_start_time_ns (at RQ_OFF_DEADLINE): written by blk_mq_start_request().
RQ_TIMES = struct_of(REQUEST, "deadline_ns", "io_start_time_ns")
#: io_start_time_ns + the setup block but sector and nr_phys_segments (at
#: RQ_OFF_IO_START): all the end reads, in one go.
RQ_END = struct_of(REQUEST, "io_start_time_ns", "status", skip=("sector", "nr_phys_segments"))
#: nr_sectors, nr_bios, nr_phys_segments (at RQ_OFF_NR_SECTORS): what a back merge grows.
RQ_SIZE = struct_of(REQUEST, "nr_sectors", "nr_phys_segments")
#: sector + RQ_SIZE (at RQ_OFF_SECTOR): what a front merge moves and grows.
RQ_EXTENT = struct_of(REQUEST, "sector", "nr_phys_segments")
# The hot paths rely on these: the state word at the base, whole structs contiguous,
# the 16-bit fields on even offsets (their RQ_U16_* indexes), one line for all of
# them; issue_time_ns opens the next line (whatever the PDU's size).
assert field_offset(REQUEST, "state") == 0
assert RQ_OFF_SETUP + RQ_SETUP.size == RQ_OFF_STATUS + field_dtype(REQUEST, "status").itemsize
assert RQ_OFF_SETUP + RQ_SETUP.size == CACHELINE == RQ_OFF_ISSUE
assert RQ_OFF_IO_START + RQ_END.size == RQ_OFF_SETUP + RQ_SETUP.size
assert RQ_OFF_DEADLINE + RQ_TIMES.size == RQ_OFF_SETUP
assert RQ_OFF_SECTOR + RQ_EXTENT.size == RQ_OFF_NR_SECTORS + RQ_SIZE.size
assert REQUEST["nr_bios"].itemsize == REQUEST["nr_phys_segments"].itemsize == 2
assert REQUEST["cpu"].itemsize == REQUEST["hctx"].itemsize == REQUEST["q"].itemsize == 2
assert not (RQ_OFF_CPU | RQ_OFF_HCTX | RQ_OFF_Q) & 1
# mqrt.block._rq writes and reads the hot line at fixed offsets: they must be these.
assert (_rq.OFF_START, _rq.OFF_IO_START, _rq.OFF_Q, _rq.OFF_FLAGS, _rq.OFF_STATUS) == (
    RQ_OFF_SETUP,
    RQ_OFF_IO_START,
    RQ_OFF_Q,
    RQ_OFF_FLAGS,
    RQ_OFF_STATUS,
)
assert (_rq.ALLOCATED, _rq.STATE_MASK, _rq.GEN_SHIFT, _rq.IN_FLIGHT) == (
    RQ_ALLOCATED,
    RQ_STATE_MASK,
    RQ_GEN_SHIFT,
    _IN_FLIGHT,
)
assert RQ_SETUP.format == "<QQIHHHHHB1xIi" and RQ_TIMES.format == "<QQ"  # and their types
assert REQUEST.itemsize == 2 * CACHELINE


#: A list of request ids under a bit spinlock (ctx rq_lists, hctx->dispatch,
#: q->requeue_list).  ``head``/``tail`` are monotonic; they start at RQ_LIST_ORIGIN so
#: add-at-head can move ``head`` down.
RQ_LIST_HEADER = cacheline_struct([("lock", "<u8"), ("head", "<u8"), ("tail", "<u8")])
RQ_LIST_ORIGIN = 1 << 40

#: struct blk_mq_hw_ctx, the shared part.
HCTX = cacheline_struct(
    [("state", "<u8")],  # BLK_MQ_S_* bits
    # requests holding a shared tag; the most held under a fair-share limit
    [("nr_active", "<i4"), ("max_active", "<i4")],
    [("dispatch_busy", "<u4")],  # EWMA of "driver said busy"
    # hctx->wait_index: the tag wait queue its next sleeper takes (sbq_wait_ptr),
    # shared by the hctx's CPUs, moved on by one cmpxchg
    [("wait_index", "<i4")],
)
#: hctx->ctx_map is an sbitmap of 2^3 bits a word (blk_mq_alloc_hctx():
#: ``ilog2(8)``), one bit per ctx of the hctx by index_hw: each word, on its own
#: cache line, is shared by 8 CPUs' ctxs; no limit on the number of ctxs.
CTX_MAP_SHIFT = 3
_CTX_MAP_BIT_MASK = (1 << CTX_MAP_SHIFT) - 1

#: struct request_queue, the shared part.
QUEUE = cacheline_struct(
    # QUEUE_FLAG_* bits; q->elevator: the elevator's id (mqrt.block.elevator), changed
    # only with the queue frozen and quiesced
    [("queue_flags", "<u8"), ("elevator", "<i4")],
    [("queue_lock", "<u8")],  # the legacy queue_lock (bit 0): --mode sq only
    [("nr_active_requests_shared_tags", "<i4"), ("max_active", "<i4")],
    # the transitions' nesting (the sysfs writer's, fully ordered RMWs), and
    # mq_freeze_wq: the freezer waits there for q_usage_counter to drain, submitters
    # for the queue to thaw
    [("mq_freeze_depth", "<i4"), ("quiesce_depth", "<i4"), ("mq_freeze_wq", WAIT_QUEUE_HEAD)],
)
QUEUE_OFF_FREEZE_WQ = field_offset(QUEUE, "mq_freeze_wq")

#: A tag set's CPU -> hctx map as every CPU reads it (the DEFAULT map; its ``mq_map``
#: entries are the int32 array ``TagSet.map_cpus``): written by the sysfs writer
#: while every queue of the set is frozen and quiesced, ``map_gen`` last (even when
#: stable, odd while being written).
MQ_MAP = cacheline_struct([("map_gen", "<u4"), ("nr_hw_queues", "<u4")])


@dataclass(frozen=True)
class RqListSpec:
    name: str
    capacity: int  #: a power of two, at least the number of requests that can be on it
    header: Region
    data: Region


def declare_rq_list(layout: Layout, name: str, nr: int) -> RqListSpec:
    capacity = 1 << max(1, (nr - 1).bit_length())
    header = layout.add(f"{name}.header", RQ_LIST_HEADER)
    data = layout.add(f"{name}.data", "<u4", capacity)
    return RqListSpec(name, capacity, header, data)


class RqList:
    """A FIFO of request ids in the arena, every access under its lock (of lock class
    ``lock_class``: ctx->lock, hctx->lock or q->requeue_lock)."""

    def __init__(self, arena: Arena, spec: RqListSpec, lock_class: int = LockClass.CTX_LOCK):
        self.a = arena.atomic
        self.spec = spec
        o = spec.header.offsets()
        self._lock = o.lock
        self._cls = int(lock_class)
        #: the monotonic head and tail words: equal when the list is empty
        self.head_off, self.tail_off = o.head, o.tail
        self._mask = spec.capacity - 1
        self._ids = arena.buf[spec.data.offset : spec.data.offset + spec.data.nbytes].cast("I")

    @staticmethod
    def init(arena: Arena, spec: RqListSpec) -> None:
        o = spec.header.offsets()
        arena.atomic.set(o.lock, 0)
        arena.atomic.set(o.head, RQ_LIST_ORIGIN)
        arena.atomic.set(o.tail, RQ_LIST_ORIGIN)

    def close(self) -> None:
        self._ids.release()

    def empty(self) -> bool:
        """list_empty_careful(): lockless, a hint (relaxed loads)."""
        return self.a.read(self.head_off) == self.a.read(self.tail_off)

    def __len__(self) -> int:
        return self.a.read(self.tail_off) - self.a.read(self.head_off)

    def add(
        self, ids: list[int], at_head: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        """Append ``ids`` (or put them at the head, in order); ``then`` runs before the
        lock is dropped (blk_mq_hctx_mark_pending() under ctx->lock)."""
        a, ids_mv, mask = self.a, self._ids, self._mask
        spin_lock(a, self._lock, self._cls)
        try:
            head, tail = a.read(self.head_off), a.read(self.tail_off)
            if tail - head + len(ids) > self.spec.capacity:
                raise OverflowError(f"{self.spec.name}: more requests than its capacity")
            if at_head:
                for rq_id in reversed(ids):
                    head -= 1
                    ids_mv[head & mask] = rq_id
                a.set(self.head_off, head)
            else:
                for rq_id in ids:
                    ids_mv[tail & mask] = rq_id
                    tail += 1
                a.set(self.tail_off, tail)
            if then is not None:
                then()
        finally:
            spin_unlock(a, self._lock)

    def take(self, max_nr: int = -1, if_emptied: Callable[[], None] | None = None) -> list[int]:
        """Remove and return up to ``max_nr`` ids from the head (all with -1);
        ``if_emptied`` runs under the lock when that leaves the list empty."""
        a, ids_mv, mask = self.a, self._ids, self._mask
        spin_lock(a, self._lock, self._cls)
        try:
            head, tail = a.read(self.head_off), a.read(self.tail_off)
            n = tail - head if max_nr < 0 else min(max_nr, tail - head)
            out = [ids_mv[(head + i) & mask] for i in range(n)]
            a.set(self.head_off, head + n)
            if if_emptied is not None and head + n == tail:
                if_emptied()
            return out
        finally:
            spin_unlock(a, self._lock)

    def scan_newest(self, max_nr: int, fn: Callable[[int], bool | None]) -> bool:
        """Under the lock, offer the newest ``max_nr`` ids, newest first, to ``fn``
        until it returns True or False (None: next); what it returned, or False.
        ``fn`` runs with the lock held: an id it is given stays on the list until
        the lock is dropped (blk_bio_list_merge() under ctx->lock)."""
        a, ids_mv, mask = self.a, self._ids, self._mask
        spin_lock(a, self._lock, self._cls)
        try:
            head, tail = a.read(self.head_off), a.read(self.tail_off)
            for pos in range(tail - 1, max(head, tail - max_nr) - 1, -1):
                verdict = fn(ids_mv[pos & mask])
                if verdict is not None:
                    return verdict
            return False
        finally:
            spin_unlock(a, self._lock)

    def snapshot(self) -> list[int]:
        """The ids on the list (under the lock; debugfs)."""
        spin_lock(self.a, self._lock, self._cls)
        try:
            head, tail = self.a.read(self.head_off), self.a.read(self.tail_off)
            return [self._ids[i & self._mask] for i in range(head, tail)]
        finally:
            spin_unlock(self.a, self._lock)


class PoolMemory(Protocol):
    """Memory a request pool lives in: the arena, or the owner's :class:`RqPool`
    before the arena exists."""

    @property
    def atomic(self) -> AtomicView: ...

    @property
    def buf(self) -> memoryview: ...


class RqPool:
    """The memory of a tag set's requests (the pages of every ``tags->static_rqs``).

    blk_mq_alloc_rqs() allocates it before the arena exists, so the owner holds it in
    an anonymous mapping of its own (:attr:`region` at offset 0), where
    ``->init_request`` fills each request's PDU; :func:`~mqrt.block.blk_mq_setup.init_shared`
    then copies it into the tag set's region of the arena (:meth:`move_to`), and from
    then on :attr:`atomic`, :attr:`buf` and :attr:`region` address the arena.
    Creating one raises ``MemoryError`` or ``OSError(ENOMEM)`` when the memory is
    not there.
    """

    def __init__(self, name: str, dtype: np.dtype, count: int):
        self.region = Region(name, 0, dtype, count)
        self._map: mmap.mmap | None = mmap.mmap(-1, self.region.nbytes)  # zero-filled
        self.buf: memoryview = memoryview(self._map)
        self.atomic: AtomicView = AtomicView(self.buf)
        self.in_arena = False

    def request(self, rq_id: int, tag: int) -> Request:
        """An accessor for request ``rq_id`` (tag ``tag`` of its tags), for the
        owner's ->init_request and ->exit_request calls."""
        return Request.at(self, self.region, rq_id, tag)

    def move_to(self, arena: Arena, region: Region) -> None:
        """Copy the requests into ``region`` of ``arena`` and address them there."""
        if self.in_arena:
            return
        arena.buf[region.offset : region.offset + region.nbytes] = self.buf[: region.nbytes]
        self.release()
        self.region, self.buf, self.atomic = region, arena.buf, arena.atomic
        self.in_arena = True

    def release(self) -> None:
        """Unmap the owner's copy (an accessor a driver kept keeps it mapped until it
        is collected)."""
        if self._map is None:
            return
        self.atomic.release()
        self.buf.release()
        with contextlib.suppress(BufferError):
            self._map.close()
        self._map = None


#: TagSet.shared_tag_model: Linux 5.10's BLK_MQ_F_TAG_HCTX_SHARED (per-hctx tags and
#: request pools on the set's shared sbitmaps, blk_mq_init_shared_sbitmap()).
SHARED_TAG_MODEL_5_10 = "5.10"
#: TagSet.shared_tag_model: Linux 6.x's (5.16+) BLK_MQ_F_TAG_HCTX_SHARED (one
#: ``set->shared_tags`` and one request pool for every hctx).
SHARED_TAG_MODEL_6X = "6.x"
SHARED_TAG_MODELS = (SHARED_TAG_MODEL_5_10, SHARED_TAG_MODEL_6X)


@dataclass
class TagSet:
    """struct blk_mq_tag_set: what a driver fills in before
    :func:`~mqrt.block.blk_mq_setup.alloc_tag_set`."""

    ops: BlkMqOps
    nr_hw_queues: int  #: hardware queues over all maps
    queue_depth: int  #: tags per hardware queue, reserved ones included
    reserved_tags: int = 0
    nr_maps: int = 1  #: 1..3: DEFAULT, READ, POLL
    cmd_size: int = 0  #: bytes of driver data per request (the PDU)
    timeout_ms: int = 0  #: request timeout; 0 means 30 s
    flags: BlkMqFlag = BlkMqFlag(0)  # noqa: RUF009 (an immutable enum value)
    #: passed to ->init_hctx (the kernel's ``set->driver_data``)
    driver_data: Any = None
    numa_node: int = NUMA_NO_NODE
    name: str = "set0"
    #: The emulated memory limit for the request pool (bytes): a pool that would not
    #: fit halves the depth, as blk_mq_alloc_map_and_rqs() does on -ENOMEM.
    pool_limit_bytes: int | None = None
    generation: SbqGeneration = SbqGeneration.CURRENT
    #: How ``BLK_MQ_F_TAG_HCTX_SHARED`` shares the tags (see :data:`SHARED_TAG_MODELS`):
    #: "6.x" one blk_mq_tags and one request pool of queue_depth for the whole set;
    #: "5.10" a blk_mq_tags and a pool of queue_depth per hctx whose bitmaps are the
    #: set's shared sbitmaps.
    shared_tag_model: str = "6.x"
    #: The most hardware queues the set may have during a run (0: the count cannot
    #: change).  The arena cannot grow, so every hctx up to it (and each one's tags
    #: and requests, without shared tags) is declared at set-up, idle until
    #: blk_mq_update_nr_hw_queues() maps CPUs to it (the kernel's bound is nr_cpu_ids).
    max_hw_queues: int = 0

    # Filled in by alloc_tag_set():
    nr_cpus: int = 0
    topology: Topology = field(init=False, repr=False)
    map: list[QueueMap] = field(default_factory=list)
    #: set->tags[]: one per hctx (one for all with 6.x shared tags); None where
    #: blk_mq_map_swqueue() freed an hctx no CPU maps
    tags: list[TagsSpec | None] = field(default_factory=list)
    #: 5.10 shared tags: the set's own tags (``set->__bitmap_tags``,
    #: ``set->__breserved_tags``, ``set->active_queues_shared_sbitmap``), whose bitmaps
    #: and header every hctx's tags point at; None otherwise
    shared_sbitmap_tags: TagsSpec | None = None
    rq_region: Region | None = None  #: the request pool's region of the arena
    rq_pool: RqPool | None = field(default=None, repr=False)  #: where the requests are now
    #: request ids handed to the queues' scheduler pools, numbered after the driver pool
    sched_rqs: int = 0
    tag_list: list[RequestQueue] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  #: what the kernel would pr_info
    #: The DEFAULT map and nr_hw_queues in the arena (:data:`MQ_MAP`), with a
    #: generation every CPU compares with its own when it enters a queue of the set.
    map_region: Region | None = field(default=None, repr=False)
    #: mq_map[cpu] of the DEFAULT map in the arena (int32 per CPU)
    map_cpus: Region | None = field(default=None, repr=False)

    @property
    def shared_tags(self) -> bool:
        """blk_mq_is_shared_tags() (5.10: blk_mq_is_sbitmap_shared()): one tag space
        for every hctx, in either :attr:`shared_tag_model`."""
        return bool(self.flags & BlkMqFlag.TAG_HCTX_SHARED)

    @property
    def single_tags(self) -> bool:
        """Linux 6.x shared tags: one ``struct blk_mq_tags`` (``set->shared_tags``)
        and one request pool of queue_depth serve every hctx."""
        return self.shared_tags and self.shared_tag_model == SHARED_TAG_MODEL_6X

    @property
    def shared_sbitmap(self) -> bool:
        """Linux 5.10 shared sbitmap: each hctx has its own ``struct blk_mq_tags`` and
        request pool of queue_depth; their bitmaps are the set's."""
        return self.shared_tags and self.shared_tag_model == SHARED_TAG_MODEL_5_10

    @property
    def timeout_ns(self) -> int:
        return (self.timeout_ms or BLK_DEFAULT_TIMEOUT_MS) * 1_000_000

    def tags_for(self, hctx_idx: int) -> TagsSpec | None:
        return self.tags[0] if self.single_tags else self.tags[hctx_idx]

    @property
    def resizable(self) -> bool:
        """The set's hctx count may change during the run
        (blk_mq_update_nr_hw_queues()): a maximum was declared."""
        return self.max_hw_queues > 0

    @property
    def nr_declared_hctxs(self) -> int:
        """Hardware queues declared in the arena: the maximum, or nr_hw_queues."""
        return max(self.max_hw_queues, self.nr_hw_queues)


@dataclass(eq=False)
class HwCtxSpec:
    """struct blk_mq_hw_ctx as the owner sets it up (blk_mq_alloc_hctx(),
    blk_mq_init_hctx(), blk_mq_map_swqueue()): what ->init_hctx and ->exit_hctx get.
    Each CPU's :class:`HwCtx` is made from it and carries its ``driver_data``."""

    index: int  #: hctx->queue_num
    queue: RequestQueue = field(repr=False)
    type: HctxType
    cpumask: list[int]  #: the CPUs whose ctx maps here
    numa_node: int = NUMA_NO_NODE
    flags: BlkMqFlag = BlkMqFlag(0)  # noqa: RUF009 (an immutable enum value)
    #: hctx->tags: the set's tags for this hctx; None once blk_mq_map_swqueue() found
    #: no CPU mapping it
    tags: TagsSpec | None = None
    #: hctx->driver_data: the driver's (->init_hctx sets it)
    driver_data: Any = None
    #: hctx->ctx_map: which ctxs (by index_hw) have requests pending
    ctx_map: SbitmapSpec | None = field(default=None, repr=False)

    @property
    def nr_ctx(self) -> int:
        return len(self.cpumask)


@dataclass(eq=False)
class RequestQueue:
    """struct request_queue with its hctxs and ctxs, as declared for a run."""

    tag_set: TagSet
    #: q->id, from the queue ida of the layout the queue is declared on: unique among
    #: its queues, dense from 0; the ``q`` field of requests and the queue's position
    #: in a run's list
    index: int
    name: str
    queuedata: Any = None
    rq_affinity: int = 1  #: 0: complete where the irq lands, 1: same LLC, 2: same CPU
    #: sysfs nomerges: 0 every merge, 1 only the one-hit merge (the newest request of
    #: the plug, of the ctx list), 2 none
    nomerges: int = 0
    #: writes allocate tags below this shallow depth (an I/O scheduler's limit_depth,
    #: mq-deadline's async_depth); 0: no limit
    async_depth: int = 0
    #: q->limits: blk_set_default_limits() until the driver sets its own
    #: (:mod:`mqrt.block.blk_settings`)
    limits: QueueLimits = field(default_factory=QueueLimits)
    #: the elevator elevator_init_mq() chose: "none" or "mq-deadline"
    elevator: str = "none"
    #: mq-deadline's data and its requests' lines, declared up front for a queue that
    #: may have an elevator (the arena cannot grow); None for a NO_SCHED set's queue
    dd: DeadlineSpec | None = field(default=None, repr=False)
    #: hctx->sched_tags, by hctx (declared with ``dd``): each of ``nr_sched_rqs``
    #: tags, naming the requests of ``sched_region`` from ``sched_rq_first`` on
    sched_tags: list[TagsSpec] = field(default_factory=list, repr=False)
    nr_sched_rqs: int = 0
    sched_rq_first: int = 0  #: request id (in the tag set's id space) of the first
    sched_region: Region | None = field(default=None, repr=False)
    sched_pool: RqPool | None = field(default=None, repr=False)

    # Built by init_queue():
    nr_hw_queues: int = 0
    hctxs: list[HwCtxSpec] = field(default_factory=list)  #: q->queue_hw_ctx
    hctx_type: list[HctxType] = field(default_factory=list)
    hctx_cpus: list[list[int]] = field(default_factory=list)  #: hctx->cpumask
    ctx_hctx: list[list[int]] = field(default_factory=list)  #: [cpu][type] -> hctx
    hctx_ctxs: list[list[int]] = field(default_factory=list)  #: hctx -> cpus by index_hw
    dispatch: list[RqListSpec] = field(default_factory=list)
    ctx_lists: list[list[RqListSpec | None]] = field(default_factory=list)  #: [cpu][type]
    dying: bool = False  #: blk_cleanup_queue() ran (QUEUE_FLAG_DYING)
    # The queue's shared structures, declared by init_queue() (absent before it).
    header: Region = field(init=False, repr=False)
    hctx_region: Region = field(init=False, repr=False)
    requeue_list: RqListSpec = field(init=False, repr=False)
    #: q->q_usage_counter: a reference per request (and per bio until it has one)
    q_usage: PercpuRefSpec = field(init=False, repr=False)
    #: the id space ``index`` came from (cleanup_queue gives it back)
    ida: Ida = field(init=False, repr=False)

    @property
    def shared(self) -> bool:
        """BLK_MQ_F_TAG_QUEUE_SHARED: another queue uses this tag set."""
        return bool(self.tag_set.flags & BlkMqFlag.TAG_QUEUE_SHARED)

    def mapped(self, hctx_idx: int) -> bool:
        """blk_mq_hw_queue_mapped(): some CPU maps to this hctx."""
        return bool(self.hctx_cpus[hctx_idx])


# -- one CPU's view: handles ---------------------------------------------------------------


class CpuSys(Protocol):
    """What the block layer needs from the CPU it runs on (a worker process)."""

    cpu: int

    def raise_softirq(self, fn: Callable[[int, int], None], rq_id: int, gen: int) -> None:
        """Run ``fn(rq_id, gen)`` on this CPU soon (BLOCK_SOFTIRQ)."""

    def add_timer(self, expires_ns: int, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on this CPU at ``expires_ns`` (an hrtimer)."""

    def ipi_complete(self, cpu: int, q: int, rq_id: int, gen: int) -> None:
        """Complete request ``rq_id`` of queue ``q`` on ``cpu`` (the IPI)."""

    def kblockd_run(self, cpu: int, q: int, hctx: int, delay_ns: int) -> None:
        """Run hctx on ``cpu`` after ``delay_ns`` (mod_delayed_work semantics)."""

    def kick_requeue(self, q: int) -> None:
        """Schedule q's requeue work."""

    def bio_done(self, cpu: int, q: int, info: tuple) -> None:
        """Hand a finished request's bios back to the job that submitted them."""

    def schedule(self) -> None:
        """Sleep until this CPU's waiter is woken, taking interrupts meanwhile."""

    def idle_wait(self) -> None:
        """Wait until something happens on this CPU (an interrupt, an IPI), serving it."""


class Request:
    """A process's accessor for one request of a pool (a static_rqs entry).

    One object per request per process, made once: the hot path never allocates.
    Fields are read from and written to the shared pool.  ``pdu`` is the driver's
    ``cmd_size`` bytes (blk_mq_rq_to_pdu()), None without a PDU.
    """

    __slots__ = ("_a", "_buf", "base", "id", "pdu", "tag", "tags", "timeout_ns")
    #: ``rq->internal_tag``: none for a request of the driver pool (its tag is its
    #: identity); a :class:`SchedRequest`'s sched tag
    internal_tag = -1

    def __init__(
        self,
        arena: PoolMemory,
        region: Region,
        rq_id: int,
        tags: Tags | None,
        tag: int,
        timeout_ns: int,
    ):
        self._bind(arena, region, rq_id)
        self.tag = tag
        self.tags = tags
        self.timeout_ns = timeout_ns  #: the tag set's (q->rq_timeout)

    @classmethod
    def at(cls, mem: PoolMemory, region: Region, rq_id: int, tag: int) -> Request:
        """An accessor with no tags handle (``tags`` unset, no timeout): what the
        owner's ->init_request and ->exit_request get, and what a CPU keeps at the
        ids of requests blk_mq_map_swqueue() freed (never allocated, always IDLE)."""
        rq = cls.__new__(cls)
        rq._bind(mem, region, rq_id)
        rq.tag = tag
        rq.timeout_ns = 0
        return rq

    def _bind(self, mem: PoolMemory, region: Region, rq_id: int) -> None:
        self._a = mem.atomic
        self._buf = mem.buf
        self.id = rq_id
        self.base = region.addr(rq_id)
        if "pdu" in (region.dtype.names or ()):
            off = self.base + field_offset(region.dtype, "pdu")
            self.pdu: memoryview | None = mem.buf[off : off + region.dtype["pdu"].itemsize]
        else:
            self.pdu = None

    def setup(self) -> tuple:
        """(start_time_ns, sector, nr_sectors, nr_bios, nr_phys_segments, cpu, hctx, q, op,
        rq_flags, status)."""
        return RQ_SETUP.unpack_from(self._buf, self.base + RQ_OFF_SETUP)

    @property
    def state_word(self) -> int:
        return self._a.load_acquire(self.base)

    @property
    def state(self) -> RqState:
        return RqState(self._a.load_acquire(self.base) & RQ_STATE_MASK)

    @property
    def gen(self) -> int:
        return self._a.read(self.base) >> RQ_GEN_SHIFT

    @property
    def status(self) -> int:
        return self._a.read32(self.base + RQ_OFF_STATUS)

    @status.setter
    def status(self, value: int) -> None:
        self._a.set32(self.base + RQ_OFF_STATUS, int(value))

    @property
    def op(self) -> ReqOp:
        return ReqOp(self._buf[self.base + RQ_OFF_OP])

    @property
    def cpu(self) -> int:
        return self.setup()[5]

    @property
    def q(self) -> int:
        return self.setup()[7]

    @property
    def nr_bytes(self) -> int:
        return self.setup()[2] << SECTOR_SHIFT

    @property
    def rq_flags(self) -> Rqf:
        return Rqf(self._a.read32(self.base + RQ_OFF_FLAGS))

    @property
    def deadline_ns(self) -> int:
        return self._a.read(self.base + RQ_OFF_DEADLINE)

    def show(self) -> str:
        """debugfs one-liner for hctxN/busy and hctxN/dispatch."""
        st = self.setup()
        return (
            f"{self.id:#x} {{.op={ReqOp(st[8]).name}, .rq_flags={rqf_names(st[9])}, "
            f".state={self.state.name.lower()}, .tag={self.tag}, "
            f".internal_tag={self.internal_tag}}}"
        )


def rqf_names(flags: int) -> str:
    """blk_flags_show() of rq_flags: the set flags' names, '|' between them (a bit
    mqrt does not name: its number)."""
    out = []
    for bit in range(flags.bit_length()):
        if flags >> bit & 1:
            name = Rqf(1 << bit).name if (1 << bit) in Rqf._value2member_map_ else None
            out.append(name or str(bit))
    return "|".join(out)


class SchedRequest(Request):
    """An accessor for a request of a queue's scheduler pool (``sched_tags->static_rqs``):
    ``id`` numbers it after the tag set's driver pool, ``internal_tag`` is its sched
    tag, and ``tag`` its driver tag as the request says now (-1 while it holds none:
    it takes one at dispatch)."""

    __slots__ = ("_tag_off", "internal_tag")

    def __init__(
        self,
        mem: PoolMemory,
        region: Region,
        index: int,
        rq_id: int,
        tags: Tags | None,
        internal_tag: int,
        timeout_ns: int,
    ):
        self._bind(mem, region, index)
        self.id = rq_id
        self.tags = tags
        self.timeout_ns = timeout_ns
        self.internal_tag = internal_tag  # this slot shadows the class's -1
        self._tag_off = self.base + RQ_OFF_TAG

    @property
    def tag(self) -> int:  # type: ignore[override]
        return self._a.read32(self._tag_off)


class HwCtx:
    """A CPU's handle on one ``struct blk_mq_hw_ctx`` (made from the owner's
    :class:`HwCtxSpec`).  ``tags`` is None for an hctx no CPU maps (no request is
    ever allocated on it); ``driver_data`` is what ->init_hctx left in the spec."""

    def __init__(self, arena: Arena, q: RequestQueue, queue: Queue, index: int, tags: Tags | None):
        spec = q.hctxs[index]
        self.q = q
        self.queue = queue
        self.index = index
        self.tags = tags
        #: hctx->sched_tags (set by :class:`Queue` for a queue that may have an elevator)
        self.sched_tags: Tags | None = None
        #: request id of tag 0 of its tags (0 without tags)
        self.rq_base = tags.rq_base if tags is not None else 0
        self.driver_data = spec.driver_data
        self.a = arena.atomic
        o = q.hctx_region.offsets(index)
        self.state_off = o.state
        self.dispatch_busy_off = o.dispatch_busy
        ctx_map = spec.ctx_map
        assert ctx_map is not None, "init_queue declares every hctx's ctx_map"
        self._ctx_map = ctx_map
        self.dispatch = RqList(arena, q.dispatch[index], LockClass.HCTX_LOCK)
        self.map_ctxs()
        # Fair share: per hctx, or per queue with shared tags (QUEUE_FLAG_HCTX_ACTIVE).
        self.active_bit: int  #: QUEUE_FLAG_HCTX_ACTIVE or BLK_MQ_S_TAG_ACTIVE
        if q.tag_set.shared_tags:
            qo = q.header.offsets()
            self.active_off, self.active_bit = qo.queue_flags, QueueFlag.HCTX_ACTIVE
            self.nr_active_off = qo.nr_active_requests_shared_tags
            self.max_active_off = qo.max_active
        else:
            self.active_off, self.active_bit = o.state, HctxState.TAG_ACTIVE
            self.nr_active_off = o.nr_active
            self.max_active_off = o.max_active
        self.wait_index_off = o.wait_index
        self.dispatch_from = 0  #: index_hw of the ctx to dispatch from next (per CPU)
        self.run_sync: Callable[[], None] = lambda: None  #: set by BlkMq: run it here
        self.next_cpu_idx = 0
        self.next_cpu_batch = BLK_MQ_CPU_WORK_BATCH
        #: requests this CPU allocated on the hctx
        self.nr_alloc = 0
        # This CPU's counters for the hctx (debugfs-like, reported at the end).
        self.stats = {
            "run": 0, "dispatched": 0, "queued": 0, "busy": 0, "restart": 0, "no_driver_tag": 0
        }  # fmt: skip
        #: hctx->dispatched[]: dispatches by requests queued (0, 1, 2-3, 4-7, ..., 32+)
        self.dispatched_order = [0] * 7

    def map_ctxs(self) -> None:
        """Take the hctx's ctxs from ``q`` (blk_mq_map_swqueue()'s result in this
        process): its type, cpumask, ctx lists by index_hw and the ctx_map words
        they use."""
        q, index = self.q, self.index
        self.type = q.hctx_type[index]
        self.cpumask = q.hctx_cpus[index]
        self._cpuset = frozenset(self.cpumask)
        ctx_rqlist = self.queue.ctx_rqlist
        self.ctx_lists = [ctx_rqlist(cpu, self.type) for cpu in q.hctx_ctxs[index]]
        #: the ctx_map's words in use, 8 ctxs (index_hw >> CTX_MAP_SHIFT) each
        nr_words = max(1, -(-len(self.ctx_lists) >> CTX_MAP_SHIFT))
        self._ctx_words = [self._ctx_map.words.addr(w, "word") for w in range(nr_words)]
        self.dispatch_from = 0
        self.next_cpu_idx = 0

    def may_queue(self) -> bool:
        tags = self.tags
        assert tags is not None  # only asked of an hctx a CPU maps
        return tags.may_queue(self.active_off, self.active_bit, self.nr_active_off)

    @property
    def nr_active(self) -> int:
        return self.a.read32(self.nr_active_off)

    @property
    def dispatch_busy(self) -> int:
        return self.a.read32(self.dispatch_busy_off)

    def test_state(self, bit: HctxState) -> bool:
        return self.a.test_bit(self.state_off, bit)

    def stopped(self) -> bool:
        return self.a.test_bit(self.state_off, HctxState.STOPPED)

    def pending_bit(self, index_hw: int) -> tuple[int, int]:
        """The word and bit of ``ctx_map`` for the ctx ``index_hw``: set while its list
        holds requests (set and cleared under the list's lock)."""
        return self._ctx_words[index_hw >> CTX_MAP_SHIFT], index_hw & _CTX_MAP_BIT_MASK

    def mark_pending(self, index_hw: int) -> None:
        """blk_mq_hctx_mark_pending() (under the ctx list lock): sbitmap_set_bit()
        unless sbitmap_test_bit() finds it set."""
        off = self._ctx_words[index_hw >> CTX_MAP_SHIFT]
        bit = index_hw & _CTX_MAP_BIT_MASK
        if not self.a.test_bit(off, bit):
            self.a.set_bit(off, bit)

    def has_pending(self) -> bool:
        """blk_mq_hctx_has_pending(): dispatch list or any ctx marked
        (sbitmap_any_bit_set())."""
        if not self.dispatch.empty():
            return True
        read = self.a.read
        if any(read(off) for off in self._ctx_words):
            return True
        queue = self.queue  # blk_mq_sched_has_work()
        return queue.dd is not None and bool(queue.elevator()) and queue.dd.has_work()

    def busy_ctxs(self) -> list[int]:
        """index_hw of every ctx marked pending (sbitmap_for_each_set())."""
        out = []
        read = self.a.read
        for w, off in enumerate(self._ctx_words):
            word = read(off)
            while word:
                low = word & -word
                out.append((w << CTX_MAP_SHIFT) + low.bit_length() - 1)
                word ^= low
        return out

    def clear_pending(self, index_hw: int) -> None:
        """blk_mq_hctx_clear_pending(): sbitmap_clear_bit()."""
        self.a.clear_bit(self._ctx_words[index_hw >> CTX_MAP_SHIFT], index_hw & _CTX_MAP_BIT_MASK)

    def update_dispatch_busy(self, busy: bool) -> None:
        """blk_mq_update_dispatch_busy(): the EWMA of busy dispatches."""
        ewma = self.a.read32(self.dispatch_busy_off)
        if not ewma and not busy:
            return
        ewma *= BLK_MQ_DISPATCH_BUSY_EWMA_WEIGHT - 1
        if busy:
            ewma += 1 << BLK_MQ_DISPATCH_BUSY_EWMA_FACTOR
        self.a.set32(self.dispatch_busy_off, ewma // BLK_MQ_DISPATCH_BUSY_EWMA_WEIGHT)

    def in_cpumask(self, cpu: int) -> bool:
        return cpu in self._cpuset


class Queue:
    """A CPU's handle on a request queue: its hctxs and this CPU's ctx."""

    def __init__(
        self,
        arena: Arena,
        q: RequestQueue,
        tags: list[Tags | None],
        cpu: int,
        waiters: Waiters | None = None,
    ):
        """``tags``: this CPU's handles on the set's tags, parallel to ``set.tags``;
        ``waiters``: the task's waiter slot (it sleeps on ``mq_freeze_wq`` while the
        queue is frozen; without one it only wakes)."""
        self.q = q
        self.index = q.index
        self.tset = q.tag_set
        self.ops = q.tag_set.ops
        self.shared = q.shared
        self.timeout_ns = q.tag_set.timeout_ns
        self.a = arena.atomic
        self.cpu = cpu
        self._arena = arena
        #: every CPU's ctx rq_list handle this CPU has made, by (cpu, type)
        self._rqlists: dict[tuple[int, int], RqList] = {}
        single_tags = self.tset.single_tags
        self.hctxs = [
            HwCtx(
                arena,
                q,
                self,
                h,
                None if spec.tags is None else tags[0] if single_tags else tags[h],
            )
            for h, spec in enumerate(q.hctxs)
        ]
        if waiters is not None:
            for hctx, spec in zip(self.hctxs, q.sched_tags, strict=False):
                hctx.sched_tags = Tags(arena, spec, waiters, cpu, sched=True)
        o = q.header.offsets()
        self.flags_off = o.queue_flags
        self.lock_off = o.queue_lock
        self.freeze_depth_off = o.mq_freeze_depth
        self.quiesce_depth_off = o.quiesce_depth
        #: q->q_usage_counter, counted on this CPU's line
        self.q_usage = PercpuRef(arena, q.q_usage, cpu)
        #: q->mq_freeze_wq
        self.freeze_wq_head = q.header.addr(0) + QUEUE_OFF_FREEZE_WQ
        if waiters is not None:
            self.freeze_wq = WaitQueue(waiters, self.freeze_wq_head)
        self.requeue_list = RqList(arena, q.requeue_list, LockClass.REQUEUE_LOCK)
        self.set_limits(q.limits)
        #: blk_queue_nomerges() is false: bios may merge (plug, ctx list)
        self.merge = q.nomerges != 2
        #: nomerges=1: only the newest request of the plug or ctx list is tried
        self.one_hit = q.nomerges == 1
        #: BLK_MQ_F_SHOULD_MERGE and merges allowed: bios try the ctx's lists
        self.should_merge = bool(q.tag_set.flags & BlkMqFlag.SHOULD_MERGE) and self.merge
        #: With should_merge: this CPU put requests on its ctx lists of this queue
        #: and has not found them all empty since (the hint that spares a bio the
        #: look at the list when nothing of this CPU's can be waiting there).
        self.ctx_queued = False
        self.async_depth = q.async_depth
        #: q->elevator's word, and this CPU's handle on the mq-deadline data
        self.elevator_off = o.elevator
        self.dd = DeadlineData(arena, q.dd) if q.dd is not None else None
        self.same_comp = q.rq_affinity >= 1
        self.same_force = q.rq_affinity == 2
        tset = self.tset
        #: the tag set's map generation in the arena, and the one this CPU's handles
        #: follow (:meth:`mqrt.block.blk_mq.BlkMq.sync_map`)
        self.map_gen_off = tset.map_region.addr(0, "map_gen") if tset.map_region else -1
        self.map_gen = 0
        #: the CPU whose ctx this CPU's task submits on: its own, or where CPU hotplug
        #: moved it (:meth:`set_ctx`)
        self.task_cpu = cpu
        #: should_merge as the queue has it (a task away from its CPU does without)
        self._should_merge = self.should_merge
        self.map_ctxs()

    def map_ctxs(self) -> None:
        """Take the CPU -> hctx map from ``q`` (this process's copy): each ctx's
        hctxs, the hctx a bio of each op goes to (from the task's ctx), the ctx lists
        by hctx."""
        q, cpu = self.q, self.task_cpu
        self.nr_hw_queues = q.nr_hw_queues
        #: QUEUE_FLAG_POLL: the set has poll queues, so polled bios use the POLL map
        #: (without them a polled bio is an ordinary one, as blk_queue_poll says).
        tset = q.tag_set
        self.poll_capable = tset.nr_maps > HctxType.POLL and tset.map[HctxType.POLL].nr_queues > 0
        self._map_ctx(cpu)
        #: ctx rq_lists by (submitting cpu, type) for inserts (any CPU may insert).
        self.ctx_lists: dict[tuple[int, int], tuple[RqList, int]] = {}
        for h, hctx in enumerate(self.hctxs):
            for index_hw, ctx_cpu in enumerate(q.hctx_ctxs[h]):
                self.ctx_lists[(ctx_cpu, hctx.type)] = (hctx.ctx_lists[index_hw], index_hw)
        self._merge_lists(cpu)

    def _map_ctx(self, cpu: int) -> None:
        """The hctxs of ``cpu``'s ctx, as this CPU's task submits to them."""
        q = self.q
        self.ctx_hctx = [self.hctxs[h] for h in q.ctx_hctx[cpu]]  #: ctx->hctxs[type]
        #: blk_mq_map_queue() by op: reads use the READ map (aliasing DEFAULT).
        self.hctx_by_op = [
            self.ctx_hctx[HctxType.READ if op == ReqOp.READ else HctxType.DEFAULT] for op in ReqOp
        ]
        #: The POLL hctx; without poll queues, the DEFAULT one (never used for polling).
        self.hctx_poll = self.ctx_hctx[HctxType.POLL if self.poll_capable else HctxType.DEFAULT]

    def _merge_lists(self, cpu: int) -> None:
        #: This CPU's ctx rq_list a bio of each op (and a polled bio) would merge into
        #: (ctx->rq_lists[hctx->type] of the hctx blk_mq_map_queue() picks), with the
        #: word and bit of that hctx's ctx_map that say it is not empty.
        self.rq_merge_by_op = [self._merge_list(cpu, h) for h in self.hctx_by_op]
        self.rq_merge_poll = self._merge_list(cpu, self.hctx_poll)
        self.rq_merge_lists = list(dict.fromkeys([*self.rq_merge_by_op, self.rq_merge_poll]))

    def set_ctx(self, cpu: int, home: bool) -> None:
        """CPU hotplug moved this CPU's task to ``cpu`` (or back home): new requests
        take that CPU's ctx and hctxs.  Away from home the task tries no ctx-list
        merge (the lists it would look at are another process's), so ``ctx_queued``
        is dropped."""
        self.task_cpu = cpu
        self._map_ctx(cpu)
        self._merge_lists(cpu)
        self.should_merge = self._should_merge and home
        self.ctx_queued = False

    def ctx_rqlist(self, cpu: int, hctx_type: int) -> RqList:
        """CPU ``cpu``'s ctx rq_list of ``hctx_type`` (ctx->rq_lists[type]), one
        handle each, made when first needed."""
        lst = self._rqlists.get((cpu, hctx_type))
        if lst is None:
            spec = self.q.ctx_lists[cpu][hctx_type]
            assert spec is not None  # a type with queues has its lists
            lst = self._rqlists[(cpu, hctx_type)] = RqList(self._arena, spec)
        return lst

    def set_limits(self, lim: QueueLimits) -> None:
        """Take the queue's limits (at creation, and when the driver sets new ones)."""
        self.max_sectors = lim.max_sectors
        self.max_segments = lim.max_segments

    def _merge_list(self, cpu: int, hctx: HwCtx) -> tuple[RqList, int, int]:
        lst, index_hw = self.ctx_lists[(cpu, hctx.type)]
        return lst, *hctx.pending_bit(index_hw)

    def quiesced(self) -> bool:
        return self.a.test_bit(self.flags_off, QueueFlag.QUIESCED)

    def elevator(self) -> int:
        """q->elevator: the id of the queue's elevator (0: none).  Stable for whoever
        holds a reference on q_usage_counter or an RCU read-side section: it changes
        only with the queue frozen and quiesced."""
        return self.a.read32(self.elevator_off)

    def close(self) -> None:
        if self.dd is not None:
            self.dd.close()
        self.requeue_list.close()
        for h in self.hctxs:
            h.dispatch.close()
        for lst in self._rqlists.values():
            lst.close()


#: A plugged request: (queue, hctx, rq id); merges read and grow it in the pool.
PlugRq = tuple["Queue", HwCtx, int]


class Plug:
    """struct blk_plug: requests collected by one task before a batch issue.

    The plug list (:attr:`rqs`, oldest first) comes with :attr:`bounds`, the sectors
    where its requests start and end (every value each has had since it was
    plugged).  A bio whose start and end are both absent -- every random bio -- is
    adjacent to no plugged request (none ends where it starts, none starts where it
    ends), which two dict lookups tell without a walk of the list; any other bio
    walks it."""

    __slots__ = ("bounds", "cached", "has_elevator", "last_sectors", "nr_ios", "rqs")

    def __init__(self, nr_ios: int = 1) -> None:
        self.rqs: list[PlugRq] = []
        #: I/Os the task said it will submit; > 1 lets the first allocation take a
        #: batch of tags (then 1).
        self.nr_ios = nr_ios
        #: (hctx, request id) taken in a batch and not used yet, next one last.
        self.cached: list[tuple[HwCtx, int]] = []
        #: sectors where plugged requests start or end, or did (a dict used as a set)
        self.bounds: dict[int, None] = {}
        #: the size of the newest plugged request (the flush at BLK_PLUG_FLUSH_SIZE)
        self.last_sectors = 0
        #: plug->has_elevator: a plugged request goes through an elevator
        self.has_elevator = False

    def clear(self) -> list[PlugRq]:
        """Empty the plug list (a flush); its requests, oldest first."""
        rqs, self.rqs = self.rqs, []
        self.bounds.clear()
        self.has_elevator = False
        return rqs


class Stopped(Exception):
    """The run is stopping: a CPU abandons a wait (no tag will come)."""
