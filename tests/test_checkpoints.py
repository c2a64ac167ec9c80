"""tfdp/checkpoints.py: what a checkpoint holds, a failing save, listing the
checkpoints and resuming from the newest one that reads back whole."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdp import checkpoints
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.loss_scale import INITIAL_SCALE, DynamicLossScale
from tfdp.model import build_model
from tfdp.optimizer import build_optimizer

OPT = Config(learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=0, train_steps=10)


class TwoParts(keras.Model):
    """A classifier's shape: a backbone and a head, checkpointed by name."""

    def __init__(self):
        super().__init__()
        self.backbone = keras.layers.Dense(4, name="body")
        self.head = keras.layers.Dense(2, name="top")

    def call(self, x):
        return self.head(self.backbone(x))


def _made(input_pipelines=1):
    model = TwoParts()
    model(np.zeros([1, 3], np.float32))
    optimizer = build_optimizer(OPT, model.trainable_variables)
    checkpoint = checkpoints.make_checkpoint({"backbone": model.backbone, "head": model.head},
                                             model, optimizer, input_pipelines,
                                             DynamicLossScale())
    return model, optimizer, checkpoint


def _set(model, value: float):
    for v in model.trainable_variables:
        v.assign(np.full(v.shape, value, np.float32))


def _manager(checkpoint, directory, keep=5):
    return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=keep)


def _saved(tmp_path, steps=(1, 2, 3)):
    """Checkpoints at `steps`, the weights all equal to the step number."""
    model, optimizer, checkpoint = _made()
    manager = _manager(checkpoint, tmp_path / "ckpts")
    for step in steps:
        _set(model, float(step))
        optimizer.iterations.assign(step)
        checkpoints.save(manager, step)
    return manager


# --- make_checkpoint --------------------------------------------------------

def test_make_checkpoint_names_the_parts_and_the_training_state(tmp_path):
    model, optimizer, checkpoint = _made(input_pipelines=2)
    assert int(checkpoint.input_pipelines.numpy()) == 2
    assert int(checkpoint.nonfinite_steps.numpy()) == 0
    assert checkpoint.rng == {}  # no dropout: no seed-generator state
    _set(model, 0.5)
    optimizer.iterations.assign(7)
    path = _manager(checkpoint, tmp_path).save(checkpoint_number=7)
    roots = {name.split("/")[0] for name, _ in tf.train.list_variables(path)}
    assert {"backbone", "head", "optimizer", "loss_scale", "nonfinite_steps",
            "input_pipelines"} <= roots

    other, other_optimizer, restored = _made()
    restored.restore(path).assert_existing_objects_matched()
    for v in other.trainable_variables:
        np.testing.assert_array_equal(v.numpy(), 0.5)
    assert int(other_optimizer.iterations.numpy()) == 7
    assert int(restored.input_pipelines.numpy()) == 2
    assert float(restored.loss_scale.scale.numpy()) == INITIAL_SCALE


def test_dropout_seed_generators_are_in_the_checkpoint():
    model = build_model(Config(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64,
                               seq_len=16, dropout=0.1), 50)
    optimizer = build_optimizer(OPT, model.trainable_variables)
    checkpoint = checkpoints.make_checkpoint({"backbone": model.backbone}, model, optimizer, 1,
                                             DynamicLossScale())
    states = [v for v in model.non_trainable_variables if "seed_generator_state" in v.path]
    assert states and len(checkpoint.rng) == len(states)
    assert all(any(s is r for r in checkpoint.rng.values()) for s in states)


# --- save -------------------------------------------------------------------

