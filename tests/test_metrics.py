"""Tests of engine.metrics against sklearn.metrics and hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    adjusted_rand_score,
    cohen_kappa_score,
    normalized_mutual_info_score,
)

from engine.metrics import UNMATCHED, ClusteringScores, hungarian_mapping, score_clustering


def _mapped(predicted: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    return np.array([mapping.get(int(value), UNMATCHED) for value in predicted])


@pytest.mark.parametrize(
    ("n_classes", "n_clusters", "seed"),
    [(2, 2, 0), (5, 5, 1), (4, 7, 2), (7, 3, 3), (10, 10, 4)],
)
def test_matches_sklearn_on_random_labels(n_classes: int, n_clusters: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.integers(1, n_classes + 1, size=2000)
    # Correlated prediction so the scores are neither 0 nor 1.
    predicted = np.where(
        rng.random(2000) < 0.6,
        (reference * 3) % n_clusters + 1,
        rng.integers(1, n_clusters + 1, size=2000),
    )
    scores = score_clustering(reference, predicted)
    assert scores.n_scored == 2000
    assert scores.nmi == pytest.approx(
        normalized_mutual_info_score(reference, predicted, average_method="arithmetic"), abs=1e-10
    )
    assert scores.ari == pytest.approx(adjusted_rand_score(reference, predicted), abs=1e-10)
    mapped = _mapped(predicted, scores.mapping)
    assert scores.kappa == pytest.approx(cohen_kappa_score(reference, mapped), abs=1e-10)
    assert scores.overall_accuracy == pytest.approx(np.mean(mapped == reference))


def test_hungarian_mapping_is_optimal_against_brute_force() -> None:
    from itertools import permutations

    rng = np.random.default_rng(7)
    reference = rng.integers(1, 5, size=300)
    predicted = rng.integers(1, 5, size=300)
    mapping = hungarian_mapping(reference, predicted)
    best = max(
        np.sum(
            np.array([dict(zip(range(1, 5), perm, strict=True))[p] for p in predicted]) == reference
        )
        for perm in permutations(range(1, 5))
    )
    assert np.sum(_mapped(predicted, mapping) == reference) == best
    assert sorted(mapping.keys()) == [1, 2, 3, 4]
    assert sorted(mapping.values()) == [1, 2, 3, 4]


def test_permuted_perfect_clustering_scores_one() -> None:
    reference = np.repeat(np.arange(1, 6), 40).reshape(10, 20)
    permutation = {1: 4, 2: 5, 3: 1, 4: 3, 5: 2}
    predicted = np.vectorize(permutation.get)(reference)
    scores = score_clustering(reference, predicted)
    assert scores.overall_accuracy == 1.0
    assert scores.nmi == pytest.approx(1.0)
    assert scores.kappa == pytest.approx(1.0)
    assert scores.ari == pytest.approx(1.0)
    assert scores.mapping == {v: k for k, v in permutation.items()}
    assert all(value == 1.0 for value in scores.per_class_accuracy.values())


def test_more_clusters_than_classes_counts_surplus_as_errors() -> None:
    reference = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    predicted = np.array([5, 5, 5, 9, 7, 7, 7, 7])  # cluster 9 is a split of class 1
    scores = score_clustering(reference, predicted)
    assert scores.mapping == {5: 1, 7: 2}
    assert 9 not in scores.mapping
    assert scores.overall_accuracy == pytest.approx(7 / 8)
    assert scores.per_class_accuracy == {1: pytest.approx(0.75), 2: 1.0}
    mapped = _mapped(predicted, scores.mapping)
    assert scores.kappa == pytest.approx(cohen_kappa_score(reference, mapped))


def test_fewer_clusters_than_classes() -> None:
    reference = np.array([1, 1, 2, 2, 3, 3])
    predicted = np.array([4, 4, 6, 6, 6, 6])
    scores = score_clustering(reference, predicted)
    assert len(scores.mapping) == 2
    assert scores.overall_accuracy == pytest.approx(4 / 6)
    assert sorted(scores.per_class_accuracy.values()) == [0.0, 1.0, 1.0]


def test_zeros_are_ignored_and_unpredicted_counted() -> None:
    reference = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    predicted = np.array([3, 0, 3, 3, 4, 4, 0, 0])
    scores = score_clustering(reference, predicted)
    # Scored: positions 2..5; reference-labelled without prediction: positions 6, 7.
    assert scores.n_scored == 4
    assert scores.n_unpredicted == 2
    assert scores.coverage == pytest.approx(4 / 6)
    assert scores.overall_accuracy == 1.0
    assert scores.mapping == {3: 1, 4: 2}


def test_ignore_values_can_be_changed_or_disabled() -> None:
    reference = np.array([1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 1])
    scores = score_clustering(reference, predicted, ignore_predicted=None)
    assert scores.n_scored == 4
    assert scores.overall_accuracy == 1.0
    scores = score_clustering(reference, predicted, ignore_reference=2, ignore_predicted=None)
    assert scores.n_scored == 2


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_clustering(np.ones((4, 5), dtype=int), np.ones((5, 4), dtype=int))
    with pytest.raises(ValueError):
        hungarian_mapping(np.ones(3, dtype=int), np.ones(4, dtype=int))


def test_nothing_scorable_raises() -> None:
    with pytest.raises(ValueError, match="no pixel"):
        score_clustering(np.zeros((3, 3), dtype=int), np.ones((3, 3), dtype=int))
    with pytest.raises(ValueError, match="no pixel"):
        score_clustering(np.ones((3, 3), dtype=int), np.zeros((3, 3), dtype=int))


def test_non_integer_labels_raise() -> None:
    with pytest.raises(ValueError, match="integer"):
        score_clustering(np.array([1.0, np.nan]), np.array([1, 2]))
    # Integral floats (e.g. read from a float raster) are accepted.
    scores = score_clustering(np.array([1.0, 2.0]), np.array([2, 1]))
    assert scores.overall_accuracy == 1.0


def test_hand_computed_example() -> None:
    # Contingency (rows reference 1,2; columns clusters 1,2):
    #   [[3, 1],
    #    [1, 3]]     n = 8
    reference = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    predicted = np.array([2, 2, 2, 1, 1, 1, 1, 2])
    scores = score_clustering(reference, predicted)
    assert scores.mapping == {2: 1, 1: 2}
    # 6 of 8 agree after matching.
    assert scores.overall_accuracy == pytest.approx(0.75)
    # Kappa: p_o = 0.75, p_e = 0.5*0.5 + 0.5*0.5 = 0.5 -> (0.75 - 0.5) / 0.5 = 0.5
    assert scores.kappa == pytest.approx(0.5)
    # MI = 2 * (3/8) ln(1.5) + 2 * (1/8) ln(0.5); H(G) = H(P) = ln 2.
    mutual_information = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert scores.nmi == pytest.approx(mutual_information / math.log(2))
    # ARI: sum C(n_ij,2) = 3+0+0+3 = 6; a = b = 2*C(4,2) = 12; C(8,2) = 28;
    # expected = 12*12/28; max = 12 -> (6 - 36/7) / (12 - 36/7) = 1/8.
    assert scores.ari == pytest.approx(0.125)
    assert scores.per_class_accuracy == {1: 0.75, 2: 0.75}


def test_single_class_single_cluster() -> None:
    scores = score_clustering(np.full(5, 3), np.full(5, 8))
    assert scores.overall_accuracy == 1.0
    assert scores.nmi == 1.0
    assert scores.ari == 1.0
    assert math.isnan(scores.kappa)


def test_to_dict_is_plain_and_json_serialisable() -> None:
    scores = score_clustering(np.array([1, 1, 2, 2]), np.array([np.int16(5), 5, 6, 5]))
    as_dict = scores.to_dict()
    assert set(as_dict) >= {
        "overall_accuracy",
        "nmi",
        "kappa",
        "ari",
        "n_scored",
        "n_unpredicted",
        "per_class_accuracy",
        "mapping",
    }
    json.dumps(as_dict)
    assert all(type(key) is int for key in as_dict["mapping"])
    assert isinstance(scores, ClusteringScores)
    assert "OA=" in scores.summary()
