"""The dynamic loss scale that --mixed_precision=fp16 trains with.

float16 holds magnitudes from about 6e-8 to 65504. Many activation
gradients of a language model are smaller than that and would flush to
zero in the backward pass. Multiplying the loss by S before
differentiating multiplies every gradient by S (chain rule) and lifts them
into range; the float32 weight gradients are divided by S again before the
all-reduce, so clipping, the reported gradient norm and the update never
see the scale.

S adapts as training goes (Micikevicius et al. 2018, "Mixed Precision
Training", with the constants of Keras' LossScaleOptimizer): a step whose
gradients overflow (Inf or NaN while the loss itself is finite) is skipped
and halves S, and 2000 finite steps in a row double it. Unlike Keras, S
never drops below 1: a gradient that overflows even unscaled, or a loss
that is itself NaN or Inf, is treated as a fault, not as a scale to
shrink, by tfdp's non-finite handling (stop, or --skip_nonfinite_steps).

bfloat16 has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import tensorflow as tf

INITIAL_SCALE = 2.0 ** 15
GROWTH_INTERVAL = 2000


class DynamicLossScale(tf.Module):
    """S and the count of finite steps since it last changed, as variables
    (create them inside `strategy.scope()`; they are checkpointed, so a
    resumed run continues with the same S)."""

    def __init__(self, initial_scale: float = INITIAL_SCALE,
                 growth_interval: int = GROWTH_INTERVAL):
        super().__init__(name="loss_scale")
        # Every replica computes the same new value from all-reduced figures;
        # ONLY_FIRST_REPLICA makes an assignment in a replica step one write.
        same = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, name="scale", **same)
        self.good_steps = tf.Variable(0, dtype=tf.int64, name="good_steps", **same)
        self.growth_interval = growth_interval

    def overflowed(self, loss, grad_norm):
        """Whether this step's non-finite gradients are the scale's doing."""
        return (tf.math.is_finite(loss) & tf.logical_not(tf.math.is_finite(grad_norm))
                & (self.scale > 1.0))

    def update(self, overflow, finite) -> None:
        """After a step: halve S on an overflow, count a `finite` step and
        double S after `growth_interval` of them in a row; a step that is
        neither (a NaN loss) leaves both alone. Both flags must be the same on
        every replica (they come from all-reduced figures)."""
        good = tf.where(overflow, tf.zeros_like(self.good_steps),
                        tf.where(finite, self.good_steps + 1, self.good_steps))
        grow = good >= self.growth_interval
        self.scale.assign(tf.where(overflow, tf.maximum(self.scale * 0.5, 1.0),
                                   tf.where(grow, self.scale * 2.0, self.scale)))
        self.good_steps.assign(tf.where(grow, tf.zeros_like(good), good))
