"""Spatial context that adapts to the scene: edge-respecting neighbour weights and their scale.

SCDSC's published context is fixed: a 7x7 latent patch, 17x17 FINCH patches and a 7x7 box
smoothing of the soft assignments. A box mixes every neighbour in, so a two-pixel road or a
three-pixel river is averaged into its surroundings, and on scenes whose reference labels are per
pixel (unmixing argmax, 30 m urban pixels) every extra pixel of context costs agreement.

Here a neighbour ``q`` of pixel ``p`` counts with the weight

    w(p, q) = exp(-||x_p - x_q||^2 / (2 h^2))

(``x`` = the network's input spectra), a bilateral / non-local-means weight: neighbours of the
same material count fully, neighbours across an edge hardly at all. The bandwidth ``h^2`` is the
median squared spectral distance between 4-adjacent valid pixels of the scene itself (the median
heuristic for kernel bandwidths): most adjacent pairs lie inside one region, so the median
measures the scene's within-region variation (noise and texture), whatever the sensor, the band
count or the units, and an edge is anything well above it. No constant is tuned to a scene.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def adjacent_squared_distances(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Squared distances between horizontally and vertically adjacent valid pixels.

    ``image`` is (C, H, W), ``valid`` (H, W) bool; returns a 1-D tensor (one value per pair).
    """
    pairs = []
    if image.shape[2] > 1:
        both = valid[:, 1:] & valid[:, :-1]
        pairs.append((image[:, :, 1:] - image[:, :, :-1]).pow(2).sum(0)[both])
    if image.shape[1] > 1:
        both = valid[1:, :] & valid[:-1, :]
        pairs.append((image[:, 1:, :] - image[:, :-1, :]).pow(2).sum(0)[both])
    return torch.cat(pairs) if pairs else torch.zeros(0, dtype=image.dtype)


