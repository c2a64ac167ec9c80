"""FLOPs per token, a measured matmul peak, and model FLOPs utilisation.

FLOPs per token = 6N + 12*L*H*Q*T (nanoGPT's `estimate_mfu`, after the PaLM
paper's appendix B): 6N for the forward and backward matmuls of the N
non-embedding parameters, 12*L*H*Q*T for attention scores and values with L
layers, H heads of size Q and context T. Attention is counted in full, not
halved for the causal mask, as nanoGPT and PaLM do.

The peak is measured, not looked up: a square matmul timed on one device of
the strategy in the same process. On a CPU split into logical devices all
replicas share the same cores, so the machine's peak is that one figure; on
GPUs it is multiplied by the number of devices. A run keeps what it measured
for this machine, device and dtype in `$XDG_CACHE_HOME/tfdp/peak_flops.json`
(~/.cache/...), so the next run starts without the probe; delete that file
to measure again (after a hardware or driver change).

TensorFlow loads only when a peak is measured: tfdp-plan's arithmetic
imports this module without it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def flops_per_token(non_embedding_params: int, num_layers: int, num_heads: int,
                    head_dim: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def measure_matmul_flops(device: str = "/cpu:0", size: int = 1024, dtype="float32",
                         seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of a size x size matmul on `device`."""
    import tensorflow as tf

    dtype = tf.as_dtype(dtype)
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


def machine_peak_flops(strategy, dtype="float32", cache: bool = True) -> float:
    """Peak FLOP/s of all devices the job trains on, for matmuls in `dtype`
    (the compute dtype: bfloat16 under --mixed_precision=bf16; see module doc).

    Measured on this process's devices and scaled by the number of workers
    (replicas in sync / local replicas), assuming identical workers, so
    that it matches a tokens/s figure counted over the whole job. With
    `cache`, a figure this machine measured before is reused (module doc).
    """
    devices = strategy.extended.worker_devices
    workers = strategy.num_replicas_in_sync / len(devices)
    gpus = [d for d in devices if "GPU" in d.upper()]
    device, size = (gpus[0], 4096) if gpus else (devices[0], 1024)
    measure = lambda: measure_matmul_flops(device, size=size, dtype=dtype)  # noqa: E731
    peak = _cached(device, size, dtype, measure) if cache else measure()
    return peak * (len(gpus) if gpus else 1) * workers


def _cache_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache) / "tfdp" / "peak_flops.json"


def _cached(device: str, size: int, dtype, measure) -> float:
    """`measure()`'s figure for this machine, device kind and dtype, from the
    cache file when it has one; a missing, unreadable or unwritable cache
    only costs a measurement."""
    import tensorflow as tf

    kind = "GPU" if "GPU" in device.upper() else "CPU"
    name = platform.processor() or platform.machine()
    if kind == "GPU":
        physical = tf.config.list_physical_devices("GPU")
        name = tf.config.experimental.get_device_details(physical[0]).get(
            "device_name", "GPU") if physical else "GPU"
    else:  # the CPU's model and how many cores this process may use
        try:
            with open("/proc/cpuinfo", errors="replace") as f:
                models = [line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")]
        except OSError:  # not Linux
            models = []
        name = f"{models[0] if models else name} x{len(os.sched_getaffinity(0))}"
    key = f"{platform.node()}|{kind}|{name}|{tf.as_dtype(dtype).name}|{size}"
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
        return float(known[key])
    peak = measure()
    try:
        from tfdp.atomic import write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(str(path), json.dumps({**(known if isinstance(known, dict) else {}),
                                          key: peak}, indent=2))
    except OSError:
        pass
    return peak
