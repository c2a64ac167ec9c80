"""Tokenizers, the prepared-data layout, and the corpus recipes (in-process).

The keras-hub tokenizers run TensorFlow ops; the module asks for the
`mirrored` fixture first so that TensorFlow's CPU split (conftest.py) is in
place before anything here initialises the runtime.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_text
from tfdp import recipes
from tfdp.errors import UserError
from tfdp.prepare import MANIFEST, prepare, split_documents
from tfdp.tokenizers import (ByteTokenizer, CharTokenizer, load_tokenizer,
                             train_tokenizer)

TINY = tiny_text().encode("utf-8")


@pytest.fixture(scope="module", autouse=True)
def _cpu_split_first(mirrored):
    """Split the CPU before any TensorFlow op in this module runs."""
    return mirrored


def _saved_and_loaded(tok, directory: Path):
    directory.mkdir()
    tok.save(str(directory))
    return load_tokenizer(str(directory))


# --- byte -------------------------------------------------------------------


def test_byte_round_trip_non_ascii():
    text = "naïve café — 東京 🚀 tab\tnewline\n"
    tok = ByteTokenizer()
    [ids] = tok.encode([text.encode("utf-8")])
    assert ids.dtype == np.int32
    assert list(ids) == list(text.encode("utf-8"))
    assert len(ids) > len(text)  # multi-byte characters are several ids
    assert tok.decode(ids) == text


def test_byte_keeps_invalid_utf8_bytes():
    raw = b"ok \xff\xfe bad \xc3"  # invalid bytes and a truncated sequence
    tok = ByteTokenizer()
    [ids] = tok.encode([raw])
    assert bytes(int(i) for i in ids) == raw  # lossless, byte for byte
    assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in tok.decode(ids)


def test_byte_eot_is_distinct_and_skipped_on_decode(tmp_path):
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256
    [ids] = tok.encode([bytes(range(256))])
    assert tok.eot_id not in ids and int(ids.max()) < tok.eot_id
    assert tok.decode([104, 105, tok.eot_id]) == "hi"
    loaded = _saved_and_loaded(tok, tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer)
    assert list(loaded.encode([TINY])[0]) == list(tok.encode([TINY])[0])


def test_byte_rejects_other_vocab_size():
    with pytest.raises(UserError, match="--vocab_size=300"):
        train_tokenizer("byte", [TINY], 300)


# --- char -------------------------------------------------------------------


def test_char_round_trip_and_unknown(tmp_path):
    tok = train_tokenizer("char", [TINY], 256)
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(set(tiny_text())) + 2
    text = "def café(東京):\n    return x"  # every character occurs in TINY
    [ids] = tok.encode([text.encode("utf-8")])
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids and tok.unk_id not in ids

    [ids] = tok.encode(["aZ€b".encode("utf-8")])  # Z and € never occur in TINY
    assert list(ids[[1, 2]]) == [tok.unk_id, tok.unk_id]
    assert tok.unk_id not in ids[[0, 3]]

    loaded = _saved_and_loaded(tok, tmp_path / "tok")
    assert loaded.chars == tok.chars
    assert list(loaded.encode([TINY])[0]) == list(tok.encode([TINY])[0])


def test_char_vocab_size_caps_the_alphabet():
    tok = train_tokenizer("char", [TINY], 10)
    assert tok.vocab_size == 10
    [ids] = tok.encode([TINY])
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    assert tok.unk_id in ids  # rarer characters fall out of the vocabulary
    # The most frequent character (a space) is kept.
    assert " " in tok.chars


# --- keras-hub trainers -----------------------------------------------------

# Smallest sizes that keras-hub's trainers accept on the tiny text: SentencePiece
# needs room for every character plus its meta pieces and refuses more pieces
# than the text yields (at most 58 here); WordPiece returns fewer words than
# asked when the text runs out (95 here).
KERAS_HUB_SIZES = {"wordpiece": 64, "sentencepiece": 50}


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_keras_hub_tokenizer_trains_saves_and_loads(kind, tmp_path):
    size = KERAS_HUB_SIZES[kind]
    tok = train_tokenizer(kind, [TINY], size)
    assert tok.kind == kind
    assert 8 <= tok.vocab_size <= size
    [ids] = tok.encode([TINY])
    assert ids.dtype == np.int32 and len(ids) > 0
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    assert 0 <= tok.eot_id < tok.vocab_size
    assert tok.eot_id not in ids  # EOT only ever comes from prepare's separators
    assert len(set(ids.tolist())) > 10  # the text is not all unknown tokens

    loaded = _saved_and_loaded(tok, tmp_path / "tok")
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    assert [list(x) for x in loaded.encode([TINY, b"def add"])] == \
           [list(x) for x in tok.encode([TINY, b"def add"])]
    # Decoding restores the words (spacing may differ: see tfdp/tokenizers.py).
    words = tok.decode(tok.encode([b"def add(a, b):"])[0]).replace(" ", "")
    assert words == "defadd(a,b):"


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    """Part of the default corpus (the stdlib's sources) and non-ASCII text."""
    files = recipes.source_files("stdlib")[:40]
    return [f.read_bytes() for f in files] + [
        "Grüße aus Köln — «ça va?» 東京タワー 🎉\tdouble  spaces,  trailing \n\n\r\n".encode()]


def test_lossless_tokenizers_round_trip_the_default_corpus(corpus, tmp_path):
    """detokenize(tokenize(text)) == text, after a save and load, for byte,
    bpe, and char with room for every character."""
    for kind, size in (("byte", None), ("bpe", 1000), ("char", 4096)):
        tok = _saved_and_loaded(train_tokenizer(kind, corpus, size), tmp_path / kind)
        for doc, ids in zip(corpus, tok.encode(corpus)):
            assert tok.eot_id not in ids
            assert tok.decode(ids) == doc.decode("utf-8"), (kind, doc[:60])


def test_bpe_learns_merges_that_compress(corpus, tmp_path):
    tok = train_tokenizer("bpe", corpus, 1000)
    assert tok.kind == "bpe" and tok.vocab_size == 1000
    ids = np.concatenate(tok.encode(corpus))
    assert 0 <= ids.min() and ids.max() < tok.vocab_size
    size = sum(len(doc) for doc in corpus)
    assert len(ids) < 0.45 * size, len(ids) / size  # Python source: < 0.45 tokens a byte
    loaded = _saved_and_loaded(tok, tmp_path / "bpe")
    assert (loaded.vocab_size, loaded.eot_id) == (tok.vocab_size, tok.eot_id)
    # The literal text of the EOT token is text, not EOT.
    assert tok.eot_id not in tok.encode([b"a<|endoftext|>b"])[0]


def test_bpe_vocab_must_hold_the_bytes_and_eot():
    with pytest.raises(UserError, match="--vocab_size=256 is too small for --tokenizer=bpe"):
        train_tokenizer("bpe", [TINY], 256)


def test_sentencepiece_too_large_vocab_is_a_user_error():
    with pytest.raises(UserError, match="--vocab_size"):
        train_tokenizer("sentencepiece", [TINY], 5000)


def test_load_tokenizer_without_meta_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


# --- prepare ----------------------------------------------------------------


def _shard_tokens(directory: Path, manifest: dict, split: str) -> np.ndarray:
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.load(directory / s["file"]) for s in shards])


