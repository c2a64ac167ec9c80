"""Load a trained model from a model_dir for generation (no strategy needed)."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.tokenizers import load_tokenizer


def load_trained(model_dir: str):
    """Return (model, tokenizer, config) at the latest checkpoint of `model_dir`."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--model_dir={model_dir} holds no tfdp run (no config.json); "
                        "point at a directory written by tfdp-train")
    try:
        with open(config_path) as f:
            cfg = Config.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{config_path} is unreadable ({err}); "
                        "point --model_dir at an intact tfdp-train run") from None
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
