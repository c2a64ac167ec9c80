"""tfdp-plan: will this data-parallel job fit, and how fast will it train?

`validate` refuses impossible flags, `plan` gathers every figure the
command prints from the cost model (tfdp/costmodel.py, whose module doc
gives the formulas) on a machine's constants (tfdp/machines.py), and
`format_plan` lays them out as the table.
"""

from __future__ import annotations

import dataclasses

from tfdp.costmodel import (MARGIN, Job, allreduce_seconds, compute_seconds, count_params,
                            gradient_bytes, largest_micro_batch, memory_bytes,
                            non_embedding_params, step_flops, wait_seconds)
from tfdp.errors import UserError
from tfdp.machines import GIB, Hardware


def validate(job: Job) -> None:
    """One UserError for the first impossible value, naming the flag."""
    shape = job.shape
    for name, value in [*dataclasses.asdict(shape).items(),
                        ("global_batch_size", job.global_batch_size),
                        ("grad_accum_steps", job.grad_accum_steps),
                        ("num_workers", job.num_workers),
                        ("devices_per_worker", job.devices_per_worker)]:
        if value <= 0:
            raise UserError(f"--{name}={value} must be a positive integer; pass a value >= 1")
    if shape.hidden_dim % shape.num_heads:
        raise UserError(f"--hidden_dim={shape.hidden_dim} is not divisible by "
                        f"--num_heads={shape.num_heads}; pick values that divide")
    # tfdp-train's own check, in its words. Imported here: tfdp.runner
    # imports TensorFlow, which the command has loaded already anyway.
    from tfdp.config import check_batch
    check_batch(job.global_batch_size, job.replicas, job.grad_accum_steps)
    if job.mixed_precision not in ("off", "bf16", "fp16"):
        raise UserError(f"--mixed_precision={job.mixed_precision!r} is unknown; use off, "
                        "bf16 or fp16")


def plan(job: Job, hw: Hardware) -> dict:
    """Every figure tfdp-plan prints (see the module doc for the formulas)."""
    validate(job)
    shape = job.shape
    n = count_params(shape)
    mem = memory_bytes(job, hw)
    compute = compute_seconds(job, hw)
    grads = gradient_bytes(shape)
    allreduce = allreduce_seconds(job, hw, grads)
    wait = wait_seconds(job, hw, compute + hw.fixed_step_s)
    alone_fixed = hw.fixed_step_s if hw.alone_fixed_s is None else hw.alone_fixed_s
    step = compute + wait + allreduce + hw.fixed_step_s
    tokens = job.global_batch_size * shape.seq_len
    flops = step_flops(job)
    peak_total = hw.peak_flops * (job.num_workers if hw.shares_compute else job.replicas)
    largest = largest_micro_batch(job, hw)
    return {
        "device": hw.name,
        "calibrated": hw.calibrated,
        "num_parameters": n,
        "non_embedding_parameters": non_embedding_params(shape),
        "replicas": job.replicas,
        "micro_batch_per_replica": job.micro_batch,
        "memory_per_replica_gib": mem["per_replica"] / GIB,
        "memory_parts_gib": {k: v / GIB for k, v in mem["parts"].items()},
        "memory_per_device_gib": mem["per_device"] / GIB,
        "framework_memory_gib": hw.framework_bytes / GIB,
        "device_memory_gib": hw.memory_bytes / GIB,
        "fits": mem["fits"],
        "largest_micro_batch_that_fits": largest,
        "largest_global_batch_that_fits": largest * job.replicas * job.grad_accum_steps,
        "flops_per_step": flops,
        "peak_flops_per_device": hw.peak_flops,
        "compute_efficiency": hw.efficiency,
        "compute_time_s": compute,
        "gradient_bytes": grads,
        "allreduce_time_s": allreduce,
        "fixed_time_s": hw.fixed_step_s,
        "wait_time_s": wait,
        "step_time_cv": hw.step_cv,
        "step_time_s": step,
        "contention": hw.contention,
        "efficiency": (compute / hw.contention + alone_fixed) / step,
        "mfu": flops / step / peak_total,
        "tokens_per_step": tokens,
        "tokens_per_second": tokens / step,
        "tokens_per_day": tokens / step * 86400.0,
        "intra_node_gbps": hw.intra_bandwidth * 8 / 1e9,
        "interconnect_gbps": hw.inter_bandwidth * 8 / 1e9,
    }


