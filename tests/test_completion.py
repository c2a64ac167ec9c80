"""Prompt -> completion fine-tuning: records and templates
(tfdp/records.py, tfdp/completiondata.py), packed windows whose examples
cannot see each other (tfdp/model.py's segment_logits), and the task's
completion-only loss normalised by the GLOBAL weighted-token count
(tfdp/tasks/completion.py)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdp.completiondata import (read_completions, render, tokenize, windows)
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model, logits, segment_logits
from tfdp.optimizer import build_optimizer
from tfdp.records import Records, read_records
from tfdp.step import make_train_step
from tfdp.tasks.completion import CompletionTask
from tfdp.tokenizers import ByteTokenizer

SEQ = 24
CFG = Config(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=SEQ,
             global_batch_size=4, learning_rate=1e-2, min_learning_rate=1e-3,
             warmup_steps=0, train_steps=10, clip_norm=0.0, dropout=0.0, jit_compile=False)
V = ByteTokenizer.vocab_size


def _jsonl(tmp_path, rows, name="ex.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- records and templates --------------------------------------------------


def test_trl_jsonl_with_the_default_templates(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "2+2=", "completion": " 4"},
                             {"prompt": "Hallo ->", "completion": " hello", "extra": 1}])
    got = read_completions(path, "{prompt}", "{completion}", "train", "--train")
    assert got.prompts == ["2+2=", "Hallo ->"]
    assert got.references == [[" 4"], [" hello"]] and got.completions == [" 4", " hello"]
    assert got.where == [f"line 1 of {path}", f"line 2 of {path}"]


def test_squad_shaped_nested_answers_give_every_reference(tmp_path):
    """squad's `answers/text` (a list): the first answer is the completion,
    all are references; nested JSON flattens as TFDS names nested features."""
    path = _jsonl(tmp_path, [{"context": "Paris is in France.", "question": "Where is Paris?",
                              "answers": {"text": ["France", "in France"],
                                          "answer_start": [12, 9]}}])
    got = read_completions(path, "{context}\nQ: {question}\nA:", " {answers/text}",
                           "train", "--train")
    assert got.prompts == ["Paris is in France.\nQ: Where is Paris?\nA:"]
    assert got.references == [[" France", " in France"]]
    # tfdp-generate --output writes each record back as the source nests it.
    records = read_records(path, "train", "--input")
    assert records.rows[0]["answers/text"] == ["France", "in France"]
    assert records.source_rows[0]["answers"] == {"text": ["France", "in France"],
                                                "answer_start": [12, 9]}


def test_wmt_shaped_csv_with_templates(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("de,en\nHallo Welt,hello world\n\"ja, gut\",\"yes, fine\"\n",
                    encoding="utf-8")
    got = read_completions(str(path), "German: {de}\nEnglish:", " {en}", "train", "--train")
    assert got.prompts == ["German: Hallo Welt\nEnglish:", "German: ja, gut\nEnglish:"]
    assert got.completions == [" hello world", " yes, fine"]


def test_class_label_fields_become_label_words():
    records = Records("glue/sst2 (validation)", [{"sentence": "great", "label": 1},
                                                 {"sentence": "awful", "label": 0}],
                      ["example 0", "example 1"], ["sentence", "label"],
                      classes={"label": ["negative", "positive"]})
    got = render(records, "{sentence}\nSentiment:", " {label}")
    assert got.completions == [" positive", " negative"]
    unlabelled = Records("glue/sst2 (test)", [{"sentence": "x", "label": -1}], ["example 0"],
                         ["sentence", "label"], classes={"label": ["negative", "positive"]})
    with pytest.raises(UserError, match=r"example 0 has label -1; the split is unlabelled .*"
                                        r"use a split that has labels, e.g. :validation"):
        render(unlabelled, "{sentence}", " {label}")


@pytest.mark.parametrize("content, template, message", [
    ('{"prompt": "a", "completion": "b"}\nnot json\n', None,
     "line 2 of .* is not valid JSON"),
    ('["a", "b"]\n', None, "line 1 of .* is a JSON list, not an object"),
    ("\n\n", None, "holds no examples"),
    ('{"prompt": "a", "completion": "b"}\n', "{answer}",
     "--completion_template names 'answer', which .* does not have; its fields are "
     "'prompt', 'completion'"),
    ('{"prompt": "a", "completion": "b"}\n', "{}", "has a positional field"),
    ('{"prompt": "a", "completion": "b"}\n', "{completion", "is not a valid template"),
    ('{"prompt": "a", "answers": {"text": []}}\n', "{answers/text}",
     "has an empty 'answers/text'"),
    ('{"prompt": "a", "completion": "b"}\n', "{completion:d}",
     "cannot be filled from line 1 of"),
])
def test_bad_examples_and_templates_are_one_line(tmp_path, content, template, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_completions(str(path), "{prompt}", template or "{completion}", "train", "--train")


def test_a_missing_file_names_the_formats(tmp_path):
    with pytest.raises(UserError, match="does not exist or is not a file; give a .jsonl file"):
        read_records(str(tmp_path / "nope.jsonl"), "train", "--train")


# --- tokens and windows -----------------------------------------------------


def _examples(pairs):
    return render(Records("test", [{"prompt": p, "completion": c} for p, c in pairs],
                          [f"row {i}" for i in range(len(pairs))], ["prompt", "completion"]),
                  "{prompt}", "{completion}")


def test_loss_falls_on_the_completion_and_its_eot_only():
    tok = ByteTokenizer()
    w = windows(tokenize(_examples([("ab", "xyz")]), tok, SEQ), SEQ, pack=False)
    eot = tok.eot_id
    assert w.tokens[0, :7].tolist() == [eot, 97, 98, 120, 121, 122, eot]
    # Inputs 2..5 predict x, y, z, EOT; nothing else carries loss.
    assert np.flatnonzero(w.weights[0]).tolist() == [2, 3, 4, 5]
    assert w.segments[0].tolist() == [1] * 7 + [0] * (SEQ - 7)


def test_long_prompts_lose_their_start_and_are_counted():
    tok = ByteTokenizer()
    long_prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
    got = tokenize(_examples([(long_prompt, "END"), ("hi", "x" * 40)]), tok, SEQ)
    assert got.prompts_cut == 2 and got.completions_cut == 1
    first = got.tokens[0]
    assert len(first) == SEQ + 1 and tok.decode(first) == long_prompt[-(SEQ - 4):] + "END"
    # A completion longer than the window keeps its start, after EOT and no
    # prompt, and has no closing EOT: it did not end there.
    second = got.tokens[1]
    assert len(second) == SEQ + 1 and tok.decode(second) == "x" * SEQ
    assert second[0] == tok.eot_id and tok.eot_id not in second[1:]
    w = windows(got, SEQ, pack=False)
    assert w.weights[1].tolist() == [1.0] * SEQ  # every target is an "x"
    assert w.weights[0, -4:].tolist() == [1.0] * 4 and w.weights[0].sum() == 4  # E, N, D, EOT


def test_packing_fills_windows_in_order():
    tok = ByteTokenizer()
    pairs = [("ab", "c"), ("de", "fg"), ("h" * 15, "i")]  # 5, 6 and 18 tokens
    tokenized = tokenize(_examples(pairs), tok, SEQ)
    packed = windows(tokenized, SEQ, pack=True)
    alone = windows(tokenized, SEQ, pack=False)
    assert len(alone) == 3 and len(packed) == 2
    assert packed.segments[0, :11].tolist() == [1] * 5 + [2] * 6
    assert packed.positions[0, 5:11].tolist() == list(range(6))
    # Example 1 (EOT a b c EOT) at 0..4: inputs 2, 3 predict c, EOT; example
    # 2 (EOT d e f g EOT) at 5..10: inputs 7, 8, 9 predict f, g, EOT.
    assert np.flatnonzero(packed.weights[0]).tolist() == [2, 3, 7, 8, 9]
    assert packed.weights.sum() == alone.weights.sum() == 2 + 3 + 2
    assert packed.loss_fraction > alone.loss_fraction


def test_packed_examples_do_not_see_each_other():
    """Tokens of one example must not change another's logits: packed with
    any neighbour, an example's logits are its logits alone (allclose)."""
    keras.utils.set_random_seed(5)
    model = build_model(CFG, V)
    tok = ByteTokenizer()
    pairs = [("Hi", " hi"), ("Welt", " wo"), ("ja", " y")]  # 7 + 9 + 6 tokens
    tokenized = tokenize(_examples(pairs), tok, SEQ)
    packed = windows(tokenized, SEQ, pack=True)
    assert len(packed) == 1 and packed.segments.max() == 3
    got = segment_logits(model, packed.tokens[:, :-1], packed.segments, packed.positions).numpy()
    at = 0
    for row in tokenized.tokens:
        alone = logits(model, tf.constant(row[None])).numpy()[0]
        inputs = min(len(row), SEQ - at)
        np.testing.assert_allclose(got[0, at:at + inputs], alone[:inputs], rtol=1e-4, atol=1e-5)
        at += len(row)
    # Another neighbour changes nothing either.
    other = tokenize(_examples([("zzz", " qqqq")] + pairs[1:]), tok, SEQ)
    repacked = windows(other, SEQ, pack=True)
    moved = len(other.tokens[0]) - len(tokenized.tokens[0])
    again = segment_logits(model, repacked.tokens[:, :-1], repacked.segments,
                           repacked.positions).numpy()
    start = len(tokenized.tokens[0])
    np.testing.assert_allclose(again[0, start + moved:start + moved + 10],
                               got[0, start:start + 10], rtol=1e-4, atol=1e-5)


