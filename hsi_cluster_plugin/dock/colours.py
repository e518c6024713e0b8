"""Point colours for the scatter view: categorical palettes and a continuous ramp, as packed
0xAARRGGBB ``uint32`` arrays (the pixel format of ``QImage.Format_RGB32``/``ARGB32``)."""

from __future__ import annotations

import colorsys

import numpy as np

# Colour-blind friendly qualitative colours (Okabe-Ito + Tableau-like extras); more categories get
# golden-angle hues so neighbouring category numbers stay distinguishable.
_BASE_PALETTE = [
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#9467bd", "#2ca02c", "#ff9896",
]
# Viridis sampled at 8 stops, interpolated linearly in between.
_VIRIDIS = np.array(
    [[68, 1, 84], [70, 50, 127], [54, 92, 141], [39, 127, 142], [31, 161, 135],
     [74, 194, 109], [159, 218, 58], [253, 231, 37]], dtype=np.float64)
UNLABELLED_ARGB = np.uint32(0xFFB4B4B4)  # light grey: no label / NULL
BACKGROUND_ARGB = np.uint32(0xFFFFFFFF)


def palette_hex(i: int) -> str:
    """The i-th categorical colour as ``#rrggbb``."""
    if i < len(_BASE_PALETTE):
        return _BASE_PALETTE[i]
    hue = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def hex_to_argb(colour: str) -> np.uint32:
    colour = colour.lstrip("#")
    if len(colour) != 6:
        raise ValueError(f"colour {colour!r} is not #rrggbb")
    return np.uint32(0xFF000000 | int(colour, 16))


def ramp_argb(values: np.ndarray) -> np.ndarray:
    """Continuous colours for numeric values (NaN -> grey), scaled between the 2nd and 98th
    percentiles so a few outliers do not flatten the ramp."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, UNLABELLED_ARGB, dtype=np.uint32)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    lo, hi = np.percentile(values[finite], [2, 98])
    if hi <= lo:
        hi = lo + 1.0
    t = np.clip((values[finite] - lo) / (hi - lo), 0, 1) * (len(_VIRIDIS) - 1)
    i0 = np.minimum(t.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (t - i0)[:, None]
    rgb = (_VIRIDIS[i0] * (1 - frac) + _VIRIDIS[i0 + 1] * frac).round().astype(np.uint32)
    out[finite] = 0xFF000000 | (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return out


def category_codes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """``(codes, categories)``: codes index ``categories``; -1 for NULL/NaN/empty text."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        valid = np.isfinite(values)
    else:
        valid = np.array([v is not None and v != "" for v in values], dtype=bool)
    codes = np.full(values.shape[0], -1, dtype=np.int64)
    if not valid.any():
        return codes, []
    kept = values[valid]
    if kept.dtype.kind == "O":
        kept = kept.astype(str)
    categories, inverse = np.unique(kept, return_inverse=True)
    codes[valid] = inverse
    cats = [c.item() if hasattr(c, "item") else c for c in categories]
    if values.dtype.kind == "f" and all(float(c).is_integer() for c in cats):
        cats = [int(c) for c in cats]
    return codes, cats


def categorical_argb(
    values: np.ndarray, colours: dict | None = None
) -> tuple[np.ndarray, list[tuple[object, str, int]]]:
    """Colours per category (``colours`` maps a category to ``#rrggbb``; others get the palette)
    and a legend ``[(category, '#rrggbb', count)]``; NULL/empty is grey and not in the legend."""
    codes, cats = category_codes(values)
    colours = colours or {}
    hexes = [colours.get(c) or colours.get(str(c)) or palette_hex(i) for i, c in enumerate(cats)]
    lut = np.array([hex_to_argb(h) for h in hexes] + [UNLABELLED_ARGB], dtype=np.uint32)
    argb = lut[codes]  # code -1 picks the last entry (grey)
    counts = np.bincount(codes[codes >= 0], minlength=len(cats))
    legend = [(c, h, int(n)) for c, h, n in zip(cats, hexes, counts)]
    return argb, legend


def is_categorical(values: np.ndarray, max_categories: int = 30) -> bool:
    """Text, or numbers with few distinct integer values (cluster ids), are categories."""
    values = np.asarray(values)
    if values.dtype.kind in "OUS":
        return True
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return True
    if not np.all(np.equal(np.mod(finite, 1), 0)):
        return False
    return np.unique(finite).size <= max_categories
