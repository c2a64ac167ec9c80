"""A run report: loss curves and a self-contained HTML page in model_dir.

`write_report(model_dir)` reads what a run wrote (config.json, metrics.json,
sample.txt, the TensorBoard scalars under tensorboard/train and
tensorboard/val) and writes, each through a temporary name and a rename:

    loss.png       train and validation loss against step and against tokens seen
    training.png   the learning-rate schedule and throughput (tokens/s) per step
    report.html    both plots embedded as data: URIs, the resolved config, the
                   final metrics, the validation history and the sample; inline
                   CSS only, nothing fetched, so it opens offline

It works on a run in progress too (metrics.json then holds only the
validation history so far), and on one with a single validation or none,
or no logged step yet: the page then says so instead of drawing a curve.

`load_run(model_dir)` returns what the report is drawn from (`RunData`,
its `series` holding every plotted curve as step -> value lists), and
`loss_figure` / `training_figure` return the matplotlib figures, so tests
can check the numbers behind the pictures.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import glob
import html
import io
import json
import math
import os
import tempfile

from tfdp.errors import UserError

# The final-metrics table: metrics.json's keys in this order, then any others.
_METRIC_ORDER = (
    "step", "train_loss", "val_loss", "val_perplexity", "val_bits_per_byte",
    "tokens_per_second", "tokens_per_second_per_replica", "step_time", "mfu",
    "peak_host_memory_gib", "peak_device_memory_gib", "num_parameters", "num_replicas",
    "global_batch_size", "seq_len", "tokenizer", "vocab_size", "flops_per_token",
    "peak_flops",
)

# Shared by both figures so that they line up on the page.
_FIGSIZE, _DPI = (11.0, 3.8), 110
_TRAIN_COLOR, _VAL_COLOR, _SMOOTH_COLOR = "#9ab8d8", "#d62728", "#1f4e8c"


@dataclasses.dataclass
class Series:
    """One scalar over training steps, in step order, each step once."""

    steps: list[int]
    values: list[float]

    def __len__(self) -> int:
        return len(self.steps)


@dataclasses.dataclass
class RunData:
    """Everything the report shows, read from one model_dir."""

    model_dir: str
    config: dict
    metrics: dict
    sample: str | None
    # "train/<tag>" and "val/<tag>" for every scalar tag in the event files,
    # e.g. "train/loss", "train/learning_rate", "val/loss".
    scalars: dict[str, Series]

    @property
    def tokens_per_step(self) -> int:
        """Target tokens of one global batch: global_batch_size × seq_len."""
        return int(self.config.get("global_batch_size", 0)) * int(self.config.get("seq_len", 0))

    @property
    def train_loss(self) -> Series:
        return self.scalars.get("train/loss", Series([], []))

    @property
    def val_loss(self) -> Series:
        """Validation loss per evaluated step: the val event files, or where
        those are missing metrics.json's history (the same evaluations)."""
        if len(self.scalars.get("val/loss", Series([], []))):
            return self.scalars["val/loss"]
        points = {int(h["step"]): float(h["val_loss"])
                  for h in self.metrics.get("history", [])
                  if isinstance(h, dict) and "step" in h and "val_loss" in h}
        return Series(sorted(points), [points[s] for s in sorted(points)])

    @property
    def series(self) -> dict[str, dict[str, list]]:
        """The curves the plots draw, as x/y lists (tokens = step × tokens per step)."""
        out = {}
        for name, s in (("train_loss", self.train_loss), ("val_loss", self.val_loss),
                        ("learning_rate", self.scalars.get("train/learning_rate")),
                        ("tokens_per_second", self.scalars.get("train/tokens_per_second"))):
            s = s or Series([], [])
            out[name] = {"step": list(s.steps), "value": list(s.values),
                         "tokens": [step * self.tokens_per_step for step in s.steps]}
        return out


# ---------------------------------------------------------------- reading


