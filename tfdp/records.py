"""Examples for fine-tuning, as records (one dict of fields per example),
from the three places users keep them:

    FILE.jsonl           one JSON object per line (TRL's prompt-completion
                         format: {"prompt": ..., "completion": ...}, or any
                         fields a template names)
    FILE.csv             a header row naming the columns (UTF-8; a
                         spreadsheet's byte-order mark is ignored)
    tfds:NAME[/CONFIG][:SPLIT]
                         a TensorFlow Datasets split in a local data_dir (no
                         download unless asked); nested features are
                         flattened with "/" (squad's `answers/text`, a list)

tfdp/classdata.py picks a text and a label column from them,
tfdp/completiondata.py fills prompt and completion templates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import sys

import numpy as np

from tfdp.errors import UserError

FORMATS = "a .jsonl file (one JSON object per line), a CSV file with a header row, or " \
          "tfds:NAME[/CONFIG][:SPLIT]"


@dataclasses.dataclass
class Records:
    """Rows of one source. `fields`: every field name, in source order;
    `where[i]`: where row i came from, for error messages; `classes`: the
    names of each TFDS ClassLabel field, in id order."""

    what: str
    rows: list[dict]
    where: list[str]
    fields: list[str]
    classes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # The rows as the source nests them (what tfdp-generate --output writes
    # back); None: as `rows` (CSV has no nesting).
    nested: list[dict] | None = None

    @property
    def source_rows(self) -> list[dict]:
        return self.rows if self.nested is None else self.nested


def read_records(spec: str, default_split: str, flag: str, tfds_data_dir: str | None = None,
                 tfds_download: bool = False) -> Records:
    """The records of `spec` (its TFDS split defaults to `default_split`);
    `flag` names the flag that gave `spec` in errors."""
    if spec.startswith("tfds:"):
        return _read_tfds(spec, default_split, flag, tfds_data_dir, tfds_download)
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file; give {FORMATS}")
    if path.endswith((".jsonl", ".json")):
        return _read_jsonl(path)
    return _read_csv(path)


def _read_csv(path: str) -> Records:
    rows, where = [], []
    # Long texts are read whole (the tasks cut them to their window), past
    # the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{path} is empty; it needs a header row naming the columns, "
                            "then one row per example")
        try:
            for row in reader:
                rows.append({k: v or "" for k, v in row.items() if k is not None})
                where.append(f"line {reader.line_num} of {path}")
        except csv.Error as err:
            raise UserError(f"{path} is not valid CSV at line {reader.line_num} ({err}); "
                            "quote fields that hold commas or newlines") from None
    if not rows:
        raise UserError(f"{path} has a header but no rows; give at least one example")
    return Records(path, rows, where, list(header))


def _read_jsonl(path: str) -> Records:
    rows, where, fields, nested = [], [], {}, []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"line {number} of {path} is not valid JSON ({err}); write one "
                                "JSON object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"line {number} of {path} is a JSON {type(row).__name__}, not "
                                "an object; write one object of named fields per line")
            nested.append(row)
            row = _flatten(row)
            fields.update(dict.fromkeys(row))
            rows.append(row)
            where.append(f"line {number} of {path}")
    if not rows:
        raise UserError(f"{path} holds no examples; write one JSON object per line")
    return Records(path, rows, where, list(fields), nested=nested)


def _flatten(row: dict, prefix: str = "") -> dict:
    """Nested objects as "outer/inner" fields: {"answers": {"text": [...]}} ->
    {"answers/text": [...]}, as TFDS names nested features."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(row: dict) -> dict:
    """_flatten's inverse for TFDS rows (feature names hold no "/")."""
    nested = {}
    for key, value in row.items():
        *outer, last = key.split("/")
        inner = nested
        for name in outer:
            inner = inner.setdefault(name, {})
        inner[last] = value
    return nested


def _plain(value):
    """A TFDS numpy value as plain Python: bytes -> str, arrays -> lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_tfds(spec: str, default_split: str, flag: str, data_dir: str | None,
               download: bool) -> Records:
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
    features = source.builder.info.features
    classes = {name: list(feature.names) for name, feature in features.items()
               if hasattr(feature, "names") and hasattr(feature, "num_classes")}
    rows, where = [], []
    for i, example in enumerate(source.builder.as_dataset(split=source.split)
                                .as_numpy_iterator()):
        rows.append({k: _plain(v) for k, v in _flatten(example).items()})
        where.append(f"example {i} of {spec}")
    fields = list(rows[0]) if rows else list(features.keys())
    return Records(f"{source.name} ({source.split})", rows, where, fields, classes,
                   nested=[_unflatten(row) for row in rows])
