"""tfdp/classdata.py: packing token ids into fixed windows, turning raw
labels into class ids, and reading CSV examples.

tests/test_finetuning.py (_bad_inputs) covers, through finetune(), a missing
file, an empty file, a header without rows, missing columns, mixed, blank,
single-class and unseen eval labels; the cases here are the rest.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfdp.classdata import Examples, pack, read_examples, resolve_labels
from tfdp.errors import UserError

EOT = 99


# --- pack -------------------------------------------------------------------

def test_pack_keeps_the_first_tokens_then_eot_then_padding():
    ids, mask = pack([np.arange(1, 11), np.array([5, 6]), np.array([], np.int32),
                      np.arange(1, 5)], seq_len=5, eot_id=EOT)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (4, 5)
    assert ids.tolist() == [[1, 2, 3, 4, EOT],     # truncated: the head, and EOT last
                            [5, 6, EOT, 0, 0],     # right padding after EOT
                            [EOT, 0, 0, 0, 0],     # an empty text is its EOT
                            [1, 2, 3, 4, EOT]]     # exactly seq_len - 1 tokens: full
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1]]


def test_pack_last_real_token_is_always_eot():
    """What last-token pooling reads (position sum(mask) - 1) is the EOT."""
    rows = [np.arange(1, n + 1) for n in range(0, 12)]
    ids, mask = pack(rows, seq_len=6, eot_id=0)  # EOT may be id 0 too: the mask tells
    last = mask.sum(axis=1) - 1
    assert (ids[np.arange(len(rows)), last] == 0).all()
    assert mask.sum(axis=1).tolist() == [min(n, 5) + 1 for n in range(12)]
    assert pack([np.arange(1, 4)], seq_len=1, eot_id=EOT)[0].tolist() == [[EOT]]


def test_pack_of_nothing():
    ids, mask = pack([], seq_len=4, eot_id=EOT)
    assert ids.shape == mask.shape == (0, 4)


# --- resolve_labels ---------------------------------------------------------

def _ex(labels, classes=None, what="train.csv"):
    return Examples(what, [b"t"] * len(labels), list(labels),
                    [f"line {i + 2} of {what}" for i in range(len(labels))], classes)


def test_integer_labels_are_their_own_ids():
    classes, train, evaluation = resolve_labels(_ex(["2", "0", "1", "0"]), _ex(["1", "2"]))
    assert classes == ["0", "1", "2"]
    assert train.tolist() == [2, 0, 1, 0] and evaluation.tolist() == [1, 2]
    assert train.dtype == evaluation.dtype == np.int32


def test_names_get_ids_in_sorted_order():
    classes, train, evaluation = resolve_labels(
        _ex(["positive", "negative", "neutral", "positive"]), _ex(["neutral", "negative"]))
    assert classes == ["negative", "neutral", "positive"]
    assert train.tolist() == [2, 0, 1, 2] and evaluation.tolist() == [1, 0]


def test_an_eval_name_the_training_data_never_uses_is_refused():
    with pytest.raises(UserError) as err:
        resolve_labels(_ex(["b", "a", "b"]), _ex(["a", "c"], what="eval.csv"))
    assert str(err.value) == ("line 3 of eval.csv has label 'c', which the training data never "
                              "uses (its classes: a, b)")


def test_a_blank_eval_label_is_refused_with_its_row():
    with pytest.raises(UserError, match="line 2 of eval.csv has a blank label"):
        resolve_labels(_ex(["a", "b"]), _ex(["", "a"], what="eval.csv"))


def test_mixed_labels_across_train_and_eval_are_refused():
    with pytest.raises(UserError, match=r"labels mix integers and names \('0' at line 2 of "
                                        r"train.csv, 'x' at line 3 of eval.csv\)"):
        resolve_labels(_ex(["0", "1"]), _ex(["1", "x"], what="eval.csv"))


def test_class_labels_keep_their_own_order():
    """Both sides TFDS ClassLabels: the ids are the ClassLabel's, in its order."""
    names = ["pos", "neg"]
    classes, train, evaluation = resolve_labels(_ex([0, 1, 1], names), _ex([1, 0], names))
    assert classes == ["pos", "neg"]
    assert train.tolist() == [0, 1, 1] and evaluation.tolist() == [1, 0]
    with pytest.raises(UserError, match=r"the train and eval data name different classes "
                                        r"\(\['pos', 'neg'\] vs \['neg', 'pos'\]\)"):
        resolve_labels(_ex([0, 1], names), _ex([0], ["neg", "pos"]))
    with pytest.raises(UserError, match=r"has a single class \('neg'\)"):
        resolve_labels(_ex([1, 1], names), _ex([0], names))


