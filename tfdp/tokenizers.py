"""Tokenizers: train on documents, save beside the data, load for generation.

Every tokenizer maps a document (bytes) to int32 ids and reserves one id for
end-of-text (EOT), which prepare.py puts after each document so the model
learns where files end and generation can stop there.

byte           lossless, 256 byte ids + EOT; takes any bytes, UTF-8 or not.
char           the most frequent characters + EOT + unknown.
wordpiece      keras-hub's WordPiece trainer and tokenizer (splits on
               whitespace, so decoding does not restore spacing).
sentencepiece  keras-hub's SentencePiece trainer (unigram) and tokenizer
               (default normalisation collapses repeated whitespace).
bpe            byte-level BPE as GPT-2's: merges trained by the `tokenizers`
               package (keras-hub has no BPE trainer), applied by
               keras-hub's BytePairTokenizer; lossless for any UTF-8 text.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import keras_hub
import numpy as np
import tensorflow as tf

from tfdp.config import DEFAULT_VOCAB_SIZE
from tfdp.errors import UserError

_META = "tokenizer.json"


def _texts(docs: list[bytes]) -> list[str]:
    """Decode documents for text tokenizers; invalid UTF-8 becomes U+FFFD."""
    return [d.decode("utf-8", errors="replace") for d in docs]


class ByteTokenizer:
    """Raw bytes 0..255, EOT = 256."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, docs: list[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(d, dtype=np.uint8).astype(np.int32) for d in docs]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        _write_meta(directory, self.kind, self.vocab_size)


class CharTokenizer:
    """Unicode characters by frequency; EOT = 0, unknown = 1."""

    kind = "char"
    eot_id = 0
    unk_id = 1

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars) + 2
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        order = np.argsort(codes)
        self._codes = codes[order]
        self._ids = (order + 2).astype(np.int32)

    @classmethod
    def train(cls, docs: list[bytes], vocab_size: int) -> "CharTokenizer":
        counts = Counter()
        for text in _texts(docs):
            counts.update(text)
        # Ties broken by code point so training is deterministic.
        ranked = sorted(counts, key=lambda c: (-counts[c], ord(c)))
        return cls(ranked[: max(vocab_size - 2, 1)])

    def encode(self, docs: list[bytes]) -> list[np.ndarray]:
        out = []
        for text in _texts(docs):
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
            pos = np.clip(np.searchsorted(self._codes, codes), 0, len(self._codes) - 1)
            found = self._codes[pos] == codes
            out.append(np.where(found, self._ids[pos], self.unk_id).astype(np.int32))
        return out

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 2] if i >= 2 else ("\ufffd" if i == 1 else "")
                       for i in (int(x) for x in ids) if i < self.vocab_size)

    def save(self, directory: str) -> None:
        _write_meta(directory, self.kind, self.vocab_size, chars=self.chars)


class KerasHubTokenizer:
    """Adapter around a keras-hub tokenizer (WordPiece, SentencePiece or
    BytePair), called eagerly."""

    def __init__(self, kind: str, layer, eot_id: int, assets: dict):
        self.kind = kind
        self.layer = layer
        self.eot_id = eot_id
        self.vocab_size = int(layer.vocabulary_size())
        self._assets = assets

    def encode(self, docs: list[bytes]) -> list[np.ndarray]:
        out = []
        texts = _texts(docs)
        for start in range(0, len(texts), 64):  # batches keep memory bounded
            rows = self.layer(tf.constant(texts[start:start + 64]))
            # keras-hub returns Python lists in eager mode, a RaggedTensor in graphs.
            rows = rows.to_list() if hasattr(rows, "to_list") else rows
            out.extend(np.asarray(row, dtype=np.int32) for row in rows)
        return out

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != self.eot_id]
        if not ids:
            return ""
        text = self.layer.detokenize([ids])
        text = np.asarray(text).reshape(-1)[0]
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

    def save(self, directory: str) -> None:
        for name, data in self._assets.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        _write_meta(directory, self.kind, self.vocab_size, eot_id=self.eot_id)


_WORDPIECE_RESERVED = ["[PAD]", "[UNK]", "[EOT]"]


def _wordpiece(vocab: list[str]) -> KerasHubTokenizer:
    layer = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab, oov_token="[UNK]")
    assets = {"vocab.txt": ("\n".join(vocab) + "\n").encode("utf-8")}
    return KerasHubTokenizer("wordpiece", layer, vocab.index("[EOT]"), assets)


def _sentencepiece(proto: bytes) -> KerasHubTokenizer:
    layer = keras_hub.tokenizers.SentencePieceTokenizer(proto=proto)
    return KerasHubTokenizer("sentencepiece", layer, int(layer.token_to_id("</s>")),
                             {"spm.model": proto})


_BPE_EOT = "<|endoftext|>"  # GPT-2's name for it
_BPE_ALPHABET = 256  # byte-level: every byte has a token of its own


def _bpe(vocab: dict, merges: list[str]) -> KerasHubTokenizer:
    layer = keras_hub.tokenizers.BytePairTokenizer(vocabulary=vocab, merges=merges)
    assets = {"vocabulary.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
              "merges.txt": ("\n".join(merges) + "\n").encode("utf-8")}
    return KerasHubTokenizer("bpe", layer, vocab[_BPE_EOT], assets)


