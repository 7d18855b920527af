"""Control messages between the runtime and the processes it starts (the CPU workers
and the device): one schema, used by every sender and every receiver.

Each child has two pipes to the runtime: a control pipe (runtime -> child) and a
result pipe (child -> runtime).  Control messages are few per run (never one per
I/O), so clarity comes first: each is a frozen dataclass, encoded as a msgpack map
``{"msg": kind, field: value, ...}`` that reads the same in a hex dump.

===========  ==================  ===========================================================
kind         direction           message
===========  ==================  ===========================================================
``start``    runtime -> CPU      :class:`Start`: run from ``t0_ns`` (``time.monotonic_ns``)
``stop``     runtime -> CPU      :class:`Stop`: submit nothing more, drain, say ``drained``
``exit``     runtime -> child    :class:`Exit`: stop serving, send the result, exit
``ready``    child -> runtime    :class:`Ready`: set up (a CPU then waits for ``start``)
``drained``  CPU -> runtime      :class:`Drained`: its own I/Os are done
``result``   child -> runtime    :class:`CpuResult` (a :class:`CpuReport`) or
                                 :class:`DeviceResult` (the device's counters), by ``role``
``error``    child -> runtime    :class:`Error`: the traceback of the exception it died of
===========  ==================  ===========================================================

Lives in ``mqrt.lib`` (which knows nothing of the block layer) because all three
parties import it: the runtime (``mqrt.runtime``), the CPU workers (``mqrt.workers``)
and the device (``mqrt.device``), and the latter two may not import the runtime.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypedDict

import msgpack


class Kind(enum.StrEnum):
    """The ``msg`` of a control message."""

    START = "start"
    STOP = "stop"
    EXIT = "exit"
    READY = "ready"
    DRAINED = "drained"
    RESULT = "result"
    ERROR = "error"


class Role(enum.StrEnum):
    """Which kind of child sent a message."""

    CPU = "cpu"
    DEVICE = "device"


class WireError(ValueError):
    """Bytes that are not a control message of this schema."""


class CpuReport(TypedDict):
    """What a CPU measured (its ``result``); the runtime's ``RunResult.cpus`` entries."""

    cpu: int
    pid: int
    host_core: int | None
    elapsed_ns: int  #: from its first I/O to the end of its drain
    measured_ns: int  #: the time its jobs' statistics cover (after ramp_time)
    usr_s: float
    sys_s: float
    ctx_switches: int
    vol_ctx_switches: int
    blk_mq: dict[str, int]  #: the block layer's counters on this CPU
    driver: dict[str, int]  #: the driver's (BlkMqOps.driver_stats)
    cpu_counters: dict[str, int]  #: IPIs, wake-ups, the task's sleeps, tag sleeps
    inject_hits: dict[str, int]
    hctx: list[dict[str, int]]  #: per hctx with activity: q, hctx and its counters
    violations: list[str]  #: broken invariants it saw
    jobs: list[dict[str, Any]]  #: per request queue, the job's statistics
    #: CPU 0 of a run with a timeline: its sysfs writer's ``transitions`` (one per
    #: write made) and ``writes`` (per --at/--every: started, late, skipped); else {}
    sysfs: dict[str, Any]
    #: per queue whose tag set's hctx count changed during the run: for each map this
    #: CPU followed, in order, its generation, nr_hw_queues, this CPU's hctx and the
    #: requests it allocated on each hctx until it left that map (cumulative); [] else
    hctx_maps: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Start:
    KIND: ClassVar[Kind] = Kind.START
    t0_ns: int


@dataclass(frozen=True, slots=True)
class Stop:
    KIND: ClassVar[Kind] = Kind.STOP


@dataclass(frozen=True, slots=True)
class Exit:
    KIND: ClassVar[Kind] = Kind.EXIT


@dataclass(frozen=True, slots=True)
class Ready:
    KIND: ClassVar[Kind] = Kind.READY
    role: Role
    pid: int
    cpu: int | None = None  #: the CPU's number (None: the device)
    host_core: int | None = None  #: where it is pinned (None: not pinned)
    #: CPU time the child spent from its fork to this message (its set-up), ns
    setup_cpu_ns: int = 0


@dataclass(frozen=True, slots=True)
class Drained:
    KIND: ClassVar[Kind] = Kind.DRAINED
    cpu: int


@dataclass(frozen=True, slots=True)
class CpuResult:
    KIND: ClassVar[Kind] = Kind.RESULT
    ROLE: ClassVar[Role] = Role.CPU
    report: CpuReport


@dataclass(frozen=True, slots=True)
class DeviceResult:
    KIND: ClassVar[Kind] = Kind.RESULT
    ROLE: ClassVar[Role] = Role.DEVICE
    counters: dict[str, int]


@dataclass(frozen=True, slots=True)
class Error:
    KIND: ClassVar[Kind] = Kind.ERROR
    role: Role
    error: str  #: the formatted traceback
    cpu: int | None = None  #: the CPU's number (None: the device)


#: What the runtime sends on a control pipe.
Command = Start | Stop | Exit
#: What a child sends on its result pipe.
Report = Ready | Drained | CpuResult | DeviceResult | Error
Message = Command | Report

_BY_KIND: dict[Kind, type] = {cls.KIND: cls for cls in (Start, Stop, Exit, Ready, Drained, Error)}
_RESULT_BY_ROLE: dict[Role, type] = {Role.CPU: CpuResult, Role.DEVICE: DeviceResult}


def pack(msg: Message) -> bytes:
    """The message as bytes for a pipe (``Connection.send_bytes``)."""
    body: dict[str, Any] = {"msg": msg.KIND.value}
    if isinstance(msg, CpuResult | DeviceResult):
        body["role"] = msg.ROLE.value
    for f in fields(msg):
        value = getattr(msg, f.name)
        body[f.name] = value.value if isinstance(value, enum.Enum) else value
    return msgpack.packb(body)


def unpack(data: bytes) -> Message:
    """The message in ``data``; :class:`WireError` if it is not one."""
    try:
        body = msgpack.unpackb(data)
        kind = Kind(body.pop("msg"))
        if kind is Kind.RESULT:
            cls = _RESULT_BY_ROLE[Role(body.pop("role"))]
        else:
            cls = _BY_KIND[kind]
        if "role" in body:
            body["role"] = Role(body["role"])
        return cls(**body)
    except (KeyError, TypeError, ValueError, AttributeError, msgpack.UnpackException) as exc:
        raise WireError(f"not a control message ({type(exc).__name__}: {exc})") from None


def send(conn: Any, msg: Message) -> None:
    """Write ``msg`` on a ``multiprocessing`` connection (errors are the caller's)."""
    conn.send_bytes(pack(msg))


def recv_command(conn: Any) -> Command:
    """Read one message from a control pipe (the child's side).  EOFError and OSError
    are the caller's; :class:`WireError` if it is not a command."""
    msg = unpack(conn.recv_bytes())
    if not isinstance(msg, Start | Stop | Exit):
        raise WireError(f"{msg.KIND} on a control pipe")
    return msg


def recv_report(conn: Any) -> Report:
    """Read one message from a result pipe (the runtime's side).  EOFError and
    OSError are the caller's; :class:`WireError` if it is not a report."""
    msg = unpack(conn.recv_bytes())
    if isinstance(msg, Start | Stop | Exit):
        raise WireError(f"{msg.KIND} on a result pipe")
    return msg
