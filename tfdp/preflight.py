"""tfdp-preflight: is this cluster ready for the long job?

Run it the way the training job will run (the same TF_CONFIG, srun step or
tfdp-launch command, the same --strategy): every worker joins, runs the
checks below, and the chief prints one table, a row per worker.

  join        every worker arrives within --collective_timeout; otherwise
              the join watchdog names the missing ones and the waiting
              workers exit with status 137 (tfdp/joinwatch.py).
  devices     the GPUs TensorFlow registered (their model) and the NVIDIA
              driver's CUDA, cuDNN and NCCL versions this worker loaded
              (tfdp/gpus.py); a GPU node where TensorFlow registered no GPU
              stops here, as training would, unless --allow_cpu;
  code        a fingerprint of tfdp's own sources (its recipes included) and
              the TensorFlow, Keras, keras-hub, NumPy and Python versions;
              every worker must match the chief's.
  all-reduce  `allreduce_mb` MB per replica summed ROUNDS times after three
              warm-up calls (tfdp/probes.py's timer, which tfdp-plan
              --calibrate uses too): every sum must be exact, and the row
              shows the median time and the bandwidth,
              algorithmic (bytes / time) and bus (x 2(n-1)/n, what each link
              of a ring carries; the figure NCCL's tests report).
  train step  one tfdp training step (tfdp/step.py) of a tiny GPT on a fixed
              synthetic batch, split across all replicas as training splits
              it, against the same step computed by this worker alone on the
              whole batch: the loss and every weight must agree (allclose).
              A worker that reads another shard than it should, computes
              differently or applies another update fails here.

Every worker gathers every worker's results, so all exit with the same
status: 0 when everything passed, 1 when something failed.
"""

from __future__ import annotations

import hashlib
import platform
import socket
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfdp import cluster, gpus, watchdog
from tfdp.config import Config
from tfdp.model import build_model
from tfdp.optimizer import build_optimizer
from tfdp.probes import time_allreduce
from tfdp.step import make_train_step
from tfdp.strategy import build_strategy, describe, is_chief
from tfdp.tasks.language_model import LanguageModelTask

ROUNDS = 5
# The step check's model: tiny, so it takes seconds anywhere.
CHECK = Config(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=32,
               learning_rate=1e-2, warmup_steps=0, seed=4321)
VOCAB = 257
TOLERANCE = 1e-4  # |weight difference| after one step at learning rate 1e-2
# 16-bit words of the fingerprint; bytes of the host and GPU names.
_HASH_WORDS, _HOST_BYTES, _GPU_BYTES = 16, 32, 32


def _sources() -> list[tuple[str, Path]]:
    """tfdp's .py files, each under its installed name (`tfdp/recipes/...`).

    An editable install maps `tfdp.recipes` to the repository's data/ folder,
    a wheel copies that folder into tfdp/: naming files by module rather than
    by where they lie makes both installs of the same code hash the same.
    """
    from tfdp import recipes
    package, recipes_dir = Path(__file__).parent, Path(recipes.__file__).parent
    named = {path.relative_to(package.parent).as_posix(): path
             for path in package.rglob("*.py")}
    named.update((f"tfdp/recipes/{path.relative_to(recipes_dir).as_posix()}", path)
                 for path in recipes_dir.rglob("*.py"))
    return sorted(named.items())


def fingerprint() -> str:
    """SHA-256 of tfdp's sources and the versions it runs on."""
    digest = hashlib.sha256()
    for name, path in _sources():
        digest.update(name.encode())
        digest.update(path.read_bytes())
    import keras_hub
    versions = (f"tensorflow {tf.__version__} keras {keras.__version__} keras-hub "
                f"{keras_hub.__version__} numpy {np.__version__} python "
                f"{platform.python_version()}")
    digest.update(versions.encode())
    return digest.hexdigest()


def _gather(strategy, row: np.ndarray) -> np.ndarray:
    """Every replica's float32 `row`, stacked [replicas, len(row)] in replica
    order (this worker's replicas all give the same row)."""
    value = tf.constant(row, tf.float32)

    @tf.function
    def gather():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_gather(
            value[None], axis=0))
    return strategy.experimental_local_results(gather())[0].numpy()


