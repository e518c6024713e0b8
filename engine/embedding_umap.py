"""2-D views of the graph-labelling embeddings: UMAP of segments and UMAP of chips.

Spec: ../shared/papers/graph-labelling-tool-sentinel2-2025.txt, section 2.8. Segments are
projected from their GNN embeddings; chips from the chip x chip matched similarity, given here as
each chip's nearest chips (engine.chip_similarity.nearest_chips) and fed to umap-learn as a
precomputed kNN graph (distance = 1 - mean matched cosine similarity), so the full n_chips^2
matrix is never needed.

UMAP runs with ``random_state=seed`` (umap-learn then runs single-threaded) and with an initial
layout computed here: umap-learn's spectral initialisation fails on kNN graphs with several small
connected components (common: well separated land-cover types), and its fallback was seen to give
a different layout on every run with the same seed. Segments start from their first two
principal components, chips from classical MDS of the listed distances (seeded uniform draw for
very many chips). Very small inputs (fewer than ``MIN_UMAP_POINTS`` points), where UMAP's graph is
degenerate, are laid out by classical MDS alone.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from engine.monitor import Monitor, run_cancellable, silent

MIN_UMAP_POINTS = 6
DEFAULT_NEIGHBOURS = 15
MISSING_DISTANCE = 2.0  # cosine distance of opposite vectors: "as far as it gets"
MAX_MDS_CHIPS = 3000  # dense eigendecomposition up to this many chips for the initial layout
INIT_EXTENT = 10.0  # umap-learn scales its own initial layouts to this maximum coordinate


@contextlib.contextmanager
def _quiet_umap() -> Iterator[None]:
    """Silence umap-learn's notices and restore torch's thread count afterwards: umap's numba
    threading layer resets the (shared OpenMP) thread count, and a different count changes
    torch's CPU sums in the last bits, so a second fit in the same process could differ."""
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)


class _NoLock:
    """A lock that never blocks, for umap-learn's tqdm bar (it only ever writes to an
    :class:`_EpochWatcher`). tqdm's ``refresh`` takes its class-wide lock and releases it only
    if the display returned; a cancel raised from the watcher leaves it taken, so the next UMAP,
    run in another thread (see ``run_cancellable``), would wait for it forever."""

    def acquire(self, *args, **kwargs) -> bool:
        return True

    def release(self) -> None:
        return None

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _umap_without_tqdm_lock():
    """umap-learn, its layout's tqdm class given a lock that cannot be left taken."""
    import umap
    import umap.layouts

    umap.layouts.tqdm.set_lock(_NoLock())
    return umap


class _EpochWatcher:
    """A file for umap-learn's tqdm progress bar over the layout epochs: every write (one per
    epoch with ``mininterval=0``) reports progress and checks for a cancel, so a cancel stops
    UMAP within an epoch instead of after the whole optimisation. umap-learn has no callback;
    its ``tqdm_kwds`` are the documented way in."""

    def __init__(self, monitor: Monitor, n_epochs: int):
        self.monitor = monitor
        self.n_epochs = max(n_epochs, 1)
        self.writes = 0

    def write(self, _text: str) -> int:
        self.writes += 1
        self.monitor.progress(min(self.writes / self.n_epochs, 1.0))
        return 0

    def flush(self) -> None:
        self.monitor.check()

    def kwds(self) -> dict:
        return {"disable": False, "file": self, "mininterval": 0.0, "miniters": 1,
                "leave": False, "ascii": True}


def _layout_epochs(n: int) -> int:
    """umap-learn's default number of layout epochs (200 for large inputs, 500 for small)."""
    return 200 if n > 10_000 else 500


def _scaled(layout: np.ndarray) -> np.ndarray:
    """Centre and scale an initial layout to +-INIT_EXTENT, as umap-learn does with its own."""
    layout = layout - layout.mean(axis=0)
    extent = np.abs(layout).max()
    return (layout * (INIT_EXTENT / extent) if extent > 0 else layout).astype(np.float32)


def _fixed_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (reproducible axes)."""
    pivots = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def pca_layout(points: np.ndarray) -> np.ndarray:
    """First two principal components (zero-padded), sign-fixed."""
    centred = np.asarray(points, dtype=np.float64) - np.mean(points, axis=0)
    _, values, right = np.linalg.svd(centred, full_matrices=False)
    layout = np.zeros((points.shape[0], 2))
    components = min(2, right.shape[0])
    layout[:, :components] = centred @ right[:components].T
    return _fixed_signs(layout)


def classical_mds(distances: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Torgerson MDS of a symmetric distance matrix; (n, n_components), zero-padded."""
    n = distances.shape[0]
    out = np.zeros((n, n_components), dtype=np.float64)
    if n < 2:
        return out
    centring = np.eye(n) - 1.0 / n
    gram = -0.5 * centring @ (distances**2) @ centring
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:n_components]
    for column, index in enumerate(order):
        out[:, column] = vectors[:, index] * np.sqrt(max(values[index], 0.0))
    return _fixed_signs(out)


