"""The NVMe controller: one device process whose worker threads serve the queue pairs.

::

    host (CPUs)                             controller (this process)
    SQE -> SQ ring, SQ tail doorbell ---->  device worker k (a thread in compiled code,
      (shadow doorbell in shared memory;      mqrt.device._nvme_engine) serves the I/O
      a kick on worker k's eventfd only       queue pairs of its CQs: fetch by
      when the tail crosses the queue's       arbitration, while channels and the
      event index)                            IOPS/bandwidth buckets allow; service
                                              time from the seeded model; faults
    CQ ring <---- CQE (phase bit) <-------  post when due; a full CQ holds them back
    irq pipe of the CQ's vector <--------   interrupt (coalesced: THR and TIME)
    CQ head doorbell ------------------->   room in the CQ again

    admin SQ/CQ, CC.EN, CC.SHN ---------->  the coordinator (this module, Python): the
                                            admin queue, queue creation and deletion,
                                            features, Abort, reset; it publishes the
                                            counters and runs the workers' threads

Workers.  Worker ``k`` of ``W`` serves the I/O CQs ``{k + 1, k + 1 + W, ...}`` and the
SQs that complete to them (:func:`queue_worker`), the way a controller's channels
serve queue pairs in parallel; the SQ's worker is published in its queue words
(``worker``) so the host kicks the right one.  Each worker has its own kick eventfd,
timer heap and counters, and sleeps in its own ``ppoll`` with the GIL released, so the
workers run in parallel with each other and with the coordinator.  The channels and
the rate buckets are the controller's: all workers draw from the same ones.

Doorbells without wasting a core: the event index of each SQ (the spec's shadow
doorbells and EventIdx, Doorbell Buffer Config).  Before it sleeps a worker stores each
SQ's head as its event index, fences, and reads the tail doorbells once more; a host
that moves the tail past the event index (``nvme_dbbuf_need_event``) kicks the
worker's eventfd.  A busy worker's event index stays behind, so it is not kicked.  The
admin queue works the same way with the coordinator's eventfd.

Deviations from NVMe
    * Indices, phases and doorbells are as in the spec (wrapped, one slot kept free);
      "PRPs" of admin commands are byte offsets of the arena's admin data buffer.
    * No data is transferred: reads and writes only take time.
    * Without coalescing, a worker raises each vector once per pass over its queues
      (all the CQEs it posted in that pass), not once per CQE.
    * A fatal fault (the ``fatal_error`` knob) sets CSTS.CFS and stops the controller
      (nothing fetched, completed or signalled) until CC.EN goes to 0, which clears
      it.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from mqrt.device._nvme_engine import COUNTERS as ENGINE_COUNTERS
from mqrt.device._nvme_engine import Engine
from mqrt.device.nvme_admin import AdminCommands, Cq, Sq
from mqrt.device.nvme_defs import (
    CQE,
    CQE_HEAD,
    CQE_OFF_CID_STATUS,
    NVME_QID_ADMIN,
    cqe_status,
)
from mqrt.device.nvme_model import LATENCY_DIST_CODES
from mqrt.lib import wait, wire
from mqrt.lib._atomic import fence
from mqrt.lib.proc import child_init
from mqrt.lib.shm import Arena, Region, cacheline_struct

#: One device worker's counters (its engine's, published by the coordinator).
DEV_WORKER_COUNTERS = cacheline_struct([(name, "<u8") for name in ENGINE_COUNTERS])

#: The controller's counters: the workers' summed, and the coordinator's own.
DEV_COUNTERS = cacheline_struct(
    [
        *((name, "<u8") for name in ENGINE_COUNTERS),
        ("admin_commands", "<u8"),
        ("admin_interrupts", "<u8"),
        ("abort_cmds", "<u8"),  # Abort commands fetched
        ("abort_limit_exceeded", "<u8"),  # Aborts refused: more than ACL + 1 outstanding
        ("abort_burst_max", "<u8"),  # the most Aborts fetched in one pass of the admin SQ
        ("identify_ctrl", "<u8"),  # Identify Controller commands
        ("sq_deletes", "<u8"),  # I/O SQs deleted (Delete I/O SQ)
        ("cq_deletes", "<u8"),  # I/O CQs deleted (Delete I/O CQ)
        ("admin_errors", "<u8"),  # admin commands completed with an error status
        ("resets", "<u8"),  # controller resets: CC.EN 1 -> 0 without a shutdown notice
        ("shutdowns", "<u8"),  # CC.EN 1 -> 0 after CC.SHN (the host's orderly stop)
        ("coordinator_cpu_ns", "<u8"),  # CPU time of the coordinator (admin, publishing)
        ("workers", "<u8"),
        ("heartbeat_ns", "<u8"),
    ]
)

#: How often the coordinator publishes the counters (and its heartbeat).
PUBLISH_NS = 50_000_000


def queue_worker(qid: int, nr_workers: int) -> int:
    """The device worker that serves I/O queue pair ``qid`` (its CQ)."""
    return (qid - 1) % nr_workers


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
    workers: Region  #: one DEV_WORKER_COUNTERS per device worker
    #: the coordinator's kick eventfd (admin queue, CC), then one per device worker
    kick_fds: list[int]
    irq_w: list[int]  #: write end of each interrupt vector's pipe
    namespaces: list[Namespace]
    model: dict[str, Any]  #: DEVICE_KNOBS values
    #: fault knobs (lost_irq, drop, error, delay, drop_abort, fatal, stale event
    #: index), percentages
    faults: dict[str, Any]
    max_io_queues: int
    serial: str = "MQRT0001"

    @property
    def nr_workers(self) -> int:
        return len(self.kick_fds) - 1


class Controller(AdminCommands):
    """The coordinator: the admin queue and the controller's state in Python, the
    I/O queue pairs in the workers' engines."""

    def __init__(self, plan: ControllerPlan, ctl, res):
        self.plan = plan
        self.ctl = ctl
        self.res = res
        self.a = plan.arena.atomic
        self.buf = plan.arena.buf
        self.clock = time.monotonic_ns
        r = plan.regs.offsets()
        self._cc_en, self._cc_shn, self._csts_rdy = r.cc_en, r.cc_shn, r.csts_rdy
        self._csts_cfs = r.csts_cfs
        self.counters = dict.fromkeys(DEV_COUNTERS.names or (), 0)
        self.counters["workers"] = plan.nr_workers
        self._cnt = plan.counters.offsets()
        self._wcnt = [plan.workers.offsets(k) for k in range(plan.nr_workers)]
        self.rng = random.Random(plan.model["dev_seed"] * 7919 + 2)  # the admin queue's draws
        self.faults = plan.faults
        self.ns = {n.nsid: n for n in plan.namespaces}
        self.acl = int(plan.model.get("acl", 3))
        self._qoffs = [q.words.offsets() for q in plan.queues]
        self.engines: list[Engine] = []
        for k in range(plan.nr_workers):
            self.engines.append(self._engine(k))
        self.threads: list[threading.Thread] = []
        self._reset_admin_state()
        self.enabled = False
        self.exiting = False
        self._fds = [plan.kick_fds[0], ctl.fileno()]

    def _engine(self, k: int) -> Engine:
        """Device worker ``k``'s engine (the first one holds the shared caps)."""
        plan, m, f = self.plan, self.plan.model, self.plan.faults
        return Engine(
            self.buf, plan.kick_fds[1 + k], plan.irq_w,
            [o.irq_pending for o in self._qoffs[: len(plan.irq_w)]],
            self._csts_cfs, len(plan.queues),
            [(n.nr_blocks, n.lba_shift) for n in plan.namespaces],
            m["latency_ns"], LATENCY_DIST_CODES[m["latency_dist"]], m["latency_sigma"],
            m["channels"], m["iops_max"], m["dev_mbps"], m["dev_seed"] + (k << 32),
            group=self.engines[0] if k else None,
            error_pct=f.get("error_pct", 0), delay_pct=f.get("delay_pct", 0),
            delay_ns=f.get("delay_ns", 0), drop_pct=f.get("drop_pct", 0),
            fatal_pct=f.get("fatal_pct", 0), lost_irq_pct=f.get("lost_irq_pct", 0),
            stale_event_idx_pct=f.get("stale_event_idx_pct", 0),
            timer_slack_ns=m["dev_timerslack_ns"],
        )  # fmt: skip

    def _reset_admin_state(self) -> None:
        """The coordinator's view of the queues and features at power-on / reset."""
        m = self.plan.model
        self.sqs: dict[int, Sq] = {}  #: the admin SQ (qid 0) once enabled
        self.cqs: dict[int, Cq] = {}  #: the admin CQ
        self.io_sqs: dict[int, int] = {}  #: I/O SQ qid -> its CQ
        self.io_cqs: dict[int, int] = {}  #: I/O CQ qid -> its vector
        self.held_aborts = 0
        self.coalesce = (m["irq_coalesce_thr"], m["irq_coalesce_time"] * 100_000)
        burst = m["arb_burst"]
        self.arbitration = (
            1 << 30 if burst == 7 else 1 << burst,
            [int(x) for x in str(m["wrr_weights"]).split(",")],
        )
        self._push_features()

    def _push_features(self) -> None:
        thr, time_ns = self.coalesce
        burst, (high, medium, low) = self.arbitration
        wrr = self.plan.model["arbitration"] == "wrr"
        for eng in self.engines:
            eng.set_features(thr, time_ns, burst, wrr, (high, medium, low))

    def engine_of(self, qid: int) -> Engine:
        return self.engines[queue_worker(qid, len(self.engines))]

    # -- CC.EN ---------------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        """CSTS.CFS: a fatal fault (raised by a worker) stopped the controller."""
        return bool(self.a.load_acquire32(self._csts_cfs))

    def _enable(self) -> None:
        """CC.EN 0 -> 1: the admin queue pair comes up; CSTS.RDY = 1."""
        q = self.plan.queues[NVME_QID_ADMIN]
        o = self._qoffs[NVME_QID_ADMIN]
        depth = self.a.read32(o.q_depth)
        self.cqs = {0: Cq(0, depth, q.cq.offset, o.cq_head_db, 0)}
        self.sqs = {0: Sq(0, depth, q.sq.offset, o.sq_tail_db)}
        self.a.set32(o.sq_event_idx, 0)
        self.enabled = True
        self.a.store_release32(self._csts_rdy, 1)

    def _disable(self) -> None:
        """CC.EN 1 -> 0: every queue and command is dropped; after CC.SHN it is the
        host's orderly shutdown, otherwise a controller reset."""
        for eng in self.engines:
            eng.reset()
        for qid in [*self.io_sqs, 0]:
            self._publish_queue(qid, created=0)
        self._reset_admin_state()
        self.enabled = False
        shutdown = self.a.read32(self._cc_shn)
        self.counters["shutdowns" if shutdown else "resets"] += 1
        self.a.store_release32(self._csts_cfs, 0)  # a reset clears the fatal status
        self.a.store_release32(self._csts_rdy, 0)

    def _publish_queue(self, qid: int, **values: int) -> None:
        o = self._qoffs[qid]
        for name, v in values.items():
            self.a.set32(getattr(o, name), v)

    # -- the admin queue's completions -------------------------------------------------------------

    def _sq_new(self, sq: Sq) -> int:
        """Entries the host has published and we have not fetched."""
        tail = self.a.load_acquire32(sq.tail_db)
        return (tail - sq.head) % sq.depth

    def _post(self, cqid: int, cid: int, status: int, result: int) -> None:
        """An admin command's CQE: to the admin CQ (room permitting), and its vector
        at once (the admin CQ is never coalesced)."""
        cq = self.cqs.get(cqid)
        if cq is None:
            return
        cq.pending.append((result, cqid, cid, status))
        self._drain_cq(cq)

    def _drain_cq(self, cq: Cq) -> None:
        """Write pending CQEs while the CQ has room; in each the phase word goes last."""
        a, buf = self.a, self.buf
        room = (a.load_acquire32(cq.head_db) - cq.tail - 1) % cq.depth
        n = min(room, len(cq.pending))
        for _ in range(n):
            result, sqid, cid, status = cq.pending.popleft()
            off = cq.base + cq.tail * CQE.size
            sq = self.sqs.get(sqid)
            CQE_HEAD.pack_into(buf, off, result, 0, sq.head if sq else 0, sqid)
            # cid + status (with the phase tag) in one release store, after the rest
            a.store_release32(off + CQE_OFF_CID_STATUS, cid | cqe_status(status, cq.phase) << 16)
            cq.tail += 1
            if cq.tail == cq.depth:
                cq.tail = 0
                cq.phase ^= 1
        if n:
            o = self._qoffs[cq.qid]
            a.set32(o.dev_cq_tail, cq.tail)
            a.set32(o.dev_phase, cq.phase)
            if a.xchg32(self._qoffs[cq.iv].irq_pending, 1) == 0:
                self.counters["admin_interrupts"] += 1
                with contextlib.suppress(BlockingIOError):
                    os.write(self.plan.irq_w[cq.iv], b"\x01")

    # -- the loop ------------------------------------------------------------------------------

    def _publish_counters(self) -> None:
        a = self.a
        c = self.counters
        totals = dict.fromkeys(ENGINE_COUNTERS, 0)
        for k, eng in enumerate(self.engines):
            wc = eng.counters()
            o = self._wcnt[k]
            for name in ENGINE_COUNTERS:
                v = wc[name]
                totals[name] += v
                a.set(getattr(o, name), v)
        c.update(totals)
        c["coordinator_cpu_ns"] = time.thread_time_ns()
        c["heartbeat_ns"] = self.clock()
        for name, v in c.items():
            a.set(getattr(self._cnt, name), v)

    def _handle_ctl(self) -> None:
        while self.ctl.poll():
            try:
                msg = wire.recv_command(self.ctl)
            except EOFError:
                self.exiting = True
                return
            if isinstance(msg, wire.Exit):
                self.exiting = True

    def _start_workers(self) -> None:
        for k, eng in enumerate(self.engines):
            t = threading.Thread(target=eng.run, name=f"nvme-worker{k}", daemon=True)
            t.start()
            self.threads.append(t)

    def _stop_workers(self) -> None:
        for eng in self.engines:
            eng.stop()
        for t in self.threads:
            t.join()

    def run(self) -> None:
        a = self.a
        self._start_workers()
        self._publish_counters()
        wire.send(self.res, wire.Ready(wire.Role.DEVICE, os.getpid()))
        next_pub = 0
        try:
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
                    progressed = self._admin_pass()
                    cq = self.cqs[0]
                    if cq.pending:
                        self._drain_cq(cq)
                if now >= next_pub:
                    next_pub = now + PUBLISH_NS
                    self._publish_counters()
                if progressed:
                    continue
                # Nothing to do: arm the admin SQ's event index, look once more, then
                # sleep until a kick, a control message or the next publication.
                timeout = max(0.0, (next_pub - self.clock()) / 1e9)
                if live:
                    sq = self.sqs[0]
                    a.set32(self._qoffs[0].sq_event_idx, sq.head)
                    fence()
                    if self._sq_new(sq):
                        continue
                    if self.cqs[0].pending:
                        timeout = min(timeout, 20e-6)  # the admin CQ is full: poll its head
                if a.load_acquire32(self._cc_en) != int(self.enabled):
                    continue
                for fd in wait.wait_fds(self._ep, self._fds, timeout):
                    if fd == self.plan.kick_fds[0]:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                    else:
                        self._handle_ctl()
        finally:
            self._stop_workers()
        if self.enabled and not a.load_acquire32(self._cc_en):
            # CC.EN went to 0 (the host's shutdown, CC.SHN first) just before the exit
            # message, and both woke the last wait: it is a disable all the same
            self._disable()
        self._publish_counters()
        wire.send(self.res, wire.DeviceResult(self.counters))

    def setup_wait(self) -> None:
        self._ep = select.epoll()
        for fd in self._fds:
            self._ep.register(fd, select.EPOLLIN)


def controller_main(plan: ControllerPlan, ctl, res, host_core: int | None, owner_pid: int) -> None:
    """Entry point of the device process (forked by the runtime)."""
    child_init(owner_pid, host_core, "mqrt-device")
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
