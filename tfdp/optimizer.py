"""AdamW with warmup + cosine decay, for gradients tfdp has already reduced.

Why a subclass: inside a replica context Keras 3's optimizer clips each
replica's *local* gradient and then all-reduces. Global-norm clipping must
see the averaged gradient, so tfdp's step all-reduces first, clips, and
hands the optimizer gradients that are already identical on every replica;
this optimizer therefore skips its own all-reduce (doing both would
communicate twice and scale the update by the number of replicas).
"""

from __future__ import annotations

import math

import keras


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay towards `floor`, reached at
    step `total_steps` (the last step trained, total_steps - 1, is just above it)."""

    def __init__(self, peak: float, floor: float, warmup_steps: int, total_steps: int):
        self.peak, self.floor = float(peak), float(floor)
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = self.floor + 0.5 * (self.peak - self.floor) * (
            1.0 + keras.ops.cos(math.pi * progress))
        return keras.ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "floor": self.floor,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


class ReducedGradientAdamW(keras.optimizers.AdamW):
    """AdamW that trusts its gradients to be all-reduced already."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


# The override above only works while Keras' TF optimizer has that hook; if
# a Keras release renames it, gradients would be summed twice silently.
if not any("_all_reduce_sum_gradients" in vars(base)
           for base in keras.optimizers.AdamW.__mro__):
    raise ImportError(f"Keras {keras.__version__} has no optimizer hook "
                      "_all_reduce_sum_gradients; install the Keras version setup.py names")


def build_optimizer(cfg, variables) -> ReducedGradientAdamW:
    """Build (inside the strategy scope) and create its slot variables.

    Weight decay applies to matrices only: biases and LayerNorm scales are
    left alone, as in GPT-2 and nanoGPT.
    """
    optimizer = ReducedGradientAdamW(
        learning_rate=WarmupCosine(cfg.learning_rate, cfg.min_learning_rate,
                                   cfg.warmup_steps, cfg.train_steps),
        weight_decay=cfg.weight_decay, beta_1=0.9, beta_2=cfg.beta2, epsilon=1e-8)
    optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) < 2])
    optimizer.build(variables)
    return optimizer
