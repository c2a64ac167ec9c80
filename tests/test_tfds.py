"""--data=tfds:...: TensorFlow Datasets splits streamed into training.

A small dataset is written to disk by a TFDS builder defined here (four
files per split, no network); the subprocess tests find it from its files
alone, as a user's prepared dataset is found. tiny_shakespeare itself is
read through `tfds.testing.mock_data`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import run_cli
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.evaluation import evaluate
from tfdp.training import train
from tfdp.stream import TextStream, stream_windows
from tfdp.prepare import prepare_stream
from tfdp.recipes.tfds_text import TfdsText
from tfdp.tokenizers import ByteTokenizer, train_tokenizer
from test_training import TINY

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _document(i: int) -> str:
    return f"doc {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) + "\n"


class TfdpToyText(tfds.core.GeneratorBasedBuilder):
    """40 training and 8 test documents in a `content` feature, 4 files each."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "id": tfds.features.Scalar(tf.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40),
                "test": self._generate_examples(1000, 8)}

    def _generate_examples(self, first, count):
        for i in range(first, first + count):
            yield i, {"content": _document(i), "id": i}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    TfdpToyText(data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return str(data_dir)


def _toy(toy_dir, **kwargs):
    return TfdsText("tfds:tfdp_toy_text", text_feature="content", data_dir=toy_dir, **kwargs)


def test_each_input_pipeline_reads_its_own_files(toy_dir):
    source = _toy(toy_dir)
    assert source.train_and_val(0.02) == ("train", "test")
    assert source.num_files("train") == 4
    seen = [sorted(int(t.split(b":")[0][4:]) for t in source.text_dataset(
        "train", tf.distribute.InputContext(2, p, 2), seed=1).as_numpy_iterator())
        for p in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))


def test_windows_continue_across_documents():
    """The stream is the documents joined; window i starts at token i*L and
    overlaps the next by one token, as Split's windows do."""
    docs = [np.arange(1, 8, dtype=np.int32), np.arange(10, 13, dtype=np.int32),
            np.arange(20, 31, dtype=np.int32)]
    tokens = tf.data.Dataset.from_generator(lambda: iter(docs),
                                            output_signature=tf.TensorSpec([None], tf.int32))
    windows = np.stack(list(stream_windows(tokens, 4).as_numpy_iterator()))
    joined = np.concatenate(docs)
    count = (len(joined) - 1) // 4
    np.testing.assert_array_equal(windows, [joined[i * 4:i * 4 + 5] for i in range(count)])


def test_a_split_with_fewer_files_than_pipelines_is_shared_window_by_window(tmp_path):
    """One file, two pipelines: both read it all and take alternate windows
    of the one stream (unshuffled here, to compare exactly)."""
    TfdpToyText(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=1))
    source = TfdsText("tfds:tfdp_toy_text:train[:20]", text_feature="content",
                      data_dir=str(tmp_path))
    assert source.num_files(source.split) == 1
    tokenizer = ByteTokenizer()
    docs = list(source.text_dataset(source.split).as_numpy_iterator())
    ids = [np.append(tokenizer.encode([d])[0], tokenizer.eot_id).astype(np.int32) for d in docs]
    tokens = tf.data.Dataset.from_generator(lambda: iter(ids),
                                            output_signature=tf.TensorSpec([None], tf.int32))
    expected = np.stack(list(stream_windows(tokens, 16).as_numpy_iterator()))
    stream = TextStream(source, source.split, tokenizer, seq_len=16, shuffle_windows=1)
    fn = stream.dataset_fn(8, seed=3)
    batches = len(expected) // 8  # per pipeline, within the first pass
    for p in range(2):
        got = fn(tf.distribute.InputContext(2, p, 2)).take(batches)
        np.testing.assert_array_equal(np.concatenate(list(got.as_numpy_iterator())),
                                      expected[p::2][:batches * 4])


