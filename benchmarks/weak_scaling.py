#!/usr/bin/env python3
"""Weak-scaling efficiency of multi-worker training on this machine.

    efficiency = tokens/s of 2 workers (one core each, MultiWorkerMirrored)
                 / (2 x tokens/s of 1 process on one core)

at the same per-replica batch, for per-replica batches of 768 and 8192
tokens (6 and 64 windows of 128). Each measurement is a fresh process (the
pair started by tfdp-launch, pinned one core per worker); rounds interleave
every variant so load changes on this shared machine fall on all alike;
figures are medians over rounds.

Besides the efficiency, each size reports a ceiling: two independent
processes on their own cores at once, no communication at all, against 2x
one alone. Cores that share caches, memory bandwidth or a physical core
(a VM's vCPUs may be hyperthreads) lower it; no communication scheme can
beat it, so the fraction of the ceiling is what tfdp's step itself costs.

Variants of the 2-worker step (the 1-process reference is tfdp's step on
one core; its all-reduce over one replica costs nothing):

  tfdp            one all-reduce per step carrying gradients and loss
  tfdp-bf16-wire  gradients all-reduced in bfloat16 (loss separately)
  naive           the textbook custom loop: loss scaled per replica, Keras'
                  optimizer all-reduces the gradients, loss reduced with
                  strategy.reduce (as in the TF distributed-training guide)

    python benchmarks/weak_scaling.py                 # ~10 minutes on 2 cores
    python benchmarks/weak_scaling.py --rounds 1 --steps 20 --tokens 768

With `--grad_accum K` it measures instead what gradient accumulation saves
in communication, at a per-replica micro-batch of `--tokens` (768 by
default): tfdp's step with K=1 and with K micro-batches per update (one
all-reduce per K), each as 2 workers and as 2 independent processes on
their own cores (the same per-process work and the same contention for
the machine, without communication). The time a 2-worker step spends
beyond the independent processes' step is its communication (the
all-reduce and waiting for the other worker); the script prints it per
step and per token for K=1 and K.

    python benchmarks/weak_scaling.py --grad_accum 4  # ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("tfdp", "tfdp-bf16-wire", "naive")
SEQ_LEN = 128
_ALLREDUCE: list[float] = []  # seconds per all-reduce, as the workers report them


# ---------------------------------------------------------------- one process

def worker(args) -> None:
    """Train `--steps` timed steps; the chief prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    from tfdp.config import Config
    from tfdp.dataset import Split, train_dataset_fn
    from tfdp.model import build_model, logits
    from tfdp.optimizer import build_optimizer
    from tfdp.prepare import load_manifest
    from tfdp.step import make_train_step
    from tfdp.strategy import build_strategy, is_chief

    multi = "TF_CONFIG" in os.environ
    strategy = build_strategy("multi_worker_mirrored" if multi else "one_device",
                              collective_timeout=600)
    replicas = strategy.num_replicas_in_sync
    per_replica = args.tokens // SEQ_LEN * args.grad_accum
    cfg = Config(seq_len=SEQ_LEN, global_batch_size=per_replica * replicas,
                 grad_accum_steps=args.grad_accum)
    split = Split(args.data, "train", SEQ_LEN)
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(cfg, load_manifest(args.data)["vocab_size"])
        if args.variant == "naive":
            optimizer = keras.optimizers.AdamW(cfg.learning_rate, weight_decay=cfg.weight_decay,
                                               beta_2=cfg.beta2, global_clipnorm=cfg.clip_norm)
            optimizer.build(model.trainable_variables)
        else:
            optimizer = build_optimizer(cfg, model.trainable_variables)
    if args.variant == "naive":
        variables = model.trainable_variables

        @tf.function(jit_compile=True)
        def forward_backward(windows):
            with tf.GradientTape() as tape:
                per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    windows[:, 1:], logits(model, windows[:, :-1], training=True))
                loss = tf.nn.compute_average_loss(tf.reduce_mean(per_token, axis=1),
                                                  global_batch_size=cfg.global_batch_size)
            return loss, tape.gradient(loss, variables)

        def replica_step(windows):
            loss, grads = forward_backward(windows)
            optimizer.apply_gradients(zip(grads, variables))
            return loss

        @tf.function
        def step(iterator):
            loss = strategy.run(replica_step, args=(next(iterator),))
            return {"loss": tf.reshape(strategy.reduce("SUM", loss, axis=None), [1])}
    else:
        wire = "bfloat16" if args.variant == "tfdp-bf16-wire" else "float32"
        from tfdp.tasks.language_model import LanguageModelTask
        task = LanguageModelTask(cfg, model.backbone.vocabulary_size)
        step = make_train_step(strategy, model, optimizer, task, cfg.global_batch_size,
                               cfg.clip_norm, True, all_reduce_dtype=wire,
                               grad_accum_steps=cfg.grad_accum_steps)
    iterator = iter(strategy.distribute_datasets_from_function(
        train_dataset_fn(split, cfg.global_batch_size, cfg.seed)))
    for _ in range(args.warmup):
        float(step(iterator)["loss"][-1])
    began = time.perf_counter()
    for _ in range(args.steps):
        float(step(iterator)["loss"][-1])
    seconds = time.perf_counter() - began
    result = {"tokens_per_second": args.steps * cfg.global_batch_size * SEQ_LEN / seconds,
              "replicas": replicas}
    if multi and args.time_allreduce:
        result["allreduce_seconds"] = _time_allreduce(strategy, model)
    if is_chief(strategy):
        print(json.dumps(result), flush=True)
    else:
        # The chief may still be pulling this worker's half of the last
        # all-reduce (RecvBuf); leaving at once would fail it.
        time.sleep(3.0)
    sys.stdout.flush()
    os._exit(0)  # skip TF's multi-worker teardown (a shutdown barrier); results are printed


