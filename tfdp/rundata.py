"""What a run wrote, read back for its report (tfdp/report.py).

`read_run_data(model_dir)` reads config.json, metrics.json, sample.txt and
the TensorBoard scalars under tensorboard/train and tensorboard/val into a
`RunData`, whose `series` holds every plotted curve as step -> value
lists, so that tests can check the numbers behind the pictures. Missing
pieces (a run in progress, no validation yet) are empty, not errors; a
directory that is not a tfdp run, or a file that is not JSON, is a
UserError. (tfdp/restore.py's `load_run` is the other reading of a run:
its config, tokenizer and checkpoint, for a model.)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from tfdp.errors import UserError


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


def read_run_data(model_dir: str) -> RunData:
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


# ---------------------------------------------------------------- what is missing


def validation_note(run: RunData) -> str | None:
    """A sentence when there is no validation curve to draw, else None."""
    val = run.val_loss
    if not len(val):
        return "no validation yet"
    if len(val) == 1:
        return f"1 validation (step {val.steps[0]}): no curve to draw"
    return None


def training_note(run: RunData) -> str | None:
    """A sentence when no training step is logged yet, else None."""
    return None if len(run.train_loss) else "no training steps logged yet"
