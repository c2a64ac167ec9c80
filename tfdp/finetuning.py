"""tfdp-finetune: a pretrained tfdp GPT fine-tuned, data-parallel, through
the same Runner as pretraining, for one of two tasks:

    FinetuneConfig (flags, trainer/finetune.py) -> strategy -> examples
    and a Task (tfdp/finetune_tasks.py, one function per --task):
    -> classification: labels and tokens (tfdp/classdata.py) ->
       ClassificationTask (tfdp/tasks/classification.py)
    -> completion: templates and windows (tfdp/completiondata.py) ->
       CompletionTask (tfdp/tasks/completion.py)
    -> Runner (tfdp/runner.py) -> output_dir

So a fine-tune has what a tfdp-train run has: checkpoints, exact resume
after SIGKILL or SIGTERM (exit 75), the watchdog, multi-worker through
tfdp-launch, the progress line, TensorBoard and a report.

While it runs, everything is in a hidden sibling of output_dir,
`.NAME.tfdp-partial/` (the fine-tune's config, checkpoints/, tensorboard/,
metrics.json); rerunning the same command resumes from there. At the end
the metrics (and a classifier's final weights, checkpoint/: backbone and
head) are added and the directory is renamed to output_dir in one step, so
output_dir appears whole or not at all. A classification output holds
config.json (the fine-tune's) and labels.json; a completion output is
itself a tfdp run (config.json: the model's, tokenizer/, checkpoints/, with
the fine-tune's config in finetune.json), so tfdp-generate, tfdp-eval and
tfdp-export read it as they read any run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os

import numpy as np
import tensorflow as tf

from tfdp import classdata, rundir, watchdog
from tfdp.finetune_tasks import SETUPS
from tfdp.atomic import publish, require_new_or_empty, write_text
from tfdp.config import Config, FinetuneConfig, check_batch
from tfdp.errors import UserError
from tfdp.flops import flops_per_token, machine_peak_flops
from tfdp.model import non_embedding_params
from tfdp.optimizer import build_optimizer
from tfdp.report import write_report
from tfdp.restore import load_pretrained
from tfdp.rundir import read_json
from tfdp.runner import Runner, Schedule
from tfdp.step import default_jit_compile
from tfdp.strategy import build_strategy, describe, is_chief
from tfdp.tasks.classification import Classifier, build_classifier
from tfdp.tasks.classification import predict as predict_packed

PARTIAL_SUFFIX = ".tfdp-partial"
# What a resumed fine-tune must share with the interrupted one: everything
# that decides the weights. The strategy, replicas and cadence may change.
RESUME_FIELDS = ("model_dir", "init_from", "train", "eval", "task", "text_column",
                 "label_column", "prompt_template", "completion_template", "pack", "pooling",
                 "seq_len", "global_batch_size", "steps", "learning_rate", "warmup_fraction",
                 "weight_decay", "clip_norm", "seed")
ADDED = ("init_from", "prompt_template", "completion_template", "pack")


def partial_dir(output_dir: str) -> str:
    """Where a fine-tune into `output_dir` works until it is complete."""
    parent, name = os.path.split(output_dir)
    return os.path.join(parent, f".{name}{PARTIAL_SUFFIX}")


@rundir.job  # releases the directory it holds when it returns or raises
def finetune(fc: FinetuneConfig, callbacks=(), log=print, live=None) -> dict:
    """Run (or resume) the fine-tuning job; return the metrics (also in
    metrics.json). `callbacks`, `log` and `live` as for tfdp.training.train."""
    fc = fc.validate()
    output_dir = require_new_or_empty(fc.output_dir, "--output_dir")
    # The strategy first: it fixes TensorFlow's devices.
    saved = (Config.load(os.path.abspath(os.path.expanduser(fc.model_dir))) if fc.model_dir
             else None) or Config()
    strategy = build_strategy(fc.strategy, fc.num_cpu_replicas,
                              collective_timeout=saved.collective_timeout,
                              collective=fc.collective, allow_cpu=fc.allow_cpu)
    check_batch(fc.global_batch_size, strategy.num_replicas_in_sync)
    chief = is_chief(strategy)
    work = partial_dir(output_dir)
    return watchdog.run_job(chief, work, lambda write_dir, say, live: _finetune_in(
        fc, strategy, output_dir, work, write_dir, callbacks, say, live), log, live)


def _finetune_in(fc: FinetuneConfig, strategy, output_dir: str, work: str, write_dir: str,
                 callbacks, say, live) -> dict:
    """Fine-tune in `work` (checkpoints into `write_dir`: `work` on the
    chief), then publish it as output_dir."""
    chief = write_dir == work
    replicas = strategy.num_replicas_in_sync
    pretrained = load_pretrained(fc.model_dir, fc.init_from)
    cfg = pretrained.cfg
    if fc.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len={fc.seq_len} exceeds the model's seq_len={cfg.seq_len} "
                        "(its position embeddings end there); use at most that")
    setup = SETUPS[fc.task](fc, pretrained)
    task, seq_len, n = setup.task, setup.seq_len, setup.train_examples
    batch = fc.global_batch_size
    steps = fc.train_steps or max(1, math.ceil(fc.epochs * setup.rows / batch))
    # The values this job actually uses, recorded once and checked on resume.
    config = {**dataclasses.asdict(fc), "output_dir": output_dir,
              pretrained.flag[2:]: pretrained.path,
              "seq_len": seq_len, "steps": steps, **setup.config,
              "jit_compile": (default_jit_compile("off", strategy) if fc.jit_compile is None
                              else fc.jit_compile),  # float32 compute (the task's model)
              "pretrained_config": json.loads(cfg.to_json())}
    # One job at a time per output_dir: a second is refused, naming the first.
    held = rundir.hold(work, flag="--output_dir") if chief else None
    config_name = setup.config_file
    resume = _check_resumable(work, config, config_name) if chief else os.path.isdir(work)
    say(f"strategy: {describe(strategy)}; pretrained: {pretrained.path}; {n:,} train / "
        f"{setup.eval_examples:,} eval examples of up to {seq_len} tokens; {setup.summary}; "
        f"{steps} steps of {batch} ({steps * batch / setup.rows:.2f} epochs); working in {work}")
    say("config: " + " ".join(f"{k}={v}" for k, v in sorted(config.items())
                              if k != "pretrained_config"))
    optimizer = Config(learning_rate=fc.learning_rate, min_learning_rate=0.0,
                       warmup_steps=int(fc.warmup_fraction * steps), train_steps=steps,
                       weight_decay=fc.weight_decay, beta2=0.999)
    schedule = Schedule.of(fc, train_steps=steps, eval_every=fc.eval_every or steps,
                           mixed_precision="off", jit_compile=config["jit_compile"])
    runner = Runner(strategy, task, schedule, lambda v: build_optimizer(optimizer, v), work,
                    write_dir, callbacks, say, live, resume=resume,
                    config_json=json.dumps(config, indent=2))
    # A classifier's head adds one matmul per example, not per token: the
    # decoder's FLOPs per token are the figure that matters.
    runner.flops_per_token = flops_per_token(
        non_embedding_params(runner.model), cfg.num_layers, cfg.num_heads,
        cfg.hidden_dim // cfg.num_heads, seq_len)
    runner.peak_flops = machine_peak_flops(strategy, tf.float32)
    if chief:
        if task.pretrained_checkpoint:  # a fresh start: record where it started from
            config["pretrained_checkpoint"] = task.pretrained_checkpoint
        else:
            config["pretrained_checkpoint"] = read_json(
                os.path.join(work, config_name)).get("pretrained_checkpoint")
        os.makedirs(work, exist_ok=True)
        write_text(os.path.join(work, config_name), json.dumps(config, indent=2))
        setup.write_files(work, pretrained, output_dir)
    logs = runner.fit()
    metrics = {**{k: v for k, v in logs.items() if k.startswith(("eval_", "train_loss"))},
               **{k: v for k, v in setup.config.items() if k != "train_windows"},
               "train_examples": n, "eval_examples": setup.eval_examples, "seq_len": seq_len,
               "steps": steps, "step": runner.step, "num_replicas": replicas,
               "tokens_per_second": runner.mean_tokens_per_second,
               "pretrained_checkpoint": config.get("pretrained_checkpoint"),
               "history": runner.history, **setup.metrics}
    if chief:
        setup.write_final(work, runner.model)
        write_text(os.path.join(work, "metrics.json"), json.dumps(metrics, indent=2))
        if fc.report:
            try:  # the report is a view of the run: its failure must not fail it
                write_report(work)
            except Exception as err:  # noqa: BLE001
                runner.log(f"warning: could not write the report ({type(err).__name__}: "
                           f"{err})")
        publish(work, output_dir)
        with contextlib.suppress(OSError):  # the lock file moved along; the lock stays held
            os.unlink(os.path.join(output_dir, rundir.LOCK_NAME))
        held.release()
        score = ", ".join(f"{k[5:].replace('_', ' ')} {metrics[k]:.4g}" for k in setup.shown
                          if k in metrics)
        runner.log(f"eval {score}; wrote {output_dir}")
    return metrics


def _check_resumable(work: str, config: dict, name: str) -> bool:
    """Whether `work` holds an interrupted fine-tune to resume (its config in
    `name`); refuse one that another command (other data, model or
    hyper-parameters) began."""
    if not os.path.isdir(work):
        return False
    saved = read_json(os.path.join(work, name))
    if not saved:
        return False  # nothing recorded yet: it never got past its set-up (or only holds it)
    # Fields added since tfdp first recorded fine-tunes: an older one had
    # their defaults (it was a classification, which ignores them).
    added = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in ADDED}
    diffs = [f"--{k}={saved.get(k, added.get(k))!r} (now {config[k]!r})"
             for k in RESUME_FIELDS if saved.get(k, added.get(k)) != config[k]]
    if diffs:
        raise UserError(f"{work} holds an interrupted fine-tune into the same --output_dir "
                        f"with {', '.join(diffs)}; rerun with those flags to resume it, or "
                        "delete that directory to start over")
    return True


def load_finetuned(output_dir: str):
    """(classifier, tokenizer, class names, seq_len) read back from an
    output_dir; the pretrained run it names must still hold its tokenizer."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(output_dir, "labels.json")) as f:
            classes = json.load(f)["classes"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{output_dir} holds no tfdp-finetune output ({err})") from None
    pretrained = load_pretrained(config.get("model_dir"), config.get("init_from"))
    cfg, tokenizer = pretrained.cfg, pretrained.tokenizer
    seq_len = config["seq_len"]
    model = build_classifier(cfg, tokenizer.vocab_size, len(classes), config["pooling"],
                             seq_len, config["seed"])
    tf.train.Checkpoint(backbone=model.backbone, head=model.head).read(
        os.path.join(output_dir, "checkpoint", "ckpt")).assert_existing_objects_matched()
    return model, tokenizer, classes, seq_len


def predict(model: Classifier, tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Class ids of `texts`, packed as in training."""
    ids, mask = classdata.pack(tokenizer.encode([t.encode("utf-8") for t in texts]),
                               seq_len, tokenizer.eot_id)
    return predict_packed(model, ids, mask)
