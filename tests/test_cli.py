"""The mqrt command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import psutil
import pytest

from mqrt import __version__

REQUIRED_CASES = {
    "atomic.cmpxchg",
    "atomic.fetch_add",
    "atomic.test_and_set_bit",
    "peer.atomics.cmpxchg",
    "ring.spsc.batch",
    "ring.mpsc.2producers",
    "trace.emit",
    "blk_mq.io",
    "blk_mq.io.traced",
    "peer.mp_queue",
    "peer.mp_pipe",
    "peer.faster_fifo.batch",
    "sbitmap.get_put",
    "sbitmap.get_put.contended",
}


def mqrt(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom mqrt.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_version_and_help():
    out = mqrt("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mqrt {__version__}"
    out = mqrt("--help")
    assert out.returncode == 0 and "microbench" in out.stdout
    out = mqrt("microbench", "--help")
    assert out.returncode == 0 and "--repeat" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("microbench", "--repeat", "0"), "mqrt: error: --repeat must be >= 1, got 0"),
        (("microbench", "--case", "nope"), "mqrt: error: --case nope matches no case"),
        (("microbench", "--repeat", "x"), "invalid int value: 'x'"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_not_tracebacks(args, message):
    out = mqrt(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_microbench_json_has_every_case_and_meets_schema():
    out = mqrt("microbench", "--quick", "--repeat", "1", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == "mqrt.microbench/1"
    results = doc["results"]
    assert set(results) >= REQUIRED_CASES, REQUIRED_CASES - set(results)
    for name, r in results.items():
        assert r["unit"] in ("ns/op", "ops/s"), name
        assert isinstance(r["value"], (int, float)) and r["value"] > 0, name
    assert {c["check"] for c in doc["checks"]} >= {
        "atomic.cmpxchg",
        "sbitmap.get_put",
        "blk_mq.io.traced over blk_mq.io",
    }


def test_missing_peers_are_skipped_with_a_note():
    out = mqrt(
        "microbench", "--quick", "--repeat", "1", "--json", "--case", "peer.atomics.*",
        "--case", "peer.faster_fifo.*", "--case", "atomic.cmpxchg",
        prelude="import sys; sys.modules['atomics'] = None; sys.modules['faster_fifo'] = None",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc["results"]) == {"atomic.cmpxchg"}
    assert any("'atomics' package is not installed" in n for n in doc["notes"])
    assert any("'faster_fifo' package is not installed" in n for n in doc["notes"])


def test_microbench_table_output():
    out = mqrt("microbench", "--quick", "--repeat", "1", "--case", "sbitmap.get_put")
    assert out.returncode == 0, out.stderr
    assert "sbitmap.get_put" in out.stdout and "targets" in out.stdout


def test_ctrl_c_keeps_partial_results_and_leaves_nothing():
    import signal
    import time

    # Ctrl-C as a terminal delivers it, whatever SIGINT disposition the test runner has.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from mqrt.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "microbench", "--case", "ring.*", "--repeat", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupt once a first measurement is in: each case forks its parties afresh, so
    # once ring.spsc.batch's pair (the first case) has exited and a party of the next
    # case runs, its sample is recorded.  (Forked parties share the parent's command
    # line; multiprocessing's resource tracker, also a child, does once it has exec'd;
    # each arena's guardian shares it too, but lives in a session of its own.)
    seen: set[int] = set()
    exited: set[int] = set()
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(proc.pid)
            cmdline = parent.cmdline()
            running = set()
            for child in parent.children():
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    if (
                        child.status() != psutil.STATUS_ZOMBIE
                        and child.cmdline() == cmdline
                        and os.getsid(child.pid) == os.getsid(proc.pid)  # not a guardian
                    ):
                        running.add(child.pid)
            for pid in seen - running - exited:
                try:
                    gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                if gone:
                    exited.add(pid)
                else:  # alive under another command line: exec'd, not a party
                    seen.discard(pid)
            seen |= running
            if len(exited) >= 2 and running - exited:
                break
        time.sleep(0.005)
    assert len(exited) >= 2, f"the microbench finished {len(exited)} parties in 60 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "ring.spsc.batch" in out and "interrupted: partial results" in out
    assert "Traceback" not in err
    # The autouse fixture checks that no segment or child process is left.


def test_microbench_reference_cases_for_the_nvme_path_run():
    out = mqrt("microbench", "--quick", "--repeat", "1", "--case", "ref.*", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert results["ref.sq_cq_loop.qd32"]["value"] > 0
    assert results["ref.wakeup_rtt"]["value"] > 0
