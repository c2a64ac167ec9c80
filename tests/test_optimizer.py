"""tfdp/optimizer.py: the WarmupCosine schedule, the weight-decay mask, and
that ReducedGradientAdamW does not all-reduce (sum) gradients itself.

Schedule: linear warmup peak*(step+1)/warmup_steps, then cosine from peak at
step warmup_steps to floor at step total_steps, floor after that. Decay: only
variables of rank >= 2 (matrices, embeddings included) are decayed; biases and
LayerNorm parameters are not. Reduction: the step hands the optimizer
gradients already averaged over replicas, so under a 2-replica
MirroredStrategy an update must equal the single-device one, where plain
Keras AdamW would sum the two replicas' copies and move as for 2x the gradient.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdp.config import Config
from tfdp.model import build_model
from tfdp.optimizer import ReducedGradientAdamW, WarmupCosine, build_optimizer

PEAK, FLOOR, WARMUP, TOTAL = 1.0, 0.1, 10, 110


def lr(schedule, step):
    return float(schedule(step))


@pytest.fixture
def schedule():
    return WarmupCosine(PEAK, FLOOR, WARMUP, TOTAL)


# WarmupCosine

def test_step_zero_is_one_warmup_increment(schedule):
    assert lr(schedule, 0) == pytest.approx(PEAK / WARMUP)  # 0.1, not 0


def test_mid_warmup_is_linear(schedule):
    assert lr(schedule, 4) == pytest.approx(0.5 * PEAK)  # (4+1)/10
    assert lr(schedule, 6) == pytest.approx(0.7 * PEAK)


def test_end_of_warmup_reaches_the_peak(schedule):
    assert lr(schedule, WARMUP - 1) == pytest.approx(PEAK)  # last warmup step
    assert lr(schedule, WARMUP) == pytest.approx(PEAK)  # first cosine step, progress 0


def test_cosine_middle_and_quarter(schedule):
    # Halfway through the 100 cosine steps: floor + (peak - floor) / 2.
    assert lr(schedule, WARMUP + 50) == pytest.approx((PEAK + FLOOR) / 2)
    quarter = FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi / 4))
    assert lr(schedule, WARMUP + 25) == pytest.approx(quarter)


def test_end_is_min_learning_rate_and_last_trained_step_just_above(schedule):
    assert lr(schedule, TOTAL) == pytest.approx(FLOOR)
    last = FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * 99 / 100))
    assert lr(schedule, TOTAL - 1) == pytest.approx(last, rel=1e-5)
    assert FLOOR < lr(schedule, TOTAL - 1) < FLOOR + 1e-3


def test_past_the_end_stays_at_the_floor(schedule):
    for step in (TOTAL + 1, 2 * TOTAL, 10**6):
        assert lr(schedule, step) == pytest.approx(FLOOR)


def test_no_warmup_starts_at_the_peak():
    s = WarmupCosine(2e-3, 2e-4, 0, 100)
    assert lr(s, 0) == pytest.approx(2e-3)
    assert lr(s, 50) == pytest.approx(1.1e-3)  # progress 50/100
    assert lr(s, 100) == pytest.approx(2e-4)
    assert lr(s, 1000) == pytest.approx(2e-4)


def test_one_warmup_step_is_already_the_peak():
    assert lr(WarmupCosine(1.0, 0.0, 1, 11), 0) == pytest.approx(1.0)


def test_shape_over_all_steps(schedule):
    steps = np.arange(0, TOTAL + 20)
    values = np.asarray(schedule(steps))
    np.testing.assert_allclose(values[:WARMUP], PEAK * (steps[:WARMUP] + 1) / WARMUP,
                               rtol=1e-6)
    assert np.all(np.diff(values[:WARMUP]) > 0)  # warmup rises
    assert np.all(np.diff(values[WARMUP:]) <= 1e-7)  # decay never rises
    assert values.max() == pytest.approx(PEAK) and values.min() == pytest.approx(FLOOR)


def test_integer_variable_steps_as_the_optimizer_passes_them(schedule):
    step = tf.Variable(WARMUP + 50, dtype=tf.int64)
    assert lr(schedule, step) == pytest.approx((PEAK + FLOOR) / 2)


def test_get_config_round_trips(schedule):
    assert schedule.get_config() == {"peak": PEAK, "floor": FLOOR,
                                     "warmup_steps": WARMUP, "total_steps": TOTAL}
    again = WarmupCosine.from_config(schedule.get_config())
    for step in (0, 5, WARMUP, 60, TOTAL, 500):
        assert lr(again, step) == lr(schedule, step)


def test_build_optimizer_uses_the_config_schedule():
    cfg = Config(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=5, train_steps=25)
    optimizer = build_optimizer(cfg, [keras.Variable(np.zeros((2, 2), np.float32))])
    assert isinstance(optimizer, ReducedGradientAdamW)
    assert optimizer._learning_rate.get_config() == {
        "peak": 3e-3, "floor": 3e-4, "warmup_steps": 5, "total_steps": 25}
    assert float(optimizer.learning_rate) == pytest.approx(3e-3 / 5)  # step 0
    assert optimizer.weight_decay == pytest.approx(cfg.weight_decay)
    assert optimizer.beta_2 == pytest.approx(cfg.beta2)


# Weight-decay mask

DECAY_CFG = Config(learning_rate=0.1, min_learning_rate=0.01, warmup_steps=0, train_steps=10,
                   weight_decay=0.5)
DECAYED = 1.0 - 0.5 * 0.1  # one AdamW step with a zero gradient: w <- w - w*wd*lr


def _one_zero_gradient_step(variables):
    """With a zero gradient Adam's update is 0, so only weight decay moves a weight."""
    optimizer = build_optimizer(DECAY_CFG, variables)
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in variables])


