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
    decided by counting, not by the clock.  A task asleep on a tag map's wait queue
    (one sleep, told from the next by its ``sleep_seq``) through more of that map's
    frees than any generation of the wake-up algorithm lets pass without waking it:
    every ``wake_batch`` frees wake at least one sleeper, going round the
    ``SBQ_WAIT_QUEUES`` wait queues, so ``SBQ_WAIT_QUEUES x wake_batch x (sleepers on
    the map + 2)`` frees reach every sleeper (a woken task that still cannot take a
    tag, say at its fair share, sleeps again: a new sleep).  The map's frees are
    counted by the block layer's free paths (``frees``, outside the algorithm the
    catalogue swaps).  The bound holds once the wakers have run: while a free is
    still under way (``freeing``, counted around each free's clear and wake-up) it may
    be the one holding the owed wake-up -- a waker that counted a batch down and was
    then kept off the core, which a saturated host does for hundreds of
    milliseconds -- so the verdict waits for a look with no free under way.  And a
    free that finds the wait queue it chose held at 0 by such a waker is counted
    nowhere (every generation before 6.2 drops it; that waker then wakes its own
    queue), so the frees alone do not decide: either no wait queue of the map woke
    anybody meanwhile (then no free was dropped), or the map's wait queues woke tasks
    ``PASSED_BY x SBQ_WAIT_QUEUES x sleepers`` times (counted by the wait queues
    themselves), going round them oldest sleeper first often enough to have reached
    this one; and a later look finds the same sleep after another round of batches
    (``SBQ_WAIT_QUEUES x wake_batch`` frees).  Or, with no frees at all: a task
    asleep on a map with free tags while every CPU process is asleep and nothing
    moved for a while (below): nobody is left to wake it.
``livelock``
    decided by counting, not by the clock.  A CPU that went round retry loops (a
    wake-up that has to look again, a lost cmpxchg, an allocation that folds and
    searches again: each CPU counts these at once in its ``retries``, see
    :mod:`mqrt.lib.retries`) more than ``LIVELOCK_RETRIES_PER_TAG`` times per tag of
    the run's tag maps (at least ``LIVELOCK_RETRIES_MIN``) while no I/O was submitted
    or completed across ``LIVELOCK_CHECKS`` looks, its process running (runnable)
    with its CPU time growing.  The bound: in code without the bug a retry happens
    only because another CPU changed the same word in between -- took or freed a
    tag, consumed or reset a wait queue's count, emptied a wait queue -- and with
    nothing submitted or completed each tag is freed at most once and taken at most
    once more, each such step letting a waker go round the wait queues at most once
    (``SBQ_WAIT_QUEUES x SBQ_WAKE_BATCH + 1`` retries): far below the bound.  A CPU
    the host deschedules does not count; a short legitimate spin stays below the
    bound.  The runtime stops the spinning CPUs itself: they cannot read a message.
``hang``
    no I/O submitted or completed across ``HANG_CHECKS`` looks and at least
    ``hang_s``, while requests hold tags or tasks wait for them, and every CPU
    process is asleep (not runnable) at each of those looks: a CPU the host does
    not schedule, or one still running, is not hung.  A task asleep on a map with
    free tags counts as a lost wake-up above only if it may take one of them:
    what it may take is asked as blk_mq_get_tag() would (its hctx, queue and
    shallow depth are in its wait-queue entry, ``waits_for``): a sleeper whose
    queue is at its fair share of a shared map (hctx_may_queue: its ``nr_active``
    against the map's depth over ``active_queues``, read from shared memory), or
    whose shallow depth leaves it none of the free bits, was not failed by a
    wake-up: nothing it waits for can come, a hang, reported with that reason.

Each finding carries a snapshot taken at once: every tag map in the kernel's debugfs
format (``sbitmap_queue_show``), the sleeping tasks and where they sleep, ``nr_active``
per hctx, and the requests that hold tags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psutil

from mqrt.block.blk_mq_structs import RQ_ALLOCATED, RQ_STATE_MASK, HwCtx, Queue, Request
from mqrt.block.blk_mq_tag import FAIR_SHARE_MIN, Tags, decode_tag_wait_key
from mqrt.block.blk_mq_types import RqState
from mqrt.lib.sbitmap import SBQ_WAIT_QUEUES, SBQ_WAKE_BATCH, Sbitmap, SbitmapQueue
from mqrt.lib.shm import Arena, field_offset
from mqrt.lib.trace import TraceSpec, format_records, last_events, read_all
from mqrt.lib.wait import WAIT_QUEUE_ENTRY, TaskState, Waiters

#: Events per CPU shown next to a finding.
EVENTS_PER_CPU = 24
#: Consecutive looks with no progress (and every CPU asleep) before a hang is called.
HANG_CHECKS = 5
#: Consecutive looks with no progress before a livelock is called, and its bound:
#: retries of one CPU per tag of the run's maps, and at least this many.
LIVELOCK_CHECKS = 5
LIVELOCK_RETRIES_PER_TAG = 4 * (SBQ_WAIT_QUEUES * SBQ_WAKE_BATCH + 1)
LIVELOCK_RETRIES_MIN = 20_000

_QUEUED_ON = field_offset(WAIT_QUEUE_ENTRY, "queued_on")


#: A map's wake-ups, in rounds of SBQ_WAIT_QUEUES per sleeper, that reach every sleeper:
#: each round wakes the oldest sleeper of every wait queue with one, so a sleeper with
#: others ahead of it on its queue is woken within as many rounds; twice that, as a
#: waker kept off the core may store a stale wake index.
PASSED_BY = 2


class _Since(NamedTuple):
    """A sleep's map when the sleep was first seen."""

    frees: int  #: the map's frees
    wakeups: int  #: wake-ups that woke somebody on the map's wait queues


@dataclass
class Finding:
    detector: str
    message: str
    at_s: float  #: seconds after the I/O started
    snapshot: dict[str, Any] = field(default_factory=dict)
    #: CPUs caught spinning (livelock): they will not read a message, the runtime
    #: stops them
    spinning: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "detector": self.detector,
            "message": self.message,
            "at_s": self.at_s,
            "snapshot": self.snapshot,
        }
        if self.spinning:
            out["spinning"] = self.spinning
        return out


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
        pids: list[int] | None = None,
        hang_s: float = 1.0,
        trace: TraceSpec | None = None,
    ):
        self.arena = arena
        self.a = arena.atomic
        self.hang_s = hang_s
        self.trace = trace
        self._procs = [psutil.Process(pid) for pid in pids or ()]
        self.waiters = Waiters(arena, wspec, eventfds, None)
        self.nr_waiters = wspec.nr_waiters
        self.nr_cpus = nr_cpus  #: waiter slots past them are the sysfs writer's
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
        #: wait-queue head -> (map, its name, the sbitmap_queue it belongs to)
        self._ws_of: dict[int, tuple[_Map, str, SbitmapQueue]] = {}
        for m in self.maps:
            for kind, bt in (("bitmap_tags", m.tags.bitmap_tags),
                             ("breserved_tags", m.tags.breserved_tags)):  # fmt: skip
                if bt is not None:
                    for i, ws in enumerate(bt.ws):
                        self._ws_of[ws.head] = (m, f"{kind} ws[{i}]", bt)
        #: each sleep seen: (slot, sleep_seq) -> its map's frees when first seen
        self._first_seen: dict[tuple[int, int], _Since] = {}
        #: sleeps that met the lost wake-up's counts at a look: the frees seen then
        self._suspects: dict[tuple[int, int], int] = {}
        self.t0 = time.monotonic()
        self._progress = -1
        self._progress_at = self.t0
        self._flat_looks = 0
        #: livelock: each CPU's retries when progress was last seen, and its CPU
        #: time at the first look without progress
        self._retries_base: list[int] = []
        self._cpu_time_base: list[float | None] = []
        nr_tags = 0
        for m in self.maps:
            for bt in (m.tags.bitmap_tags, m.tags.breserved_tags):
                if bt is not None:
                    nr_tags += bt.sb.depth
        self.livelock_bound = max(LIVELOCK_RETRIES_MIN, LIVELOCK_RETRIES_PER_TAG * nr_tags)

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
        return [
            {
                "cpu": slot,
                "task": f"cpu{slot}" if slot < self.nr_cpus else "sysfs writer (cpu0)",
                "queued_on": self._where(head),
            }
            for slot, head in self.waiters.asleep()
        ]

    def _where(self, head: int) -> str:
        where = self._ws_of.get(head)
        if where is not None:
            return f"{where[0].name} {where[1]}"
        return f"wait queue @{head:#x}" if head else "no wait queue"

    def _sleeps(self) -> dict[tuple[int, int], tuple[_Since, tuple[_Map, str, SbitmapQueue], int]]:
        """Every sleep on a tag map's wait queue going on now, by (slot, sleep_seq):
        the map's counts when the sleep was first seen (:class:`_Since`), where it
        sleeps, and the map's wake-ups now."""
        a, w = self.a, self.waiters
        seen = {}
        for slot in range(self.nr_waiters):
            entry = w.entry(slot)
            if a.read32(entry + w._state) != TaskState.UNINTERRUPTIBLE:
                continue
            where = self._ws_of.get(a.read(entry + _QUEUED_ON))
            if where is None:
                continue
            bt = where[2]
            wakeups = sum(ws.wakeups for ws in bt.ws) & 0xFFFFFFFF
            key = (slot, a.read32(entry + w._sleep_seq))
            since = self._first_seen.get(key) or _Since(bt.frees, wakeups)
            seen[key] = (since, where, wakeups)
        self._first_seen = {k: v[0] for k, v in seen.items()}
        return seen

    def _cpus_asleep(self) -> list[str] | None:
        """Each CPU process's scheduling state if none is runnable (all blocked or
        stopped), else None: a runnable CPU may still make progress, however long
        the host keeps it off a core."""
        states = []
        for p in self._procs:
            try:
                st = p.status()
            except psutil.Error:
                st = "gone"
            if st == psutil.STATUS_RUNNING:
                return None
            states.append(st)
        return states

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
        asleep = self._sleeps()
        self._suspects = {k: v for k, v in self._suspects.items() if k in asleep}
        by_map: dict[int, int] = {}
        for _since, where, _wakeups in asleep.values():
            by_map[id(where[2])] = by_map.get(id(where[2]), 0) + 1
        for (slot, seq), (since, (m, label, bt), wakeups_now) in asleep.items():
            wake_batch = max(1, bt.wake_batch)
            bound = SBQ_WAIT_QUEUES * wake_batch * (by_map[id(bt)] + 2)
            frees = (bt.frees - since.frees) & 0xFFFFFFFF
            wakeups = (wakeups_now - since.wakeups) & 0xFFFFFFFF
            # ``freeing`` read after ``frees``: 0 means every free counted has returned
            # from its wake-up.  A free still under way may be the waker that owes
            # this sleeper its wake-up (counted a batch down, then kept off the core
            # by the host): no verdict until it returns.  And frees a waker could not
            # count (the wait queue it chose held at 0 by another waker, which then
            # wakes that queue) are lost to every sleeper: so either no wait queue of
            # the map woke anybody meanwhile, or the map's wake-ups went round its
            # wait queues, oldest sleeper first on each, often enough to have reached
            # this one.
            passed_by = wakeups >= PASSED_BY * SBQ_WAIT_QUEUES * by_map[id(bt)]
            if not (frees >= bound and not bt.freeing and (wakeups == 0 or passed_by)):
                continue
            # And it lasts: a later look finds the same sleep still there after another
            # round of batches (SBQ_WAIT_QUEUES x wake_batch frees) went by.  A waker
            # kept off the core in the middle of the algorithm's slow path can leave
            # the counts above short for a moment; it cannot keep the sleep going.
            first = self._suspects.setdefault((slot, seq), frees)
            if frees - first >= SBQ_WAIT_QUEUES * wake_batch:
                evidence = (
                    f"while the map's wait queues woke tasks {wakeups} times"
                    if wakeups
                    else "while no wait queue of the map woke anybody"
                )
                return Finding(
                    "lost_wakeup",
                    f"cpu{slot} asleep on {m.name} {label} through {frees} frees of that "
                    f"map with no wake-up reaching it, {evidence} (any generation wakes "
                    f"every sleeper within {bound}: {SBQ_WAIT_QUEUES} wait queues x "
                    f"wake_batch={wake_batch} x ({by_map[id(bt)]} sleepers + 2)); "
                    f"{self._free_tags(m)} tags free now",
                    at,
                )
        busy_total = 0
        for m in self.maps:
            busy_total += sum(1 for rq in m.rqs if self.a.read(rq.base) & RQ_ALLOCATED)
        progress = self._sum_stat("completed") + self._sum_stat("submitted")
        if progress != self._progress:
            self._progress, self._progress_at, self._flat_looks = progress, now, 0
            self._retries_base = self.retries()
            return None
        self._flat_looks += 1
        livelock = self._livelock(at)
        if livelock is not None:
            return livelock
        if not (busy_total or asleep):
            return None
        if self._flat_looks < HANG_CHECKS or now - self._progress_at < self.hang_s:
            return None
        states = self._cpus_asleep()
        if states is None:
            return None  # a CPU is runnable: it may yet move (or the host starves it)
        flat = f"{self._flat_looks} looks ({now - self._progress_at:.2f} s)"
        cpus = ", ".join(f"cpu{i} {st}" for i, st in enumerate(states))
        held_back = []  # sleepers on free tags that they may not take
        for (slot, _seq), (_since, (m, label, bt), _others) in asleep.items():
            free = _free_bits(bt.sb, 0)
            if not free:
                continue
            why = self._held_back(slot, bt is m.tags.breserved_tags, bt)
            if why is None:
                return Finding(
                    "lost_wakeup",
                    f"cpu{slot} asleep on {m.name} {label} while {free} tags are free, "
                    f"every CPU is asleep ({cpus}) and nothing moved for {flat}: no free "
                    f"is left to wake it",
                    at,
                )
            held_back.append(f"cpu{slot} on {m.name} {label} ({free} tags free): {why}")
        if held_back:
            return Finding(
                "hang",
                f"no I/O submitted or completed for {flat}, every CPU asleep ({cpus}), "
                f"and no sleeper may take a free tag: " + "; ".join(held_back),
                at,
            )
        return Finding(
            "hang",
            f"no I/O submitted or completed for {flat} with {busy_total} request(s) "
            f"holding tags and {len(asleep)} task(s) waiting for tags, every CPU asleep "
            f"({cpus})",
            at,
        )

    def _held_back(self, slot: int, reserved: bool, bt: SbitmapQueue) -> str | None:
        """Why the task asleep in ``slot`` may take none of its map's free tags, as
        blk_mq_get_tag() would try them; None if it may take one (or what it waits
        for is unknown).  Reserved tags are not shared out and have no shallow
        depth; a normal tag needs hctx_may_queue() (a shared map's fair share) and
        a free bit below the shallow depth, if any."""
        key = self.waiters.waits_for(slot)
        if key < 0 or reserved:
            return None
        q, h, shallow = decode_tag_wait_key(key)
        if q >= len(self.queue_views) or h >= len(self.queue_views[q].hctxs):
            return None
        qv = self.queue_views[q]
        hctx = qv.hctxs[h]
        if qv.shared and hctx.tags is not None:
            limit = _fair_share_limit(self.a, hctx, hctx.tags)
            if limit is not None:
                share, nr, users, depth = limit
                return (
                    f"hctx{h} of {qv.q.name} at its fair share {share} of {depth} with "
                    f"{nr} active ({users} active queues) and {self._in_flight(q)} of its "
                    f"requests holding tags"
                )
        if shallow and not _free_bits(bt.sb, shallow, bt.legacy):
            return (
                f"hctx{h} of {qv.q.name} held to a shallow depth of {shallow}, with no "
                f"free tag below it"
            )
        return None

    def _in_flight(self, q: int) -> int:
        """Requests of queue ``q`` holding tags now (the map may be shared)."""
        n = 0
        for m in self.maps:
            for rq in m.rqs:
                if self.a.read(rq.base) & RQ_ALLOCATED and rq.setup()[7] == q:
                    n += 1
        return n

    def retries(self) -> list[int]:
        """Each CPU's retries so far (what it published at once)."""
        return [self.a.read(o.retries) for o in self.stats]

    def _cpu_time(self, i: int) -> float | None:
        if i >= len(self._procs):
            return None
        try:
            t = self._procs[i].cpu_times()
        except psutil.Error:
            return None
        return t.user + t.system

    def _livelock(self, at: float) -> Finding | None:
        """CPUs spinning in retry loops while nothing is submitted or completed
        (see the module docstring); called at each look without progress."""
        if self._flat_looks == 1:
            self._cpu_time_base = [self._cpu_time(i) for i in range(len(self.stats))]
        if self._flat_looks < LIVELOCK_CHECKS or not self._retries_base:
            return None
        grown = [n - base for n, base in zip(self.retries(), self._retries_base, strict=True)]
        if max(grown) < self.livelock_bound:
            return None
        spinning = []
        for i, n in enumerate(grown):
            if n <= 0:
                continue
            try:
                running = self._procs[i].status() == psutil.STATUS_RUNNING if self._procs else True
            except psutil.Error:
                running = False
            t0, t1 = self._cpu_time_base[i], self._cpu_time(i)
            if running and (t0 is None or t1 is None or t1 > t0):
                spinning.append(i)
        over = [i for i in spinning if grown[i] >= self.livelock_bound]
        if not over:
            return None
        cpus = ", ".join(f"cpu{i} {grown[i]:,}" for i in spinning)
        return Finding(
            "livelock",
            f"retry loops spinning with no I/O submitted or completed for {self._flat_looks} "
            f"looks: {cpus} times round (bound {self.livelock_bound:,}: "
            f"{LIVELOCK_RETRIES_PER_TAG} per tag), each running with its CPU time growing",
            at,
            spinning=spinning,
        )

    def _free_tags(self, m: _Map) -> int:
        busy = sum(1 for rq in m.rqs if self.a.read(rq.base) & RQ_ALLOCATED)
        busy += m.tags.nr_sched_held()  # driver tags scheduler requests hold
        return m.tags.bitmap_tags.sb.depth - busy

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


