"""FINCH: parameter-free hierarchical clustering by first-neighbour relations.

Each round links every point to its first (most cosine-similar) neighbour ``kappa_i``; the
adjacency ``A(i, j) = 1`` if ``j = kappa_i`` or ``kappa_j = i`` or ``kappa_i = kappa_j`` is
symmetric, and its connected components are the round's clusters. The ``kappa_i = kappa_j`` case
adds no connectivity (``i`` and ``j`` are both linked to ``kappa_i`` already), so the components
of the n edges ``i -- kappa_i`` are exactly those of ``A``; that keeps every round O(n) in memory.

The next round clusters the *means of the original features* over each current cluster (cosine:
the neighbour search re-normalises them), and its labels are mapped back to the input points.

As in the original FINCH, a round that produces a single cluster or merges nothing ends the
hierarchy and is *not* kept as a partition (a one-cluster partition says nothing), unless it is
the very first round (e.g. two input points), so that at least one partition always exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .monitor import Monitor
from .neighbours import first_neighbours


@dataclass
class FinchResult:
    """FINCH hierarchy, finest first. Labels are 0..c-1, numbered by first appearance."""

    partitions: list[np.ndarray]  # each (n,) int64 over the input points
    n_clusters: list[int]
    # Per kept round, the first neighbour of each item clustered in that round (points for
    # round 0, the previous round's clusters afterwards); -1 for a lone item.
    neighbours: list[np.ndarray] = field(default_factory=list)


def finch(
    features: np.ndarray,
    max_partitions: int | None = None,
    neighbour_method: str = "auto",
    monitor: Monitor | None = None,
    seed: int = 0,
    exact_max_points: int = 50_000,
) -> FinchResult:
    """Cluster the rows of ``features`` (n, d) with FINCH under cosine similarity."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {features.shape}")
    if max_partitions is not None and max_partitions < 1:
        raise ValueError(f"max_partitions must be >= 1 or None, got {max_partitions}")
    n = features.shape[0]
    if n == 0:
        return FinchResult(partitions=[], n_clusters=[], neighbours=[])

    result = FinchResult(partitions=[], n_clusters=[], neighbours=[])
    point_labels = np.zeros(n, dtype=np.int64)  # before round 0 every point is its own item
    items = features
    round_index = 0
    while True:
        round_monitor = _round_monitor(monitor, round_index, max_partitions)
        kappa = first_neighbours(
            items, neighbour_method, round_monitor, seed=seed, exact_max_points=exact_max_points
        )
        item_labels, n_clusters = first_neighbour_components(kappa)
        labels = item_labels if round_index == 0 else item_labels[point_labels]

        previous = result.n_clusters[-1] if result.n_clusters else n
        merged_nothing = n_clusters >= previous and round_index > 0
        if round_index > 0 and (n_clusters == 1 or merged_nothing):
            break
        result.partitions.append(labels)
        result.n_clusters.append(n_clusters)
        result.neighbours.append(kappa)
        if monitor is not None:
            monitor.info(f"FINCH partition {round_index}: {n_clusters} clusters")
        if n_clusters == 1 or (max_partitions is not None and round_index + 1 >= max_partitions):
            break
        point_labels = labels
        items = cluster_means(features, labels, n_clusters)
        round_index += 1
    if monitor is not None:
        monitor.progress(1.0)
    return result


def mini_clusters(
    features: np.ndarray,
    partition_index: int = 1,
    neighbour_method: str = "auto",
    monitor: Monitor | None = None,
    seed: int = 0,
    exact_max_points: int = 50_000,
) -> np.ndarray:
    """Labels (n,) of FINCH partition ``partition_index`` (SCDSC uses 1).

    If the hierarchy stops earlier, the last (coarsest) available partition is returned and a
    warning goes to ``monitor``.
    """
    if partition_index < 0:
        raise ValueError(f"partition_index must be >= 0, got {partition_index}")
    result = finch(
        features,
        max_partitions=partition_index + 1,
        neighbour_method=neighbour_method,
        monitor=monitor,
        seed=seed,
        exact_max_points=exact_max_points,
    )
    if not result.partitions:
        return np.zeros(0, dtype=np.int64)
    if partition_index >= len(result.partitions):
        fallback = len(result.partitions) - 1
        if monitor is not None:
            monitor.warn(
                f"FINCH produced only {len(result.partitions)} partition(s); using partition "
                f"{fallback} ({result.n_clusters[fallback]} clusters) instead of "
                f"{partition_index}"
            )
        return result.partitions[fallback]
    return result.partitions[partition_index]


def first_neighbour_components(kappa: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of the graph with edges ``i -- kappa[i]`` (``-1`` = no edge)."""
    n = kappa.shape[0]
    has_edge = kappa >= 0
    sources = np.flatnonzero(has_edge)
    graph = sp.coo_matrix(
        (np.ones(sources.size, dtype=np.int8), (sources, kappa[has_edge])), shape=(n, n)
    ).tocsr()
    n_components, labels = connected_components(graph, directed=True, connection="weak")
    return relabel_by_first_appearance(labels), int(n_components)


def relabel_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..c-1 in order of first occurrence (deterministic, input-independent)."""
    unique, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(unique.size, dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(unique.size)
    return rank[inverse.ravel()]


def cluster_means(features: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """(n_clusters, d) mean of the original feature rows of each cluster (sparse one-hot sum)."""
    n = labels.shape[0]
    dtype = np.float64 if features.dtype == np.float64 else np.float32
    membership = sp.csr_matrix(
        (np.ones(n, dtype=dtype), (labels, np.arange(n))), shape=(n_clusters, n)
    )
    sums = membership @ np.asarray(features, dtype=dtype)
    counts = np.bincount(labels, minlength=n_clusters).astype(dtype)
    return sums / counts[:, None]


def _round_monitor(
    monitor: Monitor | None, round_index: int, max_partitions: int | None
) -> Monitor | None:
    """Round 0 (all points) dominates the cost; later rounds share the rest of the bar."""
    if monitor is None:
        return None
    if max_partitions == 1:
        return monitor.stage(0.0, 1.0)
    if round_index == 0:
        return monitor.stage(0.0, 0.75)
    later = 0.25 / (max_partitions - 1 if max_partitions else 4)
    start = min(0.75 + later * (round_index - 1), 0.99)
    return monitor.stage(start, min(start + later, 1.0))
