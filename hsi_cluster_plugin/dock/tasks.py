"""Background work for the dock: reading a layer's embedding fields and propagating labels run
as QgsTasks so QGIS never freezes.

Layers are not thread-safe: a :class:`QgsVectorLayerFeatureSource` is made in the main thread and
iterated in the task's thread (what QGIS's own background iterators do).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from qgis.core import (
    QgsFeatureRequest,
    QgsTask,
    QgsVectorLayer,
    QgsVectorLayerFeatureSource,
)

NUMERIC_TYPES = {"int", "integer", "integer64", "int8", "double", "real", "float", "numeric",
                 "decimal", "int4", "int2", "float8", "float4", "long", "longlong", "qlonglong",
                 "short", "uint", "ulonglong"}


class Cancelled(Exception):
    pass


def is_numeric_field(layer: QgsVectorLayer, name: str) -> bool:
    index = layer.fields().indexOf(name)
    return index >= 0 and layer.fields().at(index).isNumeric()


@dataclass
class LayerColumns:
    """Feature ids and attribute columns of a layer (numeric -> float64 with NaN for NULL, text
    -> object arrays with None for NULL)."""

    fids: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.fids.shape[0])


class ColumnReader:
    """Reads ``fields`` of ``layer`` without geometry. Construct in the main thread, call
    :meth:`read` in any thread."""

    def __init__(self, layer: QgsVectorLayer, fields: list[str], subset_fids=None):
        self.source = QgsVectorLayerFeatureSource(layer)
        layer_fields = layer.fields()
        self.fields = [f for f in fields if layer_fields.indexOf(f) >= 0]
        self.indices = [layer_fields.indexOf(f) for f in self.fields]
        self.numeric = [layer_fields.at(i).isNumeric() for i in self.indices]
        self.request = QgsFeatureRequest().setFlags(QgsFeatureRequest.NoGeometry)
        self.request.setSubsetOfAttributes(self.indices)
        if subset_fids is not None:
            self.request.setFilterFids(list(subset_fids))
        self.total = max(layer.featureCount(), 1)

    def read(self, task: QgsTask | None = None) -> LayerColumns:
        fids: list[int] = []
        values: list[list] = [[] for _ in self.fields]
        pairs = list(zip(self.indices, values))
        for n, feature in enumerate(self.source.getFeatures(self.request)):
            fids.append(feature.id())
            attrs = feature.attributes()
            for i, col in pairs:
                col.append(attrs[i])
            if task is not None and n % 5000 == 0:
                if task.isCanceled():
                    raise Cancelled()
                task.setProgress(min(99.0, 100.0 * n / self.total))
        out = LayerColumns(np.asarray(fids, dtype=np.int64))
        for name, numeric, col in zip(self.fields, self.numeric, values):
            out.columns[name] = to_array(col, numeric)
        return out


def to_array(values: list, numeric: bool) -> np.ndarray:
    """A column of QVariant-converted values as numpy (NULL -> NaN / None)."""
    if numeric:
        arr = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                arr[i] = float(v)
            except (TypeError, ValueError):
                arr[i] = np.nan  # NULL (QVariant) or not a number
        return arr
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = None if v is None or _is_null(v) else str(v)
    return arr


def _is_null(value) -> bool:
    try:
        return value.isNull()  # QVariant NULL as seen from PyQGIS
    except AttributeError:
        return False


class FunctionTask(QgsTask):
    """Runs ``work(task)`` in a worker thread; ``done(result, error)`` is called in the main
    thread (error is None on success, "cancelled" or a traceback string)."""

    def __init__(self, description: str, work: Callable, done: Callable | None = None):
        super().__init__(description, QgsTask.CanCancel)
        self.work = work
        self.done = done
        self.result = None
        self.error: str | None = None

    def run(self) -> bool:
        try:
            self.result = self.work(self)
            return True
        except Cancelled:
            self.error = "cancelled"
            return False
        except Exception:
            self.error = traceback.format_exc()
            return False

    def finished(self, ok: bool) -> None:
        if not ok and self.error is None:
            self.error = "cancelled"
        if self.done is not None:
            self.done(self.result if ok else None, None if ok else self.error)


def read_geopackage_table(path: str, table: str, prefix: str = "e") -> dict[str, np.ndarray]:
    """``segment_id`` and the ``e0..e{E-1}`` columns of an attribute-only GeoPackage table, read
    with sqlite3 (read-only). Tens of times faster than feature iteration for 100k rows x 64
    columns; fine here because QGIS never edits that table. Raises on any problem (the caller
    falls back on :class:`ColumnReader`)."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [row[1] for row in con.execute(f'PRAGMA table_info("{table}")')]
        dims = sorted((n for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()),
                      key=lambda n: int(n[len(prefix):]))
        if "segment_id" not in names or not dims:
            raise ValueError(f"{table} has no segment_id / {prefix}0.. columns")
        columns = ", ".join(f'"{n}"' for n in ["segment_id", *dims])
        rows = con.execute(f'SELECT {columns} FROM "{table}"').fetchall()
    finally:
        con.close()
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(dims) + 1)
    out = {"segment_id": data[:, 0]}
    out.update({n: data[:, i + 1] for i, n in enumerate(dims)})
    return out