def _train_bpe(docs: list[bytes], size: int) -> KerasHubTokenizer:
    """Byte-level BPE merges learnt by the `tokenizers` package on words split
    by keras-hub's own pattern for BytePairTokenizer, the way GPT-2's merges
    were learnt.

    keras-hub 0.32's eager BytePairTokenizer hands that pattern to
    `tokenizers` as a plain string, which `tokenizers` matches literally
    (huggingface/tokenizers#1565), so it applies the merges to whole texts
    rather than word by word. tfdp keeps that (an exported preset then
    tokenizes exactly as tfdp did) and compiles the pattern as a regex for
    training only: learning on whole texts took 44 s for 0.9 MB, on words
    0.2 s. Either way the byte-level encoding is lossless.
    """
    from keras_hub.src.tokenizers.byte_pair_tokenizer import SPLIT_PATTERN_TOKENIZERS
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN_TOKENIZERS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(_texts(docs), trainers.BpeTrainer(
        vocab_size=size, special_tokens=[_BPE_EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return _bpe(model["vocab"], merges)


def _lines(docs: list[bytes]):
    """Training sentences for the keras-hub trainers: non-empty lines, one per
    element (the SentencePiece trainer rejects batches; WordPiece batches them)."""
    lines = [line for text in _texts(docs) for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError("the corpus has no non-blank lines to train a tokenizer on; "
                        "give text files with content")
    return tf.data.Dataset.from_tensor_slices(lines)


def train_tokenizer(kind: str, docs: list[bytes], vocab_size: int | None = None):
    """Train (or, for byte, just create) the tokenizer named `kind` on `docs`."""
    if kind not in DEFAULT_VOCAB_SIZE:
        raise UserError(f"--tokenizer={kind!r} is unknown; use one of "
                        f"{', '.join(DEFAULT_VOCAB_SIZE)}")
    size = vocab_size or DEFAULT_VOCAB_SIZE[kind]
    if kind == "byte":
        if size != ByteTokenizer.vocab_size:
            raise UserError(f"--vocab_size={size} does not apply to --tokenizer=byte, "
                            "whose vocabulary is fixed at 257; omit --vocab_size")
        return ByteTokenizer()
    if kind == "bpe" and size <= _BPE_ALPHABET:
        raise UserError(f"--vocab_size={size} is too small for --tokenizer=bpe, which needs "
                        f"{_BPE_ALPHABET} byte tokens and EOT; use > {_BPE_ALPHABET}")
    if size < 8:
        raise UserError(f"--vocab_size={size} is too small for --tokenizer={kind}; use >= 8")
    if kind == "bpe":
        return _train_bpe(docs, size)
    if kind == "char":
        return CharTokenizer.train(docs, size)
    if kind == "wordpiece":
        vocab = keras_hub.tokenizers.compute_word_piece_vocabulary(
            _lines(docs).batch(1024), vocabulary_size=size,
            reserved_tokens=_WORDPIECE_RESERVED)
        return _wordpiece(list(vocab))
    try:  # sentencepiece
        proto = keras_hub.tokenizers.compute_sentence_piece_proto(
            _lines(docs), vocabulary_size=size)
    except RuntimeError as err:  # e.g. vocabulary larger than the text allows
        raise UserError(f"SentencePiece training failed ({str(err).splitlines()[-1]}); "
                        "lower --vocab_size or give more text") from None
    return _sentencepiece(proto)


def load_preset_bpe(preset_dir: str) -> KerasHubTokenizer:
    """tfdp's `bpe` tokenizer from the GPT2Tokenizer of a keras-hub preset
    directory (its assets/tokenizer/vocabulary.json and merges.txt), so
    that `tfdp-train --init_from` tokenizes text with the preset's own
    vocabulary and merges, and tfdp-generate/eval read the run back as any
    bpe run. EOT is GPT-2's `<|endoftext|>`. Called eagerly it gives the
    GPT2Tokenizer's ids, except for the literal text `<|endoftext|>`, which
    GPT2Tokenizer reads as that one token and tfdp spells out in bytes.
    """
    assets = os.path.join(preset_dir, "assets", "tokenizer")
    try:
        with open(os.path.join(assets, "vocabulary.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(assets, "merges.txt"), encoding="utf-8") as f:
            # keras-hub reads merges line by line, right-stripped; GPT-2's own
            # file starts with a "#version: 0.2" header, which is no merge.
            merges = [m.rstrip() for m in f if m.strip() and not m.startswith("#version:")]
    except (OSError, ValueError) as err:
        raise UserError(f"{preset_dir} has no readable GPT-2 tokenizer assets in {assets} "
                        f"({err}); give a preset saved by keras-hub or tfdp-export") from None
    if not isinstance(vocab, dict) or _BPE_EOT not in vocab:
        raise UserError(f"{assets}/vocabulary.json has no {_BPE_EOT!r} token, which a GPT-2 "
                        "tokenizer needs; give a preset saved by keras-hub or tfdp-export")
    return _bpe(vocab, merges)


def _write_meta(directory: str, kind: str, vocab_size: int, **extra) -> None:
    with open(os.path.join(directory, _META), "w") as f:
        json.dump({"kind": kind, "vocab_size": vocab_size, **extra}, f)


def load_tokenizer(directory: str):
    """Load what `save` wrote into `directory`."""
    path = os.path.join(directory, _META)
    if not os.path.exists(path):
        raise UserError(f"no tokenizer in {directory} (missing {_META}); "
                        "point at a directory written by tfdp-prepare or tfdp-train")
    with open(path) as f:
        meta = json.load(f)
    kind = meta["kind"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "wordpiece":
        with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
            return _wordpiece(f.read().split("\n")[:-1])  # not splitlines(): U+2028 is a token
    if kind == "sentencepiece":
        with open(os.path.join(directory, "spm.model"), "rb") as f:
            return _sentencepiece(f.read())
    if kind == "bpe":
        with open(os.path.join(directory, "vocabulary.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
            return _bpe(vocab, f.read().split("\n")[:-1])
    raise UserError(f"{path} names an unknown tokenizer {kind!r}; re-run tfdp-prepare")
