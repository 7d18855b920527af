"""The catalogue of historical sbitmap and shared-tag bugs ``mqrt race`` can switch
back on.

Each entry names the kernel commit that fixed the bug, says what went wrong, and
carries the buggy version of *our* function (the port in :mod:`mqrt.sbitmap` and
:mod:`mqrt.blk_mq_tag` is the fixed code).  Switching a bug on replaces that function
on its class in the owner process before the CPUs are forked, so they run the old
code; switching it off puts ours back.  A scenario (options of ``mqrt bench``, per
queue jobs, injection points) is what provokes it on this kind of host, and the
detectors of :mod:`mqrt.race_detect` say when it happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mqrt.blk_mq_tag import Tags
from mqrt.wait import spin_lock, spin_unlock


@dataclass(frozen=True)
class Scenario:
    """What provokes a bug: bench options for the run, per-queue job options on top
    of them (queue index -> options), armed injection points, and how long one
    attempt runs (seconds)."""

    given: dict[str, Any]
    queue_jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    inject: dict[str, tuple[float, int]] = field(default_factory=dict)
    attempt_s: float = 5.0


@dataclass(frozen=True)
class Bug:
    name: str
    commit: str
    subject: str
    what: str  #: one line: what goes wrong
    explanation: str  #: a paragraph: the mechanism, and the fix
    scenario: Scenario
    #: (class, attribute, buggy function): what switching the bug on replaces
    patches: tuple[tuple[type, str, Callable[..., Any]], ...]
    #: the detectors expected to catch it
    detectors: tuple[str, ...] = ("lost_wakeup", "hang")

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


# -- 180dccb0dba4: wake_batch not recalculated for the fair share ---------------------------


def _update_active_without_recalc(self: Tags, delta: int) -> int:
    """Before 180dccb0dba4: __blk_mq_tag_busy()/__blk_mq_tag_idle() changed
    active_queues only; wake_batch stayed sized for the whole depth."""
    spin_lock(self.a, self._lock)
    try:
        users = self.a.read32(self._active_queues) + delta
        self.a.set32(self._active_queues, users)
        return users
    finally:
        spin_unlock(self.a, self._lock)


WAKE_BATCH_FAIR_SHARE = Bug(
    name="wake_batch_fair_share",
    commit="180dccb0dba4",
    subject="blk-mq: fix tag_get wait task can't be awakened",
    what="a queue held to a fair share below wake_batch sleeps for a tag and is never woken",
    explanation=(
        "With shared tags each active queue may hold only its fair share of the depth "
        "(hctx_may_queue). A queue over its share sleeps on the tag map's wait queues "
        "like a task that found the map full, and sleepers are woken only after "
        "wake_batch tags have been freed. wake_batch was sized for the whole depth "
        "(depth / 8, at most 8), so once more than 8 queues were active the share could "
        "be smaller than wake_batch: the sleeping queue's own requests, all that is left "
        "in flight when the other queues are quiet but still counted active, free fewer "
        "tags than a batch, and nobody wakes it. The fix recalculates wake_batch from "
        "the fair share whenever the number of active queues changes "
        "(sbitmap_queue_recalculate_wake_batch). Scenario: 10 null_blk devices on one "
        "shared tag set of 64 tags (wake_batch 8); devices 1-9 do a short burst and stay "
        "active, device 0 keeps 32 I/Os queued per CPU but may hold only 7."
    ),
    scenario=Scenario(
        given={
            "nr_devices": 10,
            "shared_tags": 1,
            "hw_queue_depth": 64,
            "irqmode": "timer",
            "completion_nsec": 20_000,
            "iodepth": 32,
            "io_timeout": 30_000,
            "cpus": 2,
        },
        queue_jobs={q: {"time_based": 0, "size": "16k", "iodepth": 4} for q in range(1, 10)},
        attempt_s=5.0,
    ),
    patches=((Tags, "_update_active", _update_active_without_recalc),),
)


CATALOGUE: dict[str, Bug] = {b.name: b for b in (WAKE_BATCH_FAIR_SHARE,)}
