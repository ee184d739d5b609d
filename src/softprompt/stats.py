"""Paired bootstrap confidence intervals over test examples.

Two systems scored on the same test examples differ by ``score_a - score_b``. Resampling the
examples with replacement (the same resampled indices for both systems: paired) and
recomputing both scores gives the distribution of that difference; its 2.5th and 97.5th
percentiles bound a 95% interval (Efron & Tibshirani's percentile bootstrap; Koehn 2004 for
MT). A difference whose interval contains 0 is not significant at that level.

A score is a function of the resampled example indices, so a corpus metric is recomputed
from the resampled examples, never averaged: ROUGE, SQuAD F1/EM and token overlap are means
of per-example scores; BLEU and chrF sum sacrebleu's per-sentence statistics and compute the
corpus score from the sums (what ``sacrebleu --paired-bs`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Score = Callable[[np.ndarray], float]  # example indices [n] (with repeats) -> metric value

RESAMPLES = 1000
SEED = 0
CORPUS_METRICS = ("bleu", "chrf")


@dataclass
class Interval:
    """A difference ``a - b`` with its bootstrap confidence interval."""

    estimate: float  # the difference on the test set as it is
    low: float
    high: float
    level: float = 0.95
    resamples: int = RESAMPLES
    seed: int = SEED

    @property
    def significant(self) -> bool:
        """False when the interval contains 0."""
        return not self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` example indices drawn with replacement by ``numpy`` seed ``seed``."""
    if n <= 0:
        raise ValueError("the bootstrap needs at least one example")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap(score_a: Score, score_b: Score, n: int, *, resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = 0.95) -> Interval:
    """The percentile interval of ``score_a - score_b`` over ``n`` paired test examples."""
    full = np.arange(n)
    diffs = np.array([score_a(idx) - score_b(idx)
                      for idx in resample_indices(n, resamples, seed)])
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    return Interval(float(score_a(full) - score_b(full)), float(low), float(high), level,
                    resamples, seed)


def mean_score(values: Sequence[float]) -> Score:
    """The mean of per-example values over the resampled examples."""
    array = np.asarray(values, dtype=np.float64)
    return lambda idx: float(array[idx].mean())


def corpus_score(metric: str, predictions: list[str], references: list[list[str]]) -> Score:
    """Corpus BLEU or chrF (sacrebleu defaults, as :func:`softprompt.metrics.bleu`) of the
    resampled examples, from per-sentence statistics computed once."""
    from sacrebleu.metrics import BLEU, CHRF

    scorer = {"bleu": BLEU, "chrf": CHRF}[metric]()
    n_streams = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references]
               for j in range(n_streams)]
    stats = np.asarray(scorer._extract_corpus_statistics(predictions, streams))  # [n, S]
    return lambda idx: float(scorer._compute_score_from_stats(
        stats[idx].sum(axis=0).tolist()).score)


def rows_score(metric: str, rows: list[dict[str, Any]]) -> Score:
    """The ``metric`` of an evaluation's prediction rows (``prediction``, ``references``,
    per-example ``scores``) over resampled examples."""
    if metric in CORPUS_METRICS:
        return corpus_score(metric, [r["prediction"] for r in rows],
                            [r["references"] for r in rows])
    return mean_score([r["scores"][metric] for r in rows])


def mean_of(scores: Sequence[Score]) -> Score:
    """The mean of several systems' scores (a soft prompt trained with several seeds)."""
    return lambda idx: float(np.mean([s(idx) for s in scores]))
