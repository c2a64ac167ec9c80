"""--init_from: a fresh run starts from a keras-hub GPT-2 preset's weights,
tokenizes with its tokenizer, and a resumed run keeps its own checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import keras
import keras_hub
import numpy as np
import pytest

from conftest import run_cli, tiny_text
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.prepare import prepare
from tfdp.presets import resolve
from tfdp.restore import load_trained
from tfdp.training import train
from tfdp.tokenizers import ByteTokenizer, load_tokenizer, train_tokenizer
from test_training import TINY

SHAPE = dict(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64)
SAMPLES = ["def add(a, b):\n    return a + b\n", "café, naïve, 東京 — 🙂\n\n\t  x   y\n"]


def _backbone(vocabulary_size: int, max_sequence_length: int = 64):
    keras.utils.set_random_seed(99)  # not tfdp's seed: its own init would differ
    return keras_hub.models.GPT2Backbone(vocabulary_size=vocabulary_size,
                                         max_sequence_length=max_sequence_length, **SHAPE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("init_corpus") / "corpus.txt"
    path.write_text(tiny_text(400), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_preset(tmp_path_factory, corpus):
    """A preset as keras-hub writes it: a GPT2Backbone (context 64) and a
    GPT2Tokenizer with a tiny BPE vocabulary, no tfdp files."""
    bpe = train_tokenizer("bpe", [corpus.read_bytes()], 300)
    directory = tmp_path_factory.mktemp("gpt2_preset") / "preset"
    _backbone(bpe.vocab_size).save_to_preset(str(directory))
    vocab = bpe.layer.vocabulary
    keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=bpe.layer.merges) \
        .save_to_preset(str(directory))
    return directory


class Snapshot(keras.callbacks.Callback):
    """The backbone's weights when training begins (after init or restore)."""

    def on_train_begin(self, logs=None):
        self.weights = [np.array(w.numpy()) for w in self.model.backbone.weights]


def _config(corpus, run, **kw):
    return Config(data=str(corpus), model_dir=str(run), val_fraction=0.2, eval_every=2,
                  checkpoint_every=2, **{**TINY, **kw})


@pytest.mark.slow
def test_fresh_run_starts_from_the_preset_and_resume_keeps_its_checkpoint(
        gpt2_preset, corpus, tmp_path, mirrored):
    run = tmp_path / "run"
    first, lines = Snapshot(), []
    # TINY's shape equals the preset's; seq_len 32 < its context of 64.
    train(_config(corpus, run, init_from=str(gpt2_preset), train_steps=2),
          callbacks=[first], log=lines.append)
    preset = keras_hub.models.GPT2Backbone.from_preset(str(gpt2_preset))
    for got, want, w in zip(first.weights, preset.weights, preset.weights):
        want = np.asarray(want.numpy())
        if w.path.startswith("position_embedding/"):
            want = want[:TINY["seq_len"]]  # the first seq_len positions
        np.testing.assert_array_equal(got, want, err_msg=w.path)
    assert any(line.startswith("initialised from --init_from=") for line in lines)

    # The run tokenized with the preset's tokenizer and reads back as a bpe run.
    saved = json.loads((run / "config.json").read_text())
    assert saved["init_from"] == str(gpt2_preset) and saved["tokenizer"] == "bpe"
    hub = keras_hub.models.GPT2Tokenizer.from_preset(str(gpt2_preset))
    tokenizer = load_tokenizer(str(run / "tokenizer"))
    assert tokenizer.eot_id == hub.end_token_id
    for text in SAMPLES:
        assert tokenizer.encode([text.encode()])[0].tolist() == np.asarray(hub(text)).tolist()

    # Resuming (same flags, more steps) continues from step 2's checkpoint,
    # not from the preset.
    trained, _, _ = load_trained(str(run))
    second, lines = Snapshot(), []
    train(_config(corpus, run, init_from=str(gpt2_preset), train_steps=3),
          callbacks=[second], log=lines.append)
    assert any(line.startswith("resumed from step 2") for line in lines)
    assert not any(line.startswith("initialised from") for line in lines)
    for got, want in zip(second.weights, trained.backbone.weights):
        np.testing.assert_array_equal(got, want.numpy())
    assert not np.array_equal(second.weights[0], first.weights[0])


def test_tfdp_tokenizer_in_the_preset_and_a_smaller_vocabulary(corpus, tmp_path, mirrored):
    """A preset with tfdp's own tokenizer (as tfdp-export writes it) uses that
    one; an embedding with more rows than the tokenizer has ids keeps the
    first ones."""
    directory = tmp_path / "preset"
    _backbone(260).save_to_preset(str(directory))
    (directory / "tfdp_tokenizer").mkdir()
    ByteTokenizer().save(str(directory / "tfdp_tokenizer"))
    lines = []
    train(_config(corpus, tmp_path / "run", init_from=str(directory), train_steps=1,
                  tokenizer="byte"), log=lines.append)
    assert any("the first 257 are used" in line for line in lines), lines
    model, tokenizer, cfg = load_trained(str(tmp_path / "run"))
    assert tokenizer.kind == "byte" and model.backbone.vocabulary_size == 257


