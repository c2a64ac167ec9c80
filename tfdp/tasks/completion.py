"""Prompt -> completion (tfdp-finetune --task=completion): translation,
question answering, instruction tuning, label words.

The model is the pretrained run's own causal LM (no new head), float32
compute. A batch is (tokens [b, seq_len + 1], segments, positions, weights
[b, seq_len]) from tfdp/completiondata.py's windows: the loss is the summed
cross-entropy of the weighted targets (the completion and its closing
EOT), and since examples carry different numbers of such tokens the step
divides by the count all-reduced over every replica and worker
(`count_varies`), so N replicas update exactly as one on the same batch
whatever the lengths on each. Evaluation reports the completion tokens'
loss, perplexity and next-token accuracy, and (`Scoring`) what matters
for these tasks: the generated completions of a bounded number of eval
examples scored against their references (BLEU, chrF, exact match, F1,
accuracy for label words).

The training order is a seeded permutation of the windows per epoch, a pure
function of the position (tfdp/dataset.py's shuffled_index), as for
classification, so a resumed fine-tune reads what the interrupted one would.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from tfdp.completiondata import Windows
from tfdp.dataset import shuffled_rows_fn
from tfdp.model import build_model, segment_logits
from tfdp.restore import start_from
from tfdp.tasks import Task


def weighted_losses(model, batch, training: bool):
    """(cross-entropy [b, seq_len] times the target weights, logits)."""
    tokens, segments, positions, weights = batch
    out = tf.cast(segment_logits(model, tokens[:, :-1], segments, positions, training),
                  tf.float32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tokens[:, 1:], logits=out)
    return losses * weights, out


@dataclasses.dataclass
class Scoring:
    """What each evaluation decodes and scores (tfdp/textmetrics.py): the
    first eval examples' prompts and references, greedy or beam."""

    prompts: list[str]
    references: list[list[str]]
    tokenizer: object
    max_new_tokens: int = 32
    sampler: str = "greedy"
    num_beams: int = 4
    batch_size: int = 16

    @property
    def label_words(self) -> bool:
        """Completions from a small fixed set (glue/sst2 as "positive" /
        "negative"): then accuracy is reported too."""
        distinct = {refs[0].strip() for refs in self.references}
        return len(distinct) <= min(20, len(self.references) // 2)


def score(texts: list[str], scoring: Scoring) -> dict:
    """The scores of decoded `texts` against the scoring references."""
    from tfdp.textmetrics import text_scores
    return text_scores(texts, scoring.references, labels=scoring.label_words)


def decoder(model_cfg, scoring: Scoring, strategy):
    """A tfdp.decoding.Decoder for `scoring`'s sampler."""
    from tfdp.decoding import Decoder
    from tfdp.generate import make_sampler
    return Decoder(strategy, model_cfg, scoring.tokenizer,
                   lambda: make_sampler(scoring.sampler, num_beams=scoring.num_beams),
                   scoring.batch_size)


class CompletionTask(Task):
    """Fine-tune `pretrained` (config `cfg`: a tfdp run's path, or a
    tfdp.restore.Pretrained, e.g. a keras-hub preset) on the
    `train` windows and validate on the `evaluation` windows; with
    `scoring`, every evaluation also decodes and scores its examples."""

    eval_prefix = "eval_"
    count_varies = True

    def __init__(self, cfg, vocab_size: int, seq_len: int, seed: int, pretrained,
                 train: Windows, evaluation: Windows, scoring: Scoring | None = None):
        self.cfg, self.vocab_size, self.seq_len, self.seed = cfg, vocab_size, seq_len, seed
        self.pretrained, self.train, self.evaluation = pretrained, train, evaluation
        self.scoring, self.decoder = scoring, None
        self.pretrained_checkpoint: str | None = None  # set by initialize()

    def build_model(self) -> keras.Model:
        return build_model(dataclasses.replace(self.cfg, mixed_precision="off"),
                           self.vocab_size)

    def initialize(self, model, say) -> None:
        self.pretrained_checkpoint = start_from(self.pretrained, model, say)
        say(f"starting from {self.pretrained_checkpoint}")

    def tokens_per_example(self) -> int:
        return self.seq_len

    def train_dataset_fn(self, global_batch_size: int, seed: int, start_step: int):
        return shuffled_rows_fn(self.train.arrays(), global_batch_size, seed, start_step)

    def eval_dataset_fn(self, global_batch_size: int):
        """Every eval window once; positions past the end, up to a whole
        batch, repeat window 0 with its weights zeroed."""
        n = len(self.evaluation)
        stop = math.ceil(n / global_batch_size) * global_batch_size
        tokens, segments, positions, weights = (tf.constant(a) for a in self.evaluation.arrays())

        def take(q):
            rows = tf.where(q < n, q, 0)
            real = tf.cast(q < n, tf.float32)[:, None]
            return (tf.gather(tokens, rows), tf.gather(segments, rows),
                    tf.gather(positions, rows), tf.gather(weights, rows) * real)

        def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            return (tf.data.Dataset.range(ctx.input_pipeline_id, stop, ctx.num_input_pipelines)
                    .batch(per_replica, drop_remainder=True).map(take)
                    .prefetch(tf.data.AUTOTUNE))
        return dataset_fn

    def global_count(self, global_batch_size: int) -> float:
        # Nominal (the step divides by the all-reduced count instead): the
        # weighted fraction of a window times its targets.
        return float(global_batch_size * self.seq_len) * max(self.train.loss_fraction, 1e-3)

    def loss(self, model, batch, training: bool):
        losses, _ = weighted_losses(model, batch, training)
        return tf.reduce_sum(losses), tf.reduce_sum(batch[3])

    def eval_sums(self, model, batch):
        losses, out = weighted_losses(model, batch, training=False)
        weights = batch[3]
        hit = tf.cast(tf.equal(tf.argmax(out, -1, output_type=tf.int32), batch[0][:, 1:]),
                      tf.float32)
        return tf.stack([tf.reduce_sum(losses), tf.reduce_sum(weights),
                         tf.reduce_sum(hit * weights)])

    def generated_metrics(self, model, strategy) -> dict:
        if self.scoring is None or not self.scoring.prompts:
            return {}
        if self.decoder is None:  # made once: its models and traced steps serve every evaluation
            self.decoder = decoder(dataclasses.replace(self.cfg, mixed_precision="off"),
                                   self.scoring, strategy)
        texts = self.decoder(model.get_weights(), self.scoring.prompts,
                             self.scoring.max_new_tokens)
        return score(texts, self.scoring)

    def eval_metrics(self, sums) -> dict:
        count = max(float(sums[1]), 1.0)
        loss = float(sums[0]) / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "token_accuracy": float(sums[2]) / count}
