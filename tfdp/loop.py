"""The training loop: steps, periodic validation, checkpoints, callbacks.

Keras 3's `fit` cannot drive MultiWorkerMirroredStrategy (see DESIGN.md),
so tfdp runs its own loop around `tfdp.step` and calls standard Keras
callbacks through `keras.callbacks.CallbackList` (conventions in
tfdp/callbacks.py). The current step is `optimizer.iterations`, which the
checkpoint restores, and the data position follows from it (tfdp/dataset.py).
"""

from __future__ import annotations

import collections
import math
import os
import resource
import time

import keras
import tensorflow as tf

from tfdp import checkpoints, watchdog
from tfdp.cluster import input_pipeline
from tfdp.errors import Preempted, UserError
from tfdp.preemption import PreemptionGuard
from tfdp.dataset import Split, eval_steps_for
from tfdp.evaluate import loss_metrics, score
from tfdp.step import default_jit_compile, make_eval_step, make_train_step


def peak_host_memory_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_device_memory_gib(strategy) -> dict:
    """{"peak_device_memory_gib": the largest peak allocation on this
    process's GPUs so far} when it trains on GPUs, else {}."""
    gpus = [d.split("device:")[-1] for d in strategy.extended.worker_devices
            if "GPU" in d.upper()]
    if not gpus:
        return {}
    peak = max(tf.config.experimental.get_memory_info(gpu)["peak"] for gpu in gpus)
    return {"peak_device_memory_gib": peak / 2**30}