def _make_unwritable(directory) -> str:
    """Make `directory` refuse new files, as a permission change would: chmod
    for a normal user; root ignores modes, so there the immutable attribute."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(directory)],
                                                 capture_output=True).returncode == 0:
        return "chattr"
    pytest.skip("running as root without chattr: no way to make a directory unwritable")


def _make_writable(directory, how: str) -> None:
    if how == "chmod":
        os.chmod(directory, 0o755)
    else:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_failed_save_is_one_error_naming_the_step_and_keeps_earlier_ones(tmp_path):
    manager = _saved(tmp_path, steps=(1, 2))
    directory = tmp_path / "ckpts"
    before = sorted(os.listdir(directory))
    how = _make_unwritable(directory)
    try:
        with pytest.raises(OSError):  # the directory really refuses files
            (directory / "probe").write_text("x")
        with pytest.raises(UserError) as err:
            checkpoints.save(manager, 3)
    finally:
        _make_writable(directory, how)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"could not save the checkpoint of step 3 in {directory} (")
    assert message.endswith("resuming will start from ckpt-2: free space or fix the "
                            "permissions, then run the same command again")
    assert "Traceback" not in message and "[Op:" not in message
    assert sorted(os.listdir(directory)) == before
    assert manager.latest_checkpoint.endswith("ckpt-2")
    assert tf.train.latest_checkpoint(str(directory)).endswith("ckpt-2")


def test_a_failed_first_save_says_no_earlier_checkpoint_exists(tmp_path):
    _, _, checkpoint = _made()
    (tmp_path / "not_a_dir").write_text("a file where the directory should be")
    manager = _manager(checkpoint, tmp_path / "not_a_dir" / "ckpts")
    with pytest.raises(UserError, match=r"could not save the checkpoint of step 5 in .*; "
                                        "no earlier checkpoint exists: free space"):
        checkpoints.save(manager, 5)


# --- checkpoint_paths and restore_newest ------------------------------------

def test_checkpoint_paths_lists_the_kept_ones_oldest_first(tmp_path):
    assert checkpoints.checkpoint_paths(str(tmp_path)) == []
    model, _, checkpoint = _made()
    manager = _manager(checkpoint, tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(manager, step)
    paths = checkpoints.checkpoint_paths(str(tmp_path))
    assert paths == [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-3")]
    assert all(os.path.isabs(p) for p in paths)


def test_restore_newest_skips_a_truncated_newest_checkpoint(tmp_path):
    _saved(tmp_path)
    directory = tmp_path / "ckpts"
    for path in glob.glob(str(directory / "ckpt-3.data-*")):  # a crash mid-write
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    model, optimizer, checkpoint = _made()
    said = []
    path = checkpoints.restore_newest(checkpoint, str(directory), said.append)
    assert path == str(directory / "ckpt-2")
    assert int(optimizer.iterations.numpy()) == 2
    for v in model.trainable_variables:
        np.testing.assert_array_equal(v.numpy(), 2.0)
    assert len(said) == 1
    assert said[0].startswith(f"warning: checkpoint {directory / 'ckpt-3'} is unreadable (")
    assert said[0].endswith("; trying the previous one")
    assert glob.glob(str(directory / "ckpt-3.*"))  # left for inspection

    # restore_newest_readable says where it resumed.
    lines = []
    checkpoints.restore_newest_readable(_made()[2], str(directory), lines.append)
    assert lines[-1] == f"resumed from step 2 ({directory / 'ckpt-2'})"


def test_restore_newest_when_none_reads_or_none_exists(tmp_path):
    _saved(tmp_path, steps=(1, 2))
    directory = tmp_path / "ckpts"
    for path in glob.glob(str(directory / "ckpt-*.data-*")):
        with open(path, "r+b") as f:
            f.truncate(8)
    said = []
    with pytest.raises(UserError) as err:
        checkpoints.restore_newest(_made()[2], str(directory), said.append, fix="do X")
    assert str(err.value) == f"no checkpoint in {directory} can be read (2 tried); do X"
    assert said[-1].endswith("; none is left") and len(said) == 2

    said = []
    assert checkpoints.restore_newest(_made()[2], str(tmp_path / "empty"), said.append) is None
    assert said == []
    lines = []
    checkpoints.restore_newest_readable(_made()[2], str(tmp_path / "empty"), lines.append)
    assert lines == []


def test_a_partial_reader_takes_only_the_weights(tmp_path):
    _saved(tmp_path)
    model = TwoParts()
    model(np.zeros([1, 3], np.float32))
    reader = tf.train.Checkpoint(backbone=model.backbone, head=model.head)
    path = checkpoints.restore_newest(reader, str(tmp_path / "ckpts"), print, partial=True)
    assert path.endswith("ckpt-3")
    for v in model.trainable_variables:
        np.testing.assert_array_equal(v.numpy(), 3.0)


def test_a_checkpoint_written_before_the_loss_scale_still_restores(tmp_path):
    model, optimizer, full = _made()
    _set(model, 4.0)
    optimizer.iterations.assign(4)
    old = tf.train.Checkpoint(backbone=full.backbone, head=full.head, optimizer=full.optimizer,
                              rng=full.rng, nonfinite_steps=full.nonfinite_steps,
                              input_pipelines=full.input_pipelines)
    tf.train.CheckpointManager(old, str(tmp_path), 2).save(checkpoint_number=4)
    other, other_optimizer, checkpoint = _made()
    checkpoint.loss_scale.scale.assign(8.0)
    said = []
    assert checkpoints.restore_newest(checkpoint, str(tmp_path), said.append).endswith("ckpt-4")
    assert said == [] and int(other_optimizer.iterations.numpy()) == 4
    np.testing.assert_array_equal(other.trainable_variables[0].numpy(), 4.0)
    assert float(checkpoint.loss_scale.scale.numpy()) == 8.0  # untouched: not in the file


# --- check_same_step --------------------------------------------------------

def test_check_same_step_is_a_no_op_on_one_process(one_device, mirrored):
    """One process (no cluster): nothing to compare, so not even the step is
    read (an all-reduce would fail on None)."""
    for strategy in (one_device, mirrored,
                     types.SimpleNamespace(cluster_resolver=None, num_replicas_in_sync=1)):
        assert checkpoints.check_same_step(strategy, None) is None
    assert checkpoints.check_same_step(mirrored, tf.Variable(3, dtype=tf.int64)) is None