def test_prepare_manifest_matches_shards_and_val_is_the_tail(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TINY)
    out = tmp_path / "prepared"
    manifest = prepare([corpus], str(out), "byte", None, 0.1, log=lambda *_: None)

    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["tokenizer"] == "byte" and manifest["vocab_size"] == 257
    assert manifest["eot_id"] == 256 and manifest["dtype"] == "uint16"
    tokens = {}
    for split in ("train", "val"):
        tokens[split] = _shard_tokens(out, manifest, split)
        assert tokens[split].dtype == np.uint16
        assert len(tokens[split]) == manifest["splits"][split]["tokens"]
        assert sum(s["tokens"] for s in manifest["splits"][split]["shards"]) == \
            len(tokens[split])
        assert tokens[split][-1] == 256  # each document ends with EOT
        assert manifest["splits"][split]["bytes"] == len(tokens[split]) - 1

    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"] == len(TINY)
    val_bytes = manifest["splits"]["val"]["bytes"]
    assert val_bytes >= round(0.1 * len(TINY)) - 4  # about 10%, moved to a char boundary
    tok = ByteTokenizer()
    val_text = tok.decode(tokens["val"][:-1])
    train_text = tok.decode(tokens["train"][:-1])
    assert TINY.decode("utf-8").endswith(val_text)
    assert train_text + val_text == TINY.decode("utf-8")
    assert load_tokenizer(str(out / "tokenizer")).kind == "byte"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tfdp-")]


