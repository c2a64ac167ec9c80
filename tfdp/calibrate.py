"""tfdp-plan --calibrate: this machine's constants for the cost model
(tfdp/machines.py's `Hardware`), measured rather than looked up.

  peak_flops      a square matmul in the compute dtype (tfdp.flops)
  efficiency      tfdp's forward and backward of the planned model, cut to
                  min(L, 2) layers, at the planned micro-batch, precision and
                  XLA setting, on the worker's own replicas: its FLOPs / time
                  / peak. (The layers are alike, so two show their rate.)
  step_cv         the spread (standard deviation / mean) of those times
  alone_fixed_s   fixed_step_s of one replica's step alone (one_device)
  contention      multi-worker: that probe on both workers at once over the
                  chief's alone (what two busy workers cost each other); a
                  CPU's logical replicas: their probe over one replica doing
                  their whole micro-batch (then `efficiency` is that one's).
                  The two are timed in alternating rounds, so that a drift
                  of the machine's speed falls on both alike.
  fixed_step_s    tfdp's whole train step (tfdp.step.make_train_step with
                  AdamW, one all-reduce, the host call) for the planned model
                  fed windows of 8 tokens (tfdp.probes), so that its compute
                  is nil (well under 1% of it for the default model), less
                  the all-reduce of its gradients, which the plan counts
                  separately: the host loop, the dispatch of every
                  variable's ops, clipping, packing the gradients and the
                  AdamW update, which grow with the parameters. A model over
                  20M parameters is timed at its depth and two smaller
                  widths instead, and the cost extrapolated linearly in the
                  parameter count.
  intra_*         a timed all-reduce between the worker's replicas of a
                  4-byte and of a gradient-sized float32 buffer: latency and
                  bandwidth of the ring formula
  inter_*         the same between two worker processes on loopback,
                  MultiWorkerMirroredStrategy over gRPC, started like
                  tfdp-launch (only when the plan has several workers)
  framework_bytes the process's resident memory with TensorFlow, keras-hub
                  and the planned model's compiled step loaded (the
                  fixed_step_s probe), less that model's weights, gradients
                  and moments, which the plan counts itself (CPU; on GPUs
                  the preset's figure stays)

A CPU worker pinned to `cpu_threads` cores (as tfdp-launch
--cpu_threads_per_worker does) is calibrated on that many cores. No absl
here: trainer/plan.py passes plain values.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import sys
import time

from tfdp import probes
from tfdp.costmodel import Job, Shape, count_params, gradient_bytes, step_flops
from tfdp.errors import UserError
from tfdp.machines import CPU, machine_memory_bytes


def rss_bytes() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pin_threads(threads: int) -> None:
    """Run this process on `threads` cores with TensorFlow pools to match, as
    tfdp-launch does for a worker; before TensorFlow's runtime starts."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(threads)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _ring_fit(t_small: float, t_big: float, nbytes: float, n: int) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s per hop) so that costmodel.ring_allreduce_seconds
    gives t_small for 4 bytes and t_big for `nbytes` over n members."""
    latency = t_small / (2 * (n - 1))
    extra = max(t_big - t_small, 1e-9)
    return 2.0 * (n - 1) / n * nbytes / extra, latency


def calibrate(job, device: str, cpu_threads: int = 0, log=print) -> dict:
    """Measured Hardware fields for `job` (a tfdp.costmodel.Job) on this machine.

    A one-worker plan is measured in this process. A multi-worker plan is
    measured in a 2-worker loopback job (tfdp.launch, each worker on
    `cpu_threads` cores of its own), every figure on both workers at once,
    so the compute figures carry the contention of two busy workers for
    the machine, as the real job will (shared caches and memory bandwidth,
    hyperthreads, other tenants).
    """
    if device != CPU:
        import tensorflow as tf
        if not tf.config.list_physical_devices("GPU"):
            raise UserError(f"--calibrate measures this machine, which has no GPU to stand "
                            f"for --device={device}; use --device=cpu, or drop --calibrate")
    if job.num_workers > 1:
        log(f"calibrating: 2 workers on loopback ({cpu_threads or 'all'} core(s) each): "
            "matmul peak, the model's forward and backward, per-step overhead, all-reduce "
            f"of {gradient_bytes(job.shape) / 1e6:.2f} MB ...")
        return loopback(job, device, cpu_threads)
    if device == CPU and cpu_threads:
        pin_threads(cpu_threads)
    return measure_worker(job, device, log)


def measure_worker(job, device: str, log=lambda *_: None, multi_worker: bool = False) -> dict:
    """Every figure on this process's devices (see the module doc)."""
    import tensorflow as tf

    from tfdp.flops import measure_matmul_flops
    from tfdp.step import default_jit_compile
    from tfdp.strategy import build_strategy, is_chief, split_cpu

    measured: dict = {"calibrated": True}
    shape, d = job.shape, job.devices_per_worker
    grad_bytes = int(gradient_bytes(shape))
    gpus = tf.config.list_physical_devices("GPU") if device != CPU else []
    if device == CPU:
        tf.config.set_visible_devices([], "GPU")
        if d > 1 and not multi_worker:
            split_cpu(d)
    local = min(d, len(gpus)) if gpus else (1 if multi_worker else d)
    if multi_worker:
        strategy = build_strategy("multi_worker_mirrored", collective_timeout=300)
    else:
        strategy = build_strategy("mirrored" if local > 1 else "one_device",
                                  num_cpu_replicas=local)
    replicas = strategy.num_replicas_in_sync
    dtype = {"bf16": tf.bfloat16, "fp16": tf.float16}.get(job.mixed_precision, tf.float32)
    first = strategy.extended.worker_devices[0]
    jit = default_jit_compile(job.mixed_precision, strategy)
    log(f"calibrating: {job.mixed_precision} matmul peak on {first} ...")
    measured["peak_flops"] = measure_matmul_flops(first, size=4096 if gpus else 1024,
                                                  dtype=dtype, seconds=1.5)

    if replicas > 1:
        t_small = probes.time_allreduce(strategy, probes.SMALL_BYTES)[0]
        t_big = probes.time_allreduce(strategy, grad_bytes)[0]
        bandwidth, latency = _ring_fit(t_small, t_big, grad_bytes, replicas)
        where = "inter" if multi_worker else "intra"
        measured[f"{where}_bandwidth"], measured[f"{where}_latency_s"] = bandwidth, latency
    log(f"calibrating: per-step overhead of the {shape.num_layers}-layer model's step ...")
    measured["fixed_step_s"] = probes.step_overhead(shape, job.mixed_precision, strategy,
                                                    replicas, jit)
    if not gpus:
        n = count_params(shape)  # the state step_overhead's model holds:
        probed = 16.0 * n * local if n <= probes.OVERHEAD_MAX_PARAMS else 0.0
        measured["framework_bytes"] = max(rss_bytes() - probed, 0.0)
        measured["memory_bytes"] = machine_memory_bytes()

    # Efficiency: forward and backward of min(L, 2) real layers on every local
    # replica (a multi-worker job: on this worker's one replica, no collectives).
    layers, heads = min(shape.num_layers, 2), shape.num_heads
    probe = probes.model_cfg(shape, layers, shape.hidden_dim, heads, shape.intermediate_dim,
                             job.micro_batch * local, job.mixed_precision)
    log(f"calibrating: forward and backward of {layers} layer(s), micro-batch "
        f"{job.micro_batch} x {local} replica(s) ...")
    one_device = tf.distribute.OneDeviceStrategy(first)
    run = probes.forward_backward(probe, shape.vocab_size,
                                  one_device if multi_worker else strategy, job.micro_batch, jit)
    probe_job = Job(Shape(layers, heads, shape.hidden_dim, shape.intermediate_dim,
                          shape.vocab_size, shape.seq_len),
                    job.micro_batch * local, job.mixed_precision, 1, 1, local)
    flops = step_flops(probe_job) / local * (1 if gpus else local)
    if multi_worker:
        # Rounds of both workers computing, then the chief alone (the other
        # waiting in an all-reduce): the ratio is what two busy workers cost
        # each other (contention).
        barrier = probes.allreduce_fn(strategy, probes.SMALL_BYTES)
        run(), run()
        times, alone_times = [], []
        for _ in range(probes.ROUNDS):
            barrier()
            times += probes.timed_calls(run, 0.6, least=3, warmup=0)
            barrier()
            if is_chief(strategy):
                alone_times += probes.timed_calls(run, 0.6, least=3, warmup=0)
        barrier()
        if is_chief(strategy):
            measured["alone_s"] = statistics.median(alone_times)
            measured["alone_fixed_s"] = probes.step_overhead(shape, job.mixed_precision,
                                                             one_device, 1, jit)
        barrier()
        measured["together_s"] = statistics.median(times)
    elif local > 1 and not gpus:
        # A CPU's logical replicas share its cores: the reference is one
        # replica doing the worker's whole micro-batch on all of them.
        log("calibrating: the same work as one replica ...")
        alone_run = probes.forward_backward(probe, shape.vocab_size, one_device,
                                            job.micro_batch * local, jit)
        times, alone_times = probes.alternating([run, alone_run])
        alone = statistics.median(alone_times)
        measured["contention"] = statistics.median(times) / alone
        measured["alone_fixed_s"] = probes.step_overhead(shape, job.mixed_precision,
                                                         one_device, 1, jit)
    else:
        times = probes.timed_calls(run)
        alone = statistics.median(times)
    # Multi-worker: the rate while both compute (tfdp.calibrate.loopback
    # turns it into the chief's alone).
    seconds = statistics.median(times) if multi_worker else alone
    measured["efficiency"] = flops / (seconds * measured["peak_flops"])
    measured["step_cv"] = statistics.pstdev(times) / statistics.mean(times)
    return measured