# --- the task's loss through tfdp's step ------------------------------------


def _unequal_batch():
    """4 examples; the first two (replica 0 of 2) carry far more completion
    tokens than the last two (replica 1)."""
    pairs = [("a", " " + "long answer " * 1), ("bb", " another long one"), ("c", " x"),
             ("dd", " y")]
    return windows(tokenize(_examples(pairs), ByteTokenizer(), SEQ), SEQ, pack=False)


def _task(batch):
    """The task, its training windows NOT the batch trained on: its nominal
    count (from their fraction of weighted targets) is then wrong for the
    batch, and only the all-reduced count gives the right normaliser."""
    other = windows(tokenize(_examples([("q", " a")]), ByteTokenizer(), SEQ), SEQ, pack=False)
    return CompletionTask(CFG, V, SEQ, 1, "unused", other, batch)


def _train(strategy, batch, steps=2):
    keras.utils.set_random_seed(11)
    with strategy.scope():
        task = _task(batch)
        model = task.build_model()
        optimizer = build_optimizer(CFG, model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, task, CFG.global_batch_size,
                           CFG.clip_norm, False, "float32")

    def dataset_fn(ctx):
        # One pipeline: replica r of R takes the r-th per-replica slice of
        # the same global batch at every step.
        per_replica = ctx.get_per_replica_batch_size(CFG.global_batch_size)
        return tf.data.Dataset.from_tensor_slices(batch.arrays()).repeat().batch(per_replica)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    losses = [float(step(iterator)["loss"][0]) for _ in range(steps)]
    return model, losses


