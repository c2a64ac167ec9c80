#!/usr/bin/env python3
"""Training throughput of tfdp vs a plain single-device Keras `model.fit`.

Every variant trains the default model of `tfdp.config.Config()` (same
layers, heads, width, seq_len, global batch, AdamW hyperparameters and
schedule) from the same initial weights on the same windows of the default
corpus, in one process. After a warm-up that traces and compiles every
variant, timed rounds of `--steps` steps run each variant in turn (the order
rotates every round), so machine noise falls on all of them alike; figures
are medians over rounds. The first step of every round is not timed (a fresh
input pipeline may still be filling), for every variant alike.

    python benchmarks/throughput.py        # about 3 minutes on a quiet 2-core CPU
    python benchmarks/throughput.py --rounds 3 --steps 10 --skip-no-jit --keras-jit default

MFU = tokens/s * FLOPs per token (6N + 12*L*H*Q*T, tfdp.flops) / the matmul
peak measured once per round (tfdp.flops.machine_peak_flops), median.
"""

from __future__ import annotations

import os
import time

_STARTED = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tfdp.config import Config  # noqa: E402
from tfdp.errors import UserError  # noqa: E402


# Objects whose teardown is skipped: see the end of this file.
_KEEP_ALIVE: list = []


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="mirrored",
                        choices=("mirrored", "one_device"),
                        help="tfdp strategy (default: mirrored)")
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPU replicas for mirrored on a CPU (default: 2)")
    parser.add_argument("--data", default=None,
                        help="a prepared data dir (tfdp-prepare output) or text to prepare; "
                             "default: the stdlib corpus, prepared into a temp dir")
    parser.add_argument("--steps", type=int, default=15,
                        help="steps per variant per round (first one untimed; default: 15)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per variant before the rounds (default: 3)")
    parser.add_argument("--keras-jit", default="both", choices=("default", "xla", "both"),
                        help="baseline model.fit with Keras' default jit_compile "
                             "('auto': no XLA on a CPU-only machine), with "
                             "jit_compile=True, or both (default)")
    parser.add_argument("--skip-no-jit", action="store_true",
                        help="do not time tfdp with jit_compile=False")
    parser.add_argument("--bf16", action="store_true",
                        help="also time tfdp with --mixed_precision=bf16 (its MFU column "
                             "still uses the float32 matmul peak)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.replicas < 1 or args.warmup < 1:
        parser.error("--steps must be >= 2; --rounds, --replicas and --warmup >= 1")
    return args


# ---------------------------------------------------------------- data

def load_splits(spec: str | None, cfg: Config, tmp: str):
    """(train Split, val Split, manifest): a prepared dir as is, else text
    (default: the stdlib corpus) prepared into `tmp` as tfdp-train would."""
    import data as recipes
    from tfdp.dataset import Split
    from tfdp.prepare import is_prepared, load_manifest, prepare

    spec = os.path.expanduser(spec or cfg.data)
    if is_prepared(spec):
        data_dir = spec
    else:
        data_dir = os.path.join(tmp, "data")
        began = time.perf_counter()
        prepare(recipes.source_files(spec), data_dir, cfg.tokenizer, cfg.vocab_size,
                cfg.val_fraction, log=lambda *_: None)
        print(f"prepared {spec!r} into a temp dir in {time.perf_counter() - began:.1f}s")
    return (Split(data_dir, "train", cfg.seq_len), Split(data_dir, "val", cfg.seq_len),
            load_manifest(data_dir))


def keras_dataset(windows, num_windows: int, cfg: Config, start_step: int):
    """(inputs, targets) batches of tfdp's training windows in tfdp's order,
    from `start_step` on (tfdp.dataset.train_dataset_fn on one pipeline)."""
    import tensorflow as tf
    from tfdp.dataset import shuffled_index

    def split(w):
        inputs = w[:, :-1]
        return {"token_ids": inputs, "padding_mask": tf.ones_like(inputs, tf.bool)}, w[:, 1:]
    auto = tf.data.AUTOTUNE
    return (tf.data.Dataset.range(start_step * cfg.global_batch_size, tf.int64.max)
            .map(lambda q: shuffled_index(q, num_windows, cfg.seed), num_parallel_calls=auto)
            .batch(cfg.global_batch_size, drop_remainder=True)
            .map(windows, num_parallel_calls=auto)
            .map(split, num_parallel_calls=auto)
            .prefetch(auto))


def eval_loss(model, windows) -> float:
    """Mean next-token loss of `model` on a fixed batch of windows."""
    import tensorflow as tf
    from tfdp.model import logits

    out = tf.cast(logits(model, windows[:, :-1]), tf.float32)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=windows[:, 1:], logits=out)))


