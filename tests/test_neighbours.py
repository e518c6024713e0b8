"""First-neighbour search: exact backend against numpy brute force, approximate recall, edges."""

from __future__ import annotations

import numpy as np
import pytest

from engine.monitor import Cancelled, Monitor
from engine.neighbours import first_neighbours


def _cosine_similarity(features: np.ndarray) -> np.ndarray:
    rows = features.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms > 0, norms, 1.0)
    return rows @ rows.T


def _brute_force_best_similarity(features: np.ndarray) -> np.ndarray:
    similarity = _cosine_similarity(features)
    np.fill_diagonal(similarity, -np.inf)
    return similarity.max(axis=1)


def _random_with_duplicates(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    features[40] = features[7]  # a pair of twins
    features[[100, 200, 250]] = features[99]  # four identical rows
    features[120] = 3.0 * features[121]  # same direction: identical after normalisation
    return features


def test_exact_matches_numpy_brute_force() -> None:
    features = _random_with_duplicates()
    neighbour = first_neighbours(features, method="exact")

    assert neighbour.dtype == np.int64
    assert np.all(neighbour != np.arange(len(features)))
    similarity = _cosine_similarity(features)
    found = similarity[np.arange(len(features)), neighbour]
    np.testing.assert_allclose(found, _brute_force_best_similarity(features), atol=1e-6)
    # Without ties the index itself must agree with numpy's argmax.
    reference = np.where(np.eye(len(features), dtype=bool), -np.inf, similarity).argmax(axis=1)
    untied = np.sort(similarity, axis=1)[:, -2] < similarity.max(axis=1) - 1e-6
    untied &= ~np.isin(np.arange(len(features)), [7, 40, 99, 100, 200, 250, 120, 121])
    assert np.array_equal(neighbour[untied], reference[untied])


def test_duplicates_point_at_a_twin_never_at_themselves() -> None:
    features = _random_with_duplicates()
    neighbour = first_neighbours(features, method="exact")

    assert neighbour[7] == 40 and neighbour[40] == 7
    group = {99, 100, 200, 250}
    assert all(int(neighbour[i]) in group - {i} for i in group)
    assert neighbour[120] == 121 and neighbour[121] == 120


def test_ties_go_to_the_lowest_index() -> None:
    # Row 0 is equally similar to rows 1 and 2 (mirror images around it).
    features = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 0.2]], dtype=np.float32)
    assert first_neighbours(features, method="exact")[0] == 1


def test_tiny_inputs() -> None:
    assert first_neighbours(np.zeros((0, 3))).shape == (0,)
    assert first_neighbours(np.ones((1, 3))).tolist() == [-1]
    assert first_neighbours(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == [1, 0]
    # All rows identical (and all-zero rows): everyone points at a twin.
    for rows in (np.ones((3, 4)), np.zeros((3, 4))):
        neighbour = first_neighbours(rows)
        assert np.all(neighbour != np.arange(3)) and np.all((neighbour >= 0) & (neighbour < 3))


def test_approximate_recall_on_20k_points() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(20_000, 16)).astype(np.float32)
    neighbour = first_neighbours(features, method="approximate", seed=0)
    exact = first_neighbours(features, method="exact")

    assert np.all(neighbour != np.arange(len(features)))
    rows = features / np.linalg.norm(features, axis=1, keepdims=True)
    found = np.einsum("ij,ij->i", rows, rows[neighbour])
    best = np.einsum("ij,ij->i", rows, rows[exact])
    recall = np.mean(found >= best - 1e-6)
    assert recall >= 0.95, recall


def test_approximate_handles_many_duplicates() -> None:
    # Half the rows are copies of 50 patterns (think flat water or zero-filled nodata patches).
    rng = np.random.default_rng(4)
    features = rng.normal(size=(4000, 8)).astype(np.float32)
    copies = np.arange(0, 4000, 2)
    features[copies] = features[copies % 100 + 1]  # odd rows 1..99 are the patterns
    neighbour = first_neighbours(features, method="approximate")

    assert np.all(neighbour != np.arange(4000))
    twins = np.concatenate([copies, np.arange(1, 100, 2)])
    assert np.array_equal(features[neighbour[twins]], features[twins])


def test_auto_switches_on_exact_max_points() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(3000, 8)).astype(np.float32)
    exact = first_neighbours(features, method="exact")
    assert np.array_equal(first_neighbours(features, method="auto"), exact)
    approximate = first_neighbours(features, method="auto", exact_max_points=1000)
    assert np.mean(approximate == exact) > 0.95


def test_cancel_stops_the_search() -> None:
    features = np.random.default_rng(3).normal(size=(5000, 8)).astype(np.float32)
    with pytest.raises(Cancelled):
        first_neighbours(features, method="exact", monitor=Monitor(is_cancelled=lambda: True))


def test_rejects_unknown_method_and_nan() -> None:
    with pytest.raises(ValueError):
        first_neighbours(np.ones((3, 2)), method="kdtree")
    with pytest.raises(ValueError):
        first_neighbours(np.array([[1.0, np.nan], [0.0, 1.0]]))