def test_two_replicas_with_unequal_completions_update_as_one(mirrored, one_device):
    batch = _unequal_batch()
    counts = batch.weights.sum(axis=1)
    assert counts[:2].sum() > 3 * counts[2:].sum()  # the replicas' shares differ a lot
    keras.utils.set_random_seed(11)
    initial = build_model(CFG, V).get_weights()
    two, loss_two = _train(mirrored, batch)
    one, loss_one = _train(one_device, batch)
    # The reported loss is the mean over ALL completion tokens.
    manual = _task(batch)
    model = build_model(CFG, V)
    model.set_weights(initial)
    total, count = manual.loss(model, tuple(tf.constant(a) for a in batch.arrays()), False)
    np.testing.assert_allclose(loss_one[0], float(total / count), rtol=1e-5)
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(two.get_weights(),
                                                             one.get_weights()))
    assert worst < 3e-5, worst
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(initial, one.get_weights())) > 1e-3


def test_eval_sums_ignore_padding_and_prompts(one_device):
    batch = _unequal_batch()
    task = CompletionTask(CFG, V, SEQ, 1, "unused", batch, batch)
    keras.utils.set_random_seed(2)
    model = build_model(CFG, V)
    sums = task.eval_sums(model, tuple(tf.constant(a) for a in batch.arrays())).numpy()
    assert sums[1] == batch.weights.sum()
    metrics = task.eval_metrics(sums)
    assert set(metrics) == {"loss", "perplexity", "token_accuracy"}
    assert 0 <= metrics["token_accuracy"] <= 1 and metrics["loss"] > 0


