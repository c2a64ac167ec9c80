"""tfdp/flops.py: the FLOPs-per-token formula and how the peak is scaled.

`flops_per_token` is checked against hand-computed values of its docstring's
formula (nanoGPT's 6N + 12*L*H*Q*T); `machine_peak_flops` is checked for
which device it measures and how it multiplies the figure, with the matmul
benchmark replaced by a stub; `measure_matmul_flops` itself runs once on a
small matrix for a fraction of a second.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import tensorflow as tf

from tfdp import flops
from tfdp.flops import flops_per_token, machine_peak_flops, measure_matmul_flops


@pytest.mark.parametrize("args, expected", [
    # N=1000, L=2, H=4, Q=16, T=64:  6*1000 + 12*2*4*16*64 = 6000 + 98304
    ((1000, 2, 4, 16, 64), 104_304.0),
    # tfdp's default job shape, L=4, H=4, Q=128/4=32, T=128, N=800,000:
    # 4,800,000 + 12*4*4*32*128 = 4,800,000 + 786,432
    ((800_000, 4, 4, 32, 128), 5_586_432.0),
    # GPT-2 small (nanoGPT's example): N=85,054,464 non-embedding, L=H=12, Q=64, T=1024:
    # 510,326,784 + 113,246,208
    ((85_054_464, 12, 12, 64, 1024), 623_572_992.0),
])
def test_flops_per_token_matches_the_hand_computed_formula(args, expected):
    assert flops_per_token(*args) == expected


def test_flops_per_token_splits_into_parameter_and_attention_terms():
    # No parameters: only the attention term 12*L*H*Q*T is left ...
    assert flops_per_token(0, 3, 2, 8, 10) == 12 * 3 * 2 * 8 * 10
    # ... and no context: only 6 FLOPs per parameter (2 forward, 4 backward).
    assert flops_per_token(12_345, 3, 2, 8, 0) == 6 * 12_345


def test_flops_per_token_grows_linearly_with_seq_len():
    n, L, H, Q = 50_000, 2, 4, 16
    slope = 12 * L * H * Q
    values = [flops_per_token(n, L, H, Q, t) for t in (32, 64, 128, 256)]
    assert values == [6 * n + slope * t for t in (32, 64, 128, 256)]
    # Doubling the context adds exactly the attention term once more; the 6N
    # part does not change.
    assert values[1] - values[0] == slope * 32
    assert values[3] - values[2] == slope * 128
    assert values == sorted(values) and len(set(values)) == 4


def test_flops_per_token_attention_is_not_halved_for_the_causal_mask():
    # The docstring counts attention in full, as nanoGPT and PaLM do: with one
    # layer, one head, Q=1 and T=1 the attention term is 12, not 6.
    assert flops_per_token(0, 1, 1, 1, 1) == 12.0


def test_flops_per_token_returns_a_float_for_integer_inputs():
    assert isinstance(flops_per_token(1, 1, 1, 1, 1), float)


def _fake_strategy(devices, replicas):
    return SimpleNamespace(extended=SimpleNamespace(worker_devices=tuple(devices)),
                           num_replicas_in_sync=replicas)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Replace the benchmark with a stub returning 1e9 FLOP/s; record its calls.
    The cache of measured peaks is a fresh one: the stub's figure must not
    reach the session's real runs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def fake(device="/cpu:0", size=1024, dtype=tf.float32, seconds=1.0):
        calls.append({"device": device, "size": size, "dtype": dtype})
        return 1e9
    monkeypatch.setattr(flops, "measure_matmul_flops", fake)
    return calls


def test_peak_on_cpu_logical_devices_is_one_device_figure(measured):
    # Two logical CPU replicas share the same cores: the peak is not doubled.
    cpu = ["/job:localhost/replica:0/task:0/device:CPU:0",
           "/job:localhost/replica:0/task:0/device:CPU:1"]
    assert machine_peak_flops(_fake_strategy(cpu, 2)) == 1e9
    assert measured == [{"device": cpu[0], "size": 1024, "dtype": tf.float32}]


def test_peak_on_gpus_is_multiplied_by_gpus_and_workers(measured):
    gpus = [f"/job:worker/replica:0/task:0/device:GPU:{i}" for i in range(4)]
    # 4 local GPUs, 12 replicas in sync: 3 identical workers -> 12 devices in all.
    assert machine_peak_flops(_fake_strategy(gpus, 12), tf.bfloat16) == 1e9 * 4 * 3
    # Measured once, on the first GPU, with the big matmul and the compute dtype.
    assert measured == [{"device": gpus[0], "size": 4096, "dtype": tf.bfloat16}]


def test_peak_on_cpu_workers_is_multiplied_by_workers(measured):
    # Multi-worker on CPUs: 2 workers with one CPU replica each.
    assert machine_peak_flops(_fake_strategy(["/job:worker/replica:0/task:1/device:CPU:0"],
                                             2)) == 2e9


def test_peak_with_a_real_one_device_strategy_measures_its_device(measured, one_device):
    assert machine_peak_flops(one_device) == 1e9
    assert len(measured) == 1 and "CPU:0" in measured[0]["device"].upper()


def test_a_measured_peak_is_cached_per_machine_and_dtype(measured, one_device, tmp_path):
    assert machine_peak_flops(one_device) == 1e9
    assert machine_peak_flops(one_device) == 1e9
    assert len(measured) == 1  # the second run read the cache
    cache = tmp_path / "cache" / "tfdp" / "peak_flops.json"
    (key, value), = json.loads(cache.read_text()).items()
    assert value == 1e9 and "|CPU|" in key and key.endswith("|float32|1024")
    machine_peak_flops(one_device, "bfloat16")  # another dtype: measured
    assert len(measured) == 2
    machine_peak_flops(one_device, cache=False)  # asked not to use it
    assert len(measured) == 3
    cache.write_text("{not json")  # a damaged cache costs a measurement, no error
    assert machine_peak_flops(one_device) == 1e9 and len(measured) == 4


def test_measure_matmul_flops_gives_a_plausible_positive_rate():
    rate = measure_matmul_flops("/cpu:0", size=64, seconds=0.05)
    assert math.isfinite(rate)
    # At least one timed call ran (else 0.0), and no CPU does 100 TFLOP/s.
    assert 1e6 < rate < 1e14
