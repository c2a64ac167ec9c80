"""tfdp/runner.py: the Schedule, evaluate_task and the Runner's loop, driven
by a toy Task of this file's own (weighted linear regression), so what is
tested is the loop: steps, checkpoint and evaluation cadence, metrics.json,
which callbacks run on which worker, stopping, and a run already done."""

from __future__ import annotations

import json
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdp.config import Config, FinetuneConfig
from tfdp.errors import UserError
from tfdp.optimizer import build_optimizer
from tfdp.runner import Runner, Schedule, evaluate_task
from tfdp.step import make_eval_step
from tfdp.tasks import Task


def quiet(*_):
    pass


class Regression(Task):
    """y = x . (1, -2, 0.5) + 0.3; 16 training rows, 6 eval rows (padded with
    weight-0 rows to whole global batches)."""

    eval_prefix = "val_"

    def __init__(self, eval_rows: int = 6):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(16, 3)).astype(np.float32)
        self.y = (self.x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
        self.eval_rows = eval_rows

    def build_model(self):
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])

    def checkpoint_parts(self, model):
        return {"backbone": model}

    def tokens_per_example(self):
        return 1

    def train_dataset_fn(self, global_batch_size, seed, start_step):
        def dataset_fn(ctx):
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            return (tf.data.Dataset.from_tensor_slices((self.x, self.y)).repeat()
                    .skip(start_step * global_batch_size).batch(per_replica))
        return dataset_fn

    def eval_dataset_fn(self, global_batch_size):
        n = self.eval_rows
        stop = -(-n // global_batch_size) * global_batch_size
        x, y = np.resize(self.x, (max(stop, 1), 3)), np.resize(self.y, max(stop, 1))
        w = (np.arange(max(stop, 1)) < n).astype(np.float32)

        def dataset_fn(ctx):
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            return tf.data.Dataset.from_tensor_slices((x, y, w)).take(stop).batch(per_replica)
        return dataset_fn

    def global_count(self, global_batch_size):
        return float(global_batch_size)

    def loss(self, model, batch, training):
        x, y = batch
        err = y - model(x, training=training)[:, 0]
        return tf.reduce_sum(err * err), tf.cast(tf.size(err), tf.float32)

    def eval_sums(self, model, batch):
        x, y, w = batch
        err = y - model(x, training=False)[:, 0]
        return tf.stack([tf.reduce_sum(w * err * err), tf.reduce_sum(w)])

    def eval_metrics(self, sums):
        return {"loss": float(sums[0]) / max(float(sums[1]), 1.0), "rows": float(sums[1])}


SCHEDULE = Schedule(train_steps=6, global_batch_size=4, eval_every=3, checkpoint_every=2,
                    keep_checkpoints=10, log_every=1000, jit_compile=False, clip_norm=0.0)
OPTIMIZER = Config(learning_rate=0.05, min_learning_rate=0.05, warmup_steps=0, train_steps=6,
                   weight_decay=0.0)


def _runner(strategy, model_dir, schedule=SCHEDULE, task=None, **kw) -> Runner:
    kw.setdefault("log", quiet)
    return Runner(strategy, task or Regression(), schedule,
                  lambda v: build_optimizer(OPTIMIZER, v), str(model_dir), **kw)


def _checkpoints(directory) -> list[int]:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n[5:-6]) for n in names if n.startswith("ckpt-") and n.endswith(".index"))


class Recorder(keras.callbacks.Callback):
    def __init__(self, model_dir=None):
        super().__init__()
        self.calls, self.model_dir, self.histories = [], model_dir, []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"batch_end {batch}")

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch}")
        if self.model_dir is not None:  # metrics.json is written before on_epoch_end
            with open(os.path.join(self.model_dir, "metrics.json")) as f:
                self.histories.append([h["step"] for h in json.load(f)["history"]])

    def on_test_end(self, logs=None):
        self.calls.append("test_end")

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


# --- Schedule ---------------------------------------------------------------

def test_schedule_of_takes_the_fields_a_config_has_by_name():
    cfg = Config(train_steps=7, global_batch_size=16, eval_every=2, checkpoint_every=3,
                 seed=9, clip_norm=0.5, steps_per_loop=4, grad_accum_steps=2,
                 mixed_precision="bf16", preempted_exit_code=138, jit_compile=False)
    s = Schedule.of(cfg)
    assert (s.train_steps, s.global_batch_size, s.eval_every, s.checkpoint_every, s.seed,
            s.clip_norm, s.steps_per_loop, s.grad_accum_steps, s.mixed_precision,
            s.preempted_exit_code, s.jit_compile) == (7, 16, 2, 3, 9, 0.5, 4, 2, "bf16", 138,
                                                     False)
    assert Schedule.of(cfg, train_steps=70, keep_checkpoints=1).train_steps == 70
    assert Schedule.of(cfg, keep_checkpoints=1).keep_checkpoints == 1
    # A config without some fields (a fine-tune has no grad_accum_steps): the defaults.
    fc = FinetuneConfig(model_dir="m", train="t", eval="e", output_dir="o", seed=5)
    f = Schedule.of(fc, train_steps=10, eval_every=10)
    assert (f.seed, f.grad_accum_steps, f.all_reduce_dtype, f.train_steps) == (5, 1, "float32",
                                                                               10)
    loose = Schedule.of(types.SimpleNamespace(train_steps=1, global_batch_size=2, eval_every=1,
                                              checkpoint_every=1, unrelated="x"))
    assert loose == Schedule(1, 2, 1, 1)