class Trainer:
    """Trains `model` on `train` (a tfdp.dataset.Split of token shards or a
    tfdp.stream.TextStream: whatever gives `dataset_fn(global_batch_size,
    seed, start_step)`) with `optimizer`, validating on the Split `val`."""

    def __init__(self, cfg, strategy, model, optimizer, train, val: Split,
                 checkpoints: tf.train.CheckpointManager, callbacks=(),
                 flops_per_token: float = 0.0, peak_flops: float = 0.0, log=lambda *_: None,
                 before_exit=None):
        """`checkpoints` manages a checkpoint made by tfdp.checkpoints.make_checkpoint;
        `before_exit()` runs before a forced exit after SIGTERM."""
        self.cfg, self.strategy, self.model, self.optimizer = cfg, strategy, model, optimizer
        self.train, self.val, self.checkpoints, self.log = train, val, checkpoints, log
        self.before_exit = before_exit
        self.nonfinite_steps = checkpoints.checkpoint.nonfinite_steps  # skipped so far
        self.loss_scale = (checkpoints.checkpoint.loss_scale
                           if cfg.mixed_precision == "fp16" else None)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.callbacks = keras.callbacks.CallbackList(
            list(callbacks), add_history=False, add_progbar=False, model=model)
        self.jit_compile = (default_jit_compile(cfg.mixed_precision, strategy)
                            if cfg.jit_compile is None else cfg.jit_compile)
        self.train_steps = make_train_step(strategy, model, optimizer, cfg.global_batch_size,
                                          cfg.seq_len, cfg.clip_norm, self.jit_compile,
                                          cfg.all_reduce_dtype,
                                          skip_nonfinite=cfg.skip_nonfinite_steps > 0,
                                          grad_accum_steps=cfg.grad_accum_steps,
                                          loss_scale=self.loss_scale)
        self.eval_step = make_eval_step(strategy, model, self.jit_compile)
        self.eval_steps = eval_steps_for(val, cfg.global_batch_size, cfg.eval_steps,
                                         input_pipeline(strategy)[1])
        self.tokens_per_step = cfg.global_batch_size * cfg.seq_len
        self.replicas = strategy.num_replicas_in_sync
        self.history: list[dict] = []

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def evaluate(self) -> dict:
        """Mean token loss over the validation split (or `eval_steps` batches)."""
        self.callbacks.on_test_begin()
        with watchdog.watching():
            def batch_end(i, loss):
                watchdog.beat()
                self.callbacks.on_test_batch_end(i, {"loss": loss})
            loss = score(self.strategy, self.eval_step, self.val, self.cfg.global_batch_size,
                         self.eval_steps, self.callbacks.on_test_batch_begin, batch_end)
        self.callbacks.on_test_end({"loss": loss})
        return loss_metrics(loss, self.val, prefix="val_")

    def fit(self) -> dict:
        """Train from the current step to `train_steps`; return the last epoch's logs.

        SIGTERM (what Kubernetes and SLURM send before they kill) lets the
        current call into TensorFlow finish; the next step carries the stop
        request to every worker, all save a checkpoint at that step and raise
        Preempted (exit code --preempted_exit_code, 75). Whatever happens,
        the process is gone within --preemption_grace_seconds
        (tfdp/preemption.py).
        """
        def resume_point():
            latest = self.checkpoints.latest_checkpoint
            return f"its last checkpoint ({os.path.basename(latest)})" if latest else "step 0"
        with PreemptionGuard(self.cfg.preemption_grace_seconds, resume_point,
                             self.before_exit, self.cfg.preempted_exit_code) as self._preemption:
            return self._fit()

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
        limit = self.cfg.skip_nonfinite_steps
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
        cfg = self.cfg
        tokens_per_second = self.tokens_per_step / step_time
        evals_left = (cfg.train_steps - 1) // cfg.eval_every - step // cfg.eval_every + 1
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
            "eta_seconds": (cfg.train_steps - step - 1) * step_time + evals_left * eval_seconds,
        }

    def _fit(self) -> dict:
        cfg = self.cfg
        start = self.step
        dataset = self.strategy.distribute_datasets_from_function(
            self.train.dataset_fn(cfg.global_batch_size, cfg.seed, start))
        iterator = iter(dataset)
        self.callbacks.set_params({"epochs": math.ceil(cfg.train_steps / cfg.eval_every),
                                   "steps": cfg.eval_every, "verbose": 0})
        self.callbacks.on_train_begin()
        recent = collections.deque(maxlen=20)  # step times for tokens/s and ETA
        train_time, timed_steps, eval_seconds = 0.0, 0, 0.0
        epoch_losses: list[float] = []
        epoch_logs: dict = {}
        step = start
        while step < cfg.train_steps:
            # Up to --steps_per_loop steps per call, ending at every validation
            # and checkpoint step.
            n = min(cfg.steps_per_loop, cfg.train_steps - step,
                    cfg.eval_every - step % cfg.eval_every,
                    cfg.checkpoint_every - step % cfg.checkpoint_every)
            if step == start or step % cfg.eval_every == 0:
                self.callbacks.on_epoch_begin(step // cfg.eval_every)
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
            if step % cfg.eval_every == 0 or step == cfg.train_steps:
                began = time.perf_counter()
                epoch_logs = {**logs, "train_loss": sum(epoch_losses) / max(len(epoch_losses), 1),
                              **self.evaluate()}
                eval_seconds = time.perf_counter() - began
                epoch_losses = []
                self.history.append({"step": step, **epoch_logs})
                self.callbacks.on_epoch_end((step - 1) // cfg.eval_every, epoch_logs)
            preempted = bool(out["stop"])  # some worker got SIGTERM: all stop here
            stop = bool(getattr(self.model, "stop_training", False))  # e.g. EarlyStopping
            if stop or preempted or step % cfg.checkpoint_every == 0 or step == cfg.train_steps:
                checkpoints.save(self.checkpoints, step)
            if preempted:
                self.callbacks.on_train_end(epoch_logs)  # flushes TensorBoard up to here
                raise Preempted(f"stopped by SIGTERM after step {step}, checkpoint saved; run "
                                "the same command again to resume", cfg.preempted_exit_code)
            if stop:
                break
        self.callbacks.on_train_end(epoch_logs)
        self.mean_tokens_per_second = (self.tokens_per_step * timed_steps / train_time
                                       if train_time else 0.0)
        self.mean_step_time = train_time / timed_steps if timed_steps else 0.0
        return epoch_logs
