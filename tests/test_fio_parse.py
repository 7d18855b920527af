"""fio job files mean what fio says: a corpus (``tests/fio_jobs/*.fio``) read by the real
fio (``fio --parse-only``, ``--debug=parse``) and by mqrt, which must agree.

Each corpus file starts with comment lines saying what to expect:

``# expect: accept``                 both accept it (mqrt's "no effect" is accepting)
``# expect: reject``                 both refuse it
``# expect: mqrt-rejects REASON``    fio accepts it, mqrt refuses it on purpose: REASON
                                     is in mqrt's one-line error
``# mqrt-error: TEXT``               TEXT is in mqrt's error (with ``reject``)
``# fio-out: OPTION V1 V2 ...``      fio's parser gives these values for OPTION
``# mqrt: KEY=VALUE ...``            mqrt's JobSpec has these values (bytes, seconds)
``# mqrt-run: KEY=VALUE``            the run's options (``cpus``)
``# mqrt-report: KEY=VALUE ...``     the options passed to the report
``# mqrt-jobs: A B ...``             the jobs, in order
``# note: TEXT``                     a line on stderr contains TEXT (a no-effect note)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mqrt.bench.main import plan_points
from mqrt.cli import _build_parser
from mqrt.lib.knobs import KnobError

CORPUS = Path(__file__).resolve().parent / "fio_jobs"
FILES = sorted(CORPUS.glob("*.fio"))
FIO = shutil.which("fio")


def header(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*([a-z-]+):\s*(.*)$", line)
        if m:
            out.setdefault(m[1], []).append(m[2].strip())
    return out


def plan(path: Path):
    args = _build_parser().parse_args(["bench", str(path)])
    return plan_points(args)


def fio_outs(path: Path) -> dict[str, list[int]]:
    """Values fio's parser gives each option (``--debug=parse``)."""
    res = subprocess.run(
        [FIO, "--debug=parse", "--parse-only", path.name],
        cwd=CORPUS, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    outs: dict[str, list[int]] = {}
    current = None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r" __handle_option=([a-z_0-9]+),", line)
        if m:
            current = m[1]
            continue
        m = re.search(r"ret=0, out=(\d+)", line)
        if m and current:
            outs.setdefault(current, []).append(int(m[1]))
    return outs


def test_the_corpus_is_large_enough_and_every_file_says_what_to_expect():
    assert len(FILES) >= 40
    for path in FILES:
        assert header(path).get("expect"), path.name


@pytest.mark.skipif(FIO is None, reason="fio is not installed")
def test_fio_accepts_or_refuses_as_the_corpus_says():
    """fio itself decides: a file marked accept or mqrt-rejects parses in fio, a
    reject does not.  One fio per file, in parallel."""
    procs = {
        p: subprocess.Popen(
            [FIO, "--parse-only", p.name],
            cwd=CORPUS,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in FILES
    }
    wrong = []
    for path, proc in procs.items():
        rc = proc.wait(timeout=60)
        fio_accepts = rc == 0
        expect = header(path)["expect"][0]
        if fio_accepts != (not expect.startswith("reject")):
            wrong.append(f"{path.name}: fio rc={rc}, corpus says {expect!r}")
    assert not wrong


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_mqrt_accepts_or_refuses_as_the_corpus_says(path, capsys, monkeypatch):
    monkeypatch.chdir(CORPUS)
    h = header(path)
    expect = h["expect"][0]
    if expect == "accept":
        planned, _axes, _repeat, _default = plan(path)
        err = capsys.readouterr().err
        for note in h.get("note", []):
            assert note in err, (note, err)
        job = planned[0].spec.job
        for item in " ".join(h.get("mqrt", [])).split():
            key, _, value = item.partition("=")
            assert str(getattr(job, key)) == value, (key, getattr(job, key), value)
        for item in h.get("mqrt-run", []):
            key, _, value = item.partition("=")
            assert str(planned[0].config["run"][key]) == value
        # a reporting option goes to the job's option of that name where it has one,
        # to the report's options otherwise
        report = planned[0].config.get("fio_report", {})
        for item in " ".join(h.get("mqrt-report", [])).split():
            key, _, value = item.partition("=")
            got = report[key] if key in report else getattr(job, key, None)
            got = str(int(got)) if isinstance(got, bool) else str(got)
            assert got == value, (key, report)
        if "mqrt-jobs" in h:
            assert [p.params["job"] for p in planned] == h["mqrt-jobs"][0].split()
        return
    with pytest.raises(KnobError) as exc:
        plan(path)
    message = str(exc.value)
    assert "\n" not in message
    reason = expect.removeprefix("mqrt-rejects").strip() if expect != "reject" else ""
    for text in [reason, *h.get("mqrt-error", [])]:
        assert text in message, (text, message)
    # one line naming the file and line of the option
    assert re.match(rf"{re.escape(path.name)}:\d+: ", Path(message).name) or message.startswith(
        str(path)
    )


@pytest.mark.skipif(FIO is None, reason="fio is not installed")
def test_fio_parses_the_values_the_corpus_states():
    """``# fio-out`` lines are fio's own parse (sizes in bytes, times in microseconds);
    the same file's ``# mqrt`` lines check mqrt's reading against them."""
    checked = 0
    for path in FILES:
        wanted = header(path).get("fio-out", [])
        if not wanted:
            continue
        outs = fio_outs(path)
        for item in wanted:
            option, *values = item.split()
            assert outs.get(option) == [int(v) for v in values], (path.name, option, outs)
            checked += 1
    assert checked >= 20


EXAMPLES = Path("/usr/share/doc/fio/examples")


@pytest.mark.skipif(
    not EXAMPLES.is_dir() and not os.environ.get("CI"), reason="fio-examples is not installed"
)
def test_fios_own_examples_are_accepted_or_refused_for_a_reason(monkeypatch):
    """Every example job file that ships with fio: mqrt runs it, or says in one line,
    at its file and line, what it needs that mqrt does not emulate; never an unknown
    option that fio knows, never a traceback."""
    monkeypatch.setenv("FIO_RW", "randread")
    monkeypatch.setenv("FIO_DIR", "/tmp")
    accepted = 0
    for path in sorted(EXAMPLES.glob("*.fio")):
        try:
            plan(path)
            accepted += 1
        except KnobError as exc:
            message = str(exc)
            assert message.startswith(f"{path}:") and "\n" not in message, message
            if "unknown option" in message:
                assert "is not set" in message or "environment" in message, message
    assert accepted >= 15


def test_a_sweep_in_a_job_file_is_written_in_braces(tmp_path, capsys):
    path = tmp_path / "sweep.fio"
    path.write_text("[j]\niodepth={1,4}\nbs={4k,64k}\nirqmode=none,softirq\n")
    planned, axes, _repeat, _default = plan(path)
    assert axes["iodepth"] == [1, 4] and axes["bs"] == [4096, 65536]
    assert axes["irqmode"] == ["none", "softirq"]  # mqrt's own option: a plain list
    assert len(planned) == 8
    path.write_text("[j]\niodepth={1-8:x2}\n")
    assert plan(path)[1]["iodepth"] == [1, 2, 4, 8]
