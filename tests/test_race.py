"""``mqrt race``: every catalogue entry reproduces with a fixed seed and runs clean
with the fix (the quick form: a short clean run; `mqrt race run --all --fixed` is
the full one), on real CPUs; the command line as a user meets it."""

from __future__ import annotations

import json

import pytest

from mqrt.race.catalogue import CATALOGUE
from mqrt.race.main import run_bug
from tests.helpers import stderr_lines
from tests.test_cli import mqrt

pytestmark = pytest.mark.timing

#: Budget of a reproduction in the suite, and clean requests of the quick --fixed form.
REPRO_TIMEOUT_S = 150.0  # wall time: a saturated host runs fewer requests a second
QUICK_FIXED_REQUESTS = 20_000
QUICK_FIXED_S = 8.0


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bug_reproduces_with_a_fixed_seed(name, tmp_path):
    out = run_bug(CATALOGUE[name], seed=0, timeout=REPRO_TIMEOUT_S, report_dir=str(tmp_path))
    assert out["reproduced"], out
    assert out["finding"]["detector"] in CATALOGUE[name].detectors
    report = (tmp_path / f"{name}-bug-seed0.txt").read_text()
    assert CATALOGUE[name].commit in report and "rerun: mqrt race run" in report
    assert "debugfs" in report and "wake_batch=" in report


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bug_fixed_runs_clean(name):
    # the quick form: one attempt's worth (some scenarios run slow I/O on purpose)
    out = run_bug(CATALOGUE[name], seed=0, timeout=QUICK_FIXED_S, fixed=True,
                  requests=QUICK_FIXED_REQUESTS)  # fmt: skip
    assert out["clean"], out["finding"]
    assert out["requests"] > 0


def test_race_list_json_names_every_bug():
    out = mqrt("race", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == list(CATALOGUE)
    assert {r["interleaving"] for r in rows} == {True, False}
    assert all(r["window"] for r in rows if r["interleaving"])
    assert all(r["commit"] and r["what"] and r["subject"] for r in rows)
    text = mqrt("race", "list").stdout
    assert all(b.commit in text for b in CATALOGUE.values())


def test_race_run_json_shape(tmp_path):
    out = mqrt("race", "run", "wake_batch_fair_share", "--json", "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {"name", "reproduced", "seconds", "requests", "report"} <= set(got)
    assert got["name"] == "wake_batch_fair_share" and got["reproduced"] is True
    assert got["seconds"] > 0 and got["requests"] > 0 and got["report"].endswith(".txt")


def test_race_run_seeds_reports_how_hard_each_bug_was(tmp_path):
    args = ("race", "run", "wake_batch_above_depth", "--seeds", "2", "--report-dir", str(tmp_path))
    out = mqrt(*args, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["tries"] == 2 and got["succeeded"] == 2 and len(got["runs"]) == 2
    assert [r["seed"] for r in got["runs"]] == [0, 1000]
    assert 0 < got["median_s"] <= got["worst_s"] and got["detectors"] == ["lost_wakeup"]
    table = mqrt(*args).stdout
    assert "--seeds 2" in table and "2/2" in table and "wake_batch_above_depth" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("race", "run", "no_such_bug"), "no bug 'no_such_bug'"),
        (("race", "run"), "give a NAME or --all"),
        (("race", "run", "cleared_race", "--timeout", "0"), "--timeout: must be in"),
        (("race", "run", "cleared_race", "--seeds", "0"), "--seeds: must be in 1..1000"),
        (("race", "run", "cleared_race", "--inject", "both"), "--inject both: needs --seeds"),
    ],
)
def test_race_usage_errors_are_one_line(args, message):
    out = mqrt(*args)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr and len(stderr_lines(out.stderr)) == 1


def test_a_reproduced_bug_leaves_a_trace_that_race_show_prints(tmp_path):
    out = run_bug(CATALOGUE["wake_batch_fair_share"], seed=1, timeout=30, report_dir=str(tmp_path))
    assert out["reproduced"] and out["trace_dump"]
    report = (tmp_path / "wake_batch_fair_share-bug-seed1.txt").read_text()
    assert "last events per CPU:" in report and "TAG_SLEEP" in report
    # the proof: each sleeper's sleep, the frees after it, and no wake-up reaching it
    proof = report.split("the sleepers, from the trace:")[1].split("configuration:")[0]
    assert "TAG_SLEEP on queue 0" in proof and "tags freed" in proof and "never woken" in proof
    shown = mqrt("race", "show", out["trace_dump"])
    assert shown.returncode == 0, shown.stderr
    assert "lost_wakeup" in shown.stdout  # the finding, in the dump's header
    assert "TAG_GET" in shown.stdout and "END" in shown.stdout and "TAG_SLEEP" in shown.stdout
    bad = mqrt("race", "show", str(tmp_path / "wake_batch_fair_share-bug-seed1.txt"))
    assert bad.returncode == 2 and "is not an mqrt trace dump" in bad.stderr


def test_race_run_seeds_gives_a_row_per_window_for_a_race(tmp_path):
    # an entry with injected delays: a row with them and one with the natural window
    args = ("race", "run", "wait_cnt_left_at_zero", "--seeds", "2", "--timeout", "30")
    out = mqrt(*args, "--json", "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    injected, natural = json.loads(out.stdout)
    assert injected["inject"] is True and injected["window"].startswith("injected <=200us")
    assert injected["succeeded"] == 2
    assert natural["inject"] is False and natural["window"] == "natural"
    assert all(not r["inject"] for r in natural["runs"])


@pytest.mark.under_load
def test_every_fixed_scenario_stays_clean_on_a_saturated_host(tmp_path):
    # three scenarios at once next to two busy loops (on 2 cores: load >= 5): the
    # detectors decide by counting and by the CPUs' scheduling state, so a host that
    # keeps the CPUs off the cores for long stretches is not a bug
    out = mqrt("race", "run", "--all", "--fixed", "--parallel", "3", "--busy", "2",
               "--requests", "20000", "--timeout", "90", "--json",
               "--report-dir", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == list(CATALOGUE)
    for r in rows:
        assert r["clean"] and r["finding"] is None, r
        assert r["requests"] >= 20_000, r
