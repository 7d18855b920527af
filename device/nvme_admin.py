"""The NVMe controller's admin command set: the admin queue's pass and what each
admin command does to the controller's queues and features.

==================  ==========================================================
Identify (06h)      Controller (CNS 01h) and Namespace (CNS 00h) data
Set Features (09h)  Number of Queues, Interrupt Coalescing, Arbitration,
                    Interrupt Vector Configuration (a vector's Coalescing
                    Disable bit)
Create I/O CQ/SQ    05h / 01h: the queue pair's rings, vector (a vector the
                    controller lacks: Invalid Interrupt Vector), priority
                    (QPRIO: urgent, high, medium, low); the pair goes to the
                    device worker of its CQ
Delete I/O SQ       00h: its commands in service, and those still in it,
                    complete with Command Aborted due to SQ Deletion
Delete I/O CQ       04h: refused while an SQ is still on it (Invalid Queue
                    Deletion)
Abort (08h)         complete the command with ABORT_REQ: at once if it is in
                    service, when fetched if it is still in its SQ; beyond
                    ACL + 1 outstanding Aborts: Abort Command Limit Exceeded
any other opcode    Invalid Opcode (Get Log Page and Get Features among them)
==================  ==========================================================

Several vectors may serve one CQ each or be shared by several CQs (Create I/O CQ
names the vector); the pending bit is the vector's.

An Abort is outstanding from its fetch to its completion; this controller completes
one at once, unless the ``drop_abort`` fault holds it (never completed, until the
controller is disabled), so only held Aborts count against the limit.

:class:`AdminCommands` is a part of :class:`~mqrt.device.controller.Controller` (its
base class), which holds the state and runs the loop; the admin queue is served first
in every pass.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mqrt.device.nvme_defs import SQE, AdminOpcode, Feature, IdentifyCns, Status

if TYPE_CHECKING:
    from mqrt.device._nvme_engine import Engine
    from mqrt.device.controller import ControllerPlan, Namespace, QueueRegions
    from mqrt.lib._atomic import AtomicView

#: Identify Controller data (the part mqrt fills): vid, ssvid, sn, mn, fr, mdts (the
#: largest transfer, 2^mdts pages of CAP.MPSMIN: 4 KiB; 0 no limit), nn, mqes (0's
#: based max queue entries), the number of I/O queue pairs it can make, acl (Abort
#: Command Limit, 0's based).
IDENTIFY_CTRL = struct.Struct("<HH20s40s8sBIHHB")
#: Identify Namespace data: nsze, ncap, nuse (blocks), lba data size shift.
IDENTIFY_NS = struct.Struct("<QQQB")


@dataclass
class Sq:
    """The admin submission queue as the coordinator keeps it (CC.EN makes it)."""

    qid: int
    depth: int
    base: int  #: offset of the ring
    tail_db: int  #: offset of the tail doorbell
    head: int = 0


@dataclass
class Cq:
    """The admin completion queue, with the CQEs waiting for room in it."""

    qid: int
    depth: int
    base: int
    head_db: int
    iv: int
    tail: int = 0
    phase: int = 1
    pending: deque = field(default_factory=deque)  #: CQEs waiting for room


class AdminCommands:
    """The admin command set, as a part of the controller (its base class)."""

    # The controller's state these commands read and change (Controller.__init__).
    plan: ControllerPlan
    buf: memoryview
    ns: dict[int, Namespace]
    counters: dict[str, int]
    sqs: dict[int, Sq]  #: the admin SQ
    cqs: dict[int, Cq]  #: the admin CQ
    io_sqs: dict[int, int]  #: I/O SQ qid -> its CQ
    io_cqs: dict[int, int]  #: I/O CQ qid -> its vector
    held_aborts: int  #: Aborts fetched and not completed (the drop_abort fault)
    acl: int
    faults: dict
    rng: random.Random
    coalesce: tuple[int, int]  #: (THR, TIME in ns)
    arbitration: tuple[int, list[int]]  #: (burst, WRR weights high/medium/low)
    engines: list[Engine]
    _qoffs: list

    a: AtomicView

    if TYPE_CHECKING:  # the controller's primitives they use

        def _sq_new(self, sq: Sq) -> int: ...
        def _publish_queue(self, qid: int, **values: int) -> None: ...
        def _post(self, cqid: int, cid: int, status: int, result: int) -> None: ...
        def _push_features(self) -> None: ...
        def engine_of(self, qid: int) -> Engine: ...

    # -- the admin queue -------------------------------------------------------------------------

    def _fetch(self, sq: Sq) -> tuple:
        off = sq.base + sq.head * SQE.size
        sqe = SQE.unpack_from(self.buf, off)
        sq.head = (sq.head + 1) % sq.depth
        return sqe

    def _admin_pass(self) -> int:
        sq = self.sqs.get(0)
        if sq is None:
            return 0
        n = self._sq_new(sq)
        if not n:
            return 0
        aborts = 0
        for _ in range(n):
            sqe = self._fetch(sq)
            self.counters["admin_commands"] += 1
            if sqe[0] == AdminOpcode.ABORT:
                aborts += 1
                drop = self.faults.get("drop_abort_pct") if self.faults else 0
                if drop and self.held_aborts < self.acl + 1 and self.rng.random() * 100 < drop:
                    self.counters["abort_cmds"] += 1
                    self.held_aborts += 1  # taken, never completed: outstanding
                    continue
            status, result = self._admin(sqe)
            if status:
                self.counters["admin_errors"] += 1
            self._post(0, sqe[2], status, result)
        self.counters["abort_burst_max"] = max(self.counters["abort_burst_max"], aborts)
        return n

    def _sq_regions(self, qid: int) -> QueueRegions | None:
        return self.plan.queues[qid] if 0 <= qid < len(self.plan.queues) else None

    # -- admin commands ----------------------------------------------------------------------------

    def _admin(self, sqe: tuple) -> tuple[int, int]:
        opcode = sqe[0]
        cdw10, cdw11 = sqe[8], sqe[9]
        if opcode == AdminOpcode.IDENTIFY:
            return self._identify(cdw10 & 0xFF, sqe[3], sqe[6])
        if opcode == AdminOpcode.SET_FEATURES:
            return self._set_features(cdw10 & 0xFF, cdw11)
        if opcode == AdminOpcode.CREATE_CQ:
            return self._create_cq(cdw10 & 0xFFFF, (cdw10 >> 16) + 1, cdw11)
        if opcode == AdminOpcode.CREATE_SQ:
            return self._create_sq(cdw10 & 0xFFFF, (cdw10 >> 16) + 1, cdw11)
        if opcode == AdminOpcode.DELETE_SQ:
            return self._delete_sq(cdw10 & 0xFFFF)
        if opcode == AdminOpcode.DELETE_CQ:
            return self._delete_cq(cdw10 & 0xFFFF)
        if opcode == AdminOpcode.ABORT:
            self.counters["abort_cmds"] += 1
            return self._abort(cdw10 & 0xFFFF, cdw10 >> 16)
        return Status.INVALID_OPCODE, 0

    def _identify(self, cns: int, nsid: int, prp1: int) -> tuple[int, int]:
        data = self.plan.data
        if not data.offset <= prp1 < data.offset + data.nbytes:
            return Status.INVALID_FIELD, 0
        if cns == IdentifyCns.CONTROLLER:
            max_depth = (
                min(q.max_depth for q in self.plan.queues[1:]) if len(self.plan.queues) > 1 else 2
            )
            IDENTIFY_CTRL.pack_into(
                self.buf, prp1, 0x1B36, 0x1AF4, self.plan.serial.encode(), b"mqrt NVMe",
                b"0.1", self.plan.model["mdts"], len(self.ns), max_depth - 1,
                self.plan.max_io_queues, self.acl,
            )  # fmt: skip
            self.counters["identify_ctrl"] += 1
            return Status.SUCCESS, 0
        if cns == IdentifyCns.NAMESPACE:
            ns = self.ns.get(nsid)
            if ns is None:
                return Status.INVALID_NS, 0
            IDENTIFY_NS.pack_into(self.buf, prp1, ns.nr_blocks, ns.nr_blocks, ns.nr_blocks,
                                  ns.lba_shift)  # fmt: skip
            return Status.SUCCESS, 0
        return Status.INVALID_FIELD, 0

    def _set_features(self, fid: int, cdw11: int) -> tuple[int, int]:
        if fid == Feature.NUM_QUEUES:
            n = min(self.plan.max_io_queues, (cdw11 & 0xFFFF) + 1, (cdw11 >> 16) + 1)
            return Status.SUCCESS, (n - 1) | (n - 1) << 16
        if fid == Feature.IRQ_COALESCE:
            self.coalesce = (cdw11 & 0xFF, ((cdw11 >> 8) & 0xFF) * 100_000)
            self._push_features()
            return Status.SUCCESS, 0
        if fid == Feature.ARBITRATION:
            ab = cdw11 & 0x7
            weights = [((cdw11 >> s) & 0xFF) + 1 for s in (24, 16, 8)]
            self.arbitration = (1 << 30 if ab == 7 else 1 << ab, weights)
            self._push_features()
            return Status.SUCCESS, 0
        if fid == Feature.IRQ_CONFIG:
            # Interrupt Vector Configuration: IV in bits 15:0, Coalescing Disable bit 16;
            # the admin vector (0) is never coalesced anyway
            iv = cdw11 & 0xFFFF
            if iv >= len(self.plan.irq_w):
                return Status.INVALID_FIELD, 0
            for eng in self.engines:
                eng.set_vector(iv, bool(cdw11 >> 16 & 1))
            return Status.SUCCESS, 0
        return Status.INVALID_FIELD, 0

    def _create_cq(self, qid: int, depth: int, cdw11: int) -> tuple[int, int]:
        regions = self._sq_regions(qid)
        if qid == 0 or regions is None or qid in self.io_cqs:
            return Status.QID_INVALID, 0
        if not 2 <= depth <= regions.max_depth:
            return Status.QUEUE_SIZE, 0
        iv = cdw11 >> 16
        if iv >= len(self.plan.irq_w):
            return Status.INVALID_VECTOR, 0
        o = self._qoffs[qid]
        self.engine_of(qid).create_cq(
            qid, depth, regions.cq.offset, o.cq_head_db, o.dev_cq_tail, o.dev_phase, iv,
            bool(cdw11 & 2),
        )  # fmt: skip
        self.io_cqs[qid] = iv
        self._publish_queue(qid, dev_cq_tail=0, dev_phase=1, iv=iv)
        return Status.SUCCESS, 0

    def _create_sq(self, qid: int, depth: int, cdw11: int) -> tuple[int, int]:
        regions = self._sq_regions(qid)
        cqid = cdw11 >> 16
        if qid == 0 or regions is None or qid in self.io_sqs:
            return Status.QID_INVALID, 0
        if cqid not in self.io_cqs:
            return Status.CQ_INVALID, 0
        if not 2 <= depth <= regions.max_depth:
            return Status.QUEUE_SIZE, 0
        o = self._qoffs[qid]
        # QPRIO (bits 2:1): 0 urgent, 1 high, 2 medium, 3 low
        self.engine_of(cqid).create_sq(
            qid, cqid, depth, regions.sq.offset, o.sq_tail_db, o.sq_event_idx, o.dev_sq_head,
            (cdw11 >> 1) & 0x3,
        )  # fmt: skip
        self.io_sqs[qid] = cqid
        worker = self.engines.index(self.engine_of(cqid))
        self._publish_queue(qid, created=1, q_depth=depth, cqid=cqid, dev_sq_head=0, worker=worker)
        return Status.SUCCESS, 0

    def _delete_sq(self, qid: int) -> tuple[int, int]:
        """Delete I/O SQ: its commands in service and still in it complete with
        Command Aborted due to SQ Deletion (in the engine)."""
        if qid == 0 or qid not in self.io_sqs:
            return Status.QID_INVALID, 0
        self.engine_of(self.io_sqs.pop(qid)).delete_sq(qid)
        self._publish_queue(qid, created=0)
        self.counters["sq_deletes"] += 1
        return Status.SUCCESS, 0

    def _delete_cq(self, qid: int) -> tuple[int, int]:
        if qid == 0 or qid not in self.io_cqs:
            return Status.QID_INVALID, 0
        if qid in self.io_sqs.values():
            return Status.INVALID_QUEUE_DELETION, 0
        self.engine_of(qid).delete_cq(qid)
        del self.io_cqs[qid]
        self.counters["cq_deletes"] += 1
        return Status.SUCCESS, 0

    def _abort(self, sqid: int, cid: int) -> tuple[int, int]:
        """Abort (08h): complete the command with ABORT_REQ if it is in service, or
        mark it to be, once fetched, if it is still in its SQ.  Result bit 0 set
        means it was *not* aborted.  More outstanding Aborts than ACL + 1: Abort
        Command Limit Exceeded."""
        if self.held_aborts >= self.acl + 1:
            self.counters["abort_limit_exceeded"] += 1
            return Status.ABORT_LIMIT, 0
        cqid = self.io_sqs.get(sqid)
        if cqid is None:
            return Status.SUCCESS, 1  # no such I/O SQ (or the admin one): nothing aborted
        done = self.engine_of(cqid).abort(sqid, cid)
        return Status.SUCCESS, 0 if done in (0, 1) else 1
