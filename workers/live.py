"""A CPU's counters while the run goes, for observers (``mqrt inspect``, ``mqrt top``).

Each CPU keeps its counters in its own process (plain Python ints on the hot path)
and reports them at the end.  Every :data:`~mqrt.workers.cpu.PUBLISH_NS` (with its
heartbeat) it also copies them here, into regions the runtime declares:

``live_cpu[cpu]``
    the block layer's and the CPU's counters (:data:`CPU_FIELDS`);
``live_hctx[cpu * nr_hctx_slots + slot]``
    per hctx of every queue (slots in queue order, ``q.hctxs`` each): the kernel's
    debugfs counters of that hctx as this CPU counted them (:data:`HCTX_FIELDS`,
    ``dispatched`` by the number of requests a dispatch queued, as
    ``hctx->dispatched[]``);
``live_disk[cpu * nr_queues + q]``
    per request queue, diskstats as this CPU's job on it counts them
    (:data:`DISK_FIELDS`; its I/O after ``ramp_time``, folded every few thousand
    completions).

An observer sums over the CPUs.  Ordering: one writer per block (its CPU), a
seqcount per CPU (``seq``: odd while that CPU writes its blocks, release store of
the even value last); a reader takes ``seq`` (acquire), copies, fences, reads ``seq``
again and keeps the copy when both are the same even value (:func:`read`), or, after
a few tries, the last copy (the counters only grow: a torn copy is a moment late in
some fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mqrt.lib._atomic import fence
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct

#: The CPU-wide counters (BlkMq.counters(), the CPU's own, its tag waits).
CPU_FIELDS = (
    "bios", "merges", "read_merges", "write_merges", "requests", "issued", "completed",
    "batch_tags", "open_bio_chains", "busy", "ipis_sent", "softirqs", "requeued", "timeouts",
    "timer_resets", "hctx_runs", "kblockd_runs", "restarts", "stale_completions", "violations",
    "plug_flushes", "polls", "polled", "batched_completions", "ctx_merges", "elv_merges",
    "driver_tag_waits", "freeze_waits", "migrated_ends", "task_moves",
    "ipis_received", "irq_wakeups", "idle_waits", "sleeps", "tag_waits", "tag_sleeps",
)  # fmt: skip
#: BLK_MQ_MAX_DISPATCH_ORDER: hctx->dispatched[] buckets (0, 1, 2, 4, 8, 16, 32+)
DISPATCH_ORDERS = 7
HCTX_FIELDS = ("run", "queued", "dispatched", "busy", "restart", "no_driver_tag")
DISK_FIELDS = (
    "read_ios", "read_merges", "read_sectors", "read_ticks_ns",
    "write_ios", "write_merges", "write_sectors", "write_ticks_ns",
    "in_flight",
)  # fmt: skip

LIVE_CPU = cacheline_struct([("seq", "<u8")], [(f, "<u8") for f in CPU_FIELDS])
#: ``dispatched_order<i>``: hctx->dispatched[i]
LIVE_HCTX = cacheline_struct(
    [(f, "<u8") for f in HCTX_FIELDS]
    + [(f"dispatched_order{i}", "<u8") for i in range(DISPATCH_ORDERS)]
)
LIVE_DISK = cacheline_struct([(f, "<u8") for f in DISK_FIELDS])


@dataclass(frozen=True)
class LiveSpec:
    nr_cpus: int
    nr_queues: int
    hctx_slot0: tuple[int, ...]  #: per queue, the slot of its hctx 0
    nr_hctx_slots: int
    cpu: Region
    hctx: Region
    disk: Region


def declare(layout: Layout, nr_cpus: int, hctxs_per_queue: list[int]) -> LiveSpec:
    slots, first = 0, []
    for n in hctxs_per_queue:
        first.append(slots)
        slots += n
    nq = len(hctxs_per_queue)
    return LiveSpec(
        nr_cpus,
        nq,
        tuple(first),
        slots,
        layout.add("live_cpu", LIVE_CPU, nr_cpus),
        layout.add("live_hctx", LIVE_HCTX, max(1, nr_cpus * slots)),
        layout.add("live_disk", LIVE_DISK, max(1, nr_cpus * nq)),
    )


def _u64(arena: Arena, region: Region, first: int, count: int) -> np.ndarray:
    """``count`` elements of ``region`` from ``first``, as a flat uint64 array."""
    words = region.stride // 8
    return np.ndarray(
        (count * words,), dtype="<u8", buffer=arena.buf, offset=region.addr(first)
    ).reshape(count, words)


class Publisher:
    """One CPU's side: :meth:`publish` copies its counters into its blocks."""

    def __init__(self, arena: Arena, spec: LiveSpec, cpu: int):
        self.a = arena.atomic
        self.spec = spec
        self._seq_off = spec.cpu.addr(cpu, "seq")
        self._seq = 0
        self._cpu = _u64(arena, spec.cpu, cpu, 1)[0]
        self._cpu_first = spec.cpu.dtype.fields["bios"][1] // 8  # type: ignore[index]
        self._hctx = _u64(arena, spec.hctx, cpu * spec.nr_hctx_slots, spec.nr_hctx_slots)
        self._disk = _u64(arena, spec.disk, cpu * spec.nr_queues, spec.nr_queues)

    def publish(
        self,
        counters: dict[str, int],
        hctxs: list[list[Any]],
        disks: list[list[int]],
    ) -> None:
        """``counters`` by :data:`CPU_FIELDS` name; ``hctxs`` per queue, each hctx's
        handle (its ``stats``, ``nr_alloc`` and ``dispatched_order``); ``disks`` per
        queue, :data:`DISK_FIELDS` in order."""
        a = self.a
        self._seq += 1
        a.set(self._seq_off, self._seq)  # odd: being written
        fence()
        first = self._cpu_first
        self._cpu[first : first + len(CPU_FIELDS)] = [counters.get(f, 0) for f in CPU_FIELDS]
        rows = self._hctx
        for q, handles in enumerate(hctxs):
            slot = self.spec.hctx_slot0[q]
            for h in handles:
                if h.nr_alloc or h.stats["run"]:
                    st = h.stats
                    rows[slot + h.index, : len(HCTX_FIELDS) + DISPATCH_ORDERS] = [
                        st["run"], h.nr_alloc, st["dispatched"], st["busy"], st["restart"],
                        st["no_driver_tag"], *h.dispatched_order,
                    ]  # fmt: skip
        for q, row in enumerate(disks):
            self._disk[q, : len(DISK_FIELDS)] = row
        self._seq += 1
        a.store_release(self._seq_off, self._seq)

    def close(self) -> None:
        del self._cpu, self._hctx, self._disk


def read(arena: Arena, spec: LiveSpec, tries: int = 4) -> tuple[Any, Any, Any]:
    """A copy of every CPU's blocks: (live_cpu, live_hctx, live_disk) as numpy
    structured arrays, each CPU's taken between two equal even ``seq`` reads where
    it can be."""
    a = arena.atomic
    cpu = arena.view(spec.cpu).copy()
    hctx = arena.view(spec.hctx).copy()
    disk = arena.view(spec.disk).copy()
    ns, nq = spec.nr_hctx_slots, spec.nr_queues
    for c in range(spec.nr_cpus):
        off = spec.cpu.addr(c, "seq")
        for _ in range(tries):
            seq = a.load_acquire(off)
            if seq & 1:
                continue
            v = arena.view(spec.cpu)
            cpu[c] = v[c]
            del v
            if ns:
                v = arena.view(spec.hctx)
                hctx[c * ns : (c + 1) * ns] = v[c * ns : (c + 1) * ns]
                del v
            v = arena.view(spec.disk)
            disk[c * nq : (c + 1) * nq] = v[c * nq : (c + 1) * nq]
            del v
            fence()
            if a.read(off) == seq:
                break
    return cpu, hctx, disk
