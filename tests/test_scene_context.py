"""Scene-adaptive context of SCDSC's adaptive setting: weights, scale rule, input, target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import scdsc
from engine.preprocessing import SpectralPreprocessing, variance_preserving_components
from engine.scene_context import (
    choose_context_scale,
    edge_aware_smoothing,
    neighbour_bandwidth,
    spectral_neighbour_weights,
    weighted_neighbour_mean,
)


def _road_scene(noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-band 30 x 30 field with a one-pixel-wide road down column 15."""
    rng = np.random.default_rng(seed)
    image = np.zeros((30, 30, 2), dtype=np.float32)
    image[:, :, 0] = 1.0
    image[:, 15] = (0.0, 1.0)
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return image, np.ones((30, 30), dtype=bool)


def test_spectral_weights_keep_a_one_pixel_road_that_a_box_erases():
    image, valid = _road_scene()
    bandwidth = neighbour_bandwidth(image, valid)
    smoothed = edge_aware_smoothing(image, valid, 7, bandwidth)
    # The road keeps its own spectrum; the box mean of the same window makes it field-like.
    assert smoothed[5:25, 15, 1].mean() > 0.95
    grid = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0)
    box = scdsc.masked_box_filter(grid, torch.ones(1, 1, 30, 30), 7)[0].numpy()
    assert box[1, 5:25, 15].mean() < 0.2
    # Away from the road, the field is smoothed: its noise drops.
    assert smoothed[:, :10, 0].std() < 0.5 * image[:, :10, 0].std()


def test_weights_ignore_nodata_and_the_grid_edge_and_window_one_is_identity():
    image, valid = _road_scene()
    valid[10, 10] = False
    spectra = torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0)
    mask = torch.from_numpy(valid).unsqueeze(0)
    weights = spectral_neighbour_weights(spectra, mask, 3, 0.01)
    assert weights.shape == (1, 9, 30, 30)
    assert float(weights[0, 4, 11, 11]) == pytest.approx(1.0)  # a valid pixel's own weight
    assert float(weights[0, 0, 11, 11]) == 0.0  # its up-left neighbour (10, 10) is nodata
    assert float(weights[0, 0, 0, 0]) == 0.0  # outside the grid
    values = torch.rand(1, 3, 30, 30)
    same = weighted_neighbour_mean(values, spectral_neighbour_weights(spectra, mask, 1, 0.01), 1)
    keep = torch.from_numpy(valid)
    torch.testing.assert_close(same[..., keep], values[..., keep])


def test_context_scale_is_large_for_noisy_regions_and_small_for_fine_structure():
    rng = np.random.default_rng(1)
    valid = np.ones((60, 60), dtype=bool)
    # Noise around a few large regions: neighbours at any offset are as alike as adjacent ones.
    regions = np.repeat(np.repeat(rng.normal(size=(2, 2, 3)), 30, axis=0), 30, axis=1)
    noisy = (regions + rng.normal(0, 0.3, (60, 60, 3))).astype(np.float32)
    window, evidence = choose_context_scale(noisy, valid)
    assert window == 7 and "gamma(3,3)" in evidence
    # Fine structure without noise (a field correlated over ~2 pixels): gamma(h) ~ 1 - exp(-h^2
    # / 4), 1.8 gamma(1) at the diagonal neighbour and 3.9 gamma(1) at offset (2, 2): 3 x 3.
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=(100, 100, 2)), sigma=(1.0, 1.0, 0))
    window, evidence = choose_context_scale(field.astype(np.float32), np.ones((100, 100), bool))
    assert window == 3 and "gamma(2,2)" in evidence


def test_variance_preserving_input_keeps_distances_up_to_one_factor():
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(3, 12))
    pixels = (rng.normal(size=(500, 3)) * [5.0, 2.0, 0.5]) @ mixing
    pixels += rng.normal(0, 1e-3, pixels.shape)
    n = variance_preserving_components(pixels, minimum=2, share=0.999)
    assert n == 3  # three sources hold the variance; the minimum is 2
    kept = SpectralPreprocessing.fit(pixels, n, whiten=False).transform(pixels)
    standardised = (pixels - pixels.mean(0)) / pixels.std(0)
    ratio = np.linalg.norm(kept[:50] - kept[50:100], axis=1) / np.linalg.norm(
        standardised[:50] - standardised[50:100], axis=1)
    assert ratio.std() / ratio.mean() < 1e-2  # one common factor
    whitened = SpectralPreprocessing.fit(pixels, n).transform(pixels)
    np.testing.assert_allclose(whitened.std(0), 1.0, atol=1e-3)


