"""mqrt.lib.proc.fork: the runtime's children, as multiprocessing.Process reports them."""

import os
import select
import signal
import time

from mqrt.lib import proc


def _exit_with(code: int) -> None:
    os._exit(code)


def _sleep() -> None:
    time.sleep(60)


def _raise() -> None:
    raise RuntimeError("boom")


def test_a_child_that_returns_exits_0_and_its_sentinel_turns_readable():
    p = proc.fork(lambda: None, (), "t-ok")
    r, _, _ = select.select([p.sentinel], [], [], 30)
    assert r == [p.sentinel]
    p.join(30)
    assert p.exitcode == 0 and not p.is_alive()
    p.close()
    assert p.sentinel == -1


def test_exit_status_and_an_exception_are_reported():
    p = proc.fork(_exit_with, (3,), "t-3")
    p.join(30)
    assert p.exitcode == 3
    q = proc.fork(_raise, (), "t-raise")
    q.join(30)
    assert q.exitcode == 1
    p.close()
    q.close()


def test_a_killed_child_reports_minus_the_signal_and_join_times_out_while_it_runs():
    p = proc.fork(_sleep, (), "t-sleep")
    t = time.monotonic()
    p.join(0.2)
    assert p.is_alive() and p.exitcode is None and time.monotonic() - t >= 0.15
    try:
        p.close()
        raise AssertionError("close() of a live child must fail")
    except ValueError:
        pass
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    p.close()
