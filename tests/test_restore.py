"""Checkpoint readers (tfdp/restore.py: generate, eval, export, fine-tuning)
take the newest READABLE checkpoint, as resuming does, or end in one line.

One tiny run is trained per module (checkpoints at steps 2 and 4) and copied
twice: once with the newest checkpoint truncated as a crash mid-write
leaves it, once with both truncated.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_text
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.restore import load_run, load_trained, restore_weights
from tfdp.training import train
from test_training import TINY

FIX = "restore its files from a backup, or train again into a new --model_dir"


def _truncate(run: Path, step: int) -> None:
    paths = glob.glob(str(run / "checkpoints" / f"ckpt-{step}.data-*"))
    assert paths
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirrored):
    """(intact, newest checkpoint unreadable, none readable) copies of one run."""
    root = tmp_path_factory.mktemp("restore")
    text = root / "corpus.txt"
    text.write_text(tiny_text(400), encoding="utf-8")
    intact = root / "intact"
    train(Config(data=str(text), model_dir=str(intact), train_steps=4, eval_every=4,
                 checkpoint_every=2, val_fraction=0.2, **TINY), log=lambda *_: None)
    newest_bad, all_bad = root / "newest_bad", root / "all_bad"
    for copy, steps in ((newest_bad, [4]), (all_bad, [2, 4])):
        shutil.copytree(intact, copy)
        for step in steps:
            _truncate(copy, step)
    return intact, newest_bad, all_bad


def _weights_at(run: Path, step: int) -> list[np.ndarray]:
    cfg, tokenizer, _ = load_run(str(run))
    model = build_model(cfg, tokenizer.vocab_size)
    tf.train.Checkpoint(backbone=model.backbone).restore(
        str(run / "checkpoints" / f"ckpt-{step}")).expect_partial()
    return model.get_weights()


def test_load_trained_skips_an_unreadable_newest_checkpoint(runs, capsys):
    intact, newest_bad, _ = runs
    model, _, _ = load_trained(str(newest_bad))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: checkpoint {newest_bad}/checkpoints/ckpt-4 is "
                             "unreadable (")
    assert err[0].endswith("; trying the previous one")
    for got, want in zip(model.get_weights(), _weights_at(intact, 2), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(a, b) for a, b in zip(_weights_at(intact, 2),
                                                        _weights_at(intact, 4)))


def test_restore_weights_returns_the_checkpoint_it_read(runs):
    intact, newest_bad, _ = runs
    said = []
    for run, step in ((intact, 4), (newest_bad, 2)):
        cfg, tokenizer, _ = load_run(str(run))
        model = build_model(cfg, tokenizer.vocab_size)
        path = restore_weights(model, str(run), say=said.append)
        assert path == str(run / "checkpoints" / f"ckpt-{step}")
    assert len(said) == 1 and "ckpt-4 is unreadable" in said[0]


def test_none_readable_is_one_line(runs, tmp_path):
    _, _, all_bad = runs
    with pytest.raises(UserError) as err:
        load_trained(str(all_bad), say=lambda *_: None)
    assert str(err.value) == (f"no checkpoint in {all_bad}/checkpoints can be read "
                              f"(2 tried); {FIX}")
    # No checkpoint at all: said before the tokenizer or a model is built.
    shutil.copytree(all_bad, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(UserError, match=r"has no checkpoint yet; train longer"):
        load_trained(str(tmp_path / "run"))


def test_evaluate_with_no_readable_checkpoint_is_one_line(runs):
    """In-process (the CLI prints a UserError as one line; its generate twin
    below shows that end to end): eval gets as far as the restore."""
    from tfdp.evaluation import evaluate
    with pytest.raises(UserError) as err:
        evaluate(str(runs[2]), log=lambda *_: None)
    assert str(err.value) == (f"no checkpoint in {runs[2]}/checkpoints can be read "
                              f"(2 tried); {FIX}")


@pytest.fixture(scope="module")
def cli(runs):
    """tfdp-eval and tfdp-generate on the damaged copies, all at once (each
    pays several seconds of imports): {(command, copy): result}."""
    _, newest_bad, all_bad = runs
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    bin_dir = Path(sys.executable).parent
    commands = {("tfdp-eval", "newest_bad"): [str(bin_dir / "tfdp-eval"),
                                              f"--model_dir={newest_bad}"]}
    for run in (newest_bad, all_bad):
        commands["tfdp-generate", run.name] = [str(bin_dir / "tfdp-generate"),
                                               f"--model_dir={run}", "--prompt=def ",
                                               "--max_length=4"]
    procs = {key: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env) for key, argv in commands.items()}
    try:
        results = {}
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return results
    finally:
        for proc in procs.values():
            proc.kill()


@pytest.mark.slow  # three console scripts at once: 20-60 s on a busy 2-core machine
@pytest.mark.parametrize("command", ["tfdp-eval", "tfdp-generate"])
def test_cli_uses_the_previous_checkpoint_with_a_warning(cli, runs, command):
    done = cli[command, "newest_bad"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: checkpoint {runs[1]}/checkpoints/ckpt-4 is unreadable (" in done.stderr
    assert "warning" not in done.stdout  # stdout stays the command's own output
    if command == "tfdp-eval":
        assert "| checkpoint of step 2 |" in done.stdout, done.stdout
    else:
        assert done.stdout.startswith("def ")


@pytest.mark.slow
def test_cli_with_no_readable_checkpoint_is_one_line(cli, runs):
    command = "tfdp-generate"
    done = cli[command, "all_bad"]
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"{command}: error: no checkpoint in {runs[2]}/checkpoints can be "
                         f"read (2 tried); {FIX}")
    assert all(line.startswith("warning: checkpoint ") for line in lines[:-1]), lines
