"""The nvme driver (``drivers/nvme/host/pci.c``): blk-mq ops over a controller process.

Host side of every queue pair (``struct nvme_queue``) lives in shared memory because
several CPU processes play the host: ``sq_tail``/``last_sq_tail`` under ``sq_lock``
(the CPUs of an hctx share its SQ), ``cq_head``/``cq_phase`` under ``cq_lock`` (the
CPU the vector is affine to reaps; a timeout on another CPU may poll it too).

* ``queue_rq`` (``nvme_queue_rq``): start the request, build the SQE with command id
  ``genctr << 12 | tag``, copy it at the SQ tail; ring the doorbell only when
  ``bd->last`` (``commit_rqs`` rings it when a batch ends early).  The doorbell is a
  shadow doorbell in shared memory; the device worker serving the queue is kicked
  only when the new tail passes the queue's event index (``nvme_dbbuf_need_event``).
* the interrupt (``nvme_irq`` -> ``nvme_poll_cq``): reap CQEs while their phase tag
  matches, look each command id up with the generation check ("genctr mismatch"),
  complete through blk-mq, then one CQ head doorbell write; the handler clears the
  vector's pending bit before it reaps.  With ``irq_poll_us`` the vector stays
  pending (masked) after the interrupt and the CPU polls its CQ instead of sleeping
  (:meth:`NvmeOps.irq_poll`).
* ``timeout`` (``nvme_timeout``, :meth:`NvmeOps.nvme_timeout`), on the queue the
  request's iod names, in the kernel's order: a failed controller (CSTS.CFS) is reset
  at once; then that CQ is polled ("completion polled": a lost interrupt); then the
  state: CONNECTING or DELETING cancel the command, RESETTING gives it another
  timeout; an admin command, or an I/O command that times out again after its Abort,
  resets the controller (:meth:`NvmeOps.reset_ctrl`); otherwise an Abort goes to the
  admin queue, at most ``abort_limit`` (ACL + 1) at a time, and the command gets
  another timeout.
  Cancelled and aborted commands have no DNR, so ``complete`` (``nvme_complete_rq``)
  retries them up to ``nvme_max_retries``.
* ``poll`` (``nvme_poll``): poll queues (``poll_queues``) are created without an
  interrupt; the CPU that submitted a polled bio reaps them.
* ``init_hctx`` (``nvme_init_hctx``): hctx ``i``'s driver_data is I/O queue ``i + 1``
  (its :class:`NvmeQueue`, what ``queue_rq``, ``commit_rqs`` and ``poll`` use);
  ``init_request`` (``nvme_pci_init_request``, the admin tag set's too): the iod's
  queue, in the PDU, is I/O queue ``hctx_idx + 1``, or the admin queue for an admin
  request.
* ``map_queues``: DEFAULT over the interrupt-driven queues, POLL over the poll queues;
  vector ``qid`` is affine to the first CPU of hctx ``qid - 1``.  Namespaces are
  request queues on the controller's tag set (``TAG_QUEUE_SHARED`` with more than one).

Admin commands go through blk-mq on ``admin_q``, a queue on the admin tag set
(``nvme_alloc_admin_tags``: one hw queue, NVME_AQ_MQ_TAG_DEPTH tags, ADMIN_TIMEOUT,
BLK_MQ_F_NO_SCHED, nvme_mq_admin_ops with nvme_admin_init_hctx), so the admin SQ
cannot be overrun; how each process drives it is :mod:`mqrt.device.nvme_core`.

The probe (``nvme_probe`` -> ``nvme_reset_work``) runs in the runtime before the CPUs
start: enable the controller (CONNECTING), identify it (ACL -> ``abort_limit``) and its
namespaces, set the number of queues, interrupt coalescing and arbitration, create
each I/O CQ before its SQ, then LIVE and the I/O queues open.  A reset
(:meth:`NvmeOps.reset_ctrl`) first disables the controller (``nvme_dev_disable``: on a
live one, Delete I/O SQ then Delete I/O CQ for every queue; CC.EN = 0; what is left
cancelled), then runs the same steps again, on the CPU whose timeout fired.

Deviations from Linux
    * The reset runs inline in the timeout handler of the CPU that decided it (the
      kernel queues it on nvme-reset-wq); other CPUs' submissions get
      ``BLK_STS_RESOURCE`` from the disabled queues meanwhile, and are rerun.
    * A command that times out while the controller is CONNECTING is cancelled by the
      timeout (DELETING), and the CPU running the reset, seeing its admin command
      fail, disables the controller (the kernel disables it from the timeout handler,
      under its shutdown_lock).
    * The admin queue's timeout work rides on the driver's timer of namespace 1 (its
      hctx 0's first CPU), every ADMIN_TIMEOUT / 8 (at most 200 ms).
    * admin_q's queue id comes from an ida of its own (:data:`ADMIN_QUEUE_IDA`), not
      the one the namespaces' queues share (the kernel's blk_queue_ida holds both).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import select
import time
from typing import Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_cpumap import HCTX_MAX_TYPES, Topology
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_setup import init_shared as blk_mq_init_shared
from mqrt.block.blk_mq_structs import (
    RQ_OFF_FLAGS,
    HwCtx,
    HwCtxSpec,
    Request,
    RequestQueue,
    TagSet,
)
from mqrt.block.blk_mq_tag import tagset_busy_iter
from mqrt.block.blk_mq_types import (
    RQ_GEN_SHIFT,
    RQ_STATE_MASK,
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
from mqrt.device._nvme_engine import cq_reap, sq_write_rw
from mqrt.device.controller import (
    DEV_COUNTERS,
    DEV_WORKER_COUNTERS,
    ControllerPlan,
    Namespace,
    QueueRegions,
    controller_main,
)
from mqrt.device.nvme_admin import IDENTIFY_CTRL
from mqrt.device.nvme_core import (
    END_ABORT,
    IOD_QID,
    NVME_ADMIN_CMD_SIZE,
    PDU_ABORTED,
    PDU_GENCTR,
    PDU_QID,
    PDU_RETRIES,
    AdminCmd,
    AdminQueue,
    NvmeAdminOps,
    change_ctrl_state,
    nvme_error_status,
)
from mqrt.device.nvme_defs import (
    CID_TAG_MASK,
    CQE,
    CQE_OFF_CID_STATUS,
    NVME_ADMIN_TIMEOUT_MS,
    NVME_AQ_DEPTH,
    NVME_AQ_MQ_TAG_DEPTH,
    NVME_CTRL_PAGE_SHIFT,
    NVME_MAX_KB_SZ,
    NVME_MAX_RETRIES,
    NVME_MAX_SEGS,
    NVME_QUEUE,
    NVME_REGS,
    NVME_SC_DNR,
    SQE,
    AdminOpcode,
    CtrlState,
    Feature,
    IdentifyCns,
    IoOpcode,
    Status,
    nvme_cid,
    nvme_dbbuf_need_event,
)
from mqrt.device.nvme_model import DEVICE_KNOBS
from mqrt.lib import trace, wait
from mqrt.lib._atomic import AtomicView
from mqrt.lib.knobs import Knob, KnobError, KnobValues, parse_knobs
from mqrt.lib.lockstat import LockClass
from mqrt.lib.sbitmap import SbqGeneration
from mqrt.lib.shm import Arena, Layout, Region
from mqrt.lib.trace import Ev
from mqrt.lib.wait import Waiters, WaitersSpec, spin_lock, spin_unlock

_fork = mp.get_context("fork")
_SQE_SIZE = SQE.size

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
    Knob("drop_abort", "float", 0.0,
         "Percent of Abort commands the device takes and never completes (their "
         "admin_timeout resets it). Default: 0", 0.0, 100.0),
    Knob("fatal_error", "float", 0.0,
         "Percent of commands on which the device hits a fatal error: CSTS.CFS set, "
         "nothing served until a reset. Default: 0", 0.0, 100.0),
    Knob("irq_poll_us", "int", 0,
         "After an interrupt its vector stays masked and its CPU polls the CQ instead of "
         "sleeping, until no CQE came for this long (irq_poll; 0: re-arm at once). "
         "Default: 0", 0, 1_000_000),
    Knob("stale_event_idx", "float", 0.0,
         "Percent of the device's sleeps before which it leaves an SQ's event index "
         "stale, so the host may skip a doorbell kick it needed (QEMU's bug; the "
         "timeout's Abort recovers the command). Default: 0", 0.0, 100.0),
    Knob("admin_timeout", "int", NVME_ADMIN_TIMEOUT_MS,
         "Admin command timeout in ms (nvme_core's admin_timeout, there in seconds). "
         "Default: 60000", 1, 3600000),
)  # fmt: skip

#: Request PDU (struct nvme_iod + nvme_request), bytes: genctr, aborted flag, retries,
#: and at _QID the iod's queue (``iod->nvmeq``: its qid, u16), set by
#: nvme_pci_init_request().  An admin request's PDU starts the same way
#: (:mod:`mqrt.device.nvme_core`).
NVME_CMD_SIZE = 8
_GENCTR, _ABORTED, _RETRIES, _QID = PDU_GENCTR, PDU_ABORTED, PDU_RETRIES, PDU_QID
_IOD_QID = IOD_QID
assert _QID + _IOD_QID.size <= NVME_CMD_SIZE

#: The layout's id space of admin_q (each process's admin block layer has a queue
#: table of its own, admin_q alone in it: id 0).
ADMIN_QUEUE_IDA = "nvme_admin_queue"

_DONTPREP = int(Rqf.DONTPREP)
_RQ_COMPLETE = int(RqState.COMPLETE)
_LIVE, _RESETTING, _DEAD = int(CtrlState.LIVE), int(CtrlState.RESETTING), int(CtrlState.DEAD)
_CONNECTING, _DELETING = int(CtrlState.CONNECTING), int(CtrlState.DELETING)
#: How long CSTS.RDY may take to follow CC.EN (the controller's CAP.TO), s.
NVME_READY_TIMEOUT_S = 10.0
#: How a command the host cancels ends: NVME_SC_HOST_ABORTED_CMD (retried), or with
#: DNR on a dead controller.
_CANCELLED = int(Status.HOST_ABORTED_CMD)
_CANCELLED_DNR = NVME_SC_DNR | _CANCELLED
#: The lock classes of a queue pair's locks (plain ints: the submission path's).
_SQ_LOCK, _CQ_LOCK = int(LockClass.NVME_SQ_LOCK), int(LockClass.NVME_CQ_LOCK)


def set_queue_enabled(a, o, on: bool) -> None:
    """Set or clear NVMEQ_ENABLED of the queue whose words are at ``o`` (under its
    sq_lock, which every submitter holds while it checks the flag)."""
    spin_lock(a, o.sq_lock, _SQ_LOCK)
    a.set32(o.enabled, int(on))
    spin_unlock(a, o.sq_lock)


class NvmeQueue:
    """struct nvme_queue: one queue pair (``dev->queues[qid]``).  The driver makes
    one per queue when it declares them, before the arena exists: it is what
    ``hctx->driver_data`` points at (``nvme_init_hctx``).  Each process attaches its
    copy to the arena (:meth:`attach`) before using it."""

    a: AtomicView
    buf: memoryview

    def __init__(self, regions: QueueRegions, regs: Region):
        self.qid = regions.qid
        self.max_depth = regions.max_depth
        self.o = regions.words.offsets()
        self.sq_base = regions.sq.offset
        self.cq_base = regions.cq.offset
        self.depth = 0
        self.kick_fds: list[int] = []

    def attach(self, arena: Arena, kick_fds: list[int]) -> None:
        """This process's mapping of the queue (the arena; the coordinator's kick
        eventfd, then each device worker's)."""
        self.a = arena.atomic
        self.buf = arena.buf
        self.kick_fds = kick_fds
        self.depth = self.a.read32(self.o.q_depth) or self.max_depth

    def refresh(self) -> None:
        self.depth = self.a.read32(self.o.q_depth)

    def cqe_pending(self) -> bool:
        """nvme_cqe_pending(): does the CQE at our head carry our phase?  A lockless
        peek (the poll path's cheap test before it takes the CQ lock)."""
        a, o = self.a, self.o
        off = self.cq_base + a.read32(o.cq_head) * CQE.size
        return (a.load_acquire32(off + CQE_OFF_CID_STATUS) >> 16) & 1 == a.read32(o.cq_phase)

    # -- submission (nvme_sq_copy_cmd, nvme_write_sq_db) ----------------------------------

    def lock_enabled(self) -> bool:
        """Take sq_lock if the queue is enabled (NVMEQ_ENABLED); False, unlocked, if
        it is not.  A reset clears ``enabled`` under the same lock, so a command
        either is in the SQ before the reset looks, or is never written."""
        a, o = self.a, self.o
        spin_lock(a, o.sq_lock, _SQ_LOCK)
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
        self._advance(tail + 1, ring)

    def copy_rw(self, opcode: int, cid: int, nsid: int, slba: int, nlb0: int, ring: bool) -> None:
        """copy_cmd() of a read or write (nvme_setup_rw), the entry written in C."""
        tail = self.a.read32(self.o.sq_tail)
        sq_write_rw(self.buf, self.sq_base + tail * _SQE_SIZE, opcode, cid, nsid, slba, nlb0)
        self._advance(tail + 1, ring)

    def _advance(self, tail: int, ring: bool) -> None:
        a, o = self.a, self.o
        if tail == self.depth:
            tail = 0
        a.set32(o.sq_tail, tail)
        if ring:
            self._write_sq_db(tail)

    def commit(self) -> None:
        """nvme_commit_rqs(): ring the doorbell for entries written without it."""
        a, o = self.a, self.o
        spin_lock(a, o.sq_lock, _SQ_LOCK)
        try:
            tail = a.read32(o.sq_tail)
            if tail != a.read32(o.last_sq_tail):
                self._write_sq_db(tail)
        finally:
            spin_unlock(a, o.sq_lock)

    def _write_sq_db(self, tail: int) -> None:
        """nvme_write_sq_db() with a shadow doorbell: the store is an xchg (a full
        barrier), so the entries are visible before it and it is ordered before the
        event index is read (pairs with the worker's store of the index, fence, and
        last look at the doorbells); the worker is kicked only when the new tail
        passes its event index."""
        a, o = self.a, self.o
        old = a.read32(o.last_sq_tail)
        a.xchg32(o.sq_tail_db, tail)
        a.set32(o.last_sq_tail, tail)
        if nvme_dbbuf_need_event(a.read32(o.sq_event_idx), tail, old):
            fd = self.kick_fds[0] if self.qid == 0 else self.kick_fds[1 + a.read32(o.worker)]
            os.eventfd_write(fd, 1)

    # -- completion (nvme_cqe_pending, nvme_update_cq_head, nvme_ring_cq_doorbell) --------

    def reap(self, budget: int = 1 << 30, trylock: bool = False) -> list[tuple]:
        """Consume CQEs while their phase tag matches ours: a list of
        (cid, status, result, sq_head, sq_id).  With ``trylock``, give up at once if
        another CPU is reaping (nvme_poll_irqdisable's cq_poll_lock)."""
        a, o = self.a, self.o
        if trylock:
            if a.test_and_set_bit_lock(o.cq_lock, 0):
                return []
        else:
            spin_lock(a, o.cq_lock, _CQ_LOCK)
        try:
            # the loop over entries (each one's last dword, with the phase tag,
            # load-acquired before the rest is read) is cq_reap, in C
            out, head, phase = cq_reap(
                self.buf, self.cq_base, a.read32(o.cq_head), a.read32(o.cq_phase), self.depth,
                budget,
            )  # fmt: skip
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
        spin_lock(a, o.sq_lock, _SQ_LOCK)
        spin_lock(a, o.cq_lock, _CQ_LOCK)
        try:
            for name in ("sq_tail", "last_sq_tail", "sq_tail_db", "sq_event_idx", "cq_head",
                         "cq_head_db"):  # fmt: skip
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
        self.worker_counters: Region | None = None
        #: device workers serving the I/O queue pairs (the device_workers knob, or
        #: one per 4 interrupt-driven queue pairs, at most the host's cores)
        self.nr_workers = cfg.device_workers or max(
            1, min(-(-nr_io_queues // 4), len(os.sched_getaffinity(0)), nr_io_queues)
        )
        self.kick_fds: list[int] = []
        self.irq_r: list[int] = []
        self.irq_w: list[int] = []
        self.vector_cpu: list[int] = []  #: vector -> CPU it is affine to
        self.queues: list[RequestQueue] = []
        self.tagset: TagSet | None = None  #: dev->tagset: the I/O queues' tag set
        self.nvmeqs: list[NvmeQueue] = []  #: dev->queues[]: the admin queue, then I/O
        self.mq: BlkMq | None = None
        #: the admin tag set and ctrl->admin_q (nvme_alloc_admin_tags), declared by setup()
        self.admin_tagset: TagSet | None = None
        self.admin_q: RequestQueue | None = None
        self.admin_waiters: WaitersSpec | None = None
        self.admin_timeout_ns = cfg.admin_timeout * 1_000_000
        #: this process's handle on admin_q (the owner's at probe, then each CPU's)
        self.admin: AdminQueue | None = None
        self.identify: dict[str, Any] = {}  #: what the last Identify said
        #: ctrl->max_hw_sectors: the largest command, sectors (0 until identified)
        self.max_hw_sectors = 0
        self.stats = dict.fromkeys(
            ("genctr_mismatch", "completion_polled", "aborts_sent", "abort_completions",
             "abort_limited", "abort_no_tag", "resets", "resets_cfs", "resets_admin",
             "timeout_cancelled", "delete_timeouts", "cancelled", "retries", "interrupts",
             "admin_interrupts", "cqes", "admin_cqes", "irq_polled"), 0)  # fmt: skip
        #: irq_poll: how long a masked vector may stay quiet before it is re-armed
        self.irq_poll_ns = cfg.irq_poll_us * 1000
        self._polled: dict[int, int] = {}  #: masked vector -> poll until (ns)

    # -- layout (in the owner) ----------------------------------------------------------

    def declare(self, layout: Layout) -> None:
        """The controller's registers and every queue pair (``dev->queues[]``) in
        ``layout``."""
        depth = self.cfg.io_queue_depth
        self.regs = regs = layout.add("nvme.regs", NVME_REGS)
        self.data = layout.add("nvme.admin_data", "V4096")
        self.counters = layout.add("nvme.counters", DEV_COUNTERS)
        self.worker_counters = layout.add("nvme.workers", DEV_WORKER_COUNTERS, self.nr_workers)
        for qid in range(self.nr_io_queues + 1):
            qdepth = NVME_AQ_DEPTH if qid == 0 else depth
            words = layout.add(f"nvme.q{qid}", NVME_QUEUE)
            sq = layout.add(f"nvme.q{qid}.sq", "V64", qdepth)
            cq = layout.add(f"nvme.q{qid}.cq", "V16", qdepth)
            self.regions.append(QueueRegions(qid, qdepth, words, sq, cq))
        self.nvmeqs = [NvmeQueue(q, regs) for q in self.regions]

    # -- blk_mq_ops: set-up (in the owner) -----------------------------------------------------

    def init_hctx(self, hctx: HwCtxSpec, driver_data: Any, hctx_idx: int) -> int:
        """nvme_init_hctx(): hctx ``i``'s driver_data is I/O queue ``i + 1``."""
        dev: NvmeOps = driver_data
        hctx.driver_data = dev.nvmeqs[hctx_idx + 1]
        return 0

    def init_request(self, tset: TagSet, rq: Request, hctx_idx: int, numa_node: int) -> int:
        """nvme_pci_init_request(): the iod's queue is I/O queue ``hctx_idx + 1``
        (the admin queue, 0, for any other tag set)."""
        dev: NvmeOps = tset.driver_data
        qid = hctx_idx + 1 if tset is dev.tagset else 0
        _IOD_QID.pack_into(rq.pdu, _QID, dev.nvmeqs[qid].qid)  # type: ignore[arg-type]
        return 0

    def alloc_admin_tags(
        self, layout: Layout, topology: Topology, generation: SbqGeneration
    ) -> RequestQueue:
        """nvme_alloc_admin_tags(): the admin tag set (one hw queue,
        NVME_AQ_MQ_TAG_DEPTH tags, ADMIN_TIMEOUT, BLK_MQ_F_NO_SCHED, nvme_mq_admin_ops)
        and ``admin_q`` on it, declared in the owner's layout like the I/O set: its
        tags and requests live in the arena, so the owner (the probe) and every CPU
        (Aborts, resets) use the same ones.  Its completions run where they are reaped
        (rq_affinity 0).  Its ops' set-up ops are the admin ones: the hctx drives the
        admin queue (nvme_admin_init_hctx) and every request's iod points at it
        (nvme_pci_init_request); its driver_data is this device."""
        tset = TagSet(
            ops=NvmeAdminOps(self),
            nr_hw_queues=1,
            queue_depth=NVME_AQ_MQ_TAG_DEPTH,
            cmd_size=NVME_ADMIN_CMD_SIZE,
            timeout_ms=self.cfg.admin_timeout,
            flags=BlkMqFlag.NO_SCHED,
            driver_data=self,
            name="nvme_admin_tagset",
            generation=generation,
        )
        alloc_tag_set(tset, layout, topology)
        self.admin_tagset = tset
        # Its id comes from an id space of its own: each process drives admin_q
        # through a block layer of its own, whose queue table it is alone in.
        self.admin_q = init_queue(
            tset, layout, "nvme0_admin_q", rq_affinity=0, id_space=ADMIN_QUEUE_IDA
        )
        self.admin_waiters = Waiters.declare(layout, 1, "nvme.admin_waiters")
        return self.admin_q

    def init_shared(self, arena: Arena) -> None:
        """Owner only: the admin tag set and admin_q; the admin queue's depth; host
        phases start at 1; the controller is NEW."""
        a = arena.atomic
        if self.admin_q is not None:
            blk_mq_init_shared(arena, [self.admin_q])
            Waiters.init(arena, self.admin_waiters)  # type: ignore[arg-type]
        for q in self.regions:
            o = q.words.offsets()
            a.set32(o.q_depth, q.max_depth if q.qid == 0 else 0)
            a.set32(o.cq_phase, 1)
        r = self.regs.offsets()  # type: ignore[union-attr]
        a.set32(r.ctrl_state, int(CtrlState.NEW))
        a.set32(r.abort_limit, 0)

    def make_fds(self) -> list[int]:
        """Owner only, before forking: the kick eventfds (the coordinator's, then
        one per device worker) and one pipe per vector."""
        self.kick_fds = [
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(1 + self.nr_workers)
        ]
        for _ in self.regions:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.irq_r.append(r)
            self.irq_w.append(w)
        return [*self.kick_fds, *self.irq_r, *self.irq_w]

    def device_plan(self, arena: Arena) -> ControllerPlan:
        cfg = self.cfg
        nr_blocks = (cfg.ns_gb << 30) >> self.lba_shift
        faults = {
            "lost_irq_pct": cfg.lost_irq,
            "drop_pct": cfg.drop_completion,
            "error_pct": cfg.error_status,
            "delay_pct": cfg.delay_pct,
            "delay_ns": cfg.delay_ns,
            "drop_abort_pct": cfg.drop_abort,
            "fatal_pct": cfg.fatal_error,
            "stale_event_idx_pct": cfg.stale_event_idx,
        }
        return ControllerPlan(
            arena=arena,
            regs=self.regs,  # type: ignore[arg-type]
            queues=self.regions,
            data=self.data,  # type: ignore[arg-type]
            counters=self.counters,  # type: ignore[arg-type]
            workers=self.worker_counters,  # type: ignore[arg-type]
            kick_fds=self.kick_fds,
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

    def probe(self, arena: Arena) -> dict[str, Any]:
        """nvme_probe() -> nvme_reset_ctrl() -> nvme_reset_work(), in the owner before the
        CPUs fork (NEW -> RESETTING; the controller is still disabled, so there is
        nothing to disable first).  What the report shows about the device."""
        owner = self.admin is None
        if owner:
            self.bind(arena, None, 0)  # the owner's handles (each CPU binds its own)
        try:
            if not change_ctrl_state(arena.atomic, self._ctrl_state, CtrlState.RESETTING):
                raise RuntimeError("nvme: controller is not NEW at probe")
            info = self.reset_work()
        finally:
            if owner:  # its views of the arena go before the arena does
                self.admin.mq.close()  # type: ignore[union-attr]
                self.admin = None
        for k in self.stats:  # the CPUs inherit this copy: count from zero there
            self.stats[k] = 0
        return {**info, "admin_queue_depth": NVME_AQ_DEPTH, "admin_tags": NVME_AQ_MQ_TAG_DEPTH}

    def reset_work(self) -> dict[str, Any]:
        """nvme_reset_work(): every queue fresh (nvme_init_queue), the controller
        enabled with its admin queue (CONNECTING), identified again
        (:meth:`init_identify`: ACL -> abort_limit), its features set and its I/O
        queues created (:meth:`setup_io_queues`); then LIVE and the I/O queues open
        (nvme_start_queues).  Raises RuntimeError if the controller does not come
        back."""
        a = self.admin.a  # type: ignore[union-attr]
        for nvmeq in self.nvmeqs:
            nvmeq.reset()
        self._enable_ctrl()
        if not change_ctrl_state(a, self._ctrl_state, CtrlState.CONNECTING):
            raise RuntimeError("nvme: failed to mark controller CONNECTING")
        info = self.init_identify()
        self.setup_io_queues()
        if not change_ctrl_state(a, self._ctrl_state, CtrlState.LIVE):
            raise RuntimeError("nvme: failed to mark controller live")
        for nvmeq in self.nvmeqs[1:]:
            nvmeq.set_enabled(True)
        return info

    def _enable_ctrl(self) -> None:
        """CC.EN = 1 and wait for CSTS.RDY (nvme_enable_ctrl); the admin queue is
        usable from then on."""
        admin = self.nvmeqs[0]
        a = admin.a
        r = self.regs.offsets()  # type: ignore[union-attr]
        deadline = time.monotonic() + NVME_READY_TIMEOUT_S
        a.set32(r.cc_shn, 0)
        a.store_release32(r.cc_en, 1)
        self._kick()
        while not a.load_acquire32(r.csts_rdy):
            self._reset_wait(deadline, "did not become ready (CSTS.RDY)")
        admin.set_enabled(True)

    def _disable_ctrl(self) -> None:
        """CC.EN = 0 and wait for CSTS.RDY to clear (nvme_disable_ctrl)."""
        a = self.nvmeqs[0].a
        r = self.regs.offsets()  # type: ignore[union-attr]
        deadline = time.monotonic() + NVME_READY_TIMEOUT_S
        a.store_release32(r.cc_en, 0)
        self._kick()
        while a.load_acquire32(r.csts_rdy):
            self._reset_wait(deadline, "did not stop (CSTS.RDY stays 1)")

    def init_identify(self) -> dict[str, Any]:
        """nvme_init_identify(): Identify Controller -- its namespaces, its queue
        entries, and its Abort Command Limit: ``abort_limit`` = ACL + 1 -- then each
        namespace (nvme_scan_work)."""
        cfg = self.cfg
        data = self.data.offset  # type: ignore[union-attr]
        a = self.admin.a  # type: ignore[union-attr]
        self._admin_cmd(AdminOpcode.IDENTIFY, 0, IdentifyCns.CONTROLLER, 0, data)
        ident = IDENTIFY_CTRL.unpack_from(self.admin.mq.buf, data)  # type: ignore[union-attr]
        mdts, nn, mqes, acl = ident[5], ident[6], ident[7], ident[9]
        a.set32(self.regs.offsets().abort_limit, acl + 1)  # type: ignore[union-attr]
        max_hw_sectors = self.set_queue_limits(mdts)
        if nn < cfg.nr_namespaces:
            raise RuntimeError(f"nvme: controller has {nn} namespaces, {cfg.nr_namespaces} asked")
        for nsid in range(1, cfg.nr_namespaces + 1):
            self._admin_cmd(AdminOpcode.IDENTIFY, nsid, IdentifyCns.NAMESPACE, 0, data)
        depth = min(cfg.io_queue_depth, mqes + 1)
        for q in self.regions[1:]:
            a.set32(q.words.offsets().q_depth, depth)
        for nvmeq in self.nvmeqs[1:]:
            nvmeq.refresh()
        self.identify = {"namespaces": nn, "io_queues": self.nr_io_queues,
                         "queue_depth": depth, "mn": ident[3].rstrip(b"\0").decode(),
                         "acl": acl, "mdts": mdts,
                         "max_hw_sectors_kb": max_hw_sectors >> 1}  # fmt: skip
        return self.identify

    def set_queue_limits(self, mdts: int) -> int:
        """The limits Identify Controller gives (nvme_init_identify() ->
        nvme_set_queue_limits()): the largest command MDTS allows, kept if an earlier
        identify allowed less (``min_not_zero``), on admin_q and every namespace's
        queue; this process's handles on the namespaces' queues take them at once.
        The largest command, in sectors."""
        max_hw_sectors = nvme_max_hw_sectors(mdts)
        if self.max_hw_sectors:
            max_hw_sectors = min(max_hw_sectors, self.max_hw_sectors)
        self.max_hw_sectors = max_hw_sectors
        for q in [*self.queues, *([self.admin_q] if self.admin_q is not None else [])]:
            nvme_set_queue_limits(q, max_hw_sectors)
        if self.mq is not None:
            for queue in self.mq.queues:
                queue.set_limits(queue.q.limits)
        return max_hw_sectors

    def setup_io_queues(self) -> None:
        """nvme_setup_io_queues(): the number of queues, interrupt coalescing, then
        each I/O CQ before its SQ (opened once the controller is LIVE)."""
        cfg = self.cfg
        n = self.nr_io_queues
        res = self._admin_cmd(
            AdminOpcode.SET_FEATURES, 0, Feature.NUM_QUEUES, (n - 1) | (n - 1) << 16
        )
        if (res & 0xFFFF) + 1 < n:
            raise RuntimeError(f"nvme: controller grants {(res & 0xFFFF) + 1} I/O queues, not {n}")
        thr, tim = cfg.irq_coalesce_thr, cfg.irq_coalesce_time
        self._admin_cmd(AdminOpcode.SET_FEATURES, 0, Feature.IRQ_COALESCE, thr | tim << 8)
        first_poll = n - self.nr_poll_queues + 1
        for qid in range(1, n + 1):
            depth = self.nvmeqs[qid].depth
            # Vector qid with interrupts enabled, or, for a poll queue, interrupts
            # disabled (nvme_create_cq without NVME_CQ_IRQ_ENABLED).
            flags = 0x1 if qid >= first_poll else qid << 16 | 0x3
            size_qid = (depth - 1) << 16 | qid
            self._admin_cmd(AdminOpcode.CREATE_CQ, 0, size_qid, flags)
            self._admin_cmd(AdminOpcode.CREATE_SQ, 0, size_qid, qid << 16 | 1 << 1 | 1)

    def _admin_cmd(self, opcode: int, nsid: int = 0, cdw10: int = 0, cdw11: int = 0,
                   prp1: int = 0) -> int:  # fmt: skip
        """nvme_submit_sync_cmd() on admin_q: the command's result; RuntimeError if it
        fails or does not complete within ADMIN_TIMEOUT."""
        res = self._admin_wait([(opcode, nsid, cdw10, cdw11, prp1)])
        name = AdminOpcode(opcode).name
        if res is None:
            raise RuntimeError(f"nvme: admin {name} timed out")
        status, result = res[0]
        if status != Status.SUCCESS:
            raise RuntimeError(f"nvme: admin {name} failed with status {status:#x}")
        return result

    def _admin_wait(self, cmds: list[AdminCmd]) -> list[tuple[int, int]] | None:
        return self.admin.execute_wait(  # type: ignore[union-attr]
            cmds, self._reap_admin, self._admin_idle, self.admin_timeout_ns
        )

    def _reap_admin(self) -> int:
        """Look at the admin CQ as its vector would: acknowledge it, then reap."""
        admin = self.nvmeqs[0]
        admin.a.xchg32(admin.o.irq_pending, 0)
        return self.poll_cq(0)

    def _admin_idle(self) -> None:
        """Between two looks at the admin CQ: wait a little for its vector (whose
        byte CPU 0 may take: look again soon regardless), unless the run is ending."""
        if wait.long_spin_hook is not None:
            wait.long_spin_hook()
        select.select([self.irq_r[0]], [], [], 0.002)
        with contextlib.suppress(BlockingIOError):
            os.read(self.irq_r[0], 4096)

    def _kick(self) -> None:
        """Wake the controller's coordinator: CC changed."""
        os.eventfd_write(self.kick_fds[0], 1)

    def shutdown(self, arena: Arena) -> None:
        """nvme_dev_disable(shutdown=true) at the end of a run: CC.SHN, then CC.EN = 0."""
        r = self.regs.offsets()  # type: ignore[union-attr]
        arena.atomic.set32(r.cc_shn, 1)
        arena.atomic.store_release32(r.cc_en, 0)
        self._kick()

    def device_counters(self, arena: Arena) -> dict[str, int]:
        v = arena.view(self.counters)  # type: ignore[arg-type]
        out = {name: int(v[name][0]) for name in v.dtype.names or ()}
        del v
        return out

    def device_workers(self, arena: Arena) -> list[dict[str, int]]:
        """Each device worker's counters, as last published."""
        v = arena.view(self.worker_counters)  # type: ignore[arg-type]
        out = [{name: int(v[name][k]) for name in v.dtype.names or ()} for k in range(len(v))]
        del v
        return out

    # -- in a CPU ----------------------------------------------------------------------------------

    def bind(self, arena: Arena, mq: BlkMq | None, cpu: int) -> None:
        """This process's handles: every queue pair, and admin_q through a block layer
        of its own (:class:`~mqrt.device.nvme_core.AdminQueue`).  ``mq`` None: the
        owner (the probe)."""
        self.mq = mq
        self.cpu = cpu
        for q in self.nvmeqs:
            q.attach(arena, self.kick_fds)
        for q in self.nvmeqs[1:]:
            q.refresh()
        r = self.regs.offsets()  # type: ignore[union-attr]
        self._ctrl_state = r.ctrl_state
        self._abort_limit = r.abort_limit
        self._csts_cfs = r.csts_cfs
        if self.admin_q is not None:
            if self.admin is not None:
                self.admin.mq.close()  # a second bind in one process: the new one replaces it
            self.admin = AdminQueue(
                arena, self.admin_q, self.admin_waiters, cpu,  # type: ignore[arg-type]
                mq.sys if mq is not None else None, self.nvmeqs[0], r.abort_limit, self.stats,
                mq.violation if mq is not None else None,
            )  # fmt: skip

    def irq_handlers(self, mq: BlkMq, cpu: int) -> list[IrqHandler]:
        """The vectors affine to ``cpu``: fd -> nvme_irq for that queue."""
        out: list[IrqHandler] = []
        for vec, owner in enumerate(self.vector_cpu):
            if owner == cpu:
                out.append((self.irq_r[vec], functools.partial(self.nvme_irq, vec)))
        return out

    def driver_stats(self) -> dict[str, int]:
        return dict(self.stats)

    def timer_interval_ns(self, q: int) -> int:
        """The admin queue's timeout work rides on namespace 1's timer."""
        if q != 0 or self.admin_q is None:
            return 0
        return min(max(self.admin_timeout_ns // 8, 1_000_000), 200_000_000)

    def timer(self, mq: BlkMq, q: int) -> None:
        """blk_mq_timeout_work() of admin_q: an Abort past ADMIN_TIMEOUT resets the
        controller (:meth:`nvme_timeout`)."""
        if self.admin is not None:
            self.admin.mq.timeout_work(0)

    def map_queues(self, tset: TagSet) -> None:
        """nvme_pci_map_queues(): DEFAULT over the interrupt-driven queues, no READ
        queues, POLL over the poll queues (numbered after them).  After
        blk_mq_update_nr_hw_queues() the DEFAULT map uses the first ``nr_hw_queues``
        of the I/O queues the probe created."""
        from mqrt.block.blk_mq_cpumap import map_queue_types

        poll = self.nr_poll_queues
        map_queue_types(tset.map, tset.topology, (tset.nr_hw_queues - poll, 0, poll))

    def poll(self, mq: BlkMq, hctx: HwCtx) -> int:
        """nvme_poll(): a lockless look at the CQ, then reap it unless another CPU
        is already doing so."""
        q: NvmeQueue = hctx.driver_data
        if not q.cqe_pending():
            return 0
        return self.poll_cq(q.qid, trylock=True)

    def queue_rq(self, mq: BlkMq, hctx: HwCtx, rq: Request, last: bool) -> int:
        """nvme_queue_rq(): a disabled queue (a reset is under way) refuses with
        BLK_STS_RESOURCE, and blk-mq retries later; a dead controller fails it."""
        nvmeq: NvmeQueue = hctx.driver_data
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
            nvmeq.copy_rw(opcode, nvme_cid(genctr, rq.tag), st[7] + 1, slba, nlb, last)
        finally:
            nvmeq.unlock()
        return 0

    def commit_rqs(self, mq: BlkMq, hctx: HwCtx) -> None:
        hctx.driver_data.commit()

    def nvme_irq(self, vec: int) -> None:
        """nvme_irq(): the vector fired: reap its CQ (and, on vector 0, admin CQEs)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.irq_r[vec], 4096)
        # the admin vector (0) fires for admin completions (Aborts, a reset's commands
        # issued on another CPU) and for the probe's last ones, whose byte may still
        # be in the pipe when the CPUs start
        self.stats["interrupts" if vec else "admin_interrupts"] += 1
        q = self.nvmeqs[vec]
        if vec and self.irq_poll_ns:
            # keep the vector masked and poll its CQ whenever this CPU would sleep,
            # until it stays quiet for irq_poll_ns (irq_poll)
            found = self.poll_cq(vec)
            self._polled[vec] = time.monotonic_ns() + self.irq_poll_ns
        else:
            # acknowledge (clear the pending bit, a full barrier) before reaping: a
            # CQE posted after the reap raises the vector again.  Reaping with the
            # vector still pending would make each batch longer, and a CPU that
            # completes a long batch before it submits again starves the device (1
            # CPU at iodepth 32: ~30 % fewer IOPS).
            q.a.xchg32(q.o.irq_pending, 0)
            found = self.poll_cq(vec)
        if trace.on:
            trace.emit(Ev.IRQ, -1, 0, max(vec - 1, 0), 0, found)

    def irq_poll(self, mq: BlkMq) -> bool:
        """This CPU would sleep: reap the CQs of the vectors its handler left masked.
        A vector quiet for ``irq_poll_ns`` since its last CQE is acknowledged (its
        pending bit cleared, then one more look: a CQE posted before that is found
        here, one after it raises the vector again).  True while any stays masked."""
        polled = self._polled
        if not polled:
            return False
        now = time.monotonic_ns()
        for vec, until in list(polled.items()):
            q = self.nvmeqs[vec]
            if q.cqe_pending():
                self.stats["irq_polled"] += self.poll_cq(vec)
                polled[vec] = now + self.irq_poll_ns
            elif now >= until:
                del polled[vec]
                q.a.xchg32(q.o.irq_pending, 0)
                found = self.poll_cq(vec)
                if found:
                    self.stats["irq_polled"] += found
                    if not q.a.xchg32(q.o.irq_pending, 1):  # masked again by us
                        polled[vec] = now + self.irq_poll_ns
        return bool(polled)

    def poll_cq(self, qid: int, trylock: bool = False) -> int:
        """nvme_poll_cq(): complete every CQE found; how many."""
        nvmeq = self.nvmeqs[qid]
        if qid == 0:
            return self._poll_admin_cq(trylock)
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

    def _poll_admin_cq(self, trylock: bool = False) -> int:
        """nvme_poll_cq() of the admin CQ: each admin request completes through
        blk-mq, here (:meth:`~mqrt.device.nvme_core.AdminQueue.handle_cqe`)."""
        cqes = self.nvmeqs[0].reap(trylock=trylock)
        admin = self.admin
        for cid, status, result, _sqh, _sqid in cqes:
            admin.handle_cqe(cid, status, result)  # type: ignore[union-attr]
        self.stats["admin_cqes"] += len(cqes)
        return len(cqes)

    def _handle_cqe(self, mq, tags, cid: int, status: int, batch: list | None = None) -> None:
        """nvme_handle_cqe(): command id -> request, with the genctr check; a
        successful one joins the completion batch, others complete one by one."""
        tag = cid & CID_TAG_MASK
        if tags is None or tag >= tags.nr_tags:  # no tags: an hctx no CPU maps
            self.stats["genctr_mismatch"] += 1
            return
        rq = tags.rq_of(mq.rqs[0], tag)  # every namespace shares the tag set's pool
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
        """->timeout of an I/O command: :meth:`nvme_timeout`."""
        return self.nvme_timeout(mq, rq, gen)

    def nvme_timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """nvme_timeout() of an I/O or an admin command, in the kernel's order.  Its
        queue is the iod's (``iod->nvmeq``, which nvme_pci_init_request() set in the
        PDU: I/O queue ``hctx_idx + 1``, or the admin queue, 0); ``mq`` is the block
        layer the request belongs to (the CPU's, or its admin queue's).

        1. nvme_should_reset(): CSTS.CFS set (the controller failed) and no reset
           under way: reset now.
        2. Poll the CQ: "I/O %d QID %d timeout, completion polled" (a lost interrupt).
        3. The state: CONNECTING becomes DELETING, and while DELETING (or DEAD) the
           command is cancelled ("disable controller"); RESETTING: another timeout,
           the reset will cancel it.
        4. An admin command, or an I/O command whose Abort did not bring it back:
           "reset controller".
        5. Otherwise take one of ``abort_limit`` (none left: another timeout), mark
           the command aborted, and send an Abort from the admin tag set (NOWAIT: no
           tag, another timeout); the command gets another timeout, in which its
           Abort should complete it."""
        a = mq.a
        pdu = rq.pdu
        qid = _IOD_QID.unpack_from(pdu, _QID)[0]  # type: ignore[arg-type]  # iod->nvmeq
        state = a.read32(self._ctrl_state)
        if a.load_acquire32(self._csts_cfs) and state not in (_RESETTING, _CONNECTING):
            # "controller is down; will reset: CSTS=0x%x"
            return self._timeout_reset("resets_cfs")
        before = rq.state_word
        self.poll_cq(qid)
        if rq.state_word != before:
            # "I/O %d QID %d timeout, completion polled"
            self.stats["completion_polled"] += 1
            return EhRet.DONE
        if state == _CONNECTING:
            change_ctrl_state(a, self._ctrl_state, CtrlState.DELETING)
            state = _DELETING
        if state in (_DELETING, _DEAD):
            # "I/O %d QID %d timeout, disable controller": cancelled (the CPU running
            # the reset sees its admin command fail and disables the controller)
            self.stats["timeout_cancelled"] += 1
            mq.complete_request(rq, gen, status=_CANCELLED_DNR)
            return EhRet.DONE
        if state == _RESETTING:
            return EhRet.RESET_TIMER
        if qid == 0 or pdu[_ABORTED]:  # type: ignore[index]
            # "I/O %d QID %d timeout, reset controller"
            return self._timeout_reset("resets_admin" if qid == 0 else "")
        if a.fetch_sub32(self._abort_limit, 1) <= 0:  # every Abort allowed is out
            a.fetch_add32(self._abort_limit, 1)
            self.stats["abort_limited"] += 1
            return EhRet.RESET_TIMER
        pdu[_ABORTED] = 1  # type: ignore[index]
        # "I/O %d QID %d timeout, aborting"
        cdw10 = qid | nvme_cid(pdu[_GENCTR], rq.tag) << 16  # type: ignore[index]
        admin = self.admin
        abort = admin.alloc((AdminOpcode.ABORT, 0, cdw10), END_ABORT)  # type: ignore[union-attr]
        if abort is None:
            a.fetch_add32(self._abort_limit, 1)
            self.stats["abort_no_tag"] += 1
            return EhRet.RESET_TIMER
        if admin.execute_nowait(abort) == BlkStatus.OK:  # type: ignore[union-attr]
            self.stats["aborts_sent"] += 1  # (a refused one went through abort_endio)
        return EhRet.RESET_TIMER

    def _timeout_reset(self, why: str) -> EhRet:
        """nvme_dev_disable() + nvme_reset_ctrl() from a timeout (counted under
        ``why``): DONE, the reset cancelled the command; another timeout if a reset is
        already under way (or this is the owner, which has no CPU to reset from)."""
        if self.mq is None or not self.reset_ctrl(self.mq):
            return EhRet.RESET_TIMER
        if why:
            self.stats[why] += 1
        return EhRet.DONE

    def reset_ctrl(self, mq: BlkMq) -> bool:
        """nvme_reset_ctrl() and its work, run by the CPU whose timeout decided it (the
        kernel queues it on nvme-reset-wq): LIVE -> RESETTING (False if that is not
        where the controller is: one reset at a time), :meth:`dev_disable`, then
        :meth:`reset_work`.  Every command the controller held is cancelled with
        HOST_ABORTED_CMD and, having no DNR, retried by :meth:`complete`; a
        controller that does not come back is removed (:meth:`remove_dead_ctrl`)."""
        a = mq.a
        if not change_ctrl_state(a, self._ctrl_state, CtrlState.RESETTING):
            return False
        self.stats["resets"] += 1
        try:
            self.dev_disable(mq)
            self.reset_work()
        except RuntimeError as exc:
            self.remove_dead_ctrl(mq, exc)
            return True
        a.fetch_add32(self.regs.offsets().resets, 1)  # type: ignore[union-attr]
        for queue in mq.queues:  # nvme_start_queues(): run what waited
            mq.run_hw_queues(queue, True)
        return True

    def dev_disable(self, mq: BlkMq | None) -> None:
        """nvme_dev_disable(dev, false).  No new I/O command (every I/O queue
        disabled under its sq_lock: nvme_stop_queues); on a live controller (neither
        CSTS.CFS nor a cleared CSTS.RDY) every I/O SQ and then every I/O CQ is
        deleted on the admin queue (nvme_disable_io_queues); then the admin queue
        closes, CC.EN = 0, the CQEs already posted are reaped and every command still
        started, I/O and admin, is cancelled with HOST_ABORTED_CMD."""
        a = self.nvmeqs[0].a
        dead = a.load_acquire32(self._csts_cfs) or not a.load_acquire32(
            self.regs.offsets().csts_rdy  # type: ignore[union-attr]
        )
        for nvmeq in self.nvmeqs[1:]:
            nvmeq.set_enabled(False)
        if not dead:
            self.disable_io_queues()
        self.nvmeqs[0].set_enabled(False)  # nvme_suspend_queue(admin queue)
        self._disable_ctrl()
        for qid in range(1, len(self.nvmeqs)):  # nvme_reap_pending_cqes()
            self.poll_cq(qid)
        self.poll_cq(0)
        if mq is not None:
            self.stats["cancelled"] += self._cancel_all(mq, _CANCELLED)
        admin = self.admin
        admin.cancel_all(_CANCELLED)  # type: ignore[union-attr]
        admin.free_waited()  # type: ignore[union-attr]

    def disable_io_queues(self) -> None:
        """nvme_disable_io_queues(): Delete I/O SQ for every I/O queue, then, if those
        all completed in time, Delete I/O CQ for each (__nvme_disable_io_queues: as
        many at once as admin tags allow, each wave within ADMIN_TIMEOUT)."""
        qids = range(self.nr_io_queues, 0, -1)
        for opcode in (AdminOpcode.DELETE_SQ, AdminOpcode.DELETE_CQ):
            if self._admin_wait([(opcode, 0, qid) for qid in qids]) is None:
                self.stats["delete_timeouts"] += 1
                return

    def remove_dead_ctrl(self, mq: BlkMq | None, exc: Exception) -> None:
        """nvme_remove_dead_ctrl(): DELETING, then DEAD; the controller disabled and
        everything left failed, now and from now on (DNR)."""
        a = self.nvmeqs[0].a
        change_ctrl_state(a, self._ctrl_state, CtrlState.DELETING)
        change_ctrl_state(a, self._ctrl_state, CtrlState.DEAD)
        if mq is not None:
            mq.violation(f"nvme: controller reset failed, controller dead: {exc}")
        for nvmeq in self.nvmeqs:
            nvmeq.set_enabled(False)
        r = self.regs.offsets()  # type: ignore[union-attr]
        a.store_release32(r.cc_en, 0)
        self._kick()
        if mq is not None:
            self._cancel_all(mq, _CANCELLED_DNR)
        if self.admin is not None:
            self.admin.cancel_all(_CANCELLED_DNR)
            self.admin.free_waited()

    def _reset_wait(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"controller {what}")
        if wait.long_spin_hook is not None:
            wait.long_spin_hook()  # the run may be ending (the device may have died)
        time.sleep(0.0002)

    @staticmethod
    def _cancel_all(mq: BlkMq, status: int) -> int:
        """blk_mq_tagset_busy_iter(nvme_cancel_request): complete every started
        request of the tag set with ``status``, at the generation the iterator
        found it; how many this call completed."""
        n = 0

        def nvme_cancel_request(rq: Request, st: int) -> bool:
            nonlocal n
            if st & RQ_STATE_MASK == _RQ_COMPLETE:  # don't abort one completed request
                return True
            if mq.complete_request(rq, st >> RQ_GEN_SHIFT, status=status):
                n += 1
            return True

        # the namespaces share the set's tags and pool
        tagset_busy_iter((h.tags for h in mq.queues[0].hctxs), mq.rqs[0], nvme_cancel_request)
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
    elevator: str = "none",
    resizable: bool = False,
) -> tuple[NvmeOps, list[RequestQueue]]:
    """The controller's queues, the admin tag set and admin_q
    (:meth:`NvmeOps.alloc_admin_tags`), then nvme_alloc_io_tag_set() and one queue per
    namespace, declared in ``layout``.  ``resizable``: the I/O tag set's hctx count
    may change during the run (blk_mq_update_nr_hw_queues()), up to the I/O queues
    the probe creates (its ``max_hw_queues``; not with poll queues)."""
    nr_default = min(cfg.nr_io_queues or topology.nr_cpus, topology.nr_cpus)
    nr_poll = min(cfg.poll_queues, topology.nr_cpus)
    nr_io_queues = nr_default + nr_poll
    ops = NvmeOps(cfg, nr_io_queues, nr_poll)
    ops.declare(layout)
    ops.alloc_admin_tags(layout, topology, generation)
    tset = TagSet(
        ops=ops,
        nr_hw_queues=nr_io_queues,
        nr_maps=HCTX_MAX_TYPES if nr_poll else 1,  # nvme_alloc_io_tag_set()
        queue_depth=cfg.io_queue_depth - 1,  # the SQ keeps one slot empty
        cmd_size=NVME_CMD_SIZE,
        timeout_ms=timeout_ms,
        driver_data=ops,
        flags=BlkMqFlag.SHOULD_MERGE,
        name="nvme_tag_set",
        pool_limit_bytes=pool_limit_bytes,
        generation=generation,
        max_hw_queues=nr_io_queues if resizable else 0,
    )
    ops.tagset = tset
    alloc_tag_set(tset, layout, topology)
    if tset.queue_depth > cfg.io_queue_depth - 1:
        raise KnobError("io_queue_depth: inconsistent tag set depth")
    queues = [
        init_queue(
            tset,
            layout,
            f"nvme0n{i + 1}",
            rq_affinity=rq_affinity,
            async_depth=async_depth,
            nomerges=nomerges,
            elevator=elevator,
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
