"""Load a trained model from a model_dir for generation (no strategy needed)."""

from __future__ import annotations

import os

import tensorflow as tf

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.tokenizers import load_tokenizer


def load_trained(model_dir: str):
    """Return (model, tokenizer, config) at the latest checkpoint of `model_dir`."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    cfg = Config.load(model_dir)
    if cfg is None:
        raise UserError(f"--model_dir={model_dir} holds no tfdp run (no config.json); "
                        "point at a directory written by tfdp-train")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if latest is None:
        raise UserError(f"--model_dir={model_dir} has no checkpoint yet; "
                        "train longer than --checkpoint_every steps first")
    tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"))
    model = build_model(cfg, tokenizer.vocab_size)
    # Only the weights are wanted: the optimizer's slots stay unread.
    tf.train.Checkpoint(backbone=model.backbone).restore(latest).expect_partial() \
        .assert_existing_objects_matched()
    return model, tokenizer, cfg
