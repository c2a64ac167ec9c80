"""tfdp/textmetrics.py against published and hand-computed values."""

from __future__ import annotations

import pytest

from tfdp.textmetrics import (label_accuracy, normalize_answer, squad_scores, text_scores,
                              translation_scores)

# sacrebleu's README example: two reference streams for three hypotheses;
# the README prints "BLEU = 48.53 82.4/50.0/45.5/37.5 ..." and "chrF2 = 59.73".
HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
STREAMS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
           ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
PER_EXAMPLE = [list(refs) for refs in zip(*STREAMS)]


def test_bleu_and_chrf_are_sacrebleus_published_figures():
    scores = translation_scores(HYPS, PER_EXAMPLE)
    assert round(scores["bleu"], 2) == 48.53
    assert round(scores["chrf"], 2) == 59.73
    perfect = translation_scores(STREAMS[0], [[r] for r in STREAMS[0]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)


def test_a_varying_number_of_references_is_padded_not_misaligned():
    """The last example has one reference: the streams stay aligned, with
    None in its place (sacrebleu's convention), and the score counts it."""
    import sacrebleu
    refs = [PER_EXAMPLE[0], PER_EXAMPLE[1], PER_EXAMPLE[2][:1]]
    padded = [[r[0] for r in refs], [refs[0][1], refs[1][1], None]]
    assert translation_scores(HYPS, refs)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, padded).score)
    assert translation_scores(HYPS, refs)["bleu"] != pytest.approx(
        translation_scores(HYPS, PER_EXAMPLE)["bleu"])


def test_squad_normalisation_is_the_official_one():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_exact_match_and_f1_by_hand():
    predictions = ["the Eiffel Tower", "Eiffel", "Paris", "in 1889 (March)"]
    references = [["Eiffel Tower"], ["Eiffel Tower", "tower"], ["London"], ["March 1889"]]
    scores = squad_scores(predictions, references)
    # EM: only the first (articles and case are normalised away).
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    # F1: 1; best of 2*(1*0.5)/1.5 and 0; 0; "in 1889 march" vs "march 1889":
    # 2 common tokens, precision 2/3, recall 1 -> 0.8.
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 0.8) / 4)


def test_label_accuracy_and_the_combined_scores():
    assert label_accuracy([" positive", "negative", "positive"],
                          [["positive"], ["positive"], ["positive", "pos"]]) == \
        pytest.approx(2 / 3)
    both = text_scores(HYPS, PER_EXAMPLE, labels=True)
    assert set(both) == {"bleu", "chrf", "exact_match", "f1", "accuracy"}
    assert both["accuracy"] == pytest.approx(1 / 3)  # the first hypothesis is a reference
    assert "accuracy" not in text_scores(HYPS, PER_EXAMPLE)


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        squad_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        translation_scores(["a"], [[]])
