"""First (nearest) neighbour of every row under cosine similarity, with a pluggable backend.

FINCH needs, for each point, the single most similar *other* point. Two backends:

* ``"exact"``: blocked brute force with a torch matmul. Memory is O(block * n), never n x n; time
  is O(n^2 d), so it is only used up to ``exact_max_points`` rows.
* ``"approximate"``: an HNSW graph (hnswlib, inner-product space on L2-normalised rows). Memory is
  O(n (d + M)). See :data:`HNSW_M`, :data:`HNSW_EF_CONSTRUCTION`, :data:`HNSW_EF_SEARCH` for the
  recall that was measured with these settings.
* ``"auto"``: exact when ``n <= exact_max_points``, approximate above.

Conventions shared by both backends (so FINCH behaves the same whichever one runs):

* rows are L2-normalised here (zero rows stay zero), so cosine similarity = inner product;
* exact duplicates (identical rows after normalisation) are collapsed before the search: a point
  that has an identical twin gets that twin as its neighbour (the first other member of its
  group, in row order), never itself. Collapsing also protects HNSW, whose graph degrades when
  many points sit at distance zero;
* ties are broken towards the lowest row index (exact backend; the approximate one returns
  whichever tied point the graph reaches first);
* ``n == 1``: there is no other row, the result is ``[-1]``; ``n == 0`` gives an empty array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .monitor import Monitor

# HNSW settings, measured here (2 shared cores) with bench/finch_scale.py's synthetic scene.
# Recall@1 = share of rows whose returned neighbour is as similar (within 1e-6) as the exact one:
#   50k Gaussian points, 16-d: 1.0000 (approximate 3.9 s vs exact 11.6 s)
#   50k patch features (250 x 200 crop), 64-d: 0.9997 (2.2 s vs 14.5 s); 300-d: 1.0000 (4.1 s
#   vs 21.3 s)
#   880,710 patch features, 300-d, 1000 random queries checked against all rows: 1.0000
# Shuffled insertion is what makes this work (see _hnsw_first_neighbours). ef_construction is
# the knob that matters (on a 100k crop, 64-d: 40 -> 0.979, 100 -> 0.996); ef barely does, as
# the query starts next to its own row. M=16 costs ~130 bytes of graph per point.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
HNSW_EF_SEARCH = 32
# ef for the few queries that did not reach their own row with HNSW_EF_SEARCH.
HNSW_EF_RETRY = 256
HNSW_THREADS = 2
# Below this many distinct rows the exact search is cheaper than building a graph, and exact.
APPROXIMATE_MIN_POINTS = 1024
# Rows added to / queried from the HNSW index between two progress reports.
HNSW_CHUNK = 20_000
# Similarity entries (query block x n) materialised at once by the exact backend (~128 MB).
EXACT_BLOCK_ENTRIES = 2**25
# Rows per chunk when hashing / measuring norms (bounds temporaries to ~chunk x d x 8 bytes).
HASH_CHUNK = 16_384

METHODS = ("auto", "exact", "approximate")


@dataclass
class _DistinctRows:
    """Rows with exact duplicates collapsed, in order of first appearance."""

    rows: np.ndarray  # (m, d) float32, L2-normalised, distinct
    first_index: np.ndarray  # (m,) int64: original index of each distinct row's first occurrence
    group: np.ndarray  # (n,) int64: distinct row of each original row


def first_neighbours(
    features: np.ndarray,
    method: str = "auto",
    monitor: Monitor | None = None,
    seed: int = 0,
    exact_max_points: int = 50_000,
) -> np.ndarray:
    """Index of each row's most cosine-similar other row (int64, shape (n,)).

    ``features`` is (n, d); rows need not be normalised. See the module docstring for duplicates,
    ties and the ``n == 1`` convention (``-1``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown neighbour method {method!r}; expected one of {METHODS}")
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {features.shape}")
    n = features.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if n == 1:
        return np.full(1, -1, dtype=np.int64)
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or infinite values")

    distinct = _collapse_duplicates(_normalised_rows(features))
    m = distinct.rows.shape[0]
    if m == 1:
        distinct_neighbour = np.full(1, -1, dtype=np.int64)
    else:
        use_exact = method == "exact" or (method == "auto" and n <= exact_max_points)
        if use_exact or m <= APPROXIMATE_MIN_POINTS:
            distinct_neighbour = _exact_first_neighbours(distinct.rows, monitor)
        else:
            distinct_neighbour = _hnsw_first_neighbours(distinct.rows, seed, monitor)
    return _expand_to_rows(distinct, distinct_neighbour)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-length rows; all-zero rows stay zero."""
    rows = np.array(features, dtype=np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    np.divide(rows, norms, out=rows, where=norms > 0)
    # Adding +0.0 turns -0.0 into +0.0 so byte-wise duplicate detection sees equal values as equal.
    rows += np.float32(0.0)
    return rows


def _normalised_rows(features: np.ndarray) -> np.ndarray:
    """Unit rows as float32; the input itself (no copy) when it already is (patch features are).

    Avoiding the copy matters at scale: 880k x 300 float32 is 1 GB per copy.
    """
    if features.dtype == np.float32 and features.flags.c_contiguous:
        norms = np.empty(features.shape[0], dtype=np.float32)
        for start in range(0, features.shape[0], HASH_CHUNK):
            norms[start : start + HASH_CHUNK] = np.linalg.norm(
                features[start : start + HASH_CHUNK], axis=1
            )
        if np.all((np.abs(norms - 1) < 1e-4) | (norms == 0)):
            return features
    return l2_normalise(features)


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """64-bit hash of each row's bytes (random odd multipliers, wrapping sum), chunked."""
    words = rows.view(np.uint32)
    multipliers = np.random.default_rng(0x5EED).integers(
        1, 2**63, size=words.shape[1], dtype=np.uint64
    ) | np.uint64(1)
    hashes = np.empty(rows.shape[0], dtype=np.uint64)
    for start in range(0, rows.shape[0], HASH_CHUNK):
        chunk = words[start : start + HASH_CHUNK].astype(np.uint64)
        hashes[start : start + HASH_CHUNK] = (chunk * multipliers).sum(axis=1)  # wraps mod 2**64
    return hashes


def _collapse_duplicates(rows: np.ndarray) -> _DistinctRows:
    """Group identical rows without sorting (or copying) the whole matrix.

    Rows are bucketed by a 64-bit hash; only rows whose hash occurs more than once (duplicates,
    or the rare collision) are compared byte-wise. Distinct rows keep their order of first
    appearance, so tie-breaking towards the lowest distinct index also means towards the lowest
    original row index.
    """
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    hashes = _row_hashes(rows)
    _, hash_group, hash_count = np.unique(hashes, return_inverse=True, return_counts=True)
    suspects = np.flatnonzero(hash_count[hash_group.ravel()] > 1)
    if suspects.size == 0:
        return _DistinctRows(
            rows=rows, first_index=np.arange(n, dtype=np.int64), group=np.arange(n, dtype=np.int64)
        )

    # Exact grouping of the suspects: byte-wise unique over their rows only.
    suspect_rows = rows[suspects]
    as_bytes = suspect_rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))
    _, suspect_first, suspect_group = np.unique(
        as_bytes.ravel(), return_index=True, return_inverse=True
    )
    representative = np.arange(n, dtype=np.int64)  # lowest row index holding the same bytes
    representative[suspects] = suspects[suspect_first][suspect_group.ravel()]
    first_index = np.flatnonzero(representative == np.arange(n))
    rank = np.full(n, -1, dtype=np.int64)
    rank[first_index] = np.arange(first_index.size)
    return _DistinctRows(
        rows=rows[first_index], first_index=first_index, group=rank[representative]
    )


