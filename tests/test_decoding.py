"""tfdp/decoding.py: batched, data-parallel decoding gives the texts that
decoding each prompt alone on one replica gives."""

from __future__ import annotations

import keras
import pytest

from tfdp.config import Config
from tfdp.decoding import complete
from tfdp.generate import generate, make_sampler
from tfdp.model import build_model
from tfdp.tokenizers import ByteTokenizer

CFG = Config(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, seq_len=32)
PROMPTS = ["def add(a, b):", "x", "class Point:\n    def", "", "for i in range(10)",
           "print(", "return a +", "import os"]


@pytest.fixture(scope="module")
def weights():
    keras.utils.set_random_seed(21)
    return build_model(CFG, ByteTokenizer.vocab_size).get_weights()


def _greedy():
    return make_sampler("greedy")


def test_batched_completions_equal_one_prompt_at_a_time(weights, one_device):
    """Prompts of 1 to 22 tokens in batches of 3, against tfdp.generate on
    each alone (8 new tokens: within generate's first window, so both see
    the same context)."""
    tok = ByteTokenizer()
    batched = complete(one_device, CFG, weights, tok, PROMPTS, 8, _greedy, batch_size=3)
    model = build_model(CFG, tok.vocab_size)
    model.set_weights(weights)
    alone = [generate(model, tok, p, 8, _greedy(), CFG.seq_len) for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) > 2  # an untrained model, but not one text for every prompt


def test_two_replicas_decode_the_same_texts_in_order(weights, mirrored, one_device):
    """Each replica decodes every other prompt; the all-reduce puts them back
    in input order. 7 prompts: the shards differ in size."""
    tok = ByteTokenizer()
    prompts = PROMPTS[:7]
    single = complete(one_device, CFG, weights, tok, prompts, 10, _greedy, batch_size=4)
    parallel = complete(mirrored, CFG, weights, tok, prompts, 10, _greedy, batch_size=4)
    assert parallel == single
    assert len(set(single)) > 2  # out of order would show


def test_beam_search_decodes_through_the_same_path(weights, mirrored, one_device):
    """keras-hub's BeamSampler: data-parallel equals one replica, and the
    texts are at least as likely as greedy's (they differ somewhere)."""
    tok = ByteTokenizer()
    beam = lambda: make_sampler("beam", num_beams=3)  # noqa: E731
    single = complete(one_device, CFG, weights, tok, PROMPTS, 6, beam, batch_size=4)
    assert complete(mirrored, CFG, weights, tok, PROMPTS, 6, beam, batch_size=4) == single
    assert single != complete(one_device, CFG, weights, tok, PROMPTS, 6, _greedy, batch_size=4)


def test_long_prompts_keep_their_end():
    """A prompt longer than the window minus the tokens to generate loses its
    start after the EOT, as fine-tuning cuts it."""
    from tfdp.decoding import _encode
    tok = ByteTokenizer()
    got = _encode(tok, ["abcdefghij", "ab"], keep=5)
    assert got == [[tok.eot_id] + [ord(c) for c in "ghij"], [tok.eot_id, ord("a"), ord("b")]]
