"""What a run is given and what it gives back: :class:`RunSpec`, :class:`RunResult`,
and :class:`RunError` (a run that could not complete, with what it measured).

Imported by the owner (:mod:`mqrt.runtime.owner`), its wait loop
(:mod:`mqrt.runtime.manager`) and the commands that build runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mqrt.block.blk_mq_cpumap import Topology
from mqrt.block.blk_mq_structs import RequestQueue
from mqrt.block.blk_mq_types import BlkMqOps
from mqrt.block.blk_sysfs import TimedWrite
from mqrt.lib import wire
from mqrt.lib.shm import Layout


class RunError(RuntimeError):
    """The run could not complete (a CPU died or hung); carries what was measured."""

    def __init__(
        self, message: str, partial: RunResult | None = None, dead: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.partial = partial
        #: the process that ended the run, when there is no partial result to say so
        #: (as RunResult.dead's entries: role, pid, how)
        self.dead = dead


@dataclass
class RunSpec:
    """Everything a run needs; the driver's ``setup`` fills queues and ops."""

    nr_cpus: int
    job: Any  #: workers.ioengine.JobSpec
    #: the driver's set-up: declares its queues in the layout; -> ops, queues, dev_bytes
    setup: Callable[[Layout, Topology], tuple[BlkMqOps, list[RequestQueue], int]]
    cpus_allowed: list[int] | None = None  #: host CPUs to pin to (None: this process's)
    cpus_per_core: int | None = None  #: emulated topology (None: from the host)
    pin: bool = True
    seed: int = 0
    mode: str = "mq"  #: mq, sq or raw: how the CPUs feed the driver (mqrt.block.blk_mq_modes)
    #: per request queue, the job to run on it (None: ``job`` on every queue)
    queue_jobs: list[Any] | None = None
    #: per CPU, the job it runs (None: ``job`` on every CPU); fio's jobs of one group
    #: side by side, ``job`` then being the one that runs longest
    cpu_jobs: list[Any] | None = None
    #: the report's jobs when ``cpu_jobs`` is set: (name, the CPUs running it)
    job_members: list[tuple[str, list[int]]] | None = None
    #: sysfs writes at given times (--at, --every), made by CPU 0's writer task
    #: (workers/kthread.py); the owner binds them to the queues the setup built
    timeline: list[TimedWrite] | None = None
    #: injection points to arm for the run: name -> (percent, max µs) (mqrt.lib.inject)
    inject: dict[str, tuple[float, int]] | None = None
    #: the injected spinning delays take the CPU's interrupts, nested (mqrt.lib.inject)
    inject_irqs: bool = False
    #: watch the run with mqrt.runtime.detectors's detectors: the first finding stops it
    detect: bool = False
    #: the hang detector's least time without progress, in seconds (it also needs
    #: several looks in a row, and every CPU asleep at each)
    hang_s: float = 1.0
    #: event trace: records per CPU ring (0: no trace)
    trace_entries: int = 0
    #: where to dump the trace (msgpack) when the run fails: a detector fired, an
    #: invariant broke or a process died (None: never)
    trace_dump: str | None = None
    #: cProfile each CPU into this folder (cpuN.prof; None: no profile)
    profile_dir: str | None = None
    #: Called with a progress snapshot about every 0.25 s while the run goes.
    progress: Callable[[dict[str, Any]], None] | None = None
    #: Called with one line at each step of the run's life (set-up, start, deadline,
    #: stop, exit): what ``mqrt bench -v`` prints.
    on_event: Callable[[str], None] | None = None
    #: Called once the run's segment exists, with the line that names it (``run
    #: <segment>: owner pid <pid>, <n> CPUs``), so another terminal can find the run.
    on_start: Callable[[str], None] | None = None
    #: Called with the run's segment name once its manifest is published, before
    #: the CPUs start: from then on ``mqrt inspect`` can attach to it.
    on_published: Callable[[str], None] | None = None


@dataclass
class RunResult:
    cpus: list[wire.CpuReport]
    invariants: dict[str, Any]
    queues: list[dict[str, Any]]
    host: dict[str, Any]
    topology: str
    setup_s: float  #: from run() to the first I/O
    wall_s: float
    dead: list[dict[str, Any]] = field(default_factory=list)
    #: CPUs the runtime killed itself (caught spinning by the livelock detector): who,
    #: and the counters they last published ("partial"), as for ``dead``
    stopped: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    interrupted: bool = False  #: stopped early by Ctrl-C: figures cover what ran
    t0_wall: float = 0.0  #: wall-clock time of the first I/O (time.time())
    device: dict[str, Any] = field(default_factory=dict)  #: the device's counters
    #: what a detector found (mqrt.runtime.detectors.Finding.to_dict()), if it stopped the run
    finding: dict[str, Any] | None = None
    #: the trace dump written for a failed run (RunSpec.trace_dump), if any
    trace_dump: str | None = None
    #: the timeline's writes (CPU 0's writer): ``transitions`` and per write its
    #: ``started``/``late``/``skipped`` (``writes``); {} without a timeline
    sysfs: dict[str, Any] = field(default_factory=dict)
    #: lock_stat: every CPU's contention counters, ``[cpu, class, field]``
    #: (:mod:`mqrt.lib.lockstat`), read from the arena at the end; None if not read
    lock_stat: Any = None
