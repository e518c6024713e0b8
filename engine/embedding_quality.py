"""Evaluation measures of a segment embedding (graph-labelling paper, section 2.9 / 3.3-3.5).

Feature-based: for each segment A, its nearest segment B in embedding space (cosine similarity,
the measure the pipeline compares embeddings with; the segment itself excluded); the measures
are computed between A and B and averaged over the segments.

Context-aware: A's 8 spatially nearest segments (by centroid, over the whole image, as the
pipeline's graph edges) and B's 8 are matched one-to-one with the Hungarian algorithm on the
cosine similarity of their embeddings (maximised); with the pair (A, B) that gives 9 pairs, whose
measures are averaged, then averaged over the segments.

Measures between two segments (the paper computes SSIM and SAM "purely on the content within
the segment" and does not say how two irregular segments of different shapes are aligned; the
choices here are):

* SAM: spectral angle (radians) between the two segments' mean spectra over all bands.
* SSIM: each segment's bounding box is cut from the cube; pixels of the box outside the segment
  (other segments, nodata) are set to the segment's mean spectrum, so only the segment's content
  carries structure; the box is resized (bilinear, anti-aliased) to ``patch_size`` x
  ``patch_size``. SSIM is Wang et al. (2004) as scikit-image computes it by default (7 x 7
  uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the window positions that
  fit the patch), per band with the band's range over the segmented pixels as data range, then
  averaged over the bands. The default 16 x 16 is about the size of the paper's segments
  (~11 x 11 pixels) and leaves 10 x 10 window positions.

The paper's GLCM and LBP texture measures are not computed.

Purity of segment clusters against sparse labels: each labelled pixel inside a segment takes its
segment's cluster; purity = sum over clusters of the count of the cluster's majority class /
labelled pixels counted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import find_objects
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from skimage.transform import resize

from engine.graph_result import GraphLabellingResult

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
N_CONTEXT = 8
PAIR_CHUNK = 2048  # SSIM pairs per vectorised step (bounds memory)
QUERY_CHUNK = 1024  # query segments per nearest-neighbour step


@dataclass(frozen=True)
class EmbeddingQuality:
    """Figures of one embedding (means over the evaluated segments)."""

    n_segments: int
    n_evaluated: int  # query segments (all, or a seeded sample)
    metric: str  # embedding-space similarity used to find each segment's nearest segment
    feature_ssim: float
    feature_sam: float  # radians
    context_ssim: float
    context_sam: float  # radians
    purity_fcm: float  # segment_fcm_cluster vs labels (NaN without labels)
    purity_kmeans: float  # k-means (k = number of FCM clusters) on the embedding vs labels
    n_labelled_pixels: int
    patch_size: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def spectral_angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (radians) between spectra, row by row ((..., B) arrays): 0 for parallel spectra,
    pi/2 for orthogonal ones; two zero spectra count as identical (0), one zero spectrum as
    orthogonal to anything."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norm_a = np.linalg.norm(a, axis=-1)
    norm_b = np.linalg.norm(b, axis=-1)
    denominator = norm_a * norm_b
    cosine = np.divide((a * b).sum(axis=-1), denominator,
                       out=np.zeros(np.broadcast(norm_a, norm_b).shape),
                       where=denominator > 0)
    angle = np.arccos(np.clip(cosine, -1.0, 1.0))
    return np.where((norm_a == 0) & (norm_b == 0), 0.0, angle)


def segment_mean_spectra(cube: np.ndarray, segment_ids: np.ndarray, n_segments: int
                         ) -> np.ndarray:
    """(n_segments, B) mean spectrum of each segment; ``cube`` is (H, W, B)."""
    inside = segment_ids >= 0
    ids = segment_ids[inside]
    counts = np.bincount(ids, minlength=n_segments).astype(np.float64)
    pixels = cube[inside].astype(np.float64)
    sums = np.stack([np.bincount(ids, weights=pixels[:, band], minlength=n_segments)
                     for band in range(pixels.shape[1])], axis=1)
    return sums / np.maximum(counts, 1.0)[:, None]


def segment_patches(cube: np.ndarray, segment_ids: np.ndarray, segments: np.ndarray,
                    means: np.ndarray, patch_size: int) -> np.ndarray:
    """(len(segments), B, patch_size, patch_size) float32 bounding-box patches of the given
    segments, outside pixels set to the segment's mean, resized (see the module doc)."""
    boxes = find_objects(segment_ids + 1)  # label 0 (= id -1) is ignored by find_objects
    patches = np.empty((len(segments), cube.shape[2], patch_size, patch_size), dtype=np.float32)
    for row, segment in enumerate(segments):
        box = boxes[segment] if segment < len(boxes) else None
        if box is None:  # a segment without pixels: a flat patch of its (zero) mean
            patches[row] = means[segment][:, None, None]
            continue
        content = cube[box].astype(np.float32)
        content[segment_ids[box] != segment] = means[segment]
        patches[row] = np.moveaxis(
            resize(content, (patch_size, patch_size), order=1, mode="edge",
                   anti_aliasing=True, preserve_range=True), -1, 0)
    return patches


