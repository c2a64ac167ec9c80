"""Text files -> token shards + tokenizer + manifest.json, written atomically.

Layout of a prepared directory:

    manifest.json        tokenizer, vocab size, token/byte counts per split
    tokenizer/           the tokenizer's assets (tokenizers.load_tokenizer)
    train-00000.npy ...  uint16/uint32 token ids, documents joined by EOT
    val-00000.npy ...

A streamed corpus (`--data=tfds:...`, `prepare_stream`) keeps only its
tokenizer and val split here: its training text is tokenized as it is read.

The split is made on bytes BEFORE the tokenizer is trained: the last
`val_fraction` of the corpus (files in the order given, as is customary for
a held-out tail) is validation, and neither the tokenizer nor training ever
sees it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from tfdp.atomic import require_new_or_empty, staged_directory
from tfdp.errors import UserError
from tfdp.recipes.tfds_text import MAX_VAL_BYTES
from tfdp.tokenizers import train_tokenizer

MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 22  # 4M tokens (8 MB as uint16) per shard file


def read_documents(files: list[Path]) -> list[bytes]:
    """Read each file's bytes; UserError for unreadable or all-empty input."""
    docs = []
    for path in files:
        try:
            docs.append(Path(path).read_bytes())
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror}; check the path "
                            "and its permissions") from None
    if not any(docs):
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserError(f"the corpus is empty ({names} hold no text); give files with text")
    return [d for d in docs if d]


def split_documents(docs: list[bytes], val_fraction: float):
    """Split the byte stream so its last `val_fraction` is validation.

    The document on the boundary is cut at a UTF-8 character boundary.
    """
    if val_fraction <= 0:
        return docs, []
    total = sum(len(d) for d in docs)
    remaining = max(1, math.ceil(total * val_fraction))
    for i in range(len(docs) - 1, -1, -1):
        if len(docs[i]) >= remaining:
            cut = len(docs[i]) - remaining
            while 0 < cut < len(docs[i]) and (docs[i][cut] & 0xC0) == 0x80:
                cut += 1  # do not split a multi-byte character
            head, tail = docs[i][:cut], docs[i][cut:]
            return docs[:i] + ([head] if head else []), [tail] + docs[i + 1:]
        remaining -= len(docs[i])
    return [], docs


def _stream(tokenizer, docs: list[bytes]) -> np.ndarray:
    """All documents' ids, each followed by EOT, as one array."""
    if not docs:
        return np.zeros([0], np.int32)
    parts = []
    for ids in tokenizer.encode(docs):
        parts.extend([ids, np.array([tokenizer.eot_id], np.int32)])
    return np.concatenate(parts)


def _write_shards(directory: str, split: str, tokens: np.ndarray, dtype) -> list[dict]:
    shards = []
    for index, start in enumerate(range(0, max(len(tokens), 1), SHARD_TOKENS)):
        chunk = tokens[start:start + SHARD_TOKENS].astype(dtype)
        name = f"{split}-{index:05d}.npy"
        np.save(os.path.join(directory, name), chunk)
        shards.append({"file": name, "tokens": int(len(chunk))})
    return shards


def prepare(files: list[Path], output: str, tokenizer="byte",
            vocab_size: int | None = None, val_fraction: float = 0.02,
            log=print) -> dict:
    """Tokenize `files` into `output` (which must not exist); return the manifest.

    `tokenizer` names the kind to train on the training text, or is a
    tokenizer already trained (tfdp-eval scores text with the model's own).
    """
    output = require_new_or_empty(output, "--output")
    docs = read_documents(files)
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.kind
    if kind != "byte":
        bad = sum(1 for d in docs if not _is_utf8(d))
        if bad:
            print(f"warning: {bad} file(s) are not valid UTF-8; invalid bytes become "
                  "U+FFFD (use --tokenizer=byte to keep them)", file=sys.stderr)
    train_docs, val_docs = split_documents(docs, val_fraction)
    if not train_docs:
        raise UserError(f"--val_fraction={val_fraction} leaves no training text; lower it")
    log(f"tokenizing {len(files)} file(s), {sum(map(len, docs)):,} bytes "
        f"with the {kind} tokenizer")
    tok = (train_tokenizer(tokenizer, train_docs, vocab_size) if isinstance(tokenizer, str)
           else tokenizer)
    return write_prepared(output, tok, {"train": train_docs, "val": val_docs},
                          {"val_fraction": val_fraction, "num_files": len(files)})


