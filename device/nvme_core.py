"""The host's admin queue and controller state (``drivers/nvme/host/core.c`` and the
admin half of ``pci.c``): ``ctrl->admin_q`` on the admin tag set, driven through blk-mq
by whichever process issues admin commands.

Where admin commands run
    * the probe, in the runtime (the owner) before the CPUs fork: Identify, Set
      Features, Create I/O CQ/SQ;
    * a CPU worker's timeout handler: an Abort (NOWAIT, not waited for), or a reset run
      inline (Delete I/O SQ/CQ, Identify again, Create again).

Each such process has its own :class:`AdminQueue`: a handle on the one admin tag set
(its tags and request pool are in the arena, like the I/O set's) through a ``BlkMq`` of
its own whose CPU services are :class:`AdminSys`.  An admin request completes in the
process that reaps its CQE: the admin queue has ``rq_affinity`` 0 and one hw queue, so
blk-mq raises a softirq, which :class:`AdminSys` runs there and then; nothing of the
admin queue travels to another CPU (no IPI, no kblockd run, no bio handed back).  The
admin CQ is reaped by the CPU its vector is affine to (CPU 0), by a timeout polling it,
and by any process waiting for its own admin commands.

How an admin request ends is its PDU's ``end_io`` byte:

* ``END_ABORT`` (``abort_endio``): whoever completes it gives the Abort back to
  ``abort_limit`` and frees the request;
* ``END_WAIT`` (``blk_execute_rq``): completion leaves it COMPLETE; the process that
  issued it reads its status and result and frees it (``blk_mq_free_request``).

Deviations from Linux
    * Nothing sleeps for an admin tag: every allocation is NOWAIT.  The kernel's
      synchronous commands may sleep; here their issuer is the owner (which has no
      waiter slot) or a CPU inside its timeout handler (whose one waiter slot may
      already be asleep for an I/O tag), so a synchronous command that finds no free
      tag reaps the admin CQ and tries again.
    * A waiting issuer runs the admin queue's timeout work itself when its commands
      are overdue (its CPU's timers cannot run while it waits).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_structs import (
    RQ_GEN_SHIFT,
    RQ_STATE_MASK,
    CpuSys,
    HwCtxSpec,
    Request,
    RequestQueue,
    TagSet,
)
from mqrt.block.blk_mq_types import BlkMqOps, BlkStatus, EhRet, RqState
from mqrt.device.nvme_defs import (
    CID_TAG_MASK,
    CTRL_STATE_FROM,
    NVME_SC_MASK,
    SQE,
    CtrlState,
    Status,
    nvme_cid,
)
from mqrt.lib._atomic import AtomicView
from mqrt.lib.shm import Arena
from mqrt.lib.wait import Waiters, WaitersSpec

if TYPE_CHECKING:
    from mqrt.device.nvme import NvmeOps, NvmeQueue

#: NVMe status -> blk_status_t (nvme_error_status()).
_BLK_STATUS: dict[int, BlkStatus] = {
    Status.SUCCESS: BlkStatus.OK,
    Status.LBA_RANGE: BlkStatus.TARGET,
    Status.INVALID_NS: BlkStatus.TARGET,
    Status.INVALID_OPCODE: BlkStatus.NOTSUPP,
    Status.READ_ERROR: BlkStatus.MEDIUM,
    Status.WRITE_FAULT: BlkStatus.MEDIUM,
    Status.ABORT_REQ: BlkStatus.IOERR,
    Status.HOST_ABORTED_CMD: BlkStatus.IOERR,
}


def nvme_error_status(status: int) -> int:
    """nvme_error_status(): the NVMe status (SCT << 8 | SC, flags above) -> blk_status_t."""
    return int(_BLK_STATUS.get(status & NVME_SC_MASK, BlkStatus.IOERR))


def change_ctrl_state(a: AtomicView, off: int, new: CtrlState) -> bool:
    """nvme_change_ctrl_state(): move the controller's state word at ``off`` to ``new``
    if its current state may lead there (:data:`CTRL_STATE_FROM`), by cmpxchg; False,
    and nothing changed, if it may not."""
    allowed = CTRL_STATE_FROM[new]
    while True:
        old = a.read32(off)
        if old not in allowed:
            return False
        if a.cmpxchg32(off, old, int(new)) == old:
            return True


#: An admin request's PDU (struct nvme_iod of an admin command): the I/O PDU's genctr,
#: aborted and retries bytes, how the request ends, the iod's queue (``iod->nvmeq``:
#: its qid, u16, at the I/O PDU's offset; nvme_pci_init_request() sets it, 0 here),
#: the CQE's result (nvme_req(req)->result) and the command itself
#: (nvme_req(req)->cmd).
PDU_GENCTR, PDU_ABORTED, PDU_RETRIES, PDU_END_IO = 0, 1, 2, 3
PDU_QID = 4
IOD_QID = struct.Struct("<H")
PDU_RESULT = 8
PDU_CMD = 12
NVME_ADMIN_CMD_SIZE = PDU_CMD + SQE.size
#: end_io: abort_endio (the completer frees it), or waited for by its issuer.
END_ABORT, END_WAIT = 1, 2
_RESULT = struct.Struct("<I")
_COMPLETE = int(RqState.COMPLETE)

#: An admin command as :meth:`AdminQueue.alloc` takes it: opcode, nsid, cdw10, cdw11, prp1.
AdminCmd = tuple[int, ...]


class AdminSys:
    """The CPU services (:class:`~mqrt.block.blk_mq_structs.CpuSys`) of one process's
    admin-queue ``BlkMq``: everything runs here and now.  ``cpu`` is the process's CPU
    (0 for the owner); ``sys`` the CPU's own services (None in the owner)."""

    def __init__(self, cpu: int, sys: CpuSys | None):
        self.cpu = cpu
        self.sys = sys
        self.mq: BlkMq | None = None

    def raise_softirq(self, fn: Callable[[int, int], None], a: int, b: int) -> None:
        fn(a, b)  # the completion runs where its CQE was reaped

    def add_timer(self, expires_ns: int, fn: Callable[..., None], *args: Any) -> None:
        if self.sys is None:
            raise RuntimeError("nvme: the admin queue has no timers outside a CPU")
        self.sys.add_timer(expires_ns, fn, *args)

    def ipi_complete(self, cpu: int, q: int, rq_id: int, gen: int) -> None:
        self.mq.ipi_complete(q, rq_id, gen)  # type: ignore[union-attr]  # (rq_affinity 0: unused)

    def kblockd_run(self, cpu: int, q: int, hctx: int, delay_ns: int) -> None:
        self.mq.run_work(q, hctx)  # type: ignore[union-attr]  # (queue_rq never says busy)

    def kick_requeue(self, q: int) -> None:
        self.mq.requeue_work(q)  # type: ignore[union-attr]  # (admin commands are not retried)

    def bio_done(self, cpu: int, q: int, info: tuple) -> None:
        """An admin command carries no bio: its end_io ran in ->complete."""

    def schedule(self) -> None:
        raise RuntimeError("nvme: admin tags are taken NOWAIT: nothing sleeps for one")

    def idle_wait(self) -> None:
        raise RuntimeError("nvme: the admin queue never waits for a CPU")


