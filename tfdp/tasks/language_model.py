"""Language modelling (tfdp-train): predict every next token of text windows.

A batch is a [batch, seq_len + 1] tensor of token windows from the run's
token shards (tfdp/dataset.py) or a streamed TFDS corpus (tfdp/stream.py):
the model reads the first seq_len tokens and is scored on the last seq_len.
The global count is the global batch's target tokens, so each replica's
summed token loss is divided by global_batch_size * seq_len. Evaluation
reports loss, perplexity and bits per byte over the validation split.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfdp import presets
from tfdp.dataset import Split, eval_dataset_fn, eval_steps_for
from tfdp.generate import generate, generation_step, held_out_prompt, make_sampler
from tfdp.model import build_model, logits
from tfdp.tasks import Task


def token_losses(model: keras.Model, windows, training: bool):
    """Cross-entropy of each next token [batch, seq_len], in float32."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    out = tf.cast(logits(model, inputs, training=training), tf.float32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=out)


def loss_metrics(loss: float, split: Split) -> dict:
    """Loss, perplexity and bits per byte. Bits per byte = nats per token x
    the split's tokens per byte (EOT separators included) / ln 2, so
    tokenizers of any vocabulary compare."""
    tokens_per_byte = split.num_tokens / max(split.num_bytes, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss * tokens_per_byte / math.log(2.0)}


class LanguageModelTask(Task):
    """Next-token prediction on `train` (a Split or TextStream: whatever gives
    `dataset_fn(global_batch_size, seed, start_step)`), validated on the
    Split `val`. `cfg` is the run's Config (model shape, seq_len, eval_steps);
    `preset`, a keras-hub preset whose weights start a fresh run; `tokenizer`
    and `sample_tokens` > 0 give each validation a generated sample.

    Without data (train and val None) the task still builds the model and
    its loss: benchmarks and probes use it that way.
    """

    eval_prefix = "val_"

    def __init__(self, cfg, vocab_size: int, train=None, val: Split | None = None,
                 input_pipelines: int = 1, preset=None, tokenizer=None):
        self.cfg, self.vocab_size, self.train, self.val = cfg, vocab_size, train, val
        # With whole shard files per pipeline the data order depends on how
        # many pipelines there are; with one global order (interleave) it does not.
        self.input_pipelines = input_pipelines
        self.preset = preset
        self.sampler = (Sampler(cfg, tokenizer, val)
                        if tokenizer is not None and cfg.sample_tokens and val is not None
                        else None)

    def build_model(self) -> keras.Model:
        return build_model(self.cfg, self.vocab_size)

    def initialize(self, model: keras.Model, say) -> None:
        if self.preset is not None:  # --init_from: a fresh run starts from the preset's weights
            presets.load_weights(model, self.preset, self.cfg.seq_len, say)

    def tokens_per_example(self) -> int:
        return self.cfg.seq_len

    def train_dataset_fn(self, global_batch_size: int, seed: int, start_step: int):
        return self.train.dataset_fn(global_batch_size, seed, start_step)

    def eval_steps(self, global_batch_size: int) -> int:
        """Batches per validation: the whole split, or --eval_steps when smaller."""
        return eval_steps_for(self.val, global_batch_size, self.cfg.eval_steps,
                              self.input_pipelines)

    def eval_dataset_fn(self, global_batch_size: int):
        return eval_dataset_fn(self.val, global_batch_size, self.eval_steps(global_batch_size))

    def global_count(self, global_batch_size: int) -> float:
        return float(global_batch_size * self.cfg.seq_len)

    def loss(self, model, batch, training: bool):
        losses = token_losses(model, batch, training)
        return tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)

    def eval_sums(self, model, batch):
        windows, weights = batch  # padding windows of the last batch weigh 0
        losses = token_losses(model, windows, training=False)
        return tf.stack([tf.reduce_sum(losses * weights[:, None]),
                         tf.reduce_sum(tf.ones_like(losses) * weights[:, None])])

    def eval_metrics(self, sums) -> dict:
        return loss_metrics(float(sums[0] / max(sums[1], 1.0)), self.val)

    def sample(self, model) -> str | None:
        return self.sampler(model) if self.sampler is not None else None

    def forward_graph(self):
        """The forward pass as a graph: a plain (unmirrored) copy traced on one window."""
        plain = build_model(self.cfg, self.vocab_size)
        forward = tf.function(lambda ids: logits(plain, ids))
        return forward.get_concrete_function(tf.TensorSpec([1, self.cfg.seq_len],
                                                           tf.int32)).graph


class Sampler:
    """The run's samples: --sample_prompt continued, or (by default) a few
    held-out validation lines continued; both parts are labelled. Called at
    every validation (TensorBoard text) and at the end (sample.txt)."""

    def __init__(self, cfg, tokenizer, val_split: Split):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.sampler = make_sampler("top_k", temperature=0.8, seed=cfg.seed,
                                    vocab_size=tokenizer.vocab_size)
        if cfg.sample_prompt is not None:
            self.prompt, self.origin, self.new_document = cfg.sample_prompt, "--sample_prompt", True
        else:
            self.prompt = held_out_prompt(val_split, tokenizer, cfg.seed,
                                          max_chars=cfg.seq_len // 2)
            self.origin, self.new_document = "held-out validation text", False
        self.plain = self.step = None

    def __call__(self, model) -> str:
        # Sample from a plain copy of the weights, outside the strategy: traced
        # under MirroredStrategy the cached-generation loop becomes a
        # multi-device function that grappler took 90 s to optimise here. The
        # copy and its generation step are made once, so the step is traced once.
        if self.plain is None:
            self.plain = build_model(self.cfg, self.tokenizer.vocab_size)
            self.step = generation_step(self.plain, self.sampler, self.tokenizer.eot_id)
        self.plain.set_weights(model.get_weights())
        cfg = self.cfg
        text = generate(self.plain, self.tokenizer, self.prompt, cfg.sample_tokens, self.sampler,
                        cfg.seq_len, new_document=self.new_document, step=self.step)
        return (f"--- sample prompt ({self.origin}) ---\n{self.prompt.rstrip(chr(10))}\n"
                f"--- generated continuation ({cfg.sample_tokens} tokens max, top-k 40, "
                f"temperature 0.8) ---\n{text}\n")