@pytest.mark.slow
def test_trains_and_resumes_on_a_tfds_split(toy_dir, tmp_path, mirrored):
    """Validation comes from the dataset's test split; training streams train."""
    run = tmp_path / "run"
    cfg = dict(data="tfds:tfdp_toy_text", tfds_data_dir=toy_dir, text_feature="content",
               tokenizer="char", vocab_size=40, model_dir=str(run), eval_every=15,
               checkpoint_every=15, **TINY)
    logs = []
    first = train(Config(train_steps=30, **cfg), log=logs.append)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert (manifest["source"], manifest["val_split"]) == ("tfds:tfdp_toy_text", "test")
    assert manifest["splits"]["val"]["bytes"] == sum(len(_document(i)) for i in range(1000, 1008))
    assert first["history"][-1]["val_loss"] < first["history"][0]["val_loss"]
    assert any("streamed from tfds:tfdp_toy_text" in line for line in logs)
    resumed = []
    second = train(Config(train_steps=35, **cfg), log=resumed.append)
    assert second["step"] == 35
    assert any("resumed from step 30" in line for line in resumed)
    assert any("fresh order" in line for line in resumed)
    # tfdp-eval on the test split scores the text validation scored.
    scored = evaluate(str(run), "tfds:tfdp_toy_text:test", log=lambda *_: None,
                      tfds_options={"text_feature": "content", "data_dir": toy_dir})
    assert scored["loss"] == pytest.approx(second["val_loss"], rel=1e-6)
    assert scored["data"] == "tfds:tfdp_toy_text:test (8 documents)"


@pytest.mark.slow
def test_tiny_shakespeare_through_mock_data(tmp_path, mirrored):
    """tfds:tiny_shakespeare (its code, TFDS' mock examples, split sizes from
    the metadata written here): no network, no download."""
    meta = tmp_path / "meta" / "tiny_shakespeare" / "1.0.0"
    meta.mkdir(parents=True)
    (meta / "dataset_info.json").write_text(json.dumps({
        "name": "tiny_shakespeare", "version": "1.0.0", "fileFormat": "tfrecord",
        "splits": [{"name": s, "shardLengths": ["1"], "numBytes": "1000"}
                   for s in ("train", "validation", "test")]}))
    with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path / "meta")):
        metrics = train(Config(data="tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path / "meta"),
                               model_dir=str(tmp_path / "run"), train_steps=4, eval_every=4,
                               checkpoint_every=4, **TINY),
                        log=lambda *_: None)
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["val_split"] == "validation"
    assert np.isfinite(metrics["val_loss"]) and metrics["step"] == 4


def test_holds_out_the_end_of_a_split_without_validation(toy_dir, tmp_path):
    """A dataset with only the named split: its last val_fraction validates."""
    sliced = TfdsText("tfds:tfdp_toy_text:test[:4]", text_feature="content", data_dir=toy_dir)
    with pytest.raises(UserError, match="has no validation or test split"):
        sliced.train_and_val(0.25)
    # The toy dataset has no validation split, and its test split trains here.
    source = TfdsText("tfds:tfdp_toy_text:test", text_feature="content", data_dir=toy_dir)
    assert source.train_and_val(0.25) == ("test[:6]", "test[6:]")
    with pytest.raises(UserError, match="too few to hold out"):
        source.train_and_val(1.0)


@pytest.mark.parametrize("flags, expected", [
    (["--data=tfds:no_such_dataset_xyz"], "TFDS knows no dataset 'no_such_dataset_xyz'"),
    (["--data=tfds:tfdp_toy_text:validation", "--text_feature=content"], "no split 'validation'"),
    (["--data=tfds:tfdp_toy_text"], "--text_feature='text' is not a text feature of "
                                    "tfdp_toy_text (its text features: content)"),
])
def test_bad_tfds_input_is_one_line(toy_dir, tmp_path, flags, expected):
    run = tmp_path / "run"
    result = run_cli("tfdp-train", *flags, f"--tfds_data_dir={toy_dir}",
                     f"--model_dir={run}", "--train_steps=2")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfdp-train: error: "), result.stderr
    assert expected in lines[0]
    assert not run.exists()


def test_nothing_downloads_unless_asked(tmp_path):
    """tiny_shakespeare is a registered dataset, absent from an empty data dir."""
    result = run_cli("tfdp-train", "--data=tfds:tiny_shakespeare",
                     f"--tfds_data_dir={tmp_path / 'empty'}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert "pass --tfds_download" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty").exists()


def test_a_given_tokenizer_is_kept(toy_dir, tmp_path):
    """--init_from a preset with a tokenizer: the stream's validation text is
    tokenized with that tokenizer, none is trained."""
    tokenizer = train_tokenizer("char", [b"alpha beta doc 0123456789:"], 32)
    source = _toy(toy_dir)
    manifest = prepare_stream(source, "train", "test", str(tmp_path / "prep"), tokenizer)
    assert (manifest["tokenizer"], manifest["vocab_size"]) == ("char", tokenizer.vocab_size)
    val = np.load(tmp_path / "prep" / "val-00000.npy")
    first = tokenizer.encode([next(source.text_dataset("test").as_numpy_iterator())])[0]
    np.testing.assert_array_equal(val[:len(first)], first)
