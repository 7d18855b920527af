"""``mqrt bench --profile DIR``: where a CPU's time per I/O goes, by stage.

Each CPU worker runs under cProfile (``workers.cpu.cpu_main``) and writes
``DIR/cpuN.prof`` (open it with ``python -m pstats``, snakeviz, ...).  This module
folds such a profile into the stages of the I/O path: every function of the path is
named to its stage below; a function not named (a builtin, a helper) counts for the
stage of whoever called it, in the share of its time each caller accounts for.
"""

from __future__ import annotations

import glob
import os
import pstats
from collections.abc import Iterable
from typing import Any

#: The stages, in the order of an I/O's life; "other" is what no stage claims.
STAGES = (
    "fio job/bio",
    "plug",
    "tag get",
    "request init",
    "queue_rq/driver",
    "completion",
    "end_request",
    "tag free",
    "event loop",
    "other",
)

# (file, function) -> stage; "*" names every function of the file.
_BY_FUNC: dict[tuple[str, str], str] = {
    ("ioengine.py", "*"): "fio job/bio",
    ("offsets.py", "*"): "fio job/bio",
    ("blk_stat.py", "*"): "fio job/bio",  # the jobs' latency histograms
    ("blk_mq.py", "submit_bio"): "fio job/bio",
    ("blk_mq.py", "submit_bios"): "fio job/bio",
    ("blk_mq.py", "attempt_plug_merge"): "fio job/bio",
    ("blk_mq.py", "sched_bio_merge"): "fio job/bio",
    ("blk_mq.py", "start_plug"): "plug",
    ("blk_mq.py", "finish_plug"): "plug",
    ("blk_mq.py", "flush_plug"): "plug",
    ("blk_mq.py", "_free_plug_rqs"): "plug",
    ("blk_mq_structs.py", "clear"): "plug",
    ("blk_mq.py", "_alloc_batch"): "tag get",
    ("blk_mq.py", "_own"): "tag get",
    ("blk_mq_tag.py", "get_tag"): "tag get",
    ("blk_mq_tag.py", "tag_busy"): "tag get",
    ("blk_mq.py", "_get_request"): "request init",
    ("blk_mq.py", "alloc_request"): "request init",
    ("blk_mq.py", "request_issue_directly"): "queue_rq/driver",
    ("blk_mq.py", "_issue_directly"): "queue_rq/driver",
    ("blk_mq.py", "_issue_failed"): "queue_rq/driver",
    ("blk_mq.py", "try_issue_directly"): "queue_rq/driver",
    ("blk_mq_complete.py", "start_request"): "queue_rq/driver",
    ("null_blk.py", "*"): "queue_rq/driver",
    ("nvme.py", "*"): "queue_rq/driver",
    ("blk_mq_complete.py", "*"): "completion",
    ("blk_mq_complete.py", "end_request"): "end_request",
    ("blk_mq_complete.py", "_issue_of"): "end_request",
    ("blk_mq_complete.py", "bios_done"): "end_request",
    ("blk_mq_complete.py", "_dec_active"): "tag free",
    ("blk_mq_complete.py", "_flush_tag_batch"): "tag free",
    ("blk_mq_tag.py", "put_tag"): "tag free",
    ("blk_mq_tag.py", "put_tags"): "tag free",
    ("cpu.py", "*"): "event loop",
    ("wait.py", "wait_fds"): "event loop",
    ("selectors.py", "*"): "event loop",
    ("connection.py", "*"): "event loop",
}

# The compiled steps of the path (builtins, file "~"), by their method names: a step's
# stage, whoever calls it (submit_bios() takes submit_bio()'s lines inline).
_BY_BUILTIN: dict[str, str] = {
    "<method 'setup' of 'mqrt.block._rq.RqLines' objects>": "request init",
    "<method 'start' of 'mqrt.block._rq.RqLines' objects>": "queue_rq/driver",
    "<method 'end' of 'mqrt.block._rq.RqLines' objects>": "end_request",
    "<method 'done' of 'mqrt.workers._jobsink.BioSink' objects>": "fio job/bio",
    "<method 'find_and_set_zero_bit_at' of 'mqrt.lib._atomic.AtomicView' objects>": "tag get",
    "<method 'deferred_clear_bit_at' of 'mqrt.lib._atomic.AtomicView' objects>": "tag free",
}

