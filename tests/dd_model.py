"""A deliberately simple model of mq-deadline's rules (Linux v6.1, one priority
level), for checking mqrt.block.mq_deadline against: plain Python lists and sorted(),
no shared memory, no links, no lock.

The sort order of a direction is ``sorted()`` of its queued requests by (sector, the
time it entered the sort list): of equal sectors the one added last comes last.
"""

from __future__ import annotations

from dataclasses import dataclass

READ, WRITE = 0, 1
U32 = 0xFFFF_FFFF
MS = 1_000_000


@dataclass
class ModelRq:
    dir: int
    sector: int
    end: int
    fifo_time: int
    stamp: int  # when it entered the sort list


class DdModel:
    def __init__(self, nr_requests: int):
        self.nr = nr_requests
        self.rqs: dict[int, ModelRq] = {}  # requests on the FIFO/sort lists
        self.fifo: list[list[int]] = [[], []]
        self.dispatch_list: list[int] = []
        self.next_rq: list[int | None] = [None, None]
        self.batching = 0
        self.starved = 0
        self.last_dir = WRITE
        self.expire = [500 * MS, 5000 * MS]
        self.fifo_batch = 16
        self.writes_starved = 2
        self.front_merges = 1
        self.async_depth = max(1, 3 * nr_requests // 4)
        self.counted: set[int] = set()  # inserted and not yet finished
        self.inserted = self.merged = self.dispatched = self.completed = 0
        self._stamp = 0

    # -- helpers -------------------------------------------------------------------

    def sort_order(self, d: int) -> list[int]:
        mine = [rq for rq, m in self.rqs.items() if m.dir == d]
        return sorted(mine, key=lambda rq: (self.rqs[rq].sector, self.rqs[rq].stamp))

    def latter(self, rq: int) -> int | None:
        order = self.sort_order(self.rqs[rq].dir)
        i = order.index(rq)
        return order[i + 1] if i + 1 < len(order) else None

    def former(self, rq: int) -> int | None:
        order = self.sort_order(self.rqs[rq].dir)
        i = order.index(rq)
        return order[i - 1] if i > 0 else None

    def _stamp_next(self) -> int:
        self._stamp += 1
        return self._stamp

    def _remove(self, rq: int) -> None:
        m = self.rqs[rq]
        if self.next_rq[m.dir] == rq:
            self.next_rq[m.dir] = self.latter(rq)
        self.fifo[m.dir].remove(rq)
        del self.rqs[rq]

    # -- the operations --------------------------------------------------------------

    def insert(self, rq: int, op: int, sector: int, nr: int, at_head: bool, now: int) -> None:
        if rq not in self.counted:
            self.counted.add(rq)
            self.inserted += 1
        if at_head:
            self.dispatch_list.insert(0, rq)
            return
        d = op & 1
        self.rqs[rq] = ModelRq(d, sector, sector + nr, now + self.expire[d], self._stamp_next())
        self.fifo[d].append(rq)

    def dispatch(self, now: int) -> int:
        if self.dispatch_list:
            self.dispatched += 1
            return self.dispatch_list.pop(0)
        rq = self.next_rq[self.last_dir]
        if rq is None or self.batching >= self.fifo_batch:
            if self.fifo[READ]:
                d = READ
                if self.fifo[WRITE]:
                    old = self.starved
                    self.starved = (self.starved + 1) & U32
                    if old >= self.writes_starved & U32:
                        d = WRITE
                        self.starved = 0
            elif self.fifo[WRITE]:
                d = WRITE
                self.starved = 0
            else:
                return -1
            oldest = self.fifo[d][0]
            expired = now >= self.rqs[oldest].fifo_time
            rq = oldest if expired or self.next_rq[d] is None else self.next_rq[d]
            self.last_dir = d
            self.batching = 0
        self.batching += 1
        self.next_rq[self.rqs[rq].dir] = self.latter(rq)
        self._remove(rq)
        self.dispatched += 1
        return rq

    def has_work(self) -> bool:
        return bool(self.dispatch_list or self.fifo[READ] or self.fifo[WRITE])

    def finish(self, rq: int) -> None:
        if rq in self.counted:
            self.counted.remove(rq)
            self.completed += 1

    def find_merge(self, op: int, sector: int, nr: int) -> tuple[int, int]:
        """(0 no merge / 1 front / 2 back, rq or -1)."""
        order = self.sort_order(op & 1)
        backs = [rq for rq in order if self.rqs[rq].end == sector]
        if backs:
            return 2, backs[0]
        if self.front_merges:
            fronts = [rq for rq in order if self.rqs[rq].sector == sector + nr]
            if fronts:
                return 1, fronts[0]
        return 0, -1

    def request_merged(self, rq: int, new_sector: int, new_nr: int) -> None:
        m = self.rqs[rq]
        if new_sector != m.sector:
            m.stamp = self._stamp_next()
        m.sector, m.end = new_sector, new_sector + new_nr

    def requests_merged(self, rq: int, nxt: int) -> None:
        m, n = self.rqs[rq], self.rqs[nxt]
        self.merged += 1
        if n.fifo_time < m.fifo_time:
            f = self.fifo[m.dir]
            f.remove(rq)
            f.insert(f.index(nxt) + 1, rq)
            m.fifo_time = n.fifo_time
        m.end = n.end
        self._remove(nxt)

    def limit_depth(self, op: int, sync: bool) -> int:
        return 0 if sync and not op & 1 else self.async_depth

    def depth_updated(self, nr_requests: int) -> int:
        self.async_depth = max(1, 3 * nr_requests // 4)
        return self.async_depth

    def store(self, name: str, value: int) -> None:
        if name == "read_expire":
            self.expire[READ] = value * MS
        elif name == "write_expire":
            self.expire[WRITE] = value * MS
        else:
            setattr(self, name, value)

    def state(self) -> dict[str, object]:
        return {
            "fifo": [list(self.fifo[READ]), list(self.fifo[WRITE])],
            "sort": [self.sort_order(READ), self.sort_order(WRITE)],
            "dispatch": list(self.dispatch_list),
            "next_rq": [-1 if x is None else x for x in self.next_rq],
            "batching": self.batching,
            "starved": self.starved,
            "last_dir": self.last_dir,
            "ranges": {rq: (m.sector, m.end, m.fifo_time) for rq, m in self.rqs.items()},
        }

    def counters(self) -> dict[str, int]:
        return {
            "inserted": self.inserted,
            "merged": self.merged,
            "dispatched": self.dispatched,
            "completed": self.completed,
            "queued": self.inserted - self.completed,
            "owned_by_driver": self.dispatched + self.merged - self.completed,
        }