def test_size_prior_target_keeps_the_prior_shares_and_uniform_prior_is_the_papers():
    rng = np.random.default_rng(3)
    assignment = torch.from_numpy(rng.dirichlet([1.0, 1.0, 1.0], size=200)).float()
    uniform = torch.full((3,), 1 / 3)
    torch.testing.assert_close(scdsc.refined_target(assignment, uniform),
                               scdsc.refined_target(assignment))
    # Clusters of shares 0.7 / 0.2 / 0.1: DEC's target moves mass towards equal sizes, the
    # size-prior target with those shares as prior does not.
    labels = np.repeat([0, 1, 2], [140, 40, 20])
    soft = torch.full((200, 3), 0.15)
    soft[torch.arange(200), torch.from_numpy(labels)] = 0.7
    paper_shares = scdsc.refined_target(soft).mean(0)
    prior = torch.tensor([0.7, 0.2, 0.1])
    prior_shares = scdsc.refined_target(soft, prior).mean(0)
    assert float(paper_shares[0]) < 0.6
    assert float(prior_shares[0]) > 0.69 and float(prior_shares[2]) < 0.11


def test_settings_resolve_to_the_paper_values_and_unknown_ones_are_refused():
    paper = scdsc.SCDSC(n_clusters=3, setting="paper")
    assert (paper.n_components_, paper.patch_size_, paper.smoothing_window_,
            paper.finch_patch_size_, paper.whiten_input_, paper.context_weighting_,
            paper.target_, paper.init_partition_) == (8, 7, 7, 17, True, "box", "paper", "codes")
    explicit = scdsc.SCDSC(n_clusters=3, setting="adaptive", context_scale=5)
    assert (explicit.patch_size_, explicit.smoothing_window_) == (5, 5)
    with pytest.raises(ValueError, match="Unknown SCDSC setting"):
        scdsc.SCDSC(n_clusters=3, setting="fancy")
    with pytest.raises(ValueError, match="target"):
        scdsc.SCDSC(n_clusters=3, target="equal")


def test_ground_extent_bounds_the_window_and_pixel_size_comes_from_the_crs():
    from affine import Affine
    from rasterio.crs import CRS

    from engine.raster_io import pixel_size_metres
    from engine.scene_context import ground_window

    assert [ground_window(size) for size in (1.0, 2.5, 10.0, 20.0, 30.0, None)] == [
        7, 7, 5, 1, 1, None]
    utm = CRS.from_epsg(32633).to_wkt()
    assert pixel_size_metres(utm, Affine(10, 0, 500_000, 0, -10, 5_300_000)) == 10.0
    british = CRS.from_epsg(27700).to_wkt()
    assert pixel_size_metres(british, Affine(20, 0, 0, 0, -20, 0)) == 20.0
    wgs84 = CRS.from_epsg(4326).to_wkt()
    at_equator = pixel_size_metres(wgs84, Affine(1e-4, 0, 10.0, 0, -1e-4, 0.0), height=10)
    assert at_equator == pytest.approx(11.13, abs=0.01)
    assert pixel_size_metres(None, Affine.identity()) is None
    # With a known pixel size, a smooth 20 m scene still gets a 1 x 1 context.
    rng = np.random.default_rng(4)
    regions = np.repeat(np.repeat(rng.normal(size=(2, 2, 3)), 30, axis=0), 30, axis=1)
    noisy = (regions + rng.normal(0, 0.3, (60, 60, 3))).astype(np.float32)
    window, evidence = choose_context_scale(noisy, np.ones((60, 60), bool), pixel_size_m=20.0)
    assert window == 1 and "20 m pixels" in evidence
