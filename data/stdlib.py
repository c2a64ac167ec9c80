"""The default corpus: the running interpreter's standard library sources.

Every machine with Python has it, so `tfdp-train` works with no download.
Test suites (`test/`, `tests/`, `idle_test/`, `test_*.py`) and installed
third-party packages are left out: they are repetitive and not the library.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from tfdp.errors import UserError

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """Sorted `.py` files of the standard library, test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(part in _SKIP_DIRS for part in p.relative_to(root).parts[:-1])
             and not p.name.startswith("test_")]
    if not files:
        raise UserError(f"no standard library sources found under {root}; "
                        "pass your own text with --data=PATH")
    return files
