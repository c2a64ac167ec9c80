"""The model_dir of a run: may this run continue it, and discarding an old one.

A model_dir holds one run (layout in tfdp/run.py). Re-running with
compatible flags resumes it; a run whose model shape, data or tokenizer
differ is refused, or discarded when the user passes --overwrite. Files
tfdp does not know are never touched.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.prepare import is_prepared

# Everything a run writes into model_dir. config.json comes last: discarding
# removes in this order, so a crash half-way leaves a directory that is still
# recognisably a tfdp run.
RUN_ENTRIES = ("checkpoints", "tensorboard", "metrics.json", "sample.txt", "data",
               "tokenizer", "config.json",
               "report.html", "loss.png", "training.png")  # tfdp/report.py
TRASH_PREFIX = ".tfdp-discarded-"  # what discard() moves entries into, inside model_dir


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
    """What model_dir holds, leaving out what an interrupted discard left."""
    return [n for n in os.listdir(model_dir) if not n.startswith(TRASH_PREFIX)]


def conflict(cfg: Config, model_dir: str) -> str | None:
    """Why the run in model_dir cannot be continued by `cfg`, or None (no run
    there, or a compatible one). Only reads, so every worker may call it; a
    run the chief is discarding meanwhile counts as none."""
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


def write_text(path: str, text: str) -> None:
    """Write via a temporary name and rename: never a half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> dict:
    """A JSON object from `path`, or {} when it is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
