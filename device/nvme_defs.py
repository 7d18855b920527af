"""NVMe wire formats and constants (``include/linux/nvme.h``, NVMe Base Specification):
opcodes, status codes, the 64-byte submission and 16-byte completion entries, command
ids with a generation, and the per-queue-pair layout in shared memory.

Entries are packed with :mod:`struct` (little endian, as on the wire):

* SQE: ``opcode, flags, cid, nsid, cdw2-3, mptr, prp1, prp2, cdw10..cdw15``.
  Read/write: ``slba = cdw10 | cdw11 << 32``, ``nlb - 1 = cdw12 & 0xffff``.
* CQE: ``result (dw0), dw1, sq_head, sq_id, cid, status`` where ``status`` bit 0 is the
  phase tag and bits 15:1 are the status field (SC 8:1, SCT 11:9, CRD, M, DNR).

Linux writes status codes as ``SCT << 8 | SC`` (e.g. ``NVME_SC_READ_ERROR`` = 0x281);
so do we.  A command id is ``genctr << 12 | tag`` (4-bit generation, 12-bit tag), so a
completion for an older use of a tag is caught ("genctr mismatch").
"""

from __future__ import annotations

import enum

import numpy as np

from mqrt.lib.shm import cacheline_struct, field_offset, struct_of

#: struct nvme_command: the 64-byte submission queue entry, packed as on the wire.
SQE_LAYOUT = np.dtype(
    [
        ("opcode", "u1"),
        ("flags", "u1"),
        ("command_id", "<u2"),
        ("nsid", "<u4"),
        ("cdw2", "<u8"),  # cdw2-3
        ("metadata", "<u8"),  # mptr
        ("prp1", "<u8"),
        ("prp2", "<u8"),
        *((f"cdw{i}", "<u4") for i in range(10, 16)),
    ]
)
#: struct nvme_completion: the 16-byte completion queue entry.  ``command_id`` and
#: ``status`` (with the phase tag in bit 0) form its last dword, published last.
CQE_LAYOUT = np.dtype(
    [
        ("result", "<u4"),
        ("dw1", "<u4"),
        ("sq_head", "<u2"),
        ("sq_id", "<u2"),
        ("command_id", "<u2"),
        ("status", "<u2"),
    ]
)
SQE = struct_of(SQE_LAYOUT, "opcode", "cdw15")
CQE = struct_of(CQE_LAYOUT, "result", "status")
#: The CQE up to its last dword: what the device writes before publishing.
CQE_HEAD = struct_of(CQE_LAYOUT, "result", "sq_id")
#: Offset of the CQE's last dword (command_id | status << 16): one 32-bit store or load.
CQE_OFF_CID_STATUS = field_offset(CQE_LAYOUT, "command_id")
assert SQE.size == SQE_LAYOUT.itemsize == 64 and CQE.size == CQE_LAYOUT.itemsize == 16
assert CQE_OFF_CID_STATUS == CQE_HEAD.size == CQE.size - 4
assert field_offset(CQE_LAYOUT, "status") == CQE_OFF_CID_STATUS + 2

#: Linux's admin queue depth (entries of the admin SQ and CQ).
NVME_AQ_DEPTH = 32
NVME_QID_ADMIN = 0
#: Admin SQ entries Linux keeps for Asynchronous Event Requests (mqrt sends none, so
#: this slot stays unused; the admin tag set is sized as the kernel's).
NVME_NR_AEN_COMMANDS = 1
NVME_AQ_BLK_MQ_DEPTH = NVME_AQ_DEPTH - NVME_NR_AEN_COMMANDS
#: The admin tag set's depth: one less again, since a full ring keeps one entry empty,
#: so admin commands can never overrun the admin SQ.
NVME_AQ_MQ_TAG_DEPTH = NVME_AQ_BLK_MQ_DEPTH - 1
#: ADMIN_TIMEOUT: nvme_core's admin_timeout (60 s), in ms.
NVME_ADMIN_TIMEOUT_MS = 60_000

CID_TAG_BITS = 12
CID_TAG_MASK = (1 << CID_TAG_BITS) - 1
CID_GENCTR_MASK = 0xF


def nvme_cid(genctr: int, tag: int) -> int:
    """nvme_cid(): the command id of ``tag`` in its ``genctr``-th use."""
    return ((genctr & CID_GENCTR_MASK) << CID_TAG_BITS) | tag


