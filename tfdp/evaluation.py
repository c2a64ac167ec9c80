"""Scoring a model on a whole split: loss, perplexity, bits per byte.

Data-parallel like training: each replica scores its windows with
`tfdp.step.make_eval_step` and the token-loss sums are all-reduced. Every
window of the split is scored exactly once (the last batch is padded with
windows of weight 0); the tokens after the last whole window are not. The
sums are taken in a fixed order (on the replica, by the all-reduce, then
batch by batch in Python floats), so the same inputs on the same replicas
give the same digits (the same --batch_size too: it decides the padding
and the order of the sums).

Training validates the same way (tfdp.runner.evaluate_task with the
language-model task); `tfdp-eval` runs `evaluate`.

A prompt -> completion fine-tune (or any run, given templates) is scored
on what it generates instead (`score_completions`): the examples' prompts
decoded data-parallel (tfdp/decoding.py) and the texts scored against
their references (tfdp/textmetrics.py), as training's evaluations do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from tfdp import recipes
from tfdp.config import Config, check_batch
from tfdp.dataset import Split
from tfdp.errors import UserError
from tfdp.prepare import is_prepared, load_manifest, prepare, write_prepared
from tfdp.recipes.tfds_text import TfdsText, is_tfds
from tfdp.restore import load_run, restore_weights
from tfdp.rundir import read_json, same_files
from tfdp.runner import evaluate_task
from tfdp.step import default_jit_compile, make_eval_step
from tfdp.tasks.language_model import LanguageModelTask
from tfdp.strategy import build_strategy, is_chief


def evaluate(model_dir: str, data: str | None = None, split: str = "val", batch_size: int = 0,
             strategy_name: str = "auto", num_cpu_replicas: int = 2, log=print,
             as_json: bool = False, tfds_options: dict | None = None,
             collective: str = "auto", allow_cpu: bool = False) -> dict:
    """Score the latest checkpoint of `model_dir` on `data`: a directory
    written by tfdp-prepare (its `split`, which must use the model's
    tokenizer), text (files, globs, a directory, `stdlib`) or a TFDS split
    (`tfds:NAME[/CONFIG][:SPLIT]`, read with `tfds_options`, the keyword
    arguments of tfdp.recipes.tfds_text.TfdsText), tokenized with the
    model's own tokenizer and scored whole. Without `data`: the run's own
    prepared data. The chief logs one line (`as_json`: one JSON object)."""
    # The strategy first: it fixes TensorFlow's devices, which loading the
    # tokenizer would otherwise do.
    saved = Config.load(os.path.abspath(os.path.expanduser(model_dir))) or Config()
    strategy = build_strategy(strategy_name, num_cpu_replicas,
                              collective_timeout=saved.collective_timeout,
                              collective=collective, allow_cpu=allow_cpu)
    cfg, tokenizer, model_dir = load_run(model_dir)
    replicas = strategy.num_replicas_in_sync
    batch = batch_size or cfg.global_batch_size
    check_batch(batch, replicas, flag="--batch_size")
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
        # The whole split, whatever --eval_steps the run validated with.
        task = LanguageModelTask(dataclasses.replace(cfg, eval_steps=0), tokenizer.vocab_size,
                                 val=windows)
        with strategy.scope():
            model = task.build_model()
        checkpoint = restore_weights(model, model_dir)
        jit = (default_jit_compile(cfg.mixed_precision, strategy)
               if cfg.jit_compile is None else cfg.jit_compile)
        metrics = evaluate_task(strategy, make_eval_step(strategy, model, task, jit), task, batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loss = metrics["loss"]
    result = {**metrics, "windows": windows.num_windows,
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


def completion_templates(model_dir: str) -> dict | None:
    """The templates of the completion fine-tune that wrote `model_dir`
    (its finetune.json), or None for any other run."""
    saved = read_json(os.path.join(os.path.abspath(os.path.expanduser(model_dir)),
                                   "finetune.json"))
    if saved.get("task") != "completion":
        return None
    return {k: saved[k] for k in ("prompt_template", "completion_template")}


def score_completions(model_dir: str, data: str, prompt_template: str | None = None,
                      completion_template: str | None = None, split: str = "test",
                      max_new_tokens: int = 32, sampler: str = "greedy", num_beams: int = 4,
                      batch_size: int = 16, strategy_name: str = "auto",
                      num_cpu_replicas: int = 2, log=print, as_json: bool = False,
                      tfds_options: dict | None = None, collective: str = "auto",
                      allow_cpu: bool = False) -> dict:
    """BLEU, chrF, exact match, F1 (and accuracy for label words) of the
    completions the newest readable checkpoint of `model_dir` writes for
    the examples in `data` (JSONL, CSV or a TFDS split; templates default
    to the fine-tune's own)."""
    from tfdp.completiondata import read_completions
    from tfdp.tasks.completion import Scoring, decoder, score

    saved = completion_templates(model_dir) or {"prompt_template": "{prompt}",
                                               "completion_template": "{completion}"}
    prompt_template = prompt_template or saved["prompt_template"]
    completion_template = completion_template or saved["completion_template"]
    run_cfg = Config.load(os.path.abspath(os.path.expanduser(model_dir))) or Config()
    strategy = build_strategy(strategy_name, num_cpu_replicas,
                              collective_timeout=run_cfg.collective_timeout,
                              collective=collective, allow_cpu=allow_cpu)
    cfg, tokenizer, model_dir = load_run(model_dir)
    options = tfds_options or {}
    examples = read_completions(data, prompt_template, completion_template, split, "--data",
                                options.get("data_dir"), options.get("download", False))
    plain = dataclasses.replace(cfg, mixed_precision="off")
    model = LanguageModelTask(plain, tokenizer.vocab_size).build_model()
    checkpoint = restore_weights(model, model_dir)
    scoring = Scoring(examples.prompts, examples.references, tokenizer, max_new_tokens,
                      sampler, num_beams, batch_size)
    texts = decoder(plain, scoring, strategy)(model.get_weights(), examples.prompts,
                                              max_new_tokens)
    result = {**score(texts, scoring),
              "examples": len(examples.prompts), "data": examples.what,
              "step": int(os.path.basename(checkpoint).split("-")[-1])}
    if is_chief(strategy) and as_json:
        log(json.dumps(result))
    elif is_chief(strategy):
        shown = " | ".join(f"{k.replace('_', ' ')} {result[k]:.2f}" for k in
                           ("bleu", "chrf", "exact_match", "f1", "accuracy") if k in result)
        log(f"{examples.what}: {shown} | {len(examples.prompts):,} examples | {sampler} | "
            f"checkpoint of step {result['step']} | {strategy.num_replicas_in_sync} replica(s)")
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
