"""The embedding dock (issue 5) in a real offscreen QGIS: loading, brushing and two-way linking,
labelling with undo, project round trip, export, propagation, chip mode and bad input.

Layers are small synthetic GeoPackages (tests/dock_fixtures.py); the 100k-segment layer is only
used by bench/dock_bench.py.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
from dock_fixtures import make_segment_gpkg

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(autouse=True)
def collect_qt_wrappers(qgis_app):
    """Python wrappers of layers, widgets and tasks caught in reference cycles must go while
    QGIS is alive: collected after exitQgis() they crash the interpreter at exit."""
    yield
    from qgis.core import QgsApplication

    QgsApplication.sendPostedEvents(None, 0)
    gc.collect()
    QgsApplication.processEvents()


@pytest.fixture
def project(qgis_app):
    from qgis.core import QgsProject

    project = QgsProject.instance()
    project.clear()
    yield project
    project.clear()


@pytest.fixture
def dock(project):
    from hsi_cluster_plugin.dock.embedding_dock import EmbeddingDock

    widget = EmbeddingDock(iface=None, project=project)
    widget.resize(520, 760)
    widget.show()
    yield widget
    widget.wait(10)
    widget.close_down()
    widget.close()
    widget.deleteLater()
    from qgis.core import QgsApplication

    QgsApplication.processEvents()


@pytest.fixture
def segments(tmp_path):
    return make_segment_gpkg(tmp_path / "segments.gpkg", side=12, chip_side=4)


def open_segments(synthetic, project=None, name="segments"):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{synthetic.path}|layername=segments", name, "ogr")
    assert layer.isValid()
    if project is not None:
        project.addMapLayer(layer)
    return layer


def labels_of(layer, fids):
    values = {f.id(): f["label"] for f in layer.getFeatures(list(fids))}
    return [None if v is None or (hasattr(v, "isNull") and v.isNull()) or v == "" else v
            for v in (values[f] for f in fids)]


def loaded(dock, layer, background=False):
    assert dock.set_layer(layer, background=background), dock.messages
    assert dock.wait(30), "the load task did not finish"
    assert dock.data is not None, dock.messages
    return dock


# -- hit testing ----------------------------------------------------------------------------------


def test_points_in_polygon_agrees_with_qgis_geometry():
    from qgis.core import QgsGeometry, QgsPointXY

    from hsi_cluster_plugin.dock.scatter_view import points_in_polygon

    rng = np.random.default_rng(1)
    points = rng.uniform(-1.2, 1.2, size=(600, 2))
    angles = np.linspace(0, 2 * np.pi, 11)[:-1]
    radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)  # a concave star
    star = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    geometry = QgsGeometry.fromPolygonXY([[QgsPointXY(x, y) for x, y in star]])
    expected = np.array([geometry.contains(QgsPointXY(x, y)) for x, y in points])
    got = points_in_polygon(points, star)
    assert expected.sum() > 30
    assert np.array_equal(got, expected)


def test_fid_index_maps_ids_to_rows():
    from hsi_cluster_plugin.dock.linking import FidIndex

    index = FidIndex(np.array([10, 3, 7, 42]))
    assert index.rows([7, 42, 99, 10]).tolist() == [0, 2, 3]
    assert index.rows([]).size == 0
    assert index.row_of_each(np.array([42, 5, 3])).tolist() == [3, -1, 1]


# -- loading and plotting -------------------------------------------------------------------------


def test_load_runs_as_task_and_plots_all_points(dock, segments, project):
    layer = open_segments(segments, project)
    assert dock.set_layer(layer)  # through QgsApplication.taskManager()
    assert dock.busy()
    assert dock.wait(30)
    assert dock.data is not None and len(dock.data) == segments.n_segments
    order = np.argsort(dock.data.fids)
    assert np.allclose(dock.scatter.xy[order], segments.umap)
    assert dock.chip_data is not None and len(dock.chip_data) == segments.n_chips
    assert dock.embeddings_uri and dock.embeddings_uri.endswith("segment_embeddings")

    dock.set_colour_field("fcm_cluster")
    image = dock.scatter.render_image()
    pixels = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), dtype=np.uint32)
    colours = set(np.unique(pixels).tolist()) - {0xFFFFFFFF}
    # Each of the 4 classes has its own palette colour, and they are all drawn.
    from hsi_cluster_plugin.dock.colours import hex_to_argb, palette_hex

    assert {int(hex_to_argb(palette_hex(i))) for i in range(4)} <= colours


def test_colour_by_any_field_reads_it(dock, segments, project):
    loaded(dock, open_segments(segments, project))
    assert "n_pixels" not in dock.data.columns
    dock.set_colour_field("area", background=False)
    assert "area" in dock.data.columns
    assert np.allclose(dock.data.columns["area"], segments.cell**2)


# -- brushing and linking -------------------------------------------------------------------------


def test_brush_rectangle_selects_matching_features(dock, segments, project):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    x, y = segments.umap[:, 0], segments.umap[:, 1]
    inside = (x >= -2) & (x <= 8) & (y >= -3) & (y <= 3)
    rows = dock.brush_rect(8, 3, -2, -3)  # corners in any order
    expected = set((np.flatnonzero(inside) + 1).tolist())  # fid = segment index + 1
    assert len(expected) > 10
    assert set(layer.selectedFeatureIds()) == expected
    assert len(rows) == len(expected)
    assert sorted(dock.data.fids[dock.highlighted_rows()].tolist()) == sorted(expected)

    more = (x >= -8) & (x <= -4)
    dock.brush_rect(-8, -100, -4, 100, mode="add")
    assert set(layer.selectedFeatureIds()) == expected | set((np.flatnonzero(more) + 1).tolist())
    dock.brush_rect(-8, -100, -4, 100, mode="subtract")
    assert set(layer.selectedFeatureIds()) == expected
    dock.brush_rect(100, 100, 101, 101)  # empty space clears
    assert layer.selectedFeatureIds() == []


def test_lasso_selects_points_inside_polygon(dock, segments, project):
    from qgis.core import QgsGeometry, QgsPointXY

    layer = open_segments(segments, project)
    loaded(dock, layer)
    triangle = [(-9.0, -9.0), (9.0, -9.0), (0.0, 4.0)]
    dock.brush_lasso(triangle)
    geometry = QgsGeometry.fromPolygonXY([[QgsPointXY(*p) for p in triangle]])
    expected = {i + 1 for i, (px, py) in enumerate(segments.umap)
                if geometry.contains(QgsPointXY(px, py))}
    assert len(expected) > 10
    assert set(layer.selectedFeatureIds()) == expected


def test_map_selection_highlights_points_without_feedback(dock, segments, project):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    before = dock.link.map_updates
    dock.brush_rect(-100, -100, 0, 0)
    assert dock.link.map_updates == before  # our own selectByIds did not come back as a map edit

    layer.selectByIds([1, 5, 9])  # as the map's select tool or the attribute table would
    assert dock.link.map_updates == before + 1
    assert sorted(dock.data.fids[dock.highlighted_rows()].tolist()) == [1, 5, 9]
    assert dock.status.text().startswith("3 of")
    layer.removeSelection()
    assert dock.highlighted_rows().size == 0


def test_mouse_drag_wheel_and_click(dock, segments, project):
    from qgis.PyQt.QtCore import QEvent, QPoint, QPointF, Qt
    from qgis.PyQt.QtGui import QMouseEvent, QWheelEvent
    from qgis.PyQt.QtWidgets import QApplication

    layer = open_segments(segments, project)
    loaded(dock, layer)
    view = dock.scatter
    w, h = view.width(), view.height()

    def mouse(kind, x, y, buttons=Qt.LeftButton, modifiers=Qt.NoModifier):
        button = Qt.LeftButton if kind != QEvent.MouseMove else Qt.NoButton
        QApplication.sendEvent(view, QMouseEvent(kind, QPointF(x, y), button, buttons, modifiers))

    mouse(QEvent.MouseButtonPress, 1, 1)
    mouse(QEvent.MouseMove, w / 2, h - 2)
    mouse(QEvent.MouseButtonRelease, w / 2, h - 2, Qt.NoButton)
    (x0, y0), (x1, y1) = view.pixel_to_data(np.array([[1, 1], [w / 2, h - 2]]))
    expected = set((view.indices_in_rect(x0, y0, x1, y1)).tolist())
    assert len(expected) > 5
    assert set(dock.link.selected_rows().tolist()) == expected

    dock.set_tool("lasso")
    for kind, (x, y) in zip([QEvent.MouseButtonPress] + [QEvent.MouseMove] * 3,
                            [(1, 1), (w - 2, 1), (w - 2, h - 2), (1, h - 2)]):
        mouse(kind, x, y)
    mouse(QEvent.MouseButtonRelease, 1, h - 2, Qt.NoButton)
    assert len(layer.selectedFeatureIds()) == segments.n_segments  # lasso around everything

    before = view.view_rect()
    centre = QPoint(w // 2, h // 2)
    QApplication.sendEvent(view, QWheelEvent(QPointF(centre), QPointF(centre), QPoint(0, 0),
                                             QPoint(0, 120), Qt.NoButton, Qt.NoModifier,
                                             Qt.NoScrollPhase, False))
    after = view.view_rect()
    assert (after[1] - after[0]) == pytest.approx((before[1] - before[0]) / 1.25)

    dock.set_tool("pan")
    mouse(QEvent.MouseButtonPress, 10, 10)
    mouse(QEvent.MouseMove, 60, 10)
    mouse(QEvent.MouseButtonRelease, 60, 10, Qt.NoButton)
    panned = view.view_rect()
    assert panned[0] < after[0] and panned[2] == pytest.approx(after[2])
    assert len(layer.selectedFeatureIds()) == segments.n_segments  # panning selects nothing


def test_screenshot_of_brushed_selection(dock, segments, project, tmp_path):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    dock.set_colour_field("fcm_cluster")
    dock.brush_rect(-2, -3, 8, 3)
    from qgis.core import QgsApplication

    QgsApplication.processEvents()
    out = tmp_path / "dock_brushed.png"
    assert dock.grab().save(str(out))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(out, ARTIFACTS / "dock_brushed.png")
    image = dock.scatter.render_image()
    pixels = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), dtype=np.uint32)
    from hsi_cluster_plugin.dock.scatter_view import SELECTION_ARGB

    assert (pixels == SELECTION_ARGB).sum() > 50  # rings around the brushed points
    assert out.stat().st_size > 5000


# -- zoom and CRS ---------------------------------------------------------------------------------


def test_zoom_to_selection_transforms_to_map_crs(project, segments):
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsRectangle
    from qgis.gui import QgsMapCanvas

    from hsi_cluster_plugin.dock.embedding_dock import EmbeddingDock

    canvas = QgsMapCanvas()
    canvas.resize(400, 300)
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    canvas.setExtent(QgsRectangle(0, 0, 50, 50))
    dock = EmbeddingDock(iface=None, canvas=canvas, project=project)
    try:
        layer = open_segments(segments, project)
        loaded(dock, layer)
        assert any(level == "warning" and "EPSG:32633" in text and "EPSG:4326" in text
                   for level, text in dock.messages)
        assert dock.zoom_map_to_selection() is None  # nothing selected yet: a message, no zoom
        assert "nothing selected" in dock.messages[-1][1]
        layer.selectByIds([1, 2, 13])
        extent = dock.zoom_map_to_selection()
        selected = QgsCoordinateTransform(
            layer.crs(), canvas.mapSettings().destinationCrs(), project
        ).transformBoundingBox(layer.boundingBoxOfSelected())
        assert extent.contains(selected)
        assert extent.width() < 0.01  # degrees, not metres: the extent was transformed
        assert 5 < extent.center().x() < 20 and 45 < extent.center().y() < 60
    finally:
        dock.close_down()
        dock.deleteLater()


# -- labelling ------------------------------------------------------------------------------------


def test_label_undo_redo_and_legend(dock, segments, project):
    from qgis.core import QgsApplication

    layer = open_segments(segments, project)
    loaded(dock, layer)
    fids = [1, 2, 3, 4, 5]
    layer.selectByIds(fids)
    assert dock.apply_label_to_selection("water", "#1f78b4") == 5
    assert layer.isEditable()
    assert labels_of(layer, fids) == ["water"] * 5
    assert layer.undoStack().count() == 1
    assert dock.label_counts() == [("water", "#1f78b4", 5)]

    layer.selectByIds([4, 5, 6])
    dock.label_combo.setCurrentText("forest")
    dock.apply_label_button.click()  # the label box and the colour button, as a user would
    assert labels_of(layer, [4, 5, 6]) == ["forest"] * 3
    assert layer.undoStack().count() == 2

    layer.undoStack().undo()  # Ctrl+Z
    QgsApplication.processEvents()
    assert labels_of(layer, [4, 5, 6]) == ["water", "water", None]
    assert dict((n, c) for n, _, c in dock.label_counts()) == {"water": 5}
    layer.undoStack().undo()
    QgsApplication.processEvents()
    assert labels_of(layer, fids) == [None] * 5
    assert dock.label_counts() == []
    layer.undoStack().redo()
    layer.undoStack().redo()
    QgsApplication.processEvents()
    assert labels_of(layer, [1, 4, 6]) == ["water", "forest", "forest"]
    assert dict((n, c) for n, _, c in dock.label_counts()) == {"water": 3, "forest": 3}

    layer.selectByIds([6])
    assert dock.apply_label_to_selection("") == 1  # "Remove label"
    assert labels_of(layer, [6]) == [None]
    layer.rollBack()
    QgsApplication.processEvents()
    assert labels_of(layer, fids) == [None] * 5
    assert dock.label_counts() == []


def test_labels_and_colours_survive_project_reload(dock, segments, project, tmp_path):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    layer.selectByIds([7, 8])
    dock.apply_label_to_selection("road", "#ff00ff")
    assert dock.save_labels()
    assert not layer.isEditable() and layer.undoStack().count() == 0
    qgz = tmp_path / "labels.qgz"
    assert project.write(str(qgz))
    dock.set_layer(None)
    project.clear()
    assert not project.mapLayers()

    assert project.read(str(qgz))
    (reloaded,) = project.mapLayersByName("segments")
    assert labels_of(reloaded, [7, 8, 9]) == ["road", "road", None]
    from hsi_cluster_plugin.dock.labelling import label_colours

    assert label_colours(reloaded) == {"road": "#ff00ff"}
    loaded(dock, reloaded)
    assert dock.label_counts() == [("road", "#ff00ff", 2)]


def test_memory_layer_without_label_field_gets_one(dock, project):
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    layer = QgsVectorLayer("Polygon?crs=EPSG:3857&field=umap_x:double&field=umap_y:double",
                           "plain", "memory")
    features = []
    for i in range(30):
        f = QgsFeature(layer.fields())
        f.setAttributes([float(i), float(i % 5)])
        f.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({i} 0,{i + 1} 0,{i + 1} 1,{i} 1,{i} 0))"))
        features.append(f)
    layer.dataProvider().addFeatures(features)
    project.addMapLayer(layer)
    loaded(dock, layer)
    dock.brush_rect(-1, -1, 9.5, 10)
    assert dock.apply_label_to_selection("low") == 10
    assert layer.fields().indexOf("label") >= 0
    assert sorted(f.id() for f in layer.getFeatures() if f["label"] == "low") == \
        sorted(layer.selectedFeatureIds())


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dissolve", [False, True])
def test_export_labelled_segments(dock, segments, project, tmp_path, dissolve):
    from qgis.core import QgsCategorizedSymbolRenderer, QgsVectorLayer

    layer = open_segments(segments, project)
    loaded(dock, layer)
    water = [i + 1 for i in np.flatnonzero(segments.cls == 1)]
    forest = [i + 1 for i in np.flatnonzero(segments.cls == 2)][:5]
    layer.selectByIds(water)
    dock.apply_label_to_selection("water", "#0000ff")
    layer.selectByIds(forest)
    dock.apply_label_to_selection("forest", "#00aa00")  # not saved: the edit buffer is exported

    out = tmp_path / "export.gpkg"
    added = dock.export_labelled(str(out), dissolve=dissolve)
    assert added is not None and added.id() in project.mapLayers()
    assert isinstance(added.renderer(), QgsCategorizedSymbolRenderer)
    colours = {c.value(): c.symbol().color().name() for c in added.renderer().categories()}
    assert colours == {"water": "#0000ff", "forest": "#00aa00"}

    name = "labels_dissolved" if dissolve else "labelled_segments"
    reopened = QgsVectorLayer(f"{out}|layername={name}", "check", "ogr")
    assert reopened.isValid()
    assert reopened.crs().authid() == "EPSG:32633"
    labels = [f["label"] for f in reopened.getFeatures()]
    if dissolve:
        assert sorted(labels) == ["forest", "water"]
        counts = {f["label"]: f["n_segments"] for f in reopened.getFeatures()}
        assert counts == {"water": len(water), "forest": len(forest)}
        area = {f["label"]: f.geometry().area() for f in reopened.getFeatures()}
        assert area["water"] == pytest.approx(len(water) * segments.cell**2)
    else:
        assert reopened.featureCount() == len(water) + len(forest)
        assert sorted(labels) == sorted(["water"] * len(water) + ["forest"] * len(forest))
        ids = sorted(f["segment_id"] for f in reopened.getFeatures())
        assert ids == sorted(f - 1 for f in water + forest)


def test_export_without_labels_is_a_clear_message(dock, segments, project, tmp_path):
    loaded(dock, open_segments(segments, project))
    assert dock.export_labelled(str(tmp_path / "none.gpkg")) is None
    assert "no labelled segments" in dock.messages[-1][1]
    assert not (tmp_path / "none.gpkg").exists()


# -- propagation ----------------------------------------------------------------------------------


def _label_a_few_per_class(dock, layer, segments, per_class=3):
    for c in np.unique(segments.cls):
        fids = (np.flatnonzero(segments.cls == c)[:per_class] + 1).tolist()
        layer.selectByIds(fids)
        dock.apply_label_to_selection(f"class{c}")


def test_propagation_preview_then_apply_through_task_manager(dock, segments, project):
    from qgis.core import QgsApplication

    layer = open_segments(segments, project)
    loaded(dock, layer)
    _label_a_few_per_class(dock, layer, segments)
    assert layer.undoStack().count() == 4
    assert dock.preview_propagation(k=3)  # a QgsTask in the task manager
    assert dock.wait(30)
    preview = dock.preview
    assert preview is not None and preview.n_unlabelled == segments.n_segments - 12
    assert preview.rows.size == preview.n_unlabelled
    truth = np.array([f"class{c}" for c in segments.cls[dock.data.fids[preview.rows] - 1]])
    assert (preview.labels.astype(str) == truth).mean() > 0.95
    assert "segment_embeddings" in dock.messages[-1][1]
    assert labels_of(layer, [int(dock.data.fids[preview.rows[0]])]) == [None]  # only a preview

    assert dock.apply_propagation() == preview.rows.size
    assert layer.undoStack().count() == 5  # one undo step for the whole propagation
    everything = list(range(1, segments.n_segments + 1))
    assert None not in labels_of(layer, everything)
    layer.undoStack().undo()
    QgsApplication.processEvents()
    assert labels_of(layer, everything).count(None) == preview.n_unlabelled
    assert sum(n for _, _, n in dock.label_counts()) == 12


def test_propagation_distance_threshold_and_umap_fallback(dock, tmp_path, project):
    synthetic = make_segment_gpkg(tmp_path / "noemb.gpkg", side=10, chip_side=5,
                                  with_embeddings=False, with_chips=False)
    layer = open_segments(synthetic, project)
    loaded(dock, layer)
    assert "UMAP" in dock.embedding_label.text()
    assert dock.chip_data is None and not dock.chip_mode_check.isEnabled()
    _label_a_few_per_class(dock, layer, synthetic, per_class=2)
    dock.preview_propagation(k=1, max_distance=1e-6, background=False)
    assert dock.preview.rows.size == 0  # nobody is that close
    dock.preview_propagation(k=1, max_distance=1.5, background=False)
    near = dock.preview.rows.size
    dock.preview_propagation(k=1, background=False)
    assert 0 < near < dock.preview.rows.size == dock.preview.n_unlabelled
    assert "UMAP" in dock.messages[-1][1]
    layer.selectByIds([100])
    dock.apply_label_to_selection("late")
    assert dock.apply_propagation() == 0  # labels changed since the preview
    assert "preview again" in dock.messages[-1][1]


def test_propagate_labels_function():
    from hsi_cluster_plugin.dock.propagation import propagate_labels

    features = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [9.0]])
    labels = np.array(["a", None, None, "b", None, None], dtype=object)
    result = propagate_labels(features, labels, k=1, max_distance=2.0)
    assert result.rows.tolist() == [1, 2, 4]
    assert result.labels.tolist() == ["a", "a", "b"]
    with pytest.raises(ValueError, match="no labelled segments"):
        propagate_labels(features, np.full(6, None, dtype=object))


@pytest.mark.parametrize("dim", [2, 8])
def test_nearest_neighbour_backends_agree(dim):
    from scipy.spatial import cKDTree

    from hsi_cluster_plugin.dock.propagation import _knn, numpy_knn

    rng = np.random.default_rng(dim)
    reference, query = rng.normal(size=(300, dim)), rng.normal(3, 1, size=(200, dim))
    exact_d, exact_i = cKDTree(reference).query(query, k=4)
    for dist, idx in (_knn(reference, query, 4), numpy_knn(reference, query, 4)):
        assert np.array_equal(idx, exact_i)
        assert np.allclose(dist, exact_d)


# -- chip mode ------------------------------------------------------------------------------------


def test_chip_mode_brush_chips_then_segments(dock, segments, project):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    assert dock.chip_mode_check.isEnabled()
    dock.chip_mode_check.setChecked(True)
    assert dock.chip_mode and dock.scatter.n_points == segments.n_chips
    assert not dock.drill.isHidden()

    chip_xy = dock.scatter.xy
    chosen = np.flatnonzero(chip_xy[:, 0] > np.median(chip_xy[:, 0]))
    dock.brush_rect(np.median(chip_xy[:, 0]) + 1e-9, -100, 100, 100)
    chosen_ids = dock.chip_data.columns["chip_id"][chosen]
    assert set(dock.chips_layer.selectedFeatureIds()) == set(dock.chip_data.fids[chosen].tolist())
    expected_rows = np.flatnonzero(np.isin(segments.chip, chosen_ids))  # fid - 1 == row here
    assert sorted(dock.data.fids[dock.drill_rows] - 1) == expected_rows.tolist()
    assert dock.drill.n_points == expected_rows.size

    drill_xy = dock.drill.xy
    picked = dock.drill.brush_rect(-100, 0, 100, 100)
    assert set(layer.selectedFeatureIds()) == set(dock.data.fids[dock.drill_rows[picked]].tolist())
    assert np.all(drill_xy[picked, 1] >= 0)
    assert np.array_equal(np.sort(dock.highlighted_rows()), np.sort(dock.drill_rows[picked]))

    selected = set(layer.selectedFeatureIds())
    dock.chip_mode_check.setChecked(False)  # back to all segments, the selection kept
    assert dock.scatter.n_points == segments.n_segments
    assert dock.drill.isHidden()
    assert set(dock.data.fids[dock.highlighted_rows()].tolist()) == selected


# -- bad input ------------------------------------------------------------------------------------


def test_layer_without_embedding_fields(dock, tmp_path, project):
    synthetic = make_segment_gpkg(tmp_path / "nofields.gpkg", side=4, chip_side=2,
                                  umap_fields=False)
    layer = open_segments(synthetic, project)
    assert not dock.set_layer(layer)
    level, text = dock.messages[-1]
    assert level == "warning" and "umap_x" in text and "umap_y" in text
    assert dock.data is None and dock.scatter.n_points == 0
    assert "umap_x" in dock.status.text()


def test_empty_and_non_polygon_layers(dock, project):
    from qgis.core import QgsVectorLayer

    empty = QgsVectorLayer("Polygon?crs=EPSG:32633&field=umap_x:double&field=umap_y:double",
                           "empty", "memory")
    assert not dock.set_layer(empty)
    assert "no features" in dock.messages[-1][1]
    points = QgsVectorLayer("Point?crs=EPSG:32633&field=umap_x:double&field=umap_y:double",
                            "points", "memory")
    assert not dock.set_layer(points)
    assert "not a polygon layer" in dock.messages[-1][1]
    assert not dock.set_layer(None)
    assert dock.apply_label_to_selection("x") == 0
    assert "choose a segment layer" in dock.messages[-1][1]


def test_layer_with_null_embedding_values(dock, project):
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    layer = QgsVectorLayer("Polygon?crs=EPSG:32633&field=umap_x:double&field=umap_y:double",
                           "nulls", "memory")
    features = []
    for i in range(6):
        f = QgsFeature(layer.fields())
        f.setAttributes([float(i) if i < 4 else None, 1.0])
        f.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({i} 0,{i + 1} 0,{i + 1} 1,{i} 1,{i} 0))"))
        features.append(f)
    layer.dataProvider().addFeatures(features)
    loaded(dock, layer)
    assert dock.scatter.n_points == 4
    assert "2 without umap_x/umap_y" in dock.messages[-1][1]


def test_read_only_layer_keeps_everything(dock, segments, project):
    layer = open_segments(segments, project)
    layer.setReadOnly(True)
    loaded(dock, layer)
    assert "read-only" in dock.messages[-1][1]
    layer.selectByIds([1, 2, 3])
    assert dock.apply_label_to_selection("water") == 0
    level, text = dock.messages[-1]
    assert level == "critical" and "read-only" in text and "nothing was changed" in text
    assert not layer.isEditable()
    assert labels_of(layer, [1, 2, 3]) == [None] * 3
    assert set(layer.selectedFeatureIds()) == {1, 2, 3}  # the selection is not lost either


def test_removing_the_layer_resets_the_dock(dock, segments, project):
    layer = open_segments(segments, project)
    loaded(dock, layer)
    project.removeMapLayer(layer.id())
    assert dock.data is None and dock.layer is None
    assert "removed" in dock.messages[-1][1]


# -- plugin ---------------------------------------------------------------------------------------


def test_plugin_creates_and_unloads_the_dock(qgis_app):
    from qgis.PyQt import sip

    import hsi_cluster_plugin
    from hsi_cluster_plugin.dock.embedding_dock import EmbeddingDock

    plugin = hsi_cluster_plugin.classFactory(None)
    plugin.initGui()  # no iface: no toolbar button, no error
    assert plugin.dock_action is None
    dock = plugin.create_dock()
    assert isinstance(dock, EmbeddingDock)
    assert plugin.create_dock() is dock
    plugin.unload()
    assert plugin.dock is None
    from qgis.core import QgsApplication

    QgsApplication.sendPostedEvents(None, 52)  # QEvent.DeferredDelete
    assert sip.isdeleted(dock)
    plugin.unload()  # safe twice


# -- the real producer -----------------------------------------------------------------------------


def test_dock_reads_the_labelling_geopackage_writer_output(dock, project, tmp_path):
    """The GeoPackage written by processing_provider/labelling_outputs.py (issue 4) works as is:
    chips (one with NULL UMAP) and the embeddings table are found next to the segments."""
    outputs = pytest.importorskip("processing_provider.labelling_outputs")
    producer_tests = pytest.importorskip("test_labelling_outputs")
    result = producer_tests.make_result()
    path = outputs.write_labelling_geopackage(tmp_path / "embedding.gpkg", result,
                                              producer_tests.UTM_GRID, producer_tests.METADATA)
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(outputs.layer_uri(path, outputs.SEGMENTS_LAYER), "segments", "ogr")
    project.addMapLayer(layer)
    loaded(dock, layer)
    assert len(dock.data) == result.n_segments
    assert dock.embeddings_uri is not None
    assert dock.chip_data is not None and len(dock.chip_data) == 1  # the NaN chip is not plotted
    dock.brush_rect(-100, -100, 100, 100)
    assert len(layer.selectedFeatureIds()) == result.n_segments
    layer.selectByIds([next(layer.getFeatures()).id()])
    assert dock.apply_label_to_selection("water") == 1
    dock.preview_propagation(k=1, background=False)
    assert dock.preview.rows.size == result.n_segments - 1
    assert "segment_embeddings (4 dimensions)" in dock.messages[-1][1]
    dock.set_chip_mode(True)
    dock.brush_rect(-100, -100, 100, 100)
    assert sorted(dock.data.columns["chip_id"][dock.drill_rows].tolist()) == [0, 0, 0]
