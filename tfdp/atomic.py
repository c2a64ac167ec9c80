"""Directories that appear whole or not at all.

Everything tfdp writes for a user (prepared data, a run's data/, an export,
a fine-tuned model) is built in a hidden staging directory beside its final
place and renamed there at the end: the rename stays on one file system, so
it is atomic, and a failure part-way leaves nothing behind, not even the
parent directories created for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet, if any."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


@contextlib.contextmanager
def staged_directory(target: str, prefix: str = ".tfdp-staging-"):
    """Yield a path to build a directory in; on leaving the block it becomes
    `target` (which must be missing or an empty directory by then). On an
    exception the staged files and any parents made for `target` are removed
    and the exception propagates."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    created = first_missing(parent)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        build = os.path.join(staging, "out")  # normal permissions, unlike mkdtemp's 0700
        yield build
        os.makedirs(build, exist_ok=True)  # a block that wrote nothing still gives a directory
        publish(build, target)
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(built: str, target: str) -> None:
    """Rename the finished directory `built` to `target` (missing, or an
    empty directory, which it replaces) on the same file system: one atomic
    step. A non-empty `target` raises OSError and stays as it was."""
    if os.path.isdir(target):
        os.rmdir(target)  # empty, or this raises and nothing is replaced
    os.rename(built, target)
