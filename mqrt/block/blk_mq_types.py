"""The public vocabulary of ``include/linux/blk-mq.h`` and ``include/linux/blk_types.h``:
flags, state bits, statuses, request states and the driver's ops.

Kept apart from :mod:`mqrt.block.blk_mq` so drivers (``mqrt.device``) and reports can name
things without importing the data path.  Flags are exposed by *name*: their bit
values changed across kernel versions (the values here are those of current kernels).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.block.blk_mq_structs import Request, RequestQueue

#: Largest queue_depth a tag set may ask for (BLK_MQ_MAX_DEPTH).
BLK_MQ_MAX_DEPTH = 10240
#: Requests a plug collects before it flushes (BLK_MAX_REQUEST_COUNT).
BLK_MAX_REQUEST_COUNT = 32
#: A plug also flushes once its last request is this big (BLK_PLUG_FLUSH_SIZE).
BLK_PLUG_FLUSH_SIZE = 128 * 1024
#: Delay before rerunning a queue whose driver said BLK_STS_RESOURCE, ns.
BLK_MQ_RESOURCE_DELAY_NS = 3_000_000
#: Default request timeout when the tag set gives 0 (30 * HZ), ms.
BLK_DEFAULT_TIMEOUT_MS = 30_000
#: hctx runs on one kblockd CPU before moving to the next CPU of its mask.
BLK_MQ_CPU_WORK_BATCH = 8
#: dispatch_busy EWMA: weight and fixed-point factor.
BLK_MQ_DISPATCH_BUSY_EWMA_WEIGHT = 8
BLK_MQ_DISPATCH_BUSY_EWMA_FACTOR = 4
#: Default max_sectors of a request (BLK_DEF_MAX_SECTORS_CAP), 512-byte sectors.
BLK_DEF_MAX_SECTORS = 2560
SECTOR_SHIFT = 9


class BlkMqFlag(enum.IntFlag):
    """BLK_MQ_F_*: behaviour flags of a tag set and its hctxs."""

    TAG_QUEUE_SHARED = 1 << 1  #: several request queues use the tag set
    STACKING = 1 << 2
    TAG_HCTX_SHARED = 1 << 3  #: one tag space for every hctx of the set
    BLOCKING = 1 << 4  #: ->queue_rq may sleep: dispatch always from kblockd
    TAG_RR = 1 << 5  #: round-robin tag allocation (alloc_policy=RR)
    NO_SCHED_BY_DEFAULT = 1 << 6


class HctxState(enum.IntEnum):
    """BLK_MQ_S_*: bit numbers in ``hctx->state``."""

    STOPPED = 0
    TAG_ACTIVE = 1
    SCHED_RESTART = 2
    INACTIVE = 3


class QueueFlag(enum.IntEnum):
    """QUEUE_FLAG_*: bit numbers in ``q->queue_flags`` (the ones mqrt uses)."""

    HCTX_ACTIVE = 0  #: shared-tags user is active (TAG_HCTX_SHARED)
    QUIESCED = 1
    SAME_COMP = 2  #: rq_affinity >= 1
    SAME_FORCE = 3  #: rq_affinity == 2


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


class ReqOp(enum.IntEnum):
    """REQ_OP_*."""

    READ = 0
    WRITE = 1


class EhRet(enum.IntEnum):
    """enum blk_eh_timer_return."""

    DONE = 0  #: the driver will complete (or completed) the request
    RESET_TIMER = 1  #: give it another timeout


class BlkMqOps:
    """struct blk_mq_ops: a driver subclasses this and overrides what it implements.

    Every method runs in a CPU worker process (``mq`` is that CPU's block layer).
    Optional ops are None on the class until overridden; ``queue_rq`` is required.
    """

    name = "driver"

    #: ->queue_rq(hctx, rq, last): issue one request; ``last`` says the batch ends.
    queue_rq: Any = None
    #: ->commit_rqs(hctx): a batch ended without a ``last`` request.
    commit_rqs: Any = None
    #: ->get_budget(q) -> bool / ->put_budget(q): per-device budget before the tag.
    get_budget: Any = None
    put_budget: Any = None
    #: ->map_queues(set): fill set.map[] (otherwise blk_mq_map_queues on DEFAULT).
    map_queues: Any = None
    #: ->poll(hctx) -> int: reap a POLL hctx's completions (no interrupt); how many.
    poll: Any = None

    def complete(self, mq: BlkMq, rq: Request) -> None:
        """->complete(rq): finish a request on the CPU chosen by rq_affinity (with
        the status the driver left in it)."""
        mq.end_request(rq)

    def timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """->timeout(rq): the request is past its deadline.  ``gen`` is the
        generation that timed out: pass it to ``complete_request`` (the kernel pins
        the request with a reference instead)."""
        return EhRet.RESET_TIMER

    def init_hctx(self, q: RequestQueue, hctx_idx: int) -> None:
        """->init_hctx(): hctx ``hctx_idx`` of ``q`` is being set up (in the owner,
        at queue init); raise to fail the queue's creation."""

    def init_request(self, rq_id: int) -> None:
        """->init_request(): a request of the pool is being set up (owner)."""
