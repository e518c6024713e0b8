"""The project's own synthetic hyperspectral demo scene, so a fresh clone works without data.

The scene is built to exercise what a spatial-spectral clustering must get right:

* spatially coherent class regions with irregular boundaries (argmax of smooth random fields),
* thin linear features (a meandering river, a straight road) that spatial smoothing can erase,
* smooth, plausible reflectance spectra per material (vegetation red edge, water, soil, ...),
* linear mixing at class boundaries (mixed pixels), within-class spectral variability,
  per-pixel brightness variation and Gaussian noise, tuned so k-means is good but not perfect,
* a nodata border and a few isolated nodata pixels inside.

Everything derives from one seeded ``numpy.random.Generator``, so the same seed gives the same
arrays (and the same file bytes).

Usage: ``python -m engine.demo_scene OUT_DIR [--seed N] [--height H] [--width W] ...``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter

from engine.quicklook import default_palette

CUBE_FILENAME = "demo_cube.tif"
TRUTH_FILENAME = "demo_truth.tif"
CUBE_NODATA = -9999.0
TRUTH_NODATA = 0
CRS_EPSG = 32633
PIXEL_SIZE_M = 10.0
# Upper-left corner in UTM 33N (a plausible spot in central Europe).
ORIGIN_EASTING_M = 512_340.0
ORIGIN_NORTHING_M = 5_341_760.0
FIRST_WAVELENGTH_NM = 450.0
LAST_WAVELENGTH_NM = 2400.0

# Tuning of the difficulty (k-means on standardised spectra: OA ~0.88-0.94 over seeds;
# errors sit mostly on mixed boundary pixels and thin features).
REGION_SCALE_FRACTION = 0.09  # smoothing of the class fields, as a fraction of min(H, W)
BOUNDARY_DETAIL_WEIGHT = 0.35  # fine-scale field that makes region boundaries irregular
MIXING_SIGMA_PX = 0.8  # width of the linear-mixing zone at class boundaries
VARIABILITY_AMPLITUDE = 0.45  # within-class spectral variability (relative to the perturbation)
BRIGHTNESS_SMOOTH_STD = 0.05  # illumination / topography (spatially smooth)
BRIGHTNESS_PIXEL_STD = 0.08  # per-pixel brightness jitter
NOISE_STD = 0.03  # additive Gaussian noise, in reflectance units
RIVER_WIDTH_PX = 3.0
ROAD_WIDTH_PX = 2.0


@dataclass
class DemoScene:
    """Paths and class description of a generated demo scene."""

    cube_path: Path
    truth_path: Path
    n_classes: int
    class_names: list[str]


# ----------------------------------------------------------------------------------- spectra


def _gauss(wavelengths: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((wavelengths - centre) / width) ** 2)


def _sigmoid(wavelengths: np.ndarray, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(wavelengths - centre) / width))


def _water_absorption(wavelengths: np.ndarray, depth: float) -> np.ndarray:
    """Multiplicative dips of leaf / soil water near 1450 and 1940 nm."""
    dips = 0.6 * _gauss(wavelengths, 1450, 60) + 1.0 * _gauss(wavelengths, 1940, 70)
    return 1.0 - depth * dips


def _vegetation(wl: np.ndarray) -> np.ndarray:
    visible = 0.04 + 0.05 * _gauss(wl, 555, 35) - 0.015 * _gauss(wl, 670, 25)
    nir_plateau = 0.46 * _sigmoid(wl, 718, 18)
    swir_decline = 1.0 - 0.55 * _sigmoid(wl, 1350, 250)
    return (visible + nir_plateau * swir_decline) * _water_absorption(wl, 0.65)


def _water(wl: np.ndarray) -> np.ndarray:
    return 0.012 + 0.06 * np.exp(-(wl - 450) / 120) + 0.012 * _gauss(wl, 560, 40)


def _bare_soil(wl: np.ndarray) -> np.ndarray:
    rising = 0.10 + 0.26 * (1.0 - np.exp(-(wl - 400) / 700))
    clay = 1.0 - 0.12 * _gauss(wl, 2200, 40)
    iron = 1.0 - 0.08 * _gauss(wl, 900, 90)
    return rising * clay * iron * _water_absorption(wl, 0.25)


def _urban(wl: np.ndarray) -> np.ndarray:
    # Concrete / asphalt mix: grey, gently rising, weak features.
    return (0.17 + 0.05 * _sigmoid(wl, 800, 250) - 0.02 * _gauss(wl, 2300, 80)) * (
        _water_absorption(wl, 0.08)
    )


def _dry_grass(wl: np.ndarray) -> np.ndarray:
    visible = 0.06 + 0.10 * _sigmoid(wl, 600, 45)
    weak_red_edge = 0.17 * _sigmoid(wl, 720, 25)
    cellulose = 1.0 - 0.15 * _gauss(wl, 2100, 50)
    swir = 0.06 * _sigmoid(wl, 1100, 150) - 0.06 * _sigmoid(wl, 2000, 120)
    return (visible + weak_red_edge + swir) * cellulose * _water_absorption(wl, 0.35)


def _conifer_forest(wl: np.ndarray) -> np.ndarray:
    visible = 0.025 + 0.03 * _gauss(wl, 555, 35) - 0.008 * _gauss(wl, 670, 25)
    nir_plateau = 0.28 * _sigmoid(wl, 722, 18)
    swir_decline = 1.0 - 0.6 * _sigmoid(wl, 1300, 250)
    return (visible + nir_plateau * swir_decline) * _water_absorption(wl, 0.7)


def _sand(wl: np.ndarray) -> np.ndarray:
    return (0.25 + 0.22 * (1.0 - np.exp(-(wl - 400) / 500))) * _water_absorption(wl, 0.1)


def _red_roof(wl: np.ndarray) -> np.ndarray:
    return 0.07 + 0.25 * _sigmoid(wl, 590, 20) + 0.04 * _sigmoid(wl, 1200, 200)


# Order matters: the first n_classes are used. The river is "water" and the road "urban".
MATERIAL_LIBRARY: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("vegetation", _vegetation),
    ("water", _water),
    ("bare soil", _bare_soil),
    ("urban", _urban),
    ("dry grass", _dry_grass),
    ("conifer forest", _conifer_forest),
    ("sand", _sand),
    ("red roof", _red_roof),
)


def band_wavelengths(n_bands: int) -> np.ndarray:
    """Band-centre wavelengths in nm, evenly spaced over VNIR-SWIR and rounded to whole nm."""
    return np.round(np.linspace(FIRST_WAVELENGTH_NM, LAST_WAVELENGTH_NM, n_bands))


def _synthetic_material(wl: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random spectrum for classes beyond the named library."""
    coarse = gaussian_filter(rng.normal(size=wl.size), sigma=max(wl.size / 8, 1.0), mode="nearest")
    coarse = (coarse - coarse.min()) / (np.ptp(coarse) + 1e-9)
    return 0.05 + 0.4 * coarse


