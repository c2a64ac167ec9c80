"""The data-parallel training and evaluation steps, for any tfdp.tasks.Task.

One training step, on every replica i at once (`strategy.run`):

    L_i   = task.loss on replica i's batch / the global count (the target
            tokens, or examples, of the whole global batch)
    g_i   = dL_i/dtheta                       (XLA-compiled forward/backward)
    g     = all_reduce_sum(g_i)  = (1/N) * sum over all N targets' grads
    g     = clip_by_global_norm(g, clip_norm) (same norm on every replica)
    theta = AdamW(theta, g)                   (identical update everywhere;
                                               with skip_nonfinite or a loss
                                               scale, only when the loss and
                                               |g| are finite)

Dividing by the GLOBAL count makes the summed gradient the gradient of the
global mean loss, so N replicas on batch B update exactly as one replica on
B would.
"""

from __future__ import annotations

import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM


def default_jit_compile(mixed_precision: str, strategy) -> bool:
    """XLA unless the step computes in 16 bits on CPUs.

    Measured (benchmarks/throughput.py, 2-core CPU with AVX512_BF16 and
    AMX): XLA made the 4x128 models 1.4x faster in float32, but under
    bfloat16 it ran the 6x384 model at 0.65x of TensorFlow's own kernels,
    which reach the CPU's bfloat16 matrix units through oneDNN where XLA's
    CPU backend does not (float16 likewise, 0.88x). On GPUs XLA stays on.
    """
    on_cpu = not any("GPU" in d.upper() for d in strategy.extended.worker_devices)
    return not (on_cpu and mixed_precision in ("bf16", "fp16"))


def make_train_step(strategy, model, optimizer, task, global_batch_size: int,
                    clip_norm: float, jit_compile: bool = True,
                    all_reduce_dtype: str = "float32", skip_nonfinite: bool = False,
                    grad_accum_steps: int = 1, loss_scale=None):
    """Return a tf.function(iterator, num_steps, stop) running up to `num_steps`
    steps of `task` (tfdp.tasks.Task) in one call (a graph loop: no Python
    between steps), returning {"loss", "grad_norm", "learning_rate",
    "overflow"}, one entry per step run, and "stop". `stop` (float 0/1) is
    this worker's request to stop; "stop" says whether any worker made one,
    and the loop ends after that step. Without `skip_nonfinite` it also ends
    after a step whose loss or gradient norm is not finite, for the caller
    to report.

    With `skip_nonfinite`, a step whose reduced loss or gradient norm is NaN
    or Inf leaves weights and Adam moments untouched; the step counter
    still advances, so the data and learning rate stay where an
    uninterrupted run would have them.

    With `grad_accum_steps=K`, each replica's batch is split into K
    micro-batches whose gradients are summed in a loop on the replica
    (activations of one micro-batch at a time); then comes the one
    all-reduce and the one update, as for K=1 on the whole batch.

    With a `loss_scale` (tfdp.loss_scale.DynamicLossScale, for float16
    compute), the gradients are taken of the scaled loss and unscaled on the
    replica; a step whose gradients overflow is skipped whatever
    `skip_nonfinite` says, is marked in "overflow", and does not end the
    loop.

    `all_reduce_dtype="bfloat16"` sends the gradients across replicas in
    bfloat16 (half the bytes, ~3 significant digits per summand), then
    casts back; the loss then needs a second, float32 all-reduce.
    """
    variables = model.trainable_variables
    global_count = float(task.global_count(global_batch_size))
    wire = tf.as_dtype(all_reduce_dtype)

    def micro_step(batch, scale):
        with tf.GradientTape() as tape:
            loss_sum, count = task.loss(model, batch, training=True)
            loss = loss_sum / global_count
            scaled = loss if scale is None else loss * scale
        return loss, tf.cast(count, tf.float32), tape.gradient(scaled, variables)

    @tf.function(jit_compile=jit_compile)
    def forward_backward(batch):
        scale = None if loss_scale is None else tf.identity(loss_scale.scale)
        loss, count, grads = accumulate(batch, scale)
        return loss, count, grads if scale is None else [g / scale for g in grads]

    def accumulate(batch, scale):
        if grad_accum_steps == 1:
            return micro_step(batch, scale)
        # Dividing by the global count makes the sum over micro-batches the
        # gradient of the whole batch's mean loss.
        micro = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[grad_accum_steps, -1], tf.shape(t)[1:]], 0)),
            batch)
        loss, count = tf.zeros([]), tf.zeros([])
        grads = [tf.zeros_like(v) for v in variables]
        for i in tf.range(grad_accum_steps):
            more_loss, more_count, more = micro_step(
                tf.nest.map_structure(lambda t: t[i], micro), scale)
            loss, count = loss + more_loss, count + more_count
            grads = [g + tf.convert_to_tensor(m) for g, m in zip(grads, more)]
        return loss, count, grads

    def replica_step(batch, stop):
        loss, count, grads = forward_backward(batch)
        stop = tf.zeros_like(loss) + stop  # a value of this replica (all_reduce needs one)
        # ONE collective per step: the loss (and its count) ride in the
        # gradients' all-reduce (packed into one buffer), so across workers a
        # step pays one network round trip, not several.
        replica = tf.distribute.get_replica_context()
        # `stop` (this worker was asked to stop: SIGTERM) rides along too, so
        # every worker learns of any stop request in the same step.
        if wire == tf.float32:
            *grads, loss, count, stop = replica.all_reduce(SUM, [*grads, loss, count, stop])
        else:
            sent = replica.all_reduce(SUM, [tf.cast(g, wire) for g in grads])
            grads = [tf.cast(g, tf.float32) for g in sent]
            loss, count, stop = replica.all_reduce(SUM, [loss, count, stop])
        if task.count_varies:
            # Weighted examples: the global normaliser is the count just
            # reduced, not the nominal one each replica divided by.
            correction = global_count / tf.maximum(count, 1.0)
            loss, grads = loss * correction, [g * correction for g in grads]
        norm = tf.linalg.global_norm(grads)
        overflow = tf.constant(False)
        if loss_scale is not None:
            overflow = loss_scale.overflowed(loss, norm)
            loss_scale.update(overflow, tf.math.is_finite(loss) & tf.math.is_finite(norm))
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=norm)
        if skip_nonfinite or loss_scale is not None:
            _apply_if_finite(optimizer, grads, variables,
                             tf.math.is_finite(loss) & tf.math.is_finite(norm))
        else:
            optimizer.apply_gradients(zip(grads, variables))
        return loss, norm, stop, overflow

    @tf.function
    def train_steps(iterator, num_steps=tf.constant(1), stop=tf.constant(0.0)):
        first = strategy.experimental_local_results
        losses, norms, rates = (tf.TensorArray(tf.float32, size=0, dynamic_size=True)
                                for _ in range(3))
        overflows = tf.TensorArray(tf.bool, size=0, dynamic_size=True)
        stopped = tf.constant(False)
        for i in tf.range(num_steps):
            rates = rates.write(i, tf.cast(optimizer.learning_rate, tf.float32))
            loss, norm, stop_any, overflow = strategy.run(
                replica_step, args=(next(iterator), stop))
            # After the all-reduce every replica holds the same loss, norm, stop
            # and overflow.
            loss, norm, stopped = first(loss)[0], first(norm)[0], first(stop_any)[0] > 0
            overflow = first(overflow)[0]
            losses, norms = losses.write(i, loss), norms.write(i, norm)
            overflows = overflows.write(i, overflow)
            if stopped:
                break
            if not skip_nonfinite:
                if not (tf.math.is_finite(loss) and tf.math.is_finite(norm) or overflow):
                    break
        return {"loss": losses.stack(), "grad_norm": norms.stack(),
                "learning_rate": rates.stack(), "overflow": overflows.stack(),
                "stop": stopped}
    return train_steps


