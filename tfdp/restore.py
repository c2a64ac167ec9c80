"""A trained run read back from its model_dir: its config, tokenizer and
newest readable weights (for generation, evaluation, export, fine-tuning).

Like a resumed training run (tfdp/checkpoints.py restore_newest), a reader
skips a newer checkpoint that does not read back whole (a crash or a full
disk mid-write) with a warning on stderr, and ends in one line when none
does.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class Pretrained:
    """Where a fine-tune starts: the newest readable checkpoint of a tfdp
    run (`--model_dir`), or a keras-hub GPT-2 preset on local disk
    (`--init_from`, tfdp/presets.py). `cfg` shapes the model, `tokenizer`
    is the one its weights were trained with."""

    flag: str  # "--model_dir" or "--init_from"
    path: str  # absolute
    cfg: Config
    tokenizer: object
    preset: object = None  # presets.Preset for --init_from

    def load_into(self, model, say) -> str:
        """Its weights into `model` (a causal LM or a model with the same
        `backbone`, built under the strategy's scope); returns what they
        came from (a checkpoint's path, or the preset's)."""
        if self.preset is None:
            return restore_weights(model, self.path)
        from tfdp import presets
        presets.load_weights(model, self.preset, self.cfg.seq_len, say)
        return self.path


def start_from(pretrained, model, say) -> str:
    """Load a fine-tune's starting weights into `model`: `pretrained` is a
    Pretrained, or the path of a tfdp run; returns what they came from."""
    if isinstance(pretrained, Pretrained):
        return pretrained.load_into(model, say)
    return restore_weights(model, pretrained)


def load_pretrained(model_dir: str | None, init_from: str | None) -> Pretrained:
    """The starting point a fine-tune names: exactly one of a tfdp run and a
    preset (UserError otherwise, or when it cannot be read)."""
    if model_dir:  # FinetuneConfig.validate checked that exactly one is given
        cfg, tokenizer, path = load_run(model_dir)
        return Pretrained("--model_dir", path, cfg, tokenizer)
    from tfdp import presets
    # The model is the preset's whole context: --seq_len picks a window within it.
    context = int(presets.read_preset(init_from).backbone["max_sequence_length"])
    cfg, preset = presets.resolve(Config(init_from=init_from, seq_len=context), set())
    tokenizer = preset.tokenizer()
    if tokenizer is None:
        raise UserError(f"--init_from={preset.path} has no tokenizer (a bare backbone); give "
                        "a preset saved with its tokenizer (keras-hub's save_to_preset of a "
                        "GPT2CausalLM, or tfdp-export --format=preset)")
    cfg = dataclasses.replace(cfg, model_dir=preset.path, vocab_size=tokenizer.vocab_size)
    return Pretrained("--init_from", preset.path, cfg, tokenizer, preset)