def time_all_reduce(strategy, megabytes: float) -> dict:
    """Seconds per all-reduce of `megabytes` MB per replica (tfdp/probes.py's
    timer: the median of ROUNDS), its bandwidths, and whether every sum came
    out exact."""
    nbytes = max(int(megabytes * 2**20) // 4, 1) * 4
    n = strategy.num_replicas_in_sync
    seconds, exact = time_allreduce(strategy, nbytes, ROUNDS)
    algorithmic = nbytes / seconds
    return {"seconds": seconds, "exact": exact,
            "algorithmic_gbps": algorithmic * 8 / 1e9,
            "bus_gbps": algorithmic * 8 / 1e9 * (2 * (n - 1) / n if n > 1 else 1.0)}


def _one_step(strategy, batch: np.ndarray):
    """(loss, weights) after one tfdp step on `batch` under `strategy`, each
    input pipeline taking its contiguous share of the rows."""
    cfg = Config(**{**CHECK.__dict__, "global_batch_size": len(batch)})

    def dataset_fn(ctx: tf.distribute.InputContext):
        rows = len(batch) // ctx.num_input_pipelines
        mine = batch[ctx.input_pipeline_id * rows:(ctx.input_pipeline_id + 1) * rows]
        return tf.data.Dataset.from_tensor_slices(mine).batch(
            ctx.get_per_replica_batch_size(len(batch))).repeat()
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)  # the same initial weights everywhere
        model = build_model(cfg, VOCAB)
        optimizer = build_optimizer(cfg, model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, LanguageModelTask(cfg, VOCAB),
                           cfg.global_batch_size, cfg.clip_norm, jit_compile=False)
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    out = step(iterator, tf.constant(1), tf.constant(0.0))
    return float(out["loss"][0]), model.get_weights()


def check_step(strategy) -> dict:
    """One step on all replicas vs the same step on this worker alone."""
    n = strategy.num_replicas_in_sync
    rng = np.random.default_rng(CHECK.seed)
    batch = rng.integers(0, VOCAB, size=(2 * n, CHECK.seq_len + 1)).astype(np.int32)
    loss, weights = _one_step(strategy, batch)
    ref_loss, ref_weights = _one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), batch)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, ref_weights))
    return {"loss": loss, "reference_loss": ref_loss, "max_weight_difference": worst,
            "ok": worst <= TOLERANCE and abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))}


def _encode(text: str, length: int) -> list[float]:
    data = text.encode("utf-8")[:length]
    return list(data) + [0] * (length - len(data))


def _decode(values) -> str:
    return bytes(int(v) for v in values if v).decode("utf-8", errors="replace")


def _row(strategy, reduce: dict, step: dict, found: dict) -> np.ndarray:
    """This worker's results as float32 (16-bit words of the fingerprint,
    version codes below 2**24 and the names' bytes are exact in float32),
    for _gather."""
    digest = fingerprint()
    words = [int(digest[i:i + 4], 16) for i in range(0, 4 * _HASH_WORDS, 4)]
    devices = strategy.extended.worker_devices
    on_gpu = sum("GPU" in d.upper() for d in devices)
    return np.array(words + [len(devices), on_gpu, reduce["seconds"], reduce["bus_gbps"],
                             float(reduce["exact"]), step["max_weight_difference"],
                             float(step["ok"]), found["driver_cuda"], found["cudnn"],
                             found["nccl"]]
                    + _encode(socket.gethostname(), _HOST_BYTES)
                    + _encode(found["gpu_name"], _GPU_BYTES), np.float32)