def load_run(model_dir: str) -> RunData:
    """Read a run's outputs; UserError when model_dir is not a readable tfdp run."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    if not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} does not exist; point at a directory "
                        "written by tfdp-train")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"--model_dir={model_dir} holds no tfdp run (no config.json); "
                        "point at a directory written by tfdp-train")
    config = _read_object(config_path)
    metrics_path = os.path.join(model_dir, "metrics.json")
    # No metrics.json yet: a run that has not reached its first validation.
    metrics = _read_object(metrics_path) if os.path.exists(metrics_path) else {}
    try:
        with open(os.path.join(model_dir, "sample.txt"), encoding="utf-8",
                  errors="replace") as f:
            sample = f.read()
    except FileNotFoundError:
        sample = None
    scalars = {}
    for split in ("train", "val"):
        for tag, series in read_scalars(os.path.join(model_dir, "tensorboard", split)).items():
            scalars[f"{split}/{tag}"] = series
    return RunData(model_dir, config, metrics, sample, scalars)


def _read_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); is it a file tfdp-train wrote?") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path}: it holds JSON, but not an object; "
                        "is it a file tfdp-train wrote?")
    return value


def read_scalars(logdir: str) -> dict[str, Series]:
    """Every scalar in the event files of `logdir`, by tag.

    Files are read in name order (their names start with the creation
    time), so where two files log the same step, as after a resume, the
    later file wins. A record cut short by a crash ends its file quietly.
    """
    points: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in _read_events(path):
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    points.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: Series(sorted(by_step), [by_step[s] for s in sorted(by_step)])
            for tag, by_step in points.items()}


def _read_events(path: str) -> list:
    """The events of one file. Records are fetched in batches, ten times
    faster than one by one (a long run logs ~10 scalars per step); a
    truncated file is re-read one record at a time up to the damage."""
    import tensorflow as tf

    from tfdp.callbacks import _events

    try:
        return [tf.compat.v1.Event.FromString(record)
                for batch in tf.data.TFRecordDataset(path).batch(4096)
                for record in batch.numpy()]
    except tf.errors.DataLossError:
        return list(_events(path))


_NUMPY_DTYPES: dict[int, object] = {}


def _scalar(value) -> float | None:
    """The number in one summary value: a TF2 scalar tensor or a TF1 simple_value."""
    import numpy as np
    import tensorflow as tf

    if not value.HasField("tensor"):
        return float(value.simple_value) if value.HasField("simple_value") else None
    tensor = value.tensor
    if tensor.tensor_shape.dim:  # not a scalar (histograms, images, ...)
        return None
    if tensor.tensor_content:
        dtype = _NUMPY_DTYPES.get(tensor.dtype)
        if dtype is None:
            dtype = _NUMPY_DTYPES[tensor.dtype] = tf.dtypes.as_dtype(tensor.dtype).as_numpy_dtype
        return float(np.frombuffer(tensor.tensor_content, dtype)[0])
    for field in ("float_val", "double_val", "int64_val", "int_val"):
        if getattr(tensor, field):
            return float(getattr(tensor, field)[0])
    return None


# ---------------------------------------------------------------- words


def validation_note(run: RunData) -> str | None:
    """A sentence when there is no validation curve to draw, else None."""
    val = run.val_loss
    if not len(val):
        return "no validation yet"
    if len(val) == 1:
        return f"1 validation (step {val.steps[0]}): no curve to draw"
    return None


def training_note(run: RunData) -> str | None:
    return None if len(run.train_loss) else "no training steps logged yet"


def format_metric(name: str, value) -> str:
    """How the final-metrics table shows `value`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if name in ("train_loss", "val_loss", "val_bits_per_byte"):
        return f"{value:.4f}"
    if name == "val_perplexity":
        return f"{value:.3f}"
    if name == "mfu":
        return f"{100 * value:.2f}%"
    if name == "step_time":
        return f"{1000 * value:.1f} ms"
    if name.endswith("_gib"):
        return f"{value:.2f} GiB"
    if name == "peak_flops":
        return f"{value / 1e9:,.1f} GFLOP/s"
    if name.startswith("tokens_per_second"):
        return f"{value:,.0f}"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.6g}"


