"""PNG quicklooks of label maps and the project's cluster palette.

The palette is exposed because the QGIS side uses the same colours for its paletted style, so a
cluster has the same colour in the quicklook, the report and the map canvas. Cluster ``c``
(1-based) gets ``palette[c - 1]``; label 0 (nodata / unlabelled) is always black.

PNGs are written with rasterio's PNG driver, so neither matplotlib nor PIL is needed.
"""

from __future__ import annotations

import colorsys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

Rgb = tuple[int, int, int]

NODATA_RGB: Rgb = (0, 0, 0)

# Kelly's colours of maximum contrast (without black and white): distinct for the first 20
# clusters, which covers most runs. Order matters: the first ones are the most distinct.
_KELLY_COLOURS: tuple[str, ...] = (
    "F3C300",  # vivid yellow
    "875692",  # strong purple
    "F38400",  # vivid orange
    "A1CAF1",  # very light blue
    "BE0032",  # vivid red
    "C2B280",  # greyish yellow
    "848482",  # medium grey
    "008856",  # vivid green
    "E68FAC",  # strong purplish pink
    "0067A5",  # strong blue
    "F99379",  # strong yellowish pink
    "604E97",  # strong violet
    "F6A600",  # vivid orange yellow
    "B3446C",  # strong purplish red
    "DCD300",  # vivid greenish yellow
    "882D17",  # strong reddish brown
    "8DB600",  # vivid yellowish green
    "654522",  # deep yellowish brown
    "E25822",  # vivid reddish orange
    "2B3D26",  # dark olive green
)

# Golden-angle hue steps spread further colours evenly around the hue circle.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATION_VALUE_LEVELS: tuple[tuple[float, float], ...] = (
    (0.85, 0.95),
    (0.55, 0.80),
    (0.95, 0.60),
    (0.40, 0.98),
)


def _hex_to_rgb(code: str) -> Rgb:
    return (int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16))


def default_palette(k: int) -> list[Rgb]:
    """``k`` visually distinct RGB colours (0..255), deterministic, never black.

    The first 20 are Kelly's maximum-contrast colours; beyond that, hues follow the golden angle
    with cycling saturation/value levels (duplicates and black are skipped).
    """
    if k < 0:
        raise ValueError(f"palette size must be >= 0, got {k}")
    palette = [_hex_to_rgb(code) for code in _KELLY_COLOURS[:k]]
    seen = set(palette) | {NODATA_RGB}
    step = 0
    while len(palette) < k:
        hue = (step * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation, value = _SATURATION_VALUE_LEVELS[step % len(_SATURATION_VALUE_LEVELS)]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colour = (round(red * 255), round(green * 255), round(blue * 255))
        step += 1
        if colour not in seen:
            seen.add(colour)
            palette.append(colour)
    return palette


def colourise_labels(labels: np.ndarray, palette: list[Rgb] | None = None) -> np.ndarray:
    """(H, W) integer labels -> (3, H, W) uint8 RGB; labels <= 0 (nodata, noise) are black."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    max_label = int(labels.max()) if labels.size else 0
    if palette is None:
        palette = default_palette(max(max_label, 0))
    if max_label > len(palette):
        raise ValueError(f"palette has {len(palette)} colours but labels go up to {max_label}")
    # Lookup table: index 0 is nodata, index c is cluster c.
    lookup = np.array([NODATA_RGB, *palette], dtype=np.uint8).reshape(-1, 3)
    indices = np.clip(labels, 0, None).astype(np.int64)
    return np.moveaxis(lookup[indices], -1, 0)


def write_label_quicklook(
    labels: np.ndarray,
    png_path: str | Path,
    palette: list[Rgb] | None = None,
    transparent_nodata: bool = False,
) -> Path:
    """Write (H, W) integer ``labels`` as an RGB PNG and return its path.

    Label 0 (and negative labels such as "noise") is black; label ``c`` gets ``palette[c - 1]``
    (default: :func:`default_palette`). With ``transparent_nodata`` an alpha band is added that is
    0 on nodata, giving an RGBA PNG.
    """
    rgb = colourise_labels(labels, palette)
    bands = rgb
    if transparent_nodata:
        alpha = np.where(np.asarray(labels) > 0, 255, 0).astype(np.uint8)[np.newaxis]
        bands = np.concatenate([rgb, alpha], axis=0)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "PNG",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": "uint8",
    }
    # GDAL_PAM_ENABLED=NO: no .aux.xml sidecar next to the PNG; a quicklook has no georeferencing.
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(png_path, "w", **profile) as dataset:
            dataset.write(bands)
    return png_path


def write_panels_quicklook(
    panels: list[tuple[np.ndarray, list[Rgb] | None]],
    png_path: str | Path,
    gap: int = 6,
    gap_rgb: Rgb = (255, 255, 255),
) -> Path:
    """Write label maps of one shape side by side (left to right) as one RGB PNG.

    ``panels`` holds (labels, palette) pairs, coloured as :func:`colourise_labels` does; the
    panels are separated by ``gap`` columns of ``gap_rgb``.
    """
    if not panels:
        raise ValueError("no panel to write")
    shapes = {np.asarray(labels).shape for labels, _ in panels}
    if len(shapes) != 1:
        raise ValueError(f"panels must have one shape; got {sorted(shapes)}")
    height = next(iter(shapes))[0]
    separator = np.empty((3, height, gap), dtype=np.uint8)
    separator[:] = np.array(gap_rgb, dtype=np.uint8)[:, None, None]
    pieces = []
    for index, (labels, palette) in enumerate(panels):
        if index:
            pieces.append(separator)
        pieces.append(colourise_labels(labels, palette))
    rgb = np.concatenate(pieces, axis=2)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "PNG", "width": rgb.shape[2], "height": rgb.shape[1], "count": 3,
               "dtype": "uint8"}
    with rasterio.Env(GDAL_PAM_ENABLED="NO"), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(png_path, "w", **profile) as dataset:
            dataset.write(rgb)
    return png_path
