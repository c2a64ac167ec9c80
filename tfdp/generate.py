"""Text generation with keras-hub's samplers and the model's KV cache.

Contexts longer than the model's window slide: each round keeps the last
three quarters of a window as context and samples the last quarter, so any
length can be generated with one compiled shape [1, seq_len]. (Keeping only
half a window made small models lose track in long runs of indentation.)
"""

from __future__ import annotations

import keras_hub
import tensorflow as tf

from tfdp.config import SAMPLERS
from tfdp.errors import UserError


def make_sampler(name: str, temperature: float = 1.0, seed: int | None = None,
                 top_k: int = 40, top_p: float = 0.9, vocab_size: int | None = None,
                 num_beams: int = 4):
    """A keras-hub sampler; `top_k` is capped at the vocabulary size."""
    if temperature <= 0:
        raise UserError(f"--temperature={temperature} must be positive, e.g. 0.8")
    if top_k < 1:
        raise UserError(f"--top_k={top_k} must be at least 1, e.g. 40")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p={top_p} must be in (0, 1], e.g. 0.9")
    if name == "greedy":
        return keras_hub.samplers.GreedySampler()
    if name == "beam":
        if num_beams < 1:
            raise UserError(f"--num_beams={num_beams} must be at least 1, e.g. 4")
        return keras_hub.samplers.BeamSampler(num_beams=num_beams)
    if name == "top_k":
        k = min(top_k, vocab_size) if vocab_size else top_k
        return keras_hub.samplers.TopKSampler(k=k, seed=seed, temperature=temperature)
    if name == "top_p":
        return keras_hub.samplers.TopPSampler(p=top_p, seed=seed, temperature=temperature)
    raise UserError(f"--sampler={name!r} is unknown; use one of {', '.join(SAMPLERS)}")


def generation_step(model, sampler, eot: int):
    """keras-hub's cached generation loop for `model` as one tf.function
    (tracing it takes seconds: a caller that samples often keeps it)."""
    model.sampler = sampler
    return tf.function(lambda inputs: model.generate_step(inputs, stop_token_ids=[eot]))


def generate(model, tokenizer, prompt: str, max_new_tokens: int, sampler,
             seq_len: int, new_document: bool = True, step=None) -> str:
    """Return up to `max_new_tokens` tokens continuing `prompt`; stop at end-of-text.

    With `new_document` the prompt is preceded by EOT, the document separator
    the model was trained with, so an empty prompt means "start a new file".
    `step`: a `generation_step` of this model, sampler and tokenizer to reuse.
    """
    if max_new_tokens <= 0:
        raise UserError(f"--max_length={max_new_tokens} must be a positive number of tokens")
    eot = tokenizer.eot_id
    step = step or generation_step(model, sampler, eot)
    context = tokenizer.encode([prompt.encode("utf-8")])[0].tolist()
    if new_document or not context:  # sampling needs at least one token of context
        context = [eot] + context
    new: list[int] = []
    keep = max(seq_len * 3 // 4, 1)
    # keras-hub's sampler stops once a stop token appears where the mask is
    # off, so the positions still to generate must not hold EOT (id 0 for
    # the char and bpe tokenizers).
    filler = 1 if eot == 0 else 0
    while len(new) < max_new_tokens:
        window = (context + new)[-keep:]
        pad = seq_len - len(window)
        token_ids = tf.constant([window + [filler] * pad], tf.int32)
        mask = tf.constant([[True] * len(window) + [False] * pad])
        out = step({"token_ids": token_ids, "padding_mask": mask})
        ids = out["token_ids"].numpy()[0].tolist()
        valid = out["padding_mask"].numpy()[0].tolist()
        produced = [t for t, ok in zip(ids[len(window):], valid[len(window):]) if ok]
        if eot in produced:
            new.extend(produced[:produced.index(eot)])
            break
        new.extend(produced)
        if not produced:
            break
    return tokenizer.decode(new[:max_new_tokens])


def held_out_prompt(split, tokenizer, seed: int, max_chars: int) -> str:
    """Whole lines from a seeded window of the validation split, at most
    `max_chars` long: context the model never trained on, so a sample shows
    how it continues real text rather than how it opens a new file."""
    start = int(split.starts[seed % split.num_windows])
    text = tokenizer.decode(split.tokens[start:start + split.seq_len + 1])
    lines = text.split("\n")[1:-1]  # drop the partial first and last lines
    prompt = ""
    for line in lines:
        if len(prompt) + len(line) + 1 > max_chars:
            break
        prompt += line + "\n"
    return prompt
