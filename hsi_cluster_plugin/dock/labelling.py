"""Writing labels to a layer's ``label`` field (undoable) and keeping label colours.

Labels go into the layer's edit buffer inside one edit command per action, so Ctrl+Z in QGIS
(the layer's undo stack) takes a whole "label 500 segments as water" back in one step. They reach
the GeoPackage when the user saves the layer edits. Label colours live in the layer's custom
properties, which QGIS stores in the project file with the layer.
"""

from __future__ import annotations

import json

from qgis.core import QgsFeatureRequest, QgsField, QgsVectorDataProvider, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant

from .colours import palette_hex

LABEL_FIELD = "label"
COLOURS_PROPERTY = "hsi_cluster/label_colours"
NULL_TEXT = QVariant(QVariant.String)  # a valid, null text value (what NULL labels read as)


class LabellingError(ValueError):
    """Labels cannot be written (read-only layer, no label field and none can be added...)."""


def label_colours(layer: QgsVectorLayer) -> dict[str, str]:
    raw = layer.customProperty(COLOURS_PROPERTY, "")
    if not raw:
        return {}
    try:
        colours = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return {str(k): str(v) for k, v in colours.items()} if isinstance(colours, dict) else {}


def set_label_colour(layer: QgsVectorLayer, label: str, colour: str) -> dict[str, str]:
    colours = label_colours(layer)
    colours[label] = colour
    layer.setCustomProperty(COLOURS_PROPERTY, json.dumps(colours, sort_keys=True))
    return colours


def colour_for(layer: QgsVectorLayer, label: str) -> str:
    """The stored colour of ``label``, else the next palette colour (not stored yet)."""
    colours = label_colours(layer)
    if label in colours:
        return colours[label]
    used = set(colours.values())
    i = 0
    while palette_hex(i) in used:
        i += 1
    return palette_hex(i)


def writability_problem(layer: QgsVectorLayer, field: str = LABEL_FIELD) -> str | None:
    """Why labels cannot be written to ``layer`` (None when they can)."""
    if layer is None or not layer.isValid():
        return "the segment layer is not valid any more"
    if layer.readOnly():
        return (f"layer '{layer.name()}' is read-only: labels cannot be written. Make it "
                "editable (Layer Properties) or save a copy of it, and try again")
    caps = layer.dataProvider().capabilities()
    if not caps & QgsVectorDataProvider.ChangeAttributeValues:
        return (f"the data source of layer '{layer.name()}' does not allow changing attribute "
                "values: save a copy as GeoPackage and label that")
    if layer.fields().indexOf(field) < 0 and not caps & QgsVectorDataProvider.AddAttributes:
        return (f"layer '{layer.name()}' has no '{field}' field and fields cannot be added to "
                "it: save a copy as GeoPackage and label that")
    return None


def ensure_editable(layer: QgsVectorLayer, field: str = LABEL_FIELD) -> int:
    """Start an edit session if needed and make sure the label field exists (added in the edit
    buffer if missing); returns the field index. Raises LabellingError with what to do."""
    problem = writability_problem(layer, field)
    if problem:
        raise LabellingError(problem)
    if not layer.isEditable() and not layer.startEditing():
        raise LabellingError(f"could not start editing layer '{layer.name()}' (is the file "
                             "locked or read-only on disk?)")
    index = layer.fields().indexOf(field)
    if index < 0:
        if not layer.addAttribute(QgsField(field, QVariant.String)):
            raise LabellingError(f"could not add a '{field}' field to layer '{layer.name()}'")
        index = layer.fields().indexOf(field)
    return index


def apply_labels(
    layer: QgsVectorLayer,
    assignments: dict[str, list[int]],
    text: str,
    field: str = LABEL_FIELD,
) -> int:
    """Write label -> feature ids (label "" or None clears) in ONE undoable edit command named
    ``text``; returns the number of changed features."""
    if not any(len(f) for f in assignments.values()):
        return 0
    index = ensure_editable(layer, field)
    old_values = _current_values(layer, index, [f for fids in assignments.values() for f in fids])
    layer.beginEditCommand(text)
    changed = 0
    try:
        for label, fids in assignments.items():
            value = label if label else None
            for fid in fids:
                fid = int(fid)
                if layer.changeAttributeValue(fid, index, value, old_values.get(fid, NULL_TEXT)):
                    changed += 1
    except Exception:
        layer.destroyEditCommand()
        raise
    layer.endEditCommand()
    return changed


def _current_values(layer: QgsVectorLayer, index: int, fids: list[int]) -> dict:
    """Field values before the change, read in one request. Passed on to changeAttributeValue
    because QGIS 3.22's undo, when it was not told the old value, clones the layer for every
    undone feature to look it up: undoing 8000 labels took 4 s that way, 4 ms this way."""
    request = QgsFeatureRequest().setFilterFids([int(f) for f in fids])
    request.setFlags(QgsFeatureRequest.NoGeometry).setSubsetOfAttributes([index])
    values = {}
    for feature in layer.getFeatures(request):
        value = feature.attributes()[index]
        values[feature.id()] = NULL_TEXT if value is None else value
    return values


def apply_label(layer: QgsVectorLayer, fids, label: str, field: str = LABEL_FIELD) -> int:
    fids = [int(f) for f in fids]
    what = f"label {len(fids)} segments as '{label}'" if label else f"clear {len(fids)} labels"
    return apply_labels(layer, {label: fids}, what, field)


def save_labels(layer: QgsVectorLayer) -> None:
    """Commit the edit buffer (writes the labels to the file); raises with QGIS's errors."""
    if not layer.isEditable():
        return
    if not layer.commitChanges():
        errors = "; ".join(layer.commitErrors())
        raise LabellingError(f"saving the labels of '{layer.name()}' failed: {errors}")
