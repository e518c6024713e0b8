"""A scatter plot widget for 100k+ points in plain Qt.

Points are rasterised with numpy into a ``uint32`` buffer that becomes a cached ``QImage``; the
widget repaints from that image, and re-rasterises only when the view, the colours or the
highlighted set change. Brushing (rectangle, lasso, click) is hit-tested with numpy in data
coordinates. There are no per-point Qt items, so 100k points pan and zoom smoothly.

Mouse: left button brushes with the current tool (or pans with the pan tool); the middle or right
button always pans; the wheel zooms around the cursor; Shift adds to the selection, Ctrl removes
from it; a click without drag picks the nearest point (or clears the selection on empty space).
"""

from __future__ import annotations

import numpy as np
from qgis.PyQt.QtCore import QPointF, QRect, QRectF, QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QImage, QPainter, QPen, QPolygonF
from qgis.PyQt.QtWidgets import QSizePolicy, QWidget

from .colours import BACKGROUND_ARGB

SELECTION_ARGB = np.uint32(0xFF202020)  # dark ring around highlighted points
TOOLS = ("rect", "lasso", "pan")
MODES = ("replace", "add", "subtract")


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Boolean mask of ``points`` (n, 2) inside ``polygon`` (m, 2), even-odd rule, vectorised
    over points (one numpy pass per polygon edge, after a bounding-box prefilter)."""
    points = np.asarray(points, dtype=np.float64)
    polygon = np.asarray(polygon, dtype=np.float64)
    inside = np.zeros(points.shape[0], dtype=bool)
    if polygon.shape[0] < 3 or points.shape[0] == 0:
        return inside
    lo, hi = polygon.min(axis=0), polygon.max(axis=0)
    cand = np.flatnonzero(
        (points[:, 0] >= lo[0]) & (points[:, 0] <= hi[0])
        & (points[:, 1] >= lo[1]) & (points[:, 1] <= hi[1])
    )
    if cand.size == 0:
        return inside
    x, y = points[cand, 0], points[cand, 1]
    result = np.zeros(cand.size, dtype=bool)
    xj, yj = polygon[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        for xi, yi in polygon:
            crosses = (yi > y) != (yj > y)
            if crosses.any():
                x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
                result ^= crosses & (x < x_at)
            xj, yj = xi, yi
    inside[cand] = result
    return inside


def fade(argb: np.ndarray, keep: float = 0.35) -> np.ndarray:
    """Blend packed colours towards white, keeping ``keep`` of the colour."""
    argb = np.asarray(argb, dtype=np.uint32)
    out = np.full(argb.shape, 0xFF000000, dtype=np.uint32)
    for shift in (16, 8, 0):
        channel = (argb >> shift) & 0xFF
        out |= (255 - ((255 - channel) * keep)).astype(np.uint32) << shift
    return out


class ScatterView(QWidget):
    """``set_points(xy, argb)``, ``set_colours(argb)``, ``set_highlight(indices)``.

    Emits ``brushed(indices, mode)`` with indices into the point array and mode one of
    ``MODES``; the widget itself never changes its highlight on a brush (the owner decides what
    got selected and calls :meth:`set_highlight`), which keeps linking one-directional.
    """

    brushed = pyqtSignal(object, str)
    view_changed = pyqtSignal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumSize(160, 120)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.setMouseTracking(False)
        self.setFocusPolicy(Qt.ClickFocus)
        self.tool = "rect"
        self.point_size = 2
        self._xy = np.zeros((0, 2), dtype=np.float64)
        self._argb = np.zeros(0, dtype=np.uint32)
        self._highlight = np.zeros(0, dtype=np.int64)
        self._draw_order = np.zeros(0, dtype=np.int64)
        self._view = (0.0, 1.0, 0.0, 1.0)  # xmin, xmax, ymin, ymax in data units
        self._image: QImage | None = None
        self._image_size = QSize()
        self._dirty = True
        self._press_pos: QPointF | None = None
        self._press_button = Qt.NoButton
        self._drag_path: list[QPointF] = []
        self._pan_offset = QPointF(0, 0)
        self._panning = False
        self.placeholder = "no points"
        self.render_count = 0  # how often the point image was rebuilt (tests, benchmark)

    # -- data -------------------------------------------------------------------------------------
    @property
    def n_points(self) -> int:
        return int(self._xy.shape[0])

    @property
    def xy(self) -> np.ndarray:
        return self._xy

    @property
    def highlighted(self) -> np.ndarray:
        return self._highlight

    def set_points(self, xy: np.ndarray, argb: np.ndarray | None = None) -> None:
        xy = np.ascontiguousarray(xy, dtype=np.float64).reshape(-1, 2)
        self._xy = xy
        if argb is None:
            argb = np.full(xy.shape[0], 0xFF3366CC, dtype=np.uint32)
        self._argb = np.asarray(argb, dtype=np.uint32)
        self._highlight = np.zeros(0, dtype=np.int64)
        # A fixed random drawing order, so no category is always painted on top of the others.
        self._draw_order = np.random.default_rng(0).permutation(xy.shape[0])
        self.reset_view()

    def set_colours(self, argb: np.ndarray) -> None:
        argb = np.asarray(argb, dtype=np.uint32)
        if argb.shape[0] != self.n_points:
            raise ValueError(f"{argb.shape[0]} colours for {self.n_points} points")
        self._argb = argb
        self._invalidate()

    def set_highlight(self, indices: np.ndarray) -> None:
        self._highlight = np.unique(np.asarray(indices, dtype=np.int64))
        self._invalidate()

    # -- view -------------------------------------------------------------------------------------
    def view_rect(self) -> tuple[float, float, float, float]:
        return self._view

    def set_view(self, xmin: float, xmax: float, ymin: float, ymax: float) -> None:
        if not (xmax > xmin and ymax > ymin):
            return
        self._view = (float(xmin), float(xmax), float(ymin), float(ymax))
        self._invalidate()
        self.view_changed.emit()

    def reset_view(self) -> None:
        finite = np.isfinite(self._xy).all(axis=1)
        if not finite.any():
            self.set_view(0.0, 1.0, 0.0, 1.0)
            return
        lo = self._xy[finite].min(axis=0)
        hi = self._xy[finite].max(axis=0)
        span = np.maximum(hi - lo, 1e-9)
        pad = span * 0.04
        self.set_view(lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])

    def zoom(self, factor: float, centre: tuple[float, float] | None = None) -> None:
        """Zoom in (factor > 1) or out around ``centre`` in data units (default: view centre)."""
        xmin, xmax, ymin, ymax = self._view
        cx, cy = centre if centre is not None else ((xmin + xmax) / 2, (ymin + ymax) / 2)
        self.set_view(cx - (cx - xmin) / factor, cx + (xmax - cx) / factor,
                      cy - (cy - ymin) / factor, cy + (ymax - cy) / factor)

    def pan_pixels(self, dx: float, dy: float) -> None:
        xmin, xmax, ymin, ymax = self._view
        sx = (xmax - xmin) / max(self.width() - 1, 1)
        sy = (ymax - ymin) / max(self.height() - 1, 1)
        self.set_view(xmin - dx * sx, xmax - dx * sx, ymin + dy * sy, ymax + dy * sy)

    def data_to_pixel(self, xy: np.ndarray) -> np.ndarray:
        xmin, xmax, ymin, ymax = self._view
        w, h = max(self.width() - 1, 1), max(self.height() - 1, 1)
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        px = (xy[:, 0] - xmin) / (xmax - xmin) * w
        py = (ymax - xy[:, 1]) / (ymax - ymin) * h
        return np.stack([px, py], axis=1)

    def pixel_to_data(self, pxy: np.ndarray) -> np.ndarray:
        xmin, xmax, ymin, ymax = self._view
        w, h = max(self.width() - 1, 1), max(self.height() - 1, 1)
        pxy = np.asarray(pxy, dtype=np.float64).reshape(-1, 2)
        x = xmin + pxy[:, 0] / w * (xmax - xmin)
        y = ymax - pxy[:, 1] / h * (ymax - ymin)
        return np.stack([x, y], axis=1)

    # -- hit tests (data coordinates) -------------------------------------------------------------
    def indices_in_rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        x, y = self._xy[:, 0], self._xy[:, 1]
        return np.flatnonzero((x >= xa) & (x <= xb) & (y >= ya) & (y <= yb))

    def indices_in_polygon(self, polygon: np.ndarray) -> np.ndarray:
        return np.flatnonzero(points_in_polygon(self._xy, polygon))

    def nearest_index(self, x: float, y: float, max_pixels: float = 6.0) -> int | None:
        if self.n_points == 0:
            return None
        pix = self.data_to_pixel(self._xy)
        (px, py), = self.data_to_pixel(np.array([[x, y]]))
        d2 = (pix[:, 0] - px) ** 2 + (pix[:, 1] - py) ** 2
        i = int(np.nanargmin(d2)) if np.isfinite(d2).any() else -1
        return i if i >= 0 and d2[i] <= max_pixels**2 else None

    def brush_rect(self, x0: float, y0: float, x1: float, y1: float, mode: str = "replace"):
        """Brush a rectangle given in data coordinates (what a mouse drag does); returns indices."""
        indices = self.indices_in_rect(x0, y0, x1, y1)
        self.brushed.emit(indices, mode)
        return indices

    def brush_polygon(self, polygon: np.ndarray, mode: str = "replace"):
        """Brush a lasso polygon given in data coordinates; returns indices."""
        indices = self.indices_in_polygon(polygon)
        self.brushed.emit(indices, mode)
        return indices

    # -- rendering --------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._dirty = True
        self.update()

    def render_image(self) -> QImage:
        """Rasterise the points into a QImage of the widget's size (cached until invalidated)."""
        w, h = max(self.width(), 1), max(self.height(), 1)
        if not self._dirty and self._image is not None and self._image_size == QSize(w, h):
            return self._image
        buf = np.full(h * w, BACKGROUND_ARGB, dtype=np.uint32)
        if self.n_points:
            order = self._draw_order
            pix = self.data_to_pixel(self._xy[order])
            with np.errstate(invalid="ignore"):
                px = np.floor(pix[:, 0]).astype(np.int64, copy=False)
                py = np.floor(pix[:, 1]).astype(np.int64, copy=False)
            ok = (np.isfinite(pix).all(axis=1) & (px >= -2) & (px < w + 2)
                  & (py >= -2) & (py < h + 2))
            px, py, colours = px[ok], py[ok], self._argb[order][ok]
            if self._highlight.size:
                colours = fade(colours)  # the selection stands out against faded points
            size = self.point_size
            self._stamp(buf, w, h, px, py, colours, range(0, size))
            if self._highlight.size:
                hpix = self.data_to_pixel(self._xy[self._highlight])
                hok = np.isfinite(hpix).all(axis=1)
                hx = np.floor(hpix[hok, 0]).astype(np.int64)
                hy = np.floor(hpix[hok, 1]).astype(np.int64)
                self._stamp(buf, w, h, hx, hy, SELECTION_ARGB, range(-1, size + 1))
                self._stamp(buf, w, h, hx, hy, self._argb[self._highlight][hok], range(0, size))
        self._buf = buf  # the QImage below shares this memory
        image = QImage(buf.data, w, h, 4 * w, QImage.Format_RGB32).copy()
        self._image, self._image_size, self._dirty = image, QSize(w, h), False
        self.render_count += 1
        return image

    @staticmethod
    def _stamp(buf, w, h, px, py, colours, offsets) -> None:
        """Write a square of pixels per point (later points overwrite earlier ones)."""
        for dy in offsets:
            for dx in offsets:
                x, y = px + dx, py + dy
                ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
                c = colours if np.ndim(colours) == 0 else colours[ok]
                buf[y[ok] * w + x[ok]] = c

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        try:
            if self.n_points == 0:
                painter.fillRect(self.rect(), QColor(255, 255, 255))
                painter.setPen(QColor(120, 120, 120))
                painter.drawText(self.rect(), Qt.AlignCenter, self.placeholder)
                return
            image = self.render_image()
            painter.drawImage(self._pan_offset, image)
            painter.setPen(QPen(QColor(180, 180, 180)))
            painter.drawRect(QRect(0, 0, self.width() - 1, self.height() - 1))
            if self._drag_path and self._press_button == Qt.LeftButton and not self._panning:
                pen = QPen(QColor(20, 20, 20), 1, Qt.DashLine)
                painter.setPen(pen)
                painter.setBrush(QColor(30, 120, 255, 40))
                if self.tool == "rect":
                    painter.drawRect(QRectF(self._drag_path[0], self._drag_path[-1]).normalized())
                else:
                    painter.drawPolygon(QPolygonF(self._drag_path))
        finally:
            painter.end()

    def resizeEvent(self, event) -> None:  # noqa: N802
        self._dirty = True
        super().resizeEvent(event)

    # -- mouse ------------------------------------------------------------------------------------
    @staticmethod
    def _mode(modifiers) -> str:
        if modifiers & Qt.ShiftModifier:
            return "add"
        if modifiers & Qt.ControlModifier:
            return "subtract"
        return "replace"

    def mousePressEvent(self, event) -> None:  # noqa: N802
        self._press_pos = QPointF(event.pos())
        self._press_button = event.button()
        self._panning = event.button() in (Qt.MiddleButton, Qt.RightButton) or (
            event.button() == Qt.LeftButton and self.tool == "pan")
        self._drag_path = [QPointF(event.pos())]

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if self._press_pos is None:
            return
        pos = QPointF(event.pos())
        if self._panning:
            # Move the cached image while dragging; re-rasterise once on release.
            self._pan_offset = pos - self._press_pos
        elif self.tool == "rect":
            self._drag_path = [self._drag_path[0], pos]
        else:
            last = self._drag_path[-1]
            if abs(pos.x() - last.x()) + abs(pos.y() - last.y()) >= 3:
                self._drag_path.append(pos)
        self.update()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        if self._press_pos is None:
            return
        start, end = self._press_pos, QPointF(event.pos())
        path, panning = self._drag_path, self._panning
        self._press_pos, self._drag_path, self._panning = None, [], False
        self._pan_offset = QPointF(0, 0)
        if panning:
            self.pan_pixels(end.x() - start.x(), end.y() - start.y())
            return
        if self._press_button != Qt.LeftButton:
            return
        mode = self._mode(event.modifiers())
        moved = abs(end.x() - start.x()) + abs(end.y() - start.y())
        if moved < 3:  # a click: pick the nearest point, or clear on empty space
            (x, y), = self.pixel_to_data(np.array([[end.x(), end.y()]]))
            i = self.nearest_index(x, y)
            indices = np.array([i] if i is not None else [], dtype=np.int64)
            self.brushed.emit(indices, mode)
        elif self.tool == "rect":
            (x0, y0), (x1, y1) = self.pixel_to_data(
                np.array([[start.x(), start.y()], [end.x(), end.y()]]))
            self.brush_rect(x0, y0, x1, y1, mode)
        else:
            poly = self.pixel_to_data(np.array([[p.x(), p.y()] for p in path + [end]]))
            self.brush_polygon(poly, mode)
        self.update()

    def wheelEvent(self, event) -> None:  # noqa: N802
        steps = event.angleDelta().y() / 120.0
        if steps == 0:
            return
        pos = event.pos() if hasattr(event, "pos") else event.position().toPoint()
        (cx, cy), = self.pixel_to_data(np.array([[pos.x(), pos.y()]]))
        self.zoom(1.25**steps, (cx, cy))

    def mouseDoubleClickEvent(self, event) -> None:  # noqa: N802
        self.reset_view()
