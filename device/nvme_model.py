"""The NVMe device's service model: how long a command takes and how many run at once.

Per command: a latency drawn from a seeded distribution (``fixed``, ``uniform``,
``exponential``, ``lognormal``) around ``latency_ns``; the controller serves at most
``channels`` commands at a time (its internal parallelism: dies, planes, channels);
an IOPS cap and a bandwidth cap (token buckets refilled continuously) hold fetching
back when exceeded.  The defaults look like a fast datacenter NVMe SSD doing 4 KiB
random reads: 80 µs median-ish latency, 128 commands in service, 1 M IOPS, 3.5 GB/s.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from mqrt.lib.knobs import Knob

LATENCY_DISTS = {"fixed": "fixed", "uniform": "uniform", "exponential": "exponential",
                 "exp": "exponential", "lognormal": "lognormal"}  # fmt: skip

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
         "(feature 08h THR). Default: 0", 0, 255),
    Knob("irq_coalesce_time", "int", 0,
         "Interrupt coalescing time in 100 us units (feature 08h TIME, 0: off). Default: 0",
         0, 255),
    Knob("mdts", "int", 5,
         "Maximum Data Transfer Size the controller reports: 2^n pages of 4 KiB (0: no "
         "limit). Default: 5 (128 KiB)", 0, 15),
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


@dataclass
class ServiceModel:
    """Draws service times and keeps the IOPS and bandwidth buckets."""

    latency_ns: int
    latency_dist: str
    latency_sigma: float
    channels: int
    iops_max: int
    dev_mbps: int
    seed: int

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        mean = max(1, self.latency_ns)
        sigma = self.latency_sigma
        #: lognormal with this mean: mu = ln(mean) - sigma^2 / 2
        self._mu = math.log(mean) - sigma * sigma / 2
        self._iops_tokens = float(max(1, self.iops_max // 1000))
        self._bw_tokens = float(self.dev_mbps * 1000)  # bytes per microsecond * 1000
        self._last_refill = 0
        self._short = 0.0

    @classmethod
    def from_values(cls, v: dict[str, Any]) -> ServiceModel:
        return cls(
            v["latency_ns"], v["latency_dist"], v["latency_sigma"], v["channels"],
            v["iops_max"], v["dev_mbps"], v["dev_seed"],
        )  # fmt: skip

    def service_ns(self) -> int:
        """One command's service time."""
        mean = self.latency_ns
        if mean <= 0:
            return 0
        dist = self.latency_dist
        if dist == "fixed":
            return mean
        if dist == "uniform":
            return int(self.rng.uniform(0.5 * mean, 1.5 * mean))
        if dist == "exponential":
            return int(self.rng.expovariate(1.0 / mean))
        return int(self.rng.lognormvariate(self._mu, self.latency_sigma))

    def refill(self, now_ns: int) -> None:
        """Top up the buckets for the time passed (at most 1 ms worth banked)."""
        dt = now_ns - self._last_refill if self._last_refill else 0
        self._last_refill = now_ns
        if self.iops_max:
            cap = self.iops_max / 1000.0  # one millisecond's worth
            self._iops_tokens = min(cap, self._iops_tokens + dt * self.iops_max / 1e9)
        if self.dev_mbps:
            cap_b = self.dev_mbps * 1000.0  # bytes in one millisecond
            self._bw_tokens = min(cap_b, self._bw_tokens + dt * self.dev_mbps / 1000.0)

    def admit(self, nbytes: int) -> bool:
        """Take one command of ``nbytes`` from the buckets, or refuse (try later)."""
        if self.iops_max and self._iops_tokens < 1.0:
            self._short = (1.0 - self._iops_tokens) * 1e9 / self.iops_max
            return False
        if self.dev_mbps:
            need = min(nbytes, self.dev_mbps * 1000)  # a huge command waits for a full bucket
            if self._bw_tokens < need:
                self._short = (need - self._bw_tokens) * 1000 / self.dev_mbps
                return False
            self._bw_tokens -= nbytes
        if self.iops_max:
            self._iops_tokens -= 1.0
        return True

    def wait_ns(self) -> int:
        """After a refusal: how long until the buckets admit that command."""
        return max(1000, int(self._short))
