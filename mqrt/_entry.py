"""The ``mqrt`` console script and ``python -m mqrt``: a Ctrl-C at any moment, even
while the command's modules are still being imported, ends with ``mqrt: interrupted``
and exit status 130, never a traceback.

The first imports run with the stop signals blocked (a signal then waits until they
are done, a fraction of a second): numpy's C import turns a ``KeyboardInterrupt``
into an ``ImportError`` with a traceback.
"""

import sys


def main() -> int:
    try:
        import signal

        stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            from mqrt.lib import signals

            signals.install()
            import numpy  # noqa: F401

            from mqrt.cli import interrupted
            from mqrt.cli import main as cli_main
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending one lands here
        try:
            return cli_main()
        except KeyboardInterrupt as exc:  # landed outside the command's own handling
            return interrupted(exc)
    except KeyboardInterrupt as exc:  # while starting
        signum = getattr(exc, "signum", 2)
        try:
            what = "interrupted" if signum == 2 else f"stopped by signal {signum}"
            print(f"mqrt: {what}", file=sys.stderr)
        finally:
            return 128 + signum  # noqa: B012
