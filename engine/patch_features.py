"""Patch-PCA features for SCDSC's non-local (FINCH) term, in memory linear in the pixel count.

SCDSC describes each pixel by the (patch_size x patch_size x C) patch around it, standardised per
dimension, reduced by PCA and L2-normalised. Materialising every patch (17 x 17 x 8 = 2312 values
per pixel, 8 GB for an 880k-pixel scene) is avoided:

1. fit the per-dimension standardisation and the PCA on a random *sample* of patches (cheap to
   extract);
2. fold both into convolution kernels: with patch vector ``p``, sample mean ``mu``, sample std
   ``s`` and component ``v``, the projection ``((p - mu) / s) . v = p . (v / s) - (mu / s) . v``,
   i.e. a 2-D convolution of the padded image with ``v / s`` reshaped to (C, P, P) plus a bias;
3. run ``torch.nn.functional.conv2d`` over row chunks with a halo of ``patch_size - 1`` rows, so
   only one chunk's im2col buffer and output exist at a time.

Peak memory is the (n_valid, n_components) float32 output plus a chunk and the sample.

Choice of the number of components (``n_components=None`` picks it from the pixel count, see
:func:`default_n_components`). The reference uses 300. The convolution is cheap either way
(~11 s for 880k pixels at 300 components on 2 shared cores); what costs is the first-neighbour
search, whose time and memory grow with the dimension. Measured on the synthetic 930 x 947 x 8
scene of ``bench/finch_scale.py`` (smooth random fields + noise, 20k-patch sample):

* 300 components: features + FINCH(2 partitions) took 264 s wall (218 s CPU) with the machine
  shared with other jobs, peak RSS 2.6 GB (1.06 GB of features + a 1.2 GB HNSW graph);
* explained variance of the standardised patch sample: 8 -> 83.9 %, 16 -> 89.1 %,
  32 -> 94.6 %, 64 -> 96.6 %, 100 -> 97.2 %, 300 -> 97.8 %;
* on 2000 random pixels searched against all 880k, the first neighbour found in 64-d is, in
  the 300-d space, on average 1e-4 less cosine-similar than the 300-d best one (the median
  300-d neighbour distance, 1 - cos, is 2e-3): a near-tie, not a different kind of patch.
  (The mini-clusters themselves are not identical: near-ties are everywhere in smooth images,
  so partition 1 of 64-d vs 300-d has ARI ~0.35 on a 100k crop, like 128-d vs 300-d.)

Hence 300 components up to :data:`LARGE_SCENE_PIXELS` valid pixels (the usual benchmark scenes,
<= 207k pixels, stay on the reference setting: FINCH on a 100k-pixel crop at 300-d took 14 s),
and 64 above it, which keeps 96.6 % of the variance: at 880k pixels features + FINCH(2
partitions) then took 111 s wall with peak RSS 1.0 GB (same shared machine), recall@1 of the
approximate neighbours 0.9998 on 5000 queries checked against all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .monitor import Monitor

REFERENCE_COMPONENTS = 300
# Above this many valid pixels the default drops from 300 to LARGE_SCENE_COMPONENTS components.
LARGE_SCENE_PIXELS = 250_000
LARGE_SCENE_COMPONENTS = 64
# Output pixels per convolution chunk: bounds the im2col buffer (C * P * P * chunk floats,
# ~75 MB for 17 x 17 x 8 patches) and the chunk output.
CHUNK_PIXELS = 8192


@dataclass
class PatchProjection:
    """Standardisation + PCA of patch vectors, folded into convolution kernels."""

    kernels: np.ndarray  # (k, C, P, P) float32: component / per-dimension std
    bias: np.ndarray  # (k,) float32: -(mean / std) . component
    explained_variance_ratio: np.ndarray  # (k,) of the standardised sample's total variance


def default_n_components(n_valid: int) -> int:
    """300 components as in the reference for small scenes, fewer for large ones (see module)."""
    return REFERENCE_COMPONENTS if n_valid <= LARGE_SCENE_PIXELS else LARGE_SCENE_COMPONENTS


def patch_pca_features(
    image: np.ndarray,
    valid: np.ndarray,
    patch_size: int = 17,
    n_components: int | None = None,
    sample_size: int = 20_000,
    seed: int = 0,
    monitor: Monitor | None = None,
    device: str = "cpu",
    standardise: bool = True,
) -> np.ndarray:
    """(n_valid, k) float32 L2-normalised patch-PCA features, rows in row-major valid order.

    ``image`` is (H, W, C); ``valid`` is (H, W) bool. ``n_components=None`` uses
    :func:`default_n_components`; any request is capped at what the sample supports
    (``min(C * P * P, sample - 1)``). Borders are reflect-padded. ``standardise=False`` only
    centres the patch dimensions (the reference z-scores each one, which gives a low-variance
    band as much weight as a high-variance one) and keeps the image's own band scaling.
    """
    image, valid = _check_inputs(image, valid, patch_size)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return np.zeros((0, 0), dtype=np.float32)
    requested = default_n_components(n_valid) if n_components is None else int(n_components)
    if requested < 1:
        raise ValueError(f"n_components must be >= 1, got {requested}")

    padded = padded_standardised_image(image, valid, patch_size, standardise)
    sample_pixels = sample_pixel_indices(valid, sample_size, seed)
    sample = extract_patches(padded, sample_pixels, patch_size)
    n_dims = sample.shape[1]
    k = max(1, min(requested, n_dims, max(sample.shape[0] - 1, 1)))
    if monitor is not None:
        if k < requested:
            monitor.warn(f"patch PCA: {requested} components requested, the sample supports {k}")
        monitor.progress(0.05)

    projection = fit_patch_projection(sample, k, image.shape[2], patch_size, standardise)
    del sample
    if monitor is not None:
        explained = float(projection.explained_variance_ratio.sum())
        monitor.info(f"patch PCA: {k} components explain {explained:.1%} of the sample variance")
        monitor.progress(0.15)

    chunk_monitor = monitor.stage(0.15, 1.0) if monitor is not None else None
    return project_all_patches(padded, valid, projection, device, chunk_monitor)


def _check_inputs(
    image: np.ndarray, valid: np.ndarray, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    if valid.shape != image.shape[:2]:
        raise ValueError(f"valid mask {valid.shape} does not match image {image.shape[:2]}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be a positive odd number, got {patch_size}")
    return image, valid


def padded_standardised_image(image: np.ndarray, valid: np.ndarray, patch_size: int,
                              standardise: bool = True) -> np.ndarray:
    """(C, H + P - 1, W + P - 1) float32: per-band z-scored over valid pixels, nodata = 0.

    Nodata (and non-finite values) become 0 *after* the per-band z-score, i.e. the band mean of
    the valid pixels. A patch that overlaps nodata then sees "average" values there: after the
    per-dimension patch standardisation they are close to 0 and add (almost) nothing to any
    projection, instead of looking like an extreme spectrum (raw nodata such as -9999) or
    poisoning the convolution with NaN. The same filled image feeds the PCA sample and the
    convolution, so both see identical patches. Reflect padding then mirrors these values.
    """
    usable = valid & np.all(np.isfinite(image), axis=2)
    pixels = image[usable].astype(np.float64)
    mean = pixels.mean(axis=0) if pixels.size else np.zeros(image.shape[2])
    std = pixels.std(axis=0) if pixels.size else np.ones(image.shape[2])
    std = np.where(std > 0, std, 1.0) if standardise else np.ones_like(mean)
    standardised = ((image - mean) / std).astype(np.float32)
    standardised[~usable] = 0.0
    half = patch_size // 2
    chw = np.ascontiguousarray(standardised.transpose(2, 0, 1))
    # numpy's "reflect" (edge not repeated, as torch's) also handles pads wider than the image.
    return np.pad(chw, ((0, 0), (half, half), (half, half)), mode="reflect")


def sample_pixel_indices(valid: np.ndarray, sample_size: int, seed: int) -> np.ndarray:
    """Sorted flat (row-major) indices of up to ``sample_size`` random valid pixels."""
    flat_valid = np.flatnonzero(valid)
    if flat_valid.size <= sample_size:
        return flat_valid
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(flat_valid, size=sample_size, replace=False))


def extract_patches(padded: np.ndarray, flat_pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(len(flat_pixels), C * P * P) patch vectors, flattened in (C, P, P) order like conv2d."""
    width = padded.shape[2] - (patch_size - 1)
    rows, cols = np.divmod(flat_pixels, width)
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, (patch_size, patch_size), axis=(1, 2)
    )
    patches = windows[:, rows, cols]  # (C, s, P, P), copies only the sample
    return np.ascontiguousarray(patches.transpose(1, 0, 2, 3)).reshape(len(flat_pixels), -1)


