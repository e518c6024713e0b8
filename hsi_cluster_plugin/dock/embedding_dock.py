"""The "HSI Cluster embedding" dock: a segment layer's UMAP as a brushable scatter, linked to the
map selection, with labelling, label propagation and export.

Works without ``iface`` (tests, scripts): messages then go to the status line and the message
log only, and "zoom map to selection" uses the canvas given to the constructor.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsMessageLog,
    QgsProject,
    QgsProviderRegistry,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsColorButton, QgsDockWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QSplitter,
    QToolButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from processing_provider import segment_style

from . import labelling
from .colours import categorical_argb, is_categorical, palette_hex, ramp_argb
from .export import ExportError, add_export_to_project, export_labelled_segments
from .linking import SelectionLink, zoom_canvas_to_selection
from .propagation import PropagationResult, propagate_labels
from .scatter_view import ScatterView
from .tasks import (
    Cancelled,
    ColumnReader,
    FunctionTask,
    LayerColumns,
    is_numeric_field,
    read_geopackage_table,
)

LOG_TAG = "HSI Cluster"
X_FIELD, Y_FIELD = "umap_x", "umap_y"
OPTIONAL_FIELDS = ["fcm_cluster", labelling.LABEL_FIELD, "chip_id", "segment_id"]
CHIPS_LAYER, EMBEDDINGS_TABLE = "chips", "segment_embeddings"
LEVEL_NAMES = {Qgis.Info: "info", Qgis.Warning: "warning", Qgis.Critical: "critical",
               Qgis.Success: "success"}


def geopackage_sibling(layer: QgsVectorLayer, name: str) -> str | None:
    """URI of layer ``name`` in the same GeoPackage as ``layer`` (None if there is none)."""
    if layer.providerType() != "ogr":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    path = parts.get("path") or ""
    if not path.lower().endswith(".gpkg") or not Path(path).is_file():
        return None
    uri = f"{path}|layername={name}"
    probe = QgsVectorLayer(uri, name, "ogr")
    return uri if probe.isValid() else None


def layer_problem(layer) -> str | None:
    """Why ``layer`` cannot be shown in the dock (None when it can)."""
    if layer is None:
        return "choose a segment layer (polygons with numeric umap_x/umap_y fields)"
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return f"layer '{layer.name()}' is not a valid vector layer"
    if layer.geometryType() != QgsWkbTypes.PolygonGeometry:
        return (f"layer '{layer.name()}' is not a polygon layer: choose the segments layer "
                "written by 'Build labelling embedding'")
    missing = [f for f in (X_FIELD, Y_FIELD) if not is_numeric_field(layer, f)]
    if missing:
        return (f"layer '{layer.name()}' has no numeric {' / '.join(missing)} field(s): choose "
                "the segments layer written by 'Build labelling embedding' (or any polygon layer "
                "with numeric umap_x and umap_y fields)")
    if layer.featureCount() == 0:
        return f"layer '{layer.name()}' has no features: nothing to plot"
    return None


class EmbeddingDock(QgsDockWidget):
    def __init__(self, iface=None, parent=None, canvas=None, project: QgsProject | None = None):
        super().__init__("HSI Cluster embedding", parent)
        self.setObjectName("HSIClusterEmbeddingDock")
        self.iface = iface
        self._canvas = canvas
        self.project = project or QgsProject.instance()
        self.messages: list[tuple[str, str]] = []  # (level name, text), newest last
        self.layer: QgsVectorLayer | None = None
        self.data: LayerColumns | None = None  # segments with finite umap (row = scatter point)
        self.link: SelectionLink | None = None
        self.chips_layer: QgsVectorLayer | None = None
        self.chip_data: LayerColumns | None = None
        self.chip_link: SelectionLink | None = None
        self.drill_rows = np.zeros(0, dtype=np.int64)
        self.embeddings_uri: str | None = None
        self.preview: PropagationResult | None = None
        self._preview_version = -1
        self._labels_version = 0
        self._fid_rows: dict[int, int] | None = None
        self._tasks: list[FunctionTask] = []
        self._generation = 0
        self.timings: dict[str, float] = {}
        self._build_ui()
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(0)
        self._refresh_timer.timeout.connect(self._labels_changed)

    # -- UI ---------------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        body = QWidget(self)
        outer = QVBoxLayout(body)
        outer.setContentsMargins(4, 4, 4, 4)

        grid = QGridLayout()
        self.layer_combo = QgsMapLayerComboBox(body)
        self.layer_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.layer_combo.setAllowEmptyLayer(True)
        self.layer_combo.setLayer(None)
        self.layer_combo.layerChanged.connect(self._on_combo_layer)
        self.chips_combo = QgsMapLayerComboBox(body)
        self.chips_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.chips_combo.setAllowEmptyLayer(True)
        self.chips_combo.setLayer(None)
        self.chips_combo.layerChanged.connect(self._on_chips_combo)
        self.chip_mode_check = QCheckBox("Chip mode", body)
        self.chip_mode_check.setToolTip("Show the chips' UMAP; brush chips, then their segments")
        self.chip_mode_check.setEnabled(False)
        self.chip_mode_check.toggled.connect(self.set_chip_mode)
        grid.addWidget(QLabel("Segments"), 0, 0)
        grid.addWidget(self.layer_combo, 0, 1)
        grid.addWidget(QLabel("Chips"), 1, 0)
        grid.addWidget(self.chips_combo, 1, 1)
        grid.addWidget(self.chip_mode_check, 1, 2)
        grid.setColumnStretch(1, 1)
        outer.addLayout(grid)

        tools = QHBoxLayout()
        self.tool_group = QButtonGroup(body)
        self.tool_buttons = {}
        for tool, text, tip in (("rect", "▭", "Rectangle brush (Shift adds, Ctrl removes)"),
                                ("lasso", "◌", "Lasso brush (Shift adds, Ctrl removes)"),
                                ("pan", "✥", "Pan (the wheel zooms; right drag always pans)")):
            button = QToolButton(body)
            button.setText(text)
            button.setToolTip(tip)
            button.setCheckable(True)
            button.clicked.connect(lambda _=False, t=tool: self.set_tool(t))
            self.tool_group.addButton(button)
            self.tool_buttons[tool] = button
            tools.addWidget(button)
        self.tool_buttons["rect"].setChecked(True)
        self.reset_button = self._button(body, "Reset view", self._reset_views)
        self.zoom_button = self._button(body, "Zoom map to selection", self.zoom_map_to_selection)
        self.clear_button = self._button(body, "Clear selection", self.clear_selection)
        for b in (self.reset_button, self.zoom_button, self.clear_button):
            tools.addWidget(b)
        tools.addStretch(1)
        tools.addWidget(QLabel("Colour by"))
        self.colour_combo = QComboBox(body)
        self.colour_combo.currentTextChanged.connect(self._on_colour_field)
        tools.addWidget(self.colour_combo)
        outer.addLayout(tools)

        self.splitter = QSplitter(Qt.Vertical, body)
        self.scatter = ScatterView(self.splitter)
        self.scatter.placeholder = "choose a segment layer"
        self.scatter.brushed.connect(self._on_main_brush)
        self.drill = ScatterView(self.splitter)
        self.drill.placeholder = "brush chips above to see their segments"
        self.drill.brushed.connect(self._on_drill_brush)
        self.drill.setVisible(False)
        outer.addWidget(self.splitter, 1)

        label_box = QGroupBox("Labels", body)
        lb = QGridLayout(label_box)
        self.label_combo = QComboBox(label_box)
        self.label_combo.setEditable(True)
        self.label_combo.setInsertPolicy(QComboBox.NoInsert)
        self.label_combo.lineEdit().setPlaceholderText("label name")
        self.label_combo.currentTextChanged.connect(self._on_label_text)
        self.colour_button = QgsColorButton(label_box)
        self.colour_button.setAllowOpacity(False)
        self.colour_button.setColor(QColor(palette_hex(0)))
        self.apply_label_button = self._button(label_box, "Label selection",
                                               lambda: self.apply_label_to_selection())
        self.remove_label_button = self._button(label_box, "Remove label",
                                                lambda: self.apply_label_to_selection(""))
        self.save_button = self._button(label_box, "Save labels", self.save_labels)
        self.save_button.setToolTip("Write the labels to the file (ends the edit session; until "
                                    "then Ctrl+Z undoes labelling steps)")
        lb.addWidget(self.label_combo, 0, 0, 1, 2)
        lb.addWidget(self.colour_button, 0, 2)
        lb.addWidget(self.apply_label_button, 1, 0)
        lb.addWidget(self.remove_label_button, 1, 1)
        lb.addWidget(self.save_button, 1, 2)
        self.legend = QTreeWidget(label_box)
        self.legend.setHeaderLabels(["label", "segments"])
        self.legend.setRootIsDecorated(False)
        self.legend.setMaximumHeight(120)
        self.legend.itemClicked.connect(self._on_legend_click)
        lb.addWidget(self.legend, 2, 0, 1, 3)
        outer.addWidget(label_box)

        prop_box = QGroupBox("Propagate labels", body)
        pb = QGridLayout(prop_box)
        self.k_spin = QSpinBox(prop_box)
        self.k_spin.setRange(1, 50)
        self.k_spin.setValue(5)
        self.k_spin.setPrefix("k = ")
        self.distance_spin = QDoubleSpinBox(prop_box)
        self.distance_spin.setRange(0.0, 1e9)
        self.distance_spin.setDecimals(3)
        self.distance_spin.setSpecialValueText("no distance limit")
        self.distance_spin.setToolTip("Neighbours farther than this (embedding units) do not vote")
        self.preview_button = self._button(prop_box, "Preview",
                                           lambda: self.preview_propagation())
        self.apply_propagation_button = self._button(prop_box, "Apply", self.apply_propagation)
        self.apply_propagation_button.setEnabled(False)
        self.embedding_label = QLabel("", prop_box)
        pb.addWidget(self.k_spin, 0, 0)
        pb.addWidget(self.distance_spin, 0, 1)
        pb.addWidget(self.preview_button, 0, 2)
        pb.addWidget(self.apply_propagation_button, 0, 3)
        pb.addWidget(self.embedding_label, 1, 0, 1, 4)
        outer.addWidget(prop_box)

        export_row = QHBoxLayout()
        self.dissolve_check = QCheckBox("Dissolve per label", body)
        self.export_button = self._button(body, "Export labelled segments…",
                                          lambda: self.export_labelled())
        export_row.addWidget(self.dissolve_check)
        export_row.addStretch(1)
        export_row.addWidget(self.export_button)
        outer.addLayout(export_row)

        self.status = QLabel("", body)
        self.status.setWordWrap(True)
        outer.addWidget(self.status)
        self.setWidget(body)

    @staticmethod
    def _button(parent, text, slot) -> QPushButton:
        button = QPushButton(text, parent)
        button.clicked.connect(lambda _=False: slot())
        return button

    def set_tool(self, tool: str) -> None:
        self.scatter.tool = self.drill.tool = tool
        self.tool_buttons[tool].setChecked(True)

    def _reset_views(self) -> None:
        self.scatter.reset_view()
        self.drill.reset_view()

    # -- messages ---------------------------------------------------------------------------------
    def notify(self, text: str, level=Qgis.Info) -> None:
        """Status line + message log, and the QGIS message bar when running in QGIS."""
        self.messages.append((LEVEL_NAMES.get(level, "info"), text))
        colour = {Qgis.Warning: "#9a6700", Qgis.Critical: "#b00020"}.get(level, "#333333")
        self.status.setStyleSheet(f"color: {colour}")
        self.status.setText(text)
        QgsMessageLog.logMessage(text, LOG_TAG, level)
        if self.iface is not None and level in (Qgis.Warning, Qgis.Critical, Qgis.Success):
            try:
                self.iface.messageBar().pushMessage(LOG_TAG, text, level=level, duration=8)
            except Exception:  # never let a message break the panel
                pass

    def canvas(self):
        if self._canvas is not None:
            return self._canvas
        if self.iface is not None:
            return self.iface.mapCanvas()
        return None

    # -- tasks ------------------------------------------------------------------------------------
    def _run(self, description: str, work, done, background: bool) -> None:
        """Run ``work(task)`` as a QgsTask (or inline when ``background`` is False)."""
        task = FunctionTask(description, work, None)

        def finished(result, error, task=task):
            if task in self._tasks:
                self._tasks.remove(task)
            done(result, error)

        task.done = finished
        self._tasks.append(task)  # a QgsTask must stay referenced until it finished
        if background:
            QgsApplication.taskManager().addTask(task)
        else:
            ok = task.run()
            task.finished(ok)

    def busy(self) -> bool:
        return bool(self._tasks)

    def wait(self, timeout: float = 30.0) -> bool:
        """Process events until no task of the dock is running (tests, scripts)."""
        end = time.monotonic() + timeout
        while self._tasks and time.monotonic() < end:
            QgsApplication.processEvents()
            time.sleep(0.005)
        QgsApplication.processEvents()
        return not self._tasks

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            try:
                task.cancel()
            except RuntimeError:
                pass

    # -- layer ------------------------------------------------------------------------------------
    def _on_combo_layer(self, layer) -> None:
        if layer is None:  # the empty entry, or the layer is leaving the project
            had_layer = self.layer is not None
            self._clear()
            if had_layer:
                self.notify("no segment layer (it was removed from the project or unselected)")
        elif layer is not self.layer:
            self.set_layer(layer)

    def _on_chips_combo(self, layer) -> None:
        if layer is not self.chips_layer and self.data is not None:
            self.set_chips_layer(layer)

    def set_layer(self, layer, background: bool = True) -> bool:
        """Show ``layer``; its fields are read in a QgsTask (inline if ``background`` is
        False). Returns False (with a message) when the layer cannot be used."""
        self._clear()
        self.layer_combo.blockSignals(True)
        self.layer_combo.setLayer(layer if isinstance(layer, QgsVectorLayer) else None)
        self.layer_combo.blockSignals(False)
        problem = layer_problem(layer)
        if problem:
            self.notify(problem, Qgis.Warning if layer is not None else Qgis.Info)
            self.scatter.placeholder = problem if layer is not None else "choose a segment layer"
            self.scatter.update()
            return False
        self.layer = layer
        self._connect_layer(layer)
        fields = [X_FIELD, Y_FIELD] + [f for f in OPTIONAL_FIELDS if f != X_FIELD]
        reader = ColumnReader(layer, fields)
        self._generation += 1
        generation = self._generation
        self.scatter.placeholder = f"reading {layer.featureCount()} features…"
        self.scatter.update()
        self.notify(f"reading {layer.featureCount()} features of '{layer.name()}'…")
        started = time.perf_counter()

        def done(result, error):
            if generation != self._generation:
                return  # a newer layer was chosen meanwhile
            self.timings["load_seconds"] = time.perf_counter() - started
            self._on_loaded(result, error)

        self._run(f"HSI Cluster: read embedding of {layer.name()}", reader.read, done, background)
        return True

    def _connect_layer(self, layer: QgsVectorLayer) -> None:
        layer.attributeValueChanged.connect(self._on_attribute_changed)
        layer.attributeAdded.connect(self._on_fields_changed)
        layer.attributeDeleted.connect(self._on_fields_changed)
        layer.afterRollBack.connect(self._reload_labels)
        layer.willBeDeleted.connect(self._on_layer_deleted)

    def _disconnect_layer(self, layer: QgsVectorLayer) -> None:
        for signal, slot in ((layer.attributeValueChanged, self._on_attribute_changed),
                             (layer.attributeAdded, self._on_fields_changed),
                             (layer.attributeDeleted, self._on_fields_changed),
                             (layer.afterRollBack, self._reload_labels),
                             (layer.willBeDeleted, self._on_layer_deleted)):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass

    def _on_layer_deleted(self) -> None:
        self._clear()
        self.notify("the segment layer was removed from the project")

    def _clear(self) -> None:
        self._generation += 1
        self._cancel_tasks()
        if self.layer is not None:
            try:
                self._disconnect_layer(self.layer)
            except RuntimeError:
                pass
        for link in (self.link, self.chip_link):
            if link is not None:
                link.disconnect_layer()
        self.layer = self.data = self.link = None
        self.chips_layer = self.chip_data = self.chip_link = None
        self.embeddings_uri = None
        self.preview = None
        self._fid_rows = None
        self.drill_rows = np.zeros(0, dtype=np.int64)
        self.scatter.set_points(np.zeros((0, 2)))
        self.drill.set_points(np.zeros((0, 2)))
        self.chip_mode_check.blockSignals(True)
        self.chip_mode_check.setChecked(False)
        self.chip_mode_check.setEnabled(False)
        self.chip_mode_check.blockSignals(False)
        self.drill.setVisible(False)
        self.colour_combo.blockSignals(True)
        self.colour_combo.clear()
        self.colour_combo.blockSignals(False)
        self.legend.clear()
        self.apply_propagation_button.setEnabled(False)

    def _on_loaded(self, result: LayerColumns | None, error: str | None) -> None:
        if error or result is None:
            if error != "cancelled":
                self.notify(f"reading the layer failed: {error}", Qgis.Critical)
            return
        layer = self.layer
        xy = np.stack([result.columns[X_FIELD], result.columns[Y_FIELD]], axis=1)
        finite = np.isfinite(xy).all(axis=1)
        if not finite.any():
            self.notify(f"layer '{layer.name()}' has no feature with umap_x/umap_y values: "
                        "nothing to plot", Qgis.Warning)
            self.scatter.placeholder = "no feature has umap_x/umap_y values"
            self.scatter.update()
            return
        if not finite.all():
            result = LayerColumns(result.fids[finite],
                                  {k: v[finite] for k, v in result.columns.items()})
            xy = xy[finite]
        self.data = result
        if labelling.LABEL_FIELD not in result.columns:
            result.columns[labelling.LABEL_FIELD] = np.full(len(result), None, dtype=object)
        self.link = SelectionLink(layer, result.fids, self)
        self.link.rows_highlighted.connect(self._on_segment_rows_highlighted)
        n = len(result)
        size = 4 if n < 2000 else 3 if n < 20000 else 2
        self.scatter.point_size = self.drill.point_size = size
        started = time.perf_counter()
        self.scatter.set_points(xy)
        self._fill_colour_combo()
        self._recolour()
        self._refresh_legend()
        self.scatter.render_image()
        self.timings["first_plot_seconds"] = time.perf_counter() - started
        messages = [f"{n} segments of '{layer.name()}'"]
        level = Qgis.Info
        if not finite.all():
            messages.append(f"{int((~finite).sum())} without umap_x/umap_y are not plotted")
            level = Qgis.Warning
        crs_note = self._crs_note()
        if crs_note:
            messages.append(crs_note)
            level = Qgis.Warning
        if layer.readOnly():
            messages.append("the layer is read-only: labels cannot be written to it")
            level = Qgis.Warning
        self.embeddings_uri = geopackage_sibling(layer, EMBEDDINGS_TABLE)
        self.embedding_label.setText(
            "neighbours in: segment_embeddings table" if self.embeddings_uri
            else "neighbours in: UMAP (no segment_embeddings table next to the layer)")
        self.notify("; ".join(messages), level)
        self.link.emit_selection()  # show what is already selected on the map
        chips_uri = geopackage_sibling(layer, CHIPS_LAYER)
        if chips_uri and "chip_id" in result.columns:
            self.set_chips_layer(self._project_layer(chips_uri) or
                                 QgsVectorLayer(chips_uri, f"{layer.name()} chips", "ogr"))

    def _crs_note(self) -> str | None:
        canvas = self.canvas()
        if canvas is None or self.layer is None:
            return None
        map_crs = canvas.mapSettings().destinationCrs()
        if map_crs.isValid() and self.layer.crs().isValid() and map_crs != self.layer.crs():
            return (f"the layer's CRS ({self.layer.crs().authid()}) differs from the map's "
                    f"({map_crs.authid()}): the map shows it reprojected, zooming transforms "
                    "the extent")
        return None

    def _project_layer(self, uri: str) -> QgsVectorLayer | None:
        for layer in self.project.mapLayers().values():
            if isinstance(layer, QgsVectorLayer) and layer.source() == uri:
                return layer
        return None

    # -- chips ------------------------------------------------------------------------------------
    def set_chips_layer(self, layer, background: bool = False) -> bool:
        """Use ``layer`` (polygons with chip_id, umap_x, umap_y) for chip mode. Chip layers are
        small (hundreds of features): read inline unless ``background``."""
        if self.chip_link is not None:
            self.chip_link.disconnect_layer()
        self.chips_layer = self.chip_data = self.chip_link = None
        self.chip_mode_check.setEnabled(False)
        if layer is None:
            self.set_chip_mode(False)
            return False
        problem = layer_problem(layer)
        if problem is None and not is_numeric_field(layer, "chip_id"):
            problem = f"chips layer '{layer.name()}' has no numeric chip_id field"
        if problem is None and (self.data is None or "chip_id" not in self.data.columns):
            problem = "the segment layer has no chip_id field: chip mode is not available"
        if problem:
            self.notify(problem, Qgis.Warning)
            return False
        reader = ColumnReader(layer, [X_FIELD, Y_FIELD, "chip_id"])
        generation = self._generation

        def done(result, error):
            if generation != self._generation:
                return
            if error or result is None:
                self.notify(f"reading the chips failed: {error}", Qgis.Warning)
                return
            finite = np.isfinite(result.columns[X_FIELD]) & np.isfinite(result.columns[Y_FIELD])
            self.chips_layer = layer
            self.chip_data = LayerColumns(result.fids[finite],
                                          {k: v[finite] for k, v in result.columns.items()})
            self.chip_link = SelectionLink(layer, self.chip_data.fids, self)
            self.chip_link.rows_highlighted.connect(self._on_chip_rows_highlighted)
            self.chips_combo.blockSignals(True)
            if layer.id() in self.project.mapLayers():
                self.chips_combo.setLayer(layer)
            self.chips_combo.blockSignals(False)
            self.chip_mode_check.setEnabled(True)

        self._run(f"HSI Cluster: read chips of {layer.name()}", reader.read, done, background)
        return True

    @property
    def chip_mode(self) -> bool:
        return self.chip_mode_check.isChecked() and self.chip_data is not None

    def set_chip_mode(self, on: bool) -> None:
        on = bool(on) and self.chip_data is not None
        self.chip_mode_check.blockSignals(True)
        self.chip_mode_check.setChecked(on)
        self.chip_mode_check.blockSignals(False)
        self.drill.setVisible(on)
        if self.data is None:
            return
        if on:
            chip_xy = np.stack([self.chip_data.columns[X_FIELD],
                                self.chip_data.columns[Y_FIELD]], axis=1)
            self.scatter.point_size = 5
            self.scatter.set_points(chip_xy)
            self.chip_link.emit_selection()
        else:
            n = len(self.data)
            self.scatter.point_size = 4 if n < 2000 else 3 if n < 20000 else 2
            self.scatter.set_points(self._segment_xy())
            self.drill_rows = np.zeros(0, dtype=np.int64)
            self.drill.set_points(np.zeros((0, 2)))
        self._recolour()
        if not on:
            self.link.emit_selection()

    def _segment_xy(self) -> np.ndarray:
        return np.stack([self.data.columns[X_FIELD], self.data.columns[Y_FIELD]], axis=1)

    def _on_chip_rows_highlighted(self, chip_rows: np.ndarray) -> None:
        if not self.chip_mode:
            return
        self.scatter.set_highlight(chip_rows)
        chip_ids = self.chip_data.columns["chip_id"][chip_rows]
        self.drill_rows = np.flatnonzero(np.isin(self.data.columns["chip_id"], chip_ids))
        self.drill.set_points(self._segment_xy()[self.drill_rows])
        self._recolour()
        self.link.emit_selection()

    # -- brushing and selection -------------------------------------------------------------------
    def _on_main_brush(self, rows: np.ndarray, mode: str) -> None:
        if self.chip_mode:
            self.chip_link.select_rows(rows, mode)
        elif self.link is not None:
            self.link.select_rows(rows, mode)

    def _on_drill_brush(self, rows: np.ndarray, mode: str) -> None:
        if self.link is not None and self.drill_rows.size:
            self.link.select_rows(self.drill_rows[rows], mode)

    def _on_segment_rows_highlighted(self, rows: np.ndarray) -> None:
        if self.chip_mode:
            pos = np.searchsorted(self.drill_rows, rows)
            pos = np.clip(pos, 0, max(self.drill_rows.size - 1, 0))
            inside = (self.drill_rows[pos] == rows) if self.drill_rows.size else np.zeros(0, bool)
            self.drill.set_highlight(pos[inside])
        else:
            self.scatter.set_highlight(rows)
        if self.layer is not None:
            self.status.setStyleSheet("")
            self.status.setText(f"{rows.size} of {len(self.data)} segments selected")

    def brush_rect(self, x0: float, y0: float, x1: float, y1: float, mode: str = "replace"):
        """Brush the main scatter in data coordinates (what a mouse drag does)."""
        return self.scatter.brush_rect(x0, y0, x1, y1, mode)

    def brush_lasso(self, polygon, mode: str = "replace"):
        return self.scatter.brush_polygon(np.asarray(polygon, dtype=np.float64), mode)

    def highlighted_rows(self) -> np.ndarray:
        """Segment rows currently highlighted (scatter indices in segment mode)."""
        if self.chip_mode:
            return self.drill_rows[self.drill.highlighted]
        return self.scatter.highlighted

    def clear_selection(self) -> None:
        if self.chip_mode and self.chips_layer is not None:
            self.chips_layer.removeSelection()
        if self.layer is not None:
            self.layer.removeSelection()

    def zoom_map_to_selection(self):
        canvas = self.canvas()
        if self.layer is None:
            self.notify("no segment layer", Qgis.Warning)
            return None
        if canvas is None:
            self.notify("no map canvas to zoom", Qgis.Warning)
            return None
        layer = self.layer
        if self.layer.selectedFeatureCount() == 0 and self.chip_mode and \
                self.chips_layer is not None and self.chips_layer.selectedFeatureCount():
            layer = self.chips_layer
        if layer.selectedFeatureCount() == 0:
            self.notify("nothing selected to zoom to", Qgis.Info)
            return None
        return zoom_canvas_to_selection(canvas, layer)

    # -- colours ----------------------------------------------------------------------------------
    def _fill_colour_combo(self) -> None:
        names = [f.name() for f in self.layer.fields()
                 if f.name() not in (X_FIELD, Y_FIELD) and f.name().lower() != "fid"]
        first = [n for n in ("fcm_cluster", labelling.LABEL_FIELD) if n in names or
                 n == labelling.LABEL_FIELD]
        self.colour_combo.blockSignals(True)
        self.colour_combo.clear()
        self.colour_combo.addItems(first + [n for n in names if n not in first])
        self.colour_combo.setCurrentIndex(0)
        self.colour_combo.blockSignals(False)

    def colour_field(self) -> str:
        return self.colour_combo.currentText() or labelling.LABEL_FIELD

    def set_colour_field(self, name: str, background: bool = False) -> None:
        """Colour the points by field ``name`` (read from the layer if not loaded yet)."""
        if self.colour_combo.findText(name) < 0:
            self.colour_combo.addItem(name)
        self.colour_combo.blockSignals(True)
        self.colour_combo.setCurrentText(name)
        self.colour_combo.blockSignals(False)
        self._on_colour_field(name, background)

    def _on_colour_field(self, name: str, background: bool = True) -> None:
        if self.data is None or not name:
            return
        if name in self.data.columns:
            self._recolour()
            return
        if self.layer.fields().indexOf(name) < 0:
            return
        reader = ColumnReader(self.layer, [name])
        generation = self._generation

        def done(result, error, name=name):
            if generation != self._generation or result is None:
                return
            rows = self._rows_for_fids(result.fids)
            column = result.columns[name]
            full = np.full(len(self.data), np.nan if column.dtype.kind == "f" else None,
                           dtype=column.dtype)
            ok = rows >= 0
            full[rows[ok]] = column[ok]
            self.data.columns[name] = full
            self._recolour()

        self._run(f"HSI Cluster: read {name}", reader.read, done, background)

    def _rows_for_fids(self, fids: np.ndarray) -> np.ndarray:
        """Row of each fid (-1 when not plotted), in the order given."""
        return self.link.index.row_of_each(fids)

    def segment_colours(self) -> np.ndarray:
        name = self.colour_field()
        colours = labelling.label_colours(self.layer)
        column = self.data.columns.get(name)
        if column is None:
            column = np.full(len(self.data), None, dtype=object)
        if name == labelling.LABEL_FIELD:
            if self.preview is not None and self._preview_version == self._labels_version:
                column = column.copy()
                column[self.preview.rows] = self.preview.labels
            argb, _ = categorical_argb(column, colours)
        elif is_categorical(column):
            argb, _ = categorical_argb(column)
        else:
            argb = ramp_argb(column)
        return argb

    def _recolour(self) -> None:
        if self.data is None:
            return
        argb = self.segment_colours()
        if self.chip_mode:
            chips = self.chip_data
            self.scatter.set_colours(self._chip_colours(argb, chips))
            self.drill.set_colours(argb[self.drill_rows])
        else:
            self.scatter.set_colours(argb)

    def _chip_colours(self, segment_argb: np.ndarray, chips: LayerColumns) -> np.ndarray:
        """A chip takes the most frequent colour of its segments."""
        seg_chip = self.data.columns["chip_id"]
        out = np.full(len(chips), 0xFF7F7F7F, dtype=np.uint32)
        order = np.lexsort((segment_argb, seg_chip))
        sc, sa = seg_chip[order], segment_argb[order]
        if sc.size == 0:
            return out
        boundaries = np.flatnonzero((np.diff(sc) != 0) | (np.diff(sa) != 0)) + 1
        starts = np.concatenate([[0], boundaries])
        run_len = np.diff(np.concatenate([starts, [sc.size]]))
        run_chip, run_colour = sc[starts], sa[starts]
        best = {}
        for chip, colour, length in zip(run_chip.tolist(), run_colour.tolist(), run_len.tolist()):
            if length > best.get(chip, (0, 0))[0]:
                best[chip] = (length, colour)
        for i, chip in enumerate(chips.columns["chip_id"].tolist()):
            if chip in best:
                out[i] = best[chip][1]
        return out

    # -- labels -----------------------------------------------------------------------------------
    def _on_label_text(self, text: str) -> None:
        if self.layer is not None and text:
            self.colour_button.setColor(QColor(labelling.colour_for(self.layer, text)))

    def label_counts(self) -> list[tuple[str, str, int]]:
        if self.data is None:
            return []
        _, legend = categorical_argb(self.data.columns[labelling.LABEL_FIELD],
                                     labelling.label_colours(self.layer))
        return [(str(c), h, n) for c, h, n in legend]

    def _refresh_legend(self) -> None:
        self.legend.clear()
        current = self.label_combo.currentText()
        self.label_combo.blockSignals(True)
        self.label_combo.clear()
        unlabelled = 0
        if self.data is not None:
            labels = self.data.columns[labelling.LABEL_FIELD]
            unlabelled = int(sum(1 for v in labels if v is None or v == ""))
        for label, colour, count in self.label_counts():
            pixmap = QPixmap(12, 12)
            pixmap.fill(QColor(colour))
            item = QTreeWidgetItem([label, str(count)])
            item.setIcon(0, QIcon(pixmap))
            self.legend.addTopLevelItem(item)
            self.label_combo.addItem(QIcon(pixmap), label)
        if self.data is not None:
            self.legend.addTopLevelItem(QTreeWidgetItem(["(unlabelled)", str(unlabelled)]))
        self.label_combo.setCurrentText(current)
        self.label_combo.blockSignals(False)

    def _on_legend_click(self, item, column) -> None:
        if self.data is None:
            return
        label = item.text(0)
        labels = self.data.columns[labelling.LABEL_FIELD]
        if label == "(unlabelled)":
            rows = np.flatnonzero([v is None or v == "" for v in labels])
        else:
            rows = np.flatnonzero(labels == label)
        self.link.select_rows(rows)

    def _row_of_fid(self, fid: int) -> int | None:
        if self._fid_rows is None:
            self._fid_rows = {f: i for i, f in enumerate(self.data.fids.tolist())}
        return self._fid_rows.get(fid)

    def _on_attribute_changed(self, fid: int, index: int, value) -> None:
        """Edit buffer changes (our labelling, undo/redo, the attribute table) update the plot."""
        if self.data is None or self.layer is None:
            return
        name = self.layer.fields().at(index).name() if index < self.layer.fields().count() else ""
        if name not in self.data.columns:
            return
        row = self._row_of_fid(fid)
        if row is None:
            return
        column = self.data.columns[name]
        if column.dtype.kind == "f":
            try:
                column[row] = float(value)
            except (TypeError, ValueError):
                column[row] = np.nan
        else:
            column[row] = None if value is None or _is_null(value) or value == "" else str(value)
        if name == labelling.LABEL_FIELD:
            self._labels_version += 1
        self._refresh_timer.start()

    def _on_fields_changed(self, *args) -> None:
        self._refresh_timer.start()

    def _labels_changed(self) -> None:
        if self.data is None:
            return
        self._recolour()
        self._refresh_legend()
        self._restyle_map_layer()

    def _restyle_map_layer(self) -> None:
        """Keep the map in step with the labels: a segments layer styled by HSI Cluster (never a
        style the user chose) fills each labelled segment in its label's colour."""
        if self.layer is None or not segment_style.is_live(self.layer):
            return
        segment_style.apply_segments_style(
            self.layer, [(label, colour) for label, colour, _ in self.label_counts()])

    def _reload_labels(self) -> None:
        """After a rollback the edit buffer is gone: read the label column again."""
        if self.layer is None or self.data is None:
            return
        if self.layer.fields().indexOf(labelling.LABEL_FIELD) < 0:
            self.data.columns[labelling.LABEL_FIELD] = np.full(len(self.data), None, object)
            self._labels_changed()
            return
        self.data.columns.pop(labelling.LABEL_FIELD, None)
        reader = ColumnReader(self.layer, [labelling.LABEL_FIELD])
        result = reader.read()
        rows = self._rows_for_fids(result.fids)
        labels = np.full(len(self.data), None, dtype=object)
        labels[rows[rows >= 0]] = result.columns[labelling.LABEL_FIELD][rows >= 0]
        self.data.columns[labelling.LABEL_FIELD] = labels
        self._labels_version += 1
        self._labels_changed()

    def apply_label_to_selection(self, label: str | None = None, colour: str | None = None) -> int:
        """Write ``label`` (default: the label box) to the selected segments in one undoable
        step; "" removes labels. Returns the number of segments changed."""
        if self.layer is None:
            self.notify("choose a segment layer first", Qgis.Warning)
            return 0
        from_box = label is None
        label = (self.label_combo.currentText() if from_box else label).strip()
        fids = sorted(self.layer.selectedFeatureIds())
        if from_box and not label:
            self.notify("type or pick a label name first", Qgis.Info)
            return 0
        if not fids:
            self.notify("select segments first (brush points or select on the map)", Qgis.Info)
            return 0
        problem = labelling.writability_problem(self.layer)
        if problem:
            self.notify(problem + " (nothing was changed)", Qgis.Critical)
            return 0
        if label:
            if colour is None:
                colour = (self.colour_button.color().name()
                          if label == self.label_combo.currentText().strip()
                          else labelling.colour_for(self.layer, label))
            labelling.set_label_colour(self.layer, label, colour)
        try:
            changed = labelling.apply_label(self.layer, fids, label)
        except labelling.LabellingError as exc:
            self.notify(f"{exc} (nothing was changed)", Qgis.Critical)
            return 0
        self._labels_changed()
        what = f"labelled {changed} segments as '{label}'" if label else \
            f"removed the label of {changed} segments"
        self.notify(what + " — not saved yet: 'Save labels' writes them, Ctrl+Z undoes",
                    Qgis.Info)
        return changed

    def save_labels(self) -> bool:
        if self.layer is None:
            return False
        try:
            labelling.save_labels(self.layer)
        except labelling.LabellingError as exc:
            self.notify(str(exc), Qgis.Critical)
            return False
        self.notify(f"labels of '{self.layer.name()}' saved", Qgis.Success)
        return True

    # -- propagation ------------------------------------------------------------------------------
    def preview_propagation(self, k: int | None = None, max_distance: float | None = None,
                            background: bool = True) -> bool:
        """Compute (in a QgsTask) which unlabelled segments would get which label; the plot
        shows the proposal (when coloured by label) until Apply or a label change."""
        if self.data is None:
            self.notify("choose a segment layer first", Qgis.Warning)
            return False
        k = self.k_spin.value() if k is None else k
        if max_distance is None:
            max_distance = self.distance_spin.value() or np.inf
        labels = self.data.columns[labelling.LABEL_FIELD].copy()
        version = self._labels_version
        segment_ids = self.data.columns.get("segment_id")
        umap = self._segment_xy()
        reader = None
        gpkg_path = None
        if self.embeddings_uri and segment_ids is not None:
            gpkg_path = self.embeddings_uri.split("|", 1)[0]
            table = QgsVectorLayer(self.embeddings_uri, EMBEDDINGS_TABLE, "ogr")
            names = [f.name() for f in table.fields() if f.name() == "segment_id"
                     or (f.name().startswith("e") and f.name()[1:].isdigit())]
            if "segment_id" in names and len(names) > 1:
                reader = ColumnReader(table, names)

        def read_table(task) -> LayerColumns:
            try:
                columns = read_geopackage_table(gpkg_path, EMBEDDINGS_TABLE)
                return LayerColumns(np.arange(len(columns["segment_id"])), columns)
            except Exception:  # not a plain GeoPackage table: go through the provider
                return reader.read(task)

        def work(task):
            features, source = umap, "UMAP"
            if reader is not None:
                table = read_table(task)
                dims = sorted((n for n in table.columns if n != "segment_id"),
                              key=lambda n: int(n[1:]))
                emb = np.stack([table.columns[n] for n in dims], axis=1)
                ids = table.columns["segment_id"]
                order = np.argsort(ids)
                pos = np.clip(np.searchsorted(ids[order], segment_ids), 0, len(ids) - 1)
                found = ids[order][pos] == segment_ids
                features = np.full((len(segment_ids), emb.shape[1]), np.nan)
                features[found] = emb[order][pos[found]]
                source = f"segment_embeddings ({emb.shape[1]} dimensions)"
            def progress(fraction):
                if task.isCanceled():
                    raise Cancelled()
                task.setProgress(100.0 * fraction)

            return propagate_labels(features, labels, k, max_distance, progress), source

        generation = self._generation

        def done(result, error):
            if generation != self._generation:
                return  # the layer changed meanwhile: the rows mean something else now
            if error or result is None:
                if error != "cancelled":
                    message = error.strip().splitlines()[-1] if error else "failed"
                    self.notify(f"propagation failed: {message}", Qgis.Warning)
                return
            self.preview, source = result
            self._preview_version = version
            self.apply_propagation_button.setEnabled(self.preview.rows.size > 0)
            counts = ", ".join(f"{k}: {v}" for k, v in self.preview.counts().items())
            self.notify(f"preview ({source}): {self.preview.rows.size} of "
                        f"{self.preview.n_unlabelled} unlabelled segments would be labelled"
                        + (f" ({counts})" if counts else "") + " — Apply writes them")
            if self.colour_field() != labelling.LABEL_FIELD:
                self.set_colour_field(labelling.LABEL_FIELD)
            else:
                self._recolour()

        self._run("HSI Cluster: propagate labels", work, done, background)
        return True

    def apply_propagation(self) -> int:
        if self.preview is None or self.layer is None:
            self.notify("preview the propagation first", Qgis.Info)
            return 0
        if self._preview_version != self._labels_version:
            self.preview = None
            self.apply_propagation_button.setEnabled(False)
            self.notify("labels changed since the preview: preview again", Qgis.Warning)
            return 0
        problem = labelling.writability_problem(self.layer)
        if problem:
            self.notify(problem + " (nothing was changed)", Qgis.Critical)
            return 0
        assignments: dict[str, list[int]] = {}
        fids = self.data.fids[self.preview.rows]
        for label in np.unique(self.preview.labels.astype(str)):
            assignments[str(label)] = fids[self.preview.labels.astype(str) == label].tolist()
        for label in assignments:
            if label not in labelling.label_colours(self.layer):
                labelling.set_label_colour(self.layer, label,
                                           labelling.colour_for(self.layer, label))
        try:
            changed = labelling.apply_labels(
                self.layer, assignments, f"propagate labels to {len(fids)} segments")
        except labelling.LabellingError as exc:
            self.notify(f"{exc} (nothing was changed)", Qgis.Critical)
            return 0
        self.preview = None
        self.apply_propagation_button.setEnabled(False)
        self._labels_changed()
        self.notify(f"propagated labels to {changed} segments — Ctrl+Z undoes, 'Save labels' "
                    "writes them")
        return changed

    # -- export -----------------------------------------------------------------------------------
    def export_labelled(self, path: str | None = None, dissolve: bool | None = None,
                        add_to_project: bool = True):
        if self.layer is None:
            self.notify("choose a segment layer first", Qgis.Warning)
            return None
        dissolve = self.dissolve_check.isChecked() if dissolve is None else dissolve
        if path is None:
            source = QgsProviderRegistry.instance().decodeUri("ogr", self.layer.source())
            folder = Path(source.get("path") or ".").parent
            path, _ = QFileDialog.getSaveFileName(
                self, "Export labelled segments", str(folder / "labelled_segments.gpkg"),
                "GeoPackage (*.gpkg)")
            if not path:
                return None
        name = "labels_dissolved" if dissolve else "labelled_segments"
        try:
            uri, count = export_labelled_segments(self.layer, path, name, dissolve)
            layer = None
            if add_to_project:
                layer = add_export_to_project(uri, f"{self.layer.name()} {name}",
                                              labelling.label_colours(self.layer),
                                              project=self.project)
        except ExportError as exc:
            self.notify(str(exc), Qgis.Warning)
            return None
        self.notify(f"exported {count} features to {path} (layer '{name}')", Qgis.Success)
        return layer if add_to_project else uri

    # -- teardown ---------------------------------------------------------------------------------
    def close_down(self) -> None:
        """Cancel tasks and drop every connection to layers (plugin unload)."""
        self._refresh_timer.stop()
        self._clear()


def _is_null(value) -> bool:
    try:
        return value.isNull()
    except AttributeError:
        return False
