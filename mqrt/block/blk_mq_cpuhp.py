"""blk-mq's CPU hotplug callbacks (``blk_mq_hctx_notify_offline()``,
``blk_mq_hctx_notify_dead()``, ``blk_mq_hctx_notify_online()`` of ``block/blk-mq.c``,
Linux 6.1) and the ``cpuN/online`` write that runs them (:mod:`mqrt.lib.cpuhp`).

*Offline* (the CPU is still in the online mask, its task already told to move): for
every hctx whose last online CPU it is, ``BLK_MQ_S_INACTIVE``: no tag is handed out
from it any more (a task that takes one sees the bit after the tag's atomic get, gives
it back, moves and allocates on its new CPU's ctx: ``blk_mq_get_tag()``'s re-check).
Then it waits until no tag of the hctx is held by a request of that hctx
(``blk_mq_hctx_has_requests()``), looking every 5 ms as the kernel's ``msleep(5)``
does; the set_bit's full barrier orders the flag before the look at the tags, as the
tag get's orders the tag before the look at the flag, so either the drain sees the
request or its allocator sees INACTIVE.

*Dead* (out of the online mask): the requests left on the CPU's ctx lists move to the
tail of their hctx's ``dispatch`` list (the same hctx, as the kernel splices them)
and that hctx runs on kblockd, which picks an online CPU (``blk_mq_hctx_next_cpu()``
skips offline ones; for an hctx with none, the caller's).

*Online*: INACTIVE cleared on every hctx the CPU maps to.

The callbacks run in the sysfs writer task (CPU 0) with that CPU's
:class:`~mqrt.block.blk_mq.BlkMq`, on every queue of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from mqrt.block.blk_mq_structs import _INACTIVE, RQ_U16_HCTX, RQ_U16_Q, HwCtx, RequestQueue, RqList
from mqrt.block.blk_mq_types import HctxState
from mqrt.lib import cpuhp
from mqrt.lib.shm import Arena

if TYPE_CHECKING:
    from mqrt.block.blk_mq import BlkMq

#: How often the offline callback looks at the hctx's tags again (the kernel's msleep(5)).
DRAIN_POLL_NS = 5_000_000


def last_online_cpu(hp: cpuhp.CpuhpState, hctx: HwCtx, cpu: int) -> bool:
    """blk_mq_last_cpu_in_hctx(): ``cpu`` is the only online CPU of the hctx's mask."""
    return hctx.in_cpumask(cpu) and not any(c != cpu and hp.online(c) for c in hctx.cpumask)


def hctx_requests(mq: BlkMq, hctx: HwCtx) -> int:
    """blk_mq_hctx_has_requests(), counted: the tags of the hctx held by a request of
    this hctx and queue (shared tags hold other queues' and hctxs' requests too): its
    sched tags while the queue has an elevator (a request waiting in it holds no
    driver tag yet)."""
    tags = hctx.sched_tags if hctx.queue.elevator() else hctx.tags
    if tags is None or hctx.tags is None:
        return 0
    q, h = hctx.queue.index, hctx.index
    buf16 = mq.buf16
    n = 0

    def mine(rq: Any) -> bool:
        half = rq.base >> 1
        return buf16[half + RQ_U16_Q] == q and buf16[half + RQ_U16_HCTX] == h

    def count(_rq: Any, _st: int) -> bool:
        nonlocal n
        n += 1
        return True

    tags.busy_iter(mq.rqs[q], count, match=mine)
    return n


