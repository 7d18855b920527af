"""fio job files for ``mqrt bench --jobfile FILE``.

The subset of fio's job file format (fio HOWTO, "Job file format") that mqrt reads:

* An ini-like file: ``[name]`` starts a job section; ``[global]`` starts a global
  section.  As in fio, every section whose name starts with ``global`` is a global
  section.  A global section sets defaults for the jobs that *follow* it; a file may
  have several, each adding to (or overriding) the defaults so far.  A job's own
  options override the defaults.  Job names must be unique within the file.
* One option per line: ``option=value`` (blanks around ``=`` are ignored; the value
  runs to the end of the line) or a bare ``option``, which means ``option=1`` (fio's
  ``time_based``, ``group_reporting``).  Option names take dashes or underscores.
* ``#`` or ``;`` starts a comment, anywhere in a line, as in fio: ``bs=4k ; small``
  is ``bs=4k`` and ``[job] # x`` the header ``[job]`` (so no value holds them).
* ``${VAR}`` in a value is replaced by the environment variable ``VAR`` (once, not
  recursively).  Unlike fio, which substitutes an empty string, an unset variable is
  an error naming it.
* ``include FILE`` inside a section reads FILE's options into that section (a global
  section's includes set defaults).  FILE is relative to the including file (then to
  the working directory, where fio looks first); includes nest up to
  :data:`MAX_INCLUDE_DEPTH` deep, a cycle is an error, and an included file may not
  contain sections (as in fio).
* ``at=`` and ``every=`` (mqrt's timeline of sysfs writes, :mod:`mqrt.bench.timeline`)
  may be given on several lines: each line is one more write (a global section's
  come first), kept in :attr:`JobSection.timeline` with its line, not in ``options``.
* Not supported: fio's reserved keywords (``$ncpus``, ``$mb_memory``,
  ``$pagesize``), arithmetic in values, and several job files per run.

This module reads the file's structure only: every option must be one of ``known``
(the caller's: fio's names and mqrt's), anything else is an error; what each option
means is :mod:`mqrt.bench.fio_options`' business.  Values stay strings: the caller
validates them and can report a bad value with its line (:meth:`JobSection.line_of`,
:meth:`JobSection.located`).  Every error is a :class:`~mqrt.lib.knobs.KnobError` with a
one-line message starting with ``file:line:``, e.g.
``jobs.fio:7: unknown option 'verfiy' (neither fio's nor mqrt bench's)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mqrt.lib.knobs import KnobError, canonical

__all__ = [
    "MAX_INCLUDE_DEPTH",
    "JobSection",
    "parse_jobfile",
    "parse_jobfile_text",
]

#: How deep ``include`` may nest.
MAX_INCLUDE_DEPTH = 16
#: Options that add one more value with each line (the timeline's writes).
LIST_OPTIONS = ("at", "every")

_ENV = re.compile(r"\$\{([^}]*)\}")
_COMMENT = re.compile(r"[#;]")


#: A file being read: its resolved path and its name in messages.
_Frame = tuple[Path, str]


class _Opt(NamedTuple):
    value: str
    file: str
    line: int


@dataclass
class JobSection:
    """One job of the file, with the defaults of the global sections above it."""

    #: The job's name (its ``[section]``).
    name: str
    #: Options (canonical names) -> value, globals merged, in file order.
    options: dict[str, str]
    #: Every option -> (file, line) where it was set.
    lines: dict[str, tuple[str, int]]
    #: Where the ``[section]`` header is: (file, line).
    header: tuple[str, int]
    #: :data:`LIST_OPTIONS` given, in file order: (option, value, file, line)
    timeline: list[tuple[str, str, str, int]] = field(default_factory=list)

    def line_of(self, option: str) -> str:
        """``file:line`` where ``option`` was set (the section header if it was not)."""
        file, line = self.lines.get(canonical(option), self.header)
        return f"{file}:{line}"

    def located(self, exc: KnobError) -> KnobError:
        """``exc`` (from validating the values) with ``file:line:`` in front, the line of
        the option its message starts with (``iodepth: must be ...``), or of the header."""
        message = str(exc)
        option = message.split(":", 1)[0]
        return KnobError(f"{self.line_of(option)}: {message}")


def parse_jobfile(
    path: str | os.PathLike[str],
    known: Collection[str] | None,
    *,
    flags: Collection[str] | None = None,
) -> list[JobSection]:
    """The jobs of the fio job file at ``path``, in file order.

    ``known``: the option names the caller supports (dashes or underscores); None
    takes every name (the caller judges them).
    ``flags``: if given, the supported options that may appear bare (``option``
    alone); another supported option without a value is then an error.
    """
    display = os.fspath(path)
    text = _read(Path(display), display, None)
    parser = _Parser(known, flags)
    parser.parse(text, display, Path(display).parent, ((Path(display).resolve(), display),))
    return parser.finish(display, text)


def parse_jobfile_text(
    text: str,
    known: Collection[str] | None,
    filename: str = "<string>",
    *,
    flags: Collection[str] | None = None,
) -> list[JobSection]:
    """:func:`parse_jobfile` for a job file's text; ``filename`` names it in errors and
    ``include`` paths are relative to its directory (the working directory by default)."""
    parser = _Parser(known, flags)
    parser.parse(text, filename, Path(filename).parent, ())
    return parser.finish(filename, text)


def _read(path: Path, display: str, at: str | None) -> str:
    """The text of a job file; ``at`` is the ``file:line`` of the include naming it."""
    where = f"{at}: include {display!r}" if at else display
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KnobError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise KnobError(f"{display}:{line}: not UTF-8 text") from None


class _Section:
    def __init__(
        self,
        name: str,
        file: str,
        line: int,
        defaults: dict[str, _Opt],
        lists: list[tuple[str, _Opt]],
    ) -> None:
        self.name = name
        self.header = (file, line)
        self.is_global = name.startswith("global")  # fio: strncmp(name, "global", 6)
        self.opts: dict[str, _Opt] = dict(defaults)
        self.lists: list[tuple[str, _Opt]] = list(lists)  #: LIST_OPTIONS, in order


class _Parser:
    def __init__(self, known: Collection[str] | None, flags: Collection[str] | None) -> None:
        self.known = None if known is None else {canonical(k) for k in known}
        self.flags = None if flags is None else {canonical(k) for k in flags}
        self.defaults: dict[str, _Opt] = {}
        self.default_lists: list[tuple[str, _Opt]] = []
        self.section: _Section | None = None
        self.jobs: list[JobSection] = []
        self.names: dict[str, str] = {}  # job name -> file:line of its header

    def parse(
        self, text: str, file: str, base: Path, stack: tuple[_Frame, ...], depth: int = 0
    ) -> None:
        """Read ``text`` (of ``file``, in directory ``base``).  ``stack``: the files
        being read, outermost first; ``depth``: how many includes deep ``text`` is."""
        nested = depth > 0
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = _COMMENT.split(raw, 1)[0].strip()
            if not line or line[0] in "#;":
                continue
            at = f"{file}:{lineno}"
            if line.startswith("["):
                if nested:
                    raise KnobError(f"{at}: {line!r}: an included file may not contain sections")
                self._header(line, file, lineno)
            elif self.section is None:
                raise KnobError(
                    f"{at}: {line!r} outside of a [section] (a job file starts with [global]"
                    " or [name])"
                )
            elif line == "include" or line.startswith(("include ", "include\t")):
                self._include(line[len("include") :].strip(), at, base, stack, depth)
            else:
                self._option(line, file, lineno)

    def finish(self, file: str, text: str) -> list[JobSection]:
        self._close()
        if not self.jobs:
            last = max(1, text.count("\n") + (not text.endswith("\n")))
            raise KnobError(f"{file}:{last}: no job section (a job is a [name] section)")
        return self.jobs

    def _header(self, line: str, file: str, lineno: int) -> None:
        at = f"{file}:{lineno}"
        if not line.endswith("]"):
            raise KnobError(f"{at}: malformed section header {line!r} (expected [name])")
        name = line[1:-1].strip()
        if not name:
            raise KnobError(f"{at}: empty section name {line!r}")
        self._close()
        section = _Section(name, file, lineno, self.defaults, self.default_lists)
        if not section.is_global:
            if name in self.names:
                raise KnobError(
                    f"{at}: duplicate job section [{name}] (first at {self.names[name]})"
                )
            self.names[name] = at
        self.section = section

    def _close(self) -> None:
        section, self.section = self.section, None
        if section is None:
            return
        if section.is_global:
            self.defaults = section.opts
            self.default_lists = section.lists
            return
        opts = section.opts
        self.jobs.append(
            JobSection(
                name=section.name,
                options={k: o.value for k, o in opts.items()},
                lines={k: (o.file, o.line) for k, o in opts.items()},
                header=section.header,
                timeline=[(k, o.value, o.file, o.line) for k, o in section.lists],
            )
        )

    def _include(
        self, name: str, at: str, base: Path, stack: tuple[_Frame, ...], depth: int
    ) -> None:
        if not name:
            raise KnobError(f"{at}: include needs a file name (include FILE)")
        given = Path(name)
        candidates = [given] if given.is_absolute() else [base / given, given]
        path = next((p for p in candidates if p.exists()), candidates[0])
        display = os.fspath(path)
        real = path.resolve()
        if any(real == r for r, _ in stack):
            chain = " -> ".join([*(d for _, d in stack), display])
            raise KnobError(f"{at}: include cycle: {chain}")
        if depth >= MAX_INCLUDE_DEPTH:
            raise KnobError(f"{at}: include {name!r}: nested more than {MAX_INCLUDE_DEPTH} deep")
        text = _read(path, display, at)
        self.parse(text, display, path.parent, (*stack, (real, display)), depth + 1)

    def _option(self, line: str, file: str, lineno: int) -> None:
        at = f"{file}:{lineno}"
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not key:
            raise KnobError(f"{at}: malformed line {line!r} (expected option=value)")
        name = canonical(key)
        if self.known is not None and name not in self.known:
            raise KnobError(f"{at}: unknown option {key!r} (neither fio's nor mqrt bench's)")
        if not eq:
            if self.flags is not None and name not in self.flags:
                raise KnobError(f"{at}: option {key!r} needs a value ({key}=VALUE)")
            value = "1"
        value = _expand(value, at, key)
        assert self.section is not None
        if name in LIST_OPTIONS:
            self.section.lists.append((name, _Opt(value, file, lineno)))
            return
        opts = self.section.opts
        opts.pop(name, None)  # a later setting moves to the end: file order
        opts[name] = _Opt(value, file, lineno)


def _expand(value: str, at: str, key: str) -> str:
    """``${VAR}`` -> the environment variable's value (fio's ``option_dup_subs``)."""

    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if not var:
            raise KnobError(f"{at}: {key}: '${{}}' names no environment variable")
        env = os.environ.get(var)
        if env is None:
            raise KnobError(f"{at}: {key}: environment variable {var!r} is not set")
        return env

    return _ENV.sub(sub, value)
