"""Runs of ``mqrt race`` on a host that is busy on purpose: several scenarios at once,
each in its own ``mqrt race run`` process, next to busy loops that keep every core
runnable.  This is how the detectors are shown to give the same verdict on a
saturated host as on a quiet one (``--parallel K --busy N``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from mqrt.lib import proc


def _spin(parent_pid: int) -> None:  # pragma: no cover - runs in a child until terminated
    # dies with the command, even one killed outright (SIGKILL): a busy loop that
    # outlived it would load the host for good
    proc.child_init(parent_pid, None, "mqrt-busy")
    while True:
        pass


@contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU for the duration (load ``n`` on top of
    whatever runs meanwhile); they are terminated on every way out."""
    ctx = multiprocessing.get_context("fork")
    me = os.getpid()
    procs = [
        ctx.Process(target=_spin, args=(me,), name=f"mqrt-busy{i}", daemon=True) for i in range(n)
    ]
    try:
        for p in procs:
            p.start()
        yield
    finally:
        for p in procs:
            if p.pid is not None:
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join()


def run_in_children(
    jobs: list[tuple[str, int, bool]],
    *,
    parallel: int,
    timeout: float,
    fixed: bool,
    requests: int,
    report_dir: str,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Each job ``(name, seed, inject)`` as one ``mqrt race run NAME --json`` process,
    ``parallel`` of them at a time; their JSON outcomes in the order of ``jobs``."""

    def one(job: tuple[str, int, bool]) -> dict[str, Any]:
        name, seed, inject = job
        cmd = [sys.executable, "-m", "mqrt", "race", "run", name, "--seed", str(seed),
               "--timeout", str(timeout), "--requests", str(requests), "--json", "-q",
               "--report-dir", report_dir, "--inject", "on" if inject else "off"]  # fmt: skip
        if fixed:
            cmd.append("--fixed")
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            err = proc.stderr.strip().splitlines()
            raise RuntimeError(
                f"race run {name} --seed {seed} exited {proc.returncode}: "
                f"{err[-1] if err else 'no output'}"
            ) from None
        if progress is not None:
            verdict = ("clean" if out["clean"] else "NOT clean") if fixed else (
                "reproduced" if out["reproduced"] else "not reproduced")  # fmt: skip
            progress(f"{name} seed {seed}: {verdict}, {out['requests']:,} requests, "
                     f"{out['seconds']:.1f} s")  # fmt: skip
        return out

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, jobs))
