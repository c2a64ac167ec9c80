"""Whole runs in-process: learning, Keras callbacks, resume, model_dir contents."""

from __future__ import annotations

import csv
import glob
import json
import math
import os

import keras
import pytest

from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.restore import load_trained
from tfdp.training import train

# XLA compiles take half of a tiny run's time; runs whose subject is not the
# compiled step leave it off (it is on in test_step, the default-corpus run,
# the resume-equivalence run and the CLI tests). The report and the
# TensorBoard graph (seconds each) are left to the tests about them
# (test_report, the Keras-callbacks test below, the CLI tests). One device:
# a tiny step under MirroredStrategy on 2 logical CPUs takes ~1.6x as long,
# so runs whose subject is not the replicas leave them to the tests that
# are (test_step, test_faults, the resume and steps-per-loop equivalences
# below, test_export, the fine-tunes, the multi-worker tests).
TINY = dict(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=32,
            global_batch_size=8, warmup_steps=5, log_every=1000, sample_tokens=0,
            jit_compile=False, report=False, tensorboard_graph=False, strategy="one_device")
MIRRORED = {**TINY, "strategy": "mirrored"}


def _quiet(*_):
    pass


class Recorder(keras.callbacks.Callback):
    """A user's own callback: records which hooks ran with which logs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", dict(logs or {})))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", dict(logs or {})))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", dict(logs or {})))

    def on_test_end(self, logs=None):
        self.calls.append(("test_end", dict(logs or {})))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end", dict(logs or {})))


def test_tiny_model_overfits_tiny_text(tmp_path, text_file):
    cfg = Config(data=str(text_file), model_dir=str(tmp_path / "run"), train_steps=300,
                 eval_every=100, checkpoint_every=300, learning_rate=3e-3,
                 min_learning_rate=3e-4, val_fraction=0.1,
                 **{**TINY, "num_layers": 2, "hidden_dim": 64, "intermediate_dim": 128,
                    "jit_compile": True})  # 300 steps: compiling pays
    metrics = train(cfg, log=_quiet)
    start = math.log(257)  # a fresh model predicts ~uniformly over 257 bytes
    # train_loss: the mean over the last 100 steps.
    assert metrics["train_loss"] < 0.3 * start, metrics["train_loss"]
    # The validation tail repeats the same lines, so it is learned too.
    assert metrics["val_loss"] < 0.5 * start


def test_keras_callbacks_work_through_the_trainer(tmp_path, text_file):
    recorder = Recorder()
    csv_path = tmp_path / "log.csv"
    tb_dir = tmp_path / "keras_tb"
    callbacks = [recorder, keras.callbacks.CSVLogger(str(csv_path)),
                 keras.callbacks.TensorBoard(log_dir=str(tb_dir)),
                 keras.callbacks.TerminateOnNaN()]
    cfg = Config(data=str(text_file), model_dir=str(tmp_path / "run"), train_steps=12,
                 eval_every=4, checkpoint_every=4, **{**TINY, "tensorboard_graph": True})
    metrics = train(cfg, callbacks=callbacks, log=_quiet)

    names = [name for name, _ in recorder.calls]
    assert names[0] == "train_begin" and names[-1] == "train_end"
    assert names.count("batch_end") == 12
    assert names.count("epoch_end") == 3 and names.count("test_end") == 3
    batch_logs = next(logs for name, logs in recorder.calls if name == "batch_end")
    assert {"loss", "learning_rate", "tokens_per_second", "grad_norm"} <= set(batch_logs)
    epoch_logs = [logs for name, logs in recorder.calls if name == "epoch_end"]
    assert all("val_loss" in logs and "train_loss" in logs for logs in epoch_logs)
    assert epoch_logs[-1]["val_loss"] == pytest.approx(metrics["val_loss"])

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["val_loss"]) == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert glob.glob(str(tb_dir / "**" / "events.out.tfevents.*"), recursive=True)
    # tfdp's own TensorBoard run holds the model's forward graph.
    from tensorboard.backend.event_processing import event_accumulator
    graph = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard" / "graph"))
    graph.Reload()
    assert any(node.op == "MatMul" or "Einsum" in node.op for node in graph.Graph().node)


def test_early_stopping_ends_training_and_checkpoints(tmp_path, text_file):
    # min_delta larger than any possible improvement: stop after patience=1.
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0)
    cfg = Config(data=str(text_file), model_dir=str(tmp_path / "run"), train_steps=40,
                 eval_every=5, checkpoint_every=100, **TINY)
    metrics = train(cfg, callbacks=[stopper], log=_quiet)
    assert metrics["step"] == 10
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-10.index")


def test_resume_continues_from_the_checkpoint(tmp_path, text_file):
    lines = []
    common = dict(data=str(text_file), model_dir=str(tmp_path / "run"), eval_every=4,
                  checkpoint_every=4, **TINY)
    train(Config(train_steps=8, **common), log=_quiet)
    metrics = train(Config(train_steps=12, **common), log=lines.append)
    assert any("resumed from step 8" in line for line in lines)
    assert metrics["step"] == 12
    assert [h["step"] for h in metrics["history"]] == [4, 8, 12]  # history continues

    with pytest.raises(UserError, match="hidden_dim"):
        train(Config(train_steps=16, **{**common, "hidden_dim": 64}), log=_quiet)
    model, tokenizer, cfg = load_trained(str(tmp_path / "run"))
    assert cfg.train_steps == 12 and tokenizer.kind == "byte"
    assert model.backbone.hidden_dim == 32


class _Crash(keras.callbacks.Callback):
    """Dies after `step` steps, like a killed process (no clean shutdown)."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            raise KeyboardInterrupt


