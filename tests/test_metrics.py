"""metrics.py: exact match, CER, the confidence threshold, and the sign test that says when one model reads better."""

import numpy as np
import pytest

import metrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("precision", [0.8, 0.95, 0.99])
def test_the_threshold_reaches_its_precision_on_the_split_it_was_chosen_on(seed, precision):
    rng = np.random.default_rng(seed)
    confidences = np.round(rng.random(300), 2)  # ties, as real confidences have after rounding
    correct = rng.random(300) < 0.3 + 0.7 * confidences  # the confident ones are right more often
    chosen = metrics.abstention_threshold(correct, confidences, precision)
    kept = metrics.abstention_scores(correct, confidences, chosen["threshold"])
    assert kept["precision"] >= precision and kept["precision"] == pytest.approx(chosen["precision"])
    assert kept["coverage"] == pytest.approx(chosen["coverage"]) and 0 < kept["coverage"] < 1
    lower = confidences[confidences < chosen["threshold"]].max()  # the next cut down misses the precision
    assert metrics.abstention_scores(correct, confidences, lower)["precision"] < precision


def test_no_threshold_when_the_most_confident_reading_is_wrong():
    chosen = metrics.abstention_threshold([False, True], [0.9, 0.8], 0.99)
    assert chosen["threshold"] is None and chosen["coverage"] == 0
    assert metrics.abstention_scores([False, True], [0.9, 0.8], None) == {"coverage": 0.0, "precision": None,
                                                                          "count": 2}


def test_ineligible_readings_are_never_kept_by_a_threshold():
    correct, confidences = [False, True, True, True], [0.99, 0.9, 0.8, 0.7]
    assert metrics.abstention_threshold(correct, confidences, 0.99)["threshold"] is None  # the top one is wrong
    eligible = [False, True, True, True]  # ... but of a length no typed label has: marked low by every reader
    chosen = metrics.abstention_threshold(correct, confidences, 0.99, eligible)
    assert chosen == {"threshold": 0.7, "precision": 1.0, "coverage": 0.75, "count": 4}
    assert metrics.abstention_scores(correct, confidences, 0.7, eligible) == {"coverage": 0.75, "precision": 1.0,
                                                                             "count": 4}


def test_one_validation_error_is_not_evidence_but_many_are():
    assert not metrics.better_beyond_chance([True] * 20, [True] * 19 + [False])  # p = 0.5
    assert not metrics.better_beyond_chance([True] * 20, [True] * 16 + [False] * 4)  # p = 0.0625
    assert metrics.better_beyond_chance([True] * 20, [True] * 15 + [False] * 5)  # p = 0.03125
    assert not metrics.better_beyond_chance([True] * 15 + [False] * 5, [True] * 20)  # one-sided
    # paired: each reads right where the other errs as often, so neither is better
    assert not metrics.better_beyond_chance([True, False] * 10, [False, True] * 10)


def test_confidence_ranking_splits_the_most_confident_readings():
    ranked = metrics.confidence_ranking(["a", "b", "c", "x"], ["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.1], keep=0.75)
    assert ranked["exact_match_confident"] == 1.0 and ranked["exact_match_rest"] == 0.0
    assert ranked["threshold"] == pytest.approx(0.7) and (ranked["count_confident"], ranked["count_rest"]) == (3, 1)


def test_character_error_rate():
    assert metrics.character_error_rate(["abcde"], ["abcde"]) == 0
    assert metrics.character_error_rate(["abxde", ""], ["abcde", "fghij"]) == pytest.approx(6 / 10)
