"""tfdp-plan --calibrate: this machine's constants for the cost model
(tfdp/plan.py's `Hardware`), measured rather than looked up.

  peak_flops      a square matmul in the compute dtype (tfdp.flops)
  efficiency      tfdp's forward and backward of the planned model, cut to
                  min(L, 2) layers, at the planned micro-batch, precision and
                  XLA setting, on the worker's own replicas: its FLOPs / time
                  / peak. (The layers are alike, so two show their rate.)
  step_cv         the spread (standard deviation / mean) of those times
  alone_fixed_s   the fixed cost of that one replica's step alone (one_device)
  contention      multi-worker: that probe on both workers at once over the
                  chief's alone (what two busy workers cost each other); a
                  CPU's logical replicas: their probe over one replica doing
                  their whole micro-batch (then `efficiency` is that one's)
  fixed_step_s    tfdp's whole train step (tfdp.step.make_train_step with
                  AdamW, one all-reduce, the host call) for a model of the
                  planned depth and the smallest width: its compute is
                  nil, what remains is per-step and per-variable overhead,
                  less the all-reduce latency counted separately
  intra_*         a timed all-reduce between the worker's replicas of a
                  4-byte and of a gradient-sized float32 buffer: latency and
                  bandwidth of the ring formula
  inter_*         the same between two worker processes on loopback,
                  MultiWorkerMirroredStrategy over gRPC, started like
                  tfdp-launch (only when the plan has several workers)
  framework_bytes the process's resident memory with TensorFlow, keras-hub
                  and the depth's compiled step loaded, before the model's
                  own tensors (CPU; on GPUs the preset's figure stays)

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

from tfdp.errors import UserError

SMALL_BYTES = 4  # one float: the all-reduce's latency


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


def _times(fn, seconds: float = 2.0, least: int = 5) -> list[float]:
    """Seconds of each call of `fn()` (which must block) for about `seconds`,
    after two warm-up calls."""
    fn(), fn()
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < least or time.perf_counter() < deadline:
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def _fixed_calls(fn, calls: int = 15) -> float:
    """Median seconds of `calls` calls after three warm-up calls: a fixed
    count, since in a multi-worker job every worker must make the same
    collectives."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _allreduce_fn(strategy, nbytes: int):
    """A blocking call: one SUM all-reduce of a float32 buffer of `nbytes`."""
    import tensorflow as tf

    size = max(nbytes // 4, 1)

    @tf.function
    def reduce():
        def send():
            return tf.distribute.get_replica_context().all_reduce("SUM", tf.ones([size]))
        return strategy.experimental_local_results(strategy.run(send))[0][0]
    return lambda: float(reduce())


def _allreduce_seconds(strategy, nbytes: int, calls: int = 20) -> float:
    """Median seconds of that all-reduce over a fixed number of calls (every
    worker must make the same ones)."""
    return _fixed_calls(_allreduce_fn(strategy, nbytes), calls)


def _ring_fit(t_small: float, t_big: float, nbytes: float, n: int) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s per hop) so that plan.ring_allreduce_seconds
    gives t_small for 4 bytes and t_big for `nbytes` over n members."""
    latency = t_small / (2 * (n - 1))
    extra = max(t_big - t_small, 1e-9)
    return 2.0 * (n - 1) / n * nbytes / extra, latency


def _model_cfg(shape, layers: int, hidden: int, heads: int, intermediate: int,
               batch: int, mixed_precision: str):
    from tfdp.config import Config
    return Config(num_layers=layers, num_heads=heads, hidden_dim=hidden,
                  intermediate_dim=intermediate, seq_len=shape.seq_len,
                  global_batch_size=batch, mixed_precision=mixed_precision)


def _windows(batch: int, seq_len: int, vocab: int):
    import tensorflow as tf
    return tf.random.stateless_uniform([batch, seq_len + 1], [1, 2], 0, vocab, tf.int32)


def calibrate(job, device: str, cpu_threads: int = 0, log=print) -> dict:
    """Measured Hardware fields for `job` (a tfdp.plan.Job) on this machine.

    A one-worker plan is measured in this process. A multi-worker plan is
    measured in a 2-worker loopback job (tfdp.launch, each worker on
    `cpu_threads` cores of its own), every figure on both workers at once,
    so the compute figures carry the contention of two busy workers for
    the machine, as the real job will (shared caches and memory bandwidth,
    hyperthreads, other tenants).
    """
    from tfdp import plan

    if device != plan.CPU:
        import tensorflow as tf
        if not tf.config.list_physical_devices("GPU"):
            raise UserError(f"--calibrate measures this machine, which has no GPU to stand "
                            f"for --device={device}; use --device=cpu, or drop --calibrate")
    if job.num_workers > 1:
        log(f"calibrating: 2 workers on loopback ({cpu_threads or 'all'} core(s) each): "
            "matmul peak, the model's forward and backward, per-step overhead, all-reduce "
            f"of {plan.gradient_bytes(job.shape) / 1e6:.2f} MB ...")
        return loopback(job, device, cpu_threads)
    if device == plan.CPU and cpu_threads:
        pin_threads(cpu_threads)
    return measure_worker(job, device, log)


def measure_worker(job, device: str, log=lambda *_: None, multi_worker: bool = False) -> dict:
    """Every figure on this process's devices (see the module doc)."""
    import tensorflow as tf

    from tfdp import plan
    from tfdp.flops import measure_matmul_flops
    from tfdp.step import default_jit_compile
    from tfdp.strategy import build_strategy, is_chief, split_cpu

    measured: dict = {"calibrated": True}
    shape, d = job.shape, job.devices_per_worker
    grad_bytes = int(plan.gradient_bytes(shape))
    gpus = tf.config.list_physical_devices("GPU") if device != plan.CPU else []
    if device == plan.CPU:
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

    # Fixed per-step cost: tfdp's whole step for the planned depth at width 2*heads.
    heads = shape.num_heads
    tiny = _model_cfg(shape, shape.num_layers, 2 * heads, heads, 4, replicas,
                      job.mixed_precision)
    log(f"calibrating: per-step overhead of a {shape.num_layers}-layer step ...")
    fixed = _fixed_probe(tiny, strategy, replicas, jit)
    t_small = _allreduce_seconds(strategy, SMALL_BYTES) if replicas > 1 else 0.0
    if replicas > 1:
        t_big = _allreduce_seconds(strategy, grad_bytes)
        bandwidth, latency = _ring_fit(t_small, t_big, grad_bytes, replicas)
        where = "inter" if multi_worker else "intra"
        measured[f"{where}_bandwidth"], measured[f"{where}_latency_s"] = bandwidth, latency
    measured["fixed_step_s"] = max(fixed - t_small, 0.0)  # the latency is the all-reduce's
    if not gpus:
        measured["framework_bytes"] = rss_bytes()
        measured["memory_bytes"] = plan.machine_memory_bytes()

    # Efficiency: forward and backward of min(L, 2) real layers on every local
    # replica (a multi-worker job: on this worker's one replica, no collectives).
    layers = min(shape.num_layers, 2)
    probe = _model_cfg(shape, layers, shape.hidden_dim, heads, shape.intermediate_dim,
                       job.micro_batch * local, job.mixed_precision)
    log(f"calibrating: forward and backward of {layers} layer(s), micro-batch "
        f"{job.micro_batch} x {local} replica(s) ...")
    one_device = tf.distribute.OneDeviceStrategy(first)
    run = _probe(probe, shape.vocab_size, one_device if multi_worker else strategy,
                 job.micro_batch, jit)
    times = _times(run)
    seconds = statistics.median(times)
    probe_job = plan.Job(plan.Shape(layers, heads, shape.hidden_dim, shape.intermediate_dim,
                                    shape.vocab_size, shape.seq_len),
                         job.micro_batch * local, job.mixed_precision, 1, 1, local)
    flops = plan.step_flops(probe_job) / local * (1 if gpus else local)
    measured["efficiency"] = flops / (seconds * measured["peak_flops"])
    measured["step_cv"] = statistics.pstdev(times) / statistics.mean(times)
    if multi_worker:
        # Then the chief alone, the other worker waiting in an all-reduce:
        # the ratio is what two busy workers cost each other (contention).
        barrier = _allreduce_fn(strategy, SMALL_BYTES)
        barrier()
        if is_chief(strategy):
            measured["alone_s"] = statistics.median(_times(run))
            measured["alone_fixed_s"] = _fixed_probe(
                dataclasses.replace(tiny, global_batch_size=1), one_device, 1, jit)
        barrier()
        measured["together_s"] = seconds
    elif local > 1 and not gpus:
        # A CPU's logical replicas share its cores: the reference is one
        # replica doing the worker's whole micro-batch on all of them.
        log("calibrating: the same work as one replica ...")
        alone = statistics.median(_times(_probe(probe, shape.vocab_size, one_device,
                                                job.micro_batch * local, jit)))
        measured["efficiency"] = flops / (alone * measured["peak_flops"])
        measured["contention"] = seconds / alone
        measured["alone_fixed_s"] = _fixed_probe(tiny, one_device, 1, jit)
    return measured


