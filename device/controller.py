"""The NVMe controller: one device process serving submission queues in shared memory.

::

    host (CPUs)                             controller (this process)
    SQE -> SQ ring, SQ tail doorbell ---->  fetch (admin first, then I/O SQs by
      kick (eventfd) only if the device       arbitration), while channels and the
      asked for one (need_kick)               IOPS/bandwidth buckets allow
                                            serve: latency from the service model
    CQ ring <---- CQE (phase bit) <-------  post when due; a full CQ holds them back
    irq pipe of the CQ's vector <--------   interrupt (coalesced: THR / TIME)
    CQ head doorbell ------------------->   room in the CQ again

Doorbells without wasting a core (the event-index idea): when the controller has
nothing to fetch it sets ``need_kick`` (xchg, a full barrier), looks at every SQ tail
doorbell once more, and only then sleeps on its kick eventfd; a host that rings a
doorbell swaps ``need_kick`` back to 0 and writes the eventfd only if it was set.  A
busy controller is never kicked; an idle one costs nothing.

Every wait is one ``select`` over the kick eventfd and the control pipe, with the next
due completion or coalescing deadline as timeout (microsecond resolution).

This module is the process and its I/O service; the admin command set (Identify, Set
Features, Create/Delete I/O queues, Abort) is :mod:`mqrt.device.nvme_admin`, the
controller's base class.

Deviations from NVMe
    * Indices, phases and doorbells are as in the spec (wrapped, one slot kept free);
      "PRPs" of admin commands are byte offsets of the arena's admin data buffer.
    * No data is transferred: reads and writes only take time.
    * Without coalescing, the controller raises each vector once per pass over its
      queues (all the CQEs it posted in that pass), not once per CQE.
    * A fatal fault (the ``fatal_error`` knob) sets CSTS.CFS and stops the controller
      (nothing fetched, completed or signalled) until CC.EN goes to 0, which clears
      it.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import select
import time
import traceback
from dataclasses import dataclass
from typing import Any

from mqrt.device.nvme_admin import AdminCommands, Cq, Sq
from mqrt.device.nvme_defs import (
    CQE,
    CQE_HEAD,
    CQE_OFF_CID_STATUS,
    NVME_QID_ADMIN,
    NVME_SC_DNR,
    SQE,
    IoOpcode,
    Status,
    cqe_status,
)
from mqrt.device.nvme_model import ServiceModel
from mqrt.lib import wait, wire
from mqrt.lib.proc import child_init
from mqrt.lib.shm import Arena, Region, cacheline_struct

_IO_OPCODES = frozenset((IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH))

#: The controller's counters, written by it alone (plain stores), read by the runtime.
DEV_COUNTERS = cacheline_struct(
    [
        ("commands", "<u8"),  # I/O commands fetched
        ("admin_commands", "<u8"),
        ("completions", "<u8"),  # CQEs posted
        ("interrupts", "<u8"),  # vector writes
        ("coalesced", "<u8"),  # CQEs that rode on another CQE's interrupt
        ("irq_merged", "<u8"),  # interrupts not sent: the vector was still pending
        ("kicks", "<u8"),  # wake-ups by a host kick
        ("sleeps", "<u8"),  # times the controller blocked with nothing to do
        ("doorbell_reads", "<u8"),
        ("cq_full_stalls", "<u8"),  # times a CQE had to wait for room in its CQ
        ("aborts", "<u8"),  # commands aborted by an Abort command
        ("abort_cmds", "<u8"),  # Abort commands fetched
        ("abort_limit_exceeded", "<u8"),  # Aborts refused: more than ACL + 1 outstanding
        ("abort_burst_max", "<u8"),  # the most Aborts fetched in one pass of the admin SQ
        ("identify_ctrl", "<u8"),  # Identify Controller commands
        ("sq_deletes", "<u8"),  # I/O SQs deleted (Delete I/O SQ)
        ("cq_deletes", "<u8"),  # I/O CQs deleted (Delete I/O CQ)
        ("admin_errors", "<u8"),  # admin commands completed with an error status
        ("fatal_errors", "<u8"),  # fatal faults (CSTS.CFS set)
        ("resets", "<u8"),  # controller disables (CC.EN 1 -> 0)
        ("dropped", "<u8"),  # completions dropped (fault)
        ("lost_irqs", "<u8"),  # interrupts not delivered (fault)
        ("errors", "<u8"),  # error statuses injected
        ("busy_ns", "<u8"),  # time spent not blocked
        ("heartbeat_ns", "<u8"),
    ]
)


@dataclass(frozen=True)
class QueueRegions:
    """Where queue pair ``qid`` lives: its shared words and its two rings."""

    qid: int
    max_depth: int  #: entries the rings have room for
    words: Region
    sq: Region
    cq: Region


@dataclass(frozen=True)
class Namespace:
    nsid: int
    nr_blocks: int
    lba_shift: int


@dataclass
class ControllerPlan:
    """Everything the controller process needs, inherited through fork."""

    arena: Arena
    regs: Region
    queues: list[QueueRegions]
    data: Region  #: the admin data buffer (identify)
    counters: Region
    kick_fd: int
    irq_w: list[int]  #: write end of each interrupt vector's pipe
    namespaces: list[Namespace]
    model: dict[str, Any]  #: DEVICE_KNOBS values
    #: fault knobs (lost_irq, drop, error, delay, drop_abort, fatal), percentages
    faults: dict[str, Any]
    max_io_queues: int
    serial: str = "MQRT0001"


class Controller(AdminCommands):
    def __init__(self, plan: ControllerPlan, ctl, res):
        self.plan = plan
        self.ctl = ctl
        self.res = res
        self.a = plan.arena.atomic
        self.buf = plan.arena.buf
        self.clock = time.monotonic_ns
        r = plan.regs.offsets()
        self._cc_en, self._csts_rdy, self._need_kick = r.cc_en, r.csts_rdy, r.need_kick
        self.counters = dict.fromkeys(DEV_COUNTERS.names or (), 0)
        self._cnt = plan.counters.offsets()
        self.model = ServiceModel.from_values(plan.model)
        self.channels = plan.model["channels"]
        self.rng = random.Random(plan.model["dev_seed"] * 7919 + 1)
        self.faults = plan.faults
        #: does any fault apply per command (a delay_ns alone does not)?
        self._command_faults = any(
            plan.faults.get(k) for k in ("error_pct", "delay_pct", "drop_pct", "fatal_pct")
        )
        self.arbitration = plan.model["arbitration"]
        burst = plan.model["arb_burst"]
        self.burst = 1 << 30 if burst == 7 else 1 << burst
        self.wrr = [int(x) for x in str(plan.model["wrr_weights"]).split(",")]
        self.coalesce_thr = plan.model["irq_coalesce_thr"]
        self.coalesce_time_ns = plan.model["irq_coalesce_time"] * 100_000
        self.ns = {n.nsid: n for n in plan.namespaces}
        self._lba_shift = {n.nsid: n.lba_shift for n in plan.namespaces}
        self.sqs: dict[int, Sq] = {}
        self.cqs: dict[int, Cq] = {}
        #: commands in service, a heap of (done_ns, seq, sqid, cid, sq_head, status, drop)
        self.inflight: list[tuple] = []
        self.by_cid: dict[tuple[int, int], tuple] = {}
        self.aborted: set[int] = set()  #: seqs completed early by an Abort
        self.abort_pending: set[tuple[int, int]] = set()
        self.held_aborts = 0
        self.acl = int(plan.model.get("acl", 3))
        self.failed = False  #: CSTS.CFS: a fatal fault stopped the controller
        self._csts_cfs = r.csts_cfs
        self._seq = 0
        self._rr = 0
        self.enabled = False
        self.exiting = False
        self._fds = [plan.kick_fd, ctl.fileno()]
        self.capped = False
        self._qoffs = [q.words.offsets() for q in plan.queues]
        self._io_sqs: list[Sq] = []  #: the I/O SQs in qid order (rebuilt on changes)

    # -- queues -------------------------------------------------------------------------------

    def _enable(self) -> None:
        """CC.EN 0 -> 1: the admin queue pair comes up; CSTS.RDY = 1."""
        q = self.plan.queues[NVME_QID_ADMIN]
        o = q.words.offsets()
        depth = self.a.read32(o.q_depth)
        self.cqs = {0: Cq(0, depth, q.cq.offset, o.cq_head_db, 0, True)}
        self.sqs = {0: Sq(0, 0, depth, q.sq.offset, o.sq_tail_db, prio=0)}
        self.enabled = True
        self.a.store_release32(self._csts_rdy, 1)

    def _disable(self) -> None:
        """CC.EN 1 -> 0 (a controller reset): every queue and command is dropped."""
        for qid in list(self.sqs):
            self._publish_queue(qid, created=0)
        self.sqs.clear()
        self.cqs.clear()
        self._io_sqs = []
        self.inflight.clear()
        self.by_cid.clear()
        self.aborted.clear()
        self.abort_pending.clear()
        self.held_aborts = 0
        self.enabled = False
        self.counters["resets"] += 1
        if self.failed:  # a reset clears the fatal status
            self.failed = False
            self.a.store_release32(self._csts_cfs, 0)
        self.a.store_release32(self._csts_rdy, 0)

    def _fatal(self) -> None:
        """A fatal fault: CSTS.CFS = 1, and the controller stops serving."""
        self.failed = True
        self.counters["fatal_errors"] += 1
        self.a.store_release32(self._csts_cfs, 1)

    def _publish_queue(self, qid: int, **values: int) -> None:
        o = self._qoffs[qid]
        for name, v in values.items():
            self.a.set32(getattr(o, name), v)

    # -- fetching --------------------------------------------------------------------------------

    def _sq_new(self, sq: Sq) -> int:
        """Entries the host has published and we have not fetched."""
        self.counters["doorbell_reads"] += 1
        tail = self.a.load_acquire32(sq.tail_db)
        return (tail - sq.head) % sq.depth

    def _io_pass(self, now: int) -> int:
        """Arbitrate over the I/O SQs and start what the channels and caps allow;
        how many commands started.  ``self.capped`` says the caps held one back."""
        self.capped = False
        sqs = self._io_sqs
        if not sqs:
            return 0
        model = self.model
        model.refill(now)
        free = start_free = self.channels - len(self.inflight)
        if free <= 0:
            return 0
        wrr = self.arbitration == "wrr"
        if wrr:
            if all(sq.credit <= 0 for sq in sqs):
                for sq in sqs:
                    sq.credit = self.wrr[min(sq.prio, 2)]
            order = sorted(sqs, key=lambda s: s.prio)
        else:
            k = self._rr % len(sqs)
            order = sqs[k:] + sqs[:k] if k else sqs
            self._rr += 1
        buf, unpack, size = self.buf, SQE.unpack_from, SQE.size
        lba_shift = self._lba_shift
        abort_pending = self.abort_pending
        for sq in order:
            n = self._sq_new(sq)
            if not n:
                continue
            take = min(n, free, self.burst)
            if wrr:
                take = min(take, max(sq.credit, 0))
            for _ in range(take):
                sqe = unpack(buf, sq.base + sq.head * size)
                if abort_pending and (sq.qid, sqe[2]) in abort_pending:
                    self._fetch_aborted(sq, sqe[2])
                    continue
                nbytes = ((sqe[10] & 0xFFFF) + 1) << lba_shift.get(sqe[3], 9)
                if not model.admit(nbytes):
                    self.capped = True
                    return start_free - free
                sq.head += 1
                if sq.head == sq.depth:
                    sq.head = 0
                sq.credit -= 1
                self._start(sq, sqe, now)
                free -= 1
            if free <= 0 or self.failed:  # (a fatal fault stops the pass)
                break
        return start_free - free

    def _fetch_aborted(self, sq: Sq, cid: int) -> None:
        """Fetch a command an Abort found in its SQ: it completes with ABORT_REQ."""
        self.abort_pending.discard((sq.qid, cid))
        sq.head += 1
        if sq.head == sq.depth:
            sq.head = 0
        self.counters["commands"] += 1
        self.counters["aborts"] += 1
        cq = self.cqs.get(sq.cqid)
        if cq is not None:
            cq.pending.append((0, sq.head, sq.qid, cid, Status.ABORT_REQ))

    def _start(self, sq: Sq, sqe: tuple, now: int) -> None:
        """A command enters service: check it, draw its service time, apply faults.
        In flight it is a tuple ``(done_ns, seq, sqid, cid, sq_head, status, drop)``."""
        opcode, cid, nsid = sqe[0], sqe[2], sqe[3]
        self.counters["commands"] += 1
        status = 0
        ns = self.ns.get(nsid)
        if opcode not in _IO_OPCODES:
            status = Status.INVALID_OPCODE
        elif ns is None:
            status = Status.INVALID_NS
        elif opcode != IoOpcode.FLUSH and (sqe[8] | sqe[9] << 32) + (sqe[10] & 0xFFFF) >= (
            ns.nr_blocks
        ):
            status = Status.LBA_RANGE
        service = self.model.service_ns() if self.model.latency_ns else 0
        drop = False
        if self._command_faults:
            faults = self.faults
            rng = self.rng
            if faults.get("error_pct") and rng.random() * 100 < faults["error_pct"]:
                # a media error is final: Do Not Retry
                status = NVME_SC_DNR | (
                    Status.READ_ERROR if opcode == IoOpcode.READ else Status.WRITE_FAULT
                )
                self.counters["errors"] += 1
            if faults.get("delay_pct") and rng.random() * 100 < faults["delay_pct"]:
                service += faults["delay_ns"]
            if faults.get("drop_pct") and rng.random() * 100 < faults["drop_pct"]:
                drop = True
            if faults.get("fatal_pct") and rng.random() * 100 < faults["fatal_pct"]:
                self._fatal()
        if not service and not drop:
            # Done as soon as fetched: straight to the CQ (nothing to abort or wait for).
            cq = self.cqs.get(sq.cqid)
            if cq is not None:
                cq.pending.append((0, sq.head, sq.qid, cid, status))
            return
        self._seq += 1
        cmd = (now + service, self._seq, sq.qid, cid, sq.head, status, drop)

        heapq.heappush(self.inflight, cmd)
        self.by_cid[(sq.qid, cid)] = cmd

    def _complete_due(self, now: int) -> int:
        """Move every command whose service time is over to its CQ's pending list."""
        inflight = self.inflight
        n = 0
        by_cid, aborted = self.by_cid, self.aborted
        while inflight and inflight[0][0] <= now:
            _done, seq, sqid, cid, sq_head, status, drop = heapq.heappop(inflight)
            n += 1
            if aborted and seq in aborted:
                aborted.discard(seq)  # already completed by its Abort
                continue
            by_cid.pop((sqid, cid), None)
            if drop:
                self.counters["dropped"] += 1
                continue
            sq = self.sqs.get(sqid)
            if sq is None:
                continue  # its queue was deleted meanwhile
            cq = self.cqs.get(sq.cqid)
            if cq is not None:
                cq.pending.append((0, sq_head, sqid, cid, status))
        return n

    # -- completions and interrupts ----------------------------------------------------------------

    def _post(self, cqid: int, cid: int, sq_head: int, status: int, result: int,
              sqid: int | None = None) -> None:  # fmt: skip
        cq = self.cqs.get(cqid)
        if cq is None:
            return
        cq.pending.append((result, sq_head, cqid if sqid is None else sqid, cid, status))
        self._drain_cq(cq)

    def _drain_cq(self, cq: Cq) -> None:
        """Write pending CQEs while the CQ has room (one head doorbell read per
        drain); in each entry the phase word goes last."""
        a, buf = self.a, self.buf
        head = a.load_acquire32(cq.head_db)
        room = (head - cq.tail - 1) % cq.depth
        pending = cq.pending
        n = min(room, len(pending))
        if n:
            tail, phase, depth, base = cq.tail, cq.phase, cq.depth, cq.base
            pack, size, last_dword = CQE_HEAD.pack_into, CQE.size, CQE_OFF_CID_STATUS
            release = a.store_release32
            for _ in range(n):
                result, sq_head, sqid, cid, status = pending.popleft()
                off = base + tail * size
                pack(buf, off, result, 0, sq_head, sqid)
                # Publish: cid + status (with the phase tag) in one release store,
                # after the rest of the entry; pairs with the host's load_acquire.
                release(off + last_dword, cid | cqe_status(status, phase) << 16)
                tail += 1
                if tail == depth:
                    tail = 0
                    phase ^= 1
            cq.tail, cq.phase = tail, phase
            self.counters["completions"] += n
            if cq.irq_count == 0:
                cq.irq_first_ns = self.clock()
            cq.irq_count += n
            o = self._qoffs[cq.qid]
            a.set32(o.dev_cq_tail, tail)
            a.set32(o.dev_phase, phase)
        if pending:  # the CQ is full: the rest waits for the host to free room
            if not cq.stalled:
                cq.stalled = True
                self.counters["cq_full_stalls"] += 1
        else:
            cq.stalled = False

    def _interrupts(self, now: int, end_of_pass: bool) -> int:
        """Raise the vectors whose coalescing condition holds; the earliest time a
        held-back interrupt is due (0: none)."""
        due = 0
        for cq in self.cqs.values():
            if not cq.irq_count or not cq.ien:
                continue
            thr_met = cq.irq_count >= self.coalesce_thr + 1
            time_met = self.coalesce_time_ns and now - cq.irq_first_ns >= self.coalesce_time_ns
            coalescing = self.coalesce_thr or self.coalesce_time_ns
            if (not coalescing and end_of_pass) or (coalescing and (thr_met or time_met)):
                self._raise(cq)
            elif coalescing and self.coalesce_time_ns:
                t = cq.irq_first_ns + self.coalesce_time_ns
                due = t if not due else min(due, t)
        return due

    def _raise(self, cq: Cq) -> None:
        self.counters["coalesced"] += cq.irq_count - 1
        cq.irq_count = 0
        lost = self.faults.get("lost_irq_pct") if self.faults else 0
        if lost and cq.qid and self.rng.random() * 100 < lost:
            self.counters["lost_irqs"] += 1
            return
        # The pending bit: a vector still pending (the host has not run its handler
        # yet) is not signalled again; the handler will find these CQEs too.
        if self.a.xchg32(self._qoffs[cq.qid].irq_pending, 1):
            self.counters["irq_merged"] += 1
            return
        self.counters["interrupts"] += 1
        with contextlib.suppress(BlockingIOError):
            os.write(self.plan.irq_w[cq.iv], b"\x01")

    # -- the loop ------------------------------------------------------------------------------

    def _publish_counters(self) -> None:
        a = self.a
        c = self.counters
        o = self._cnt
        c["heartbeat_ns"] = self.clock()
        for name, v in c.items():
            a.set(getattr(o, name), v)

    def _handle_ctl(self) -> None:
        while self.ctl.poll():
            try:
                msg = wire.recv_command(self.ctl)
            except EOFError:
                self.exiting = True
                return
            if isinstance(msg, wire.Exit):
                self.exiting = True

    def _anything_new(self) -> bool:
        return any(self._sq_new(sq) for sq in self.sqs.values())

    def run(self) -> None:
        a = self.a
        self._publish_counters()
        wire.send(self.res, wire.Ready(wire.Role.DEVICE, os.getpid()))
        next_pub = 0
        busy_from = self.clock()
        while not self.exiting:
            now = self.clock()
            cc_en = a.load_acquire32(self._cc_en)
            if cc_en and not self.enabled:
                self._enable()
            elif not cc_en and self.enabled:
                self._disable()
            progressed = 0
            live = self.enabled and not self.failed
            if live:
                progressed += self._admin_pass()
                progressed += self._complete_due(now)
                progressed += self._io_pass(now)
                live = not self.failed  # a fatal fault in this pass stops it here
                if live and self.model.latency_ns == 0:
                    progressed += self._complete_due(now)  # zero latency: done at once
                for cq in self.cqs.values():
                    if live and cq.pending:
                        self._drain_cq(cq)
            irq_due = self._interrupts(now, True) if live else 0
            if now >= next_pub:
                next_pub = now + 50_000_000
                self._publish_counters()
            if progressed:
                continue
            # Nothing moved: sleep until the next due completion, held-back interrupt,
            # bucket refill or CQ-head poll, asking for a kick (event index) so new
            # submissions wake us at once.
            deadlines = [irq_due] if irq_due else []
            if live and self.inflight:
                deadlines.append(self.inflight[0][0])
            if live and any(cq.pending for cq in self.cqs.values()):
                deadlines.append(now + 20_000)  # CQ full: poll the head doorbell
            if live and self.capped:
                deadlines.append(now + self.model.wait_ns())
            timeout = -1.0 if not deadlines else max(0.0, (min(deadlines) - self.clock()) / 1e9)
            a.xchg32(self._need_kick, 1)  # full barrier before the re-check
            if (
                live
                and not self.capped
                and len(self.inflight) < self.channels
                and self._anything_new()
            ):
                a.set32(self._need_kick, 0)
                continue
            if a.load_acquire32(self._cc_en) != int(self.enabled):
                a.set32(self._need_kick, 0)
                continue
            self.counters["sleeps"] += 1
            self.counters["busy_ns"] += self.clock() - busy_from
            ready = wait.wait_fds(self._ep, self._fds, timeout)
            busy_from = self.clock()
            a.set32(self._need_kick, 0)
            for fd in ready:
                if fd == self.plan.kick_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self.plan.kick_fd)
                    self.counters["kicks"] += 1
                else:
                    self._handle_ctl()
        self.counters["busy_ns"] += self.clock() - busy_from
        self._publish_counters()
        wire.send(self.res, wire.DeviceResult(self.counters))

    def setup_wait(self) -> None:
        self._ep = select.epoll()
        for fd in self._fds:
            self._ep.register(fd, select.EPOLLIN)


def controller_main(plan: ControllerPlan, ctl, res, host_core: int | None, owner_pid: int) -> None:
    """Entry point of the device process (forked by the runtime)."""
    child_init(owner_pid, host_core)
    try:
        ctrl = Controller(plan, ctl, res)
        ctrl.setup_wait()
        profile_dir = os.environ.get("MQRT_PROFILE_DIR")
        if profile_dir:  # a developer's aid, as for the CPUs
            import cProfile

            cProfile.runctx("ctrl.run()", globals(), {"ctrl": ctrl},
                            os.path.join(profile_dir, "device.prof"))  # fmt: skip
        else:
            ctrl.run()
    except Exception:
        with contextlib.suppress(Exception):
            wire.send(res, wire.Error(wire.Role.DEVICE, traceback.format_exc()))
        os._exit(1)
    os._exit(0)
