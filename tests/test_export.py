"""tfdp-export: SavedModel and keras-hub preset serve the checkpoint's logits."""

from __future__ import annotations

import json
import shutil

import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli, tiny_text
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.export import TFDP_TOKENIZER_DIR, export
from tfdp.model import logits
from tfdp.restore import load_trained
from tfdp.training import train
from test_training import MIRRORED

# Text the tokenizers must agree on: non-ASCII letters, CJK, an emoji,
# runs of spaces, tabs and blank lines.
SAMPLES = ["def add(a, b):\n    return a + b\n",
           "café, naïve, 東京 — unicode 🙂\n\n\t  x   y\n",
           "plain words"]


def _train(root, tokenizer: str, steps: int, **extra):
    text = root / "corpus.txt"
    text.write_text(tiny_text(400), encoding="utf-8")
    run = root / "run"
    train(Config(data=str(text), model_dir=str(run), train_steps=steps, eval_every=steps,
                 checkpoint_every=steps, val_fraction=0.2, tokenizer=tokenizer, **extra,
                 **MIRRORED), log=lambda *_: None)
    return run


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, mirrored):
    """A tiny BPE run (trained under two replicas), 4 steps."""
    return _train(tmp_path_factory.mktemp("export_bpe"), "bpe", 4, vocab_size=300)


def _ids(cfg, batch=2, time=None):
    rng = np.random.default_rng(7)  # ids < 257: every tokenizer here has as many
    return tf.constant(rng.integers(0, 257, size=(batch, time or cfg.seq_len)), tf.int32)


def test_saved_model_serves_the_checkpoints_logits(bpe_run, tmp_path):
    out = export(str(bpe_run), str(tmp_path / "sm"), "saved_model", log=lambda *_: None)
    model, _, cfg = load_trained(str(bpe_run))
    serve = tf.saved_model.load(out).signatures["serve"]
    for time in (cfg.seq_len, 5):  # any time up to the context
        ids = _ids(cfg, time=time)
        got = serve(token_ids=ids)["logits"]
        assert got.dtype == tf.float32 and got.shape == (2, time, 300)
        np.testing.assert_allclose(got.numpy(), logits(model, ids).numpy(),
                                   rtol=1e-6, atol=1e-6)
    # tfdp's tokenizer travels with it.
    assert json.loads((tmp_path / "sm" / "tokenizer" / "tokenizer.json").read_text())[
        "kind"] == "bpe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no staging left


def test_preset_loads_in_keras_hub_with_the_same_logits_and_ids(bpe_run, tmp_path):
    out = export(str(bpe_run), str(tmp_path / "preset"), "preset", log=lambda *_: None)
    model, tokenizer, cfg = load_trained(str(bpe_run))
    lm = keras_hub.models.GPT2CausalLM.from_preset(out)
    ids = _ids(cfg)
    np.testing.assert_allclose(logits(lm, ids).numpy(), logits(model, ids).numpy(),
                               rtol=1e-6, atol=1e-6)
    backbone = keras_hub.models.GPT2Backbone.from_preset(out)
    assert backbone.max_sequence_length == cfg.seq_len
    assert lm.preprocessor.sequence_length == cfg.seq_len
    # The preset's GPT2Tokenizer, called eagerly, gives tfdp's own ids.
    hub_tokenizer = lm.preprocessor.tokenizer
    for text in SAMPLES:
        assert np.asarray(hub_tokenizer(text)).tolist() == \
            tokenizer.encode([text.encode("utf-8")])[0].tolist(), text
    assert hub_tokenizer.end_token_id == tokenizer.eot_id == 0
    # The one documented difference: GPT-2 reads the literal text as EOT.
    assert np.asarray(hub_tokenizer("<|endoftext|>")).tolist() == [0]
    assert len(tokenizer.encode([b"<|endoftext|>"])[0]) > 1
    assert (tmp_path / "preset" / TFDP_TOKENIZER_DIR / "merges.txt").is_file()
    lm.generate("def ", max_length=8)  # text in, text out


