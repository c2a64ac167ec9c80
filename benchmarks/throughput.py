#!/usr/bin/env python3
"""Training throughput of tfdp vs a plain single-device Keras `model.fit`.

Every variant trains the same model (`--model`: the default of
`tfdp.config.Config()`, or the issue's shapes a and b) with the same global
batch, AdamW hyperparameters and schedule, from the same initial weights on
the same windows, in one process, in each of the `--precisions`. After a warm-up that traces and compiles every
variant, timed rounds of `--steps` steps run each variant in turn (the order
rotates every round), so machine noise falls on all of them alike; figures
are medians over rounds. The first step of every round is not timed (a fresh
input pipeline may still be filling), for every variant alike.

    python benchmarks/throughput.py        # about 3 minutes on a quiet 2-core CPU
    python benchmarks/throughput.py --rounds 3 --steps 10 --skip-no-jit --keras-jit default
    python benchmarks/throughput.py --model b --precisions fp32,bf16 --keras-jit xla

MFU = tokens/s * FLOPs per token (6N + 12*L*H*Q*T, tfdp.flops) / the matmul
peak in the variant's compute dtype, measured once per round
(tfdp.flops.machine_peak_flops), median.
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

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# The two shapes, character tokens (tiny Shakespeare has 65
# characters; + EOT + unknown). Everything else is Config()'s default.
MODELS = {
    "default": {},
    "a": dict(num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=512, seq_len=64,
              global_batch_size=12, tokenizer="char", vocab_size=67),
    "b": dict(num_layers=6, num_heads=6, hidden_dim=384, intermediate_dim=1536, seq_len=256,
              global_batch_size=8, tokenizer="char", vocab_size=67),
}
# --precisions name -> Config.mixed_precision, and the compute dtype.
PRECISIONS = {"fp32": ("off", "float32"), "bf16": ("bf16", "bfloat16"),
              "fp16": ("fp16", "float16")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="mirrored",
                        choices=("mirrored", "one_device"),
                        help="tfdp strategy (default: mirrored)")
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPU replicas for mirrored on a CPU (default: 2)")
    parser.add_argument("--model", default="default", choices=sorted(MODELS),
                        help="default: Config()'s model (byte tokens); a: 4 layers x 4 heads "
                             "x 128, context 64, batch 12; b: 6 x 6 x 384, context 256, "
                             "batch 8 (a and b: character tokens, vocab 65 + 2)")
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated, of fp32, bf16, fp16: tfdp and Keras each train "
                             "in each (default: fp32)")
    parser.add_argument("--steps-per-loop", type=int, default=1,
                        help="steps per call: tfdp's --steps_per_loop and Keras' "
                             "steps_per_execution (default: 1)")
    parser.add_argument("--data", default=None,
                        help="a prepared data dir (tfdp-prepare output) or text to prepare; "
                             "default: the stdlib corpus (--model a, b: tiny Shakespeare from "
                             "../shared/data when present), prepared into a temp dir")
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
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.replicas < 1 or args.warmup < 1:
        parser.error("--steps must be >= 2; --rounds, --replicas and --warmup >= 1")
    spl = args.steps_per_loop
    if spl < 1 or args.steps % spl or args.steps // spl < 2 or args.warmup % spl:
        parser.error("--steps and --warmup must be multiples of --steps-per-loop, "
                     "--steps at least two of them")
    args.precisions = args.precisions.split(",")
    if not args.precisions or set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}")
    if args.data is None and args.model != "default" and SHAKESPEARE.exists():
        args.data = str(SHAKESPEARE)
    return args


# ---------------------------------------------------------------- data

def load_splits(spec: str | None, cfg: Config, tmp: str):
    """(train Split, val Split, manifest): a prepared dir as is, else text
    (default: the stdlib corpus) prepared into `tmp` as tfdp-train would."""
    from tfdp import recipes
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
    end of each call of `per_call` steps. Every variant starts from the same
    initial weights (seed cfg.seed) and reads the same windows in the same
    order."""

    name: str   # in the table
    short: str  # in the per-round lines
    dtype: str  # compute dtype: its matmul peak is the MFU's denominator
    model = None

    def run(self, steps: int) -> list[float]:
        raise NotImplementedError


