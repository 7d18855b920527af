"""Window widening: named points in the tag, wake-up and completion paths where a
seeded, bounded delay can be inserted, so a race window is held open on purpose.

A point is a line in the code such as::

    if inject.armed:
        inject.hit("sbq.clear.before_wake")

Nothing is armed by default, and then a point costs one module attribute load.
:func:`configure` (in the owner, before the CPUs are forked; they inherit it) arms
points with a probability (percent) and a maximum delay (µs); each process draws
its delays from its own generator, seeded from the run's seed and the CPU number, so
a run is reproducible as far as the host's scheduling lets it be.  Short delays spin
(the window stays open with the CPU busy, like an interrupt on the way); longer ones
sleep (like a preemption).

The spelling on the command line and in the race catalogue is
``NAME=PCT:MAX_US[,NAME=PCT:MAX_US...]``, e.g. ``sbq.clear.before_wake=20:300``.

Interrupts in a window (``configure(..., with_irqs=True)``)
    A CPU process takes its interrupts only between operations (at its wait point and
    between submissions), never in the middle of one, where a kernel CPU with
    interrupts enabled takes them at any instruction.  For a bug that needs an
    interrupt handler to run nested inside an operation of the task (the same CPU
    freeing a tag in process context and again in the interrupt), a run can ask for
    interrupts to arrive during the spinning delays: while the delay spins, the
    process calls :data:`irq_hook` (a CPU installs one that takes its pending
    interrupts and, as irq_exit does, its pending softirqs, when the task is in
    process context).  Delays that sleep (a preemption) take none.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from mqrt.lib import trace
from mqrt.lib.knobs import KnobError
from mqrt.lib.trace import Ev

#: Every injection point: name -> where it is and which window it widens.
POINTS: dict[str, str] = {
    "tag.get.before_sleep": (
        "blk_mq_get_tag(): after the last failed try under prepare_to_wait, before "
        "schedule() (a waker that misses this task here loses the wake-up)"
    ),
    "tag.get.after_fail": (
        "blk_mq_get_tag(): after a failed try, before prepare_to_wait (frees in this "
        "window are not seen by a task that is not yet on the wait queue)"
    ),
    "sbitmap.get.before_fold": (
        "sbitmap_find_bit_in_word(): the word looked full, before the deferred "
        "cleared bits are folded back in (the ::cleared race)"
    ),
    "sbitmap.fold.after_xchg": (
        "sbitmap_deferred_clear(): the cleared mask was taken (xchg), before it is "
        "cleared out of the word"
    ),
    "sbq.clear.before_wake": (
        "sbitmap_queue_clear(): the bit is freed, before ws_active is read and waiters are woken"
    ),
    "sbq.wake.before_reset": (
        "__sbq_wake_up() (legacy): wait_cnt reached 0, before waiters are woken and "
        "wait_cnt is reset to wake_batch"
    ),
    "sbq.wake.before_cnt_reset": (
        "__sbq_wake_up() (legacy): the sleepers were woken, before wake_index moves on "
        "and wait_cnt is reset (the wait queue reads as being reset: wait_cnt 0)"
    ),
    "sbq.batch.between_stores": (
        "sbitmap_queue_update_wake_batch() (legacy): between the store of the new "
        "wake_batch and the reset of every wait_cnt to 1 (a waker reading both in "
        "between sees one old and one new)"
    ),
    "sbq.wake.before_wakeup": (
        "sbitmap_queue_wake_up() (current): a batch was claimed (wakeup_cnt moved), "
        "before the wait queues are woken"
    ),
    "tag.busy.before_recalc": (
        "__blk_mq_tag_busy(): the queue counted itself active, before wake_batch is "
        "recalculated for the new number of users"
    ),
    "tag.active.before_recalc": (
        "__blk_mq_tag_busy()/__blk_mq_tag_idle() before 4f1731df60f9 (the catalogue's "
        "active_queues_unlocked): active_queues was changed, before wake_batch is "
        "recalculated from the new count; at each CPU's first change on a tag map "
        "only (the fixed code counts and recalculates in one critical section)"
    ),
    "rq.timeout.before_deadline_test": (
        "the timeout work of a race entry's old code: a started request's deadline "
        "was read, before the clock is (the request may be ended and reused meanwhile)"
    ),
    "rq.timeout.claimed": (
        "the timeout work of a race entry's old code: it claimed an expired request "
        "(marked it complete), before ->timeout and the claim given back"
    ),
    "rq.complete.before_end": (
        "blk_mq_complete_request(): the request is COMPLETE, before ->complete ends it "
        "and frees its tag"
    ),
}

#: True once any point is armed (the only thing a disarmed point reads).
armed = False
#: Spinning delays take interrupts (see the module docstring).
irqs = False
#: What taking this process's interrupts means (installed by a CPU process; called
#: only while ``irqs`` is on).
irq_hook: Callable[[], None] | None = None
_table: dict[str, tuple[float, int]] = {}
_rng = random.Random(0)
_seed = 0
#: Delays inserted in this process, per point.
hits: dict[str, int] = {}
#: Above this many µs a delay sleeps instead of spinning.
SPIN_MAX_US = 200


def parse(text: str) -> dict[str, tuple[float, int]]:
    """``NAME=PCT:MAX_US,...`` -> {name: (percent, max µs)}, with one-line errors."""
    out: dict[str, tuple[float, int]] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, rest = item.partition("=")
        pct_s, sep2, us_s = rest.partition(":")
        if not sep or not sep2:
            raise KnobError(f"inject: expected NAME=PCT:MAX_US, got {item!r}")
        name = name.strip()
        if name not in POINTS:
            raise KnobError(f"inject: no point {name!r} (points: {', '.join(sorted(POINTS))})")
        try:
            pct, max_us = float(pct_s), int(us_s)
        except ValueError:
            raise KnobError(f"inject: {name}: PCT:MAX_US must be numbers, got {rest!r}") from None
        if not 0 < pct <= 100 or not 1 <= max_us <= 1_000_000:
            raise KnobError(f"inject: {name}: PCT must be in (0, 100] and MAX_US in 1..1000000")
        out[name] = (pct, max_us)
    return out


def configure(
    table: Mapping[str, tuple[float, int]], seed: int = 0, with_irqs: bool = False
) -> None:
    """Arm exactly the points of ``table`` (empty: disarm everything); ``with_irqs``:
    their spinning delays take the CPU's interrupts."""
    global armed, irqs, _seed
    for name in table:
        if name not in POINTS:
            raise KnobError(f"inject: no point {name!r}")
    _table.clear()
    _table.update(table)
    hits.clear()
    _seed = seed
    _rng.seed(seed)
    armed = bool(_table)
    irqs = armed and with_irqs


def seed_cpu(cpu: int) -> None:
    """Give this process (a CPU) its own delay sequence for the run's seed."""
    _rng.seed(_seed * 1_000_003 + cpu + 1)
    hits.clear()


def hit(name: str) -> None:
    """The code reached point ``name``: maybe wait there a while."""
    entry = _table.get(name)
    if entry is None or _rng.random() * 100.0 >= entry[0]:
        return
    us = _rng.randint(1, entry[1])
    hits[name] = hits.get(name, 0) + 1
    if trace.on:
        trace.emit(Ev.INJECT, -1, 0, 0, 0, us)
    if us <= SPIN_MAX_US:
        end = time.perf_counter_ns() + us * 1000
        hook = irq_hook if irqs else None
        while time.perf_counter_ns() < end:
            if hook is not None:
                hook()  # an interrupt arriving while the window is open
    else:
        time.sleep(us / 1e6)
