"""Scoring a model on a whole split: loss, perplexity, bits per byte.

Data-parallel like training: each replica scores its windows with
`tfdp.step.make_eval_step` and the token-loss sums are all-reduced. Every
window of the split is scored exactly once (the last batch is padded with
windows of weight 0); the tokens after the last whole window are not. The
sums are taken in a fixed order (on the replica, by the all-reduce, then
batch by batch in Python floats), so the same inputs on the same replicas
give the same digits (the same --batch_size too: it decides the padding
and the order of the sums).

Training validates with `score`; `tfdp-eval` runs `evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import data as recipes
from data.tfds_text import TfdsText, is_tfds
from tfdp.config import Config
from tfdp.dataset import Split, eval_dataset_fn, eval_steps_for
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.prepare import is_prepared, load_manifest, prepare, write_prepared
from tfdp.restore import load_run, restore_weights
from tfdp.rundir import same_files
from tfdp.step import default_jit_compile, make_eval_step
from tfdp.strategy import build_strategy, is_chief


def score(strategy, eval_step, split: Split, global_batch_size: int, steps: int,
          on_batch_begin=None, on_batch_end=None) -> float:
    """Mean token loss over the first `steps` batches of `split` (the whole
    split when `steps` is eval_steps_for's full count). `on_batch_begin(i)`
    and `on_batch_end(i, mean so far)` run around every batch."""
    dataset = strategy.distribute_datasets_from_function(
        eval_dataset_fn(split, global_batch_size, steps))
    total, count = 0.0, 0.0
    for i, batch in enumerate(dataset):
        if on_batch_begin is not None:
            on_batch_begin(i)
        loss_sum, n = eval_step(batch)
        total, count = total + float(loss_sum), count + float(n)
        if on_batch_end is not None:
            on_batch_end(i, total / max(count, 1.0))
    return total / max(count, 1.0)


def loss_metrics(loss: float, split: Split, prefix: str = "") -> dict:
    """Loss, perplexity and bits per byte. Bits per byte = nats per token x
    the split's tokens per byte (EOT separators included) / ln 2, so
    tokenizers of any vocabulary compare."""
    tokens_per_byte = split.num_tokens / max(split.num_bytes, 1)
    return {f"{prefix}loss": loss, f"{prefix}perplexity": math.exp(min(loss, 700.0)),
            f"{prefix}bits_per_byte": loss * tokens_per_byte / math.log(2.0)}


def evaluate(model_dir: str, data: str | None = None, split: str = "val", batch_size: int = 0,
             strategy_name: str = "auto", num_cpu_replicas: int = 2, log=print,
             as_json: bool = False, tfds_options: dict | None = None,
             collective: str = "auto", allow_cpu: bool = False) -> dict:
    """Score the latest checkpoint of `model_dir` on `data`: a directory
    written by tfdp-prepare (its `split`, which must use the model's
    tokenizer), text (files, globs, a directory, `stdlib`) or a TFDS split
    (`tfds:NAME[/CONFIG][:SPLIT]`, read with `tfds_options`, the keyword
    arguments of data.tfds_text.TfdsText), tokenized with the model's own
    tokenizer and scored whole. Without `data`: the run's own prepared
    data. The chief logs one line (`as_json`: one JSON object)."""
    # The strategy first: it fixes TensorFlow's devices, which loading the
    # tokenizer would otherwise do.
    saved = Config.load(os.path.abspath(os.path.expanduser(model_dir))) or Config()
    strategy = build_strategy(strategy_name, num_cpu_replicas,
                              collective_timeout=saved.collective_timeout,
                              collective=collective, allow_cpu=allow_cpu)
    cfg, tokenizer, model_dir = load_run(model_dir)
    replicas = strategy.num_replicas_in_sync
    batch = batch_size or cfg.global_batch_size
    if batch % replicas:
        raise UserError(f"--batch_size={batch} is not divisible by the {replicas} replicas; "
                        f"use a multiple of {replicas}")
    if data is None:
        data = next((d for d in (os.path.join(model_dir, "data"), os.path.expanduser(cfg.data))
                     if is_prepared(d)), None)
        if data is None:
            raise UserError(f"--model_dir={model_dir} keeps no prepared data of its own; "
                            "name the text or prepared directory to score with --data")
    tmp = tempfile.mkdtemp(prefix="tfdp-eval-")
    try:
        data_dir, split, what = _data(data, split, model_dir, tokenizer, tmp, tfds_options or {})
        tokens = load_manifest(data_dir)["splits"][split]["tokens"]
        if tokens < cfg.seq_len + 1:
            raise UserError(f"{what} has {tokens} tokens, fewer than one window of the "
                            f"model's seq_len+1={cfg.seq_len + 1}; give more text")
        windows = Split(data_dir, split, cfg.seq_len)
        with strategy.scope():
            model = build_model(cfg, tokenizer.vocab_size)
        checkpoint = restore_weights(model, model_dir)
        jit = (default_jit_compile(cfg.mixed_precision, strategy)
               if cfg.jit_compile is None else cfg.jit_compile)
        steps = eval_steps_for(windows, batch)
        loss = score(strategy, make_eval_step(strategy, model, jit), windows, batch, steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {**loss_metrics(loss, windows), "windows": windows.num_windows,
              "tokens_scored": windows.num_windows * cfg.seq_len, "data": what,
              "step": int(os.path.basename(checkpoint).split("-")[-1])}
    if is_chief(strategy) and as_json:
        log(json.dumps(result))
    elif is_chief(strategy):
        log(f"{what}: loss {loss:.6f} | perplexity {result['perplexity']:.4f} | bits/byte "
            f"{result['bits_per_byte']:.6f} | {result['tokens_scored']:,} tokens in "
            f"{windows.num_windows:,} windows of {cfg.seq_len} | checkpoint of step "
            f"{result['step']} | {replicas} replica(s)")
    return result


def _data(spec: str, split: str, model_dir: str, tokenizer, tmp: str, tfds_options: dict):
    """(prepared dir, split name, description) for `spec`."""
    if is_tfds(spec):
        source = TfdsText(spec, **tfds_options)
        docs, _ = source.documents(source.split, max_bytes=1 << 62)  # the whole split
        write_prepared(os.path.join(tmp, "data"), tokenizer, {"train": docs},
                       {"source": spec})
        return os.path.join(tmp, "data"), "train", f"{spec} ({len(docs):,} documents)"
    path = os.path.expanduser(spec)
    if is_prepared(path):
        if split not in load_manifest(path)["splits"]:
            raise UserError(f"--split={split} is not in {path}; use train or val")
        if not same_files(os.path.join(path, "tokenizer"),
                           os.path.join(model_dir, "tokenizer")):
            raise UserError(f"--data={spec} was prepared with another tokenizer than the "
                            f"model's ({os.path.join(model_dir, 'tokenizer')}); give text "
                            "instead, and it is tokenized with the model's own")
        return path, split, f"{spec} ({split})"
    files = recipes.source_files(spec)
    prepare(files, os.path.join(tmp, "data"), tokenizer, val_fraction=0.0,
            log=lambda *_: None)
    return os.path.join(tmp, "data"), "train", f"{spec} ({len(files)} file(s))"
