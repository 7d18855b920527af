"""The null_blk driver (``drivers/block/null_blk/main.c``): blk-mq's own test device.

null_blk is both a driver and its "hardware": requests complete inside the CPU that
issued them, inline (``irqmode=none``), through the block layer's completion path
(``softirq``), or from a timer ``completion_nsec`` later (``timer``).  In mqrt the
ops below run in the CPU worker processes; nothing else is needed, no device process.

Knobs carry null_blk's module-parameter names, units and defaults; the fault strings
``timeout``, ``requeue`` and ``init_hctx`` take the kernel's fault_attr form
``"<interval>,<probability>,<space>,<times>"``.

Deviations from Linux
    * No data, no zones, no memory backing, no badblocks; ``gb`` and ``blocksize`` only shape
      the offsets the I/O generator uses.
    * ``queue_mode`` is always 2 (blk-mq); ``mqrt bench --mode sq|raw`` provides the
      single-queue and bio-based comparisons instead.
    * Fault-injection state (``times``, ``space``, the interval counter) is shared by
      all CPUs in the arena, as the kernel's is global; the random draw is per CPU,
      seeded.
    * The ``mbps`` refill timer runs on the first CPU of the device's hctx 0.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Any

from mqrt.block.blk_mq import BlkMq
from mqrt.block.blk_mq_cpumap import HctxType, Topology, map_queue_types
from mqrt.block.blk_mq_setup import alloc_tag_set, init_queue
from mqrt.block.blk_mq_structs import (
    SHARED_TAG_MODEL_6X,
    SHARED_TAG_MODELS,
    HwCtx,
    HwCtxSpec,
    Request,
    RequestQueue,
    TagSet,
)
from mqrt.block.blk_mq_types import (
    BLK_DEF_MAX_SECTORS,
    SECTOR_SHIFT,
    BlkMqFlag,
    BlkMqOps,
    BlkStatus,
    EhRet,
)
from mqrt.block.blk_settings import blk_queue_max_hw_sectors
from mqrt.lib._atomic import AtomicView
from mqrt.lib.knobs import Knob, KnobError, KnobValues
from mqrt.lib.sbitmap import SbqGeneration
from mqrt.lib.shm import Arena, Layout, Region, cacheline_struct

IRQMODES = {"none": 0, "softirq": 1, "timer": 2, "0": 0, "1": 1, "2": 2}
IRQMODE_NAMES = {0: "none", 1: "softirq", 2: "timer"}
NULL_IRQ_NONE, NULL_IRQ_SOFTIRQ, NULL_IRQ_TIMER = 0, 1, 2
#: The mbps token bucket is refilled this many times a second.
TICKS_PER_SEC = 50
TIMER_INTERVAL_NS = 1_000_000_000 // TICKS_PER_SEC
#: null_blk's tag set timeout (ms).
NULLB_TIMEOUT_MS = 5_000


@dataclass(frozen=True)
class FaultAttr:
    """A fault_attr: fail one call in ``interval`` (after ``space`` bytes), with
    ``probability`` percent, at most ``times`` times (-1: no limit)."""

    interval: int
    probability: int
    space: int
    times: int

    @classmethod
    def parse(cls, text: str) -> FaultAttr:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 4:
            raise ValueError("expected '<interval>,<probability>,<space>,<times>'")
        interval, probability, space, times = (int(p) for p in parts)
        if interval < 1 or not 0 <= probability <= 100 or space < 0 or times < -1:
            raise ValueError(
                "interval >= 1, probability 0..100, space >= 0, times >= -1 (-1: no limit)"
            )
        return cls(interval, probability, space, times)

    def __str__(self) -> str:
        return f"{self.interval},{self.probability},{self.space},{self.times}"


def _fault_check(value: str) -> str | None:
    if value == "":
        return None
    try:
        FaultAttr.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def _fault(name: str, what: str) -> Knob:
    return Knob(
        name,
        "str",
        "",
        f"Fault injection for {what}: '<interval>,<probability>,<space>,<times>'. Default: off",
        check=_fault_check,
    )


#: null_blk's parameters (the ones mqrt models), with their help texts.
NULLB_KNOBS: tuple[Knob, ...] = (
    Knob("submit_queues", "int", 1, "Number of submission queues. Default: 1", 1, 1024),
    Knob(
        "poll_queues",
        "int",
        0,
        "Queues for polled I/O (hipri), after the submit queues. Default: 0",
        0,
        1024,
    ),
    Knob(
        "max_hw_queues",
        "int",
        0,
        "Most submission queues the tag set may get during the run (the timeline's "
        "nr_hw_queues=N, up to the CPU count; declared idle at set-up). Default: 0 (the "
        "CPU count when the timeline writes nr_hw_queues, else submit_queues)",
        0,
        1024,
    ),
    Knob("hw_queue_depth", "int", 64, "Queue depth for each hardware queue. Default: 64", 1, 65536),
    Knob(
        "irqmode",
        "choice",
        NULL_IRQ_SOFTIRQ,
        "IRQ completion handler. 0-none, 1-softirq, 2-timer. Default: softirq",
        choices=IRQMODES,
    ),
    Knob(
        "completion_nsec",
        "int",
        10_000,
        "Time in ns to complete a request in hardware (irqmode=timer). Default: 10,000ns",
        0,
        60_000_000_000,
    ),
    Knob("blocking", "bool", False, "Register as a blocking blk-mq driver device. Default: 0"),
    Knob("shared_tags", "bool", False, "Share tag set between devices for blk-mq. Default: 0"),
    Knob(
        "shared_tag_bitmap",
        "bool",
        False,
        "Use shared tag bitmap for all submission queues for blk-mq. Default: 0",
    ),
    Knob(
        "shared_tag_model",
        "choice",
        SHARED_TAG_MODEL_6X,
        "How shared_tag_bitmap shares the tags: 6.x (one tags and one request pool of "
        "hw_queue_depth for all hardware queues, Linux 5.16+) or 5.10 (each hardware "
        "queue keeps its tags and hw_queue_depth requests; their bitmaps are the tag "
        "set's, blk_mq_init_shared_sbitmap). Default: 6.x",
        choices={m: m for m in SHARED_TAG_MODELS},
    ),
    Knob("mbps", "int", 0, "Limit maximum bandwidth (in MiB/s). Default: 0 (no limit)", 0, 40960),
    Knob("no_sched", "bool", False, "No io scheduler (mqrt never has one). Default: 0"),
    Knob("nr_devices", "int", 1, "Number of devices to register. Default: 1", 1, 64),
    Knob("gb", "int", 250, "Size in GB. Default: 250", 1, 1 << 20),
    Knob(
        "blocksize",
        "int",
        512,
        "Logical block size in bytes (module parameter bs; configfs blocksize). Default: 512",
        512,
        4096,
    ),
    Knob(
        "max_sectors",
        "int",
        0,
        "Maximum size of a command (in 512B sectors); 0: the queue's default (255). Default: 0",
        0,
        BLK_DEF_MAX_SECTORS,
    ),
    Knob(
        "home_node",
        "int",
        -1,
        "Home node for the device (recorded only). Default: -1 (NUMA_NO_NODE)",
        -1,
        1024,
    ),
    _fault("timeout", "request timeouts (the request is started and never completed)"),
    _fault("requeue", "requeues (alternating BLK_STS_RESOURCE and a driver requeue)"),
    _fault("init_hctx", "hctx initialisation failures"),
)

#: Per device: the shared state of the three fault attrs and the mbps token bucket.
NULLB_SHARED = cacheline_struct(
    [("timeout_times", "<i8"), ("timeout_count", "<u8"), ("timeout_space", "<i8")],
    [("requeue_times", "<i8"), ("requeue_count", "<u8"), ("requeue_space", "<i8")],
    [("cur_bytes", "<i8")],
)


class NullbConfig(KnobValues):
    """One null_blk configuration (all devices alike), validated."""

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> NullbConfig:
        cfg = cls(values)
        if values["blocksize"] & (values["blocksize"] - 1):
            raise KnobError(
                f"blocksize: must be a power of two in 512..4096, got {values['blocksize']}"
            )
        return cfg

    def fault(self, name: str) -> FaultAttr | None:
        text = self.values[name]
        return FaultAttr.parse(text) if text else None


class NullbDevice:
    """One /dev/nullbN (struct nullb): its queue and its shared fault state; the
    queue's ``queuedata`` and every hctx's ``driver_data``."""

    q: RequestQueue  #: set once the queue is up

    def __init__(self, index: int, shared: Region):
        self.index = index
        self.shared = shared


class NullbOps(BlkMqOps):
    """null_blk's blk_mq_ops.  One instance serves every device of a configuration;
    per-CPU state (the random draws, requeue alternation) lives in the worker copy."""

    name = "nullb"
    _a: AtomicView  #: the arena's atomics, once attached (bind())

    def __init__(self, cfg: NullbConfig, seed: int = 0):
        self.cfg = cfg
        self.irqmode = cfg.irqmode
        self.completion_nsec = cfg.completion_nsec
        self.timeout_fault = cfg.fault("timeout")
        self.requeue_fault = cfg.fault("requeue")
        self.init_hctx_fault = cfg.fault("init_hctx")
        self.mbps = cfg.mbps
        #: Any per-request fault or throttling to evaluate (else the short path).
        self.faults = bool(self.timeout_fault or self.requeue_fault or self.mbps)
        self.seed = seed
        self.devices: list[NullbDevice] = []
        #: The queue counts in use (capped at the CPU count by setup()).
        self.submit_queues = cfg.submit_queues
        self.poll_queues = cfg.poll_queues
        self._rng = random.Random(seed)
        self._init_hctx_calls = 0
        self._requeue_selection: dict[tuple[int, int], int] = {}
        self._mq: BlkMq | None = None
        #: Faults this CPU's copy injected, per fault attr (its driver_stats)
        self.injected = {"timeout": 0, "requeue": 0}

    # -- the device side of the fault attrs (shared in the arena) -------------------------------

    def bind(self, arena: Arena, mq: BlkMq | None, cpu: int) -> None:
        """Attach this (forked) copy to the arena and its CPU."""
        self._a = arena.atomic
        self._mq = mq
        self._rng = random.Random(self.seed * 1_000_003 + cpu)

    def init_shared(self, arena: Arena) -> None:
        """Owner only: fault budgets and a full token bucket."""
        for dev in self.devices:
            v = arena.view(dev.shared)
            for name, attr in (("timeout", self.timeout_fault), ("requeue", self.requeue_fault)):
                if attr is not None:
                    v[f"{name}_times"] = attr.times
                    v[f"{name}_space"] = attr.space
            v["cur_bytes"] = mb_per_tick(self.mbps)
            del v

    def _should_fail(self, dev: NullbDevice, name: str, attr: FaultAttr, size: int) -> bool:
        """should_fail() of lib/fault-inject.c on the device's shared state."""
        a = self._a
        o = dev.shared.offsets()
        times_off = getattr(o, f"{name}_times")
        if a.read(times_off) == 0:
            return False
        space_off = getattr(o, f"{name}_space")
        space = _s64(a.read(space_off))
        if space > size:
            a.fetch_sub(space_off, size)
            return False
        if attr.interval > 1:
            count = a.fetch_add(getattr(o, f"{name}_count"), 1) + 1
            if count % attr.interval:
                return False
        if attr.probability <= self._rng.randrange(100):
            return False
        while True:  # atomic_dec_not_zero() unless unlimited (-1)
            times = _s64(a.read(times_off))
            if times == 0:
                return False
            if times == -1 or a.cmpxchg(times_off, times, times - 1) == times:
                self.injected[name] += 1
                return True

    def driver_stats(self) -> dict[str, int]:
        """The faults this CPU injected: ``timeout_faults``, ``requeue_faults``."""
        return {f"{name}_faults": n for name, n in self.injected.items()}

    # -- blk_mq_ops -------------------------------------------------------------------------------

    def init_hctx(self, hctx: HwCtxSpec, driver_data: Any, hctx_idx: int) -> int:
        """null_init_hctx(): -EFAULT when the init_hctx fault fires; otherwise the
        hctx's driver_data is its device (the nullb of ``hctx->queue->queuedata``)."""
        attr = self.init_hctx_fault
        if attr is not None and self._init_hctx_should_fail(attr):
            return -errno.EFAULT
        hctx.driver_data = hctx.queue.queuedata
        return 0

    def _init_hctx_should_fail(self, attr: FaultAttr) -> bool:
        """should_fail(&null_init_hctx_attr, 1), in the owner."""
        self._init_hctx_calls += 1
        if self._init_hctx_calls % attr.interval:
            return False
        if attr.times == 0 or attr.probability <= self._rng.randrange(100):
            return False
        if attr.times > 0:
            self.init_hctx_fault = FaultAttr(
                attr.interval, attr.probability, attr.space, attr.times - 1
            )
        return True

    def queue_rq(self, mq: BlkMq, hctx: HwCtx, rq: Request, last: bool) -> int:
        """null_queue_rq().  The request's status (``cmd->error``) starts as OK: the
        block layer zeroes it when the request is set up."""
        if self.faults:
            dev: NullbDevice = hctx.driver_data
            nbytes = rq.nr_bytes
            fake_timeout = self.timeout_fault is not None and self._should_fail(
                dev, "timeout", self.timeout_fault, nbytes
            )
            if self.requeue_fault is not None and self._should_fail(
                dev, "requeue", self.requeue_fault, nbytes
            ):
                # Alternate between the core's BUSY path and the driver's requeue path.
                key = (hctx.queue.index, hctx.index)
                sel = self._requeue_selection.get(key, 0) + 1
                self._requeue_selection[key] = sel
                if sel & 1:
                    return BlkStatus.RESOURCE
                mq.requeue_request(rq, True)
                return BlkStatus.OK
            if self.mbps:
                sts = self._handle_throttled(mq, dev, nbytes)
                if sts != BlkStatus.OK:
                    return sts
            rq.pdu[0] = fake_timeout  # type: ignore[index]  # before the request is visible
            mq.start_request(rq)
            if fake_timeout:
                return BlkStatus.OK
        else:
            mq.start_request(rq)
        irqmode = self.irqmode
        if irqmode == NULL_IRQ_NONE:
            mq.end_request(rq, 0)
        elif irqmode == NULL_IRQ_SOFTIRQ:
            mq.complete_request(rq)
        else:
            mq.sys.add_timer(
                mq.clock() + self.completion_nsec,
                self._timer_expired,
                rq.id,
                hctx.queue.index,
                rq.gen,
            )
        return 0

    def _timer_expired(self, rq_id: int, q: int, gen: int) -> None:
        """nullb_cmd_timer_expired(): the hrtimer fired on the issuing CPU."""
        mq = self._mq
        mq.complete_request(mq.rqs[q][rq_id], gen)  # type: ignore[union-attr]

    def _handle_throttled(self, mq: BlkMq, dev: NullbDevice, nbytes: int) -> int:
        """null_handle_throttled(): take the request's bytes from the bucket; when it
        runs dry stop the hw queues until the refill timer restarts them."""
        a = self._a
        off = dev.shared.offsets().cur_bytes
        if _s64(a.fetch_sub(off, nbytes)) - nbytes < 0:
            queue = mq.queues[dev.index]
            mq.stop_hw_queues(queue)
            if _s64(a.read(off)) > 0:  # raced with the refill
                mq.start_stopped_hw_queues(queue, True)
            return BlkStatus.DEV_RESOURCE
        return BlkStatus.OK

    def timer_interval_ns(self, q: int) -> int:
        """With ``mbps``, every device refills its token bucket TICKS_PER_SEC times a
        second."""
        return TIMER_INTERVAL_NS if self.mbps else 0

    def timer(self, mq: BlkMq, q: int) -> None:
        """nullb_bwtimer_fn(): refill the bucket and restart stopped queues."""
        dev = self.devices[q]
        self._a.set(dev.shared.offsets().cur_bytes, mb_per_tick(self.mbps))
        mq.start_stopped_hw_queues(mq.queues[q], True)

    def complete(self, mq: BlkMq, rq: Request) -> None:
        """null_complete_rq(): end the request with the command's status."""
        mq.end_request(rq)

    def timeout(self, mq: BlkMq, rq: Request, gen: int) -> EhRet:
        """null_timeout_rq(): fail the request with BLK_STS_TIMEOUT; complete it if
        the timeout was injected (otherwise its own completion is still coming and
        carries the error)."""
        if rq.pdu[0]:  # type: ignore[index]  # cmd->fake_timeout
            mq.complete_request(rq, gen, status=BlkStatus.TIMEOUT)
        elif rq.gen == gen:
            rq.status = BlkStatus.TIMEOUT
        return EhRet.DONE

    def map_queues(self, tset: TagSet) -> None:
        """null_map_queues(): DEFAULT = submit_queues, READ none, POLL = poll_queues.
        ``submit_queues`` follows the set's nr_hw_queues (nullb_update_nr_hw_queues())."""
        topo: Topology = tset.topology
        submit = self.submit_queues
        poll = self.poll_queues if tset.nr_maps > HctxType.POLL else 0
        if submit + poll != tset.nr_hw_queues:
            # nr_hw_queues was capped at the CPU count, or changed: the submit queues follow.
            submit = max(1, tset.nr_hw_queues - poll)
            self.submit_queues = submit
        map_queue_types(tset.map, topo, (submit, 0, poll))


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def mb_per_tick(mbps: int) -> int:
    return (1 << 20) // TICKS_PER_SEC * mbps


