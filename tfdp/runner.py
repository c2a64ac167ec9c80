"""The Runner: the one training loop every tfdp job runs through.

A job (tfdp/training.py for tfdp-train, tfdp/finetuning.py for tfdp-finetune)
resolves its config, builds the strategy and a Task (tfdp/tasks/), and hands
them to a Runner with a `Schedule`. The Runner builds the model in the
strategy's scope, restores the newest readable checkpoint (or lets the task
load its starting weights), and trains: up to `steps_per_loop` steps per
call into TensorFlow (tfdp/step.py: one all-reduce per step), a validation
every `eval_every` steps, a checkpoint every `checkpoint_every`, SIGTERM ->
checkpoint -> exit 75 (tfdp/preemption.py), the watchdog for lost peers
(tfdp/watchdog.py), non-finite steps stopped or skipped, and Keras callbacks
(tfdp/callbacks.py), with the progress line, TensorBoard and metrics.json's
validation history on the chief. The step is `optimizer.iterations`, which the
checkpoint restores; the data position follows from it (tfdp/dataset.py).

Keras 3's `fit` cannot drive MultiWorkerMirroredStrategy (DESIGN.md), which
is why this loop exists; it follows orbit's Controller (one outer loop,
steps per call, evaluation and checkpoint cadence).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from tfdp import checkpoints, watchdog
from tfdp.atomic import write_text
from tfdp.callbacks import ProgressLogger, TensorBoardSummaries
from tfdp.cluster import num_tasks
from tfdp.errors import Preempted, UserError
from tfdp.loss_scale import DynamicLossScale
from tfdp.memory import peak_device_memory_gib, peak_host_memory_gib
from tfdp.preemption import PreemptionGuard
from tfdp.rundir import read_json
from tfdp.step import default_jit_compile, make_any, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a Runner trains: the loop's cadence and the step's options. Jobs
    fill it from their config (`Schedule.of(cfg)` takes the fields by name)."""

    train_steps: int
    global_batch_size: int
    eval_every: int
    checkpoint_every: int
    seed: int = 1234
    steps_per_loop: int = 1
    log_every: int = 50
    keep_checkpoints: int = 3
    clip_norm: float = 1.0
    grad_accum_steps: int = 1
    jit_compile: bool | None = None  # None: tfdp.step.default_jit_compile decides
    mixed_precision: str = "off"  # fp16 adds a dynamic loss scale
    all_reduce_dtype: str = "float32"
    skip_nonfinite_steps: int = 0
    preemption_grace_seconds: float = 25.0
    preempted_exit_code: int = Preempted.exit_code
    tensorboard_graph: bool = True  # the forward graph in TensorBoard on a first start

    @classmethod
    def of(cls, cfg, **overrides) -> "Schedule":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        return cls(**{**values, **overrides})


def evaluate_task(strategy, eval_step, task, global_batch_size: int,
                  on_batch_begin=None, on_batch_end=None) -> dict:
    """`task`'s metrics (unprefixed) over its whole evaluation set, every
    example once. The sums are taken in a fixed order (on the replica, by
    the all-reduce, then batch by batch in float64), so the same inputs on
    the same replicas give the same digits. `on_batch_begin(i)` and
    `on_batch_end(i, metrics so far)` run around every batch."""
    dataset = strategy.distribute_datasets_from_function(task.eval_dataset_fn(global_batch_size))
    total = None
    for i, batch in enumerate(dataset):
        if on_batch_begin is not None:
            on_batch_begin(i)
        sums = eval_step(batch).numpy().astype("float64")
        total = sums if total is None else total + sums
        if on_batch_end is not None:
            on_batch_end(i, task.eval_metrics(total))
    if total is None:
        raise UserError("the evaluation set is empty; give it at least one example")
    return task.eval_metrics(total)


