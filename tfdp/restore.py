"""A trained run read back from its model_dir: its config, tokenizer and
latest weights (for generation and evaluation)."""

from __future__ import annotations

import os

import tensorflow as tf

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.tokenizers import load_tokenizer


def load_run(model_dir: str):
    """(config, tokenizer, absolute model_dir) of a tfdp-train run that has a
    checkpoint."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    cfg = Config.load(model_dir)
    if cfg is None:
        raise UserError(f"--model_dir={model_dir} holds no tfdp run (no config.json); "
                        "point at a directory written by tfdp-train")
    if tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")) is None:
        raise UserError(f"--model_dir={model_dir} has no checkpoint yet; "
                        "train longer than --checkpoint_every steps first")
    return cfg, load_tokenizer(os.path.join(model_dir, "tokenizer")), model_dir


def restore_weights(model, model_dir: str) -> str:
    """Load the latest checkpoint's weights into `model` (built by
    tfdp.model.build_model with the run's config, inside a strategy scope
    or not); return that checkpoint's path. The optimizer's slots stay
    unread."""
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    tf.train.Checkpoint(backbone=model.backbone).restore(latest).expect_partial() \
        .assert_existing_objects_matched()
    return latest


def load_trained(model_dir: str):
    """Return (model, tokenizer, config) at the latest checkpoint of `model_dir`."""
    cfg, tokenizer, model_dir = load_run(model_dir)
    model = build_model(cfg, tokenizer.vocab_size)
    restore_weights(model, model_dir)
    return model, tokenizer, cfg
