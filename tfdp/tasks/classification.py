"""Classification (tfdp-finetune --task=classification): a pretrained tfdp
GPT with a dense head, one label per text.

The model: the run's pretrained decoder with a dense head on the pooled
hidden states: `last` reads the last real token (the EOT classdata.pack
ends every text with; in a causal decoder the one position that has seen
the whole text), `mean` averages the real tokens. Computation is float32
whatever precision pretraining used.

A batch is (token_ids, padding_mask, labels, weights) over rows of the
packed examples; the loss is the summed cross-entropy, and the global count
the global batch's examples, so N replicas update exactly as one. The
training order is a seeded permutation per epoch, a pure function of the
position (tfdp/dataset.py's shuffled_index), so a resumed fine-tune reads
exactly what the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from tfdp.dataset import shuffled_rows_fn
from tfdp.model import build_model
from tfdp.restore import start_from
from tfdp.tasks import Task

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


def build_classifier(cfg, vocab_size: int, num_classes: int, pooling: str,
                     seq_len: int, seed: int) -> Classifier:
    """A Classifier over a freshly built backbone shaped by the pretrained
    run's config, float32 compute, the run's dropout; `seed` fixes the head's
    initial weights. Call inside the strategy's scope."""
    keras.utils.set_random_seed(seed)
    backbone = build_model(dataclasses.replace(cfg, mixed_precision="off"), vocab_size).backbone
    model = Classifier(backbone, num_classes, pooling)
    model({"token_ids": tf.zeros([1, seq_len], tf.int32),
           "padding_mask": tf.ones([1, seq_len], tf.int32)})  # builds the head
    return model


class ClassificationTask(Task):
    """Fine-tune `pretrained` (config `cfg`: a tfdp run's path, or a
    tfdp.restore.Pretrained, e.g. a keras-hub preset) on
    `train` and score `evaluation`: each a tuple (token_ids [n, seq_len],
    padding_mask, labels [n]) from tfdp.classdata.pack."""

    eval_prefix = "eval_"

    def __init__(self, cfg, vocab_size: int, num_classes: int, pooling: str, seq_len: int,
                 seed: int, pretrained, train: tuple, evaluation: tuple):
        self.cfg, self.vocab_size, self.num_classes = cfg, vocab_size, num_classes
        self.pooling, self.seq_len, self.seed = pooling, seq_len, seed
        self.pretrained, self.train, self.evaluation = pretrained, train, evaluation
        self.pretrained_checkpoint: str | None = None  # set by initialize()

    def build_model(self) -> Classifier:
        return build_classifier(self.cfg, self.vocab_size, self.num_classes, self.pooling,
                                self.seq_len, self.seed)

    def checkpoint_parts(self, model: Classifier) -> dict:
        return {"backbone": model.backbone, "head": model.head}

    def initialize(self, model: Classifier, say) -> None:
        self.pretrained_checkpoint = start_from(self.pretrained, model, say)
        say(f"starting from {self.pretrained_checkpoint}")

    def tokens_per_example(self) -> int:
        return self.seq_len

    def train_dataset_fn(self, global_batch_size: int, seed: int, start_step: int):
        return shuffled_rows_fn(self.train, global_batch_size, seed, start_step,
                                unit_weights=True)

    def eval_dataset_fn(self, global_batch_size: int):
        """Every eval example once; positions past the end, up to a whole
        batch, are row 0 weighing 0."""
        n = len(self.evaluation[2])
        stop = math.ceil(n / global_batch_size) * global_batch_size
        tensors = [tf.constant(a) for a in self.evaluation]

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            return (tf.data.Dataset.range(ctx.input_pipeline_id, stop, ctx.num_input_pipelines)
                    .batch(per_replica, drop_remainder=True)
                    .map(lambda q: (*(tf.gather(t, tf.where(q < n, q, 0)) for t in tensors),
                                    tf.cast(q < n, tf.float32)))
                    .prefetch(tf.data.AUTOTUNE))
        return dataset_fn

    def global_count(self, global_batch_size: int) -> float:
        return float(global_batch_size)

    def _losses(self, model, batch, training: bool):
        ids, mask, labels, weights = batch
        out = tf.cast(model({"token_ids": ids, "padding_mask": mask}, training=training),
                      tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=out)
        return loss * weights, out

    def loss(self, model, batch, training: bool):
        return tf.reduce_sum(self._losses(model, batch, training)[0]), tf.reduce_sum(batch[3])

    def eval_sums(self, model, batch):
        loss, out = self._losses(model, batch, training=False)
        hit = tf.cast(tf.equal(tf.argmax(out, -1, output_type=tf.int32), batch[2]), tf.float32)
        return tf.stack([tf.reduce_sum(loss), tf.reduce_sum(hit * batch[3]),
                         tf.reduce_sum(batch[3])])

    def eval_metrics(self, sums) -> dict:
        count = max(float(sums[2]), 1.0)
        return {"loss": float(sums[0]) / count, "accuracy": float(sums[1]) / count}


def predict(model: Classifier, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Class ids of packed examples."""
    logits = model({"token_ids": ids, "padding_mask": mask}, training=False)
    return np.argmax(np.asarray(logits), axis=-1)
