"""A whole training run: config -> strategy -> data -> model -> loop -> model_dir.

model_dir after a run:

    config.json      the resolved Config (read back by tfdp-generate)
    data/            token shards prepared on the fly (when --data was text)
    tokenizer/       the tokenizer, whatever the data source
    checkpoints/     tf.train.CheckpointManager (tfdp/checkpoints.py)
    tensorboard/     train/ and val/ scalars (tensorboard --logdir model_dir)
    metrics.json     final figures and the validation history
    sample.txt       the text generated at the end

Everything that can fail on a user's input (flags, strategy, data, an
incompatible model_dir or tokenizer, a checkpoint that does not fit) is
checked before config.json and tokenizer/ are written; outputs are written
through a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import tensorflow as tf

from tfdp import recipes
from tfdp.recipes.tfds_text import TfdsText, is_tfds
from tfdp import cluster, presets, watchdog
from tfdp import rundir
from tfdp.atomic import staged_directory, write_text
from tfdp.config import DEFAULT_VOCAB_SIZE, Config, check_batch
from tfdp.dataset import Split, shard_files
from tfdp.errors import UserError
from tfdp.flops import flops_per_token, machine_peak_flops
from tfdp.model import count_params, non_embedding_params
from tfdp.optimizer import build_optimizer
from tfdp.prepare import is_prepared, load_manifest, prepare, prepare_stream
from tfdp.report import write_report
from tfdp.memory import peak_device_memory_gib, peak_host_memory_gib
from tfdp.runner import Runner, Schedule
from tfdp.rundir import read_json
from tfdp.strategy import build_strategy, describe, is_chief
from tfdp.stream import TextStream
from tfdp.step import default_jit_compile
from tfdp.tasks.language_model import LanguageModelTask
from tfdp.tokenizers import load_tokenizer


def _load_data(cfg: Config, run_dir: str, log) -> str:
    """Find or prepare token shards; return their directory.

    Text is prepared in a staging directory and moved into run_dir/data
    only once every split holds at least one window. A streamed TFDS
    corpus gets its tokenizer and validation tokens there.
    """
    spec = os.path.expanduser(cfg.data)
    for data_dir in (spec, os.path.join(run_dir, "data")):
        if is_prepared(data_dir):
            return data_dir
    if is_tfds(cfg.data):
        source = tfds_source(cfg)
        splits = source.train_and_val(cfg.val_fraction)
        make = lambda out: prepare_stream(source, *splits, out, presets.data_tokenizer(cfg),
                                          cfg.vocab_size, log)
    else:
        files = recipes.source_files(spec)
        make = lambda out: prepare(files, out, presets.data_tokenizer(cfg), cfg.vocab_size,
                                   cfg.val_fraction, log=log)
    with staged_directory(os.path.join(run_dir, "data"), ".tfdp-data-") as staged:
        for split in make(staged)["splits"]:
            Split(staged, split, cfg.seq_len)  # raises unless it holds a window
    return os.path.join(run_dir, "data")


def tfds_source(cfg: Config) -> TfdsText:
    return TfdsText(cfg.data, cfg.text_feature, cfg.tfds_data_dir, cfg.tfds_download)


def load_splits(cfg: Config, data_dir: str, strategy):
    """This worker's training data and val split: its own shard files when
    every input pipeline can have whole files (--input_sharding=auto), else
    all; a TextStream for a TFDS corpus (tfdp/stream.py)."""
    pipeline, pipelines = cluster.input_pipeline(strategy)

    def split(name):
        shards = (shard_files(data_dir, name, cfg.seq_len, pipelines, pipeline)
                  if cfg.input_sharding == "auto" else None)
        return Split(data_dir, name, cfg.seq_len, shards)
    if is_tfds(cfg.data):
        tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
        source = tfds_source(cfg)
        train_split = source.train_and_val(cfg.val_fraction)[0]
        return TextStream(source, train_split, tokenizer, cfg.seq_len), split("val")
    return split("train"), split("val")


def resolve(cfg: Config, strategy) -> tuple[Config, list[str]]:
    """The config with every default the run decides filled in, and notes on
    what was decided: the vocabulary (the tokenizer's default size, or a
    prepared --data directory's own tokenizer and size) and XLA
    (tfdp.step.default_jit_compile for these devices). config.json records
    the result and the run prints it once, so both say what ran."""
    changes, notes = {}, []
    manifest = _manifest(cfg.data)
    if manifest:  # a prepared directory brings its own tokenizer
        changes.update(tokenizer=manifest["tokenizer"], vocab_size=manifest["vocab_size"])
    elif cfg.vocab_size is None:
        changes["vocab_size"] = DEFAULT_VOCAB_SIZE[cfg.tokenizer]
    if cfg.jit_compile is None:
        changes["jit_compile"] = default_jit_compile(cfg.mixed_precision, strategy)
        if not changes["jit_compile"]:
            notes.append(f"XLA: off, the default for --mixed_precision={cfg.mixed_precision} "
                         "on CPUs (see --jit_compile)")
    return dataclasses.replace(cfg, **changes), notes


def _manifest(data: str) -> dict | None:
    path = os.path.expanduser(data)
    return load_manifest(path) if not is_tfds(data) and is_prepared(path) else None


@rundir.job  # releases the model_dir it holds when it returns or raises
def train(cfg: Config, callbacks=(), log=print, live=None) -> dict:
    """Run (or resume) training as configured; return the final metrics.

    `callbacks` are Keras callbacks (tfdp.runner.Runner says where they run);
    `log` prints the chief's messages; `live`, a terminal stream, gets a
    progress bar redrawn in place (tfdp.callbacks.ProgressLogger)."""
    cfg = cfg.validate()
    if cfg.init_from:  # the preset fixes the model's shape and tokenizer (tfdp/presets.py)
        cfg = presets.resolve(cfg, presets.explicit_fields(cfg))[0].validate()
    strategy = build_strategy(cfg.strategy, cfg.num_cpu_replicas,
                              collective_timeout=cfg.collective_timeout,
                              slurm_port_base=cfg.slurm_port_base, collective=cfg.collective,
                              allow_cpu=cfg.allow_cpu, all_reduce_dtype=cfg.all_reduce_dtype)
    check_batch(cfg.global_batch_size, strategy.num_replicas_in_sync, cfg.grad_accum_steps)
    chief = is_chief(strategy)
    cfg, notes = resolve(cfg, strategy)
    model_dir = os.path.abspath(os.path.expanduser(cfg.model_dir))
    if chief:  # other workers would race with the chief's own writes
        rundir.check_usable(model_dir)
        rundir.hold(model_dir)  # one job at a time: a second one is refused
    # Every worker reads the verdict (so all refuse together), only the chief
    # discards. A worker that reads after the chief discarded finds no run.
    reason = rundir.conflict(cfg, model_dir)
    if reason and not cfg.overwrite:
        raise UserError(f"--model_dir={cfg.model_dir} {reason}; use a new --model_dir or the "
                        "same flags, or pass --overwrite to discard that run")
    if reason and chief:
        rundir.discard(model_dir, log, keep=os.path.expanduser(cfg.data))
    return watchdog.run_job(chief, model_dir, lambda write_dir, say, live: _train_in(
        cfg, strategy, model_dir, write_dir, callbacks, say, live, resume=not reason,
        notes=notes), log, live)


def _train_in(cfg: Config, strategy, model_dir: str, write_dir: str, callbacks, say, live,
              resume: bool, notes=()) -> dict:
    """Train, writing checkpoints, logs and outputs into `write_dir`; continue
    from model_dir's newest checkpoint when `resume`."""
    chief = write_dir == model_dir
    replicas = strategy.num_replicas_in_sync
    say(f"model_dir: {model_dir}")
    say(f"strategy: {describe(strategy)}")
    say("config: " + " ".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(cfg).items())))
    for note in notes:
        say(note)
    data_dir = _load_data(cfg, write_dir, say)
    train_split, val_split = load_splits(cfg, data_dir, strategy)
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    preset = presets.read_preset(cfg.init_from) if cfg.init_from else None
    if preset is not None:
        presets.check_data(preset, tokenizer, cfg.data)
    # With whole shard files per pipeline the data order depends on how many
    # pipelines there are; with one global order (interleave) it does not.
    # A stream's order is not exact on resume anyway (tfdp/stream.py).
    own_files = isinstance(train_split, Split) and train_split.shards is not None
    task = LanguageModelTask(cfg, manifest["vocab_size"], train_split, val_split,
                             input_pipelines=cluster.input_pipeline(strategy)[1]
                             if own_files else 1,
                             preset=preset, tokenizer=tokenizer if chief else None)
    runner = Runner(strategy, task, Schedule.of(cfg), lambda v: build_optimizer(cfg, v),
                    model_dir, write_dir, callbacks, say, live, resume=resume,
                    config_json=cfg.to_json())
    model = runner.model
    if isinstance(train_split, TextStream) and runner.step:
        say("note: a streamed corpus resumes in a fresh order seeded by the step, not where "
            "the interrupted run was (tfdp/stream.py)")
    # Only now, with data, model and checkpoint known to fit, is the run recorded.
    os.makedirs(write_dir, exist_ok=True)
    write_text(os.path.join(write_dir, "config.json"), cfg.to_json())
    shutil.copytree(os.path.join(data_dir, "tokenizer"), os.path.join(write_dir, "tokenizer"),
                    dirs_exist_ok=True)

    num_params = count_params(model)
    fpt = flops_per_token(non_embedding_params(model), cfg.num_layers, cfg.num_heads,
                          cfg.hidden_dim // cfg.num_heads, cfg.seq_len)
    compute_dtype = tf.as_dtype(model.backbone.compute_dtype)
    peak = machine_peak_flops(strategy, compute_dtype)
    runner.flops_per_token, runner.peak_flops = fpt, peak
    say(f"model: {num_params:,} parameters, {fpt / 1e6:.2f} MFLOPs/token; "
        f"data: {_describe(train_split)} / {val_split.num_windows:,} val windows "
        f"{'(this worker: whole shard files) ' if own_files else ''}"
        f"of {cfg.seq_len + 1} {manifest['tokenizer']} tokens; "
        f"measured {compute_dtype.name} matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
    previous = read_json(os.path.join(model_dir, "metrics.json"))
    logs = runner.fit()
    say = runner.log  # above the progress bar, if there is one

    sample = task.sample(model) or ""
    # A run that had nothing left to train keeps the throughput it measured.
    tps = runner.mean_tokens_per_second or previous.get("tokens_per_second", 0.0)
    metrics = {
        "step": runner.step,
        "train_loss": logs.get("train_loss"),
        "val_loss": logs["val_loss"],
        "val_perplexity": logs["val_perplexity"],
        "val_bits_per_byte": logs["val_bits_per_byte"],
        "tokens_per_second": tps,
        "tokens_per_second_per_replica": tps / replicas,
        "step_time": runner.mean_step_time or previous.get("step_time", 0.0),
        "peak_host_memory_gib": peak_host_memory_gib(),
        **peak_device_memory_gib(strategy),
        "mfu": tps * fpt / peak if peak else 0.0,
        "peak_flops": peak,
        "flops_per_token": fpt,
        "num_replicas": replicas,
        "global_batch_size": cfg.global_batch_size,
        "seq_len": cfg.seq_len,
        "num_parameters": num_params,
        "tokenizer": manifest["tokenizer"],
        "vocab_size": manifest["vocab_size"],
        "history": runner.history,
    }
    write_text(os.path.join(write_dir, "metrics.json"), json.dumps(metrics, indent=2))
    write_text(os.path.join(write_dir, "sample.txt"), sample)
    say(sample)
    if chief and cfg.report:  # a view of the run: its failure must not fail the run
        try:
            say(f"report: {write_report(model_dir)[0]}")
        except Exception as err:  # noqa: BLE001
            say(f"warning: could not write the run report ({type(err).__name__}: {err})")
    return metrics


def _describe(train) -> str:
    if isinstance(train, TextStream):
        return f"train windows streamed from {train.name}"
    return f"{train.num_windows:,} train"
