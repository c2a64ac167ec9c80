"""Token shards -> per-replica batches of windows, via InputContext.

A window is `seq_len + 1` consecutive tokens (inputs and shifted targets);
window i of a shard starts at token i * seq_len, so every token is a target
at most once per pass and no window crosses a shard file (the last partial
window of each 4M-token shard is skipped).

All tokens of a split are held in memory and captured by the input
pipeline: fine to a few hundred million tokens; larger corpora will want
per-shard reading (a later change).

Training order is a pure function of (seed, position): global position q
lies in pass e = q // n and maps to window index_shuffle(q % n, [seed, e]).
Step s of training consumes positions [s*B, (s+1)*B) for global batch B,
whatever the number of workers or replicas; input pipeline p of P takes the
positions congruent to p mod P, and MirroredStrategy hands its consecutive
per-replica batches to its local replicas. So resuming at step s is exact
and O(1), and N replicas see exactly the batch one replica would.

Validation walks the val windows in order, padded with weight-0 windows to
whole global batches, so the whole split is covered exactly once.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf

from tfdp.errors import UserError
from tfdp.prepare import load_manifest


class Split:
    """One split's tokens in memory and the start offsets of its windows."""

    def __init__(self, data_dir: str, split: str, seq_len: int):
        manifest = load_manifest(data_dir)
        info = manifest["splits"][split]
        arrays, starts, offset = [], [], 0
        for shard in info["shards"]:
            path = os.path.join(data_dir, shard["file"])
            try:
                ids = np.load(path)
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read shard {path} ({err}); re-run tfdp-prepare "
                                "into a new directory") from None
            count = max(len(ids) - 1, 0) // seq_len
            starts.append(offset + np.arange(count, dtype=np.int64) * seq_len)
            arrays.append(ids)
            offset += len(ids)
        self.name = split
        self.seq_len = seq_len
        self.num_tokens = int(info["tokens"])
        self.num_bytes = int(info["bytes"])
        self.starts = np.concatenate(starts) if starts else np.zeros([0], np.int64)
        if len(self.starts) == 0:
            raise UserError(
                f"the {split} split has {self.num_tokens} tokens, fewer than one window of "
                f"--seq_len+1={seq_len + 1}; give more text, a smaller --seq_len"
                + (" or a larger --val_fraction" if split == "val" else ""))
        self.tokens = np.concatenate(arrays)

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def window_fn(self):
        """A tf function mapping window indices [b] to token windows [b, seq_len+1]."""
        tokens = tf.constant(self.tokens)
        starts = tf.constant(self.starts)
        offsets = tf.range(self.seq_len + 1, dtype=tf.int64)

        def windows(index):
            positions = tf.gather(starts, index)[:, None] + offsets[None, :]
            return tf.cast(tf.gather(tokens, positions), tf.int32)
        return windows


def shuffled_index(position, num_windows: int, seed: int):
    """Window index at global training position `position` (see module doc)."""
    epoch = position // num_windows
    seeds = tf.stack([tf.constant(seed, tf.int64), epoch])
    return tf.random.experimental.index_shuffle(
        position % num_windows, seed=seeds, max_index=num_windows - 1)


def train_dataset_fn(split: Split, global_batch_size: int, seed: int, start_step: int = 0):
    """Dataset function for `strategy.distribute_datasets_from_function`."""
    windows = split.window_fn()
    n = split.num_windows

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        first = start_step * global_batch_size + ctx.input_pipeline_id
        return (tf.data.Dataset.range(first, tf.int64.max, ctx.num_input_pipelines)
                .map(lambda q: shuffled_index(q, n, seed), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(per_replica, drop_remainder=True)
                .map(windows, num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    return dataset_fn


def eval_steps_for(split: Split, global_batch_size: int, eval_steps: int = 0) -> int:
    """Steps that cover the whole split (or `eval_steps` when smaller and > 0)."""
    full = math.ceil(split.num_windows / global_batch_size)
    return min(full, eval_steps) if eval_steps > 0 else full


def eval_dataset_fn(split: Split, global_batch_size: int, steps: int):
    """Dataset function yielding (windows, weights); padding windows weigh 0."""
    windows = split.window_fn()
    n = split.num_windows

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        total = steps * global_batch_size
        return (tf.data.Dataset.range(ctx.input_pipeline_id, total, ctx.num_input_pipelines)
                .batch(per_replica, drop_remainder=True)
                .map(lambda q: (windows(tf.minimum(q, n - 1)), tf.cast(q < n, tf.float32)))
                .prefetch(tf.data.AUTOTUNE))
    return dataset_fn
