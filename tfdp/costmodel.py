"""tfdp-plan's cost model: parameters, memory and step time of a data-parallel
run, before it runs. Pure arithmetic on the model's `Shape`, the `Job` that
spreads it and the machine's constants (`Hardware`, tfdp/machines.py;
tfdp/calibrate.py measures them when asked to); tfdp/plan.py puts the
figures together for the command.

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
import statistics

from tfdp.flops import flops_per_token
from tfdp.machines import Hardware

MARGIN = 0.10  # workspace (a layer's activation gradients), allocator fragmentation


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
