"""The README's table of kernel symbols names mqrt symbols that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _mqrt_names() -> list[str]:
    text = README.read_text()
    section = text.split("### Kernel symbols and where they live in mqrt", 1)[1]
    table = section.split("\n\n", 2)[1]
    names = []
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names += re.findall(r"`(mqrt\.[A-Za-z0-9_.]+)`", cells[1])
    return names


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_mqrt_name_in_the_cross_reference_exists():
    names = _mqrt_names()
    assert len(names) >= 40
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert not missing, missing
