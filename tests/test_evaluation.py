"""tfdp-eval: a trained run scored over whole splits, data-parallel."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli, tiny_text
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.evaluation import evaluate
from tfdp.prepare import prepare
from tfdp.training import train
from test_training import TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mirrored):
    """A tiny run trained on text, validated on its whole val split."""
    root = tmp_path_factory.mktemp("eval")
    text = root / "corpus.txt"
    text.write_text(tiny_text(400), encoding="utf-8")
    run = root / "run"
    metrics = train(Config(data=str(text), model_dir=str(run), train_steps=20, eval_every=20,
                           checkpoint_every=20, val_fraction=0.2, **TINY), log=lambda *_: None)
    return run, text, metrics


def test_scores_the_runs_own_val_split_as_training_did(trained):
    """Without --data, the run's own val split; the same figure training
    reported at its last validation, the same digits on every call."""
    run, _, metrics = trained
    first, second = evaluate(str(run), log=lambda *_: None), evaluate(str(run), log=print)
    assert first == second  # reproducible to the last digit
    assert first["step"] == 20
    assert first["loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert first["bits_per_byte"] == pytest.approx(metrics["val_bits_per_byte"], rel=1e-6)
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))


def test_one_replica_agrees_with_two(trained):
    run, _, _ = trained
    two = evaluate(str(run), log=lambda *_: None)
    one = evaluate(str(run), strategy_name="one_device", log=lambda *_: None)
    assert one["windows"] == two["windows"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)


def test_text_is_tokenized_with_the_models_tokenizer(trained, tmp_path):
    run, _, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("print('hello, world')\n" * 200, encoding="utf-8")
    result = evaluate(str(run), str(other), log=lambda *_: None)
    # Byte tokens plus one EOT per document: tokens per byte just above 1.
    tokens_per_byte = (200 * 22 + 1) / (200 * 22)
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * tokens_per_byte / math.log(2), rel=1e-9)
    assert result["windows"] == (200 * 22 + 1 - 1) // TINY["seq_len"]


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    run, text, _ = trained
    other = tmp_path / "prepared"
    prepare([text], str(other), "char", log=lambda *_: None)
    with pytest.raises(UserError, match="prepared with another tokenizer than the model's"):
        evaluate(str(run), str(other), log=lambda *_: None)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(UserError, match="fewer than one window"):
        evaluate(str(run), str(short), log=lambda *_: None)
    with pytest.raises(UserError, match="not divisible by the 2 replicas"):
        evaluate(str(run), batch_size=3, log=lambda *_: None)
    with pytest.raises(UserError, match="holds no tfdp run"):
        evaluate(str(tmp_path), log=lambda *_: None)


def test_cli_prints_json_and_errors_in_one_line(trained, tmp_path):
    run, text, _ = trained
    done = run_cli("tfdp-eval", f"--model_dir={run}", f"--data={text}", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "windows", "tokens_scored"}
    bad = run_cli("tfdp-eval", f"--model_dir={tmp_path / 'nothing'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"tfdp-eval: error: --model_dir={tmp_path / 'nothing'} holds no tfdp run (no "
        "config.json); point at a directory written by tfdp-train"]
