"""Two-way link between scatter rows and a vector layer's feature selection.

Row ``i`` of the scatter is feature ``fids[i]``. Brushing selects features with
``layer.selectByIds`` (QGIS highlights them, the attribute table follows); a selection made on the
map arrives through ``layer.selectionChanged`` and becomes highlighted rows. A guard flag stops our
own ``selectByIds`` from coming back as a second update (no feedback loop).
"""

from __future__ import annotations

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal

BEHAVIOURS = {
    "replace": QgsVectorLayer.SetSelection,
    "add": QgsVectorLayer.AddToSelection,
    "subtract": QgsVectorLayer.RemoveFromSelection,
    "intersect": QgsVectorLayer.IntersectSelection,
}


class FidIndex:
    """Maps feature ids to rows (vectorised, via a sorted copy of the ids)."""

    def __init__(self, fids: np.ndarray):
        self.fids = np.asarray(fids, dtype=np.int64)
        self._order = np.argsort(self.fids, kind="stable")
        self._sorted = self.fids[self._order]

    def rows(self, fids) -> np.ndarray:
        """Rows of the given ids, sorted; ids that are not in the index are dropped."""
        fids = np.fromiter(fids, dtype=np.int64) if not isinstance(fids, np.ndarray) else fids
        if fids.size == 0 or self._sorted.size == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self._sorted, fids)
        pos = np.clip(pos, 0, self._sorted.size - 1)
        found = self._sorted[pos] == fids
        return np.sort(self._order[pos[found]])


    def row_of_each(self, fids: np.ndarray) -> np.ndarray:
        """Row of each id in the order given, -1 for ids that are not in the index."""
        fids = np.asarray(fids, dtype=np.int64)
        if self._sorted.size == 0:
            return np.full(fids.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted, fids), 0, self._sorted.size - 1)
        return np.where(self._sorted[pos] == fids, self._order[pos], -1)


class SelectionLink(QObject):
    """Keeps ``layer``'s selection and the highlighted rows in step.

    ``rows_highlighted(rows)`` is emitted whenever the layer selection changes (from a brush or
    from the map), with the rows of the selected features.
    """

    rows_highlighted = pyqtSignal(object)

    def __init__(self, layer: QgsVectorLayer, fids: np.ndarray, parent: QObject | None = None):
        super().__init__(parent)
        self.layer = layer
        self.index = FidIndex(fids)
        self._updating = False
        self.map_updates = 0  # selections that came from outside (map, attribute table)
        layer.selectionChanged.connect(self._on_layer_selection)

    def disconnect_layer(self) -> None:
        try:
            self.layer.selectionChanged.disconnect(self._on_layer_selection)
        except (TypeError, RuntimeError):
            pass  # already disconnected, or the layer was deleted

    @property
    def fids(self) -> np.ndarray:
        return self.index.fids

    def select_rows(self, rows: np.ndarray, mode: str = "replace") -> np.ndarray:
        """Select the features of ``rows`` on the layer; returns the now highlighted rows."""
        fids = self.index.fids[np.asarray(rows, dtype=np.int64)]
        self._updating = True
        try:
            self.layer.selectByIds(fids.tolist(), BEHAVIOURS[mode])
        finally:
            self._updating = False
        return self.emit_selection()

    def select_fids(self, fids, mode: str = "replace") -> np.ndarray:
        return self.select_rows(self.index.rows(np.asarray(list(fids), dtype=np.int64)), mode)

    def selected_rows(self) -> np.ndarray:
        return self.index.rows(self.layer.selectedFeatureIds())

    def emit_selection(self) -> np.ndarray:
        rows = self.selected_rows()
        self.rows_highlighted.emit(rows)
        return rows

    def _on_layer_selection(self, *args) -> None:
        if self._updating:
            return  # our own selectByIds: select_rows emits once it is done
        self.map_updates += 1
        self.emit_selection()


def selection_extent(
    layer: QgsVectorLayer,
    destination_crs: QgsCoordinateReferenceSystem | None = None,
    context: QgsCoordinateTransformContext | None = None,
) -> QgsRectangle:
    """Bounding box of the layer's selected features in ``destination_crs`` (e.g. the map's),
    slightly enlarged so a single small feature does not fill the whole canvas. Empty rectangle
    when nothing is selected."""
    rect = layer.boundingBoxOfSelected()
    if rect.isEmpty() and layer.selectedFeatureCount() == 0:
        return QgsRectangle()
    if destination_crs is not None and destination_crs.isValid() and layer.crs().isValid() \
            and destination_crs != layer.crs():
        transform = QgsCoordinateTransform(
            layer.crs(), destination_crs, context or QgsCoordinateTransformContext())
        rect = transform.transformBoundingBox(rect)
    if rect.width() == 0 and rect.height() == 0:
        rect.grow(1.0 if destination_crs is None or not destination_crs.isGeographic() else 1e-5)
    else:
        rect.scale(1.1)
    return rect


def zoom_canvas_to_selection(canvas, layer: QgsVectorLayer) -> QgsRectangle:
    """Zoom ``canvas`` (a QgsMapCanvas) to the layer's selection, transforming between the
    layer's and the map's CRS; returns the new extent (empty if nothing is selected)."""
    settings = canvas.mapSettings()
    rect = selection_extent(layer, settings.destinationCrs(), settings.transformContext())
    if rect.isEmpty():
        return rect
    canvas.setExtent(rect)
    canvas.refresh()
    return canvas.extent()
