"""A catalogue entry: the kernel commit that fixed a bug, the buggy version of our
function that switching it on puts back, and the scenario that provokes it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    """What provokes a bug: bench options for the run, per-queue job options on top
    of them (queue index -> options), armed injection points, and how long one
    attempt runs (seconds)."""

    given: dict[str, Any]
    queue_jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    inject: dict[str, tuple[float, int]] = field(default_factory=dict)
    #: the injected spinning delays take the CPU's pending interrupts, nested in the
    #: task's operation (see mqrt.lib.inject)
    inject_irqs: bool = False
    #: sysfs writes during the run, as ``mqrt bench --at`` takes them
    #: (``"0.3s:nullb0/queue/nr_requests=4"``; mqrt.bench.timeline)
    timeline: tuple[str, ...] = ()
    attempt_s: float = 5.0

    def injected_window(self) -> str:
        """How far the injected delays widen the race window: each armed point's
        bound and how often it fires."""
        return ", ".join(
            f"<={us}us at {point} {pct:g}%" for point, (pct, us) in self.inject.items()
        )


@dataclass(frozen=True)
class Bug:
    name: str
    commit: str
    subject: str
    what: str  #: one line: what goes wrong
    explanation: str  #: a paragraph: the mechanism, and the fix
    scenario: Scenario
    #: (class or module, attribute, buggy function): what switching the bug on replaces
    patches: tuple[tuple[Any, str, Callable[..., Any]], ...]
    #: the detectors expected to catch it
    detectors: tuple[str, ...] = ("lost_wakeup", "hang")
    #: the race window in the code as it is, between which operations of which CPUs;
    #: empty for a bug that needs no interleaving (it fires at the first task that
    #: meets its condition)
    window: str = ""

    @property
    def interleaving(self) -> bool:
        """The bug needs two CPUs' operations to interleave in a window."""
        return bool(self.window)

    @contextlib.contextmanager
    def switched_on(self) -> Iterator[None]:
        """The buggy code in place for the duration (in this process, and so in the
        CPUs forked meanwhile)."""
        saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _fn in self.patches]
        try:
            for cls, attr, fn in self.patches:
                setattr(cls, attr, fn)
            yield
        finally:
            for cls, attr, orig in saved:
                setattr(cls, attr, orig)
