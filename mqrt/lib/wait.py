"""Wait queues whose sleepers are real processes: the user-space kernel/sched/wait.c.

A *waiter* is a process that may sleep (a CPU worker, a test process).  Each waiter
owns one slot in the arena's waiter table and one eventfd.  The owner of the run
creates every eventfd before it forks its children, so every process can wake every
waiter; a waiter sleeps by polling its own eventfd.

Why eventfd and not a futex or a pipe
    A futex would let waiters and wakers share nothing but a word, but a process
    blocked in ``FUTEX_WAIT`` cannot watch anything else, and a CPU worker must keep
    taking interrupts while it waits for a tag (in the kernel the CPU runs the
    interrupt that frees the tag while the task sleeps).  An eventfd is a file
    descriptor, so it joins the worker's one wait point (epoll/``connection.wait``)
    next to its interrupt and control pipes.  Unlike a pipe it never fills up and a
    wake-up before the sleep is not lost: the counter stays set.

Shared state (all in the arena, changed only under the queue's bit spinlock except
where noted):

=================  =========================  ================================================
field              written by                 notes
=================  =========================  ================================================
head.lock          any process (bit 0)        test_and_set_bit_lock / clear_bit_unlock
head.first/last    under lock                 doubly linked list of waiter slots, -1 = empty;
                                              ``first`` is also read without the lock by
                                              :meth:`WaitQueue.active` (waitqueue_active)
entry.next/prev    under the lock of the      the entry is on at most one queue at a time
                   queue it is on
entry.queued_on    under lock                 byte offset of that queue's head, or -1
entry.state        the waiter (RUNNING/       try_to_wake_up's TASK_UNINTERRUPTIBLE ->
                   SLEEPING), a waker by CAS  TASK_RUNNING: only a waker that wins the CAS
                   SLEEPING -> RUNNING        wakes, dequeues and counts the entry
entry.sleep_seq    the waiter, under lock     one sleep told from the next, for observers
entry.waits_for    the waiter, lock-free,     what it waits for, in its caller's terms
                   before it prepares to      (:meth:`Waiters.set_waits_for`); read only by
                   wait                       observers, never by the wait logic
entry.blocked      the waiter, lock-free      1 while it is (about to be) blocked in its wait
                                              point: only then does a waker write its eventfd
=================  =========================  ================================================

Waking costs a system call only for a task that is really blocked
    The state word decides whether a task is asleep; the eventfd only gets a blocked
    process out of its wait call.  A task that prepared to wait is often still
    running (trying once more for a tag, flushing its plug, serving interrupts) or
    waiting for a core, not blocked: the kernel's TIF_POLLING_NRFLAG case, where a
    wake-up needs no IPI because the target looks at its flag anyway.  So a waiter
    sets ``blocked`` (a fully ordered exchange) and then reads its state once more
    before it blocks (:meth:`Waiters.block`); a waker changes the state (a fully
    ordered cmpxchg) and then reads ``blocked``, and writes the eventfd only if it is
    set.  Of two such store-then-load pairs at least one sees the other's store: the
    waker writes the eventfd, or the waiter sees itself running and does not block.

Wake-ups leave the queue lock first (the kernel's wake_q)
    :meth:`WaitQueue.wake_up_nr` changes each woken task's state and takes its entry
    off the queue under the lock, and writes the eventfds after dropping it: a waker
    that the host preempts right after its write (the woken task may take its core)
    does not do so holding the lock every other waker and sleeper of the queue
    spins on.  An eventfd write may therefore land after the wait it was for has
    ended; it is harmless, because a waiter that finds its eventfd readable drains it
    and goes by its state word, never by the eventfd (``finish_wait`` also drains, so
    a wait usually starts clean).
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from mqrt.lib import lockstat
from mqrt.lib._atomic import AtomicView, cpu_relax
from mqrt.lib.lockstat import LockClass
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct, field_offset

#: A wait_queue_head_t: embedded in other structs (e.g. sbitmap's wait states).
WAIT_QUEUE_HEAD = np.dtype(
    {
        "names": ["lock", "first", "last", "wakeups"],
        "formats": ["<u8", "<i4", "<i4", "<u4"],
        "offsets": [0, 8, 12, 16],
    },
    align=True,
)

_HEAD_LOCK = field_offset(WAIT_QUEUE_HEAD, "lock")
_HEAD_FIRST = field_offset(WAIT_QUEUE_HEAD, "first")
_HEAD_LAST = field_offset(WAIT_QUEUE_HEAD, "last")
#: wake-ups that woke somebody, counted under the lock (instrumentation for the race
#: detectors, read lockless; the wait logic never reads it)
_HEAD_WAKEUPS = field_offset(WAIT_QUEUE_HEAD, "wakeups")

#: One wait_queue_entry per waiter slot.
WAIT_QUEUE_ENTRY = cacheline_struct(
    [("next", "<i4"), ("prev", "<i4"), ("state", "<i4"), ("flags", "<i4"), ("queued_on", "<i8"),
     # bumped by its owner each time it prepares to sleep: tells one sleep from the
     # next to an observer (the race detectors); never read by the wait logic
     ("sleep_seq", "<u4"),
     # what the owner waits for, in its caller's terms (the block layer: the queue
     # and hctx of a tag allocation); written by the owner before it prepares to
     # wait, so the lock and the full barrier of that step order it before the
     # sleeping state an observer sees; never read by the wait logic
     ("waits_for", "<i8"),
     # 1 while the owner is blocked (or about to block) in its wait point: set by the
     # owner with a full barrier before its last look at ``state``, read by a waker
     # after its state cmpxchg (Waiters.block)
     ("blocked", "<i4")]
)  # fmt: skip

#: Spins on a busy bit lock before yielding the core (the holder may be preempted).
SPINS_BEFORE_YIELD = 64
#: Yields after which a still-taken lock calls :data:`long_spin_hook`.
LONG_SPIN_YIELDS = 256
#: A process may install a check here, called every LONG_SPIN_YIELDS yields while a
#: bit spinlock stays taken; it can raise to abandon the wait (a CPU worker does when
#: its run is being stopped: the holder may be a process that was killed).
long_spin_hook: Callable[[], None] | None = None

NIL = -1
_WQ_LOCK = int(LockClass.WAIT_QUEUE_LOCK)

T = TypeVar("T")

#: cond_resched() for a process: reading this thread's CPU clock makes the host
#: kernel account the time the task has run (update_curr()), and an EEVDF scheduler
#: (Linux 6.6+) that finds the task past its slice reschedules it on the way back to
#: user space.  An emulated CPU calls it where it holds nothing other CPUs wait for
#: (no plugged tags, no lock), so that a host core shared by several CPUs switches
#: between them there rather than at a tick in the middle of a plug, with its tags
#: held by a process that is not running.  Elsewhere it only costs the system call.
cond_resched = time.thread_time_ns


class TaskState(enum.IntEnum):
    """The part of a task's state that wake-ups look at."""

    RUNNING = 0
    UNINTERRUPTIBLE = 2  # TASK_UNINTERRUPTIBLE: asleep, or about to be


