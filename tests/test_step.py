"""Data-parallel equivalence: N replicas on batch B update exactly as 1 replica on B.

theta <- theta - eta * AdamW((1/N) * sum_i grad L_i(theta)): the 2-replica
step, the 1-replica step and a hand-written average of the two half-batch
gradients followed by one optimizer update must give the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfdp.config import Config
from tfdp.loss_scale import DynamicLossScale
from tfdp.model import build_model, logits
from tfdp.optimizer import build_optimizer
from tfdp.step import make_train_step
from tfdp.tasks.language_model import LanguageModelTask

B, T, V = 8, 16, 50
CFG = Config(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=T,
             global_batch_size=B, learning_rate=1e-2, min_learning_rate=1e-3,
             warmup_steps=0, train_steps=10, clip_norm=0.0, dropout=0.0, jit_compile=True)
# XLA changes only what it compiles, each replica's forward and backward
# (tfdp/step.py): the all-reduce, the wire's casts, clipping and the update
# run outside it. The tests of those run without it (a compiled step costs
# ~2x the CPU time to build); XLA stays on where the subject is compiled:
# the plain equivalence, accumulation's micro-batch loop, fp16 overflow.
NO_XLA = Config(**{**CFG.__dict__, "jit_compile": False})


def _windows(seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T + 1)).astype(np.int32)


def _initial_weights():
    tf.keras.utils.set_random_seed(7)
    return build_model(CFG, V).get_weights()


def _step_with(strategy, cfg, weights, windows, steps=1, loss_scale=None, outs=None):
    """Run `steps` tfdp train steps under `strategy`; return the weights and
    losses. `loss_scale` makes a DynamicLossScale in the scope; `outs`
    collects each step's outputs and weights."""
    with strategy.scope():
        model = build_model(cfg, V)
        model.set_weights(weights)
        optimizer = build_optimizer(cfg, model.trainable_variables)
        scale = loss_scale() if loss_scale else None
    step = make_train_step(strategy, model, optimizer, LanguageModelTask(cfg, V),
                           cfg.global_batch_size, cfg.clip_norm, cfg.jit_compile,
                           cfg.all_reduce_dtype,
                           grad_accum_steps=cfg.grad_accum_steps, loss_scale=scale)

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(cfg.global_batch_size)
        return tf.data.Dataset.from_tensor_slices(windows).repeat().batch(per_replica)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    losses = []
    for _ in range(steps):
        out = step(iterator)
        losses.append(float(out["loss"][0]))
        if outs is not None:
            outs.append({"overflow": bool(out["overflow"][0]), "weights": model.get_weights(),
                         "grad_norm": float(out["grad_norm"][0]),
                         "scale": float(scale.scale.numpy()) if scale else None})
    _assert_copies_agree(model, strategy.num_replicas_in_sync)
    return model.get_weights(), losses


def _assert_copies_agree(model, replicas: int) -> None:
    """Every replica's copy of every weight holds the same value, bit for bit
    (get_weights() reads only the first copy)."""
    for variable in model.trainable_variables:
        copies = [v.numpy() for v in variable.value.values] \
            if hasattr(variable.value, "values") else [variable.numpy()]
        assert len(copies) == replicas, variable.path
        for copy in copies[1:]:
            np.testing.assert_array_equal(copies[0], copy)


_REFERENCE = {}


def _float32_reference(mirrored):
    """Three float32 steps (2 replicas) from the initial weights: the run the
    reduced-precision tests compare with (computed once). Without XLA, as
    they run: the wire's casts and the loss scaling happen outside the
    compiled forward and backward anyway."""
    if not _REFERENCE:
        outs = []
        weights, losses = _step_with(mirrored, NO_XLA, _initial_weights(), _windows(), steps=3,
                                     outs=outs)
        _REFERENCE.update(weights=weights, losses=losses, outs=outs)
    return _REFERENCE


def _manual_step(cfg, weights, windows):
    """Average the gradients of the two half-batches by hand; one AdamW update."""
    model = build_model(cfg, V)
    model.set_weights(weights)
    variables = model.trainable_variables
    halves = np.split(windows, 2)
    grads = []
    for half in halves:
        with tf.GradientTape() as tape:
            out = logits(model, tf.constant(half[:, :-1]))
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                half[:, 1:], out, from_logits=True))
        grads.append(tape.gradient(loss, variables))
    mean = [(a + b) / 2.0 for a, b in zip(*grads)]
    if cfg.clip_norm > 0:
        mean, _ = tf.clip_by_global_norm(mean, cfg.clip_norm)
    optimizer = build_optimizer(cfg, variables)
    optimizer.apply_gradients(zip(mean, variables))
    return model.get_weights()