def test_a_class_label_and_csv_names_are_compared_by_name():
    classes, train, evaluation = resolve_labels(_ex([0, 1, 0], ["b", "a"]), _ex(["a", "b"]))
    assert [classes[i] for i in train] == ["b", "a", "b"]
    assert [classes[i] for i in evaluation] == ["a", "b"]
    with pytest.raises(UserError, match="has label 'c', which the training data never uses"):
        resolve_labels(_ex([0, 1], ["b", "a"]), _ex(["c"]))


def test_a_class_label_keeps_its_order_beside_csv_names():
    classes, train, _ = resolve_labels(_ex([0, 1, 0], ["pos", "neg"]), _ex(["neg", "pos"]))
    assert classes == ["pos", "neg"] and train.tolist() == [0, 1, 0]


def test_a_class_label_outside_its_classes_is_refused():
    names = ["neg", "pos"]
    with pytest.raises(UserError, match="example 0 of"):
        resolve_labels(_ex([0, 1], names), Examples("sst2 (test)", [b"a"], [-1],
                                                   ["example 0 of tfds:glue/sst2"], names))


# --- read_examples: CSV -----------------------------------------------------

def _csv(tmp_path, text: str, name="data.csv", encoding="utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_reads_texts_labels_and_rows(tmp_path):
    path = _csv(tmp_path, 'id,review,stars\n1,"great, really",5\n2,"two\nlines", 1 \n3,,3\n')
    got = read_examples(path, "review", "stars", "train")
    assert got.what == path and got.classes is None
    assert got.texts == [b"great, really", b"two\nlines", b""]
    assert got.labels == ["5", "1", "3"]  # stripped
    assert got.rows == [f"line 2 of {path}", f"line 4 of {path}", f"line 5 of {path}"]


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = _csv(tmp_path, "\ufefftext,label\nhello,a\n")
    assert read_examples(path, "text", "label", "train").texts == [b"hello"]


def test_invalid_utf8_is_replaced_not_fatal(tmp_path):
    path = _csv(tmp_path, b"text,label\ncaf\xe9,a\n")
    assert read_examples(path, "text", "label", "train").texts == ["caf\ufffd".encode()]


def test_a_short_row_has_a_blank_label(tmp_path):
    path = _csv(tmp_path, "text,label\nfine,a\nno label here\n")
    got = read_examples(path, "text", "label", "train")
    assert got.labels == ["a", ""]
    with pytest.raises(UserError, match=f"line 3 of {path} has a blank label"):
        resolve_labels(got, got)


def test_a_directory_is_not_a_csv_file(tmp_path):
    with pytest.raises(UserError) as err:
        read_examples(str(tmp_path), "text", "label", "train")
    assert str(err.value) == (f"{tmp_path} does not exist or is not a file; give a .jsonl "
                              "file (one JSON object per line), a CSV file with a header row, "
                              "or tfds:NAME[/CONFIG][:SPLIT]")


def test_a_user_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _csv(tmp_path, "text,label\nx,a\n", name="home.csv")
    assert read_examples("~/home.csv", "text", "label", "train").what == str(tmp_path / "home.csv")


def test_a_text_longer_than_csvs_field_limit_is_read(tmp_path):
    path = _csv(tmp_path, "text,label\nok,a\n" + "x" * 200_000 + ",b\n")
    got = read_examples(path, "text", "label", "train")
    assert got.labels == ["a", "b"] and len(got.texts[1]) == 200_000
