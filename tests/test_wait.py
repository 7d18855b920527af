"""mqrt.lib.wait: wake-up semantics scripted in one process, and a real sleeping process."""

from __future__ import annotations

import os

import psutil
import pytest

from mqrt.lib.shm import Arena, Layout, cacheline_struct
from mqrt.lib.wait import WAIT_QUEUE_HEAD, TaskState, Waiters, WaitQueue
from tests.helpers import ctx, wait_until

pytestmark = pytest.mark.timing


@pytest.fixture
def wq_rig():
    layout = Layout()
    spec = Waiters.declare(layout, 5)
    head = layout.add("head", cacheline_struct([("wait", WAIT_QUEUE_HEAD)]))
    with Arena.create(layout) as arena:
        Waiters.init(arena, spec)
        WaitQueue.init(arena, head.addr(0, "wait"))
        fds = Waiters.create_eventfds(spec)
        try:
            yield lambda me: WaitQueue(Waiters(arena, spec, fds, me), head.addr(0, "wait"))
        finally:
            for fd in fds:
                os.close(fd)


def state(wq, slot):
    return wq.a.read32(wq.w.entry(slot) + wq.w._state)


def test_exclusive_waiters_fifo_and_counted(wq_rig):
    for me in (1, 2, 3):
        wq_rig(me).prepare_to_wait_exclusive()
    waker = wq_rig(0)
    assert waker.active() and waker.waiters() == [1, 2, 3]
    assert waker.wake_up_nr(2) == 2
    assert waker.waiters() == [3]
    assert state(waker, 1) == state(waker, 2) == TaskState.RUNNING
    assert state(waker, 3) == TaskState.UNINTERRUPTIBLE
    assert waker.wake_up_all() == 1 and not waker.active()


def test_non_exclusive_go_first_and_are_all_woken(wq_rig):
    wq_rig(1).prepare_to_wait_exclusive()
    wq_rig(2).prepare_to_wait()
    wq_rig(3).prepare_to_wait()
    waker = wq_rig(0)
    assert waker.waiters() == [3, 2, 1]  # non-exclusive waiters are queued at the head
    assert waker.wake_up() == 1  # both non-exclusive and one exclusive
    assert waker.waiters() == []


def test_running_entry_is_skipped_not_counted(wq_rig):
    """try_to_wake_up() on a task that is already running does nothing, so the
    wake-up goes to the next exclusive waiter."""
    a, b = wq_rig(1), wq_rig(2)
    a.prepare_to_wait_exclusive()
    b.prepare_to_wait_exclusive()
    a.w.set_state(TaskState.RUNNING)  # finish_wait has begun, entry still queued
    waker = wq_rig(0)
    assert waker.wake_up_nr(1) == 1
    assert waker.waiters() == [1]  # a stays queued, b was woken
    a.finish_wait()
    assert waker.waiters() == []


def test_wake_before_sleep_is_not_lost(wq_rig):
    me = wq_rig(1)
    me.prepare_to_wait_exclusive()
    wq_rig(0).wake_up()
    # True, not a 5 s timeout: the eventfd kept the wake-up (no wall-clock test)
    assert me.w.schedule(5.0)
    me.finish_wait()
    me.prepare_to_wait_exclusive()
    assert not me.w.schedule(0)  # the next wait is not ended by the last wake-up
    me.finish_wait()


def _eventfd_count(wq, slot):
    try:
        return os.eventfd_read(wq.w.eventfds[slot])
    except BlockingIOError:
        return 0


def test_waking_a_task_not_blocked_costs_no_eventfd_write(wq_rig):
    """A task that prepared to wait but has not blocked yet is set running and not
    kicked: it sees its state before it blocks (Waiters.block)."""
    me = wq_rig(1)
    me.prepare_to_wait_exclusive()
    assert wq_rig(0).wake_up() == 1
    assert _eventfd_count(me, 1) == 0
    assert not me.w.block()  # already running: it must not block
    assert me.w.schedule(5.0)
    me.finish_wait()


def test_waking_a_blocked_task_writes_its_eventfd(wq_rig):
    me = wq_rig(1)
    me.prepare_to_wait_exclusive()
    assert me.w.block()  # asleep: it may block, and says so
    assert wq_rig(0).wake_up() == 1
    assert _eventfd_count(me, 1) == 1
    me.w.unblock()
    me.finish_wait()


def test_a_wake_q_defers_the_kicks_to_its_caller(wq_rig):
    """wake_up_nr with a wake_q list: the task is set running and dequeued at once,
    its eventfd written only by wake_up_q (the legacy sbitmap wake-up resets its
    count in between)."""
    me = wq_rig(1)
    me.prepare_to_wait_exclusive()
    assert me.w.block()
    waker = wq_rig(0)
    wake_q: list[int] = []
    assert waker.wake_up_nr(1, wake_q) == 1
    assert wake_q == [1] and state(waker, 1) == TaskState.RUNNING and not waker.active()
    assert _eventfd_count(me, 1) == 0
    waker.w.wake_up_q(wake_q)
    assert _eventfd_count(me, 1) == 1
    me.w.unblock()
    me.finish_wait()


def test_late_kick_does_not_end_the_next_wait(wq_rig):
    """An eventfd write that lands after its wait ended (a waker kicks after dropping
    the queue lock) leaves a count behind; the next wait drains it and goes by its
    state word, so it still sleeps."""
    me = wq_rig(1)
    me.prepare_to_wait_exclusive()
    assert me.w.block()
    assert wq_rig(0).wake_up() == 1
    me.w.unblock()
    me.finish_wait()
    os.eventfd_write(me.w.eventfds[1], 1)  # the late kick of that wake-up
    me.prepare_to_wait_exclusive()
    assert not me.w.schedule(0)  # woken by the count, drained it, still asleep
    assert _eventfd_count(me, 1) == 0
    assert wq_rig(0).wake_up() == 1
    assert me.w.schedule(0)
    me.finish_wait()


def _sleeper(make, ready_fd):
    wq = make(1)
    wq.prepare_to_wait_exclusive()
    os.write(ready_fd, b"x")
    assert wq.w.schedule(30.0), "never woken"
    wq.finish_wait()


def test_real_process_sleeps_until_woken(wq_rig):
    r, w = os.pipe()
    p = ctx.Process(target=_sleeper, args=(wq_rig, w))
    p.start()
    try:
        assert os.read(r, 1) == b"x"
        # asleep in the kernel, not spinning through or gone
        assert wait_until(lambda: psutil.Process(p.pid).status() == psutil.STATUS_SLEEPING, 30)
        assert p.is_alive()
        waker = wq_rig(0)
        assert waker.waiters() == [1]
        assert waker.wake_up() == 1
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
        p.join()
        p.close()
        os.close(r)
        os.close(w)


def test_preemption_points_only_where_cpus_share_a_core():
    from mqrt.workers.cpu import PREEMPT_POINTS_MAX_CPUS_PER_CORE, preempt_points

    assert not preempt_points(1, 2) and not preempt_points(2, 2)  # a core each
    assert preempt_points(3, 2) and preempt_points(8, 2)
    most = 2 * PREEMPT_POINTS_MAX_CPUS_PER_CORE
    assert preempt_points(most, 2) and not preempt_points(most + 1, 2)