def _fair_share_limit(a, hctx: HwCtx, tags: Tags) -> tuple[int, int, int, int] | None:
    """hctx_may_queue() read from shared memory: (share, nr_active, active users,
    depth) when ``hctx``'s user is at or over its fair share of the map, else None.
    The same rule as :meth:`~mqrt.block.blk_mq_tag.Tags.may_queue`, kept here so a
    catalogue entry that swaps that method does not change the verdict."""
    depth = tags.bitmap_tags.sb.depth
    if depth == 1 or not a.test_bit(hctx.active_off, hctx.active_bit):
        return None
    users = tags.active_queues
    if users <= 1:
        return None
    share = max((depth + users - 1) // users, FAIR_SHARE_MIN)
    nr = _s32(a.read32(hctx.nr_active_off))
    return (share, nr, users, depth) if nr >= share else None


def _free_bits(sb: Sbitmap, shallow: int, legacy: bool = False) -> int:
    """Bits of ``sb`` free now (set bits pending a deferred clear count as free),
    below a shallow depth if ``shallow``: spread over the words as the current
    sbitmap_get_shallow() does, or per word (``legacy``, <= 6.1)."""
    a = sb.a
    free = 0
    for i in range(sb.map_nr):
        depth = sb.map_depth(i)
        if shallow:
            depth = min(depth, shallow) if legacy else sb.map_depth_with_shallow(i, shallow)
        busy = a.read(sb._word[i]) & ~a.read(sb._cleared[i])
        free += ((1 << depth) - 1 & ~busy).bit_count()
    return free