TOKENIZER_SAMPLE_BYTES = 32 << 20  # text a streamed corpus' tokenizer is trained on


def prepare_stream(source, train_split: str, val_split: str, output: str,
                   tokenizer="byte", vocab_size: int | None = None, log=print) -> dict:
    """For a streamed corpus (`train_split` and `val_split` of a
    tfdp.recipes.tfds_text.TfdsText): train the tokenizer (a kind, as for
    `prepare`; or take one already trained) on the first
    TOKENIZER_SAMPLE_BYTES of the training split and write it into `output`
    with the validation split's tokens (at most MAX_VAL_BYTES of text).
    Training text is not written: tfdp/stream.py tokenizes it as it reads."""
    output = require_new_or_empty(output, "--output")
    sample: list[bytes] = []
    if isinstance(tokenizer, str) and tokenizer != "byte":  # byte learns nothing
        sample, whole = source.documents(train_split, TOKENIZER_SAMPLE_BYTES)
        if not sample:
            raise UserError(f"--data={source.spec}: split {train_split!r} holds no text "
                            f"in --text_feature={source.feature!r}; pick the text feature")
        log(f"training the {tokenizer} tokenizer on {'all' if whole else 'the first'} "
            f"{sum(map(len, sample)):,} bytes of {source.spec} ({train_split})")
    tok = (train_tokenizer(tokenizer, sample, vocab_size) if isinstance(tokenizer, str)
           else tokenizer)
    val_docs, whole = source.documents(val_split, MAX_VAL_BYTES)
    log(f"validation: {'all' if whole else 'the first'} {sum(map(len, val_docs)):,} bytes of "
        f"split {val_split!r} of {source.spec}, tokenized with the {tok.kind} tokenizer")
    return write_prepared(output, tok, {"val": val_docs},
                          {"source": source.spec, "train_split": train_split,
                           "val_split": val_split, "text_feature": source.feature})


def write_prepared(output: str, tok, splits: dict[str, list[bytes]], about: dict) -> dict:
    """Write `tok` and each split's documents, tokenized, into `output`
    (new or empty); return the manifest, which also records `about`.

    Everything is written to a staging directory beside `output` and renamed
    into place at the end, so a failure leaves nothing behind.
    """
    output = require_new_or_empty(output, "--output")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    streams = {split: _stream(tok, docs) for split, docs in splits.items()}
    with staged_directory(output, ".tfdp-prepare-") as staging:
        os.makedirs(os.path.join(staging, "tokenizer"))
        tok.save(os.path.join(staging, "tokenizer"))
        manifest = {
            "format": 1,
            "tokenizer": tok.kind,
            "vocab_size": int(tok.vocab_size),
            "eot_id": int(tok.eot_id),
            "dtype": np.dtype(dtype).name,
            **about,
            "splits": {split: {"tokens": int(len(ids)),
                               "bytes": int(sum(map(len, splits[split]))),
                               "shards": _write_shards(staging, split, ids, dtype)}
                       for split, ids in streams.items()},
        }
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_manifest(directory: str) -> dict | None:
    """The manifest tfdp-prepare wrote in `directory`, or None if it has none.

    A `manifest.json` of some other program (common in web projects) is not
    ours: ours carries "format": 1 and "splits".
    """
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and manifest.get("format") == 1 and "splits" in manifest:
        return manifest
    return None


def load_manifest(directory: str) -> dict:
    manifest = _read_manifest(directory)
    if manifest is None:
        raise UserError(f"{directory} is not a directory written by tfdp-prepare (no valid "
                        f"{MANIFEST}); run tfdp-prepare on it first or pass text files")
    return manifest


def is_prepared(path: str) -> bool:
    return _read_manifest(path) is not None
