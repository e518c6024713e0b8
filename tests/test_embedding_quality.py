"""Evaluation measures of segment embeddings (engine.embedding_quality)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from engine.embedding_quality import (
    context_pairs,
    evaluate_embedding,
    nearest_in_embedding,
    purity,
    segment_mean_spectra,
    segment_patches,
    spatial_neighbours,
    spectral_angle,
    ssim_pairs,
)
from engine.graph_result import GraphLabellingResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THETA = 0.5  # spectral angle between s3 and the changed spectrum t (radians)


def test_spectral_angle_of_identical_parallel_and_orthogonal_spectra():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = np.array([[1.0, 2.0, 3.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(spectral_angle(a, b), [0.0, np.pi / 2, 0.0], atol=1e-7)
    assert spectral_angle(a[0], 3 * a[0]) == pytest.approx(0.0, abs=1e-7)  # scale-invariant
    assert spectral_angle(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(np.pi / 4)


def test_ssim_of_identical_patches_is_one_and_matches_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(2, 3, 16, 16))
    y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    np.testing.assert_allclose(ssim_pairs(x, x, np.ones(3)), [1.0, 1.0], atol=1e-12)
    ours = ssim_pairs(x, y, np.ones(3))
    reference = [structural_similarity(x[i], y[i], data_range=1.0, channel_axis=0)
                 for i in range(2)]
    np.testing.assert_allclose(ours, reference, atol=1e-10)
    assert np.all(ours < 0.99)
    with pytest.raises(ValueError, match="patch_size"):
        ssim_pairs(x[:, :, :5, :5], y[:, :, :5, :5], np.ones(3))


def test_purity_of_perfect_and_of_mixed_clusterings():
    segment_ids = np.array([[0, 0, 1, 1], [2, 2, 3, -1]])
    labels = np.array([[1, 1, 2, 0], [3, 3, 2, 1]])  # the -1 pixel's label does not count
    assert purity(np.array([5, 6, 7, 6]), segment_ids, labels) == (1.0, 6)
    value, counted = purity(np.array([1, 1, 2, 2]), segment_ids, labels)
    assert counted == 6 and value == pytest.approx((2 + 2) / 6)  # cluster 1: {1,1,2}; 2: {3,3,2}
    assert np.isnan(purity(np.array([1, 1, 2, 2]), segment_ids, np.zeros_like(labels))[0])


def two_halves() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """8 x 20 image: two 8 x 8 halves (4 segments of 4 x 4 each) separated by 4 nodata columns.

    Left segments L0..L3 have spectra s0..s3; right segments R0..R3 sit at other positions
    (a permuted layout) with the same spectra except R3, whose spectrum is at THETA from s3.
    Embeddings: Li and Ri are nearly the same one-hot vector, so Ri is Li's nearest segment.
    """
    spectra = np.eye(4, 5) + 0.1
    changed = spectra[3].copy()
    # Rotate s3 by THETA in the plane of s3 and e4 (orthogonal to s3 after Gram-Schmidt).
    e4 = np.eye(5)[4] - spectra[3] * (spectra[3] @ np.eye(5)[4]) / (spectra[3] @ spectra[3])
    changed = (np.cos(THETA) * spectra[3] / np.linalg.norm(spectra[3])
               + np.sin(THETA) * e4 / np.linalg.norm(e4))
    segment_ids = np.full((8, 20), -1, dtype=np.int32)
    cube = np.zeros((8, 20, 5), dtype=np.float32)
    left_cells = [(0, 0), (0, 4), (4, 0), (4, 4)]
    right_cells = [(4, 16), (0, 12), (0, 16), (4, 12)]  # Ri at a different place than Li
    for i, (row, col) in enumerate(left_cells):
        segment_ids[row:row + 4, col:col + 4] = i
        cube[row:row + 4, col:col + 4] = spectra[i]
    for i, (row, col) in enumerate(right_cells):
        segment_ids[row:row + 4, col:col + 4] = 4 + i
        cube[row:row + 4, col:col + 4] = changed if i == 3 else spectra[i]
    embedding = np.concatenate([np.eye(4), np.eye(4) + 0.01 * np.eye(4)[::-1]]).astype(
        np.float32)
    centroid = np.array([[r + 1.5, c + 1.5] for r, c in left_cells + right_cells])
    return cube, segment_ids, embedding, centroid


def test_context_pairs_match_neighbourhoods_by_embedding_on_a_hand_made_scene():
    cube, segment_ids, embedding, centroid = two_halves()
    neighbours = spatial_neighbours(centroid, k=3)
    # The nodata gap makes each segment's 3 nearest the other segments of its half.
    for s in range(8):
        half = set(range(4)) if s < 4 else set(range(4, 8))
        assert set(neighbours[s]) == half - {s}
    nearest = nearest_in_embedding(embedding, np.arange(8))
    np.testing.assert_array_equal(nearest, [4, 5, 6, 7, 0, 1, 2, 3])
    owner, left, right = context_pairs(np.array([0]), nearest[:1], neighbours, embedding)
    assert owner.tolist() == [0, 0, 0, 0]
    # Matched by embedding (Lj with Rj), not by spatial position.
    assert sorted(zip(left.tolist(), right.tolist())) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    means = segment_mean_spectra(cube, segment_ids, 8)
    sam = spectral_angle(means[left], means[right])
    assert sam.mean() == pytest.approx(THETA / 4)  # only the (L3, R3) pair differs


def make_result(segment_ids: np.ndarray, embedding: np.ndarray, centroid: np.ndarray,
                fcm_cluster: np.ndarray) -> GraphLabellingResult:
    n = embedding.shape[0]
    counts = np.bincount(segment_ids[segment_ids >= 0], minlength=n)
    membership = np.eye(int(fcm_cluster.max()))[fcm_cluster - 1].astype(np.float32)
    return GraphLabellingResult(
        segment_ids=segment_ids, segment_chip=np.zeros(n, dtype=np.int32),
        segment_pixel_count=counts.astype(np.int64), segment_centroid_rc=centroid,
        segment_features=embedding, segment_membership=membership,
        segment_fcm_cluster=fcm_cluster.astype(np.int32), segment_embedding=embedding,
        segment_umap=np.zeros((n, 2), np.float32), edges=np.zeros((2, 0), np.int64),
        chip_windows=np.array([[0, 0, *segment_ids.shape]], dtype=np.int64),
        chip_umap=np.zeros((1, 2), np.float32), chip_neighbours=np.full((1, 1), -1),
        chip_neighbour_similarity=np.full((1, 1), np.nan, np.float32),
        fcm_centres=np.zeros((int(fcm_cluster.max()), 5), np.float32))


def test_evaluate_embedding_on_the_hand_made_scene():
    cube, segment_ids, embedding, centroid = two_halves()
    fcm_cluster = np.array([1, 2, 3, 4, 1, 2, 3, 4])
    labels = np.where(segment_ids >= 0, (segment_ids % 4) + 1, 0).astype(np.uint8)
    result = make_result(segment_ids, embedding, centroid, fcm_cluster)
    quality = evaluate_embedding(result, cube, labels=labels, n_context=3)
    assert quality.n_evaluated == 8 and quality.metric == "cosine"
    # 2 of the 8 (A, nearest B) pairs are (L3, R3) at THETA; each query's 4 context pairs
    # include (L3, R3) once.
    assert quality.feature_sam == pytest.approx(THETA / 4)
    assert quality.context_sam == pytest.approx(THETA / 4)
    # Flat patches: identical spectra give SSIM 1, the changed one less.
    assert 0.5 < quality.feature_ssim < 1.0
    assert quality.purity_fcm == 1.0 and quality.purity_kmeans == 1.0
    assert quality.n_labelled_pixels == 8 * 16

    sampled = evaluate_embedding(result, cube, sample=3, seed=4, n_context=3)
    again = evaluate_embedding(result, cube, sample=3, seed=4, n_context=3)
    assert sampled.n_evaluated == 3 and np.isnan(sampled.purity_fcm)
    np.testing.assert_equal(sampled.as_dict() | {"seconds": 0}, again.as_dict() | {"seconds": 0})

    with pytest.raises(ValueError, match="moveaxis"):
        evaluate_embedding(result, np.moveaxis(cube, -1, 0))
    with pytest.raises(ValueError, match="embedding"):
        evaluate_embedding(result, cube, embedding=embedding[:5])


def test_segment_patches_keep_only_the_segment_content():
    cube = np.zeros((6, 6, 2), dtype=np.float32)
    segment_ids = np.full((6, 6), 1, dtype=np.int32)
    segment_ids[1:4, 1:3] = 0  # a 3 x 2 segment inside segment 1
    cube[1:4, 1:3] = [[[1.0, 2.0], [3.0, 4.0]]] * 3
    cube[segment_ids == 1] = 100.0
    means = segment_mean_spectra(cube, segment_ids, 2)
    np.testing.assert_allclose(means[0], [2.0, 3.0])
    patch = segment_patches(cube, segment_ids, np.array([0]), means, 8)[0]
    assert patch.shape == (2, 8, 8)
    assert patch.max() <= 4.0 + 1e-5 and patch.min() >= 1.0 - 1e-5  # nothing of segment 1
    # Column structure kept: left half ~ (1, 2), right half ~ (3, 4).
    assert patch[0, :, 0].mean() < patch[0, :, -1].mean()


def test_nearest_in_embedding_euclidean_and_bad_metric():
    embedding = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 1.0]])
    np.testing.assert_array_equal(nearest_in_embedding(embedding, np.arange(4), "euclidean"),
                                  [1, 0, 3, 2])
    with pytest.raises(ValueError, match="metric"):
        nearest_in_embedding(embedding, np.arange(4), "manhattan")
