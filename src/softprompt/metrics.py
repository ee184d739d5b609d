"""Evaluation metrics, registered by name, all on a 0-100 scale.

Every metric takes ``predictions`` (one string per example) and ``references``
(a list of one or more reference strings per example) and returns a flat dict
of named scores. ROUGE and BLEU/chrF come from ``rouge_score`` and
``sacrebleu``; SQuAD EM/F1 follow the official SQuAD v1.1 evaluation script.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from functools import cache

import sacrebleu
from rouge_score import rouge_scorer

MetricFn = Callable[[list[str], list[list[str]]], dict[str, float]]

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_WORD = re.compile(r"\w+")


def _check(predictions: list[str], references: list[list[str]]) -> None:
    """Raise ValueError unless inputs are non-empty, aligned and have references."""
    if not predictions:
        raise ValueError("No predictions given; pass at least one prediction.")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass one list of references per prediction."
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(
                f"Example {i} has no reference list; give each example a non-empty list[str]."
            )


@cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)


def _rouge_one(prediction: str, refs: list[str]) -> dict[str, float]:
    scorer = _rouge_scorer()
    best = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for ref in refs:
        scores = scorer.score(ref, prediction)
        for key in _ROUGE_TYPES:
            best[key] = max(best[key], scores[key].fmeasure)
    return best


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure with stemming, max over references, mean over examples.

    Note that the ``rouge_score`` tokenizer keeps only ASCII letters and digits.
    """
    _check(predictions, references)
    per_example = [_rouge_one(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: 100.0 * sum(s[k] for s in per_example) / len(per_example) for k in _ROUGE_TYPES}


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower, strip punctuation and articles, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _squad_one(prediction: str, refs: list[str]) -> dict[str, float]:
    norm = normalize_answer(prediction)
    return {
        "exact_match": max(float(norm == normalize_answer(g)) for g in refs),
        "f1": max(_squad_f1(prediction, g) for g in refs),
    }


def squad(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and token F1, max over gold answers, mean over examples."""
    _check(predictions, references)
    per_example = [_squad_one(p, r) for p, r in zip(predictions, references, strict=True)]
    n = len(per_example)
    return {k: 100.0 * sum(s[k] for s in per_example) / n for k in ("exact_match", "f1")}


def bleu(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus-level sacreBLEU BLEU and chrF (sacrebleu defaults, already 0-100).

    Examples may have different numbers of references: the reference streams are
    padded with ``None``, which sacrebleu skips.
    """
    _check(predictions, references)
    n_streams = max(len(refs) for refs in references)
    streams: list[list[str | None]] = [
        [refs[j] if j < len(refs) else None for refs in references] for j in range(n_streams)
    ]
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, streams).score),
    }


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _token_overlap_one(prediction: str, refs: list[str]) -> float:
    pred = _words(prediction)
    if not pred:
        return 0.0
    return max(len(pred & _words(r)) / len(pred) for r in refs)


def token_overlap(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Share of the prediction's distinct lowercased words found in a reference.

    Max over references, mean over examples; an empty prediction scores 0.
    """
    _check(predictions, references)
    scores = [_token_overlap_one(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"token_overlap": 100.0 * sum(scores) / len(scores)}


METRICS: dict[str, MetricFn] = {
    "rouge": rouge,
    "squad": squad,
    "bleu": bleu,
    "token_overlap": token_overlap,
}


def _check_names(names: list[str]) -> None:
    if not names:
        raise ValueError(f"No metric names given; choose from {sorted(METRICS)}.")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {sorted(METRICS)}.")


def compute_metrics(
    names: list[str], predictions: list[str], references: list[list[str]]
) -> dict[str, float]:
    """Run the named metrics and merges their score dicts."""
    _check_names(names)
    _check(predictions, references)
    merged: dict[str, float] = {}
    for name in names:
        merged.update(METRICS[name](predictions, references))
    return merged


def example_scores(names: list[str], prediction: str, references: list[str]) -> dict[str, float]:
    """Per-example scores for one prediction; "bleu" gives sentence BLEU and chrF."""
    _check_names(names)
    _check([prediction], [references])
    merged: dict[str, float] = {}
    for name in names:
        if name == "bleu":
            merged["bleu"] = float(sacrebleu.sentence_bleu(prediction, references).score)
            merged["chrf"] = float(sacrebleu.sentence_chrf(prediction, references).score)
        else:
            merged.update(METRICS[name]([prediction], [references]))
    return merged