class WqFlag(enum.IntFlag):
    EXCLUSIVE = 0x01  #: WQ_FLAG_EXCLUSIVE: wake_up_nr(n) wakes at most n of these


@dataclass(frozen=True)
class WaitersSpec:
    """The waiter table: one wait_queue_entry per process that may sleep."""

    nr_waiters: int
    entries: Region


#: This process's acquisition counts by lock class (lockstat's list, bound once).
_acq = lockstat.acq


def spin_lock(a: AtomicView, off: int, cls: int = LockClass.UNCLASSIFIED) -> None:
    """Take the bit spinlock in bit 0 of the word at ``off`` (acquire), an acquisition
    of lock class ``cls`` (:class:`mqrt.lib.lockstat.LockClass`; a plain int on hot
    paths).  Only a first try that fails goes to the counted, spinning branch."""
    if a.test_and_set_bit_lock(off, 0):
        spin_lock_contended(a, off, cls)
    _acq[cls] += 1


def spin_lock_contended(a: AtomicView, off: int, cls: int) -> None:
    """spin_lock() after its first try failed: spin (``cpu_relax()``, then
    ``sched_yield()``) until the lock is ours, then count the contention, its tries,
    yields and wait in ``cls`` (lock_stat's lock_contended()/lock_acquired()).  Does
    not count the acquisition: the caller does."""
    t0 = lockstat.clock()
    spins = yields = tries = 0
    while a.test_and_set_bit_lock(off, 0):
        tries += 1
        spins += 1
        if spins < SPINS_BEFORE_YIELD:
            cpu_relax()
        else:
            os.sched_yield()
            spins = 0
            yields += 1
            if yields % LONG_SPIN_YIELDS == 0 and long_spin_hook is not None:
                long_spin_hook()
    lockstat.contended(cls, lockstat.clock() - t0, tries + 1, yields)


