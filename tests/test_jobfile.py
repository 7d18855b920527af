"""fio job files (``mqrt.bench.jobfile``): sections, globals, comments, ``${VAR}``,
``include``, and every error with its exact ``file:line``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mqrt.bench.jobfile import (
    MAX_INCLUDE_DEPTH,
    JobSection,
    parse_jobfile,
    parse_jobfile_text,
)
from mqrt.lib.knobs import Knob, KnobError, parse_knobs

KNOWN = (
    "rw", "bs", "iodepth", "runtime", "size", "rwmixread", "pin", "completion-nsec", "direct",
    "thread",
)  # fmt: skip


def write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.write_text(text)
    return path


def parse(dir_: Path, text: str, **kw) -> list[JobSection]:
    return parse_jobfile(write(dir_, "jobs.fio", text), KNOWN, **kw)


def error(dir_: Path, text: str, name: str = "jobs.fio", **kw) -> str:
    path = write(dir_, name, text)
    with pytest.raises(KnobError) as exc:
        parse_jobfile(path, KNOWN, **kw)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_global_applies_only_to_the_jobs_after_it(tmp_path):
    jobs = parse(
        tmp_path,
        "[early]\nbs=8k\n[global]\nrw=randwrite\niodepth=4\n[late]\nsize=1m\n",
    )
    assert [j.name for j in jobs] == ["early", "late"]
    early, late = jobs
    assert early.options == {"bs": "8k"}
    assert late.options == {"rw": "randwrite", "iodepth": "4", "size": "1m"}


def test_several_globals_accumulate_and_override(tmp_path):
    jobs = parse(
        tmp_path,
        "[global]\nrw=read\nbs=4k\n"
        "[a]\n"
        "[global]\nbs=64k\n"  # bs changes for later jobs; rw stays
        "[b]\n",
    )
    assert jobs[0].options == {"rw": "read", "bs": "4k"}
    assert jobs[1].options == {"rw": "read", "bs": "64k"}
    assert jobs[1].line_of("bs") == f"{tmp_path / 'jobs.fio'}:6"
    assert jobs[1].line_of("rw") == f"{tmp_path / 'jobs.fio'}:2"


def test_fio_treats_every_global_prefixed_section_as_global(tmp_path):
    (job,) = parse(tmp_path, "[global-defaults]\niodepth=2\n[j]\n")
    assert job.options == {"iodepth": "2"}


def test_job_options_override_globals(tmp_path):
    (job,) = parse(tmp_path, "[global]\niodepth=32\nbs=4k\n[j]\niodepth = 1\n")
    assert job.options == {"bs": "4k", "iodepth": "1"}
    assert job.lines["iodepth"][1] == 5
    assert job.lines["bs"][1] == 3


def test_later_setting_in_a_section_wins(tmp_path):
    (job,) = parse(tmp_path, "[j]\nbs=4k\nbs=8k\n")
    assert job.options == {"bs": "8k"}
    assert job.lines["bs"][1] == 3


def test_whitespace_dashes_and_bare_booleans(tmp_path):
    (job,) = parse(
        tmp_path,
        "  [ j ]  \n\trw  =  randrw \ncompletion-nsec=20000\npin\ndirect\nrwmixread=\n",
    )
    assert job.name == "j"
    assert job.options == {
        "rw": "randrw",
        "completion_nsec": "20000",
        "pin": "1",
        "rwmixread": "",
        "direct": "1",
    }
    assert job.header == (str(tmp_path / "jobs.fio"), 1)


def test_values_keep_equals_signs_and_crlf_is_stripped(tmp_path):
    (job,) = parse(tmp_path, "[j]\r\nrw=a=b\r\nbs=4k\r\n")
    assert job.options == {"rw": "a=b", "bs": "4k"}


def test_comments(tmp_path):
    (job,) = parse(
        tmp_path,
        "; -- start job file --\n"
        "# a comment\n"
        "[j]\n"
        "   ; indented comment\n"
        "\t# another\n"
        "\n"
        "bs=4k # a trailing comment, as fio has them\n"
        "rw=read;no blank needed\n"
        "; -- end job file --\n",
    )
    assert job.options == {"bs": "4k", "rw": "read"}


def test_env_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("SIZE", "64m")
    monkeypatch.setenv("DEPTH", "16")
    monkeypatch.setenv("EMPTY", "")
    (job,) = parse(tmp_path, "[j]\nsize=${SIZE}\niodepth=${DEPTH}\nbs=4k${EMPTY}\nrw=${x\n")
    assert job.options == {"size": "64m", "iodepth": "16", "bs": "4k", "rw": "${x"}


def test_env_substitution_is_not_recursive(tmp_path, monkeypatch):
    monkeypatch.setenv("A", "${B}")
    monkeypatch.setenv("B", "no")
    (job,) = parse(tmp_path, "[j]\nrw=${A}\n")
    assert job.options == {"rw": "${B}"}


def test_unset_env_variable_is_an_error_naming_it_and_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MQRT_NO_SUCH_VAR", raising=False)
    msg = error(tmp_path, "[j]\nbs=4k\n\nsize=${MQRT_NO_SUCH_VAR}\n")
    assert msg == (
        f"{tmp_path / 'jobs.fio'}:4: size: environment variable 'MQRT_NO_SUCH_VAR' is not set"
    )
    msg = error(tmp_path, "[j]\nsize=${}\n")
    assert msg.startswith(f"{tmp_path / 'jobs.fio'}:2: size: ")


def test_include_into_a_job_and_into_global(tmp_path):
    write(tmp_path, "glob-include.fio", "; shared\nrw=randread\nthread=1\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub, "test-include.fio", "iodepth=4\ninclude deeper.fio\n")
    write(sub, "deeper.fio", "bs=16k\n")
    jobs = parse(
        tmp_path,
        "[global]\n"
        "include glob-include.fio\n"
        "[test]\n"
        "runtime=10\n"
        "include sub/test-include.fio\n"
        "[other]\n",
    )
    test, other = jobs
    assert test.options == {
        "rw": "randread", "thread": "1", "runtime": "10", "iodepth": "4", "bs": "16k"
    }  # fmt: skip
    assert test.lines["bs"] == (str(sub / "deeper.fio"), 1)
    assert test.lines["rw"] == (str(tmp_path / "glob-include.fio"), 2)
    assert other.options == {"rw": "randread", "thread": "1"}  # a job's include stays there


def test_include_is_relative_to_the_including_file_not_the_cwd(tmp_path, monkeypatch):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    write(jobdir, "common.fio", "bs=8k\n")
    write(tmp_path, "common.fio", "bs=1m\n")
    monkeypatch.chdir(tmp_path)
    (job,) = parse_jobfile(write(jobdir, "main.fio", "[j]\ninclude common.fio\n"), KNOWN)
    assert job.options == {"bs": "8k"}


def test_include_from_text_is_relative_to_the_cwd(tmp_path, monkeypatch):
    write(tmp_path, "common.fio", "bs=8k\n")
    monkeypatch.chdir(tmp_path)
    (job,) = parse_jobfile_text("[j]\ninclude common.fio\n", KNOWN)
    assert job.options == {"bs": "8k"}


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.fio", "bs=4k\ninclude b.fio\n")
    write(tmp_path, "b.fio", "\ninclude a.fio\n")
    msg = error(tmp_path, "[j]\ninclude a.fio\n")
    assert msg == (
        f"{tmp_path / 'b.fio'}:2: include cycle: "
        f"{tmp_path / 'jobs.fio'} -> {tmp_path / 'a.fio'} -> {tmp_path / 'b.fio'} "
        f"-> {tmp_path / 'a.fio'}"
    )
    msg = error(tmp_path, "[j]\ninclude self.fio\n", name="self.fio")
    assert msg.startswith(f"{tmp_path / 'self.fio'}:2: include cycle: ")


def test_include_depth_is_limited(tmp_path):
    for i in range(MAX_INCLUDE_DEPTH + 2):
        write(tmp_path, f"inc{i}.fio", f"include inc{i + 1}.fio\n")
    msg = error(tmp_path, "[j]\ninclude inc0.fio\n")
    last = MAX_INCLUDE_DEPTH - 1
    assert msg == (
        f"{tmp_path / f'inc{last}.fio'}:1: include 'inc{last + 1}.fio': "
        f"nested more than {MAX_INCLUDE_DEPTH} deep"
    )


def test_include_errors(tmp_path):
    path = tmp_path / "jobs.fio"
    assert error(tmp_path, "[j]\n\ninclude missing.fio\n") == (
        f"{path}:3: include '{tmp_path / 'missing.fio'}': cannot read: No such file or directory"
    )
    assert error(tmp_path, "[j]\ninclude\n") == (
        f"{path}:2: include needs a file name (include FILE)"
    )
    assert error(tmp_path, "include x.fio\n[j]\n").startswith(f"{path}:1: 'include x.fio' outside")
    write(tmp_path, "sect.fio", "bs=4k\n[job2]\n")
    assert error(tmp_path, "[j]\ninclude sect.fio\n") == (
        f"{tmp_path / 'sect.fio'}:2: '[job2]': an included file may not contain sections"
    )
    write(tmp_path, "bad.fio", "\n\nverify=crc32c\n")
    assert error(tmp_path, "[j]\ninclude bad.fio\n") == (
        f"{tmp_path / 'bad.fio'}:3: unknown option 'verify' (neither fio's nor mqrt bench's)"
    )


def test_unknown_option(tmp_path):
    text = "[global]\nrw=read\n\n[j]\n# verify below\nbs=4k\nverify=crc32c\n"
    assert error(tmp_path, text) == (
        f"{tmp_path / 'jobs.fio'}:7: unknown option 'verify' (neither fio's nor mqrt bench's)"
    )
    assert error(tmp_path, "[global]\nnumjobs=4\n[j]\n").startswith(
        f"{tmp_path / 'jobs.fio'}:2: unknown option 'numjobs'"
    )


def test_structural_errors_with_their_lines(tmp_path):
    path = tmp_path / "jobs.fio"
    assert error(tmp_path, "# c\nbs=4k\n[j]\n") == (
        f"{path}:2: 'bs=4k' outside of a [section] (a job file starts with [global] or [name])"
    )
    assert error(tmp_path, "[a]\nbs=4k\n[b]\n[a]\n") == (
        f"{path}:4: duplicate job section [a] (first at {path}:1)"
    )
    assert error(tmp_path, "[a]\n[unterminated\nbs=4k\n") == (
        f"{path}:2: malformed section header '[unterminated' (expected [name])"
    )
    assert [j.name for j in parse(tmp_path, "[a]\n[j] ; comment\n")] == ["a", "j"]
    assert error(tmp_path, "[a]\n[ ]\n") == f"{path}:2: empty section name '[ ]'"
    assert error(tmp_path, "[a]\n = 4k\n") == (
        f"{path}:2: malformed line '= 4k' (expected option=value)"
    )


def test_a_job_file_without_a_job_is_an_error(tmp_path):
    path = tmp_path / "jobs.fio"
    assert error(tmp_path, "") == f"{path}:1: no job section (a job is a [name] section)"
    assert error(tmp_path, "; nothing\n\n") == (
        f"{path}:2: no job section (a job is a [name] section)"
    )
    assert error(tmp_path, "[global]\nbs=4k\n[global]\nrw=read") == (
        f"{path}:4: no job section (a job is a [name] section)"
    )


def test_several_global_sections_are_not_duplicates(tmp_path):
    jobs = parse(tmp_path, "[global]\n[a]\n[global]\n[b]\n")
    assert [j.name for j in jobs] == ["a", "b"]


def test_unreadable_and_non_utf8_files(tmp_path):
    missing = tmp_path / "nope.fio"
    with pytest.raises(KnobError, match=re.escape(f"{missing}: cannot read: ")):
        parse_jobfile(missing, KNOWN)
    path = tmp_path / "bin.fio"
    path.write_bytes(b"[j]\nbs=4k\nrw=\xff\n")
    with pytest.raises(KnobError, match=re.escape(f"{path}:3: not UTF-8 text")):
        parse_jobfile(path, KNOWN)


def test_flags_restrict_bare_options():
    (job,) = parse_jobfile_text("[j]\npin\n", KNOWN, flags=["pin"])
    assert job.options == {"pin": "1"}
    with pytest.raises(KnobError) as exc:
        parse_jobfile_text("[j]\n\niodepth\n", KNOWN, "x.fio", flags=["pin"])
    assert str(exc.value) == "x.fio:3: option 'iodepth' needs a value (iodepth=VALUE)"


def test_line_of_and_located_point_a_bad_value_at_its_line(tmp_path):
    (job,) = parse(tmp_path, "[global]\niodepth=0\n[j]\nbs=4k\n")
    table = [Knob("iodepth", "int", 32, "depth", 1, 64), Knob("bs", "size", 4096, "bs")]
    with pytest.raises(KnobError) as exc:
        parse_knobs(table, job.options)
    located = job.located(exc.value)
    assert str(located) == f"{tmp_path / 'jobs.fio'}:2: iodepth: must be 1..64, got '0'"
    assert job.line_of("nonesuch") == f"{tmp_path / 'jobs.fio'}:3"  # the header
    assert str(job.located(KnobError("no colon here"))).startswith(f"{tmp_path / 'jobs.fio'}:3: ")


def test_text_parser_names_the_file():
    with pytest.raises(KnobError) as exc:
        parse_jobfile_text("[j]\nverify=md5\n", KNOWN)
    assert str(exc.value).startswith("<string>:2: unknown option 'verify'")
    (job,) = parse_jobfile_text("[j]\nbs=4k\n", KNOWN, "given.fio")
    assert job.lines == {"bs": ("given.fio", 2)}
    assert job.header == ("given.fio", 1)


def test_path_may_be_a_str(tmp_path):
    path = write(tmp_path, "jobs.fio", "[j]\nbs=4k\n")
    (job,) = parse_jobfile(os.fspath(path), KNOWN)
    assert job.line_of("bs") == f"{path}:2"
