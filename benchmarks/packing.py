"""Prompt -> completion fine-tuning with and without packing, side by side.

    python benchmarks/packing.py                 # ~2 minutes on a 2-core CPU
    python benchmarks/packing.py --rounds 5 --steps 20 --seq-len 256

Examples: generated question -> answer pairs of varying length (a context of
2-20 words, a question, a 1-6 word answer taken from the context), byte
tokens, as a QA or instruction set looks. For each layout
(tfdp/completiondata.py's windows, `pack=False` one example per window,
`pack=True` first-fit) it reports the fraction of window targets that carry
loss, then times tfdp's train step (tfdp.step.make_train_step with
tfdp.tasks.completion.CompletionTask, the same global batch of windows) in
interleaved rounds, and prints loss-carrying target tokens per second and
the ratio packed / unpacked measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import time

import keras
import numpy as np
import tensorflow as tf

from tfdp.completiondata import Completions, tokenize, windows
from tfdp.config import Config
from tfdp.optimizer import build_optimizer
from tfdp.step import make_train_step
from tfdp.strategy import build_strategy, describe, split_cpu
from tfdp.tasks.completion import CompletionTask
from tfdp.tokenizers import ByteTokenizer

WORDS = ("river city stone light paper garden window music winter market bridge forest "
         "letter engine signal mountain harbor silver candle orchard").split()


def examples(n: int, seed: int) -> Completions:
    rng = random.Random(seed)
    prompts, refs = [], []
    for _ in range(n):
        context = [rng.choice(WORDS) for _ in range(rng.randint(2, 20))]
        start = rng.randrange(len(context))
        answer = " ".join(context[start:start + rng.randint(1, 6)])
        prompts.append(" ".join(context) + f"\nQ: what follows word {start}?\nA:")
        refs.append([" " + answer])
    return Completions("generated QA", prompts, refs, [f"example {i}" for i in range(n)])


def timed(strategy, cfg, task, steps: int) -> float:
    """Seconds per step of `steps` steps after one warm-up call."""
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = task.build_model()
        optimizer = build_optimizer(cfg, model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, task, cfg.global_batch_size,
                           cfg.clip_norm, cfg.jit_compile, "float32")
    iterator = iter(strategy.distribute_datasets_from_function(
        task.train_dataset_fn(cfg.global_batch_size, cfg.seed, 0)))
    step(iterator)["loss"][0].numpy()  # compile
    start = time.perf_counter()
    for _ in range(steps):
        out = step(iterator)
    out["loss"][0].numpy()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="global batch of windows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    split_cpu(args.replicas)
    strategy = build_strategy("mirrored" if args.replicas > 1 else "one_device",
                              num_cpu_replicas=args.replicas)
    cfg = Config(num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=512,
                 seq_len=args.seq_len, global_batch_size=args.batch, jit_compile=True)
    tok = ByteTokenizer()
    tokenized = tokenize(examples(args.examples, 0), tok, args.seq_len)
    layouts = {}
    for pack in (False, True):
        w = windows(tokenized, args.seq_len, pack)
        layouts[pack] = (w, CompletionTask(cfg, tok.vocab_size, args.seq_len, cfg.seed, "-", w, w))
        print(f"{'packed' if pack else 'one example per window'}: {len(w):,} windows of "
              f"{args.seq_len}; {100 * w.loss_fraction:.1f}% of targets carry loss")
    print(f"{describe(strategy)}; 4 layers x 128, batch {args.batch} windows, XLA")
    seconds = {False: [], True: []}
    for _ in range(args.rounds):  # interleaved: the machine's load hits both alike
        for pack in (False, True):
            seconds[pack].append(timed(strategy, cfg, layouts[pack][1], args.steps))
    rate = {}
    for pack in (False, True):
        w = layouts[pack][0]
        per_step = float(np.median(seconds[pack]))
        rate[pack] = args.batch * args.seq_len * w.loss_fraction / per_step
        print(f"{'packed' if pack else 'unpacked'}: {1000 * per_step:.0f} ms/step (median of "
              f"{args.rounds}), {rate[pack]:,.0f} loss-carrying tokens/s")
    print(f"packed / unpacked: {rate[True] / rate[False]:.2f}x loss-carrying tokens per second; "
          f"{len(layouts[False][0]) / len(layouts[True][0]):.2f}x fewer windows per epoch")


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
