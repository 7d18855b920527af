"""The ``mqrt`` command line: ``bench``, ``compare``, ``plot``, ``race``, ``microbench``,
``inspect``, ``top``.

User mistakes end in a one-line ``mqrt: error: ...`` naming the bad option and exit
status 2, never a traceback.  Ctrl-C, SIGTERM and SIGHUP are handled alike
(:mod:`mqrt.lib.signals`): exit status 128 + the signal, one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from mqrt import __version__
from mqrt.errors import UsageError
from mqrt.lib import signals


class _Parser(argparse.ArgumentParser):
    """argparse with mqrt's one-line errors (no usage block): ``mqrt: error: ...``."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("mqrt").strip()
        self.exit(
            2, f"mqrt: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)\n"
        )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mqrt",
        description="The Linux blk-mq block layer in user space: real processes as CPUs, "
        "shared-memory hardware queues and sbitmap tags on real atomics.",
    )
    parser.add_argument("--version", action="version", version=f"mqrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from mqrt import compare, plot
    from mqrt.bench import main as bench
    from mqrt.inspect import main as inspect
    from mqrt.inspect import top
    from mqrt.microbench import main as microbench
    from mqrt.race import main as race

    bench.add_parser(sub)
    compare.add_parser(sub)
    inspect.add_parser(sub)
    microbench.add_parser(sub)
    plot.add_parser(sub)
    race.add_parser(sub)
    top.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signals.install()
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except UsageError as exc:
        parser.exit(2, f"mqrt: error: {exc}\n")
    except signals.Abort as exc:
        with signals.shielded():
            print(f"mqrt: second signal ({exc.name}): aborting, figures not reported",
                  file=sys.stderr)  # fmt: skip
        return 128 + exc.signum
    except KeyboardInterrupt as exc:
        return interrupted(exc)
    except BrokenPipeError:
        # The reader went away (`| head`): not our error; keep Python's exit quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def interrupted(exc: KeyboardInterrupt) -> int:
    """The one line and the exit status of a stop signal that ended the command."""
    signum = exc.signum if isinstance(exc, signals.Stop) else 2  # SIGINT
    with signals.shielded():
        if signum == 2:
            print("mqrt: interrupted", file=sys.stderr)
        else:
            print(f"mqrt: stopped by {signals.signal_name(signum)}", file=sys.stderr)
    return 128 + signum
