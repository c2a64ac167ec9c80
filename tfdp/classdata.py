"""Labelled text for fine-tuning a classifier: read, label, tokenize.

Sources (tfdp/records.py): a CSV file with a header row, a JSONL file, or
`tfds:NAME[/CONFIG][:SPLIT]`, read with tensorflow_datasets from a local
data_dir (no download unless asked).

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

import dataclasses
import re

import numpy as np

from tfdp.errors import UserError
from tfdp.records import read_records

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
    """Examples from a CSV or JSONL path or a `tfds:` spec (its split defaults
    to `default_split`); `flag` names the flag that gave `spec` in errors."""
    records = read_records(spec, default_split, flag, tfds_data_dir, tfds_download)
    missing = [c for c in (text_column, label_column) if c not in records.fields]
    if missing:
        kind, noun = (("TFDS dataset", "feature") if spec.startswith("tfds:")
                      else ("", "column"))
        raise UserError(f"{kind + ' ' if kind else ''}{records.what} has no {noun} "
                        f"{' or '.join(map(repr, missing))}; its {noun}s are "
                        f"{', '.join(map(repr, records.fields))}; name them with "
                        "--text_column and --label_column")
    classes = records.classes.get(label_column)
    texts, labels = [], []
    for row in records.rows:
        text, label = row.get(text_column), row.get(label_column)
        texts.append(("" if text is None else str(text)).encode("utf-8"))
        labels.append(int(label) if classes is not None else
                      ("" if label is None else str(label)).strip())
    return Examples(records.what, texts, labels, records.where, classes)


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
