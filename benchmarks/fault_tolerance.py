#!/usr/bin/env python3
"""What failures cost with the default model (the README's main job):

  - checkpoint size, save time and restore time (in-process, 2 CPU replicas);
  - SIGTERM -> exit: a running `tfdp-train` gets SIGTERM; time until it
    reports the current step checkpointed, and until it has exited 75
    (repeated; each run resumes the previous one);
  - SIGKILL -> relaunch: the process is killed outright at a random step;
    steps lost = the last step it reported minus the step the relaunch
    resumes from (at most --checkpoint_every: a kill during a save loses that save).

    python benchmarks/fault_tolerance.py               # ~5 minutes on 2 cores
    python benchmarks/fault_tolerance.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def checkpoint_costs(saves: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfdp.strategy import build_strategy, split_cpu
    split_cpu(2)
    import tensorflow as tf
    from tfdp.checkpoints import make_checkpoint
    from tfdp.config import Config
    from tfdp.loss_scale import DynamicLossScale
    from tfdp.model import build_model
    from tfdp.optimizer import build_optimizer
    cfg = Config()
    strategy = build_strategy("mirrored", num_cpu_replicas=2)
    with strategy.scope():
        model = build_model(cfg, 257)
        optimizer = build_optimizer(cfg, model.trainable_variables)
        loss_scale = DynamicLossScale()
    checkpoint = make_checkpoint(model, optimizer, 1, loss_scale)
    with tempfile.TemporaryDirectory() as directory:
        manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
        manager.save(0)  # the first save traces the save functions
        times = []
        for i in range(1, saves + 1):
            began = time.perf_counter()
            path = manager.save(i)
            times.append(time.perf_counter() - began)
        size = sum(os.path.getsize(p) for p in Path(directory).glob(f"ckpt-{saves}.*"))
        began = time.perf_counter()
        checkpoint.restore(path).assert_existing_objects_matched()
        restore = time.perf_counter() - began
    return {"bytes": size, "save_s": statistics.median(times), "save_max_s": max(times),
            "restore_s": restore}


def _train(data: str, model_dir: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "tfdp-train"), f"--data={data}", f"--model_dir={model_dir}",
         "--train_steps=100000", "--eval_every=100000", "--log_every=1", "--sample_tokens=0",
         *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until(proc, steps: int) -> list[str]:
    """Read output until the run reports `steps` more steps than it began with."""
    lines, first = [], None
    for line in proc.stdout:
        lines.append(line)
        if m := re.match(r"step (\d+)/", line):
            first = int(m.group(1)) if first is None else first
            if int(m.group(1)) >= first + steps:
                break
    return lines


def sigterm_to_exit(data: str, model_dir: str, rounds: int) -> list[tuple[float, float]]:
    """(seconds until the checkpoint is saved, seconds until exit) per round."""
    took = []
    for _ in range(rounds):
        proc = _train(data, model_dir, "--checkpoint_every=100000")
        _run_until(proc, 10)
        proc.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        saved, step = None, None
        for line in proc.stdout:  # the line is printed right after the save
            if m := re.search(r"stopped by SIGTERM after step (\d+), checkpoint saved", line):
                saved, step = time.perf_counter() - sent, m.group(1)
        proc.wait(timeout=120)
        took.append((saved, time.perf_counter() - sent))
        assert proc.returncode == 75 and step, proc.returncode
        assert os.path.exists(os.path.join(model_dir, "checkpoints", f"ckpt-{step}.index"))
    return took


def sigkill_losses(data: str, model_dir: str, rounds: int, every: int) -> list[int]:
    lost, offsets = [], random.Random(0)
    for _ in range(rounds):
        proc = _train(data, model_dir, f"--checkpoint_every={every}")
        lines = _run_until(proc, every + offsets.randrange(every))
        proc.kill()
        proc.communicate()
        done = max(int(m.group(1)) for line in lines if (m := re.match(r"step (\d+)/", line)))
        again = _train(data, model_dir, f"--checkpoint_every={every}")
        head = _run_until(again, 0)
        again.kill()
        again.communicate()
        resumed = int(re.search(r"resumed from step (\d+)", "".join(head)).group(1))
        lost.append(done - resumed)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint_every", type=int, default=25)
    args = parser.parse_args()
    costs = checkpoint_costs(saves=5)
    print(f"default model checkpoint: {costs['bytes'] / 1e6:.2f} MB, save "
          f"{costs['save_s']:.3f} s (median of 5, max {costs['save_max_s']:.3f} s), "
          f"restore {costs['restore_s']:.3f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "stdlib")
        subprocess.run([str(BIN / "tfdp-prepare"), "--input=stdlib", f"--output={data}"],
                       check=True, capture_output=True)
        took = sigterm_to_exit(data, os.path.join(tmp, "term"), args.rounds)
        print("SIGTERM -> checkpoint saved / process exited (75): "
              + ", ".join(f"{saved:.2f} s / {ended:.2f} s" for saved, ended in took), flush=True)
        lost = sigkill_losses(data, os.path.join(tmp, "kill"), args.rounds,
                              args.checkpoint_every)
        print(f"SIGKILL -> relaunch, --checkpoint_every={args.checkpoint_every}: steps lost "
              + ", ".join(map(str, lost)), flush=True)


if __name__ == "__main__":
    main()
