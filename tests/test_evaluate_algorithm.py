"""The "Evaluate clustering" Processing algorithm (``hsicluster:evaluateclustering``) in real QGIS:
against a label raster and against a polygon layer in another CRS, in-process and through
``qgis_process.bin``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from osgeo import ogr, osr
from rasterio.crs import CRS

from engine.demo_scene import (
    CRS_EPSG,
    ORIGIN_EASTING_M,
    ORIGIN_NORTHING_M,
    PIXEL_SIZE_M,
    DemoScene,
    make_demo_scene,
)
from engine.metrics import score_clustering
from engine.raster_io import RasterGrid, read_labels, write_label_raster

ALGORITHM_ID = "hsicluster:evaluateclustering"
K = 3


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> DemoScene:
    return make_demo_scene(tmp_path_factory.mktemp("scene"), height=40, width=48, n_bands=12,
                           n_classes=K, seed=0, nodata_border=2)


@pytest.fixture(scope="module")
def permuted_clusters(scene: DemoScene, tmp_path_factory) -> Path:
    """The truth with class ids permuted (1->3, 2->1, 3->2): a perfect clustering."""
    truth, grid = read_labels(scene.truth_path)
    permutation = np.array([0, 3, 1, 2])
    path = tmp_path_factory.mktemp("clusters") / "permuted.tif"
    write_label_raster(path, permutation[truth], grid, K)
    return path


@pytest.fixture(scope="module")
def processing_module(qgis_app):
    import processing

    return processing


def _run(processing_module, parameters: dict) -> dict:
    from qgis.core import QgsProcessingFeedback

    return processing_module.run(ALGORITHM_ID, parameters, feedback=QgsProcessingFeedback())


# ------------------------------------------------------------------------------------ raster


def test_perfect_clustering_against_truth_raster(scene: DemoScene, permuted_clusters: Path,
                                                 processing_module) -> None:
    truth, _ = read_labels(scene.truth_path)
    results = _run(processing_module, {"INPUT": str(permuted_clusters),
                                       "REFERENCE_RASTER": str(scene.truth_path)})
    assert results["OA"] == pytest.approx(1.0)
    assert results["NMI"] == pytest.approx(1.0)
    assert results["KAPPA"] == pytest.approx(1.0)
    assert results["ARI"] == pytest.approx(1.0)
    assert results["N_SCORED"] == int((truth > 0).sum())


def test_imperfect_clustering_matches_engine_scores(scene: DemoScene, processing_module,
                                                    tmp_out: Path) -> None:
    truth, grid = read_labels(scene.truth_path)
    rng = np.random.default_rng(0)
    predicted = truth.copy()
    flip = (truth > 0) & (rng.random(truth.shape) < 0.2)
    predicted[flip] = rng.integers(1, K + 1, size=int(flip.sum()))
    predicted[5, 5:9] = 0  # a few unpredicted pixels are left out of the scores
    path = tmp_out / "noisy.tif"
    write_label_raster(path, predicted, grid, K)
    expected = score_clustering(truth, predicted)
    assert 0.7 < expected.overall_accuracy < 1.0

    results = _run(processing_module, {"INPUT": str(path),
                                       "REFERENCE_RASTER": str(scene.truth_path)})
    assert results["OA"] == pytest.approx(expected.overall_accuracy)
    assert results["NMI"] == pytest.approx(expected.nmi)
    assert results["KAPPA"] == pytest.approx(expected.kappa)
    assert results["ARI"] == pytest.approx(expected.ari)
    assert results["N_SCORED"] == expected.n_scored


# ------------------------------------------------------------------------------------ polygons

# A 20 x 30 cluster raster on the demo scene's UTM grid. Clusters: 1 left of column 15, 2 right
# of it, 3 on rows >= 15 (overriding both); pixel (3, 3) is nodata.
POLY_HEIGHT, POLY_WIDTH = 20, 30
# Rectangles in pixel indices: (first row, last row, first col, last col, class name).
RECTANGLES = [
    (2, 6, 2, 8, "water"),  # 5 x 7 = 35 px, all in cluster 1 (one of them nodata)
    (8, 11, 12, 19, "forest"),  # 4 x 8 = 32 px: 12 in cluster 1 (cols 12-14), 20 in cluster 2
    (16, 18, 20, 27, "meadow"),  # 3 x 8 = 24 px, all in cluster 3
]
# By hand: Hungarian matching 1->water, 2->forest, 3->meadow. Scored: 35 + 32 + 24 - 1 = 90
# pixels (the nodata pixel is left out); correct: 34 (water) + 20 (forest) + 24 (meadow) = 78.
EXPECTED_N_SCORED = 90
EXPECTED_OA = 78 / 90
EXPECTED_CLASS_ACCURACY = {"water": 1.0, "forest": 20 / 32, "meadow": 1.0}
EXPECTED_CLASS_PIXELS = {"water": 35, "forest": 32, "meadow": 24}


def _poly_grid() -> RasterGrid:
    from affine import Affine

    transform = Affine(PIXEL_SIZE_M, 0.0, ORIGIN_EASTING_M, 0.0, -PIXEL_SIZE_M, ORIGIN_NORTHING_M)
    return RasterGrid(POLY_HEIGHT, POLY_WIDTH, CRS.from_epsg(CRS_EPSG).to_wkt(), transform)


def _poly_clusters() -> np.ndarray:
    clusters = np.ones((POLY_HEIGHT, POLY_WIDTH), dtype=np.int32)
    clusters[:, 15:] = 2
    clusters[15:, :] = 3
    clusters[3, 3] = 0
    return clusters


def _hand_rasterized_reference() -> tuple[np.ndarray, dict[str, int]]:
    codes = {name: code for code, name in enumerate(sorted(r[4] for r in RECTANGLES), start=1)}
    reference = np.zeros((POLY_HEIGHT, POLY_WIDTH), dtype=np.int64)
    for row0, row1, col0, col1, name in RECTANGLES:
        reference[row0 : row1 + 1, col0 : col1 + 1] = codes[name]
    return reference, codes


def _write_rectangles_gpkg(path: Path) -> None:
    """The rectangles, edges on pixel boundaries, as lon/lat polygons (EPSG:4326)."""
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(CRS_EPSG)
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    wgs84.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)  # x = lon, y = lat
    utm.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    to_wgs84 = osr.CoordinateTransformation(utm, wgs84)

    dataset = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = dataset.CreateLayer("reference", srs=wgs84, geom_type=ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("landcover", ogr.OFTString))
    for row0, row1, col0, col1, name in RECTANGLES:
        left = ORIGIN_EASTING_M + col0 * PIXEL_SIZE_M
        right = ORIGIN_EASTING_M + (col1 + 1) * PIXEL_SIZE_M
        top = ORIGIN_NORTHING_M - row0 * PIXEL_SIZE_M
        bottom = ORIGIN_NORTHING_M - (row1 + 1) * PIXEL_SIZE_M
        ring = ogr.Geometry(ogr.wkbLinearRing)
        for x, y in ((left, top), (right, top), (right, bottom), (left, bottom), (left, top)):
            lon, lat, _ = to_wgs84.TransformPoint(x, y)
            ring.AddPoint_2D(lon, lat)
        polygon = ogr.Geometry(ogr.wkbPolygon)
        polygon.AddGeometry(ring)
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("landcover", name)
        feature.SetGeometry(polygon)
        layer.CreateFeature(feature)
    dataset = None


@pytest.fixture
def polygon_case(tmp_out: Path) -> dict:
    clusters_path = tmp_out / "clusters_utm.tif"
    write_label_raster(clusters_path, _poly_clusters(), _poly_grid(), K)
    reference_path = tmp_out / "reference_wgs84.gpkg"
    _write_rectangles_gpkg(reference_path)
    return {"clusters": clusters_path, "reference": reference_path}


def test_polygon_reference_in_another_crs(polygon_case: dict, processing_module,
                                          tmp_out: Path) -> None:
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(str(polygon_case["reference"]), "reference", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4326"
    assert layer.featureCount() == len(RECTANGLES)

    # The hand-made expectation agrees with the engine's scores on the hand-rasterized reference.
    reference, _ = _hand_rasterized_reference()
    independent = score_clustering(reference, _poly_clusters())
    assert independent.n_scored == EXPECTED_N_SCORED
    assert independent.overall_accuracy == pytest.approx(EXPECTED_OA)

    table_path = tmp_out / "per_class.gpkg"
    results = _run(processing_module, {
        "INPUT": str(polygon_case["clusters"]),
        "REFERENCE_POLYGONS": str(polygon_case["reference"]),
        "CLASS_FIELD": "landcover",
        "OUTPUT_TABLE": str(table_path),
    })
    assert results["N_SCORED"] == EXPECTED_N_SCORED
    assert results["OA"] == pytest.approx(EXPECTED_OA)
    assert results["KAPPA"] == pytest.approx(independent.kappa)
    assert results["NMI"] == pytest.approx(independent.nmi)
    assert results["ARI"] == pytest.approx(independent.ari)

    table = results["OUTPUT_TABLE"]
    if isinstance(table, str):
        table = QgsVectorLayer(table, "table", "ogr")
    assert table.isValid()
    rows = {feature["class"]: feature for feature in table.getFeatures()}
    assert table.featureCount() == len(RECTANGLES)
    assert set(rows) == set(EXPECTED_CLASS_ACCURACY)
    for name, accuracy in EXPECTED_CLASS_ACCURACY.items():
        assert rows[name]["accuracy"] == pytest.approx(accuracy), name
        assert rows[name]["pixels"] == EXPECTED_CLASS_PIXELS[name], name
    assert {rows[name]["cluster"] for name in rows} == {1, 2, 3}
    assert rows["water"]["cluster"] == 1 and rows["forest"]["cluster"] == 2
    assert rows["meadow"]["cluster"] == 3


def test_polygon_reference_needs_a_class_field(polygon_case: dict, processing_module) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="class field"):
        _run(processing_module, {"INPUT": str(polygon_case["clusters"]),
                                 "REFERENCE_POLYGONS": str(polygon_case["reference"])})


def test_reference_is_exactly_one_of_raster_and_polygons(scene: DemoScene, polygon_case: dict,
                                                         processing_module) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="No reference given"):
        _run(processing_module, {"INPUT": str(polygon_case["clusters"])})
    with pytest.raises(QgsProcessingException, match="Give one reference, not both"):
        _run(processing_module, {"INPUT": str(polygon_case["clusters"]),
                                 "REFERENCE_RASTER": str(scene.truth_path),
                                 "REFERENCE_POLYGONS": str(polygon_case["reference"]),
                                 "CLASS_FIELD": "landcover"})


def test_legacy_reference_parameter_still_runs(scene: DemoScene, permuted_clusters: Path,
                                               polygon_case: dict, processing_module) -> None:
    """Scripts written before the reference was split pass REFERENCE (raster or polygons)."""
    results = _run(processing_module, {"INPUT": str(permuted_clusters),
                                       "REFERENCE": str(scene.truth_path)})
    assert results["OA"] == pytest.approx(1.0)
    results = _run(processing_module, {"INPUT": str(polygon_case["clusters"]),
                                       "REFERENCE": str(polygon_case["reference"]),
                                       "CLASS_FIELD": "landcover"})
    assert results["OA"] == pytest.approx(EXPECTED_OA)


# ------------------------------------------------------------------------------------ qgis_process


def test_qgis_process_json(scene: DemoScene, permuted_clusters: Path, run_qgis_process,
                           polygon_case: dict) -> None:
    # qgis_process.bin 3.22 has --json (checked with `qgis_process.bin --help`).
    proc = run_qgis_process(["--json", "run", ALGORITHM_ID, "--",
                             f"INPUT={permuted_clusters}",
                             f"REFERENCE_RASTER={scene.truth_path}"])
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    truth, _ = read_labels(scene.truth_path)
    assert results["OA"] == pytest.approx(1.0)
    assert results["NMI"] == pytest.approx(1.0)
    assert results["KAPPA"] == pytest.approx(1.0)
    assert results["ARI"] == pytest.approx(1.0)
    assert results["N_SCORED"] == int((truth > 0).sum())

    proc = run_qgis_process(["--json", "run", ALGORITHM_ID, "--",
                             f"INPUT={polygon_case['clusters']}",
                             f"REFERENCE_POLYGONS={polygon_case['reference']}",
                             "CLASS_FIELD=landcover"])
    results = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]
    assert results["OA"] == pytest.approx(EXPECTED_OA)
    assert results["N_SCORED"] == EXPECTED_N_SCORED
