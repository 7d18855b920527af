"""Knobs: named, typed, documented settings, validated at the edge.

Every setting a user can give (a null_blk module parameter, a fio job option, a
queue sysfs attribute) is declared once as a :class:`Knob` with its kernel or fio
name, its unit and default in the help text (``MODULE_PARM_DESC`` style), and its
allowed range.  The command line, job files and the JSON report all use these
names; a bad value is a :class:`KnobError` whose one-line message names the knob and
what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class KnobError(ValueError):
    """A bad setting: one line naming the knob and what it accepts."""


_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def parse_size(text: str) -> int:
    """fio-style sizes: ``4096``, ``4k``, ``1M``, ``2GiB`` (powers of two)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class Knob:
    """One setting: name, kind, default, help (with unit and default) and range."""

    name: str
    kind: str  #: "int", "size", "bool", "choice", "float", "str"
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    #: For "choice": accepted spellings -> value (e.g. {"none": 0, "0": 0}).
    choices: Mapping[str, Any] | None = None
    #: Extra check on the parsed value: returns an error text or None.
    check: Callable[[Any], str | None] | None = None

    def allowed(self) -> str:
        if self.kind == "bool":
            return "0 or 1"
        if self.kind == "choice" and self.choices:
            names = [k for k in self.choices if not k.isdigit()]
            nums = [k for k in self.choices if k.isdigit()]
            text = "|".join(names)
            return f"{text} (or {'|'.join(nums)})" if nums else text
        if self.min is not None and self.max is not None:
            return f"{_fmt(self.min)}..{_fmt(self.max)}"
        if self.min is not None:
            return f">= {_fmt(self.min)}"
        return self.kind

    def parse(self, raw: Any) -> Any:
        """The value of ``raw`` (a string from a command line or job file, or an
        already typed value), or KnobError."""
        try:
            value = self._convert(raw)
        except (ValueError, TypeError):
            raise KnobError(f"{self.name}: must be {self.allowed()}, got {raw!r}") from None
        if self.kind in ("int", "size", "float") and (
            (self.min is not None and value < self.min)
            or (self.max is not None and value > self.max)
        ):
            raise KnobError(f"{self.name}: must be {self.allowed()}, got {raw!r}")
        if self.check is not None:
            err = self.check(value)
            if err:
                raise KnobError(f"{self.name}: {err}, got {raw!r}")
        return value

    def _convert(self, raw: Any) -> Any:
        if self.kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(raw)
        if self.kind == "int":
            if isinstance(raw, bool):
                raise TypeError(raw)
            return raw if isinstance(raw, int) else int(str(raw).strip().replace("_", ""), 0)
        if self.kind == "size":
            return raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(raw)
        if self.kind == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if self.kind == "choice":
            assert self.choices is not None
            key = str(raw).strip().lower()
            if key not in self.choices:
                raise ValueError(raw)
            return self.choices[key]
        return str(raw)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def canonical(name: str) -> str:
    """Knob names take dashes or underscores: ``completion-nsec`` == ``completion_nsec``."""
    return name.strip().replace("-", "_")


def parse_knobs(table: Iterable[Knob], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every knob of ``table`` with its default, overridden by ``given`` (parsed and
    checked).  A name not in the table is a KnobError naming it."""
    knobs = {k.name: k for k in table}
    out = {k.name: k.default for k in knobs.values()}
    for raw_name, raw in given.items():
        name = canonical(raw_name)
        if name not in knobs:
            raise KnobError(f"unknown option {raw_name!r}")
        out[name] = knobs[name].parse(raw)
    return out


@dataclass
class KnobValues:
    """Validated knob values, read as attributes (``cfg.irqmode``)."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None
