"""tfdp/tasks/: the Task interface, language modelling and classification.

What each task promises the Runner: its global count (the normaliser that
makes N replicas update as one), its per-replica loss and count, evaluation
sums that ignore padding, metrics from those sums, and (classification)
a training order that resumes exactly and does not depend on how many
input pipelines read it.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_text
from tfdp.config import Config
from tfdp.dataset import Split
from tfdp.prepare import prepare
from tfdp.step import make_train_step
from tfdp.tasks import Task
from tfdp.tasks.classification import ClassificationTask
from tfdp.tasks.language_model import LanguageModelTask, loss_metrics

SEQ, V = 16, 50
CFG = Config(num_layers=1, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=SEQ,
             sample_tokens=0)


def _windows(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(n, SEQ + 1)).astype(np.int32)


def _token_losses(model, windows):
    """Per-token cross-entropy computed here, from the model's logits."""
    out = model({"token_ids": windows[:, :-1],
                 "padding_mask": np.ones_like(windows[:, :-1], bool)}, training=False)
    return keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        windows[:, 1:], out, from_logits=True)).astype(np.float64)


@pytest.fixture(scope="module")
def lm_model():
    keras.utils.set_random_seed(3)
    return LanguageModelTask(CFG, V).build_model()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "corpus.txt").write_text(tiny_text(60), encoding="utf-8")
    prepare([root / "corpus.txt"], str(root / "prep"), "byte", None, 0.2, log=lambda *_: None)
    return str(root / "prep")


# --- Task: the interface ----------------------------------------------------

def test_the_interface_defaults_and_its_abstract_methods():
    task = Task()
    assert (task.eval_prefix, task.count_varies, task.input_pipelines) == ("val_", False, 1)
    assert task.sample(None) is None and task.forward_graph() is None
    assert task.initialize(None, print) is None
    model = type("M", (), {"backbone": "the backbone"})()
    assert task.checkpoint_parts(model) == {"backbone": "the backbone"}
    for call in (task.build_model, task.tokens_per_example,
                 lambda: task.train_dataset_fn(8, 1, 0), lambda: task.eval_dataset_fn(8),
                 lambda: task.global_count(8), lambda: task.loss(None, None, True),
                 lambda: task.eval_sums(None, None), lambda: task.eval_metrics([1.0])):
        with pytest.raises(NotImplementedError):
            call()


# --- LanguageModelTask ------------------------------------------------------

def test_lm_global_count_is_the_global_batchs_target_tokens():
    task = LanguageModelTask(CFG, V)
    assert task.global_count(12) == 12 * SEQ
    assert task.tokens_per_example() == SEQ
    assert task.eval_prefix == "val_" and not task.count_varies


def test_lm_loss_is_the_summed_token_loss_and_its_token_count(lm_model):
    windows = _windows(3)
    total, count = LanguageModelTask(CFG, V).loss(lm_model, tf.constant(windows),
                                                  training=False)
    assert float(count) == 3 * SEQ
    expected = _token_losses(lm_model, windows).sum()
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert 3 * SEQ * math.log(V) * 0.8 < float(total) < 3 * SEQ * math.log(V) * 1.2  # random init


def test_lm_eval_sums_ignore_padding_windows(lm_model):
    """Weights [1, 1, 0, 0]: the sums are those of the first two windows,
    whatever the padding windows hold."""
    task = LanguageModelTask(CFG, V)
    real = _windows(2, seed=1)
    weights = tf.constant([1.0, 1.0, 0.0, 0.0])
    sums = []
    for pad_seed in (2, 3):
        batch = np.concatenate([real, _windows(2, seed=pad_seed)])
        sums.append(task.eval_sums(lm_model, (tf.constant(batch), weights)).numpy())
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-6)
    assert sums[0][1] == 2 * SEQ
    assert sums[0][0] == pytest.approx(_token_losses(lm_model, real).sum(), rel=1e-5)


def test_lm_eval_metrics_from_sums_use_the_splits_tokens_per_byte(prepared):
    val = Split(prepared, "val", SEQ)
    assert val.num_tokens > val.num_bytes > 0  # bytes plus the EOT after each document
    task = LanguageModelTask(CFG, V, val=val)
    metrics = task.eval_metrics(np.array([300.0, 120.0]))
    assert list(metrics) == ["loss", "perplexity", "bits_per_byte"]
    assert metrics["loss"] == pytest.approx(2.5)
    assert metrics["perplexity"] == pytest.approx(math.exp(2.5))
    assert metrics["bits_per_byte"] == pytest.approx(
        2.5 * val.num_tokens / val.num_bytes / math.log(2))
    assert task.eval_metrics(np.array([0.0, 0.0]))["loss"] == 0.0  # no division by zero


def test_lm_eval_steps_cover_the_split_or_stop_at_eval_steps(prepared):
    val = Split(prepared, "val", SEQ)
    assert LanguageModelTask(CFG, V, val=val).eval_steps(4) == math.ceil(val.num_windows / 4)
    capped = Config(**{**CFG.__dict__, "eval_steps": 1})
    assert LanguageModelTask(capped, V, val=val).eval_steps(4) == 1