def _assert_same(a, b, atol=1e-5):
    """Within 0.1% of one learning-rate step (lr = 1e-2). Adam's first update
    is lr * g / (|g| + eps), which turns float rounding in the tiniest
    gradient entries into visible differences; a wrong reduction (a sum
    instead of a mean, or per-replica clipping) misses by ~lr."""
    assert len(a) == len(b)
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert worst < atol, f"weights differ by up to {worst}"


def _assert_moved(before, after):
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(before, after)) > 1e-4


@pytest.mark.parametrize("clip_norm", [0.0, 0.05], ids=["no_clip", "clipped"])
def test_two_replicas_equal_one_replica_and_manual_average(mirrored, one_device, clip_norm):
    """The first step against a hand-written average, then (without
    clipping) four steps over two different global batches: the replicas'
    copies stay identical (_step_with checks) and equal to one replica's."""
    cfg = Config(**{**CFG.__dict__, "clip_norm": clip_norm, "jit_compile": not clip_norm})
    weights = _initial_weights()
    windows = np.concatenate([_windows(1), _windows(2)])
    steps = 1 if clip_norm else 4
    assert mirrored.num_replicas_in_sync == 2
    outs = []
    two, loss_two = _step_with(mirrored, cfg, weights, windows, steps=steps, outs=outs)
    one, loss_one = _step_with(one_device, cfg, weights, windows, steps=steps)
    manual = _manual_step(cfg, weights, windows[:B])
    _assert_moved(weights, outs[0]["weights"])
    # The hand-computed step rounds differently from TensorFlow's kernels:
    # on an AMD EPYC it differed by 1.04e-5 with clipping (at bef87bb too),
    # still 200 times less than a wrong reduction's ~lr.
    _assert_same(outs[0]["weights"], manual, atol=5e-5)
    _assert_same(two, one, atol=3e-5)
    # The reported loss is the global mean, not a per-replica one.
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    assert loss_two[-1] < loss_two[0] or steps == 1


def test_bfloat16_wire_gives_nearly_the_float32_update(mirrored):
    """Gradients summed in bfloat16 keep ~3 significant digits: Adam's first
    update (lr * g/|g|) then matches float32 except where the two replicas'
    gradients nearly cancel; the loss, summed in float32, matches exactly
    while the weights are still equal."""
    weights, windows = _initial_weights(), _windows()
    reference = _float32_reference(mirrored)
    exact, loss = reference["outs"][1]["weights"], reference["losses"]
    bf16_cfg = Config(**{**NO_XLA.__dict__, "all_reduce_dtype": "bfloat16"})
    wire, wire_loss = _step_with(mirrored, bf16_cfg, weights, windows, steps=2)
    _assert_moved(weights, wire)
    np.testing.assert_allclose(wire_loss[0], loss[0], rtol=1e-6)  # same weights at step 1
    np.testing.assert_allclose(wire_loss[1], loss[1], rtol=1e-3)
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(exact, wire)])
    assert np.mean(diffs > 1e-3) < 0.02, np.mean(diffs > 1e-3)
    assert np.max(diffs) > 0  # it did round something


def test_gradient_accumulation_gives_the_whole_batch_update(mirrored):
    """K=4 micro-batches of B/4 per step: the same update as K=1 on B, with one
    all-reduce (each replica sums its micro-batches' gradients first)."""
    weights = _initial_weights()
    windows = np.concatenate([_windows(1), _windows(2)])
    base = Config(**{**CFG.__dict__, "clip_norm": 0.05})
    whole, losses = _step_with(mirrored, base, weights, windows, steps=2)
    accum = Config(**{**base.__dict__, "grad_accum_steps": 4})
    micro, micro_losses = _step_with(mirrored, accum, weights, windows, steps=2)
    _assert_moved(weights, micro)
    _assert_same(whole, micro, atol=3e-5)
    np.testing.assert_allclose(micro_losses, losses, rtol=1e-5)


