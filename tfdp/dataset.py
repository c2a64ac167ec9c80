"""Token shards -> per-replica batches of windows, via InputContext.

A window is `seq_len + 1` consecutive tokens (inputs and shifted targets);
window i of a shard starts at token i * seq_len, so every token is a target
at most once per pass and no window crosses a shard file (the last partial
window of each 4M-token shard is skipped).

The tokens a pipeline reads are held in memory and captured by its input
pipeline: fine to a few hundred million tokens per worker.

Input sharding across the P input pipelines of a multi-worker job (one per
worker, `InputContext`): when every pipeline can have whole shard files,
pipeline p loads only files p, p+P, ... and shuffles its own windows
(`Split(shards=...)`, `shard_files`); otherwise (fewer files than workers,
or --input_sharding=interleave) every pipeline holds all files and takes
its positions of the one global order described next. One process (P = 1)
is the same either way.

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


def _windows_per_shard(data_dir: str, split: str, seq_len: int) -> list[int]:
    shards = load_manifest(data_dir)["splits"][split]["shards"]
    return [max(s["tokens"] - 1, 0) // seq_len for s in shards]


def shard_files(data_dir: str, split: str, seq_len: int, num_pipelines: int,
                pipeline_id: int) -> list[int] | None:
    """The shard files input pipeline `pipeline_id` reads on its own: files
    p, p+P, ... of the split. None when some pipeline would get no window
    (fewer files than pipelines): then every pipeline holds all the files
    and takes interleaved positions."""
    windows = _windows_per_shard(data_dir, split, seq_len)
    if num_pipelines <= 1 or any(sum(windows[p::num_pipelines]) == 0
                                 for p in range(num_pipelines)):
        return None
    return list(range(pipeline_id, len(windows), num_pipelines))


def windows_per_pipeline(data_dir: str, split: str, seq_len: int,
                         num_pipelines: int) -> list[int]:
    """Windows each whole-file pipeline holds (from the manifest alone)."""
    windows = _windows_per_shard(data_dir, split, seq_len)
    return [sum(windows[p::num_pipelines]) for p in range(num_pipelines)]


class Split:
    """One split's tokens in memory and the start offsets of its windows.

    `shards` limits it to those shard files (whole-file input sharding: each
    worker of a multi-worker job holds only its own); None holds them all.
    """

    def __init__(self, data_dir: str, split: str, seq_len: int,
                 shards: list[int] | None = None):
        manifest = load_manifest(data_dir)
        info = manifest["splits"][split]
        arrays, starts, offset = [], [], 0
        chosen = info["shards"] if shards is None else [info["shards"][i] for i in shards]
        self.data_dir, self.shards = data_dir, shards
        for shard in chosen:
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

    def dataset_fn(self, global_batch_size: int, seed: int, start_step: int = 0):
        """The training loop's dataset function (`train_dataset_fn`)."""
        return train_dataset_fn(self, global_batch_size, seed, start_step)

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
    """Dataset function for `strategy.distribute_datasets_from_function`.

    Interleaved (split holds every shard): pipeline p takes global positions
    p, p+P, ... of the one shuffled order (module doc). Whole files (split
    holds pipeline p's shards only): pipeline p walks its own shuffled order,
    global_batch/P windows per step, seeded by (seed, p); the data order
    then depends on the number of pipelines.
    """
    windows = split.window_fn()
    n = split.num_windows

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        if split.shards is None:
            first = start_step * global_batch_size + ctx.input_pipeline_id
            stride, order_seed = ctx.num_input_pipelines, seed
        else:
            _check_pipeline(split, ctx)
            first = start_step * (global_batch_size // ctx.num_input_pipelines)
            stride, order_seed = 1, seed + 1_000_003 * ctx.input_pipeline_id
        return (tf.data.Dataset.range(first, tf.int64.max, stride)
                .map(lambda q: shuffled_index(q, n, order_seed),
                     num_parallel_calls=tf.data.AUTOTUNE)
                .batch(per_replica, drop_remainder=True)
                .map(windows, num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    return dataset_fn


def _check_pipeline(split: Split, ctx: tf.distribute.InputContext) -> None:
    expected = shard_files(split.data_dir, split.name, split.seq_len, ctx.num_input_pipelines,
                           ctx.input_pipeline_id)
    if expected != split.shards:
        raise ValueError(f"split holds shards {split.shards}, but input pipeline "
                         f"{ctx.input_pipeline_id} of {ctx.num_input_pipelines} reads {expected}")


def eval_steps_for(split: Split, global_batch_size: int, eval_steps: int = 0,
                   num_pipelines: int = 1) -> int:
    """Steps that cover the whole split (or `eval_steps` when smaller and > 0).

    With whole-file sharding every pipeline must run the same number of steps
    (each is a collective), enough for the pipeline holding the most windows.
    """
    if split.shards is None:
        full = math.ceil(split.num_windows / global_batch_size)
    else:
        per_pipeline = global_batch_size // num_pipelines
        full = max(math.ceil(n / per_pipeline) for n in windows_per_pipeline(
            split.data_dir, split.name, split.seq_len, num_pipelines))
    return min(full, eval_steps) if eval_steps > 0 else full


def eval_dataset_fn(split: Split, global_batch_size: int, steps: int):
    """Dataset function yielding (windows, weights); padding windows weigh 0.

    Interleaved: the pipelines share the split's positions 0..n-1. Whole
    files: each pipeline walks its own windows. Either way every window is
    counted exactly once and the losses are summed across all replicas.
    """
    windows = split.window_fn()
    n = split.num_windows

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        if split.shards is None:
            first, stop, stride = ctx.input_pipeline_id, steps * global_batch_size, \
                ctx.num_input_pipelines
        else:
            _check_pipeline(split, ctx)
            first, stop, stride = 0, steps * (global_batch_size // ctx.num_input_pipelines), 1
        return (tf.data.Dataset.range(first, stop, stride)
                .batch(per_replica, drop_remainder=True)
                .map(lambda q: (windows(tf.minimum(q, n - 1)), tf.cast(q < n, tf.float32)))
                .prefetch(tf.data.AUTOTUNE))
    return dataset_fn


def shuffled_rows_fn(arrays, global_batch_size: int, seed: int, start_step: int,
                     unit_weights: bool = False):
    """A dataset function over rows of equally long `arrays` (a fine-tune's
    examples or windows): endless per-replica batches in a seeded
    permutation per epoch (`shuffled_index`), continuing exactly at
    `start_step`; with `unit_weights`, each batch ends with a weight of 1
    per row."""
    tensors = [tf.constant(a) for a in arrays]
    n = int(tensors[0].shape[0])

    def take(rows):
        taken = tuple(tf.gather(t, rows) for t in tensors)
        return (*taken, tf.ones(tf.shape(rows), tf.float32)) if unit_weights else taken

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        # Pipeline p of P takes global positions p, p+P, ... of one order.
        first = start_step * global_batch_size + ctx.input_pipeline_id
        return (tf.data.Dataset.range(first, tf.int64.max, ctx.num_input_pipelines)
                .map(lambda q: shuffled_index(q, n, seed))
                .batch(per_replica, drop_remainder=True)
                .map(take)
                .prefetch(tf.data.AUTOTUNE))
    return dataset_fn
