"""Patch-PCA features by convolution against explicitly materialised patches."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from engine.monitor import Cancelled, Monitor
from engine.patch_features import (
    _patch_vectors_reference,
    default_n_components,
    patch_pca_features,
    sample_pixel_indices,
)


def _tiny_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(24, 20, 3)).astype(np.float32)
    image[..., 1] += np.linspace(0, 3, 20)[None, :]  # some spatial structure
    image[..., 2] *= 5.0  # bands on different scales: the band z-score must handle it
    valid = np.ones((24, 20), dtype=bool)
    valid[3:6, 4:9] = False  # a nodata hole inside the image...
    valid[:, 0] = False  # ...and along the border
    image[~valid] = -9999.0  # raw nodata value must not leak into any feature
    return image, valid


def _reference_features(vectors: np.ndarray, fit_rows: np.ndarray, k: int) -> np.ndarray:
    scaler = StandardScaler().fit(vectors[fit_rows])
    pca = PCA(n_components=k, svd_solver="full").fit(scaler.transform(vectors[fit_rows]))
    projected = (scaler.transform(vectors) - pca.mean_) @ pca.components_.T
    return projected / np.linalg.norm(projected, axis=1, keepdims=True)


def _assert_equal_up_to_column_signs(actual: np.ndarray, expected: np.ndarray) -> None:
    signs = np.sign(np.sum(actual * expected, axis=0))
    np.testing.assert_allclose(actual * signs, expected, atol=1e-4)


def test_matches_materialised_patches_with_the_whole_image_as_sample() -> None:
    image, valid = _tiny_scene()
    features = patch_pca_features(image, valid, patch_size=5, n_components=10)

    vectors = _patch_vectors_reference(image, valid, patch_size=5)
    expected = _reference_features(vectors, np.arange(len(vectors)), k=10)
    assert features.shape == (valid.sum(), 10) and features.dtype == np.float32
    _assert_equal_up_to_column_signs(features, expected)


def test_matches_materialised_patches_with_a_subsample() -> None:
    image, valid = _tiny_scene(seed=1)
    features = patch_pca_features(
        image, valid, patch_size=5, n_components=8, sample_size=150, seed=3
    )

    vectors = _patch_vectors_reference(image, valid, patch_size=5)
    sampled_flat = sample_pixel_indices(valid, 150, seed=3)
    fit_rows = np.searchsorted(np.flatnonzero(valid), sampled_flat)
    assert fit_rows.size == 150
    _assert_equal_up_to_column_signs(features, _reference_features(vectors, fit_rows, k=8))


def test_rows_are_unit_length_and_nodata_values_do_not_matter() -> None:
    image, valid = _tiny_scene()
    features = patch_pca_features(image, valid, patch_size=5, n_components=6)
    other_nodata = image.copy()
    other_nodata[~valid] = np.nan
    again = patch_pca_features(other_nodata, valid, patch_size=5, n_components=6)

    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(features, again, atol=1e-6)


def test_components_are_capped_by_what_the_sample_supports() -> None:
    image, valid = _tiny_scene()
    monitor = Monitor()
    # 3 x 3 x 3 = 27 patch dimensions: 300 components cannot exist.
    features = patch_pca_features(image, valid, patch_size=3, n_components=300, monitor=monitor)
    assert features.shape[1] == 27
    assert monitor.warnings
    few = patch_pca_features(image, valid, patch_size=5, n_components=300, sample_size=20)
    assert few.shape[1] == 19


def test_default_components_drop_for_large_scenes() -> None:
    assert default_n_components(10_000) == 300
    assert default_n_components(880_710) < 300


def test_full_size_patches_on_a_300_by_300_scene() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(300, 300, 8)).astype(np.float32)
    valid = np.ones((300, 300), dtype=bool)
    valid[100:120, 50:60] = False
    features = patch_pca_features(image, valid, n_components=32, sample_size=5000)

    # Built by chunked convolution: no (90k x 2312) patch matrix (830 MB) is ever allocated.
    assert features.shape == (valid.sum(), 32)
    assert np.all(np.isfinite(features))


def test_cancel_stops_the_convolution() -> None:
    image, valid = _tiny_scene()
    with pytest.raises(Cancelled):
        patch_pca_features(image, valid, patch_size=5, monitor=Monitor(is_cancelled=lambda: True))
