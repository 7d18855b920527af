"""The data path of ``block/blk-mq.c``: from a bio to a freed tag, on real processes.

Tag sets and queues are set up by :mod:`mqrt.block.blk_mq_setup`; the structs are in
:mod:`mqrt.block.blk_mq_structs`, the dispatch policy in :mod:`mqrt.block.blk_mq_sched`,
the completion side (start, complete, requeue, end, timeouts) in
:mod:`mqrt.block.blk_mq_complete`.

::

    CPU c (worker process)                                any CPU (IPI / kblockd)
    bio --> plug (merge, flush at 32) --> tag (sbitmap_queue, fair share, sleep)
        --> rq (static pool in shm, IDLE->IN_FLIGHT) --> issue directly: ->queue_rq
            | busy: hctx->dispatch / ctx list, run hw queue (inline, or kblockd on
            | a CPU of hctx->cpumask), SCHED_RESTART, 3 ms rerun on RESOURCE
        --> driver completes --> complete_request (rq_affinity: local, softirq,
            or IPI to the submitting CPU) --> ->complete --> end_request
        --> bio done to the submitter --> free: IDLE, put tag, wake waiters,
            restart the hw queue if marked

In each CPU worker, :class:`BlkMq` is that CPU's view of every queue and runs the data
path; it asks its CPU for the services a kernel CPU has (softirqs, timers, IPIs,
kblockd, sleeping) through :class:`~mqrt.block.blk_mq_structs.CpuSys`.

Deviations from Linux
    * Without an elevator the driver tag is the request's identity (the tag set's
      pool at ``tags.rq_base + tag``); with one a request is of its queue's sched
      pool, named by its sched tag, and takes a driver tag at dispatch
      (:meth:`BlkMq.get_driver_tag`); with none free it waits on ``hctx->dispatch``
      for a restart or a delayed rerun, not a wait-queue callback (see
      :mod:`mqrt.block.elevator`).
    * A task moves only when CPU hotplug takes its CPU offline (:mod:`mqrt.lib.cpuhp`):
      it learns its target between batches or when a tag's hctx is INACTIVE, where
      blk_mq_get_tag() re-derives ctx/hctx.
    * ``hctx->next_cpu`` (kblockd CPU round robin) is per CPU.
    * The request state word carries a generation (bits 8+) and an ``allocated``
      bit next to MQ_RQ_*; every transition is a cmpxchg from the expected state,
      so a request finishes exactly once even when a completion races a timeout.
    * A queue's tag set and ctxs are fixed for the run; its hctx count
      and CPU -> hctx map change only through blk_mq_update_nr_hw_queues()
      (:mod:`mqrt.block.blk_mq_update`), which each CPU follows (:meth:`BlkMq.sync_map`);
      TAG_QUEUE_SHARED is decided when the queues are set up.
    * Merges are 5.10's (the plug list newest first, then the newest 8 requests of the
      ctx list), except: nomerges=1 tries only the newest request of each; a bio looks
      at its ctx list only while its CPU has put requests there (``Queue.ctx_queued``,
      instead of list_empty_careful()); bios are never split.

Concurrency (see docs/ARCHITECTURE.md for the full table)
    * ``rq.state``: cmpxchg/store_release by whoever moves it; the setup block is
      written by the allocating CPU before the request is published to the driver,
      and grown by merges on that CPU only: while plugged, or on its ctx list under
      the list's lock while still there (a dispatcher takes it under the same lock).
    * ctx lists, ``hctx->dispatch``, ``q->requeue_list``:
      :class:`~mqrt.block.blk_mq_structs.RqList`, under their
      own bit spinlock; ``ctx_map`` bits change only under the ctx's list lock.
    * ``hctx->state`` bits: atomic set/clear/test; ``dispatch_busy``: relaxed, a hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from mqrt.block import blk_mq_sched
from mqrt.block._rq import RqLines
from mqrt.block.blk_mq_complete import BlkMqCompletion
from mqrt.block.blk_mq_map import map_swqueue, read_map
from mqrt.block.blk_mq_structs import (
    _BUSY,
    _INACTIVE,
    _OWNED_OR_BUSY,
    _QUIESCED,
    _RQF_ELV,
    _RQF_MIGRATED,
    _RQF_MQ_INFLIGHT,
    _RQF_POLLED,
    _RQF_RESV,
    _STOPPED,
    RQ_ALLOCATED,
    RQ_EXTENT,
    RQ_GEN_SHIFT,
    RQ_NO_TAG,
    RQ_OFF_FLAGS,
    RQ_OFF_NR_SECTORS,
    RQ_OFF_OP,
    RQ_OFF_SECTOR,
    RQ_OFF_SETUP,
    RQ_OFF_TAG,
    RQ_SETUP,
    RQ_SIZE,
    RQ_U16_CPU,
    RQ_U16_HCTX,
    BlkMqError,
    CpuSys,
    HwCtx,
    Plug,
    PlugRq,
    Queue,
    Request,
    RequestQueue,
    SchedRequest,
    TagSet,
)
from mqrt.block.blk_mq_tag import Tags, tag_wait_key
from mqrt.block.blk_mq_types import (
    BLK_MAX_REQUEST_COUNT,
    BLK_MQ_CPU_WORK_BATCH,
    BLK_MQ_CTX_MERGE_CHECKS,
    BLK_MQ_RESOURCE_DELAY_NS,
    BLK_PLUG_FLUSH_SIZE,
    RQF_HOME_SHIFT,
    SECTOR_SHIFT,
    BlkMqFlag,
    BlkStatus,
    HctxState,
    ReqOp,
    Rqf,
)
from mqrt.block.blk_settings import bio_segments
from mqrt.lib import rcu, trace
from mqrt.lib.cpuhp import BOOT_CPU, CpuhpState
from mqrt.lib.shm import Arena
from mqrt.lib.trace import Ev
from mqrt.lib.wait import Waiters

# -- the data path ---------------------------------------------------------------------------


_WRITE = int(ReqOp.WRITE)
_NOMERGE = int(Rqf.NOMERGE)
_PLUG_FLUSH_SECTORS = BLK_PLUG_FLUSH_SIZE >> SECTOR_SHIFT
_EV_TAG_GET, _EV_DISPATCH = int(Ev.TAG_GET), int(Ev.DISPATCH)


def _no_tag() -> int:
    return -1


def pool_accessors(arena: Arena, tset: TagSet) -> list[Request]:
    """Accessors for every request of ``tset``'s pool, by request id: the same for
    every CPU (a request's tags handle is its hctx's, ``hctx.tags``), so the runtime
    makes them once before it forks the CPUs, which inherit them
    (:class:`BlkMq`'s ``pools``).  At the ids of tags blk_mq_map_swqueue() freed (an
    hctx no CPU maps) it keeps inert accessors, never allocated, so ids do not move."""
    region = tset.rq_region
    assert region is not None  # an allocated set
    depth = tset.queue_depth
    pool: list[Request] = []
    for i, s in enumerate(tset.tags):
        if s is None:
            pool += [Request.at(arena, region, i * depth + tag, tag) for tag in range(depth)]
        else:
            pool += [
                Request(arena, region, s.rq_base + tag, None, tag, tset.timeout_ns)
                for tag in range(s.nr_tags)
            ]
    for q in sorted(tset.tag_list, key=lambda q: q.sched_rq_first):
        if q.sched_region is None:
            continue
        nr = q.nr_sched_rqs
        pool += [
            SchedRequest(
                arena, q.sched_region, i, q.sched_rq_first + i, None, i % nr, tset.timeout_ns
            )
            for i in range(q.sched_region.count)
        ]
    return pool


#: By ``id(tag set)``: its pool's accessors and their offsets (``rq.base``), by id.
Pools = dict[int, tuple[list[Request], list[int]]]


def prepare_pools(arena: Arena, queues: list[RequestQueue]) -> Pools:
    """Every tag set's :func:`pool_accessors` and their offsets: made by the
    runtime before it forks the CPUs (each inherits a copy; the runtime releases its
    own with :func:`release_pools`)."""
    pools: Pools = {}
    for q in queues:
        if id(q.tag_set) not in pools:
            pool = pool_accessors(arena, q.tag_set)
            pools[id(q.tag_set)] = (pool, [rq.base for rq in pool])
    return pools


def release_pools(pools: Pools) -> None:
    """Let go of the pools' views of the arena (before it is closed)."""
    for pool, _ in pools.values():
        for rq in pool:
            if rq.pdu is not None:
                rq.pdu.release()
    pools.clear()