def spin_unlock(a: AtomicView, off: int) -> None:
    """Release the bit spinlock (release ordering)."""
    a.clear_bit_unlock(off, 0)


class Waiters:
    """The waiter table and one eventfd per slot.

    Build it in the owner before forking (:meth:`create_eventfds`); forked children
    inherit the descriptors.  ``me`` is this process's slot, or None for a process
    that only wakes.
    """

    @staticmethod
    def declare(layout: Layout, nr_waiters: int, name: str = "waiters") -> WaitersSpec:
        if nr_waiters < 1:
            raise ValueError(f"nr_waiters must be >= 1, got {nr_waiters}")
        return WaitersSpec(nr_waiters, layout.add(name, WAIT_QUEUE_ENTRY, nr_waiters))

    @staticmethod
    def init(arena: Arena, spec: WaitersSpec) -> None:
        """Owner only: every entry off every queue and running."""
        v = arena.view(spec.entries)
        v["next"] = v["prev"] = NIL
        v["state"] = TaskState.RUNNING
        v["flags"] = 0
        v["queued_on"] = NIL
        v["waits_for"] = NIL
        v["blocked"] = 0
        del v

    @staticmethod
    def create_eventfds(spec: WaitersSpec) -> list[int]:
        """Owner only, before forking: one non-blocking eventfd per slot."""
        return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(spec.nr_waiters)]

    def __init__(self, arena: Arena, spec: WaitersSpec, eventfds: list[int], me: int | None):
        if len(eventfds) != spec.nr_waiters:
            raise ValueError(f"{len(eventfds)} eventfds for {spec.nr_waiters} waiter slots")
        if me is not None and not 0 <= me < spec.nr_waiters:
            raise ValueError(f"waiter slot {me} out of range 0..{spec.nr_waiters - 1}")
        self.a = arena.atomic
        self.spec = spec
        self.eventfds = eventfds
        self.me = me
        r = spec.entries
        self._base = r.offset
        self._stride = r.stride
        d = r.dtype
        self._next = field_offset(d, "next")
        self._prev = field_offset(d, "prev")
        self._state = field_offset(d, "state")
        self._flags = field_offset(d, "flags")
        self._queued_on = field_offset(d, "queued_on")
        self._sleep_seq = field_offset(d, "sleep_seq")
        self._waits_for = field_offset(d, "waits_for")
        self._blocked = field_offset(d, "blocked")
        # The sleeping side's state word and eventfd: this process's slot's.  A process
        # without a slot only wakes; -1 makes a sleeping-side call fail loudly.
        self._my_state = NIL if me is None else self.entry(me) + self._state
        self._my_eventfd = NIL if me is None else eventfds[me]
        self._my_blocked = NIL if me is None else self.entry(me) + self._blocked
        self._poll: select.poll | None = None

    def entry(self, slot: int) -> int:
        """Byte offset of slot's wait_queue_entry."""
        return self._base + slot * self._stride

    # -- the sleeping side (this process's slot) -------------------------------------

    def set_state(self, state: TaskState) -> None:
        """set_current_state(): a full barrier orders it against the caller's next
        check of the condition it sleeps on."""
        self.a.xchg32(self._my_state, state)

    def schedule(self, timeout: float | None = None) -> bool:
        """Sleep until woken (or ``timeout`` seconds pass); True if woken, that is if
        the task is running again.

        Returns at once if a waker already set the task running, as a kernel task
        whose state was set back to RUNNING does not sleep.
        """
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._my_eventfd, select.POLLIN)
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        if self.block():
            try:
                self._poll.poll(ms)
            finally:
                self.unblock()
            self.drain()
        return not self.sleeping()

    def block(self) -> bool:
        """The task is about to block in its wait point (the eventfd among its
        descriptors) until woken: say so, then look at the state once more.  False if
        a waker already set it running (then it must not block, and is not marked
        blocked); True if it may block, and must :meth:`unblock` when its wait call
        returns.  The exchange is a full barrier: the flag is visible before the
        state is read (pairs with the waker's cmpxchg, then its read of the flag)."""
        self.a.xchg32(self._my_blocked, 1)
        if self.a.read32(self._my_state) == TaskState.UNINTERRUPTIBLE:
            return True
        self.a.set32(self._my_blocked, 0)
        return False

    def unblock(self) -> None:
        """The wait call returned: wakers no longer need to write the eventfd."""
        self.a.set32(self._my_blocked, 0)

    def set_waits_for(self, key: int) -> None:
        """Say what this process's next sleeps wait for (a key its caller defines;
        observers decode it).  Relaxed store by the slot's owner, before it prepares
        to wait: prepare_to_wait's lock and state exchange order it before the
        sleeping state, so an observer that sees the task asleep (and then reads
        this) sees the key of that sleep.  A process without a slot has no sleeps."""
        if self.me is not None:
            self.a.set(self.entry(self.me) + self._waits_for, key)

    def waits_for(self, slot: int) -> int:
        """The key ``slot`` last published with :meth:`set_waits_for` (-1: none)."""
        v = self.a.read(self.entry(slot) + self._waits_for)
        return v - (1 << 64) if v >> 63 else v

    def asleep(self) -> list[tuple[int, int]]:
        """(slot, the wait-queue head it is queued on, 0 if none) of every task
        marked asleep (TASK_UNINTERRUPTIBLE) now: plain reads, no lock taken, so an
        observer on a read-only mapping may ask; a task may wake as it is read."""
        a, out = self.a, []
        for slot in range(self.spec.nr_waiters):
            entry = self.entry(slot)
            if a.read32(entry + self._state) == TaskState.UNINTERRUPTIBLE:
                head = a.read(entry + self._queued_on)
                out.append((slot, 0 if head >> 63 else head))
        return out

    def sleeping(self) -> bool:
        """This process's task is still marked asleep (no waker has run it)."""
        return self.a.read32(self._my_state) == TaskState.UNINTERRUPTIBLE

    def drain(self) -> None:
        """Forget wake-ups that arrived after the wait ended."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._my_eventfd)

    # -- the waking side ---------------------------------------------------------------

    def try_to_wake_up(self, slot: int) -> bool:
        """Move slot from UNINTERRUPTIBLE to RUNNING and kick its eventfd if it is
        blocked; False if it was already running (then nothing is done, as in the
        kernel)."""
        if not self.set_running(slot):
            return False
        self.kick(slot)
        return True

    def set_running(self, slot: int) -> bool:
        """The state half of try_to_wake_up(): UNINTERRUPTIBLE -> RUNNING by a fully
        ordered cmpxchg; False if the task was already running."""
        off = self.entry(slot) + self._state
        return self.a.cmpxchg32(off, TaskState.UNINTERRUPTIBLE, TaskState.RUNNING) == (
            TaskState.UNINTERRUPTIBLE
        )

    def wake_up_q(self, slots: list[int]) -> None:
        """wake_up_q(): kick the tasks a wake-up set running (:meth:`kick` each)."""
        for slot in slots:
            self.kick(slot)

    def kick(self, slot: int) -> None:
        """The wake half: after :meth:`set_running` (whose barrier orders the state
        before this read), write slot's eventfd if its task is blocked.  A task not
        blocked yet sees its new state before it blocks (:meth:`block`)."""
        if self.a.read32(self.entry(slot) + self._blocked):
            os.eventfd_write(self.eventfds[slot], 1)


class WaitQueue:
    """A wait_queue_head_t at byte offset ``head`` of the arena."""

    def __init__(self, waiters: Waiters, head: int):
        self.w = waiters
        self.a = waiters.a
        self.head = head
        self._lock = head + _HEAD_LOCK
        self._first = head + _HEAD_FIRST
        self._last = head + _HEAD_LAST
        self._wakeups = head + _HEAD_WAKEUPS

    @staticmethod
    def init(arena: Arena, head: int) -> None:
        """Owner only: an empty queue (init_waitqueue_head)."""
        a = arena.atomic
        a.set(head + _HEAD_LOCK, 0)
        a.set32(head + _HEAD_FIRST, NIL)
        a.set32(head + _HEAD_LAST, NIL)
        a.set32(head + _HEAD_WAKEUPS, 0)

    @property
    def wakeups(self) -> int:
        """Wake-ups on this queue that woke an exclusive waiter (lockless read)."""
        return self.a.read32(self._wakeups) & 0xFFFFFFFF

    def active(self) -> bool:
        """waitqueue_active(): anyone queued?  Lockless; the caller supplies the
        barrier that orders it against its own condition update."""
        return self.a.load_acquire32(self._first) != NIL

    # -- list manipulation, lock held -----------------------------------------------------

    def _add_tail(self, slot: int, flags: int) -> None:
        w, a = self.w, self.a
        e = w.entry(slot)
        last = a.read32(self._last)
        a.set32(e + w._next, NIL)
        a.set32(e + w._prev, last)
        a.set32(e + w._flags, flags)
        a.set(e + w._queued_on, self.head)
        if last == NIL:
            a.store_release32(self._first, slot)
        else:
            a.set32(w.entry(last) + w._next, slot)
        a.set32(self._last, slot)

    def _add_head(self, slot: int) -> None:
        w, a = self.w, self.a
        e = w.entry(slot)
        first = a.read32(self._first)
        a.set32(e + w._next, first)
        a.set32(e + w._prev, NIL)
        a.set32(e + w._flags, 0)
        a.set(e + w._queued_on, self.head)
        if first == NIL:
            a.set32(self._last, slot)
        else:
            a.set32(w.entry(first) + w._prev, slot)
        a.store_release32(self._first, slot)

    def _del(self, slot: int) -> None:
        w, a = self.w, self.a
        e = w.entry(slot)
        nxt = a.read32(e + w._next)
        prv = a.read32(e + w._prev)
        if prv == NIL:
            a.store_release32(self._first, nxt)
        else:
            a.set32(w.entry(prv) + w._next, nxt)
        if nxt == NIL:
            a.set32(self._last, prv)
        else:
            a.set32(w.entry(nxt) + w._prev, prv)
        a.set32(e + w._next, NIL)
        a.set32(e + w._prev, NIL)
        a.set(e + w._queued_on, NIL)

    def _queued_here(self, slot: int) -> bool:
        return self.a.read(self.w.entry(slot) + self.w._queued_on) == self.head

    # -- the kernel's API -------------------------------------------------------------------

    def prepare_to_wait_exclusive(self) -> None:
        """Queue this process's entry at the tail as an exclusive waiter (if it is not
        queued yet) and mark it about to sleep."""
        self._prepare(exclusive=True)

    def prepare_to_wait(self) -> None:
        """Like :meth:`prepare_to_wait_exclusive` for a non-exclusive waiter: queued at
        the head, woken by every wake-up."""
        self._prepare(exclusive=False)

    def _prepare(self, exclusive: bool) -> None:
        me = self.w.me
        assert me is not None, "a process without a waiter slot cannot sleep"
        spin_lock(self.a, self._lock, _WQ_LOCK)
        try:
            if not self._queued_here(me):
                if exclusive:
                    self._add_tail(me, WqFlag.EXCLUSIVE)
                else:
                    self._add_head(me)
            self.w.set_state(TaskState.UNINTERRUPTIBLE)
            seq = self.w.entry(me) + self.w._sleep_seq
            self.a.set32(seq, (self.a.read32(seq) + 1) & 0xFFFFFFFF)
        finally:
            spin_unlock(self.a, self._lock)

    def finish_wait(self) -> None:
        """Back to running; take the entry off the queue if no waker did."""
        me = self.w.me
        assert me is not None
        self.w.set_state(TaskState.RUNNING)
        if self.a.read(self.w.entry(me) + self.w._queued_on) != NIL:
            spin_lock(self.a, self._lock, _WQ_LOCK)
            try:
                if self._queued_here(me):
                    self._del(me)
            finally:
                spin_unlock(self.a, self._lock)
        self.w.drain()

    def wake_up_nr(self, nr: int, wake_q: list[int] | None = None) -> int:
        """Wake every non-exclusive waiter and up to ``nr`` exclusive ones, oldest
        first; woken entries leave the queue (autoremove_wake_function).  Returns the
        number of exclusive waiters woken.  An entry whose task is already running
        is skipped and not counted, as try_to_wake_up() reports it.

        The woken tasks' eventfds are written after the queue lock is dropped; given
        a ``wake_q`` list, their slots are appended to it instead and the caller
        kicks them (:meth:`Waiters.wake_up_q`) once it has finished what the kernel
        does before a woken task can take its CPU from it."""
        w, a = self.w, self.a
        woken = 0
        deferred = wake_q is not None
        if wake_q is None:
            wake_q = []  # tasks set running under the lock, kicked after it
        spin_lock(a, self._lock, _WQ_LOCK)
        try:
            slot = a.read32(self._first)
            while slot != NIL and (nr <= 0 or woken < nr):
                e = w.entry(slot)
                nxt = a.read32(e + w._next)
                exclusive = a.read32(e + w._flags) & WqFlag.EXCLUSIVE
                if w.set_running(slot):
                    self._del(slot)
                    wake_q.append(slot)
                    if exclusive:
                        woken += 1
                slot = nxt
            if woken:
                a.set32(self._wakeups, a.read32(self._wakeups) + 1 & 0xFFFFFFFF)
        finally:
            spin_unlock(a, self._lock)
        if not deferred:
            w.wake_up_q(wake_q)
        return woken

    def wake_up(self) -> int:
        """wake_up(): every non-exclusive waiter and one exclusive one."""
        return self.wake_up_nr(1)

    def wake_up_all(self) -> int:
        """wake_up_all(): every waiter."""
        return self.wake_up_nr(0)

    def waiters(self) -> list[int]:
        """Queued slots, oldest first (a snapshot taken under the lock; debugging)."""
        out = []
        spin_lock(self.a, self._lock, _WQ_LOCK)
        try:
            slot = self.a.read32(self._first)
            while slot != NIL:
                out.append(slot)
                slot = self.a.read32(self.w.entry(slot) + self.w._next)
        finally:
            spin_unlock(self.a, self._lock)
        return out


# -- tasks written as generators ------------------------------------------------------------------


@dataclass(frozen=True)
class WaitEvent:
    """What a task written as a generator yields to sleep: wait_event() on the wait
    queue whose head is at byte offset ``head`` until ``cond()`` holds.  The task's
    runner queues the task's own entry (prepare_to_wait), looks at ``cond`` once more,
    and resumes the generator once a wake-up finds it true."""

    head: int
    cond: Callable[[], bool]


def run_task(task: Generator[WaitEvent, None, T], waiters: Waiters) -> T:
    """Run a task written as a generator in a process that has nothing else to do
    (a test, a tool): each :class:`WaitEvent` it yields is a real sleep of
    ``waiters``' slot on that wait queue.  Returns what the task returns."""
    try:
        event = next(task)
        while True:
            wq = WaitQueue(waiters, event.head)
            while True:
                wq.prepare_to_wait()
                if event.cond():
                    break
                waiters.schedule()
            wq.finish_wait()
            event = task.send(None)
    except StopIteration as done:
        return done.value


# -- one wait point with precise timeouts --------------------------------------------------------

#: epoll rounds timeouts up to whole milliseconds: shorter waits use select(), which
#: sleeps to the microsecond (with the timer slack made small by
#: :func:`mqrt.lib.proc.precise_timers`).
EPOLL_MIN_TIMEOUT = 0.005


def wait_fds(ep: select.epoll, fds: list[int], timeout: float) -> list[int]:
    """Wait until one of ``fds`` (all registered in ``ep``) is readable or ``timeout``
    seconds pass (-1: forever); the readable ones."""
    if 0 < timeout < EPOLL_MIN_TIMEOUT:
        return select.select(fds, [], [], timeout)[0]
    return [fd for fd, _ev in ep.poll(timeout)]
