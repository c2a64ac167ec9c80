"""Labelled text for fine-tuning a classifier: read, label, tokenize.

Sources: a CSV file (a header row naming the columns; read with the csv
module as UTF-8) or `tfds:NAME[/CONFIG][:SPLIT]`, read with
tensorflow_datasets from a local data_dir (no download unless asked).

Labels are either all integers 0..K-1 or all names; names get ids in sorted
order (a TFDS ClassLabel keeps its own order). Anything else (a blank label,
a mix of integers and names) is refused with the row that shows it.

Tokens: each text is tokenized with the pretrained run's own tokenizer and
ends with its end-of-text token, as every document did in pretraining; a text
longer than the window keeps its FIRST seq_len - 1 tokens (then EOT). The
head, so the classifier always sees how a text starts, and the EOT at the
end, so the last position (what last-token pooling reads) is the same
kind of token in every example. Rows are padded on the right, after the
EOT, under padding_mask = 0: causal attention never looks right, so the
real tokens see exactly what they would see unpadded.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
import sys

import numpy as np

from tfdp.errors import UserError

_INTEGER = re.compile(r"[0-9]+")


@dataclasses.dataclass
class Examples:
    """Texts and their raw labels from one source. `classes`: the label names
    in id order when the source defines them (a TFDS ClassLabel), else None
    and `labels` are strings still to be resolved."""

    what: str
    texts: list[bytes]
    labels: list
    rows: list[str]  # where each example came from, for error messages
    classes: list[str] | None = None


def read_examples(spec: str, text_column: str, label_column: str, default_split: str,
                  tfds_data_dir: str | None = None, tfds_download: bool = False,
                  flag: str = "--train") -> Examples:
    """Examples from a CSV path or a `tfds:` spec (its split defaults to
    `default_split`); `flag` names the flag that gave `spec` in errors."""
    if spec.startswith("tfds:"):
        return _read_tfds(spec, text_column, label_column, default_split, tfds_data_dir,
                          tfds_download, flag)
    return _read_csv(spec, text_column, label_column)


def _read_csv(path: str, text_column: str, label_column: str) -> Examples:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file; give a CSV file with a "
                        f"header row naming the {text_column!r} and {label_column!r} columns, "
                        "or tfds:NAME[/CONFIG][:SPLIT]")
    texts, labels, rows = [], [], []
    # Long texts are read whole (pack cuts them to --seq_len), past the csv
    # module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig: a byte-order mark (as spreadsheets write) is not part of the first name.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{path} is empty; it needs a header row naming the "
                            f"{text_column!r} and {label_column!r} columns, then one row per "
                            "example")
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise UserError(f"{path} has no column {' or '.join(map(repr, missing))}; its "
                            f"columns are {', '.join(map(repr, header))}; name them with "
                            "--text_column and --label_column")
        try:
            for row in reader:
                texts.append((row[text_column] or "").encode("utf-8"))
                labels.append((row[label_column] or "").strip())
                rows.append(f"line {reader.line_num} of {path}")
        except csv.Error as err:
            raise UserError(f"{path} is not valid CSV at line {reader.line_num} ({err}); "
                            "quote fields that hold commas or newlines") from None
    if not texts:
        raise UserError(f"{path} has a header but no rows; give at least one example per class")
    return Examples(path, texts, labels, rows)


def _read_tfds(spec: str, text_column: str, label_column: str, default_split: str,
               data_dir: str | None, download: bool, flag: str) -> Examples:
    from tfdp.recipes.tfds_text import TfdsText  # TFDS is imported only when asked for: it is slow

    # TFDS warns through absl (Python logging) while it looks for data; the
    # outcome is reported in one line (TfdsText's errors).
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        source = TfdsText(spec, text_feature=None, data_dir=data_dir, download=download,
                          default_split=default_split, flag=flag)
    finally:
        absl_logger.setLevel(level)
    name, split, info = source.name, source.split, source.builder.info
    dataset = source.builder.as_dataset(split=split)
    features = info.features
    missing = [c for c in (text_column, label_column) if c not in features]
    if missing:
        raise UserError(f"TFDS dataset {name!r} has no feature "
                        f"{' or '.join(map(repr, missing))}; its features are "
                        f"{', '.join(map(repr, features.keys()))}; name them with "
                        "--text_column and --label_column")
    label_feature = features[label_column]
    classes = list(label_feature.names) if hasattr(label_feature, "names") else None
    texts, labels, rows = [], [], []
    for i, example in enumerate(dataset.as_numpy_iterator()):
        text = example[text_column]
        texts.append(text if isinstance(text, bytes) else str(text).encode("utf-8"))
        label = example[label_column]
        labels.append(int(label) if classes is not None else
                      (label.decode("utf-8") if isinstance(label, bytes) else str(label)).strip())
        rows.append(f"example {i} of {spec}")
    return Examples(f"{name} ({split})", texts, labels, rows, classes)


def resolve_labels(train: Examples, evaluation: Examples) -> tuple[list[str], np.ndarray,
                                                                   np.ndarray]:
    """(class names in id order, train ids, eval ids); see the module docstring."""
    for examples in (train, evaluation):
        if examples.classes is not None:  # TFDS ClassLabel ids: in range, or unlabelled
            _check_ids(examples)
    # One side a TFDS ClassLabel, the other names: the ClassLabel's names,
    # in its own order, and the names side must use them.
    if train.classes is None and evaluation.classes is not None:
        train = _as_ids(train, evaluation.classes, "the eval data's classes do not include")
    elif evaluation.classes is None and train.classes is not None:
        evaluation = _as_ids(evaluation, train.classes, "the training data never uses")
    if train.classes is None:
        for examples in (train, evaluation):
            for label, row in zip(examples.labels, examples.rows):
                if label == "":
                    raise UserError(f"{row} has a blank label; every row needs an integer "
                                    "0..K-1 or a class name")
    distinct = sorted(set(train.labels))
    if len(distinct) < 2:
        only = train.classes[distinct[0]] if train.classes else distinct[0]
        raise UserError(f"the training data ({train.what}) has a single class ({only!r}); "
                        "a classifier needs at least two")
    if train.classes is not None:
        if evaluation.classes is not None and evaluation.classes != train.classes:
            raise UserError(f"the train and eval data name different classes "
                            f"({train.classes} vs {evaluation.classes})")
        classes = train.classes
        ids = [np.asarray(train.labels, np.int32), np.asarray(evaluation.labels, np.int32)]
    else:
        everything = [(label, row) for e in (train, evaluation) for label, row in
                      zip(e.labels, e.rows)]
        numbers = [(label, row) for label, row in everything if _INTEGER.fullmatch(label)]
        names = [(label, row) for label, row in everything if not _INTEGER.fullmatch(label)]
        if numbers and names:
            raise UserError(f"labels mix integers and names ({numbers[0][0]!r} at "
                            f"{numbers[0][1]}, {names[0][0]!r} at {names[0][1]}); use "
                            "integers 0..K-1 throughout, or names throughout")
        if numbers:
            top = max(int(label) for label in train.labels)
            for label, row in zip(evaluation.labels, evaluation.rows):
                if int(label) > top:
                    raise UserError(f"{row} has label {label}, which the training data never "
                                    f"uses (its labels are 0..{top})")
            classes = [str(i) for i in range(top + 1)]
            ids = [np.asarray([int(x) for x in e.labels], np.int32) for e in (train, evaluation)]
        else:
            classes = sorted(set(train.labels))
            index = {name: i for i, name in enumerate(classes)}
            for label, row in zip(evaluation.labels, evaluation.rows):
                if label not in index:
                    raise UserError(f"{row} has label {label!r}, which the training data "
                                    f"never uses (its classes: {', '.join(classes)})")
            ids = [np.asarray([index[x] for x in e.labels], np.int32) for e in (train, evaluation)]
    return classes, ids[0], ids[1]


def _as_ids(named: Examples, classes: list[str], why: str) -> Examples:
    """`named`'s label names as ids of `classes`; a name not among them is
    refused, saying `why`."""
    index = {name: i for i, name in enumerate(classes)}
    for label, row in zip(named.labels, named.rows):
        if label not in index:
            raise UserError(f"{row} has label {label!r}, which {why} (its classes: "
                            f"{', '.join(classes)})")
    return dataclasses.replace(named, labels=[index[x] for x in named.labels], classes=classes)


def _check_ids(examples: Examples) -> None:
    """Refuse ClassLabel ids outside the classes: TFDS marks an unlabelled
    example -1 (glue's test splits are all -1), which must not reach the loss."""
    k = len(examples.classes)
    for label, row in zip(examples.labels, examples.rows):
        if not 0 <= label < k:
            hint = (f"{examples.what} is unlabelled (TFDS writes -1 for a missing label); "
                    "use a split that has labels, e.g. :validation" if label == -1 else
                    f"its classes are 0..{k - 1} ({', '.join(examples.classes)})")
            raise UserError(f"{row} has label {label}; {hint}")


def pack(ids: list[np.ndarray], seq_len: int, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids, padding_mask) [n, seq_len] from each text's ids (as
    tokenizer.encode gives them, without EOT): the first seq_len - 1 of
    them, then EOT, then padding (id 0, mask 0)."""
    tokens = np.zeros([len(ids), seq_len], np.int32)
    mask = np.zeros([len(ids), seq_len], np.int32)
    for i, row in enumerate(ids):
        row = np.append(np.asarray(row[:seq_len - 1], np.int32), np.int32(eot_id))
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return tokens, mask