# sbitmap's functions are tag get or tag free by name.
_SBITMAP_FREE = ("clear", "clear_batch", "put", "deferred", "wake", "_legacy", "_update")


#: builtins that block (the CPU's wait point, a sleep): time asleep, not CPU time
_IDLE = ("<method 'poll' of 'select.", "<built-in method time.sleep>", "<built-in method select.")


def _stage_of(func: tuple[str, int, str]) -> str | None:
    path, _line, name = func
    if path == "~":
        return "idle" if name.startswith(_IDLE) else _BY_BUILTIN.get(name)
    base = os.path.basename(path)
    if base == "sbitmap.py":
        return "tag free" if name.startswith(_SBITMAP_FREE) else "tag get"
    return _BY_FUNC.get((base, name)) or _BY_FUNC.get((base, "*"))


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    """Seconds of each stage in ``stats`` (every function's own time, unnamed ones
    split among their callers' stages), and "idle": blocked in a wait."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    shares: dict[Any, dict[str, float]] = {}

    def share(func, seen: frozenset) -> dict[str, float]:
        """func's time as fractions per stage."""
        if func in shares:
            return shares[func]
        stage = _stage_of(func)
        if stage is not None:
            out = {stage: 1.0}
        else:
            callers = table[func][4] if func in table else {}
            total = sum(edge[2] for edge in callers.values())
            out = {}
            if total <= 0 or func in seen:
                out = {"other": 1.0}
            else:
                for caller, edge in callers.items():
                    for st, f in share(caller, seen | {func}).items():
                        out[st] = out.get(st, 0.0) + f * edge[2] / total
        shares[func] = out
        return out

    seconds = dict.fromkeys((*STAGES, "idle"), 0.0)
    for func, (_cc, _nc, tt, _ct, _callers) in table.items():
        for st, f in share(func, frozenset()).items():
            seconds[st] += tt * f
    return seconds


def nr_ios(stats: pstats.Stats) -> int:
    """The I/Os a profile covers: the requests its CPU ended."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return sum(
        v[1]
        for (path, _l, name), v in table.items()
        if name == "end_request" and path.endswith("blk_mq_complete.py")
    )


def profile_files(directory: str) -> list[str]:
    return sorted(
        glob.glob(os.path.join(directory, "cpu*.prof")),
        key=lambda p: int(os.path.basename(p)[3:-5] or 0),
    )


def format_table(files: Iterable[str], cpu_s: float | None = None) -> str:
    """The per-stage table of the CPUs' profiles in ``files``: the share of each
    stage and its µs per I/O: of ``cpu_s``, the CPUs' CPU time in the profiled run if
    given (cProfile's cost included, others' time on a loaded host not), else of the
    profile's own (wall-clock) time."""
    files = list(files)
    if not files:
        return "profile: no CPU profile written"
    total = dict.fromkeys((*STAGES, "idle"), 0.0)
    ios = 0
    for path in files:
        stats = pstats.Stats(path)
        for st, s in breakdown(stats).items():
            total[st] += s
        ios += nr_ios(stats)
    idle = total.pop("idle")
    all_s = sum(total.values())
    per_io = (cpu_s if cpu_s else all_s) / max(ios, 1)
    lines = [
        f"profile: {len(files)} CPU(s), {ios} I/Os, {1e6 * per_io:.2f} us of "
        f"{'CPU' if cpu_s else 'wall-clock'} time per I/O under cProfile (which adds to "
        "every call: compare stages, not totals; time blocked in the wait point, "
        f"{idle:.2f} s, left out), by stage:"
    ]
    for st in STAGES:
        share = total[st] / all_s if all_s else 0.0
        if share <= 0:
            continue
        lines.append(f"  {st:<16} {1e6 * per_io * share:7.2f} us  {100 * share:5.1f} %")
    lines.append(f"  profiles: {os.path.dirname(files[0]) or '.'}/cpuN.prof (python -m pstats)")
    return "\n".join(lines)
