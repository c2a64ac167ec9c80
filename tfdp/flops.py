"""FLOPs per token, a measured matmul peak, and model FLOPs utilisation.

FLOPs per token = 6N + 12*L*H*Q*T (nanoGPT's `estimate_mfu`, after the PaLM
paper's appendix B): 6N for the forward and backward matmuls of the N
non-embedding parameters, 12*L*H*Q*T for attention scores and values with L
layers, H heads of size Q and context T. Attention is counted in full, not
halved for the causal mask, as nanoGPT and PaLM do.

The peak is measured, not looked up: a square matmul timed on one device of
the strategy in the same process. On a CPU split into logical devices all
replicas share the same cores, so the machine's peak is that one figure; on
GPUs it is multiplied by the number of devices.
"""

from __future__ import annotations

import time

import tensorflow as tf


def flops_per_token(non_embedding_params: int, num_layers: int, num_heads: int,
                    head_dim: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def measure_matmul_flops(device: str = "/cpu:0", size: int = 1024, dtype=tf.float32,
                         seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of a size x size matmul on `device`."""
    with tf.device(device):
        a = tf.random.normal([size, size], dtype=dtype)
        b = tf.random.normal([size, size], dtype=dtype)

        @tf.function
        def chain(x, y):
            for _ in range(8):  # several matmuls per call hide dispatch cost
                x = tf.matmul(x, y) * 1e-3
            return x
        chain(a, b).numpy()  # trace and warm up
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            chain(a, b).numpy()
            best = max(best, 8 * 2.0 * size ** 3 / (time.perf_counter() - start))
    return best


def machine_peak_flops(strategy: tf.distribute.Strategy, dtype=tf.float32) -> float:
    """Peak FLOP/s of all devices the job trains on, for matmuls in `dtype`
    (the compute dtype: bfloat16 under --mixed_precision=bf16; see module doc).

    Measured on this process's devices and scaled by the number of workers
    (replicas in sync / local replicas), assuming identical workers, so
    that it matches a tokens/s figure counted over the whole job.
    """
    devices = strategy.extended.worker_devices
    workers = strategy.num_replicas_in_sync / len(devices)
    gpus = [d for d in devices if "GPU" in d.upper()]
    if gpus:
        return measure_matmul_flops(gpus[0], size=4096, dtype=dtype) * len(gpus) * workers
    return measure_matmul_flops(devices[0], dtype=dtype) * workers
