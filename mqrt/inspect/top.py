"""``mqrt top RUN``: a live view of a running run, ``top`` meets ``iostat -x``.

Every ``--interval`` seconds (default 1) it reads what the run's CPUs published
(:mod:`mqrt.workers.live`, every 50 ms, and the ``cpu_stats`` region with each
heartbeat) and the state the block layer keeps in the arena (tag maps, wait queues,
``nr_active``, the NVMe queue pairs' doorbells), and shows rates: the difference of
two samples' counters over the time between them.  A CPU's rates are over the time
between its own two heartbeats (the counters are published with it), so a CPU that
publishes nothing shows nothing; a device's and an hctx's, summed over the CPUs, are
over the observer's own clock (monotonic).

Views (keys on a terminal):

``c`` CPUs
    per CPU: IOPS (``completed``), submitted/s, in flight, tag waits and tag sleeps
    per second (the tag maps' ``blk_mq_get_tag`` waits and sleeps), sleeps/s (every
    sleep of the CPU's task), IPIs sent and received, wake-ups by an interrupt,
    hctx runs, ``BLK_STS_RESOURCE`` busy returns, requeues and retry-loop rounds
    per second, and the age of its heartbeat.
``h`` hctxs
    per hardware context: its CPUs, queued/run/dispatched/busy per second (debugfs
    ``queued``, ``run``, ``dispatched``, ``dispatch_busy``'s event), ``active``
    (``nr_active``), tags in use / depth, the map's ``ws_active`` and which of its
    wait queues have a sleeper, its state.
``t`` tags
    per tag map (an hctx's tags, 5.10's shared sbitmap, the sched tags while the
    queue has an elevator): depth, in use, cleared, ``wake_batch``, ``ws_active``,
    the wait queues with a sleeper, and who sleeps there (the waiter table).
``d`` devices
    ``iostat -x`` per device from its diskstats (r/s, w/s, rkB/s, wkB/s, rrqm/s,
    wrqm/s, r_await, w_await as delta ticks / delta I/Os, aqu-sz as delta ticks /
    elapsed), and with the NVMe driver the controller's counters (commands,
    completions, interrupts, coalesced CQEs, doorbell writes per second, its workers'
    busy share) and each queue pair's doorbells, device heads and tails.

Other keys: ``s`` sorts by the next column, ``r`` reverses, ``i`` sorts the CPUs by
IOPS (most first), ``l`` slowest CPUs first (IOPS ascending), ``w`` by tag waits;
``q`` (or Ctrl-C) quits.  The header names the run, its phase, the time run and
left, the total IOPS, the CPUs, the driver and the slowest CPU.

The view cannot change the run (:mod:`mqrt.inspect.attach`): a ``PROT_READ``
mapping, no lock taken.  When the run ends it says so and exits 0.  When stdout is
not a terminal it prints a plain snapshot of every view each interval (``--once``:
one, after one interval; ``--json``: one JSON object a line).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mqrt.block.blk_mq_cpumap import format_cpulist
from mqrt.errors import UsageError
from mqrt.lib import lockstat, signals

#: The views, by key.
VIEWS = {"c": "cpus", "h": "hctxs", "t": "tags", "d": "devices", "k": "locks"}
#: Fewest seconds between two samples: the CPUs publish every 50 ms.
MIN_INTERVAL = 0.1
#: The first frame on a terminal comes after this (or the interval, if shorter).
FIRST_FRAME_S = 0.5


@dataclass
class Table:
    """One table of a frame: named columns, rows of raw values (int, float, str)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    #: columns a sort key may choose (their indices); the others are labels
    sortable: tuple[int, ...] = ()

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


@dataclass
class Frame:
    """What one refresh shows: the header's fields and each view's tables."""

    header: dict[str, Any]
    views: dict[str, list[Table]]

    def to_json(self) -> dict[str, Any]:
        return {
            "header": self.header,
            **{
                name: {t.title: t.as_dicts() for t in tables} for name, tables in self.views.items()
            },
        }


