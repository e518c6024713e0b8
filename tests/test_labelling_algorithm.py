"""The "Build labelling embedding" Processing algorithm (``hsicluster:labellingembedding``) in
real QGIS: out-of-process through ``qgis_process.bin`` and in-process through
``processing.run``, writing real GeoPackages.

Data are tiny (a 64x64-pixel, 8-band demo scene cut into four 32-pixel chips of ~12 SLIC
segments each) and training is a few epochs. The first UMAP in a process pays numba's JIT
compilation (~20 s measured on two shared cores); every later run in the same process takes 1-2 s.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from engine.demo_scene import CUBE_NODATA, DemoScene, make_demo_scene

# One OpenMP thread for the qgis_process.bin runs (see tests/test_scdsc_algorithm.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ALGORITHM_ID = "hsicluster:labellingembedding"
C = 4
K = 8
FAST = {"N_FCM_CLUSTERS": C, "CHIP_SIZE": 32, "SEGMENTS_PER_CHIP": 30, "N_NEIGHBOURS": K,
        "UNET_EPOCHS": 2, "GNN_EPOCHS": 5, "SEED": 0, "DEVICE": 1}
CANCEL_LATENCY_S = 5.0
EPSG = 32633
PIXEL_M = 10.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> DemoScene:
    return make_demo_scene(tmp_path_factory.mktemp("scene"), height=64, width=64, n_bands=8,
                           n_classes=3, seed=0, nodata_border=2)


@pytest.fixture(scope="module")
def processing_module(qgis_app):
    import processing

    return processing


def _feedback_class():
    from qgis.core import QgsProcessingFeedback

    class RecordingFeedback(QgsProcessingFeedback):
        """Records info lines; cancels once an info line contains ``cancel_on``."""

        def __init__(self, cancel_on: str | None = None):
            super().__init__()
            self.infos: list[str] = []
            self.cancel_on = cancel_on
            self.cancelled_at: float | None = None

        def pushInfo(self, info: str) -> None:  # noqa: N802 - Qt naming
            self.infos.append(info)
            if self.cancel_on is not None and self.cancel_on in info and \
                    self.cancelled_at is None:
                self.cancelled_at = time.monotonic()
                self.cancel()
            super().pushInfo(info)

    return RecordingFeedback


def _run(processing_module, parameters: dict, feedback=None) -> dict:
    feedback = feedback if feedback is not None else _feedback_class()()
    return processing_module.run(ALGORITHM_ID, parameters, feedback=feedback)


def _params(input_path: Path, output: Path, **overrides) -> dict:
    return {"INPUT": str(input_path), **FAST, "SEGMENTS": str(output), **overrides}


def _layer(path: Path, name: str):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername={name}", name, "ogr")
    assert layer.isValid(), f"layer {name} of {path} does not open"
    return layer


def _segments(path: Path) -> list:
    return sorted(_layer(path, "segments").getFeatures(), key=lambda f: f["segment_id"])


def _assert_no_output(output: Path) -> None:
    leftovers = [p.name for p in output.parent.iterdir()]
    assert leftovers == [], f"left behind: {leftovers}"


def _write_raster(path: Path, data: np.ndarray, crs: CRS, transform: Affine) -> Path:
    count, height, width = data.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=count,
                           dtype="float32", nodata=CUBE_NODATA, crs=crs,
                           transform=transform) as dataset:
            dataset.write(data.astype(np.float32))
    return path


def _valid_pixels(path: Path) -> int:
    with rasterio.open(path) as dataset:
        cube = dataset.read()
    return int((~np.any((cube == CUBE_NODATA) | ~np.isfinite(cube), axis=0)).sum())


# ------------------------------------------------------------------------------------ RGB guess


@pytest.mark.parametrize(("names", "expected"), [
    (["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A"], (4, 3, 2)),  # Sentinel-2 names
    (["B02", "B03", "B04", "B08"], (3, 2, 1)),  # 10 m Sentinel-2 stack, zero-padded names
    (["Blue", "Green", "Red", "Red Edge 1", "NIR"], (3, 2, 1)),  # words; red edge is not red
    (["band 1 (443 nm)", "band 2 (492 nm)", "band 3 (560 nm)", "band 4 (665 nm)",
      "band 5 (704 nm)"], (4, 3, 2)),  # centre wavelengths
    (["b (0.49 um)", "g (0.56 um)", "r (0.67 um)", "n (0.84 um)"], (3, 2, 1)),  # micrometres
    (["Band 1", "Band 2", "Band 3", "Band 4", "Band 5"], (3, 2, 1)),  # nothing to go by
    (["band 1 (450 nm)", "band 2 (800 nm)", "band 3 (1200 nm)"], (3, 2, 1)),  # no RGB nearby
])
def test_guess_rgb_bands(qgis_app, names: list[str], expected: tuple[int, int, int]) -> None:
    from processing_provider.labelling_algorithm import guess_rgb_bands

    assert guess_rgb_bands(list(range(1, len(names) + 1)), names) == expected


def test_guess_rgb_bands_returns_file_band_numbers(qgis_app) -> None:
    """With a band selection, the guess names bands of the file, not positions."""
    from processing_provider.labelling_algorithm import guess_rgb_bands

    assert guess_rgb_bands([2, 3, 4, 8], ["B2", "B3", "B4", "B8"]) == (4, 3, 2)
    assert guess_rgb_bands([5, 7, 9], ["Band 5", "Band 7", "Band 9"]) == (9, 7, 5)


# ------------------------------------------------------------------------------------ end to end


def test_qgis_process_end_to_end(scene: DemoScene, run_qgis_process, qgis_app,
                                 tmp_out: Path) -> None:
    from qgis.core import QgsCoordinateReferenceSystem, QgsRasterLayer, QgsWkbTypes
    from qgis.PyQt.QtCore import QVariant

    output = tmp_out / "embedding.gpkg"
    args = ["--json", "run", ALGORITHM_ID, "--", f"INPUT={scene.cube_path}",
            f"SEGMENTS={output}", *[f"{name}={value}" for name, value in FAST.items()]]
    proc = run_qgis_process(args)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["results"]["SEGMENTS"] == f"{output}|layername=segments"
    assert report["results"]["CHIPS"] == f"{output}|layername=chips"
    assert sorted(p.name for p in tmp_out.iterdir()) == ["embedding.gpkg"]

    raster_crs = QgsRasterLayer(str(scene.cube_path), "cube", "gdal").crs()
    assert raster_crs.authid() == f"EPSG:{EPSG}"
    segments_layer = _layer(output, "segments")
    assert segments_layer.crs() == raster_crs == QgsCoordinateReferenceSystem(f"EPSG:{EPSG}")
    assert QgsWkbTypes.flatType(segments_layer.wkbType()) == QgsWkbTypes.MultiPolygon
    types = {field.name(): field.type() for field in segments_layer.fields()}
    for name, kind in (("segment_id", QVariant.Int), ("chip_id", QVariant.Int),
                       ("n_pixels", QVariant.Int), ("umap_x", QVariant.Double),
                       ("umap_y", QVariant.Double), ("fcm_cluster", QVariant.Int),
                       ("label", QVariant.String), ("area", QVariant.Double)):
        assert types.get(name) == kind, f"field {name}: {types.get(name)}"

    features = _segments(output)
    n_segments = len(features)
    assert n_segments >= K + 1
    assert [f["segment_id"] for f in features] == list(range(n_segments))
    assert all(1 <= f["fcm_cluster"] <= C for f in features)
    umap = np.array([[f["umap_x"], f["umap_y"]] for f in features], dtype=float)
    assert np.isfinite(umap).all()
    assert umap.std(axis=0).min() > 0  # a real layout, not one point
    # Segments tile the valid pixels exactly: pixel counts and areas (UTM metres) add up.
    n_valid = _valid_pixels(scene.cube_path)
    assert sum(f["n_pixels"] for f in features) == n_valid
    assert sum(f["area"] for f in features) == pytest.approx(n_valid * PIXEL_M**2)
    for feature in features:
        assert feature.geometry().area() == pytest.approx(feature["n_pixels"] * PIXEL_M**2)
    raster_extent = QgsRasterLayer(str(scene.cube_path), "cube", "gdal").extent()
    assert raster_extent.contains(segments_layer.extent())

    chips_layer = _layer(output, "chips")
    assert chips_layer.crs() == raster_crs
    chips = sorted(chips_layer.getFeatures(), key=lambda f: f["chip_id"])
    assert len(chips) == 4  # 64 x 64 pixels in 32-pixel chips
    assert sum(c["n_segments"] for c in chips) == n_segments
    assert {f["chip_id"] for f in features} == {c["chip_id"] for c in chips}
    for chip in chips:
        assert chip.geometry().area() == pytest.approx((32 * PIXEL_M) ** 2)

    assert _layer(output, "segment_embeddings").featureCount() == n_segments
    assert _layer(output, "chip_neighbours").featureCount() > 0
    metadata = {f["key"]: f["value"] for f in _layer(output, "hsi_cluster_metadata")
                .getFeatures()}
    assert Path(metadata["source"]) == scene.cube_path
    assert json.loads(metadata["parameters"])["chip_size"] == 32
    assert json.loads(metadata["parameters"])["n_fcm_clusters"] == C
    assert metadata["crs"] == f"EPSG:{EPSG}"
    assert json.loads(metadata["rgb_bands"]) == [3, 2, 1]  # no RGB in 450..2400 nm / 8 bands


def test_same_seed_same_embedding(scene: DemoScene, processing_module, tmp_out: Path) -> None:
    def umap_x(name: str, seed: int) -> np.ndarray:
        output = tmp_out / name
        _run(processing_module, _params(scene.cube_path, output, SEED=seed))
        return np.array([f["umap_x"] for f in _segments(output)])

    first, again, other = umap_x("a.gpkg", 0), umap_x("b.gpkg", 0), umap_x("c.gpkg", 1)
    np.testing.assert_array_equal(first, again)
    assert other.shape != first.shape or not np.allclose(other, first)


def test_geographic_raster_area_in_square_metres(processing_module, tmp_out: Path) -> None:
    """An EPSG:4326 raster: geometries in degrees, ``area`` in m² on the ellipsoid."""
    from pyproj import Geod

    rng = np.random.default_rng(1)
    cube = rng.normal(0.3, 0.05, (4, 32, 32)).astype(np.float32)
    cube[:, :, 16:] += 0.3
    degree = 0.0001
    raster = _write_raster(tmp_out / "wgs84.tif", cube, CRS.from_epsg(4326),
                           Affine(degree, 0.0, 10.0, 0.0, -degree, 50.0))
    output = tmp_out / "wgs84.gpkg"
    _run(processing_module, _params(raster, output, N_FCM_CLUSTERS=2, CHIP_SIZE=16,
                                    SEGMENTS_PER_CHIP=6, N_NEIGHBOURS=3))
    features = _segments(output)
    assert _layer(output, "segments").crs().authid() == "EPSG:4326"
    # The scene spans 3.2 mm of latitude: one pixel's ellipsoidal area at the centre is exact
    # to ~1e-6 for every pixel.
    centre_lat = 50.0 - 16 * degree
    pixel_m2 = abs(Geod(ellps="WGS84").polygon_area_perimeter(
        [10.0, 10.0 + degree, 10.0 + degree, 10.0],
        [centre_lat, centre_lat, centre_lat + degree, centre_lat + degree])[0])
    assert 70 < pixel_m2 < 80  # about 7.2 m x 11.1 m
    assert sum(f["area"] for f in features) == pytest.approx(32 * 32 * pixel_m2, rel=1e-4)
    for feature in features:
        assert feature["area"] == pytest.approx(feature["n_pixels"] * pixel_m2, rel=1e-4)
        assert feature.geometry().area() == pytest.approx(feature["n_pixels"] * degree**2)


# ------------------------------------------------------------------------------------ bad input


def test_fewer_than_three_bands(processing_module, tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    raster = _write_raster(tmp_out / "two_bands.tif", np.ones((2, 16, 16)) * [[[1.0]], [[2.0]]],
                           CRS.from_epsg(EPSG), Affine(10, 0, 500_000, 0, -10, 5_300_000))
    output_dir = tmp_out / "out"
    output_dir.mkdir()
    with pytest.raises(QgsProcessingException, match="at least 3"):
        _run(processing_module, _params(raster, output_dir / "x.gpkg"))
    _assert_no_output(output_dir / "x.gpkg")


def test_chip_smaller_than_unet_downsampling(scene: DemoScene, processing_module,
                                             tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match=r"down-sampling factor 8"):
        _run(processing_module, _params(scene.cube_path, tmp_out / "x.gpkg", CHIP_SIZE=4,
                                        UNET_DEPTH=3))
    _assert_no_output(tmp_out / "x.gpkg")


def test_too_few_segments_for_k_neighbours(processing_module, tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    cube = np.random.default_rng(0).normal(0.3, 0.05, (4, 16, 16))
    raster = _write_raster(tmp_out / "small.tif", cube, CRS.from_epsg(EPSG),
                           Affine(10, 0, 500_000, 0, -10, 5_300_000))
    output_dir = tmp_out / "out"
    output_dir.mkdir()
    with pytest.raises(QgsProcessingException, match=f"{K} spatial neighbours"):
        _run(processing_module, _params(raster, output_dir / "x.gpkg", CHIP_SIZE=16,
                                        SEGMENTS_PER_CHIP=2))
    _assert_no_output(output_dir / "x.gpkg")


def test_rgb_band_outside_band_selection(scene: DemoScene, processing_module,
                                         tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match=r"RGB band\(s\) \[6\].*band selection"):
        _run(processing_module, _params(scene.cube_path, tmp_out / "x.gpkg",
                                        BANDS=[1, 2, 3, 4], RED_BAND=6))
    _assert_no_output(tmp_out / "x.gpkg")


def test_output_must_be_a_geopackage(scene: DemoScene, processing_module, tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match=r"\.gpkg"):
        _run(processing_module, _params(scene.cube_path, tmp_out / "x.shp"))
    _assert_no_output(tmp_out / "x.shp")


def test_missing_output_folder(scene: DemoScene, processing_module, tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="does not exist"):
        _run(processing_module, _params(scene.cube_path, tmp_out / "missing" / "x.gpkg"))
    _assert_no_output(tmp_out / "x.gpkg")


def test_explicit_rgb_bands_and_temporary_output(scene: DemoScene, processing_module) -> None:
    results = _run(processing_module, _params(scene.cube_path, Path("unused"),
                                              SEGMENTS="TEMPORARY_OUTPUT", BANDS=[2, 4, 5, 6, 7],
                                              RED_BAND=6, GREEN_BAND=5, BLUE_BAND=4))
    path, layer_name = results["SEGMENTS"].split("|layername=")
    assert path.endswith(".gpkg") and layer_name == "segments"
    metadata = {f["key"]: f["value"] for f in _layer(Path(path), "hsi_cluster_metadata")
                .getFeatures()}
    assert json.loads(metadata["rgb_bands"]) == [6, 5, 4]
    assert json.loads(metadata["bands"]) == [2, 4, 5, 6, 7]
    assert metadata["engine_version"] not in ("", "unknown")


# ------------------------------------------------------------------------------------ cancel


def test_cancel_during_unet_training(scene: DemoScene, processing_module, tmp_out: Path) -> None:
    from qgis.core import QgsProcessingException

    output = tmp_out / "cancelled.gpkg"
    feedback = _feedback_class()(cancel_on="U-Net training")
    with pytest.raises(QgsProcessingException, match="cancelled"):
        _run(processing_module, _params(scene.cube_path, output, UNET_EPOCHS=5000), feedback)
    assert feedback.cancelled_at is not None
    assert time.monotonic() - feedback.cancelled_at < CANCEL_LATENCY_S
    assert not any("segments in" in line for line in feedback.infos)
    _assert_no_output(output)


# ------------------------------------------------------------------------------------ registration


def test_algorithm_is_registered_and_documented(qgis_app) -> None:
    from qgis.core import QgsApplication, QgsProcessingAlgorithm

    registered = QgsApplication.processingRegistry().algorithmById(ALGORITHM_ID)
    assert registered is not None
    instance = registered.createInstance()
    instance.initAlgorithm()
    assert instance.name() == "labellingembedding"
    assert instance.displayName() == "Build labelling embedding"
    assert instance.flags() & QgsProcessingAlgorithm.FlagCanCancel
    help_text = instance.shortHelpString()
    assert "Leveraging Convolutional and Graph Networks" in help_text
    for word in ("segments", "chips", "segment_embeddings", "chip_neighbours",
                 "hsi_cluster_metadata", "Laptop-size U-Net", "RGB bands"):
        assert word in help_text, word

    names = {p.name() for p in instance.parameterDefinitions()}
    assert {"INPUT", "BANDS", "RED_BAND", "GREEN_BAND", "BLUE_BAND", "N_FCM_CLUSTERS",
            "CHIP_SIZE", "SEGMENTS_PER_CHIP", "COMPACTNESS", "N_NEIGHBOURS", "GNN",
            "UNET_DEPTH", "UNET_WIDTH", "UNET_EPOCHS", "GNN_EPOCHS", "SEED", "DEVICE",
            "SEGMENTS"} <= names
    for parameter in instance.parameterDefinitions():
        assert parameter.description().strip(), f"{parameter.name()} has no description"
    assert {o.name() for o in instance.outputDefinitions()} >= {"SEGMENTS", "CHIPS"}
    assert instance.parameterDefinition("N_FCM_CLUSTERS").defaultValue() == 8
    assert instance.parameterDefinition("SEGMENTS_PER_CHIP").defaultValue() == 500
    assert instance.parameterDefinition("N_NEIGHBOURS").defaultValue() == 8
    gnn = instance.parameterDefinition("GNN")
    assert [o.split()[0] for o in gnn.options()] == ["GCN", "GATv2"]
    assert gnn.defaultValue() == 0


def test_both_layers_load_by_name(scene: DemoScene, processing_module, tmp_out: Path) -> None:
    """In desktop QGIS the output loads as the `segments` and `chips` layers, not as whichever
    layer of the GeoPackage OGR lists first."""
    from qgis.core import QgsProcessingContext, QgsProcessingOutputLayerDefinition, QgsProject

    output = tmp_out / "loaded.gpkg"
    project = QgsProject()
    context = QgsProcessingContext()
    context.setProject(project)
    parameters = _params(scene.cube_path, output,
                         SEGMENTS=QgsProcessingOutputLayerDefinition(str(output), project))
    processing_module.run(ALGORITHM_ID, parameters, context=context,
                          feedback=_feedback_class()())
    to_load = context.layersToLoadOnCompletion()
    segments_uri, chips_uri = f"{output}|layername=segments", f"{output}|layername=chips"
    # The input image comes along (it is not in the project) to show under the segments.
    assert set(to_load) == {segments_uri, chips_uri, str(scene.cube_path)}
    assert to_load[str(scene.cube_path)].outputName == "INPUT"
    assert to_load[chips_uri].outputName == "CHIPS"
    assert to_load[segments_uri].project is project
    assert _layer(output, "chips").featureCount() == 4
