"""A completion fine-tune learns translation and extractive QA, offline:
the generated tasks of tests/offline_tasks.py (whose figures the README
quotes), from a small model pretrained on their words, scored on decoded
text as tfdp-eval scores it."""

from __future__ import annotations

import pytest

import offline_tasks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return offline_tasks.run(str(tmp_path_factory.mktemp("learning")))


def test_translation_goes_from_nothing_to_word_perfect(figures):
    """BLEU and chrF by sacrebleu: the pretrained model writes no German
    sentence (it has never seen a pairing); after 400 steps nearly every
    sentence is exact."""
    f = figures["translation"]
    assert f["before"]["bleu"] < 5 and f["before"]["exact_match"] == 0, f["before"]
    assert f["after"]["bleu"] > 90 and f["after"]["chrf"] > 90, f
    assert f["after"]["exact_match"] > 90, f
    assert [h["step"] for h in f["history"]] == [200, 400]


def test_qa_goes_from_nothing_to_the_right_span(figures):
    """SQuAD exact match and F1, the max over both references: the answer
    is a span of the story that the question picks out."""
    f = figures["qa"]
    assert f["before"]["exact_match"] < 5 and f["before"]["f1"] < 20, f["before"]
    assert f["after"]["exact_match"] > 90 and f["after"]["f1"] > 90, f
    assert [h["step"] for h in f["history"]] == [150, 300]
