"""The timeline of a run: sysfs-like writes at given times (``--at``, ``--every``, the
job files' ``at=`` and ``every=``, a race scenario's ``timeline``).

Syntax (times are relative to the run's common start, t0)::

    --at TIME:WRITE
    --every PERIOD[@FROM[..TO]]:WRITE      ticks at FROM, FROM+PERIOD, ... before TO
    WRITE  = [DEV/]ATTR=VALUE | [DEV/]VERB[=ARG]
    TIME   = 2s | 2.5s | 500ms | 250us | 2 (seconds)

DEV is a queue of the run as it names them (``nullb0``, ``nvme0n1``); without it, a
queue attribute is written to every queue of the run, one after the other.  ATTR and
VERB are the registered attributes of :mod:`mqrt.block.blk_sysfs`.  Every mistake is
a :class:`~mqrt.lib.knobs.KnobError` of one line that names the option (``at`` or
``every``), the text, and the bad part.  What needs the run's configuration (the
device exists, the value fits its tag depth) is checked by :func:`bind`, when the
run is built.
"""

from __future__ import annotations

import re

from mqrt.block import blk_sysfs
from mqrt.block.blk_sysfs import QueueInfo, SysfsError, TimedWrite
from mqrt.lib.knobs import KnobError

#: The shortest --every period: the writer shares CPU 0 with its fio task.
MIN_PERIOD_NS = 1_000_000
#: The latest time of the timeline: a day.
MAX_TIME_NS = 86_400 * 10**9

_TIME = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(s|ms|us|ns)?$")
_UNIT_NS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1, None: 10**9}
TIME_FORMS = "e.g. 2s, 2.5s, 500ms, 250us; a bare number is seconds"
#: A device name as the drivers name their queues (nullb0, nvme0n1), to tell
#: ``DEV/ATTR`` from an attribute with a slash in an error.
_DEV = re.compile(r"^(?!cpu\d)[a-z]+\d+(n\d+)?$")


def parse_time_ns(text: str) -> int:
    """``2s``, ``2.5s``, ``500ms``, ``250us``, ``2`` -> ns; ValueError if it is not one."""
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError(text)
    ns = round(float(m.group(1)) * _UNIT_NS[m.group(2)])
    if ns > MAX_TIME_NS:
        raise ValueError(text)
    return ns


def _err(option: str, text: str, why: str) -> TimelineError:
    return TimelineError(f"{option}: {text!r}: {why}")


def _time(option: str, text: str, what: str, part: str) -> int:
    try:
        return parse_time_ns(part)
    except ValueError:
        raise _err(option, text, f"bad {what} {part!r} ({TIME_FORMS})") from None


def parse_write(option: str, text: str, write: str) -> tuple[str | None, str, object, str | None]:
    """``[DEV/]ATTR=VALUE`` or ``[DEV/]VERB[=ARG]`` -> (dev, attribute, typed value,
    value text)."""
    lhs, eq, value = write.partition("=")
    lhs = lhs.strip()
    value_text: str | None = value.strip() if eq else None
    dev: str | None = None
    name = lhs
    if lhs not in blk_sysfs.ATTRIBUTES and "/" in lhs:
        head, rest = lhs.split("/", 1)
        if rest in blk_sysfs.ATTRIBUTES or _DEV.match(head):
            dev, name = head, rest
    if not name:
        raise _err(option, text, "no attribute (WRITE is [DEV/]ATTR=VALUE)")
    written = name
    name, number = blk_sysfs.split_numbered(name)
    try:
        attr = blk_sysfs.lookup(name)
        if dev is not None and not attr.per_queue:
            raise SysfsError(f"{name} is not a queue attribute: no device before it")
        if value_text is None and not attr.verb:
            raise SysfsError(f"{name} needs a value ({attr.help})")
        typed = attr.parse(value_text)
        if number is not None:
            typed = (number, typed)
            if attr.check_cpus is not None and number == 0:
                attr.check_cpus(typed, 1)  # the boot CPU: refused before the run is built
    except SysfsError as exc:
        why = str(exc) if number is None else str(exc).replace(name, written, 1)
        raise _err(option, text, why) from None
    return dev, name, typed, value_text


class TimelineError(KnobError):
    """A bad write of the timeline: the message names where it was given (``--at``,
    ``jobs.fio:3: every``), so callers do not locate it again."""


def parse_at(text: str, option: str = "at") -> TimedWrite:
    """``TIME:WRITE``."""
    when, colon, write = text.partition(":")
    if not colon:
        raise _err(option, text, "expected TIME:WRITE (e.g. 2s:queue/nr_requests=32)")
    at_ns = _time(option, text, "time", when.strip())
    dev, attr, value, value_text = parse_write(option, text, write)
    return TimedWrite(text.strip(), "at", at_ns, 0, -1, dev, attr, value, value_text, option)


def parse_every(text: str, option: str = "every") -> TimedWrite:
    """``PERIOD[@FROM[..TO]]:WRITE``."""
    when, colon, write = text.partition(":")
    if not colon:
        raise _err(
            option,
            text,
            "expected PERIOD[@FROM[..TO]]:WRITE (e.g. 50ms@1s..3s:queue/nr_requests=16)",
        )
    period, at, window = when.strip().partition("@")
    period_ns = _time(option, text, "period", period.strip())
    if period_ns < MIN_PERIOD_NS:
        raise _err(option, text, f"period {period.strip()!r} is below the shortest, 1ms")
    from_ns, until_ns = 0, -1
    if at:
        start, dots, end = window.partition("..")
        from_ns = _time(option, text, "start", start.strip())
        if dots:
            until_ns = _time(option, text, "end", end.strip())
            if until_ns <= from_ns:
                raise _err(
                    option, text, f"the window {window.strip()!r} is empty (FROM must be before TO)"
                )
    dev, attr, value, value_text = parse_write(option, text, write)
    return TimedWrite(
        text.strip(), "every", from_ns, period_ns, until_ns, dev, attr, value, value_text, option
    )


def parse(at: list[str], every: list[str], option_prefix: str = "") -> list[TimedWrite]:
    """Every ``--at`` and ``--every`` of a command (``option_prefix`` "--" names them
    as command-line options in errors)."""
    return [parse_at(t, f"{option_prefix}at") for t in at] + [
        parse_every(t, f"{option_prefix}every") for t in every
    ]


def bind(writes: list[TimedWrite], queues: list[QueueInfo], nr_cpus: int = 0) -> list[TimedWrite]:
    """:func:`mqrt.block.blk_sysfs.bind`, its errors naming the write's option."""
    out = []
    for w in writes:
        try:
            out += blk_sysfs.bind([w], queues, nr_cpus)
        except SysfsError as exc:
            raise _err(w.source, w.text, str(exc)) from None
    return out


def ticks(w: TimedWrite, deadline_ns: int) -> int:
    """How many times ``w`` is due in a run whose deadline is ``deadline_ns`` after t0."""
    end = deadline_ns if w.until_ns < 0 else min(w.until_ns, deadline_ns)
    if w.kind == "at":
        return int(w.at_ns < deadline_ns)
    if end <= w.at_ns:
        return 0
    return -(-(end - w.at_ns) // w.period_ns)
