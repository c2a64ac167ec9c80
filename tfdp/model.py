"""The GPT: keras-hub's GPT-2 backbone with its causal-LM head.

`GPT2CausalLM` projects hidden states through the transposed token
embedding (tied input/output embeddings) and brings keras-hub's cached
generation, which tfdp/generate.py uses with keras-hub samplers. Build it
inside `strategy.scope()` so its variables are mirrored on every replica.
"""

from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf


def build_model(cfg, vocab_size: int) -> keras_hub.models.GPT2CausalLM:
    """A GPT-2-style decoder sized by the config, with weights initialised."""
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        hidden_dim=cfg.hidden_dim,
        intermediate_dim=cfg.intermediate_dim,
        dropout=cfg.dropout,
        max_sequence_length=cfg.seq_len,
        dtype=dtype_policy(cfg),
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def dtype_policy(cfg) -> str:
    """Keras dtype policy: float32 weights always; 16-bit compute under bf16/fp16."""
    return {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}.get(cfg.mixed_precision,
                                                                   "float32")


def logits(model: keras.Model, token_ids, training: bool = False):
    """Next-token logits [batch, time, vocab] for packed (unpadded) windows, in
    the compute dtype (callers cast to float32 before any softmax)."""
    mask = tf.ones_like(token_ids, dtype=tf.bool)
    return model({"token_ids": token_ids, "padding_mask": mask}, training=training)


def segment_logits(model: keras.Model, token_ids, segments, positions, training: bool = False):
    """Next-token logits [batch, time, vocab] of windows that hold several
    examples (tfdp/completiondata.py): each input position attends only to
    earlier positions of its own segment and is embedded at its position
    inside its example, so every example's logits are exactly what they are
    alone. keras-hub's GPT-2 backbone takes only a padding mask, so this
    runs its own layers (the same weights) with an attention mask instead."""
    backbone = model.backbone
    x = backbone.token_embedding(token_ids)
    x = backbone.embeddings_add((x, backbone.position_embedding(x, positions=positions)))
    x = backbone.embeddings_dropout(x, training=training)
    # [batch, query, key]; the layers intersect it with the causal mask.
    same = tf.cast(tf.equal(segments[:, :, None], segments[:, None, :]), tf.int32)
    for layer in backbone.transformer_layers:
        x = layer(x, decoder_attention_mask=same, training=training)
    return backbone.token_embedding(backbone.layer_norm(x), reverse=True)


def count_params(model: keras.Model) -> int:
    return int(sum(v.numpy().size for v in model.trainable_variables))


def non_embedding_params(model: keras.Model) -> int:
    """Parameters counted in the 6N FLOPs term: all but position embeddings
    (a lookup, no multiply). The tied token embedding stays in: it is the
    output projection's matmul."""
    position = model.backbone.get_layer("position_embedding")
    return count_params(model) - int(sum(v.numpy().size for v in position.trainable_variables))