def fit_patch_projection(
    sample: np.ndarray, n_components: int, n_channels: int, patch_size: int,
    standardise: bool = True,
) -> PatchProjection:
    """Per-dimension z-score + PCA of the sample, expressed as conv kernels and biases.

    Statistics are accumulated in float64, the (s x D) standardised sample and its D x D
    covariance in float32 (5x faster than float64 for 20k x 2312; relative error ~4e-7), the
    eigen-decomposition in float64.
    """
    mean = sample.mean(axis=0, dtype=np.float64)
    std = sample.std(axis=0, dtype=np.float64)
    # Constant dimensions (e.g. a band that is 0 everywhere) carry no information: scale 1 keeps
    # them at 0 after centring instead of dividing by zero.
    std = np.where(std > 1e-12, std, 1.0) if standardise else np.ones_like(mean)
    standardised = (sample - mean.astype(np.float32)) / std.astype(np.float32)
    covariance = (standardised.T @ standardised).astype(np.float64)
    covariance /= max(standardised.shape[0] - 1, 1)
    del standardised
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    top = np.argsort(eigenvalues)[::-1][:n_components]
    components = eigenvectors[:, top]
    # Deterministic sign: the largest-magnitude loading of each component is positive.
    pivot = np.argmax(np.abs(components), axis=0)
    components *= np.sign(components[pivot, np.arange(components.shape[1])])
    total = max(float(np.clip(eigenvalues, 0, None).sum()), 1e-300)

    scaled = components / std[:, None]
    kernels = scaled.T.reshape(n_components, n_channels, patch_size, patch_size)
    bias = -(mean @ scaled)
    return PatchProjection(
        kernels=kernels.astype(np.float32),
        bias=bias.astype(np.float32),
        explained_variance_ratio=np.clip(eigenvalues[top], 0, None) / total,
    )


