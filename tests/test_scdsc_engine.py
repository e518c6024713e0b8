"""Unit tests of SCDSC's numerics and of the estimator on a small generated scene (no QGIS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import scdsc
from engine.demo_scene import make_demo_scene
from engine.metrics import score_clustering
from engine.monitor import Cancelled, Monitor
from engine.raster_io import read_labels, read_raster


def test_soft_assignment_matches_the_paper_formula():
    affinity = torch.tensor([[4.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    eta, d = 5.0, 5
    result = scdsc.soft_assignment(affinity, eta, d)
    raw = (affinity + eta * d) / ((eta + 1) * d)
    expected = raw / raw.sum(dim=1, keepdim=True)
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(result.sum(dim=1), torch.ones(2))
    # No affinity at all: uniform assignment.
    torch.testing.assert_close(result[1], torch.full((3,), 1 / 3))
    assert result[0].argmax() == 0


def test_subspace_affinity_is_the_squared_norm_of_each_block():
    projections = torch.tensor([[1.0, 2.0, 0.0, 3.0]])  # k = 2 clusters, d = 2
    torch.testing.assert_close(scdsc.subspace_affinity(projections, 2, 2),
                               torch.tensor([[5.0, 9.0]]))


def test_refined_target_sharpens_and_normalises():
    assignment = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    target = scdsc.refined_target(assignment)
    weights = assignment**2 / assignment.sum(dim=0)
    torch.testing.assert_close(target, weights / weights.sum(dim=1, keepdim=True))
    assert target[0, 0] > assignment[0, 0] and target[1, 1] > assignment[1, 1]


def test_kl_divergence_equals_torch_mean_reduction():
    target = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    predicted = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    expected = torch.nn.functional.kl_div(predicted.log(), target, reduction="sum") / 6
    torch.testing.assert_close(scdsc.kl_divergence(target, predicted), expected)
    assert float(scdsc.kl_divergence(predicted, predicted)) == pytest.approx(0.0, abs=1e-7)


def test_masked_box_filter_averages_valid_neighbours_only():
    rng = np.random.default_rng(0)
    values = rng.random((1, 2, 6, 7)).astype(np.float32)
    mask = (rng.random((1, 1, 6, 7)) > 0.3).astype(np.float32)
    window = 3
    result = scdsc.masked_box_filter(torch.from_numpy(values), torch.from_numpy(mask), window)
    padded_values = np.pad(values * mask, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    padded_mask = np.pad(mask, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    for row in range(6):
        for col in range(7):
            box_values = padded_values[0, :, row : row + 3, col : col + 3].sum(axis=(1, 2))
            box_mask = padded_mask[0, 0, row : row + 3, col : col + 3].sum()
            if box_mask == 0:
                continue
            np.testing.assert_allclose(result[0, :, row, col].numpy(), box_values / box_mask,
                                       rtol=1e-5)
    # An invalid pixel's value never leaks into its neighbours.
    poisoned = values.copy()
    poisoned[mask.astype(bool).repeat(2, axis=1) == 0] = 1e6
    again = scdsc.masked_box_filter(torch.from_numpy(poisoned), torch.from_numpy(mask), window)
    torch.testing.assert_close(again, result)


def test_basis_constraint_is_zero_for_orthonormal_separated_bases():
    k, d, dim = 3, 2, 10
    generator = torch.Generator().manual_seed(0)
    orthonormal = torch.linalg.qr(torch.randn(dim, k * d, generator=generator))[0]
    kernels = orthonormal.T.reshape(k * d, dim, 1, 1)
    assert float(scdsc.basis_constraint(kernels, k, d)) == pytest.approx(0.0, abs=1e-5)
    # Two clusters sharing a direction are penalised by the off-block term.
    shared = kernels.clone()
    shared[2] = shared[0]
    gram = shared.reshape(k * d, -1) @ shared.reshape(k * d, -1).T
    identity = torch.eye(k * d)
    blocks = torch.block_diag(*[torch.ones(d, d)] * k)
    expected = (torch.linalg.norm(gram * identity - identity)
                + torch.linalg.norm(gram * (1 - blocks)))
    assert float(scdsc.basis_constraint(shared, k, d)) == pytest.approx(float(expected))
    assert float(expected) > 1.0


def test_mini_cluster_means_is_a_scatter_mean():
    assignment = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    ids = torch.tensor([0, 0, 3, 3])
    means = scdsc.mini_cluster_means(assignment, ids, 5)
    torch.testing.assert_close(means, torch.tensor([[0.5, 0.5], [0.35, 0.65]]))


def test_tile_grid_covers_the_image_exactly():
    tiles = scdsc.tile_grid(1000, 700, 512)
    covered = np.zeros((1000, 700), dtype=int)
    for row, col, rows, cols in tiles:
        assert row + rows <= 1000 and col + cols <= 700
        covered[row : row + rows, col : col + cols] += 1
    assert covered.min() >= 1
    assert scdsc.tile_grid(20, 30, 512) == [(0, 0, 20, 30)]


def test_the_fully_convolutional_code_is_the_patch_code():
    """z_i^T D as a convolution equals the flattened 7x7 window of the feature map times D."""
    torch.manual_seed(0)
    features = torch.randn(1, 4, 12, 13)
    bases = scdsc.SubspaceBases(n_clusters=2, basis_dim=3, latent_channels=4, patch_size=7)
    with torch.no_grad():
        bases.kernels.normal_()
    projected = bases.project(features)[0]  # (6, 6, 7)
    matrix = bases.kernels.reshape(6, -1)  # rows: basis vectors in (C, 7, 7) order
    for row in range(projected.shape[1]):
        for col in range(projected.shape[2]):
            code = features[0, :, row : row + 7, col : col + 7].reshape(-1)
            torch.testing.assert_close(projected[:, row, col], matrix @ code, rtol=1e-4,
                                       atol=1e-4)


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    scene = make_demo_scene(tmp_path_factory.mktemp("scene"), height=40, width=48, n_bands=12,
                            n_classes=3, seed=3, nodata_border=2)
    raster = read_raster(scene.cube_path)
    truth, _ = read_labels(scene.truth_path)
    return raster, truth


FAST = {"epochs": 20, "pretrain_steps": 30, "kmeans_n_init": 2, "finch_components": 32}


def test_fit_clusters_every_valid_pixel_and_is_deterministic(small_scene):
    raster, truth = small_scene
    first = scdsc.SCDSC(n_clusters=3, seed=7, **FAST).fit(raster.cube, raster.valid)
    second = scdsc.SCDSC(n_clusters=3, seed=7, **FAST).fit(raster.cube, raster.valid)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert (first.labels[raster.valid] >= 1).all() and (first.labels[raster.valid] <= 3).all()
    assert (first.labels[~raster.valid] == 0).all()
    np.testing.assert_allclose(first.soft_assignments[raster.valid].sum(axis=1), 1.0, atol=1e-5)
    assert first.full_batch
    scores = score_clustering(truth, first.labels)
    assert scores.overall_accuracy > 0.7, scores


@pytest.mark.parametrize("setting", ["paper", "adaptive"])
def test_tiled_training_and_inference_run_on_a_scene_larger_than_the_batch(small_scene, setting):
    raster, truth = small_scene
    model = scdsc.SCDSC(n_clusters=3, seed=1, batch_pixels=600, training_tile=16,
                        inference_tile=17, setting=setting, **FAST)
    result = model.fit(raster.cube, raster.valid)
    assert not result.full_batch
    assert (result.labels[raster.valid] >= 1).all()
    # Tiled inference equals untiled inference of the same weights (halos are exact).
    pad = model.patch_size_ // 2 + scdsc.ENCODER_HALO
    assert pad == 5 or setting == "adaptive"
    model.inference_tile = 1000
    scene = model._scene_tensors(
        *_network_input(model, raster), torch.device("cpu"),
    )
    whole = model.assign(model.autoencoder_, model.bases_, scene, Monitor())
    model.inference_tile = 17
    tiled = model.assign(model.autoencoder_, model.bases_, scene, Monitor())
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def _network_input(model, raster):
    from engine.preprocessing import pixels_to_image

    image = pixels_to_image(model.preprocessing_.transform(raster.valid_pixels()), raster.valid)
    return image, raster.valid, np.zeros(raster.n_valid, dtype=np.int64)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_clusters": 1}, "at least 2"),
        ({"n_clusters": 500}, "valid pixels"),
        ({"n_clusters": 3, "patch_size": 6}, "odd"),
    ],
)
def test_bad_settings_raise_value_errors(small_scene, arguments, message):
    raster, _ = small_scene
    with pytest.raises(ValueError, match=message):
        scdsc.SCDSC(**arguments).fit(raster.cube, raster.valid)


def test_cancel_stops_the_fit(small_scene):
    raster, _ = small_scene
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        scdsc.SCDSC(n_clusters=3, **FAST).fit(raster.cube, raster.valid,
                                              Monitor(is_cancelled=cancelled))