def _window_means(values: np.ndarray) -> np.ndarray:
    """Means of every SSIM_WINDOW x SSIM_WINDOW window that fits inside the last two axes
    (integral image), i.e. scikit-image's uniform filter after its border crop."""
    w = SSIM_WINDOW
    total = np.zeros(values.shape[:-2] + (values.shape[-2] + 1, values.shape[-1] + 1))
    total[..., 1:, 1:] = np.cumsum(np.cumsum(values, axis=-1, dtype=np.float64), axis=-2)
    return (total[..., w:, w:] - total[..., :-w, w:] - total[..., w:, :-w]
            + total[..., :-w, :-w]) / (w * w)


def _ssim_from_moments(mean_x: np.ndarray, square_x: np.ndarray, mean_y: np.ndarray,
                       square_y: np.ndarray, product: np.ndarray, data_range: np.ndarray
                       ) -> np.ndarray:
    samples = SSIM_WINDOW * SSIM_WINDOW
    unbias = samples / (samples - 1.0)  # sample covariance, as scikit-image's default
    var_x = unbias * (square_x - mean_x * mean_x)
    var_y = unbias * (square_y - mean_y * mean_y)
    cov = unbias * (product - mean_x * mean_y)
    data_range = np.asarray(data_range, dtype=np.float64)[None, :, None, None]
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(axis=(2, 3)).mean(axis=1)


def _check_patch_size(size: int) -> None:
    if size < SSIM_WINDOW:
        raise ValueError(f"patches of {size} pixels are smaller than the {SSIM_WINDOW}-pixel "
                         "SSIM window; use a larger patch_size")


