"""``mqrt compare A.json B.json``: two bench reports side by side, point by point.

Points are matched by their sweep parameters (``params``; values compared as strings, so
``2`` and ``"2"`` match, and knob names with dashes or underscores match).  For each
point the table shows A's median, B's median, the ratio B/A and whether the difference
stands out from the run-to-run spread: it does only when the ranges
``[min(runs), max(runs)]`` of A and B are disjoint.  Overlapping ranges are "~ within
spread"; a side with a single run has no spread to judge by.

Besides ``mqrt bench`` reports (schema ``mqrt.bench/2`` or later) a plain fio JSON report
is accepted: each of its jobs is a point keyed by ``jobname``, with a single run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mqrt.errors import UsageError

Metric = Literal["iops", "bw", "p99"]
METRICS: tuple[Metric, ...] = ("iops", "bw", "p99")
#: Oldest report schema with ``points``.
MIN_SCHEMA = 2
_SCHEMA_RE = re.compile(r"^mqrt\.bench/(\d+)$")
_P99 = 99.0


@dataclass(frozen=True)
class Point:
    """One measured point of a report: its parameters and figures."""

    params: dict[str, Any]
    iops: float  #: median over the runs
    iops_runs: tuple[float, ...]
    bw_bytes: float  #: median, bytes/s
    bw_runs: tuple[float, ...]
    #: percentile (e.g. 99.0) -> latency in ns, of the median run
    percentiles: dict[float, float] = field(default_factory=dict)
    #: p99 of every run, when the report has them
    p99_runs: tuple[float, ...] | None = None

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return param_key(self.params)

    @property
    def p99_ns(self) -> float | None:
        return self.percentiles.get(_P99)

    def value(self, metric: Metric) -> float | None:
        if metric == "iops":
            return self.iops
        if metric == "bw":
            return self.bw_bytes
        return self.p99_ns

    def runs(self, metric: Metric) -> tuple[float, ...] | None:
        """Every run's value, or None when the report does not have them."""
        if metric == "iops":
            return self.iops_runs
        if metric == "bw":
            return self.bw_runs
        if self.p99_runs is not None:
            return self.p99_runs
        return (self.p99_ns,) if self.p99_ns is not None and len(self.iops_runs) == 1 else None


@dataclass(frozen=True)
class Bench:
    """A report reduced to what compare and plot need."""

    name: str  #: where it came from (the file name), for messages
    kind: Literal["mqrt", "fio"]
    axes: dict[str, list[Any]]
    repeat: int
    points: list[Point]
    config: dict[str, Any]
    title: str  #: device / driver / job, for headings