def neighbour_bandwidth(image: np.ndarray, valid: np.ndarray, max_pairs: int = 2_000_000,
                        seed: int = 0) -> float:
    """h^2: median squared spectral distance of 4-adjacent valid pixels (``image`` (H, W, C)).

    Falls back to the mean squared distance to the scene mean when no two valid pixels touch.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    distances = adjacent_squared_distances(tensor, torch.from_numpy(valid))
    if distances.numel() > max_pairs:  # the median of a large random subset is as good
        generator = torch.Generator().manual_seed(seed)
        distances = distances[torch.randperm(distances.numel(), generator=generator)[:max_pairs]]
    median = float(distances.median()) if distances.numel() else 0.0
    if median <= 0.0:
        pixels = image[valid].astype(np.float64)
        spread = ((pixels - pixels.mean(axis=0)) ** 2).sum(axis=1)
        median = float(spread.mean()) if len(pixels) else 1.0
    return max(median, 1e-12)


def spectral_neighbour_weights(spectra: torch.Tensor, valid: torch.Tensor, window: int,
                               bandwidth: float) -> torch.Tensor:
    """(B, window^2, H, W) weights w(p, p + offset) for every offset of a window x window box.

    ``spectra`` is (B, C, H, W), ``valid`` (B, H, W) bool. Neighbours that are nodata or fall
    outside the grid weigh 0; a valid pixel's own weight is 1.
    """
    half = window // 2
    height, width = spectra.shape[-2:]
    padded = F.pad(spectra, (half, half, half, half))
    mask = F.pad(valid.unsqueeze(1).to(spectra.dtype), (half, half, half, half))
    weights = []
    for dy in range(window):
        for dx in range(window):
            neighbour = padded[..., dy : dy + height, dx : dx + width]
            squared = (neighbour - spectra).pow(2).sum(dim=1, keepdim=True)
            weights.append(torch.exp(-squared / (2.0 * bandwidth))
                           * mask[..., dy : dy + height, dx : dx + width])
    return torch.cat(weights, dim=1)


def weighted_neighbour_mean(grid: torch.Tensor, weights: torch.Tensor, window: int) -> torch.Tensor:
    """Weighted mean of ``grid`` (B, K, H, W) over each pixel's window x window neighbours.

    ``weights`` come from :func:`spectral_neighbour_weights`; neighbours outside ``grid`` (a
    tile's edge) weigh 0, so a tile needs no halo. With window 1 this returns ``grid``.
    """
    half = window // 2
    height, width = grid.shape[-2:]
    padded = F.pad(grid, (half, half, half, half))
    inside = F.pad(torch.ones_like(grid[:, :1]), (half, half, half, half))
    total = torch.zeros_like(grid)
    norm = torch.zeros_like(grid[:, :1])
    index = 0
    for dy in range(window):
        for dx in range(window):
            weight = weights[:, index : index + 1] * inside[..., dy : dy + height, dx : dx + width]
            total = total + weight * padded[..., dy : dy + height, dx : dx + width]
            norm = norm + weight
            index += 1
    return total / norm.clamp_min(1e-12)


def edge_aware_smoothing(image: np.ndarray, valid: np.ndarray, window: int,
                         bandwidth: float) -> np.ndarray:
    """(H, W, C) image smoothed with the spectral weights (nodata pixels stay as they are)."""
    spectra = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0)
    mask = torch.from_numpy(valid).unsqueeze(0)
    out = np.array(image, dtype=np.float32, copy=True)
    with torch.no_grad():
        weights = spectral_neighbour_weights(spectra, mask, window, bandwidth)
        smoothed = weighted_neighbour_mean(spectra, weights, window)[0].permute(1, 2, 0).numpy()
    out[valid] = smoothed[valid]
    return out


# The paper's context: a 7x7 latent patch and smoothing window, i.e. radius 3.
MAX_CONTEXT_RADIUS = 3
# Ground extent a context window may cover. The paper's 7x7 windows cover 7-17.5 m on its 1-2.5 m
# airborne scenes, parts of single objects. A window wider than a land-cover object (a building
# block, a road with its verges, a small field: a few tens of metres) mixes other objects in; at
# 20-30 m pixels one pixel already spans such an object (Strahler et al. 1986's L-resolution case,
# doi:10.1016/0034-4257(86)90116-2), so the pixel is its own context.
MAX_CONTEXT_METRES = 50.0


def ground_window(pixel_size_m: float | None, max_radius: int = MAX_CONTEXT_RADIUS) -> int | None:
    """Largest odd window (1..2 max_radius + 1) covering at most MAX_CONTEXT_METRES; None when
    the pixel size is unknown."""
    if pixel_size_m is None or not np.isfinite(pixel_size_m) or pixel_size_m <= 0:
        return None
    radius = int((MAX_CONTEXT_METRES / pixel_size_m - 1.0) // 2)
    return 2 * min(max(radius, 0), max_radius) + 1


def median_semivariance(image: torch.Tensor, valid: torch.Tensor, dy: int, dx: int) -> float:
    """Median of ||x_p - x_{p+(dy,dx)}||^2 / 2 over valid pairs (``image`` (C, H, W))."""
    height, width = valid.shape
    if dy >= height or dx >= width:
        return float("inf")
    first = image[:, : height - dy, : width - dx]
    second = image[:, dy:, dx:]
    both = valid[: height - dy, : width - dx] & valid[dy:, dx:]
    values = (first - second).pow(2).sum(0)[both]
    return 0.5 * float(values.median()) if values.numel() else float("inf")


def choose_context_scale(image: np.ndarray, valid: np.ndarray,
                         pixel_size_m: float | None = None,
                         max_radius: int = MAX_CONTEXT_RADIUS) -> tuple[int, str]:
    """Window size (1, 3, 5 or 7) of the context, from the scene's median semivariogram.

    gamma(h) is the median semivariance of pixel pairs at offset h (median: the typical pair,
    inside a region). gamma at the adjacent offset is the scene's pixel-level variation (noise
    and texture). A neighbour at offset h adds information about the pixel's material while the
    structural dissimilarity it brings, gamma(h) - gamma(1), stays below that pixel-level
    variation, i.e. gamma(h) <= 2 gamma(1): beyond that, averaging it in costs more (bias) than
    it removes (noise). The window's farthest neighbours are its corners, so the radius is the
    largest r <= ``max_radius`` whose corner offset (r, r) passes; r = 0 (1 x 1) when even the
    diagonal neighbours fail. When the pixel size is known, the window also covers at most
    MAX_CONTEXT_METRES of ground (:func:`ground_window`). Returns the window and a line of
    evidence for the run's log.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    mask = torch.from_numpy(np.asarray(valid, dtype=bool))
    adjacent = 0.5 * (median_semivariance(tensor, mask, 0, 1)
                      + median_semivariance(tensor, mask, 1, 0))
    radius, ratios = 0, []
    for r in range(1, max_radius + 1):
        corner = 0.5 * (median_semivariance(tensor, mask, r, r)
                        + _anti_diagonal(tensor, mask, r))
        ratio = corner / max(adjacent, 1e-12)
        ratios.append(f"gamma({r},{r})/gamma(1) = {ratio:.2f}")
        if ratio > 2.0:
            break
        radius = r
    window = 2 * radius + 1
    evidence = f"semivariogram: {'; '.join(ratios)} -> {window} x {window}"
    ground = ground_window(pixel_size_m, max_radius)
    if ground is None:
        evidence += "; pixel size unknown"
    else:
        evidence += (f"; {pixel_size_m:g} m pixels: at most {MAX_CONTEXT_METRES:g} m of ground "
                     f"-> {ground} x {ground}")
        window = min(window, ground)
    return window, evidence


def _anti_diagonal(image: torch.Tensor, valid: torch.Tensor, r: int) -> float:
    """Median semivariance at offset (r, -r) (mirror the columns, then offset (r, r))."""
    return median_semivariance(image.flip(2), valid.flip(1), r, r)