def ssim_pairs(patches_a: np.ndarray, patches_b: np.ndarray, data_range: np.ndarray
               ) -> np.ndarray:
    """SSIM of each pair of (N, B, S, S) patches, averaged over bands -> (N,).

    Same numbers as ``skimage.metrics.structural_similarity(a, b, data_range=r,
    channel_axis=0)`` with one data range per band (``data_range`` of shape (B,))."""
    x = np.asarray(patches_a, dtype=np.float64)
    y = np.asarray(patches_b, dtype=np.float64)
    _check_patch_size(x.shape[-1])
    return _ssim_from_moments(_window_means(x), _window_means(x * x), _window_means(y),
                              _window_means(y * y), _window_means(x * y), data_range)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def nearest_in_embedding(embedding: np.ndarray, queries: np.ndarray, metric: str = "cosine"
                         ) -> np.ndarray:
    """Index of each query segment's nearest other segment in embedding space (exact; ties to
    the lowest index). ``metric`` is "cosine" (paper's similarity) or "euclidean"."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if embedding.shape[0] < 2:
        raise ValueError("need at least two segments to find nearest segments")
    vectors = _unit(embedding) if metric == "cosine" else np.asarray(embedding, np.float32)
    squared = np.einsum("ij,ij->i", vectors, vectors)
    nearest = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        block = queries[start:start + QUERY_CHUNK]
        score = vectors[block] @ vectors.T  # larger = nearer
        if metric == "euclidean":
            score = 2.0 * score - squared[None, :]  # -|q - x|^2 + |q|^2
        score[np.arange(len(block)), block] = -np.inf
        nearest[start:start + len(block)] = score.argmax(axis=1)
    return nearest


def spatial_neighbours(centroid_rc: np.ndarray, k: int = N_CONTEXT) -> np.ndarray:
    """(n, k) int64 ids of each segment's k nearest other segments by centroid; -1 padding
    when there are fewer than k other segments. Ties follow the KD-tree (deterministic)."""
    n = centroid_rc.shape[0]
    found = np.full((n, k), -1, dtype=np.int64)
    take = min(k + 1, n)
    if take < 2:
        return found
    _, near = cKDTree(centroid_rc).query(centroid_rc, k=take)
    near = np.asarray(near, dtype=np.int64).reshape(n, take)
    for row in range(n):
        others = near[row][near[row] != row][:k]
        found[row, :others.size] = others
    return found


def context_pairs(queries: np.ndarray, nearest: np.ndarray, neighbours: np.ndarray,
                  embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The context-aware pairs: for query a with nearest b, (a, b) and the Hungarian matching
    (maximum summed cosine of embeddings) of a's spatial neighbours to b's.

    Returns (owner, left, right): ``owner[i]`` is the position in ``queries`` the pair belongs
    to, ``left``/``right`` the two segment ids. Padding (-1) neighbours are left out, so a
    query has 1 + min(#neighbours of a, #neighbours of b) pairs.
    """
    vectors = _unit(embedding)
    owner, left, right = [], [], []
    for position, (a, b) in enumerate(zip(queries, nearest)):
        owner.append(position)
        left.append(a)
        right.append(b)
        around_a = neighbours[a][neighbours[a] >= 0]
        around_b = neighbours[b][neighbours[b] >= 0]
        if around_a.size == 0 or around_b.size == 0:
            continue
        rows, cols = linear_sum_assignment(vectors[around_a] @ vectors[around_b].T,
                                           maximize=True)
        owner.extend([position] * rows.size)
        left.extend(around_a[rows])
        right.extend(around_b[cols])
    return (np.asarray(owner, dtype=np.int64), np.asarray(left, dtype=np.int64),
            np.asarray(right, dtype=np.int64))


def purity(segment_cluster: np.ndarray, segment_ids: np.ndarray, labels: np.ndarray
           ) -> tuple[float, int]:
    """(purity, labelled pixels counted) of per-segment clusters against a label raster
    (0 = no label) on the segment grid; NaN when no labelled pixel lies in a segment."""
    if labels.shape != segment_ids.shape:
        raise ValueError(f"labels {labels.shape} and segment_ids {segment_ids.shape} differ in "
                         "shape; the label raster must be on the cube's grid")
    counted = (segment_ids >= 0) & (labels > 0)
    n = int(counted.sum())
    if n == 0:
        return float("nan"), 0
    clusters = np.asarray(segment_cluster)[segment_ids[counted]]
    _, cluster_index = np.unique(clusters, return_inverse=True)
    classes, class_index = np.unique(labels[counted], return_inverse=True)
    table = np.bincount(cluster_index.ravel() * classes.size + class_index.ravel(),
                        minlength=(cluster_index.max() + 1) * classes.size)
    table = table.reshape(-1, classes.size)
    return float(table.max(axis=1).sum() / n), n


