"""Streamed text -> per-replica batches of windows (`--data=tfds:...`).

The counterpart of tfdp/dataset.py's `Split` for a corpus too large to hold
as token shards: each input pipeline reads documents (its own files when
the source has enough, tfdp.recipes.tfds_text), tokenizes them on the fly,
joins them with EOT into one token stream, cuts the stream into windows of
`seq_len + 1` tokens that overlap by one (every token a target once, as in
`Split`), shuffles windows in a buffer and batches them for its replicas.
The source repeats forever with a new file order each pass.

What a stream cannot promise that `Split` does: its order is not a function
of the step, so a resumed run starts a fresh order (seeded by the seed and
the step it resumes at) instead of continuing the interrupted one; and when
the source has fewer files than there are input pipelines, every pipeline
reads all of it and keeps every P-th window, tokenizing P times over.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

SHUFFLE_WINDOWS = 10_000  # windows per pipeline's shuffle buffer (~5 MB at seq_len 128)


def stream_windows(tokens: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
    """Documents' token ids (each ending in EOT) -> windows [seq_len + 1].

    A scan carries the tokens after the last whole window into the next
    document, so no text is dropped at document boundaries.
    """
    offsets = tf.range(seq_len + 1)

    def cut(carry, ids):
        joined = tf.concat([carry, ids], axis=0)
        count = tf.maximum(tf.shape(joined)[0] - 1, 0) // seq_len
        starts = tf.range(count) * seq_len
        windows = tf.gather(joined, starts[:, None] + offsets[None, :])
        return joined[count * seq_len:], windows

    return tokens.scan(tf.zeros([0], tf.int32), cut).unbatch()


class TextStream:
    """Training windows streamed from `split` of `source` (a
    tfdp.recipes.tfds_text.TfdsText) through `tokenizer`; `dataset_fn` is
    what the training loop asks for."""

    def __init__(self, source, split: str, tokenizer, seq_len: int,
                 shuffle_windows: int = SHUFFLE_WINDOWS):
        self.source, self.split, self.tokenizer, self.seq_len = source, split, tokenizer, seq_len
        self.shuffle_windows = shuffle_windows
        self.name = f"{source.spec} ({split}, streamed)"

    def _tokenize(self, text):
        """One document -> its ids and EOT. The tokenizers are NumPy/eager
        code (tfdp/tokenizers.py), so this runs in a py_function."""
        def encode(raw):
            ids = self.tokenizer.encode([raw.numpy()])[0]
            return np.append(ids, np.int32(self.tokenizer.eot_id)).astype(np.int32)
        ids = tf.py_function(encode, [text], tf.int32)
        ids.set_shape([None])
        return ids

    def dataset_fn(self, global_batch_size: int, seed: int, start_step: int = 0):
        """Dataset function for `strategy.distribute_datasets_from_function`."""
        own_files = self.source.num_files(self.split)

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            pipelines, pipeline = ctx.num_input_pipelines, ctx.input_pipeline_id
            split_files = pipelines > 1 and own_files >= pipelines
            # Every pipeline shuffles files alike when they read the same files
            # (their windows then interleave); each its own way otherwise.
            order = seed + 7_919 * start_step + (1_000_003 * pipeline if split_files else 0)
            texts = self.source.text_dataset(self.split, ctx if split_files else None,
                                             seed=order).repeat()
            tokens = texts.map(self._tokenize, num_parallel_calls=tf.data.AUTOTUNE)
            windows = stream_windows(tokens, self.seq_len)
            if pipelines > 1 and not split_files:
                windows = windows.shard(pipelines, pipeline)
            return (windows.shuffle(self.shuffle_windows, seed=order)
                    .batch(per_replica, drop_remainder=True)
                    .prefetch(tf.data.AUTOTUNE))
        return dataset_fn
