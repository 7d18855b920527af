"""``mqrt plot REPORT.json -o OUT.png``, and :func:`plot_report` for ``mqrt bench``:
a bench report as a PNG.

Left, IOPS against the ``cpus`` axis (or the first numeric axis; one bar per point when
nothing numeric is swept), one line per combination of the other axes, with the min-max
of the repetitions as error bars.  Right, each point's latency percentiles on a "nines"
axis (50, 90, 99, 99.9 ... evenly spaced) with latency on a log scale: a CDF read
sideways, where tails show.

matplotlib is an optional extra (``pip install 'mqrt[plot]'``), imported only here, and
drawn with the Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqrt.compare import Bench, Point, bench_from_report, format_params, load_report
from mqrt.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MISSING_MATPLOTLIB = "--plot needs matplotlib: pip install 'mqrt[plot]'"
#: Percentile ticks of the latency panel (shown when the data reaches them).
_NINES = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def x_axis(bench: Bench) -> str | None:
    """The axis IOPS is drawn against: ``cpus`` if swept, else the first numeric axis."""
    numeric = [
        name
        for name, values in bench.axes.items()
        if values
        and all(_is_number(v) for v in values)
        and all(_is_number(p.params.get(name)) for p in bench.points)
    ]
    if "cpus" in numeric:
        return "cpus"
    return numeric[0] if numeric else None


def series(bench: Bench, x: str | None) -> dict[str, list[Point]]:
    """Points grouped by the other axes (label ``mode=mq, bs=4096``), sorted along ``x``;
    without ``x``, every point on its own."""
    if x is None:
        return {format_params(p.params): [p] for p in bench.points}
    groups: dict[str, list[Point]] = {}
    for p in bench.points:
        label = ", ".join(f"{k}={v}" for k, v in p.params.items() if k != x)
        groups.setdefault(label, []).append(p)
    for points in groups.values():
        points.sort(key=lambda p: float(p.params[x]))
    return groups


def _nines(percentile: float) -> float:
    """Position on the "nines" axis: 90 -> 1, 99 -> 2, 99.9 -> 3."""
    return -math.log10(1.0 - percentile / 100.0)


def _errors(points: Sequence[Point]) -> list[list[float]]:
    return [
        [p.iops - min(p.iops_runs) for p in points],
        [max(p.iops_runs) - p.iops for p in points],
    ]


def _draw_iops(ax: Axes, bench: Bench, colors: Mapping[str, Any]) -> None:
    from matplotlib.ticker import EngFormatter

    x = x_axis(bench)
    runs = f"median of {bench.repeat} runs, bars: min-max" if bench.repeat > 1 else "1 run"
    if x is None:
        labels = [format_params(p.params) for p in bench.points]
        ax.bar(
            range(len(bench.points)),
            [p.iops for p in bench.points],
            yerr=_errors(bench.points),
            capsize=4,
            color=[colors[label] for label in labels],
        )
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
        ax.set_xlabel("point")
    else:
        xs_all: set[float] = set()
        for label, points in series(bench, x).items():
            xs = [float(p.params[x]) for p in points]
            xs_all.update(xs)
            ax.errorbar(
                xs,
                [p.iops for p in points],
                yerr=_errors(points),
                marker="o",
                capsize=4,
                color=colors[label],
                label=label or "IOPS",
            )
        ticks = sorted(xs_all)
        if len(ticks) <= 16:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel(x)
        if any(series(bench, x)):
            ax.legend(fontsize="small")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("IOPS (read+write)")
    ax.set_title(f"IOPS ({runs})", fontsize="medium")
    ax.grid(True, alpha=0.3)


def _draw_latency(ax: Axes, bench: Bench, colors: Mapping[str, Any]) -> None:
    x = x_axis(bench)
    groups = series(bench, x)
    drawn = 0
    top = 0.0
    for label, points in groups.items():
        for i, p in enumerate(points):
            pct = {k: v for k, v in p.percentiles.items() if 0 < k < 100 and v > 0}
            if not pct:
                continue
            top = max(top, *pct)
            ax.plot(
                [_nines(k) for k in pct],
                [v / 1000 for v in pct.values()],
                marker=".",
                color=colors[label],
                # along the x axis: later points darker
                alpha=0.35 + 0.65 * (i + 1) / len(points),
                label=format_params(p.params),
            )
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no latency percentiles", ha="center", va="center")
        ax.set_axis_off()
        return
    ax.set_yscale("log")
    ticks = [t for t in _NINES if t <= top + 1e-9] or [50.0]
    ax.set_xticks([_nines(t) for t in ticks], [f"{t:g}" for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (us, log)")
    ax.set_title("latency percentiles (median run)", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2 if drawn > 6 else 1)


def check_available() -> None:
    """Raise the one-line UsageError now if matplotlib is missing (``mqrt bench
    --plot`` checks before it runs anything)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(MISSING_MATPLOTLIB)


def plot_report(report: dict[str, Any], path: str) -> None:
    """Draw ``report`` (an ``mqrt bench`` report, or fio JSON) as a PNG at ``path``.

    Raises UsageError when matplotlib is absent, the report is not one, or ``path``
    cannot be written.
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None
    del matplotlib  # imported first so a missing package is the message above

    bench = bench_from_report(report, "the report")
    x = x_axis(bench)
    labels = list(series(bench, x))
    palette = [f"C{i % 10}" for i in range(len(labels))]
    colors = dict(zip(labels, palette, strict=True))

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_iops, ax_lat = fig.subplots(1, 2)
    _draw_iops(ax_iops, bench, colors)
    _draw_latency(ax_lat, bench, colors)
    fig.suptitle(f"mqrt bench: {bench.title}" if bench.title else "mqrt bench")
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw a bench report as a PNG (needs matplotlib)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("report", metavar="REPORT.json", help="an mqrt bench JSON report (or fio JSON)")
    p.add_argument("-o", "--output", metavar="OUT.png", help="where to write. Default: REPORT.png")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    report = load_report(args.report)
    out = args.output or str(Path(args.report).with_suffix(".png"))
    # the report's own errors name the report, not the output file
    bench_from_report(report, args.report)
    plot_report(report, out)
    print(f"mqrt: wrote {out}")
    return 0
