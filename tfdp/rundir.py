"""The model_dir of a run: may this run continue it, discarding an old one,
and one job at a time.

A model_dir holds one run (layout in tfdp/training.py). Re-running with
compatible flags resumes it; a run whose model shape, data or tokenizer
differ is refused, or discarded when the user passes --overwrite. Files
tfdp does not know are never touched.

While a job runs it holds its directory (`hold`): a second job on the same
model_dir (or fine-tuning output_dir) is refused in one line naming the
holder, instead of both writing the same checkpoints and metrics.json.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime
import errno
import fcntl
import filecmp
import functools
import json
import os
import shutil
import socket
import sys
import tempfile

from tfdp.atomic import first_missing
from tfdp.config import Config
from tfdp.errors import UserError

# Everything a run writes into model_dir. config.json comes last: discarding
# removes in this order, so a crash half-way leaves a directory that is still
# recognisably a tfdp run.
RUN_ENTRIES = ("checkpoints", "tensorboard", "metrics.json", "sample.txt", "data",
               "tokenizer", "config.json",
               "report.html", "loss.png", "training.png")  # tfdp/report.py
TRASH_PREFIX = ".tfdp-discarded-"  # what discard() moves entries into, inside model_dir
# The lock file of the job holding the directory (`hold`). Not a run entry:
# --overwrite keeps it (it is the lock of the very job discarding), and a
# directory holding only it (a killed job's leftover) counts as empty.
LOCK_NAME = ".tfdp-lock"


def check_usable(model_dir: str) -> None:
    """Refuse a model_dir that is a file, holds something other than a tfdp
    run, or cannot be created or written."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} is a file, not a directory; "
                        "choose a new directory")
    if os.path.isdir(model_dir) and _entries(model_dir) and \
            not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model_dir={model_dir} is not empty and holds no tfdp run "
                        "(no config.json); choose a new or empty directory")
    existing = model_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--model_dir={model_dir} cannot be created: {existing} is a file; "
                        "choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--model_dir={model_dir} is not writable ({existing}: permission "
                        "denied); choose a directory you can write to")


def _entries(model_dir: str) -> list[str]:
    """What model_dir holds, leaving out what an interrupted discard left and
    the lock file."""
    return [n for n in os.listdir(model_dir)
            if not n.startswith(TRASH_PREFIX) and n != LOCK_NAME]


def conflict(cfg: Config, model_dir: str) -> str | None:
    """Why the run in model_dir cannot be continued by `cfg`, or None (no run
    there, or a compatible one). Only reads, so every worker may call it; a
    run the chief is discarding meanwhile counts as none."""
    from tfdp.prepare import is_prepared  # TensorFlow: not needed to hold a directory
    try:
        saved = Config.load(model_dir)
        if saved is None:
            return None
        reason = cfg.resume_conflicts(saved)
        data = os.path.expanduser(cfg.data)
        if reason is None and is_prepared(data) and not same_files(
                os.path.join(data, "tokenizer"), os.path.join(model_dir, "tokenizer")):
            reason = (f"was trained with another tokenizer than the one in --data={cfg.data} "
                      f"({os.path.join(model_dir, 'tokenizer')} differs)")
    except FileNotFoundError:
        return None
    return reason


def same_files(a: str, b: str) -> bool:
    """Whether directories `a` and `b` hold the same files, byte for byte
    (true when `b` does not exist yet)."""
    if not os.path.isdir(b):
        return True  # nothing recorded yet to disagree with
    names = sorted(os.listdir(a)) if os.path.isdir(a) else []
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def discard(model_dir: str, say, keep: str = "") -> None:
    """Remove the run in model_dir (tfdp's own entries only, and never one
    holding the path `keep`, the data this run reads): each is first moved
    into a scratch directory inside model_dir, then that is deleted. What a
    crash part-way leaves there is swept up the next time."""
    for stale in os.listdir(model_dir):
        if stale.startswith(TRASH_PREFIX):
            shutil.rmtree(os.path.join(model_dir, stale), ignore_errors=True)
    keep = os.path.realpath(keep) if keep else ""
    trash = tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=model_dir)
    try:
        for name in RUN_ENTRIES:
            path = os.path.join(model_dir, name)
            inside = keep and (keep + os.sep).startswith(os.path.realpath(path) + os.sep)
            if os.path.lexists(path) and not inside:
                os.rename(path, os.path.join(trash, name))
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    say(f"--overwrite: discarded the earlier run in {model_dir}")


def read_json(path: str) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- one job per directory
#
# flock(2) on <directory>/.tfdp-lock: the kernel drops the lock when its
# holder dies however it dies (crash, SIGKILL, OOM), so a dead job never
# blocks the next; its file stays, unlocked, and the next job takes it.
# flock rather than fcntl/lockf record locks: those belong to the process,
# so a second hold in this process would not conflict and closing any other
# descriptor of the file would drop the lock. (On NFS, Linux emulates flock
# with record locks, which hosts sharing the mount see too.) The file names
# the holder (host, pid, since when) for the message a refused job prints.