def segment_umap(
    embedding: np.ndarray, seed: int = 0, n_neighbours: int = DEFAULT_NEIGHBOURS,
    metric: str = "cosine", monitor: Monitor | None = None,
) -> np.ndarray:
    """(n, 2) float32 UMAP of the segment embeddings."""
    monitor = monitor or silent()
    embedding = np.asarray(embedding, dtype=np.float32)
    n = embedding.shape[0]
    if n < MIN_UMAP_POINTS:
        from sklearn.metrics import pairwise_distances

        return classical_mds(pairwise_distances(embedding, metric=metric)).astype(np.float32)
    init = _scaled(pca_layout(embedding))

    def fit() -> np.ndarray:
        with _quiet_umap():
            umap = _umap_without_tqdm_lock()

            reducer = umap.UMAP(
                n_components=2, n_neighbors=min(n_neighbours, n - 1), metric=metric,
                random_state=seed, n_jobs=1, init=init, n_epochs=_layout_epochs(n),
                tqdm_kwds=_EpochWatcher(monitor, _layout_epochs(n)).kwds(),
            )
            return reducer.fit_transform(embedding)

    # In a thread: importing umap (numba), its nearest-neighbour search and numba's compilation
    # before the first layout epoch never check for a cancel (7.6 s measured).
    return run_cancellable(fit, monitor).astype(np.float32)


def chip_umap(
    neighbours: np.ndarray, similarity: np.ndarray, has_segments: np.ndarray, seed: int = 0,
    monitor: Monitor | None = None,
) -> np.ndarray:
    """(n_chips, 2) float32 UMAP of chips from their nearest-chip lists.

    ``neighbours`` (n_chips, m) chip ids (-1 = padding), ``similarity`` (n_chips, m) matched
    cosine similarity (NaN/any value at padding), ``has_segments`` (n_chips,) bool. Chips without
    segments get NaN rows."""
    monitor = monitor or silent()
    n_chips = neighbours.shape[0]
    out = np.full((n_chips, 2), np.nan, dtype=np.float32)
    present = np.flatnonzero(np.asarray(has_segments, dtype=bool))
    n = present.size
    if n == 0:
        return out
    position = np.full(n_chips, -1, dtype=np.int64)
    position[present] = np.arange(n)
    ids = np.asarray(neighbours, dtype=np.int64)[present]
    safe = np.where(ids >= 0, ids, 0)
    known = (ids >= 0) & (position[safe] >= 0) & np.isfinite(similarity[present])
    local = np.where(known, position[safe], -1)
    distance = np.where(known, np.clip(1.0 - np.nan_to_num(similarity[present]), 0.0, 2.0),
                        MISSING_DISTANCE)

    if n < MIN_UMAP_POINTS or n <= MAX_MDS_CHIPS:
        dense = np.full((n, n), MISSING_DISTANCE)
        np.fill_diagonal(dense, 0.0)
        rows, cols = np.nonzero(known)
        others = local[rows, cols]
        values = distance[rows, cols]
        # Symmetric: a pair listed from either side gets the smaller listed distance.
        np.minimum.at(dense, (rows, others), values)
        np.minimum.at(dense, (others, rows), values)
        mds = classical_mds(dense)
        if n < MIN_UMAP_POINTS:
            out[present] = mds.astype(np.float32)
            return out
        init = _scaled(mds)
    else:
        init = np.random.default_rng(seed).uniform(-INIT_EXTENT, INIT_EXTENT, (n, 2)).astype(
            np.float32)

    # kNN lists as umap-learn expects them: the point itself first at distance 0, then the
    # neighbours by increasing distance, padding (-1) last.
    order = np.argsort(np.where(known, distance, np.inf), axis=1, kind="stable")
    local = np.take_along_axis(local, order, axis=1)
    distance = np.take_along_axis(distance, order, axis=1)
    knn_indices = np.concatenate([np.arange(n)[:, None], local], axis=1)
    knn_dists = np.concatenate([np.zeros((n, 1)), distance], axis=1).astype(np.float32)
    n_neighbours = min(knn_indices.shape[1], n - 1)
    knn_indices = knn_indices[:, :n_neighbours]
    knn_dists = knn_dists[:, :n_neighbours]
    if n_neighbours < 2:
        raise ValueError("Chip UMAP needs at least one neighbour per chip.")
    def fit() -> np.ndarray:
        with _quiet_umap():  # also: no NNDescent search index, so transform() is unavailable
            umap = _umap_without_tqdm_lock()

            reducer = umap.UMAP(
                n_components=2, n_neighbors=n_neighbours, random_state=seed,
                n_jobs=1, precomputed_knn=(knn_indices, knn_dists), init=init,
                n_epochs=_layout_epochs(n),
                tqdm_kwds=_EpochWatcher(monitor, _layout_epochs(n)).kwds(),
            )
            # The data matrix is only a placeholder of the right length (one column): the graph
            # comes from the precomputed kNN lists, the initial layout from ``init``.
            return reducer.fit_transform(np.zeros((n, 1), dtype=np.float32))

    out[present] = run_cancellable(fit, monitor).astype(np.float32)  # see segment_umap
    return out