def test_bf16_mixed_precision_keeps_float32_weights_and_loss(mirrored):
    """bfloat16 compute: the weights (and so the checkpoints) stay float32, the
    loss comes out float32 and close to the float32 run's, and it trains."""
    weights, windows = _initial_weights(), _windows()
    loss = _float32_reference(mirrored)["losses"]
    # Without XLA, tfdp's default for 16-bit compute on CPUs (tfdp.step.default_jit_compile).
    bf16 = Config(**{**CFG.__dict__, "mixed_precision": "bf16", "jit_compile": False})
    with mirrored.scope():
        model = build_model(bf16, V)
    assert model.backbone.get_layer("transformer_layer_0").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    mixed, mixed_loss = _step_with(mirrored, bf16, weights, windows, steps=3)
    assert all(w.dtype == np.float32 for w in mixed)
    np.testing.assert_allclose(mixed_loss[0], loss[0], rtol=2e-2)
    assert mixed_loss[-1] < mixed_loss[0]
    _assert_moved(weights, mixed)


def test_fp16_mixed_precision_with_loss_scaling_matches_float32(mirrored):
    """float16 compute under a dynamic loss scale: float32 weights, a loss
    close to the float32 run's, and it trains."""
    weights, windows = _initial_weights(), _windows()
    reference, outs = _float32_reference(mirrored), []
    loss, exact_outs = reference["losses"], reference["outs"]
    # Without XLA, tfdp's default for fp16 on CPUs (tfdp.step.default_jit_compile).
    fp16 = Config(**{**CFG.__dict__, "mixed_precision": "fp16", "jit_compile": False})
    mixed, mixed_loss = _step_with(mirrored, fp16, weights, windows, steps=3,
                                   loss_scale=DynamicLossScale, outs=outs)
    assert all(w.dtype == np.float32 for w in mixed)
    assert not any(o["overflow"] for o in outs)
    assert outs[-1]["scale"] == 2.0 ** 15
    np.testing.assert_allclose(mixed_loss[0], loss[0], rtol=2e-2)
    # The gradient is unscaled before anything uses it (Adam alone would not
    # tell: its update is nearly invariant to the gradient's scale).
    np.testing.assert_allclose(outs[0]["grad_norm"], exact_outs[0]["grad_norm"], rtol=5e-2)
    assert mixed_loss[-1] < mixed_loss[0]
    _assert_moved(weights, mixed)


def test_fp16_overflow_skips_the_update_and_halves_the_scale(mirrored):
    """A scale so large that float16 gradients overflow: each such step leaves
    the weights alone and halves the scale, until the gradients fit; then
    updates resume, and `growth_interval` finite steps double the scale."""
    fp16 = Config(**{**CFG.__dict__, "mixed_precision": "fp16"})  # XLA: as on GPUs
    weights, outs = _initial_weights(), []
    _step_with(mirrored, fp16, weights, np.concatenate([_windows(s) for s in range(3)]),
               steps=10, outs=outs,
               loss_scale=lambda: DynamicLossScale(initial_scale=2.0 ** 24, growth_interval=3))
    flags = [o["overflow"] for o in outs]
    assert flags[0] and False in flags, flags
    first_ok = flags.index(False)
    assert not any(flags[first_ok:first_ok + 3]), flags
    for before, o in zip([{"weights": weights}] + outs, outs[:first_ok]):
        assert all(np.array_equal(a, b) for a, b in zip(before["weights"], o["weights"]))
    assert [o["scale"] for o in outs[:first_ok]] == [2.0 ** (23 - i) for i in range(first_ok)]
    _assert_moved(outs[first_ok - 1]["weights"], outs[first_ok]["weights"])
    fit = outs[first_ok - 1]["scale"]
    assert outs[first_ok + 2]["scale"] == 2 * fit  # the third finite step in a row grows it


def test_xla_is_on_by_default_except_16_bit_compute_on_cpus(mirrored):
    """Measured in benchmarks/throughput.py: on CPUs XLA misses the bfloat16
    matrix units TensorFlow's own kernels use; on GPUs it stays on."""
    from types import SimpleNamespace
    from tfdp.step import default_jit_compile
    gpus = SimpleNamespace(extended=SimpleNamespace(
        worker_devices=("/job:localhost/replica:0/task:0/device:GPU:0",)))
    assert [default_jit_compile(p, mirrored) for p in ("off", "bf16", "fp16")] == [
        True, False, False]
    assert [default_jit_compile(p, gpus) for p in ("off", "bf16", "fp16")] == [True] * 3