@dataclass
class Sample:
    """The counters at one moment."""

    t_ns: int  #: the observer's CLOCK_MONOTONIC
    stats: Any  #: cpu_stats, a copy
    cpu: Any  #: live_cpu
    hctx: Any  #: live_hctx
    disk: Any  #: live_disk
    nvme: dict[str, Any]  #: nvme.counters and nvme.q<N>, copies (empty for null_blk)
    locks: Any  #: lock_stat counters [cpu, class, field] (None: a run without them)


class Top:
    """The samples of one run and the frames made of them."""

    def __init__(self, view: Any):
        from mqrt.inspect.tree import Tree

        self.v = view
        self.a = view.arena.atomic
        self.tree = Tree(view)
        self.m = view.manifest
        self.spec = self.m.extra["live"]
        self._nvme = [
            name
            for name in self.m.layout.regions
            if name == "nvme.counters"
            or (name.startswith("nvme.q") and name[6:].isdigit() and name != "nvme.q0")
        ]
        self._maps = list(self._tag_maps())
        #: wait-queue head -> (map label, its wait queue's index)
        self._ws_of: dict[int, tuple[str, int]] = {}
        for label, _kind, bt in self._maps:
            for i, ws in enumerate(bt.ws):
                self._ws_of[ws.head] = (label, i)
        self.prev = self.sample()

    def close(self) -> None:
        self.tree.close()

    # -- reading ------------------------------------------------------------------------------

    def sample(self) -> Sample:
        from mqrt.workers import live

        self.v.refresh_map()
        cpu, hctx, disk = live.read(self.v.arena, self.spec)
        region = self.m.extra.get("lock_stat")
        return Sample(
            time.monotonic_ns(),
            self.v.counters("cpu_stats"),
            cpu,
            hctx,
            disk,
            {name: self.v.counters(name)[0] for name in self._nvme},
            None if region is None else lockstat.read(self.v.arena, region),
        )

    def _tag_maps(self) -> Iterator[tuple[str, str, Any]]:
        """(label, kind, SbitmapQueue) of every tag map of the run: each tag set's
        per-hctx tags (5.10's shared sbitmap: one), their reserved tags, and each
        hctx's sched tags (shown while its queue has an elevator)."""
        seen: set[int] = set()
        for q, handle in zip(self.v.queues, self.v.handles, strict=True):
            tset = q.tag_set
            if id(tset) not in seen:
                seen.add(id(tset))
                tags = self.v.set_tags(tset)
                for i, t in enumerate(tags):
                    if t is None:
                        continue
                    label = (
                        f"{tset.name}/shared_sbitmap"
                        if tset.shared_sbitmap
                        else f"{tset.name}/tags{i}"
                    )
                    yield label, "bitmap_tags", t.bitmap_tags
                    if t.breserved_tags is not None and t.nr_reserved_tags:
                        yield label, "breserved_tags", t.breserved_tags
                    if tset.shared_sbitmap:
                        break
            for h, hctx in enumerate(handle.hctxs):
                if hctx.sched_tags is not None:
                    yield f"{q.name}/hctx{h}/sched_tags", "bitmap_tags", hctx.sched_tags.bitmap_tags

    def asleep(self) -> dict[tuple[str, int], list[str]]:
        """Who sleeps on which tag map's wait queue: (label, ws index) -> tasks."""
        out: dict[tuple[str, int], list[str]] = {}
        nr_cpus = self.m.nr_cpus
        for slot, head in self.v.waiters.asleep():
            where = self._ws_of.get(head)
            if where is not None:
                out.setdefault(where, []).append(f"cpu{slot}" if slot < nr_cpus else "sysfs")
        return out

    # -- the frame -----------------------------------------------------------------------------

    def frame(self) -> Frame:
        """Sample now; the rates since the last sample."""
        cur = self.sample()
        prev, self.prev = self.prev, cur
        dt = max(1e-9, (cur.t_ns - prev.t_ns) / 1e9)
        asleep = self.asleep()
        cpus = self._cpus(prev, cur, dt)
        views = {
            "cpus": [cpus],
            "hctxs": [self._hctxs(prev, cur, dt)],
            "tags": [self._tags(asleep)],
            "devices": self._devices(prev, cur, dt),
            "locks": [self._locks(prev, cur, dt)],
        }
        return Frame(self._header(cur, cpus), views)

    def _header(self, cur: Sample, cpus: Table) -> dict[str, Any]:
        sb = self.v.superblock()
        now = cur.t_ns
        elapsed = (now - sb.t0_ns) / 1e9 if sb.t0_ns else 0.0
        left = max(0.0, (sb.end_ns - now) / 1e9) if sb.end_ns else None
        iops = [(r[1], r[0]) for r in cpus.rows]
        slow = min(iops) if iops else None
        names = ", ".join(q.name for q in self.v.queues)
        return {
            "run": self.v.name,
            "phase": "ended" if self.v.ended() else sb.phase.name.lower(),
            "elapsed_s": round(elapsed, 1),
            "remaining_s": None if left is None else round(left, 1),
            "iops": round(sum(r[1] for r in cpus.rows), 1),
            "cpus": self.m.nr_cpus,
            "driver": self.m.driver,
            "devices": names,
            "slowest_cpu": None if slow is None else slow[1],
            "slowest_cpu_iops": None if slow is None else round(slow[0], 1),
        }

    def _cpus(self, prev: Sample, cur: Sample, dt: float) -> Table:
        t = Table(
            "cpus",
            ["cpu", "IOPS", "subm/s", "inflight", "twait/s", "tsleep/s", "sleep/s", "ipi_tx/s",
             "ipi_rx/s", "irq/s", "runs/s", "busy/s", "requeue/s", "retry/s", "hb_ms"],
            sortable=tuple(range(15)),
        )  # fmt: skip
        live_fields = ("tag_waits", "tag_sleeps", "sleeps", "ipis_sent", "ipis_received",
                       "irq_wakeups", "hctx_runs", "busy", "requeued")  # fmt: skip
        for c in range(self.m.nr_cpus):
            s0, s1 = prev.stats[c], cur.stats[c]
            hb0, hb1 = int(s0["heartbeat_ns"]), int(s1["heartbeat_ns"])
            # the CPU's own clock: its counters are published with its heartbeat
            cdt = (hb1 - hb0) / 1e9 if hb0 and hb1 > hb0 else dt

            def rate(a: Any, b: Any, name: str, cdt: float = cdt) -> float:
                return max(0, int(b[name]) - int(a[name])) / cdt

            row: list[Any] = [
                c,
                rate(s0, s1, "completed"),
                rate(s0, s1, "submitted"),
                int(np.int64(s1["inflight"])),
            ]
            row += [rate(prev.cpu[c], cur.cpu[c], f) for f in live_fields]
            row.append(rate(s0, s1, "retries"))
            row.append(round((cur.t_ns - hb1) / 1e6) if hb1 else None)
            t.rows.append(row)
        return t

    def _hctxs(self, prev: Sample, cur: Sample, dt: float) -> Table:
        t = Table(
            "hctxs",
            ["dev", "hctx", "cpus", "queued/s", "run/s", "dispatched/s", "busy/s", "active",
             "tags", "depth", "ws_active", "ws", "state"],
            sortable=(3, 4, 5, 6, 7, 8, 10),
        )  # fmt: skip
        slots = self.spec.nr_hctx_slots
        for qi, (q, handle) in enumerate(zip(self.v.queues, self.v.handles, strict=True)):
            for h, hctx in enumerate(handle.hctxs):
                if hctx.tags is None:  # declared, no CPU maps to it
                    continue
                slot = self.spec.hctx_slot0[qi] + h

                def rate(name: str, slot: int = slot) -> float:
                    if not slots:
                        return 0.0
                    d = int(cur.hctx[slot::slots][name].sum()) - int(
                        prev.hctx[slot::slots][name].sum()
                    )
                    return max(0, d) / dt

                bt = hctx.tags.bitmap_tags
                state = self.tree.files[f"sys/kernel/debug/block/{q.name}/hctx{h}/state"]()
                t.rows.append(
                    [
                        q.name, h, _cpulist(q.hctx_cpus[h]),
                        rate("queued"), rate("run"), rate("dispatched"), rate("busy"),
                        _s32(self.a.read32(hctx.nr_active_off)),
                        bt.sb.weight(), bt.sb.depth, bt.nr_ws_active(), _ws(bt),
                        state.strip() or "-",
                    ]
                )  # fmt: skip
        return t

    def _tags(self, asleep: dict[tuple[str, int], list[str]]) -> Table:
        t = Table(
            "tags",
            ["map", "kind", "depth", "in_use", "cleared", "wake_batch", "ws_active", "ws",
             "sleepers"],
            sortable=(2, 3, 4, 6),
        )  # fmt: skip
        elevator = {
            q.name: handle.elevator()
            for q, handle in zip(self.v.queues, self.v.handles, strict=True)
        }
        for label, kind, bt in self._maps:
            dev = label.split("/", 1)[0]
            if label.endswith("/sched_tags") and not elevator.get(dev):
                continue  # sched tags are allocated only while the queue has an elevator
            who = [
                f"ws[{i}]:{','.join(asleep[(label, i)])}"
                for i in range(len(bt.ws))
                if (label, i) in asleep
            ]
            t.rows.append(
                [label, kind, bt.sb.depth, bt.sb.weight(), bt.sb.cleared_weight(),
                 bt.wake_batch, bt.nr_ws_active(), _ws(bt), " ".join(who) or "-"]
            )  # fmt: skip
        return t

    def _locks(self, prev: Sample, cur: Sample, dt: float) -> Table:
        """lock_stat as rates: per lock class with acquisitions or contentions, the
        contentions, acquisitions and time waited per second, the share of
        acquisitions that waited, the longest wait so far, and the CPU that waits
        most (since the run started)."""
        t = Table(
            "locks",
            ["class", "con/s", "acq/s", "con%", "wait_us/s", "wait_max_us", "retry/s",
             "yield/s", "most_con"],
            sortable=(1, 2, 3, 4, 5, 6, 7),
        )  # fmt: skip
        if cur.locks is None or prev.locks is None:
            return t
        d = (cur.locks.astype(np.int64) - prev.locks.astype(np.int64)).clip(min=0)
        for cls, name in lockstat.CLASS_NAMES.items():
            total = cur.locks[:, cls, :]
            if (
                not total[:, lockstat.ACQUISITIONS].any()
                and not total[:, lockstat.CONTENTIONS].any()
            ):
                continue
            con, acq = (
                int(d[:, cls, lockstat.CONTENTIONS].sum()),
                int(d[:, cls, lockstat.ACQUISITIONS].sum()),
            )
            per_cpu = total[:, lockstat.CONTENTIONS]
            top_cpu = int(per_cpu.argmax())
            t.rows.append(
                [name, con / dt, acq / dt, 100.0 * con / acq if acq else 0.0,
                 int(d[:, cls, lockstat.WAIT_NS].sum()) / dt / 1e3,
                 int(total[:, lockstat.WAIT_MAX_NS].max()) / 1e3,
                 int(d[:, cls, lockstat.RETRIES].sum()) / dt,
                 int(d[:, cls, lockstat.YIELDS].sum()) / dt,
                 f"cpu{top_cpu}" if per_cpu[top_cpu] else "-"]
            )  # fmt: skip
        return t

    def _devices(self, prev: Sample, cur: Sample, dt: float) -> list[Table]:
        from mqrt.workers.live import DISK_FIELDS

        out = []
        t = Table(
            "iostat",
            ["device", "r/s", "w/s", "rkB/s", "wkB/s", "rrqm/s", "wrqm/s", "r_await",
             "w_await", "aqu-sz", "inflight"],
            sortable=tuple(range(1, 11)),
        )  # fmt: skip
        nq = self.spec.nr_queues
        for qi, q in enumerate(self.v.queues):

            def sums(s: Sample, qi: int = qi) -> dict[str, int]:
                rows = s.disk[qi::nq]
                return {f: int(rows[f].sum()) for f in DISK_FIELDS}

            d0, d1 = sums(prev), sums(cur)
            d = {f: max(0, d1[f] - d0[f]) for f in DISK_FIELDS}
            ticks = d["read_ticks_ns"] + d["write_ticks_ns"]
            t.rows.append(
                [
                    q.name, d["read_ios"] / dt, d["write_ios"] / dt,
                    d["read_sectors"] / 2 / dt, d["write_sectors"] / 2 / dt,
                    d["read_merges"] / dt, d["write_merges"] / dt,
                    _await(d["read_ticks_ns"], d["read_ios"]),
                    _await(d["write_ticks_ns"], d["write_ios"]),
                    round(ticks / (dt * 1e9), 2), d1["in_flight"],
                ]
            )  # fmt: skip
        out.append(t)
        irq = sum(
            max(0, int(cur.cpu[c]["irq_wakeups"]) - int(prev.cpu[c]["irq_wakeups"]))
            for c in range(self.m.nr_cpus)
        )
        if "nvme.counters" in cur.nvme:
            c0, c1 = prev.nvme["nvme.counters"], cur.nvme["nvme.counters"]
            names = ("commands", "completions", "interrupts", "coalesced", "irq_merged",
                     "kicks", "doorbell_writes", "sleeps", "cq_full_stalls")  # fmt: skip
            ctrl = Table("nvme controller", [f"{n}/s" for n in names] + ["busy%", "cpu_irq_wake/s"])
            workers = max(1, int(c1["workers"]))
            busy = max(0, int(c1["busy_ns"]) - int(c0["busy_ns"])) / (dt * 1e9 * workers) * 100
            ctrl.rows.append(
                [max(0, int(c1[n]) - int(c0[n])) / dt for n in names] + [round(busy, 1), irq / dt]
            )
            out.append(ctrl)
            qp = Table(
                "nvme queue pairs",
                ["qid", "q_depth", "sq_tail_db", "dev_sq_head", "sq_used", "dev_cq_tail",
                 "cq_head_db", "cq_pending", "irq_pending", "iv"],
                sortable=(4, 7),
            )  # fmt: skip
            for name in self._nvme:
                if name == "nvme.counters":
                    continue
                w = cur.nvme[name]
                if not int(w["created"]):
                    continue
                depth = int(w["q_depth"]) or 1
                sq_t, sq_h = int(w["sq_tail_db"]), int(w["dev_sq_head"])
                cq_t, cq_h = int(w["dev_cq_tail"]), int(w["cq_head_db"])
                qp.rows.append(
                    [int(name[6:]), depth, sq_t, sq_h, (sq_t - sq_h) % depth, cq_t, cq_h,
                     (cq_t - cq_h) % depth, int(w["irq_pending"]), int(w["iv"])]
                )  # fmt: skip
            out.append(qp)
        else:
            ints = Table("interrupts", ["cpu_irq_wake/s"])
            ints.rows.append([irq / dt])
            out.append(ints)
        return out


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _ws(bt: Any) -> str:
    """The map's wait queues: ``A`` one with a sleeper (waitqueue_active), ``.`` not."""
    return "".join("A" if ws.active() else "." for ws in bt.ws)