class TfdpVariant(Variant):
    """tfdp's own pieces as tfdp.training.train uses them; the step is called as
    tfdp.runner.Runner calls it (float(loss) after every call)."""

    def __init__(self, name, short, strategy, vocab_size: int, train, cfg: Config, jit: bool,
                 per_call: int):
        import keras
        import tensorflow as tf
        from tfdp.dataset import train_dataset_fn
        from tfdp.loss_scale import DynamicLossScale
        from tfdp.model import build_model
        from tfdp.optimizer import build_optimizer
        from tfdp.step import make_train_step
        from tfdp.tasks.language_model import LanguageModelTask

        self.name, self.short, self.per_call, self.jit = name, short, per_call, jit
        with strategy.scope():
            keras.utils.set_random_seed(cfg.seed)
            self.model = build_model(cfg, vocab_size)
            optimizer = build_optimizer(cfg, self.model.trainable_variables)
            scale = DynamicLossScale() if cfg.mixed_precision == "fp16" else None
        self.dtype = self.model.backbone.compute_dtype
        self.step = make_train_step(strategy, self.model, optimizer,
                                    LanguageModelTask(cfg, vocab_size), cfg.global_batch_size,
                                    cfg.clip_norm, jit, loss_scale=scale)
        dataset = strategy.distribute_datasets_from_function(
            train_dataset_fn(train, cfg.global_batch_size, cfg.seed, 0))
        self.iterator = iter(dataset)
        self.num_steps = tf.constant(per_call)
        self.loss = math.nan

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps // self.per_call):
            out = self.step(self.iterator, self.num_steps)
            self.loss = float(out["loss"][-1])  # waits for the steps to finish
            times.append(time.perf_counter())
        return times