def _logged_steps(logdir, tag: str = "loss") -> list[int]:
    """The steps of every `tag` scalar in a TensorBoard directory, in file order."""
    import tensorflow as tf
    steps = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_interrupted_then_resumed_run_equals_a_straight_one(tmp_path, text_file):
    """40 steps straight vs a run that dies at step 27 (last checkpoint: 20)
    and is restarted with the same command: same weights, same step, and the
    validation history and TensorBoard hold each step once. Dropout is on,
    so this also needs the dropout RNG state from the checkpoint. Without
    XLA (three compiles would double its time): what a resume restores is
    the same for a compiled step, which test_step checks against a
    hand-written one."""
    import numpy as np
    common = dict(data=str(text_file), train_steps=40, eval_every=10, checkpoint_every=10,
                  learning_rate=1e-2, **{**MIRRORED, "dropout": 0.1})
    straight = train(Config(model_dir=str(tmp_path / "straight"), **common), log=_quiet)
    crashed = str(tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        train(Config(model_dir=crashed, **common), callbacks=[_Crash(27)], log=_quiet)
    partial = json.loads(open(os.path.join(crashed, "metrics.json")).read())
    assert [h["step"] for h in partial["history"]] == [10, 20]  # written as it went
    lines = []
    resumed = train(Config(model_dir=crashed, **common), log=lines.append)
    assert any("resumed from step 20" in line for line in lines)
    assert resumed["step"] == straight["step"] == 40
    assert [h["step"] for h in resumed["history"]] == [10, 20, 30, 40]
    np.testing.assert_allclose(resumed["val_loss"], straight["val_loss"], rtol=1e-5)
    a = load_trained(str(tmp_path / "straight"))[0].get_weights()
    b = load_trained(crashed)[0].get_weights()
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert worst < 1e-5, f"resumed weights differ from the straight run by {worst}"
    assert sorted(_logged_steps(os.path.join(crashed, "tensorboard", "train"))) == \
        list(range(1, 41))
    assert _logged_steps(os.path.join(crashed, "tensorboard", "val")) == [10, 20, 30, 40]


def test_resumed_tensorboard_logs_drop_the_steps_trained_again(tmp_path):
    """Events logged after the checkpoint a run resumes from are dropped,
    file by file, and files with nothing later are left alone."""
    import tensorflow as tf
    from tfdp.callbacks import drop_events_after

    def log(steps):
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            for step in steps:
                tf.summary.scalar("loss", 1.0 / step, step=step)
        writer.close()
    log(range(1, 28))  # crashed at 27, last checkpoint at 20
    drop_events_after(str(tmp_path), 20)
    assert _logged_steps(tmp_path) == list(range(1, 21))
    log(range(21, 38))  # crashed again at 37, checkpoint 30
    first = sorted(tmp_path.iterdir())[0]
    untouched = (first.read_bytes(), first.stat().st_mtime_ns)
    drop_events_after(str(tmp_path), 30)
    assert _logged_steps(tmp_path) == list(range(1, 31))
    assert (first.read_bytes(), first.stat().st_mtime_ns) == untouched
    # The newest checkpoint was unreadable and the run fell back to step 10.
    drop_events_after(str(tmp_path), 10)
    assert _logged_steps(tmp_path) == list(range(1, 11))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents."))


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, text_file):
    run = tmp_path / "run"
    common = dict(data=str(text_file), model_dir=str(run), eval_every=10, checkpoint_every=10,
                  **TINY)
    train(Config(train_steps=20, **common), log=_quiet)
    newest = glob.glob(str(run / "checkpoints" / "ckpt-20.data-*"))
    assert newest
    for path in newest:  # what a crash in the middle of writing leaves
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    lines = []
    metrics = train(Config(train_steps=30, **common), log=lines.append)
    assert any("warning: checkpoint" in line and "ckpt-20" in line and "unreadable" in line
               for line in lines), lines
    assert any("resumed from step 10" in line for line in lines), lines
    assert metrics["step"] == 30
    # Nothing readable at all: a clear error, and the run directory is left alone.
    for path in glob.glob(str(run / "checkpoints" / "ckpt-*.data-*")):
        with open(path, "r+b") as f:
            f.truncate(8)
    before = sorted(os.listdir(run))
    with pytest.raises(UserError, match="no checkpoint in .* can be read"):
        train(Config(train_steps=40, **common), log=_quiet)
    assert sorted(os.listdir(run)) == before


