"""Fine-tune a pretrained tfdp GPT as a text classifier, data-parallel.

The model: the run's pretrained decoder (its latest checkpoint) with a dense
head on the pooled hidden states: `last` reads the last real token (the EOT
classdata.pack ends every text with; in a causal decoder the one position
that has seen the whole text), `mean` averages the real tokens.

The step is tfdp/step.py's formula with one label per example instead of
one per token: each replica's summed cross-entropy is divided by the GLOBAL
batch size, the gradients and the loss are summed across replicas in one
all-reduce, clipped by their global norm, and one AdamW update
(tfdp.optimizer, which trusts the gradients to be reduced) is applied
everywhere. Keras' fit is not used: it fails under MultiWorkerMirrored
(DESIGN.md). Computation is float32 whatever precision pretraining used.

Output (written to a temporary sibling of output_dir, renamed into place at
the end, so a failed run leaves nothing): config.json, labels.json,
checkpoint/ (backbone and head weights), metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tfdp import classdata
from tfdp.atomic import staged_directory
from tfdp.config import Config
from tfdp.errors import UserError
from tfdp.model import build_model
from tfdp.optimizer import build_optimizer
from tfdp.restore import load_run, restore_weights
from tfdp.rundir import write_text
from tfdp.step import SUM, default_jit_compile
from tfdp.strategy import build_strategy, describe, is_chief

TASKS = ("classification",)
POOLINGS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning job; trainer/finetune.py fills it from flags."""

    model_dir: str
    train: str
    eval: str
    output_dir: str
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    pooling: str = "last"
    seq_len: int = 0  # 0: the longest example (+ EOT), at most the model's seq_len
    global_batch_size: int = 32
    epochs: float = 3.0
    train_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_every: int = 0  # 0: only at the end
    seed: int = 1234
    strategy: str = "auto"
    num_cpu_replicas: int = 2
    collective: str = "auto"  # as tfdp-train's (tfdp/strategy.py)
    allow_cpu: bool = False
    jit_compile: bool | None = None
    tfds_data_dir: str | None = None
    tfds_download: bool = False

    def validate(self) -> "FinetuneConfig":
        if self.task not in TASKS:
            raise UserError(f"--task={self.task!r} is unknown; use one of {', '.join(TASKS)}")
        if self.pooling not in POOLINGS:
            raise UserError(f"--pooling={self.pooling!r} is unknown; use one of "
                            f"{', '.join(POOLINGS)}")
        for name in ("global_batch_size", "num_cpu_replicas"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name}={getattr(self, name)} must be a positive integer")
        for name in ("seq_len", "train_steps", "eval_every", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name}={getattr(self, name)} must not be negative")
        if self.learning_rate <= 0 or (self.train_steps == 0 and self.epochs <= 0):
            raise UserError("--learning_rate and --epochs (or --train_steps) must be positive")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise UserError(f"--warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        return self


class Classifier(keras.Model):
    """Pretrained backbone -> pooled hidden state -> dense logits [batch, classes]."""

    def __init__(self, backbone, num_classes: int, pooling: str):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.head = keras.layers.Dense(
            num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="classifier_head")

    def call(self, inputs, training=False):
        hidden = self.backbone(inputs, training=training)
        mask = tf.cast(inputs["padding_mask"], hidden.dtype)
        if self.pooling == "mean":
            pooled = (tf.reduce_sum(hidden * mask[..., None], axis=1)
                      / tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0))
        else:  # right padding: the last real token sits at length - 1
            last = tf.cast(tf.reduce_sum(mask, axis=1), tf.int32) - 1
            pooled = tf.gather(hidden, tf.maximum(last, 0), axis=1, batch_dims=1)
        return self.head(pooled)


