"""Sharding: which replica sees which window, once per pass, never validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tfdp.dataset import (Split, eval_dataset_fn, eval_steps_for, shuffled_index,
                          train_dataset_fn)
from tfdp.prepare import prepare
from tfdp.tokenizers import ByteTokenizer

SEQ = 4
B = 8


def _fake_prepared(directory, shard_sizes, val_tokens=41):
    """A prepared dir whose token i has value i, so a window names its start."""
    directory.mkdir()
    shards, offset = [], 0
    for i, size in enumerate(shard_sizes):
        np.save(directory / f"train-{i:05d}.npy", np.arange(offset, offset + size, dtype=np.uint16))
        shards.append({"file": f"train-{i:05d}.npy", "tokens": size})
        offset += size
    np.save(directory / "val-00000.npy", np.arange(offset, offset + val_tokens, dtype=np.uint16))
    manifest = {"format": 1, "tokenizer": "byte", "vocab_size": 257, "eot_id": 256,
                "dtype": "uint16", "splits": {
                    "train": {"tokens": offset, "bytes": offset, "shards": shards},
                    "val": {"tokens": val_tokens, "bytes": val_tokens,
                            "shards": [{"file": "val-00000.npy", "tokens": val_tokens}]}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture
def split(tmp_path):
    # Shards of 65 and 33 tokens: 16 + 8 = 24 windows of 5 tokens, 3 global batches.
    return Split(str(_fake_prepared(tmp_path / "prep", [65, 33])), "train", SEQ)


def _replica_batches(strategy, dataset_fn, steps):
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    return [[r.numpy() for r in strategy.experimental_local_results(next(iterator))]
            for _ in range(steps)]


def test_windows_start_every_seq_len_and_stay_inside_shards(split):
    assert split.num_windows == 24
    assert list(split.starts[:3]) == [0, 4, 8]
    assert split.starts[16] == 65  # the second shard starts a fresh window
    window = split.window_fn()(tf.constant([15, 16]))
    np.testing.assert_array_equal(window.numpy(), [[60, 61, 62, 63, 64], [65, 66, 67, 68, 69]])


def test_replica_batches_are_disjoint_and_form_the_global_batch(split, mirrored):
    steps = _replica_batches(mirrored, train_dataset_fn(split, B, seed=3), 3)
    for s, replicas in enumerate(steps):
        assert len(replicas) == 2 and all(r.shape == (B // 2, SEQ + 1) for r in replicas)
        starts = [set(r[:, 0].tolist()) for r in replicas]
        assert not starts[0] & starts[1]
        expected = [int(split.starts[int(shuffled_index(tf.constant(q, tf.int64), 24, 3))])
                    for q in range(s * B, (s + 1) * B)]
        assert starts[0] | starts[1] == set(expected)


def test_one_pass_sees_every_window_exactly_once_and_passes_differ(split, mirrored):
    steps = _replica_batches(mirrored, train_dataset_fn(split, B, seed=5), 6)
    passes = []
    for first in (0, 3):
        starts = np.concatenate([r[:, 0] for s in steps[first:first + 3] for r in s])
        assert sorted(starts.tolist()) == sorted(split.starts.tolist())
        passes.append(starts.tolist())
    assert passes[0] != passes[1], "each pass should be a new permutation"


def test_order_depends_on_seed(split, one_device):
    a = _replica_batches(one_device, train_dataset_fn(split, B, seed=1), 1)[0][0]
    b = _replica_batches(one_device, train_dataset_fn(split, B, seed=2), 1)[0][0]
    assert a[:, 0].tolist() != b[:, 0].tolist()


def test_resuming_at_a_step_continues_the_same_stream(split, mirrored):
    full = _replica_batches(mirrored, train_dataset_fn(split, B, seed=9), 5)
    resumed = _replica_batches(mirrored, train_dataset_fn(split, B, seed=9, start_step=2), 3)
    for a, b in zip(full[2:], resumed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_input_pipelines_split_the_global_batch_like_one_pipeline(split):
    """Two pipelines (two workers) read disjoint parts that add up to the same
    global batch a single pipeline reads."""
    fn = train_dataset_fn(split, B, seed=4)
    single = next(iter(fn(tf.distribute.InputContext(1, 0, 2)).batch(2)))  # 2 replicas' batches
    parts = [next(iter(fn(tf.distribute.InputContext(2, p, 2)))) for p in range(2)]
    starts = [set(p.numpy()[:, 0].tolist()) for p in parts]
    assert not starts[0] & starts[1]
    assert starts[0] | starts[1] == set(single.numpy().reshape(-1, SEQ + 1)[:, 0].tolist())


def test_validation_covers_the_split_once_with_padding(tmp_path, mirrored):
    val = Split(str(_fake_prepared(tmp_path / "prep", [65], val_tokens=41)), "val", SEQ)
    assert val.num_windows == 10  # 40 targets / 4
    steps = eval_steps_for(val, B)
    assert steps == 2  # 10 windows -> 2 global batches of 8, 6 padding windows
    iterator = iter(mirrored.distribute_datasets_from_function(eval_dataset_fn(val, B, steps)))
    seen, weight = [], 0.0
    for _ in range(steps):
        windows, weights = (mirrored.experimental_local_results(x) for x in next(iterator))
        for w, m in zip(windows, weights):
            seen += w.numpy()[m.numpy() > 0][:, 0].tolist()
            weight += float(m.numpy().sum())
    assert weight == 10 and sorted(seen) == sorted(val.tokens[val.starts].tolist())
    assert eval_steps_for(val, B, eval_steps=1) == 1


def test_no_validation_window_ever_appears_in_training(tmp_path, one_device):
    """Prepare real text of numbered lines; no training window may contain a
    line that lies in the validation tail."""
    lines = [f"line {i:05d}\n" for i in range(600)]
    (tmp_path / "numbers.txt").write_text("".join(lines))
    prepare([tmp_path / "numbers.txt"], str(tmp_path / "prep"), "byte", None, 0.1, log=lambda *_: None)
    train, val = (Split(str(tmp_path / "prep"), s, 16) for s in ("train", "val"))
    decode = ByteTokenizer().decode
    val_text = decode(val.tokens)
    val_numbers = {l.split()[1] for l in val_text.splitlines()[1:] if len(l.split()) == 2}
    assert len(val_numbers) > 40
    passes = train.num_windows // B + 1
    batches = _replica_batches(one_device, train_dataset_fn(train, B, seed=0), passes)
    text = "".join(decode(w) for step in batches for r in step for w in r)
    assert not any(f"line {n}" in text for n in val_numbers)
    assert "line 00000" in text


# --- whole shard files per worker ------------------------------------------

def test_whole_files_per_pipeline_when_there_are_enough(tmp_path):
    """Shards of 65, 33, 49 tokens (16, 8, 12 windows) for 2 workers: worker 0
    loads files 0 and 2, worker 1 file 1; each reads only its own windows and
    sees every one of them once per pass of its own."""
    from tfdp.dataset import shard_files
    prep = str(_fake_prepared(tmp_path / "prep", [65, 33, 49]))
    assert [shard_files(prep, "train", SEQ, 2, p) for p in range(2)] == [[0, 2], [1]]
    assert shard_files(prep, "train", SEQ, 1, 0) is None  # one process holds everything
    assert shard_files(prep, "train", SEQ, 4, 0) is None  # fewer files than workers
    splits = [Split(prep, "train", SEQ, shard_files(prep, "train", SEQ, 2, p)) for p in range(2)]
    assert [s.num_windows for s in splits] == [28, 8]
    file_of = lambda start: 0 if start < 65 else 1 if start < 98 else 2  # noqa: E731
    for p, split in enumerate(splits):
        fn = train_dataset_fn(split, B, seed=6)
        ctx = tf.distribute.InputContext(2, p, 2)
        starts = [w[0] for b in fn(ctx).take(split.num_windows // (B // 2)) for w in b.numpy()]
        assert {file_of(s) for s in starts} == ({0, 2} if p == 0 else {1})
        assert len(set(starts)) == len(starts) == split.num_windows // (B // 2) * (B // 2)
        # Resuming at step 1 continues the same stream.
        resumed = train_dataset_fn(split, B, seed=6, start_step=1)(ctx)
        assert [w[0] for w in next(iter(resumed)).numpy()] == starts[B // 2: B]
    with pytest.raises(ValueError, match="input pipeline 1 of 2"):
        train_dataset_fn(splits[0], B, seed=6)(tf.distribute.InputContext(2, 1, 2))


def test_whole_file_validation_counts_every_window_once(tmp_path):
    from tfdp.dataset import shard_files
    prep = str(_fake_prepared(tmp_path / "prep", [65, 33, 49]))
    splits = [Split(prep, "train", SEQ, shard_files(prep, "train", SEQ, 2, p)) for p in range(2)]
    everything = Split(prep, "train", SEQ)
    steps = [eval_steps_for(s, B, num_pipelines=2) for s in splits]
    assert steps == [7, 7]  # 28 windows at 4 per pipeline per step; both run the same count
    seen, weight = [], 0.0
    for p, split in enumerate(splits):
        ctx = tf.distribute.InputContext(2, p, 2)
        for windows, weights in eval_dataset_fn(split, B, steps[p])(ctx):
            seen += windows.numpy()[weights.numpy() > 0][:, 0].tolist()
            weight += float(weights.numpy().sum())
    assert weight == everything.num_windows == 36
    assert sorted(seen) == sorted(everything.tokens[everything.starts].tolist())