@pytest.mark.slow
def test_default_corpus_run_lowers_validation_loss(tmp_path):
    """The default job's data and model, fewer steps: validation loss must
    drop well below a fresh model's ln(257) and keep falling."""
    cfg = Config(model_dir=str(tmp_path / "run"), train_steps=40, eval_every=20,
                 eval_steps=8, checkpoint_every=40, warmup_steps=20, sample_tokens=32)
    metrics = train(cfg, log=_quiet)
    history = metrics["history"]
    assert [h["step"] for h in history] == [20, 40]
    assert history[1]["val_loss"] < history[0]["val_loss"] < 0.8 * math.log(257)
    with open(tmp_path / "run" / "metrics.json") as f:
        saved = json.load(f)
    assert saved["num_replicas"] == 2 and saved["num_parameters"] > 500_000
    assert saved["tokens_per_second"] > 0 and 0 < saved["mfu"] < 1
    assert (tmp_path / "run" / "sample.txt").read_text()


def test_resume_refuses_data_with_another_tokenizer(tmp_path, text_file):
    """Same --data path, re-prepared with another vocabulary: the token ids
    mean something else, so the run must be refused before anything is
    rewritten. The tiny char vocabulary (16 < top-k 40) also exercises the
    sampler's cap at the vocabulary size."""
    from tfdp.prepare import prepare
    prepared = tmp_path / "prep"
    prepare([text_file], str(prepared), "char", 16, 0.1, log=_quiet)
    common = dict(data=str(prepared), model_dir=str(tmp_path / "run"), eval_every=4,
                  checkpoint_every=4, tokenizer="char", **{**TINY, "sample_tokens": 10})
    metrics = train(Config(train_steps=4, **common), log=_quiet)
    assert metrics["vocab_size"] == 16
    assert (tmp_path / "run" / "sample.txt").read_text()
    config_before = (tmp_path / "run" / "config.json").read_text()

    import shutil
    shutil.rmtree(prepared)
    # The same vocabulary size, other characters: only the tokenizer's files tell.
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(0x3b1 + i % 20) * 3 + " " for i in range(4000)),
                     encoding="utf-8")
    prepare([other], str(prepared), "char", 16, 0.1, log=_quiet)
    with pytest.raises(UserError, match="was trained with another tokenizer than the one in "
                                        "--data=.*or pass --overwrite to discard that run"):
        train(Config(train_steps=8, **common), log=_quiet)
    assert (tmp_path / "run" / "config.json").read_text() == config_before
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())[
        "vocab_size"] == 16

    # --overwrite discards that run (and only tfdp's files) and starts afresh.
    (tmp_path / "run" / "notes.txt").write_text("mine")
    lines = []
    metrics = train(Config(train_steps=4, overwrite=True, **common), log=lines.append)
    assert any("--overwrite: discarded the earlier run" in line for line in lines)
    assert not any("resumed from" in line for line in lines)
    assert metrics["vocab_size"] == 16 and metrics["history"][0]["step"] == 4
    from tfdp.rundir import same_files
    assert same_files(str(prepared / "tokenizer"), str(tmp_path / "run" / "tokenizer"))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tfdp-")]
    # A compatible run is resumed even with --overwrite (a scheduler's restart
    # repeats the command line).
    lines = []
    train(Config(train_steps=6, overwrite=True, **common), log=lines.append)
    assert any("resumed from step 4" in line for line in lines)