def build_classifier(cfg: Config, vocab_size: int, num_classes: int, pooling: str,
                     seq_len: int, seed: int) -> Classifier:
    """A Classifier over a freshly built backbone shaped by the run's config
    (restore its weights with tfdp.restore.restore_weights, which reads
    `.backbone`). Float32 compute whatever precision pretraining used; the
    run's dropout; `seed` fixes the head's initial weights. Call inside the
    strategy's scope."""
    keras.utils.set_random_seed(seed)
    backbone = build_model(dataclasses.replace(cfg, mixed_precision="off"), vocab_size).backbone
    model = Classifier(backbone, num_classes, pooling)
    model({"token_ids": tf.zeros([1, seq_len], tf.int32),
           "padding_mask": tf.ones([1, seq_len], tf.int32)})  # builds the head
    return model


def make_steps(strategy, model, optimizer, global_batch_size: int, clip_norm: float,
               jit_compile: bool):
    """(train_step(iterator) -> mean loss, eval_step(batch) -> [loss sum,
    correct, count]). A batch is (token_ids, padding_mask, labels, weights);
    padding examples of the last eval batch weigh 0."""
    variables = model.trainable_variables

    def losses(batch, training):
        ids, mask, labels, weights = batch
        out = model({"token_ids": ids, "padding_mask": mask}, training=training)
        out = tf.cast(out, tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=out)
        return loss * weights, out

    @tf.function(jit_compile=jit_compile)
    def forward_backward(batch):
        with tf.GradientTape() as tape:
            # Divided by the GLOBAL batch: the all-reduced sum is the gradient
            # of the global mean loss, whatever the number of replicas.
            loss = tf.reduce_sum(losses(batch, True)[0]) / global_batch_size
        return loss, tape.gradient(loss, variables)

    def replica_step(batch):
        loss, grads = forward_backward(batch)
        # One collective: the loss rides in the gradients' all-reduce.
        *grads, loss = tf.distribute.get_replica_context().all_reduce(SUM, [*grads, loss])
        if clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function
    def train_step(iterator):
        loss = strategy.run(replica_step, args=(next(iterator),))
        return strategy.experimental_local_results(loss)[0]

    @tf.function(jit_compile=jit_compile)
    def score(batch):
        loss, out = losses(batch, False)
        hit = tf.cast(tf.equal(tf.argmax(out, -1, output_type=tf.int32), batch[2]), tf.float32)
        return tf.stack([tf.reduce_sum(loss), tf.reduce_sum(hit * batch[3]),
                         tf.reduce_sum(batch[3])])

    # A plain Python replica function around the compiled one (as in
    # tfdp/step.py): handing a tf.function to strategy.run directly makes
    # every replica reuse the first replica's variables.
    def replica_eval(batch):
        return tf.distribute.get_replica_context().all_reduce(SUM, score(batch))

    @tf.function
    def eval_step(batch):
        return strategy.experimental_local_results(strategy.run(replica_eval, args=(batch,)))[0]
    return train_step, eval_step


def distribute(strategy, arrays: tuple, order: np.ndarray, global_batch_size: int):
    """A distributed dataset of (ids, mask, labels, weights) batches: global
    batch b holds rows order[b*G:(b+1)*G], wherever the replicas are (input
    pipeline p of P takes positions p, p+P, ..., as tfdp/dataset.py does).
    Positions past `order`'s end, up to a whole batch, are row 0 weighing 0."""
    steps = math.ceil(len(order) / global_batch_size)
    padded = np.zeros(steps * global_batch_size, np.int64)
    padded[:len(order)] = order
    weights = (np.arange(len(padded)) < len(order)).astype(np.float32)
    tensors = [tf.constant(a) for a in arrays]
    padded, weights = tf.constant(padded), tf.constant(weights)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        return (tf.data.Dataset.range(ctx.input_pipeline_id, len(padded),
                                      ctx.num_input_pipelines)
                .batch(per_replica, drop_remainder=True)
                .map(lambda q: (*(tf.gather(t, tf.gather(padded, q)) for t in tensors),
                                tf.gather(weights, q)))
                .prefetch(tf.data.AUTOTUNE))
    return strategy.distribute_datasets_from_function(dataset_fn)