def _await(ticks_ns: int, ios: int) -> float | None:
    return round(ticks_ns / ios / 1e6, 3) if ios else None


def _cpulist(cpus: list[int]) -> str:
    return format_cpulist(cpus) or "-"


# -- showing a frame ------------------------------------------------------------------------------


@dataclass
class Keys:
    """What the keys chose: the view and each table's sort (column, descending)."""

    view: str = "cpus"
    sort: dict[str, tuple[int, bool]] = field(default_factory=dict)

    def press(self, key: str, frame: Frame | None) -> bool:
        """Apply a key; False for ``q``."""
        if key in ("q", "Q"):
            return False
        if key in VIEWS:
            self.view = VIEWS[key]
        elif key == "i":
            self.view, self.sort["cpus"] = "cpus", (1, True)
        elif key == "l":
            self.view, self.sort["cpus"] = "cpus", (1, False)
        elif key == "w":
            self.view, self.sort["cpus"] = "cpus", (4, True)
        elif key in ("s", "r") and frame is not None:
            table = frame.views[self.view][0]
            col, desc = self.sort.get(table.title, (-1, True))
            if key == "r" and col >= 0:
                self.sort[table.title] = (col, not desc)
            elif key == "s" and table.sortable:
                nxt = [c for c in table.sortable if c > col]
                self.sort[table.title] = (nxt[0] if nxt else table.sortable[0], True)
        return True


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v / 1e6:.2f}M"
        if abs(v) >= 1e4:
            return f"{v / 1e3:.1f}k"
        return f"{v:.1f}" if abs(v) >= 10 or v == 0 else f"{v:.2f}"
    return str(v)


