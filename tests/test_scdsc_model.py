"""SCDSC model files: save after a run, apply window by window to a raster (no QGIS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from engine.demo_scene import make_demo_scene
from engine.monitor import Cancelled, Monitor
from engine.raster_io import read_labels, read_raster
from engine.scdsc import SCDSC
from engine.scdsc_model import apply_scdsc_model, load_scdsc_model, save_scdsc_model
from engine.windowed_io import missing_halo, tile_windows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A small inference tile, so the 40 x 48 scene is applied in many windows (edges included).
TILE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("scdsc_model")
    scene = make_demo_scene(folder, height=40, width=48, n_bands=12, n_classes=4, seed=0,
                            nodata_border=2)
    raster = read_raster(scene.cube_path)
    torch.set_num_threads(1)
    estimator = SCDSC(n_clusters=4, setting="paper", epochs=8, pretrain_steps=10,
                      finch_components=20,
                      init_sample=2000, kmeans_n_init=2, inference_tile=TILE, seed=0)
    result = estimator.fit(raster.cube, raster.valid)
    model_path = save_scdsc_model(estimator, folder / "model.pt", raster.band_numbers,
                                  source_band_count=12)
    return scene, raster, result, model_path


def test_missing_halo_is_what_the_raster_edge_clips():
    windows = tile_windows(40, 48, 16, halo=5)
    first, last = windows[0], windows[-1]
    assert missing_halo(first, 5) == (5, 0, 5, 0)  # left and top edge
    assert missing_halo(last, 5) == (0, 5, 0, 5)  # right and bottom edge
    assert all(min(missing_halo(w, 5)) >= 0 for w in windows)


def test_applied_model_reproduces_the_training_labels(trained, tmp_path: Path):
    scene, raster, result, model_path = trained
    out = tmp_path / "applied.tif"
    summary = apply_scdsc_model(model_path, scene.cube_path, out)
    with rasterio.open(out) as dataset:
        applied = dataset.read(1)
        assert dataset.nodata == 0
        assert dataset.dtypes[0] == "uint8"
        assert dataset.transform == rasterio.open(scene.cube_path).transform
    assert np.array_equal(applied == 0, ~raster.valid)
    agreement = float((applied[raster.valid] == result.labels[raster.valid]).mean())
    assert agreement > 0.999, agreement
    assert summary.n_valid == int(raster.valid.sum())
    assert sum(summary.cluster_sizes) == summary.n_valid


def test_model_file_round_trip(trained):
    _, raster, _, model_path = trained
    model = load_scdsc_model(model_path)
    assert model.n_clusters == 4
    assert model.band_numbers == raster.band_numbers
    assert model.bases.kernels.shape == (4 * 5, 32, 7, 7)


def test_band_count_mismatch_is_refused(trained, tmp_path: Path):
    scene, _, _, model_path = trained
    with rasterio.open(scene.cube_path) as source:
        profile = source.profile
        data = source.read()[:10]
    profile.update(count=10)
    fewer = tmp_path / "ten_bands.tif"
    with rasterio.open(fewer, "w", **profile) as target:
        target.write(data)
    out = tmp_path / "out.tif"
    with pytest.raises(ValueError, match="12 band"):
        apply_scdsc_model(model_path, fewer, out)
    assert not out.exists()


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not an HSI Cluster model"):
        load_scdsc_model(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"algorithm": "ms2anet", "format_version": 1}, foreign)
    with pytest.raises(ValueError, match="not an SCDSC model"):
        load_scdsc_model(foreign)


def test_cancel_leaves_no_output(trained, tmp_path: Path):
    scene, _, _, model_path = trained
    out = tmp_path / "cancelled.tif"
    calls = []

    def cancel_after_two_windows() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        apply_scdsc_model(model_path, scene.cube_path, out,
                          monitor=Monitor(is_cancelled=cancel_after_two_windows))
    assert not out.exists()
    assert not list(tmp_path.glob(".cancelled-*"))


@pytest.mark.parametrize("setting", ["paper", "adaptive"])
def test_both_settings_save_models_that_reproduce_their_labels(tmp_path: Path, setting: str):
    scene = make_demo_scene(tmp_path, height=36, width=40, n_bands=10, n_classes=3, seed=1,
                            nodata_border=2)
    raster = read_raster(scene.cube_path)
    estimator = SCDSC(n_clusters=3, setting=setting, epochs=6, pretrain_steps=8,
                      finch_components=16, init_sample=1500, kmeans_n_init=2,
                      inference_tile=TILE, seed=0)
    result = estimator.fit(raster.cube, raster.valid, pixel_size_m=10.0)
    model_path = save_scdsc_model(estimator, tmp_path / "model.pt", raster.band_numbers,
                                  source_band_count=10)
    loaded = load_scdsc_model(model_path)
    assert loaded.estimator.patch_size_ == estimator.patch_size_
    assert loaded.preprocessing.pca.components.shape[0] == estimator.n_components_
    out = tmp_path / "applied.tif"
    apply_scdsc_model(model_path, scene.cube_path, out)
    applied, _ = read_labels(out)
    np.testing.assert_array_equal(applied, result.labels)
