"""FINCH: partition 0 against a naive union-find, hierarchy on Gaussian blobs, edge cases."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from engine.finch import cluster_means, finch, mini_clusters
from engine.monitor import Monitor


def _naive_first_neighbours(features: np.ndarray) -> np.ndarray:
    rows = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _union_find_labels(kappa: np.ndarray) -> np.ndarray:
    """Components of A(i,j)=1 iff j=kappa_i or kappa_j=i or kappa_i=kappa_j, all three rules."""
    n = len(kappa)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    for i in range(n):
        for j in range(n):
            if kappa[i] == j or kappa[j] == i or kappa[i] == kappa[j]:
                union(i, j)
    return np.array([root(i) for i in range(n)])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming of labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _blobs(seed: int = 0, n_blobs: int = 4, per_blob: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs on distinct directions (FINCH uses cosine similarity)."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(n_blobs, 6)
    truth = np.repeat(np.arange(n_blobs), per_blob)
    return centres[truth] + rng.normal(scale=0.4, size=(truth.size, 6)), truth


def _mirrored_blobs(n_blobs: int = 3, per_blob: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """The same Gaussian blob copied into orthogonal coordinate blocks.

    FINCH merges the clusters of each blob in lockstep, so every blob becomes one cluster in the
    same round, and the next round (3 means) collapses into one cluster and is dropped: the
    coarsest partition must be the blobs. (With independent blobs one blob may finish first and
    be merged into a half of another; that is FINCH, not a bug.)
    """
    block = 4
    cloud = np.random.default_rng(7).normal(scale=0.4, size=(per_blob, block))
    cloud[:, 0] += 10.0
    features = np.zeros((n_blobs * per_blob, n_blobs * block))
    for blob in range(n_blobs):
        rows = slice(blob * per_blob, (blob + 1) * per_blob)
        features[rows, blob * block : (blob + 1) * block] = cloud
    return features, np.repeat(np.arange(n_blobs), per_blob)


def _is_refinement(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """Every cluster of ``fine`` lies inside a single cluster of ``coarse``."""
    pairs = np.unique(np.stack([fine, coarse]), axis=1)
    return pairs.shape[1] == len(np.unique(fine))


def test_partition_zero_equals_naive_connected_components() -> None:
    features = np.random.default_rng(0).normal(size=(120, 5))
    result = finch(features, max_partitions=1, neighbour_method="exact")

    reference = _union_find_labels(_naive_first_neighbours(features))
    assert len(result.partitions) == 1
    assert _same_partition(result.partitions[0], reference)
    assert result.n_clusters[0] == len(set(reference.tolist()))


def test_labels_are_contiguous_and_numbered_by_first_appearance() -> None:
    result = finch(np.random.default_rng(1).normal(size=(200, 4)))
    for labels, count in zip(result.partitions, result.n_clusters):
        assert labels.dtype == np.int64 and labels.shape == (200,)
        _, first = np.unique(labels, return_index=True)
        assert np.array_equal(labels[np.sort(first)], np.arange(count))


def test_hierarchy_is_nested_and_coarsens() -> None:
    features = np.random.default_rng(2).normal(size=(400, 6))
    result = finch(features, neighbour_method="exact")

    assert len(result.partitions) >= 2
    assert all(b < a for a, b in zip(result.n_clusters, result.n_clusters[1:]))
    assert all(count > 1 for count in result.n_clusters)  # the one-cluster round is dropped
    for fine, coarse in zip(result.partitions, result.partitions[1:]):
        assert _is_refinement(fine, coarse)


def test_second_round_clusters_the_means_of_the_first() -> None:
    features = np.random.default_rng(3).normal(size=(150, 5))
    result = finch(features, max_partitions=2, neighbour_method="exact")

    means = cluster_means(features, result.partitions[0], result.n_clusters[0])
    round_one = _union_find_labels(_naive_first_neighbours(means))
    assert _same_partition(result.partitions[1], round_one[result.partitions[0]])


def test_coarsest_partition_recovers_separated_blobs() -> None:
    features, truth = _mirrored_blobs()
    result = finch(features, neighbour_method="exact")

    assert result.n_clusters[-1] == 3
    assert adjusted_rand_score(truth, result.partitions[-1]) > 0.99


def test_first_partition_never_mixes_separated_blobs() -> None:
    features, truth = _blobs(seed=4)
    result = finch(features, neighbour_method="exact")
    assert _is_refinement(result.partitions[0], truth)


def test_approximate_neighbours_agree_with_exact_on_blobs() -> None:
    features, truth = _blobs(seed=5, per_blob=1000)
    approximate = finch(features, max_partitions=2, neighbour_method="approximate")
    exact = finch(features, max_partitions=2, neighbour_method="exact")

    assert _is_refinement(approximate.partitions[0], truth)
    assert adjusted_rand_score(exact.partitions[0], approximate.partitions[0]) > 0.9
    assert adjusted_rand_score(exact.partitions[1], approximate.partitions[1]) > 0.8


def test_max_partitions_and_mini_clusters() -> None:
    features, _ = _blobs()
    full = finch(features, neighbour_method="exact")
    capped = finch(features, max_partitions=2, neighbour_method="exact")

    assert len(capped.partitions) == 2
    assert np.array_equal(capped.partitions[1], full.partitions[1])
    assert np.array_equal(mini_clusters(features, partition_index=1), full.partitions[1])


def test_mini_clusters_falls_back_to_the_last_partition_with_a_warning() -> None:
    features, _ = _blobs()
    full = finch(features)
    monitor = Monitor()
    labels = mini_clusters(features, partition_index=len(full.partitions) + 3, monitor=monitor)

    assert np.array_equal(labels, full.partitions[-1])
    assert len(monitor.warnings) == 1


def test_tiny_inputs() -> None:
    assert finch(np.zeros((0, 3))).partitions == []
    single = finch(np.ones((1, 3)))
    assert single.n_clusters == [1] and single.partitions[0].tolist() == [0]
    pair = finch(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert pair.n_clusters == [1] and pair.partitions[0].tolist() == [0, 0]
    assert mini_clusters(np.array([[1.0, 0.0], [0.0, 1.0]])).tolist() == [0, 0]
    # Identical points form one cluster without any point being its own neighbour.
    twins = finch(np.ones((5, 3)))
    assert twins.n_clusters == [1]


def test_monitor_reports_progress_up_to_one() -> None:
    seen: list[float] = []
    finch(_blobs()[0], monitor=Monitor(on_progress=seen.append))
    assert seen and max(seen) == 1.0 and min(seen) >= 0.0
