"""tools/soak.py: a real run with a timeline, and its verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "soak.py"


def soak(*args: str) -> tuple[int, dict]:
    out = subprocess.run(
        [sys.executable, str(TOOL), "--minutes", "0.04", "--every", "1", *args],
        check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("soak: {"))
    return out.returncode, json.loads(line.removeprefix("soak: "))


def test_a_soak_of_transitions_counts_them_and_passes_on_correct_code():
    rc, verdict = soak(
        "--expect", "freeze=4", "--",
        "--cpus", "2", "--shared_tags", "1", "--nr_devices", "2", "--every", "200ms:freeze",
    )  # fmt: skip
    freeze = verdict["transitions"]["freeze"]
    assert rc == 0, json.dumps(verdict)
    assert freeze["count"] >= 4 and freeze["errors"] == freeze["violations"] == 0
    assert verdict["ios"] > 0 and verdict["leaked_tags"] == 0 and verdict["queue_refs"] == 0


def test_a_soak_short_of_its_expected_transitions_fails():
    rc, verdict = soak("--expect", "freeze=100000", "--", "--cpus", "1", "--every", "500ms:freeze")
    assert rc == 1
    assert 0 < verdict["transitions"]["freeze"]["count"] < 100000
