"""tfdp-export: a trained run's latest checkpoint as a TF SavedModel or a
keras-hub preset, for use outside tfdp.

saved_model  TensorFlow's own format, loadable without tfdp, Keras or
             keras-hub (`tf.saved_model.load`, TF Serving). One signature,
             `serve`: int32 token_ids [batch, time] (time <= the run's
             --seq_len) -> float32 logits [batch, time, vocab]. The run's
             tokenizer is copied to `output/tokenizer` (tfdp's format) so a
             user can turn text into ids.
preset       a keras-hub preset directory (keras-hub's own `save_to_preset`):
             `keras_hub.models.GPT2CausalLM.from_preset(DIR)` and
             `GPT2Backbone.from_preset(DIR)` load it. A `bpe` run's
             tokenizer becomes a `GPT2Tokenizer` with a
             `GPT2CausalLMPreprocessor` (sequence length = --seq_len), so
             `generate("text")` works (float32, whatever the run's
             --mixed_precision); the other tokenizers are not GPT-2's,
             so the preset has no preprocessor (from_preset then gives
             `preprocessor=None`: feed token ids). tfdp's own tokenizer is
             kept in `output/tfdp_tokenizer` in every case, which is what
             `tfdp-train --init_from` reads.

Both formats are built in a staging directory beside `output`, checked by
loading them back and comparing their logits with the checkpoint's, and
only then renamed to `output`: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from tfdp.atomic import require_new_or_empty, staged_directory
from tfdp.errors import UserError

FORMATS = ("saved_model", "preset")
TFDP_TOKENIZER_DIR = "tfdp_tokenizer"  # tfdp's tokenizer inside a preset
_EOT = "<|endoftext|>"


def export(model_dir: str, output: str, fmt: str, log=print) -> str:
    """Export the latest checkpoint of `model_dir` to `output` in format
    `fmt` (one of FORMATS); return the absolute output path."""
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    output = require_new_or_empty(output, "--output")
    from tfdp.restore import load_trained  # TensorFlow loads here, after the cheap checks
    model, tokenizer, cfg = load_trained(model_dir)
    tokenizer_dir = os.path.join(os.path.abspath(os.path.expanduser(model_dir)), "tokenizer")

    # Built beside --output and renamed into place (tfdp/atomic.py).
    with staged_directory(output, ".tfdp-export-") as build:
        if fmt == "saved_model":
            notes = _saved_model(model, cfg, build)
            shutil.copytree(tokenizer_dir, os.path.join(build, "tokenizer"))
        else:
            notes = _preset(model, tokenizer, tokenizer_dir, cfg, build)
            shutil.copytree(tokenizer_dir, os.path.join(build, TFDP_TOKENIZER_DIR))
        require_new_or_empty(output, "--output")  # still? (publish replaces only an empty one)
    log(f"exported {fmt} to {output}: {notes}")
    return output


def _probe(cfg) -> np.ndarray:
    """A fixed batch of token ids for checking an export against the model."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, min(cfg.seq_len, 16))).astype(np.int32)


def _reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    from tfdp.model import logits
    return tf.cast(logits(model, tf.constant(ids)), tf.float32).numpy()


