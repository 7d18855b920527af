"""The public vocabulary of ``include/linux/blk-mq.h`` and ``include/linux/blk_types.h``:
flags, state bits, statuses, request states, and the driver interface
(:class:`BlkMqOps`: the blk_mq_ops and the driver's life cycle around them).

Kept apart from :mod:`mqrt.block.blk_mq` so drivers (``mqrt.device``) and reports can name
things without importing the data path.  Flags are exposed by *name*: their bit
values changed across kernel versions (the values here are those of current kernels).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import HwCtx, HwCtxSpec, Queue, Request, TagSet
    from mqrt.lib.shm import Arena

#: Largest queue_depth a tag set may ask for (BLK_MQ_MAX_DEPTH).
BLK_MQ_MAX_DEPTH = 10240
#: An elevator's scheduler tags are ``2 * min(queue_depth, BLKDEV_DEFAULT_RQ)``.
BLKDEV_DEFAULT_RQ = 128
#: Requests a plug collects before it flushes (BLK_MAX_REQUEST_COUNT).
BLK_MAX_REQUEST_COUNT = 32
#: A plug also flushes once its last request is this big (BLK_PLUG_FLUSH_SIZE).
BLK_PLUG_FLUSH_SIZE = 128 * 1024
#: Requests at the tail of a ctx's list a bio tries to merge into (the "hand-wavy
#: stop count" of blk_bio_list_merge()).
BLK_MQ_CTX_MERGE_CHECKS = 8
#: Delay before rerunning a queue whose driver said BLK_STS_RESOURCE, ns.
BLK_MQ_RESOURCE_DELAY_NS = 3_000_000
#: Default request timeout when the tag set gives 0 (30 * HZ), ms.
BLK_DEFAULT_TIMEOUT_MS = 30_000
#: hctx runs on one kblockd CPU before moving to the next CPU of its mask.
BLK_MQ_CPU_WORK_BATCH = 8
#: dispatch_busy EWMA: weight and fixed-point factor.
BLK_MQ_DISPATCH_BUSY_EWMA_WEIGHT = 8
BLK_MQ_DISPATCH_BUSY_EWMA_FACTOR = 4
#: The most max_sectors a driver's hardware limit lets a queue have (Linux 5.10's
#: BLK_DEF_MAX_SECTORS), 512-byte sectors.
BLK_DEF_MAX_SECTORS = 2560
SECTOR_SHIFT = 9
#: "Any node" (NUMA_NO_NODE): a tag set's default ``numa_node``.
NUMA_NO_NODE = -1
#: The hctx_idx ->init_request and ->exit_request get for shared tags, which serve
#: every hctx (BLK_MQ_NO_HCTX_IDX, -1U in the kernel).
BLK_MQ_NO_HCTX_IDX = -1


class BlkMqFlag(enum.IntFlag):
    """BLK_MQ_F_*: behaviour flags of a tag set and its hctxs."""

    #: bios may merge into requests waiting on a ctx's list (removed in 6.14, where
    #: nomerges alone decides)
    SHOULD_MERGE = 1 << 0
    TAG_QUEUE_SHARED = 1 << 1  #: several request queues use the tag set
    STACKING = 1 << 2
    TAG_HCTX_SHARED = 1 << 3  #: one tag space for every hctx of the set
    BLOCKING = 1 << 4  #: ->queue_rq may sleep: dispatch always from kblockd
    TAG_RR = 1 << 5  #: round-robin tag allocation (alloc_policy=RR)
    NO_SCHED_BY_DEFAULT = 1 << 6
    #: no I/O scheduler may be set on the set's queues (nvme's admin tag set); removed
    #: from the kernel in 6.14, kept under its name.  mqrt has no elevator: a marker.
    NO_SCHED = 1 << 7


class HctxState(enum.IntEnum):
    """BLK_MQ_S_*: bit numbers in ``hctx->state``."""

    STOPPED = 0
    TAG_ACTIVE = 1
    SCHED_RESTART = 2
    INACTIVE = 3


class QueueFlag(enum.IntEnum):
    """QUEUE_FLAG_*: bit numbers in ``q->queue_flags`` (the ones mqrt uses; the
    numbers are mqrt's own, the kernel's moved between versions)."""

    HCTX_ACTIVE = 0  #: shared-tags user is active (TAG_HCTX_SHARED)
    QUIESCED = 1
    SAME_COMP = 2  #: rq_affinity >= 1
    SAME_FORCE = 3  #: rq_affinity == 2
    IO_STAT = 4  #: do disk/partition I/O accounting
    NOWAIT = 5  #: the queue supports REQ_NOWAIT
    POLL = 6  #: the tag set has poll queues: polled bios go to the POLL map


#: QUEUE_FLAG_MQ_DEFAULT: what blk_mq_init_allocated_queue() sets on every new queue
#: (5.10: I/O accounting, completion on the submitting CPU's cache, nowait).
QUEUE_FLAG_MQ_DEFAULT = (
    (1 << QueueFlag.IO_STAT) | (1 << QueueFlag.SAME_COMP) | (1 << QueueFlag.NOWAIT)
)


class BlkStatus(enum.IntEnum):
    """blk_status_t values."""

    OK = 0
    NOTSUPP = 1
    TIMEOUT = 2
    NOSPC = 3
    TRANSPORT = 4
    TARGET = 5
    RESV_CONFLICT = 6
    MEDIUM = 7
    PROTECTION = 8
    RESOURCE = 9  #: driver short of a resource the core cannot see: rerun later
    IOERR = 10
    DM_REQUEUE = 11
    AGAIN = 12
    DEV_RESOURCE = 13  #: device-wide shortage a completion will clear: no rerun


class RqState(enum.IntEnum):
    """MQ_RQ_*: the request state machine."""

    IDLE = 0
    IN_FLIGHT = 1
    COMPLETE = 2


#: A request's state word (``rq.state``, in shared memory): bits 0-1 MQ_RQ_*, bit 2
#: "allocated" (a tag owns it), bits 8+ its generation (one more each time it is
#: freed).
RQ_STATE_MASK = 0x3
RQ_ALLOCATED = 0x4
RQ_GEN_SHIFT = 8


class Rqf(enum.IntFlag):
    """RQF_*: per-request flags (the ones mqrt uses)."""

    STARTED = 1 << 0
    MQ_INFLIGHT = 1 << 1  #: counted in nr_active (shared tags)
    DONTPREP = 1 << 2
    TIMED_OUT = 1 << 3
    RESV = 1 << 4  #: holds a reserved tag
    IO_STAT = 1 << 5
    #: a polled request (the kernel's REQ_POLLED / REQ_HIPRI in cmd_flags): mapped to
    #: the POLL hctx and completed by whoever reaps it, never by an interrupt or IPI
    POLLED = 1 << 6
    #: no more merges into this request: one failed on a limit (the kernel's
    #: REQ_NOMERGE, a cmd_flags bit, set by req_set_nomerge())
    NOMERGE = 1 << 7
    #: mqrt's, no kernel flag: the request went back to the block layer at least once
    #: (the driver refused it with BLK_STS_*RESOURCE, or requeued it), and its
    #: ``issue_time_ns`` holds when it was first issued (fio's issue time: its slat
    #: ends there, its clat runs from there through every retry)
    REQUEUED = 1 << 8
    #: RQF_ELV: allocated while the queue had an elevator; the elevator sees it
    #: inserted, dispatched and finished
    ELV = 1 << 9
    #: mqrt's, no kernel flag: allocated by a task whose CPU went offline, on the ctx
    #: of the CPU it moved to (rq->mq_ctx); bits RQF_HOME_SHIFT.. of rq_flags name the
    #: task's own CPU, where its bios go back.  No ctx-list merge takes it (its bios
    #: are another process's).
    MIGRATED = 1 << 10


#: rq_flags bits 16-31 of a MIGRATED request: the CPU of the task that submitted it.
RQF_HOME_SHIFT = 16


class ReqOp(enum.IntEnum):
    """REQ_OP_*."""

    READ = 0
    WRITE = 1


class EhRet(enum.IntEnum):
    """enum blk_eh_timer_return."""

    DONE = 0  #: the driver will complete (or completed) the request
    RESET_TIMER = 1  #: give it another timeout


class DeviceProcess(NamedTuple):
    """A device process a driver forked (:meth:`BlkMqOps.start_device`): the process,
    the runtime's end of its control pipe and of its result pipe (messages in
    :mod:`mqrt.lib.wire`)."""

    process: BaseProcess
    ctl: Connection
    res: Connection


#: The optional callables of ``struct blk_mq_ops``, as the block layer calls them
#: (``mq`` is the calling CPU's block layer).  An op a driver leaves ``None`` is
#: absent, as a NULL pointer is in the kernel: the block layer tests for it.
CommitRqsFn = Callable[["BlkMq", "HwCtx"], None]
GetBudgetFn = Callable[["BlkMq", "Queue"], bool]
PutBudgetFn = Callable[["BlkMq", "Queue"], None]
MapQueuesFn = Callable[["TagSet"], None]
PollFn = Callable[["BlkMq", "HwCtx"], int]
#: The set-up and tear-down ops, called in the owner with the kernel's arguments:
#: ->init_hctx(hctx, set->driver_data, hctx_idx) -> 0 or -errno,
#: ->exit_hctx(hctx, hctx_idx), ->init_request(set, rq, hctx_idx, numa_node) -> 0 or
#: -errno, ->exit_request(set, rq, hctx_idx).
InitHctxFn = Callable[["HwCtxSpec", Any, int], int]
ExitHctxFn = Callable[["HwCtxSpec", int], None]
InitRequestFn = Callable[["TagSet", "Request", int, int], int]
ExitRequestFn = Callable[["TagSet", "Request", int], None]
#: An interrupt vector: the read end of its pipe and the handler the CPU runs when
#: it is readable (the handler reads the pipe itself).
IrqHandler = tuple[int, Callable[[], None]]


class BlkMqOps:
    """A block driver: ``struct blk_mq_ops`` plus the life cycle around it.

    A driver subclasses this and overrides what it implements; the runtime
    (:mod:`mqrt.runtime.owner`), the in-process rig (:mod:`mqrt.testing`) and the CPU
    worker (:mod:`mqrt.workers.cpu`) call these methods and nothing else of the driver.

    **blk_mq_ops.**  ``queue_rq`` is required (:func:`~mqrt.block.blk_mq_setup.alloc_tag_set`
    refuses a driver without it).  ``commit_rqs``, ``get_budget``/``put_budget``,
    ``map_queues``, ``poll``, ``init_hctx``/``exit_hctx`` and
    ``init_request``/``exit_request`` are ``None`` until overridden, and the block
    layer tests for them (the kernel's NULL ops); the override must have the
    signature of the ``*Fn`` type its attribute is declared with.  ``complete`` and
    ``timeout`` have the default behaviour documented on them.  They run in a CPU
    worker, except ``map_queues`` and the set-up and tear-down ops, which run in the
    owner.

    **Set-up and tear-down ops**, where 5.10 calls them:

    ================  =============================================  ======================
    op                called                                         arguments
    ================  =============================================  ======================
    ``init_request``  for every request of the pool as it is         ``(set, rq, hctx_idx,
                      allocated (blk_mq_alloc_rqs(), in              numa_node)``
                      ``alloc_tag_set``; a failure halves the
                      depth like a pool that does not fit)
    ``init_hctx``     for every hctx of a new queue (``init_queue``) ``(hctx,
                                                                     set.driver_data,
                                                                     hctx_idx)``
    ``exit_hctx``     by ``cleanup_queue``, and by ``init_queue`` on  ``(hctx, hctx_idx)``
                      the hctxs set up before one that failed
    ``exit_request``  when the requests are freed: ``free_tag_set``, ``(set, rq,
                      an hctx no CPU maps (blk_mq_map_swqueue()),     hctx_idx)``
                      a failed allocation being unwound
    ================  =============================================  ======================

    ``hctx`` is the owner's :class:`~mqrt.block.blk_mq_structs.HwCtxSpec`; what an
    ``init_hctx`` stores in ``hctx.driver_data`` is the ``driver_data`` of every
    CPU's :class:`~mqrt.block.blk_mq_structs.HwCtx` for that hctx (its forked copy).
    ``rq`` is a :class:`~mqrt.block.blk_mq_structs.Request` accessor of the pool with
    its PDU (``rq.pdu``, ``cmd_size`` bytes) writable; ``init_request`` runs before
    the arena exists, on the pool the owner holds until
    :func:`~mqrt.block.blk_mq_setup.init_shared` copies it into the arena, so what it
    writes is there when the CPUs start, but the accessor itself is not for keeping
    (each CPU has its own, ``mq.rqs``).

    **Failure convention**: ``init_hctx`` and ``init_request`` return 0 or a negative
    errno (``-errno.ENOMEM``, ``-errno.EFAULT``, ...), as the kernel's ops do; a
    ``MemoryError`` raised inside one counts as ``-ENOMEM`` (Python's own allocation
    failure).  Any other exception is a driver bug and propagates.  The block layer
    turns a failure into the kernel's errno: ``init_request`` -> the depth halves,
    and ``alloc_tag_set`` fails with ENOMEM once nothing fits; ``init_hctx`` ->
    ``init_queue`` unwinds and fails with ENOMEM, naming the driver's errno.

    **Life cycle**, every hook with a default that does nothing::

        owner   init_shared -> make_fds -> start_device -> probe   (before the CPUs fork)
        CPU     bind -> irq_handlers, timer_interval_ns -> (the run: ops, timer)
                -> driver_stats (into the CPU's result)
        owner   shutdown -> (the device exits) ; device_counters if it died

    A driver with a device process (nvme) returns it from :meth:`start_device`;
    ``probe``, ``shutdown`` and ``device_counters`` are only called for one.

    Adding an op or a hook is an attribute (an optional op: ``None`` and its ``*Fn``
    type) or a method with its default here, and its call in the block layer or the
    runtime.
    """

    name = "driver"

    # -- struct blk_mq_ops ---------------------------------------------------------------

    def queue_rq(self, mq: BlkMq, hctx: HwCtx, rq: Request, last: bool) -> int:
        """->queue_rq(hctx, bd): issue one request; ``last`` says the batch ends
        here.  Returns a :class:`BlkStatus` (a blk_status_t: 0 is OK, the driver owns
        the request).  Required: the base only declares it."""
        raise NotImplementedError(f"{self.name}: ops.queue_rq is required")

    #: ->commit_rqs(hctx): a batch ended without a ``last`` request.
    commit_rqs: CommitRqsFn | None = None
    #: ->get_budget(q) -> bool / ->put_budget(q): per-device budget before the tag
    #: (``q`` is the CPU's handle on the request queue); both or neither.
    get_budget: GetBudgetFn | None = None
    put_budget: PutBudgetFn | None = None
    #: ->map_queues(set): fill set.map[] (without it: blk_mq_map_queues on DEFAULT).
    map_queues: MapQueuesFn | None = None
    #: ->poll(hctx) -> int: reap a POLL hctx's completions (no interrupt); how many.
    poll: PollFn | None = None

    def complete(self, mq: BlkMq, rq: Request) -> None:
        """->complete(rq): finish a request on the CPU chosen by rq_affinity (with
        the status the driver left in it)."""
        mq.end_request(rq)

    def timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """->timeout(rq): the request is past its deadline.  ``gen`` is the
        generation that timed out: pass it to ``complete_request`` (the kernel pins
        the request with a reference instead).  Default: give it another timeout."""
        return EhRet.RESET_TIMER

    #: ->init_hctx(hctx, driver_data, hctx_idx) -> 0 or -errno: a new queue's hctx
    #: (``driver_data`` is the tag set's); may fill ``hctx.driver_data``.
    init_hctx: InitHctxFn | None = None
    #: ->exit_hctx(hctx, hctx_idx): the hctx goes away (cleanup_queue, or an
    #: init_queue that failed on a later hctx).
    exit_hctx: ExitHctxFn | None = None
    #: ->init_request(set, rq, hctx_idx, numa_node) -> 0 or -errno: a request of the
    #: pool was allocated; its PDU (``rq.pdu``) is the driver's to fill.
    init_request: InitRequestFn | None = None
    #: ->exit_request(set, rq, hctx_idx): a request of the pool is being freed.
    exit_request: ExitRequestFn | None = None

    # -- life cycle: in the owner, before the CPUs fork ----------------------------------

    def init_shared(self, arena: Arena) -> None:
        """The driver's state in the arena, after the block layer's (owner only)."""

    def make_fds(self) -> list[int]:
        """File descriptors the driver's processes share (eventfds, interrupt pipes),
        made before forking so every child inherits them; the runtime closes them at
        the end of the run.  Default: none."""
        return []

    def start_device(self, arena: Arena, host_core: int | None) -> DeviceProcess | None:
        """Fork the device the driver drives, pinned to ``host_core`` (None: not
        pinned).  The runtime waits for its ``ready`` message, then calls
        :meth:`probe`.  Default: no device process (null_blk completes inside the CPUs)."""
        return None

    def probe(self, arena: Arena) -> dict[str, Any]:
        """The device is up: bring it to where the CPUs can issue I/O (the runtime,
        before the CPUs start).  Returns what the report shows about the device;
        raise RuntimeError if the device cannot be used.  Default: nothing to do."""
        return {}

    # -- life cycle: in each CPU -----------------------------------------------------------

    def bind(self, arena: Arena, mq: BlkMq | None, cpu: int) -> None:
        """Attach this CPU's (forked) copy of the driver to the arena and to the
        CPU's block layer (None: the owner, outside any CPU)."""

    def irq_handlers(self, mq: BlkMq, cpu: int) -> list[IrqHandler]:
        """The interrupt vectors affine to ``cpu``, which its wait point watches.
        Default: none (completions come from the block layer's softirq or timers)."""
        return []

    def irq_poll(self, mq: BlkMq) -> bool:
        """The CPU is about to sleep: poll the interrupt vectors its handlers left
        masked (the irq_poll / NAPI idea: after an interrupt, poll the queue for a
        while instead of taking one interrupt per completion).  True: keep the CPU
        awake and call again; False: nothing masked, the CPU may sleep (its vectors
        are armed).  Default: no polling."""
        return False

    def timer_interval_ns(self, q: int) -> int:
        """The period of the driver's timer for request queue ``q`` (0: none).  The
        runtime runs :meth:`timer` that often on the first CPU of the queue's hctx 0."""
        return 0

    def timer(self, mq: BlkMq, q: int) -> None:
        """The driver's periodic timer for request queue ``q`` fired (null_blk's
        bandwidth refill)."""

    def driver_stats(self) -> dict[str, int]:
        """What this CPU's copy of the driver counted, for the CPU's result."""
        return {}

    # -- life cycle: in the owner, at the end ----------------------------------------------

    def shutdown(self, arena: Arena) -> None:
        """Disable the device before the runtime tells its process to exit."""

    def device_counters(self, arena: Arena) -> dict[str, int]:
        """The device's counters as it last published them in the arena (for a
        device process that died before reporting).  Default: none."""
        return {}

    def device_workers(self, arena: Arena) -> list[dict[str, int]]:
        """Each of the device's workers' counters as last published (a device that
        serves its queues with several workers).  Default: none."""
        return []
