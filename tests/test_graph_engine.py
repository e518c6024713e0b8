"""Engine of the graph-labelling pipeline: fuzzy c-means, U-Net loss, chips, segments, kNN graph,
GNN, UMAP helpers and the GraphLabelling estimator (determinism, bad input, cancel)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.demo_scene import make_demo_scene
from engine.embedding_umap import chip_umap, classical_mds
from engine.fuzzy_cmeans import FuzzyCMeans, fcm_memberships
from engine.gnn import train_gnn
from engine.graph_labelling import GraphLabelling
from engine.monitor import Cancelled, Monitor
from engine.raster_io import read_raster
from engine.segments import (
    chip_spans,
    chip_windows,
    knn_edges,
    segment_means,
    segment_pixel_stats,
    segment_scene,
    slic_chip,
    stretch_rgb,
    windows_with_data,
)
from engine.unet import UNet, combo_loss, masked_bce_loss, masked_dice_loss

# Small settings so a whole fit of the demo scene takes a few seconds on one thread.
FAST = dict(chip_size=32, segments_per_chip=25, unet_depth=2, unet_width=4, feature_channels=16,
            unet_epochs=2, unet_patience=1, gnn_epochs=10, n_fcm_clusters=4, fcm_sample=2000)
RGB = (5, 3, 1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    scene = make_demo_scene(tmp_path_factory.mktemp("graph_demo"), height=64, width=72,
                            n_bands=8, seed=1)
    return read_raster(scene.cube_path)


@pytest.fixture(scope="module")
def demo_result(demo, one_torch_thread):
    return GraphLabelling(seed=0, **FAST).fit(demo.cube, demo.valid, RGB)


# ------------------------------------------------------------------------------ fuzzy c-means


def test_fcm_memberships_sum_to_one_and_recover_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [10, 0, 5], [0, 10, -5]], dtype=float)
    truth = rng.integers(0, 3, 900)
    pixels = centres[truth] + rng.normal(scale=0.5, size=(900, 3))
    model = FuzzyCMeans(n_clusters=3, sample_size=500, seed=0).fit(pixels)
    memberships = model.memberships(pixels)
    assert memberships.shape == (900, 3)
    np.testing.assert_allclose(memberships.sum(axis=1), 1.0, atol=1e-5)
    assert (memberships >= 0).all()
    found = memberships.argmax(axis=1)
    # Same partition up to a permutation of the cluster numbers.
    pairs = set(zip(truth.tolist(), found.tolist()))
    assert len(pairs) == 3
    assert memberships.max(axis=1).mean() > 0.9  # well separated -> confident memberships


def test_fcm_membership_formula_on_a_known_point():
    centres = np.array([[0.0], [3.0]])
    # Distances 1 and 2 with m = 2: u = (1/1) / (1/1 + 1/4) = 0.8.
    u = fcm_memberships(np.array([[1.0]]), centres, fuzziness=2.0)
    np.testing.assert_allclose(u, [[0.8, 0.2]])
    on_centre = fcm_memberships(np.array([[3.0]]), centres)
    np.testing.assert_allclose(on_centre, [[0.0, 1.0]], atol=1e-9)


def test_fcm_is_seeded():
    pixels = np.random.default_rng(2).normal(size=(3000, 4))
    a = FuzzyCMeans(4, sample_size=1000, seed=5).fit(pixels).centres
    b = FuzzyCMeans(4, sample_size=1000, seed=5).fit(pixels).centres
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ U-Net loss


def test_dice_and_bce_values_on_known_inputs():
    # Four pixels, two classes: class 0 everywhere true, class 1 nowhere; predictions 0.5.
    target = torch.zeros(1, 2, 2, 2)
    target[:, 0] = 1.0
    logits = torch.zeros(1, 2, 2, 2)  # sigmoid = 0.5
    mask = torch.ones(1, 1, 2, 2)
    dice = masked_dice_loss(torch.sigmoid(logits), target, mask)
    # class 0: 1 - (2*2 + 1) / (2 + 4 + 1) = 2/7; class 1: 1 - 1 / (2 + 0 + 1) = 2/3
    assert float(dice) == pytest.approx((2 / 7 + 2 / 3) / 2, abs=1e-6)
    assert float(masked_bce_loss(logits, target, mask)) == pytest.approx(np.log(2.0), abs=1e-6)
    assert float(combo_loss(logits, target, mask)) == pytest.approx(
        (2 / 7 + 2 / 3) / 2 + np.log(2.0), abs=1e-6)
    # A perfect, confident prediction has (almost) zero loss.
    perfect = (target * 2 - 1) * 30.0
    assert float(combo_loss(perfect, target, mask)) < 1e-6


def test_loss_ignores_masked_pixels():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 4, 4, generator=generator)
    logits = torch.randn(1, 3, 4, 4, generator=generator)
    mask = torch.ones(1, 1, 4, 4)
    mask[..., :, 0] = 0
    changed_logits, changed_target = logits.clone(), target.clone()
    changed_logits[..., :, 0] = 100.0
    changed_target[..., :, 0] = 0.0
    assert float(combo_loss(logits, target, mask)) == pytest.approx(
        float(combo_loss(changed_logits, changed_target, mask)), abs=1e-6)


def test_unet_handles_sizes_not_divisible_by_the_downsampling(one_torch_thread):
    model = UNet(5, 3, depth=2, width=4, feature_channels=12).eval()
    with torch.no_grad():
        features = model.features(torch.randn(1, 5, 13, 22))
        logits = model(torch.randn(2, 5, 16, 8))
    assert features.shape == (1, 12, 13, 22)
    assert (features >= 0).all()  # ReLU activation maps
    assert logits.shape == (2, 3, 16, 8)


# ------------------------------------------------------------------------------ chips


@pytest.mark.parametrize("height,width,chip", [(100, 70, 32), (64, 64, 32), (20, 90, 32),
                                               (33, 47, 16), (5, 5, 8)])
def test_chip_windows_tile_the_raster_exactly(height, width, chip):
    windows = chip_windows(height, width, chip)
    cover = np.zeros((height, width), dtype=int)
    for r, c, h, w in windows:
        cover[r:r + h, c:c + w] += 1
    assert (cover == 1).all()
    if min(height, width) >= chip:
        # Every chip is between half and one and a half chip sizes on each side.
        assert windows[:, 2:].min() >= chip // 2
        assert windows[:, 2:].max() < chip + chip // 2


def test_chip_spans_merge_short_remainders():
    assert chip_spans(100, 32) == [(0, 32), (32, 32), (64, 36)]  # remainder 4 < 16: merged
    assert chip_spans(90, 32) == [(0, 32), (32, 32), (64, 26)]  # remainder 26 kept
    assert chip_spans(10, 32) == [(0, 10)]


def test_fully_nodata_chips_are_skipped():
    valid = np.zeros((64, 64), dtype=bool)
    valid[40:, :20] = True
    windows = windows_with_data(chip_windows(64, 64, 32), valid)
    assert windows.tolist() == [[32, 0, 32, 32]]


# ------------------------------------------------------------------------------ segments


def _smooth_rgb(height, width, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    rgb = gaussian_filter(rng.random((height, width, 3)), (2, 2, 0))
    return (rgb - rgb.min()) / (rgb.max() - rgb.min())


def test_slic_chip_masks_nodata_and_gives_dense_ids():
    rgb = _smooth_rgb(40, 40)
    valid = np.ones((40, 40), dtype=bool)
    valid[:5] = False
    valid[20, 20] = False
    labels = slic_chip(rgb, valid, 30, 10.0)
    assert (labels[~valid] == -1).all()
    assert (labels[valid] >= 0).all()
    assert np.array_equal(np.unique(labels[valid]), np.arange(labels.max() + 1))
    assert labels.max() + 1 >= 10


def test_segments_stay_inside_their_chip_and_ids_are_dense():
    rgb = _smooth_rgb(50, 60, seed=1)
    valid = np.ones((50, 60), dtype=bool)
    valid[:, :3] = False
    windows = chip_windows(50, 60, 24)
    ids, chip_of = segment_scene(rgb, valid, windows, 20, 10.0)
    assert np.array_equal(np.unique(ids[valid]), np.arange(chip_of.size))
    assert (ids[~valid] == -1).all()
    for chip, (r, c, h, w) in enumerate(windows):
        inside = ids[r:r + h, c:c + w]
        assert set(np.unique(inside[inside >= 0]).tolist()) == set(
            np.flatnonzero(chip_of == chip).tolist())


def test_segment_means_and_centroids_match_a_brute_force_loop():
    rng = np.random.default_rng(3)
    ids_grid = rng.integers(-1, 7, size=(9, 11))
    ids_grid[0, :7] = np.arange(7)  # every segment present
    values = rng.normal(size=(9, 11, 4))
    flat = ids_grid.reshape(-1)
    inside = flat >= 0
    means = segment_means(flat[inside], values.reshape(-1, 4)[inside], 7)
    counts, centroids = segment_pixel_stats(ids_grid, 7)
    for segment in range(7):
        rows, cols = np.nonzero(ids_grid == segment)
        expected = np.mean([values[r, c] for r, c in zip(rows, cols)], axis=0)
        np.testing.assert_allclose(means[segment], expected, rtol=1e-12)
        assert counts[segment] == len(rows)
        np.testing.assert_allclose(centroids[segment], [rows.mean(), cols.mean()])


def test_knn_edges_match_brute_force():
    rng = np.random.default_rng(4)
    centroids = rng.random((60, 2)) * 100
    k = 5
    edges = knn_edges(centroids, k)
    assert edges.shape == (2, 60 * k)
    distances = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    for node in range(60):
        found = set(edges[1, edges[0] == node].tolist())
        assert found == set(np.argsort(distances[node])[:k].tolist())
    with pytest.raises(ValueError, match="neighbours"):
        knn_edges(centroids[:5], 5)


def test_stretch_rgb_ignores_nodata():
    rgb = np.random.default_rng(0).random((10, 10, 3))
    valid = np.ones((10, 10), dtype=bool)
    valid[0, 0] = False
    rgb[0, 0] = 1e6
    out = stretch_rgb(rgb, valid)
    assert out.min() >= 0 and out.max() <= 1
    assert out[valid].max() == 1.0 and (out[0, 0] == 0).all()


# ------------------------------------------------------------------------------ GNN, UMAP


@pytest.mark.parametrize("kind,dim", [("gcn", 60), ("gatv2", 64)])
def test_gnn_output_shapes_and_embedding_dim(kind, dim, one_torch_thread):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 16)).astype(np.float32)
    memberships = rng.dirichlet(np.ones(4), size=40).astype(np.float32)
    edges = knn_edges(rng.random((40, 2)), 3)
    torch.manual_seed(0)
    embedding, report = train_gnn(kind, features, edges, memberships, epochs=15)
    assert embedding.shape == (40, dim) and embedding.dtype == np.float32
    assert report.embedding_dim == dim
    assert len(report.losses) == 15 and report.losses[-1] < report.losses[0]


def test_chip_umap_from_neighbour_lists_separates_two_groups():
    # 20 chips in two groups: similar (0.9) inside a group, listed neighbours only there.
    n = 20
    group = np.arange(n) // 10
    neighbours = np.full((n, 6), -1, dtype=np.int64)
    similarity = np.full((n, 6), np.nan, dtype=np.float32)
    for chip in range(n):
        mates = [m for m in range(n) if group[m] == group[chip] and m != chip][:5]
        neighbours[chip, :5] = mates
        similarity[chip, :5] = 0.9
    has = np.ones(n, dtype=bool)
    has[3] = False  # a chip without segments: NaN row, not listed by others in reality
    neighbours[neighbours == 3] = -1
    layout = chip_umap(neighbours, similarity, has, seed=0)
    assert np.isnan(layout[3]).all() and np.isfinite(np.delete(layout, 3, axis=0)).all()
    a, b = layout[[i for i in range(10) if i != 3]], layout[10:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    spread = max(a.std(0).max(), b.std(0).max())
    assert gap > 3 * spread
    np.testing.assert_array_equal(layout, chip_umap(neighbours, similarity, has, seed=0))


def test_classical_mds_recovers_distances():
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    layout = classical_mds(distances)
    np.testing.assert_allclose(
        np.linalg.norm(layout[:, None] - layout[None], axis=2), distances, atol=1e-9)


# ------------------------------------------------------------------------------ estimator


def test_fit_result_is_consistent(demo, demo_result):
    result = demo_result
    n = result.n_segments
    assert result.segment_ids.shape == demo.valid.shape
    assert (result.segment_ids[~demo.valid] == -1).all()
    assert (result.segment_ids[demo.valid] >= 0).all()
    assert np.array_equal(np.unique(result.segment_ids[demo.valid]), np.arange(n))
    assert result.segment_pixel_count.sum() == demo.valid.sum()
    assert result.segment_features.shape == (n, FAST["feature_channels"])
    assert result.segment_membership.shape == (n, FAST["n_fcm_clusters"])
    np.testing.assert_allclose(result.segment_membership.sum(axis=1), 1.0, atol=1e-4)
    assert set(np.unique(result.segment_fcm_cluster)) <= set(range(1, FAST["n_fcm_clusters"] + 1))
    assert result.segment_embedding.shape == (n, 60)
    assert result.segment_umap.shape == (n, 2) and np.isfinite(result.segment_umap).all()
    assert result.edges.shape == (2, n * 8) and result.edges.dtype == np.int64
    assert (result.edges[0] != result.edges[1]).all()
    assert result.chip_umap.shape == (result.n_chips, 2)
    assert result.chip_neighbours.shape[0] == result.n_chips
    assert result.fcm_centres.shape == (FAST["n_fcm_clusters"], demo.cube.shape[2])
    # Segments never cross chips.
    for chip, (r, c, h, w) in enumerate(result.chip_windows):
        inside = result.segment_ids[r:r + h, c:c + w]
        assert (result.segment_chip[inside[inside >= 0]] == chip).all()
    assert result.diagnostics["unet_epochs_run"] >= 1
    assert set(result.diagnostics["seconds"]) >= {"fuzzy_cmeans", "slic", "unet_training", "gnn"}


def test_fit_is_deterministic(demo, demo_result, one_torch_thread):
    again = GraphLabelling(seed=0, **FAST).fit(demo.cube, demo.valid, RGB)
    # UMAP (numba) must not leave torch with another thread count: that changes later sums.
    assert torch.get_num_threads() == 1
    for name in ("segment_ids", "segment_features", "segment_membership", "segment_embedding",
                 "segment_umap", "edges", "chip_umap", "chip_neighbours",
                 "chip_neighbour_similarity", "fcm_centres"):
        np.testing.assert_array_equal(getattr(again, name), getattr(demo_result, name),
                                      err_msg=name)


def test_gatv2_fit_gives_64_dimensional_embeddings(demo, one_torch_thread):
    result = GraphLabelling(seed=1, gnn="gatv2", **FAST).fit(demo.cube, demo.valid, RGB)
    assert result.segment_embedding.shape == (result.n_segments, 64)


@pytest.mark.parametrize("case,message", [
    ("two_bands", "at least 3"),
    ("rgb_out_of_range", "out of range"),
    ("chip_too_small", "down-sampling"),
    ("too_few_segments", "too few"),
    ("no_valid", "no valid pixel"),
    ("bad_gnn", "GNN type"),
    ("layout", "does not match"),
])
def test_bad_input_raises_value_error_with_advice(demo, case, message, one_torch_thread):
    cube, valid, rgb, settings = demo.cube, demo.valid, RGB, dict(FAST)
    if case == "two_bands":
        cube, rgb = cube[..., :2], (0, 1, 1)
    elif case == "rgb_out_of_range":
        rgb = (0, 1, 8)
    elif case == "chip_too_small":
        settings.update(chip_size=8, unet_depth=4)
    elif case == "too_few_segments":
        settings.update(segments_per_chip=1, chip_size=64, n_neighbours=8)
    elif case == "no_valid":
        valid = np.zeros_like(valid)
    elif case == "bad_gnn":
        settings.update(gnn="gat")
    elif case == "layout":
        cube = np.moveaxis(cube, 2, 0)  # (bands, H, W) instead of (H, W, bands)
    with pytest.raises(ValueError, match=message) as raised:
        GraphLabelling(seed=0, **settings).fit(cube, valid, rgb)
    assert any(word in str(raised.value) for word in ("hoose", "heck", "pass"))


@pytest.mark.parametrize("cancel_at", [0.01, 0.2, 0.41, 0.5, 0.6])
def test_cancel_stops_the_fit(demo, cancel_at, one_torch_thread):
    seen: list[float] = []

    def is_cancelled() -> bool:
        return bool(seen) and seen[-1] >= cancel_at

    monitor = Monitor(on_progress=seen.append, is_cancelled=is_cancelled)
    with pytest.raises(Cancelled):
        GraphLabelling(seed=0, **FAST).fit(demo.cube, demo.valid, RGB, monitor=monitor)
    # Stopped right after the cancel: no progress far beyond the point of cancelling.
    assert seen[-1] < cancel_at + 0.1
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(seen))  # progress never goes back


def test_edge_chips_narrower_than_the_downsampling_are_merged(demo, one_torch_thread):
    # Chips of 8 with depth 3 (factor 8): the 6-pixel remainder of 46 columns would be a chip
    # the U-Net cannot take; it is merged into its neighbour (14 columns).
    settings = dict(FAST, chip_size=8, unet_depth=3, segments_per_chip=4, n_neighbours=3)
    cube, valid = demo.cube[8:32, 8:54], demo.valid[8:32, 8:54]
    result = GraphLabelling(seed=0, **settings).fit(cube, valid, RGB)
    assert result.chip_windows[:, 2:].min() >= 8
    assert sorted(set(result.chip_windows[:, 3].tolist())) == [8, 14]


def test_geographic_raster_is_chipped_in_pixels(demo, tmp_path, one_torch_thread):
    """A raster in EPSG:4326 (degrees, non-square ground pixels) runs like any other: the engine
    works on the pixel grid."""
    import rasterio
    from rasterio.transform import from_origin

    path = tmp_path / "geographic.tif"
    bands = np.moveaxis(np.where(demo.valid[..., None], demo.cube, -9999.0), 2, 0)
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2],
                       count=bands.shape[0], dtype="float32", nodata=-9999.0, crs="EPSG:4326",
                       transform=from_origin(-4.1, 52.42, 0.00015, 0.0001)) as dataset:
        dataset.write(bands.astype(np.float32))
    raster = read_raster(path)
    result = GraphLabelling(seed=0, **FAST).fit(raster.cube, raster.valid, RGB)
    expected = windows_with_data(chip_windows(*raster.valid.shape, FAST["chip_size"]),
                                 raster.valid)
    np.testing.assert_array_equal(result.chip_windows, expected)
    assert result.n_segments > 8 and np.isfinite(result.segment_embedding).all()


# ------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
def test_s2_aberystwyth_crop(shared_data_dir, one_torch_thread):
    raster = read_raster(shared_data_dir / "s2_aberystwyth" / "cube.tif")
    # Band descriptions are "S2 band N"; bands 1-3 of this file are blue, green, red (10 m).
    cube, valid = raster.cube[300:396, 300:428], raster.valid[300:396, 300:428]
    result = GraphLabelling(
        chip_size=64, segments_per_chip=60, unet_depth=2, unet_width=4, feature_channels=16,
        unet_epochs=2, gnn_epochs=20, seed=0,
    ).fit(cube, valid, rgb_bands=(2, 1, 0))
    # 96 x 128 pixels in chips of 64: the 32-pixel remainder (half a chip) is a chip of its own.
    assert result.chip_windows.tolist() == [[0, 0, 64, 64], [0, 64, 64, 64], [64, 0, 32, 64],
                                            [64, 64, 32, 64]]
    # About the requested number of segments per chip (SLIC adapts the count to the content).
    assert 4 * 60 // 3 <= result.n_segments <= 4 * 60 * 2
    assert result.segment_embedding.shape == (result.n_segments, 60)
    # Eight clusters on a real scene: several of them are dominant somewhere.
    assert len(np.unique(result.segment_fcm_cluster)) >= 3
    assert np.isfinite(result.segment_umap).all()


# ------------------------------------------------------------- U-Net augmentation and stopping


def _random_chip(seed: int, bands: int = 3, classes: int = 2, size: int = 16):
    from engine.unet import ChipTensors

    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(bands, size, size, generator=generator)
    target = torch.softmax(torch.randn(classes, size, size, generator=generator), dim=0)
    mask = torch.ones(1, size, size)
    mask[:, :3, :5] = 0.0  # a nodata corner, so a rotation is visible in the mask
    return ChipTensors(image * mask, target * mask, mask)


def test_augment_rotates_image_target_and_mask_together_and_noises_only_valid_pixels():
    from engine.unet import augment

    chip = _random_chip(0)
    seen_turns = set()
    for seed in range(12):
        out = augment(chip, torch.Generator().manual_seed(seed), noise_std=0.0)
        turns = [t for t in range(4)
                 if torch.equal(out.mask, torch.rot90(chip.mask, t, dims=(1, 2)))]
        assert len(turns) == 1
        turn = turns[0]
        seen_turns.add(turn)
        assert torch.equal(out.image, torch.rot90(chip.image, turn, dims=(1, 2)))
        assert torch.equal(out.target, torch.rot90(chip.target, turn, dims=(1, 2)))
    assert seen_turns == {0, 1, 2, 3}
    noisy = augment(chip, torch.Generator().manual_seed(1), noise_std=0.5)
    turn = next(t for t in range(4) if torch.equal(noisy.mask, torch.rot90(chip.mask, t, (1, 2))))
    difference = noisy.image - torch.rot90(chip.image, turn, dims=(1, 2))
    valid = noisy.mask.expand_as(difference) > 0
    assert torch.all(difference[~valid] == 0)  # nodata stays 0
    assert 0.35 < float(difference[valid].std()) < 0.65


def test_unet_training_stops_early_and_keeps_the_best_weights():
    from engine.unet import evaluate_loss, train_unet

    torch.manual_seed(0)
    model = UNet(3, 2, depth=1, width=4, feature_channels=8)
    # Validation targets unrelated to the training targets: the validation loss soon stops
    # improving, so training must stop after `patience` epochs and restore the best epoch.
    training = [_random_chip(seed) for seed in range(3)]
    validation = [_random_chip(100 + seed) for seed in range(2)]
    report = train_unet(model, training, validation, max_epochs=60, patience=3,
                        learning_rate=0.05, noise_std=0.0,
                        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert report.stopped_early
    assert report.epochs_run < 60
    assert report.epochs_run == report.best_epoch + 3
    best = min(report.validation_losses)
    assert report.best_validation_loss == pytest.approx(best)
    assert report.validation_losses[report.best_epoch - 1] == pytest.approx(best)
    # The model handed back is the best epoch's, not the last one's.
    assert evaluate_loss(model, validation, torch.device("cpu")) == pytest.approx(best, rel=1e-5)
