"""fio's options inside a job file: what each means for mqrt.

A job file is read as fio reads it: fio's option names, aliases (``blocksize``,
``readwrite``, ``timeout`` ...) and value syntax (:mod:`mqrt.lib.fio_values`).  Each
option of a job section is one of:

* **honoured**: translated into ``mqrt bench`` options (``bs=4k,64k`` -> read and write
  block sizes, ``runtime=1m`` -> 60 s, ``numjobs=4`` -> 4 emulated CPUs ...);
* **no effect**: about files, the page cache, an engine or the host (``direct``,
  ``filename``, ``ioengine=libaio`` ...): accepted, with a one-line note on stderr;
* **refused**: it needs something mqrt does not emulate (``verify``, ``zonemode``,
  ``rw=trim``, ``ioengine=net`` ...): a one-line error naming the option and what is
  missing.  Any other fio option is refused as not emulated, never ignored.

An option that is not fio's but ``mqrt bench``'s (``irqmode``, ``cpus``, ``mode`` ...)
passes through, except where fio has an option of that name: there fio's meaning
wins (``blocksize``, ``timeout``) and the driver knob is command-line only.

Sweeps: in a job file a value in braces is a sweep, ``iodepth={1,4,16}`` or
``iodepth={1-16:x2}``, since a comma is fio's per-direction separator (``bs=4k,64k``);
``mqrt bench`` options that are not fio's keep plain comma lists (``irqmode=none,softirq``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from mqrt.lib.fio_values import (
    Percent,
    parse_bssplit,
    parse_fio_int,
    parse_fio_size,
    parse_fio_time_us,
    parse_size_or_percent,
    parse_size_range,
    per_direction,
)
from mqrt.lib.knobs import KnobError

__all__ = [
    "ALIASES",
    "FIO_FLAGS",
    "FIO_NAMES",
    "NO_EFFECT",
    "REFUSED",
    "Translated",
    "translate",
]


def _words(text: str) -> list[str]:
    return text.split()


#: Every option fio 3.33 knows (``fio --cmdhelp=all``), its aliases and the engine
#: options of the block engines.
FIO_NAMES = frozenset(
    _words(
        """allow_file_create allow_mounted_write allrandrepeat atomic ba block_error_percentiles bs
        bs_unaligned bsrange bssplit buffer_compress_chunk buffer_compress_percentage
        buffer_pattern buffered bwavgtime cgroup cgroup_nodelete cgroup_weight
        clat_percentiles clocksource continue_on_error cpumask cpus_allowed
        cpus_allowed_policy create_fsync create_on_open create_only create_serialize
        dedupe_global dedupe_mode dedupe_percentage dedupe_working_set_percentage
        description direct directory disable_bw_measurement disable_clat disable_lat
        disable_slat disk_util do_verify end_fsync error_dump exec_postrun exec_prerun
        exit_what exitall exitall_on_error experimental_verify fadvise_hint fallocate
        fdatasync file_append file_service_type filename filename_format filesize
        fill_device flow flow_id flow_sleep fsync fsync_on_close gid group_reporting
        gtod_cpu gtod_reduce ignore_error ignore_zone_limits invalidate io_size
        io_submit_mode iodepth iodepth_batch iodepth_batch_complete_max
        iodepth_batch_complete_min iodepth_low ioengine iopsavgtime ioscheduler
        job_max_open_zones kb_base lat_percentiles latency_percentile latency_run
        latency_target latency_window lockfile lockmem log_alternate_epoch
        log_alternate_epoch_clock_id log_avg_msec log_compression log_compression_cpus
        log_entries log_hist_coarseness log_hist_msec log_max_value log_offset log_prio
        log_store_compressed log_unix_epoch loops max_latency max_open_zones mem
        merge_blktrace_file merge_blktrace_iters merge_blktrace_scalars name new_group
        nice norandommap nrfiles numa_cpu_nodes numa_mem_policy number_ios numjobs
        offset offset_align offset_increment opendir openfiles overwrite per_job_logs
        percentage_random percentile_list pre_read prio prioclass profile ramp_time
        random_distribution random_generator randrepeat randseed rate rate_cycle
        rate_ignore_thinktime rate_iops rate_iops_min rate_min rate_process
        read_beyond_wp read_iolog read_iolog_chunked refill_buffers replay_align
        replay_no_stall replay_redirect replay_scale replay_skip replay_time_scale
        runtime rw rw_sequencer rwmixread rwmixwrite scramble_buffers serialize_overlap
        significant_figures size slat_percentiles startdelay stats steadystate
        steadystate_duration steadystate_ramp_time stonewall sync sync_file_range
        thinktime thinktime_blocks thinktime_blocks_type thinktime_iotime thinktime_spin
        thread time_based trim_backlog trim_backlog_batch trim_percentage
        trim_verify_zero uid unified_rw_reporting unique_filename unit_base unlink
        unlink_each_loop verify verify_async verify_backlog verify_backlog_batch
        verify_dump verify_fatal verify_interval verify_offset verify_only
        verify_pattern verify_state_load verify_state_save wait_for write_barrier
        write_bw_log write_hint write_hist_log write_iolog write_iops_log write_lat_log
        zero_buffers zone_reset_frequency zone_reset_threshold zonecapacity zonemode
        zonerange zonesize zoneskip hipri fixedbufs registerfiles sqthread_poll
        sqthread_poll_cpu nonvectored uncached nowait force_async userspace_reap"""
    )
)

#: fio's other names of an option -> its name.
ALIASES: Mapping[str, str] = {
    "blocksize": "bs",
    "readwrite": "rw",
    "timeout": "runtime",
    "blocksize_range": "bsrange",
    "blockalign": "ba",
    "blocksize_unaligned": "bs_unaligned",
    "iodepth_batch_submit": "iodepth_batch",
    "iodepth_batch_complete": "iodepth_batch_complete_min",
    "wait_for_previous": "stonewall",
    "io_limit": "io_size",
    "threads": "thread",
    "fill_fs": "fill_device",
    "iomem": "mem",
    "ratemin": "rate_min",
    "ratecycle": "rate_cycle",
    "ss": "steadystate",
    "ss_dur": "steadystate_duration",
    "ss_ramp": "steadystate_ramp_time",
}

#: Options fio takes bare (``stonewall`` alone means ``stonewall=1``).
FIO_FLAGS = frozenset(
    _words(
        """stonewall wait_for_previous new_group time_based group_reporting norandommap thread
        exitall refill_buffers zero_buffers hipri fixedbufs registerfiles sqthread_poll
        write_lat_log write_bw_log write_iops_log write_hist_log"""
    )
)

_NO_FILES = "the target is the emulated device, there are no files"
_NO_CACHE = "there is no page cache: every I/O is direct"
_NO_DATA = "there is no data: the devices keep none"
_NO_HOST = "the emulation has no such host setting"

#: fio options accepted without effect in an emulation -> why.
NO_EFFECT: Mapping[str, str] = {
    "direct": _NO_CACHE,
    "buffered": _NO_CACHE,
    "invalidate": _NO_CACHE,
    "fadvise_hint": _NO_CACHE,
    "pre_read": _NO_CACHE,
    "filename": _NO_FILES,
    "directory": _NO_FILES,
    "filesize": _NO_FILES,
    "nrfiles": _NO_FILES,
    "openfiles": _NO_FILES,
    "file_service_type": _NO_FILES,
    "filename_format": _NO_FILES,
    "unique_filename": _NO_FILES,
    "opendir": _NO_FILES,
    "lockfile": _NO_FILES,
    "create_on_open": _NO_FILES,
    "create_serialize": _NO_FILES,
    "create_fsync": _NO_FILES,
    "create_only": _NO_FILES,
    "allow_file_create": _NO_FILES,
    "allow_mounted_write": _NO_FILES,
    "unlink": _NO_FILES,
    "unlink_each_loop": _NO_FILES,
    "fallocate": _NO_FILES,
    "fsync": _NO_FILES,
    "fdatasync": _NO_FILES,
    "end_fsync": _NO_FILES,
    "fsync_on_close": _NO_FILES,
    "sync": _NO_FILES,
    "write_barrier": _NO_FILES,
    "sync_file_range": _NO_FILES,
    "overwrite": _NO_FILES,
    "write_hint": _NO_FILES,
    "mem": _NO_DATA,
    "lockmem": _NO_DATA,
    "zero_buffers": _NO_DATA,
    "refill_buffers": _NO_DATA,
    "scramble_buffers": _NO_DATA,
    "buffer_pattern": _NO_DATA,
    "buffer_compress_percentage": _NO_DATA,
    "buffer_compress_chunk": _NO_DATA,
    "dedupe_percentage": _NO_DATA,
    "dedupe_mode": _NO_DATA,
    "dedupe_working_set_percentage": _NO_DATA,
    "dedupe_global": _NO_DATA,
    "serialize_overlap": _NO_DATA,
    "thread": "each emulated CPU is a process; a job runs inside it either way",
    "name": "a job is named by its [section]",
    "description": "free text, not shown in the report",
    "nice": _NO_HOST,
    "prio": _NO_HOST,
    "prioclass": _NO_HOST,
    "uid": _NO_HOST,
    "gid": _NO_HOST,
    "gtod_cpu": _NO_HOST,
    "clocksource": "times are CLOCK_MONOTONIC",
    "disk_util": "disk_util is always reported",
    "exitall": "every job of a group ends at its runtime",
    "group_reporting": "the report already merges a job's clones (its CPUs) into one",
    "cpus_allowed_policy": "numjobs clones already run one per emulated CPU (split)",
    "stats": "statistics are always collected",
    "significant_figures": "the report prints fio's default precision",
    "fixedbufs": "an io_uring setting; there is no engine",
    "registerfiles": "an io_uring setting; there is no engine",
    "sqthread_poll": "an io_uring setting; there is no engine",
    "sqthread_poll_cpu": "an io_uring setting; there is no engine",
    "nonvectored": "an io_uring setting; there is no engine",
    "uncached": "an io_uring setting; there is no engine",
    "nowait": "an engine setting; there is no engine",
    "force_async": "an io_uring setting; there is no engine",
    "userspace_reap": "a libaio setting; there is no engine",
    "io_submit_mode": "I/O is submitted inline on each emulated CPU",
    "iodepth_batch_complete_max": "completions are reaped as they come, all of them",
}

#: ioengines of block I/O: no effect (the emulated blk-mq is the engine).
BLOCK_ENGINES = frozenset(
    _words(
        """libaio io_uring sync psync vsync pvsync pvsync2 posixaio mmap null splice sg solarisaio
        windowsaio"""
    )
)

#: Engines of block devices that need what mqrt does not emulate -> why.
ENGINES_REFUSED: Mapping[str, str] = {
    "sg": "SCSI generic passthrough commands are not emulated",
    "io_uring_cmd": "NVMe passthrough commands (uring_cmd) are not emulated",
    "xnvme": "NVMe passthrough commands (xnvme) are not emulated",
}

_VERIFY = "data verification needs a data-backed device, which mqrt does not emulate"
_ZONED = "zoned block devices are not emulated"
_IOLOG = "I/O log replay and recording are not emulated"
_TRIM = "trim (discard) is not emulated"

#: fio options refused with a reason (what mqrt does not emulate).
REFUSED: Mapping[str, str] = {
    **{
        k: _VERIFY
        for k in _words(
            """verify do_verify verify_async verify_backlog verify_backlog_batch verify_dump
        verify_fatal verify_interval verify_offset verify_only verify_pattern
        verify_state_load verify_state_save experimental_verify trim_verify_zero"""
        )
    },
    **{
        k: _ZONED
        for k in _words(
            """zonemode zonesize zonerange zonecapacity zoneskip max_open_zones job_max_open_zones
        ignore_zone_limits zone_reset_frequency zone_reset_threshold read_beyond_wp"""
        )
    },
    **{
        k: _IOLOG
        for k in _words(
            """read_iolog read_iolog_chunked write_iolog replay_align replay_no_stall
        replay_redirect replay_scale replay_skip replay_time_scale merge_blktrace_file
        merge_blktrace_iters merge_blktrace_scalars"""
        )
    },
    **{k: _TRIM for k in ["trim_backlog", "trim_backlog_batch", "trim_percentage"]},
    "exec_prerun": "runs a host command; not part of an emulation",
    "exec_postrun": "runs a host command; not part of an emulation",
    "cgroup": "cgroups are not emulated",
    "cgroup_weight": "cgroups are not emulated",
    "cgroup_nodelete": "cgroups are not emulated",
    "numa_cpu_nodes": "NUMA placement is not emulated",
    "numa_mem_policy": "NUMA placement is not emulated",
    "fill_device": "the emulated devices never fill up (they keep no data)",
    "file_append": _NO_FILES,
    "profile": "fio's built-in profiles are not emulated",
    "atomic": "atomic writes are not emulated",
    "bs_unaligned": "I/O is always sector aligned",
    "ba": "random offsets are always aligned to the block size",
    "rate_min": "a minimum rate ends a job that falls below it; mqrt jobs are never failed",
    "rate_iops_min": "a minimum rate ends a job that falls below it; mqrt jobs are never failed",
    "rate_cycle": "a minimum rate ends a job that falls below it; mqrt jobs are never failed",
    "flow": "fio's flow control between jobs is not emulated",
    "flow_id": "fio's flow control between jobs is not emulated",
    "flow_sleep": "fio's flow control between jobs is not emulated",
    "log_prio": "I/O priorities (cmdprio) are not emulated",
    "prio": "I/O priorities (cmdprio) are not emulated",
    "prioclass": "I/O priorities (cmdprio) are not emulated",
    "continue_on_error": "an I/O error ends no mqrt job: errors are counted, always",
    "exit_what": "jobs are never ended early by another job's exit",
    "exitall": "jobs are never ended early by another job's exit",
    "latency_target": "fio's latency-target depth search is not emulated",
    "latency_window": "fio's latency-target depth search is not emulated",
    "latency_percentile": "fio's latency-target depth search is not emulated",
    "latency_run": "fio's latency-target depth search is not emulated",
    "steadystate": "fio's steady-state detection is not emulated",
    "steadystate_duration": "fio's steady-state detection is not emulated",
    "steadystate_ramp_time": "fio's steady-state detection is not emulated",
    "wait_for": "a job starts with its group; waiting for a named job is not emulated",
}

#: rw values fio knows that mqrt refuses -> why.
_RW_REFUSED = {
    "trim": _TRIM,
    "randtrim": _TRIM,
    "trimwrite": _TRIM,
    "randtrimwrite": _TRIM,
}
_RW = {"read", "write", "randread", "randwrite", "rw", "readwrite", "randrw"}

#: Options whose values the report takes as flags (the output side renders them).
REPORT_OPTIONS = frozenset(
    _words(
        """clat_percentiles lat_percentiles slat_percentiles disable_lat disable_clat disable_slat
        gtod_reduce write_lat_log write_bw_log write_iops_log write_hist_log
        log_avg_msec log_hist_msec per_job_logs log_offset log_unix_epoch
        unified_rw_reporting"""
    )
)


@dataclass
class Translated:
    """A job section in ``mqrt bench`` options."""

    #: mqrt option -> value (a string a Knob parses; sweeps as comma lists).
    options: dict[str, str] = field(default_factory=dict)
    #: One-line notes for stderr (``file:line: option: no effect: why``).
    notes: list[str] = field(default_factory=list)
    #: Report options (``clat_percentiles``, ``write_lat_log`` ...) -> value.
    report: dict[str, str] = field(default_factory=dict)
    #: The job waits for the jobs before it (stonewall / wait_for_previous / new_group).
    stonewall: bool = False


def _sweep(value: str) -> list[str] | None:
    v = value.strip()
    if v.startswith("{") and v.endswith("}"):
        from mqrt.bench.sweep import expand_values
        from mqrt.lib.knobs import Knob

        return expand_values(Knob("x", "int", 0, ""), v[1:-1])
    return None


class _Ctx:
    def __init__(self, at: Callable[[str], str], kb_base: int) -> None:
        self.at = at
        self.kb_base = kb_base
        self.out = Translated()
        self.bs: list[str | None] = [None, None, None]  #: per direction, fio syntax
        self.bssplit: list[str | None] | None = None
        self.rate_iops: list[int | None] | None = None
        self.job_knobs: frozenset[str] = frozenset()


def _err(name: str, why: str) -> KnobError:
    return KnobError(f"{name}: {why}")


def _size(name: str, text: str, kb_base: int) -> int:
    try:
        return parse_fio_size(text, kb_base)
    except ValueError as exc:
        raise _err(name, str(exc)) from None


def _time_s(name: str, text: str, unit: str) -> str:
    try:
        return repr(parse_fio_time_us(text, unit) / 1e6)
    except ValueError as exc:
        raise _err(name, str(exc)) from None


def _int(name: str, text: str) -> int:
    try:
        return parse_fio_int(text)
    except ValueError:
        raise _err(name, f"must be an integer, got {text!r}") from None


def translate(
    options: Mapping[str, str],
    mqrt_names: Mapping[str, object],
    at: Callable[[str], str],
    job_knobs: Collection[str] = (),
) -> Translated:
    """``options`` (a job section's, canonical names, file order) as ``mqrt bench``
    options; ``mqrt_names``: mqrt's own option names that fio does not have;
    ``at(option)``: its ``file:line``; ``job_knobs``: every option mqrt's job takes (a
    reporting option of that name is passed on as it is, the others go to
    :attr:`Translated.report`).  A refused or bad option is a KnobError
    ``file:line: option: why``."""
    kb_base = 1024
    if "kb_base" in options:
        kb_text = options["kb_base"].strip()
        if kb_text not in ("1000", "1024"):
            raise KnobError(f"{at('kb_base')}: kb_base: must be 1000 or 1024, got {kb_text!r}")
        kb_base = int(kb_text)
    ctx = _Ctx(at, kb_base)
    ctx.job_knobs = frozenset(job_knobs)
    ctx.out.options["norandommap"] = "0"  # fio's default: a random map
    # the engine first: another engine's options are refused for the engine's reason
    order = sorted(options, key=lambda k: k != "ioengine")
    for raw_name in order:
        value = options[raw_name]
        name = ALIASES.get(raw_name, raw_name)
        try:
            _one(ctx, raw_name, name, value, mqrt_names)
        except KnobError as exc:
            msg = str(exc)
            if not msg.startswith(f"{raw_name}:") and msg.startswith(f"{name}:"):
                msg = raw_name + msg[len(name) :]
            raise KnobError(f"{at(raw_name)}: {msg}") from None
    _blocksizes(ctx, options)
    _rate_cap(ctx)
    sized = {"size", "io_size", "io_limit", "number_ios"} & set(options)
    if sized and "time_based" not in options:
        # fio's default: a job with a size ends when it has done it (or at runtime)
        ctx.out.options["time_based"] = "0"
    return ctx.out


def _one(ctx: _Ctx, raw: str, name: str, value: str, mqrt_names: Mapping[str, object]) -> None:
    out = ctx.out
    if name == "kb_base":
        return
    if name not in FIO_NAMES:
        if raw in mqrt_names:  # an mqrt option that is not fio's: passes through
            out.options[raw] = value
            return
        raise KnobError(f"unknown option {raw!r} (neither fio's nor mqrt bench's)")
    if name in REFUSED:
        raise _err(raw, REFUSED[name])
    if name == "ioengine":
        engine = value.strip().lower()
        if engine in ENGINES_REFUSED:
            raise _err(raw, f"ioengine={engine}: {ENGINES_REFUSED[engine]}")
        if engine in BLOCK_ENGINES:
            out.notes.append(
                f"{ctx.at(raw)}: ioengine={engine}: no effect: "
                "I/O goes through the emulated blk-mq and driver"
            )
            return
        raise _err(
            raw,
            f"ioengine={engine}: mqrt emulates block I/O only "
            f"({', '.join(sorted(BLOCK_ENGINES))} have no effect)",
        )
    if name in NO_EFFECT:
        out.notes.append(f"{ctx.at(raw)}: {raw}: no effect: {NO_EFFECT[name]}")
        return
    if name in REPORT_OPTIONS:
        if name in ctx.job_knobs:
            out.options[name] = value
        else:
            out.report[name] = value
        return
    handler = _HANDLERS.get(name)
    if handler is None:
        raise _err(raw, "not emulated by mqrt")
    sweep = _sweep(value)
    if sweep is not None:
        if name not in _SWEEPABLE:
            raise _err(raw, "cannot be swept")
        values = []
        for v in sweep:
            sub = _Ctx(ctx.at, ctx.kb_base)
            handler(sub, name, v)
            values.append(sub.out.options[_SWEEPABLE[name]])
        out.options[_SWEEPABLE[name]] = ",".join(values)
        if name == "bs":
            ctx.bs = [None, None, None]
        return
    if "," in value and name not in _PER_DIRECTION:
        raise _err(
            raw,
            f"a comma list is fio's per-direction syntax, which {raw} does not take; "
            f"sweep with {raw}={{{value}}}",
        )
    handler(ctx, name, value)


def _rw(ctx: _Ctx, name: str, value: str) -> None:
    mode, colon, mod = value.strip().partition(":")
    mode = mode.strip().lower()
    if mode in _RW_REFUSED:
        raise _err(name, f"rw={mode}: {_RW_REFUSED[mode]}")
    if mode not in _RW:
        raise _err(
            name, f"must be read|write|randread|randwrite|rw|readwrite|randrw, got {value!r}"
        )
    ctx.out.options["rw"] = mode
    if colon:
        mod = mod.strip()
        negative = mod.startswith("-") and not mode.startswith("rand")
        n = _size(name, mod[1:] if negative else mod, ctx.kb_base)
        ctx.out.options["rw_modifier"] = str(-n if negative else n)


def _bs(ctx: _Ctx, name: str, value: str) -> None:
    try:
        dirs = per_direction(value)
    except ValueError as exc:
        raise _err(name, str(exc)) from None
    for i, d in enumerate(dirs):
        if d is not None:
            try:
                parse_size_range(d, ctx.kb_base)
            except ValueError as exc:
                raise _err(name, str(exc)) from None
            ctx.bs[i] = d
    if name == "bs" and all(d is not None and "-" not in d and ":" not in d for d in dirs):
        ctx.out.options["bs"] = str(_size(name, dirs[0] or "", ctx.kb_base))


def _bssplit(ctx: _Ctx, name: str, value: str) -> None:
    try:
        dirs = per_direction(value)
        for d in dirs:
            if d is not None:
                parse_bssplit(d, ctx.kb_base)
    except ValueError as exc:
        raise _err(name, str(exc)) from None
    ctx.bssplit = dirs


def _blocksizes(ctx: _Ctx, options: Mapping[str, str]) -> None:
    """bs / bsrange / bssplit -> ``bs`` (the smallest) and ``blocksizes`` (per direction)."""
    if ctx.bssplit is None and ctx.bs == [None, None, None]:
        return
    kb = ctx.kb_base
    dirs: list[str] = []
    for i in range(2):
        split = ctx.bssplit[i] if ctx.bssplit else None
        if split:
            pairs = parse_bssplit(split, kb)
            dirs.append(":".join(f"{s}/{p}" for s, p in pairs))
        else:
            r = parse_size_range(ctx.bs[i] or "4096", kb)
            dirs.append(f"{r.lo}-{r.hi}")
    text = ",".join(dirs)
    fixed = [d.split("-") for d in dirs if "/" not in d]
    if ctx.bssplit is None and all(lo == hi for lo, hi in fixed) and len(set(dirs)) == 1:
        ctx.out.options["bs"] = fixed[0][0]
        return
    from mqrt.workers.ioengine import parse_blocksizes

    try:
        read, write = parse_blocksizes(text)
    except ValueError as exc:
        which = "bssplit" if ctx.bssplit else "bs"
        raise KnobError(f"{ctx.at(which)}: {which}: {exc}") from None
    ctx.out.options["bs"] = str(min(read.lo, write.lo))
    ctx.out.options["blocksizes"] = text


def _direct_copy(target: str) -> Callable[[_Ctx, str, str], None]:
    def handler(ctx: _Ctx, name: str, value: str) -> None:
        ctx.out.options[target] = value.strip()

    return handler


def _int_copy(target: str) -> Callable[[_Ctx, str, str], None]:
    def handler(ctx: _Ctx, name: str, value: str) -> None:
        ctx.out.options[target] = str(_int(name, value))

    return handler


def _seconds(target: str) -> Callable[[_Ctx, str, str], None]:
    def handler(ctx: _Ctx, name: str, value: str) -> None:
        ctx.out.options[target] = _time_s(name, value, "s")

    return handler


def _size_pct(target: str, pct_target: str | None) -> Callable[[_Ctx, str, str], None]:
    def handler(ctx: _Ctx, name: str, value: str) -> None:
        try:
            v = parse_size_or_percent(value, ctx.kb_base)
        except ValueError as exc:
            raise _err(name, str(exc)) from None
        if isinstance(v, Percent):
            if pct_target is None:
                raise _err(name, f"takes no percentage, got {value!r}")
            ctx.out.options[pct_target] = repr(v.pct)
            ctx.out.options.pop(target, None)
        else:
            ctx.out.options[target] = str(v)
            if pct_target:
                ctx.out.options.pop(pct_target, None)

    return handler


def _rwmixwrite(ctx: _Ctx, name: str, value: str) -> None:
    n = _int(name, value)
    if not 0 <= n <= 100:
        raise _err(name, f"must be 0..100, got {value!r}")
    ctx.out.options["rwmixread"] = str(100 - n)


def _numjobs(ctx: _Ctx, name: str, value: str) -> None:
    n = _int(name, value)
    if n < 1:
        raise _err(name, f"must be >= 1, got {value!r}")
    ctx.out.options["cpus"] = str(n)


def _stonewall(ctx: _Ctx, name: str, value: str) -> None:
    ctx.out.stonewall = value.strip() not in ("0", "")


def _rate_iops(ctx: _Ctx, name: str, value: str) -> None:
    try:
        dirs = per_direction(value)
    except ValueError as exc:
        raise _err(name, str(exc)) from None
    ctx.rate_iops = [None if d is None else _int(name, d) for d in dirs[:2]]


def _rate_cap(ctx: _Ctx) -> None:
    """fio caps each direction: a one-direction job's cap is mqrt's job cap
    (``rate_iops``), a mixed job's go per direction (``rate_iops_rw``)."""
    if ctx.rate_iops is None:
        return
    rw = ctx.out.options.get("rw", "randread")
    read, write = ctx.rate_iops
    if rw in ("read", "randread"):
        if read is not None:
            ctx.out.options["rate_iops"] = str(read)
    elif rw in ("write", "randwrite"):
        if write is not None:
            ctx.out.options["rate_iops"] = str(write)
    else:
        ctx.out.options["rate_iops_rw"] = f"{read or 0},{write or 0}"


