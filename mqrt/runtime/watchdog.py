"""The runtime's watchdog: a CPU or the device that stopped making progress, named
with its process state, decided by what the process does rather than by the clock
alone.

Every child publishes a heartbeat in shared memory: a CPU at least every
:data:`~mqrt.workers.cpu.HEARTBEAT_NS` (its one wait point never blocks longer), the
device's coordinator every 50 ms.  The owner looks about ten times a second.  A
heartbeat that has not moved for :data:`STALE_S` makes the watchdog look at the
process (psutil) at every look from then on; the heartbeat moving again ends the
suspicion.  Verdicts, each needing :data:`MIN_LOOKS` looks:

``stopped``
    the process was stopped (SIGSTOP, SIGTSTP) at every look for :data:`STOPPED_S`.
    A process stopped by a debugger (``tracing-stop``: gdb, strace, py-spy) is being
    looked at on purpose and is left alone.
``spinning``
    its main thread used :data:`SPIN_CPU_S` of CPU time with the heartbeat still:
    a loop that never reaches the wait point (a retry that cannot succeed).  CPU
    time, not wall time: a process the host keeps off its core takes longer to
    convict but is convicted the same.  A CPU spinning on a taken bit spinlock beats
    (:data:`mqrt.lib.wait.long_spin_hook`): it waits like a sleeper, and a lock
    holder the host preempts is not a hang; a holder that hangs is found itself
    (stopped, blocked, spinning elsewhere), one that died by its sentinel.
``blocked``
    asleep at every look for :data:`BLOCKED_S` with no voluntary context switch of
    its main thread: its wait point would have woken it (a CPU's at most every
    250 ms, the device's every 50 ms), so it sleeps somewhere else.  Longer than the
    longest injected delay (1 s) a race scenario may ask for.  A process made
    runnable but kept off the core by a saturated host is ``running`` and gains no
    CPU time: no verdict.

A CPU that has not published yet (still setting up) can only be found ``stopped``.
The verdict names the role, CPU, pid, process state, the phase the process
published last, how long ago its heartbeat last moved and the kernel function it
sleeps in (``/proc/PID/wchan``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

#: A heartbeat unchanged this long (seconds) makes the watchdog look at the process.
STALE_S = 0.3
#: Stopped at every look for this long: ``stopped``.
STOPPED_S = 1.0
#: This much CPU time of the main thread with the heartbeat still: ``spinning``.
SPIN_CPU_S = 1.0
#: Asleep at every look, with no voluntary context switch, this long: ``blocked``.
BLOCKED_S = 1.5
#: Looks a verdict needs at least (an owner kept off the core looks less often).
MIN_LOOKS = 5
#: The watchdog looks at most this often (seconds).
LOOK_S = 0.09

_STOPPED = psutil.STATUS_STOPPED
_ASLEEP = (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP, psutil.STATUS_IDLE)


@dataclass
class Stall:
    """A child process that stopped making progress."""

    role: str  #: "cpu" or "device"
    cpu: int | None
    pid: int
    verdict: str  #: stopped, spinning, blocked
    state: str  #: psutil's status at the last look
    phase: str  #: what the process said it was doing last
    heartbeat_age_s: float  #: since its heartbeat last moved (owner's clock)
    wchan: str  #: the kernel function it sleeps in, if it sleeps ("" if unknown)
    cpu_s: float  #: CPU time of its main thread since the heartbeat last moved

    @property
    def who(self) -> str:
        return "device" if self.role == "device" else f"cpu{self.cpu}"

    def describe(self) -> str:
        """One line: what the process was found doing, and since when."""
        what = {
            "stopped": f"stopped (state {self.state})",
            "spinning": f"spinning ({self.cpu_s:.1f} s of CPU time without a heartbeat)",
            "blocked": f"blocked (asleep{f' in {self.wchan}' if self.wchan else ''}, never woken)",
        }[self.verdict]
        return f"{what}; last heartbeat {self.heartbeat_age_s:.1f} s ago, while {self.phase}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "cpu": self.cpu,
            "pid": self.pid,
            "verdict": self.verdict,
            "state": self.state,
            "phase": self.phase,
            "heartbeat_age_s": round(self.heartbeat_age_s, 3),
            "wchan": self.wchan,
            "cpu_s": round(self.cpu_s, 3),
        }


@dataclass
class _Streak:
    """Consecutive looks that found the same thing."""

    since: float = 0.0
    looks: int = 0

    def extend(self, holds: bool, now: float) -> None:
        if not holds:
            self.looks = 0
        elif self.looks == 0:
            self.since, self.looks = now, 1
        else:
            self.looks += 1

    def lasted(self, seconds: float, now: float) -> bool:
        return self.looks >= MIN_LOOKS and now - self.since >= seconds


@dataclass
class _Watched:
    """One child, as the watchdog saw it."""

    role: str
    cpu: int | None
    pid: int
    proc: psutil.Process | None
    heartbeat: int = 0
    moved_at: float = field(default_factory=time.monotonic)
    suspect: bool = False  #: looked at since the heartbeat went stale
    cpu0: float = 0.0  #: its main thread's CPU time when it went stale
    switches0: int = 0  #: its voluntary context switches when the asleep streak began
    stopped: _Streak = field(default_factory=_Streak)
    asleep: _Streak = field(default_factory=_Streak)

    def reset(self, heartbeat: int, now: float) -> None:
        self.heartbeat, self.moved_at, self.suspect = heartbeat, now, False
        self.stopped.looks = self.asleep.looks = 0


class Watchdog:
    """Watches the CPUs' and the device's heartbeats; :meth:`check` returns the
    children found stalled at this look (each once)."""

    def __init__(
        self,
        cpu_pids: list[int],
        heartbeat: Callable[[int], tuple[int, str]],
        device_pid: int | None = None,
        device_heartbeat: Callable[[], tuple[int, str]] | None = None,
    ):
        """``heartbeat(i)`` is CPU ``i``'s (heartbeat_ns, phase name) as published;
        ``device_heartbeat()`` the device's."""
        self._heartbeat = heartbeat
        self._device_heartbeat = device_heartbeat
        self._cpus = [_Watched("cpu", i, pid, _process(pid)) for i, pid in enumerate(cpu_pids)]
        self._device = (
            _Watched("device", None, device_pid, _process(device_pid))
            if device_pid is not None and device_heartbeat is not None
            else None
        )
        self._next_look = 0.0

    def due(self) -> bool:
        """Whether the next :meth:`check` will look (it looks at most every LOOK_S)."""
        return time.monotonic() >= self._next_look

    def check(self, cpus: list[int], device: bool) -> list[Stall]:
        """Look at CPUs ``cpus`` (and the device, if ``device``); the stalls found."""
        now = time.monotonic()
        if now < self._next_look:
            return []
        self._next_look = now + LOOK_S
        found = []
        for i in cpus:
            beat, phase = self._heartbeat(i)
            if (s := self._look(self._cpus[i], beat, phase, now)) is not None:
                found.append(s)
        if device and self._device is not None and self._device_heartbeat is not None:
            beat, phase = self._device_heartbeat()
            if (s := self._look(self._device, beat, phase, now)) is not None:
                found.append(s)
        return found

    def _look(self, w: _Watched, beat: int, phase: str, now: float) -> Stall | None:
        if beat != w.heartbeat:
            w.reset(beat, now)
            if beat:  # it moved: healthy (0 is "not published yet": watched for stops)
                return None
        elif now - w.moved_at < STALE_S:
            return None
        if w.proc is None:
            return None  # gone before it was watched
        try:
            with w.proc.oneshot():
                state = w.proc.status()
                # CPU time and context switches only matter once it has published
                cpu_s = _main_thread_cpu_s(w.proc) if beat else 0.0
            switches = _voluntary_switches(w.pid) if beat else 0
        except psutil.Error:
            return None  # it is gone: its sentinel says so
        if not w.suspect:
            w.suspect, w.cpu0 = True, cpu_s
        w.stopped.extend(state == _STOPPED, now)
        if state in _ASLEEP and w.asleep.looks and switches != w.switches0:
            w.asleep.looks = 0  # it woke and slept again: a new streak
        if state in _ASLEEP and not w.asleep.looks:
            w.switches0 = switches
        w.asleep.extend(state in _ASLEEP, now)
        spent = cpu_s - w.cpu0
        if w.stopped.lasted(STOPPED_S, now):
            verdict = "stopped"
        elif beat and spent >= SPIN_CPU_S:
            verdict = "spinning"
        elif beat and w.asleep.lasted(BLOCKED_S, now):
            verdict = "blocked"
        else:  # running: spinning (its CPU time will tell) or kept off the core
            return None
        stall = Stall(
            role=w.role,
            cpu=w.cpu,
            pid=w.pid,
            verdict=verdict,
            state=state,
            phase=phase,
            heartbeat_age_s=now - w.moved_at,
            wchan=_wchan(w.pid) if state != psutil.STATUS_RUNNING else "",
            cpu_s=spent,
        )
        w.reset(beat, now)  # convicted once: the runtime ends it
        return stall


def _process(pid: int) -> psutil.Process | None:
    """psutil's handle on ``pid``; None for one already gone (its sentinel tells the
    runtime how it ended)."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _main_thread_cpu_s(proc: psutil.Process) -> float:
    """User + system time of the process's main thread (the device's coordinator;
    a CPU has only that one)."""
    for t in proc.threads():
        if t.id == proc.pid:
            return t.user_time + t.system_time
    t = proc.cpu_times()
    return t.user + t.system


def _voluntary_switches(pid: int) -> int:
    """Voluntary context switches of the main thread (each time it went to sleep)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return -1


def _wchan(pid: int) -> str:
    """The kernel function a sleeping process waits in ("" if the kernel hides it)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/wchan") as f:
        name = f.read().strip()
        return "" if name in ("", "0") else name
    return ""
