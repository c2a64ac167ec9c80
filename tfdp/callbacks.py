"""tfdp's own Keras callbacks: console progress and TensorBoard summaries.

The Runner (tfdp/runner.py) calls every callback (these and any the user
passes) through `keras.callbacks.CallbackList` with the usual hooks. Its
conventions: `on_train_batch_end(batch, logs)` gets the 0-based global step
index, so step `batch + 1` has just completed; an "epoch" is the span of
`eval_every` steps that ends with a validation, and `on_epoch_end` logs
carry both the train metrics and the task's evaluation metrics under its
prefix (`val_loss`, `val_perplexity`, `val_bits_per_byte` for language
modelling; `eval_loss`, `eval_accuracy` for classification).
"""

from __future__ import annotations

import glob
import os
import shutil
import time

import keras
import tensorflow as tf


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# Evaluation metrics on the console: their names and order (Keras does not
# keep the order of the logs it passes on).
_LABELS = {"bits_per_byte": "bits/byte"}
_ORDER = {"loss": 0, "perplexity": 1, "bits_per_byte": 2, "accuracy": 3}


class ProgressLogger(keras.callbacks.Callback):
    """Console progress on the chief.

    Plain (a log file, CI, a pipe): `step N/T | loss | lr | tok/s (per
    replica) | ms/step | mfu | mem (peak resident) | eta` every `every`
    steps and at the last, and a line per validation.

    Live (`live` is a terminal stream): one status line redrawn in place at
    most ten times a second — a bar, step/total, loss, the last val loss,
    tok/s, MFU, ETA — with validations, the `every`-step lines and other
    messages (`say`) printed above it, so the scrollback keeps the history.
    """

    REDRAW_SECONDS = 0.1

    def __init__(self, total_steps: int, every: int, print_fn=print, live=None,
                 prefix: str = "val_"):
        super().__init__()
        self.total_steps, self.every, self.print_fn = total_steps, every, print_fn
        self.prefix = prefix  # of the evaluation metrics in on_epoch_end's logs
        self.live = live
        self.step, self.val_loss, self.logs = 0, None, {}
        self._drawn, self._last_draw = "", 0.0

    def say(self, *parts) -> None:
        """Print a message line (above the live status line, if any)."""
        self._clear()
        self.print_fn(" ".join(str(p) for p in parts))
        self._draw()

    def on_train_batch_end(self, batch, logs=None):
        self.step, self.logs = batch + 1, logs or {}
        if self.step % self.every == 0 or self.step == self.total_steps:
            self.say(self._line(self.logs))
        elif self.live is not None and \
                time.monotonic() - self._last_draw >= self.REDRAW_SECONDS:
            self._draw()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.prefix + "loss" in logs:
            self.val_loss = logs[self.prefix + "loss"]
            metrics = {k[len(self.prefix):]: v for k, v in logs.items()
                       if k.startswith(self.prefix)}
            names = sorted(metrics, key=lambda m: (_ORDER.get(m, len(_ORDER)), m))
            shown = [f"{_LABELS.get(m, m)} {metrics[m]:.{3 if m == 'perplexity' else 4}f}"
                     for m in names]
            self.say(" | ".join([f"validation at step {self.step}", *shown]))

    def on_train_end(self, logs=None):
        self._clear()  # the last step's plain line is already above
        self.live = None  # what is printed after training needs no bar

    def _line(self, logs: dict) -> str:
        return (f"step {self.step}/{self.total_steps} | loss {logs['loss']:.4f} | "
                f"lr {logs['learning_rate']:.2e} | {logs['tokens_per_second']:,.0f} tok/s "
                f"({logs['tokens_per_second_per_replica']:,.0f}/replica) | "
                f"{1000 * logs['step_time']:.0f} ms/step | "
                f"mfu {100 * logs['mfu']:.2f}% | mem {logs['peak_host_memory_gib']:.2f} GiB"
                + (f" (GPU {logs['peak_device_memory_gib']:.2f} GiB)"
                   if "peak_device_memory_gib" in logs else "") + " | "
                f"eta {_duration(logs['eta_seconds'])}")

    def status(self) -> str:
        """The live line: ASCII only, so any terminal encoding takes it."""
        logs, width = self.logs, 20
        done = int(width * self.step / max(self.total_steps, 1))
        val = f"{self.val_loss:.4f}" if self.val_loss is not None else "-"
        return (f"[{'#' * done}{'-' * (width - done)}] {self.step}/{self.total_steps} | "
                f"loss {logs['loss']:.4f} | val {val} | "
                f"{logs['tokens_per_second']:,.0f} tok/s | mfu {100 * logs['mfu']:.1f}% | "
                f"eta {_duration(logs['eta_seconds'])}")

    def _draw(self) -> None:
        if self.live is None or not self.logs:
            return
        columns = shutil.get_terminal_size((100, 24)).columns
        self._drawn = self.status()[:max(columns - 1, 10)]
        self.live.write("\r" + self._drawn)
        self.live.flush()
        self._last_draw = time.monotonic()

    def _clear(self) -> None:
        if self.live is not None and self._drawn:
            self.live.write("\r" + " " * len(self._drawn) + "\r")
            self.live.flush()
            self._drawn = ""


