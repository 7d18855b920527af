"""Bugs in counting the active users of a shared tag map (``active_queues``) and
sizing ``wake_batch`` from that count.

``active_queues_unlocked`` runs on the ``current`` (v6.6) sbitmap although the bug
lived in kernels with the 6.1 wake-up: with ``--sbitmap legacy`` the same scenario's
fixed code made the lost-wakeup detector fire twice (after about 220,000 and 450,000
requests): a CPU over its fair share kept being woken and put back to sleep while the
7 requests it had allocated sat IDLE, not dispatched, after its plug was flushed
from io_schedule().  That is not this bug and was left alone here.
"""

from __future__ import annotations

from mqrt.block.blk_mq_tag import Tags
from mqrt.lib import inject, trace
from mqrt.lib.sbitmap import UINT_MAX
from mqrt.lib.trace import Ev
from mqrt.race.entry import Bug, Scenario

# -- 4f1731df60f9: wake_batch recalculated from a stale count of users -----------------------


def _update_active_unlocked(self: Tags, delta: int) -> int:
    """__blk_mq_tag_busy()/__blk_mq_tag_idle() from 180dccb0dba4 until 4f1731df60f9
    (6.5), as in v6.1: active_queues was an atomic_t, changed with atomic_inc_return() /
    atomic_dec_return(), and blk_mq_update_wake_batch() ran afterwards with the
    value returned, outside any lock: a busy or idle of another queue could come in
    between, and the last one to recalculate won, whatever its count."""
    old = self.a.fetch_add32(self._active_queues, delta)  # fully ordered, as the kernel's
    users = _s32(old + delta)
    if trace.on:
        trace.emit(Ev.TAG_BUSY if delta > 0 else Ev.TAG_IDLE, -1, 0, self.index, 0, users)
    if inject.armed:
        _hold_up_first_change(self)
    self.update_wake_batch(users)
    return users


#: The Tags handles of this process (a CPU) whose first change was held up.
_held_up: set[int] = set()


def _hold_up_first_change(tags: Tags) -> None:
    """Injection point ``tag.active.before_recalc``, at this CPU's first change of
    active_queues on a tag map only: a CPU's changes come one after another, so
    holding every one up would only slow that CPU's sequence down, while the race
    is between the first changes of CPUs starting together."""
    if id(tags) not in _held_up:
        _held_up.add(id(tags))
        inject.hit("tag.active.before_recalc")


def _s32(v: int) -> int:
    v &= UINT_MAX
    return v - (1 << 32) if v & 0x80000000 else v


ACTIVE_QUEUES_UNLOCKED = Bug(
    name="active_queues_unlocked",
    commit="4f1731df60f9",
    subject="blk-mq: fix potential io hang by wrong 'wake_batch'",
    what="two queues going busy at once: wake_batch is left sized for the smaller "
    "count of users, above the fair share, and the queue over its share is never woken",
    explanation=(
        "With shared tags, each queue that goes busy adds itself to the tag map's "
        "active_queues and recalculates wake_batch for the new number of users "
        "(180dccb0dba4), so that a queue held to its fair share can still free a whole "
        "batch. The count was an atomic and the recalculation ran after it, unlocked: "
        "when queues went busy at the same time, one that counted itself first (1 "
        "user) could recalculate last, leaving wake_batch sized for the whole map (8) "
        "while 10 queues were active and each may hold only 7 tags. The queue over its "
        "share then sleeps for 8 frees its own 7 tags in flight cannot make, once the "
        "others are quiet. The fix changes the count and recalculates under tags->lock. "
        "Scenario: 10 null_blk devices sharing 64 tags, all going busy at the start, "
        "on the v6.6 sbitmap with this fix reverted (the bug does not depend on the "
        "wake-up scheme; on 6.1's, the fixed code of this scenario tripped the "
        "lost-wakeup detector twice in about 700,000 requests, see the module "
        "docstring); devices 1-9 do a short burst and stay active, device 0 keeps 32 "
        "I/Os queued per CPU. The two CPUs "
        "start about as the queues go busy: each one's first recalculation after "
        "counting is held up (injected, up to 100 ms), so that the other CPU's queues "
        "can go busy in between."
    ),
    scenario=Scenario(
        given={
            "sbitmap": "current",
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
        inject={"tag.active.before_recalc": (100.0, 100_000)},
        attempt_s=1.5,
    ),
    patches=((Tags, "_update_active", _update_active_unlocked),),
    window=(
        "one CPU between its change of active_queues and its recalculation of wake_batch "
        "from the count it read; another CPU's change and recalculation landing inside "
        "it, so the last stored wake_batch is from a stale count"
    ),
)


ENTRIES = (ACTIVE_QUEUES_UNLOCKED,)