def test_loss_metrics_of_a_huge_loss_stay_finite():
    split = type("S", (), {"num_tokens": 10, "num_bytes": 20})()
    metrics = loss_metrics(1000.0, split)
    assert metrics["perplexity"] == math.exp(700.0)
    assert metrics["bits_per_byte"] == pytest.approx(1000.0 * 0.5 / math.log(2))
    assert loss_metrics(math.log(4.0), split)["perplexity"] == pytest.approx(4.0)


def test_lm_train_dataset_fn_is_the_splits(prepared):
    train = Split(prepared, "train", SEQ)
    task = LanguageModelTask(CFG, 257, train=train)
    ctx = tf.distribute.InputContext(1, 0, 1)
    ours = next(iter(task.train_dataset_fn(4, 7, 3)(ctx))).numpy()
    theirs = next(iter(train.dataset_fn(4, 7, 3)(ctx))).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape == (4, SEQ + 1)


# --- ClassificationTask -----------------------------------------------------

N, CSEQ = 10, 6


def _examples(n=N):
    """(ids, mask, labels): row i's first token is i + 1, so a row names itself."""
    ids = np.zeros([n, CSEQ], np.int32)
    ids[:, 0] = np.arange(1, n + 1)
    ids[:, 1] = 7
    mask = np.zeros([n, CSEQ], np.int32)
    mask[:, :2] = 1
    labels = (np.arange(n) % 3).astype(np.int32)
    return ids, mask, labels


def _cls_task(train=None, evaluation=None, seed=5):
    data = _examples()
    return ClassificationTask(CFG, V, 3, "last", CSEQ, seed, None, train or data,
                              evaluation or data)


def _rows(batch):
    """The example indices of a batch (ids, mask, labels, weights)."""
    return (batch[0].numpy()[:, 0] - 1).tolist()


def test_classification_resumes_exactly_at_start_step():
    task = _cls_task()
    ctx = tf.distribute.InputContext(1, 0, 1)
    full = [_rows(b) for b in task.train_dataset_fn(4, 11, 0)(ctx).take(7)]
    for k in (1, 3):
        resumed = [_rows(b) for b in task.train_dataset_fn(4, 11, k)(ctx).take(7 - k)]
        assert resumed == full[k:]
    # One pass (10 positions) is a permutation; the next pass another one.
    flat = sum(full, [])
    assert sorted(flat[:N]) == list(range(N)) == sorted(flat[N:2 * N])
    assert flat[:N] != flat[N:2 * N]
    other_seed = [_rows(b) for b in task.train_dataset_fn(4, 12, 0)(ctx).take(3)]
    assert other_seed != full[:3]


def test_classification_order_is_the_same_for_one_or_two_pipelines():
    """Global batch 4 on 2 replicas: one pipeline feeding both, or two
    pipelines of one replica each, give every step the same 4 examples."""
    task = _cls_task()
    one = list(task.train_dataset_fn(4, 11, 0)(tf.distribute.InputContext(1, 0, 2)).take(8))
    single = [sorted(_rows(one[2 * s]) + _rows(one[2 * s + 1])) for s in range(4)]
    parts = [list(task.train_dataset_fn(4, 11, 0)(tf.distribute.InputContext(2, p, 2)).take(4))
             for p in range(2)]
    double = [sorted(_rows(parts[0][s]) + _rows(parts[1][s])) for s in range(4)]
    assert single == double
    for batch in one + parts[0] + parts[1]:
        assert batch[3].numpy().tolist() == [1.0, 1.0]  # training rows all weigh 1
        i = np.asarray(_rows(batch))
        np.testing.assert_array_equal(batch[2].numpy(), _examples()[2][i])  # labels follow rows


@pytest.mark.parametrize("pipelines", [1, 2])
def test_classification_eval_covers_each_example_once_with_padding(pipelines):
    """10 examples, global batch 4: 3 steps, 2 padding rows weighing 0; with
    2 pipelines both run the same number of batches."""
    task = _cls_task()
    fn = task.eval_dataset_fn(4)
    batches = [list(fn(tf.distribute.InputContext(pipelines, p, 2))) for p in range(pipelines)]
    assert len({len(b) for b in batches}) == 1
    assert sum(len(b) for b in batches) == 6  # 3 steps x 2 replicas' batches
    seen, padding = [], 0
    for batch in (b for part in batches for b in part):
        weights = batch[3].numpy()
        assert set(weights.tolist()) <= {0.0, 1.0}
        rows = np.asarray(_rows(batch))
        seen += rows[weights == 1].tolist()
        padding += int((weights == 0).sum())
        assert (rows[weights == 0] == 0).all()  # padding repeats row 0
    assert sorted(seen) == list(range(N)) and padding == 2