class Runner:
    """Trains `task` under `strategy` as `schedule` says, in `model_dir`.

    `write_dir` is where this process writes checkpoints: model_dir on the
    chief, a private scratch directory on the other workers of a
    multi-worker job (they resume from model_dir's checkpoints, which must
    be on a file system every worker reads). With `resume`, training goes on
    from model_dir's newest readable checkpoint.

    `callbacks` are the user's Keras callbacks. They run on the chief only,
    so that one writing files (CSVLogger, ModelCheckpoint, a user's own)
    writes them once; a callback with the attribute `all_workers = True`
    runs on every worker. When a chief's callback stops training
    (`model.stop_training`, e.g. EarlyStopping), every worker stops after
    the same step.
    """

    def __init__(self, strategy, task, schedule: Schedule, optimizer_fn, model_dir: str,
                 write_dir: str | None = None, callbacks=(), log=print, live=None,
                 resume: bool = True, config_json: str | None = None,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0):
        """`optimizer_fn(variables)` builds the optimizer (in the strategy's
        scope); `log` prints the chief's messages, `live` (a terminal) gets a
        progress bar; `config_json` is shown in TensorBoard."""
        self.strategy, self.task, self.schedule = strategy, task, schedule
        self.model_dir = model_dir
        self.write_dir = write_dir or model_dir
        self.chief = self.write_dir == model_dir
        self.log, self.live, self.config_json = log, live, config_json
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.user_callbacks = [c for c in callbacks
                               if self.chief or getattr(c, "all_workers", False)]
        with strategy.scope():
            keras.utils.set_random_seed(schedule.seed)  # the same initial weights everywhere
            self.model = task.build_model()
            self.optimizer = optimizer_fn(self.model.trainable_variables)
            loss_scale = DynamicLossScale()  # in every checkpoint; used under fp16 only
        self.checkpoint = checkpoints.make_checkpoint(
            task.checkpoint_parts(self.model), self.model, self.optimizer,
            task.input_pipelines, loss_scale)
        self.checkpoints = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.write_dir, "checkpoints"),
            max_to_keep=schedule.keep_checkpoints)
        if resume:
            checkpoints.restore_newest_readable(
                self.checkpoint, os.path.join(model_dir, "checkpoints"), log)
        checkpoints.check_same_step(strategy, self.optimizer.iterations)
        if self.step == 0:
            task.initialize(self.model, log)
        saved = int(self.checkpoint.input_pipelines.numpy())
        if saved != task.input_pipelines:
            log(f"warning: the data order from here differs from an uninterrupted run: the "
                f"checkpoint was written with {saved} input pipeline(s) reading whole shard "
                f"files, this run reads {task.input_pipelines} way(s) "
                "(--input_sharding=interleave keeps one order for any worker count)")
            self.checkpoint.input_pipelines.assign(task.input_pipelines)
        self.nonfinite_steps = self.checkpoint.nonfinite_steps  # skipped so far
        self.loss_scale = loss_scale if schedule.mixed_precision == "fp16" else None
        self.jit_compile = (default_jit_compile(schedule.mixed_precision, strategy)
                            if schedule.jit_compile is None else schedule.jit_compile)
        self.train_steps = make_train_step(
            strategy, self.model, self.optimizer, task, schedule.global_batch_size,
            schedule.clip_norm, self.jit_compile, schedule.all_reduce_dtype,
            skip_nonfinite=schedule.skip_nonfinite_steps > 0,
            grad_accum_steps=schedule.grad_accum_steps, loss_scale=self.loss_scale)
        self.eval_step = make_eval_step(strategy, self.model, task, self.jit_compile)
        # Only a multi-worker job needs the chief's stop decision carried over.
        workers = num_tasks(getattr(strategy, "cluster_resolver", None))
        self.any_worker = make_any(strategy) if workers > 1 else bool
        self.tokens_per_step = schedule.global_batch_size * task.tokens_per_example()
        self.replicas = strategy.num_replicas_in_sync
        earlier = read_json(os.path.join(model_dir, "metrics.json")).get("history", [])
        self.history = [h for h in earlier if h.get("step", 0) <= self.step]
        self.mean_tokens_per_second = self.mean_step_time = 0.0
        self.callbacks = None  # made by fit(), once the run is known to start

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def evaluate(self) -> dict:
        """The task's metrics over its evaluation set, prefixed (`val_loss`, ...)."""
        callbacks = self.callbacks or keras.callbacks.CallbackList([], model=self.model)
        callbacks.on_test_begin()
        with watchdog.watching():
            def batch_end(i, metrics):
                watchdog.beat()
                callbacks.on_test_batch_end(i, metrics)
            metrics = evaluate_task(self.strategy, self.eval_step, self.task,
                                    self.schedule.global_batch_size,
                                    callbacks.on_test_batch_begin, batch_end)
        # Decoding (a task scored on generated text) paces itself, without
        # per-batch heartbeats; its one all-reduce comes at the end.
        metrics.update(self.task.generated_metrics(self.model, self.strategy))
        callbacks.on_test_end(metrics)
        return {self.task.eval_prefix + k: v for k, v in metrics.items()}

    def fit(self) -> dict:
        """Train from the current step to `train_steps`; return the last
        evaluation's logs (train and eval metrics).

        SIGTERM (what Kubernetes and SLURM send before they kill) lets the
        current call into TensorFlow finish; the next step carries the stop
        request to every worker, all save a checkpoint at that step and raise
        Preempted (exit code --preempted_exit_code, 75). Whatever happens,
        the process is gone within --preemption_grace_seconds
        (tfdp/preemption.py).
        """
        s = self.schedule
        self.callbacks = keras.callbacks.CallbackList(
            self._own_callbacks() + self.user_callbacks, add_history=False,
            add_progbar=False, model=self.model)
        if self.step >= s.train_steps:
            self.log(f"already trained to step {self.step} of --train_steps={s.train_steps}; "
                     "raise --train_steps to continue")
            last = self.history[-1].get("train_loss") if self.history else None
            return {"train_loss": last, **self.evaluate()}

        def resume_point():
            latest = self.checkpoints.latest_checkpoint
            return f"its last checkpoint ({os.path.basename(latest)})" if latest else "step 0"
        # Other workers' scratch directories go when a forced exit cuts them short.
        remove_scratch = None if self.chief else (
            lambda: shutil.rmtree(self.write_dir, ignore_errors=True))
        with PreemptionGuard(s.preemption_grace_seconds, resume_point, remove_scratch,
                             s.preempted_exit_code) as self._preemption:
            return self._fit()

    def _own_callbacks(self) -> list:
        """The chief's progress line and TensorBoard summaries."""
        if not self.chief:
            return []
        s, prefix = self.schedule, self.task.eval_prefix
        self.progress = ProgressLogger(s.train_steps, s.log_every, self.log, self.live,
                                       prefix=prefix)
        self.log = self.progress.say  # from here, messages print above the live bar
        return [self.progress,
                TensorBoardSummaries(os.path.join(self.model_dir, "tensorboard"),
                                     start_step=self.step, config_json=self.config_json,
                                     sample_fn=self.task.sample,
                                     graph_fn=self.task.forward_graph if s.tensorboard_graph else None,
                                     prefix=prefix)]

    def _check_finite(self, step: int, loss: float, grad_norm: float, overflow: bool) -> None:
        """Stop at a NaN/Inf loss or gradient before it is checkpointed, or,
        under --skip_nonfinite_steps=K, count the skipped update (up to K).
        An fp16 loss-scale overflow is neither: the scale adapts."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        if overflow:
            self.log(f"fp16 gradients overflowed at step {step}: update skipped, loss scale "
                     f"now {float(self.loss_scale.scale.numpy()):g}")
            return
        what = f"loss {loss}, gradient norm {grad_norm} at step {step}"
        limit = self.schedule.skip_nonfinite_steps
        skipped = int(self.nonfinite_steps.assign_add(1).numpy())
        if skipped <= limit:
            self.log(f"warning: {what}: update skipped ({skipped} of "
                     f"--skip_nonfinite_steps={limit})")
            return
        kept = self.checkpoints.latest_checkpoint
        raise UserError(
            f"{what}" + (f" (more than --skip_nonfinite_steps={limit})" if limit else "")
            + "; training stopped"
            + (f" and its last checkpoint ({os.path.basename(kept)}) is untouched" if kept else "")
            + "; lower --learning_rate, raise --warmup_steps or set --clip_norm"
            + ("" if limit else ", or skip such updates with --skip_nonfinite_steps=K"))

    def _step_logs(self, step: int, loss: float, grad_norm: float, learning_rate: float,
                   step_time: float, eval_seconds: float) -> dict:
        """What callbacks get for the step `step` (0-based)."""
        s = self.schedule
        tokens_per_second = self.tokens_per_step / step_time
        evals_left = (s.train_steps - 1) // s.eval_every - step // s.eval_every + 1
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "step_time": step_time,
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_replica": tokens_per_second / self.replicas,
            "peak_host_memory_gib": peak_host_memory_gib(),
            **peak_device_memory_gib(self.strategy),
            "mfu": tokens_per_second * self.flops_per_token / self.peak_flops
            if self.peak_flops else 0.0,
            "eta_seconds": (s.train_steps - step - 1) * step_time + evals_left * eval_seconds,
        }

    def _fit(self) -> dict:
        s = self.schedule
        start = self.step
        dataset = self.strategy.distribute_datasets_from_function(
            self.task.train_dataset_fn(s.global_batch_size, s.seed, start))
        iterator = iter(dataset)
        self.callbacks.set_params({"epochs": math.ceil(s.train_steps / s.eval_every),
                                   "steps": s.eval_every, "verbose": 0})
        self.callbacks.on_train_begin()
        recent = collections.deque(maxlen=20)  # step times for tokens/s and ETA
        train_time, timed_steps, eval_seconds = 0.0, 0, 0.0
        epoch_losses: list[float] = []
        epoch_logs: dict = {}
        step = start
        while step < s.train_steps:
            # Up to --steps_per_loop steps per call, ending at every validation
            # and checkpoint step.
            n = min(s.steps_per_loop, s.train_steps - step,
                    s.eval_every - step % s.eval_every,
                    s.checkpoint_every - step % s.checkpoint_every)
            if step == start or step % s.eval_every == 0:
                self.callbacks.on_epoch_begin(step // s.eval_every)
            self.callbacks.on_train_batch_begin(step)
            began = time.perf_counter()
            with watchdog.watching():  # a lost peer cannot hold these steps forever
                out = self.train_steps(iterator, tf.constant(n),
                                       tf.constant(float(self._preemption.requested)))
                losses = [float(x) for x in out["loss"].numpy()]  # waits for the steps
            seconds = (time.perf_counter() - began) / len(losses)
            if step > start:  # the first call includes tracing and compilation
                recent.extend([seconds] * len(losses))
                train_time += seconds * len(losses)
                timed_steps += len(losses)
            step_time = sum(recent) / len(recent) if recent else seconds
            # Callbacks see every step, after the call that ran it.
            for i, loss in enumerate(losses):
                if i:
                    self.callbacks.on_train_batch_begin(step)
                logs = self._step_logs(step, loss, float(out["grad_norm"][i]),
                                       float(out["learning_rate"][i]), step_time, eval_seconds)
                self.callbacks.on_train_batch_end(step, logs)
                step += 1
                self._check_finite(step, loss, logs["grad_norm"], bool(out["overflow"][i]))
                if math.isfinite(loss):
                    epoch_losses.append(loss)
            if step % s.eval_every == 0 or step == s.train_steps:
                began = time.perf_counter()
                epoch_logs = {**logs, "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
                              **self.evaluate()}
                eval_seconds = time.perf_counter() - began
                epoch_losses = []
                self.history.append({"step": step, **epoch_logs})
                if self.chief:  # an interrupted run's evaluations survive its resume
                    write_text(os.path.join(self.model_dir, "metrics.json"),
                               json.dumps({"step": step, "history": self.history}, indent=2))
                self.callbacks.on_epoch_end((step - 1) // s.eval_every, epoch_logs)
            preempted = bool(out["stop"])  # some worker got SIGTERM: all stop here
            # e.g. EarlyStopping, which runs on the chief: every worker follows it
            # (a collective, so watched like the steps).
            with watchdog.watching():
                stop = self.any_worker(bool(getattr(self.model, "stop_training", False)))
            if stop or preempted or step % s.checkpoint_every == 0 or step == s.train_steps:
                checkpoints.save(self.checkpoints, step)
            if preempted:
                self.callbacks.on_train_end(epoch_logs)  # flushes TensorBoard up to here
                raise Preempted(f"stopped by SIGTERM after step {step}, checkpoint saved; run "
                                "the same command again to resume", s.preempted_exit_code)
            if stop:
                break
        self.callbacks.on_train_end(epoch_logs)
        self.mean_tokens_per_second = (self.tokens_per_step * timed_steps / train_time
                                       if train_time else 0.0)
        self.mean_step_time = train_time / timed_steps if timed_steps else 0.0
        return epoch_logs