def project_all_patches(
    padded: np.ndarray,
    valid: np.ndarray,
    projection: PatchProjection,
    device: str = "cpu",
    monitor: Monitor | None = None,
) -> np.ndarray:
    """Convolve row chunks (with a P - 1 row halo), keep valid pixels, L2-normalise rows."""
    height, width = valid.shape
    halo = projection.kernels.shape[2] - 1
    k = projection.kernels.shape[0]
    out = np.empty((int(valid.sum()), k), dtype=np.float32)
    weight = torch.from_numpy(projection.kernels).to(device)
    bias = torch.from_numpy(projection.bias).to(device)
    rows_per_chunk = max(1, CHUNK_PIXELS // width)
    written = 0
    with torch.no_grad():
        for top in range(0, height, rows_per_chunk):
            bottom = min(top + rows_per_chunk, height)
            chunk_valid = valid[top:bottom]
            n_chunk = int(chunk_valid.sum())
            if n_chunk:
                block = torch.from_numpy(padded[None, :, top : bottom + halo]).to(device)
                response = torch.nn.functional.conv2d(block, weight, bias)[0]  # (k, rows, W)
                mask = torch.from_numpy(chunk_valid).to(device)
                features = response[:, mask].T  # (n_chunk, k), row-major pixel order
                features = torch.nn.functional.normalize(features, dim=1)
                out[written : written + n_chunk] = features.cpu().numpy()
                written += n_chunk
            if monitor is not None:
                monitor.progress(bottom / height)
    return out


def _patch_vectors_reference(image: np.ndarray, valid: np.ndarray, patch_size: int) -> np.ndarray:
    """Every valid pixel's patch vector by explicit loops. Tests only: O(n * C * P * P) memory.

    Re-implements the preparation without the helpers above (z-score over valid pixels, nodata to
    0, reflect padding done index by index) so the fast path is checked against independent code.
    """
    image = np.asarray(image, dtype=np.float64)
    height, width, channels = image.shape
    pixels = image[valid]
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    std[std == 0] = 1.0
    standardised = np.where(valid[..., None], (image - mean) / std, 0.0)
    half = patch_size // 2

    def reflect(index: int, size: int) -> int:
        if size == 1:
            return 0
        while index < 0 or index >= size:
            index = -index if index < 0 else 2 * (size - 1) - index
        return index

    vectors = []
    for y in range(height):
        for x in range(width):
            if not valid[y, x]:
                continue
            patch = np.empty((channels, patch_size, patch_size))
            for dy in range(patch_size):
                for dx in range(patch_size):
                    source_y = reflect(y + dy - half, height)
                    source_x = reflect(x + dx - half, width)
                    patch[:, dy, dx] = standardised[source_y, source_x]
            vectors.append(patch.ravel())
    return np.asarray(vectors)