def _band_ranges(cube: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    pixels = cube[segment_ids >= 0]
    spread = pixels.max(axis=0).astype(np.float64) - pixels.min(axis=0)
    return np.where(spread > 0, spread, 1.0)


def _mean_per_owner(values: np.ndarray, owner: np.ndarray, n_owners: int) -> np.ndarray:
    sums = np.bincount(owner, weights=values, minlength=n_owners)
    return sums / np.bincount(owner, minlength=n_owners)


def evaluate_embedding(
    result: GraphLabellingResult,
    cube: np.ndarray,
    embedding: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    sample: int | None = None,
    seed: int = 0,
    metric: str = "cosine",
    patch_size: int = 16,
    n_context: int = N_CONTEXT,
) -> EmbeddingQuality:
    """The paper's feature-based and context-aware SSIM / SAM, and cluster purity.

    ``cube`` is (H, W, B) as engine.raster_io.read_raster returns it, on the grid of
    ``result.segment_ids``. ``embedding`` defaults to ``result.segment_embedding`` (pass
    ``result.segment_features`` for the raw CNN-feature ablation). ``labels`` (H, W), 0 = no
    label, gives the purities (NaN without). ``sample`` evaluates that many query segments drawn
    with ``seed`` (None = all segments); nearest segments are searched among all segments.
    """
    started = time.perf_counter()
    cube = np.asarray(cube)
    segment_ids = np.asarray(result.segment_ids)
    if cube.ndim != 3 or cube.shape[:2] != segment_ids.shape:
        hint = (" (it looks like (bands, H, W): use np.moveaxis(cube, 0, -1))"
                if cube.ndim == 3 and cube.shape[1:] == segment_ids.shape else "")
        raise ValueError(f"cube must be (H, W, B) on the segments' grid {segment_ids.shape}, "
                         f"got {cube.shape}{hint}")
    n_segments = result.n_segments
    embedding = result.segment_embedding if embedding is None else np.asarray(embedding)
    if embedding.ndim != 2 or embedding.shape[0] != n_segments:
        raise ValueError(f"embedding must be (n_segments={n_segments}, E), got "
                         f"{embedding.shape}")
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be a positive number of segments or None, got {sample}")
    rng = np.random.default_rng(seed)
    if sample is None or sample >= n_segments:
        queries = np.arange(n_segments, dtype=np.int64)
    else:
        queries = np.sort(rng.choice(n_segments, size=sample, replace=False)).astype(np.int64)

    nearest = nearest_in_embedding(embedding, queries, metric)
    neighbours = spatial_neighbours(np.asarray(result.segment_centroid_rc), n_context)
    owner, left, right = context_pairs(queries, nearest, neighbours, embedding)

    means = segment_mean_spectra(cube, segment_ids, n_segments)
    sam = spectral_angle(means[left], means[right])
    involved, position = np.unique(np.concatenate([left, right]), return_inverse=True)
    patches = segment_patches(cube, segment_ids, involved, means, patch_size)
    data_range = _band_ranges(cube, segment_ids)
    left_at, right_at = position[:left.size], position[left.size:]
    # Window means of each patch and of its square once per segment; only the cross term is
    # computed per pair.
    _check_patch_size(patch_size)
    patch_mean = _window_means(patches)
    patch_square = _window_means(patches.astype(np.float64) ** 2)
    ssim = np.empty(left.size, dtype=np.float64)
    for start in range(0, left.size, PAIR_CHUNK):
        a = left_at[start:start + PAIR_CHUNK]
        b = right_at[start:start + PAIR_CHUNK]
        product = _window_means(patches[a].astype(np.float64) * patches[b])
        ssim[start:start + PAIR_CHUNK] = _ssim_from_moments(
            patch_mean[a], patch_square[a], patch_mean[b], patch_square[b], product, data_range)

    # The first pair of each query is (A, B) itself (context_pairs lists it first).
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    context_ssim = _mean_per_owner(ssim, owner, queries.size)
    context_sam = _mean_per_owner(sam, owner, queries.size)

    purity_fcm = purity_kmeans = float("nan")
    n_labelled = 0
    if labels is not None:
        labels = np.asarray(labels)
        purity_fcm, n_labelled = purity(result.segment_fcm_cluster, segment_ids, labels)
        from sklearn.cluster import KMeans

        k = int(result.segment_membership.shape[1])
        features = _unit(embedding) if metric == "cosine" else embedding
        clusters = KMeans(k, n_init=4, random_state=seed).fit_predict(features)
        purity_kmeans, _ = purity(clusters, segment_ids, labels)

    return EmbeddingQuality(
        n_segments=n_segments,
        n_evaluated=int(queries.size),
        metric=metric,
        feature_ssim=float(ssim[first].mean()),
        feature_sam=float(sam[first].mean()),
        context_ssim=float(context_ssim.mean()),
        context_sam=float(context_sam.mean()),
        purity_fcm=purity_fcm,
        purity_kmeans=purity_kmeans,
        n_labelled_pixels=n_labelled,
        patch_size=patch_size,
        seconds=time.perf_counter() - started,
    )
