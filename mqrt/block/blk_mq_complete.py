"""The completion side of ``block/blk-mq.c``: what a driver calls once it owns a
request -- start it, complete it (rq_affinity: here, in a softirq, or by IPI on the
submitting CPU), requeue it, end it alone or in a batch -- and the timeout work.

:class:`BlkMqCompletion` is the half of a CPU's :class:`~mqrt.block.blk_mq.BlkMq` that
runs these; the other half (allocation, plugging, issue, hw queue runs) is in
:mod:`mqrt.block.blk_mq`, which sets up the per-CPU state both use.  Every way a
request ends goes through one step, :meth:`BlkMqCompletion.end_request`; every completion
through one IN_FLIGHT -> COMPLETE step, :meth:`BlkMqCompletion._mark_complete`.  (The
raw mode's command slots are no block-layer requests: :mod:`mqrt.block.blk_mq_modes`
completes and ends them its own lean way.)
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic_ns as _monotonic_ns
from typing import TYPE_CHECKING

from mqrt.block import elevator
from mqrt.block._rq import RqLines
from mqrt.block.blk_mq_cpumap import Topology
from mqrt.block.blk_mq_structs import (
    _IN_FLIGHT,
    _RQF_ELV,
    _RQF_MIGRATED,
    _RQF_MQ_INFLIGHT,
    _RQF_POLLED,
    _RQF_REQUEUED,
    _SCHED_RESTART,
    RQ_END,
    RQ_GEN_SHIFT,
    RQ_NO_TAG,
    RQ_OFF_DEADLINE,
    RQ_OFF_FLAGS,
    RQ_OFF_IO_START,
    RQ_OFF_ISSUE,
    RQ_OFF_STATUS,
    RQ_OFF_TAG,
    RQ_STATE_MASK,
    RQ_U16_CPU,
    RQ_U16_HCTX,
    RQ_U16_Q,
    BlkMqError,
    CpuSys,
    HwCtx,
    Queue,
    Request,
)
from mqrt.block.blk_mq_tag import Tags, queue_tag_busy_iter
from mqrt.block.blk_mq_types import (
    RQF_HOME_SHIFT,
    SECTOR_SHIFT,
    EhRet,
    HctxState,
    Rqf,
    RqState,
)
from mqrt.lib import inject, trace
from mqrt.lib._atomic import AtomicView
from mqrt.lib.trace import Ev

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq
    from mqrt.lib.cpuhp import CpuhpState

#: Tags freed by a completion batch, per hctx (blk_mq_end_request_batch()'s tags[]
#: for its cur_hctx): id(hctx) -> (hctx, tags to free).
TagBatch = dict[int, tuple[HwCtx, list[int]]]

_COMPLETE = int(RqState.COMPLETE)
_TIMED_OUT = int(Rqf.TIMED_OUT)
_EV_END, _EV_COMPLETE = int(Ev.END), int(Ev.COMPLETE)
_EV_REQUEUE, _EV_TIMEOUT = int(Ev.REQUEUE), int(Ev.TIMEOUT)


class BlkMqCompletion:
    """A CPU's completion side: start, complete, requeue, end, time out."""

    # Per-CPU state, set up by BlkMq.__init__.
    mq: BlkMq  #: this CPU's whole block layer (self), as the driver's ops take it
    a: AtomicView
    buf: memoryview
    buf16: memoryview  #: the arena as 16-bit words (a request's cpu, hctx, q)
    rqlines: RqLines  #: a request's hot steps in C (mqrt.block._rq)
    cpu: int
    hotplug: CpuhpState | None
    sys: CpuSys
    clock: Callable[[], int]
    queues: list[Queue]
    rqs: list[list[Request]]
    end_io: list[Callable[[tuple, int], None]] | None
    end_io_merged: list[Callable[[tuple, tuple, int], None]] | None
    topology: Topology | None
    stats: dict[str, int]
    nr_completed: int
    merged_bios: dict[tuple[int, int, int], list[tuple[int, int]]]
    _idle_at: dict[int, int]

    if TYPE_CHECKING:  # the submission side's, in BlkMq

        def violation(self, what: str) -> None: ...
        def run_hw_queue(self, hctx: HwCtx, run_async: bool) -> None: ...
        def run_hw_queues(self, queue: Queue, run_async: bool) -> None: ...
        def insert_request(self, queue: Queue, rq_id: int, at_head: bool = False) -> None: ...

    # -- the driver's side -------------------------------------------------------------------------

    def start_request(self, rq: Request) -> None:
        """blk_mq_start_request(): arm the timeout, then IN_FLIGHT (release: the
        timeout work that sees IN_FLIGHT sees the deadline)."""
        clock = self.clock
        if clock is _monotonic_ns:  # the clock, the times, IN_FLIGHT: one C call
            st = self.rqlines.start(rq.base, rq.timeout_ns)
        else:  # a clock of its own (tests step one)
            st = self.rqlines.start(rq.base, rq.timeout_ns, clock())
        if st is not None:  # it was not ALLOCATED and IDLE
            self.violation(f"start of request {rq.id} in state {st:#x}")

    def put_driver_tag(self, rq: Request, hctx: HwCtx | None = None) -> None:
        """blk_mq_put_driver_tag(): a scheduler request gives its driver tag back
        (``tags->rqs[tag]`` first, then ``rq->tag = -1``, its active count if it had
        one, the tag); nothing for one holding none, or for a request of the driver
        pool (the tag is its identity: it keeps it until it is freed)."""
        if rq.internal_tag < 0:
            return
        a = self.a
        base = rq.base
        tag = a.read32(base + RQ_OFF_TAG)
        if tag < 0:
            return
        if hctx is None:
            half = base >> 1
            hctx = self.queues[self.buf16[half + RQ_U16_Q]].hctxs[self.buf16[half + RQ_U16_HCTX]]
        tags = hctx.tags
        assert tags is not None  # the tag came from them
        tags.clear_rq(tag)
        a.set32(base + RQ_OFF_TAG, RQ_NO_TAG)
        if a.fetch_and32(base + RQ_OFF_FLAGS, ~_RQF_MQ_INFLIGHT) & _RQF_MQ_INFLIGHT:
            self._dec_active(hctx)
        tags.put_tag(tag, self.buf16[(base >> 1) + RQ_U16_CPU])

    def _requeue_unstarted(self, rq: Request) -> None:
        """__blk_mq_requeue_request(): a started request (refused by the driver, or
        completed and sent back by its ->complete) goes back to IDLE; a scheduler
        request gives its driver tag back (:meth:`put_driver_tag`: it takes one
        again at its next dispatch), a request of the driver pool keeps its tag.

        The first time a request comes back (RQF_REQUEUED not yet set), its first
        issue is kept in ``issue_time_ns`` before a later start overwrites
        ``io_start_time_ns``: that start, or now if the driver refused it before
        starting it (its submission was this issue).  The bio's end hands the job
        that time, so the stall until the retry is completion latency."""
        a = self.a
        base = rq.base
        st = a.read(base)
        started = st & RQ_STATE_MASK != RqState.IDLE
        if not a.fetch_or32(base + RQ_OFF_FLAGS, _RQF_REQUEUED) & _RQF_REQUEUED:
            a.set(base + RQ_OFF_ISSUE, a.read(base + RQ_OFF_IO_START) if started else self.clock())
        if started:
            a.store_release(base, st & ~RQ_STATE_MASK)
            a.fetch_and32(base + RQ_OFF_FLAGS, ~_TIMED_OUT)
        self.put_driver_tag(rq)

    def requeue_request(self, rq: Request, kick: bool) -> None:
        """blk_mq_requeue_request(): back to IDLE and onto the queue's requeue list."""
        self._requeue_unstarted(rq)
        half = rq.base >> 1
        queue = self.queues[self.buf16[half + RQ_U16_Q]]
        queue.requeue_list.add([rq.id])
        self.stats["requeued"] += 1
        if trace.on:
            trace.emit(_EV_REQUEUE, rq.tag, rq.gen, self.buf16[half + RQ_U16_HCTX], queue.index)
        if kick:
            self.sys.kick_requeue(queue.index)

    def requeue_work(self, q: int) -> None:
        """blk_mq_requeue_work(): reinsert requeued requests (DONTPREP ones straight to
        the dispatch list, others at the head of their ctx) and run the queues."""
        queue = self.queues[q]
        rqs = self.rqs[q]
        for rq_id in queue.requeue_list.take():
            if rqs[rq_id].rq_flags & Rqf.DONTPREP:
                h = self.buf16[(rqs[rq_id].base >> 1) + RQ_U16_HCTX]
                queue.hctxs[h].dispatch.add([rq_id])
            else:
                self.insert_request(queue, rq_id, at_head=True)
        self.run_hw_queues(queue, False)

    def _mark_complete(self, rq: Request, gen: int) -> int:
        """IN_FLIGHT -> COMPLETE, once: the request's state word before the change,
        or -1 when the completion is stale (another generation, already completed or
        timed out) -- counted and dropped.  ``gen`` < 0 accepts any generation."""
        a = self.a
        base = rq.base
        st = a.read(base)
        if (
            (gen >= 0 and st >> RQ_GEN_SHIFT != gen)
            or st & RQ_STATE_MASK != _IN_FLIGHT
            or a.cmpxchg(base, st, (st & ~RQ_STATE_MASK) | _COMPLETE) != st
        ):
            self.stats["stale_completions"] += 1
            return -1
        return st

    def complete_request(self, rq: Request, gen: int = -1, status: int | None = None) -> bool:
        """blk_mq_complete_request(): IN_FLIGHT -> COMPLETE (once: a stale or second
        completion is counted and dropped), then ->complete here, in a softirq, or on
        the submitting CPU by IPI, as rq_affinity says.  ``gen`` pins the request's
        generation for completions that travelled (timers, IPIs, timeouts);
        ``status``, if given, is the driver's error, written once the completion won."""
        st = self._mark_complete(rq, gen)
        if st < 0:
            return False
        base = rq.base
        buf16 = self.buf16
        half = base >> 1
        if status is not None:
            self.a.set32(base + RQ_OFF_STATUS, int(status))
        if trace.on:
            trace.emit(_EV_COMPLETE, rq.tag, st >> RQ_GEN_SHIFT, buf16[half + RQ_U16_HCTX],
                       buf16[half + RQ_U16_Q])  # fmt: skip
        if inject.armed:
            inject.hit("rq.complete.before_end")
        queue = self.queues[buf16[half + RQ_U16_Q]]
        if self.buf[base + RQ_OFF_FLAGS] & _RQF_POLLED:  # reaped by polling: complete here
            queue.ops.complete(self.mq, rq)
            return True
        submit_cpu = buf16[half + RQ_U16_CPU]
        cpu = self.cpu
        if (
            queue.same_comp
            and submit_cpu != cpu
            and (queue.same_force or not self.topology.share_cache(cpu, submit_cpu))  # type: ignore[union-attr]
            and (self.hotplug is None or self.hotplug.online(submit_cpu))  # no IPI to it offline
        ):
            self.stats["ipis_sent"] += 1
            if trace.on:
                trace.emit(Ev.IPI, rq.tag, st >> RQ_GEN_SHIFT, buf16[half + RQ_U16_HCTX],
                           queue.index, submit_cpu)  # fmt: skip
            self.sys.ipi_complete(submit_cpu, queue.index, rq.id, (st >> RQ_GEN_SHIFT) & 0xFFFFFFFF)
            return True
        if queue.nr_hw_queues == 1:
            self.stats["softirqs"] += 1
            self.sys.raise_softirq(self._complete_softirq, rq.id, queue.index)
            return True
        queue.ops.complete(self.mq, rq)
        return True

    def _complete_softirq(self, rq_id: int, q: int) -> None:
        """blk_done_softirq() / the IPI's handler: ->complete on this CPU."""
        queue = self.queues[q]
        queue.ops.complete(self.mq, self.rqs[q][rq_id])

    def ipi_complete(self, q: int, rq_id: int, gen: int) -> None:
        """The IPI arrived: the request must still be the one that was completed."""
        rq = self.rqs[q][rq_id]
        if rq.gen & 0xFFFFFFFF != gen or rq.state != RqState.COMPLETE:
            self.stats["stale_completions"] += 1
            return
        self.queues[q].ops.complete(self.mq, rq)

    def _sched_restart(self, hctx: HwCtx) -> None:
        """blk_mq_sched_restart(): a run was deferred until a request of this hctx
        ended; run it now."""
        a = self.a
        if a.read(hctx.state_off) & _SCHED_RESTART:
            a.clear_bit(hctx.state_off, HctxState.SCHED_RESTART)
            self.stats["restarts"] += 1
            hctx.stats["restart"] += 1
            self.run_hw_queue(hctx, True)

    def _issue_of(self, base: int, rq_flags: int, now: int) -> int:
        """The issue handed to the submitter of a request that was not simply
        started once: for one that went back to the block layer, its first issue
        (``issue_time_ns``); for one never started (failed as the driver got it), its
        end."""
        if rq_flags & _RQF_REQUEUED:
            return self.a.read(base + RQ_OFF_ISSUE)
        return now or self.clock()

    def end_request(
        self, rq: Request, status: int | None = None, batch: TagBatch | None = None, now: int = 0
    ) -> HwCtx | None:
        """blk_mq_end_request(): free the request (exactly once: a CAS to the next
        generation's IDLE), account, hand its bios back to their submitter, drop its
        active count and put its tag.  ``status`` None: the request's own status (the
        driver's cmd->error).  A request the driver failed before starting it may be
        ended too.

        Every way a request ends is this one step.  Alone, a SCHED_RESTART its hctx
        waits for runs at once; within :meth:`end_request_batch` (``batch``), the tag
        joins the batch to be freed in bulk and the caller checks the restart after.
        ``now``, if given, is the completion time handed to the submitter (a batch
        reads the clock once).  Returns the hctx, or None if the request was not ours
        to end (a stale or second end, counted).

        The submitter gets the bio's start and its issue (fio's slat ends there, its
        clat runs from there): the request's start, or for one that went back to the
        block layer its first issue (``issue_time_ns``), or for one never started
        (failed as the driver got it) its end."""
        # The free (a CAS to the next generation's IDLE, from an allocated state) and
        # what the end hands on, in one call (mqrt.block._rq).
        clock = self.clock
        if clock is _monotonic_ns:
            ended = self.rqlines.end(rq.base, now, status)
        else:  # a clock of its own (tests step one)
            ended = self.rqlines.end(rq.base, now or clock(), status)
        if ended.__class__ is not tuple:
            if ended is None:  # another end, or the next user, won
                self.stats["stale_completions"] += 1
            else:
                self.violation(f"end of request {rq.id} in state {ended:#x}")
            return None
        done, st, cpu, h, q, rq_flags, now = ended  # now: the one given, or the clock
        if rq_flags & _RQF_MIGRATED:  # its bios are with the task's own CPU
            cpu = rq_flags >> RQF_HOME_SHIFT
            self.stats["migrated_ends"] += 1
        if done is None:  # handed back to the block layer, or never started
            info: tuple = self._end_info(rq.base, rq_flags, status, now)
        else:
            info = done
        nr_bios = info[1]
        self.nr_completed += 1
        if trace.on:
            trace.emit(_EV_END, rq.tag, st >> RQ_GEN_SHIFT, h, q, info[5])
        if nr_bios > 1:  # merged bios: their submitter holds the chain
            info = (*info, rq.id, st >> RQ_GEN_SHIFT)
            if cpu == self.cpu:
                self.bios_done(q, info, now)
            else:
                self.sys.bio_done(cpu, q, info)
        elif cpu == self.cpu and self.end_io is not None:
            self.end_io[q](info, now)  # bio_endio() on the submitting CPU
        else:
            self.sys.bio_done(cpu, q, info)
        queue = self.queues[q]
        hctx = queue.hctxs[h]
        if rq_flags & _RQF_ELV:  # blk_mq_sched_requeue/finish: dd_finish_request()
            queue.dd.finish(rq.id)  # type: ignore[union-attr]
        # blk_queue_exit(): the request's reference on the queue
        if queue.q_usage.put():
            queue.freeze_wq.wake_up_all()
        # blk_mq_put_tag(): the tag goes back as the submitting CPU's hint after its
        # active count is dropped, or joins the batch, which drops the counts of its
        # tags in one go (reserved tags are never batched).
        tags: Tags = hctx.tags  # type: ignore[assignment]  # the request came from them
        if rq_flags & _RQF_ELV:  # the driver tag first, then the sched tag
            self.put_driver_tag(rq, hctx)
            hctx.sched_tags.put_tag(rq.internal_tag, cpu)  # type: ignore[union-attr]
            if batch is None and self.a.read(hctx.state_off) & _SCHED_RESTART:
                self._sched_restart(hctx)
        elif batch is None:
            if rq_flags & _RQF_MQ_INFLIGHT:
                self._dec_active(hctx)
            tags.put_tag(rq.tag, cpu)
            if self.a.read(hctx.state_off) & _SCHED_RESTART:
                self._sched_restart(hctx)
        elif rq.tag >= tags.nr_reserved_tags:
            batch.setdefault(id(hctx), (hctx, []))[1].append(rq.tag)
        else:
            if rq_flags & _RQF_MQ_INFLIGHT:
                self._dec_active(hctx)
            tags.put_tag(rq.tag, cpu)
        return hctx

    def _end_info(self, base: int, rq_flags: int, status: int | None, now: int) -> tuple:
        """The bio's (op, nr_bios, bytes, start, issue, status) of a request just freed
        that was not simply started once (see :meth:`_issue_of`)."""
        _io, start, nr_sectors, nr_bios, _cpu, _h, _q, op, _f, rq_status = RQ_END.unpack_from(
            self.buf, base + RQ_OFF_IO_START
        )
        issue = self._issue_of(base, rq_flags, now)
        if status is None:
            status = rq_status
        return (op, nr_bios, nr_sectors << SECTOR_SHIFT, start, issue, status)

    def bios_done(self, q: int, info: tuple, now: int) -> None:
        """req_bio_endio() for every bio of a merged request, on the CPU that
        submitted them: ``info`` is (op, nr_bios, bytes, start, issue, status,
        rq id, generation); the bios merged after the first, each with its own start
        and size ((start_ns, nr_sectors), ... oldest first), go with the request's
        (op, nr_bios, bytes, start, issue, status) to ``end_io_merged``, so the
        job times each bio from its own submission (without it: ``sys.bio_done``
        with the chain as a seventh field)."""
        op, nr_bios, nbytes, start, issue, status, rq_id, gen = info
        chain = tuple(self.merged_bios.pop((q, rq_id, gen), ()))
        done = (op, nr_bios, nbytes, start, issue, status)
        if self.end_io_merged is not None:
            self.end_io_merged[q](done, chain, now)
        else:
            self.sys.bio_done(self.cpu, q, (*done, chain))

    def add_to_batch(self, rq: Request, gen: int, batch: list[Request]) -> bool:
        """blk_mq_add_to_batch(): a request that completed without error joins the
        caller's completion batch (IN_FLIGHT -> COMPLETE, once, like
        complete_request()); False if another completion or a timeout owns it."""
        if self._mark_complete(rq, gen) < 0:
            return False
        self.a.set32(rq.base + RQ_OFF_STATUS, 0)
        batch.append(rq)
        return True

    def end_request_batch(self, batch: list[Request]) -> None:
        """blk_mq_end_request_batch(): end every request of a completion batch on this
        CPU (rq_affinity does not apply), then give each hctx's tags back in one
        sbitmap_queue_clear_batch() -- one wake-up accounting for all of them."""
        a = self.a
        freed: TagBatch = {}
        restart = []
        now = self.clock()
        for rq in batch:
            hctx = self.end_request(rq, None, freed, now)
            if hctx is not None and a.read(hctx.state_off) & _SCHED_RESTART:
                restart.append(hctx)
        for hctx, tag_list in freed.values():
            self._flush_tag_batch(hctx, tag_list)
        self.stats["batched_completions"] += len(batch)
        for hctx in dict.fromkeys(restart):
            self._sched_restart(hctx)

    def _flush_tag_batch(self, hctx: HwCtx, tag_list: list[int]) -> None:
        """blk_mq_flush_tag_batch() (Linux 5.16+): every request of a shared queue
        holds an active count (RQF_MQ_INFLIGHT), dropped here for the whole batch,
        then the tags go back at once."""
        if hctx.queue.shared:
            self._sub_active(hctx, len(tag_list))
        assert hctx.tags is not None  # its requests came from them
        hctx.tags.put_tags(tag_list)

    def _dec_active(self, hctx: HwCtx) -> None:
        """__blk_mq_dec_active_requests()."""
        self._sub_active(hctx, 1)

    def _sub_active(self, hctx: HwCtx, nr: int) -> None:
        """__blk_mq_sub_active_requests(); below zero is a broken invariant."""
        if self.a.fetch_sub32(hctx.nr_active_off, nr) - nr & 0x80000000:
            self.violation(f"nr_active of {hctx.queue.q.name} hctx{hctx.index} below zero")

    def queue_exit(self, queue: Queue, nr: int) -> None:
        """blk_queue_exit() of ``nr`` references: the last one of a frozen queue
        wakes its freezer (blk_queue_usage_counter_release())."""
        if queue.q_usage.put(nr):
            queue.freeze_wq.wake_up_all()

    def end_request_by_id(self, queue: Queue, rq_id: int, status: int) -> None:
        self.end_request(self.rqs[queue.index][rq_id], status)

    # -- timeouts ---------------------------------------------------------------------------------

    def timeout_work(self, q: int) -> int:
        """blk_mq_timeout_work(): blk_mq_queue_tag_busy_iter(q, blk_mq_check_expired)
        -- :meth:`check_expired` for every request of the queue that holds a tag --
        then idle the hctxs of a shared map when nothing is in flight.  Returns the
        number of requests that timed out."""
        queue = self.queues[q]
        scan = TimeoutScan(queue, self.clock())
        rqs = self.rqs[q]
        buf16 = self.buf16

        def mine(rq: Request) -> bool:  # bt_iter(): rq->q == q
            return buf16[(rq.base >> 1) + RQ_U16_Q] == q

        def expired(rq: Request, st: int) -> bool:
            return self.check_expired(scan, rq, st)

        queue_tag_busy_iter((h.tags for h in queue.hctxs), rqs, expired, mine)
        # The kernel's queue timer is armed at each request's deadline, and the work
        # idles the queue's hctxs when it finds nothing pending: a queue goes idle
        # about one timeout after it was last busy.  This CPU is the queue's only
        # scanner, so it keeps that moment itself.
        now = scan.now
        idle_at = self._idle_at.get(q)
        if scan.busy or idle_at is None:
            self._idle_at[q] = now + queue.timeout_ns
        elif queue.shared and now >= idle_at:
            for hctx in queue.hctxs:
                if hctx.tags is not None:  # blk_mq_hw_queue_mapped()
                    hctx.tags.tag_idle(hctx.active_off, hctx.active_bit)
        return scan.expired

    def check_expired(self, scan: TimeoutScan, rq: Request, st: int) -> bool:
        """blk_mq_check_expired() for a request the iterator found owned at state
        word ``st`` (the instance it holds), and blk_mq_rq_timed_out() if that
        instance is in flight past its deadline: RQF_TIMED_OUT, then ->timeout.

        The request is not locked against completion (only its reuse is, by the
        kernel's reference): the timeout claims nothing, a completion racing it
        still wins, and ->timeout decides what to do with a request it may find
        completed.  The flag is set before the state word is read again: if the
        request was ended and reused meanwhile (another generation), the flag is
        taken back off the new one (only this CPU scans this queue).  True: go on."""
        scan.busy += 1
        if st & RQ_STATE_MASK != RqState.IN_FLIGHT:
            return True
        a = self.a
        base = rq.base
        if a.read(base + RQ_OFF_DEADLINE) > scan.now or a.read32(base + RQ_OFF_FLAGS) & _TIMED_OUT:
            return True
        a.fetch_or32(base + RQ_OFF_FLAGS, _TIMED_OUT)
        if a.read(base) != st:
            a.fetch_and32(base + RQ_OFF_FLAGS, ~_TIMED_OUT)
            return True
        queue = scan.queue
        scan.expired += 1
        self.stats["timeouts"] += 1
        verdict = queue.ops.timeout(self.mq, rq, st >> RQ_GEN_SHIFT)
        if trace.on:
            h = self.buf16[(base >> 1) + RQ_U16_HCTX]
            trace.emit(_EV_TIMEOUT, rq.tag, st >> RQ_GEN_SHIFT, h, queue.index, int(verdict))
        if verdict == EhRet.RESET_TIMER:
            self.stats["timer_resets"] += 1
            a.fetch_and32(base + RQ_OFF_FLAGS, ~_TIMED_OUT)
            a.set(base + RQ_OFF_DEADLINE, self.clock() + queue.timeout_ns)
        return True

    # -- sysfs -------------------------------------------------------------------------------------

    def update_nr_requests(self, q: int, nr: int) -> None:
        """blk_mq_update_nr_requests(): a write to queue/nr_requests resizes each
        tags' bitmap (sbitmap_queue_resize, which recomputes wake_batch): the
        scheduler tags with an elevator (which is told: dd_depth_updated()), else
        the driver tags.  The kernel
        freezes the queue around it; here the I/O keeps going (see Deviations)."""
        queue = self.queues[q]
        if queue.dd is not None and queue.elevator():  # the scheduler tags, then dd
            elevator.resize_sched_tags(queue, nr)
            elevator.depth_updated(queue, nr)
            return
        done: set[str] = set()  # each bitmap once (5.10 shared sbitmap: the set's)
        for hctx in queue.hctxs:
            tags = hctx.tags
            if tags is None or tags.spec.bitmap_tags.sb.name in done:
                continue
            done.add(tags.spec.bitmap_tags.sb.name)
            if nr <= tags.nr_reserved_tags or nr > tags.nr_tags:
                raise BlkMqError(
                    f"nr_requests: must be in {tags.nr_reserved_tags + 1}..{tags.nr_tags}, got {nr}"
                )
            tags.bitmap_tags.resize(nr - tags.nr_reserved_tags)


class TimeoutScan:
    """One run of the timeout work over a queue: its clock and what it found."""

    __slots__ = ("busy", "expired", "now", "queue")

    def __init__(self, queue: Queue, now: int):
        self.queue = queue
        self.now = now
        self.busy = 0  #: requests of the queue holding a tag
        self.expired = 0  #: requests timed out
