"""A request queue's limits: ``struct queue_limits`` and the setters of
``block/blk-settings.c``, with Linux 5.10's defaults.

A queue starts from :func:`blk_set_default_limits` (what ``blk_alloc_queue`` gives
every queue): 255 sectors a request (``BLK_SAFE_MAX_SECTORS``) and 128 segments,
until its driver states what the hardware takes.  :func:`blk_queue_max_hw_sectors`
sets the hardware limit and, from it, the soft one the block layer builds requests
up to (``max_sectors`` = min(hw, ``BLK_DEF_MAX_SECTORS``)).  null_blk calls it with
its ``max_sectors`` knob, nvme with what the controller's MDTS allows
(``nvme_set_queue_limits``).

A merge never grows a request past ``max_sectors`` or ``max_segments``
(:mod:`mqrt.block.blk_mq`).  A bio's segments are its pages: user buffers are not
assumed to be physically contiguous, so no two pages share a segment, and
``max_segment_size`` (64 KiB by default) never binds; it is not modelled.

Deviations from Linux
    * A bio larger than ``max_sectors`` is not split (``__blk_queue_split``): it
      becomes one request past the limit.  Merges respect the limits.
    * Only the limits a merge or a driver uses are kept: no discard, write-zeroes,
      zone, alignment or boundary limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mqrt.block.blk_mq_types import BLK_DEF_MAX_SECTORS, SECTOR_SHIFT

if TYPE_CHECKING:
    from mqrt.block.blk_mq_structs import RequestQueue

#: max_sectors and max_hw_sectors of a queue whose driver set neither (5.10).
BLK_SAFE_MAX_SECTORS = 255
#: Segments a request may have by default (BLK_MAX_SEGMENTS).
BLK_MAX_SEGMENTS = 128
PAGE_SHIFT = 12
PAGE_SECTORS_SHIFT = PAGE_SHIFT - SECTOR_SHIFT
#: The segments field of a request is 16 bits (the kernel's nr_phys_segments is too).
USHRT_MAX = 0xFFFF


@dataclass
class QueueLimits:
    """struct queue_limits, the part mqrt uses; sizes in 512-byte sectors."""

    max_sectors: int = BLK_SAFE_MAX_SECTORS  #: the largest request built by merging
    max_hw_sectors: int = BLK_SAFE_MAX_SECTORS  #: the largest the driver takes
    max_segments: int = BLK_MAX_SEGMENTS  #: physical segments a request may have

    def describe(self) -> dict[str, Any]:
        """The sysfs view (``/sys/block/<dev>/queue/``): sizes in KiB."""
        return {
            "max_sectors_kb": self.max_sectors >> 1,
            "max_hw_sectors_kb": self.max_hw_sectors >> 1,
            "max_segments": self.max_segments,
        }


def blk_set_default_limits(lim: QueueLimits) -> None:
    """blk_set_default_limits(): the limits of a queue before its driver sets any."""
    lim.max_segments = BLK_MAX_SEGMENTS
    lim.max_sectors = lim.max_hw_sectors = BLK_SAFE_MAX_SECTORS


def blk_queue_max_hw_sectors(q: RequestQueue, max_hw_sectors: int) -> None:
    """blk_queue_max_hw_sectors(): the largest request the hardware takes (at least a
    page), and from it the soft limit requests are built up to, at most
    BLK_DEF_MAX_SECTORS."""
    lim = q.limits
    if max_hw_sectors << SECTOR_SHIFT < 1 << PAGE_SHIFT:
        max_hw_sectors = 1 << PAGE_SECTORS_SHIFT
        q.tag_set.messages.append(f"blk_queue_max_hw_sectors: set to minimum {max_hw_sectors}")
    lim.max_hw_sectors = max_hw_sectors
    lim.max_sectors = min(max_hw_sectors, BLK_DEF_MAX_SECTORS)


def blk_queue_max_segments(q: RequestQueue, max_segments: int) -> None:
    """blk_queue_max_segments(): at least one (and the field is 16 bits)."""
    if not max_segments:
        max_segments = 1
        q.tag_set.messages.append(f"blk_queue_max_segments: set to minimum {max_segments}")
    q.limits.max_segments = min(max_segments, USHRT_MAX)


def bio_segments(nr_sectors: int) -> int:
    """The physical segments of a bio of ``nr_sectors``: one per page (its buffer is
    page aligned, its pages not contiguous)."""
    return (nr_sectors + (1 << PAGE_SECTORS_SHIFT) - 1) >> PAGE_SECTORS_SHIFT
