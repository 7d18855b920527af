"""The nvme driver (``drivers/nvme/host/pci.c``): blk-mq ops over a controller process.

Host side of every queue pair (``struct nvme_queue``) lives in shared memory because
several CPU processes play the host: ``sq_tail``/``last_sq_tail`` under ``sq_lock``
(the CPUs of an hctx share its SQ), ``cq_head``/``cq_phase`` under ``cq_lock`` (the
CPU the vector is affine to reaps; a timeout on another CPU may poll it too).

* ``queue_rq`` (``nvme_queue_rq``): start the request, build the SQE with command id
  ``genctr << 12 | tag``, copy it at the SQ tail; ring the doorbell only when
  ``bd->last`` (``commit_rqs`` rings it when a batch ends early).  After the doorbell
  a kick goes to the controller only if it asked for one (``need_kick``).
* the interrupt (``nvme_irq`` -> ``nvme_poll_cq``): reap CQEs while their phase tag
  matches, look each command id up with the generation check ("genctr mismatch"),
  complete through blk-mq, then one CQ head doorbell write.
* ``timeout`` (``nvme_timeout``): poll the CQ first ("completion polled": a lost
  interrupt); otherwise send an Abort on the admin queue and give the command another
  timeout; a command that times out again after its Abort resets the controller
  (:meth:`NvmeOps.reset_ctrl`).  Cancelled and aborted commands have no DNR, so
  ``complete`` (``nvme_complete_rq``) retries them up to ``nvme_max_retries``.
* ``poll`` (``nvme_poll``): poll queues (``poll_queues``) are created without an
  interrupt; the CPU that submitted a polled bio reaps them.
* ``map_queues``: DEFAULT over the interrupt-driven queues, POLL over the poll queues;
  vector ``qid`` is affine to the first CPU of hctx ``qid - 1``.  Namespaces are
  request queues on the controller's tag set (``TAG_QUEUE_SHARED`` with more than one).

The probe (``nvme_probe`` / ``nvme_reset_work``) runs in the runtime before the CPUs
start: enable the controller, identify it and its namespaces, set the number of
queues, interrupt coalescing and arbitration, and create each I/O CQ before its SQ.
A reset runs the same steps again, on the CPU whose timeout fired.

Deviations from Linux
    * The reset runs inline in the timeout handler of the CPU that decided it (the
      kernel queues it on nvme-reset-wq); other CPUs' submissions get
      ``BLK_STS_RESOURCE`` from the disabled queues meanwhile, and are rerun.
    * Admin commands from CPUs (Abort) are fire-and-forget; their completions are
      reaped by CPU 0, which the admin vector is affine to (by the resetting CPU
      during a reset).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import select
import struct
import time
from typing import Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_cpumap import HCTX_MAX_TYPES, Topology
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import RQ_OFF_FLAGS, HwCtx, Request, RequestQueue, TagSet
from mqrt.block.blk_mq_types import (
    SECTOR_SHIFT,
    BlkMqFlag,
    BlkMqOps,
    BlkStatus,
    DeviceProcess,
    EhRet,
    IrqHandler,
    Rqf,
    RqState,
)
from mqrt.block.blk_settings import blk_queue_max_hw_sectors, blk_queue_max_segments
from mqrt.device.controller import (
    DEV_COUNTERS,
    ControllerPlan,
    Namespace,
    QueueRegions,
    controller_main,
)
from mqrt.device.nvme_admin import IDENTIFY_CTRL
from mqrt.device.nvme_defs import (
    CID_TAG_MASK,
    CQE,
    CQE_OFF_CID_STATUS,
    NVME_AQ_DEPTH,
    NVME_CTRL_PAGE_SHIFT,
    NVME_MAX_KB_SZ,
    NVME_MAX_RETRIES,
    NVME_MAX_SEGS,
    NVME_QUEUE,
    NVME_REGS,
    NVME_SC_DNR,
    NVME_SC_MASK,
    SQE,
    AdminOpcode,
    CtrlState,
    Feature,
    IdentifyCns,
    IoOpcode,
    Status,
    nvme_cid,
)
from mqrt.device.nvme_model import DEVICE_KNOBS
from mqrt.lib import trace, wait
from mqrt.lib.knobs import Knob, KnobError, KnobValues, parse_knobs
from mqrt.lib.sbitmap import SbqGeneration
from mqrt.lib.shm import Arena, Layout, Region
from mqrt.lib.trace import Ev
from mqrt.lib.wait import spin_lock, spin_unlock

_fork = mp.get_context("fork")

#: nvme module parameters and controller shape mqrt models.
NVME_KNOBS: tuple[Knob, ...] = (
    Knob("io_queue_depth", "int", 1024,
         "Entries per I/O queue (the tag set gets one less). Default: 1024", 2, 4096),
    Knob("nr_io_queues", "int", 0,
         "I/O queue pairs to create (0: one per CPU, as nvme does). Default: 0", 0, 1024),
    Knob("poll_queues", "int", 0,
         "Queue pairs for polled I/O (hipri): no interrupts, reaped by the submitter. "
         "Default: 0", 0, 1024),
    Knob("nr_namespaces", "int", 1,
         "Namespaces on the controller, each a request queue. Default: 1", 1, 64),
    Knob("ns_gb", "int", 128, "Size of each namespace in GB. Default: 128", 1, 1 << 20),
    Knob("lba_size", "int", 512, "Logical block size in bytes. Default: 512", 512, 4096),
    Knob("lost_irq", "float", 0.0,
         "Percent of interrupts the device loses (the timeout polls the CQ). Default: 0",
         0.0, 100.0),
    Knob("drop_completion", "float", 0.0,
         "Percent of commands whose completion the device drops (timeout, abort). "
         "Default: 0", 0.0, 100.0),
    Knob("error_status", "float", 0.0,
         "Percent of commands completed with a media error. Default: 0", 0.0, 100.0),
    Knob("delay_pct", "float", 0.0, "Percent of commands delayed by delay_ns. Default: 0",
         0.0, 100.0),
    Knob("delay_ns", "int", 1_000_000, "Extra service time of delayed commands. Default: 1 ms",
         0, 60_000_000_000),
)  # fmt: skip

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

#: Request PDU (struct nvme_iod + nvme_request), bytes: genctr, aborted flag, retries.
NVME_CMD_SIZE = 8
_GENCTR, _ABORTED, _RETRIES = 0, 1, 2

_DONTPREP = int(Rqf.DONTPREP)
_LIVE, _RESETTING, _DEAD = int(CtrlState.LIVE), int(CtrlState.RESETTING), int(CtrlState.DEAD)


def nvme_error_status(status: int) -> int:
    """nvme_error_status(): the NVMe status (SCT << 8 | SC, flags above) -> blk_status_t."""
    return int(_BLK_STATUS.get(status & NVME_SC_MASK, BlkStatus.IOERR))


def set_queue_enabled(a, o, on: bool) -> None:
    """Set or clear NVMEQ_ENABLED of the queue whose words are at ``o`` (under its
    sq_lock, which every submitter holds while it checks the flag)."""
    spin_lock(a, o.sq_lock)
    a.set32(o.enabled, int(on))
    spin_unlock(a, o.sq_lock)


class NvmeQueue:
    """One process's handle on a queue pair (struct nvme_queue)."""

    def __init__(self, arena: Arena, regions: QueueRegions, regs: Region, kick_fd: int):
        self.a = a = arena.atomic
        self.buf = arena.buf
        self.qid = regions.qid
        o = regions.words.offsets()
        self.o = o
        self.sq_base = regions.sq.offset
        self.cq_base = regions.cq.offset
        self.depth = a.read32(o.q_depth) or regions.max_depth
        r = regs.offsets()
        self._need_kick = r.need_kick
        self.kick_fd = kick_fd

    def refresh(self) -> None:
        self.depth = self.a.read32(self.o.q_depth)

    def cqe_pending(self) -> bool:
        """nvme_cqe_pending(): does the CQE at our head carry our phase?  A lockless
        peek (the poll path's cheap test before it takes the CQ lock)."""
        a, o = self.a, self.o
        off = self.cq_base + a.read32(o.cq_head) * CQE.size
        return (a.load_acquire32(off + CQE_OFF_CID_STATUS) >> 16) & 1 == a.read32(o.cq_phase)

    # -- submission (nvme_sq_copy_cmd, nvme_write_sq_db) ----------------------------------

    def submit(self, sqe_args: tuple, ring: bool) -> bool:
        """Copy one SQE at the tail (ringing the doorbell if ``ring``); False, and
        nothing written, while the queue is disabled (a reset is under way)."""
        if not self.lock_enabled():
            return False
        try:
            self.copy_cmd(sqe_args, ring)
        finally:
            spin_unlock(self.a, self.o.sq_lock)
        return True

    def lock_enabled(self) -> bool:
        """Take sq_lock if the queue is enabled (NVMEQ_ENABLED); False, unlocked, if
        it is not.  A reset clears ``enabled`` under the same lock, so a command
        either is in the SQ before the reset looks, or is never written."""
        a, o = self.a, self.o
        spin_lock(a, o.sq_lock)
        if a.read32(o.enabled):
            return True
        spin_unlock(a, o.sq_lock)
        return False

    def unlock(self) -> None:
        spin_unlock(self.a, self.o.sq_lock)

    def copy_cmd(self, sqe_args: tuple, ring: bool) -> None:
        """nvme_sq_copy_cmd() (+ the doorbell when ``ring``); under sq_lock."""
        a, o = self.a, self.o
        tail = a.read32(o.sq_tail)
        SQE.pack_into(self.buf, self.sq_base + tail * SQE.size, *sqe_args)
        tail += 1
        if tail == self.depth:
            tail = 0
        a.set32(o.sq_tail, tail)
        if ring:
            self._write_sq_db(tail)

    def commit(self) -> None:
        """nvme_commit_rqs(): ring the doorbell for entries written without it."""
        a, o = self.a, self.o
        spin_lock(a, o.sq_lock)
        try:
            tail = a.read32(o.sq_tail)
            if tail != a.read32(o.last_sq_tail):
                self._write_sq_db(tail)
        finally:
            spin_unlock(a, o.sq_lock)

    def _write_sq_db(self, tail: int) -> None:
        """The doorbell store is an xchg (a full barrier): the entries are visible
        before it, and it is ordered before the need_kick check (pairs with the
        controller's xchg of need_kick before its last look at the doorbells)."""
        a = self.a
        a.xchg32(self.o.sq_tail_db, tail)
        a.set32(self.o.last_sq_tail, tail)
        if a.read32(self._need_kick) and a.xchg32(self._need_kick, 0):
            os.eventfd_write(self.kick_fd, 1)

    # -- completion (nvme_cqe_pending, nvme_update_cq_head, nvme_ring_cq_doorbell) --------

    def reap(self, budget: int = 1 << 30, trylock: bool = False) -> list[tuple]:
        """Consume CQEs while their phase tag matches ours: a list of
        (cid, status, result, sq_head, sq_id).  With ``trylock``, give up at once if
        another CPU is reaping (nvme_poll_irqdisable's cq_poll_lock)."""
        a, o, buf = self.a, self.o, self.buf
        if trylock:
            if a.test_and_set_bit_lock(o.cq_lock, 0):
                return []
        else:
            spin_lock(a, o.cq_lock)
        out: list[tuple[int, int, int, int, int]] = []
        try:
            head = a.read32(o.cq_head)
            phase = a.read32(o.cq_phase)
            depth = self.depth
            base = self.cq_base
            while len(out) < budget:
                off = base + head * CQE.size
                word = a.load_acquire32(off + CQE_OFF_CID_STATUS)  # cid | status << 16: phase first
                if (word >> 16) & 1 != phase:
                    break
                result, _dw1, sq_head, sq_id = struct.unpack_from("<IIHH", buf, off)
                out.append((word & 0xFFFF, (word >> 17) & 0x7FFF, result, sq_head, sq_id))
                head += 1
                if head == depth:
                    head = 0
                    phase ^= 1
            if out:
                a.set32(o.cq_head, head)
                a.set32(o.cq_phase, phase)
                a.store_release32(o.cq_head_db, head)  # after the entries were read
        finally:
            spin_unlock(a, o.cq_lock)
        return out

    def reset(self) -> None:
        """nvme_init_queue() for a queue the controller has dropped (it is disabled,
        so nobody submits): tails, heads and doorbells to 0, phase 1, the CQ zeroed
        so no old entry carries the phase the host expects next."""
        a, o = self.a, self.o
        spin_lock(a, o.sq_lock)
        spin_lock(a, o.cq_lock)
        try:
            for name in ("sq_tail", "last_sq_tail", "sq_tail_db", "cq_head", "cq_head_db"):
                a.set32(getattr(o, name), 0)
            a.set32(o.cq_phase, 1)
            a.xchg32(o.irq_pending, 0)
            depth = self.depth or a.read32(o.q_depth)
            self.buf[self.cq_base : self.cq_base + depth * CQE.size] = bytes(depth * CQE.size)
        finally:
            spin_unlock(a, o.cq_lock)
            spin_unlock(a, o.sq_lock)

    def set_enabled(self, on: bool) -> None:
        set_queue_enabled(self.a, self.o, on)


