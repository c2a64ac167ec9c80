"""End to end through the installed console scripts:
tfdp-prepare -> tfdp-train -> tfdp-generate, then training on a text file
and resuming it.

Every CLI process pays several seconds of TensorFlow start-up, so one run
(module-scoped) serves most tests.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_cli, tiny_text

TINY_MODEL = ["--num_layers=1", "--num_heads=2", "--hidden_dim=32", "--intermediate_dim=64",
              "--seq_len=32", "--global_batch_size=8"]
TRAIN_FLAGS = TINY_MODEL + ["--train_steps=6", "--eval_every=3", "--checkpoint_every=3",
                            "--log_every=2", "--sample_tokens=20"]


def gpt2_parameters(vocab: int, seq_len: int, layers: int, hidden: int, inner: int) -> int:
    """Trainable parameters of keras-hub's GPT-2 with tied embeddings."""
    per_layer = (2 * hidden              # attention layer norm
                 + 4 * (hidden * hidden + hidden)  # q, k, v, output projections
                 + 2 * hidden            # feed-forward layer norm
                 + hidden * inner + inner + inner * hidden + hidden)
    return vocab * hidden + seq_len * hidden + layers * per_layer + 2 * hidden


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tfdp-prepare then tfdp-train (6 steps) on a ~10 KB corpus."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(tiny_text(200), encoding="utf-8")
    prepared, model_dir = root / "prepared", root / "M"
    prep = run_cli("tfdp-prepare", f"--input={corpus}", f"--output={prepared}")
    assert prep.returncode == 0, prep.stderr
    train = run_cli("tfdp-train", f"--data={prepared}", f"--model_dir={model_dir}", *TRAIN_FLAGS)
    assert train.returncode == 0, train.stdout + train.stderr
    return SimpleNamespace(root=root, corpus=corpus, prepared=prepared, model_dir=model_dir,
                           prep=prep, train=train)


@pytest.mark.slow
def test_prepare_writes_a_data_directory(run):
    assert "Traceback" not in run.prep.stderr
    assert f"wrote {run.prepared}" in run.prep.stdout
    manifest = json.loads((run.prepared / "manifest.json").read_text())
    assert manifest["tokenizer"] == "byte" and manifest["vocab_size"] == 257
    assert manifest["splits"]["train"]["tokens"] > manifest["splits"]["val"]["tokens"] > 0
    assert (run.prepared / "tokenizer" / "tokenizer.json").is_file()
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert (run.prepared / shard["file"]).is_file()


@pytest.mark.slow
def test_train_prints_model_dir_progress_and_validation(run):
    out = run.train.stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0] == f"model_dir: {run.model_dir}"
    progress = [line for line in lines if re.match(r"step \d+/6 ", line)]
    assert [line.split()[1] for line in progress] == ["2/6", "4/6", "6/6"]
    for line in progress:
        assert "tok/s" in line and "eta" in line and "loss" in line
    assert "validation at step 3" in out and "validation at step 6" in out
    assert "Traceback" not in run.train.stderr


@pytest.mark.slow
def test_train_writes_the_run_files(run):
    m = run.model_dir
    config = json.loads((m / "config.json").read_text())
    assert config["hidden_dim"] == 32 and config["seq_len"] == 32
    assert config["data"] == str(run.prepared)
    assert (m / "checkpoints" / "checkpoint").is_file()
    assert list((m / "checkpoints").glob("ckpt-6.index"))
    assert list((m / "checkpoints").glob("ckpt-3.index"))
    assert list((m / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((m / "tensorboard" / "val").glob("events.out.tfevents.*"))
    tokenizer = json.loads((m / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["kind"] == "byte"
    assert (m / "sample.txt").is_file()
    assert "--- generated continuation (" in run.train.stdout
    assert not (m / "data").exists()  # a prepared directory is used in place


@pytest.mark.slow
def test_metrics_json(run):
    metrics = json.loads((run.model_dir / "metrics.json").read_text())
    assert metrics["step"] == 6
    assert metrics["num_replicas"] == 2
    assert metrics["global_batch_size"] == 8 and metrics["seq_len"] == 32
    assert metrics["num_parameters"] == gpt2_parameters(257, 32, 1, 32, 64)
    for key in ("train_loss", "val_loss"):
        # Near log(257) = 5.55 after 6 warm-up steps from random weights.
        assert 3.0 < metrics[key] < 8.0, (key, metrics[key])
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    assert metrics["tokens_per_second"] > 0
    assert 0 < metrics["mfu"] < 1
    assert [h["step"] for h in metrics["history"]] == [3, 6]
    assert metrics["history"][-1]["val_loss"] == pytest.approx(metrics["val_loss"])


@pytest.mark.slow
def test_generate_is_deterministic_per_seed(run):
    prompt = "def add("
    args = ("tfdp-generate", f"--model_dir={run.model_dir}", f"--prompt={prompt}",
            "--max_length=20", "--seed=3")
    first, second = run_cli(*args), run_cli(*args)
    for proc in (first, second):
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout.startswith(prompt)
    assert first.stdout == second.stdout
    # At most 20 new bytes (each decodes to at most one character).
    assert len(first.stdout.rstrip("\n")) <= len(prompt) + 20


@pytest.mark.slow
def test_train_on_text_file_then_resume(tmp_path, text_file):
    model_dir = tmp_path / "M"
    args = ("tfdp-train", f"--data={text_file}", f"--model_dir={model_dir}", *TINY_MODEL,
            "--eval_every=3", "--checkpoint_every=3", "--log_every=1", "--sample_tokens=0",
            "--jit_compile=false")  # XLA compilation would double this test's time
    first = run_cli(*args, "--train_steps=3")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.splitlines()[0] == f"model_dir: {model_dir}"
    assert "tokenizing 1 file(s)" in first.stdout
    assert "resumed" not in first.stdout
    manifest = json.loads((model_dir / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"] == "byte"
    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"] == \
        text_file.stat().st_size
    assert json.loads((model_dir / "metrics.json").read_text())["step"] == 3
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".tfdp-")]

    second = run_cli(*args, "--train_steps=5")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from step 3" in second.stdout
    assert "tokenizing" not in second.stdout  # model_dir/data is reused
    assert "step 4/5" in second.stdout and "step 5/5" in second.stdout
    assert "step 1/5" not in second.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["step"] == 5
    assert [h["step"] for h in metrics["history"]] == [3, 5]  # history continues
    assert list((model_dir / "checkpoints").glob("ckpt-5.index"))
