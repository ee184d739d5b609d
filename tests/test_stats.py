"""The paired bootstrap against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from softprompt.metrics import bleu, rouge, squad
from softprompt.stats import (
    Interval,
    corpus_score,
    mean_of,
    mean_score,
    paired_bootstrap,
    resample_indices,
    rows_score,
)


def test_a_constant_difference_has_a_zero_width_interval_however_noisy_the_scores():
    """Paired: the same resampled examples for both systems, so b + 2 minus b is always 2
    (an unpaired bootstrap of these spread-out scores would give a wide interval)."""
    b = [0.0, 50.0, 100.0, 10.0, 90.0]
    a = [x + 2.0 for x in b]
    ci = paired_bootstrap(mean_score(a), mean_score(b), len(a))
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((2.0, 2.0, 2.0))
    assert ci.significant and ci.resamples == 1000 and ci.seed == 0 and ci.level == 0.95


def test_two_examples_of_opposite_sign_give_the_hand_computed_interval():
    """Differences (-1, +1): a resample of two is (-1,-1), (-1,1), (1,-1) or (1,1), so its
    mean is -1, 0 or 1 with probability 1/4, 1/2, 1/4; the 2.5th percentile is -1, the 97.5th
    +1: the interval [-1, 1] contains 0, not significant; the estimate is 0."""
    ci = paired_bootstrap(mean_score([0.0, 2.0]), mean_score([1.0, 1.0]), 2)
    assert (ci.estimate, ci.low, ci.high) == (0.0, -1.0, 1.0)
    assert not ci.significant
    means = resample_indices(2).mean(axis=1)  # the share of each outcome is near 1/4, 1/2, 1/4
    assert [float(np.mean(means == v)) for v in (0.0, 0.5, 1.0)] == pytest.approx(
        [0.25, 0.5, 0.25], abs=0.05)


def test_the_interval_is_fixed_by_the_seed_and_covers_the_estimate():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 50)
    first = paired_bootstrap(mean_score(a), mean_score(b), 50)
    assert first == paired_bootstrap(mean_score(a), mean_score(b), 50)
    assert first != paired_bootstrap(mean_score(a), mean_score(b), 50, seed=1)
    assert first.low < first.estimate < first.high
    assert math.isclose(first.estimate, float(np.mean(a - b)))
    # The 95% interval of a mean difference is about +-1.96 standard errors wide.
    se = float(np.std(a - b) / math.sqrt(50))
    assert first.high - first.low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert Interval(0.5, -0.1, 1.0).significant is False
    assert Interval(-0.5, -1.0, -0.1).to_dict()["significant"] is True


def test_corpus_metrics_are_recomputed_on_the_resampled_examples_not_averaged():
    preds = ["Ein Hund läuft am Strand.", "Zwei Katzen", "Es regnet heute sehr stark."]
    refs = [["Ein Hund rennt am Strand."], ["Zwei Katzen schlafen.", "Zwei Katzen ruhen."],
            ["Es regnet."]]
    full = np.arange(3)
    for metric in ("bleu", "chrf"):
        score = corpus_score(metric, preds, refs)
        assert score(full) == pytest.approx(bleu(preds, refs)[metric])
        repeated = np.array([0, 0, 2])  # a resample recomputes the corpus metric on it
        assert score(repeated) == pytest.approx(
            bleu([preds[0], preds[0], preds[2]], [refs[0], refs[0], refs[2]])[metric])


def test_rows_score_uses_per_example_scores_for_mean_metrics():
    preds, refs = ["a cat sat", "dogs bark loudly"], [["the cat sat down"], ["dogs bark"]]
    rows = [{"prediction": p, "references": r,
             "scores": {**rouge([p], [r]), **squad([p], [r])}} for p, r in zip(preds, refs)]
    assert rows_score("rougeL", rows)(np.arange(2)) == pytest.approx(
        rouge(preds, refs)["rougeL"])
    assert rows_score("f1", rows)(np.array([1, 1])) == pytest.approx(
        squad([preds[1]], [refs[1]])["f1"])
    both = mean_of([mean_score([1.0, 3.0]), mean_score([3.0, 5.0])])
    assert both(np.arange(2)) == 3.0
