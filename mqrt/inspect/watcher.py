"""An inspector attached to a run for its whole life: ``mqrt bench --inspector HZ``.

A process of its own (``mqrt inspect RUN --watch 1/HZ --json``, its output thrown
away) that reads every debugfs and sysfs file of the run HZ times a second, as a user
watching a run in a second terminal would: what watching costs the run is then a
benchmark figure (``--inspector 0,10 --repeat 5``: the same run with and without).
It ends by itself when the run does; the bench reaps it after each run.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys


class Inspector:
    """``with Inspector(hz): run(spec)`` with ``spec.on_published = inspector.attach``."""

    def __init__(self, hz: int):
        self.hz = hz
        self.proc: subprocess.Popen[bytes] | None = None

    def attach(self, segment: str) -> None:
        """RunSpec.on_published: the run's manifest is there; start watching it."""
        if self.hz <= 0:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqrt", "inspect", segment, "--watch", f"{1 / self.hz:g}",
             "--json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            p.wait(timeout=5)  # it sees the run end within one interval
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