def _rate(ctx: _Ctx, name: str, value: str) -> None:
    try:
        dirs = per_direction(value)
    except ValueError as exc:
        raise _err(name, str(exc)) from None
    read, write = (0 if d is None else _size(name, d, ctx.kb_base) for d in dirs[:2])
    ctx.out.options["rate"] = f"{read},{write}"


def _micros(target: str) -> Callable[[_Ctx, str, str], None]:
    def handler(ctx: _Ctx, name: str, value: str) -> None:
        try:
            ctx.out.options[target] = str(parse_fio_time_us(value, "us"))
        except ValueError as exc:
            raise _err(name, str(exc)) from None

    return handler


def _randseed(ctx: _Ctx, name: str, value: str) -> None:
    ctx.out.options["randseed"] = str(_int(name, value))


def _randrepeat(ctx: _Ctx, name: str, value: str) -> None:
    if value.strip() in ("0", "false", "off", "no"):
        ctx.out.options.setdefault("randseed", str(random.getrandbits(32)))


_HANDLERS: dict[str, Callable[[_Ctx, str, str], None]] = {
    "rw": _rw,
    "bs": _bs,
    "bsrange": _bs,
    "bssplit": _bssplit,
    "iodepth": _int_copy("iodepth"),
    "iodepth_batch": _int_copy("iodepth_batch_submit"),
    "iodepth_batch_complete_min": _int_copy("iodepth_batch_complete"),
    "rwmixread": _int_copy("rwmixread"),
    "rwmixwrite": _rwmixwrite,
    "runtime": _seconds("runtime"),
    "ramp_time": _seconds("ramp_time"),
    "time_based": _direct_copy("time_based"),
    "size": _size_pct("size", "size_pct"),
    "offset": _size_pct("offset", "offset_pct"),
    "io_size": _size_pct("io_size", None),
    "number_ios": _int_copy("number_ios"),
    "loops": _int_copy("loops"),
    "numjobs": _numjobs,
    "stonewall": _stonewall,
    "new_group": _stonewall,
    "rate_iops": _rate_iops,
    "randseed": _randseed,
    "percentile_list": _direct_copy("percentile_list"),
    "cpus_allowed": _direct_copy("cpus_allowed"),
    "hipri": _direct_copy("hipri"),
    "norandommap": _direct_copy("norandommap"),
    "rate": _rate,
    "rate_process": _direct_copy("rate_process"),
    "thinktime": _micros("thinktime"),
    "thinktime_spin": _micros("thinktime_spin"),
    "thinktime_blocks": _int_copy("thinktime_blocks"),
    "thinktime_blocks_type": _direct_copy("thinktime_blocks_type"),
    "iodepth_low": _int_copy("iodepth_low"),
    "offset_increment": _size_pct("offset_increment", None),
    "random_distribution": _direct_copy("random_distribution"),
    "random_generator": _direct_copy("random_generator"),
    "ioscheduler": _direct_copy("scheduler"),
}
# randrepeat=0 asks for a new seed each run: honoured; 1 (fio's default) is the rule.
_HANDLERS["randrepeat"] = _randrepeat

#: fio options whose value may be a ``{...}`` sweep -> the mqrt option swept.
_SWEEPABLE = {
    "bs": "bs",
    "iodepth": "iodepth",
    "iodepth_batch": "iodepth_batch_submit",
    "iodepth_batch_complete_min": "iodepth_batch_complete",
    "rwmixread": "rwmixread",
    "rwmixwrite": "rwmixread",
    "runtime": "runtime",
    "ramp_time": "ramp_time",
    "size": "size",
    "numjobs": "cpus",
    "rw": "rw",
    "ioscheduler": "scheduler",
}
#: fio options that take fio's read,write,trim comma list.
_PER_DIRECTION = frozenset(
    {"bs", "bsrange", "bssplit", "rate_iops", "rate", "rate_min", "rate_iops_min"}
)
