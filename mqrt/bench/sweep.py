"""Sweeps for ``mqrt bench``: any numeric, boolean or choice option given as a list
becomes an axis, and the cartesian product of the axes runs point by point, each
point ``repeat`` times, the median repetition (by IOPS) standing for the point.

Value lists:

``1,2,4``      those values, in that order
``1-4``        every integer from 1 to 4 (integer options only)
``1-16:x2``    1, 2, 4, 8, 16: a geometric range (integer options only)
``0-100:25``   0, 25, 50, 75, 100: a range with a step (integer options only)

Options whose values are lists of their own (``cpus_allowed`` cpulists, null_blk's
fault strings) and free-text options are never axes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mqrt.lib.knobs import Knob, KnobError, canonical

if TYPE_CHECKING:
    from mqrt.runtime.spec import RunSpec

#: Kinds of knob that may be swept (a "str" knob may contain commas of its own).
SWEEPABLE_KINDS = frozenset({"int", "size", "float", "bool", "choice"})
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?::\s*(x?)(\d+))?\s*$")
#: At most this many points in one sweep (a typo like 1-100000 is refused).
MAX_POINTS = 4096


@dataclass
class Point:
    """One combination of axis values: its options and what each repetition gave."""

    index: int
    params: dict[str, Any]  #: axis -> value as given (typed once the point is built)
    given: dict[str, Any]  #: every option of this point
    runs: list[dict[str, Any]] = field(default_factory=list)  #: one summary per repetition
    # Set by ``mqrt bench`` once the point's options are validated (not before: no
    # default, outside __init__, repr and comparisons).
    spec: RunSpec = field(init=False, repr=False, compare=False)  #: what runs
    config: dict[str, Any] = field(init=False, repr=False, compare=False)  #: what the report shows


def expand_values(knob: Knob, raw: str) -> list[str]:
    """The values of one option: a list, a range, or a single value."""
    text = str(raw)
    if "," in text:
        values = [v.strip() for v in text.split(",")]
        if any(not v for v in values):
            raise KnobError(f"{knob.name}: empty value in the list {text!r}")
        return values
    m = _RANGE.match(text)
    if m and knob.kind == "int":
        lo, hi, geometric, step_text = int(m[1]), int(m[2]), m[3], m[4]
        step = int(step_text) if step_text else 1
        if hi < lo or step < 1 or (geometric and (step < 2 or lo < 1)):
            raise KnobError(
                f"{knob.name}: bad range {text!r} (lo-hi, lo-hi:step or lo-hi:xFACTOR, lo <= hi)"
            )
        if geometric:
            numbers, v = [], lo
            while v <= hi:
                numbers.append(v)
                v *= step
        else:
            numbers = list(range(lo, hi + 1, step))
        if len(numbers) > MAX_POINTS:
            raise KnobError(
                f"{knob.name}: range {text!r} has {len(numbers)} values, at most {MAX_POINTS}"
            )
        return [str(v) for v in numbers]
    return [text]


def split_axes(
    given: Mapping[str, Any], knobs: Mapping[str, Knob]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The options that hold one value, and the axes (options with several), in
    the order the options are listed."""
    base: dict[str, Any] = {}
    axes: dict[str, list[str]] = {}
    for raw_name, raw in given.items():
        name = canonical(raw_name)
        knob = knobs.get(name)
        if knob is None or knob.kind not in SWEEPABLE_KINDS or not isinstance(raw, str):
            base[name] = raw
            continue
        values = expand_values(knob, raw)
        if len(values) == 1:
            base[name] = values[0]
        else:
            if len(set(values)) != len(values):
                raise KnobError(f"{name}: a value is listed twice in {raw!r}")
            axes[name] = values
    return base, axes


def points(base: Mapping[str, Any], axes: Mapping[str, list[str]]) -> list[Point]:
    """The cartesian product of the axes, the first axis varying slowest."""
    names = list(axes)
    combos = list(itertools.product(*(axes[n] for n in names)))
    if len(combos) > MAX_POINTS:
        raise KnobError(f"the sweep has {len(combos)} points, at most {MAX_POINTS}")
    return [
        Point(
            i,
            dict(zip(names, combo, strict=True)),
            {**base, **dict(zip(names, combo, strict=True))},
        )
        for i, combo in enumerate(combos)
    ]


def median_index(values: Iterable[float]) -> int:
    """Index of the median value (the lower middle one for an even count)."""
    vals = list(values)
    order = sorted(range(len(vals)), key=vals.__getitem__)
    return order[(len(order) - 1) // 2]


def format_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
