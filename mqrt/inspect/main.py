"""``mqrt inspect``: the runs of this user on this host, and a live run's debugfs and
sysfs files.

Each run is one shared-memory segment, ``/dev/shm/mqrt-<owner pid>-<owner start
time>-<random>`` (mode 0600: only its user can map it).  The listing reads the names,
the owners' processes and each segment's superblock, through a read-only mapping: it
cannot disturb a run.

For each run: its segment, the owner's pid, its command line, its age (since the owner
started), the segment's size, and its state: ``running`` while the owner lives,
``stale`` once it is gone (the run's guardian removes the segment; the next run of
mqrt reclaims one that was left).  The state of a running run is its phase as its
owner publishes it (``setup``, ``running``, ``draining``, ``exit``), read from the
first bytes of its segment through a read-only mapping.

``mqrt inspect RUN [PATH...]`` maps that run's segment read-only and prints its
debugfs and sysfs files in the kernel's names and formats
(``sys/kernel/debug/block/<dev>/hctxN/tags``, ``sys/block/<dev>/mq/N/cpu_list``,
``sys/block/<dev>/stat``, ``proc/diskstats``, ...: :mod:`mqrt.inspect.tree`).  RUN
is a segment name, its owner's pid or the start of a name; each PATH a file, a
directory or a shell pattern (``'block/nullb0/hctx0/*'``).  One file prints as
``cat`` would; several as ``grep -r . DIR`` would, ``path:line``.  ``--json`` gives
``{path: contents}``; ``--watch SECONDS`` reads them again every SECONDS until the
run ends or Ctrl-C.  The inspector cannot change the run: see
:mod:`mqrt.inspect.attach`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from mqrt.errors import UsageError
from mqrt.lib.shm import SHM_DIR, list_segments, owner_alive, segment_owner


@dataclass(frozen=True)
class RunInfo:
    """One run as the listing shows it."""

    segment: str
    owner_pid: int
    state: str  #: setup | running | draining | exit (the owner's phase), unknown, or stale
    age_s: float | None  #: since the owner started (None once it is gone)
    size_bytes: int
    cmdline: str


def run_state(name: str) -> str:
    """A live run's phase from its superblock (a read-only mapping): ``setup`` until
    its manifest is there, ``unknown`` for a segment this mqrt cannot read."""
    from mqrt.lib.shm import Arena
    from mqrt.runtime import manifest

    try:
        arena = Arena.open_readonly(name)
    except (OSError, ValueError):
        return "running"  # it went, or another user's: the owner still runs
    try:
        return manifest.read_superblock(arena).phase.name.lower()
    except manifest.NotPublished:
        return "setup"
    except manifest.ManifestError:
        return "unknown"
    finally:
        arena.close()


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
        state = run_state(name) if alive else "stale"
        runs.append(RunInfo(name, pid, state, age, st.st_size, cmdline))
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
        help="list this user's runs, or show a live run's debugfs and sysfs files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run", nargs="?", metavar="RUN", help="segment, owner pid, a name's start, or - (stdin)"
    )
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="files, directories or patterns (default: all)"
    )
    p.add_argument("--json", action="store_true", help="JSON: a list of runs, or path -> text")
    p.add_argument(
        "--watch", type=float, metavar="SECONDS", help="read again every SECONDS until the run ends"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.run is None:
        if args.paths or args.watch is not None:
            raise UsageError("PATH and --watch need a RUN (`mqrt inspect` lists the runs)")
        runs = list_runs()
        if args.json:
            out: list[dict[str, Any]] = [asdict(r) for r in runs]
            print(json.dumps(out, indent=2))
        else:
            render(runs)
        return 0
    if args.watch is not None and not 0.05 <= args.watch <= 3600:
        raise UsageError(f"--watch: SECONDS must be in 0.05..3600, got {args.watch:g}")
    run = args.run
    if run == "-":  # the run's name on stdin (a watcher started before its run)
        import sys

        from mqrt.inspect import attach, tree  # noqa: F401  (loaded before the run starts)

        print("mqrt inspect: ready for a run's name on stdin", file=sys.stderr, flush=True)
        run = sys.stdin.readline().strip()
        if not run:
            raise UsageError("RUN: '-' and no run's name on stdin")
    return show_run(run, args.paths, args.json, args.watch)


def show_run(run: str, patterns: list[str], as_json: bool, watch: float | None) -> int:
    """Print the files of ``run`` once, or every ``watch`` seconds until it ends."""
    import sys

    from mqrt.inspect.attach import RunView, resolve
    from mqrt.inspect.tree import Tree, read, select

    with RunView(resolve(run)) as view, contextlib.closing(Tree(view)) as tree:
        paths = select(tree.files, patterns)
        while True:
            got = read(tree.files, paths)
            if as_json:
                print(json.dumps(got, indent=None if watch else 2), flush=True)
            else:
                _print_files(got, watch is not None)
            if watch is None:
                return 0
            time.sleep(watch)
            if view.ended():
                print(f"mqrt inspect: run {view.name} ended", file=sys.stderr)
                return 0
            if tree.refresh():  # the map changed: the files a pattern names may too
                paths = select(tree.files, patterns)


def _print_files(got: dict[str, str], stamp: bool) -> None:
    if stamp:
        print(f"--- {time.strftime('%H:%M:%S')}")
    if len(got) == 1:
        print(next(iter(got.values())), end="", flush=True)
        return
    lines = [f"/{path}:{line}" for path, text in got.items() for line in text.splitlines() if line]
    print("\n".join(lines), flush=True)