def _expand_to_rows(distinct: _DistinctRows, distinct_neighbour: np.ndarray) -> np.ndarray:
    """Map neighbours of distinct rows back to original rows; twins point at each other."""
    n = distinct.group.shape[0]
    group_size = np.bincount(distinct.group, minlength=distinct.first_index.size)
    neighbour = distinct.first_index[np.maximum(distinct_neighbour, 0)][distinct.group]

    has_twin = group_size[distinct.group] > 1
    if np.any(has_twin):
        # The first member of a group points at the group's second member, every other member
        # at the first one: an identical row, never the row itself.
        order = np.argsort(distinct.group, kind="stable")
        starts = np.concatenate(([0], np.cumsum(group_size)[:-1]))
        second_member = np.full(group_size.size, -1, dtype=np.int64)
        multi = group_size > 1
        second_member[multi] = order[starts[multi] + 1]
        first_member = distinct.first_index[distinct.group]
        is_first = first_member == np.arange(n)
        twin = np.where(is_first, second_member[distinct.group], first_member)
        neighbour = np.where(has_twin, twin, neighbour)
    return neighbour.astype(np.int64)


def _exact_first_neighbours(rows: np.ndarray, monitor: Monitor | None) -> np.ndarray:
    """Blocked brute force: (block x n) similarities at a time, self masked out."""
    n = rows.shape[0]
    block = max(1, min(n, EXACT_BLOCK_ENTRIES // n))
    data = torch.from_numpy(rows)
    neighbour = np.empty(n, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, block):
            stop = min(start + block, n)
            similarity = data[start:stop] @ data.T
            local = torch.arange(stop - start)
            similarity[local, local + start] = -torch.inf
            # torch.argmax returns the first maximal index: ties go to the lowest row.
            neighbour[start:stop] = torch.argmax(similarity, dim=1).numpy()
            if monitor is not None:
                monitor.progress(stop / n)
    return neighbour


def _hnsw_first_neighbours(rows: np.ndarray, seed: int, monitor: Monitor | None) -> np.ndarray:
    """HNSW (hnswlib) over distinct, normalised rows; the build takes ~80 % of the time.

    Rows are inserted in a seeded random order: inserted in raster order, spatially smooth patch
    features build a graph in which ~6 % of the points cannot even find themselves (recall@1
    0.93 whatever ``ef``); shuffled, recall@1 is 0.996 (100k patch features, 64-d, M=16,
    ef_construction=100, ef=32). Queries that still do not return their own row (lost in the
    graph) are searched again with a much larger ``ef``.

    With ``HNSW_THREADS > 1`` rows are inserted in parallel, so the graph (and, for a few
    near-tied points, the returned neighbour) can differ between runs despite the fixed seed.
    """
    import hnswlib  # imported here: only the approximate backend needs it

    n, dim = rows.shape
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(
        max_elements=n, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=seed
    )
    insertion_order = np.random.default_rng(seed).permutation(n)
    build_share = 0.8
    for start in range(0, n, HNSW_CHUNK):
        batch = insertion_order[start : start + HNSW_CHUNK]
        index.add_items(rows[batch], batch, num_threads=HNSW_THREADS)
        if monitor is not None:
            monitor.progress(build_share * min(start + HNSW_CHUNK, n) / n)

    neighbour = np.empty(n, dtype=np.int64)
    lost: list[np.ndarray] = []
    index.set_ef(max(HNSW_EF_SEARCH, 2))
    for start in range(0, n, HNSW_CHUNK):
        stop = min(start + HNSW_CHUNK, n)
        neighbour[start:stop], found_self = _query_others(index, rows, np.arange(start, stop))
        lost.append(np.arange(start, stop)[~found_self])
        if monitor is not None:
            monitor.progress(build_share + (1 - build_share) * 0.9 * stop / n)

    lost_rows = np.concatenate(lost)
    if lost_rows.size:
        index.set_ef(max(HNSW_EF_RETRY, 2))
        neighbour[lost_rows], _ = _query_others(index, rows, lost_rows)
    if monitor is not None:
        monitor.progress(1.0)
    return neighbour


def _query_others(index, rows: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest other row of ``rows[which]`` and whether the search reached the row itself."""
    labels, _ = index.knn_query(rows[which], k=2, num_threads=HNSW_THREADS)
    labels = labels.astype(np.int64)
    # Normally the row itself comes first (similarity 1, or tied with a twin-free neighbour).
    is_self = labels == which[:, None]
    neighbour = np.where(is_self[:, 0], labels[:, 1], labels[:, 0])
    return neighbour, is_self.any(axis=1)
