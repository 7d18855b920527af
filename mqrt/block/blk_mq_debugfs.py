"""Port of ``block/blk-mq-debugfs.c`` (the parts mqrt needs): views of hctxs and
queues with the kernel's key names and flag names, the end-of-run invariant check and
the fair-share report.  For debugging and reports; never imported by the hot path;
the formats may change at any time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mqrt.block.blk_mq_structs import RQ_ALLOCATED, RQ_STATE_MASK, RequestQueue
from mqrt.block.blk_mq_tag import RQS_NONE, TagsSpec
from mqrt.block.elevator import ELEVATOR_NAMES
from mqrt.block.mq_deadline import DeadlineData
from mqrt.lib.cpuhp import CpuhpSpec, CpuhpState
from mqrt.lib.percpu_ref import PercpuRef
from mqrt.lib.shm import Arena


def check_invariants(
    arena: Arena, queues: list[RequestQueue], hotplug: CpuhpSpec | None = None
) -> dict[str, Any]:
    """At the end of a run (every CPU stopped): no tag still allocated, every request
    IDLE and unowned, nr_active back to 0, no reference on a queue but its own,
    lists empty, the elevator whole and empty; with CPU hotplug, no request left on
    an offline CPU's ctx and no hctx INACTIVE while one of its CPUs is online.
    Returns counts and the first few problems found."""
    problems: list[str] = []
    leaked_tags = 0
    busy_rqs = 0
    sets = {id(q.tag_set): q.tag_set for q in queues}
    pools = [(tset.name, tset.rq_region) for tset in sets.values()]
    pools += [(q.name, q.sched_region) for q in queues if q.sched_region is not None]
    for name, region in pools:
        v = arena.view(region)  # type: ignore[arg-type]
        states = v["state"].copy()
        del v
        for rq_id, st in enumerate(states):
            if int(st) & (RQ_ALLOCATED | RQ_STATE_MASK):
                busy_rqs += 1
                if len(problems) < 10:
                    problems.append(f"{name}: request {rq_id} still owned (state {int(st):#x})")
    seen: set[str] = set()  # 5.10 shared sbitmap: every hctx's tags, one bitmap
    for tset in sets.values():
        leaked_tags += _tags_used(arena, tset.tags, seen, problems)
    leaked_sched_tags = 0
    for q in queues:
        leaked_sched_tags += _tags_used(arena, q.sched_tags, seen, problems)
    negative_active = 0
    queue_refs = 0
    elv_queued = 0
    for q in queues:
        # q_usage_counter: the initial reference only (none while frozen and drained)
        ref = PercpuRef(arena, q.q_usage, 0)
        held = ref.outstanding() - (0 if ref.is_dying() else 1)
        if held:
            queue_refs += held
            problems.append(f"{q.name}: q_usage_counter holds {held} references at the end")
        v = arena.view(q.hctx_region)
        for h, nr in enumerate(v["nr_active"]):
            if nr != 0:
                negative_active += int(nr < 0)
                problems.append(f"{q.name}: hctx{h} nr_active={int(nr)} at the end")
        del v
        qv = arena.view(q.header)
        nr = int(qv["nr_active_requests_shared_tags"][0])
        del qv
        if nr != 0:
            negative_active += int(nr < 0)
            problems.append(f"{q.name}: nr_active_requests_shared_tags={nr} at the end")
        if q.dd is not None:  # the elevator: lists whole, nothing left in it
            dd = DeadlineData(arena, q.dd)
            problems += [f"{q.name}: mq-deadline: {p}" for p in dd.check()]
            queued = dd.counters()["queued"]
            dd.close()
            elv_queued += queued
            if queued:
                problems.append(f"{q.name}: mq-deadline holds {queued} requests at the end")
    if hotplug is not None:
        from mqrt.block.blk_mq_cpuhp import stranded

        problems += stranded(arena, queues, CpuhpState(arena, hotplug))
    return {
        "leaked_tags": leaked_tags,
        "leaked_sched_tags": leaked_sched_tags,
        "owned_requests": busy_rqs,
        "nr_active_negative": negative_active,
        "queue_refs": queue_refs,
        "elv_queued": elv_queued,
        "problems": problems,
    }


def _tags_used(
    arena: Arena, specs: Sequence[TagsSpec | None], seen: set[str], problems: list[str]
) -> int:
    """How many tags of ``specs`` are still allocated (each bitmap once), with a
    problem for each bitmap that has some and for each ``tags->rqs[]`` entry still
    naming a scheduler request."""
    a = arena.atomic
    used_all = 0
    for spec in specs:
        if spec is None:  # freed: an hctx no CPU maps
            continue
        for sbq in (spec.bitmap_tags, spec.breserved_tags):
            if sbq is None or sbq.sb.name in seen:
                continue
            seen.add(sbq.sb.name)
            sb = sbq.sb
            used = 0
            for i in range(sb.map_nr):
                word = a.read(sb.words.addr(i, "word")) & ~a.read(sb.words.addr(i, "cleared"))
                used += word.bit_count()
            used_all += used
            if used and len(problems) < 10:
                problems.append(f"{sb.name}: {used} tags still allocated")
        v = arena.view(spec.rqs)
        named = int((v != RQS_NONE).sum())
        del v
        if named and len(problems) < 10:
            problems.append(f"{spec.rqs.name}: {named} driver tags still name a request")
    return used_all


def fair_share_report(arena: Arena, q: RequestQueue) -> list[dict[str, int]]:
    """Per hctx (or per queue with shared tags, in both models: 6.x's
    nr_active_requests_shared_tags, 5.10's nr_active_requests_shared_sbitmap): the
    most requests it ever held."""
    if q.tag_set.shared_tags:
        v = arena.view(q.header)
        out = [{"hctx": -1, "max_active": int(v["max_active"][0])}]
    else:
        v = arena.view(q.hctx_region)
        out = [{"hctx": h, "max_active": int(m)} for h, m in enumerate(v["max_active"])]
    del v
    return out


def elevator_report(arena: Arena, q: RequestQueue) -> dict[str, Any]:
    """The queue's elevator at the end of a run and, for a queue that may have one,
    mq-deadline's counters (``inserted``, ``merged``, ``dispatched``, ``completed``)
    since its last init: the elevator debugfs files' numbers."""
    qv = arena.view(q.header)
    name = ELEVATOR_NAMES.get(int(qv["elevator"][0]), "?")
    del qv
    if q.dd is None:
        return {"name": name}
    dd = DeadlineData(arena, q.dd)
    counters = dd.counters()
    dd.close()
    return {"name": name, **counters}
