"""Tests for softprompt.metrics with hand-computed expectations."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softprompt.metrics import (
    METRICS,
    bleu,
    compute_metrics,
    example_scores,
    normalize_answer,
    rouge,
    squad,
    token_overlap,
)

# --- ROUGE -------------------------------------------------------------------


def test_rouge_uses_stemming_hand_computed():
    # Stemmed tokens: pred [the, cat, were, run], ref [a, cat, run].
    # ROUGE-1: overlap 2, P=2/4, R=2/3, F=4/7. No shared bigram. LCS = [cat, run].
    scores = rouge(["The cats were running."], [["A cat runs"]])
    assert scores["rouge1"] == pytest.approx(400 / 7)
    assert scores["rouge2"] == pytest.approx(0.0)
    assert scores["rougeL"] == pytest.approx(400 / 7)


def test_rouge_max_over_references_and_mean_over_examples():
    preds = ["the cat sat", "completely different words"]
    refs = [["dogs bark loudly", "the cat sat"], ["nothing shared here"]]
    scores = rouge(preds, refs)
    # Example 1 matches its second reference exactly (100), example 2 scores 0.
    for key in ("rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(50.0)


# --- SQuAD -------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("An apple, a day") == "apple day"


def test_squad_exact_match_after_normalisation():
    scores = squad(["The Eiffel Tower!"], [["eiffel tower"]])
    assert scores == {"exact_match": 100.0, "f1": 100.0}


def test_squad_partial_f1_hand_computed():
    # "in city of paris" vs "paris france": 1 common, P=1/4, R=1/2, F1=1/3.
    scores = squad(["in the city of Paris"], [["Paris, France"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 / 3)


def test_squad_max_over_gold_answers():
    # Second gold "city of paris": 3 common, P=3/4, R=1, F1=6/7.
    scores = squad(["in the city of Paris"], [["Paris, France", "the city of Paris"]])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(600 / 7)


def test_squad_mean_over_examples():
    scores = squad(["Blue", "red"], [["blue"], ["green"]])
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_squad_empty_prediction_scores_zero():
    assert squad([""], [["something"]]) == {"exact_match": 0.0, "f1": 0.0}


# --- BLEU / chrF -------------------------------------------------------------


def test_bleu_identical_is_100():
    preds = ["Der Hund läuft schnell über die Straße.", "Es regnet heute sehr stark."]
    scores = bleu(preds, [[p] for p in preds])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_bleu_disjoint_is_low():
    scores = bleu(["xyz qqq"], [["Der Hund bellt."]])
    assert scores["bleu"] == pytest.approx(0.0)
    assert scores["chrf"] < 10.0


def test_bleu_variable_number_of_references():
    preds = ["Die Katze schläft auf dem Sofa.", "Wir essen heute Abend Pizza."]
    refs = [
        ["Eine Katze liegt auf der Couch.", "Die Katze schläft auf dem Sofa."],
        ["Wir essen heute Abend Pizza."],
    ]
    scores = bleu(preds, refs)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


# --- token_overlap -----------------------------------------------------------


def test_token_overlap_hand_computed():
    assert token_overlap(["a b c d"], [["b d e"]]) == {"token_overlap": 50.0}


def test_token_overlap_lowercases_dedupes_and_takes_max():
    # Distinct pred words {the, cat, dog}; best reference contains cat and dog.
    scores = token_overlap(["The cat, the Dog!"], [["nothing", "dog and cat"]])
    assert scores["token_overlap"] == pytest.approx(200 / 3)


def test_token_overlap_empty_prediction_is_zero():
    assert token_overlap(["", "a"], [["a"], ["a"]]) == {"token_overlap": 50.0}


@given(
    st.lists(st.text(max_size=30), min_size=1, max_size=5),
    st.text(max_size=30),
)
def test_scores_are_within_0_100(preds, ref):
    refs = [[ref] for _ in preds]
    for fn in (token_overlap, squad):
        for value in fn(preds, refs).values():
            assert 0.0 <= value <= 100.0


# --- registry / compute_metrics / example_scores -----------------------------


def test_registry_names():
    assert set(METRICS) == {"rouge", "squad", "bleu", "token_overlap"}


def test_compute_metrics_merges():
    scores = compute_metrics(["squad", "token_overlap"], ["a b c d"], [["b d e"]])
    assert set(scores) == {"exact_match", "f1", "token_overlap"}
    assert scores["token_overlap"] == 50.0
    # SQuAD drops the article "a": "b c d" vs "b d e" -> 2 common, P=R=2/3.
    assert scores["f1"] == pytest.approx(200 / 3)


def test_compute_metrics_all_keys():
    scores = compute_metrics(list(METRICS), ["the cat sat"], [["the cat sat"]])
    assert set(scores) == {
        "rouge1",
        "rouge2",
        "rougeL",
        "exact_match",
        "f1",
        "bleu",
        "chrf",
        "token_overlap",
    }


@pytest.mark.parametrize(
    ("names", "preds", "refs"),
    [
        (["nope"], ["a"], [["a"]]),
        ([], ["a"], [["a"]]),
        (["squad"], ["a", "b"], [["a"]]),
        (["squad"], [], []),
        (["squad"], ["a"], [[]]),
    ],
)
def test_compute_metrics_errors(names, preds, refs):
    with pytest.raises(ValueError):
        compute_metrics(names, preds, refs)


def test_metric_function_rejects_length_mismatch():
    with pytest.raises(ValueError, match="one list of references per prediction"):
        rouge(["a"], [["a"], ["b"]])


def test_example_scores_bleu_sentence_level():
    scores = example_scores(["bleu"], "Der Hund bellt laut.", ["Der Hund bellt laut."])
    assert scores == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_example_scores_other_metrics():
    scores = example_scores(["squad", "token_overlap"], "a b c d", ["xyz", "b d e"])
    assert scores["token_overlap"] == 50.0
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(200 / 3)


def test_example_scores_errors():
    with pytest.raises(ValueError):
        example_scores(["bogus"], "a", ["a"])
    with pytest.raises(ValueError):
        example_scores(["squad"], "a", [])