# --- TFDS: datasets shaped like wmt14_translate, squad and glue/sst2 --------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Three datasets written by local builders (no network) with the
    features of wmt14_translate/de-en, squad and glue/sst2."""
    import tensorflow_datasets as tfds

    class TfdpToyWmt(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(
                languages=("de", "en")))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (de, en) in enumerate([("Hallo Welt", "hello world"), ("ja", "yes")]):
                yield i, {"de": de, "en": en}

    class TfdpToySquad(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "context": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence({"text": tfds.features.Text(),
                                                   "answer_start": np.int32})}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            yield "q0", {"id": "q0", "context": "Paris is in France.",
                         "question": "Where is Paris?",
                         "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}}

    class TfdpToySst2(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "sentence": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples([1, 0]),
                    "test": self._generate_examples([-1, -1])}  # as glue writes its test splits

        def _generate_examples(self, labels):
            for i, label in enumerate(labels):
                yield i, {"sentence": f"sentence {i}", "label": label}

    root = tmp_path_factory.mktemp("tfds_completion")
    tfds.disable_progress_bar()
    for builder in (TfdpToyWmt, TfdpToySquad, TfdpToySst2):
        builder(data_dir=str(root)).download_and_prepare()
    return str(root)


def test_wmt_squad_and_sst2_shaped_tfds_splits(tfds_dir):
    wmt = read_completions("tfds:tfdp_toy_wmt", "German: {de}\nEnglish:", " {en}", "train",
                           "--train", tfds_data_dir=tfds_dir)
    assert wmt.prompts == ["German: Hallo Welt\nEnglish:", "German: ja\nEnglish:"]
    assert wmt.completions == [" hello world", " yes"]
    squad = read_completions("tfds:tfdp_toy_squad:validation", "{context}\nQ: {question}\nA:",
                             " {answers/text}", "train", "--eval", tfds_data_dir=tfds_dir)
    assert squad.prompts == ["Paris is in France.\nQ: Where is Paris?\nA:"]
    assert squad.references == [[" France", " in France"]]
    row = read_records("tfds:tfdp_toy_squad:validation", "train", "--input",
                       tfds_dir).source_rows[0]
    assert row["answers"]["text"] == ["France", "in France"] and "answers/text" not in row
    sst2 = read_completions("tfds:tfdp_toy_sst2:validation", "{sentence}\nSentiment:",
                            " {label}", "train", "--eval", tfds_data_dir=tfds_dir)
    assert sst2.completions == [" positive", " negative"]
    with pytest.raises(UserError, match=r"example 0 of tfds:tfdp_toy_sst2:test has label -1; "
                                        r"the split is unlabelled"):
        read_completions("tfds:tfdp_toy_sst2:test", "{sentence}", " {label}", "train",
                         "--eval", tfds_data_dir=tfds_dir)
