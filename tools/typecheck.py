#!/usr/bin/env python3
"""Type-check the whole package with mypy, as it is installed: ``mqrt`` with
``workers/`` and ``device/`` inside it as ``mqrt.workers`` and ``mqrt.device``.

The repository keeps those two at the top level and setuptools maps them into the
package (pyproject's package-dir); mypy cannot follow such a mapping, so this builds
the installed shape out of symbolic links (under ``.mypy_cache``) and checks it there,
with the settings in pyproject's ``[tool.mypy]``.  Paths in the report are the
repository's.  Exit status: mypy's.

    python tools/typecheck.py            # what CI runs
    python tools/typecheck.py -- --no-incremental   # extra mypy options after --
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"workers": ROOT / "workers", "device": ROOT / "device"}


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    cache = ROOT / ".mypy_cache"
    # A fixed place for the package's shape, so mypy's incremental cache stays valid.
    shape = cache / "installed-shape"
    pkg = shape / "mqrt"
    shutil.rmtree(shape, ignore_errors=True)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "mqrt").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, src in MAPPED.items():
        (pkg / name).symlink_to(src)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    cmd += ["--cache-dir", str(cache), *extra, "-p", "mqrt"]
    proc = subprocess.run(cmd, cwd=shape, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    for name in MAPPED:  # mqrt/device/nvme.py -> device/nvme.py
        out = out.replace(f"mqrt{os.sep}{name}{os.sep}", f"{name}{os.sep}")
    sys.stdout.write(out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