class BlkMq(BlkMqCompletion):
    """The block layer on one CPU: per-CPU handles of every queue and the data path.

    Counters in ``self.stats`` are this CPU's and are reported at the end of a run.
    """

    def __init__(
        self,
        arena: Arena,
        waiters: Waiters,
        cpu: int,
        queues: list[RequestQueue],
        sys: CpuSys,
        pools: Pools | None = None,
    ):
        """``pools``: the request pools' accessors made before (:func:`prepare_pools`),
        this process's own copy; by default made here."""
        self.arena = arena
        self.a = arena.atomic
        self.buf = arena.buf
        #: the arena as 16-bit words: a request's cpu, hctx and q fields are
        #: ``buf16[(rq.base >> 1) + RQ_U16_*]``
        self.buf16 = arena.buf.cast("H")
        #: a request's hot steps (own + set up, start, end) in one C call each
        self.rqlines = RqLines(arena.buf)
        #: submit_bios() may take submit_bio()'s lines inline: not when a subclass has
        #: a submit_bio of its own (the sq mode's takes the queue lock)
        self._inline_submit = type(self).blk_mq_submit_bio is BlkMq.blk_mq_submit_bio
        self.cpu = cpu
        #: the CPU whose ctx this CPU's task allocates from (rq->mq_ctx): this one, or
        #: while this CPU is offline the one CPU hotplug moved its task to
        self.ctx_cpu = cpu
        #: rq_flags of every request the task allocates: 0 at home; away, MIGRATED
        #: with this CPU's number (where the bios go back) from RQF_HOME_SHIFT
        self.rq_home = 0
        #: the run's CPU hotplug state (None: no CPU of the run goes offline)
        self.hotplug: CpuhpState | None = None
        self.sys = sys
        self.waiters = waiters  #: this CPU's slot: it says what its tag sleeps wait for
        self.mq = self
        self.clock = time.monotonic_ns
        self.plug: Plug | None = None  #: current->plug, while the task has one
        self._plug = Plug()  #: the task's plug, started and finished again and again
        self._rqs: dict[int, list[Request]] = {}  # id(tag set) -> pool accessors
        self._tags: dict[int, list[Tags | None]] = {}
        bases: dict[int, list[int]] = {}  # id(tag set) -> the accessors' offsets
        for q in queues:
            tset = q.tag_set
            if id(tset) in self._tags:
                continue
            tags = [None if s is None else Tags(arena, s, waiters, cpu) for s in tset.tags]
            self._tags[id(tset)] = tags
            made = pools.get(id(tset)) if pools is not None else None
            if made is None:
                pool = pool_accessors(arena, tset)
                made = pool, [rq.base for rq in pool]
            self._rqs[id(tset)], bases[id(tset)] = made
        self.queues = [Queue(arena, q, self._tags[id(q.tag_set)], cpu, waiters) for q in queues]
        for queue in self.queues:
            for hctx in queue.hctxs:
                hctx.run_sync = partial(self.run_hw_queue, hctx, False)
        #: per queue: the request pool accessors of its tag set, and their offsets
        self.rqs = [self._rqs[id(q.tag_set)] for q in queues]
        self.rq_base = [bases[id(q.tag_set)] for q in queues]
        #: Per queue: bi_end_io of the bios this CPU submits, called directly when
        #: they complete here (None: always through ``sys.bio_done``).
        self.end_io: list[Callable[[tuple, int], None]] | None = None
        #: Per queue: the same for a request of merged bios, given their chain
        #: (:meth:`bios_done`); None: through ``sys.bio_done``.
        self.end_io_merged: list[Callable[[tuple, tuple, int], None]] | None = None
        # Hot-path counters (attributes: cheaper than dict entries).

        self.nr_bios = self.nr_issued = self.nr_completed = 0
        self.nr_batch_tags = 0
        #: bios merged, by op: the diskstats "merges" of reads and of writes
        self.merges_by_op = [0] * len(ReqOp)
        #: The bios merged into this CPU's requests, each with its own start, until
        #: their request ends (req->bio's chain, kept by its submitter):
        #: (queue, rq id, generation) -> [(start_ns, nr_sectors), ...], oldest first.
        self.merged_bios: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        self._idle_at: dict[int, int] = {}  #: queue -> when its timeout work may idle it
        #: Called after each violation (a CPU publishes it for the runtime's detectors).
        self.on_violation: Callable[[], None] | None = None
        self.topology = queues[0].tag_set.topology if queues else None
        self.stats = dict.fromkeys(
            (
                "busy",
                "ipis_sent",
                "softirqs",
                "requeued",
                "timeouts",
                "timer_resets",
                "hctx_runs",
                "kblockd_runs",
                "restarts",
                "stale_completions",
                "violations",
                "plug_flushes",
                "polls",
                "polled",
                "batched_completions",
                "ctx_merges",
                "elv_merges",
                "driver_tag_waits",
                "freeze_waits",
                "migrated_ends",  # requests of a task away from its offline CPU, ended here
                "task_moves",  # CPU hotplug moved this CPU's task (away or home)
            ),
            0,
        )
        self.violations: list[str] = []
        #: :meth:`map_snapshot` of a queue each time this CPU followed a new map
        self.map_history: list[dict[str, Any]] = []

    def counters(self) -> dict[str, int]:
        """This CPU's block-layer counters."""
        return {
            "bios": self.nr_bios,
            "merges": sum(self.merges_by_op),
            "read_merges": self.merges_by_op[ReqOp.READ],
            "write_merges": self.merges_by_op[ReqOp.WRITE],
            "requests": self.nr_bios - sum(self.merges_by_op),
            "issued": self.nr_issued,
            "completed": self.nr_completed,
            "batch_tags": self.nr_batch_tags,
            # merged requests whose end has not reached this CPU yet (0 once drained)
            "open_bio_chains": len(self.merged_bios),
            **self.stats,
        }

    def close(self) -> None:
        self.buf16.release()
        self.rqlines.release()
        for queue in self.queues:
            queue.close()
        for pool in self._rqs.values():
            for rq in pool:
                if rq.pdu is not None:
                    rq.pdu.release()

    def violation(self, what: str) -> None:
        self.stats["violations"] += 1
        if len(self.violations) < 20:
            self.violations.append(f"cpu{self.cpu}: {what}")
        if self.on_violation is not None:
            self.on_violation()

    # -- allocation ----------------------------------------------------------------------------

    def alloc_request(
        self,
        queue: Queue,
        op: int,
        sector: int,
        nr_sectors: int,
        start_ns: int,
        *,
        reserved: bool = False,
        nowait: bool = False,
        polled: bool = False,
    ) -> int:
        """__blk_mq_alloc_requests(): a tag (sleeping while none is free unless
        ``nowait``), its request set up and owned; the request id, or -1.  A
        ``polled`` request comes from the POLL hctx (the queue must be poll capable)."""
        if not queue.q_usage.tryget_live() and not self.queue_enter(queue, 1, nowait):
            return -1
        if self.a.read32(queue.map_gen_off) != queue.map_gen:
            self.sync_map(queue)
        hctx = queue.hctx_poll if polled else queue.hctx_by_op[op]
        rq_id = self._get_request(
            queue, hctx, op, sector, nr_sectors, bio_segments(nr_sectors), start_ns, polled,
            reserved, nowait,
        )  # fmt: skip
        if rq_id < 0:
            self.queue_exit(queue, 1)
        return rq_id

    def _get_request(
        self,
        queue: Queue,
        hctx: HwCtx,
        op: int,
        sector: int,
        nr_sectors: int,
        nr_segs: int,
        start_ns: int,
        polled: bool,
        reserved: bool = False,
        nowait: bool = False,
    ) -> int:
        """:meth:`alloc_request` on ``hctx`` (the one blk_mq_map_queue() picked for
        the bio), for a bio of ``nr_segs`` segments."""
        # q->elevator, stable while the caller holds its reference on the queue
        if self.a.read32(queue.elevator_off):
            return self._get_sched_request(
                queue, hctx, op, sector, nr_sectors, nr_segs, start_ns, polled, reserved, nowait
            )
        tags = hctx.tags
        assert tags is not None  # a ctx maps only to hctxs with tags (blk_mq_map_swqueue)
        shared = queue.shared
        rq_id = -1
        plug = self.plug
        shallow = queue.async_depth if op == _WRITE else 0
        if plug is not None and not shared and not reserved and not shallow:
            # blk_mq_get_new_requests() with a plug: the plug's cached requests, after
            # taking a batch of tags for its nr_ios (blk_mq_get_tags(): not with
            # shared tags, reserved tags or a shallow depth).
            cached = plug.cached
            if not cached and plug.nr_ios > 1:
                self._alloc_batch(tags, hctx, plug)
                # as the single tag's re-check (INACTIVE is set only in a hotplug run)
                if self.hotplug is not None and self.a.read(hctx.state_off) & _INACTIVE:
                    self._free_plug_rqs(plug)
            if cached and cached[-1][0] is hctx:
                rq_id = cached.pop()[1]
        if rq_id < 0:
            if shared:
                tags.tag_busy(hctx.active_off, hctx.active_bit)  # blk_mq_tag_busy()
                tag = -1
            elif reserved:
                tag = -1
            else:  # the fast path of blk_mq_get_tag(), inlined
                if shallow:
                    tag = tags.bitmap_tags.get_shallow(shallow)
                else:
                    tag = tags.bitmap_sb.get()
                if tag >= 0:
                    tag += tags.nr_reserved_tags
            if tag < 0:
                tag = self._get_tag_slow(queue, hctx, shallow, reserved, nowait)
                if tag < 0:
                    return -1
            if self.hotplug is not None and self.a.read(hctx.state_off) & _INACTIVE:
                tags.put_tag(tag, self.cpu)
                return self._inactive_retry(
                    queue, hctx, op, sector, nr_sectors, nr_segs, start_ns, polled, reserved,
                    nowait,
                )  # fmt: skip
            rq_id = tags.rq_base + tag
            base = self.rq_base[queue.index][rq_id]
            # _own(), inlined: the request must be free; mark it allocated
            a = self.a
            st = a.read(base)
            if st & _OWNED_OR_BUSY or a.cmpxchg(base, st, st | RQ_ALLOCATED) != st:
                self.violation(f"request {rq_id} handed out while owned ({st:#x})")
        else:
            base = self.rq_base[queue.index][rq_id]
        rq_flags = 0
        if shared:
            rq_flags = _RQF_MQ_INFLIGHT
            a = self.a
            nr = a.fetch_add32(hctx.nr_active_off, 1) + 1
            # Instrumentation: the most requests a user held after a check that held
            # it to its fair share (it may overshoot by one per racing CPU).
            if tags.last_share and nr > a.read32(hctx.max_active_off):
                a.set32(hctx.max_active_off, nr)
        if reserved:
            rq_flags |= _RQF_RESV
        if polled:
            rq_flags |= _RQF_POLLED
        hctx.nr_alloc += 1
        RQ_SETUP.pack_into(  # _setup(), inlined on the per-I/O path
            self.buf, base + RQ_OFF_SETUP, start_ns, sector, nr_sectors, 1, nr_segs,
            self.ctx_cpu, hctx.index, queue.index, op, rq_flags | self.rq_home, 0,
        )  # fmt: skip
        if trace.on:
            trace.emit(_EV_TAG_GET, rq_id - tags.rq_base, self.a.read(base) >> RQ_GEN_SHIFT,
                       hctx.index, queue.index)  # fmt: skip
        return rq_id

    def _setup(
        self,
        base: int,
        start_ns: int,
        sector: int,
        nr_sectors: int,
        nr_segs: int,
        hctx: HwCtx,
        queue: Queue,
        op: int,
        rq_flags: int,
    ) -> None:
        """blk_mq_rq_ctx_init(): the request's setup block, in one write (on the ctx
        of the CPU the task runs on; away from home, RQF_MIGRATED and its home)."""
        hctx.nr_alloc += 1
        RQ_SETUP.pack_into(
            self.buf, base + RQ_OFF_SETUP, start_ns, sector, nr_sectors, 1, nr_segs,
            self.ctx_cpu, hctx.index, queue.index, op, rq_flags | self.rq_home, 0,
        )  # fmt: skip

    def _get_sched_request(
        self,
        queue: Queue,
        hctx: HwCtx,
        op: int,
        sector: int,
        nr_sectors: int,
        nr_segs: int,
        start_ns: int,
        polled: bool,
        reserved: bool,
        nowait: bool,
    ) -> int:
        """__blk_mq_alloc_requests() with an elevator: a tag of ``hctx->sched_tags``
        (writes, mqrt's async I/O, below dd_limit_depth()'s async_depth), whose
        request of the queue's sched pool gets RQF_ELV and no driver tag
        (``rq->tag = -1``: it takes one at dispatch, :meth:`get_driver_tag`, and with
        it its active count on a shared set)."""
        tags = hctx.sched_tags
        dd = queue.dd
        assert tags is not None and dd is not None  # an elevator only on such a queue
        shallow = 0 if reserved else dd.limit_depth(op, op != _WRITE)
        tag = -1
        if not reserved:
            tag = tags.bitmap_tags.get_shallow(shallow) if shallow else tags.bitmap_sb.get()
            if tag >= 0:
                tag += tags.nr_reserved_tags
        if tag < 0:
            self.waiters.set_waits_for(tag_wait_key(queue.index, hctx.index, shallow))
            tag = tags.get_tag(reserved, nowait, None, hctx.wait_index_off, hctx.run_sync,
                               self.io_schedule, shallow=shallow)  # fmt: skip
            if tag < 0:
                return -1
        if self.hotplug is not None and self.a.read(hctx.state_off) & _INACTIVE:
            tags.put_tag(tag, self.cpu)  # blk_mq_get_tag()'s re-check, as for a driver tag
            return self._inactive_retry(
                queue, hctx, op, sector, nr_sectors, nr_segs, start_ns, polled, reserved, nowait
            )
        rq_id = tags.rq_base + tag
        base = self.rq_base[queue.index][rq_id]
        self._own(base, rq_id)
        self.a.set32(base + RQ_OFF_TAG, RQ_NO_TAG)
        rq_flags = _RQF_ELV
        if reserved:
            rq_flags |= _RQF_RESV
        if polled:
            rq_flags |= _RQF_POLLED
        self._setup(base, start_ns, sector, nr_sectors, nr_segs, hctx, queue, op, rq_flags)
        if trace.on:
            trace.emit(_EV_TAG_GET, tag, self.a.read(base) >> RQ_GEN_SHIFT, hctx.index,
                       queue.index)  # fmt: skip
        return rq_id

    def _inactive_retry(
        self,
        queue: Queue,
        hctx: HwCtx,
        op: int,
        sector: int,
        nr_sectors: int,
        nr_segs: int,
        start_ns: int,
        polled: bool,
        reserved: bool,
        nowait: bool,
    ) -> int:
        """blk_mq_get_tag() found the hctx INACTIVE after taking its tag (given back
        by the caller): its CPUs are going offline, so the task is moved off this CPU
        (the kernel's msleep() that lets the scheduler push it) and the allocation
        starts again on the ctx of the CPU it now runs on; -1 with ``nowait``."""
        if not self.follow_task():
            raise BlkMqError(
                f"cpu{self.cpu}: hctx{hctx.index} of {queue.q.name} is inactive and this "
                "CPU's task has no other CPU to run on"
            )
        if nowait:
            return -1
        hctx = queue.hctx_poll if polled else queue.hctx_by_op[op]
        return self._get_request(
            queue, hctx, op, sector, nr_sectors, nr_segs, start_ns, polled, reserved, nowait
        )

    def follow_task(self) -> bool:
        """The task goes where CPU hotplug put it (:mod:`mqrt.lib.cpuhp`): its new
        requests take that CPU's ctx and hctxs, their bios still end here; back at
        home, as before.  Called between two batches of submissions (no plug) and
        when a tag's hctx turned INACTIVE.  True if the task moved."""
        hp = self.hotplug
        if hp is None:
            return False
        target = hp.target(self.cpu)
        if target == self.ctx_cpu:
            return False
        self.ctx_cpu = target
        home = target == self.cpu
        self.rq_home = 0 if home else _RQF_MIGRATED | self.cpu << RQF_HOME_SHIFT
        for queue in self.queues:
            queue.set_ctx(target, home)
        hp.moved(self.cpu, target)
        self.stats["task_moves"] += 1
        return True

    def _get_tag_slow(
        self, queue: Queue, hctx: HwCtx, shallow: int, reserved: bool, nowait: bool
    ) -> int:
        """blk_mq_get_tag() past its first try: the slow path, which may sleep."""
        tags = hctx.tags
        assert tags is not None
        # say for what the task may sleep (the detectors ask what the sleeper may
        # take: its queue's fair share, its shallow depth)
        self.waiters.set_waits_for(tag_wait_key(queue.index, hctx.index, shallow))
        return tags.get_tag(
            reserved,
            nowait,
            hctx.may_queue if queue.shared else None,
            hctx.wait_index_off,
            hctx.run_sync,
            self.io_schedule,
            shallow=shallow,
        )

    def _own(self, base: int, rq_id: int) -> None:
        """A tag was just taken: its request (at ``base``) must be free; mark it
        allocated (the cmpxchg is the invariant check: no tag is handed out twice)."""
        a = self.a
        st = a.read(base)
        if st & _OWNED_OR_BUSY or a.cmpxchg(base, st, st | RQ_ALLOCATED) != st:
            self.violation(f"request {rq_id} handed out while owned ({st:#x})")

    def _alloc_batch(self, tags: Tags, hctx: HwCtx, plug: Plug) -> None:
        """__blk_mq_alloc_requests_batch(): up to the plug's nr_ios tags from one word
        of the bitmap at once (one cmpxchg), cached on the plug in tag order."""
        nr = min(plug.nr_ios, BLK_MAX_REQUEST_COUNT)
        plug.nr_ios = 1
        mask, offset = tags.bitmap_tags.get_batch(nr)
        first = tags.rq_base + tags.nr_reserved_tags + offset
        pool = self.rq_base[hctx.queue.index]
        got = []
        while mask:
            low = mask & -mask
            mask ^= low
            rq_id = first + low.bit_length() - 1
            self._own(pool[rq_id], rq_id)
            got.append((hctx, rq_id))
        got.reverse()
        plug.cached += got
        self.nr_batch_tags += len(got)

    def _free_plug_rqs(self, plug: Plug) -> None:
        """blk_mq_free_plug_rqs(): give back the cached requests nobody used."""
        a = self.a
        for hctx, rq_id in plug.cached:
            base = self.rq_base[hctx.queue.index][rq_id]
            st = a.read(base)
            a.cmpxchg(base, st, ((st >> RQ_GEN_SHIFT) + 1) << RQ_GEN_SHIFT)
            tags = hctx.tags
            assert tags is not None  # its request came from them
            if trace.on:
                trace.emit(Ev.TAG_PUT, rq_id - tags.rq_base, st >> RQ_GEN_SHIFT,
                           hctx.index, hctx.queue.index)  # fmt: skip
            tags.put_tag(rq_id - tags.rq_base, self.cpu)
        plug.cached.clear()

    # -- submission ------------------------------------------------------------------------------

    def start_plug(self, nr_ios: int = 1) -> None:
        """blk_start_plug_nr_ios(): ``nr_ios`` is how many I/Os the task is about to
        submit (fio's batch), so tags can be taken in one go."""
        if self.plug is None:
            plug = self._plug
            plug.nr_ios = min(nr_ios, BLK_MAX_REQUEST_COUNT)
            self.plug = plug

    def finish_plug(self) -> None:
        """blk_finish_plug(): issue what the plug collected, free unused cached
        requests."""
        plug = self.plug
        if plug is not None:
            self.plug = None
            if plug.rqs:
                self.flush_plug(plug)
            if plug.cached:
                self._free_plug_rqs(plug)

    # -- the CPU -> hctx map -----------------------------------------------------------------

    def sync_map(self, queue: Queue) -> None:
        """Follow the tag set's map if it changed (blk_mq_update_nr_hw_queues() on
        another CPU): read it from the arena (:func:`read_map`) and rebuild this CPU's
        handles of every queue of the set (blk_mq_map_swqueue() in this process).

        Called only where the map cannot change meanwhile: holding a reference on the
        queue (after blk_queue_enter(), or for a request), which the transition's
        freeze waits for, or inside an hctx run's RCU read-side section, which its
        quiesce waits for.  A reference taken after the last unfreeze, or a section
        begun after the quiesce's grace period, reads the new generation: the writer
        stored it (release) before it unquiesced and unfroze."""
        a = self.a
        if a.load_acquire32(queue.map_gen_off) == queue.map_gen:
            return
        tset = queue.tset
        gen = read_map(a, tset)
        for x in self.queues:
            if x.tset is tset:
                self.remap(x, gen)

    def remap(self, queue: Queue, gen: int) -> None:
        """Rebuild this CPU's handles of ``queue`` from its tag set's map (this
        process's copy, already updated), now at generation ``gen``; what this CPU
        allocated on each hctx under the previous one goes to :attr:`map_history`."""
        self.map_history.append(self.map_snapshot(queue))
        map_swqueue(queue.q)
        for hctx in queue.hctxs:
            hctx.map_ctxs()
        queue.map_ctxs()
        queue.ctx_queued = False
        queue.map_gen = gen

    def map_snapshot(self, queue: Queue) -> dict[str, Any]:
        """The map generation this CPU follows for ``queue`` and the requests it has
        allocated on each of the queue's hctxs so far (cumulative)."""
        return {
            "q": queue.index,
            "map_gen": queue.map_gen,
            "nr_hw_queues": queue.nr_hw_queues,
            "hctx": queue.ctx_hctx[0].index,
            "alloc": [h.nr_alloc for h in queue.hctxs],
        }

    # -- q_usage_counter ---------------------------------------------------------------------

    def queue_enter(self, queue: Queue, nr: int, nowait: bool = False) -> bool:
        """blk_queue_enter() past its fast path (``queue.q_usage.tryget_live``): the
        queue is frozen, so the task sleeps on ``mq_freeze_wq`` until it thaws, after
        issuing its plug (whose requests hold references the freeze waits for).
        False with ``nowait`` (BLK_MQ_REQ_NOWAIT)."""
        ref = queue.q_usage
        a = self.a
        while not ref.tryget_live(nr):
            if nowait:
                return False
            if self.waiters.me is None:
                raise BlkMqError(f"{queue.q.name} is frozen and this process cannot sleep")
            wq = queue.freeze_wq
            wq.prepare_to_wait()
            if a.read32(queue.freeze_depth_off):
                self.stats["freeze_waits"] += 1
                self.io_schedule()
            wq.finish_wait()
        return True

    # -- submission (continued) ----------------------------------------------------------------

    def submit_bio(
        self,
        queue: Queue,
        op: int,
        sector: int,
        nr_sectors: int,
        start_ns: int,
        polled: bool = False,
    ) -> None:
        """submit_bio(): enter the queue (a reference on q_usage_counter, sleeping
        while it is frozen), then :meth:`blk_mq_submit_bio`; a bio that merged gives
        its reference back (the request it joined holds one)."""
        if not queue.q_usage.tryget_live():
            self.queue_enter(queue, 1)
        if self.a.read32(queue.map_gen_off) != queue.map_gen:
            self.sync_map(queue)
        if self.blk_mq_submit_bio(queue, op, sector, nr_sectors, start_ns, polled):
            self.queue_exit(queue, 1)

    def blk_mq_submit_bio(
        self,
        queue: Queue,
        op: int,
        sector: int,
        nr_sectors: int,
        start_ns: int,
        polled: bool = False,
    ) -> bool:
        """blk_mq_submit_bio() as Linux 5.10 has it: merge into a plugged request
        (:meth:`attempt_plug_merge`), else into one waiting on this CPU's ctx list
        (:meth:`sched_bio_merge`), else allocate a request and plug it, or issue it
        (directly, or through the ctx when the hctx is busy).  A ``polled`` bio
        (REQ_POLLED) goes to the POLL hctx if the queue has one; the submitter then
        reaps it with :meth:`poll`.

        A bio adjacent to no plugged request (every random bio) costs two dict
        lookups in the plug's bounds; the ctx list is looked at only while this CPU
        has put requests on its ctx lists (``queue.ctx_queued``), and then only if its
        bit in the hctx's ctx_map says it holds some (list_empty_careful()).

        The caller holds a reference on the queue for the bio; True if the bio merged
        (the caller gives that reference back), False if it became a request (which
        keeps it until it is freed)."""
        self.nr_bios += 1
        if polled and not queue.poll_capable:
            polled = False
        plug = self.plug
        end = sector + nr_sectors
        if (
            plug is not None
            and (sector in plug.bounds or end in plug.bounds)
            and queue.merge
            and self.attempt_plug_merge(plug, queue, op, sector, nr_sectors, start_ns, polled)
        ):
            return True
        elv = self.a.read32(queue.elevator_off)
        if elv:
            if (
                queue.merge
                and not queue.one_hit
                and blk_mq_sched.elv_bio_merge(self, queue, op, sector, nr_sectors, start_ns)
            ):
                return True
        elif queue.ctx_queued and self.sched_bio_merge(
            queue, op, sector, nr_sectors, start_ns, polled
        ):
            return True
        hctx = queue.hctx_poll if polled else queue.hctx_by_op[op]
        nr_segs = (nr_sectors + 7) >> 3  # bio_segments(): one per page
        ctx_cpu = self.ctx_cpu
        rq_id = self._get_request(queue, hctx, op, sector, nr_sectors, nr_segs, start_ns, polled)
        if self.ctx_cpu != ctx_cpu:  # the task moved while it allocated (INACTIVE)
            hctx = queue.hctx_poll if polled else queue.hctx_by_op[op]
        if plug is not None:
            if elv:
                plug.has_elevator = True
            # blk_add_rq_to_plug(): flush first at 32 requests or after a big request.
            rqs = plug.rqs
            if rqs and (
                len(rqs) >= BLK_MAX_REQUEST_COUNT or plug.last_sectors >= _PLUG_FLUSH_SECTORS
            ):
                self.flush_plug(plug)
                rqs = plug.rqs
            rqs.append((queue, hctx, rq_id))
            plug.last_sectors = nr_sectors
            plug.bounds[end] = plug.bounds[sector] = None
            return False
        if elv or (self.a.read32(hctx.dispatch_busy_off) and queue.nr_hw_queues == 1):
            self.insert_request(queue, rq_id)
            self.run_hw_queue(hctx, True)
        else:
            self.try_issue_directly(queue, hctx, rq_id)
        return False

    def submit_bios(
        self, queue: Queue, ops: list[int], sectors: list[int], lens: list[int], polled: bool
    ) -> None:
        """io_submit()'s loop: :meth:`submit_bio` for each bio, in order, each stamped
        with its own start as it is submitted (fio's io_u start_time).

        Inside a plug, a bio that can merge nowhere (no plugged request starts or ends
        at its edges, none of this CPU's requests waits on its ctx lists), on a queue
        of its own tags with no shallow depth, takes the lines of submit_bio() it
        would take anyway -- a tag's first try, its request set up, onto the plug --
        here, without a call per bio; every other bio (and one whose tag's first try
        fails) goes through :meth:`submit_bio` or its slow path as before, and so
        does every bio of a subclass with a submit_bio of its own (the sq mode's
        takes the queue lock)."""
        plug = self.plug
        clock = self.clock
        if plug is None or polled or queue.shared or not self._inline_submit:
            submit_bio = self.submit_bio
            for op, sector, nr_sectors in zip(ops, sectors, lens, strict=True):
                submit_bio(queue, op, sector, nr_sectors, clock(), polled)
            return
        # a reference on the queue for each bio of the batch (the plug is empty here:
        # a frozen queue is waited for holding none); merged bios give theirs back
        nr = len(ops)
        if not queue.q_usage.tryget_live(nr):
            self.queue_enter(queue, nr)
        if self.a.read32(queue.map_gen_off) != queue.map_gen:
            self.sync_map(queue)
        # with an elevator every bio takes blk_mq_submit_bio() (stable: the references)
        elv = self.a.read32(queue.elevator_off)
        merged = 0
        submit_one = self.blk_mq_submit_bio
        bounds = plug.bounds
        merge = queue.merge
        hctx_by_op = queue.hctx_by_op
        shallow_writes = queue.async_depth != 0
        qi = queue.index
        pool = self.rq_base[qi]
        setup = self.rqlines.setup
        cpu, home = self.ctx_cpu, self.rq_home
        read = self.a.read
        hotplug = self.hotplug is not None  # INACTIVE is set only in a hotplug run
        tracing = trace.on
        # the hctx of the previous fast bio, and what its tag get needs
        last_hctx: HwCtx | None = None
        sb_get: Callable[[], int] = _no_tag
        first = hidx = state_off = 0
        fast = 0  # bios submitted here (counted at the end)
        on_hctx = 0  # of them, on last_hctx (counted when it changes, and at the end)
        try:
            for op, sector, nr_sectors in zip(ops, sectors, lens, strict=True):
                start_ns = clock()
                end = sector + nr_sectors
                if (
                    (merge and (sector in bounds or end in bounds))
                    or queue.ctx_queued
                    or plug.nr_ios > 1
                    or plug.cached
                    or (shallow_writes and op == _WRITE)
                    or elv
                ):
                    merged += submit_one(queue, op, sector, nr_sectors, start_ns, polled)
                    continue
                fast += 1
                hctx = hctx_by_op[op]
                if hctx is not last_hctx:
                    if last_hctx is not None:
                        last_hctx.nr_alloc += on_hctx
                        on_hctx = 0
                    tags = hctx.tags
                    assert tags is not None  # a ctx maps only to hctxs with tags
                    sb_get = tags.bitmap_sb.get
                    first = tags.rq_base + tags.nr_reserved_tags
                    hidx = hctx.index
                    state_off = hctx.state_off
                    last_hctx = hctx
                on_hctx += 1
                # the fast path of blk_mq_get_tag(), as _get_request() has it
                tag = sb_get()
                if tag >= 0:
                    rq_id = first + tag
                else:
                    rq_id = hctx.rq_base + self._get_tag_slow(queue, hctx, 0, False, False)
                if hotplug and read(state_off) & _INACTIVE:
                    # blk_mq_get_tag()'s re-check: the tag back, the long way (the task
                    # moves), then on with where it runs now
                    hctx.tags.put_tag(rq_id - hctx.rq_base, self.cpu)  # type: ignore[union-attr]
                    fast -= 1
                    merged += submit_one(queue, op, sector, nr_sectors, start_ns, polled)
                    cpu, home, hctx_by_op, last_hctx = (
                        self.ctx_cpu,
                        self.rq_home,
                        queue.hctx_by_op,
                        None,
                    )
                    continue
                base = pool[rq_id]
                # _own() (the request must be free; mark it allocated) and the setup block
                st = setup(base, start_ns, sector, nr_sectors, (nr_sectors + 7) >> 3, cpu,
                           hidx, qi, op, home)  # fmt: skip
                if st is not None:
                    self.violation(f"request {rq_id} handed out while owned ({st:#x})")
                if tracing:
                    trace.emit(_EV_TAG_GET, rq_id - hctx.rq_base,
                               self.a.read(base) >> RQ_GEN_SHIFT, hidx, qi)  # fmt: skip
                # blk_add_rq_to_plug(): flush first at 32 requests or after a big request.
                rqs = plug.rqs
                if rqs and (
                    len(rqs) >= BLK_MAX_REQUEST_COUNT or plug.last_sectors >= _PLUG_FLUSH_SECTORS
                ):
                    self.flush_plug(plug)
                    rqs = plug.rqs
                rqs.append((queue, hctx, rq_id))
                plug.last_sectors = nr_sectors
                bounds[end] = bounds[sector] = None
        finally:
            self.nr_bios += fast
            if last_hctx is not None:
                last_hctx.nr_alloc += on_hctx
            if merged:
                self.queue_exit(queue, merged)

    # -- merging ---------------------------------------------------------------------------------

    def attempt_plug_merge(
        self,
        plug: Plug,
        queue: Queue,
        op: int,
        sector: int,
        nr_sectors: int,
        start_ns: int,
        polled: bool,
    ) -> bool:
        """blk_attempt_plug_merge() as Linux 5.10 has it: the plug list newest first
        (6.x tries only one request); each request of this queue and hctx is offered
        the bio (:meth:`bio_attempt_merge`); one a limit refused takes no more merges,
        and the walk goes on.  With nomerges=1 only the newest plugged request is
        tried.  Called when the plug's bounds hold the bio's start or end."""
        hctx = queue.hctx_poll if polled else queue.hctx_by_op[op]
        rqs = plug.rqs
        for rq_queue, rq_hctx, rq_id in rqs[-1:] if queue.one_hit else reversed(rqs):
            if rq_queue is not queue or rq_hctx is not hctx:
                continue
            rq_sectors = self.bio_attempt_merge(queue, rq_id, op, sector, nr_sectors, start_ns)
            if rq_sectors:
                bounds = plug.bounds
                bounds[sector] = bounds[sector + nr_sectors] = None
                if rqs[-1][0] is queue and rqs[-1][2] == rq_id:
                    plug.last_sectors = rq_sectors
                return True
        return False

    def sched_bio_merge(
        self, queue: Queue, op: int, sector: int, nr_sectors: int, start_ns: int, polled: bool
    ) -> bool:
        """blk_mq_sched_bio_merge() without an elevator (5.10's
        __blk_mq_sched_bio_merge() -> blk_bio_list_merge()), for a queue with
        BLK_MQ_F_SHOULD_MERGE and merges allowed: if the ctx list of the bio's hctx
        holds requests (its ctx_map bit, the lockless look), then under the list's
        lock the newest BLK_MQ_CTX_MERGE_CHECKS requests waiting there (1 with
        nomerges=1), newest first; the first one the bio may merge into and is
        adjacent to decides (:meth:`bio_attempt_merge`).  Called while
        ``queue.ctx_queued`` says this CPU may have requests on its ctx lists;
        finding them all empty clears it.

        The list holds only this CPU's requests, not issued yet; one still on it
        while the lock is held cannot be taken off by a dispatcher (which takes
        requests under the same lock), so it is safe to grow, and the dispatcher's
        lock acquire orders the new size before the driver reads it."""
        lst, off, bit = queue.rq_merge_poll if polled else queue.rq_merge_by_op[op]
        a = self.a
        if not a.test_bit(off, bit):
            if not any(a.test_bit(o, b) for _lst, o, b in queue.rq_merge_lists):
                queue.ctx_queued = False
            return False

        pool = self.rq_base[queue.index]

        def try_merge(rq_id: int) -> bool | None:
            if a.read32(pool[rq_id] + RQ_OFF_FLAGS) & _RQF_MIGRATED:
                return None  # another process's bios: not this CPU's to grow
            merged = self.bio_attempt_merge(queue, rq_id, op, sector, nr_sectors, start_ns)
            return None if merged is None else bool(merged)

        if lst.scan_newest(1 if queue.one_hit else BLK_MQ_CTX_MERGE_CHECKS, try_merge):
            self.stats["ctx_merges"] += 1  # ctx->rq_merged
            return True
        return False

    def bio_attempt_merge(
        self, queue: Queue, rq_id: int, op: int, sector: int, nr_sectors: int, start_ns: int
    ) -> int | None:
        """Offer a bio to request ``rq_id`` of ``queue``, one of this CPU's not issued
        yet (plugged, or on its ctx list under the list's lock): blk_rq_merge_ok()
        (same op, not REQ_NOMERGE), blk_try_merge() (a back merge if the request ends
        where the bio starts, a front merge if it starts where the bio ends: its start
        moves back to the bio's), then bio_attempt_back_merge() /
        bio_attempt_front_merge(), whose ll_back_merge_fn() / ll_front_merge_fn()
        refuse to grow the request past max_sectors or max_segments and mark it
        (req_set_nomerge()).

        Returns None if the bio may not merge into it or is not adjacent, 0 if a
        limit refused, else the request's new size in sectors.  A merged bio joins
        the request's chain with its own start, and counts in the merges of its
        direction (blk_account_io_merge_bio())."""
        base = self.rq_base[queue.index][rq_id]
        buf = self.buf
        if buf[base + RQ_OFF_OP] != op:
            return None
        rq_sector, rq_sectors, bios, segs = RQ_EXTENT.unpack_from(buf, base + RQ_OFF_SECTOR)
        if rq_sector + rq_sectors == sector:
            front_merge = False
        elif rq_sector == sector + nr_sectors:
            front_merge = True
        else:
            return None
        a = self.a
        if a.read32(base + RQ_OFF_FLAGS) & _NOMERGE:
            return None
        rq_sectors += nr_sectors
        segs += (nr_sectors + 7) >> 3  # bio_segments()
        if rq_sectors > queue.max_sectors or segs > queue.max_segments:
            a.fetch_or32(base + RQ_OFF_FLAGS, _NOMERGE)
            return 0
        if front_merge:
            RQ_EXTENT.pack_into(buf, base + RQ_OFF_SECTOR, sector, rq_sectors, bios + 1, segs)
        else:
            RQ_SIZE.pack_into(buf, base + RQ_OFF_NR_SECTORS, rq_sectors, bios + 1, segs)
        chain = self.merged_bios.setdefault((queue.index, rq_id, a.read(base) >> RQ_GEN_SHIFT), [])
        chain.append((start_ns, nr_sectors))
        self.merges_by_op[op] += 1
        return rq_sectors

    def poll(self, hctx: HwCtx) -> int:
        """blk_mq_poll() / bio_poll(): ask the driver to reap ``hctx`` (a POLL hctx)
        once; how many completions it found.  Polled requests complete right here,
        on the reaping CPU (blk_mq_complete_request_remote() declines them)."""
        fn = hctx.queue.ops.poll
        if fn is None:
            return 0
        self.stats["polls"] += 1
        found = fn(self, hctx)
        if found:
            self.stats["polled"] += found
        return found

    def io_schedule(self) -> None:
        """io_schedule(): the task is about to sleep, so its plug is flushed first
        (from_schedule: queued to the ctxs, hw queues run by kblockd)."""
        plug = self.plug
        if plug is not None:
            if plug.rqs:
                self.flush_plug(plug, from_schedule=True)
            if plug.cached:
                self._free_plug_rqs(plug)
        self.sys.schedule()

    def flush_plug(self, plug: Plug, from_schedule: bool = False) -> None:
        """blk_mq_flush_plug_list(): issue the plugged requests hctx by hctx; what a
        busy driver refuses goes to ``hctx->dispatch``, the rest to the ctxs."""
        has_elevator = plug.has_elevator
        rqs = plug.clear()
        self.stats["plug_flushes"] += 1
        if from_schedule or has_elevator:  # blk_mq_dispatch_plug_list(plug, from_schedule)
            elv: dict[int, list[int]] = {}  # queue -> its requests for the elevator
            for queue, _hctx, rq_id in rqs:
                if (
                    has_elevator
                    and self.a.read32(self.rq_base[queue.index][rq_id] + RQ_OFF_FLAGS) & _RQF_ELV
                ):
                    elv.setdefault(queue.index, []).append(rq_id)
                else:
                    self.insert_request(queue, rq_id)
            for qi, rq_ids in elv.items():
                blk_mq_sched.elv_insert_requests(self, self.queues[qi], rq_ids)
            for hctx in dict.fromkeys(h for _q, h, _r in rqs):
                self.run_hw_queue(hctx, from_schedule)
            return
        # blk_mq_try_issue_list_directly(): each issue checks QUIESCED inside an RCU
        # read-side section (hctx_lock()); one section covers the whole list
        reader = rcu.reader
        reader.lock()
        try:
            self._issue_plug_list(rqs)
        finally:
            reader.unlock()

    def _issue_plug_list(self, rqs: list[PlugRq]) -> None:
        """The plug's requests, in order, straight to their drivers (direct issue)."""
        i = 0
        n = len(rqs)
        queued = 0
        prev: HwCtx | None = None
        a = self.a
        read = a.read
        tracing = trace.on
        # what the run of requests of one hctx shares, looked up when the hctx changes
        ops = queue_rq = pool = None
        direct = False
        state_off = flags_off = busy_off = 0
        while i < n:
            queue, hctx, rq_id = rqs[i]
            i += 1
            if hctx is not prev:
                if prev is not None and queued and prev.queue.ops.commit_rqs is not None:
                    prev.queue.ops.commit_rqs(self, prev)
                queued = 0
                prev = hctx
                ops = queue.ops
                queue_rq = ops.queue_rq
                direct = ops.get_budget is None
                pool = self.rqs[queue.index]
                state_off, flags_off = hctx.state_off, queue.flags_off
                busy_off = hctx.dispatch_busy_off
            last = i == n or rqs[i][1] is not hctx
            if direct and not read(state_off) & _STOPPED and not read(flags_off) & _QUIESCED:
                # blk_mq_request_issue_directly() without a budget to take, inlined.
                if tracing:
                    trace.emit(_EV_DISPATCH, rq_id - hctx.rq_base, 0, hctx.index, queue.index)
                ret = queue_rq(self, hctx, pool[rq_id], last)  # type: ignore[misc,index]
                self.nr_issued += 1
                if ret == 0:
                    queued += 1
                    if a.read32(busy_off):
                        hctx.update_dispatch_busy(False)
                    continue
                ret = self._issue_failed(queue, hctx, rq_id, ret)
            else:
                ret = self.request_issue_directly(queue, hctx, rq_id, last)
            if ret == 0:
                queued += 1
            elif ret in _BUSY:
                hctx.dispatch.add([rq_id])  # blk_mq_request_bypass_insert()
                if queued and queue.ops.commit_rqs is not None:
                    queue.ops.commit_rqs(self, hctx)
                rest = rqs[i:]
                for q2, _h2, r2 in rest:  # blk_mq_dispatch_plug_list() for the rest
                    self.insert_request(q2, r2)
                self.run_hw_queue(hctx, False)
                for _q2, h2, _r2 in rest:
                    if h2 is not hctx:
                        self.run_hw_queue(h2, True)
                return
            else:
                self.end_request_by_id(queue, rq_id, ret)

    def request_issue_directly(self, queue: Queue, hctx: HwCtx, rq_id: int, last: bool) -> int:
        """blk_mq_request_issue_directly(): budget, then ->queue_rq, the QUIESCED
        check and the issue in one RCU read-side section (hctx_lock())."""
        reader = rcu.reader
        reader.lock()
        try:
            a = self.a
            if a.read(hctx.state_off) & _STOPPED or a.read(queue.flags_off) & _QUIESCED:
                return BlkStatus.RESOURCE
            ops = queue.ops
            if ops.get_budget is not None and not ops.get_budget(self, queue):
                return BlkStatus.RESOURCE
            return self._issue_directly(queue, hctx, rq_id, last)
        finally:
            reader.unlock()

    def _issue_directly(self, queue: Queue, hctx: HwCtx, rq_id: int, last: bool) -> int:
        """__blk_mq_issue_directly()."""
        if trace.on:
            trace.emit(_EV_DISPATCH, rq_id - hctx.rq_base, 0, hctx.index, queue.index)
        ret = queue.ops.queue_rq(self, hctx, self.rqs[queue.index][rq_id], last)
        self.nr_issued += 1
        if ret == 0:
            if self.a.read32(hctx.dispatch_busy_off):
                hctx.update_dispatch_busy(False)
            return 0
        return self._issue_failed(queue, hctx, rq_id, ret)

    def _issue_failed(self, queue: Queue, hctx: HwCtx, rq_id: int, ret: int) -> int:
        """The rest of __blk_mq_issue_directly() when ->queue_rq did not take it."""
        rq = self.rqs[queue.index][rq_id]
        if ret in _BUSY:
            self.stats["busy"] += 1
            hctx.stats["busy"] += 1
            hctx.update_dispatch_busy(True)
            self._requeue_unstarted(rq)
            if queue.ops.put_budget is not None:
                queue.ops.put_budget(self, queue)
        else:
            hctx.update_dispatch_busy(False)
        return ret

    def try_issue_directly(self, queue: Queue, hctx: HwCtx, rq_id: int) -> None:
        """blk_mq_try_issue_directly(): in an RCU read-side section (hctx_lock())."""
        reader = rcu.reader
        reader.lock()
        try:
            self._try_issue_directly(queue, hctx, rq_id)
        finally:
            reader.unlock()

    def _try_issue_directly(self, queue: Queue, hctx: HwCtx, rq_id: int) -> None:
        a = self.a
        if a.read(hctx.state_off) & _STOPPED or a.read(queue.flags_off) & _QUIESCED:
            self.insert_request(queue, rq_id)
            return
        ops = queue.ops
        if ops.get_budget is not None and not ops.get_budget(self, queue):
            self.insert_request(queue, rq_id)
            self.run_hw_queue(hctx, False)
            return
        ret = self._issue_directly(queue, hctx, rq_id, True)
        if ret == 0:
            return
        if ret in _BUSY:
            hctx.dispatch.add([rq_id])
            self.run_hw_queue(hctx, False)
        else:
            self.end_request_by_id(queue, rq_id, ret)

    def insert_request(self, queue: Queue, rq_id: int, at_head: bool = False) -> None:
        """blk_mq_insert_request(): a request allocated with an elevator goes to the
        elevator (dd_insert_request()); without one, onto the submitting CPU's ctx
        list for the request's hctx, marking the ctx pending."""
        if self.a.read32(queue.map_gen_off) != queue.map_gen:
            self.sync_map(queue)  # the request holds a reference: the map is stable
        base = self.rqs[queue.index][rq_id].base
        if self.a.read32(base + RQ_OFF_FLAGS) & _RQF_ELV:
            blk_mq_sched.elv_insert(self, queue, rq_id, base, at_head)
            return
        half = base >> 1
        buf16 = self.buf16
        hctx = queue.hctxs[buf16[half + RQ_U16_HCTX]]
        cpu = buf16[half + RQ_U16_CPU]
        lst, index_hw = queue.ctx_lists[(cpu, hctx.type)]
        if cpu == self.cpu:
            queue.ctx_queued = queue.should_merge
        lst.add([rq_id], at_head, lambda: hctx.mark_pending(index_hw))
        hctx.stats["queued"] += 1

    # -- running hardware queues -----------------------------------------------------------------

    def run_hw_queue(self, hctx: HwCtx, run_async: bool) -> None:
        """blk_mq_run_hw_queue(): dispatch now on this CPU if it is in the hctx's
        cpumask and the run may be synchronous; otherwise on kblockd."""
        if hctx.queue.quiesced() or not hctx.has_pending():
            return
        if (
            run_async
            or not hctx.in_cpumask(self.ctx_cpu)
            or hctx.queue.tset.flags & BlkMqFlag.BLOCKING
        ):
            self.delay_run_hw_queue(hctx, 0)
            return
        blk_mq_sched.dispatch_requests(self, hctx)

    def delay_run_hw_queue(self, hctx: HwCtx, delay_ns: int) -> None:
        """blk_mq_delay_run_hw_queue(): kblockd on the hctx's next CPU."""
        self.sys.kblockd_run(self._next_cpu(hctx), hctx.queue.index, hctx.index, delay_ns)

    def _next_cpu(self, hctx: HwCtx) -> int:
        """blk_mq_hctx_next_cpu(): stay on a CPU of the mask for a batch of runs.  A
        queue with a single hardware queue returns WORK_CPU_UNBOUND, which kblockd
        (a bound workqueue) runs on the CPU that queued the work: this CPU."""
        if hctx.queue.nr_hw_queues == 1:
            return self.ctx_cpu
        mask = hctx.cpumask
        hp = self.hotplug
        if hp is not None and hp.nr_offline():
            return self._next_online_cpu(hctx, hp)
        if len(mask) == 1:
            return mask[0]
        if not mask:  # an hctx blk_mq_update_nr_hw_queues() left without CPUs
            return self.cpu
        hctx.next_cpu_batch -= 1
        if hctx.next_cpu_batch <= 0:
            hctx.next_cpu_idx = (hctx.next_cpu_idx + 1) % len(mask)
            hctx.next_cpu_batch = BLK_MQ_CPU_WORK_BATCH
        return mask[hctx.next_cpu_idx]

    def _next_online_cpu(self, hctx: HwCtx, hp: CpuhpState) -> int:
        """blk_mq_hctx_next_cpu() while CPUs are offline: the next online CPU of the
        mask; none online (an INACTIVE hctx), WORK_CPU_UNBOUND: where the caller's
        task runs, if online, else the boot CPU."""
        mask = hctx.cpumask
        n = len(mask)
        for i in range(n):
            idx = (hctx.next_cpu_idx + i) % n
            if hp.online(mask[idx]):
                hctx.next_cpu_idx = idx
                return mask[idx]
        return self.ctx_cpu if hp.online(self.ctx_cpu) else BOOT_CPU

    def run_work(self, q: int, h: int) -> None:
        """blk_mq_run_work_fn(): kblockd ran this hctx's work on this CPU."""
        self.stats["kblockd_runs"] += 1
        blk_mq_sched.dispatch_requests(self, self.queues[q].hctxs[h])

    def run_hw_queues(self, queue: Queue, run_async: bool) -> None:
        for hctx in queue.hctxs:
            if hctx.cpumask:
                self.run_hw_queue(hctx, run_async)

    def stop_hw_queues(self, queue: Queue) -> None:
        """blk_mq_stop_hw_queues()."""
        for hctx in queue.hctxs:
            self.a.set_bit(hctx.state_off, HctxState.STOPPED)

    def start_stopped_hw_queues(self, queue: Queue, run_async: bool) -> None:
        """blk_mq_start_stopped_hw_queues()."""
        for hctx in queue.hctxs:
            if self.a.test_and_clear_bit(hctx.state_off, HctxState.STOPPED):
                self.run_hw_queue(hctx, run_async)

    def get_driver_tag(self, hctx: HwCtx, rq: Request) -> bool:
        """blk_mq_get_driver_tag() for a scheduler request about to be dispatched: a
        tag of ``hctx->tags`` without sleeping (reserved if its sched tag is, else
        held to the queue's fair share of a shared set, which counts the queue
        active first), ``rq->tag``, its active count on a shared set
        (RQF_MQ_INFLIGHT) and ``tags->rqs[tag] = rq``.  False if none is free."""
        tags = hctx.tags
        assert tags is not None  # a request is only ever on an hctx with tags
        a = self.a
        base = rq.base
        shared = hctx.queue.shared
        if shared:
            tags.tag_busy(hctx.active_off, hctx.active_bit)
        if rq.internal_tag < tags.nr_reserved_tags:  # blk_mq_tag_is_reserved(sched_tags)
            assert tags.breserved_tags is not None  # the set reserves tags for both maps
            tag = tags.breserved_tags.sb.get()
        else:
            if shared and not hctx.may_queue():
                return False
            tag = tags.bitmap_sb.get()
            if tag >= 0:
                tag += tags.nr_reserved_tags
        if tag < 0:
            return False
        a.set32(base + RQ_OFF_TAG, tag)
        if shared and not a.fetch_or32(base + RQ_OFF_FLAGS, _RQF_MQ_INFLIGHT) & _RQF_MQ_INFLIGHT:
            nr = a.fetch_add32(hctx.nr_active_off, 1) + 1
            if tags.last_share and nr > a.read32(hctx.max_active_off):
                a.set32(hctx.max_active_off, nr)
        tags.set_rq(tag, rq.id)
        return True

    def _no_driver_tag(self, hctx: HwCtx) -> None:
        """blk_mq_mark_tag_wait() without a wait-queue callback: mark SCHED_RESTART
        (a driver tag this hctx frees reruns it) and rerun it after
        BLK_MQ_RESOURCE_DELAY (a tag freed by another hctx or queue of a shared set
        restarts nothing here)."""
        self.stats["driver_tag_waits"] += 1
        hctx.stats["no_driver_tag"] += 1
        self.a.set_bit(hctx.state_off, HctxState.SCHED_RESTART)
        self.delay_run_hw_queue(hctx, BLK_MQ_RESOURCE_DELAY_NS)

    def dispatch_rq_list(self, hctx: HwCtx, rq_list: list[int]) -> bool:
        """blk_mq_dispatch_rq_list(): ->queue_rq each request in order, a scheduler
        request taking its driver tag first (:meth:`get_driver_tag`); on BUSY put
        the rest on ``hctx->dispatch`` and arrange a rerun: now if SCHED_RESTART is not
        set, after 3 ms on BLK_STS_RESOURCE, or on the next completion; with no
        driver tag, :meth:`_no_driver_tag`.  True if the whole list was issued."""
        queue = hctx.queue
        ops = queue.ops
        rqs = self.rqs[queue.index]
        queued = 0
        ret: int = BlkStatus.OK
        needs_resource = False
        no_budget = False
        i = 0
        n = len(rq_list)
        no_tag = False
        while i < n:
            rq_id = rq_list[i]
            if ops.get_budget is not None and not ops.get_budget(self, queue):
                no_budget = True
                break
            if rqs[rq_id].tag < 0 and not self.get_driver_tag(hctx, rqs[rq_id]):
                # blk_mq_prep_dispatch_rq(): no driver tag; the budget goes back
                if ops.put_budget is not None:
                    ops.put_budget(self, queue)
                no_tag = True
                break
            i += 1
            if trace.on:
                trace.emit(_EV_DISPATCH, rq_id - hctx.rq_base, 0, hctx.index,
                           hctx.queue.index)  # fmt: skip
            ret = ops.queue_rq(self, hctx, rqs[rq_id], i == n)
            self.nr_issued += 1
            if ret == BlkStatus.OK:
                queued += 1
                continue
            if ret in _BUSY:
                needs_resource = ret == BlkStatus.RESOURCE
                self.stats["busy"] += 1
                hctx.stats["busy"] += 1
                self._requeue_unstarted(rqs[rq_id])
                if ops.put_budget is not None:
                    ops.put_budget(self, queue)
                i -= 1  # blk_mq_handle_dev_resource(): back at the head
                break
            self.end_request_by_id(queue, rq_id, ret)
        hctx.stats["dispatched"] += queued
        hctx.dispatched_order[min(6, queued.bit_length())] += 1  # queued_to_index()
        if i < n and queued and ops.commit_rqs is not None:
            ops.commit_rqs(self, hctx)
        if i < n:
            hctx.dispatch.add(rq_list[i:])
            if no_tag:
                self._no_driver_tag(hctx)
                hctx.update_dispatch_busy(True)
                return False
            needs_restart = self.a.test_bit(hctx.state_off, HctxState.SCHED_RESTART)
            if no_budget:
                needs_resource = True
            if not needs_restart:
                self.run_hw_queue(hctx, True)
            elif needs_resource:
                self.delay_run_hw_queue(hctx, BLK_MQ_RESOURCE_DELAY_NS)
            hctx.update_dispatch_busy(True)
            return False
        if hctx.a.read32(hctx.dispatch_busy_off):
            hctx.update_dispatch_busy(False)
        return True
