"""The machines tfdp-plan plans for: datasheet presets of GPUs (`DEVICES`)
and the constants the cost model needs of one (`Hardware`), from a preset,
from flags, or measured by tfdp/calibrate.py. Kept apart from the cost
model (tfdp/costmodel.py) because these are facts looked up or measured,
not formulas.
"""

from __future__ import annotations

import dataclasses
import os

from tfdp.errors import UserError

GIB = 2.0 ** 30
ASSUMED_EFFICIENCY = 0.45  # see Hardware.efficiency
ASSUMED_FIXED_STEP_S = 0.005  # see Hardware.fixed_step_s
ASSUMED_FRAMEWORK_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces, XLA temporaries


@dataclasses.dataclass(frozen=True)
class Device:
    """Published dense peak (no 2:4 sparsity) of one device, TFLOPS.

    `tflops_fp32` is what float32 matmuls run at under TensorFlow, which
    uses TF32 tensor cores by default on Ampere and later
    (tf.config.experimental.enable_tensor_float_32_execution); the
    datasheets' plain FP32 (CUDA-core) figure is in the comment.
    `link_gbps`: between two devices of one node, one direction, Gbit/s.
    """

    tflops_fp32: float
    tflops_16: float
    memory_gib: float
    link_gbps: float
    source: str


# Datasheet figures; TF32/BF16 "with sparsity" values are halved to dense.
DEVICES = {
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): FP32 19.5, TF32 156,
    # BF16/FP16 312 TFLOPS dense; 80 GB HBM2e; NVLink 600 GB/s (both directions).
    "a100": Device(156.0, 312.0, 80.0, 2400.0, "NVIDIA A100 datasheet, A100 80GB SXM"),
    # Same datasheet, A100 40GB SXM: same compute, 40 GB HBM2.
    "a100-40gb": Device(156.0, 312.0, 40.0, 2400.0, "NVIDIA A100 datasheet, A100 40GB SXM"),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): FP32 67, TF32 989 and
    # BF16/FP16 1,979 TFLOPS with sparsity (494.5 / 989.5 dense); 80 GB HBM3;
    # NVLink 900 GB/s.
    "h100": Device(494.5, 989.5, 80.0, 3600.0, "NVIDIA H100 datasheet, H100 SXM"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): H100's compute,
    # 141 GB HBM3e, NVLink 900 GB/s.
    "h200": Device(494.5, 989.5, 141.0, 3600.0, "NVIDIA H200 datasheet, H200 SXM"),
    # NVIDIA Tesla V100 datasheet (V100 SXM2 32GB): FP32 15.7, Tensor (FP16)
    # 125 TFLOPS; no TF32 or BF16 units (bf16 runs at the FP32 rate);
    # NVLink 300 GB/s.
    "v100": Device(15.7, 125.0, 32.0, 1200.0, "NVIDIA Tesla V100 datasheet, V100 SXM2 32GB"),
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3, TF32 120 and BF16/FP16
    # 242 TFLOPS with sparsity (60 / 121 dense); 24 GB GDDR6; PCIe Gen4 x16,
    # 64 GB/s both directions (no NVLink).
    "l4": Device(60.0, 121.0, 24.0, 256.0, "NVIDIA L4 datasheet"),
}
CPU = "cpu"  # measured, not looked up: --calibrate or --device_tflops


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Machine constants, from a device preset or measured (tfdp/calibrate.py).

    efficiency: achieved / peak FLOP/s of the model's forward and backward.
      Preset: 0.45, about what large GPT training reaches on GPUs (PaLM
      reports 46.2% model FLOPs utilisation, Chowdhery et al. 2022,
      table 3); small models get less. --calibrate times this model's own
      forward and backward instead.
    fixed_step_s: per-step cost independent of the batch. Preset 5 ms
      (TensorFlow's dispatch of a step's ops, the host loop; a GPU's AdamW
      update of a small model is far less); measured with --calibrate as
      the planned model's step on windows too short to compute, less its
      all-reduce (on a CPU the update of every parameter counts too).
    Bandwidths are bytes/s one way per link; latencies are per ring hop.
    framework_bytes: the process's (CPU) or device's (GPU) memory before
      the model's own tensors.
    """

    name: str
    peak_flops: float  # one device, in the compute dtype
    memory_bytes: float  # one device (CPU: the machine's RAM)
    intra_bandwidth: float  # between devices of a node
    inter_bandwidth: float  # between nodes (the node's NIC)
    efficiency: float = ASSUMED_EFFICIENCY
    fixed_step_s: float = ASSUMED_FIXED_STEP_S
    contention: float = 1.0  # compute slowdown of a worker while all compute
    alone_fixed_s: float | None = None  # one replica's fixed cost alone (None: fixed_step_s)
    step_cv: float = 0.02  # relative spread of one replica's step time (GPUs: steady)
    intra_latency_s: float = 5e-6  # NCCL over NVLink: a few us per hop
    inter_latency_s: float = 20e-6  # InfiniBand/RoCE plus NCCL: ~10-20 us per hop
    framework_bytes: float = ASSUMED_FRAMEWORK_GIB * GIB
    shares_compute: bool = False  # CPU: a worker's logical replicas share its cores
    calibrated: bool = False


def hardware(device: str, mixed_precision: str = "off", *, tflops: float | None = None,
             memory_gib: float | None = None, intra_node_gbps: float | None = None,
             interconnect_gbps: float | None = None) -> Hardware:
    """The preset `device` with any explicit values replacing its own.

    `cpu` has no preset peak: it needs `tflops` (or --calibrate, which
    replaces these values with measured ones). Its memory is this
    machine's RAM, its "devices" are logical replicas sharing the cores.
    Defaults without a datasheet figure: 100 Gbit/s between nodes (a
    100 GbE or EDR InfiniBand NIC), 80 Gbit/s between a CPU's logical
    replicas (a memory copy).
    """
    for name, value in (("device_tflops", tflops), ("device_memory_gib", memory_gib),
                        ("intra_node_gbps", intra_node_gbps),
                        ("interconnect_gbps", interconnect_gbps)):
        if value is not None and not value > 0:
            raise UserError(f"--{name}={value} must be a positive number")
    sixteen = mixed_precision in ("bf16", "fp16")
    if device == CPU:
        if tflops is None:
            raise UserError("--device=cpu has no published peak: add --calibrate to measure "
                            "this machine (or give --device_tflops)")
        peak, memory, link, shares = tflops, memory_gib or machine_memory_bytes() / GIB, 80.0, True
    elif device in DEVICES:
        preset = DEVICES[device]
        peak = tflops or (preset.tflops_16 if sixteen else preset.tflops_fp32)
        if device == "v100" and mixed_precision == "bf16" and tflops is None:
            peak = preset.tflops_fp32  # no bfloat16 units: bf16 runs at the FP32 rate
        memory, link, shares = memory_gib or preset.memory_gib, preset.link_gbps, False
    else:
        raise UserError(f"--device={device!r} is unknown; use one of "
                        f"{', '.join([CPU, *DEVICES])} (or give --device_tflops and "
                        "--device_memory_gib)")
    return Hardware(
        name=device, peak_flops=peak * 1e12, memory_bytes=memory * GIB,
        intra_bandwidth=(intra_node_gbps or link) * 1e9 / 8,
        inter_bandwidth=(interconnect_gbps or 100.0) * 1e9 / 8,
        shares_compute=shares)


def machine_memory_bytes() -> float:
    """This machine's RAM: the memory of `--device=cpu`."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
