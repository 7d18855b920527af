"""``mqrt inspect``: the runs of this user on this host.

Each run is one shared-memory segment, ``/dev/shm/mqrt-<owner pid>-<owner start
time>-<random>`` (mode 0600: only its user can map it).  The listing reads the names
and the owners' processes, never the segments: it cannot disturb a run.

For each run: its segment, the owner's pid, its command line, its age (since the owner
started), the segment's size, and its state: ``running`` while the owner lives,
``stale`` once it is gone (the run's guardian removes the segment; the next run of
mqrt reclaims one that was left).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from mqrt.lib.shm import SHM_DIR, list_segments, owner_alive, segment_owner


@dataclass(frozen=True)
class RunInfo:
    """One run as the listing shows it."""

    segment: str
    owner_pid: int
    state: str  #: running | stale
    age_s: float | None  #: since the owner started (None once it is gone)
    size_bytes: int
    cmdline: str


def list_runs(uid: int | None = None) -> list[RunInfo]:
    """The runs whose segment belongs to ``uid`` (default: this process's user),
    oldest first.  A segment that vanishes while it is looked at is left out."""
    uid = os.geteuid() if uid is None else uid
    now = time.time()
    runs: list[RunInfo] = []
    for name in list_segments():
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        if st.st_uid != uid:
            continue
        pid = segment_owner(name)
        assert pid is not None  # list_segments() keeps only names that carry one
        age: float | None = None
        cmdline = ""
        alive = owner_alive(name)
        if alive:
            try:
                p = psutil.Process(pid)
                age = max(0.0, now - p.create_time())
                cmdline = " ".join(p.cmdline())
            except psutil.Error:  # it ended meanwhile
                alive = False
        runs.append(RunInfo(name, pid, "running" if alive else "stale", age, st.st_size, cmdline))
    runs.sort(key=lambda r: -(r.age_s or 0.0))
    return runs


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def render(runs: list[RunInfo]) -> None:
    """The listing as a table on stdout (plain text when stdout is not a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 200))
    if not runs:
        console.print(Text("mqrt inspect: no run of this user on this host"))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for col, justify in (
        ("segment", "left"), ("owner pid", "right"), ("state", "left"), ("age", "right"),
        ("size", "right"), ("command", "left"),
    ):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in runs:
        table.add_row(
            Text(r.segment), Text(str(r.owner_pid)), Text(r.state), Text(_age(r.age_s)),
            Text(_size(r.size_bytes)), Text(r.cmdline),
        )  # fmt: skip
    console.print(table)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the runs of this user on this host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per run")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    runs = list_runs()
    if args.json:
        out: list[dict[str, Any]] = [asdict(r) for r in runs]
        print(json.dumps(out, indent=2))
    else:
        render(runs)
    return 0
