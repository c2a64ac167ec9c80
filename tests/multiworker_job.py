"""A 20-step training job used by tests/test_multiworker.py.

`train_weights` runs tfdp's own pieces (data split, model, optimizer,
Trainer) under whatever strategy it is given. Run as a script, it is one
worker of a tfdp-launch job and saves its final weights as
OUT/worker_<index>.npz, so the test can compare workers with each other and
with in-process MirroredStrategy and one-device runs.

    python tests/multiworker_job.py DATA_DIR OUT_DIR [--input_sharding=interleave]
                                    [--stall_worker_1_at=STEP]
                                    [--hang_inside_step_after=STEP --grace=SECONDS]

Without TF_CONFIG it runs as one process on one device.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from tfdp.config import Config
from tfdp.optimizer import build_optimizer
from tfdp.prepare import load_manifest
from tfdp.training import load_splits
from tfdp.runner import Runner, Schedule
from tfdp.tasks import language_model
from tfdp.tasks.language_model import LanguageModelTask

CFG = Config(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=32,
             global_batch_size=8, train_steps=20, eval_every=10, checkpoint_every=10,
             learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=2, log_every=10,
             sample_tokens=0, collective_timeout=60)


class _Stall(keras.callbacks.Callback):
    """Hang in Python after `step` steps: the process stays alive and its
    heartbeats continue, but it never joins another collective."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            print("stalling", flush=True)
            time.sleep(10_000)


def train_weights(strategy, data_dir: str, checkpoint_dir: str, cfg: Config = CFG,
                  callbacks=()):
    """Train cfg.train_steps steps on data_dir; return (weights, last logs)."""
    train, val = load_splits(cfg, data_dir, strategy)  # this worker's part, as tfdp-train
    task = LanguageModelTask(cfg, load_manifest(data_dir)["vocab_size"], train, val)
    # Every worker writes its own directory: each runs its callbacks there.
    runner = Runner(strategy, task, Schedule.of(cfg, keep_checkpoints=1),
                    lambda v: build_optimizer(cfg, v), checkpoint_dir, callbacks=callbacks,
                    log=lambda *_: None, resume=False)
    logs = runner.fit()
    return runner.model.get_weights(), logs


class _HangInsideAStep(keras.callbacks.Callback):
    """After `step` steps, the next step blocks inside TensorFlow (a py_function
    in the loss), as on a hung device or peer, and SIGTERM arrives while the
    main thread waits in TensorFlow, where Python cannot run a signal handler."""

    hanging = threading.Event()

    def __init__(self, step: int):
        super().__init__()
        self.step = step
        real = language_model.token_losses

        def block_when_hanging():
            if self.hanging.is_set():
                print("sigterm and hang", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10_000)
            return np.float32(1.0)
        language_model.token_losses = lambda *args, **kwargs: real(*args, **kwargs) * \
            tf.py_function(block_when_hanging, [], tf.float32)

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.step:
            self.hanging.set()


def _option(name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in sys.argv if a.startswith(f"--{name}=")]


if __name__ == "__main__":
    from tfdp.strategy import build_strategy
    data_dir, out_dir = sys.argv[1:3]
    cfg = CFG
    if "--input_sharding=interleave" in sys.argv:
        cfg = Config(**{**CFG.__dict__, "input_sharding": "interleave"})
    stall = [int(s) for s in _option("stall_worker_1_at")]
    if stall:  # no XLA: under load, compiling the first step could outlast the 10 s
        cfg = Config(**{**cfg.__dict__, "collective_timeout": 10.0, "jit_compile": False})
    hang = [int(s) for s in _option("hang_inside_step_after")]
    if hang:  # a py_function cannot be compiled by XLA
        cfg = Config(**{**cfg.__dict__, "jit_compile": False,
                        "preemption_grace_seconds": float(_option("grace")[0])})
    if "TF_CONFIG" in os.environ:
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        strategy = build_strategy("multi_worker_mirrored",
                                  collective_timeout=cfg.collective_timeout)
    else:
        task, strategy = 0, build_strategy("one_device")
    callbacks = [_Stall(stall[0])] if stall and task == 1 else []
    callbacks += [_HangInsideAStep(hang[0])] if hang else []
    try:
        weights, logs = train_weights(strategy, data_dir, os.path.join(out_dir, f"ckpt_{task}"),
                                      cfg, callbacks)
    except tf.errors.OpError as err:  # as tfdp.training.train reports a lost or stuck peer
        from tfdp.watchdog import peer_failure
        lost = peer_failure(err)
        if lost is None:
            raise
        print(f"multiworker_job: error: {lost}", flush=True)
        sys.exit(lost.exit_code)
    np.savez(os.path.join(out_dir, f"worker_{task}.npz"), *weights)
    with open(os.path.join(out_dir, f"logs_{task}.json"), "w") as f:
        json.dump({k: float(v) for k, v in logs.items()}, f)
