"""The default corpus: the running interpreter's standard library sources.

Every machine with Python has it, so `tfdp-train` works with no download.
Left out: test suites (`test/`, `tests/`, `idle_test/`, `test_*.py`),
installed third-party packages, and machine-generated data that is Python
only in syntax: `pydoc_data/` (the HTML help topics as one string, 0.76 MB)
and the generated code-page tables in `encodings/` (about 1.3 MB of
`0x00 -> LATIN CAPITAL LETTER ...` lines). Together these are ~17% of the
bytes; a small model trained on them learns tables instead of code.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from tfdp.errors import UserError

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "pydoc_data"}
_GENERATED_TABLE = b"Python Character Mapping Codec"  # gencodec.py's header


def _generated_table(path: Path) -> bool:
    with open(path, "rb") as f:
        return _GENERATED_TABLE in f.read(300)


def stdlib_files() -> list[Path]:
    """Sorted `.py` files of the standard library, test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(part in _SKIP_DIRS for part in p.relative_to(root).parts[:-1])
             and not p.name.startswith("test_") and not _generated_table(p)]
    if not files:
        raise UserError(f"no standard library sources found under {root}; "
                        "pass your own text with --data=PATH")
    return files