def _fixed_probe(tiny, strategy, replicas: int, jit: bool) -> float:
    """Median seconds of tfdp's whole train step (make_train_step, AdamW, the
    host call) for the minimal-width model `tiny` under `strategy`."""
    import tensorflow as tf

    from tfdp.model import build_model
    from tfdp.optimizer import build_optimizer
    from tfdp.step import make_train_step

    with strategy.scope():
        model = build_model(tiny, 8)
        optimizer = build_optimizer(tiny, model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, replicas, tiny.seq_len,
                           tiny.clip_norm, jit)
    data = tf.data.Dataset.from_tensor_slices(_windows(replicas, tiny.seq_len, 8))
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.repeat().batch(ctx.get_per_replica_batch_size(replicas))))
    return _fixed_calls(lambda: float(step(iterator)["loss"][-1]))


def _probe(cfg, vocab: int, strategy, batch: int, jit: bool):
    """A blocking call: forward and backward of `cfg`'s model on every
    replica of `strategy`, `batch` windows each (no collectives)."""
    import tensorflow as tf

    from tfdp.model import build_model
    from tfdp.step import _token_losses

    with strategy.scope():
        model = build_model(cfg, vocab)
    variables = model.trainable_variables

    @tf.function(jit_compile=jit)
    def forward_backward(windows):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(_token_losses(model, windows, training=True))
        return loss, tape.gradient(loss, variables)

    def replica(windows):
        loss, grads = forward_backward(windows)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])  # needs every gradient

    windows = _windows(batch, cfg.seq_len, vocab)

    @tf.function
    def run():
        return strategy.experimental_local_results(strategy.run(replica, args=(windows,)))[0]
    return lambda: float(run())


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
    from tfdp import plan
    from tfdp.strategy import is_chief

    values = json.loads(spec)
    device = values.pop("device")
    shape = plan.Shape(**values.pop("shape"))
    job = plan.Job(shape, **values)
    measured = measure_worker(job, device, multi_worker=True)
    from tfdp.strategy import build_strategy
    chief = is_chief(build_strategy("multi_worker_mirrored", collective_timeout=300))
    print(json.dumps({**measured, "chief": chief}), flush=True)
    time.sleep(3.0)  # a peer may still be receiving the last all-reduce
    sys.stdout.flush()
    os._exit(0)  # skip TF's multi-worker shutdown barrier


if __name__ == "__main__":
    _worker(sys.argv[1])
