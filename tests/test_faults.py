"""Faults inside one process: NaN/Inf updates, a save that fails mid-run,
resuming with another input layout.

NaNs are injected as a poisoned batch would bring them: the token losses of
chosen steps are multiplied by NaN (a variable the graph reads, set by a
callback before those steps), so the loss and every gradient are NaN.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdp.tasks import language_model
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.restore import load_trained
from tfdp.training import train
from test_training import MIRRORED

COMMON = dict(train_steps=10, eval_every=5, checkpoint_every=5, **MIRRORED)


class _Poison(keras.callbacks.Callback):
    """Multiplies the token losses by `value` (NaN: a poisoned batch) during
    the given (1-based) steps and records the weights around them."""

    def __init__(self, factor: tf.Variable, steps, value: float):
        super().__init__()
        self.factor, self.steps, self.value, self.around = factor, set(steps), value, {}

    def on_train_batch_begin(self, batch, logs=None):
        if batch + 1 in self.steps:
            self.factor.assign(self.value)
            self.around[batch + 1] = [self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 in self.steps:
            self.factor.assign(1.0)
            self.around[batch + 1].append(self.model.get_weights())


@pytest.fixture
def poison(monkeypatch, mirrored):
    """A callback factory: poison(steps, value=NaN) poisons those steps of
    the next run.

    The factor is mirrored like the model (XLA reads variables only on the
    device that holds them); train() reuses this process's strategy."""
    with mirrored.scope():
        factor = tf.Variable(1.0, trainable=False)
    real = language_model.token_losses
    monkeypatch.setattr(language_model, "token_losses",
                        lambda *args, **kwargs: real(*args, **kwargs) * factor)
    return lambda steps, value=float("nan"): _Poison(factor, steps, value)


def _digest(directory) -> dict:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


class _Snapshot(keras.callbacks.Callback):
    """Records the checkpoint files as they are just before step `step`."""

    def __init__(self, directory, step: int):
        super().__init__()
        self.directory, self.step, self.files = directory, step, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch + 1 == self.step:
            self.files = _digest(self.directory)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, text_file, poison):
    """The NaN comes at step 10, a checkpoint step: the run stops before saving it."""
    run = tmp_path / "run"
    snapshot = _Snapshot(run / "checkpoints", 10)
    with pytest.raises(UserError) as err:
        train(Config(data=str(text_file), model_dir=str(run), **COMMON),
              callbacks=[poison([10]), snapshot], log=lambda *_: None)
    message = str(err.value)
    assert message.startswith("loss nan, gradient norm nan at step 10; training stopped and "
                              "its last checkpoint (ckpt-5) is untouched"), message
    assert "--skip_nonfinite_steps=K" in message and "\n" not in message
    assert _digest(run / "checkpoints") == snapshot.files  # not one byte changed
    model = load_trained(str(run))[0]
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_skip_nonfinite_steps_skips_up_to_k_updates(tmp_path, text_file, poison):
    lines = []
    poisoned = poison([3, 7])
    metrics = train(Config(data=str(text_file), model_dir=str(tmp_path / "run"),
                           skip_nonfinite_steps=2, **COMMON),
                    callbacks=[poisoned], log=lines.append)
    assert metrics["step"] == 10 and np.isfinite(metrics["val_loss"])
    skipped = [line for line in lines if "update skipped" in line]
    assert skipped == ["warning: loss nan, gradient norm nan at step 3: update skipped "
                       "(1 of --skip_nonfinite_steps=2)",
                       "warning: loss nan, gradient norm nan at step 7: update skipped "
                       "(2 of --skip_nonfinite_steps=2)"]
    for step in (3, 7):  # weights (and so the model) untouched by a skipped update
        before, after = poisoned.around[step]
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), step
    # The count is part of the checkpoint: a resumed run has no budget left.
    with pytest.raises(UserError, match=r"at step 12 \(more than --skip_nonfinite_steps=2\)"):
        train(Config(data=str(text_file), model_dir=str(tmp_path / "run"),
                     skip_nonfinite_steps=2, **{**COMMON, "train_steps": 14}),
              callbacks=[poison([12])], log=lines.append)
    assert any("resumed from step 10" in line for line in lines)


