"""Timed pieces of tfdp's train step on this process's devices, for
tfdp-plan --calibrate (tfdp/calibrate.py decides what to time and turns
the times into the cost model's constants).

Every timing is a median, of calls made for about so many seconds, or of a
fixed number of calls where all workers of a multi-worker job must make
the same collectives. The probes build tfdp's own model (tfdp.model),
optimizer and step (tfdp.step), so what is timed is what tfdp-train runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from tfdp.costmodel import count_params, gradient_bytes

SMALL_BYTES = 4  # one float: the all-reduce's latency
OVERHEAD_WINDOW = 8  # tokens per window when timing a step's overhead
OVERHEAD_MAX_PARAMS = 20_000_000  # larger models: timed narrower, extrapolated
ROUNDS = 6  # alternating rounds of the job's probe and the one-replica probe


def timed_calls(fn, seconds: float = 2.0, least: int = 5, warmup: int = 2) -> list[float]:
    """Seconds of each call of `fn()` (which must block) for about `seconds`,
    after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < least or time.perf_counter() < deadline:
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def fixed_calls(fn, calls: int = 15) -> float:
    """Median seconds of `calls` calls after three warm-up calls: a fixed
    count, since in a multi-worker job every worker must make the same
    collectives."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def alternating(fns, rounds: int = ROUNDS, seconds: float = 0.6) -> list[list[float]]:
    """Each call's seconds of every `fns` (blocking calls), timed in turn for
    `rounds` rounds of about `seconds` each after two warm-up calls."""
    for fn in fns:
        fn(), fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            out.extend(timed_calls(fn, seconds, least=3, warmup=0))
    return times


def allreduce_fn(strategy, nbytes: int):
    """A blocking call: one SUM all-reduce of a float32 buffer of `nbytes`
    per replica, replica i sending i + 1 in every element; it returns
    whether every element of every local replica's sum is n(n+1)/2 (checked
    on the device, so one flag comes back: a wrong sum is a broken
    collective, which tfdp-preflight reports)."""
    import tensorflow as tf

    size, n = max(nbytes // 4, 1), strategy.num_replicas_in_sync
    expected = n * (n + 1) / 2  # exact in float32 for any realistic n

    @tf.function
    def reduce():
        def send():
            ctx = tf.distribute.get_replica_context()
            mine = tf.fill([size], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
            return tf.reduce_all(tf.equal(ctx.all_reduce("SUM", mine), expected))
        return tf.reduce_all(tf.stack(strategy.experimental_local_results(strategy.run(send))))
    return lambda: bool(reduce())


def time_allreduce(strategy, nbytes: int, calls: int = 20) -> tuple[float, bool]:
    """(median seconds of that all-reduce over a fixed number of calls, every
    worker making the same ones; whether every sum came out exact)."""
    call, exact = allreduce_fn(strategy, nbytes), []
    seconds = fixed_calls(lambda: exact.append(call()), calls)
    return seconds, all(exact)


def model_cfg(shape, layers: int, hidden: int, heads: int, intermediate: int,
              batch: int, mixed_precision: str):
    """A tfdp Config of the given shape at the planned context length."""
    from tfdp.config import Config
    return Config(num_layers=layers, num_heads=heads, hidden_dim=hidden,
                  intermediate_dim=intermediate, seq_len=shape.seq_len,
                  global_batch_size=batch, mixed_precision=mixed_precision)


def random_windows(batch: int, seq_len: int, vocab: int):
    """`batch` windows of seq_len + 1 random token ids (fixed seed)."""
    import tensorflow as tf
    return tf.random.stateless_uniform([batch, seq_len + 1], [1, 2], 0, vocab, tf.int32)


def forward_backward(cfg, vocab: int, strategy, batch: int, jit: bool):
    """A blocking call: forward and backward of `cfg`'s model on every
    replica of `strategy`, `batch` windows each (no collectives)."""
    import tensorflow as tf

    from tfdp.model import build_model
    from tfdp.tasks.language_model import token_losses

    with strategy.scope():
        model = build_model(cfg, vocab)
    variables = model.trainable_variables

    @tf.function(jit_compile=jit)
    def compute(windows):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(token_losses(model, windows, training=True))
        return loss, tape.gradient(loss, variables)

    def replica(windows):
        loss, grads = compute(windows)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])  # needs every gradient

    windows = random_windows(batch, cfg.seq_len, vocab)

    @tf.function
    def run():
        return strategy.experimental_local_results(strategy.run(replica, args=(windows,)))[0]
    return lambda: float(run())


def whole_step(cfg, vocab: int, strategy, replicas: int, jit: bool) -> float:
    """Median seconds of tfdp's whole train step (make_train_step, AdamW, the
    host call) for `cfg`'s model under `strategy`, one window of
    OVERHEAD_WINDOW tokens per replica."""
    import tensorflow as tf

    from tfdp.model import build_model
    from tfdp.optimizer import build_optimizer
    from tfdp.step import make_train_step
    from tfdp.tasks.language_model import LanguageModelTask

    with strategy.scope():
        model = build_model(cfg, vocab)
        optimizer = build_optimizer(cfg, model.trainable_variables)
    # The task only scores the windows here: OVERHEAD_WINDOW tokens each.
    task = LanguageModelTask(dataclasses.replace(cfg, seq_len=OVERHEAD_WINDOW), vocab)
    step = make_train_step(strategy, model, optimizer, task, replicas, cfg.clip_norm, jit)
    data = tf.data.Dataset.from_tensor_slices(random_windows(replicas, OVERHEAD_WINDOW, vocab))
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.repeat().batch(ctx.get_per_replica_batch_size(replicas))))
    return fixed_calls(lambda: float(step(iterator)["loss"][-1]))


def step_overhead(shape, mixed_precision: str, strategy, replicas: int, jit: bool) -> float:
    """Seconds of tfdp's whole train step that are neither forward/backward
    nor the gradients' all-reduce (fixed_step_s in tfdp/calibrate.py): the
    planned model's step on windows of OVERHEAD_WINDOW tokens, less its
    all-reduce; over OVERHEAD_MAX_PARAMS, a line through two narrower
    models of the same depth, in the parameter count."""
    def at(s) -> float:
        cfg = model_cfg(s, s.num_layers, s.hidden_dim, s.num_heads, s.intermediate_dim,
                        replicas, mixed_precision)
        step = whole_step(cfg, s.vocab_size, strategy, replicas, jit)
        reduce = (time_allreduce(strategy, int(gradient_bytes(s)))[0]
                  if replicas > 1 else 0.0)
        return max(step - reduce, 0.0)

    n = count_params(shape)
    if n <= OVERHEAD_MAX_PARAMS:
        return at(shape)
    heads = shape.num_heads
    ratio = shape.intermediate_dim / shape.hidden_dim

    def narrowed(per_head: int):
        return dataclasses.replace(shape, hidden_dim=heads * per_head,
                                   intermediate_dim=max(int(heads * per_head * ratio), 1))
    per_head = shape.hidden_dim // heads
    while per_head > 2 and count_params(narrowed(per_head)) > OVERHEAD_MAX_PARAMS:
        per_head = max(per_head * 3 // 4, 2)
    small, wide = narrowed(1), narrowed(per_head)
    t_small, t_wide = at(small), at(wide)
    n_small, n_wide = count_params(small), count_params(wide)
    slope = max(t_wide - t_small, 0.0) / max(n_wide - n_small, 1)
    return t_wide + slope * (n - n_wide)