def evaluate(strategy, eval_step, arrays, global_batch_size: int) -> dict:
    """Loss and accuracy over every eval example, each counted once."""
    dataset = distribute(strategy, arrays, np.arange(len(arrays[0])), global_batch_size)
    total = np.zeros(3)
    for batch in dataset:
        total += eval_step(batch).numpy()
    return {"eval_loss": float(total[0] / total[2]),
            "eval_accuracy": float(total[1] / total[2])}


def finetune(fc: FinetuneConfig, log=print) -> dict:
    """Run the fine-tuning job; return the metrics (also in metrics.json)."""
    fc = fc.validate()
    output_dir = os.path.abspath(os.path.expanduser(fc.output_dir))
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise UserError(f"--output_dir={output_dir} exists and is not empty; name a new "
                        "directory (nothing there is overwritten)")
    # The strategy first: it fixes TensorFlow's devices.
    saved = Config.load(os.path.abspath(os.path.expanduser(fc.model_dir))) or Config()
    strategy = build_strategy(fc.strategy, fc.num_cpu_replicas,
                              collective_timeout=saved.collective_timeout,
                              collective=fc.collective, allow_cpu=fc.allow_cpu)
    replicas = strategy.num_replicas_in_sync
    if fc.global_batch_size % replicas:
        raise UserError(f"--global_batch_size={fc.global_batch_size} is not divisible by the "
                        f"{replicas} replicas; use a multiple of {replicas}")
    cfg, tokenizer, model_dir = load_run(fc.model_dir)
    say = log if is_chief(strategy) else (lambda *_: None)

    read = dict(text_column=fc.text_column, label_column=fc.label_column,
                tfds_data_dir=fc.tfds_data_dir, tfds_download=fc.tfds_download)
    train_ex = classdata.read_examples(fc.train, default_split="train", flag="--train", **read)
    eval_ex = classdata.read_examples(fc.eval, default_split="test", flag="--eval", **read)
    classes, train_labels, eval_labels = classdata.resolve_labels(train_ex, eval_ex)
    train_ids = tokenizer.encode(train_ex.texts)
    eval_ids = tokenizer.encode(eval_ex.texts)
    if fc.seq_len > cfg.seq_len:
        raise UserError(f"--seq_len={fc.seq_len} exceeds the model's seq_len={cfg.seq_len} "
                        "(its position embeddings end there); use at most that")
    longest = max(len(x) for x in train_ids + eval_ids) + 1
    seq_len = fc.seq_len or min(longest, cfg.seq_len)
    train_data = (*classdata.pack(train_ids, seq_len, tokenizer.eot_id), train_labels)
    eval_data = (*classdata.pack(eval_ids, seq_len, tokenizer.eot_id), eval_labels)
    n, batch = len(train_labels), fc.global_batch_size
    steps = fc.train_steps or max(1, math.ceil(fc.epochs * n / batch))
    say(f"strategy: {describe(strategy)}; pretrained: "
        f"{model_dir}; {len(classes)} classes; {n:,} train / {len(eval_labels):,} eval "
        f"examples of up to {seq_len} tokens ({sum(len(x) >= seq_len for x in train_ids):,} "
        f"train texts truncated); {steps} steps of {batch} ({steps * batch / n:.2f} epochs)")

    with strategy.scope():
        model = build_classifier(cfg, tokenizer.vocab_size, len(classes), fc.pooling,
                                 seq_len, fc.seed)
        pretrained = restore_weights(model, model_dir)
        optimizer = build_optimizer(Config(
            learning_rate=fc.learning_rate, min_learning_rate=0.0,
            warmup_steps=int(fc.warmup_fraction * steps), train_steps=steps,
            weight_decay=fc.weight_decay, beta2=0.999), model.trainable_variables)
    jit = default_jit_compile("off", strategy) if fc.jit_compile is None else fc.jit_compile
    train_step, eval_step = make_steps(strategy, model, optimizer, batch, fc.clip_norm, jit)

    # The data order: a seeded permutation per epoch, concatenated; every
    # worker computes the same one.
    rng = np.random.default_rng(fc.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(steps * batch / n))])
    dataset = distribute(strategy, train_data, order[:steps * batch], batch)
    iterator, history, losses, start = iter(dataset), [], [], time.time()
    for step in range(1, steps + 1):
        losses.append(float(train_step(iterator)))
        if not math.isfinite(losses[-1]):
            raise UserError(f"the loss is {losses[-1]} at step {step}; lower --learning_rate")
        if step == steps or (fc.eval_every and step % fc.eval_every == 0):
            result = evaluate(strategy, eval_step, eval_data, batch)
            history.append({"step": step, "train_loss": float(np.mean(losses[-50:])),
                            **result})
            say(f"step {step}/{steps} | train loss {history[-1]['train_loss']:.4f} | eval "
                f"loss {result['eval_loss']:.4f} | eval accuracy {result['eval_accuracy']:.4f}"
                f" | {time.time() - start:.1f} s")

    metrics = {**history[-1], "num_classes": len(classes), "classes": classes,
               "train_examples": n, "eval_examples": len(eval_labels), "seq_len": seq_len,
               "steps": steps, "num_replicas": replicas, "pretrained_checkpoint": pretrained,
               "history": history}
    if is_chief(strategy):
        config = {**dataclasses.asdict(fc), "model_dir": model_dir, "output_dir": output_dir,
                  "seq_len": seq_len, "steps": steps, "num_classes": len(classes),
                  "pretrained_checkpoint": pretrained,
                  "pretrained_config": json.loads(cfg.to_json())}
        _write(output_dir, model, config, classes, metrics)
        say(f"eval accuracy {metrics['eval_accuracy']:.4f}; wrote {output_dir}")
    return metrics