_HELD: dict[str, "Hold"] = {}  # this process's holds, by real path
_JOB: contextvars.ContextVar[list | None] = contextvars.ContextVar("tfdp_job", default=None)


class Hold:
    """This process's hold on a directory (see `hold`); a context manager
    that releases it on leaving the block."""

    def __init__(self, directory: str, fd: int | None, created: str | None):
        self.directory, self.path = directory, os.path.join(directory, LOCK_NAME)
        self.locked = fd is not None  # False on a file system without locks
        self._fd, self._created, self._key = fd, created, os.path.realpath(directory)

    def release(self) -> None:
        """Let the next job in: remove the lock file (while still locked: see
        _take) and the directories `hold` created if nothing else went into
        them, then unlock. Idempotent."""
        if _HELD.get(self._key) is not self:
            return  # released already
        del _HELD[self._key]
        if self.locked:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        _remove_empty(self.directory, self._created)
        if self.locked:
            os.close(self._fd)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(directory: str, flag: str = "--model_dir", say=None) -> Hold:
    """Hold `directory` for this job, creating it (and missing parents) if
    needed; UserError in one line naming the holder when another job, alive,
    holds it. Held until `release()`, the end of the `with` block or of the
    enclosing `job`-decorated call, or this process's exit, whichever comes
    first; a killed process's hold ends with it. Take it once, in the chief:
    other workers write to scratch directories. On a file system without
    locks: a `say` warning (default: stderr) and an unlocked Hold."""
    directory = os.path.abspath(os.path.expanduser(directory))
    created = first_missing(directory)
    try:
        fd = _take(directory, flag)
    except BaseException:
        _remove_empty(directory, created)  # refused: leave no directory made for it
        raise
    held = _HELD[os.path.realpath(directory)] = Hold(directory, fd, created)
    if fd is None:
        (say or _stderr)(f"warning: {flag}={directory} cannot be locked on its file system; "
                         "nothing stops a second job from using it at the same time")
    scope = _JOB.get()
    if scope is not None:
        scope.append(held)
    return held


def job(fn):
    """Decorator: `fn` is one tfdp job (tfdp.training.train): the directories it
    `hold`s are released when it returns or raises, so that a caller in the
    same process (a test, a notebook) may start the next job there."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        token = _JOB.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for held in reversed(_JOB.get()):
                held.release()
            _JOB.reset(token)
    return call


def _take(directory: str, flag: str) -> int | None:
    """The locked descriptor of directory's lock file, or None when its file
    system has no locks; UserError when another job holds it."""
    if os.path.realpath(directory) in _HELD:  # flock would refuse too; no need to try
        raise UserError(_in_use(flag, directory))
    path = os.path.join(directory, LOCK_NAME)
    for _ in range(100):
        os.makedirs(directory, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a releasing holder removed the directory meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if isinstance(err, BlockingIOError):
                raise UserError(_in_use(flag, directory)) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return None
            raise
        # A holder releases by removing the file before unlocking: a lock on
        # a file no longer at `path` guards nothing, so try again.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_me()).encode())
                return fd
        os.close(fd)
    raise UserError(f"{flag}={directory}: its lock file {path} keeps being replaced; "
                    "run the command again")


def _me() -> dict:
    """What the lock file says about this process."""
    path = sys.argv[0] if sys.argv else ""
    command = os.path.basename(path)  # a console script's name: tfdp-train
    if command == "__main__.py":  # python -m PACKAGE
        command = os.path.basename(os.path.dirname(path))
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "" if command in ("", "-c") else command}


def _in_use(flag: str, directory: str) -> str:
    """The refusal, naming the holder as its lock file records it."""
    info = read_json(os.path.join(directory, LOCK_NAME))
    if {"host", "pid", "since"} <= info.keys():
        by = f"{info['command']} on " if info.get("command") else ""
        who = f"{by}host {info['host']}, pid {info['pid']}, since {info['since']}"
    else:  # it took the lock a moment ago and has not written its name yet
        who = "just starting: no host and pid recorded yet"
    return (f"{flag}={directory} is in use by another tfdp job ({who}); "
            f"wait for it to end or use another {flag}")


def _remove_empty(directory: str, created: str | None) -> None:
    """Remove `directory` and its parents up to `created` (the outermost one
    made for it) while they are empty: the job wrote nothing there."""
    path = directory
    while created and len(path) >= len(created):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): keep it and everything above
            return
        path = os.path.dirname(path)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@atexit.register
def _release_all() -> None:
    for held in list(_HELD.values()):
        held.release()