def run_preflight(strategy_name: str = "auto", num_cpu_replicas: int = 2,
                  collective_timeout: float = 600.0, slurm_port_base: int = 8888,
                  allreduce_mb: float = 64.0, log=print, collective: str = "auto",
                  allow_cpu: bool = False) -> bool:
    """Run every check on this worker; the chief logs the table. Return
    True when every worker passed every check."""
    strategy = build_strategy(strategy_name, num_cpu_replicas,
                              collective_timeout=collective_timeout,
                              slurm_port_base=slurm_port_base, collective=collective,
                              allow_cpu=allow_cpu)
    say = log if is_chief(strategy) else (lambda *_: None)
    devices = strategy.extended.worker_devices
    local = len(devices)
    n = strategy.num_replicas_in_sync
    resolver = getattr(strategy, "cluster_resolver", None)
    addresses = ([address for _, _, address in cluster.tasks(resolver)]
                 if resolver is not None and resolver.task_type else ["(this process)"])
    say(f"preflight: {len(addresses)} worker(s), {n} replica(s); all-reduce "
        f"{allreduce_mb:g} MB x {ROUNDS}, one training step on {CHECK.num_layers}-layer GPT")
    say(f"strategy: {describe(strategy)}")
    found = gpus.versions()
    try:
        with watchdog.watching():  # a peer lost mid-check stops us within the timeout
            reduce = time_all_reduce(strategy, allreduce_mb)
            watchdog.beat()
            step = check_step(strategy)
            watchdog.beat()
            table = _gather(strategy, _row(strategy, reduce, step, found))[::local]  # per worker
    except tf.errors.OpError as err:
        lost = watchdog.peer_failure(err)  # a dead or stuck peer: one line, not a traceback
        if lost is None:
            raise
        raise lost from None
    digest = fingerprint()
    chief_words = table[0, :_HASH_WORDS]
    lines, failed, libraries = [], [], []
    for index, values in enumerate(table):
        words, rest = values[:_HASH_WORDS], values[_HASH_WORDS:]
        (local_n, on_gpu, seconds, bus, exact, worst, step_ok, driver, cudnn, nccl), rest = \
            rest[:10], rest[10:]
        host, gpu_name = rest[:_HOST_BYTES], rest[_HOST_BYTES:]
        same_code = bool(np.array_equal(words, chief_words))
        checks = {"code": same_code, "all-reduce": bool(exact), "train step": bool(step_ok)}
        bad = [name for name, ok in checks.items() if not ok]
        address = addresses[index] if index < len(addresses) else "?"
        if bad:
            failed.append(f"worker {index} ({address}): {', '.join(bad)}")
        kind = f"{int(on_gpu)} GPU" if on_gpu else f"{int(local_n)} CPU"
        libraries.append(
            f"{index:<6} {(_decode(gpu_name) or 'no GPU (CPU only)')[:32]:<32} "
            f"{gpus.dotted(int(driver), 'cuda'):<12} {gpus.dotted(int(cudnn), 'cudnn'):<8} "
            f"{gpus.dotted(int(nccl), 'nccl')}")
        lines.append(
            f"{index:<6} {address:<22} {_decode(host)[:16]:<16} {kind:<7} "
            f"{'same' if same_code else 'DIFFERS':<8} "
            f"{1000 * seconds:8.1f} ms {bus:7.2f} Gb/s {'' if exact else 'WRONG SUM':<9} "
            f"{'ok' if step_ok else 'FAILED'} (max |dw| {worst:.1e})")
    say(f"{'worker':<6} {'address':<22} {'host':<16} {'devices':<7} {'code':<8} "
        f"{'all-reduce (bus bandwidth)':<33} train step vs one replica")
    for line in lines:
        say(line)
    say(f"{'worker':<6} {'GPU':<32} {'driver CUDA':<12} {'cuDNN':<8} NCCL   (TensorFlow "
        f"built for CUDA {found['built_cuda'] or '-'}, cuDNN {found['built_cudnn'] or '-'})")
    for line in libraries:
        say(line)
    if failed:
        say("preflight: FAILED: " + "; ".join(failed))
    else:
        say(f"preflight: passed (code fingerprint {digest[:12]}, training loss "
            f"{step['loss']:.6f} = {step['reference_loss']:.6f} on one replica)")
    sys.stdout.flush()
    return not failed