class KerasFitVariant(Variant):
    """A plain single-device `model.fit` of the same model: no strategy."""

    def __init__(self, vocab_size: int, train, cfg: Config, jit_compile, per_call: int,
                 precision: str):
        import keras
        from tfdp.model import build_model
        from tfdp.optimizer import WarmupCosine

        keras.utils.set_random_seed(cfg.seed)
        self.model = build_model(cfg, vocab_size)
        self.dtype = self.model.backbone.compute_dtype
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
        # Keras wraps the optimizer itself only when the model's own policy
        # is mixed_float16; here the policy is the backbone's, so wrap it.
        optimizer = (keras.optimizers.LossScaleOptimizer(self.optimizer)
                     if cfg.mixed_precision == "fp16" else self.optimizer)
        self.model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],  # keras-hub's default would add an accuracy metric
            jit_compile=jit_compile, steps_per_execution=per_call)
        jit = bool(self.model.jit_compile)  # "auto" resolves to False on a CPU-only host
        extra = "" if precision == "fp32" else f", {precision}"
        self.name = f"keras_fit (1 device, {'XLA' if jit else 'no XLA'}{extra})"
        self.short = ("fit-xla" if jit else "fit") + ("" if precision == "fp32"
                                                     else f"-{precision}")
        self.windows, self.num_windows, self.cfg = train.window_fn(), train.num_windows, cfg
        self.per_call, self.timer = per_call, _step_timer()
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
        """Wall time at the end of every call (every steps_per_execution
        steps). Keras hands callbacks Python floats, so the steps have
        finished, as after tfdp's float(loss)."""

        def on_train_begin(self, logs=None):
            self.times, self.loss = [], math.nan

        def on_train_batch_end(self, batch, logs=None):
            self.loss = float((logs or {}).get("loss", math.nan))
            self.times.append(time.perf_counter())
    return StepTimer()


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dataclasses.replace(Config(), strategy=args.strategy, num_cpu_replicas=args.replicas,
                              **MODELS[args.model]).validate()
    from tfdp.strategy import build_strategy  # imports TensorFlow: after --help

    # Before anything else touches TensorFlow: this splits the CPU into replicas.
    strategy = build_strategy(cfg.strategy, cfg.num_cpu_replicas)

    import keras
    import tensorflow as tf
    from tfdp.flops import flops_per_token, machine_peak_flops
    from tfdp.model import count_params, non_embedding_params
    from tfdp.step import default_jit_compile

    replicas = strategy.num_replicas_in_sync
    if cfg.global_batch_size % replicas:
        raise UserError(f"global batch {cfg.global_batch_size} is not divisible by "
                        f"{replicas} replicas; choose --replicas that divides it")
    kind = {"MirroredStrategy": "mirrored", "OneDeviceStrategy": "one_device",
            "MultiWorkerMirroredStrategy": "multi_worker"}.get(type(strategy).__name__,
                                                               type(strategy).__name__)
    load_before = os.getloadavg()
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    per_call = args.steps_per_loop
    with tempfile.TemporaryDirectory(prefix="tfdp-bench-") as tmp:
        train, val, manifest = load_splits(args.data, cfg, tmp)
        vocab = int(manifest["vocab_size"])
        variants: list[Variant] = []
        for precision in args.precisions:
            pcfg = dataclasses.replace(cfg, mixed_precision=PRECISIONS[precision][0])
            extra, short = ("", "") if precision == "fp32" else (f", {precision}",
                                                                 f"-{precision}")
            tag = f"tfdp ({kind} x{replicas}"
            variants.append(TfdpVariant(f"{tag}, XLA{extra})", f"tfdp{short}", strategy,
                                        vocab, train, pcfg, True, per_call))
            if not args.skip_no_jit:
                variants.append(TfdpVariant(f"{tag}, no XLA{extra})", f"tfdp-nojit{short}",
                                            strategy, vocab, train, pcfg, False, per_call))
            for jit in {"default": ["auto"], "xla": [True], "both": ["auto", True]}[
                    args.keras_jit]:
                variants.append(KerasFitVariant(vocab, train, pcfg, jit, per_call, precision))
        _KEEP_ALIVE.append(variants)  # freed by os._exit, not by returning (see the end)
        model = variants[0].model
        fpt = flops_per_token(non_embedding_params(model), cfg.num_layers, cfg.num_heads,
                              cfg.hidden_dim // cfg.num_heads, cfg.seq_len)
        print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
              f"{platform.python_version()}, {os.cpu_count()} CPU core(s); tfdp devices: "
              f"{', '.join(d.split('/')[-1] for d in strategy.extended.worker_devices)}")
        print(f"model {args.model!r}: {cfg.num_layers} layers x {cfg.num_heads} heads x "
              f"{cfg.hidden_dim} wide, seq_len {cfg.seq_len}, global batch "
              f"{cfg.global_batch_size} ({tokens_per_step:,} tokens/step), vocab {vocab}; "
              f"{count_params(model):,} params, {fpt / 1e6:.2f} MFLOPs/token; "
              f"{per_call} step(s) per call")
        print(f"data: {train.num_windows:,} train windows ({manifest['tokenizer']} tokens"
              f"{', ' + os.path.basename(args.data) if args.data else ''})")

        warmup = []
        for variant in variants:  # trace and compile everything before timing anything
            began = time.perf_counter()
            variant.run(args.warmup)
            warmup.append(f"{variant.short} {time.perf_counter() - began:.1f}s")
        print(f"warm-up, {args.warmup} steps each incl. tracing/compiling: "
              f"{', '.join(warmup)}", flush=True)

        rates: dict[str, list[float]] = {v.name: [] for v in variants}
        dtypes = sorted({v.dtype for v in variants})
        peaks: dict[str, list[float]] = {d: [] for d in dtypes}
        jobs = list(variants) + dtypes  # a dtype name: measure its matmul peak
        for r in range(args.rounds):
            k = r % len(jobs)  # rotate the order so no variant always goes first
            for job in jobs[k:] + jobs[:k]:
                if isinstance(job, str):
                    peaks[job].append(machine_peak_flops(strategy, tf.as_dtype(job), cache=False))
                    continue
                times = job.run(args.steps)  # times[0] ends the untimed first call
                rates[job.name].append(tokens_per_step * per_call * (len(times) - 1)
                                       / (times[-1] - times[0]))
            print(f"round {r + 1}/{args.rounds} tok/s: " + ", ".join(
                f"{v.short} {rates[v.name][-1]:,.0f}" for v in variants), flush=True)

        # Same start, same windows, same hyperparameters: the models should agree.
        held_out = val.window_fn()(tf.range(min(64, val.num_windows), dtype=tf.int64))
        losses = {v.name: eval_loss(v.model, held_out) for v in variants}
    load_after = os.getloadavg()

    peak = {d: statistics.median(values) for d, values in peaks.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    steps_each = args.warmup + args.rounds * args.steps
    width = max(len(name) for name in rates) + 2
    print()
    device = strategy.extended.worker_devices[0].split("/")[-1]
    for d, values in peaks.items():
        size = 4096 if "GPU" in device.upper() else 1024
        print(f"matmul peak, {size}x{size} {d} on {device} (median of {len(values)}): "
              f"{peak[d] / 1e9:.1f} GFLOP/s (range {min(values) / 1e9:.1f}-"
              f"{max(values) / 1e9:.1f})")
    print(f"{args.rounds} rounds x {args.steps - per_call} timed steps per variant, medians; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.perf_counter() - _STARTED:.0f}s in all")
    print(f"val loss: mean over {int(held_out.shape[0])} val windows after {steps_each} "
          "steps of each variant from the same initial weights; mfu: against the matmul "
          "peak of the variant's compute dtype")
    print()
    print(f"{'variant':<{width}} {'tok/s':>8} {'tok/s/replica':>14} {'ms/step':>8} "
          f"{'mfu':>6}  {'range tok/s':>15}  {'val loss':>8}")
    for variant in variants:
        values = rates[variant.name]
        n = replicas if isinstance(variant, TfdpVariant) else 1
        tps = median[variant.name]
        print(f"{variant.name:<{width}} {tps:>8,.0f} {tps / n:>14,.0f} "
              f"{1000 * tokens_per_step / tps:>8.1f} "
              f"{100 * tps * fpt / peak[variant.dtype]:>5.1f}%  "
              f"{min(values):>7,.0f}-{max(values):<7,.0f}  {losses[variant.name]:>8.4f}")
    print()
    def ratio(a: Variant, b: Variant) -> None:
        # The ratio of medians, and the median of each round's ratio (the two
        # ran seconds apart in one round, so slow drifts in load cancel).
        paired = statistics.median(x / y for x, y in zip(rates[a.name], rates[b.name]))
        print(f"ratio {a.name} / {b.name}  {median[a.name] / median[b.name]:.2f}x "
              f"(per-round median {paired:.2f}x)")

    # Per precision: tfdp as tfdp-train runs it (XLA or not, as
    # tfdp.step.default_jit_compile decides) against the fastest Keras in
    # that dtype, and tfdp with XLA against tfdp without; then each
    # precision's tfdp against the first one's.
    defaults = []
    for precision in args.precisions:
        dtype = PRECISIONS[precision][1]
        ours = [v for v in variants if isinstance(v, TfdpVariant) and v.dtype == dtype]
        keras_best = max((v for v in variants
                          if isinstance(v, KerasFitVariant) and v.dtype == dtype),
                         key=lambda v: median[v.name])
        jit = default_jit_compile(PRECISIONS[precision][0], strategy)
        default = next((v for v in ours if v.jit == jit), ours[0])
        defaults.append(default)
        ratio(default, keras_best)
        if len(ours) == 2:
            ratio(*sorted(ours, key=lambda v: not v.jit))
    for other in defaults[1:]:
        ratio(other, defaults[0])
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