def _sorted(table: Table, sort: tuple[int, bool] | None) -> list[list[Any]]:
    if sort is None or sort[0] < 0:
        return table.rows
    col, desc = sort

    def key(r: list[Any]) -> tuple[int, Any]:
        v = r[col]
        return (1, 0) if v is None else (0, v)

    rows = sorted(table.rows, key=key, reverse=desc)
    if desc:  # None last either way
        rows = [r for r in rows if r[col] is not None] + [r for r in rows if r[col] is None]
    return rows


def header_text(h: dict[str, Any], interval: float) -> str:
    left = "-" if h["remaining_s"] is None else f"{h['remaining_s']:.0f}s"
    slow = (
        f"  slowest: cpu{h['slowest_cpu']} {_fmt(float(h['slowest_cpu_iops']))} IOPS"
        if h["slowest_cpu"] is not None
        else ""
    )
    return (
        f"mqrt top - {h['run']}  phase {h['phase']}  elapsed {h['elapsed_s']:.0f}s"
        f"  left {left}  every {interval:g}s\n"
        f"IOPS {_fmt(float(h['iops']))}  CPUs {h['cpus']}  driver {h['driver']}"
        f"  devices {h['devices']}{slow}"
    )


HELP = (
    "keys: c cpus  h hctxs  t tags  d devices  k locks  s sort  r reverse  i IOPS  l slowest"
    "  w waits  q quit"
)


