"""An inspector attached to a run for its whole life: ``mqrt bench --inspector HZ``.

A process of its own (``mqrt inspect - --watch 1/HZ --json``, its output thrown away)
that reads every debugfs and sysfs file of the run HZ times a second, as a user
watching a run in a second terminal would: what watching costs the run is then a
benchmark figure (``--inspector 0,10 --repeat 5``: the same run with and without).
It is started before the run and waited for until it has loaded what it needs (it
says so on stderr), so its interpreter's start-up is not in the run's time; it is
told the run's segment on its stdin once the run's manifest is there, ends by itself
when the run does, and the bench reaps it after each run.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys

#: The longest wait for the inspector's start-up before the run starts anyway.
READY_S = 60.0


class Inspector:
    """``with Inspector(hz): run(spec)`` with ``spec.on_published = inspector.attach``."""

    def __init__(self, hz: int):
        self.hz = hz
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Inspector:
        if self.hz > 0:
            p = self.proc = subprocess.Popen(
                [sys.executable, "-m", "mqrt", "inspect", "-", "--watch", f"{1 / self.hz:g}",
                 "--json"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert p.stderr is not None
            # its "ready" line (or its end), within READY_S on however loaded a host
            if select.select([p.stderr], [], [], READY_S)[0]:
                p.stderr.readline()
        return self

    def attach(self, segment: str) -> None:
        """RunSpec.on_published: the run's manifest is there; the inspector attaches."""
        p = self.proc
        if p is None or p.stdin is None:
            return
        with contextlib.suppress(OSError):  # it died: the run goes on without it
            p.stdin.write(segment.encode() + b"\n")
            p.stdin.close()

    def __exit__(self, *exc: object) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.stdin is not None and not p.stdin.closed:
            with contextlib.suppress(OSError):
                p.stdin.close()  # never attached (the run failed first): EOF ends it
        try:
            p.wait(timeout=5)  # it sees the run end within one interval (a line on stderr)
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        if p.stderr is not None:
            p.stderr.close()