def _tokens(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


# ---------------------------------------------------------------- figures


def _smooth(values: list[float], window: int) -> list[float]:
    """A centred moving average over `window` points (fewer at the ends),
    so the smoothed curve does not lag behind the raw one; prefix sums keep
    it linear in the number of steps."""
    half, prefix = window // 2, [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(i - half, 0), min(i + half + 1, len(values))
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes,
            fontsize=12, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_figure(run: RunData):
    """Train and validation loss, against step (left) and tokens seen (right).

    The raw per-step train loss is drawn as "train loss"; a smoothed copy
    (labelled so) is added once there are enough steps for noise to hide
    the trend. Validation is drawn with markers, so a single one shows.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    by_step, by_tokens = fig.subplots(1, 2)
    train, val = run.train_loss, run.val_loss
    per_step = run.tokens_per_step
    for ax, scale, xlabel in ((by_step, 1, "step"),
                              (by_tokens, per_step, "tokens seen (step × batch × seq_len)")):
        if not len(train) and not len(val):
            _empty(ax, "no training steps logged yet")
            continue
        if len(train):
            ax.plot([s * scale for s in train.steps], train.values, color=_TRAIN_COLOR,
                    linewidth=1, label="train loss")
            if len(train) >= 50:
                ax.plot([s * scale for s in train.steps],
                        _smooth(train.values, max(len(train) // 25, 5)), color=_SMOOTH_COLOR,
                        linewidth=1.5, label="train loss (smoothed)")
        if len(val):
            ax.plot([s * scale for s in val.steps], val.values, color=_VAL_COLOR, marker="o",
                    markersize=4, linewidth=1.5, label="validation loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=9)
        note = validation_note(run)
        if note and len(train):
            ax.text(0.02, 0.04, note, transform=ax.transAxes, fontsize=9, color="#555555")
    if per_step:
        by_tokens.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens(x)))
    by_step.set_title("loss by step")
    by_tokens.set_title("loss by tokens seen")
    return fig


def training_figure(run: RunData):
    """The learning-rate schedule (left) and throughput in tokens/s (right), by step."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    lr_ax, tps_ax = fig.subplots(1, 2)
    lr = run.scalars.get("train/learning_rate", Series([], []))
    tps = run.scalars.get("train/tokens_per_second", Series([], []))
    if len(lr):
        lr_ax.plot(lr.steps, lr.values, color="#2ca02c", label="learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.set_xlabel("step")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
    else:
        _empty(lr_ax, "no training steps logged yet")
    if len(tps):
        tps_ax.plot(tps.steps, tps.values, color="#ff7f0e", linewidth=1, label="tokens/s")
        tps_ax.set_xlabel("step")
        tps_ax.set_ylabel("tokens/s (all replicas)")
        tps_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _tokens(y)))
        tps_ax.set_ylim(bottom=0)
        tps_ax.grid(alpha=0.3)
    else:
        _empty(tps_ax, "no training steps logged yet")
    lr_ax.set_title("learning-rate schedule")
    tps_ax.set_title("throughput (tokens/s)")
    return fig


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1240px; padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.95em; }
.meta code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; word-break: break-all; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 6px 10px; margin: 8px 0; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.key { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
td.val { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
.columns { columns: 2 460px; column-gap: 32px; }
.columns table { width: 100%; }
.columns tr { break-inside: avoid; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 10px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-all; font-size: 0.9em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _final_rows(run: RunData) -> tuple[list[tuple[str, object]], str | None]:
    """(name, value) rows of the final-metrics table and a note on where they come from."""
    metrics = {k: v for k, v in run.metrics.items() if k != "history"}
    note = None
    if "val_loss" not in metrics:  # a run in progress: only the history so far
        history = [h for h in run.metrics.get("history", []) if isinstance(h, dict)]
        if history:
            last = history[-1]
            note = (f"training has not finished: the figures of the last validation "
                    f"(step {last.get('step')})")
            metrics = {k: last[k] for k in _METRIC_ORDER if k in last}
            metrics.setdefault("step", last.get("step"))
        else:
            note = ("training has not finished and has no validation yet: "
                    "metrics.json holds no figures")
            metrics = {}
    order = [k for k in _METRIC_ORDER if k in metrics] + sorted(
        k for k in metrics if k not in _METRIC_ORDER)
    return [(k, metrics[k]) for k in order], note


def _history_table(run: RunData) -> str:
    history = [h for h in run.metrics.get("history", []) if isinstance(h, dict)]
    if not history:
        return ""
    columns = [c for c in ("step", "train_loss", "val_loss", "val_perplexity",
                           "val_bits_per_byte") if any(c in h for h in history)]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(format_metric(c, h[c]) if c in h else "")}</td>'
        for c in columns) + "</tr>" for h in history)
    return f"<h2>Validation history</h2>\n<table><tr>{head}</tr>{body}</table>"