# ---------------------------------------------------------------- variants

class Variant:
    """A model and its training; `run(steps)` returns the wall time at the
    end of each step. Every variant starts from the same initial weights
    (seed cfg.seed) and reads the same windows in the same order."""

    name: str   # in the table
    short: str  # in the per-round lines
    model = None

    def run(self, steps: int) -> list[float]:
        raise NotImplementedError


class TfdpVariant(Variant):
    """tfdp's own pieces as tfdp.run.train uses them; the step is called as
    tfdp.loop.Trainer calls it (float(loss) after every step)."""

    def __init__(self, name, short, strategy, vocab_size: int, train, cfg: Config, jit: bool):
        import keras
        from tfdp.dataset import train_dataset_fn
        from tfdp.model import build_model
        from tfdp.optimizer import build_optimizer
        from tfdp.step import make_train_step

        self.name, self.short = name, short
        with strategy.scope():
            keras.utils.set_random_seed(cfg.seed)
            self.model = build_model(cfg, vocab_size)
            optimizer = build_optimizer(cfg, self.model.trainable_variables)
        self.step = make_train_step(strategy, self.model, optimizer, cfg.global_batch_size,
                                    cfg.seq_len, cfg.clip_norm, jit)
        dataset = strategy.distribute_datasets_from_function(
            train_dataset_fn(train, cfg.global_batch_size, cfg.seed, 0))
        self.iterator = iter(dataset)
        self.loss = math.nan

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            out = self.step(self.iterator)
            self.loss = float(out["loss"][-1])  # waits for the step to finish
            times.append(time.perf_counter())
        return times


class KerasFitVariant(Variant):
    """A plain single-device `model.fit` of the same model: no strategy."""

    def __init__(self, vocab_size: int, train, cfg: Config, jit_compile):
        import keras
        from tfdp.model import build_model
        from tfdp.optimizer import WarmupCosine

        keras.utils.set_random_seed(cfg.seed)
        self.model = build_model(cfg, vocab_size)
        variables = self.model.trainable_variables
        # tfdp's hyperparameters and schedule (tfdp.optimizer.build_optimizer),
        # with Keras' own global-norm clipping in place of tfdp's.
        self.optimizer = keras.optimizers.AdamW(
            learning_rate=WarmupCosine(cfg.learning_rate, cfg.min_learning_rate,
                                       cfg.warmup_steps, cfg.train_steps),
            weight_decay=cfg.weight_decay, beta_1=0.9, beta_2=cfg.beta2, epsilon=1e-8,
            global_clipnorm=cfg.clip_norm if cfg.clip_norm > 0 else None)
        self.optimizer.exclude_from_weight_decay(
            var_list=[v for v in variables if len(v.shape) < 2])
        self.model.compile(
            optimizer=self.optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],  # keras-hub's default would add an accuracy metric
            jit_compile=jit_compile)
        jit = bool(self.model.jit_compile)  # "auto" resolves to False on a CPU-only host
        self.name = f"keras_fit (1 device, {'XLA' if jit else 'no XLA'})"
        self.short = "fit-xla" if jit else "fit"
        self.windows, self.num_windows, self.cfg = train.window_fn(), train.num_windows, cfg
        self.timer = _step_timer()
        self.loss = math.nan

    def run(self, steps: int) -> list[float]:
        # Each fit() restarts its dataset, so start it where the last one ended.
        start = int(self.optimizer.iterations.numpy())
        self.model.fit(keras_dataset(self.windows, self.num_windows, self.cfg, start),
                       epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
                       callbacks=[self.timer])
        self.loss = self.timer.loss
        return self.timer.times