def test_a_bf16_run_exports_a_float32_preset(bpe_run, tmp_path):
    """keras-hub cannot load a preset saved with a mixed_bfloat16 policy, so
    the preset is float32; the SavedModel computes as the run did."""
    run = tmp_path / "run"
    shutil.copytree(bpe_run, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "mixed_precision": "bf16"}))
    lm = keras_hub.models.GPT2CausalLM.from_preset(
        export(str(run), str(tmp_path / "preset"), "preset", log=lambda *_: None))
    assert lm.backbone.dtype_policy.name == "float32"
    model, _, cfg = load_trained(str(bpe_run))  # the same weights in float32
    ids = _ids(cfg)
    np.testing.assert_allclose(logits(lm, ids).numpy(), logits(model, ids).numpy(),
                               rtol=1e-6, atol=1e-6)
    serve = tf.saved_model.load(export(str(run), str(tmp_path / "sm"), "saved_model",
                                       log=lambda *_: None)).signatures["serve"]
    got = serve(token_ids=ids)["logits"]
    assert got.dtype == tf.float32  # bf16 inside, within bf16's precision of float32
    np.testing.assert_allclose(got.numpy(), logits(model, ids).numpy(), atol=0.1)


def test_preset_of_a_byte_run_has_no_preprocessor(tmp_path_factory, tmp_path, mirrored):
    run = _train(tmp_path_factory.mktemp("export_byte"), "byte", 2)
    lines = []
    out = export(str(run), str(tmp_path / "preset"), "preset", log=lines.append)
    assert len(lines) == 1 and "has no preprocessor" in lines[0], lines
    model, _, cfg = load_trained(str(run))
    lm = keras_hub.models.GPT2CausalLM.from_preset(out)
    assert lm.preprocessor is None
    ids = _ids(cfg)
    np.testing.assert_allclose(logits(lm, ids).numpy(), logits(model, ids).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "preset" / TFDP_TOKENIZER_DIR / "tokenizer.json")
                      .read_text())["kind"] == "byte"


def _one_line_error(done, prog="tfdp-export"):
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


@pytest.mark.slow
def test_cli_writes_and_refuses_bad_outputs_in_one_line(bpe_run, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    done = run_cli("tfdp-export", f"--model_dir={bpe_run}", f"--output={parent / 'sm'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"exported saved_model to {parent / 'sm'}: ")
    assert sorted(p.name for p in parent.iterdir()) == ["sm"]

    # An existing non-empty output: refused, untouched.
    before = sorted(p.name for p in (parent / "sm").iterdir())
    line = _one_line_error(run_cli("tfdp-export", f"--model_dir={bpe_run}",
                                   f"--output={parent / 'sm'}", "--format=preset"))
    assert "exists and is not empty" in line
    assert sorted(p.name for p in (parent / "sm").iterdir()) == before

    # An output that is a file.
    (parent / "file").write_text("x")
    line = _one_line_error(run_cli("tfdp-export", f"--model_dir={bpe_run}",
                                   f"--output={parent / 'file'}"))
    assert "is a file" in line
    # A model_dir without a run: nothing is created, not even the missing parent.
    line = _one_line_error(run_cli("tfdp-export", f"--model_dir={tmp_path / 'nothing'}",
                                   f"--output={parent / 'new' / 'out'}"))
    assert "holds no tfdp run" in line
    assert sorted(p.name for p in parent.iterdir()) == ["file", "sm"]
    # An unknown format: absl's own enum check.
    done = run_cli("tfdp-export", f"--model_dir={bpe_run}", f"--output={parent / 'x'}",
                   "--format=onnx")
    assert done.returncode == 1 and "value should be one of <saved_model|preset>" in done.stderr
    assert sorted(p.name for p in parent.iterdir()) == ["file", "sm"]


def test_a_run_without_checkpoint_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(Config().to_json())
    with pytest.raises(UserError, match="has no checkpoint yet"):
        export(str(tmp_path / "run"), str(tmp_path / "out"), "saved_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