class AdminOpcode(enum.IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02


class Feature(enum.IntEnum):
    ARBITRATION = 0x01
    NUM_QUEUES = 0x07
    IRQ_COALESCE = 0x08
    IRQ_CONFIG = 0x09


class IdentifyCns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02


class Status(enum.IntEnum):
    """NVME_SC_*: ``SCT << 8 | SC``."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    CMDID_CONFLICT = 0x003
    DATA_XFER_ERROR = 0x004
    INTERNAL = 0x006
    ABORT_REQ = 0x007  #: Command Abort Requested
    ABORT_QUEUE = 0x008  #: Command Aborted due to SQ Deletion
    INVALID_NS = 0x00B
    LBA_RANGE = 0x080
    NS_NOT_READY = 0x082
    CQ_INVALID = 0x100
    QID_INVALID = 0x101
    QUEUE_SIZE = 0x102
    ABORT_LIMIT = 0x103  #: Abort Command Limit Exceeded
    INVALID_VECTOR = 0x108  #: Invalid Interrupt Vector
    INVALID_QUEUE_DELETION = 0x10C  #: a CQ still has SQs
    WRITE_FAULT = 0x280
    READ_ERROR = 0x281
    HOST_ABORTED_CMD = 0x371  #: Linux: completed by the host (reset, cancel)


#: Status field bits above SCT/SC: Do Not Retry, and the mask of SCT << 8 | SC.
NVME_SC_DNR = 0x4000
NVME_SC_MASK = 0x7FF
#: nvme_max_retries (module parameter): retries of a command failed without DNR.
NVME_MAX_RETRIES = 5
#: The controller's memory page size the host uses (CAP.MPSMIN 0: 4 KiB); MDTS counts
#: in these pages.
NVME_CTRL_PAGE_SHIFT = 12
#: The largest command the PCI driver maps (its iod's scatterlist in one page), KiB.
NVME_MAX_KB_SZ = 4096
#: The most segments the PCI driver maps in one command.
NVME_MAX_SEGS = 127


class CtrlState(enum.IntEnum):
    """enum nvme_ctrl_state (the states a PCIe controller goes through).

    NEW -> RESETTING (probe) -> CONNECTING (nvme_reset_work, the controller enabled
    again) -> LIVE; LIVE -> RESETTING on a reset; RESETTING or CONNECTING -> DELETING
    -> DEAD when it does not come back."""

    NEW = 0
    LIVE = 1
    RESETTING = 2
    CONNECTING = 3
    DELETING = 4
    DEAD = 5


#: nvme_change_ctrl_state(): the states each state may be entered from.
CTRL_STATE_FROM: dict[CtrlState, frozenset[CtrlState]] = {
    CtrlState.LIVE: frozenset((CtrlState.NEW, CtrlState.RESETTING, CtrlState.CONNECTING)),
    CtrlState.RESETTING: frozenset((CtrlState.NEW, CtrlState.LIVE)),
    CtrlState.CONNECTING: frozenset((CtrlState.NEW, CtrlState.RESETTING)),
    CtrlState.DELETING: frozenset((CtrlState.LIVE, CtrlState.RESETTING, CtrlState.CONNECTING)),
    CtrlState.DEAD: frozenset((CtrlState.DELETING,)),
}


def nvme_dbbuf_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """Does moving a doorbell from ``old`` to ``new_idx`` pass ``event_idx``?  (The
    spec's EventIdx rule, 16-bit wrapping, as Linux's ``nvme_dbbuf_need_event``.)"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old) & 0xFFFF


#: The status field of a CQE: phase in bit 0, the status code above it.
def cqe_status(status: int, phase: int) -> int:
    return ((status & 0x7FFF) << 1) | (phase & 1)


#: Controller registers the host and the device share (the subset mqrt needs).
NVME_REGS = cacheline_struct(
    # host writes CC.EN; the device CSTS.RDY and CSTS.CFS (Controller Fatal Status)
    # CC.SHN (shutdown notification: the host's orderly stop, not a reset)
    [("cc_en", "<u4"), ("cc_shn", "<u4"), ("csts_rdy", "<u4"), ("csts_cfs", "<u4")],
    # struct nvme_ctrl (host side): completed resets and the state, moved by cmpxchg
    # (nvme_change_ctrl_state: LIVE -> RESETTING by the CPU that performs the reset)
    [("resets", "<u4"), ("ctrl_state", "<u4")],
    # ctrl->abort_limit: Aborts the host may still send (ACL + 1 at identify), taken
    # and given back atomically by whichever CPU times out or completes an Abort
    [("abort_limit", "<i4")],
)

#: One queue pair's shared words.  The rings themselves are separate regions.
NVME_QUEUE = cacheline_struct(
    [("sq_tail_db", "<u4")],  # SQ tail (shadow) doorbell: the host's last published tail
    # the SQ's EventIdx (Doorbell Buffer Config): written by the device worker before
    # it sleeps; the host kicks it when a new tail passes this index
    # (nvme_dbbuf_need_event); ``worker``: which device worker serves this SQ
    [("sq_event_idx", "<u4"), ("worker", "<u4")],
    [("cq_head_db", "<u4")],  # CQ head doorbell: the host's last consumed head
    # struct nvme_queue (host side), shared by the CPUs that use this queue:
    # ``enabled`` is NVMEQ_ENABLED: read and written under sq_lock only
    [("sq_lock", "<u8"), ("sq_tail", "<u4"), ("last_sq_tail", "<u4"), ("enabled", "<u4")],
    [("cq_lock", "<u8"), ("cq_head", "<u4"), ("cq_phase", "<u4")],
    # the vector's pending bit (MSI-X PBA): set by the device when it raises the
    # interrupt (a pipe write only if it was clear), cleared by the host's handler
    # before it reaps; both with xchg
    [("irq_pending", "<u4")],
    # written by the device only (published for debugfs and tests)
    [("dev_sq_head", "<u4"), ("dev_cq_tail", "<u4"), ("dev_phase", "<u4")],
    [("created", "<u4"), ("q_depth", "<u4"), ("cqid", "<u4"), ("iv", "<u4")],
)
