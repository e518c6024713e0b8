"""Chip-level similarity (engine.chip_similarity) against a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from engine import chip_similarity
from engine.chip_similarity import matched_chip_similarity, nearest_chips
from engine.monitor import Cancelled, Monitor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered_chips(n_chips: int = 12, n_segments: int = 20, dim: int = 8, seed: int = 0,
                    equal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Chips as mixtures of a few segment types, with varying segment counts."""
    rng = np.random.default_rng(seed)
    types = rng.normal(size=(4, dim))
    embeddings, chips = [], []
    for chip in range(n_chips):
        count = n_segments if equal else int(rng.integers(n_segments // 2, n_segments + 1))
        kinds = rng.choice(4, size=count, p=rng.dirichlet(np.ones(4)))
        embeddings.append(types[kinds] + 0.3 * rng.normal(size=(count, dim)))
        chips.append(np.full(count, chip))
    order = rng.permutation(sum(len(c) for c in chips))  # segments of a chip need not be adjacent
    return (np.concatenate(embeddings)[order].astype(np.float32),
            np.concatenate(chips)[order].astype(np.int32))


def brute_similarity(embedding: np.ndarray, chip: np.ndarray, a: int, b: int) -> float:
    """The definition, written out: cosine matrix, maximum matching, mean over matched pairs."""
    x = embedding[chip == a].astype(np.float64)
    y = embedding[chip == b].astype(np.float64)
    cosine = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        y / np.linalg.norm(y, axis=1, keepdims=True)).T
    rows, cols = linear_sum_assignment(-cosine)
    return float(cosine[rows, cols].mean())


@pytest.mark.parametrize("pair_group", [32, 3])
def test_nearest_chips_matches_brute_force_over_all_pairs(monkeypatch, pair_group):
    monkeypatch.setattr(chip_similarity, "PAIR_GROUP", pair_group)
    embedding, chip = clustered_chips()
    n = 12
    full = np.full((n, n), -np.inf)
    for a, b in itertools.permutations(range(n), 2):
        full[a, b] = brute_similarity(embedding, chip, a, b)
    neighbours, similarity = nearest_chips(embedding, chip, n, n_neighbours=5)
    assert neighbours.shape == (n, 5) and neighbours.dtype == np.int64
    assert similarity.shape == (n, 5) and similarity.dtype == np.float32
    for a in range(n):
        expected = np.lexsort((np.arange(n), -full[a]))[:5]
        np.testing.assert_array_equal(neighbours[a], expected)
        np.testing.assert_allclose(similarity[a], full[a, expected], rtol=1e-5, atol=1e-6)
        assert a not in neighbours[a]
        assert np.all(np.diff(similarity[a]) <= 1e-7)  # most similar first


def test_similarity_is_symmetric_and_pure_function_agrees():
    embedding, chip = clustered_chips(n_chips=4)
    for a, b in itertools.combinations(range(4), 2):
        ab = matched_chip_similarity(embedding[chip == a], embedding[chip == b])
        ba = matched_chip_similarity(embedding[chip == b], embedding[chip == a])
        assert ab == pytest.approx(ba, abs=1e-6)
        assert ab == pytest.approx(brute_similarity(embedding, chip, a, b), abs=1e-6)


def test_identical_chips_have_similarity_one_whatever_the_segment_order():
    rng = np.random.default_rng(3)
    segments = rng.normal(size=(15, 6))
    assert matched_chip_similarity(segments, segments[rng.permutation(15)]) == pytest.approx(1.0)
    # Rectangular: a chip holding all of another chip's segments (and more) also matches at 1.
    assert matched_chip_similarity(segments[:9], segments) == pytest.approx(1.0)
    embedding = np.concatenate([segments, segments[::-1], rng.normal(size=(15, 6))])
    chip = np.repeat([0, 1, 2], 15)
    neighbours, similarity = nearest_chips(embedding, chip, 3, n_neighbours=2)
    assert neighbours[0, 0] == 1 and similarity[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert neighbours[1, 0] == 0


def test_padding_when_fewer_chips_than_neighbours_and_for_empty_chips():
    embedding, chip = clustered_chips(n_chips=4)
    chip = np.where(chip == 2, 4, chip)  # chip 2 has no segment; chip 4 takes them (n_chips=5)
    neighbours, similarity = nearest_chips(embedding, chip, 5, n_neighbours=6)
    for a in (0, 1, 3, 4):
        assert set(neighbours[a, :3]) == {0, 1, 3, 4} - {a}
        assert np.all(neighbours[a, 3:] == -1) and np.all(np.isnan(similarity[a, 3:]))
        assert np.all(np.isfinite(similarity[a, :3]))
    assert np.all(neighbours[2] == -1) and np.all(np.isnan(similarity[2]))


def test_pruned_with_all_candidates_equals_exact_and_is_deterministic():
    embedding, chip = clustered_chips(n_chips=10, seed=1)
    exact = nearest_chips(embedding, chip, 10, n_neighbours=4)
    for candidates in (9, 20):
        pruned = nearest_chips(embedding, chip, 10, n_neighbours=4, n_candidates=candidates)
        np.testing.assert_array_equal(pruned[0], exact[0])
        np.testing.assert_array_equal(pruned[1], exact[1])
    first = nearest_chips(embedding, chip, 10, n_neighbours=4, n_candidates=5)
    again = nearest_chips(embedding, chip, 10, n_neighbours=4, n_candidates=5)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_pruned_search_finds_most_true_neighbours_on_structured_chips():
    embedding, chip = clustered_chips(n_chips=40, n_segments=30, seed=2)
    exact, exact_similarity = nearest_chips(embedding, chip, 40, n_neighbours=5)
    pruned, pruned_similarity = nearest_chips(embedding, chip, 40, n_neighbours=5,
                                              n_candidates=12)
    recall = np.mean([np.intersect1d(exact[a], pruned[a]).size / 5 for a in range(40)])
    assert recall > 0.85
    # Every similarity reported by the pruned search is an exact matched similarity.
    for a in range(0, 40, 7):
        for b, value in zip(pruned[a], pruned_similarity[a]):
            assert value == pytest.approx(brute_similarity(embedding, chip, a, b), abs=1e-5)
    assert np.all(pruned_similarity[:, 0] <= exact_similarity[:, 0] + 1e-6)


def test_cancel_stops_the_search():
    embedding, chip = clustered_chips()
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 3

    for candidates in (None, 6):
        calls.clear()
        with pytest.raises(Cancelled):
            nearest_chips(embedding, chip, 12, n_neighbours=5, n_candidates=candidates,
                          monitor=Monitor(is_cancelled=cancelled))


def test_progress_reaches_one():
    embedding, chip = clustered_chips()
    seen: list[float] = []
    nearest_chips(embedding, chip, 12, n_neighbours=3, n_candidates=5,
                  monitor=Monitor(on_progress=seen.append))
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_chips": 3}, "chip ids"),
        ({"n_neighbours": 0}, "n_neighbours"),
        ({"n_candidates": 2}, "n_candidates"),
    ],
)
def test_bad_input_is_explained(kwargs, message):
    embedding, chip = clustered_chips()
    arguments = {"n_chips": 12, "n_neighbours": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        nearest_chips(embedding, chip, **arguments)


def test_nan_embedding_is_refused():
    embedding, chip = clustered_chips()
    embedding[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nearest_chips(embedding, chip, 12)


@pytest.mark.parametrize("candidates", [None, 6])
def test_result_does_not_depend_on_the_number_of_worker_threads(candidates):
    embedding, chip = clustered_chips()
    one = nearest_chips(embedding, chip, 12, n_neighbours=5, n_candidates=candidates, n_workers=1)
    three = nearest_chips(embedding, chip, 12, n_neighbours=5, n_candidates=candidates,
                          n_workers=3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])
