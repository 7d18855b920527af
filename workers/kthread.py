"""The sysfs writer: a second task on CPU 0 (the boot CPU, never taken offline) that
makes a run's timed writes (``--at``, ``--every``: :mod:`mqrt.bench.timeline`).

It is a task of its own, not timed work of the CPU: a store may sleep on a shared wait
queue (a freeze waits for the queue's I/O in flight, which CPU 0's own interrupts may
complete) while CPU 0's fio task keeps running.  So it has its own waiter slot and
eventfd (slot ``nr_cpus`` of the waiter table; its eventfd is in CPU 0's wait point),
and its stores are generators (:mod:`mqrt.block.blk_sysfs`) that the CPU's event loop
steps: :meth:`Writer.run` at each pass of the loop, never blocking in it.

* ``Wait(head, cond)``: ``wait_event()``: prepare_to_wait on that wait queue with the
  writer's slot, look at ``cond``; if false the writer is parked (its state
  UNINTERRUPTIBLE, its entry queued) and each later pass looks at ``cond`` again; a
  wake-up (the state back to RUNNING) without ``cond`` queues it again.  When the CPU
  blocks in its wait point with the writer parked, the writer's slot is marked
  blocked (:meth:`mqrt.lib.wait.Waiters.block`), so a waker writes its eventfd.
* ``Sleep(ns)``: resume at a timer of the CPU.

One write at a time, as one writer process would make them: a write due while
another runs starts after it (a *late* start); an ``--every`` whose next ticks all
passed meanwhile makes one write, the latest tick, and counts the others as
*skipped*.  Nothing is started at or after the run's deadline, nor after a stop.  At
a stop or exit a write still running is closed (``GeneratorExit`` at its yield, so a
store's ``finally`` undoes a half-done transition) and reported as aborted.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

from mqrt.block.blk_sysfs import ATTRIBUTES, Sleep, StoreCtx, SysfsError, TimedWrite, Wait
from mqrt.lib.wait import Waiters, WaitQueue


class Writer:
    """The sysfs writer task of one CPU (CPU 0), stepped by its event loop."""

    def __init__(
        self,
        writes: list[TimedWrite],
        ctx: StoreCtx,
        waiters: Waiters,
        t0_ns: int,
        deadline_ns: int,
        clock: Callable[[], int],
    ):
        self.writes = writes
        self.ctx = ctx
        self.waiters = waiters
        self.t0 = t0_ns
        self.deadline = deadline_ns
        self.clock = clock
        #: (due ns, order, write index): the next tick of each write not yet made
        self.due: list[tuple[int, int, int]] = [
            (t0_ns + w.at_ns, i, i) for i, w in enumerate(writes)
        ]
        heapq.heapify(self.due)
        #: the tick being made: its writes to each target queue, in turn
        self.pending: deque[tuple[int, int, int, str]] = deque()  # (write, due, q, name)
        self.gen: Any = None  #: the store running
        self.record: dict[str, Any] | None = None  #: its transition, filled at the end
        self.parked: tuple[WaitQueue, Callable[[], bool]] | None = None
        self.sleep_until = 0
        self.stopped = False  #: stop/exit: start nothing, close what runs
        self._inside = False  #: the loop is stepping a store (no re-entry)
        self.last_end = 0  #: when the last write ended (a tick due before it is late)
        self.transitions: list[dict[str, Any]] = []
        self.late = [0] * len(writes)
        self.skipped = [0] * len(writes)
        self.started = [0] * len(writes)

    # -- what the CPU's loop asks -----------------------------------------------------------

    def next_ns(self) -> int | None:
        """When the loop must step the writer again at the latest (None: only on its
        eventfd, or never)."""
        if self.gen is not None:
            if self.parked is not None:
                return None
            return self.sleep_until
        if self.pending:
            return 0
        if self.stopped or not self.due:
            return None
        return min(self.due[0][0], self.deadline)

    def parked_asleep(self) -> bool:
        """Parked on a wait queue and not woken yet: the CPU may block with it."""
        return self.parked is not None and self.waiters.sleeping()

    def stop(self) -> None:
        """The run stops (a stop, exit): start nothing more; close a running store at
        the next step."""
        self.stopped = True

    def run(self) -> bool:
        """Step the writer as far as it goes now; True if it did something."""
        if self._inside:
            return False
        self._inside = True
        try:
            return self._run()
        finally:
            self._inside = False

    def close(self) -> None:
        """End of the run: close a store still running (reported as aborted)."""
        self.stopped = True
        self.run()

    def report(self) -> dict[str, Any]:
        """The writer's part of CPU 0's result."""
        return {
            "transitions": self.transitions,
            "writes": [
                {
                    "write": w.text,
                    "kind": w.kind,
                    "started": self.started[i],
                    "late": self.late[i],
                    "skipped": self.skipped[i],
                }
                for i, w in enumerate(self.writes)
            ],
        }

    # -- the task ---------------------------------------------------------------------------------

    def _run(self) -> bool:
        did = False
        while True:
            if self.gen is not None:
                if self.stopped:
                    self._abort()
                    return True
                send = self._resumable()
                if not send:
                    return did
                did = True
                self._step()
            elif self.pending and not self.stopped:
                i, due, q, name = self.pending.popleft()
                w = self.writes[i]
                now = self.clock()
                self.record = {
                    "write": w.text,
                    "attr": w.attr,
                    "dev": name or None,
                    "value": w.value_text,
                    "scheduled_ns": due - self.t0,
                    "start_ns": now - self.t0,
                }
                self.gen = ATTRIBUTES[w.attr].store(self.ctx, q, w.value)
                did = True
                self._step()
            elif not self._next_tick():
                return did

    def _next_tick(self) -> bool:
        """Take the next tick that is due (its writes into ``pending``); False if none."""
        self.pending.clear()
        if self.stopped or not self.due:
            return False
        now = self.clock()
        if now >= self.deadline:
            self._drop_due()  # the run's deadline passed: nothing more starts
            return False
        due, _order, i = self.due[0]
        if due > now:
            return False
        heapq.heappop(self.due)
        w = self.writes[i]
        if w.kind == "every":
            # the ticks that passed while the writer was busy: one write, the latest
            until = self._until(w)
            late_ticks = min((now - due) // w.period_ns, (until - 1 - due) // w.period_ns)
            self.skipped[i] += late_ticks
            due += late_ticks * w.period_ns
            following = due + w.period_ns
            if following < until:
                heapq.heappush(self.due, (following, i, i))
        if due < self.last_end:
            self.late[i] += 1  # due while another write ran
        self.started[i] += 1
        self.pending.extend((i, due, q, name) for q, name in w.targets)
        return True

    def _until(self, w: TimedWrite) -> int:
        """No tick of ``w`` at or after this (ns, monotonic)."""
        return self.deadline if w.until_ns < 0 else min(self.deadline, self.t0 + w.until_ns)

    def _drop_due(self) -> None:
        """The deadline passed: ticks due before it that did not start are skipped."""
        for due, _order, i in self.due:
            w = self.writes[i]
            if due >= self.deadline:
                continue
            if w.kind == "every":
                self.skipped[i] += -(-(self._until(w) - due) // w.period_ns)
            else:
                self.skipped[i] += 1
        self.due.clear()

    def _resumable(self) -> bool:
        """The running store may go on now (its wait is over, its sleep done)."""
        if self.parked is not None:
            wq, cond = self.parked
            if cond():
                wq.finish_wait()
                self.parked = None
                return True
            if not self.waiters.sleeping():  # woken, the condition not true yet
                wq.prepare_to_wait()
                if cond():
                    wq.finish_wait()
                    self.parked = None
                    return True
            return False
        return self.clock() >= self.sleep_until

    def _step(self) -> None:
        """Run the store to its next yield (or its end)."""
        try:
            while True:
                step = self.gen.send(None)
                if isinstance(step, Wait):
                    wq = WaitQueue(self.waiters, step.head)
                    wq.prepare_to_wait()
                    if step.cond():
                        wq.finish_wait()
                        continue
                    self.parked = (wq, step.cond)
                    return
                if isinstance(step, Sleep):
                    self.sleep_until = self.clock() + step.ns
                    return
                raise TypeError(f"a sysfs store yielded {step!r}, not Wait or Sleep")
        except StopIteration as done:
            self._finish(done.value or {})
        except SysfsError as exc:
            self._finish({"error": str(exc)})

    def _abort(self) -> None:
        if self.parked is not None:
            self.parked[0].finish_wait()
            self.parked = None
        try:
            self.gen.close()
        finally:
            self._finish({"aborted": True})

    def _finish(self, fields: dict[str, Any]) -> None:
        now = self.clock()
        rec = self.record
        assert rec is not None
        rec["end_ns"] = now - self.t0
        rec["duration_ns"] = rec["end_ns"] - rec["start_ns"]
        rec.update(fields)
        self.transitions.append(rec)
        self.gen = self.record = None
        self.sleep_until = 0
        self.last_end = now
