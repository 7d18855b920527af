"""fio's value syntax (fio HOWTO, "Parameter types"), read the way fio reads it.

* sizes: an integer (decimal or ``0x`` hex) with an optional unit prefix ``k``, ``m``,
  ``g``, ``t``, ``p`` followed by nothing, ``b``, ``ib`` or ``iB``.  With fio's default
  ``kb_base=1024`` the SI spelling is the power of two (``4k`` = ``4kB`` = 4096) and the
  IEC one the power of ten (``1KiB`` = 1000), fio's compatibility mode; with
  ``kb_base=1000`` it is the other way round.  No fractions (fio reads ``1.5g`` as 1).
* times: a number with ``us``/``usec``, ``ms``/``msec``, ``s``/``sec``, ``m``/``min``,
  ``h``/``hr``, ``d``; without a unit, the option's own default unit (seconds for
  ``runtime``, microseconds for ``thinktime``).
* percentages: ``N%`` where fio allows them (``size``, ``offset``, ``io_size``).
* ranges: ``lo-hi`` or ``lo:hi``; per-direction lists ``read,write[,trim]``, where a
  value not followed by a comma also applies to the directions after it (``bs=8k,32k``:
  8k reads, 32k writes and trims; ``bs=8k,``: 8k reads, the default for the rest).

Every function raises ``ValueError`` with a short reason; the caller names the option.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = [
    "Percent",
    "SizeRange",
    "parse_bssplit",
    "parse_distribution",
    "parse_fio_int",
    "parse_fio_size",
    "parse_fio_time_us",
    "parse_size_or_percent",
    "parse_size_range",
    "per_direction",
]

_SIZE = re.compile(r"^(0x[0-9a-f]+|[0-9]+)([kmgtp]?)(b|ib)?$", re.IGNORECASE)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_TIME = re.compile(r"^([0-9]+(?:\.[0-9]*)?)([a-z]*)$", re.IGNORECASE)
_TIME_UNITS_US = {
    "us": 1,
    "usec": 1,
    "ms": 1_000,
    "msec": 1_000,
    "s": 1_000_000,
    "sec": 1_000_000,
    "m": 60_000_000,
    "min": 60_000_000,
    "h": 3_600_000_000,
    "hr": 3_600_000_000,
    "d": 86_400_000_000,
}
#: Directions of a per-direction list, in fio's order.
DIRECTIONS = ("read", "write", "trim")


def parse_fio_size(text: str, kb_base: int = 1024) -> int:
    """A size in bytes: ``4k``, ``64KiB``, ``1M``, ``0x1000``."""
    t = text.strip()
    m = _SIZE.match(t)
    if not m:
        raise ValueError(f"not a size: {text!r} (an integer with k/m/g/t/p, e.g. 4k or 1MiB)")
    number, prefix, suffix = m.groups()
    n = int(number, 0)
    power = _POW[prefix.lower()]
    iec = (suffix or "").lower() == "ib"
    base = (1000 if iec else 1024) if kb_base == 1024 else (1024 if iec else 1000)
    return n * base**power


def parse_fio_int(text: str) -> int:
    """An integer option: fio takes size prefixes there too (``number_ios=10k``)."""
    return parse_fio_size(text)


class Percent(NamedTuple):
    """``N%`` of the device (fio's percentage form of a size)."""

    pct: float


def parse_size_or_percent(text: str, kb_base: int = 1024) -> int | Percent:
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {text!r}") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"a percentage must be 0..100%, got {text!r}")
        return Percent(pct)
    return parse_fio_size(t, kb_base)


def parse_fio_time_us(text: str, default_unit: str) -> int:
    """A time in microseconds; ``default_unit`` (``s``, ``ms``, ``us``) applies to a
    bare number, as fio's default unit of the option does."""
    t = text.strip()
    m = _TIME.match(t)
    if not m:
        raise ValueError(f"not a time: {text!r} (a number with us/ms/s/m/h, e.g. 10s)")
    number, unit = m.groups()
    unit = unit.lower() or default_unit
    if unit not in _TIME_UNITS_US:
        raise ValueError(f"unknown time unit {unit!r} in {text!r} (us, ms, s, m, h, d)")
    return round(float(number) * _TIME_UNITS_US[unit])


class SizeRange(NamedTuple):
    lo: int
    hi: int


def parse_size_range(text: str, kb_base: int = 1024) -> SizeRange:
    """``4k``, ``4k-64k`` or ``4k:64k`` (fio sorts the two ends)."""
    t = text.strip()
    for sep in ("-", ":"):
        if sep in t:
            a, _, b = t.partition(sep)
            lo, hi = parse_fio_size(a, kb_base), parse_fio_size(b, kb_base)
            return SizeRange(min(lo, hi), max(lo, hi))
    n = parse_fio_size(t, kb_base)
    return SizeRange(n, n)


def per_direction(text: str) -> list[str | None]:
    """fio's ``read,write,trim`` list: three entries, None where the direction keeps
    its default.  A value not followed by a comma carries over to the later
    directions; more than three values is an error."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 3:
        raise ValueError(f"at most 3 comma-separated values (read,write,trim), got {text!r}")
    out: list[str | None] = [None, None, None]
    for i, part in enumerate(parts):
        if part:
            out[i] = part
    last = parts[-1]
    if last and len(parts) < 3:  # not followed by a comma: applies to the rest
        for i in range(len(parts), 3):
            out[i] = last
    return out


def parse_bssplit(text: str, kb_base: int = 1024) -> tuple[tuple[int, int], ...]:
    """One direction of ``bssplit``: ``4k/50:64k/50`` -> ((4096, 50), (65536, 50)).  An
    entry without a percentage (``64k``) shares what the others leave, as in fio."""
    entries: list[tuple[int, int | None]] = []
    for raw in text.split(":"):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty entry in {text!r} (SIZE/PERCENT:SIZE/PERCENT...)")
        size_text, slash, pct_text = item.partition("/")
        size = parse_fio_size(size_text, kb_base)
        if slash:
            try:
                pct = int(pct_text)
            except ValueError:
                raise ValueError(f"not a percentage: {pct_text!r} in {text!r}") from None
            if not 0 <= pct <= 100:
                raise ValueError(f"percentage {pct} out of 0..100 in {text!r}")
            entries.append((size, pct))
        else:
            entries.append((size, None))
    given = sum(p for _, p in entries if p is not None)
    if given > 100:
        raise ValueError(f"percentages add up to {given}, more than 100, in {text!r}")
    free = [i for i, (_, p) in enumerate(entries) if p is None]
    rest = 100 - given
    out = []
    for i, (size, p) in enumerate(entries):
        if p is None:
            share = rest // len(free) + (1 if free.index(i) < rest % len(free) else 0)
            out.append((size, share))
        else:
            out.append((size, p))
    if sum(p for _, p in out) != 100:
        raise ValueError(f"percentages add up to {given}, not 100, in {text!r}")
    return tuple(out)


#: random_distribution: name -> (default parameter, allowed range text).
DISTRIBUTIONS = ("random", "zipf", "pareto", "normal", "zoned", "zoned_abs")


def parse_distribution(text: str) -> tuple[str, float, tuple[tuple[float, float], ...]]:
    """``random``, ``zipf[:theta]``, ``pareto[:h]``, ``normal[:sigma]`` or
    ``zoned:P/S:...`` / ``zoned_abs:P/SIZE:...`` -> (name, parameter, zones)."""
    name, _, arg = text.strip().partition(":")
    name = name.lower()
    if name not in DISTRIBUTIONS:
        raise ValueError(f"must be {'|'.join(DISTRIBUTIONS)}, got {text!r}")
    if name == "random":  # fio takes and ignores a parameter here
        return name, 0.0, ()
    if name in ("zipf", "pareto", "normal"):
        default = {"zipf": 1.2, "pareto": 0.2, "normal": 0.0}[name]
        try:
            value = float(arg) if arg else default
        except ValueError:
            raise ValueError(f"{name}: not a number: {arg!r}") from None
        if name == "zipf" and not (value >= 0 and value != 1.0):
            raise ValueError(f"zipf: theta must be >= 0 and not 1, got {arg!r}")
        if name == "pareto" and not 0 < value < 1:
            raise ValueError(f"pareto: h must be in (0, 1), got {arg!r}")
        if name == "normal" and not 0 <= value <= 100:
            raise ValueError(f"normal: sigma must be 0..100 (percent of the range), got {arg!r}")
        return name, value, ()
    if not arg:
        raise ValueError(f"{name} needs zones: {name}:PCT/SIZE:PCT/SIZE...")
    zones: list[tuple[float, float]] = []
    for item in arg.split(":"):
        pct_text, slash, size_text = item.partition("/")
        if not slash:
            raise ValueError(f"{name}: zone {item!r} is not PCT/SIZE")
        try:
            pct = float(pct_text)
            size = float(size_text) if name == "zoned" else float(parse_fio_size(size_text))
        except ValueError:
            raise ValueError(f"{name}: zone {item!r} is not PCT/SIZE") from None
        zones.append((pct, size))
    if abs(sum(p for p, _ in zones) - 100) > 1e-9:
        raise ValueError(f"{name}: the zones' access percentages must add up to 100")
    if name == "zoned" and sum(s for _, s in zones) > 100 + 1e-9:
        raise ValueError("zoned: the zones' size percentages add up to more than 100")
    return name, 0.0, tuple(zones)
