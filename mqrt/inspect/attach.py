"""A read-only attach to a live run: its segment mapped ``PROT_READ``, its manifest
read back, and the block layer's own handles made over that mapping.

Nothing here can change the run: the mapping cannot be written (a store would
fault, and the mapping's :class:`~mqrt.lib._atomic.AtomicView` refuses every write
before it is tried), no lock a CPU takes is taken (lists and counters are read
without their locks, as a seqcount reader does: read, read again, keep what did not
move), and the segment is never unlinked.  When the run ends its owner unlinks the
segment; this mapping still reads the run's last state, and :meth:`RunView.ended`
says so.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from mqrt.block.blk_mq_map import map_swqueue, read_map
from mqrt.block.blk_mq_structs import Queue, RequestQueue, RqList, TagSet
from mqrt.block.blk_mq_tag import Tags
from mqrt.errors import UsageError
from mqrt.lib.shm import SHM_DIR, Arena, list_segments, owner_alive, segment_owner
from mqrt.lib.wait import Waiters
from mqrt.runtime import manifest
from mqrt.runtime.manifest import Manifest, ManifestError, RunPhase, Superblock


def resolve(run: str) -> str:
    """The segment a user's RUN names: a segment name (with or without /dev/shm/), an
    owner pid, or a unique start of a segment name.  A one-line UsageError
    otherwise."""
    name = run.removeprefix(SHM_DIR + "/")
    segments = list_segments()
    if name in segments:
        return name
    if name.isdigit():
        mine = [s for s in segments if segment_owner(s) == int(name)]
        if len(mine) == 1:
            return mine[0]
        if len(mine) > 1:
            raise UsageError(f"RUN: pid {name} owns {len(mine)} runs: {', '.join(mine)}")
    starting = [s for s in segments if s.startswith(name)]
    if len(starting) == 1:
        return starting[0]
    if not starting:
        if segment_owner(name) is not None:
            raise UsageError(f"RUN: run {name} has ended (or never was on this host)")
        raise UsageError(f"RUN: no run {run!r} on this host (`mqrt inspect` lists them)")
    raise UsageError(f"RUN: {run!r} names {len(starting)} runs: {', '.join(starting)}")


class RunView:
    """One inspector's view of a run (``with RunView(name) as v: ...``)."""

    def __init__(self, name: str):
        self.name = name
        try:
            self.arena = Arena.open_readonly(name)
        except FileNotFoundError:
            raise UsageError(f"RUN: run {name} has ended") from None
        except PermissionError:
            raise UsageError(f"RUN: {name} is another user's run (its segment is 0600)") from None
        try:
            self.sb: Superblock = manifest.read_superblock(self.arena)
            self.manifest: Manifest = manifest.load(self.arena)
        except ManifestError as exc:
            self.arena.close()
            raise UsageError(f"RUN: {exc}") from None
        m = self.manifest
        self.arena.layout = m.layout
        if m.layout.size > self.arena.atomic.nbytes:
            self.arena.close()
            raise UsageError(f"RUN: {name} is smaller than its manifest says")
        # a waiter table that never wakes anyone (no eventfds: -1 each)
        self.waiters = Waiters(self.arena, m.waiters, [-1] * m.waiters.nr_waiters, None)
        self.queues: list[RequestQueue] = m.queues
        self._tags: dict[int, list[Tags | None]] = {}
        self.handles: list[Queue] = []
        for q in m.queues:
            tags = self.set_tags(q.tag_set)
            self.handles.append(Queue(self.arena, q, tags, 0, self.waiters))
        self.refresh_map()

    def set_tags(self, tset: TagSet) -> list[Tags | None]:
        """The tag set's tags, one handle each (made once per set)."""
        got = self._tags.get(id(tset))
        if got is None:
            got = [None if s is None else Tags(self.arena, s, self.waiters, 0) for s in tset.tags]
            self._tags[id(tset)] = got
        return got

    def refresh_map(self) -> None:
        """Each tag set's CPU -> hctx map as the arena has it now (a live
        ``nr_hw_queues`` write changes it), into this view's copies."""
        seen: set[int] = set()
        for q in self.queues:
            tset = q.tag_set
            if tset.map_region is not None and id(tset) not in seen:
                seen.add(id(tset))
                read_map(self.arena.atomic, tset)
            q.nr_hw_queues = tset.nr_hw_queues
            map_swqueue(q)

    def superblock(self) -> Superblock:
        """The superblock now (phase, times)."""
        self.sb = manifest.read_superblock(self.arena)
        return self.sb

    @property
    def phase(self) -> RunPhase:
        return self.superblock().phase

    def ended(self) -> bool:
        """Whether the run is over: its owner is gone or its segment was unlinked."""
        return not os.path.exists(os.path.join(SHM_DIR, self.name)) or not owner_alive(self.name)

    def counters(self, region: str) -> Any:
        """A copy of a per-CPU counter region's numpy view (relaxed reads)."""
        v = self.arena.view(region)
        try:
            return v.copy()
        finally:
            del v

    def close(self) -> None:
        for h in self.handles:
            with contextlib.suppress(Exception):
                h.close()
        self.arena.close()

    def __enter__(self) -> RunView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peek(lst: RqList, tries: int = 8) -> list[int]:
    """The ids on an rq list, read without its lock: head, the ids, head and tail
    again; kept once two reads of head and tail agree (a seqcount's read side; the
    list's head and tail only move forward, but for an insert at the head). A list
    that keeps moving gives its last read."""
    a = lst.a
    ids: list[int] = []
    for _ in range(tries):
        head, tail = a.read(lst.head_off), a.read(lst.tail_off)
        n = max(0, min(tail - head, lst.spec.capacity))
        ids = [lst._ids[(head + i) & lst._mask] for i in range(n)]
        if a.read(lst.head_off) == head and a.read(lst.tail_off) == tail:
            break
    return ids
