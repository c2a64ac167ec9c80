"""A run report: loss curves and a self-contained HTML page in model_dir.

`write_report(model_dir)` reads what a run wrote (tfdp/rundata.py), draws
the figures (tfdp/figures.py) and writes, each through tfdp/atomic.py's
temporary name and rename:

    loss.png       train and validation loss against step and against tokens seen
    training.png   the learning-rate schedule and throughput (tokens/s) per step
    report.html    both plots embedded as data: URIs, the resolved config, the
                   final metrics, the validation history and the sample; inline
                   CSS only, nothing fetched, so it opens offline

It works on a run in progress too (metrics.json then holds only the
validation history so far), and on one with a single validation or none,
or no logged step yet: the page then says so instead of drawing a curve.
This module renders the page (`render_html`) and its numbers
(`format_metric`).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os

from tfdp.atomic import write_bytes
from tfdp.figures import loss_figure, png_bytes, short_number, training_figure
from tfdp.rundata import RunData, read_run_data, training_note, validation_note

# The final-metrics table: metrics.json's keys in this order, then any others.
_METRIC_ORDER = (
    "step", "train_loss", "val_loss", "val_perplexity", "val_bits_per_byte",
    "tokens_per_second", "tokens_per_second_per_replica", "step_time", "mfu",
    "peak_host_memory_gib", "peak_device_memory_gib", "num_parameters", "num_replicas",
    "global_batch_size", "seq_len", "tokenizer", "vocab_size", "flops_per_token",
    "peak_flops",
)


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
                f"{short_number(step * run.tokens_per_step) if isinstance(step, int) else '?'} "
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


def write_report(model_dir: str) -> tuple[str, str]:
    """Write loss.png, training.png and report.html into model_dir; return
    (report.html's path, loss.png's path)."""
    run = read_run_data(model_dir)
    loss_png, training_png = png_bytes(loss_figure(run)), png_bytes(training_figure(run))
    paths = {name: os.path.join(run.model_dir, name)
             for name in ("loss.png", "training.png", "report.html")}
    write_bytes(paths["loss.png"], loss_png)
    write_bytes(paths["training.png"], training_png)
    write_bytes(paths["report.html"], render_html(run, loss_png, training_png).encode("utf-8"))
    return paths["report.html"], paths["loss.png"]