class NvmeConfig(KnobValues):
    """The nvme driver's and the device's knobs (NVME_KNOBS + DEVICE_KNOBS), validated."""


def parse_config(given: dict[str, Any]) -> NvmeConfig:
    return NvmeConfig(parse_knobs((*NVME_KNOBS, *DEVICE_KNOBS), given))


class NvmeOps(BlkMqOps):
    """The nvme driver's blk_mq_ops plus the controller's plumbing (created in the
    runtime; CPUs use a forked copy, bound with :meth:`bind`)."""

    name = "nvme"

    def __init__(self, cfg: NvmeConfig, nr_io_queues: int, nr_poll_queues: int = 0):
        self.cfg = cfg
        self.nr_io_queues = nr_io_queues  #: every I/O queue pair, poll queues last
        self.nr_poll_queues = nr_poll_queues
        self.lba_shift = cfg.lba_size.bit_length() - 1
        self.sect_shift = self.lba_shift - 9
        self.regions: list[QueueRegions] = []
        self.regs: Region | None = None
        self.data: Region | None = None
        self.counters: Region | None = None
        self.admin_cid: Region | None = None
        self.kick_fd = -1
        self.irq_r: list[int] = []
        self.irq_w: list[int] = []
        self.vector_cpu: list[int] = []  #: vector -> CPU it is affine to
        self.queues: list[RequestQueue] = []
        self.nvmeqs: list[NvmeQueue] = []
        self.mq: BlkMq | None = None
        self.stats = dict.fromkeys(
            ("genctr_mismatch", "completion_polled", "aborts_sent", "resets", "cancelled",
             "retries", "interrupts", "admin_interrupts", "cqes"), 0)  # fmt: skip

    # -- layout (in the owner) ----------------------------------------------------------

    def declare(self, layout: Layout) -> None:
        depth = self.cfg.io_queue_depth
        self.regs = layout.add("nvme.regs", NVME_REGS)
        self.data = layout.add("nvme.admin_data", "V4096")
        self.counters = layout.add("nvme.counters", DEV_COUNTERS)
        self.admin_cid = layout.add("nvme.admin_cid", "<u8")
        for qid in range(self.nr_io_queues + 1):
            qdepth = NVME_AQ_DEPTH if qid == 0 else depth
            words = layout.add(f"nvme.q{qid}", NVME_QUEUE)
            sq = layout.add(f"nvme.q{qid}.sq", "V64", qdepth)
            cq = layout.add(f"nvme.q{qid}.cq", "V16", qdepth)
            self.regions.append(QueueRegions(qid, qdepth, words, sq, cq))

    def init_shared(self, arena: Arena) -> None:
        """Owner only: the admin queue's depth; host phases start at 1."""
        a = arena.atomic
        for q in self.regions:
            o = q.words.offsets()
            a.set32(o.q_depth, q.max_depth if q.qid == 0 else 0)
            a.set32(o.cq_phase, 1)

    def make_fds(self) -> list[int]:
        """Owner only, before forking: the kick eventfd and one pipe per vector."""
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for _ in self.regions:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.irq_r.append(r)
            self.irq_w.append(w)
        return [self.kick_fd, *self.irq_r, *self.irq_w]

    def device_plan(self, arena: Arena) -> ControllerPlan:
        cfg = self.cfg
        nr_blocks = (cfg.ns_gb << 30) >> self.lba_shift
        faults = {
            "lost_irq_pct": cfg.lost_irq,
            "drop_pct": cfg.drop_completion,
            "error_pct": cfg.error_status,
            "delay_pct": cfg.delay_pct,
            "delay_ns": cfg.delay_ns,
        }
        return ControllerPlan(
            arena=arena,
            regs=self.regs,  # type: ignore[arg-type]
            queues=self.regions,
            data=self.data,  # type: ignore[arg-type]
            counters=self.counters,  # type: ignore[arg-type]
            kick_fd=self.kick_fd,
            irq_w=self.irq_w,
            namespaces=[
                Namespace(i + 1, nr_blocks, self.lba_shift) for i in range(cfg.nr_namespaces)
            ],
            model={k.name: cfg.values[k.name] for k in DEVICE_KNOBS},
            faults={k: v for k, v in faults.items() if v} if any(faults.values()) else {},
            max_io_queues=self.nr_io_queues,
        )

    def start_device(self, arena: Arena, host_core: int | None) -> DeviceProcess:
        """Fork the controller process."""
        c_r, c_w = _fork.Pipe(duplex=False)
        r_r, r_w = _fork.Pipe(duplex=False)
        p = _fork.Process(
            target=controller_main,
            args=(self.device_plan(arena), c_r, r_w, host_core, os.getpid()),
            name="mqrt-nvme",
            daemon=True,
        )
        p.start()
        c_r.close()
        r_w.close()
        return DeviceProcess(p, c_w, r_r)

    # -- the probe (in the owner, once the controller runs) ------------------------------

    def probe(self, arena: Arena, timeout: float = 10.0) -> dict[str, Any]:
        """nvme_probe() -> nvme_reset_work(): enable, identify the controller and its
        namespaces, then the features and I/O queues (:meth:`_setup_io`)."""
        admin = NvmeQueue(arena, self.regions[0], self.regs, self.kick_fd)  # type: ignore[arg-type]
        deadline = time.monotonic() + timeout
        self._enable_ctrl(admin, deadline)
        cfg = self.cfg
        data = self.data.offset  # type: ignore[union-attr]
        self._admin_cmd(admin, deadline, AdminOpcode.IDENTIFY, 0, IdentifyCns.CONTROLLER, 0, data)
        ident = IDENTIFY_CTRL.unpack_from(arena.buf, data)
        mdts, nn, mqes = ident[5], ident[6], ident[7]
        max_hw_sectors = nvme_max_hw_sectors(mdts)
        for ns_q in self.queues:
            nvme_set_queue_limits(ns_q, max_hw_sectors)
        if nn < cfg.nr_namespaces:
            raise RuntimeError(f"nvme: controller has {nn} namespaces, {cfg.nr_namespaces} asked")
        for nsid in range(1, cfg.nr_namespaces + 1):
            self._admin_cmd(
                admin, deadline, AdminOpcode.IDENTIFY, nsid, IdentifyCns.NAMESPACE, 0, data
            )
        depth = min(cfg.io_queue_depth, mqes + 1)
        for q in self.regions[1:]:
            admin.a.set32(q.words.offsets().q_depth, depth)
        self._setup_io(admin, deadline)
        admin.a.set32(self.regs.offsets().ctrl_state, _LIVE)  # type: ignore[union-attr]
        return {"namespaces": nn, "io_queues": self.nr_io_queues, "queue_depth": depth,
                "mn": ident[3].rstrip(b"\0").decode(), "mdts": mdts,
                "max_hw_sectors_kb": max_hw_sectors >> 1}  # fmt: skip

    def _enable_ctrl(self, admin: NvmeQueue, deadline: float) -> None:
        """CC.EN = 1 and wait for CSTS.RDY (nvme_enable_ctrl); the admin queue is
        usable from then on."""
        a = admin.a
        r = self.regs.offsets()  # type: ignore[union-attr]
        a.store_release32(r.cc_en, 1)
        self._kick(a, r.need_kick, force=True)
        while not a.load_acquire32(r.csts_rdy):
            self._reset_wait(deadline, "did not become ready (CSTS.RDY)")
        admin.set_enabled(True)

    def _setup_io(self, admin: NvmeQueue, deadline: float) -> None:
        """nvme_setup_io_queues(): the number of queues, interrupt coalescing, then
        each I/O CQ before its SQ; a queue is enabled once both exist."""
        cfg = self.cfg
        n = self.nr_io_queues
        res = self._admin_cmd(
            admin, deadline, AdminOpcode.SET_FEATURES, 0, Feature.NUM_QUEUES,
            (n - 1) | (n - 1) << 16,
        )  # fmt: skip
        if (res & 0xFFFF) + 1 < n:
            raise RuntimeError(f"nvme: controller grants {(res & 0xFFFF) + 1} I/O queues, not {n}")
        thr, tim = cfg.irq_coalesce_thr, cfg.irq_coalesce_time
        self._admin_cmd(
            admin, deadline, AdminOpcode.SET_FEATURES, 0, Feature.IRQ_COALESCE, thr | tim << 8
        )
        first_poll = n - self.nr_poll_queues + 1
        a = admin.a
        for qid in range(1, n + 1):
            q = self.regions[qid]
            depth = a.read32(q.words.offsets().q_depth)
            # Vector qid with interrupts enabled, or, for a poll queue, interrupts
            # disabled (nvme_create_cq without NVME_CQ_IRQ_ENABLED).
            flags = 0x1 if qid >= first_poll else qid << 16 | 0x3
            size_qid = (depth - 1) << 16 | qid
            self._admin_cmd(admin, deadline, AdminOpcode.CREATE_CQ, 0, size_qid, flags)
            self._admin_cmd(
                admin, deadline, AdminOpcode.CREATE_SQ, 0, size_qid, qid << 16 | 1 << 1 | 1
            )
            set_queue_enabled(a, q.words.offsets(), True)

    def _admin_cmd(self, admin: NvmeQueue, deadline: float, opcode: int, nsid: int = 0,
                   cdw10: int = 0, cdw11: int = 0, prp1: int = 0) -> int:  # fmt: skip
        status, result = self.admin_sync(admin, opcode, nsid, cdw10, cdw11, prp1, deadline)
        if status != Status.SUCCESS:
            raise RuntimeError(
                f"nvme: admin {AdminOpcode(opcode).name} failed with status {status:#x}"
            )
        return result

    def _kick(self, a, need_kick_off: int, force: bool = False) -> None:
        if force or (a.read32(need_kick_off) and a.xchg32(need_kick_off, 0)):
            os.eventfd_write(self.kick_fd, 1)

    def _admin_cid(self, a) -> int:
        return a.fetch_add(self.admin_cid.offset, 1) & CID_TAG_MASK  # type: ignore[union-attr]

    def admin_sync(self, admin: NvmeQueue, opcode, nsid, cdw10, cdw11, prp1,
                   deadline: float) -> tuple[int, int]:  # fmt: skip
        """Submit an admin command and wait for its completion (polling the admin CQ,
        sleeping on its vector's pipe)."""
        a = admin.a
        cid = self._admin_cid(a)
        sqe = (opcode, 0, cid, nsid, 0, 0, prp1, 0, cdw10, cdw11, 0, 0, 0, 0)
        if not admin.submit(sqe, True):
            raise RuntimeError(f"nvme: admin {AdminOpcode(opcode).name}: admin queue disabled")
        while True:
            a.xchg32(admin.o.irq_pending, 0)  # acknowledge the admin vector, then reap
            for got_cid, status, result, _sqh, _sqid in admin.reap():
                if got_cid == cid:
                    return status, result
            if time.monotonic() > deadline:
                raise RuntimeError(f"nvme: admin {AdminOpcode(opcode).name} timed out")
            # (another CPU may take the vector's byte: look again soon regardless)
            select.select([self.irq_r[0]], [], [], 0.002)
            with contextlib.suppress(BlockingIOError):
                os.read(self.irq_r[0], 4096)

    def shutdown(self, arena: Arena) -> None:
        """nvme_dev_disable() at the end of a run: CC.EN = 0."""
        r = self.regs.offsets()  # type: ignore[union-attr]
        arena.atomic.store_release32(r.cc_en, 0)
        self._kick(arena.atomic, r.need_kick, force=True)

    def device_counters(self, arena: Arena) -> dict[str, int]:
        v = arena.view(self.counters)  # type: ignore[arg-type]
        out = {name: int(v[name][0]) for name in v.dtype.names or ()}
        del v
        return out

    # -- in a CPU ----------------------------------------------------------------------------------

    def bind(self, arena: Arena, mq: BlkMq | None, cpu: int) -> None:
        self.mq = mq
        self.cpu = cpu
        self.nvmeqs = [NvmeQueue(arena, q, self.regs, self.kick_fd) for q in self.regions]  # type: ignore[arg-type]
        for q in self.nvmeqs[1:]:
            q.refresh()
        self._ctrl_state = self.regs.offsets().ctrl_state  # type: ignore[union-attr]

    def irq_handlers(self, mq: BlkMq, cpu: int) -> list[IrqHandler]:
        """The vectors affine to ``cpu``: fd -> nvme_irq for that queue."""
        out: list[IrqHandler] = []
        for vec, owner in enumerate(self.vector_cpu):
            if owner == cpu:
                out.append((self.irq_r[vec], functools.partial(self.nvme_irq, vec)))
        return out

    def driver_stats(self) -> dict[str, int]:
        return dict(self.stats)

    def map_queues(self, tset: TagSet) -> None:
        """nvme_pci_map_queues(): DEFAULT over the interrupt-driven queues, no READ
        queues, POLL over the poll queues (numbered after them)."""
        from mqrt.block.blk_mq_cpumap import map_queue_types

        poll = self.nr_poll_queues
        map_queue_types(tset.map, tset.topology, (self.nr_io_queues - poll, 0, poll))

    def poll(self, mq: BlkMq, hctx: HwCtx) -> int:
        """nvme_poll(): a lockless look at the CQ, then reap it unless another CPU
        is already doing so."""
        q = self.nvmeqs[hctx.index + 1]
        if not q.cqe_pending():
            return 0
        return self.poll_cq(hctx.index + 1, trylock=True)

    def queue_rq(self, mq: BlkMq, hctx: HwCtx, rq: Request, last: bool) -> int:
        """nvme_queue_rq(): a disabled queue (a reset is under way) refuses with
        BLK_STS_RESOURCE, and blk-mq retries later; a dead controller fails it."""
        nvmeq = self.nvmeqs[hctx.index + 1]
        if not nvmeq.lock_enabled():
            if nvmeq.a.read32(self._ctrl_state) == _DEAD:
                return BlkStatus.IOERR
            return BlkStatus.RESOURCE
        try:
            pdu = rq.pdu
            genctr = (pdu[_GENCTR] + 1) & 0xF  # type: ignore[index]
            pdu[_GENCTR] = genctr  # type: ignore[index]
            pdu[_ABORTED] = 0  # type: ignore[index]
            a = nvmeq.a
            if not a.read32(rq.base + RQ_OFF_FLAGS) & _DONTPREP:  # nvme_setup_cmd(): a new command
                pdu[_RETRIES] = 0  # type: ignore[index]
                a.fetch_or32(rq.base + RQ_OFF_FLAGS, _DONTPREP)
            st = rq.setup()  # start, sector, nr_sectors, bios, segments, cpu, hctx, q, op, ...
            mq.start_request(rq)
            opcode = IoOpcode.READ if st[8] == 0 else IoOpcode.WRITE
            slba = st[1] >> self.sect_shift
            nlb = (st[2] >> self.sect_shift) - 1
            nvmeq.copy_cmd(
                (
                    opcode, 0, nvme_cid(genctr, rq.tag), st[7] + 1, 0, 0, 0, 0,
                    slba & 0xFFFFFFFF, slba >> 32, nlb, 0, 0, 0,
                ),
                last,
            )  # fmt: skip
        finally:
            nvmeq.unlock()
        return 0

    def commit_rqs(self, mq: BlkMq, hctx: HwCtx) -> None:
        self.nvmeqs[hctx.index + 1].commit()

    def nvme_irq(self, vec: int) -> None:
        """nvme_irq(): the vector fired: reap its CQ (and, on vector 0, admin CQEs)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.irq_r[vec], 4096)
        # the admin vector (0) fires for Abort completions and for the probe's last
        # admin commands, whose byte may still be in the pipe when the CPUs start
        self.stats["interrupts" if vec else "admin_interrupts"] += 1
        # Acknowledge (clear the pending bit) before reaping: a CQE posted after the
        # reap raises the vector again.
        q = self.nvmeqs[vec]
        q.a.xchg32(q.o.irq_pending, 0)
        found = self.poll_cq(vec)
        if trace.on:
            trace.emit(Ev.IRQ, -1, 0, max(vec - 1, 0), 0, found)

    def poll_cq(self, qid: int, trylock: bool = False) -> int:
        """nvme_poll_cq(): complete every CQE found; how many."""
        nvmeq = self.nvmeqs[qid]
        if qid == 0:
            if nvmeq.a.read32(self._ctrl_state) != _LIVE:
                return 0  # the CPU resetting the controller reaps the admin CQ itself
            return len(nvmeq.reap(trylock=trylock))  # Aborts: nothing to end (abort_endio)
        cqes = nvmeq.reap(trylock=trylock)
        mq = self.mq
        tags = mq.queues[0].hctxs[qid - 1].tags  # type: ignore[union-attr]
        batch: list[Request] = []  # DEFINE_IO_COMP_BATCH(iob)
        for cid, status, _result, _sqh, _sqid in cqes:
            self.stats["cqes"] += 1
            self._handle_cqe(mq, tags, cid, status, batch)
        if batch:  # nvme_pci_complete_batch()
            mq.end_request_batch(batch)  # type: ignore[union-attr]
        return len(cqes)

    def _handle_cqe(self, mq, tags, cid: int, status: int, batch: list | None = None) -> None:
        """nvme_handle_cqe(): command id -> request, with the genctr check; a
        successful one joins the completion batch, others complete one by one."""
        tag = cid & CID_TAG_MASK
        if tag >= tags.nr_tags:
            self.stats["genctr_mismatch"] += 1
            return
        rq = mq.rqs[0][tags.rq_base + tag]  # every namespace shares the tag set's pool
        genctr = rq.pdu[_GENCTR]
        if cid >> 12 != genctr:
            # "request %#x genctr mismatch (got %#x expected %#x)"
            self.stats["genctr_mismatch"] += 1
            return
        if status == 0 and batch is not None:  # blk_mq_add_to_batch()
            mq.add_to_batch(rq, rq.gen, batch)
            return
        # The request's status word holds the NVMe status (nvme_req(req)->status),
        # written by whichever completion wins.
        mq.complete_request(rq, rq.gen, status=status)

    def complete(self, mq: BlkMq, rq: Request) -> None:
        """nvme_pci_complete_rq() -> nvme_complete_rq(): nvme_decide_disposition()
        retries a failed command without DNR (up to nvme_max_retries, not on a dead
        controller) by requeueing it; otherwise the request ends with the status
        mapped by nvme_error_status()."""
        status = rq.status
        if status:
            pdu = rq.pdu
            if (
                not status & NVME_SC_DNR
                and pdu[_RETRIES] < NVME_MAX_RETRIES  # type: ignore[index]
                and mq.a.read32(self._ctrl_state) != _DEAD
            ):
                pdu[_RETRIES] += 1  # type: ignore[index]
                self.stats["retries"] += 1
                mq.requeue_request(rq, kick=True)
                return
        mq.end_request(rq, nvme_error_status(status))

    def timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """nvme_timeout(): poll the CQ ("completion polled": a lost interrupt); while
        a reset runs, wait for it; the first time, send an Abort; a command that
        times out again after its Abort resets the controller."""
        a = mq.a
        if a.read32(self._ctrl_state) == _RESETTING:
            return EhRet.RESET_TIMER  # the reset cancels it
        st = rq.setup()
        qid = st[6] + 1
        before = rq.state_word
        self.poll_cq(qid)
        if rq.state_word != before:
            # "I/O tag %d QID %d timeout, completion polled"
            self.stats["completion_polled"] += 1
            return EhRet.DONE
        pdu = rq.pdu
        if not pdu[_ABORTED]:  # type: ignore[index]
            # "I/O tag %d QID %d timeout, aborting": an Abort on the admin queue (not
            # sent while the admin queue is disabled by a reset).
            pdu[_ABORTED] = 1  # type: ignore[index]
            admin = self.nvmeqs[0]
            abort_cdw10 = qid | nvme_cid(pdu[_GENCTR], rq.tag) << 16  # type: ignore[index]
            sqe = (AdminOpcode.ABORT, 0, self._admin_cid(a), 0, 0, 0, 0, 0, abort_cdw10,
                   0, 0, 0, 0, 0)  # fmt: skip
            if admin.submit(sqe, True):
                self.stats["aborts_sent"] += 1
            return EhRet.RESET_TIMER
        # "I/O tag %d QID %d timeout, reset controller"
        self.reset_ctrl(mq)
        return EhRet.DONE  # cancelled by the reset (or completed before it)

    def reset_ctrl(self, mq: BlkMq, timeout: float = 5.0) -> bool:
        """nvme_dev_disable() + nvme_reset_work(), run by the CPU whose timeout fired
        (the kernel queues it on nvme-reset-wq): False if a reset is already under
        way.  Every command the controller held is cancelled with HOST_ABORTED_CMD
        and, having no DNR, retried by :meth:`complete`; a controller that does not
        come back is marked DEAD and what is left fails."""
        a = mq.a
        if a.cmpxchg32(self._ctrl_state, _LIVE, _RESETTING) != _LIVE:
            return False
        self.stats["resets"] += 1
        r = self.regs.offsets()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        admin = self.nvmeqs[0]
        try:
            # Disable: no new SQE anywhere (NVMEQ_ENABLED off under each sq_lock),
            # CC.EN = 0, then reap what the controller had posted before it stopped.
            for nvmeq in self.nvmeqs:
                nvmeq.set_enabled(False)
            a.store_release32(r.cc_en, 0)
            self._kick(a, r.need_kick, force=True)
            while a.load_acquire32(r.csts_rdy):
                self._reset_wait(deadline, "did not stop (CSTS.RDY stays 1)")
            for qid in range(1, len(self.nvmeqs)):
                self.poll_cq(qid)  # nvme_reap_pending_cqes()
            # nvme_cancel_request() for every command still started.
            self.stats["cancelled"] += self._cancel_all(mq, Status.HOST_ABORTED_CMD)
            # nvme_reset_work(): fresh queues, enable, features, I/O queues again.
            for nvmeq in self.nvmeqs:
                nvmeq.reset()
            self._enable_ctrl(admin, deadline)
            self._setup_io(admin, deadline)
        except RuntimeError as exc:
            # nvme_remove_dead_ctrl(): fail everything, now and from now on.
            a.set32(self._ctrl_state, _DEAD)
            mq.violation(f"nvme: controller reset failed, controller dead: {exc}")
            self._cancel_all(mq, NVME_SC_DNR | Status.HOST_ABORTED_CMD)
            return True
        a.fetch_add32(r.resets, 1)
        a.set32(self._ctrl_state, _LIVE)
        for queue in mq.queues:  # nvme_start_queues(): run what waited
            mq.run_hw_queues(queue, True)
        return True

    def _reset_wait(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"controller {what}")
        if wait.long_spin_hook is not None:
            wait.long_spin_hook()  # the run may be ending (the device may have died)
        time.sleep(0.0002)

    @staticmethod
    def _cancel_all(mq: BlkMq, status: int) -> int:
        """blk_mq_tagset_busy_iter(nvme_cancel_request): complete every started
        request of the tag set with ``status``; how many this call completed."""
        n = 0
        for rq in mq.rqs[0]:  # the namespaces share the set's pool
            if rq.state == RqState.IN_FLIGHT and mq.complete_request(rq, rq.gen, status=status):
                n += 1
        return n


def nvme_max_hw_sectors(mdts: int) -> int:
    """nvme_init_identify(): the largest command, in sectors: what the controller's
    MDTS allows (2^mdts controller pages; 0: no limit), at most what the PCI driver
    maps in one command (NVME_MAX_KB_SZ)."""
    limit = NVME_MAX_KB_SZ << 1
    if mdts:
        limit = min(limit, 1 << (mdts + NVME_CTRL_PAGE_SHIFT - SECTOR_SHIFT))
    return limit


def nvme_set_queue_limits(q: RequestQueue, max_hw_sectors: int) -> None:
    """nvme_set_queue_limits(): the controller's largest command as the queue's
    hardware limit, and one segment per controller page of it (plus one for an
    unaligned start), at most NVME_MAX_SEGS."""
    max_segments = min(max_hw_sectors // (1 << (NVME_CTRL_PAGE_SHIFT - SECTOR_SHIFT)) + 1,
                       NVME_MAX_SEGS)  # fmt: skip
    blk_queue_max_hw_sectors(q, max_hw_sectors)
    blk_queue_max_segments(q, max_segments)


def setup(
    cfg: NvmeConfig,
    layout: Layout,
    topology: Topology,
    *,
    rq_affinity: int = 1,
    timeout_ms: int = 30_000,
    pool_limit_bytes: int | None = None,
    generation: SbqGeneration = SbqGeneration.CURRENT,
    async_depth: int = 0,
    nomerges: int = 0,
) -> tuple[NvmeOps, list[RequestQueue]]:
    """nvme_alloc_io_tag_set() and one queue per namespace, declared in ``layout``."""
    nr_default = min(cfg.nr_io_queues or topology.nr_cpus, topology.nr_cpus)
    nr_poll = min(cfg.poll_queues, topology.nr_cpus)
    nr_io_queues = nr_default + nr_poll
    ops = NvmeOps(cfg, nr_io_queues, nr_poll)
    ops.declare(layout)
    tset = TagSet(
        ops=ops,
        nr_hw_queues=nr_io_queues,
        nr_maps=HCTX_MAX_TYPES if nr_poll else 1,  # nvme_alloc_io_tag_set()
        queue_depth=cfg.io_queue_depth - 1,  # the SQ keeps one slot empty
        cmd_size=NVME_CMD_SIZE,
        timeout_ms=timeout_ms,
        flags=BlkMqFlag.SHOULD_MERGE,
        name="nvme_tag_set",
        pool_limit_bytes=pool_limit_bytes,
        generation=generation,
    )
    alloc_tag_set(tset, layout, topology)
    if tset.queue_depth > cfg.io_queue_depth - 1:
        raise KnobError("io_queue_depth: inconsistent tag set depth")
    queues = [
        init_queue(
            tset,
            layout,
            i,
            f"nvme0n{i + 1}",
            rq_affinity=rq_affinity,
            async_depth=async_depth,
            nomerges=nomerges,
        )
        for i in range(cfg.nr_namespaces)
    ]
    ops.queues = queues
    q0 = queues[0]
    # Vector qid is affine to the first CPU of hctx qid - 1; poll queues have none.
    ops.vector_cpu = [0] + [q0.hctx_cpus[h][0] if q0.hctx_cpus[h] else 0
                            for h in range(nr_default)] + [-1] * nr_poll  # fmt: skip

    return ops, queues


def describe(cfg: NvmeConfig) -> dict[str, Any]:
    return dict(cfg.values)
