"""Tasks: what differs between tfdp's jobs, behind one interface the Runner drives.

A Task says how to build the model and its starting weights, which batches
to train and evaluate on, the per-replica loss, and the evaluation metrics;
tfdp.runner.Runner does everything else the same way for every job (the
step, its one all-reduce, the loop, checkpoints, resume, preemption, the
watchdog, callbacks, TensorBoard, metrics.json). This is TF Model Garden's
`official/core/base_task.py` split, cut to what data-parallel training of a
decoder needs. The tasks:

    language_model.LanguageModelTask    next-token prediction (tfdp-train)
    classification.ClassificationTask   a labelled text classifier (tfdp-finetune)
    completion.CompletionTask           prompt -> completion (tfdp-finetune
                                        --task=completion), scored on what it generates

A new job is a new module here implementing `Task`; never a new loop.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class Task:
    """The interface; subclasses implement every method that raises.

    Batches are whatever the task's dataset functions yield (a tensor or a
    tuple of tensors whose first dimension is the batch); the Runner never
    looks inside them, except to split them into gradient-accumulation
    micro-batches along that first dimension.
    """

    #: Prefix of the evaluation metrics in logs, history and TensorBoard.
    eval_prefix = "val_"
    #: Whether `loss`'s count can differ from `global_count` (a batch whose
    #: examples weigh differently); then the step divides by the count it
    #: all-reduced instead of the fixed one.
    count_varies = False
    #: How many input pipelines read the training data in a way that fixes
    #: its order (checkpoints record it; tfdp/checkpoints.py).
    input_pipelines = 1

    def build_model(self) -> keras.Model:
        """A freshly initialised model; the Runner calls this inside the
        strategy's scope with Keras' seed set."""
        raise NotImplementedError

    def checkpoint_parts(self, model: keras.Model) -> dict:
        """The trackables holding the model's weights in a checkpoint, by name."""
        return {"backbone": model.backbone}

    def initialize(self, model: keras.Model, say) -> None:
        """Load starting weights (a pretrained run, a preset) into a model that
        has trained nothing yet; a resumed run keeps its checkpoint's."""

    def tokens_per_example(self) -> int:
        """Tokens one training example feeds the model (for tokens/s and MFU)."""
        raise NotImplementedError

    def train_dataset_fn(self, global_batch_size: int, seed: int, start_step: int):
        """A dataset function (tf.distribute.InputContext -> endless per-replica
        batches) whose order continues exactly at `start_step`."""
        raise NotImplementedError

    def eval_dataset_fn(self, global_batch_size: int):
        """A dataset function over the whole evaluation set, finite, the same
        number of batches on every pipeline; padding examples weigh 0."""
        raise NotImplementedError

    def global_count(self, global_batch_size: int) -> float:
        """What the loss of a whole global batch is divided by (its target
        tokens, its examples): the normaliser that makes N replicas update
        exactly as one replica on the same batch."""
        raise NotImplementedError

    def loss(self, model: keras.Model, batch, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """(summed loss, the count it covers) over this replica's `batch`."""
        raise NotImplementedError

    def eval_sums(self, model: keras.Model, batch) -> tf.Tensor:
        """A float32 vector of sums over this replica's eval `batch`; the
        Runner adds them up over replicas and batches for `eval_metrics`."""
        raise NotImplementedError

    def eval_metrics(self, sums) -> dict:
        """Metrics (without the prefix) from the summed `eval_sums`; "loss" first."""
        raise NotImplementedError

    def generated_metrics(self, model: keras.Model, strategy) -> dict:
        """Scores of text the model generates (BLEU, exact match, ...), added
        to every evaluation's metrics; every worker calls it. {} for tasks
        scored on their logits alone."""
        return {}

    def sample(self, model: keras.Model) -> str | None:
        """Text to show at each evaluation (TensorBoard), or None."""
        return None

    def forward_graph(self):
        """A tf.Graph of the forward pass for TensorBoard's Graphs tab, or None."""
        return None