def _time_allreduce(strategy, model, calls: int = 20) -> float:
    """Seconds per all-reduce of what tfdp's step sends (every gradient, the
    loss and the stop flag, float32), alone, between the same workers just
    after training: the communication a step pays when no worker waits for
    another's compute. Median of `calls`."""
    import tensorflow as tf

    shapes = [v.shape for v in model.trainable_variables] + [[], []]

    @tf.function
    def allreduce():
        def send():
            return tf.distribute.get_replica_context().all_reduce(
                "SUM", [tf.ones(shape) for shape in shapes])
        return strategy.experimental_local_results(strategy.run(send)[-1])[0]
    for _ in range(3):
        float(allreduce())
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        float(allreduce())
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# ---------------------------------------------------------------- driver

def _result(proc: subprocess.Popen, cmd) -> float:
    out, err = proc.communicate(timeout=900)
    for line in out.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("{"):
            result = json.loads(line)
            if "allreduce_seconds" in result:
                _ALLREDUCE.append(result["allreduce_seconds"])
            return result["tokens_per_second"]
    raise RuntimeError(f"no result from {' '.join(cmd)}:\n{out[-2000:]}\n{err[-2000:]}")


def _measure(argv: list[str], kind: str) -> float:
    """Tokens/s of: "single" (1 process on 1 core), "pair" (2 workers, one
    core each, tfdp-launch) or "independent" (2 single processes at once on
    cores of their own, summed: what the machine allows with no communication)."""
    here = [sys.executable, str(Path(__file__).resolve()), "--worker", *argv]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if kind == "pair":
        cmd = [str(Path(sys.executable).parent / "tfdp-launch"), "--num_workers=2",
               "--cpu_threads_per_worker=1", "--", *here]
        return _result(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env), cmd)
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    cores = sorted(os.sched_getaffinity(0))[:1 if kind == "single" else 2]
    cmds = [["taskset", "-c", str(core), *here] for core in cores]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for c in cmds]
    return sum(_result(p, c) for p, c in zip(procs, cmds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help="prepared data dir (default: stdlib, "
                        "prepared into a temp dir)")
    parser.add_argument("--variant", default="tfdp", choices=VARIANTS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=0, help="one per-replica size only")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (768 tokens; "
                        "scaled down for larger batches to keep the time per run similar)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time_allreduce", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="K > 1: compare communication per token of K=1 and K "
                             "micro-batches of --tokens per update (see above)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.grad_accum < 1:
        parser.error("--grad_accum must be >= 1")
    sys.path.insert(0, str(ROOT))
    variants = args.variants.split(",")
    sizes = [args.tokens] if args.tokens else [768, 8192]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            from tfdp import recipes
            from tfdp.prepare import prepare
            data_dir = os.path.join(tmp, "data")
            prepare(recipes.source_files("stdlib"), data_dir, "byte", log=lambda *_: None)
        print(f"weak scaling on {os.cpu_count()} cores; {args.rounds} round(s); "
              f"model: tfdp default (4 layers, width 128), seq_len {SEQ_LEN}", flush=True)
        if args.grad_accum > 1:
            return accumulation(args, data_dir, args.tokens or 768)
        for tokens in sizes:
            steps = max(8, args.steps * 768 // tokens)
            common = [f"--data={data_dir}", f"--tokens={tokens}", f"--steps={steps}",
                      f"--warmup={args.warmup}"]
            runs: dict[str, list[float]] = {"single": [], "independent": []} | {
                v: [] for v in variants}
            for r in range(args.rounds):
                order = list(runs)
                order = order[r % len(order):] + order[:r % len(order)]
                for name in order:
                    variant = "tfdp" if name in ("single", "independent") else name
                    kind = name if name in ("single", "independent") else "pair"
                    runs[name].append(_measure([*common, f"--variant={variant}"], kind))
            single = statistics.median(runs["single"])
            print(f"\nper-replica batch {tokens} tokens ({tokens // SEQ_LEN} windows), "
                  f"{steps} timed steps, medians of {args.rounds}:")
            print(f"  1 process, 1 core     {single:10,.0f} tok/s   "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in runs['single'])})")
            both = statistics.median(runs["independent"])
            print(f"  2 processes, no comm. {both:10,.0f} tok/s   ceiling    "
                  f"{both / (2 * single):6.1%}   "
                  f"(runs: {', '.join(f'{x:,.0f}' for x in runs['independent'])})")
            for v in variants:
                pair = statistics.median(runs[v])
                print(f"  2 workers, {v:<14} {pair:10,.0f} tok/s   efficiency "
                      f"{pair / (2 * single):6.1%} ({pair / both:6.1%} of the ceiling)   "
                      f"(runs: {', '.join(f'{x:,.0f}' for x in runs[v])})", flush=True)


def accumulation(args, data_dir: str, tokens: int) -> None:
    """Communication per step and per token, K=1 against K=args.grad_accum."""
    ks = (1, args.grad_accum)
    runs: dict[tuple[str, int], list[float]] = {(kind, k): [] for k in ks
                                                for kind in ("independent", "pair")}
    steps = {k: max(8, args.steps // k) for k in ks}
    allreduce: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(args.rounds):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for kind, k in order:
            argv = [f"--data={data_dir}", f"--tokens={tokens}", f"--steps={steps[k]}",
                    f"--warmup={args.warmup}", "--variant=tfdp", f"--grad_accum={k}",
                    "--time_allreduce"]
            runs[(kind, k)].append(_measure(argv, kind))
            if kind == "pair":
                allreduce[k].append(_ALLREDUCE.pop())
    print(f"\nmicro-batch {tokens} tokens per replica ({tokens // SEQ_LEN} windows), "
          f"medians of {args.rounds} round(s); overhead = a 2-worker step's time - the step "
          "time of 2 independent processes doing the same work; all-reduce = the step's "
          "all-reduce timed alone between the same workers")
    comm, alone_ar = {}, {}
    for k in ks:
        per_step = tokens * k  # tokens per replica per update
        alone = statistics.median(runs[("independent", k)])  # summed over both
        pair = statistics.median(runs[("pair", k)])
        t_alone, t_pair = 2 * per_step / alone, 2 * per_step / pair
        comm[k] = (t_pair - t_alone) / (2 * per_step)  # seconds per token of the job
        print(f"  K={k}: {per_step:,} tokens/replica/update; 2 independent processes "
              f"{alone:,.0f} tok/s ({1000 * t_alone:.1f} ms/step), 2 workers {pair:,.0f} "
              f"tok/s ({1000 * t_pair:.1f} ms/step); overhead "
              f"{1000 * (t_pair - t_alone):.1f} ms/step, {1e6 * comm[k]:.2f} us/token, "
              f"{(t_pair - t_alone) / t_pair:.0%} of the step  (runs: 2 workers "
              f"{', '.join(f'{x:,.0f}' for x in runs[('pair', k)])}; independent "
              f"{', '.join(f'{x:,.0f}' for x in runs[('independent', k)])})")
        ar = statistics.median(allreduce[k])
        alone_ar[k] = ar / (2 * per_step)
        print(f"        all-reduce alone {1000 * ar:.1f} ms ({1e6 * alone_ar[k]:.2f} us/token, "
              f"{ar / t_pair:.0%} of the 2-worker step)")
    k = args.grad_accum
    print(f"  per token, K={k} / K=1: all-reduce {alone_ar[k] / alone_ar[1]:.2f}, overhead "
          f"{comm[k] / comm[1]:.2f} (one all-reduce per {k} micro-batches: ideally "
          f"1/{k} = {1 / k:.2f})")


if __name__ == "__main__":
    main()
