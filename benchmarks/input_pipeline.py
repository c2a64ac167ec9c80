#!/usr/bin/env python3
"""Is the input pipeline ever the bottleneck? Its rate alone vs what training eats.

For each model configuration, in one process, interleaved over rounds:

  pipeline   tokens/s out of the distributed iterator tfdp trains from
             (`train_dataset_fn` through `distribute_datasets_from_function`
             on 2 CPU replicas), consumed by a tf.function that only touches
             each replica's batch (a sum), the way the train step takes it;
  training   tokens/s of tfdp's train step (XLA, fp32) on the same iterator
             type, the same global batch.

and prints the ratio pipeline / training, which must stay >= 10. The two
compete for the same 2 cores during training, so the pipeline's own rate is
what matters: how many steps' worth of data it makes in the time of one.

`--stream byte,bpe` measures instead the streamed pipeline of
`--data=tfds:...` (tfdp/stream.py: TFDS files read per pipeline, tokenized
on the fly) for the default job: the stdlib corpus is written as a local
TFDS dataset (one document per file, 4 files) and each named tokenizer is
trained on it as tfdp-train would.

    python benchmarks/input_pipeline.py                  # ~6 minutes
    python benchmarks/input_pipeline.py --data DIR --steps 100 --rounds 3
    python benchmarks/input_pipeline.py --stream byte,char,bpe
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tfdp.strategy import build_strategy, split_cpu  # noqa: E402

split_cpu(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfdp.config import Config  # noqa: E402
from tfdp.dataset import Split  # noqa: E402
from tfdp.model import build_model  # noqa: E402
from tfdp.optimizer import build_optimizer  # noqa: E402
from tfdp.prepare import load_manifest, prepare  # noqa: E402
from tfdp.step import make_train_step  # noqa: E402
from tfdp.tasks.language_model import LanguageModelTask  # noqa: E402

CONFIGS = {
    "default (4x128, ctx 128, batch 32)": Config(),
    "(a) 4x128, ctx 64, batch 12": Config(seq_len=64, global_batch_size=12),
    "(b) 6x384, ctx 256, batch 8": Config(num_layers=6, num_heads=6, hidden_dim=384,
                                          intermediate_dim=1536, seq_len=256,
                                          global_batch_size=8),
}


def _timed(fn, steps: int) -> float:
    """Seconds for `steps` calls of fn, each finished (fn returns a host value)."""
    began = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - began


def measure(strategy, train, vocab_size: int, cfg: Config, steps: int, rounds: int) -> dict:
    """`train`: a Split or TextStream (anything with tfdp's `dataset_fn`)."""
    make = lambda: iter(strategy.distribute_datasets_from_function(  # noqa: E731
        train.dataset_fn(cfg.global_batch_size, cfg.seed)))
    with strategy.scope():
        keras.utils.set_random_seed(cfg.seed)
        model = build_model(cfg, vocab_size)
        optimizer = build_optimizer(cfg, model.trainable_variables)
    train_step = make_train_step(strategy, model, optimizer,
                                 LanguageModelTask(cfg, vocab_size), cfg.global_batch_size,
                                 cfg.clip_norm, True)

    @tf.function
    def take(iterator):
        sums = strategy.run(lambda w: tf.reduce_sum(tf.cast(w, tf.int64)),
                            args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    tokens = cfg.global_batch_size * cfg.seq_len
    pipe_it, train_it = make(), make()
    int(take(pipe_it)), float(train_step(train_it)["loss"][-1])  # trace and compile
    pipeline, training = [], []
    for _ in range(rounds):
        pipeline.append(tokens * steps / _timed(lambda: int(take(pipe_it)), steps))
        training.append(tokens * steps / _timed(
            lambda: float(train_step(train_it)["loss"][-1]), steps))
    return {"pipeline": statistics.median(pipeline), "training": statistics.median(training),
            "ratio": statistics.median(p / t for p, t in zip(pipeline, training))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a tfdp-prepare directory (default: the stdlib corpus)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", help="comma-separated tokenizers: measure the TFDS "
                        "stream of the default job with each instead")
    args = parser.parse_args()
    strategy = build_strategy("mirrored", num_cpu_replicas=2)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'configuration':<36} {'pipeline tok/s':>15} {'training tok/s':>15} {'ratio':>7}")
        for name, cfg, train, vocab_size in _cases(args, tmp):
            r = measure(strategy, train, vocab_size, cfg, args.steps, args.rounds)
            print(f"{name:<36} {r['pipeline']:>15,.0f} {r['training']:>15,.0f} "
                  f"{r['ratio']:>6.1f}x", flush=True)


def _cases(args, tmp: str):
    """(name, config, training data, vocabulary size) for each measurement."""
    from tfdp import recipes
    if args.stream:
        from tfdp.prepare import prepare_stream
        from tfdp.recipes.tfds_text import TfdsText
        from tfdp.stream import TextStream
        from tfdp.tokenizers import load_tokenizer
        data_dir = _stdlib_as_tfds(recipes.source_files("stdlib"), os.path.join(tmp, "tfds"))
        source = TfdsText("tfds:tfdp_stdlib_text", data_dir=data_dir)
        for kind in args.stream.split(","):
            prepared = os.path.join(tmp, f"prepared-{kind}")
            manifest = prepare_stream(source, "train", "train[:1]", prepared, kind,
                                      log=lambda *_: None)
            tokenizer = load_tokenizer(os.path.join(prepared, "tokenizer"))
            cfg = Config()
            yield (f"default, TFDS stream, {kind}", cfg,
                   TextStream(source, "train", tokenizer, cfg.seq_len), manifest["vocab_size"])
        return
    data_dir = args.data
    if data_dir is None:
        data_dir = os.path.join(tmp, "stdlib")
        prepare(recipes.source_files("stdlib"), data_dir, "byte", log=lambda *_: None)
    vocab_size = load_manifest(data_dir)["vocab_size"]
    for name, cfg in CONFIGS.items():
        yield name, cfg, Split(data_dir, "train", cfg.seq_len), vocab_size


def _stdlib_as_tfds(files, data_dir: str) -> str:
    """Write `files` as a TFDS dataset `tfdp_stdlib_text` (one document per
    file, feature `text`, 4 files) into `data_dir`; return data_dir."""
    import tensorflow_datasets as tfds

    class TfdpStdlibText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, path in enumerate(files):
                yield i, {"text": path.read_bytes().decode("utf-8", errors="replace")}

    TfdpStdlibText(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=4))
    return data_dir


if __name__ == "__main__":
    main()