def _config_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def render_html(run: RunData, loss_png: bytes, training_png: bytes,
                generated: datetime.datetime | None = None) -> str:
    """The report page: self-contained, the images inline as base64 data: URIs."""
    generated = generated or datetime.datetime.now(datetime.timezone.utc)
    cfg, metrics = run.config, run.metrics
    # metrics.json's step is the last validation's while training runs on;
    # the train events may already be further.
    step = max([metrics["step"]] if isinstance(metrics.get("step"), int) else [],
               default=0)
    step = max(step, run.train_loss.steps[-1] if len(run.train_loss) else 0)
    total = cfg.get("train_steps")
    state = ("finished" if "val_loss" in metrics and total is not None and step >= total
             else "in progress or stopped early")
    val = run.val_loss
    summary = (f"step {step:,} of {total:,} ({state}); " if isinstance(step, int)
               and isinstance(total, int) else f"step {step}; ")
    summary += (f"{len(run.train_loss):,} training steps logged, "
                f"{len(val)} validation{'s' if len(val) != 1 else ''}; "
                f"{_tokens(step * run.tokens_per_step) if isinstance(step, int) else '?'} "
                f"tokens seen")
    notes = [n for n in (training_note(run), validation_note(run)) if n]
    rows, final_note = _final_rows(run)
    final = "".join(f'<tr><td class="key">{_e(k)}</td><td class="num">'
                    f"{_e(format_metric(k, v))}</td></tr>" for k, v in rows)
    config_rows = "".join(f'<tr><td class="key">{_e(k)}</td><td class="val">'
                          f"{_e(_config_value(cfg[k]))}</td></tr>" for k in sorted(cfg))
    if run.sample is None:
        sample = "<p>no sample.txt yet (it is written when training ends)</p>"
    elif not run.sample.strip():
        sample = "<p>the run generated no sample (--sample_tokens=0)</p>"
    else:
        sample = f"<pre>{_e(run.sample)}</pre>"

    def image(png: bytes, alt: str) -> str:
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'

    name = os.path.basename(run.model_dir.rstrip(os.sep)) or run.model_dir
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tfdp run report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tfdp run report: {_e(name)}</h1>",
        f'<p class="meta">model_dir <code>{_e(run.model_dir)}</code><br>'
        f"generated {_e(generated.isoformat(timespec='seconds'))}<br>{_e(summary)}</p>",
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
        "<h2>Loss</h2>",
        image(loss_png, "train and validation loss by step and by tokens seen"),
        "<h2>Learning rate and throughput</h2>",
        image(training_png, "learning-rate schedule and tokens per second by step"),
        "<p class=\"meta\">Throughput is each step's tokens/s over the recent steps' mean "
        "time, as the progress line prints it; the first step includes compiling.</p>",
        "<h2>Final metrics</h2>",
        f'<p class="note">{_e(final_note)}</p>' if final_note else "",
        f"<table><tr><th>metric</th><th>value</th></tr>{final}</table>" if rows else "",
        _history_table(run),
        "<h2>Sample</h2>",
        sample,
        f"<h2>Configuration ({len(cfg)} fields of config.json)</h2>",
        f'<div class="columns"><table><tr><th>field</th><th>value</th></tr>'
        f"{config_rows}</table></div>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- writing


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over
    `path`: a reader sees the old file or the new one, never half of one."""
    fd, staged = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                  dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staged, path)
    except BaseException:
        try:
            os.unlink(staged)
        except FileNotFoundError:
            pass
        raise


def write_report(model_dir: str) -> tuple[str, str]:
    """Write loss.png, training.png and report.html into model_dir; return
    (report.html's path, loss.png's path)."""
    run = load_run(model_dir)
    loss_png, training_png = _png(loss_figure(run)), _png(training_figure(run))
    paths = {name: os.path.join(run.model_dir, name)
             for name in ("loss.png", "training.png", "report.html")}
    _write_atomically(paths["loss.png"], loss_png)
    _write_atomically(paths["training.png"], training_png)
    _write_atomically(paths["report.html"],
                      render_html(run, loss_png, training_png).encode("utf-8"))
    return paths["report.html"], paths["loss.png"]
