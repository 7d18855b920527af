"""The three ways ``mqrt bench --mode`` feeds a driver, to draw the blk-mq paper's
picture (Bjørling et al., SYSTOR 2013) on any host:

``mq``
    :class:`mqrt.block.blk_mq.BlkMq` as built: per-CPU ctxs, hw queues, sbitmap tags.
``sq``
    :class:`SqBlkMq`, the single request queue of the block layer before blk-mq: one
    hw queue and one ``queue_lock`` that every submission, dispatch, completion and
    timeout scan holds (``blk_queue_bio``, ``__blk_run_queue`` -> ``request_fn``,
    ``blk_end_request``, ``blk_rq_timed_out_timer`` all ran under
    ``q->queue_lock``).  The lock is dropped around a sleep for a free request, as
    ``get_request`` did.
``raw``
    :class:`RawBlkMq`, the driver fed directly: each CPU takes command slots from a
    private free list of its own hw queue's tags (no sbitmap, no plug, no ctx, no
    dispatch lists, no fair share), calls ``->queue_rq`` and completes on the spot.
    The driver code is the same, so ``raw`` minus ``mq`` is the block layer's cost.

The submission, completion and state-word rules are those of ``BlkMq`` (a request
still goes IDLE -> IN_FLIGHT -> COMPLETE -> IDLE with its generation), so the
invariant checks and the timeout work apply to every mode.
"""

from __future__ import annotations

from collections import deque

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_structs import (
    _BUSY,
    _IN_FLIGHT,
    _RQF_REQUEUED,
    RQ_ALLOCATED,
    RQ_END,
    RQ_GEN_SHIFT,
    RQ_OFF_IO_START,
    RQ_OFF_SETUP,
    RQ_OFF_STATUS,
    RQ_SETUP,
    RQ_STATE_MASK,
    RQ_U16_Q,
    HwCtx,
    Queue,
)
from mqrt.block.blk_mq_types import SECTOR_SHIFT, RqState
from mqrt.lib.lockstat import LockClass
from mqrt.lib.wait import spin_lock, spin_unlock

_COMPLETE = int(RqState.COMPLETE)


