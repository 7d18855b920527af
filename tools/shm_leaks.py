#!/usr/bin/env python3
"""List mqrt shared-memory segments in /dev/shm whose owner process is gone (leaks),
and remove them with --unlink.

An owner is gone when its pid is, or when that pid now belongs to a process started at
another time than the one the segment's name records (a reused pid): the check every
mqrt start makes before reclaiming (``mqrt.lib.shm.owner_alive``).

    python tools/shm_leaks.py            # list leaks; exit 1 if there are any
    python tools/shm_leaks.py --all      # list every mqrt segment, live or not
    python tools/shm_leaks.py --unlink   # remove the leaks
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from mqrt.lib import shm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="list live segments too")
    parser.add_argument("--unlink", action="store_true", help="remove the leaked segments")
    args = parser.parse_args()
    stale = set(shm.stale_segments())
    names = shm.list_segments() if args.all else sorted(stale)
    for name in names:
        state = (
            "leaked (owner gone)" if name in stale else f"live (owner {shm.segment_owner(name)})"
        )
        print(f"{name}\t{state}")
        if args.unlink and name in stale:
            with contextlib.suppress(FileNotFoundError):  # its guardian was quicker
                os.unlink(os.path.join(shm.SHM_DIR, name))
            print(f"{name}\tunlinked")
    return 1 if stale and not args.unlink else 0


if __name__ == "__main__":
    sys.exit(main())
