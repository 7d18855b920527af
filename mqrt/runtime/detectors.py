"""Online detectors: the runtime's watch over a run's shared state, for ``mqrt race``
(and any run that asks for it).

The owner process looks at the arena about ten times a second, without taking any
lock a CPU takes, and reports the first of these it sees:

``violation``
    a CPU found a broken invariant on its own path: a tag handed out while its
    request was owned (a tag owned twice), a request ended in a state it cannot be
    ended in (a freed request used), ``nr_active`` below zero.  CPUs count these in
    their shared counters at once.  With 5.10's shared sbitmap, where a tag names a
    request in each hctx's pool, the owner also finds a tag held by requests of two
    hctxs at once.
``double_completion``
    a completion found its request already completed or of another generation (a
    request completed twice, or a stale one used); CPUs publish these counts every
    50 ms.
``nr_active_negative``
    an hctx's (or queue's) ``nr_active`` word is below zero.
``lost_wakeup``
    one sleep of a task on a tag map's wait queue has lasted ``lost_wakeup_s`` while
    at least ``wake_batch`` tags are free (a whole batch was freed after the map
    was last full, so the task should have been woken), or while some are free and
    none is in use (no free will ever come to wake it).  A sleep is told from the
    next by the sleeper's ``sleep_seq``.
``hang``
    no I/O submitted or completed anywhere for ``hang_s`` while requests are in
    flight or tasks wait for tags.

Each finding carries a snapshot taken at once: every tag map in the kernel's debugfs
format (``sbitmap_queue_show``), the sleeping tasks and where they sleep, ``nr_active``
per hctx, and the requests that hold tags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mqrt.block.blk_mq_structs import RQ_ALLOCATED, RQ_STATE_MASK, Queue, Request
from mqrt.block.blk_mq_tag import Tags
from mqrt.block.blk_mq_types import RqState
from mqrt.lib.shm import Arena, field_offset
from mqrt.lib.trace import TraceSpec, format_records, last_events, read_all
from mqrt.lib.wait import WAIT_QUEUE_ENTRY, TaskState, Waiters

#: Events per CPU shown next to a finding.
EVENTS_PER_CPU = 24

_QUEUED_ON = field_offset(WAIT_QUEUE_ENTRY, "queued_on")


@dataclass
class Finding:
    detector: str
    message: str
    at_s: float  #: seconds after the I/O started
    snapshot: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector,
            "message": self.message,
            "at_s": self.at_s,
            "snapshot": self.snapshot,
        }


class _Map:
    """One tag map (a struct blk_mq_tags; with 5.10's shared sbitmap, the set's
    bitmaps) and the requests of its tags (of every hctx's pool sharing them)."""

    def __init__(self, name: str, tags: Tags, rqs: list[Request], shared: bool = False):
        self.name = name
        self.tags = tags
        self.rqs = rqs
        #: 5.10 shared sbitmap: ``rqs`` are several hctxs' pools, a tag names one
        #: request in each, and at most one of them may hold it
        self.shared = shared


class Monitor:
    """The detectors over one run's arena (built in the owner once the CPUs exist)."""

    def __init__(
        self,
        arena: Arena,
        queues: list,
        wspec,
        eventfds: list[int],
        cpu_stats,
        nr_cpus: int,
        *,
        hang_s: float = 1.0,
        lost_wakeup_s: float = 0.3,
        trace: TraceSpec | None = None,
    ):
        self.arena = arena
        self.a = arena.atomic
        self.hang_s = hang_s
        self.lost_wakeup_s = lost_wakeup_s
        self.trace = trace
        self.waiters = Waiters(arena, wspec, eventfds, None)
        self.nr_waiters = wspec.nr_waiters
        self.stats = [cpu_stats.offsets(i) for i in range(nr_cpus)]
        self.maps: list[_Map] = []
        self.queue_views: list[Queue] = []
        by_set: dict[int, list[Tags | None]] = {}
        for q in queues:
            tset = q.tag_set
            if id(tset) not in by_set:
                tags = [None if s is None else Tags(arena, s, self.waiters, 0) for s in tset.tags]
                by_set[id(tset)] = tags
                shared: _Map | None = None  # 5.10 shared sbitmap: one map, every hctx's rqs
                for i, t in enumerate(tags):
                    if t is None:  # an hctx no CPU maps: freed
                        continue
                    rqs = [
                        Request(arena, tset.rq_region, t.rq_base + tag, t, tag, tset.timeout_ns)
                        for tag in range(t.nr_tags)
                    ]
                    if tset.shared_sbitmap:
                        if shared is None:
                            shared = _Map(f"{tset.name}/shared_sbitmap", t, [], True)
                            self.maps.append(shared)
                        shared.rqs += rqs
                        continue
                    label = f"{tset.name}/tags{i}" if len(tags) > 1 else tset.name
                    self.maps.append(_Map(label, t, rqs))
            self.queue_views.append(Queue(arena, q, by_set[id(tset)], 0))
        self._ws_of = {
            ws.head: (m, f"bitmap_tags ws[{i}]")
            for m in self.maps
            for i, ws in enumerate(m.tags.bitmap_tags.ws)
        }
        self._first_seen: dict[tuple[int, int], float] = {}
        self.t0 = time.monotonic()
        self._progress = -1
        self._progress_at = self.t0

    def close(self) -> None:
        """Let go of every view into the arena (before it is unmapped)."""
        for qv in self.queue_views:
            qv.close()
        for m in self.maps:
            for rq in m.rqs:
                if rq.pdu is not None:
                    rq.pdu.release()
        self.maps.clear()
        self.queue_views.clear()

    # -- what the CPUs published ------------------------------------------------------------

    def _sum_stat(self, name: str) -> int:
        return sum(self.a.read(getattr(o, name)) for o in self.stats)

    def sleeping(self) -> list[dict[str, Any]]:
        """Tasks asleep (TASK_UNINTERRUPTIBLE) and the wait-queue head they are on."""
        out = []
        for slot in range(self.nr_waiters):
            entry = self.waiters.entry(slot)
            if self.a.read32(entry + self.waiters._state) == TaskState.UNINTERRUPTIBLE:
                out.append({"cpu": slot, "queued_on": self._where(self.a.read(entry + _QUEUED_ON))})
        return out

    def _where(self, head: int) -> str:
        where = self._ws_of.get(head)
        if where is not None:
            return f"{where[0].name} {where[1]}"
        return f"wait queue @{head:#x}" if head else "no wait queue"

    def _sleeps(self, now: float) -> dict[tuple[int, int], tuple[float, tuple]]:
        """Every sleep on a tag map's wait queue going on now, by (slot, sleep_seq):
        since when it has been seen, and on which map and wait state."""
        a, w = self.a, self.waiters
        seen = {}
        for slot in range(self.nr_waiters):
            entry = w.entry(slot)
            if a.read32(entry + w._state) != TaskState.UNINTERRUPTIBLE:
                continue
            where = self._ws_of.get(a.read(entry + _QUEUED_ON))
            if where is None:
                continue
            key = (slot, a.read32(entry + w._sleep_seq))
            seen[key] = (self._first_seen.get(key, now), where)
        self._first_seen = {k: v[0] for k, v in seen.items()}
        return seen

    # -- checks --------------------------------------------------------------------------------

    def check(self) -> Finding | None:
        """Run every detector once; the first finding, with its snapshot."""
        now = time.monotonic()
        found = self._check(now)
        if found is not None:
            found.snapshot = self.snapshot()
        return found

    def _check(self, now: float) -> Finding | None:
        at = now - self.t0
        v = self._sum_stat("violations")
        if v:
            return Finding("violation", f"{v} invariant violation(s) reported by the CPUs", at)
        stale = self._sum_stat("stale")
        if stale:
            return Finding(
                "double_completion",
                f"{stale} completion(s) of a request already completed or of another generation",
                at,
            )
        for qv in self.queue_views:
            for h in qv.hctxs:
                nr = self.a.read32(h.nr_active_off)
                if nr >= 1 << 31:
                    return Finding(
                        "nr_active_negative",
                        f"{qv.q.name} hctx{h.index}: nr_active = {nr - (1 << 32)}",
                        at,
                    )
        for m in self.maps:
            if m.shared:
                held_twice = self._held_twice(m, at)
                if held_twice is not None:
                    return held_twice
        busy_total = 0
        waiting_total = 0
        asleep = self._sleeps(now)
        for m in self.maps:
            bt = m.tags.bitmap_tags
            busy = sum(1 for rq in m.rqs if self.a.read(rq.base) & RQ_ALLOCATED)
            busy_total += busy
            waiting_total += any(ws.active() for ws in bt.ws)
            depth = bt.sb.depth
            free = depth - busy
            wake_batch = bt.wake_batch
            # A sleep that enough frees should have ended: at least wake_batch tags
            # free (a whole batch was freed after the map was last full), or some
            # free and none in use (no free will ever come again).
            if free < max(1, wake_batch) and busy:
                continue
            for (slot, _seq), (since, where) in asleep.items():
                if where[0] is m and now - since >= self.lost_wakeup_s:
                    return Finding(
                        "lost_wakeup",
                        f"cpu{slot} asleep for a tag on {m.name} {where[1]} for "
                        f"{now - since:.2f} s while {free} of {depth} tags are free "
                        f"({busy} in use, wake_batch={wake_batch})",
                        at,
                    )
        progress = self._sum_stat("completed") + self._sum_stat("submitted")
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        elif (busy_total or waiting_total) and now - self._progress_at >= self.hang_s:
            return Finding(
                "hang",
                f"no I/O submitted or completed for {now - self._progress_at:.2f} s with "
                f"{busy_total} request(s) holding tags and tasks waiting on "
                f"{waiting_total} tag map(s)",
                at,
            )
        return None

    def _held_twice(self, m: _Map, at: float) -> Finding | None:
        """A tag of a shared sbitmap held by two requests (of two hctxs' pools) at
        once.  A request's state word leaves ALLOCATED before its tag is freed and
        gains it after its tag is taken, so two held at one instant is a real
        violation; the scan is not one instant, so the first holder's word is read
        again after the second's: unchanged (its generation too), it held the tag
        all along."""
        a = self.a
        first: dict[int, tuple[Request, int]] = {}
        for rq in m.rqs:
            st = a.read(rq.base)
            if not st & RQ_ALLOCATED:
                continue
            seen = first.get(rq.tag)
            if seen is None:
                first[rq.tag] = (rq, st)
            elif a.read(seen[0].base) == seen[1]:
                return Finding(
                    "violation",
                    f"{m.name}: tag {rq.tag} held by requests {seen[0].id} and {rq.id} at once",
                    at,
                )
            else:
                first[rq.tag] = (rq, st)
        return None

    # -- the report's state --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The state worth reading next to a finding, in debugfs shapes."""
        a = self.a
        maps = {}
        for m in self.maps:
            held = []
            for rq in m.rqs:
                st = a.read(rq.base)
                if st & RQ_ALLOCATED:
                    held.append(
                        {"tag": rq.tag, "state": RqState(st & RQ_STATE_MASK).name, "gen": st >> 8}
                    )
            maps[m.name] = {"tags": m.tags.show(), "held": held}
        hctxs = [
            {
                "queue": qv.q.name,
                "hctx": h.index,
                "nr_active": _s32(a.read32(h.nr_active_off)),
                "state": a.read(h.state_off),
            }
            for qv in self.queue_views
            for h in qv.hctxs
        ]
        out = {"maps": maps, "sleeping": self.sleeping(), "hctx": hctxs}
        if self.trace is not None:
            # every event is published as it is written: a hung CPU's last events
            # are all there
            recent = last_events(read_all(self.arena, self.trace), EVENTS_PER_CPU)
            out["events"] = format_records(recent)
        return out


def _s32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v
