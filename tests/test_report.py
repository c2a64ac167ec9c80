"""tfdp-report: the run report (report.html, loss.png, training.png) that
training writes at its end and tfdp-report rewrites on demand."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import run_cli, tiny_text
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.figures import loss_figure, training_figure
from tfdp.report import write_report
from tfdp.rundata import read_run_data, read_scalars
from tfdp.training import train
from test_training import TINY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(root, name, **overrides) -> tuple:
    text = root / "corpus.txt"
    if not text.exists():
        text.write_text(tiny_text(400), encoding="utf-8")
    lines = []
    cfg = {**TINY, "sample_tokens": 16, "report": True, **overrides}
    metrics = train(Config(data=str(text), model_dir=str(root / name), val_fraction=0.2, **cfg),
                    log=lines.append)
    return root / name, metrics, lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mirrored):
    """20 steps validated at 10 and 20, with a (short) sample."""
    return _train(tmp_path_factory.mktemp("report"), "run", train_steps=20, eval_every=10,
                  checkpoint_every=10)


def _lines(fig, label: str) -> list:
    """The (x, y) data of every line labelled `label` in a figure, axes in order."""
    return [(list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]


def _events_by_step(logdir, tag: str) -> dict[int, float]:
    """The scalar `tag` as TensorBoard's own reader sees it (independent of tfdp)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir),
                                             size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    import tensorflow as tf
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def test_training_writes_the_report(trained):
    run, _, lines = trained
    for name in ("report.html", "loss.png", "training.png"):
        assert (run / name).is_file(), name
    assert f"report: {run / 'report.html'}" in lines
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]  # no staged leftovers
    for name in ("loss.png", "training.png"):
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        from matplotlib import image
        pixels = image.imread(str(run / name))
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 800, pixels.shape
        assert pixels.std() > 0.05  # something was drawn, not a blank canvas


def test_the_plots_draw_the_runs_own_numbers(trained):
    """The figures' lines hold exactly the logged scalars: train loss every
    step, val loss at 10 and 20 (= metrics.json's history), tokens = step ×
    global batch × seq_len."""
    run, metrics, _ = trained
    data = read_run_data(str(run))
    train_events = _events_by_step(run / "tensorboard" / "train", "loss")
    val_events = _events_by_step(run / "tensorboard" / "val", "loss")
    assert sorted(train_events) == list(range(1, 21)) and sorted(val_events) == [10, 20]

    series = data.series
    assert series["train_loss"]["step"] == list(range(1, 21))
    assert series["train_loss"]["value"] == [train_events[s] for s in range(1, 21)]
    assert series["val_loss"]["step"] == [10, 20]
    assert series["val_loss"]["value"] == [val_events[10], val_events[20]]
    history = {h["step"]: h["val_loss"] for h in metrics["history"]}
    assert series["val_loss"]["value"] == pytest.approx([history[10], history[20]], rel=1e-6)
    assert series["val_loss"]["value"][-1] == pytest.approx(metrics["val_loss"], rel=1e-6)
    tokens_per_step = TINY["global_batch_size"] * TINY["seq_len"]
    assert series["val_loss"]["tokens"] == [10 * tokens_per_step, 20 * tokens_per_step]

    fig = loss_figure(data)
    by_step, by_tokens = _lines(fig, "train loss")
    assert by_step == (series["train_loss"]["step"], series["train_loss"]["value"])
    assert by_tokens == (series["train_loss"]["tokens"], series["train_loss"]["value"])
    assert _lines(fig, "validation loss") == [
        ([10, 20], series["val_loss"]["value"]),
        (series["val_loss"]["tokens"], series["val_loss"]["value"])]
    lr = _events_by_step(run / "tensorboard" / "train", "learning_rate")
    fig = training_figure(data)
    assert _lines(fig, "learning rate") == [(sorted(lr), [lr[s] for s in sorted(lr)])]
    assert len(_lines(fig, "tokens/s")[0][1]) == 20


def test_html_is_self_contained_and_complete(trained):
    run, metrics, _ = trained
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f"<td class=\"num\">{metrics['val_loss']:.4f}</td>" in page
    assert f"{metrics['val_perplexity']:.3f}" in page
    config = json.loads((run / "config.json").read_text())
    for key in config:
        assert f">{key}<" in page, key
    assert html.escape(str(run)) in page and "generated 20" in page
    sample = (run / "sample.txt").read_text(encoding="utf-8", errors="replace")
    assert sample.strip() and f"<pre>{html.escape(sample)}</pre>" in page
    # Nothing is fetched: both images inline, no remote or relative resources.
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page, re.I)
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I)
    assert "no curve to draw" not in page and "no validation yet" not in page