def test_fp16_overflow_is_skipped_and_the_loss_scale_resumes(tmp_path, text_file, poison):
    """A float32 run resumed under fp16 (the loss scale is in every
    checkpoint); at step 7 the loss is scaled so far up that float16
    gradients overflow, though the loss stays finite: the update is skipped,
    the scale halves, the run goes on, and the checkpoint keeps the scale."""
    run, lines = tmp_path / "run", []
    cfg = Config(data=str(text_file), model_dir=str(run), **{**COMMON, "train_steps": 5})
    train(cfg, log=lambda *_: None)
    spiked = poison([7], value=1e6)
    metrics = train(Config(**{**cfg.__dict__, "train_steps": 10, "mixed_precision": "fp16"}),
                    callbacks=[spiked], log=lines.append)
    assert metrics["step"] == 10 and np.isfinite(metrics["val_loss"])
    assert [line for line in lines if line.startswith("fp16")] == [
        "fp16 gradients overflowed at step 7: update skipped, loss scale now 16384"]
    before, after = spiked.around[7]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    saved = tf.train.load_checkpoint(str(run / "checkpoints"))
    assert saved.get_tensor("loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE") == 2.0 ** 14
    assert saved.get_tensor("loss_scale/good_steps/.ATTRIBUTES/VARIABLE_VALUE") == 3


def test_a_failing_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, text_file):
    """The disk "fills up" after step 7: files may not grow past 64 KB (the
    checkpoint's data file is ~200 KB), as on a full disk the write fails."""
    run = tmp_path / "run"

    class FillDisk(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == 7:
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
    try:
        with pytest.raises(UserError) as err:
            train(Config(data=str(text_file), model_dir=str(run), **COMMON),
                  callbacks=[FillDisk()], log=lambda *_: None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(err.value)
    assert message.startswith(f"could not save the checkpoint of step 10 in {run}/checkpoints "
                              "(File too large); resuming will start from ckpt-5: free space "
                              "or fix the permissions"), message
    assert sorted(os.listdir(run / "checkpoints")) == [
        "checkpoint", "ckpt-5.data-00000-of-00001", "ckpt-5.index"]  # no half-written ckpt-10
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-5")
    lines = []
    metrics = train(Config(data=str(text_file), model_dir=str(run), **COMMON),
                    log=lines.append)
    assert any("resumed from step 5" in line for line in lines) and metrics["step"] == 10


def _five_steps_read_back(tmp_path, text_file):
    """(config, model_dir, checkpoint as tfdp makes it, restored) of a
    5-step run, for a test to rewrite its checkpoint."""
    from tfdp.checkpoints import make_checkpoint
    from tfdp.loss_scale import DynamicLossScale
    from tfdp.model import build_model
    from tfdp.optimizer import build_optimizer
    run = tmp_path / "run"
    cfg = Config(data=str(text_file), model_dir=str(run), **{**COMMON, "train_steps": 5})
    train(cfg, log=lambda *_: None)
    model = build_model(cfg, 257)
    optimizer = build_optimizer(cfg, model.trainable_variables)
    checkpoint = make_checkpoint({"backbone": model.backbone}, model, optimizer, 1,
                                 DynamicLossScale())
    checkpoint.restore(tf.train.latest_checkpoint(str(run / "checkpoints"))).expect_partial()
    return cfg, run, checkpoint


def test_resuming_with_another_whole_file_layout_warns(tmp_path, text_file):
    """A checkpoint written by 2 input pipelines that each read whole shard
    files, resumed by 1: the data order changes, and the run says so."""
    cfg, run, checkpoint = _five_steps_read_back(tmp_path, text_file)
    checkpoint.input_pipelines.assign(2)  # as if 2 workers had written it
    tf.train.CheckpointManager(checkpoint, str(run / "checkpoints"), 3).save(5)
    lines = []
    train(Config(**{**cfg.__dict__, "train_steps": 6}), log=lines.append)
    assert any("warning: the data order from here differs from an uninterrupted run: the "
               "checkpoint was written with 2 input pipeline(s) reading whole shard files, this "
               "run reads 1 way(s)" in line for line in lines), lines
    # The new checkpoint records this run's layout: no warning next time.
    checkpoint.restore(tf.train.latest_checkpoint(str(run / "checkpoints"))).expect_partial()
    assert int(checkpoint.input_pipelines.numpy()) == 1


def test_a_checkpoint_without_the_loss_scale_still_resumes(tmp_path, text_file):
    """Checkpoints written before tfdp kept the fp16 loss scale resume with
    the initial scale instead of being taken for corrupt ones."""
    cfg, run, full = _five_steps_read_back(tmp_path, text_file)
    old = tf.train.Checkpoint(backbone=full.backbone, optimizer=full.optimizer, rng=full.rng,
                              nonfinite_steps=full.nonfinite_steps,
                              input_pipelines=full.input_pipelines)
    tf.train.CheckpointManager(old, str(run / "checkpoints"), 3).save(5)
    assert "loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE" not in dict(
        tf.train.list_variables(tf.train.latest_checkpoint(str(run / "checkpoints"))))
    lines = []
    metrics = train(Config(**{**cfg.__dict__, "train_steps": 7}), log=lines.append)
    assert metrics["step"] == 7
    assert any(line.startswith("resumed from step 5") for line in lines), lines
    assert not any("unreadable" in line for line in lines), lines