def format_plan(job: Job, figures: dict) -> str:
    """The human-readable table tfdp-plan prints."""
    s, f = job.shape, figures

    def gib(x):
        return f"{x:.3f} GiB" if x < 10 else f"{x:.1f} GiB"

    def secs(x):
        return f"{1e3 * x:.2f} ms" if x < 1 else f"{x:.3f} s"
    parts = f["memory_parts_gib"]
    rows = [
        ("model", f"{s.num_layers} layers x {s.hidden_dim} wide, {s.num_heads} heads, MLP "
                  f"{s.intermediate_dim}, vocab {s.vocab_size}, context {s.seq_len}"),
        ("parameters", f"{f['num_parameters']:,} ({f['non_embedding_parameters']:,} in 6N)"),
        ("replicas", f"{job.num_workers} worker(s) x {job.devices_per_worker} device(s) = "
                     f"{f['replicas']}; micro-batch {f['micro_batch_per_replica']} x "
                     f"{job.grad_accum_steps} per replica per step"),
        ("device", f"{f['device']}{' (calibrated here)' if f['calibrated'] else ''}: "
                   f"{f['peak_flops_per_device'] / 1e12:.3g} TFLOPS peak "
                   f"({job.mixed_precision}), {gib(f['device_memory_gib'])}"),
        ("memory / replica", f"{gib(f['memory_per_replica_gib'])} = weights "
                             f"{gib(parts['weights'])} + gradients {gib(parts['gradients'])} + "
                             f"AdamW {gib(parts['optimizer'])} + 16-bit copies "
                             f"{gib(parts['compute_copies'])} + activations "
                             f"{gib(parts['activations'])} + {MARGIN:.0%} margin"),
        ("memory / device", f"{gib(f['memory_per_device_gib'])} incl. framework "
                            f"{gib(f['framework_memory_gib'])}: "
                            f"{'fits' if f['fits'] else 'DOES NOT FIT'} in "
                            f"{gib(f['device_memory_gib'])}"),
        ("largest batch that fits", f"{f['largest_micro_batch_that_fits']} per replica "
                                    f"micro-step (global {f['largest_global_batch_that_fits']})"),
        ("FLOPs / step", f"{f['flops_per_step']:.4g}"),
        ("compute", f"{secs(f['compute_time_s'])} at {f['compute_efficiency']:.0%} of peak"
                    + (f", x{f['contention']:.2f} contention" if f["contention"] != 1 else "")),
        ("all-reduce", f"{secs(f['allreduce_time_s'])} ({f['gradient_bytes'] / 1e6:.2f} MB "
                       "float32, ring"
                       f"{', hierarchical' if job.num_workers > 1 < job.devices_per_worker else ''})"),
        ("fixed per step", secs(f["fixed_time_s"])),
        ("waiting for the slowest", f"{secs(f['wait_time_s'])} (step-time spread "
                                    f"{f['step_time_cv']:.1%})"),
        ("step time", f"{secs(f['step_time_s'])} (compute + wait + all-reduce + fixed; "
                      "not overlapped)"),
        ("data-parallel efficiency", f"{f['efficiency']:.1%}"),
        ("MFU", f"{f['mfu']:.1%}"),
        ("tokens / s", f"{f['tokens_per_second']:,.0f}"),
        ("tokens / day", f"{f['tokens_per_day']:.4g}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