def load_finetuned(output_dir: str):
    """(classifier, tokenizer, class names, seq_len) read back from an
    output_dir; the pretrained run it names must still hold its tokenizer."""
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(output_dir, "labels.json")) as f:
            classes = json.load(f)["classes"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{output_dir} holds no tfdp-finetune output ({err})") from None
    cfg, tokenizer, _ = load_run(config["model_dir"])
    seq_len = config["seq_len"]
    model = build_classifier(cfg, tokenizer.vocab_size, len(classes), config["pooling"],
                             seq_len, config["seed"])
    tf.train.Checkpoint(backbone=model.backbone, head=model.head).read(
        os.path.join(output_dir, "checkpoint", "ckpt")).assert_existing_objects_matched()
    return model, tokenizer, classes, seq_len


def predict(model: Classifier, tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Class ids of `texts`, packed as in training."""
    ids, mask = classdata.pack(tokenizer.encode([t.encode("utf-8") for t in texts]),
                               seq_len, tokenizer.eot_id)
    logits = model({"token_ids": ids, "padding_mask": mask}, training=False)
    return np.argmax(np.asarray(logits), axis=-1)


def _write(output_dir: str, model: Classifier, config: dict, classes: list[str],
           metrics: dict) -> None:
    """Everything into a temporary sibling, then one rename: output_dir
    appears complete or not at all."""
    with staged_directory(output_dir, ".tfdp-finetune-") as tmp:
        os.makedirs(tmp)
        write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2))
        write_text(os.path.join(tmp, "labels.json"),
                   json.dumps({"classes": classes, "ids": {c: i for i, c in
                                                           enumerate(classes)}}, indent=2))
        tf.train.Checkpoint(backbone=model.backbone, head=model.head).write(
            os.path.join(tmp, "checkpoint", "ckpt"))
        write_text(os.path.join(tmp, "metrics.json"), json.dumps(metrics, indent=2))