def test_a_single_validation_is_said_in_words(tmp_path, mirrored):
    run, _, _ = _train(tmp_path, "one", train_steps=5, eval_every=5, checkpoint_every=5,
                       sample_tokens=0)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "1 validation (step 5): no curve to draw" in page
    assert "the run generated no sample" in page
    assert read_run_data(str(run)).series["val_loss"]["step"] == [5]


def test_no_validation_and_no_steps_yet(trained, tmp_path):
    """A copy of the run without its validation (events and history), then
    without anything logged: the report still comes, and says what is missing."""
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    shutil.rmtree(run / "tensorboard" / "val")
    (run / "metrics.json").write_text(json.dumps({"step": 20, "history": []}))
    html_path, png_path = write_report(str(run))
    page = open(html_path, encoding="utf-8").read()
    assert "no validation yet" in page
    assert "training has not finished and has no validation yet" in page
    assert open(png_path, "rb").read(8) == PNG_MAGIC
    assert len(read_run_data(str(run)).series["train_loss"]["step"]) == 20

    # A run in progress: metrics.json holds the history so far, shown as such.
    first = json.loads((trained[0] / "metrics.json").read_text())["history"][0]
    (run / "metrics.json").write_text(json.dumps({"step": 10, "history": [first]}))
    page = open(write_report(str(run))[0], encoding="utf-8").read()
    assert "1 validation (step 10): no curve to draw" in page  # from the history
    assert "figures of the last validation (step 10)" in page
    assert f"{first['val_loss']:.4f}" in page

    shutil.rmtree(run / "tensorboard")
    for name in ("metrics.json", "sample.txt"):
        os.remove(run / name)
    html_path, png_path = write_report(str(run))
    page = open(html_path, encoding="utf-8").read()
    assert "no training steps logged yet" in page and "no validation yet" in page
    assert "no sample.txt yet" in page
    assert open(png_path, "rb").read(8) == PNG_MAGIC


def test_a_truncated_event_file_is_read_up_to_the_damage(trained, tmp_path):
    logdir = tmp_path / "train"
    shutil.copytree(trained[0] / "tensorboard" / "train", logdir)
    (path,) = logdir.iterdir()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 7])  # a crash mid-record
    loss = read_scalars(str(logdir))["loss"]
    assert 17 <= len(loss) <= 20 and loss.steps == list(range(1, len(loss) + 1))


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"holds no tfdp run \(no config.json\)"):
        write_report(str(tmp_path))
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    (run / "metrics.json").write_text('{"step": 3, "hist')
    with pytest.raises(UserError, match="cannot read .*metrics.json"):
        write_report(str(run))


def test_a_failing_report_does_not_fail_training(trained, tmp_path, monkeypatch):
    """Training that has finished warns in one line and returns its metrics."""
    import tfdp.training

    def broken(model_dir):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tfdp.training, "write_report", broken)
    run, _, lines = _train(tmp_path, "again", train_steps=2, eval_every=2,
                           checkpoint_every=2, sample_tokens=0)
    assert lines[-1] == ("warning: could not write the run report "
                         "(OSError: [Errno 28] No space left on device)")
    assert (run / "metrics.json").is_file() and not (run / "report.html").exists()


def test_cli(trained, tmp_path):
    bad = run_cli("tfdp-report", f"--model_dir={tmp_path}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"tfdp-report: error: --model_dir={tmp_path} holds no tfdp run (no config.json); "
        "point at a directory written by tfdp-train"]
    run = tmp_path / "copy"
    shutil.copytree(trained[0], run)
    os.remove(run / "report.html")
    done = run_cli("tfdp-report", f"--model_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"report: {run / 'report.html'}",
                                        f"loss curves: {run / 'loss.png'}"]
    assert (run / "report.html").is_file()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium to render with")
def test_the_page_renders_in_a_headless_browser(trained, tmp_path):
    """chromium draws the page offline: a screenshot with text, plots and tables."""
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1280,1600",
                    f"file://{trained[0] / 'report.html'}"],
                   capture_output=True, timeout=120, check=False)
    assert shot.read_bytes()[:8] == PNG_MAGIC
    from matplotlib import image
    pixels = image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    not_white = (pixels < 0.9).any(axis=-1).mean()
    colored = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean()  # the curves
    assert not_white > 0.03, not_white
    assert colored > 0.001, colored
