"""Run a command while the host is saturated, the way mqrt's users run it: busy loops
on every core (or ``-n N``) for the command's whole life.

    python tools/saturate.py [-n N] -- COMMAND [ARGS...]

Exits with the command's status.  ``.ci/run`` runs the scheduling-sensitive tests
(``pytest -m timing``) this way once more after the whole suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from mqrt.race.load import busy_loops


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=os.cpu_count() or 1, help="busy loops (default: cores)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give a command after --")
    print(f"saturate: {args.n} busy loops; load before: {os.getloadavg()}", file=sys.stderr)
    with busy_loops(args.n):
        status = subprocess.call(cmd)
    print(f"saturate: load after: {os.getloadavg()}; status {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
