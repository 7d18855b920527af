"""The NVMe device's knobs: its service model, its arbitration, its workers.

Per command: a latency drawn from a seeded distribution (``fixed``, ``uniform``,
``exponential``, ``lognormal``) around ``latency_ns``; the controller serves at most
``channels`` commands at a time (its internal parallelism: dies, planes, channels);
an IOPS cap and a bandwidth cap (token buckets refilled continuously, a millisecond's
worth banked at most) hold fetching back when exceeded.  The defaults look like a fast
datacenter NVMe SSD doing 4 KiB random reads: 80 µs median-ish latency, 128 commands
in service, 1 M IOPS, 3.5 GB/s.  The model runs in the device workers' compiled engine
(:mod:`mqrt.device._nvme_engine`); the channels and buckets are shared by all workers.
"""

from __future__ import annotations

from mqrt.lib.knobs import Knob

LATENCY_DISTS = {"fixed": "fixed", "uniform": "uniform", "exponential": "exponential",
                 "exp": "exponential", "lognormal": "lognormal"}  # fmt: skip
#: The engine's code of each distribution.
LATENCY_DIST_CODES = {"fixed": 0, "uniform": 1, "exponential": 2, "lognormal": 3}

#: The device's knobs (the controller process reads them; `mqrt bench` exposes them).
DEVICE_KNOBS: tuple[Knob, ...] = (
    Knob("latency_ns", "int", 80_000,
         "Mean service time of a command in ns (0: complete at once). Default: 80000",
         0, 10_000_000_000),
    Knob("latency_dist", "choice", "lognormal",
         "Service-time distribution: fixed, uniform (0.5x..1.5x), exponential, lognormal. "
         "Default: lognormal", choices=LATENCY_DISTS),
    Knob("latency_sigma", "float", 0.25,
         "Shape of the lognormal distribution (sigma of the underlying normal). Default: 0.25",
         0.0, 4.0),
    Knob("channels", "int", 128, "Commands the device serves at once. Default: 128", 1, 65536),
    Knob("iops_max", "int", 1_000_000, "Device IOPS cap (0: none). Default: 1000000",
         0, 1 << 40),
    Knob("dev_mbps", "int", 3500, "Device bandwidth cap in MB/s (0: none). Default: 3500",
         0, 1 << 30),
    Knob("arbitration", "choice", "rr",
         "Submission queue arbitration: rr (round robin) or wrr (weighted, by queue "
         "priority). Default: rr", choices={"rr": "rr", "wrr": "wrr"}),
    Knob("arb_burst", "int", 0,
         "Arbitration burst: 2^n commands taken from one SQ per turn (7: no limit). "
         "Default: 0", 0, 7),
    Knob("wrr_weights", "str", "8,4,1",
         "WRR weights of high, medium, low priority queues (commands per round). "
         "Default: 8,4,1",
         check=lambda v: None if _weights_ok(v) else "expected three integers 1..256"),
    Knob("irq_coalesce_thr", "int", 0,
         "Interrupt coalescing threshold: completions per interrupt, 0's based "
         "(feature 08h THR; coalescing needs THR and TIME both non-zero). Default: 0",
         0, 255),
    Knob("irq_coalesce_time", "int", 0,
         "Interrupt coalescing time in 100 us units (feature 08h TIME; coalescing needs "
         "THR and TIME both non-zero). Default: 0", 0, 255),
    Knob("mdts", "int", 5,
         "Maximum Data Transfer Size the controller reports: 2^n pages of 4 KiB (0: no "
         "limit). Default: 5 (128 KiB)", 0, 15),
    Knob("device_workers", "int", 0,
         "Device worker threads serving the I/O queue pairs, each its own set (0: one "
         "per 4 I/O queue pairs, at most the host's cores). Default: 0", 0, 256),
    Knob("dev_timerslack_ns", "int", 1000,
         "Timer slack of the device workers' sleeps (the kernel's timerslack_ns): a "
         "larger slack lets a worker post completions due close together in one wake-up, "
         "trading completion-time precision for device CPU (a timed sleep costs ~20 us of "
         "CPU on a VM). Default: 1000", 1, 10_000_000),
    Knob("dev_seed", "int", 1, "Seed of the device's random draws. Default: 1", 0, 1 << 62),
    Knob("acl", "int", 3,
         "Abort Command Limit the controller reports in Identify Controller, 0's based: "
         "it refuses an Abort beyond acl + 1 outstanding ones. Default: 3 (the spec's "
         "recommended 4)", 0, 255),
)  # fmt: skip


def _weights_ok(text: str) -> bool:
    try:
        w = [int(x) for x in str(text).split(",")]
    except ValueError:
        return False
    return len(w) == 3 and all(1 <= x <= 256 for x in w)
