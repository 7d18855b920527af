"""The debugfs and sysfs files of a live run, in the kernel's names and formats.

Every file is a path, as the kernel has it without its leading ``/``, and a
function that reads it now from a :class:`~mqrt.inspect.attach.RunView`::

    sys/kernel/debug/block/<dev>/state, requeue_list, poll_stat
    sys/kernel/debug/block/<dev>/hctxN/state, flags, tags, tags_bitmap, sched_tags,
        sched_tags_bitmap, ctx_map, dispatch, busy, dispatched, queued, run, active,
        dispatch_busy, type
    sys/kernel/debug/block/<dev>/hctxN/cpuM/default_rq_list (read_, poll_ on those
        maps), dispatched, merged, completed
    sys/block/<dev>/mq/N/cpu_list, nr_tags, nr_reserved_tags
    sys/block/<dev>/queue/nr_requests, scheduler, iosched/<knob>, max_sectors_kb, ...
    sys/block/<dev>/stat, sys/block/<dev>/inflight
    proc/diskstats, proc/lock_stat

The formats are those of Linux 5.10's ``block/blk-mq-debugfs.c``,
``block/blk-mq-sysfs.c``, ``block/blk-sysfs.c`` and ``block/genhd.c`` (and
``Documentation/ABI/testing/sysfs-block``, ``Documentation/admin-guide/iostats.rst``).
Where mqrt's numbers differ from the kernel's in meaning, the docstring of the file's
reader says so.  Counters (``run``, ``queued``, ``dispatched``, a ctx's, ``stat``) are
what the CPUs last published (:mod:`mqrt.workers.live`, every 50 ms); state (tags,
lists, flags) is read now, without locks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from functools import partial
from typing import Any

from mqrt.block.blk_mq import pool_accessors
from mqrt.block.blk_mq_cpumap import HctxType
from mqrt.block.blk_mq_structs import (
    RQ_OFF_HCTX,
    RQ_OFF_Q,
    RQ_STATE_MASK,
    HwCtx,
    Queue,
    Request,
    RequestQueue,
    TagSet,
)
from mqrt.block.blk_mq_tag import Tags
from mqrt.block.blk_mq_types import BlkMqFlag, HctxState, QueueFlag
from mqrt.block.elevator import ELEVATOR_NAMES, ELEVATORS
from mqrt.block.mq_deadline import KNOBS as DD_KNOBS
from mqrt.block.mq_deadline import DeadlineData
from mqrt.errors import UsageError
from mqrt.inspect.attach import RunView, peek
from mqrt.lib import lockstat
from mqrt.lib.sbitmap import Sbitmap
from mqrt.workers import live

DEBUGFS = "sys/kernel/debug/block"
SYSFS = "sys/block"

Reader = Callable[[], str]


def _flags(value: int, names: dict[int, str]) -> str:
    """blk_flags_show(): the set bits' names (a bit without one: its number), '|'
    between them."""
    out = []
    bit = 0
    while value:
        if value & 1:
            out.append(names.get(bit, str(bit)))
        value >>= 1
        bit += 1
    return "|".join(out)


_HCTX_STATE = {s.value: s.name for s in HctxState}
_QUEUE_FLAGS = {f.value: f.name for f in QueueFlag}
_HCTX_FLAGS = {
    f.value.bit_length() - 1: f.name
    for f in BlkMqFlag
    if f is not BlkMqFlag.TAG_RR and f.name is not None
}


class Tree:
    """The files of one run, made once per view; each read goes to the arena."""

    def __init__(self, view: RunView):
        self.v = view
        self.a = view.arena.atomic
        self._pools: dict[int, list[Request]] = {}
        self._live: tuple[Any, Any, Any] | None = None
        self.files: dict[str, Reader] = {}
        #: the arena as 16-bit words (a request's cpu, hctx and q)
        self._u16 = view.arena.buf.cast("H")
        self._build()

    def close(self) -> None:
        self._u16.release()
        self._pools.clear()

    # -- the counters the CPUs published ------------------------------------------------------

    def refresh(self) -> bool:
        """Read the published counters again, and the map: after an ``nr_hw_queues``
        write the files are made again for the new map (True then)."""
        self._live = None
        before = [[list(c) for c in q.hctx_cpus] for q in self.v.queues]
        self.v.refresh_map()
        if before == [[list(c) for c in q.hctx_cpus] for q in self.v.queues]:
            return False
        self.files.clear()
        self._build()
        return True

    def live(self) -> tuple[Any, Any, Any]:
        if self._live is None:
            self._live = live.read(self.v.arena, self.v.manifest.extra["live"])
        return self._live

    # -- helpers --------------------------------------------------------------------------------

    def pool(self, tset: TagSet) -> list[Request]:
        got = self._pools.get(id(tset))
        if got is None:
            got = self._pools[id(tset)] = pool_accessors(self.v.arena, tset)
        return got

    def rq_show(self, tset: TagSet, rq_id: int) -> str:
        pool = self.pool(tset)
        if 0 <= rq_id < len(pool):
            return pool[rq_id].show()
        return f"{rq_id:#x} {{?}}"

    def rq_lines(self, tset: TagSet, ids: list[int]) -> str:
        return "".join(self.rq_show(tset, i) + "\n" for i in ids)

    # -- the files ---------------------------------------------------------------------------------

    def _build(self) -> None:
        for qi, (q, handle) in enumerate(zip(self.v.queues, self.v.handles, strict=True)):
            self._queue(qi, q, handle)
        self.files["proc/diskstats"] = self.diskstats
        if "lock_stat" in self.v.manifest.extra:
            self.files["proc/lock_stat"] = self.lock_stat

    def _queue(self, qi: int, q: RequestQueue, handle: Queue) -> None:
        f = self.files
        dbg = f"{DEBUGFS}/{q.name}"
        f[f"{dbg}/state"] = lambda: _flags(self.a.read(handle.flags_off), _QUEUE_FLAGS) + "\n"
        f[f"{dbg}/requeue_list"] = lambda: self.rq_lines(q.tag_set, peek(handle.requeue_list))
        f[f"{dbg}/poll_stat"] = _poll_stat
        for h, hctx in enumerate(handle.hctxs):
            self._hctx(qi, q, handle, h, hctx, f"{dbg}/hctx{h}")
            mq = f"{SYSFS}/{q.name}/mq/{h}"
            f[f"{mq}/cpu_list"] = partial(_cpu_list, q, h)
            f[f"{mq}/nr_tags"] = partial(_line, _nr_tags(hctx.tags))
            f[f"{mq}/nr_reserved_tags"] = partial(_line, _nr_reserved(hctx.tags))
        self._sysfs_queue(qi, q, handle)

    def _hctx(self, qi: int, q: RequestQueue, handle: Queue, h: int, hctx: HwCtx, d: str) -> None:
        f, a, tset = self.files, self.a, q.tag_set
        flags = tset.flags | (BlkMqFlag.TAG_QUEUE_SHARED if q.shared else 0)
        policy = "RR" if tset.flags & BlkMqFlag.TAG_RR else "FIFO"
        f[f"{d}/state"] = lambda: _flags(a.read(hctx.state_off), _HCTX_STATE) + "\n"
        f[f"{d}/flags"] = lambda: f"alloc_policy={policy} {_flags(int(flags), _HCTX_FLAGS)}\n"
        if hctx.tags is not None:
            tags = hctx.tags
            f[f"{d}/tags"] = tags.show
            f[f"{d}/tags_bitmap"] = tags.bitmap_tags.sb.bitmap_show
            f[f"{d}/busy"] = lambda: self.busy(q, handle, hctx)
        if hctx.sched_tags is not None:
            st = hctx.sched_tags
            f[f"{d}/sched_tags"] = lambda: st.show() if handle.elevator() else ""
            f[f"{d}/sched_tags_bitmap"] = lambda: (
                st.bitmap_tags.sb.bitmap_show() if handle.elevator() else ""
            )
        ctx_map = Sbitmap(self.v.arena, hctx._ctx_map, 0)
        f[f"{d}/ctx_map"] = ctx_map.bitmap_show
        f[f"{d}/dispatch"] = lambda: self.rq_lines(tset, peek(hctx.dispatch))
        f[f"{d}/dispatch_busy"] = lambda: f"{a.read32(hctx.dispatch_busy_off)}\n"
        f[f"{d}/active"] = lambda: f"{a.read32(hctx.nr_active_off)}\n"
        f[f"{d}/type"] = lambda: f"{HctxType(q.hctx_type[h]).name.lower()}\n"
        f[f"{d}/run"] = lambda: f"{self.hctx_sum(qi, h, 'run')}\n"
        f[f"{d}/queued"] = lambda: f"{self.hctx_sum(qi, h, 'queued')}\n"
        f[f"{d}/dispatched"] = lambda: self.dispatched(qi, h)
        for cpu in q.hctx_cpus[h]:  # the hctx's ctxs, as the kernel registers them
            c = f"{d}/cpu{cpu}"
            kind = HctxType(q.hctx_type[h]).name.lower()
            f[f"{c}/{kind}_rq_list"] = partial(self.ctx_list, q, handle, hctx, cpu)
            for what in ("dispatched", "merged", "completed"):
                f[f"{c}/{what}"] = partial(self.ctx, qi, h, cpu, what)

    def _sysfs_queue(self, qi: int, q: RequestQueue, handle: Queue) -> None:
        f = self.files
        d = f"{SYSFS}/{q.name}/queue"
        f[f"{d}/nr_requests"] = lambda: f"{self.nr_requests(handle)}\n"
        f[f"{d}/scheduler"] = lambda: self.scheduler(q, handle)
        lim = q.limits.describe()
        for name in ("max_sectors_kb", "max_hw_sectors_kb", "max_segments"):
            f[f"{d}/{name}"] = partial(_line, lim[name])
        for name, value in (
            ("logical_block_size", 512), ("physical_block_size", 512), ("hw_sector_size", 512),
            ("rotational", 0), ("nomerges", q.nomerges), ("rq_affinity", q.rq_affinity),
            ("io_poll", int(handle.poll_capable)),
        ):  # fmt: skip
            f[f"{d}/{name}"] = partial(_line, value)
        if q.dd is not None:
            dd = DeadlineData(self.v.arena, q.dd)
            for knob in DD_KNOBS:
                f[f"{d}/iosched/{knob}"] = partial(_knob, dd, handle, knob)
        f[f"{SYSFS}/{q.name}/stat"] = lambda: self.stat(qi)
        f[f"{SYSFS}/{q.name}/inflight"] = lambda: self.inflight(qi)

    # -- readers ------------------------------------------------------------------------------

    def busy(self, q: RequestQueue, handle: Queue, hctx: HwCtx) -> str:
        """hctxN/busy: the started requests of this queue and hctx that hold a driver
        tag (blk_mq_tagset_busy_iter over the hctx's tags, BT_TAG_ITER_STARTED)."""
        tags = hctx.tags
        assert tags is not None
        out: list[str] = []
        pool = self.pool(q.tag_set)
        a = self.a

        def visit(base: int) -> Callable[[int], bool]:
            def fn(bit: int) -> bool:
                rq_id = tags.rq_id_of(bit + base)
                if 0 <= rq_id < len(pool):
                    rq = pool[rq_id]
                    u16 = self._u16
                    if (
                        a.load_acquire(rq.base) & RQ_STATE_MASK
                        and u16[(rq.base + RQ_OFF_Q) >> 1] == q.index
                        and u16[(rq.base + RQ_OFF_HCTX) >> 1] == hctx.index
                    ):
                        out.append(rq.show() + "\n")
                return True

            return fn

        if tags.breserved_tags is not None:
            tags.breserved_tags.sb.for_each_set(visit(0))
        tags.bitmap_tags.sb.for_each_set(visit(tags.nr_reserved_tags))
        return "".join(out)

    def ctx_list(self, q: RequestQueue, handle: Queue, hctx: HwCtx, cpu: int) -> str:
        """cpuN/<type>_rq_list: the requests on that CPU's ctx list of this hctx."""
        if cpu not in hctx._cpuset:
            return ""
        return self.rq_lines(q.tag_set, peek(handle.ctx_rqlist(cpu, hctx.type)))

    def hctx_row(self, qi: int, h: int) -> Any:
        spec = self.v.manifest.extra["live"]
        slots = spec.nr_hctx_slots
        _, hctx, _ = self.live()
        return hctx[spec.hctx_slot0[qi] + h :: slots] if slots else hctx[:0]

    def hctx_sum(self, qi: int, h: int, field: str) -> int:
        return int(self.hctx_row(qi, h)[field].sum())

    def dispatched(self, qi: int, h: int) -> str:
        """hctxN/dispatched: dispatches by requests queued, as hctx->dispatched[]."""
        rows = self.hctx_row(qi, h)
        counts = [int(rows[f"dispatched_order{i}"].sum()) for i in range(live.DISPATCH_ORDERS)]
        lines = [f"{0:8}\t{counts[0]}"]
        for i in range(1, live.DISPATCH_ORDERS - 1):
            lines.append(f"{1 << (i - 1):8}\t{counts[i]}")
        last = live.DISPATCH_ORDERS - 1
        lines.append(f"{1 << (last - 1):8}+\t{counts[last]}")
        return "\n".join(lines) + "\n"

    def ctx(self, qi: int, h: int, cpu: int, what: str) -> str:
        """cpuN/dispatched (requests allocated on the ctx: sync, async), merged (bios
        merged), completed (sync, async).  mqrt's I/O is O_DIRECT, all of it sync; its
        counters are per CPU and queue, shown under the hctx that CPU maps to."""
        q = self.v.queues[qi]
        if cpu not in q.hctx_cpus[h]:
            return "0 0\n" if what != "merged" else "0\n"
        spec = self.v.manifest.extra["live"]
        _, hctx, disk = self.live()
        d = disk[cpu * spec.nr_queues + qi]
        if what == "merged":
            return f"{int(d['read_merges']) + int(d['write_merges'])}\n"
        if what == "completed":
            return f"{int(d['read_ios']) + int(d['write_ios'])} 0\n"
        row = hctx[cpu * spec.nr_hctx_slots + spec.hctx_slot0[qi] : (cpu + 1) * spec.nr_hctx_slots]
        return f"{int(row['queued'][: len(q.hctxs)].sum())} 0\n"

    def nr_requests(self, handle: Queue) -> int:
        """queue/nr_requests: the depth allocations are held to now (with an elevator,
        its sched tags'), reserved tags included."""
        hctx = next((h for h in handle.hctxs if h.tags is not None), None)
        if hctx is None:
            return 0
        tags = hctx.sched_tags if handle.elevator() and hctx.sched_tags is not None else hctx.tags
        assert tags is not None
        return tags.bitmap_tags.sb.depth + tags.nr_reserved_tags

    def scheduler(self, q: RequestQueue, handle: Queue) -> str:
        """queue/scheduler: the elevators this queue may have, the current one in
        brackets."""
        names = list(ELEVATORS) if q.dd is not None else ["none"]
        cur = ELEVATOR_NAMES.get(handle.elevator(), "none")
        return " ".join(f"[{n}]" if n == cur else n for n in names) + "\n"

    def disk(self, qi: int) -> dict[str, int]:
        spec = self.v.manifest.extra["live"]
        _, _, disk = self.live()
        rows = disk[qi :: spec.nr_queues]
        return {name: int(rows[name].sum()) for name in live.DISK_FIELDS}

    def stat_fields(self, qi: int) -> list[int]:
        """The 17 fields of /sys/block/<dev>/stat (5.10): reads, read merges, read
        sectors, read ticks (ms), the same for writes, in flight, io_ticks,
        time_in_queue, then discards and flushes (mqrt issues none: 0).  ``io_ticks``
        (time the device was busy) is not measured by mqrt: 0."""
        d = self.disk(qi)
        rt, wt = d["read_ticks_ns"] // 1_000_000, d["write_ticks_ns"] // 1_000_000
        return [
            d["read_ios"], d["read_merges"], d["read_sectors"], rt,
            d["write_ios"], d["write_merges"], d["write_sectors"], wt,
            d["in_flight"], 0, rt + wt,
            0, 0, 0, 0, 0, 0,
        ]  # fmt: skip

    def stat(self, qi: int) -> str:
        return " ".join(f"{v:8d}" for v in self.stat_fields(qi)) + "\n"

    def inflight(self, qi: int) -> str:
        """inflight: "%8u %8u": reads, writes in flight (mqrt: the jobs' I/Os in
        flight, reads and writes together in the first)."""
        return f"{self.disk(qi)['in_flight']:8d} {0:8d}\n"

    def lock_stat(self) -> str:
        """/proc/lock_stat: every CPU's contention counters summed per lock class
        (:func:`mqrt.lib.lockstat.format_proc` has what mqrt measures of its columns)."""
        region = self.v.manifest.extra["lock_stat"]
        return lockstat.format_proc(lockstat.summary(lockstat.read(self.v.arena, region)))

    def diskstats(self) -> str:
        """/proc/diskstats: a line per device (major 0: no real device; minor its
        queue's index)."""
        lines = []
        for qi, q in enumerate(self.v.queues):
            vals = " ".join(str(v) for v in self.stat_fields(qi))
            lines.append(f"{0:4d} {qi:7d} {q.name} {vals}")
        return "\n".join(lines) + "\n"


def _line(value: object) -> str:
    return f"{value}\n"


def _cpu_list(q: RequestQueue, h: int) -> str:
    """mq/N/cpu_list: the hctx's CPUs, ", " between them (blk_mq_hw_sysfs_cpus_show)."""
    return ", ".join(map(str, q.hctx_cpus[h])) + "\n"


def _knob(dd: DeadlineData, handle: Queue, knob: str) -> str:
    """queue/iosched/<knob>: while the queue has mq-deadline (empty otherwise)."""
    return dd.show_knob(knob) if handle.elevator() else ""


def _nr_tags(tags: Tags | None) -> int:
    return 0 if tags is None else tags.nr_tags


def _nr_reserved(tags: Tags | None) -> int:
    return 0 if tags is None else tags.nr_reserved_tags


def _poll_stat() -> str:
    """poll_stat: mqrt keeps no hybrid-polling statistics (every bucket empty, as a
    queue that never polled shows)."""
    out = []
    for i in range(8):
        size = 512 << i
        out.append(f"read  ({size} Bytes): samples=0")
        out.append(f"write ({size} Bytes): samples=0")
    return "\n".join(out) + "\n"


def select(files: dict[str, Reader], patterns: list[str]) -> list[str]:
    """The paths ``patterns`` name: each a path or a directory (with or without the
    leading ``/``), a shell pattern, or a debugfs path from ``block/`` on; a pattern
    that names nothing is a one-line error."""
    if not patterns:
        return list(files)
    out: list[str] = []
    for pat in patterns:
        p = pat.strip("/")
        cands = [p] if not p.startswith("block/") else [p, f"sys/kernel/debug/{p}"]
        hit = [
            path
            for path in files
            for c in cands
            if path == c or path.startswith(c + "/") or fnmatch.fnmatchcase(path, c)
        ]
        if not hit:
            raise UsageError(f"PATH: {pat!r} names no file of this run")
        out += [h for h in dict.fromkeys(hit) if h not in out]
    return out


def read(files: dict[str, Reader], paths: list[str]) -> dict[str, str]:
    """The files at ``paths`` that exist now (a remap may remove some)."""
    return {p: files[p]() for p in paths if p in files}