def test_classification_global_count_loss_and_metrics():
    task = _cls_task()
    assert task.global_count(8) == 8.0 and task.eval_prefix == "eval_"
    assert task.tokens_per_example() == CSEQ
    with tf.distribute.get_strategy().scope():
        model = task.build_model()
    assert set(task.checkpoint_parts(model)) == {"backbone", "head"}
    ids, mask, labels = _examples()
    weights = np.array([1, 0, 2, 1, 0, 1, 1, 1, 0.5, 1], np.float32)
    logits = model({"token_ids": ids, "padding_mask": mask}).numpy().astype(np.float64)
    assert logits.shape == (N, 3)
    ce = -(logits[np.arange(N), labels] - np.log(np.exp(logits).sum(-1)))
    batch = tuple(tf.constant(a) for a in (ids, mask, labels, weights))
    total, count = task.loss(model, batch, training=False)
    assert float(count) == pytest.approx(weights.sum())
    assert float(total) == pytest.approx((ce * weights).sum(), rel=1e-5)
    sums = task.eval_sums(model, batch).numpy()
    hits = (logits.argmax(-1) == labels).astype(np.float64)
    np.testing.assert_allclose(sums, [(ce * weights).sum(), (hits * weights).sum(),
                                      weights.sum()], rtol=1e-5)
    assert task.eval_metrics(np.array([3.0, 6.0, 8.0])) == {"loss": 0.375, "accuracy": 0.75}
    assert task.eval_metrics(np.array([0.0, 0.0, 0.0])) == {"loss": 0.0, "accuracy": 0.0}


# --- count_varies: weighted examples on unequal replicas ----------------------

class ReducedSGD(keras.optimizers.SGD):
    """Plain SGD on gradients tfdp already all-reduced (as tfdp.optimizer's
    AdamW): unlike Adam, its update shows the gradient's scale."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


class WeightedRegression(Task):
    """y ~ x @ w + b with a weight per example; loss = sum w_i (y_i - f(x_i))^2,
    its count the summed weights."""

    count_varies = True
    X = np.array([[1, 2, 0], [0, 1, 1], [2, 0, 1], [1, 1, 1]], np.float32)
    Y = np.array([1.0, -1.0, 2.0, 0.5], np.float32)
    # Replica 0 gets rows 0-1 (weight 1), replica 1 rows 2-3 (weight 5).
    W = np.array([1.0, 0.0, 3.0, 2.0], np.float32)

    def __init__(self, varies=True):
        self.count_varies = varies

    def build_model(self):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.set_weights([np.array([[0.5], [-0.25], [0.1]], np.float32),
                           np.array([0.2], np.float32)])
        return model

    def train_dataset_fn(self, global_batch_size, seed, start_step):
        def dataset_fn(ctx):
            per_replica = ctx.get_per_replica_batch_size(global_batch_size)
            return tf.data.Dataset.from_tensor_slices(
                (self.X, self.Y, self.W)).repeat().batch(per_replica)
        return dataset_fn

    def global_count(self, global_batch_size):
        return float(global_batch_size)  # the nominal count: every example weighing 1

    def loss(self, model, batch, training):
        x, y, w = batch
        err = y - model(x, training=training)[:, 0]
        return tf.reduce_sum(w * err * err), tf.reduce_sum(w)


def _weighted_step(strategy, task):
    with strategy.scope():
        model = task.build_model()
        optimizer = ReducedSGD(learning_rate=0.1)
        optimizer.build(model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, task, 4, clip_norm=0.0,
                           jit_compile=False)
    out = step(iter(strategy.distribute_datasets_from_function(task.train_dataset_fn(4, 0, 0))))
    return float(out["loss"][0]), [v.numpy() for v in model.trainable_variables]


def _reference():
    """The weighted mean loss over all four rows, and one SGD step on its gradient."""
    task = WeightedRegression()
    model = task.build_model()
    x, y, w = (tf.constant(a) for a in (task.X, task.Y, task.W))
    with tf.GradientTape() as tape:
        err = y - model(x)[:, 0]
        loss = tf.reduce_sum(w * err * err) / tf.reduce_sum(w)
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), [(v - 0.1 * g).numpy() for v, g in zip(model.trainable_variables, grads)]


def test_count_varies_divides_by_the_all_reduced_count(one_device, mirrored):
    """Replicas whose batches weigh 1 and 5: the 2-replica step equals the
    1-replica step and the hand-computed step on the weighted mean loss."""
    ref_loss, ref_weights = _reference()
    for strategy in (one_device, mirrored):
        loss, weights = _weighted_step(strategy, WeightedRegression())
        assert loss == pytest.approx(ref_loss, rel=1e-6), strategy
        for got, want in zip(weights, ref_weights):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_without_count_varies_the_nominal_count_divides(mirrored):
    """The same batch with count_varies off: divided by 4 examples, not by the
    summed weight 6, so the reported loss is 6/4 of the weighted mean."""
    ref_loss, _ = _reference()
    loss, _ = _weighted_step(mirrored, WeightedRegression(varies=False))
    assert loss == pytest.approx(ref_loss * 6 / 4, rel=1e-6)