def param_key(params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The matching key of a point: names canonical, values as strings, order-free."""
    return tuple(sorted((str(k).strip().replace("-", "_"), str(v)) for k, v in params.items()))


def format_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "(single point)"


# -- loading -------------------------------------------------------------------------------


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a JSON report; a missing or unreadable file or bad JSON is a UsageError naming it.

    Text before the JSON object (fio prints notes there) is skipped.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        start = text.find("\n{")
        try:
            data = json.loads(text[start + 1 :]) if start >= 0 else None
        except json.JSONDecodeError:
            data = None
        if data is None:
            raise UsageError(
                f"{name}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{name}: not an mqrt bench report (the JSON is not an object)")
    return data


def bench_from_report(report: Mapping[str, Any], name: str) -> Bench:
    """The points of an ``mqrt bench`` report (schema >= 2) or of a plain fio JSON report."""
    if "mqrt" in report:
        return _from_mqrt(report, name)
    if isinstance(report.get("jobs"), list) and "fio version" in report:
        return _from_fio(report, name)
    raise UsageError(
        f"{name}: not an mqrt bench report (no 'mqrt' object) nor fio JSON (no 'jobs')"
    )


def load_bench(path: str | Path) -> Bench:
    return bench_from_report(load_report(path), str(path))


def _from_mqrt(report: Mapping[str, Any], name: str) -> Bench:
    m = report["mqrt"]
    if not isinstance(m, dict):
        raise UsageError(f"{name}: not an mqrt bench report ('mqrt' is not an object)")
    schema = m.get("schema")
    match = _SCHEMA_RE.match(schema) if isinstance(schema, str) else None
    if match is None:
        raise UsageError(f"{name}: not an mqrt bench report (schema {schema!r})")
    if int(match.group(1)) < MIN_SCHEMA:
        raise UsageError(
            f"{name}: schema {schema} is too old (no sweep points); "
            f"need mqrt.bench/{MIN_SCHEMA} or later: re-run mqrt bench"
        )
    raw_points = m.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise UsageError(f"{name}: the report has no points")
    sweep = _object(m, "sweep")
    axes = _object(sweep, "axes")
    points = [_mqrt_point(p, i, name) for i, p in enumerate(raw_points)]
    config = _object(m, "config")
    jobs = _array(report, "jobs")
    return Bench(
        name=name,
        kind="mqrt",
        axes={str(k): list(v) for k, v in axes.items()},
        repeat=int(sweep.get("repeat", 1) or 1),
        points=points,
        config=config,
        title=_mqrt_title(config, jobs),
    )


def _object(parent: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]`` when it is a JSON object, else an empty one."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _array(parent: Mapping[str, Any], key: str) -> list[Any]:
    """``parent[key]`` when it is a JSON array, else an empty one."""
    value = parent.get(key)
    return value if isinstance(value, list) else []


def _num(value: Any, what: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise UsageError(f"{name}: {what} is not a number: {value!r}")
    return float(value)


def _percentiles(lat: Any) -> dict[float, float]:
    """fio's ``{"99.000000": ns}`` as ``{99.0: ns}`` (nonsense entries dropped)."""
    pct = lat.get("percentile") if isinstance(lat, dict) else None
    out: dict[float, float] = {}
    if isinstance(pct, dict):
        for k, v in pct.items():
            try:
                p = float(k)
            except ValueError:
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[p] = float(v)
    return dict(sorted(out.items()))


def _mqrt_point(p: Any, i: int, name: str) -> Point:
    if not isinstance(p, dict) or not isinstance(p.get("params"), dict):
        raise UsageError(f"{name}: point {i} has no 'params' object")
    where = f"point {i} ({format_params(p['params'])})"
    if "iops" not in p:
        raise UsageError(f"{name}: {where} has no 'iops'")
    iops = _num(p["iops"], f"{where} iops", name)
    runs_raw = p.get("iops_runs") or [iops]
    if not isinstance(runs_raw, list):
        raise UsageError(f"{name}: {where} iops_runs is not a list")
    iops_runs = tuple(_num(r, f"{where} iops_runs", name) for r in runs_raw)
    bw = _num(p.get("bw_bytes", 0.0), f"{where} bw_bytes", name)
    bw_raw = p.get("bw_bytes_runs", p.get("bw_runs"))
    if isinstance(bw_raw, list) and bw_raw:
        bw_runs = tuple(_num(r, f"{where} bw_bytes_runs", name) for r in bw_raw)
    elif iops > 0:
        # one block size per point: bandwidth is IOPS times a constant, run by run
        bw_runs = tuple(r * bw / iops for r in iops_runs)
    else:
        bw_runs = (bw,)
    p99_raw = p.get("p99_ns_runs")
    p99_runs = (
        tuple(_num(r, f"{where} p99_ns_runs", name) for r in p99_raw)
        if isinstance(p99_raw, list) and p99_raw
        else None
    )
    return Point(
        params=dict(p["params"]),
        iops=iops,
        iops_runs=iops_runs,
        bw_bytes=bw,
        bw_runs=bw_runs,
        percentiles=_percentiles(p.get("lat_ns")),
        p99_runs=p99_runs,
    )


def _mqrt_title(config: Mapping[str, Any], jobs: Sequence[Any]) -> str:
    parts: list[str] = []
    devices = [j.get("jobname") for j in jobs if isinstance(j, dict) and j.get("jobname")]
    run = _object(config, "run")
    driver = run.get("driver") or next((d for d in ("nullb", "nvme") if d in config), None)
    if devices:
        parts.append(",".join(dict.fromkeys(str(d) for d in devices)))
    if driver:
        drv = _object(config, driver)
        extra = f" irqmode={drv['irqmode']}" if "irqmode" in drv else ""
        parts.append(f"driver {driver}{extra}")
    job = _object(config, "job")
    if job:
        parts.append(" ".join(f"{k}={job[k]}" for k in ("rw", "bs", "iodepth") if k in job))
    return ", ".join(p for p in parts if p)


def _from_fio(report: Mapping[str, Any], name: str) -> Bench:
    points: list[Point] = []
    seen: dict[str, int] = {}
    for i, job in enumerate(report["jobs"]):
        if not isinstance(job, dict):
            raise UsageError(f"{name}: jobs[{i}] is not an object")
        jobname = str(job.get("jobname", f"job{i}"))
        seen[jobname] = seen.get(jobname, 0) + 1
        if seen[jobname] > 1:  # numjobs without group_reporting repeats the name
            jobname = f"{jobname}#{seen[jobname]}"
        iops = bw = 0.0
        best: tuple[float, dict[float, float]] = (-1.0, {})
        for d in ("read", "write"):
            stats = job.get(d)
            if not isinstance(stats, dict):
                continue
            iops += _num(stats.get("iops", 0.0), f"jobs[{i}].{d}.iops", name)
            if "bw_bytes" in stats:
                bw += _num(stats["bw_bytes"], f"jobs[{i}].{d}.bw_bytes", name)
            else:  # fio before 3.x: KiB/s
                bw += 1024 * _num(stats.get("bw", 0.0), f"jobs[{i}].{d}.bw", name)
            # total latency when fio reports its percentiles, else completion latency;
            # of the direction with more I/Os (fio keeps them apart)
            pct = _percentiles(stats.get("lat_ns")) or _percentiles(stats.get("clat_ns"))
            ios = float(stats.get("total_ios", 0) or 0)
            if pct and ios > best[0]:
                best = (ios, pct)
        points.append(
            Point(
                params={"jobname": jobname},
                iops=iops,
                iops_runs=(iops,),
                bw_bytes=bw,
                bw_runs=(bw,),
                percentiles=best[1],
            )
        )
    if not points:
        raise UsageError(f"{name}: the fio report has no jobs")
    opts = _object(report, "global options")
    title = " ".join(f"{k}={opts[k]}" for k in ("filename", "ioengine", "rw", "bs") if k in opts)
    return Bench(
        name=name,
        kind="fio",
        axes={"jobname": [p.params["jobname"] for p in points]},
        repeat=1,
        points=points,
        config={},
        title=f"{report.get('fio version', 'fio')} {title}".strip(),
    )


# -- comparing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the comparison."""

    params: dict[str, Any]
    status: Literal["both", "only_a", "only_b"]
    a: float | None
    b: float | None
    a_runs: tuple[float, ...] | None
    b_runs: tuple[float, ...] | None
    ratio: float | None  #: B / A
    significant: bool | None  #: None: cannot tell (see note)
    note: str

    def as_json(self, metric: Metric) -> dict[str, Any]:
        return {
            "params": self.params,
            "status": self.status,
            "metric": metric,
            "a": self.a,
            "b": self.b,
            "a_runs": list(self.a_runs) if self.a_runs is not None else None,
            "b_runs": list(self.b_runs) if self.b_runs is not None else None,
            "ratio": self.ratio,
            "significant": self.significant,
            "note": self.note,
        }


def significance(
    a_runs: Sequence[float] | None, b_runs: Sequence[float] | None, b_higher: bool, metric: Metric
) -> tuple[bool | None, str]:
    """Whether B differs from A beyond the spread of the runs, and a note saying so."""
    if a_runs is None or b_runs is None:
        return None, "no spread: the report keeps one run's percentiles"
    if len(a_runs) < 2 or len(b_runs) < 2:
        return None, "1 run: no spread"
    if max(min(a_runs), min(b_runs)) <= min(max(a_runs), max(b_runs)):
        return False, "~ within spread"
    better = b_higher != (metric == "p99")  # latency: lower is better
    return True, f"B {'better' if better else 'worse'}: ranges disjoint"


def compare(a: Bench, b: Bench, metric: Metric = "iops") -> list[Row]:
    """Rows for every point of A (in A's order), then the points only in B.

    Raises UsageError when A and B have no point in common.
    """
    b_by_key = {p.key: p for p in b.points}
    a_keys = {p.key for p in a.points}
    rows: list[Row] = []
    for pa in a.points:
        pb = b_by_key.get(pa.key)
        va = pa.value(metric)
        if pb is None:
            rows.append(Row(pa.params, "only_a", va, None, pa.runs(metric), None, None, None, ""))
            continue
        vb = pb.value(metric)
        ra, rb = pa.runs(metric), pb.runs(metric)
        if va is None or vb is None:
            missing = a.name if va is None else b.name
            rows.append(
                Row(pa.params, "both", va, vb, ra, rb, None, None, f"no {metric} in {missing}")
            )
            continue
        ratio = vb / va if va else None
        sig, note = significance(ra, rb, vb > va, metric)
        rows.append(Row(pa.params, "both", va, vb, ra, rb, ratio, sig, note))
    rows.extend(
        Row(pb.params, "only_b", None, pb.value(metric), None, pb.runs(metric), None, None, "")
        for pb in b.points
        if pb.key not in a_keys
    )
    if not any(r.status == "both" for r in rows):
        raise UsageError(
            f"{b.name}: no point in common with {a.name} "
            f"(A: {_some(a.points)}; B: {_some(b.points)})"
        )
    if metric == "p99" and all(r.a is None or r.b is None for r in rows if r.status == "both"):
        missing = a.name if all(p.p99_ns is None for p in a.points) else b.name
        raise UsageError(f"{missing}: --metric p99: the report has no 99th percentile latency")
    return rows


def _some(points: Sequence[Point], limit: int = 3) -> str:
    shown = ", ".join(format_params(p.params) for p in points[:limit])
    return shown + (f", ... ({len(points)} points)" if len(points) > limit else "")


def config_differences(a: Bench, b: Bench, limit: int = 8) -> list[str]:
    """Configuration values that differ between A and B, other than the swept axes."""
    fa, fb = _flatten(a.config), _flatten(b.config)
    swept = {str(k).replace("-", "_") for k in (*a.axes, *b.axes)}
    diffs = [
        f"{k}: {fa.get(k, '-')} vs {fb.get(k, '-')}"
        for k in sorted(set(fa) | set(fb))
        if k.rsplit(".", 1)[-1] not in swept and str(fa.get(k)) != str(fb.get(k))
    ]
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- output --------------------------------------------------------------------------------


def format_value(value: float | None, metric: Metric) -> str:
    if value is None:
        return "-"
    if metric == "iops":
        for unit, div in (("M", 1e6), ("k", 1e3)):
            if abs(value) >= div:
                return f"{value / div:.1f}{unit}"
        return f"{value:.0f}"
    if metric == "bw":
        return f"{value / (1 << 20):.1f}MiB/s"
    return f"{value / 1000:.1f}us"


def _cell(value: float | None, runs: Sequence[float] | None, metric: Metric) -> str:
    text = format_value(value, metric)
    if value is not None and runs is not None and len(runs) > 1:
        text += f" [{format_value(min(runs), metric)}..{format_value(max(runs), metric)}]"
    return text


_METRIC_TITLES: dict[Metric, str] = {
    "iops": "IOPS (read+write), median [min..max of the runs]; higher is better",
    "bw": "bandwidth (read+write), median [min..max of the runs]; higher is better",
    "p99": "99th percentile latency of the median run; lower is better",
}


def render_table(rows: Sequence[Row], a: Bench, b: Bench, metric: Metric) -> None:
    """The comparison as a table on stdout (plain text when stdout is not a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 200))
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r.params if k not in names)
    table = Table(box=box.SIMPLE_HEAD, title_justify="left")
    for n in names or ["point"]:
        table.add_column(n)
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("B/A", justify="right")
    table.add_column("")
    for r in rows:
        cells = [Text(str(r.params.get(n, ""))) for n in names] or [Text("(single point)")]
        if r.status == "only_a":
            note = "only in A"
        elif r.status == "only_b":
            note = "only in B"
        else:
            note = r.note
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        table.add_row(
            *cells,
            Text(_cell(r.a, r.a_runs, metric)),
            Text(_cell(r.b, r.b_runs, metric)),
            Text(ratio),
            Text(note),
        )
    for label, bench in (("A", a), ("B", b)):
        runs = f"{bench.repeat} run{'s' if bench.repeat != 1 else ''} per point"
        desc = f"{label}: {bench.name} ({bench.kind}, {len(bench.points)} points, {runs})"
        console.print(Text(desc + (f": {bench.title}" if bench.title else "")))
    console.print(Text(f"metric: {_METRIC_TITLES[metric]}"))
    console.print(table)
    for diff in config_differences(a, b):
        console.print(Text(f"note: configuration differs: {diff}"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two bench reports point by point",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A.json", help="the baseline report (mqrt bench or fio JSON)")
    p.add_argument("b", metavar="B.json", help="the report compared with A")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default="iops",
        help="iops, bw (bytes/s) or p99 (99th percentile total latency). Default: iops",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list, one entry per point")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    a, b = load_bench(args.a), load_bench(args.b)
    rows = compare(a, b, args.metric)
    if args.json:
        print(json.dumps([r.as_json(args.metric) for r in rows], indent=2))
    else:
        render_table(rows, a, b, args.metric)
    return 0