def _fail(what: str) -> None:
    raise RuntimeError(f"nvme: admin queue: {what}")


class AdminQueue:
    """One process's handle on ``ctrl->admin_q``: allocate, issue, wait for, complete
    and end admin requests.  ``sq`` is the process's handle on the admin SQ (queue 0);
    ``abort_limit`` the offset of the controller's shared Abort budget; ``stats`` the
    driver's counters in this process; ``violation`` where a broken invariant of an
    admin request is reported (the CPU's block layer; None: raise)."""

    def __init__(
        self,
        arena: Arena,
        q: RequestQueue,
        waiters: WaitersSpec,
        cpu: int,
        sys: CpuSys | None,
        sq: NvmeQueue,
        abort_limit: int,
        stats: dict[str, int],
        violation: Callable[[str], None] | None = None,
    ):
        self.sys = AdminSys(cpu, sys)
        # Nobody sleeps on the admin tags, so their waiter table has one unused slot
        # and no eventfd (a wake-up of it would fail loudly).
        self.mq = BlkMq(arena, Waiters(arena, waiters, [-1], None), cpu, [q], self.sys)
        self.sys.mq = self.mq
        # A broken invariant of an admin request is the CPU's, reported with its own
        # (in the owner, where nothing reports it, it fails the probe).
        self.mq.violation = violation or _fail  # type: ignore[method-assign, assignment]
        self.queue = self.mq.queues[0]
        self.hctx = self.queue.hctxs[0]
        self.rqs = self.mq.rqs[0]
        self.a = arena.atomic
        self.sq = sq
        self.abort_limit = abort_limit
        self.stats = stats
        self.clock = time.monotonic_ns
        #: END_WAIT requests issued here and not freed yet: (request, generation)
        self.waited: list[tuple[Request, int]] = []

    # -- issue -------------------------------------------------------------------------------

    def alloc(self, cmd: AdminCmd, end_io: int = END_WAIT) -> Request | None:
        """nvme_alloc_request(admin_q, cmd, BLK_MQ_REQ_NOWAIT): a request holding the
        command (opcode, nsid, cdw10, cdw11, prp1), or None if no admin tag is free."""
        rq_id = self.mq.alloc_request(self.queue, 0, 0, 0, self.clock(), nowait=True)
        if rq_id < 0:
            return None
        rq = self.rqs[rq_id]
        pdu = rq.pdu
        opcode, nsid, cdw10, cdw11, prp1 = (*cmd, 0, 0, 0, 0)[:5]
        pdu[PDU_END_IO] = end_io  # type: ignore[index]
        SQE.pack_into(pdu, PDU_CMD, opcode, 0, 0, nsid, 0, 0, prp1, 0, cdw10, cdw11, 0, 0, 0, 0)  # type: ignore[arg-type]
        return rq

    def queue_rq(self, rq: Request, last: bool) -> int:
        """nvme_queue_rq() of an admin command: a disabled admin queue fails it
        (BLK_STS_IOERR); otherwise it gets its command id (genctr << 12 | tag), starts
        (its ADMIN_TIMEOUT armed) and is copied to the admin SQ."""
        sq = self.sq
        if not sq.lock_enabled():
            return BlkStatus.IOERR
        try:
            pdu = rq.pdu
            genctr = (pdu[PDU_GENCTR] + 1) & 0xF  # type: ignore[index]
            pdu[PDU_GENCTR] = genctr  # type: ignore[index]
            cmd = SQE.unpack_from(pdu, PDU_CMD)  # type: ignore[arg-type]
            self.mq.start_request(rq)
            sq.copy_cmd((cmd[0], cmd[1], nvme_cid(genctr, rq.tag), *cmd[3:]), last)
        finally:
            sq.unlock()
        return BlkStatus.OK

    def execute_nowait(self, rq: Request) -> int:
        """blk_execute_rq_nowait(): issue through ->queue_rq.  A refusal (the admin
        queue is disabled) ends the request at once through its end_io, as blk-mq
        does; the blk_status_t."""
        ret = self.mq.request_issue_directly(self.queue, self.hctx, rq.id, True)
        if ret:
            self.end_io(rq, ret)
        return ret

    # -- completion --------------------------------------------------------------------------

    def handle_cqe(self, cid: int, status: int, result: int) -> None:
        """nvme_handle_cqe() for the admin CQ: command id -> request (with the genctr
        check), its result kept, completed through blk-mq with its status."""
        tag = cid & CID_TAG_MASK
        if tag >= len(self.rqs) or cid >> 12 != self.rqs[tag].pdu[PDU_GENCTR]:  # type: ignore[index]
            self.stats["genctr_mismatch"] += 1
            return
        rq = self.rqs[tag]
        _RESULT.pack_into(rq.pdu, PDU_RESULT, result)  # type: ignore[arg-type]
        self.mq.complete_request(rq, rq.gen, status=status)

    def end_io(self, rq: Request, error: int) -> None:
        """rq->end_io: abort_endio() gives the Abort back to the limit and frees the
        request; a waited command is left for its issuer (or, never issued, freed)."""
        end_io = rq.pdu[PDU_END_IO]  # type: ignore[index]
        if end_io == END_ABORT:
            self.stats["abort_completions"] += 1
            self.a.fetch_add32(self.abort_limit, 1)
            self.mq.end_request(rq, error)
        elif rq.state != RqState.COMPLETE:  # refused before it started
            self.mq.end_request(rq, error)

    def cancel_all(self, status: int) -> int:
        """blk_mq_tagset_busy_iter(admin_tagset, nvme_cancel_request): complete every
        started admin request with ``status``; how many."""
        n = 0
        for rq in self.rqs:
            if rq.state == RqState.IN_FLIGHT and self.mq.complete_request(
                rq, rq.gen, status=status
            ):
                n += 1
        return n

    # -- waiting (blk_execute_rq) ---------------------------------------------------------------

    def execute_wait(
        self,
        cmds: list[AdminCmd],
        reap: Callable[[], object],
        idle: Callable[[], None],
        timeout_ns: int,
    ) -> list[tuple[int, int]] | None:
        """blk_execute_rq() of each command, as many at once as admin tags allow,
        reaping the admin CQ (``reap``, then ``idle`` between looks) until every one
        completed: [(NVMe status, result)] in order.  None if they did not all
        complete within ``timeout_ns`` of the last issue (ADMIN_TIMEOUT), after this
        process ran the admin queue's timeout work once; the unfinished ones stay in
        :attr:`waited` until a cancel completes them (:meth:`free_waited`)."""
        results: list[tuple[int, int]] = [(0, 0)] * len(cmds)
        issued: dict[int, tuple[Request, int]] = {}
        nxt = 0
        deadline = self.clock() + timeout_ns
        timed_out = False
        while True:
            while nxt < len(cmds):  # issue what the free tags allow
                rq = self.alloc(cmds[nxt])
                if rq is None:
                    break
                gen = rq.gen
                if self.execute_nowait(rq):
                    results[nxt] = (Status.HOST_ABORTED_CMD, 0)  # refused: the queue is off
                else:
                    issued[nxt] = (rq, gen)
                    self.waited.append((rq, gen))
                    deadline = self.clock() + timeout_ns
                nxt += 1
            reap()
            for i, (rq, gen) in list(issued.items()):
                got = self._take(rq, gen)
                if got is not None:
                    results[i] = got
                    del issued[i]
            if nxt == len(cmds) and not issued:
                return results
            if self.clock() >= deadline and (issued or nxt < len(cmds)):
                if timed_out:
                    return None
                timed_out = True
                self.mq.timeout_work(0)  # blk_mq_timeout_work() of admin_q, here
                continue
            idle()

    def _take(self, rq: Request, gen: int) -> tuple[int, int] | None:
        """A waited request that completed: its status and result, and the request
        freed; None while it is still in flight."""
        st = self.a.load_acquire(rq.base)
        if st >> RQ_GEN_SHIFT != gen or st & RQ_STATE_MASK != _COMPLETE:
            return None
        status = rq.status
        result = _RESULT.unpack_from(rq.pdu, PDU_RESULT)[0]  # type: ignore[arg-type]
        self.waited.remove((rq, gen))
        self.mq.end_request(rq, nvme_error_status(status))  # blk_mq_free_request()
        return status, result

    def free_waited(self) -> None:
        """Free the waited requests this process gave up on, now that a cancel (or a
        late CQE) completed them."""
        for rq, gen in list(self.waited):
            if self._take(rq, gen) is None and rq.gen != gen:
                self.waited.remove((rq, gen))  # freed elsewhere: nothing left to do