class TensorBoardSummaries(keras.callbacks.Callback):
    """TensorBoard logs under `logdir/train` and `logdir/val`, by training step.

    Scalars: every numeric log of every step (train: loss, learning_rate,
    grad_norm, tokens_per_second, mfu, step_time, ...) and of every
    validation (val: loss, perplexity, bits_per_byte). Text: the resolved
    config at the first step of each (re)start, and `sample_fn(model)`'s
    generated sample at each validation. Graph: `graph_fn()`'s, once, on a
    run's first start, under `logdir/graph`.

    A run resumed at `start_step` first drops what an interrupted run logged
    after the checkpoint it resumes from: those steps are trained again, and
    TensorBoard would otherwise show them twice.
    """

    def __init__(self, logdir: str, start_step: int = 0, config_json: str | None = None,
                 sample_fn=None, graph_fn=None, prefix: str = "val_"):
        super().__init__()
        for split in ("train", "val"):
            drop_events_after(os.path.join(logdir, split), start_step)
        self.train_writer = tf.summary.create_file_writer(os.path.join(logdir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(logdir, "val"))
        self.logdir, self.step, self.start_step = logdir, start_step, start_step
        self.config_json, self.sample_fn, self.graph_fn = config_json, sample_fn, graph_fn
        self.prefix = prefix  # of the evaluation metrics, written under logdir/val

    def on_train_begin(self, logs=None):
        with self.train_writer.as_default(step=self.start_step):
            if self.config_json is not None:  # Markdown: a code block keeps the layout
                tf.summary.text("config", "```\n" + self.config_json + "\n```")
        self.train_writer.flush()
        graph = self.graph_fn() if self.graph_fn is not None and self.start_step == 0 else None
        if graph is not None:
            # A run of its own (logdir/graph): the GraphDef is large, and the
            # train events file stays small enough to rewrite on resume.
            with tf.summary.create_file_writer(os.path.join(self.logdir, "graph")).as_default():
                tf.summary.graph(graph)

    def on_train_batch_end(self, batch, logs=None):
        self.step = batch + 1
        with self.train_writer.as_default(step=self.step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(name, value)

    def on_epoch_end(self, epoch, logs=None):
        with self.val_writer.as_default(step=self.step):
            for name, value in (logs or {}).items():
                if name.startswith(self.prefix):
                    tf.summary.scalar(name[len(self.prefix):], value)
            sample = self.sample_fn(self.model) if self.sample_fn is not None else None
            if sample is not None:
                tf.summary.text("sample", "```\n" + sample + "\n```")
        self.val_writer.flush()
        self.train_writer.flush()

    def on_train_end(self, logs=None):
        self.train_writer.close()
        self.val_writer.close()


def drop_events_after(logdir: str, step: int) -> None:
    """Drop the events later than `step` from the event files in `logdir`.

    Each file holding such events is rewritten on its own: the events up to
    `step` are streamed into a staged copy, which is synced and then
    replaces the file. A crash part-way leaves every file either old or
    rewritten, and the next resume finishes the job; files with nothing
    later than `step` are not touched.
    """
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        if not any(e.step > step for e in _events(path)):
            continue
        staged = os.path.join(logdir, ".rewrite.tmp")
        with tf.io.TFRecordWriter(staged) as writer:
            for event in _events(path):
                if event.step <= step:
                    writer.write(event.SerializeToString())
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, path)


def _events(path: str):
    """The events of one file, stopping quietly at a record a crash cut short."""
    try:
        for record in tf.data.TFRecordDataset(path):
            yield tf.compat.v1.Event.FromString(record.numpy())
    except tf.errors.DataLossError:
        return


def from_factories(specs: list[str]) -> list[keras.callbacks.Callback]:
    """The callbacks that `package.module:factory` specs (--callbacks) make:
    each factory is imported, called with no arguments, and returns a Keras
    callback or a list of them. Any failure is one UserError line naming the
    spec, so a Docker user's typo does not end in a traceback."""
    import importlib

    from tfdp.errors import UserError

    made = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise UserError(f"--callbacks={spec!r} is not package.module:factory; name the "
                            "module and the function that returns the callbacks")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"--callbacks={spec}: cannot import {module_name} ({err}); put "
                            "its directory on PYTHONPATH or install it") from None
        except Exception as err:  # noqa: BLE001  (a SyntaxError, ... in the user's module)
            raise UserError(f"--callbacks={spec}: importing {module_name} raised "
                            f"{type(err).__name__}: {err}") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise UserError(f"--callbacks={spec}: {module_name} has no {attr!r}")
        try:
            out = factory()
        except Exception as err:  # noqa: BLE001  (the user's code: say whose it is)
            raise UserError(f"--callbacks={spec}: the factory raised "
                            f"{type(err).__name__}: {err}") from None
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        wrong = [type(c).__name__ for c in out if not isinstance(c, keras.callbacks.Callback)]
        if wrong:
            raise UserError(f"--callbacks={spec}: the factory returned {', '.join(wrong)}, "
                            "not keras.callbacks.Callback; return a callback or a list of "
                            "them")
        made.extend(out)
    return made