def parse_config(given: dict[str, Any]) -> NullbConfig:
    """The knobs given (names with dashes or underscores), validated, with defaults."""
    from mqrt.lib.knobs import parse_knobs

    return NullbConfig.from_values(parse_knobs(NULLB_KNOBS, given))


def setup(
    cfg: NullbConfig,
    layout: Layout,
    topology: Topology,
    *,
    rq_affinity: int = 1,
    timeout_ms: int = NULLB_TIMEOUT_MS,
    seed: int = 0,
    pool_limit_bytes: int | None = None,
    generation: SbqGeneration = SbqGeneration.CURRENT,
    async_depth: int = 0,
    nomerges: int = 0,
    elevator: str = "none",
    max_hw_queues: int = 0,
) -> tuple[NullbOps, list[RequestQueue]]:
    """null_add_dev() for every device: tag sets (one shared set with shared_tags),
    queues with their limits, and the fault state, declared in ``layout``.
    ``max_hw_queues``: the most submit queues a set may get during the run (0: the
    count cannot change); the sets are declared up to it."""
    ops = NullbOps(cfg, seed)
    flags = BlkMqFlag.SHOULD_MERGE  # null_init_tag_set()
    if cfg.blocking:
        flags |= BlkMqFlag.BLOCKING
    if cfg.shared_tag_bitmap:
        flags |= BlkMqFlag.TAG_HCTX_SHARED
    if cfg.no_sched:
        flags |= BlkMqFlag.NO_SCHED_BY_DEFAULT
    # null_validate_conf(): at most one submit (and poll) queue per CPU.
    submit = min(cfg.submit_queues, topology.nr_cpus)
    poll = min(cfg.poll_queues, topology.nr_cpus)
    ops.submit_queues, ops.poll_queues = submit, poll

    def new_set(name: str) -> TagSet:
        tset = TagSet(
            ops=ops,
            nr_hw_queues=submit + poll,
            queue_depth=cfg.hw_queue_depth,
            nr_maps=3 if poll else 1,
            cmd_size=8,  # struct nullb_cmd: the fake_timeout flag
            timeout_ms=timeout_ms,
            flags=flags,
            numa_node=cfg.home_node,
            name=name,
            pool_limit_bytes=pool_limit_bytes,
            generation=generation,
            shared_tag_model=cfg.shared_tag_model,
            max_hw_queues=max_hw_queues,
        )
        return alloc_tag_set(tset, layout, topology)

    shared_set = new_set("nullb_tag_set") if cfg.shared_tags else None
    queues = []
    for i in range(cfg.nr_devices):
        tset = shared_set if shared_set is not None else new_set(f"nullb{i}.tag_set")
        dev = NullbDevice(i, layout.add(f"nullb{i}.fault", NULLB_SHARED))
        dev.q = init_queue(
            tset,
            layout,
            f"nullb{i}",
            queuedata=dev,
            rq_affinity=rq_affinity,
            async_depth=async_depth,
            nomerges=nomerges,
            elevator=elevator,
        )
        null_set_max_sectors(dev.q, cfg.max_sectors, cfg.blocksize)
        queues.append(dev.q)
        ops.devices.append(dev)
    return ops, queues


def null_set_max_sectors(q: RequestQueue, max_sectors: int, blocksize: int) -> None:
    """null_add_dev()'s limit: the ``max_sectors`` knob, or the queue's hardware limit
    when 0 (255 sectors: blk_set_default_limits()), at most BLK_DEF_MAX_SECTORS and
    whole blocks, set with blk_queue_max_hw_sectors()."""
    if not max_sectors:
        max_sectors = q.limits.max_hw_sectors
    max_sectors = min(max_sectors, BLK_DEF_MAX_SECTORS)
    block_sectors = blocksize >> SECTOR_SHIFT
    blk_queue_max_hw_sectors(q, max_sectors - max_sectors % block_sectors)


def describe(cfg: NullbConfig) -> dict[str, Any]:
    """The configuration as the JSON report shows it (null_blk names and spellings)."""
    out = dict(cfg.values)
    out["irqmode"] = IRQMODE_NAMES[cfg.irqmode]
    return out