class NvmeAdminOps(BlkMqOps):
    """nvme_mq_admin_ops: the admin tag set's blk_mq_ops, on the driver ``dev``
    (struct nvme_dev, the set's ``driver_data``) and its :class:`AdminQueue` in the
    calling process."""

    name = "nvme-admin"

    def __init__(self, dev: NvmeOps):
        self.dev = dev

    # -- set-up (in the owner) -------------------------------------------------------------

    def init_hctx(self, hctx: HwCtxSpec, driver_data: Any, hctx_idx: int) -> int:
        """nvme_admin_init_hctx(): the admin tag set's one hctx drives the admin
        queue, ``dev->queues[0]``."""
        dev: NvmeOps = driver_data
        assert hctx_idx == 0, "WARN_ON(hctx_idx != 0): the admin tag set has one hctx"
        hctx.driver_data = dev.nvmeqs[0]
        return 0

    def init_request(self, tset: TagSet, rq: Request, hctx_idx: int, numa_node: int) -> int:
        """nvme_pci_init_request(), the I/O set's too: not ``dev->tagset``, so the
        iod's queue is the admin queue (0)."""
        return self.dev.init_request(tset, rq, hctx_idx, numa_node)

    def queue_rq(self, mq: BlkMq, hctx: Any, rq: Request, last: bool) -> int:
        return self.dev.admin.queue_rq(rq, last)  # type: ignore[union-attr]

    def complete(self, mq: BlkMq, rq: Request) -> None:
        """nvme_pci_complete_rq() of an admin command: never retried (the kernel's
        passthrough requests are REQ_FAILFAST_DRIVER), straight to its end_io."""
        self.dev.admin.end_io(rq, nvme_error_status(rq.status))  # type: ignore[union-attr]

    def timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """nvme_timeout(): the iod's queue is the admin queue (qid 0)."""
        return self.dev.nvme_timeout(mq, rq, gen)
