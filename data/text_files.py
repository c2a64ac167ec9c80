"""A user's own text: files, globs and directories, comma-separated."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from tfdp.errors import UserError


def _walk(directory: Path) -> list[Path]:
    """Regular files below `directory`, hidden files and folders skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def expand_paths(spec: str) -> list[Path]:
    """Expand `a.txt,dir/,logs/*.txt` into files, keeping the order given."""
    files: list[Path] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no file matches {item!r}; check the pattern")
            for match in matches:
                path = Path(match)
                files.extend(_walk(path) if path.is_dir() else [path])
        elif os.path.isdir(item):
            files.extend(_walk(Path(item)))
        elif os.path.isfile(item):
            files.append(Path(item))
        else:
            raise UserError(f"{item!r} does not exist; give an existing file, glob or directory")
    if not files:
        raise UserError(f"no files found in {spec!r}; give text files to train on")
    return list(dict.fromkeys(files))  # de-duplicate, keep order
