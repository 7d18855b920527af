"""Random block numbers for an I/O job, drawn the way fio's options say.

* fio's default random map, every block once per pass: here a keyed bijection of the
  block numbers (a few rounds of multiply-add and xor-shift on ``bits`` bits, blocks
  past the end skipped), a new key each pass.  The same holds for
  ``random_generator=lfsr``, fio's full-period generator without a map.
* ``norandommap``: uniform draws, with repeats.
* ``random_distribution``: ``zipf:θ`` by Gray et al.'s method ("Quickly generating
  billion-record synthetic databases", SIGMOD 1994, the method fio uses) and
  ``pareto:h`` as ``(n-1)·u^(log h / log(1-h))``, both scattered over the range by a
  keyed bijection so the hot blocks are not all at the start (fio hashes them too);
  ``normal:SIGMA`` centred on the middle, SIGMA percent of the range wide, wrapping;
  ``zoned:P/S:...`` (P percent of the I/Os in the next S percent of the range) and
  ``zoned_abs:P/SIZE:...`` (in the next SIZE bytes).

Everything is vectorised with numpy; the caller's generator seeds it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BlockSampler"]

#: fio sums zeta(n) over at most this many terms.
ZIPF_MAX_TERMS = 10_000_000
_ROUNDS = 3


class _Bijection:
    """A keyed permutation of ``[0, 2**bits)``."""

    def __init__(self, bits: int, rng: np.random.Generator) -> None:
        self.bits = max(bits, 1)
        self.mask = np.uint64((1 << self.bits) - 1)
        self.shift = np.uint64((self.bits + 1) // 2)
        keys = rng.integers(0, 1 << 62, size=(_ROUNDS, 2), dtype=np.uint64)
        self.keys = [(np.uint64(int(a) | 1), np.uint64(int(b))) for a, b in keys]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.uint64)
        for mul, add in self.keys:
            x = (x * mul + add) & self.mask
            x ^= x >> self.shift
        return x


class BlockSampler:
    """Block numbers in ``[0, n)`` per ``random_distribution`` (name, parameter,
    zones) and whether a random map holds (``randommap``)."""

    def __init__(
        self,
        n: int,
        rng: np.random.Generator,
        dist: tuple[str, float, tuple[tuple[float, float], ...]],
        randommap: bool,
        unit_bytes: int,
    ) -> None:
        self.n = max(1, n)
        self.rng = rng
        self.name, self.param, zones = dist
        self.bits = max(1, (self.n - 1).bit_length())
        self.randommap = randommap and self.name == "random"
        self._counter = 0
        self._left = np.empty(0, dtype=np.int64)
        # keyed only where used: uniform draws keep the generator's stream as it was
        uses_perm = self.randommap or self.name in ("zipf", "pareto")
        self._perm = _Bijection(self.bits, rng) if uses_perm else None
        if self.name == "zipf":
            terms = min(self.n, ZIPF_MAX_TERMS)
            theta = self.param
            self.zetan = float(np.sum(np.arange(1, terms + 1, dtype=np.float64) ** -theta))
            self.zeta2 = 1.0 + 0.5**theta
            self.alpha = 1.0 / (1.0 - theta)
            self.eta = (1.0 - (2.0 / self.n) ** (1.0 - theta)) / (1.0 - self.zeta2 / self.zetan)
        if self.name == "pareto":
            self.pow = math.log(self.param) / math.log(1.0 - self.param)
        if self.name in ("zoned", "zoned_abs"):
            starts, sizes, weights = [], [], []
            at = 0
            for pct, size in zones:
                blocks = (
                    round(self.n * size / 100) if self.name == "zoned" else int(size) // unit_bytes
                )
                blocks = max(1, min(blocks, self.n - at))
                starts.append(min(at, self.n - 1))
                sizes.append(blocks)
                weights.append(pct)
                at += blocks
            self.z_start = np.array(starts, dtype=np.int64)
            self.z_size = np.array(sizes, dtype=np.int64)
            w = np.array(weights, dtype=np.float64)
            self.z_p = w / w.sum()

    def draw(self, count: int) -> np.ndarray:
        """``count`` block numbers."""
        name = self.name
        if name == "random":
            if self.randommap:
                return self._permuted(count)
            return self.rng.integers(0, self.n, count)
        if name == "zipf":
            u = self.rng.random(count)
            uz = u * self.zetan
            tail = 1 + (self.n * (self.eta * u - self.eta + 1.0) ** self.alpha).astype(np.int64)
            rank = np.where(uz < 1.0, 1, np.where(uz < 1.0 + 0.5**self.param, 2, tail))
            return self._scatter(np.clip(rank - 1, 0, self.n - 1))
        if name == "pareto":
            u = self.rng.random(count)
            return self._scatter(((self.n - 1) * u**self.pow).astype(np.int64))
        if name == "normal":
            sd = self.n * self.param / 100.0
            x = np.floor(self.n / 2 + self.rng.standard_normal(count) * sd).astype(np.int64)
            return x % self.n
        zone = self.rng.choice(len(self.z_p), count, p=self.z_p)
        return self.z_start[zone] + (self.rng.random(count) * self.z_size[zone]).astype(np.int64)

    def _permuted(self, count: int) -> np.ndarray:
        """The next ``count`` blocks of the pass (a new pass, a new order)."""
        period = 1 << self.bits
        parts = [self._left]
        have = len(self._left)
        while have < count:
            take = min(period - self._counter, max(2 * (count - have), 64))
            idx = np.arange(self._counter, self._counter + take, dtype=np.uint64)
            self._counter += take
            assert self._perm is not None
            vals = self._perm(idx)
            vals = vals[vals < self.n].astype(np.int64)
            parts.append(vals)
            have += len(vals)
            if self._counter >= period:  # the pass is over: every block came once
                self._counter = 0
                self._perm = _Bijection(self.bits, self.rng)
        allv = np.concatenate(parts)
        self._left = allv[count:]
        return allv[:count]

    def _scatter(self, rank: np.ndarray) -> np.ndarray:
        """Rank -> block by a bijection of ``[0, n)`` (cycle walking)."""
        perm = self._perm
        assert perm is not None
        x = perm(rank)
        bad = x >= self.n
        while bad.any():
            x[bad] = perm(x[bad])
            bad = x >= self.n
        return x.astype(np.int64)