def test_decay_applies_to_matrices_not_vectors():
    shapes = {"kernel": (3, 4), "embeddings": (5, 3), "conv": (2, 2, 3),
              "bias": (4,), "gamma": (3,), "beta": (3,), "scalar": ()}
    variables = {name: keras.Variable(np.ones(shape, np.float32), name=name)
                 for name, shape in shapes.items()}
    _one_zero_gradient_step(list(variables.values()))
    for name, var in variables.items():
        want = DECAYED if len(shapes[name]) >= 2 else 1.0
        np.testing.assert_allclose(var.numpy(), np.full(shapes[name], want), rtol=1e-6,
                                   err_msg=name)


def test_decay_mask_on_the_gpt_model():
    cfg = Config(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, seq_len=8)
    model = build_model(cfg, 11)
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    _one_zero_gradient_step(variables)
    kinds = set()
    for var, old in zip(variables, before):
        decayed = len(var.shape) >= 2
        kinds.add((var.name, decayed))
        np.testing.assert_allclose(var.numpy(), old * (DECAYED if decayed else 1.0),
                                   rtol=1e-6, atol=1e-7, err_msg=var.path)
    names = {name for name, _ in kinds}
    # The model has all the kinds the docstring names: decayed kernels and
    # embeddings, undecayed biases and LayerNorm gamma/beta.
    assert ("embeddings", True) in kinds and ("kernel", True) in kinds
    assert ("bias", False) in kinds and ("gamma", False) in kinds and "beta" in names


# No all-reduce inside the optimizer

G = 1e-7  # Adam's first step is lr*g/(|g| + eps/sqrt(1-beta2)): g vs 2g differ only near eps


def _adam_first_step(lr_, g, beta2=DECAY_CFG.beta2, eps=1e-8):
    return -lr_ * g / (abs(g) + eps / math.sqrt(1.0 - beta2))


def _update_under(strategy, make_optimizer):
    """One replica-context apply_gradients of the same gradient G on every replica."""
    with strategy.scope():
        var = keras.Variable(np.zeros(3, np.float32))
        optimizer = make_optimizer([var])

    @tf.function
    def step():
        strategy.run(lambda: optimizer.apply_gradients([(tf.fill([3], G), var)]))
    step()
    return var.numpy()


def _reduced(variables):
    cfg = Config(learning_rate=0.1, min_learning_rate=0.01, warmup_steps=0, train_steps=10,
                 weight_decay=0.0)
    return build_optimizer(cfg, variables)


def _plain(variables):
    optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.0,
                                       beta_2=DECAY_CFG.beta2, epsilon=1e-8)
    optimizer.build(variables)
    return optimizer


def test_hand_formula_tells_g_from_2g():
    assert _adam_first_step(0.1, G) == pytest.approx(-0.05)
    assert _adam_first_step(0.1, 2 * G) == pytest.approx(-0.1 * 2 / 3)


def test_reduced_optimizer_applies_the_gradient_as_given_on_two_replicas(mirrored, one_device):
    assert mirrored.num_replicas_in_sync == 2
    want = np.full(3, _adam_first_step(0.1, G), np.float32)
    np.testing.assert_allclose(_update_under(one_device, _reduced), want, rtol=1e-4)
    np.testing.assert_allclose(_update_under(mirrored, _reduced), want, rtol=1e-4)


def test_plain_keras_adamw_sums_the_replicas_which_tfdp_avoids(mirrored):
    # The control that makes the test above meaningful: Keras' own AdamW
    # all-reduces (sums) in replica context, so it steps as for 2*G.
    got = _update_under(mirrored, _plain)
    np.testing.assert_allclose(got, np.full(3, _adam_first_step(0.1, 2 * G)), rtol=1e-4)


def test_reduce_hook_returns_gradients_unchanged():
    optimizer = ReducedGradientAdamW(learning_rate=0.1)
    pairs = [(tf.constant([1.0]), "a"), (tf.constant([2.0]), "b")]
    assert optimizer._all_reduce_sum_gradients(iter(pairs)) == pairs