def renderable(
    frame: Frame,
    keys: Keys,
    views: list[str],
    interval: float,
    help_line: bool,
    width: int | None = None,
) -> Any:
    """The frame's header and the tables of ``views``; a table wider than ``width``
    drops columns from the right, never its label column or the one it is sorted by,
    and names what it dropped."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [Text(header_text(frame.header, interval))]
    for name in views:
        for t in frame.views[name]:
            parts.append(_rich_table(t, keys.sort.get(t.title), width))
    if help_line:
        parts.append(Text(HELP, style="dim"))
    return Group(*parts)


def _rich_table(t: Table, sort: tuple[int, bool] | None, width: int | None) -> Any:
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table as RichTable

    rows = [[_fmt(v) for v in r] for r in _sorted(t, sort)]
    sorted_by = sort[0] if sort is not None else -1
    heads = [
        col + (("v" if sort[1] else "^") if sort is not None and i == sorted_by else "")
        for i, col in enumerate(t.columns)
    ]

    def build(shown: list[int], caption: bool) -> Any:
        hidden = [t.columns[i] for i in range(len(t.columns)) if i not in shown]
        rt = RichTable(
            title=t.title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            caption=f"not shown (too narrow): {', '.join(hidden)}" if hidden and caption else None,
            caption_justify="left",
        )
        for i in shown:
            rt.add_column(
                heads[i], justify="left" if i == 0 else "right", no_wrap=True,
                min_width=len(heads[i]),
            )  # fmt: skip
        for r in rows:
            rt.add_row(*(r[i] for i in shown))
        return rt

    shown = list(range(len(t.columns)))
    if width is not None:
        console = Console(width=1 << 16)  # unclamped: the table's own width
        droppable = [i for i in reversed(shown) if i not in (0, sorted_by)]
        while (
            droppable
            and Measurement.get(console, console.options, build(shown, False)).maximum > width
        ):
            shown.remove(droppable.pop(0))
    return build(shown, True)


# -- the command -------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "top",
        help="a live view of a run: per-CPU and per-hctx rates, tags, devices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="segment, owner pid or a name's start")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS",
        help="seconds between two samples. Default: 1.0",
    )  # fmt: skip
    p.add_argument(
        "--once", action="store_true", help="one snapshot (after one interval), then exit"
    )
    p.add_argument("--json", action="store_true", help="snapshots as JSON, one object a line")
    p.add_argument(
        "--view", default=None, metavar="VIEWS",
        help="views to print when not on a terminal, comma-separated: cpus, hctxs, tags, "
        "devices, locks (or c, h, t, d, k). Default: all",
    )  # fmt: skip
    p.set_defaults(func=main)


def _views(spec: str | None) -> list[str]:
    if spec is None:
        return list(VIEWS.values())
    out = []
    for word in spec.split(","):
        v = word.strip()
        name = VIEWS.get(v, v)
        if name not in VIEWS.values():
            raise UsageError(f"--view: {v!r} is none of {', '.join(VIEWS.values())}")
        out.append(name)
    return out


def main(args: argparse.Namespace) -> int:
    if not MIN_INTERVAL <= args.interval <= 3600:
        raise UsageError(
            f"--interval: SECONDS must be in {MIN_INTERVAL:g}..3600, got {args.interval:g}"
        )
    views = _views(args.view)
    from mqrt.inspect.attach import RunView, resolve

    with RunView(resolve(args.run)) as view:
        top = Top(view)
        try:
            interactive = (
                not args.once and not args.json and sys.stdout.isatty() and sys.stdin.isatty()
            )
            if interactive:
                return live(top, args.interval)
            return plain(top, args.interval, views, args.once, args.json)
        finally:
            top.close()


def plain(top: Top, interval: float, views: list[str], once: bool, as_json: bool) -> int:
    """A snapshot every ``interval`` until the run ends (``once``: one)."""
    from rich.console import Console

    console = Console(highlight=False, width=200, color_system=None)
    while True:
        ended = top.v.ended()
        if not ended:
            time.sleep(interval)
        frame = top.frame()
        if as_json:
            print(json.dumps(frame.to_json()), flush=True)
        else:
            console.print(renderable(frame, Keys(), views, interval, False))
            sys.stdout.flush()
        if once:
            return 0
        if ended or top.v.ended():
            print(f"mqrt top: run {top.v.name} ended", file=sys.stderr)
            return 0


@contextlib.contextmanager
def cbreak(fd: int) -> Iterator[None]:
    """The terminal in cbreak mode (keys one by one, no echo; Ctrl-C still a signal),
    restored on every way out."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        with contextlib.suppress(termios.error):  # the terminal hung up: nothing to restore
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def keys_within(fd: int, timeout: float) -> str:
    """The keys typed within ``timeout`` seconds (returns at the first)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return ""
    try:
        return os.read(fd, 64).decode(errors="replace")
    except (BlockingIOError, InterruptedError):
        return ""


def live(top: Top, interval: float, read_keys: Callable[[int, float], str] = keys_within) -> int:
    """The view on a terminal: a frame every ``interval``, keys between them."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    fd = sys.stdin.fileno()
    keys = Keys()
    console = Console(highlight=False)
    ended = False
    try:
        with cbreak(fd), Live(console=console, screen=True, auto_refresh=False) as screen:
            screen.update(Text(f"mqrt top - {top.v.name}: sampling ..."), refresh=True)
            due = time.monotonic() + min(interval, FIRST_FRAME_S)
            frame: Frame | None = None
            while True:
                typed = read_keys(fd, due - time.monotonic())
                for k in typed:
                    if not keys.press(k, frame):
                        return 0
                if typed and frame is not None:
                    screen.update(
                        renderable(frame, keys, [keys.view], interval, True, console.width),
                        refresh=True,
                    )
                if time.monotonic() < due:
                    continue
                due += interval
                ended = top.v.ended()
                frame = top.frame()
                if ended:
                    frame.header["phase"] = "ended"
                shown = renderable(frame, keys, [keys.view], interval, not ended, console.width)
                if ended:
                    from rich.console import Group

                    shown = Group(shown, Text(f"run ended: {top.v.name}", style="bold"))
                screen.update(shown, refresh=True)
                if ended:
                    return 0
    except KeyboardInterrupt as exc:  # Ctrl-C quits as q does
        if isinstance(exc, signals.Stop) and exc.signum != signal.SIGINT:
            raise  # SIGTERM, SIGHUP: the command's usual end (128 + the signal)
        return 0
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        return 128 + signal.SIGHUP  # the terminal went away under the view
    finally:
        if ended:
            print(f"mqrt top: run {top.v.name} ended", file=sys.stderr)