def test_a_foreign_manifest_is_not_prepared_data(tmp_path):
    from tfdp.prepare import is_prepared, load_manifest
    (tmp_path / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    assert not is_prepared(str(tmp_path))
    with pytest.raises(UserError, match="not a directory written by tfdp-prepare"):
        load_manifest(str(tmp_path))


@pytest.mark.parametrize("kwargs, flag", [({"top_k": 0}, "--top_k=0"),
                                          ({"top_p": 1.5}, "--top_p=1.5"),
                                          ({"top_p": 0.0}, "--top_p=0.0")])
def test_bad_sampler_numbers_are_user_errors(kwargs, flag):
    from tfdp.generate import make_sampler
    with pytest.raises(UserError, match=flag):
        make_sampler("top_k", **kwargs)


def test_steps_per_loop_trains_the_same_and_callbacks_see_every_step(tmp_path, text_file):
    """5 steps per call (calls end at validation and checkpoint steps) give
    the same weights, learning rates and losses as one step per call."""
    import numpy as np
    common = dict(data=str(text_file), train_steps=12, eval_every=6, checkpoint_every=4,
                  **MIRRORED)
    runs = {}
    for per_loop in (1, 5):
        recorder = Recorder()
        run = tmp_path / f"per_loop_{per_loop}"
        metrics = train(Config(model_dir=str(run), steps_per_loop=per_loop, **common),
                        callbacks=[recorder], log=_quiet)
        batches = [logs for name, logs in recorder.calls if name == "batch_end"]
        runs[per_loop] = (metrics, batches, load_trained(str(run))[0].get_weights())
        assert len(batches) == 12
        assert all((run / "checkpoints" / f"ckpt-{n}.index").exists() for n in (4, 8, 12))
        assert [h["step"] for h in metrics["history"]] == [6, 12]
    (m1, b1, w1), (m5, b5, w5) = runs[1], runs[5]
    np.testing.assert_allclose([b["loss"] for b in b5], [b["loss"] for b in b1], rtol=1e-5)
    np.testing.assert_allclose([b["learning_rate"] for b in b5],
                               [b["learning_rate"] for b in b1], rtol=1e-6)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w5))
    assert worst < 1e-5, worst
    np.testing.assert_allclose(m5["val_loss"], m1["val_loss"], rtol=1e-5)


def test_generation_goes_on_when_eot_is_token_0(tmp_path, text_file):
    """char (and bpe) tokenizers give EOT the id 0; keras-hub's sampler stops
    at a stop token anywhere past the prompt, so the positions still to
    generate must not be filled with 0s (they were: samples came out empty)."""
    from tfdp.generate import generate, make_sampler
    run = tmp_path / "run"
    train(Config(data=str(text_file), model_dir=str(run), tokenizer="char", train_steps=30,
                 eval_every=30, checkpoint_every=30, **{**TINY, "sample_tokens": 0}),
          log=_quiet)
    model, tokenizer, cfg = load_trained(str(run))
    assert tokenizer.eot_id == 0
    text = generate(model, tokenizer, "def add(", 40, make_sampler("greedy"), cfg.seq_len)
    assert len(text) >= 10, repr(text)  # greedy after "def add(": no EOT for a while
