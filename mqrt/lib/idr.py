"""Port of the IDA of ``lib/idr.c``: small integer ids, the smallest free one first.

The kernel numbers its request queues from one (``blk_queue_ida``); mqrt numbers the
objects of one arena from an :class:`Ida` its :class:`~mqrt.lib.shm.Layout` keeps
(:meth:`~mqrt.lib.shm.Layout.ida`), so the ids of a run are dense from 0 and can
index per-CPU tables.

Deviations from Linux: a set of ints instead of a radix tree of bitmaps; no locking
(ids are handed out by the owner while it builds a run).
"""

from __future__ import annotations

import errno

#: The largest id by default (INT_MAX, as ida_alloc()).
IDA_MAX = (1 << 31) - 1


class Ida:
    """An id allocator: ``alloc`` returns the smallest id not in use, ``free`` gives
    one back."""

    def __init__(self) -> None:
        self._used: set[int] = set()

    def alloc(self, min_id: int = 0, max_id: int = IDA_MAX) -> int:
        """ida_alloc_range(): the smallest free id in ``min_id..max_id``, or
        ``-ENOSPC`` when every one is taken."""
        nr = min_id
        while nr in self._used:
            nr += 1
        if nr > max_id:
            return -errno.ENOSPC
        self._used.add(nr)
        return nr

    def free(self, nr: int) -> None:
        """ida_free(): ``nr`` may be handed out again.  Freeing an id that is not
        allocated is a ValueError (the kernel WARNs: "ida_free called for id=%d
        which is not allocated")."""
        try:
            self._used.remove(nr)
        except KeyError:
            raise ValueError(f"ida_free called for id={nr} which is not allocated") from None

    def __contains__(self, nr: object) -> bool:
        return nr in self._used

    def __len__(self) -> int:
        return len(self._used)