class BlkMqHotplug:
    """blk-mq's hotplug states, for every queue of one CPU's block layer."""

    def __init__(
        self, mq: BlkMq, hp: cpuhp.CpuhpState, clock: Callable[[], int], sleep: Callable[[int], Any]
    ):
        """``sleep(ns)``: what the writer task yields to sleep (its ``Sleep``)."""
        self.mq = mq
        self.hp = hp
        self.clock = clock
        self.sleep = sleep

    def _hctxs(self, cpu: int) -> list[HwCtx]:
        return [h for queue in self.mq.queues for h in queue.hctxs if h.in_cpumask(cpu)]

    def offline(self, cpu: int) -> Generator[Any, None, dict[str, Any]]:
        """blk_mq_hctx_notify_offline() for every hctx of ``cpu``."""
        mq, hp = self.mq, self.hp
        last = [h for h in self._hctxs(cpu) if h.tags is not None and last_online_cpu(hp, h, cpu)]
        for hctx in last:
            mq.a.set_bit(hctx.state_off, HctxState.INACTIVE)  # a locked RMW: a full barrier
        in_flight = sum(hctx_requests(mq, h) for h in last)
        t0 = self.clock()
        polls = 0
        while any(hctx_requests(mq, h) for h in last):
            polls += 1
            yield self.sleep(DRAIN_POLL_NS)
        return {
            "inactive": len(last),
            "in_flight": in_flight,
            "drain_wait_ns": self.clock() - t0,
            "drain_polls": polls,
        }

    def dead(self, cpu: int) -> dict[str, Any]:
        """blk_mq_hctx_notify_dead(): ``cpu``'s ctx lists spliced to their hctx's
        dispatch list, which runs (on kblockd: an online CPU)."""
        mq = self.mq
        moved = 0
        for hctx in self._hctxs(cpu):
            lst, index_hw = hctx.queue.ctx_lists[(cpu, hctx.type)]
            rqs = lst.take(-1, lambda h=hctx, i=index_hw: h.clear_pending(i))  # type: ignore[misc]
            if not rqs:
                continue
            hctx.dispatch.add(rqs)
            moved += len(rqs)
            mq.run_hw_queue(hctx, True)
        return {"moved": moved}

    def online(self, cpu: int) -> dict[str, Any]:
        """blk_mq_hctx_notify_online(): INACTIVE cleared on every hctx of ``cpu``."""
        a = self.mq.a
        back = 0
        for hctx in self._hctxs(cpu):
            if a.read(hctx.state_off) & _INACTIVE:
                a.clear_bit(hctx.state_off, HctxState.INACTIVE)
                back += 1
        return {"reactivated": back}


def stranded(arena: Arena, queues: list[RequestQueue], hp: cpuhp.CpuhpState) -> list[str]:
    """The end-of-run check (every CPU stopped): no request left on an offline CPU's
    ctx lists, no hctx left INACTIVE while one of its CPUs is online."""
    problems = []
    online = set(hp.online_cpus())
    for q in queues:
        for cpu, lists in enumerate(q.ctx_lists):
            if cpu in online:
                continue
            for spec in lists:
                if spec is None:
                    continue
                lst = RqList(arena, spec)
                n = len(lst)
                lst.close()
                if n:
                    problems.append(f"{q.name}: {n} requests stranded in offline cpu{cpu}'s ctx")
        v = arena.view(q.hctx_region)
        states = [int(x) for x in v["state"]]
        del v
        for h, st in enumerate(states):
            if st & _INACTIVE and online & set(q.hctx_cpus[h]):
                problems.append(f"{q.name}: hctx{h} INACTIVE with an online CPU")
    return problems


def store_online(
    mq: BlkMq, clock: Callable[[], int], sleep: Callable[[int], Any], cpu: int, online: bool
) -> Generator[Any, None, dict[str, Any]]:
    """The ``cpuN/online`` write, made by the sysfs writer with its CPU's ``mq``:
    take the CPU down or bring it up; writing the state it is in does nothing (as
    sysfs)."""
    hp = mq.hotplug
    if hp is None:
        raise RuntimeError("cpuN/online needs the run's hotplug state")
    if hp.online(cpu) == online:
        return {"online": int(online), "noop": True}
    callbacks = [BlkMqHotplug(mq, hp, clock, sleep)]
    if online:
        report = cpuhp.cpu_up(hp, cpu, callbacks)
    else:
        report = yield from cpuhp.cpu_down(hp, cpu, callbacks, clock)
    return {"online": int(online), **report}
