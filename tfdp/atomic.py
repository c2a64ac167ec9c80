"""Files and directories that appear whole or not at all.

Everything tfdp writes for a user (prepared data, a run's data/, an export,
a fine-tuned model) is built in a hidden staging directory beside its final
place and renamed there at the end: the rename stays on one file system, so
it is atomic, and a failure part-way leaves nothing behind, not even the
parent directories created for it. Single files (config.json, metrics.json,
the report) go the same way through `write_text` / `write_bytes`, and
`require_new_or_empty` is the one check that an output directory is new.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile

from tfdp.errors import UserError


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


def require_new_or_empty(path: str, flag: str) -> str:
    """`path` made absolute (and ~ expanded); UserError naming `flag` unless
    it is missing or an empty directory: tfdp never mixes its output with
    other files, nor writes over them."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a directory; choose a new directory")
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"{flag}={path} exists and is not empty; choose a new or empty "
                        "directory (nothing in that one is overwritten)")
    return path


def write_bytes(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically: written to a uniquely named
    hidden file beside it, fsync'ed, then renamed over it, so a reader (or a
    resume after a crash) sees the old file or the new one, never part of
    one. The fsync is what makes that hold after a power loss or a kernel
    crash too: without it some file systems (XFS; ext4 with some mount
    options) can persist the rename before the data, leaving an empty
    config.json or metrics.json. It costs milliseconds, and tfdp writes
    these files once per validation at most. The directory is not synced:
    a lost rename leaves the old file, which is still whole."""
    directory, name = os.path.split(os.path.abspath(path))
    while True:  # O_EXCL: a unique name, with the umask's permissions (not mkstemp's 0600)
        staged = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise


def write_text(path: str, text: str) -> None:
    """`write_bytes` of `text` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))
