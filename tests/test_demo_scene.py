"""Tests of the generated demo scene (engine.demo_scene)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler

from engine.demo_scene import CUBE_NODATA, DemoScene, make_demo_scene
from engine.metrics import score_clustering

REPO_ROOT = Path(__file__).resolve().parents[1]


def _read(scene: DemoScene) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(scene.cube_path) as cube_file:
        cube = cube_file.read()
    with rasterio.open(scene.truth_path) as truth_file:
        truth = truth_file.read(1)
    return cube, truth


@pytest.fixture(scope="module")
def default_scene(tmp_path_factory: pytest.TempPathFactory) -> DemoScene:
    return make_demo_scene(tmp_path_factory.mktemp("demo"))


def test_files_grid_and_metadata(default_scene: DemoScene) -> None:
    assert default_scene.cube_path.name == "demo_cube.tif"
    assert default_scene.truth_path.name == "demo_truth.tif"
    assert default_scene.n_classes == 5
    assert len(default_scene.class_names) == 5
    with rasterio.open(default_scene.cube_path) as cube_file:
        assert cube_file.crs.to_epsg() == 32633
        assert cube_file.transform.a == 10.0
        assert cube_file.transform.e == -10.0  # north-up
        assert cube_file.transform.b == cube_file.transform.d == 0.0
        assert cube_file.transform.c > 100_000  # a plausible UTM easting, not 0
        assert cube_file.count == 32
        assert cube_file.shape == (120, 140)
        assert set(cube_file.dtypes) == {"float32"}
        assert cube_file.nodata == CUBE_NODATA
        assert cube_file.descriptions[0] == "band 1 (450 nm)"
        assert all(description.endswith(" nm)") for description in cube_file.descriptions)
        cube_grid = (cube_file.crs, cube_file.transform, cube_file.shape)
    with rasterio.open(default_scene.truth_path) as truth_file:
        assert truth_file.dtypes == ("uint8",)
        assert truth_file.nodata == 0
        assert (truth_file.crs, truth_file.transform, truth_file.shape) == cube_grid


def test_border_and_isolated_nodata(default_scene: DemoScene) -> None:
    cube, truth = _read(default_scene)
    border = 4
    ring = np.ones(truth.shape, dtype=bool)
    ring[border:-border, border:-border] = False
    assert np.all(cube[:, ring] == CUBE_NODATA)
    assert np.all(truth[ring] == 0)
    # Nodata is all-bands-or-nothing, and truth is 0 exactly where the cube is nodata.
    nodata = cube == CUBE_NODATA
    assert np.array_equal(nodata.all(axis=0), nodata.any(axis=0))
    assert np.array_equal(nodata[0], truth == 0)
    interior_nodata = nodata[0, border:-border, border:-border]
    assert 1 <= interior_nodata.sum() <= 50
    assert np.all(np.isfinite(cube))


def test_every_class_present_with_reasonable_counts(default_scene: DemoScene) -> None:
    _, truth = _read(default_scene)
    counts = np.bincount(truth.ravel(), minlength=default_scene.n_classes + 1)
    assert counts.size == default_scene.n_classes + 1  # no label beyond n_classes
    valid = counts[1:].sum()
    assert np.all(counts[1:] >= 0.05 * valid), counts


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = make_demo_scene(tmp_path / "a", seed=3)
    second = make_demo_scene(tmp_path / "b", seed=3)
    other = make_demo_scene(tmp_path / "c", seed=4)
    first_cube, first_truth = _read(first)
    second_cube, second_truth = _read(second)
    other_cube, other_truth = _read(other)
    assert np.array_equal(first_cube, second_cube)
    assert np.array_equal(first_truth, second_truth)
    assert first.cube_path.read_bytes() == second.cube_path.read_bytes()
    assert not np.array_equal(first_truth, other_truth)
    assert not np.array_equal(first_cube, other_cube)


def test_kmeans_learns_the_scene_but_not_perfectly(default_scene: DemoScene) -> None:
    cube, truth = _read(default_scene)
    valid = truth > 0
    spectra = StandardScaler().fit_transform(cube[:, valid].T)
    predicted = np.zeros(truth.shape, dtype=np.int64)
    kmeans = KMeans(n_clusters=default_scene.n_classes, n_init=4, random_state=0)
    predicted[valid] = kmeans.fit_predict(spectra) + 1
    scores = score_clustering(truth, predicted)
    assert 0.6 <= scores.overall_accuracy <= 0.97, scores.summary()


def test_other_sizes_and_more_classes(tmp_path: Path) -> None:
    scene = make_demo_scene(tmp_path, height=40, width=50, n_bands=12, n_classes=9, seed=1)
    cube, truth = _read(scene)
    assert cube.shape == (12, 40, 50)
    assert len(scene.class_names) == len(set(scene.class_names)) == 9
    assert truth.max() <= 9


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_scene(tmp_path, n_classes=1)
    with pytest.raises(ValueError):
        make_demo_scene(tmp_path, height=10, width=10, nodata_border=4)


def test_cli_prints_paths(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "engine.demo_scene", str(tmp_path), "--seed", "2", "--height", "60"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert str(tmp_path / "demo_cube.tif") in completed.stdout
    assert str(tmp_path / "demo_truth.tif") in completed.stdout
    with rasterio.open(tmp_path / "demo_cube.tif") as cube_file:
        assert cube_file.height == 60
