"""A trained run read back from its model_dir: its config, tokenizer and
newest readable weights (for generation, evaluation, export, fine-tuning).

Like a resumed training run (tfdp/checkpoints.py restore_newest), a reader
skips a newer checkpoint that does not read back whole (a crash or a full
disk mid-write) with a warning on stderr, and ends in one line when none
does.
"""

from __future__ import annotations

import os
import sys

import tensorflow as tf

from tfdp.checkpoints import checkpoint_paths, restore_newest
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.tokenizers import load_tokenizer


def _warn(message: str) -> None:
    # stderr: stdout carries what the command prints (generated text, --json).
    print(message, file=sys.stderr, flush=True)


def _no_checkpoint(model_dir: str) -> UserError:
    return UserError(f"--model_dir={model_dir} has no checkpoint yet; "
                     "train longer than --checkpoint_every steps first")


def load_run(model_dir: str):
    """(config, tokenizer, absolute model_dir) of a tfdp-train run that has a
    checkpoint."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    cfg = Config.load(model_dir)
    if cfg is None:
        raise UserError(f"--model_dir={model_dir} holds no tfdp run (no config.json); "
                        "point at a directory written by tfdp-train")
    # Any listed checkpoint counts: the newest may be unreadable while an older reads.
    if not checkpoint_paths(os.path.join(model_dir, "checkpoints")):
        raise _no_checkpoint(model_dir)
    return cfg, load_tokenizer(os.path.join(model_dir, "tokenizer")), model_dir


def restore_weights(model, model_dir: str, say=_warn) -> str:
    """Load the newest readable checkpoint's weights into `model` (built by
    tfdp.model.build_model with the run's config, or a model with the same
    `backbone`, inside a strategy scope or not); return that checkpoint's
    path. Unreadable newer ones are skipped with a `say` warning; the
    optimizer's slots stay unread."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    directory = os.path.join(model_dir, "checkpoints")
    path = restore_newest(tf.train.Checkpoint(backbone=model.backbone), directory, say,
                          partial=True, fix="restore its files from a backup, or train again "
                          "into a new --model_dir")
    if path is None:
        raise _no_checkpoint(model_dir)
    return path


def load_trained(model_dir: str, say=_warn):
    """Return (model, tokenizer, config) at the newest readable checkpoint of
    `model_dir`."""
    cfg, tokenizer, model_dir = load_run(model_dir)
    model = build_model(cfg, tokenizer.vocab_size)
    restore_weights(model, model_dir, say)
    return model, tokenizer, cfg
