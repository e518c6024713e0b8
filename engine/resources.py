"""Memory estimates made before a run starts, so a run that cannot fit is refused up front
instead of taking the machine (and QGIS) down after minutes of work.

SCDSC's peak is set by FINCH: the patch-PCA features of every valid pixel (``d`` float32 each:
300 components up to 250k valid pixels, 64 above, see ``engine.patch_features``), the HNSW index
built on them, and the arrays around them; the scene itself (bands, latent tensors) comes on
top. The model below is linear in those sizes; its two constants were fitted to measured peak
RSS of whole runs (bench/results.jsonl, 2026-12-03, ``python -m bench.run_all --scenes
s2_aberystwyth --methods scdsc``): 1,296 MB for 110,224 pixels (d = 300) and 2,786 MB for
880,710 pixels (d = 64), both 10 bands; that is ``600 MB + pixels x (1,320 + 12 x bands + 16.2 x
d) bytes``. A 4 x 4 mosaic of s2_aberystwyth (14.1 M pixels) gives 35 GB, in line with the
17 GB still growing in FINCH that was observed there.
"""

from __future__ import annotations

from engine.patch_features import LARGE_SCENE_COMPONENTS, LARGE_SCENE_PIXELS, REFERENCE_COMPONENTS

BASE_BYTES = 600 * 2**20  # interpreter, torch, GDAL, QGIS
PER_PIXEL_BYTES = 1320.0
PER_PIXEL_BAND_BYTES = 12.0  # the cube and its standardised copies, float32
PER_PIXEL_COMPONENT_BYTES = 16.2  # FINCH features, their HNSW index copy and working arrays


def scdsc_peak_bytes(n_pixels: int, n_bands: int, n_valid: int | None = None) -> int:
    """Estimated peak memory of an SCDSC run on ``n_pixels`` (``n_valid`` of them valid;
    all when unknown) with ``n_bands`` bands.

    With ``n_valid`` unknown the larger of the two FINCH feature sizes is taken (a scene whose
    valid part is below 250k pixels uses 300 components).
    """
    n_valid = n_pixels if n_valid is None else n_valid

    def estimate(valid: int, components: int) -> float:
        return (BASE_BYTES + n_pixels * (PER_PIXEL_BYTES + PER_PIXEL_BAND_BYTES * n_bands)
                + valid * PER_PIXEL_COMPONENT_BYTES * components)

    if n_valid <= LARGE_SCENE_PIXELS:
        return int(estimate(n_valid, REFERENCE_COMPONENTS))
    return int(max(estimate(n_valid, LARGE_SCENE_COMPONENTS),
                   estimate(LARGE_SCENE_PIXELS, REFERENCE_COMPONENTS)))


def largest_scdsc_pixels(available_bytes: int, n_bands: int) -> int:
    """The most pixels an SCDSC run fits in ``available_bytes`` (per the estimate above)."""
    low, high = 0, 10**10
    while low < high:
        middle = (low + high + 1) // 2
        if scdsc_peak_bytes(middle, n_bands) <= available_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def available_memory_bytes() -> int:
    """Memory the system can give a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)