# ---------------------------------------------------------------- loopback

def loopback(job, device: str, cpu_threads: int) -> dict:
    """`measure_worker` on both workers of a 2-worker loopback job
    (tfdp.launch, MultiWorkerMirroredStrategy over gRPC); the chief's figures,
    with the slower worker's compute."""
    from tfdp.launch import Launcher

    out = io.StringIO()
    spec = json.dumps({**dataclasses.asdict(job), "device": device})
    command = [sys.executable, "-m", "tfdp.calibrate", spec]
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        code = Launcher(command, 2, cpu_threads, grace=10.0, out=out).run()
    finally:
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    results = []
    for line in out.getvalue().splitlines():
        text = line.split("] ", 1)[-1]
        if text.startswith("{"):
            results.append(json.loads(text))
    if len(results) < 2:
        raise UserError(f"the loopback calibration failed (exit {code}): "
                        f"{out.getvalue().strip().splitlines()[-1:]}; plan without "
                        "--calibrate, or give --device_tflops and --interconnect_gbps")
    chief = next(r for r in results if r.pop("chief"))
    # Efficiency: the chief alone; contention: how much slower the slower
    # worker computed while both did.
    alone = chief.pop("alone_s")
    together = max(r["together_s"] for r in results)
    chief["efficiency"] *= chief.pop("together_s") / alone
    chief["contention"] = together / alone
    chief["step_cv"] = max(r["step_cv"] for r in results)
    return chief


def _worker(spec: str) -> None:
    """One loopback calibration worker: every worker prints its JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tfdp.strategy import is_chief

    values = json.loads(spec)
    device = values.pop("device")
    shape = Shape(**values.pop("shape"))
    job = Job(shape, **values)
    measured = measure_worker(job, device, multi_worker=True)
    from tfdp.strategy import build_strategy
    chief = is_chief(build_strategy("multi_worker_mirrored", collective_timeout=300))
    print(json.dumps({**measured, "chief": chief}), flush=True)
    time.sleep(3.0)  # a peer may still be receiving the last all-reduce
    sys.stdout.flush()
    os._exit(0)  # skip TF's multi-worker shutdown barrier


if __name__ == "__main__":
    _worker(sys.argv[1])
