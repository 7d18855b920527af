"""A CPU: one worker process per emulated CPU, pinned to a host core.

The process is the CPU *and* the task running fio on it.  It owns its ctx (the
software staging queue of every request queue), runs its I/O jobs, and is where its
"interrupts" happen: softirqs raised by completions, hrtimers (null_blk's
``irqmode=timer``, the ``mbps`` refill), kblockd work (hctx runs, requeue and
timeout work) and IPIs from other CPUs arriving on its pipe.

One wait point: an epoll over the IPI pipe, the control pipe and the CPU's waiter
eventfd, with the next timer as timeout.  When its jobs are at full depth (or
rate-limited, or finished) the CPU blocks there; it never spins on a core another
CPU may need.  While the task sleeps for a tag (:meth:`Cpu.schedule`) the same wait
keeps taking interrupts, as a kernel CPU does.  A CPU that shares its host core with
other CPUs offers the host a preemption point at its busy look between batches, where
it holds no plugged tags (:data:`mqrt.lib.wait.cond_resched`).

IPI messages (48 bytes, written whole: < PIPE_BUF, so never interleaved):

==============  =====================================================================
kind            fields
==============  =====================================================================
IPI_COMPLETE    q, rq id, generation: run ->complete here (rq_affinity)
IPI_RUN         q, hctx, delay: kblockd work, run the hctx here
IPI_BIO_DONE    q, op, nr_bios, bytes, start, io_start, status: a job's I/Os finished;
                with nr_bios > 1 also the rq id and generation, under which this CPU
                keeps the request's merged bios (BlkMq.bios_done)
IPI_RCU         (none): an expedited grace period asks for a quiescent state
                (mqrt.lib.rcu), reported here or when the read-side section the
                IPI nested in ends
==============  =====================================================================

CPU 0 of a run with a timeline (``--at``, ``--every``) also runs the sysfs writer, a
second task with a waiter slot and eventfd of its own (:mod:`mqrt.workers.kthread`):
its event loop steps the writer at each pass, and blocks with it when it is parked.

Life cycle (driven by the runtime over the control pipe): ready -> start -> run until
the deadline or ``stop`` -> drain own I/Os -> ``drained`` -> keep serving interrupts
until ``exit`` -> result.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import os
import resource
import select
import struct
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_modes import RawBlkMq, SqBlkMq
from mqrt.block.blk_mq_structs import RequestQueue, Stopped
from mqrt.block.blk_mq_types import BlkMqOps
from mqrt.block.blk_sysfs import StoreCtx, TimedWrite
from mqrt.lib import inject, lockstat, rcu, retries, trace, wait, wire
from mqrt.lib.cpuhp import CpuhpSpec, CpuhpState
from mqrt.lib.proc import child_init
from mqrt.lib.rcu import RcuReader, RcuSpec
from mqrt.lib.shm import Arena, Region, cacheline_struct
from mqrt.lib.trace import Tracer, TraceSpec
from mqrt.lib.wait import Waiters, WaitersSpec
from mqrt.workers.ioengine import IoJob, JobSpec
from mqrt.workers.kthread import Writer
from mqrt.workers.live import DISK_FIELDS, LiveSpec, Publisher

IPI = struct.Struct("<BBHiIiQQQQ")
IPI_COMPLETE, IPI_RUN, IPI_BIO_DONE, IPI_RCU = 1, 2, 3, 4
#: How often a CPU publishes its live counters to the arena, ns.
PUBLISH_NS = 50_000_000
#: At most this often a publish folds the jobs' completions first (each fold is a few
#: numpy calls: ~0.1 ms), so observers' diskstats are at most this late.
LIVE_FOLD_NS = 250_000_000

#: Per CPU live counters, written by that CPU only (plain stores), read by the runtime
#: for progress and for a CPU that died before reporting.
CPU_STATS = cacheline_struct(
    [
        ("completed", "<u8"),  # I/Os completed (all jobs, ramp included)
        ("submitted", "<u8"),
        ("inflight", "<i8"),
        ("heartbeat_ns", "<u8"),
        ("phase", "<u8"),  # 0 setup, 1 ready, 2 running, 3 draining, 4 drained
        ("violations", "<u8"),  # invariant violations seen (published at once)
        ("stale", "<u8"),  # stale or second completions dropped
        ("retries", "<u8"),  # times round a retry loop (at once: mqrt.lib.retries)
    ]
)
PHASE_READY, PHASE_RUNNING, PHASE_DRAINING, PHASE_DRAINED = 1, 2, 3, 4
#: What each published phase means, as the runtime's watchdog words it.
PHASE_NAMES = (
    "setting up",
    "ready, waiting for the start",
    "running its jobs",
    "draining its I/Os",
    "drained, waiting to exit",
)
#: A CPU's wait point never blocks longer than this, so its heartbeat moves while
#: it is idle (the runtime's watchdog tells an idle CPU from a hung one by it).
HEARTBEAT_NS = 250_000_000
#: After a stop (the user's Ctrl-C, SIGTERM), a CPU waits this long for its I/Os in
#: flight, then abandons them (reported, not counted as violations): a stop ends the
#: run within a second whatever the device's completion time.
STOP_DRAIN_NS = 1_000_000_000


@dataclass
class CpuPlan:
    """What a CPU needs, inherited through fork (never pickled)."""

    cpu: int
    host_core: int | None  #: host CPU to pin to, None: do not pin
    arena: Arena
    waiters: WaitersSpec
    eventfds: list[int]
    ipi_r: list[int]
    ipi_w: list[int]
    stats: Region
    live: LiveSpec  #: where this CPU publishes its counters for observers
    lock_stat: Region  #: every CPU's lock_stat counters (mqrt.lib.lockstat)
    queues: list[RequestQueue]
    driver: BlkMqOps  #: the driver (this CPU binds its forked copy)
    job: JobSpec
    dev_bytes: int
    timeout_scan_cpu: list[int]  #: per queue, the CPU running its timeout work
    timer_cpu: list[int]  #: per queue, the CPU running the driver's timer (-1: none)
    seed: int
    owner_pid: int  #: the runtime (the CPU dies with it)
    mode: str = "mq"  #: mq, sq or raw (mqrt.block.blk_mq_modes)
    #: per request queue, the job to run on it (None: ``job`` on every queue); the
    #: run's runtime, ramp_time and hipri come from ``job``
    queue_jobs: list[JobSpec] | None = None
    #: the run's RCU state (grace periods ask every CPU for a quiescent state)
    rcu: RcuSpec | None = None
    #: the run's CPU hotplug state (a timeline that takes CPUs offline)
    hotplug: CpuhpSpec | None = None
    #: the run's timed sysfs writes, made by the writer task of CPU 0
    #: (workers/kthread.py), bound to the run's queues
    timeline: list[TimedWrite] | None = None
    #: the writer task's waiter slot (its eventfd is in CPU 0's wait point)
    writer_slot: int = -1
    trace: TraceSpec | None = None  #: the event trace's rings, if the run traces
    #: cProfile this CPU into DIR/cpuN.prof (``mqrt bench --profile``; the variable
    #: MQRT_PROFILE_DIR does the same for any run)
    profile_dir: str | None = None
    #: the CPU offers the host scheduler a preemption point where it holds no tags
    #: (:data:`mqrt.lib.wait.cond_resched`): see :func:`preempt_points`
    preempt_points: bool = False
    #: the request pools' accessors, made once by the runtime before it forked
    #: (mqrt.block.blk_mq_setup.prepare_cpus): this CPU's inherited copy
    pools: dict[int, Any] | None = None
    #: (read, write) ends of the runtime's start gate: this CPU closes its copy of
    #: the write end and waits for EOF (every CPU forked) before its set-up
    gate: tuple[int, int] | None = None


class Cpu:
    """One emulated CPU: the services blk-mq needs (:class:`mqrt.block.blk_mq_structs.CpuSys`) and
    the event loop."""

    def __init__(self, plan: CpuPlan, ctl, res):
        self.plan = plan
        self.cpu = plan.cpu
        self.ctl = ctl
        self.res = res
        self.clock = time.monotonic_ns
        self.arena = plan.arena
        self.waiters = Waiters(plan.arena, plan.waiters, plan.eventfds, plan.cpu)
        self.efd = plan.eventfds[plan.cpu]
        self.ipi_fd = plan.ipi_r[plan.cpu]
        self.ipi_w = plan.ipi_w
        self.softirqs: deque[tuple[Callable[[int, int], None], int, int]] = deque()
        #: (expires, seq, fn, args, hard): hard is a driver's hrtimer (an interrupt),
        #: not the CPU's own periodic work
        self.timers: list[tuple[int, int, Callable[..., None], tuple, bool]] = []
        self._timer_seq = 0
        self.runs: dict[tuple[int, int], int] = {}  #: pending kblockd runs -> due ns
        self.requeue_pending: set[int] = set()
        self.outbox: dict[int, bytearray] = {}
        self._ipi_rest = b""
        self.stopping = False  #: stop submitting
        self.exiting = False  #: the runtime said exit
        self._start_ns: int | None = None  #: t0 of the run, from the runtime's start
        # what _report() covers: the run's resource usage and times (set by main())
        self.ru_start: resource.struct_rusage | None = None
        self.ru_end: resource.struct_rusage | None = None
        self.t_run0 = self.t_run1 = self.t_stop = 0
        self.counters = {"ipis_received": 0, "irq_wakeups": 0, "idle_waits": 0, "sleeps": 0}
        if plan.rcu is not None:
            rcu.install(RcuReader(plan.arena, plan.rcu, plan.cpu, self.waiters, self._ipi_rcu))
        # before the block layer's handles: they take their counters' offsets when made
        lockstat.install(plan.arena.atomic, plan.lock_stat, plan.cpu)
        mq_class = {"mq": BlkMq, "sq": SqBlkMq, "raw": RawBlkMq}[plan.mode]
        self.mq = mq_class(plan.arena, self.waiters, plan.cpu, plan.queues, self, plan.pools)
        if plan.hotplug is not None:
            self.mq.hotplug = CpuhpState(plan.arena, plan.hotplug, self.waiters)
        plan.driver.bind(plan.arena, self.mq, plan.cpu)
        self.jobs = [
            IoJob(
                plan.queue_jobs[q.index] if plan.queue_jobs else plan.job,
                plan.cpu,
                q.index,
                plan.dev_bytes,
                plan.seed,
            )
            for q in plan.queues
        ]
        self.mq.end_io = [job.done for job in self.jobs]
        self.mq.end_io_merged = [job.done_merged for job in self.jobs]
        self.mq.on_violation = self._on_violation
        if plan.trace is not None:
            trace.install(Tracer(plan.arena, plan.trace, plan.cpu))
        self._next_pub = 0
        self._phase = 0  # as last published
        self._abandon_ns = 0  # after a stop: when the I/Os still in flight are abandoned
        self._hang_at, self._hang_kind = _hang_plan(plan.cpu)
        #: hipri: the POLL hctxs this CPU submits to, reaped by this CPU itself.
        self.poll_hctxs = (
            list(dict.fromkeys(q.hctx_poll for q in self.mq.queues if q.poll_capable))
            if plan.job.hipri
            else []
        )

        o = plan.stats.offsets(plan.cpu)
        self._st = o
        self._live = Publisher(plan.arena, plan.live, plan.cpu)
        self._next_fold = 0
        retries.install(plan.arena.atomic, o.retries)
        #: Interrupt vectors affine to this CPU: fd -> handler (the driver's irq).
        self.irq_handlers: dict[int, Callable[[], None]] = dict(
            plan.driver.irq_handlers(self.mq, plan.cpu)
        )
        self.driver_irq_poll = plan.driver.irq_poll
        self._fds = [self.ipi_fd, self.efd, ctl.fileno(), *self.irq_handlers]
        #: the sysfs writer task (CPU 0 of a run with a timeline): its own waiter
        #: slot and eventfd, in this CPU's wait point; the task is made at the start
        self.writer: Writer | None = None
        self.writer_waiters: Waiters | None = None
        self.writer_efd = -1
        if plan.timeline and plan.writer_slot >= 0:
            self.writer_waiters = Waiters(plan.arena, plan.waiters, plan.eventfds, plan.writer_slot)
            self.writer_efd = plan.eventfds[plan.writer_slot]
            self._fds.append(self.writer_efd)
        self.epoll = select.epoll()
        for fd in self._fds:
            self.epoll.register(fd, select.EPOLLIN)
        wait.long_spin_hook = self._check_exit  # a lock holder may have been killed
        #: the task is in process context (submitting): an interrupt may nest here
        self.in_task = False
        self._irq_fds = [self.ipi_fd, *self.irq_handlers]
        self._irq_epoll = select.epoll()
        for fd in self._irq_fds:
            self._irq_epoll.register(fd, select.EPOLLIN)
        inject.irq_hook = self._irq_in_window

    def _irq_in_window(self) -> None:
        """An interrupt arrives while an injected delay holds a window open
        (:mod:`mqrt.lib.inject`, ``irqs``).  Only process context is interrupted: the
        task submitting (in a softirq or an interrupt handler nothing nests, as
        softirqs do not).  The hard interrupts pending on this CPU run (IPIs, the
        driver's vectors, its hrtimers that expired), then, as on irq_exit, the
        pending softirqs -- nested in whatever the task was doing."""
        if not self.in_task:
            return
        self.in_task = False
        try:
            for fd in wait.wait_fds(self._irq_epoll, self._irq_fds, 0.0):
                if fd == self.ipi_fd:
                    self._handle_ipis()
                else:
                    self.irq_handlers[fd]()
            timers = self.timers
            if timers:  # hrtimers that expired (the CPU's own work waits for the task)
                now = self.clock()
                while timers and timers[0][0] <= now and timers[0][4]:
                    _, _, fn, args, _hard = heapq.heappop(timers)
                    fn(*args)
            softirqs = self.softirqs
            while softirqs:
                fn, a, b = softirqs.popleft()
                fn(a, b)
        finally:
            self.in_task = True

    def _check_exit(self) -> None:
        """Called while spinning long on a lock: give up if the run is ending.  The
        heartbeat moves: a CPU waiting for a lock is waiting, like one asleep; if the
        holder hangs, the watchdog finds the holder (stopped, blocked, spinning
        elsewhere), and a host that keeps the holder off its core is not a hang."""
        if self.clock() >= self._next_pub:
            self._publish(self._phase)
        if self.ctl.poll():
            self._handle_ctl()
        if self.exiting:
            raise Stopped

    # -- CpuSys: what blk-mq asks of its CPU -----------------------------------------------------

    def raise_softirq(self, fn: Callable[[int, int], None], a: int, b: int) -> None:
        self.softirqs.append((fn, a, b))

    def add_timer(self, expires_ns: int, fn: Callable[..., None], *args: Any) -> None:
        """A driver's hrtimer: it fires in interrupt context."""
        self._timer_seq += 1
        heapq.heappush(self.timers, (expires_ns, self._timer_seq, fn, args, True))

    def _add_work(self, expires_ns: int, fn: Callable[..., None], *args: Any) -> None:
        """The CPU's own timed work (the timeout work, a driver's timer)."""
        self._timer_seq += 1
        heapq.heappush(self.timers, (expires_ns, self._timer_seq, fn, args, False))

    def ipi_complete(self, cpu: int, q: int, rq_id: int, gen: int) -> None:
        self._send(cpu, IPI.pack(IPI_COMPLETE, 0, q, rq_id, gen, 0, 0, 0, 0, 0))

    def kblockd_run(self, cpu: int, q: int, hctx: int, delay_ns: int) -> None:
        if cpu == self.cpu:
            self.runs[(q, hctx)] = self.clock() + delay_ns  # mod_delayed_work()
        else:
            self._send(cpu, IPI.pack(IPI_RUN, 0, q, hctx, 0, 0, delay_ns, 0, 0, 0))

    def _ipi_rcu(self, cpu: int) -> None:
        """An expedited grace period asks ``cpu`` for a quiescent state."""
        self._send(cpu, IPI.pack(IPI_RCU, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def kick_requeue(self, q: int) -> None:
        self.requeue_pending.add(q)

    def bio_done(self, cpu: int, q: int, info: tuple) -> None:
        if cpu == self.cpu:
            self.jobs[q].done(info, self.clock())
        elif info[1] > 1:  # a merged request: its bios are with their submitter
            op, nr_bios, nbytes, start, io_start, status, rq_id, gen = info
            self._send(
                cpu,
                IPI.pack(IPI_BIO_DONE, op, q, nr_bios, rq_id, status, nbytes, start, io_start,
                         gen),
            )  # fmt: skip
        else:
            op, nr_bios, nbytes, start, io_start, status = info
            self._send(
                cpu,
                IPI.pack(IPI_BIO_DONE, op, q, nr_bios, 0, status, nbytes, start, io_start, 0),
            )

    def schedule(self) -> None:
        """The task sleeps (for a tag, or for a frozen queue to thaw) until a waker
        sets it running again; the CPU keeps taking its interrupts (which may be what
        frees the tag) meanwhile.  Counted as ``sleeps``; the tag maps count their own
        (``tag_sleeps``)."""
        self.counters["sleeps"] += 1
        in_task, self.in_task = self.in_task, False  # interrupts run at the wait point
        try:
            self._sleep()
        finally:
            self.in_task = in_task

    def _sleep(self) -> None:
        while self.waiters.sleeping():
            if self.exiting:
                raise Stopped
            self._maybe_publish(PHASE_RUNNING)
            if self._poll_inflight(in_sleep=True):  # our own polled I/Os may be what frees a tag
                continue
            self._serve(None, in_sleep=True)
        if self.exiting:
            raise Stopped

    # -- IPIs --------------------------------------------------------------------------------------

    def _send(self, cpu: int, msg: bytes) -> None:
        pending = self.outbox.get(cpu)
        if pending:
            pending += msg
            return
        try:
            os.write(self.ipi_w[cpu], msg)
        except BlockingIOError:
            self.outbox[cpu] = bytearray(msg)

    def _flush_outbox(self) -> None:
        for cpu, pending in list(self.outbox.items()):
            while pending:
                n = min(len(pending), (4096 // IPI.size) * IPI.size)
                try:
                    os.write(self.ipi_w[cpu], pending[:n])
                except BlockingIOError:
                    break
                del pending[:n]
            if not pending:
                del self.outbox[cpu]

    def _handle_ipis(self) -> None:
        try:
            data = self._ipi_rest + os.read(self.ipi_fd, IPI.size * 256)
        except BlockingIOError:
            return
        usable = len(data) - len(data) % IPI.size
        self._ipi_rest = data[usable:]
        mq = self.mq
        now = self.clock()
        for kind, op, q, a, b, status, c, t0, t1, t2 in IPI.iter_unpack(data[:usable]):
            self.counters["ipis_received"] += 1
            if kind == IPI_BIO_DONE:
                if a > 1:
                    mq.bios_done(q, (op, a, c, t0, t1, status, b, t2), now)
                else:
                    self.jobs[q].done((op, a, c, t0, t1, status), now)
            elif kind == IPI_COMPLETE:
                mq.ipi_complete(q, a, b)
            elif kind == IPI_RUN:
                self.runs[(q, a)] = now + c
            elif kind == IPI_RCU:
                rcu.reader.note_qs()  # now, or when the section it nested in ends

    # -- interrupts, timers and kblockd ------------------------------------------------------------

    def _interrupts(self) -> bool:
        """Run softirqs, due timers and due kblockd work; True if anything ran."""
        ran = False
        mq = self.mq
        softirqs = self.softirqs
        while softirqs:
            fn, a, b = softirqs.popleft()
            fn(a, b)
            ran = True
        timers = self.timers
        if timers:
            now = self.clock()
            while timers and timers[0][0] <= now:
                _, _, fn, args, _hard = heapq.heappop(timers)
                fn(*args)
                ran = True
                while softirqs:
                    f, a, b = softirqs.popleft()
                    f(a, b)
        if self.runs:
            now = self.clock()
            due = [k for k, t in self.runs.items() if t <= now]
            for key in due:
                del self.runs[key]
                mq.run_work(*key)
                ran = True
        if self.requeue_pending:
            for q in sorted(self.requeue_pending):
                self.requeue_pending.discard(q)
                mq.requeue_work(q)
                ran = True
        return ran

    def _wait_timeout(self, until_ns: int | None) -> float:
        """Seconds epoll may block: up to the next timer, kblockd run or ``until_ns``
        (-1: forever)."""
        deadlines = []
        if self.timers:
            deadlines.append(self.timers[0][0])
        if self.runs:
            deadlines.append(min(self.runs.values()))
        if until_ns is not None:
            deadlines.append(until_ns)
        if self.writer is not None:
            due = self.writer.next_ns()
            if due is not None:
                deadlines.append(due)
        if self.softirqs or self.requeue_pending or self.outbox:
            return 0.0 if not self.outbox else 0.001
        if not deadlines:
            return -1
        return max(0.0, (min(deadlines) - self.clock()) / 1e9)

    def _periodic(self, q: int, fn: Callable[[int], Any], period_ns: int) -> None:
        """A self-rearming timer (the timeout work, the bandwidth timer)."""

        def tick() -> None:
            if not self.exiting:
                fn(q)
                self._add_work(self.clock() + period_ns, tick)

        self._add_work(self.clock() + period_ns, tick)

    # -- control -----------------------------------------------------------------------------------

    def _handle_ctl(self) -> None:
        while self.ctl.poll():
            try:
                msg = wire.recv_command(self.ctl)
            except EOFError:
                self.exiting = self.stopping = True
                if self.writer is not None:
                    self.writer.stop()
                return
            match msg:
                case wire.Stop():
                    self.stopping = True
                    if self.writer is not None:
                        self.writer.stop()
                    if not self._abandon_ns:
                        self._abandon_ns = self.clock() + STOP_DRAIN_NS
                case wire.Exit():
                    self.exiting = self.stopping = True
                    if self.writer is not None:
                        self.writer.stop()
                case wire.Start(t0_ns=t0):
                    self._start_ns = t0

    def _publish(self, phase: int) -> None:
        a = self.arena.atomic
        o = self._st
        submitted = sum(j.submitted for j in self.jobs)
        inflight = sum(j.inflight for j in self.jobs)
        a.set(o.submitted, submitted)
        a.set(o.completed, submitted - inflight)
        a.set(o.inflight, inflight & 0xFFFFFFFFFFFFFFFF)
        a.set(o.heartbeat_ns, self.clock())
        a.set(o.phase, phase)
        self._phase = phase
        a.set(o.stale, self.mq.stats["stale_completions"])
        self._publish_live()
        lockstat.publish()
        self._next_pub = self.clock() + PUBLISH_NS

    def _publish_live(self) -> None:
        """Every counter an observer shows (mqrt.workers.live), into this CPU's blocks."""
        mq = self.mq
        counters = {**mq.counters(), **self.counters, **self._tags_stats()}
        disks = [[0] * len(DISK_FIELDS) for _ in mq.queues]
        now = self.clock()
        if now >= self._next_fold:  # the jobs' diskstats are what they folded
            self._next_fold = now + LIVE_FOLD_NS
            for j in self.jobs:
                j.fold()
        for j in self.jobs:
            r, w = j.dirs
            row = (
                r.requests, r.ios - r.requests, r.nbytes >> 9, r.ticks_ns,
                w.requests, w.ios - w.requests, w.nbytes >> 9, w.ticks_ns,
                j.inflight,
            )  # fmt: skip
            disks[j.q] = [x + y for x, y in zip(disks[j.q], row, strict=True)]
        self._live.publish(counters, [q.hctxs for q in mq.queues], disks)

    def _on_violation(self) -> None:
        """BlkMq found a broken invariant: publish it now (the runtime's detectors)."""
        self.arena.atomic.set(self._st.violations, self.mq.stats["violations"])

    def _maybe_publish(self, phase: int) -> None:
        if self.clock() >= self._next_pub:
            self._publish(phase)

    def _send_res(self, msg: wire.Report) -> None:
        wire.send(self.res, msg)

    # -- the run -----------------------------------------------------------------------------------

    def main(self) -> None:
        self._publish(PHASE_READY)
        # a forked child's CPU time starts at zero: all of it so far is its set-up
        self._send_res(
            wire.Ready(
                wire.Role.CPU, os.getpid(), self.cpu, self.plan.host_core, time.process_time_ns()
            )
        )
        while self._start_ns is None and not self.exiting:
            self.ctl.poll(HEARTBEAT_NS / 1e9)
            self._maybe_publish(PHASE_READY)
            self._handle_ctl()
        t0 = self._start_ns
        if self.exiting or t0 is None:
            self._report()
            return
        if self._hang_at:
            self._hang_at += t0
        self._setup_periodic(t0)
        spec = self.plan.job
        ramp_ns = int(spec.ramp_time * 1e9)
        end_ns = t0 + ramp_ns + int(spec.runtime * 1e9)
        if self.writer_waiters is not None and self.plan.timeline:
            ctx = StoreCtx(self.mq, self.writer_waiters, self, self.clock)
            self.writer = Writer(
                self.plan.timeline, ctx, self.writer_waiters, t0, end_ns, self.clock
            )
        for job in self.jobs:
            job.record_from_ns = t0 + ramp_ns
        now = self.clock()
        if now < t0:
            time.sleep((t0 - now) / 1e9)
        self.ru_start = resource.getrusage(resource.RUSAGE_SELF)
        self.t_run0 = self.clock()
        self.t_stop = t0 + ramp_ns
        try:
            try:
                self._run(t0, end_ns)
            finally:
                if self.mq.hotplug is not None:  # the task submits no more: it follows any move
                    self.mq.hotplug.task_exit(self.cpu)
            self.t_stop = self.clock()
            self._drain()
        except Stopped:
            self.t_stop = min(self.clock(), end_ns)
        self.t_run1 = self.clock()
        self.ru_end = resource.getrusage(resource.RUSAGE_SELF)
        self._publish(PHASE_DRAINED)
        self._send_res(wire.Drained(self.cpu))
        with contextlib.suppress(Stopped):
            while not self.exiting:
                self._serve(None)
        if self.writer is not None:
            self.writer.close()
        self._report()

    def _setup_periodic(self, t0: int) -> None:
        plan = self.plan
        driver = plan.driver
        for q, owner in enumerate(plan.timeout_scan_cpu):
            if owner == self.cpu:
                queue = self.mq.queues[q]
                period = min(max(queue.timeout_ns // 8, 1_000_000), 200_000_000)
                self._periodic(q, self.mq.timeout_work, period)
        for q, owner in enumerate(plan.timer_cpu):
            if owner == self.cpu:
                period = driver.timer_interval_ns(q)
                self._periodic(q, lambda q: driver.timer(self.mq, q), period)

    def _run(self, t0: int, end_ns: int) -> None:
        """Submit while the jobs have room; serve interrupts; block when idle.  A
        ``rate_iops`` job issues at t0 + k / rate_iops, the run's common start: the
        CPUs' paced jobs keep in step however late each CPU got to its first I/O."""
        mq = self.mq
        jobs = self.jobs
        queues = mq.queues
        hipri = self.plan.job.hipri
        clock = self.clock
        # per job: its iodepth, submit batch, completions to wait for, rate gap (ns)
        shape = [
            (
                j.spec.iodepth,
                j.spec.batch,
                j.spec.iodepth_batch_complete,
                int(1e9 / j.spec.rate_iops) if j.spec.rate_iops else 0,
            )
            for j in jobs
        ]
        next_pub = clock() + PUBLISH_NS
        next_allowed = [t0] * len(jobs)
        sized = all(job.limit or job.limit_bytes for job in jobs)
        hotplug = mq.hotplug is not None
        polled_ctx = mq.ctx_cpu  # the ctx whose POLL hctxs this CPU reaps
        while True:
            now = clock()
            if now >= end_ns or self.stopping:
                return
            if hotplug:  # CPU hotplug moved the task (or let it home): no plug held here
                mq.follow_task()
                if self.poll_hctxs and mq.ctx_cpu != polled_ctx:
                    # hipri: the task also reaps the POLL hctxs it now submits to
                    polled_ctx = mq.ctx_cpu
                    self.poll_hctxs = list(
                        dict.fromkeys(
                            [*self.poll_hctxs, *(q.hctx_poll for q in mq.queues if q.poll_capable)]
                        )
                    )
            if sized and all(not j.remaining() and not j.inflight for j in jobs):
                return  # every job did its --size
            if now >= next_pub:  # also where a busy CPU looks at its control pipe
                if self._hang_at and now >= self._hang_at:
                    _hang(self._hang_kind)
                self._publish(PHASE_RUNNING)
                next_pub = now + PUBLISH_NS
                if self.ctl.poll():
                    self._handle_ctl()
                    continue
            progressed = False
            wake_at = end_ns
            for i, job in enumerate(jobs):
                iodepth, batch, batch_complete, rate_gap = shape[i]
                room = iodepth - job.inflight
                if room <= 0 or (room < batch_complete and job.inflight):
                    continue
                n = min(room, batch)
                if job.limit or job.limit_bytes:  # number_ios, or not time_based: size
                    n = min(n, job.remaining())
                    if n <= 0:
                        continue
                if job.spec.iodepth_low:  # refill once the depth dropped to iodepth_low
                    if job.inflight >= iodepth:
                        job.draining = True
                    if job.draining:
                        if job.inflight > job.spec.iodepth_low:
                            continue
                        job.draining = False
                if job.paced:  # per-direction rates, thinktime
                    n, wake, spin = job.allowed(now, n)
                    if spin:
                        until = now + spin
                        while clock() < until:  # thinktime_spin: the CPU stays busy
                            pass
                    if n <= 0:
                        wake_at = min(wake_at, wake)
                        continue
                if rate_gap:
                    if now < next_allowed[i]:
                        wake_at = min(wake_at, next_allowed[i])
                        continue
                    n = min(n, 1 + (now - next_allowed[i]) // rate_gap)
                    next_allowed[i] += n * rate_gap
                    if next_allowed[i] < now - 1_000_000_000:
                        next_allowed[i] = now  # do not bank more than a second
                queue = queues[job.q]
                self.in_task = True
                try:
                    mq.start_plug(n)
                    ops, sectors, lens = job.next_bios(n)
                    mq.submit_bios(queue, ops, sectors, lens, hipri)  # io_submit()
                    job.mark_submit(n)
                    mq.finish_plug()
                finally:
                    self.in_task = False
                progressed = True
            if self._interrupts():
                progressed = True
            if progressed:
                # A busy CPU still takes its IPIs and interrupts at once (a zero
                # timeout look at its wait point), and sends what it owes others.
                self._serve(None, timeout=0.0)
            elif not self._poll_inflight():
                self._serve(wake_at)

    def idle_wait(self) -> None:
        """Wait for something to happen (a completion, most likely), serving it."""
        if self.exiting:
            raise Stopped
        if not self._poll_inflight():
            self._serve(None)

    def _poll_inflight(self, in_sleep: bool = False) -> bool:
        """With polled I/Os in flight, reap the poll queues once (io_uring's
        io_iopoll_check), or poll the vectors the driver keeps masked after an
        interrupt (``irq_poll``), and take interrupts without blocking; False when
        there is nothing to poll for, so the caller may block."""
        # a masked vector's CQ being polled (irq_poll) keeps this CPU awake too
        polling = self.driver_irq_poll(self.mq)
        if self.poll_hctxs and any(j.inflight for j in self.jobs):
            mq = self.mq
            for hctx in self.poll_hctxs:
                mq.poll(hctx)
            polling = True
        if polling:
            self._serve(None, in_sleep=in_sleep, timeout=0.0)
        return polling

    def _serve(
        self, until_ns: int | None, in_sleep: bool = False, timeout: float | None = None
    ) -> None:
        """Block in the one wait point until something happens (or ``timeout``
        seconds), then handle it: IPIs, interrupt vectors, control, softirqs, timers,
        kblockd work."""
        if self.outbox:
            self._flush_outbox()
        if timeout is None:
            timeout = self._wait_timeout(until_ns)
            if timeout != 0.0:
                self.counters["idle_waits"] += 1
                if timeout < 0 or timeout > HEARTBEAT_NS / 1e9:
                    timeout = HEARTBEAT_NS / 1e9
        elif timeout == 0.0 and self.plan.preempt_points:
            # A busy CPU's look between batches, where it holds no plugged tags: the
            # host may switch to another CPU of this core here rather than mid-plug.
            wait.cond_resched()
        # The writer task parked on a wait queue blocks with the CPU: its waker must
        # write its eventfd, unless it woke it already (then the CPU does not block).
        ww = self.writer_waiters
        writer_blocked = False
        if timeout != 0.0 and ww is not None and self.writer and self.writer.parked:
            writer_blocked = ww.block()
            if not writer_blocked:
                timeout = 0.0
        blocked = in_sleep and timeout != 0.0
        if blocked and not self.waiters.block():
            if writer_blocked and ww is not None:
                ww.unblock()
            return  # a waker already set the task running: no need to block
        fds = wait.wait_fds(self.epoll, self._fds, timeout)
        if blocked:
            self.waiters.unblock()
        if writer_blocked and ww is not None:
            ww.unblock()
        for fd in fds:
            if fd == self.ipi_fd:
                self._handle_ipis()
            elif fd in self.irq_handlers:
                self.irq_handlers[fd]()
            elif fd == self.efd:
                # A wake-up, or a late one for a wait already over: the state word
                # decides whether the task still sleeps (Cpu._sleep looks again).
                self.waiters.drain()
            elif fd == self.writer_efd and ww is not None:
                ww.drain()  # the same, for the writer task
            else:
                self._handle_ctl()
        self._interrupts()
        if self.writer is not None:
            self.writer.run()
        if timeout != 0.0 and self.clock() >= self._next_pub:
            self._publish(self._phase)  # the heartbeat of an idle CPU

    def _drain(self) -> None:
        """The deadline passed: submit nothing more, wait for our I/Os to finish (after
        a stop, for STOP_DRAIN_NS at most)."""
        self._publish(PHASE_DRAINING)
        while any(j.inflight for j in self.jobs) and not self.exiting:
            if self._abandon_ns and self.clock() >= self._abandon_ns:
                return
            self._maybe_publish(PHASE_DRAINING)
            if not self._poll_inflight():
                self._serve(self._abandon_ns or None)

    def _tags_stats(self) -> dict[str, int]:
        waits = sleeps = 0
        for tags_list in self.mq._tags.values():
            for t in tags_list:
                if t is not None:
                    waits += t.nr_tag_waits
                    sleeps += t.nr_tag_sleeps
        return {"tag_waits": waits, "tag_sleeps": sleeps}

    def _report(self) -> None:
        mq = self.mq
        lockstat.publish()  # the last acquisitions, before the runtime reads the arena
        ru0 = self.ru_start or resource.getrusage(resource.RUSAGE_SELF)
        ru1 = self.ru_end or resource.getrusage(resource.RUSAGE_SELF)
        hctx_stats = [
            {"q": q.index, "hctx": h.index, **h.stats}
            for q in mq.queues
            for h in q.hctxs
            if any(h.stats.values())
        ]
        tags_stats = self._tags_stats()
        report: wire.CpuReport = {
            "cpu": self.cpu,
            "pid": os.getpid(),
            "host_core": self.plan.host_core,
            "elapsed_ns": self.t_run1 - self.t_run0,
            # the time the jobs' statistics cover (after ramp_time, until submission
            # stopped: the deadline, or earlier on a stop)
            "measured_ns": max(
                0,
                self.t_stop - (self.jobs[0].record_from_ns if self.jobs else 0),
            ),
            "usr_s": ru1.ru_utime - ru0.ru_utime,
            "sys_s": ru1.ru_stime - ru0.ru_stime,
            "ctx_switches": (ru1.ru_nvcsw + ru1.ru_nivcsw) - (ru0.ru_nvcsw + ru0.ru_nivcsw),
            "vol_ctx_switches": ru1.ru_nvcsw - ru0.ru_nvcsw,
            "blk_mq": mq.counters(),
            "driver": self.plan.driver.driver_stats(),
            "cpu_counters": {**self.counters, **tags_stats},
            "inject_hits": dict(inject.hits),
            "hctx": hctx_stats,
            "violations": mq.violations,
            "jobs": [j.to_wire() for j in self.jobs],
            "sysfs": self.writer.report() if self.writer is not None else {},
            "hctx_maps": mq.map_history
            + [mq.map_snapshot(q) for q in mq.queues if q.map_gen or mq.map_history],
        }
        self._send_res(wire.CpuResult(report))


#: Most CPUs per host core for which preemption points pay (measured, 2-core VM,
#: nullb irqmode=none qd32, CPU per I/O without -> with: 4 per core 9.8 -> 6.9 us,
#: 16: 7.5 -> 6.0, 64: 8.7 -> 8.1, 128: 10.8 -> 12.7).  With that many processes on
#: a core each turn starts with cold caches, and switching at every slice's end
#: (1.5 ms) instead of at the tick (4 ms) costs more than the held tags it saves.
PREEMPT_POINTS_MAX_CPUS_PER_CORE = 64


def preempt_points(nr_cpus: int, nr_cores: int) -> bool:
    """Whether CPUs offer preemption points between batches: when several share a host
    core (a tick mid-plug leaves the plug's tags held by a process that does not run),
    up to :data:`PREEMPT_POINTS_MAX_CPUS_PER_CORE` of them."""
    per_core = -(-nr_cpus // max(1, nr_cores))
    return 1 < per_core <= PREEMPT_POINTS_MAX_CPUS_PER_CORE


def _hang_plan(cpu: int) -> tuple[int, str]:
    """``MQRT_HANG=CPU:spin|block:SECONDS`` (a developer's aid, for the runtime's
    watchdog): that CPU stops making progress that many seconds into its run,
    spinning in a loop or blocked on a lock nobody releases.  (0, "") otherwise."""
    spec = os.environ.get("MQRT_HANG", "")
    with contextlib.suppress(ValueError):
        which, kind, after = spec.split(":")
        if int(which) == cpu and kind in ("spin", "block"):
            return int(float(after) * 1e9) or 1, kind
    return 0, ""


def _hang(kind: str) -> None:
    """Never return: spin, or sleep on a lock this process already holds."""
    if kind == "spin":
        while True:
            pass
    import threading

    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def cpu_main(plan: CpuPlan, ctl, res) -> None:
    """Entry point of a CPU worker process (forked by the runtime)."""
    child_init(plan.owner_pid, plan.host_core, f"mqrt-cpu{plan.cpu}")
    if plan.gate is not None:
        gate_r, gate_w = plan.gate
        os.close(gate_w)
        with contextlib.suppress(OSError):
            os.read(gate_r, 1)  # EOF: the runtime forked every CPU (or died)
        os.close(gate_r)
    inject.seed_cpu(plan.cpu)
    try:
        cpu = Cpu(plan, ctl, res)
        # What the set-up made lives as long as the CPU: out of the collector's reach
        # (as the inherited heap is, gc.freeze() in the runtime), so the set-up's
        # allocations never bring a full collection, which walks and copies the
        # heap, into the measured run.
        gc.freeze()
        profile_dir = plan.profile_dir or os.environ.get("MQRT_PROFILE_DIR")
        if profile_dir:  # cProfile each CPU into that folder
            import cProfile

            # cProfile's own clock (a CPU-time clock is a system call per function
            # entry and exit: it costs many times the I/O path it times);
            # mqrt.bench.profile leaves out the time blocked in the wait point
            prof = cProfile.Profile()
            try:
                prof.runcall(cpu.main)
            finally:
                prof.dump_stats(os.path.join(profile_dir, f"cpu{plan.cpu}.prof"))
        else:
            cpu.main()
    except Exception:
        with contextlib.suppress(Exception):
            wire.send(res, wire.Error(wire.Role.CPU, traceback.format_exc(), plan.cpu))
        os._exit(1)
    os._exit(0)
