"""tfdp-plan's cost model (tfdp/costmodel.py), machines (tfdp/machines.py),
figures (tfdp/plan.py) and its command line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import run_cli
from tfdp import costmodel, machines, plan
from tfdp.config import Config
from tfdp.errors import UserError

SHAPES = [  # (layers, heads, hidden, intermediate, vocab, seq_len)
    (4, 4, 128, 512, 257, 128),
    (1, 2, 32, 48, 100, 16),
    (3, 6, 96, 200, 8192, 64),
]


def _h100(**changes) -> machines.Hardware:
    return dataclasses.replace(machines.hardware("h100", "bf16"), **changes)


@pytest.mark.parametrize("dims", SHAPES)
def test_parameter_count_equals_the_built_model(dims):
    from tfdp.model import build_model, count_params, non_embedding_params

    layers, heads, hidden, inter, vocab, seq = dims
    model = build_model(Config(num_layers=layers, num_heads=heads, hidden_dim=hidden,
                               intermediate_dim=inter, seq_len=seq), vocab)
    shape = costmodel.Shape(*dims)
    assert costmodel.count_params(shape) == count_params(model)
    assert costmodel.non_embedding_params(shape) == non_embedding_params(model)


def test_memory_components_scale():
    small = costmodel.Job(costmodel.Shape(4, 4, 128, 512, 257, 128), 32)
    big = costmodel.Job(costmodel.Shape(8, 8, 256, 1024, 257, 128), 32)
    ratio = costmodel.count_params(big.shape) / costmodel.count_params(small.shape)
    for part in ("weights", "gradients", "optimizer"):
        assert costmodel.state_bytes(big)[part] == pytest.approx(
            ratio * costmodel.state_bytes(small)[part])
    assert costmodel.state_bytes(small)["weights"] == 4 * costmodel.count_params(small.shape)
    assert costmodel.state_bytes(small)["optimizer"] == 8 * costmodel.count_params(small.shape)
    # Accumulation adds a gradient accumulator; 16-bit compute adds the weights' casts.
    accum = costmodel.Job(small.shape, 32, grad_accum_steps=2)
    assert costmodel.state_bytes(accum)["gradients"] == (
        2 * costmodel.state_bytes(small)["gradients"])
    assert costmodel.state_bytes(costmodel.Job(small.shape, 32, "bf16"))["compute_copies"] == (
        2 * costmodel.count_params(small.shape))
    # Activations grow linearly with the micro-batch ...
    one = costmodel.activation_bytes(small.shape, 1, "off")
    assert costmodel.activation_bytes(small.shape, 7, "off") == pytest.approx(7 * one)
    # ... and a layer's take half the bytes in bf16 (the loss stays float32).
    two_layers = dataclasses.replace(small.shape, num_layers=2)
    one_layer = dataclasses.replace(small.shape, num_layers=1)

    def per_layer(precision):
        return (costmodel.activation_bytes(two_layers, 4, precision)
                - costmodel.activation_bytes(one_layer, 4, precision))
    assert per_layer("bf16") == pytest.approx(per_layer("off") / 2)
    # Korthikanti et al.'s 34sbh + 5as^2b bytes less dropout's 2sbh + 3as^2b, at 16 bits.
    s, b, h, a = 128, 4, 128, 4
    assert per_layer("bf16") == 32 * s * b * h + 2 * a * s * s * b


def test_ring_allreduce_formula():
    assert costmodel.ring_allreduce_seconds(1e9, 1, 1e9, 1e-3) == 0.0
    assert costmodel.ring_allreduce_seconds(1e9, 2, 1e9, 0.0) == pytest.approx(1.0)
    assert costmodel.ring_allreduce_seconds(1e9, 8, 1e9, 0.0) == pytest.approx(1.75)
    assert costmodel.ring_allreduce_seconds(0, 8, 1e9, 1e-3) == pytest.approx(14e-3)
    hw = _h100(intra_bandwidth=100e9, inter_bandwidth=10e9, intra_latency_s=0.0,
               inter_latency_s=0.0)
    shape = costmodel.Shape()
    # Hierarchical: a ring inside the node, then one across nodes.
    job = costmodel.Job(shape, 64, num_workers=4, devices_per_worker=8)
    assert costmodel.allreduce_seconds(job, hw, 1e9) == pytest.approx(1.75e-2 + 1.5e-1)
    flat = costmodel.Job(shape, 64, num_workers=4, devices_per_worker=1)
    assert costmodel.allreduce_seconds(flat, hw, 1e9) == pytest.approx(1.5e-1)


def test_single_replica_is_fully_efficient():
    figures = plan.plan(costmodel.Job(costmodel.Shape(), 32), _h100())
    assert figures["allreduce_time_s"] == 0.0
    assert figures["efficiency"] == 1.0
    assert figures["step_time_s"] == pytest.approx(figures["compute_time_s"]
                                                   + figures["fixed_time_s"])
    several = plan.plan(costmodel.Job(costmodel.Shape(), 32, num_workers=2, devices_per_worker=2),
                        _h100())
    assert 0 < several["efficiency"] < 1
    # The same per-replica work: the same compute time.
    assert several["compute_time_s"] == pytest.approx(figures["compute_time_s"] / 4)


def test_waiting_for_the_slowest_and_contention():
    assert costmodel.expected_max_normal(1) == 0.0
    assert costmodel.expected_max_normal(2) == pytest.approx(0.5642, abs=1e-4)
    assert costmodel.expected_max_normal(8) == pytest.approx(1.4236, rel=0.03)  # exact value
    job = costmodel.Job(costmodel.Shape(), 32, num_workers=2, devices_per_worker=1)
    hw = _h100(step_cv=0.1)
    figures = plan.plan(job, hw)
    busy = figures["compute_time_s"] + figures["fixed_time_s"]
    assert figures["wait_time_s"] == pytest.approx(0.1 * busy / 3.141592653589793 ** 0.5)
    # Contention slows the job's compute, not one replica's alone: efficiency drops.
    slow = plan.plan(job, _h100(step_cv=0.1, contention=2.0))
    assert slow["compute_time_s"] == pytest.approx(2 * figures["compute_time_s"])
    assert slow["efficiency"] < figures["efficiency"]
    # A CPU's logical replicas share one process: no waiting among them.
    cpu = machines.hardware("cpu", tflops=0.1)
    one_worker = costmodel.Job(costmodel.Shape(), 32, num_workers=1, devices_per_worker=2)
    assert plan.plan(one_worker, dataclasses.replace(cpu, step_cv=0.2))["wait_time_s"] == 0


def test_largest_batch_fits_and_one_more_does_not():
    shape = costmodel.Shape(12, 12, 768, 3072, 50257, 1024)
    job = costmodel.Job(shape, 64, "bf16", num_workers=1, devices_per_worker=8)
    for hw in (_h100(), machines.hardware("l4", "bf16"), machines.hardware("a100-40gb", "off")):
        largest = costmodel.largest_micro_batch(job, hw)
        assert largest > 0
        assert costmodel.memory_bytes(job, hw, largest)["fits"]
        assert not costmodel.memory_bytes(job, hw, largest + 1)["fits"]
    tiny = dataclasses.replace(_h100(), memory_bytes=1e9)
    assert costmodel.largest_micro_batch(job, tiny) == 0


def test_hardware_presets_and_overrides():
    assert machines.hardware("a100", "bf16").peak_flops == 312e12
    assert machines.hardware("a100", "off").peak_flops == 156e12  # TF32, TensorFlow's default
    assert (machines.hardware("h200", "bf16").peak_flops
            == machines.hardware("h100", "bf16").peak_flops)
    assert machines.hardware("h200", "bf16").memory_bytes == 141 * machines.GIB
    assert machines.hardware("a100", "bf16", tflops=100).peak_flops == 100e12
    assert machines.hardware("cpu", tflops=0.5).shares_compute
    with pytest.raises(UserError, match="--calibrate"):
        machines.hardware("cpu")
    with pytest.raises(UserError, match="a100, a100-40gb, h100"):
        machines.hardware("tpu")


def test_json_has_the_figures():
    result = run_cli("tfdp-plan", "--device=h100", "--devices_per_worker=8",
                     "--num_workers=2", "--global_batch_size=64", "--mixed_precision=bf16",
                     "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("num_parameters", "memory_per_replica_gib", "fits", "step_time_s",
                "compute_time_s", "allreduce_time_s", "efficiency", "tokens_per_second",
                "tokens_per_day", "largest_micro_batch_that_fits", "flops_per_step"):
        assert key in figures
    assert figures["num_parameters"] == 842624 and figures["fits"] is True
    assert figures["replicas"] == 16 and 0 < figures["efficiency"] < 1
    table = run_cli("tfdp-plan", "--device=l4", timeout=120)
    assert table.returncode == 0 and "step time" in table.stdout


@pytest.mark.parametrize("args, says", [
    (["--num_heads=3"], "not divisible by --num_heads=3"),
    (["--global_batch_size=30", "--devices_per_worker=4"], "is not divisible by the 4 replicas"),
    (["--global_batch_size=8", "--devices_per_worker=2", "--grad_accum_steps=3"],
     "use a multiple of 6"),
    (["--device=tpu9"], "a100, a100-40gb, h100, h200, v100, l4"),
    (["--num_layers=0"], "--num_layers=0 must be a positive"),
    (["--global_batch_size=-4"], "--global_batch_size=-4 must be a positive"),
    (["--device_tflops=-1"], "--device_tflops=-1.0 must be a positive"),
])
def test_bad_input_is_one_line_exit_2(args, says):
    extra = [] if any(a.startswith("--device=") for a in args) else ["--device=a100"]
    result = run_cli("tfdp-plan", *extra, *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tfdp-plan: error: ") and says in lines[0]


def test_overhead_of_a_large_model_is_extrapolated_per_parameter(monkeypatch):
    """Over OVERHEAD_MAX_PARAMS, calibration times two narrower models of the
    planned depth and extends their line in the parameter count; below it,
    the planned model itself. Fake timings linear in the parameters (plus an
    all-reduce the overhead must leave out) must come back exactly."""
    from tfdp import probes

    timed = []

    def fake_step(cfg, vocab, strategy, replicas, jit):
        shape = costmodel.Shape(cfg.num_layers, cfg.num_heads, cfg.hidden_dim,
                           cfg.intermediate_dim, vocab, cfg.seq_len)
        timed.append(costmodel.count_params(shape))
        return 0.004 + 2e-9 * timed[-1] + 1e-9 * costmodel.gradient_bytes(shape)

    monkeypatch.setattr(probes, "whole_step", fake_step)
    monkeypatch.setattr(probes, "time_allreduce", lambda strategy, nbytes: (1e-9 * nbytes, True))
    big = costmodel.Shape(12, 12, 768, 3072, 50257, 1024)  # GPT-2 small, 124M parameters
    n = costmodel.count_params(big)
    assert n > probes.OVERHEAD_MAX_PARAMS
    overhead = probes.step_overhead(big, "off", None, 2, True)
    assert len(timed) == 2 and max(timed) <= probes.OVERHEAD_MAX_PARAMS
    assert overhead == pytest.approx(0.004 + 2e-9 * n)
    timed.clear()
    small = costmodel.Shape()
    assert probes.step_overhead(small, "off", None, 1, True) == pytest.approx(
        0.004 + 2e-9 * costmodel.count_params(small) + 1e-9 * costmodel.gradient_bytes(small))
    assert timed == [costmodel.count_params(small)]  # one replica: no all-reduce to leave out


@pytest.mark.slow
def test_calibrated_cpu_plan():
    result = run_cli("tfdp-plan", "--device=cpu", "--num_layers=2", "--hidden_dim=64",
                     "--intermediate_dim=128", "--seq_len=32", "--global_batch_size=8",
                     "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["calibrated"] and figures["replicas"] == 2
    assert 0 < figures["compute_efficiency"] < 2 and figures["fixed_time_s"] >= 0
    assert figures["framework_memory_gib"] > 0.1 and figures["step_time_s"] > 0
    assert figures["step_time_cv"] >= 0 and figures["wait_time_s"] == 0  # one worker


@pytest.mark.slow
def test_calibrated_two_worker_plan_on_loopback():
    result = run_cli("tfdp-plan", "--device=cpu", "--num_workers=2", "--cpu_threads_per_worker=1",
                     "--num_layers=1", "--hidden_dim=32", "--num_heads=2",
                     "--intermediate_dim=64", "--seq_len=32", "--global_batch_size=4",
                     "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["replicas"] == 2 and figures["allreduce_time_s"] > 0
    # Measured ratios: noise on a shared machine can put either side of 1.
    assert figures["contention"] > 0 and figures["efficiency"] > 0
    assert figures["wait_time_s"] > 0 and figures["fixed_time_s"] >= 0
    assert figures["interconnect_gbps"] > 0
