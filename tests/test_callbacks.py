"""The progress line and the memory figures it carries."""

from __future__ import annotations

import types

import tensorflow as tf

from tfdp.callbacks import ProgressLogger
from tfdp.loop import peak_device_memory_gib

LOGS = {"loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 12000.0,
        "tokens_per_second_per_replica": 6000.0, "step_time": 0.25, "mfu": 0.4,
        "peak_host_memory_gib": 1.5, "eta_seconds": 75.0}


def _line(logs) -> str:
    lines = []
    ProgressLogger(total_steps=10, every=5, print_fn=lines.append).on_train_batch_end(4, logs)
    assert len(lines) == 1
    return lines[0]


def test_progress_line_on_cpu(mirrored):
    assert peak_device_memory_gib(mirrored) == {}  # CPU replicas: no device memory
    assert _line(LOGS) == ("step 5/10 | loss 2.5000 | lr 1.00e-03 | 12,000 tok/s "
                           "(6,000/replica) | 250 ms/step | mfu 40.00% | mem 1.50 GiB | "
                           "eta 1m15s")


def test_device_memory_is_the_largest_peak_over_this_process_gpus(monkeypatch):
    """GPU runs report the peak allocation of the fullest GPU of the process
    (TensorFlow's allocator statistics), in the logs and the progress line."""
    peaks = {"GPU:0": 2 * 2**30, "GPU:1": 3 * 2**30}
    monkeypatch.setattr(tf.config.experimental, "get_memory_info",
                        lambda device: {"current": 0, "peak": peaks[device]})
    fake = types.SimpleNamespace(extended=types.SimpleNamespace(worker_devices=(
        "/job:worker/replica:0/task:1/device:GPU:0",
        "/job:worker/replica:0/task:1/device:GPU:1")))
    memory = peak_device_memory_gib(fake)
    assert memory == {"peak_device_memory_gib": 3.0}
    assert "| mem 1.50 GiB (GPU 3.00 GiB) |" in _line({**LOGS, **memory})
