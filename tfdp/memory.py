"""Peak memory of this process and of its GPUs, for the progress line and
metrics.json."""

from __future__ import annotations

import resource

import tensorflow as tf


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
