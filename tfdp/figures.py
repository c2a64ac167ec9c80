"""The report's two figures (tfdp/report.py), drawn from a run's `RunData`
(tfdp/rundata.py) with matplotlib's object API and the Agg canvas, so no
display or pyplot state is needed:

    loss_figure      train and validation loss against step and tokens seen
    training_figure  the learning-rate schedule and throughput per step

Each returns the Figure, so tests can read back the lines it draws;
`png_bytes` renders one.
"""

from __future__ import annotations

import io

from tfdp.rundata import RunData, Series, validation_note

# Shared by both figures so that they line up on the page.
_FIGSIZE, _DPI = (11.0, 3.8), 110
_TRAIN_COLOR, _VAL_COLOR, _SMOOTH_COLOR = "#9ab8d8", "#d62728", "#1f4e8c"


def short_number(n: float) -> str:
    """`n` in three significant digits with a k, M or G suffix: 1.23M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


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
        by_tokens.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_number(x)))
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
        tps_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: short_number(y)))
        tps_ax.set_ylim(bottom=0)
        tps_ax.grid(alpha=0.3)
    else:
        _empty(tps_ax, "no training steps logged yet")
    lr_ax.set_title("learning-rate schedule")
    tps_ax.set_title("throughput (tokens/s)")
    return fig


def png_bytes(fig) -> bytes:
    """The figure as a PNG file's bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