def _saved_model(model, cfg, path: str) -> str:
    """Write a SavedModel with one `serve` signature (token ids -> float32
    logits) through Keras' ExportArchive, then reload it with plain
    TensorFlow and check it serves the model's logits."""
    import keras
    import tensorflow as tf

    from tfdp.model import logits

    seq_len, vocab = cfg.seq_len, int(model.backbone.vocabulary_size)

    def serve(token_ids):
        # The position embedding has seq_len rows; say so instead of
        # failing inside a slice with an opaque shape error.
        tf.debugging.assert_less_equal(tf.shape(token_ids)[1], seq_len, message=(
            f"token_ids has more than {seq_len} positions, the model's context"))
        # float32 whatever the compute dtype (bf16/fp16 runs), as tfdp's loss does.
        return {"logits": tf.cast(logits(model, token_ids), tf.float32)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    archive.write_out(path, verbose=False)

    ids = _probe(cfg)
    served = tf.saved_model.load(path).signatures["serve"](token_ids=tf.constant(ids))
    # In 16-bit compute the saved graph and the eager model may take other
    # kernels (on an AMD EPYC without AMX they differed by 1.4e-3): compare
    # within bf16's precision there, which still catches a wrong weight.
    tolerance = 1e-5 if model.dtype_policy.compute_dtype == "float32" else 2e-2
    np.testing.assert_allclose(served["logits"].numpy(), _reference_logits(model, ids),
                               rtol=tolerance, atol=tolerance)
    return (f"signature 'serve': int32 token_ids [batch, time <= {seq_len}] -> float32 "
            f"logits [batch, time, {vocab}]; tfdp's tokenizer in tokenizer/")


def gpt2_tokenizer(vocabulary: dict, merges: list[str]):
    """tfdp's BPE vocabulary and merges as keras-hub's GPT2Tokenizer.

    GPT2Tokenizer requires `<|endoftext|>` in the vocabulary (it is GPT-2's
    start, end and padding token); tfdp's BPE always has it, at id 0. Called
    eagerly it gives tfdp's ids for any text (both apply the merges through
    the `tokenizers` package), except that it treats the literal text
    `<|endoftext|>` as that one special token, where tfdp spells it out in
    bytes. Inside tf.data or a tf.function, keras-hub 0.32 instead splits
    words first (GPT-2's own rule) and the ids differ from tfdp's; see
    tfdp/tokenizers.py `_train_bpe`.
    """
    import keras_hub

    if _EOT not in vocabulary:
        raise UserError(f"the BPE vocabulary has no {_EOT!r} token, which GPT2Tokenizer "
                        "needs; it was not written by tfdp-prepare")
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


def _preset(model, tokenizer, tokenizer_dir: str, cfg, path: str) -> str:
    """Write a keras-hub preset with keras-hub's own `save_to_preset` on a
    GPT2CausalLM (backbone, task and, for BPE, preprocessor and tokenizer),
    then load it back with `GPT2CausalLM.from_preset` and compare logits.

    The preset is always float32: keras-hub 0.32 saves a bf16/fp16 run's
    `mixed_bfloat16` policy but its from_preset rejects it ("Invalid dtype:
    mixed_bfloat16"); the weights are float32 anyway, and a user may pass
    `dtype=` to from_preset.
    """
    import dataclasses

    import keras_hub

    from tfdp.model import build_model

    if cfg.mixed_precision != "off":
        plain = build_model(dataclasses.replace(cfg, mixed_precision="off"),
                            int(model.backbone.vocabulary_size))
        plain.set_weights(model.get_weights())
        model = plain
    preprocessor = None
    if tokenizer.kind == "bpe":
        with open(os.path.join(tokenizer_dir, "vocabulary.json"), encoding="utf-8") as f:
            vocabulary = json.load(f)
        with open(os.path.join(tokenizer_dir, "merges.txt"), encoding="utf-8") as f:
            merges = f.read().split("\n")[:-1]
        # sequence_length = the model's context: keras-hub's default (1024)
        # would pad prompts past the position embedding.
        preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
            tokenizer=gpt2_tokenizer(vocabulary, merges), sequence_length=cfg.seq_len)
    task = keras_hub.models.GPT2CausalLM(backbone=model.backbone, preprocessor=preprocessor)
    task.save_to_preset(path)

    ids = _probe(cfg)
    loaded = keras_hub.models.GPT2CausalLM.from_preset(path)
    np.testing.assert_allclose(_reference_logits(loaded, ids), _reference_logits(model, ids),
                               rtol=1e-5, atol=1e-5)
    if preprocessor is not None:
        return ("keras_hub.models.GPT2CausalLM.from_preset(DIR) loads it with a GPT2Tokenizer "
                f"(tfdp's BPE vocabulary and merges) and sequence length {cfg.seq_len}; tfdp's "
                f"tokenizer in {TFDP_TOKENIZER_DIR}/")
    return (f"note: a {tokenizer.kind} tokenizer is not one GPT2CausalLM can use, so the preset "
            "has no preprocessor (GPT2CausalLM.from_preset(DIR) gives preprocessor=None: feed "
            f"token ids); tfdp's tokenizer is in {TFDP_TOKENIZER_DIR}/")