def class_spectra(
    wavelengths: np.ndarray, n_classes: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Names and (n_classes, n_bands) reflectance spectra of the scene's materials."""
    names = [name for name, _ in MATERIAL_LIBRARY[:n_classes]]
    spectra = [model(wavelengths) for _, model in MATERIAL_LIBRARY[:n_classes]]
    for extra in range(len(names), n_classes):
        names.append(f"material {extra + 1}")
        spectra.append(_synthetic_material(wavelengths, rng))
    return names, np.clip(np.array(spectra), 0.003, 1.0)


# ----------------------------------------------------------------------------- class layout


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std spatially smooth Gaussian random field."""
    field = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _balanced_argmax(fields: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Argmax over class fields with per-class offsets nudged towards equal class shares.

    Plain argmax of random fields can leave a class with a sliver of the scene; a few
    multiplicative-weights-style updates of the offsets keep every class well represented.
    """
    n_classes = fields.shape[0]
    offsets = np.zeros(n_classes)
    target = 1.0 / n_classes
    for _ in range(iterations):
        labels = np.argmax(fields + offsets[:, None, None], axis=0)
        shares = np.bincount(labels.ravel(), minlength=n_classes) / labels.size
        offsets += 0.3 * np.log(target / np.maximum(shares, 1e-4))
    return np.argmax(fields + offsets[:, None, None], axis=0)


def _river_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A meandering band crossing the scene from left to right."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    centre_row = rng.uniform(0.3, 0.7) * height
    amplitude = rng.uniform(0.06, 0.12) * height
    period = rng.uniform(0.5, 0.9) * width
    phase = rng.uniform(0, 2 * np.pi)
    path = centre_row + amplitude * np.sin(2 * np.pi * cols / period + phase)
    slope = amplitude * 2 * np.pi / period * np.cos(2 * np.pi * cols / period + phase)
    # Vertical offset times cos(angle) approximates the perpendicular distance to the curve.
    distance = np.abs(rows - path) / np.sqrt(1.0 + slope**2)
    return distance <= RIVER_WIDTH_PX / 2


def _road_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A straight band crossing the scene roughly top to bottom."""
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(np.deg2rad(55), np.deg2rad(80))
    centre_row, centre_col = height / 2, rng.uniform(0.3, 0.7) * width
    distance = np.abs((cols - centre_col) * np.sin(angle) - (rows - centre_row) * np.cos(angle))
    return distance <= ROAD_WIDTH_PX / 2


def class_layout(rng: np.random.Generator, shape: tuple[int, int], names: list[str]) -> np.ndarray:
    """(H, W) 0-based class index map: coherent regions plus a river and a road."""
    n_classes = len(names)
    region_sigma = max(REGION_SCALE_FRACTION * min(shape), 2.0)
    fields = np.stack(
        [
            _smooth_field(rng, shape, region_sigma)
            + BOUNDARY_DETAIL_WEIGHT * _smooth_field(rng, shape, region_sigma / 4)
            for _ in range(n_classes)
        ]
    )
    layout = _balanced_argmax(fields)
    river = _river_mask(rng, shape)
    road = _road_mask(rng, shape)
    if "water" in names:
        layout[river] = names.index("water")
    if "urban" in names:
        layout[road] = names.index("urban")  # drawn last: the road bridges the river
    return layout


# ------------------------------------------------------------------------------- radiometry


def _abundances(layout: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, H, W) fractions summing to 1: blurred one-hot maps = linear mixing at edges."""
    one_hot = (layout[np.newaxis] == np.arange(n_classes)[:, None, None]).astype(np.float64)
    return np.stack(
        [gaussian_filter(plane, sigma=MIXING_SIGMA_PX, mode="nearest") for plane in one_hot]
    )


def _within_class_spectra(
    rng: np.random.Generator, spectra: np.ndarray, shape: tuple[int, int], region_sigma: float
) -> np.ndarray:
    """(n_classes, n_bands, H, W): each class's spectrum drifting smoothly over the scene.

    Each class gets one smooth perturbation spectrum (think vegetation vigour or soil moisture)
    whose strength varies smoothly in space, so a class is a spectral cloud, not a point.
    """
    n_classes, n_bands = spectra.shape
    varied = np.empty((n_classes, n_bands, *shape))
    for index in range(n_classes):
        perturbation = gaussian_filter(rng.normal(size=n_bands), sigma=2.0, mode="nearest")
        perturbation /= np.abs(perturbation).max() + 1e-12
        strength = _smooth_field(rng, shape, region_sigma / 2)
        relative = 1.0 + VARIABILITY_AMPLITUDE * 0.5 * perturbation[:, None, None] * strength
        varied[index] = spectra[index][:, None, None] * np.clip(relative, 0.3, None)
    return varied


def render_cube(
    rng: np.random.Generator, layout: np.ndarray, spectra: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(n_bands, H, W) float32 reflectance and the (H, W) dominant 0-based class index.

    Like real atmospherically corrected data, dark bands (water in the SWIR) can be slightly
    negative because of the noise; values are not clipped.
    """
    n_classes = spectra.shape[0]
    shape = layout.shape
    region_sigma = max(REGION_SCALE_FRACTION * min(shape), 2.0)
    abundances = _abundances(layout, n_classes)
    varied = _within_class_spectra(rng, spectra, shape, region_sigma)
    cube = np.einsum("khw,kbhw->bhw", abundances, varied)
    brightness = (
        1.0
        + BRIGHTNESS_SMOOTH_STD * _smooth_field(rng, shape, region_sigma)
        + BRIGHTNESS_PIXEL_STD * rng.normal(size=shape)
    )
    cube = cube * brightness[np.newaxis] + NOISE_STD * rng.normal(size=cube.shape)
    dominant = np.argmax(abundances, axis=0)
    return cube.astype(np.float32), dominant


def nodata_mask(rng: np.random.Generator, shape: tuple[int, int], border: int) -> np.ndarray:
    """True on the nodata border and on a few isolated interior pixels (dead detector etc.)."""
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    if border > 0:
        mask[:border, :] = mask[-border:, :] = True
        mask[:, :border] = mask[:, -border:] = True
    interior_rows = np.arange(border, height - border)
    interior_cols = np.arange(border, width - border)
    if interior_rows.size and interior_cols.size:
        n_isolated = max(3, interior_rows.size * interior_cols.size // 1500)
        mask[rng.choice(interior_rows, n_isolated), rng.choice(interior_cols, n_isolated)] = True
    return mask


# ------------------------------------------------------------------------------------ files


def _write_cube(path: Path, cube: np.ndarray, wavelengths: np.ndarray) -> None:
    n_bands, height, width = cube.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": n_bands,
        "dtype": "float32",
        "nodata": CUBE_NODATA,
        "crs": CRS.from_epsg(CRS_EPSG),
        "transform": from_origin(ORIGIN_EASTING_M, ORIGIN_NORTHING_M, PIXEL_SIZE_M, PIXEL_SIZE_M),
        "interleave": "pixel",
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(cube)
        dataset.update_tags(wavelength_units="nm", source="HSI Cluster synthetic demo scene")
        for band, wavelength in enumerate(wavelengths, start=1):
            dataset.set_band_description(band, f"band {band} ({wavelength:.0f} nm)")
            dataset.update_tags(band, wavelength=f"{wavelength:.0f}", wavelength_units="nm")
            # GDAL >= 3.10 reads band wavelengths from the IMAGERY metadata domain.
            dataset.update_tags(
                band, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=f"{wavelength / 1000:.3f}"
            )


def _write_truth(path: Path, truth: np.ndarray, class_names: list[str]) -> None:
    height, width = truth.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": "uint8",
        "nodata": TRUTH_NODATA,
        "crs": CRS.from_epsg(CRS_EPSG),
        "transform": from_origin(ORIGIN_EASTING_M, ORIGIN_NORTHING_M, PIXEL_SIZE_M, PIXEL_SIZE_M),
        "compress": "deflate",
    }
    palette = default_palette(len(class_names))
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(truth, 1)
        dataset.set_band_description(1, "reference class (0 = no label)")
        dataset.update_tags(
            **{f"class_{index}": name for index, name in enumerate(class_names, start=1)}
        )
        colormap = {0: (0, 0, 0, 0)}
        colormap.update({index: (*rgb, 255) for index, rgb in enumerate(palette, start=1)})
        dataset.write_colormap(1, colormap)


def make_demo_scene(
    out_dir: str | Path,
    height: int = 120,
    width: int = 140,
    n_bands: int = 32,
    n_classes: int = 5,
    seed: int = 0,
    nodata_border: int = 4,
) -> DemoScene:
    """Generate the demo scene into ``out_dir`` (created if needed) and return its description.

    Writes ``demo_cube.tif`` (float32 reflectance, ``n_bands`` bands, nodata -9999) and
    ``demo_truth.tif`` (uint8, 0 = no label / nodata, classes 1..n_classes = dominant material
    of each valid pixel) on the same EPSG:32633, 10 m north-up grid.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if n_bands < 1:
        raise ValueError(f"n_bands must be >= 1, got {n_bands}")
    if nodata_border < 0 or min(height, width) <= 2 * nodata_border + 4:
        raise ValueError(
            f"scene {height}x{width} is too small for a nodata border of {nodata_border}"
        )
    rng = np.random.default_rng(seed)
    wavelengths = band_wavelengths(n_bands)
    class_names, spectra = class_spectra(wavelengths, n_classes, rng)
    layout = class_layout(rng, (height, width), class_names)
    cube, dominant = render_cube(rng, layout, spectra)
    invalid = nodata_mask(rng, (height, width), nodata_border)

    cube[:, invalid] = CUBE_NODATA
    truth = (dominant + 1).astype(np.uint8)
    truth[invalid] = TRUTH_NODATA

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube_path = out_dir / CUBE_FILENAME
    truth_path = out_dir / TRUTH_FILENAME
    _write_cube(cube_path, cube, wavelengths)
    _write_truth(truth_path, truth, class_names)
    return DemoScene(cube_path, truth_path, n_classes, class_names)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.demo_scene", description="Write the HSI Cluster demo scene."
    )
    parser.add_argument("out_dir", type=Path, help="directory for demo_cube.tif / demo_truth.tif")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=140)
    parser.add_argument("--bands", type=int, default=32, help="number of spectral bands")
    parser.add_argument("--classes", type=int, default=5, help="number of classes")
    parser.add_argument("--border", type=int, default=4, help="nodata border width in pixels")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    scene = make_demo_scene(
        args.out_dir,
        height=args.height,
        width=args.width,
        n_bands=args.bands,
        n_classes=args.classes,
        seed=args.seed,
        nodata_border=args.border,
    )
    print(f"cube:  {scene.cube_path}")
    print(f"truth: {scene.truth_path}")
    print(f"classes: {', '.join(f'{i}={n}' for i, n in enumerate(scene.class_names, start=1))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