def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time at the end of every batch. Keras hands callbacks Python
        floats, so the step has finished, as after tfdp's float(loss)."""

        def on_train_begin(self, logs=None):
            self.times, self.loss = [], math.nan

        def on_train_batch_end(self, batch, logs=None):
            self.loss = float((logs or {}).get("loss", math.nan))
            self.times.append(time.perf_counter())
    return StepTimer()


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dataclasses.replace(Config(), strategy=args.strategy,
                              num_cpu_replicas=args.replicas).validate()
    from tfdp.strategy import build_strategy  # imports TensorFlow: after --help

    # Before anything else touches TensorFlow: this splits the CPU into replicas.
    strategy = build_strategy(cfg.strategy, cfg.num_cpu_replicas)

    import keras
    import tensorflow as tf
    from tfdp.flops import flops_per_token, machine_peak_flops
    from tfdp.model import count_params, non_embedding_params

    replicas = strategy.num_replicas_in_sync
    if cfg.global_batch_size % replicas:
        raise UserError(f"global batch {cfg.global_batch_size} is not divisible by "
                        f"{replicas} replicas; choose --replicas that divides it")
    kind = {"MirroredStrategy": "mirrored", "OneDeviceStrategy": "one_device",
            "MultiWorkerMirroredStrategy": "multi_worker"}.get(type(strategy).__name__,
                                                               type(strategy).__name__)
    load_before = os.getloadavg()
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    with tempfile.TemporaryDirectory(prefix="tfdp-bench-") as tmp:
        train, val, manifest = load_splits(args.data, cfg, tmp)
        vocab = int(manifest["vocab_size"])
        tag = f"tfdp ({kind} x{replicas}"
        variants: list[Variant] = [
            TfdpVariant(f"{tag}, XLA)", "tfdp", strategy, vocab, train, cfg, True)]
        if args.bf16:
            variants.append(TfdpVariant(f"{tag}, XLA, bf16)", "tfdp-bf16", strategy, vocab,
                                        train, dataclasses.replace(cfg, mixed_precision="bf16"),
                                        True))
        if not args.skip_no_jit:
            variants.append(TfdpVariant(f"{tag}, no XLA)", "tfdp-nojit", strategy, vocab,
                                        train, cfg, False))
        if args.keras_jit in ("default", "both"):
            variants.append(KerasFitVariant(vocab, train, cfg, "auto"))
        if args.keras_jit in ("xla", "both"):
            variants.append(KerasFitVariant(vocab, train, cfg, True))
        _KEEP_ALIVE.append(variants)  # freed by os._exit, not by returning (see the end)
        model = variants[0].model
        fpt = flops_per_token(non_embedding_params(model), cfg.num_layers, cfg.num_heads,
                              cfg.hidden_dim // cfg.num_heads, cfg.seq_len)
        print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
              f"{platform.python_version()}, {os.cpu_count()} CPU core(s); tfdp devices: "
              f"{', '.join(d.split('/')[-1] for d in strategy.extended.worker_devices)}")
        print(f"model: Config() default, {cfg.num_layers} layers x {cfg.num_heads} heads x "
              f"{cfg.hidden_dim} wide, seq_len {cfg.seq_len}, global batch "
              f"{cfg.global_batch_size} ({tokens_per_step:,} tokens/step), vocab {vocab}; "
              f"{count_params(model):,} params, {fpt / 1e6:.2f} MFLOPs/token")
        print(f"data: {train.num_windows:,} train windows ({manifest['tokenizer']} tokens)")

        warmup = []
        for variant in variants:  # trace and compile everything before timing anything
            began = time.perf_counter()
            variant.run(args.warmup)
            warmup.append(f"{variant.short} {time.perf_counter() - began:.1f}s")
        print(f"warm-up, {args.warmup} steps each incl. tracing/compiling: "
              f"{', '.join(warmup)}", flush=True)

        rates: dict[str, list[float]] = {v.name: [] for v in variants}
        peaks: list[float] = []
        jobs = list(variants) + [None]  # None: measure the matmul peak
        for r in range(args.rounds):
            k = r % len(jobs)  # rotate the order so no variant always goes first
            for job in jobs[k:] + jobs[:k]:
                if job is None:
                    peaks.append(machine_peak_flops(strategy))
                    continue
                times = job.run(args.steps)  # times[0] ends the untimed first step
                rates[job.name].append(tokens_per_step * (len(times) - 1)
                                       / (times[-1] - times[0]))
            print(f"round {r + 1}/{args.rounds} tok/s: " + ", ".join(
                f"{v.short} {rates[v.name][-1]:,.0f}" for v in variants), flush=True)

        # Same start, same windows, same hyperparameters: the models should agree.
        held_out = val.window_fn()(tf.range(min(64, val.num_windows), dtype=tf.int64))
        losses = {v.name: eval_loss(v.model, held_out) for v in variants}
    load_after = os.getloadavg()

    peak = statistics.median(peaks)
    median = {name: statistics.median(values) for name, values in rates.items()}
    steps_each = args.warmup + args.rounds * args.steps
    width = max(len(name) for name in rates) + 2
    print()
    print(f"matmul peak, 1024x1024 fp32 on {strategy.extended.worker_devices[0].split('/')[-1]}"
          f" (median of {len(peaks)}): {peak / 1e9:.1f} GFLOP/s "
          f"(range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})")
    print(f"{args.rounds} rounds x {args.steps - 1} timed steps per variant, medians; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - _STARTED:.0f}s in all")
    print(f"val loss: mean over {int(held_out.shape[0])} val windows after {steps_each} "
          "steps of each variant from the same initial weights")
    print()
    print(f"{'variant':<{width}} {'tok/s':>8} {'tok/s/replica':>14} {'ms/step':>8} "
          f"{'mfu':>6}  {'range tok/s':>15}  {'val loss':>8}")
    for variant in variants:
        values = rates[variant.name]
        n = replicas if isinstance(variant, TfdpVariant) else 1
        tps = median[variant.name]
        print(f"{variant.name:<{width}} {tps:>8,.0f} {tps / n:>14,.0f} "
              f"{1000 * tokens_per_step / tps:>8.1f} {100 * tps * fpt / peak:>5.1f}%  "
              f"{min(values):>7,.0f}-{max(values):<7,.0f}  {losses[variant.name]:>8.4f}")
    print()
    pairs = [(a, b) for a in variants if isinstance(a, TfdpVariant)
             for b in variants if isinstance(b, KerasFitVariant)]
    if len(variants) > 1 and isinstance(variants[1], TfdpVariant):
        pairs.append((variants[0], variants[1]))
    for a, b in pairs:
        # The ratio of medians, and the median of each round's ratio (the two
        # ran seconds apart in one round, so slow drifts in load cancel).
        paired = statistics.median(x / y for x, y in zip(rates[a.name], rates[b.name]))
        print(f"ratio {a.name} / {b.name}  {median[a.name] / median[b.name]:.2f}x "
              f"(per-round median {paired:.2f}x)")
    bad = [name for name, loss in losses.items() if not math.isfinite(loss)]
    if bad:
        print(f"error: non-finite loss in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except UserError as err:  # a bad --data path and the like: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        status = 2
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip tearing down the models, datasets and iterators: destroying them
    # (when main() returned, or at interpreter exit) sat idle for 40-130 s on
    # a 2-core CPU, every thread asleep and the main thread in tf.data's
    # IteratorResource destructor. Everything is printed and the temp dir is
    # gone by now; nothing else needs cleaning up.
    os._exit(status)