def test_prepare_char_tokenizer_counts(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TINY)
    out = tmp_path / "prepared"
    manifest = prepare([corpus], str(out), "char", 64, 0.05, log=lambda *_: None)
    tok = load_tokenizer(str(out / "tokenizer"))
    # Trained on the train split only, which holds all 40-odd distinct characters.
    assert tok.vocab_size == manifest["vocab_size"] == len(set(tiny_text())) + 2
    total = 0
    for split in ("train", "val"):
        ids = _shard_tokens(out, manifest, split)
        assert len(ids) == manifest["splits"][split]["tokens"]
        total += len(ids) - 1
    assert total == len(tiny_text())  # one id per character, plus EOT per split


def test_prepare_split_spans_files_in_order(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"A" * 900)
    second.write_bytes(b"B" * 100)
    out = tmp_path / "prepared"
    manifest = prepare([first, second], str(out), "byte", None, 0.15, log=lambda *_: None)
    val = _shard_tokens(out, manifest, "val")
    # The tail is the last 50 bytes of a.txt, EOT, then all of b.txt, EOT.
    assert val.tolist() == [65] * 50 + [256] + [66] * 100 + [256]
    train = _shard_tokens(out, manifest, "train")
    assert train.tolist() == [65] * 850 + [256]


@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.1, 0.3, 0.5])
def test_split_never_cuts_a_multibyte_character(fraction):
    # 3-byte and 4-byte characters, so most cut points fall inside one.
    docs = [("東京🚀é" * 37).encode("utf-8"), ("ü€😀" * 11).encode("utf-8")]
    train, val = split_documents(docs, fraction)
    assert b"".join(train) + b"".join(val) == b"".join(docs)
    for part in train + val:
        part.decode("utf-8")  # raises if a character was cut
    val_bytes = sum(map(len, val))
    total = sum(map(len, docs))
    assert 0 < val_bytes <= total * fraction + 1
    assert val_bytes >= total * fraction - 4  # moved at most one character


def test_prepare_refuses_non_empty_output(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--output="):
        prepare([corpus], str(out), log=lambda *_: None)
    assert os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_prepare_into_existing_empty_output(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TINY)
    out = tmp_path / "out"
    out.mkdir()
    prepare([corpus], str(out), log=lambda *_: None)
    assert (out / MANIFEST).is_file()


# --- recipes.source_files ---------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """a.txt b.txt c.md sub/d.txt sub/deeper/e.txt .hidden.txt .git/x sub/.h"""
    root = tmp_path / "tree"
    for name in ["a.txt", "b.txt", "c.md", "sub/d.txt", "sub/deeper/e.txt",
                 ".hidden.txt", ".git/config", "sub/.secret"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return root


def test_source_files_directory_skips_hidden(tree):
    files = recipes.source_files(str(tree))
    assert [f.relative_to(tree).as_posix() for f in files] == \
        ["a.txt", "b.txt", "c.md", "sub/d.txt", "sub/deeper/e.txt"]


def test_source_files_glob(tree):
    files = recipes.source_files(str(tree / "*.txt"))
    assert [f.name for f in files] == ["a.txt", "b.txt"]  # sorted; hidden not matched
    recursive = recipes.source_files(str(tree / "**" / "*.txt"))
    assert sorted(f.name for f in recursive) == ["a.txt", "b.txt", "d.txt", "e.txt"]


def test_source_files_comma_list_keeps_order_and_dedupes(tree):
    spec = f"{tree / 'c.md'}, {tree / 'sub'},{tree / 'a.txt'},,{tree / 'c.md'}"
    files = recipes.source_files(spec)
    assert [f.name for f in files] == ["c.md", "d.txt", "e.txt", "a.txt"]


@pytest.mark.parametrize("spec, message", [
    ("{tree}/missing.txt", "does not exist"),
    ("{tree}/*.nothing", "no file matches"),
    ("{tree}/sub/deeper,{tree}/nope", "nope"),
    (" , ", "no files found"),
])
def test_source_files_errors(tree, spec, message):
    with pytest.raises(UserError, match=message):
        recipes.source_files(spec.format(tree=tree))


def test_source_files_empty_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".only_hidden").write_text("x")
    with pytest.raises(UserError, match="no files found"):
        recipes.source_files(str(tmp_path / "empty"))


def test_stdlib_corpus():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = recipes.source_files("stdlib")
    assert len(files) > 300
    assert files == sorted(files)
    relative = [f.relative_to(root) for f in files]
    assert {Path("os.py"), Path("json/decoder.py"), Path("dataclasses.py")} <= set(relative)
    assert all(f.suffix == ".py" for f in files)
    for f in relative:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(f.parts[:-1]), f
        assert not f.name.startswith("test_"), f