# --- evaluate_task ----------------------------------------------------------

def test_evaluate_task_sums_every_batch_and_refuses_an_empty_set(one_device):
    task = Regression(eval_rows=6)
    with one_device.scope():
        model = task.build_model()
    step = make_eval_step(one_device, model, task, jit_compile=False)
    seen = []
    metrics = evaluate_task(one_device, step, task, 4, on_batch_begin=seen.append,
                            on_batch_end=lambda i, m: seen.append((i, m["rows"])))
    assert seen == [0, (0, 4.0), 1, (1, 6.0)]  # 6 rows: 4, then 2 and 2 padding
    err = task.y[:6] - model(task.x[:6]).numpy()[:, 0]
    assert metrics["loss"] == pytest.approx(float(np.mean(err * err)), rel=1e-5)
    with pytest.raises(UserError, match="the evaluation set is empty"):
        evaluate_task(one_device, step, Regression(eval_rows=0), 4)


# --- Runner -----------------------------------------------------------------

def test_runner_trains_checkpoints_and_writes_the_history(mirrored, tmp_path):
    recorder = Recorder(str(tmp_path))
    runner = _runner(mirrored, tmp_path, callbacks=[recorder])
    assert runner.step == 0 and runner.chief
    before = runner.evaluate()["val_loss"]
    logs = runner.fit()
    assert runner.step == 6
    assert _checkpoints(tmp_path / "checkpoints") == [2, 4, 6]
    assert recorder.histories == [[3], [3, 6]]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["step"] == 6 and [h["step"] for h in saved["history"]] == [3, 6]
    assert saved["history"][-1]["val_loss"] == pytest.approx(logs["val_loss"])
    assert logs["val_rows"] == 6.0 and logs["val_loss"] < before
    assert {"loss", "train_loss", "learning_rate", "grad_norm"} <= set(logs)
    assert recorder.calls == ["train_begin",
                              "batch_end 0", "batch_end 1", "batch_end 2", "test_end",
                              "epoch_end 0",
                              "batch_end 3", "batch_end 4", "batch_end 5", "test_end",
                              "epoch_end 1", "train_end"]
    assert (tmp_path / "tensorboard" / "train").is_dir()


def test_a_non_chief_runs_only_callbacks_for_all_workers(one_device, tmp_path):
    """write_dir != model_dir (another worker of a multi-worker job): a plain
    callback is left out, one with all_workers = True runs; checkpoints go to
    write_dir and the chief's files are not written."""
    plain, everywhere = Recorder(), Recorder()
    everywhere.all_workers = True
    model_dir, scratch = tmp_path / "run", tmp_path / "scratch"
    runner = _runner(one_device, model_dir, write_dir=str(scratch),
                     callbacks=[plain, everywhere])
    assert not runner.chief
    runner.fit()
    assert plain.calls == []
    assert everywhere.calls[0] == "train_begin" and everywhere.calls[-1] == "train_end"
    assert sum(c.startswith("batch_end") for c in everywhere.calls) == 6
    assert _checkpoints(scratch / "checkpoints") == [2, 4, 6]
    assert not (model_dir / "metrics.json").exists()
    assert not (model_dir / "tensorboard").exists()


def test_stop_training_stops_after_that_step_with_a_checkpoint(one_device, tmp_path):
    class StopAfterStep5(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                self.model.stop_training = True

    runner = _runner(one_device, tmp_path, callbacks=[StopAfterStep5()],
                     schedule=Schedule.of(SCHEDULE, train_steps=12, eval_every=12,
                                          checkpoint_every=4))
    runner.fit()
    assert runner.step == 5
    assert _checkpoints(tmp_path / "checkpoints") == [4, 5]  # 5: off the cadence, at the stop


def test_fit_at_train_steps_only_evaluates(one_device, tmp_path):
    first = _runner(one_device, tmp_path, schedule=Schedule.of(SCHEDULE, train_steps=3))
    logs = first.fit()
    weights = [v.numpy() for v in first.model.trainable_variables]
    lines, recorder = [], Recorder()
    again = _runner(one_device, tmp_path, schedule=Schedule.of(SCHEDULE, train_steps=3),
                    callbacks=[recorder], log=lines.append)
    assert again.step == 3
    assert [h["step"] for h in again.history] == [3]  # metrics.json's history, kept
    out = again.fit()
    assert again.step == 3
    assert any("already trained to step 3 of --train_steps=3" in line for line in lines), lines
    assert out["train_loss"] == pytest.approx(logs["train_loss"])
    assert out["val_loss"] == pytest.approx(logs["val_loss"], rel=1e-6)
    assert recorder.calls == ["test_end"]  # an evaluation, no training
    for got, want in zip(again.model.trainable_variables, weights):
        np.testing.assert_array_equal(got.numpy(), want)
    assert _checkpoints(tmp_path / "checkpoints") == [2, 3]
