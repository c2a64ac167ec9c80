#!/usr/bin/env python3
"""Is the input pipeline ever the bottleneck? Its rate alone vs what training eats.

For each model configuration, in one process, interleaved over rounds:

  pipeline   tokens/s out of the distributed iterator tfdp trains from
             (`train_dataset_fn` through `distribute_datasets_from_function`
             on 2 CPU replicas), consumed by a tf.function that only touches
             each replica's batch (a sum), the way the train step takes it;
  training   tokens/s of tfdp's train step (XLA, fp32) on the same iterator
             type, the same global batch.

and prints the ratio pipeline / training, which must stay >= 10. The two
compete for the same 2 cores during training, so the pipeline's own rate is
what matters: how many steps' worth of data it makes in the time of one.

    python benchmarks/input_pipeline.py                  # ~2 minutes
    python benchmarks/input_pipeline.py --data DIR --steps 100 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tfdp.strategy import build_strategy, split_cpu  # noqa: E402

split_cpu(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfdp.config import Config  # noqa: E402
from tfdp.dataset import Split, train_dataset_fn  # noqa: E402
from tfdp.model import build_model  # noqa: E402
from tfdp.optimizer import build_optimizer  # noqa: E402
from tfdp.prepare import load_manifest, prepare  # noqa: E402
from tfdp.step import make_train_step  # noqa: E402

CONFIGS = {
    "default (4x128, ctx 128, batch 32)": Config(),
    "(a) 4x128, ctx 64, batch 12": Config(seq_len=64, global_batch_size=12),
    "(b) 6x384, ctx 256, batch 8": Config(num_layers=6, num_heads=6, hidden_dim=384,
                                          intermediate_dim=1536, seq_len=256,
                                          global_batch_size=8),
}


def _timed(fn, steps: int) -> float:
    """Seconds for `steps` calls of fn, each finished (fn returns a host value)."""
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - began


def measure(strategy, data_dir: str, cfg: Config, steps: int, rounds: int) -> dict:
    split = Split(data_dir, "train", cfg.seq_len)
    make = lambda: iter(strategy.distribute_datasets_from_function(  # noqa: E731
        train_dataset_fn(split, cfg.global_batch_size, cfg.seed)))
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(cfg, load_manifest(data_dir)["vocab_size"])
        optimizer = build_optimizer(cfg, model.trainable_variables)
    train_step = make_train_step(strategy, model, optimizer, cfg.global_batch_size,
                                 cfg.seq_len, cfg.clip_norm, True)

    @tf.function
    def take(iterator):
        sums = strategy.run(lambda w: tf.reduce_sum(tf.cast(w, tf.int64)),
                            args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    tokens = cfg.global_batch_size * cfg.seq_len
    pipe_it, train_it = make(), make()
    int(take(pipe_it)), float(train_step(train_it)["loss"][-1])  # trace and compile
    pipeline, training = [], []
    for _ in range(rounds):
        pipeline.append(tokens * steps / _timed(lambda: int(take(pipe_it)), steps))
        training.append(tokens * steps / _timed(
            lambda: float(train_step(train_it)["loss"][-1]), steps))
    return {"pipeline": statistics.median(pipeline), "training": statistics.median(training),
            "ratio": statistics.median(p / t for p, t in zip(pipeline, training))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a tfdp-prepare directory (default: the stdlib corpus)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    strategy = build_strategy("mirrored", num_cpu_replicas=2)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            import data as recipes
            data_dir = os.path.join(tmp, "stdlib")
            prepare(recipes.source_files("stdlib"), data_dir, "byte", log=lambda *_: None)
        print(f"{'configuration':<36} {'pipeline tok/s':>15} {'training tok/s':>15} {'ratio':>7}")
        for name, cfg in CONFIGS.items():
            r = measure(strategy, data_dir, cfg, args.steps, args.rounds)
            print(f"{name:<36} {r['pipeline']:>15,.0f} {r['training']:>15,.0f} "
                  f"{r['ratio']:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
