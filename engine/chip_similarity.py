"""Chip-level similarity of the graph-labelling pipeline: Hungarian-matched segment embeddings.

The paper compares two chips by matching their segments one-to-one (Hungarian algorithm on the
cosine similarity of the segment embeddings) and averaging the cosine similarity of the matched
pairs; the chip x chip matrix then goes to UMAP. Its reference runs all 194,481 ordered chip pairs
of a 441-chip tile (20 minutes on an RTX 3090). Here:

* the similarity is symmetric, so each unordered pair is solved once;
* UMAP only needs each chip's ``n_neighbours`` most similar chips, so with ``n_candidates`` the
  exact matching is run only on a short list of candidate chips per chip, ranked by a cheap
  proxy of the matched similarity (filter and refine). For unit vectors
  ``cos(a, b) = 1 - |a - b|^2 / 2``, so the matched mean is ``1 - W / 2`` with ``W`` the mean
  squared distance of the optimal one-to-one matching: a (squared) 2-Wasserstein distance
  between the chips' embedding distributions. The proxy is its sliced version: each chip's unit
  embeddings are projected on ``SLICES`` fixed random directions and summarised by ``QUANTILES``
  quantiles per direction; in one dimension the optimal matching pairs sorted values, so the
  squared Euclidean distance between two chips' quantile descriptors approximates the sliced
  ``W``. All chips' descriptors are compared with one matrix product. On land-cover-like
  embeddings it ranks the true neighbours better than the distance between chip mean embeddings
  (the first moment only) and far better than the relaxed matching bound (each segment takes its
  best partner), which is an upper bound but nearly constant across candidates (bench/
  chip_matching.py measures the recall).
  ``n_candidates=None`` runs the exact matching on all pairs.

The assignments run on one thread per core: scipy's ``linear_sum_assignment`` releases the GIL,
so threads share the work without copying the embeddings into other processes.

Chips with different segment counts are matched rectangularly: every segment of the smaller chip
gets a distinct partner in the larger one, and the similarity is the mean over those
``min(n_a, n_b)`` matched pairs (the unmatched surplus segments of the larger chip do not count).
The paper does not say; this keeps the measure in [-1, 1] and equal to 1 for a chip compared with
itself or with any chip that contains all its segments.

Chips without segments have no similarity: their rows are all padding and no chip lists them.
Padding is id -1 with similarity NaN. Zero embedding vectors have cosine 0 with everything.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from scipy.optimize import linear_sum_assignment

from engine.monitor import Monitor, silent

# Sliced-Wasserstein proxy: random directions and quantiles per direction (descriptor of
# SLICES * QUANTILES values per chip); a fixed seed keeps the candidate lists deterministic.
SLICES = 64
QUANTILES = 32
SLICE_SEED = 20250
# Chips ranked per block when the all-pairs proxy is computed (bounds memory to block x n_chips).
PROXY_BLOCK = 1024
# Chips whose cosine matrices with one chip are computed by one product (exact search).
PAIR_GROUP = 32


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero (cosine 0 with everything)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def matched_mean(cosine: np.ndarray) -> float:
    """Mean of the one-to-one matching that maximises the summed cosine (rectangular allowed)."""
    if cosine.size == 0:
        return float("nan")
    cosine = np.asarray(cosine, dtype=np.float64)
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    return float(cosine[rows, cols].mean())


def matched_chip_similarity(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """Similarity of two chips given their segment embeddings ((n_a, E) and (n_b, E)).

    Mean cosine similarity of the Hungarian-matched segment pairs (min(n_a, n_b) pairs when the
    counts differ); NaN when a chip has no segment.
    """
    emb_a = np.atleast_2d(np.asarray(emb_a))
    emb_b = np.atleast_2d(np.asarray(emb_b))
    if emb_a.shape[1] != emb_b.shape[1]:
        raise ValueError(
            f"the two chips' embeddings differ in width: {emb_a.shape[1]} vs {emb_b.shape[1]}"
        )
    if len(emb_a) == 0 or len(emb_b) == 0:
        return float("nan")
    return matched_mean(unit_rows(emb_a) @ unit_rows(emb_b).T)


class _Chips:
    """Unit segment embeddings grouped by chip (contiguous slices of one array)."""

    def __init__(self, segment_embedding: np.ndarray, segment_chip: np.ndarray, n_chips: int):
        order = np.argsort(segment_chip, kind="stable")
        self.vectors = unit_rows(segment_embedding[order])
        counts = np.bincount(segment_chip, minlength=n_chips)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.counts = counts
        self.means = np.zeros((n_chips, segment_embedding.shape[1]), dtype=np.float64)
        np.add.at(self.means, segment_chip[order], self.vectors.astype(np.float64))
        self.means /= np.maximum(counts, 1)[:, None]

    def of(self, chip: int) -> np.ndarray:
        return self.vectors[self.starts[chip]:self.starts[chip + 1]]


def _check_inputs(segment_embedding: np.ndarray, segment_chip: np.ndarray, n_chips: int,
                  n_neighbours: int, n_candidates: int | None) -> tuple[np.ndarray, np.ndarray]:
    embedding = np.asarray(segment_embedding)
    chips = np.asarray(segment_chip)
    if embedding.ndim != 2:
        raise ValueError(f"segment_embedding must be (n_segments, E), got shape {embedding.shape}")
    if chips.shape != (embedding.shape[0],):
        raise ValueError(
            f"segment_chip must hold one chip id per segment: shape {chips.shape} for "
            f"{embedding.shape[0]} segments"
        )
    if not np.issubdtype(chips.dtype, np.integer):
        raise ValueError(f"segment_chip must be integer chip ids, got dtype {chips.dtype}")
    if n_chips < 0 or (chips.size and (chips.min() < 0 or chips.max() >= n_chips)):
        raise ValueError(f"chip ids must lie in 0..n_chips-1 = 0..{n_chips - 1}")
    if not np.isfinite(embedding).all():
        raise ValueError("segment_embedding holds NaN or infinite values")
    if n_neighbours < 1:
        raise ValueError(f"n_neighbours must be at least 1, got {n_neighbours}")
    if n_candidates is not None and n_candidates < n_neighbours:
        raise ValueError(
            f"n_candidates ({n_candidates}) must be at least n_neighbours ({n_neighbours}), "
            "or None for the exact search over all chip pairs"
        )
    return embedding, chips.astype(np.int64)


def sliced_descriptors(chips: _Chips, present: np.ndarray) -> np.ndarray:
    """(n_chips, SLICES * QUANTILES) quantiles of each chip's projected unit embeddings, scaled
    so that squared Euclidean distances approximate the mean squared matching distance."""
    dim = chips.vectors.shape[1]
    directions = np.random.default_rng(SLICE_SEED).normal(size=(SLICES, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # E[(u.x)^2] = |x|^2 / dim for random unit u; scale back so the proxy is on the W scale.
    directions = (directions * np.sqrt(dim / SLICES)).astype(np.float32)
    levels = (np.arange(QUANTILES) + 0.5) / QUANTILES
    descriptors = np.zeros((len(chips.counts), SLICES * QUANTILES), dtype=np.float32)
    for chip in np.flatnonzero(present):
        projected = chips.of(chip) @ directions.T
        descriptors[chip] = np.quantile(projected, levels, axis=0).T.ravel() / np.sqrt(QUANTILES)
    return descriptors


def _proxy_candidates(chips: _Chips, present: np.ndarray, keep: int) -> list[np.ndarray]:
    """Per chip, the ``keep`` other chips nearest by the sliced-Wasserstein proxy."""
    descriptors = sliced_descriptors(chips, present).astype(np.float64)
    squared = np.einsum("ij,ij->i", descriptors, descriptors)
    candidates: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(chips.counts)
    present_ids = np.flatnonzero(present)
    take = min(keep, present_ids.size - 1)
    if take <= 0:
        return candidates
    for start in range(0, present_ids.size, PROXY_BLOCK):
        block = present_ids[start:start + PROXY_BLOCK]
        distance = squared[block, None] + squared[None, present_ids] - 2.0 * (
            descriptors[block] @ descriptors[present_ids].T)
        distance[block[:, None] == present_ids[None, :]] = np.inf
        # Stable ordering (distance, then chip id) keeps the result deterministic under ties.
        ids = np.broadcast_to(present_ids, distance.shape)
        order = np.lexsort((ids, distance), axis=1)
        for row, chip in enumerate(block):
            candidates[chip] = present_ids[order[row, :take]]
    return candidates


def _top(similarity: dict[int, float], n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter(similarity.keys(), dtype=np.int64, count=len(similarity))
    values = np.fromiter(similarity.values(), dtype=np.float64, count=len(similarity))
    order = np.lexsort((ids, -values))[:n_neighbours]  # most similar first, ties by chip id
    return ids[order], values[order]


def _pair_groups(present_ids: np.ndarray, partners: list[np.ndarray],
                 group_size: int) -> list[tuple[int, np.ndarray]]:
    """(chip, partner chips) work items: every unordered pair once, at most ``group_size``
    partners per item (one matrix product each, so memory stays bounded)."""
    seen: set[tuple[int, int]] = set()
    groups: list[tuple[int, np.ndarray]] = []
    for a in present_ids:
        todo = []
        for b in partners[int(a)]:
            pair = (min(int(a), int(b)), max(int(a), int(b)))
            if pair not in seen:
                seen.add(pair)
                todo.append(int(b))
        for start in range(0, len(todo), group_size):
            groups.append((int(a), np.asarray(todo[start:start + group_size], dtype=np.int64)))
    return groups


def default_workers() -> int:
    """Threads for the matching: one per usable core (scipy's assignment releases the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def nearest_chips(
    segment_embedding: np.ndarray,
    segment_chip: np.ndarray,
    n_chips: int,
    n_neighbours: int = 15,
    n_candidates: int | None = None,
    monitor: Monitor | None = None,
    n_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each chip's most similar chips by Hungarian-matched segment embeddings.

    Returns ``(neighbours, similarity)``, both ``(n_chips, n_neighbours)``: int64 chip ids, most
    similar first (ties by chip id), the chip itself excluded, -1 where there are fewer other
    chips with segments; float32 matched mean cosine similarity, NaN at the padding.

    ``n_candidates=None`` matches every pair of chips exactly. An integer runs the exact matching
    only on that many candidates per chip, ranked by a sliced-Wasserstein proxy (module doc);
    the pairs are solved once for both chips, so a chip may also receive exact values from
    chips that listed it. ``n_candidates >= n_chips - 1`` is the exact search.

    The pairs are solved on ``n_workers`` threads (default: one per core). Each pair's value
    does not depend on the order of work, so the result is the same for any number of workers.
    """
    monitor = monitor or silent()
    embedding, chip_of = _check_inputs(segment_embedding, segment_chip, n_chips, n_neighbours,
                                       n_candidates)
    neighbours = np.full((n_chips, n_neighbours), -1, dtype=np.int64)
    similarity_out = np.full((n_chips, n_neighbours), np.nan, dtype=np.float32)
    if n_chips == 0:
        return neighbours, similarity_out
    chips = _Chips(embedding, chip_of, n_chips)
    present = chips.counts > 0
    present_ids = np.flatnonzero(present)
    exact: list[dict[int, float]] = [{} for _ in range(n_chips)]

    if n_candidates is None or n_candidates >= present_ids.size - 1:
        partners = [np.empty(0, dtype=np.int64)] * n_chips
        for index, a in enumerate(present_ids):
            partners[int(a)] = present_ids[index + 1:]
        start = 0.0
    else:
        partners = _proxy_candidates(chips, present, n_candidates)
        start = 0.02
    monitor.progress(start)
    groups = _pair_groups(present_ids, partners, PAIR_GROUP)

    def solve(a: int, group: np.ndarray) -> list[float]:
        """Matched means of chip ``a`` with each chip of ``group`` (one product, then one
        assignment per pair); runs on a worker thread."""
        block = chips.of(a) @ np.concatenate([chips.of(b) for b in group]).T
        bounds = np.concatenate([[0], np.cumsum(chips.counts[group])])
        return [matched_mean(block[:, bounds[i]:bounds[i + 1]]) for i in range(group.size)]

    total = sum(group.size for _, group in groups)
    done = 0
    workers = max(1, n_workers or default_workers())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(solve, a, group): (a, group) for a, group in groups}
        try:
            for future in as_completed(futures):
                a, group = futures[future]
                for b, value in zip(group, future.result()):
                    exact[a][int(b)] = value
                    exact[int(b)][a] = value
                done += group.size
                monitor.progress(start + (1.0 - start) * done / max(total, 1))
        except BaseException:
            # A cancel (or an error) drops the queued items; only those running finish.
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    for a in present_ids:
        if exact[a]:
            ids, values = _top(exact[a], n_neighbours)
            neighbours[a, :ids.size] = ids
            similarity_out[a, :ids.size] = values
    if total == 0:
        monitor.progress(1.0)
    return neighbours, similarity_out
