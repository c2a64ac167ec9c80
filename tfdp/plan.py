"""tfdp-plan's cost model: parameters, memory and step time of a data-parallel
run, before it runs. Pure arithmetic; `tfdp/calibrate.py` measures the
machine-dependent constants (`Hardware`) when asked to.

Model: keras-hub's GPT2Backbone, as tfdp.model.build_model makes it (tied
output embedding, no dropout). A job has W workers (nodes) of D devices
each, R = W*D replicas; each step every replica runs K = grad_accum_steps
micro-batches of b = global_batch / (R*K) windows of T tokens, then one
all-reduce of the float32 gradients, then one AdamW update (tfdp/step.py;
the all-reduce is not overlapped with compute). So

    step time = compute + wait + all-reduce + fixed

  compute    = K * b * T * F / (peak * efficiency) * contention
               (times D on a CPU, whose logical replicas share the worker's
               cores; contention: how much slower a worker computes while
               the others do too, measured by --calibrate on loopback, or
               how much slower a CPU's logical replicas do the worker's
               micro-batches than one replica doing them all; 1 on GPUs)
               F = tfdp.flops.flops_per_token = 6N + 12*L*H*Q*T
  all-reduce = ring: 2(R-1)/R * G / bandwidth + 2(R-1) * latency
               G = 4 bytes * parameters (+ the loss and stop flag);
               hierarchical when W > 1 and D > 1 (see `allreduce_seconds`)
  fixed      = the rest of the step: the host loop, the dispatch of every
               variable's ops, clipping and the AdamW update (which grow
               with the parameter count, not with the batch); --calibrate
               times the planned model's step on windows too short to
               compute, less its all-reduce
  wait       = e(n) * cv * (compute + fixed): synchronous replicas wait
               every step for the slowest of n independent ones (workers on
               a CPU, devices on GPUs). With step times of relative spread cv
               (measured by --calibrate), the slowest of n is e(n) standard
               deviations above the mean, e(n) the expected maximum of n
               standard normals (1/sqrt(pi) = 0.56 for 2, 1.03 for 4, 1.42
               for 8; computed with Blom's approximation beyond 2, within 3%).

  efficiency = (compute / contention + fixed alone) / step time: the
               step of one replica doing the same work alone (its fixed
               cost measured by --calibrate under a one-device strategy)
               over the job's; 1 for a single replica. With a device per
               replica that is weak-scaling efficiency, what
               benchmarks/weak_scaling.py measures (N workers' tokens/s over
               N x one worker's alone, at the same per-replica batch). A
               CPU's logical replicas have no device of their own: "the
               same work alone" is then one replica doing the worker's
               whole batch on the same cores, and the ratio can exceed 1
               (two smaller graphs side by side can fill the cores better
               than one: contention < 1).

Memory per replica (`memory_bytes`): float32 weights, gradients and AdamW's
two moments (16 bytes/parameter; +4 for the accumulator with K > 1), the
16-bit casts of the weights under bf16/fp16 that the backward pass keeps
(Keras 3 mixed precision stores only float32 variables and casts on use),
and the activations of one micro-batch (`activation_bytes`), plus a 10%
margin for workspace and fragmentation, plus the framework's own
footprint (measured with --calibrate; on GPUs an assumed 1 GiB).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics

from tfdp.errors import UserError
from tfdp.flops import flops_per_token

GIB = 2.0 ** 30
MARGIN = 0.10  # workspace (a layer's activation gradients), allocator fragmentation
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
class Shape:
    """The model's shape, as tfdp-train's flags give it."""

    num_layers: int = 4
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    vocab_size: int = 257
    seq_len: int = 128


@dataclasses.dataclass(frozen=True)
class Job:
    """How the work is spread: batch, precision, accumulation, workers x devices."""

    shape: Shape
    global_batch_size: int = 32
    mixed_precision: str = "off"
    grad_accum_steps: int = 1
    num_workers: int = 1
    devices_per_worker: int = 1

    @property
    def replicas(self) -> int:
        return self.num_workers * self.devices_per_worker

    @property
    def micro_batch(self) -> int:
        """Windows per replica per micro-step: global / (replicas x accumulation)."""
        return self.global_batch_size // (self.replicas * self.grad_accum_steps)


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
    split = job.replicas * job.grad_accum_steps
    if job.global_batch_size % split:
        raise UserError(f"--global_batch_size={job.global_batch_size} does not divide into "
                        f"{job.replicas} replica(s) x {job.grad_accum_steps} micro-batch(es); "
                        f"use a multiple of {split}")
    if job.mixed_precision not in ("off", "bf16", "fp16"):
        raise UserError(f"--mixed_precision={job.mixed_precision!r} is unknown; use off, "
                        "bf16 or fp16")


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


# ---------------------------------------------------------------- parameters

def count_params(shape: Shape) -> int:
    """Trainable parameters of keras-hub's GPT2Backbone (= tfdp.model.count_params):

        V*h            token embedding (also the output projection: tied)
      + T*h            position embedding (max_sequence_length = seq_len)
      + L * (4h^2 + 4h         Q, K, V and output projections with biases
             + 2*h*i + i + h   MLP: h->i and i->h with biases
             + 4h)             two LayerNorms (scale and offset)
      + 2h             final LayerNorm
    """
    h, i = shape.hidden_dim, shape.intermediate_dim
    per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
    return (shape.vocab_size * h + shape.seq_len * h + shape.num_layers * per_layer + 2 * h)


def non_embedding_params(shape: Shape) -> int:
    """N of the 6N FLOPs term: all but the position embedding (a lookup; the
    tied token embedding stays in as the output projection's matmul), as
    tfdp.model.non_embedding_params."""
    return count_params(shape) - shape.seq_len * shape.hidden_dim


def step_flops(job: Job) -> float:
    """FLOPs of one optimizer step over all replicas (tfdp.flops.flops_per_token)."""
    s = job.shape
    per_token = flops_per_token(non_embedding_params(s), s.num_layers, s.num_heads,
                                s.hidden_dim // s.num_heads, s.seq_len)
    return per_token * job.global_batch_size * s.seq_len


# ---------------------------------------------------------------- memory

def activation_bytes(shape: Shape, batch: int, mixed_precision: str) -> float:
    """Activations one replica keeps for the backward pass of a micro-batch.

    Korthikanti et al. 2022 ("Reducing activation recomputation in large
    transformer models", eq. 1) count s*b*h*(34 + 5*a*s/h) bytes per layer
    with 16-bit activations, 1-byte dropout masks and a 4h MLP. Without
    dropout (tfdp's default; keras' Dropout(0) stores no mask) and with a
    general MLP width i, the tensors keras-hub's TransformerDecoder keeps
    are, in elements of the compute dtype:

      s*b*h * 8       both LayerNorms' inputs and outputs, Q, K, V, the
                      attention context (the output projection's input)
      s*b*i * 2       the MLP's pre-activation (GELU's input) and GELU's output
      a*s*s*b         the attention probabilities (softmax output)

    (= 16*s*b*h + a*s^2*b for i = 4h: Korthikanti's 32sbh + 2as^2b bytes
    less the dropout terms.) Outside the layers: the embedding sum, the
    final LayerNorm's input and output (3*s*b*h), the logits (s*b*V), and in
    float32 the logits' cast (under bf16/fp16) and the softmax cross
    entropy's saved gradient (s*b*V each).
    """
    s, h, i, a, v = (shape.seq_len, shape.hidden_dim, shape.intermediate_dim,
                     shape.num_heads, shape.vocab_size)
    width = 2 if mixed_precision in ("bf16", "fp16") else 4
    per_layer = (8 * s * h + 2 * s * i + a * s * s) * batch * width
    outside = (3 * s * h + s * v) * batch * width
    loss = s * v * batch * 4 * (2 if width == 2 else 1)
    return shape.num_layers * per_layer + outside + loss


def state_bytes(job: Job) -> dict:
    """Per-replica bytes that do not grow with the batch."""
    n = count_params(job.shape)
    return {
        "weights": 4.0 * n,  # float32 master weights (the only stored copy)
        "gradients": 4.0 * n * (2 if job.grad_accum_steps > 1 else 1),  # + accumulator
        "optimizer": 8.0 * n,  # AdamW's first and second moments, float32
        # The 16-bit casts of the weights: Keras casts on use, and the tape
        # keeps each cast for the backward matmul.
        "compute_copies": 2.0 * n if job.mixed_precision in ("bf16", "fp16") else 0.0,
    }


def memory_bytes(job: Job, hw: Hardware, micro_batch: int | None = None) -> dict:
    """Bytes per replica, per device and whether they fit (see module doc).

    On a CPU the worker's logical replicas share its RAM, so the device
    holds D replicas; on GPUs each device holds one.
    """
    batch = job.micro_batch if micro_batch is None else micro_batch
    parts = state_bytes(job)
    parts["activations"] = activation_bytes(job.shape, batch, job.mixed_precision)
    model = sum(parts.values())
    parts["margin"] = MARGIN * model
    per_replica = model + parts["margin"]
    on_device = per_replica * (job.devices_per_worker if hw.shares_compute else 1)
    needed = on_device + hw.framework_bytes
    return {"parts": parts, "per_replica": per_replica, "per_device": needed,
            "fits": needed <= hw.memory_bytes}


def largest_micro_batch(job: Job, hw: Hardware) -> int:
    """The largest per-replica micro-batch whose memory fits (0: none does).
    Memory is linear in the batch, so solve, then step down past rounding."""
    fixed = memory_bytes(job, hw, 0)["per_device"]
    one = memory_bytes(job, hw, 1)["per_device"] - fixed
    if fixed + one > hw.memory_bytes:
        return 0
    batch = int((hw.memory_bytes - fixed) // one)
    while batch > 0 and not memory_bytes(job, hw, batch)["fits"]:
        batch -= 1
    return batch


# ---------------------------------------------------------------- time

def ring_allreduce_seconds(nbytes: float, n: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce of `nbytes` over n members: a reduce-scatter and an
    all-gather of n-1 steps each, every member sending (n-1)/n of the data
    each way over its link: 2(n-1)/n * bytes / bandwidth + 2(n-1) * latency."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bandwidth + 2.0 * (n - 1) * latency


def allreduce_seconds(job: Job, hw: Hardware, nbytes: float) -> float:
    """One step's all-reduce of `nbytes` over W workers x D devices.

    W == 1 or D == 1: a ring over the replicas (intra-node or inter-node
    links). Both > 1: hierarchical, as NCCL and TF's collectives do it:
    reduce-scatter inside each node (D-1)/D * G over the device links, an
    all-reduce across nodes of each device's 1/D shard (the D shards share
    the node's network link, so 2(W-1)/W * G crosses it), an all-gather
    inside the node (D-1)/D * G again.
    """
    w, d = job.num_workers, job.devices_per_worker
    if w == 1:
        return ring_allreduce_seconds(nbytes, d, hw.intra_bandwidth, hw.intra_latency_s)
    if d == 1:
        return ring_allreduce_seconds(nbytes, w, hw.inter_bandwidth, hw.inter_latency_s)
    return (ring_allreduce_seconds(nbytes, d, hw.intra_bandwidth, hw.intra_latency_s)
            + ring_allreduce_seconds(nbytes, w, hw.inter_bandwidth, hw.inter_latency_s))


def gradient_bytes(shape: Shape) -> float:
    """What tfdp's step all-reduces: every float32 gradient, the loss and the
    stop flag, in one packed collective (tfdp/step.py)."""
    return 4.0 * (count_params(shape) + 2)


def compute_seconds(job: Job, hw: Hardware) -> float:
    """K micro-batches of forward and backward on one replica; on a CPU the
    worker's D logical replicas run on the same cores, so D times that work
    shares one peak."""
    per_replica = step_flops(job) / job.replicas
    share = job.devices_per_worker if hw.shares_compute else 1
    return per_replica * share / (hw.peak_flops * hw.efficiency) * hw.contention


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals]: exact for n <= 2 (0 and
    1/sqrt(pi)), Blom's approximation Phi^-1((n - 0.375) / (n + 0.25)) beyond
    (within 3% for n >= 3)."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0 / math.sqrt(math.pi)
    return statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


def wait_seconds(job: Job, hw: Hardware, busy: float) -> float:
    """Expected wait for the slowest replica (see the module doc): the
    independent ones are the workers on a CPU (a worker's logical replicas
    run in one process), every replica on GPUs."""
    independent = job.num_workers if hw.shares_compute else job.replicas
    return expected_max_normal(independent) * hw.step_cv * busy


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


def machine_memory_bytes() -> float:
    """This machine's RAM: the memory of `--device=cpu`."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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