def test_shape_flags_and_bad_presets_are_refused(gpt2_preset, corpus, tmp_path):
    base = _config(corpus, tmp_path / "run", init_from=str(gpt2_preset))
    cfg, _ = resolve(Config(init_from=str(gpt2_preset)), explicit=set())
    assert (cfg.num_layers, cfg.hidden_dim, cfg.vocab_size, cfg.tokenizer) == (1, 32, 300, "bpe")
    assert cfg.seq_len == 64  # the default 128 is longer than the preset's context
    with pytest.raises(UserError, match=r"--num_layers=2 disagrees with --init_from=.*: the "
                                        r"preset has num_layers=1; omit --num_layers"):
        resolve(replace(base, num_layers=2), {"num_layers"})
    with pytest.raises(UserError, match=r"--seq_len=65 is longer than the context .*"
                                        r"max_sequence_length=64"):
        resolve(replace(base, seq_len=65), {"seq_len"})
    with pytest.raises(UserError, match="--vocab_size=400 disagrees .* tokenizer has "
                                        "300 ids; omit --vocab_size"):
        resolve(replace(base, vocab_size=400), {"vocab_size"})
    with pytest.raises(UserError, match="--tokenizer=char disagrees .* tokenizer is bpe"):
        resolve(replace(base, tokenizer="char"), {"tokenizer"})
    # Not a preset: a file, an empty directory, another model's config.
    (tmp_path / "file").write_text("x")
    for path, message in ((tmp_path / "file", "is not a directory"),
                          (tmp_path, r"is not a keras-hub preset \(no config.json\)")):
        with pytest.raises(UserError, match=message):
            resolve(Config(init_from=str(path)), set())
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"class_name": "BertBackbone",
                                                   "config": {}}))
    with pytest.raises(UserError, match="holds a BertBackbone, not a GPT2Backbone"):
        resolve(Config(init_from=str(other)), set())
    # A tokenizer with more ids than the embedding has rows.
    small = tmp_path / "small"
    _backbone(200).save_to_preset(str(small))
    with pytest.raises(UserError, match="the tokenizer has 257 ids, more than the 200 rows"):
        resolve(Config(init_from=str(small)), set())
    # Data prepared with another tokenizer than the preset's.
    prepared = tmp_path / "prepared"
    prepare([corpus], str(prepared), "byte", log=lambda *_: None)
    with pytest.raises(UserError, match="was tokenized with another tokenizer than"):
        train(_config(prepared, tmp_path / "run2", init_from=str(gpt2_preset), train_steps=1,
                      tokenizer="bpe", vocab_size=300), log=lambda *_: None)
    assert not (tmp_path / "run2" / "config.json").exists()


@pytest.mark.slow
def test_cli_names_the_flag_that_disagrees(gpt2_preset, tmp_path):
    """--num_layers=4 is tfdp's default, but given explicitly it disagrees
    with the preset: one line, exit 2, nothing written."""
    done = run_cli("tfdp-train", f"--init_from={gpt2_preset}", "--num_layers=4",
                   f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"tfdp-train: error: --num_layers=4 disagrees with --init_from={gpt2_preset}: the "
        "preset has num_layers=1; omit --num_layers (the preset fixes it)"]
    done = run_cli("tfdp-train", f"--init_from={tmp_path}", f"--model_dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "is not a keras-hub preset" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fine_tunes_from_a_preset(gpt2_preset, tmp_path):
    """tfdp-finetune --init_from: the preset's weights are the start (its
    whole context: the window may use all 64 positions), its tokenizer
    tokenizes the examples, and the output is a run of that tokenizer that
    the other commands read, recording where it started."""
    from tfdp.config import FinetuneConfig
    from tfdp.finetuning import finetune
    from tfdp.presets import same_tokenizer
    from tfdp.restore import load_pretrained

    rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i}"} for i in range(24)]
    data = tmp_path / "ex.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    start, lines = Snapshot(), []
    out = tmp_path / "out"
    fc = FinetuneConfig(model_dir=None, init_from=str(gpt2_preset), train=str(data),
                        eval=str(data), output_dir=str(out), task="completion", train_steps=2,
                        global_batch_size=4, score_examples=4, max_new_tokens=2,
                        strategy="one_device", jit_compile=False, report=False,
                        tensorboard_graph=False)
    metrics = finetune(fc, callbacks=[start], log=lines.append)
    preset = keras_hub.models.GPT2Backbone.from_preset(str(gpt2_preset))
    for got, want in zip(start.weights, preset.weights):
        np.testing.assert_array_equal(got, np.asarray(want.numpy()), err_msg=want.path)
    assert metrics["seq_len"] == 64 and metrics["step"] == 2
    assert metrics["pretrained_checkpoint"] == str(gpt2_preset)
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["init_from"] == str(gpt2_preset) and saved["model_dir"] is None
    model, tokenizer, cfg = load_trained(str(out))
    assert cfg.tokenizer == "bpe" and cfg.seq_len == 64
    assert same_tokenizer(tokenizer, load_pretrained(None, str(gpt2_preset)).tokenizer)

    # One starting point, and a preset must bring its tokenizer: one line
    # each, nothing written.
    with pytest.raises(UserError, match=r"^give one starting point: --model_dir=RUN"):
        finetune(replace(fc, model_dir=str(out), output_dir=str(tmp_path / "o2")))
    bare = tmp_path / "bare"
    _backbone(300).save_to_preset(str(bare))
    with pytest.raises(UserError, match=r"^--init_from=.*bare has no tokenizer .*save_to_preset"):
        finetune(replace(fc, init_from=str(bare), output_dir=str(tmp_path / "o3")))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())

    # A classifier from the preset reads back through load_finetuned.
    from tfdp.finetuning import load_finetuned, predict
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\n" + "".join(f"def f{i}(x): pass,{'ab'[i % 2]}\n"
                                                  for i in range(8)), encoding="utf-8")
    classifier_dir = tmp_path / "classifier"
    finetune(replace(fc, task="classification", train=str(labelled), eval=str(labelled),
                     output_dir=str(classifier_dir), train_steps=1))
    model, tokenizer, classes, seq_len = load_finetuned(str(classifier_dir))
    assert classes == ["a", "b"] and tokenizer.kind == "bpe"
    assert predict(model, tokenizer, ["def g(x): pass"], seq_len).shape == (1,)