def _apply_if_finite(optimizer, grads, variables, finite) -> None:
    """Apply the update when `finite` (the same on every replica, as it comes
    from reduced values), else only count the step.

    The optimizer synchronises replicas (merge_call) inside apply_gradients,
    which a tf.cond in replica context may not contain; so, like Keras's
    LossScaleOptimizer, the cond runs in cross-replica context and each
    branch goes back to the replicas.
    """
    def apply():
        optimizer.apply_gradients(zip(grads, variables))

    def skip():
        optimizer.iterations.assign_add(1)

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, apply, skip)
        return

    def cross_replica(strategy, grads, finite):
        def apply_everywhere():
            strategy.extended.call_for_each_replica(
                lambda g: optimizer.apply_gradients(zip(g, variables)), args=(grads,))
        tf.cond(strategy.experimental_local_results(finite)[0], apply_everywhere, skip)
    tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, finite))


def make_eval_step(strategy, model, task, jit_compile: bool = True):
    """Return a tf.function(batch) -> `task.eval_sums` summed over replicas."""

    @tf.function(jit_compile=jit_compile)
    def sums(batch):
        return tf.cast(task.eval_sums(model, batch), tf.float32)

    # As in training, the compiled function is called from a plain Python
    # replica function: handing a tf.function to strategy.run directly makes
    # every replica reuse the first replica's variables.
    def replica_eval(batch):
        return tf.distribute.get_replica_context().all_reduce(SUM, sums(batch))

    @tf.function
    def eval_step(batch):
        return strategy.experimental_local_results(strategy.run(replica_eval, args=(batch,)))[0]
    return eval_step


def make_any(strategy):
    """Return a function(flag: bool) -> whether any worker passed True: one
    tiny all-reduce, for decisions only the chief's callbacks make (an early
    stop) that every worker must follow."""
    @tf.function
    def any_worker(flag):
        def replica(value):
            local = tf.zeros([]) + value  # made on this replica's device (all_reduce needs it)
            return tf.distribute.get_replica_context().all_reduce(SUM, local)
        return strategy.experimental_local_results(strategy.run(replica, args=(flag,)))[0] > 0
    return lambda flag: bool(any_worker(tf.constant(float(flag))))