class SqBlkMq(BlkMq):
    """The legacy single-queue block layer: BlkMq on one hw queue, every path under
    the queue's ``queue_lock`` (a bit spinlock in the queue's shared header).  The
    lock nests within a CPU (a driver completing inside ``->queue_rq`` ends the
    request with the lock held, as ``__blk_end_request`` did)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: dict[int, int] = {}  #: queue index -> nesting depth on this CPU
        self.stats["queue_lock_contended"] = 0

    def _lock(self, queue: Queue) -> None:
        depth = self._held.get(queue.index, 0)
        if not depth:
            a, off = self.a, queue.lock_off
            if a.read(off) & 1:
                self.stats["queue_lock_contended"] += 1
            spin_lock(a, off, LockClass.QUEUE_LOCK)
        self._held[queue.index] = depth + 1

    def _unlock(self, queue: Queue) -> None:
        depth = self._held[queue.index] - 1
        self._held[queue.index] = depth
        if not depth:
            spin_unlock(self.a, queue.lock_off)

    def blk_mq_submit_bio(self, queue, op, sector, nr_sectors, start_ns, polled=False):
        self._lock(queue)
        try:
            return super().blk_mq_submit_bio(queue, op, sector, nr_sectors, start_ns, polled)
        finally:
            self._unlock(queue)

    def flush_plug(self, plug, from_schedule=False):
        queues = list(dict.fromkeys(queue for queue, _h, _r in plug.rqs))
        for queue in queues:
            self._lock(queue)
        try:
            super().flush_plug(plug, from_schedule)
        finally:
            for queue in reversed(queues):
                self._unlock(queue)

    def io_schedule(self) -> None:
        """get_request(): drop the queue lock while sleeping for a request."""
        held = {q: d for q, d in self._held.items() if d}
        for q in held:
            self._held[q] = 0
            spin_unlock(self.a, self.queues[q].lock_off)
        try:
            super().io_schedule()
        finally:
            for q, depth in held.items():
                spin_lock(self.a, self.queues[q].lock_off, LockClass.QUEUE_LOCK)
                self._held[q] = depth

    def run_hw_queue(self, hctx: HwCtx, run_async: bool) -> None:
        queue = hctx.queue
        self._lock(queue)
        try:
            super().run_hw_queue(hctx, run_async)
        finally:
            self._unlock(queue)

    def end_request(self, rq, status=None, batch=None, now=0):
        queue = self.queues[self.buf16[(rq.base >> 1) + RQ_U16_Q]]
        self._lock(queue)
        try:
            return super().end_request(rq, status, batch, now)
        finally:
            self._unlock(queue)

    def end_request_batch(self, batch):
        buf16 = self.buf16
        queues = list(dict.fromkeys(self.queues[buf16[(rq.base >> 1) + RQ_U16_Q]] for rq in batch))
        for queue in queues:
            self._lock(queue)
        try:
            super().end_request_batch(batch)
        finally:
            for queue in reversed(queues):
                self._unlock(queue)

    def timeout_work(self, q: int) -> int:
        queue = self.queues[q]
        self._lock(queue)
        try:
            return super().timeout_work(q)
        finally:
            self._unlock(queue)


class RawBlkMq(BlkMq):
    """No block layer: command slots from a private free list, straight to the
    driver.  Each CPU owns the tags ``i`` of its hw queue with
    ``i % nr_users == its index among the queue's CPUs`` (the runtime gives every CPU
    its own hw queue in this mode, so that is all of them).  With shared tags
    (BLK_MQ_F_TAG_HCTX_SHARED, either model) every hw queue draws on one tag space,
    so the users are every CPU of the queue; in 5.10's model tag ``i`` is then the
    request at the CPU's own hw queue's ``rq_base + i``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cpu = self.cpu
        self._free: list[list[int]] = []
        self._mine: list[frozenset[int]] = []
        for queue in self.queues:
            hctx = queue.hctx_by_op[0]
            if queue.tset.shared_tags:  # one tag space for every hctx
                users = sorted({c for cpus in queue.q.hctx_ctxs for c in cpus})
            else:
                users = queue.q.hctx_ctxs[hctx.index]
            me = users.index(cpu) if cpu in users else 0
            tags = hctx.tags
            assert tags is not None  # this CPU's own hctx: mapped
            first = tags.nr_reserved_tags
            ids = [
                tags.rq_base + t
                for t in range(first, tags.nr_tags)
                if (t - first) % max(1, len(users)) == me
            ]
            ids.reverse()
            self._free.append(ids)
            self._mine.append(frozenset(ids))
        self._busy: deque[tuple[Queue, HwCtx, int]] = deque()  #: refused: issue again
        self._batch: set[HwCtx] | None = None

    def start_plug(self, nr_ios: int = 1) -> None:
        self._batch = set()

    def finish_plug(self) -> None:
        batch, self._batch = self._batch, None
        for hctx in batch or ():
            commit = hctx.queue.ops.commit_rqs
            if commit is not None:
                commit(self, hctx)

    def submit_bio(self, queue, op, sector, nr_sectors, start_ns, polled=False):
        self.nr_bios += 1
        while self._busy:
            if not self._issue(*self._busy.popleft()):
                break
        free = self._free[queue.index]
        while not free:  # only when iodepth exceeds this CPU's slots
            self._reclaim(queue.index)
            if not free:
                self.sys.idle_wait()
        rq_id = free.pop()
        hctx = queue.hctx_by_op[0]
        a, base = self.a, self.rq_base[queue.index][rq_id]
        st = a.read(base)
        a.set(base, st | RQ_ALLOCATED)  # private: nobody else takes this slot
        RQ_SETUP.pack_into(
            self.buf, base + RQ_OFF_SETUP, start_ns, sector, nr_sectors, 1, (nr_sectors + 7) >> 3,
            self.cpu, hctx.index,
            queue.index, op, 0, 0,
        )  # fmt: skip
        if self._batch is not None:
            self._batch.add(hctx)
        self._issue(queue, hctx, rq_id)

    def _issue(self, queue: Queue, hctx: HwCtx, rq_id: int) -> bool:
        ret = queue.ops.queue_rq(self, hctx, self.rqs[queue.index][rq_id], self._batch is None)
        self.nr_issued += 1
        if ret == 0:
            return True
        if ret in _BUSY:
            self.stats["busy"] += 1
            self._requeue_unstarted(self.rqs[queue.index][rq_id])  # keeps its first issue
            self._busy.append((queue, hctx, rq_id))
            return False
        self.end_request(self.rqs[queue.index][rq_id], ret)
        return True

    # A raw slot is not a block-layer request: it ends without tags, hctx accounting,
    # restarts or the trace, and goes straight back to its CPU's free list.  (Sharing
    # blk_mq_end_request's step would charge the no-block-layer baseline ~10 % more
    # per I/O for work it does not do.)

    def complete_request(self, rq, gen=-1, status=None):
        """IN_FLIGHT -> COMPLETE once, then ->complete right here."""
        a, base = self.a, rq.base
        st = a.read(base)
        if (gen >= 0 and st >> RQ_GEN_SHIFT != gen) or st & RQ_STATE_MASK != _IN_FLIGHT:
            self.stats["stale_completions"] += 1
            return False
        if a.cmpxchg(base, st, (st & ~RQ_STATE_MASK) | _COMPLETE) != st:
            self.stats["stale_completions"] += 1
            return False
        if status is not None:
            a.set32(base + RQ_OFF_STATUS, int(status))
        self.queues[self.buf16[(base >> 1) + RQ_U16_Q]].ops.complete(self, rq)
        return True

    def end_request_batch(self, batch):
        """No tag bitmap to free in bulk: each slot goes back to its free list."""
        for rq in batch:
            self.end_request(rq)

    def end_request(self, rq, status=None, batch=None, now=0):
        """Free the slot (next generation, IDLE) and hand the bio back."""
        a, base = self.a, rq.base
        st = a.read(base)
        if not st & RQ_ALLOCATED:
            self.violation(f"end of request {rq.id} in state {st:#x}")
            return None
        if a.cmpxchg(base, st, ((st >> RQ_GEN_SHIFT) + 1) << RQ_GEN_SHIFT) != st:
            self.stats["stale_completions"] += 1
            return None
        io_start, start, nr_sectors, nr_bios, cpu, _h, q, op, fl, rq_status = RQ_END.unpack_from(
            self.buf, base + RQ_OFF_IO_START
        )
        if st & RQ_STATE_MASK and not fl & _RQF_REQUEUED:  # as BlkMq.end_request()
            issue = io_start
        else:
            issue = self._issue_of(base, fl, now)
        self.nr_completed += 1
        info: tuple = (
            op, nr_bios, nr_sectors << SECTOR_SHIFT, start, issue,
            rq_status if status is None else status,
        )  # fmt: skip
        if nr_bios > 1:  # merged bios (none here: raw never merges) end as the block layer's
            info = (*info, rq.id, st >> RQ_GEN_SHIFT)
            if cpu == self.cpu:
                self.bios_done(q, info, self.clock())
                self._free[q].append(rq.id)
            else:
                self.sys.bio_done(cpu, q, info)
        elif cpu == self.cpu and self.end_io is not None:
            self.end_io[q](info, self.clock())
            self._free[q].append(rq.id)
        else:  # ended elsewhere (a timeout): its CPU reclaims the slot when it runs out
            self.sys.bio_done(cpu, q, info)
        return None

    def _reclaim(self, q: int) -> None:
        """Take back this CPU's slots that another CPU ended (they are free: IDLE,
        not allocated, and not on the free list)."""
        free = self._free[q]
        listed = set(free)
        a, bases = self.a, self.rq_base[q]
        for rq_id in self._mine[q]:
            if rq_id not in listed and not a.read(bases[rq_id]) & RQ_ALLOCATED:
                free.append(rq_id)
