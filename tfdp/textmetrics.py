"""Scores of generated text against references: what papers report.

    bleu, chrf          sacrebleu's corpus BLEU (13a tokenizer, exp
                        smoothing) and chrF (character 6-grams, beta 2): the
                        implementation translation papers quote, so a figure
                        here compares with theirs
    exact_match, f1     SQuAD v1.1's official definitions: answers
                        normalised (lower case, punctuation and the articles
                        a/an/the removed, whitespace collapsed), the best
                        over the reference answers, averaged over examples
    accuracy            label words: the stripped prediction equals a
                        reference (glue/sst2 as "positive"/"negative")

BLEU, chrF, exact match and F1 are percentages (0-100), as sacrebleu and
the SQuAD script print them; accuracy is a fraction (0-1), as a
classifier's accuracy is everywhere in tfdp.
Every example may have several references (squad's `answers/text`); the
first is what fine-tuning trains on, all of them count when scoring.
Pure Python: no TensorFlow, so scoring a file of predictions is instant.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str) -> float:
    """Token F1 of two answers after normalisation (SQuAD v1.1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if any(not refs for refs in references):
        raise ValueError("every example needs at least one reference")


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """{"exact_match", "f1"}: SQuAD v1.1's, each the best over an example's
    references, as percentages of the examples."""
    _check(predictions, references)
    n = max(len(predictions), 1)
    em = sum(max(normalize_answer(p) == normalize_answer(r) for r in refs)
             for p, refs in zip(predictions, references))
    f1 = sum(max(_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def translation_scores(predictions: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict:
    """{"bleu", "chrf"}: sacrebleu's corpus scores with its default settings;
    examples with fewer references than others are padded as sacrebleu asks."""
    import sacrebleu  # imported here: only scoring needs it

    _check(predictions, references)
    width = max((len(refs) for refs in references), default=1)
    streams = [[refs[i] if i < len(refs) else None for refs in references]
               for i in range(width)]
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
            "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score}


def label_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions that equal (stripped) one of their references."""
    _check(predictions, references)
    hits = sum(p.strip() in {r.strip() for r in refs} for p, refs in zip(predictions, references))
    return hits / max(len(predictions), 1)


def text_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                labels: bool = False) -> dict:
    """Every score above: bleu, chrf, exact_match, f1, and accuracy when the
    completions are label words (`labels`)."""
    scores = {**translation_scores(predictions, references),
              **squad_scores(predictions, references)}
    if labels:
        scores["accuracy"] = label_accuracy(predictions, references)
    return scores
