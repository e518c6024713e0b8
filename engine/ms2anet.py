"""MS2A-Net: multiscale spectral-spatial association network for hyperspectral clustering.

Rafiezadeh Shahi, K., Ghamisi, P., Rasti, B., Scheunders, P., Gloaguen, R., "Unsupervised
Hyperspectral Image Clustering Using a Multiscale Spectral-Spatial Association Network",
IEEE JSTARS, 2022, doi:10.1109/JSTARS.2022.3198137.

An autoencoder on the whole (min-max scaled) image: a spatial stream of three dilated 5x5 convs
gives the 36-channel code M' that is clustered with k-means; a spectral-association stream and a
decoder reconstruct the image for the unsupervised loss.

Decisions beyond the paper (the paper trains and clusters one small scene in one piece):

* Training sample. A scene of at most ``training_pixels`` pixels (default 65,536 = 256 x 256)
  trains in one piece, as in the paper (its scenes have 10k-425k pixels, on a GPU). A larger
  scene trains on one random crop of about ``training_pixels`` pixels per iteration, so training
  time and memory do not grow with the scene (800 crops of 64k pixels visit a 1-Mpixel scene
  about 50 times). The min-max ranges still come from the whole scene.
* Spectral association (SA) across tiles. SA is a sum over all pixels, so computing it per tile
  would make tiles disagree. The clustering code M' does not depend on SA at all (SA only feeds
  the reconstruction), so tiled inference needs no SA. For the reconstruction path the model
  stores SA frozen: computed once, with the kept weights, over the valid pixels of the training
  image (the last crop for cropped training); ``MS2ANetwork.forward`` takes it as an argument.
* BatchNorm. After training, the running statistics are set to the exact batch statistics of the
  training image (cumulative average over crops), and inference runs in eval mode. For a scene
  that trains in one piece the code therefore matches the reference's train-mode code (up to
  BatchNorm's unbiased n/(n-1) variance), and every tile is normalised identically.
* Raster border: reflected, not zero-padded. M' sees 8 pixels around a pixel (5x5 kernel,
  dilation 4). With 'same' zero padding (the reference's) a pixel within 8 pixels of the raster
  edge sees zeros, which after min-max scaling are a black spectrum, and k-means put such
  pixels into a cluster of their own: a 3-4 pixel frame of one class (issue 12; on a 300 x 300
  crop of s2_aberystwyth the last column was all one cluster). The input now carries 8 pixels
  of context on every side: the raster's own pixels, and the raster reflected at its border
  (``context_window``); the convs are 'valid' convs on it, and the decoder's 3x3 conv sees its
  input reflected. Training crops and inference tiles get their context the same way, so the
  code of a pixel does not depend on the crop or tile it is computed in.
* Tiled inference. Each tile is read with an 8-pixel halo (clipped at the raster edge and
  reflected there, as in training), so a tiled run equals an untiled one. Any raster of at
  least 2x2 pixels works (rasters smaller than the halo are reflected repeatedly).
* Nodata pixels are the mean scaled spectrum of the valid pixels in the network's input (not
  0, the band minima: a black spectrum that, like zero padding at the raster edge, gave the
  pixels within 8 of a nodata border or hole codes of their own; an EnMAP tile set of 32 x 32
  tiles in a nodata frame has 3/4 of its pixels that close; on the demo scene, with its
  nodata border and holes, k-means on the code of seed 1 scored NMI 0.48 with 0 and 0.73 with
  the mean, measured with a script outside the repository). They are left out of both loss
  terms, of SA, of the min-max scaling and of k-means, and get label 0. (They still take part
  in the BatchNorm batch statistics, which are per-channel means over the image.)
* k-means (n_init 10, the scikit-learn default the reference ran with) runs on the features of
  every valid pixel when there are at most ``KMEANS_MAX_PIXELS`` of them; otherwise on a random
  sample of that size, and every pixel gets its nearest centre (row-wise float64 distances, so
  a pixel's label does not depend on its tile).
* Two settings (``setting=``). ``"paper"`` is the published configuration: Adam at 1e-3 for
  800 iterations, k-means on the 36-d code. ``"adaptive"`` (the default) differs in two ways:

  - Learning rate 1e-2. In the paper's 800 iterations, 1e-3 leaves the network far from its
    own objective on our scenes: the lowest loss is 0.0167 with 1e-3 and 0.0051 with 1e-2 on
    s2_aberystwyth, 0.0121 and 0.0047 on jasper_ridge (seed 0; field ``lowest_loss`` of
    ``python -m bench.run_one --method ms2anet``), and k-means on the better-trained code
    agrees far more with the reference labels on s2_aberystwyth (NMI 0.94 against 0.72). A
    cosine decay of 1e-2 over the 800 iterations was tried and ended at a higher loss (demo
    scene, seed 0: 0.0077 against 0.0037) and a poorer code (NMI of k-means on the code 0.48
    against 0.69, measured with a script outside the repository).
  - What k-means clusters: the standardised spectra (one block, total variance 1) beside the
    code (one block, scaled so that its share of the total variance is ``context_share``).
    The code mixes each pixel with the pixels its dilated taps reach (up to 8 pixels away);
    that context helps where those pixels are alike (a field, a forest, noise around one
    material) and hurts where they are not (mixed pixels, thin roads and rivers, 30 m urban
    pixels): on jasper_ridge and enmap_potsdam even k-means on 3x3 means of the spectra agrees
    less with the reference than k-means on the spectra (``python -m bench.spatial_context``),
    and MS2A-Net's code alone lost to k-means on three of the four scenes we have. The scene
    says which: ``context_correlation`` is the mean, over the 75 taps of the three dilated
    convs, of the correlation between the standardised spectrum of a pixel and that of the
    pixel at the tap's offset (1 for identical, 0 for as unlike as two random pixels);
    ``context_share`` is half of it, so the context never counts more than the pixel itself
    and counts less the less the pixels it mixes in resemble the pixel. No constant is tuned
    to a scene; measured values: demo 0.64, jasper_ridge 0.74, enmap_potsdam 0.62,
    s2_aberystwyth 0.83. k-means runs first on the spectral block, then on both blocks
    started from that partition: the spectra define the clusters, the context moves pixels
    between them (k-means++ on both blocks at once split one class and merged two on the demo
    scene with seed 1: NMI 0.72 against 0.82). The code itself (and the code output) is the
    paper's.

  The model file stores the setting and the block scaling, so applying a model reproduces its
  labels. ``learning_rate=`` still overrides the setting's rate.
* Lowest-loss weights: the loss of iteration i belongs to the weights before step i, and those
  weights are kept (the reference saves the weights after step i, one step later).
* Inference memory: tiles are read and written through rasterio windows with GDAL's block cache
  bounded (``GDAL_CACHE_BYTES``); peak memory does not depend on the raster size
  (bench/ms2anet_memory.py measures it on a 16x raster).

Checked against the reference code (Kasra2020/MS2A-Net): min-max scaling per band over all
pixels, separate BN per dilated stream (= one BN over the 36 channels), M' taken after
BN + ReLU, 1x1 stride-2 conv -> bilinear x2 -> BN -> ReLU, softmax over the 3 F channels and over
the bands of X, decoder conv3x3 + BN + ReLU, plain MSE terms, lambda 0.1, Adam (lr 1e-3 there,
see above), 800 iterations, features extracted with BN in train mode (batch statistics of the
whole image).

Speed (no change to the numbers): constant parts of a training image (its band softmax P and
band mean) are computed once, masks are multiplications instead of boolean indexing, the 1x1
stride-2 conv is "every second pixel, then 1x1", and for few bands the dilated convs run as
dense convs on phase sub-images (``dilated_conv``; bit-identical here, 2.5x faster backward).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as functional
from torch import nn

from engine.device import resolve_device, seed_everything
from engine.model_file import read_model_file, write_model_file
from engine.monitor import Monitor, silent
from engine.raster_io import (
    FLOAT_NODATA,
    _profile,  # the one GeoTIFF profile of the project (shared, not duplicated)
    atomic_output,
    read_grid,
    smallest_unsigned_dtype,
)
from engine.windowed_io import (
    GDAL_CACHE_BYTES,
    PredictionSummary,
    TileWindow,
    WindowReader,
    array_window_reader,
    open_for_writing,
    open_raster,
    raster_window_reader,
    tile_windows,
)

ALGORITHM_NAME = "ms2anet"
FORMAT_VERSION = 2  # 2: setting and cluster features (adaptive)
CODE_CHANNELS = 36  # 3 dilated convs x 12 filters: the clustering features M'
FILTERS_PER_DILATION = 12
DILATIONS = (1, 2, 4)
SPATIAL_KERNEL = 5
STREAM_CHANNELS = 3  # d2 = d3 = 3 in the paper
# Pixels around a pixel that its code M' depends on: (kernel // 2) * largest dilation.
CODE_HALO = (SPATIAL_KERNEL // 2) * max(DILATIONS)
KMEANS_MAX_PIXELS = 200_000
# "paper": the published configuration; "adaptive" (the default): see the module docstring.
SETTINGS = ("adaptive", "paper")
LEARNING_RATES = {"paper": 1e-3, "adaptive": 1e-2}
BN_CALIBRATION_CROPS = 8
# Up to this many bands the dilated convs run as dense convs on phase sub-images (faster).
SPACE_TO_BATCH_MAX_BANDS = 32


# ------------------------------------------------------------------------------------- network


class MS2ANetwork(nn.Module):
    """The autoencoder; ``code`` gives M', ``forward`` gives (R, M', SA).

    Both take an image padded with ``CODE_HALO`` pixels of context on every side (real pixels
    where the raster has them, reflected at the raster border: ``context_window``) and return
    maps of the unpadded core, so no conv of the code ever sees padding zeros.
    """

    def __init__(self, n_bands: int):
        super().__init__()
        # padding=0: the context comes with the input (see the class docstring).
        self.dilated = nn.ModuleList(
            nn.Conv2d(n_bands, FILTERS_PER_DILATION, SPATIAL_KERNEL, dilation=d)
            for d in DILATIONS
        )
        self.code_norm = nn.BatchNorm2d(CODE_CHANNELS)
        self.squeeze = nn.Conv2d(CODE_CHANNELS, STREAM_CHANNELS, 1, stride=2)
        self.spatial_norm = nn.BatchNorm2d(STREAM_CHANNELS)
        self.association_conv = nn.Conv2d(n_bands, STREAM_CHANNELS, 3)
        self.association_norm = nn.BatchNorm2d(STREAM_CHANNELS)
        self.decoder_conv = nn.Conv2d(2 * STREAM_CHANNELS, n_bands, 3)
        self.decoder_norm = nn.BatchNorm2d(n_bands)

    def code(self, padded: torch.Tensor) -> torch.Tensor:
        """M' (N, 36, H, W) of a scaled image padded by ``CODE_HALO`` (N, B, H + 16, W + 16)."""
        few_bands = padded.shape[1] <= SPACE_TO_BATCH_MAX_BANDS
        stacked = torch.cat([dilated_conv(conv, padded, few_bands) for conv in self.dilated],
                            dim=1)
        return functional.relu(self.code_norm(stacked))

    def spatial_features(self, code: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # size= (not scale_factor=2) so odd heights/widths come back to exactly (H, W).
        # The 1x1 stride-2 conv as "every second pixel, then 1x1": the same numbers, but
        # torch's backward of a strided 1x1 conv on the CPU is ~6x slower than this.
        half = functional.conv2d(code[:, :, ::2, ::2], self.squeeze.weight, self.squeeze.bias)
        upsampled = functional.interpolate(half, size=size, mode="bilinear", align_corners=False)
        return functional.relu(self.spatial_norm(upsampled))

    def association_weights(self, padded: torch.Tensor) -> torch.Tensor:
        """F (N, 3, H, W): per-pixel softmax over the 3 channels of ReLU(BN(conv3x3(X)))."""
        margin = CODE_HALO - 1  # the 3x3 conv needs one pixel of context
        local = self.association_conv(padded[..., margin:-margin, margin:-margin])
        return torch.softmax(functional.relu(self.association_norm(local)), dim=1)

    def forward(self, padded: torch.Tensor, valid: torch.Tensor | None = None,
                frozen_association: torch.Tensor | None = None,
                pixel_softmax: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, M', SA) for one image padded by ``CODE_HALO`` (1, B, H + 16, W + 16).

        R and M' cover the core (H, W). ``valid`` (H, W) bool restricts SA's sum to valid
        pixels (all pixels when None); ``pixel_softmax`` is ``band_softmax(core, valid)``
        precomputed by a caller that runs many iterations on the same image (it does not depend
        on the weights).
        """
        image = core_of(padded)
        height, width = image.shape[-2:]
        code = self.code(padded)
        spatial = self.spatial_features(code, (height, width))
        association = frozen_association
        if association is None:
            if pixel_softmax is None:
                pixel_softmax = band_softmax(image, valid)
            association = association_from_softmax(pixel_softmax,
                                                   self.association_weights(padded))
        association_features = association_feature_maps(image, association)
        # The decoder's 3x3 conv sees the feature maps reflected at the core's border (not
        # zeros): no conv of the network sees padding zeros.
        decoder_input = functional.pad(torch.cat([spatial, association_features], dim=1),
                                       (1, 1, 1, 1), mode="reflect")
        decoded = self.decoder_conv(decoder_input)
        return functional.relu(self.decoder_norm(decoded)), code, association


def core_of(padded: torch.Tensor) -> torch.Tensor:
    """The image inside a ``CODE_HALO`` padding."""
    return padded[..., CODE_HALO:-CODE_HALO, CODE_HALO:-CODE_HALO]


def context_window(cube: np.ndarray, valid: np.ndarray, rows: slice, cols: slice,
                   halo: int = CODE_HALO) -> tuple[np.ndarray, np.ndarray]:
    """``cube[rows, cols]`` with ``halo`` pixels of context on every side, and its mask.

    The context is the raster's own pixels where it has them, and the raster reflected at its
    border (numpy's 'reflect': the edge pixel is not repeated; repeated reflection for rasters
    smaller than the halo) where it does not. A window clipped at the raster border reflected
    at that border equals the whole raster reflected, so tiles and whole-image runs see the
    same context, in training and in inference.
    """
    height, width = valid.shape
    top, left = max(rows.start - halo, 0), max(cols.start - halo, 0)
    bottom, right = min(rows.stop + halo, height), min(cols.stop + halo, width)
    pads = ((top - (rows.start - halo), rows.stop + halo - bottom),
            (left - (cols.start - halo), cols.stop + halo - right))
    window = cube[top:bottom, left:right]
    window_valid = valid[top:bottom, left:right]
    if any(pads[0]) or any(pads[1]):
        window = np.pad(window, (*pads, (0, 0)), mode="reflect")
        window_valid = np.pad(window_valid, pads, mode="reflect")
    return window, window_valid


def dilated_conv(conv: nn.Conv2d, padded: torch.Tensor, space_to_batch: bool) -> torch.Tensor:
    """The dilated 5x5 conv of the code on the core of an image padded by ``CODE_HALO``.

    A 'valid' conv on the part of the padding it reaches (2 x dilation pixels). With
    ``space_to_batch`` it is computed as a dense conv on the d x d phase sub-images: exactly
    the same sums (a tap at offset k*d of pixel (i*d + a, j*d + b) is tap k of pixel (i, j) of
    phase (a, b)); used for few input bands, where torch's CPU backward of a dilated conv is
    ~2.5x slower.
    """
    dilation = conv.dilation[0]
    margin = CODE_HALO - (SPATIAL_KERNEL // 2) * dilation
    image = padded[..., margin:padded.shape[-2] - margin, margin:padded.shape[-1] - margin]
    height = padded.shape[-2] - 2 * CODE_HALO
    width = padded.shape[-1] - 2 * CODE_HALO
    if dilation == 1 or not space_to_batch:
        return functional.conv2d(image, conv.weight, conv.bias, dilation=dilation)
    n, channels, padded_height, padded_width = image.shape
    pad_bottom, pad_right = (-padded_height) % dilation, (-padded_width) % dilation
    if pad_bottom or pad_right:  # only reaches outputs beyond the core, which are cut off
        image = functional.pad(image, (0, pad_right, 0, pad_bottom))
    rows, cols = (padded_height + pad_bottom) // dilation, (padded_width + pad_right) // dilation
    phases = (image.reshape(n, channels, rows, dilation, cols, dilation)
              .permute(0, 3, 5, 1, 2, 4).reshape(n * dilation * dilation, channels, rows, cols))
    out = functional.conv2d(phases, conv.weight, conv.bias)
    filters, out_rows, out_cols = out.shape[1:]
    out = (out.reshape(n, dilation, dilation, filters, out_rows, out_cols)
           .permute(0, 3, 4, 1, 5, 2)
           .reshape(n, filters, out_rows * dilation, out_cols * dilation))
    return out[:, :, :height, :width]


def band_softmax(image: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """P (B, H*W): softmax of each pixel's spectrum over its bands; 0 for nodata pixels."""
    bands = image.shape[1]
    softmax = torch.softmax(image[0].reshape(bands, -1), dim=0)
    if valid is not None:
        # A multiplication, not boolean indexing: indexing costs as much as a small conv here.
        softmax = softmax * valid.reshape(1, -1).to(softmax.dtype)
    return softmax


def association_from_softmax(pixel_softmax: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """SA (B x 3) = P^T F summed over pixels (nodata pixels have P = 0)."""
    return pixel_softmax @ weights[0].reshape(weights.shape[1], -1).T


def spectral_association(image: torch.Tensor, weights: torch.Tensor,
                         valid: torch.Tensor | None) -> torch.Tensor:
    """SA (B x 3) = P^T F summed over valid pixels; P = softmax of X over bands per pixel."""
    return association_from_softmax(band_softmax(image, valid), weights)


def association_feature_maps(image: torch.Tensor, association: torch.Tensor) -> torch.Tensor:
    """SAF (1, 3, H, W): X · SA at every pixel."""
    return torch.einsum("nbhw,bc->nchw", image, association)


def ms2anet_loss(image: torch.Tensor, reconstruction: torch.Tensor, code: torch.Tensor,
                 valid: torch.Tensor | None, lam: float,
                 band_mean: torch.Tensor | None = None) -> torch.Tensor:
    """MSE(X, R) + lam * MSE(mean over channels of M', mean over bands of X), valid pixels.

    ``valid`` None means every pixel is valid (the reference's case: plain means);
    ``band_mean`` is ``image.mean(dim=1)``, precomputed by callers that train many iterations.
    """
    if band_mean is None:
        band_mean = image.mean(dim=1)
    reconstruction_error = (image - reconstruction).square()
    mean_error = (code.mean(dim=1) - band_mean).square()
    if valid is None:
        return reconstruction_error.mean() + lam * mean_error.mean()
    weights = valid.to(image.dtype)
    count = weights.sum().clamp_min(1.0)
    return ((reconstruction_error.sum(dim=1) * weights).sum() / (count * image.shape[1])
            + lam * (mean_error * weights).sum() / count)


@dataclass
class TrainingImage:
    """One training image on the device with what the loss needs that the weights do not change."""

    padded: torch.Tensor  # (1, B, H + 16, W + 16) scaled, nodata 0, with CODE_HALO of context
    valid: torch.Tensor | None  # (1, H, W) bool, None when every core pixel is valid
    pixel_softmax: torch.Tensor  # (B, H*W) of the core
    band_mean: torch.Tensor  # (1, H, W) of the core

    @classmethod
    def of(cls, scaled: np.ndarray, valid: np.ndarray, device: torch.device) -> TrainingImage:
        """``scaled`` (H + 16, W + 16, B) with its context; ``valid`` (H, W) of the core."""
        padded = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))[None]
        padded = padded.to(device)
        image = core_of(padded)
        mask = None if valid.all() else torch.from_numpy(valid)[None].to(device)
        return cls(padded, mask, band_softmax(image, mask), image.mean(dim=1))

    @property
    def image(self) -> torch.Tensor:
        return core_of(self.padded)

    def step_loss(self, network: MS2ANetwork, lam: float) -> torch.Tensor:
        reconstruction, code, _ = network(self.padded, pixel_softmax=self.pixel_softmax)
        return ms2anet_loss(self.image, reconstruction, code, self.valid, lam, self.band_mean)


# ------------------------------------------------------------------------------ pure helpers


def crop_shape(height: int, width: int, training_pixels: int) -> tuple[int, int]:
    """A crop of at most ``training_pixels`` pixels, square where the scene allows."""
    if height * width <= training_pixels:
        return height, width
    side = int(math.isqrt(training_pixels))
    crop_height = min(height, side)
    crop_width = min(width, training_pixels // crop_height)
    crop_height = min(height, training_pixels // crop_width)
    return crop_height, crop_width


def valid_bounding_box(valid: np.ndarray) -> tuple[slice, slice]:
    """Row and column slices of the smallest rectangle holding every valid pixel."""
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def band_ranges(cube: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band min and max over the valid pixels."""
    pixels = cube[valid]
    return pixels.min(axis=0).astype(np.float32), pixels.max(axis=0).astype(np.float32)


def scale_bands(cube: np.ndarray, valid: np.ndarray, band_min: np.ndarray,
                band_max: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
    """Min-max scaling per band; a constant band becomes 0; nodata pixels become ``fill``
    (scaled units; 0 when None)."""
    span = band_max - band_min
    span = np.where(span > 0, span, 1.0).astype(np.float32)
    scaled = (cube - band_min) / span
    scaled[~valid] = 0.0 if fill is None else fill
    return scaled.astype(np.float32, copy=False)


def band_means(cube: np.ndarray, valid: np.ndarray, band_min: np.ndarray,
               band_max: np.ndarray) -> np.ndarray:
    """Mean scaled spectrum of the valid pixels: what the convs see at nodata pixels."""
    return scale_bands(cube[valid][None], np.ones((1, int(valid.sum())), dtype=bool), band_min,
                       band_max)[0].mean(axis=0, dtype=np.float64).astype(np.float32)


def nearest_centre(features: np.ndarray, centres: np.ndarray,
                   chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean, float64) of each row.

    Row by row arithmetic (no matrix product, whose blocking depends on the number of rows), so
    a pixel gets the same label whatever tile it is in; chunked so memory stays
    O(chunk x channels) whatever k and the tile size.
    """
    centres = np.asarray(centres, dtype=np.float64)
    nearest = np.empty(len(features), dtype=np.int64)
    for start in range(0, len(features), chunk):
        block = np.asarray(features[start:start + chunk], dtype=np.float64)
        best = np.full(len(block), np.inf)
        best_index = np.zeros(len(block), dtype=np.int64)
        for index, centre in enumerate(centres):
            difference = block - centre
            distance = np.einsum("ij,ij->i", difference, difference)
            closer = distance < best
            best[closer], best_index[closer] = distance[closer], index
        nearest[start:start + chunk] = best_index
    return nearest


def receptive_offsets() -> list[tuple[int, int]]:
    """The (row, col) offsets the code's dilated taps reach, once per conv (75 with centres)."""
    half = SPATIAL_KERNEL // 2
    return [(dy * d, dx * d) for d in DILATIONS for dy in range(-half, half + 1)
            for dx in range(-half, half + 1)]


def context_correlation(cube: np.ndarray, valid: np.ndarray, samples: int = 10_000) -> float:
    """Mean spatial correlation of the standardised spectra over the code's receptive field.

    For each tap offset h of the dilated convs, rho(h) = 1 - E||z(x) - z(x + h)||^2 / (2 B)
    over pairs of valid pixels, z = spectra standardised per band: 1 at h = 0, 0 when pixels
    h apart are as different as two random pixels. Returns the mean of rho over the 75 taps:
    how much the pixels the code mixes in resemble the pixel itself. Estimated from
    ``samples`` random valid pixels (a fixed generator: a property of the scene, not of the
    seed).
    """
    height, width, _ = cube.shape
    rows, cols = np.nonzero(valid)
    if len(rows) < 2:
        return 0.0
    pixels = cube[rows, cols].astype(np.float64)
    mean, spread = pixels.mean(axis=0), pixels.std(axis=0)
    informative = spread > 0
    if not informative.any():
        return 0.0
    mean = mean.astype(np.float32)
    scale = np.where(informative, spread, 1.0).astype(np.float32)
    pick = np.random.default_rng(0).choice(len(rows), min(samples, len(rows)), replace=False)
    rows, cols = rows[pick], cols[pick]
    anchor = (cube[rows, cols] - mean) / scale
    correlations = []
    for dy, dx in receptive_offsets():
        other_rows, other_cols = rows + dy, cols + dx
        inside = (other_rows >= 0) & (other_rows < height) & (other_cols >= 0) & \
            (other_cols < width)
        inside[inside] = valid[other_rows[inside], other_cols[inside]]
        if not inside.any():
            continue
        other = (cube[other_rows[inside], other_cols[inside]] - mean) / scale
        difference = anchor[inside] - other
        correlations.append(1.0 - float(np.einsum("ij,ij->", difference, difference))
                            / (2.0 * informative.sum() * len(difference)))
    return float(np.mean(correlations))


def _state_copy(network: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


# ------------------------------------------------------------------------------------ results


@dataclass
class MS2ANetResult:
    labels: np.ndarray  # (H, W) int32, 0 = nodata, 1..k
    loss_history: list[float]
    chosen_iteration: int  # 1-based iteration whose weights were kept (lowest loss)
    seconds: dict[str, float] = field(default_factory=dict)
    features: np.ndarray | None = None  # (H, W, 36) float32 when asked for




# -------------------------------------------------------------------------------- estimator


class MS2ANet:
    """Fit on a cube, save/load as one file, predict tile by tile."""

    def __init__(self, n_clusters: int, setting: str = "adaptive", lam: float = 0.1,
                 iterations: int = 800, learning_rate: float | None = None,
                 training_pixels: int = 65536, seed: int = 0, device: str = "auto",
                 inference_tile: int = 512):
        if setting not in SETTINGS:
            raise ValueError(f"Unknown MS2A-Net setting '{setting}': choose one of "
                             f"{', '.join(SETTINGS)}.")
        if n_clusters < 2:
            raise ValueError("MS2A-Net needs at least 2 clusters.")
        if iterations < 1:
            raise ValueError("MS2A-Net needs at least 1 training iteration.")
        if training_pixels < 4:
            raise ValueError("The training sample size must be at least 4 pixels.")
        if inference_tile < 1:
            raise ValueError("The inference tile size must be at least 1 pixel.")
        self.n_clusters = int(n_clusters)
        self.lam = float(lam)
        self.iterations = int(iterations)
        self.setting = setting
        # None: the setting's learning rate (1e-3 in the paper, 1e-2 adaptive).
        self.learning_rate = float(LEARNING_RATES[setting] if learning_rate is None
                                   else learning_rate)
        self.training_pixels = int(training_pixels)
        self.seed = int(seed)
        self.device = device
        self.inference_tile = int(inference_tile)
        # Set by fit() or load().
        self.network: MS2ANetwork | None = None
        self.centres: np.ndarray | None = None
        self.band_min: np.ndarray | None = None
        self.band_max: np.ndarray | None = None
        self.band_fill: np.ndarray | None = None  # scaled value of nodata pixels (None: 0)
        self.band_numbers: list[int] = []
        self.band_names: list[str] = []  # descriptions of the used bands, for a mismatch warning
        self.source_band_count = 0
        self.frozen_association: np.ndarray | None = None
        # Clustering features of the adaptive setting (None: the code alone, as in the paper).
        self.spectral_mean: np.ndarray | None = None
        self.spectral_scale: np.ndarray | None = None
        self.code_weight: float | None = None
        self.context_correlation_: float | None = None
        self.context_share_: float | None = None

    @property
    def n_bands(self) -> int:
        return len(self.band_numbers)

    # ------------------------------------------------------------------ fit
    def _validate(self, cube: np.ndarray, valid: np.ndarray) -> None:
        if cube.ndim != 3:
            raise ValueError(f"The cube must be (H, W, B); got shape {cube.shape}.")
        if valid.shape != cube.shape[:2]:
            raise ValueError(f"The mask {valid.shape} does not match the cube {cube.shape[:2]}.")
        if cube.shape[0] < 2 or cube.shape[1] < 2:
            raise ValueError(
                f"The raster is {cube.shape[0]}x{cube.shape[1]} pixels; MS2A-Net needs at least "
                "2x2 pixels."
            )
        if int(valid.sum()) < self.n_clusters:
            raise ValueError(
                f"Only {int(valid.sum())} valid pixel(s) for {self.n_clusters} clusters: choose "
                "fewer clusters or a larger area."
            )

    def fit(self, cube: np.ndarray, valid: np.ndarray, monitor: Monitor | None = None,
            band_numbers: list[int] | None = None, source_band_count: int | None = None,
            return_features: bool = False,
            band_names: list[str] | None = None) -> MS2ANetResult:
        """Train on ``cube`` (H, W, B) and cluster every valid pixel.

        ``band_numbers`` / ``source_band_count`` record which bands of which raster were used,
        so that a saved model can be applied to another raster; default: all B bands.
        """
        monitor = monitor or silent()
        cube = np.asarray(cube, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        self._validate(cube, valid)
        height, width, bands = cube.shape
        self.band_numbers = list(band_numbers) if band_numbers else list(range(1, bands + 1))
        if len(self.band_numbers) != bands:
            raise ValueError(f"{len(self.band_numbers)} band numbers for a cube of {bands} bands.")
        self.source_band_count = int(source_band_count or max(self.band_numbers))
        self.band_names = [str(name) for name in band_names] if band_names else []
        rng = seed_everything(self.seed)
        device = resolve_device(self.device)
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        monitor.info(f"MS2A-Net: {int(valid.sum())} valid pixels, {bands} bands, "
                     f"k = {self.n_clusters}, device {device}")

        self.band_min, self.band_max = band_ranges(cube, valid)
        self.band_fill = band_means(cube, valid, self.band_min, self.band_max)
        context_share = correlation = None
        if self.setting == "adaptive":
            correlation = context_correlation(cube, valid)
            context_share = min(max(correlation, 0.0), 1.0) / 2.0
            monitor.info(f"Adaptive setting: the pixels the code mixes in correlate "
                         f"{correlation:.2f} with the pixel itself, so the code gets "
                         f"{context_share:.0%} of the clustering features' variance, the "
                         f"standardised spectra the rest.")
        else:
            monitor.info(f"Paper setting: learning rate {self.learning_rate:g}; k-means on the "
                         "code.")
        # What the scene said (None in the paper setting), for logs and benchmarks.
        self.context_correlation_ = None if correlation is None else round(correlation, 4)
        self.context_share_ = None if context_share is None else round(context_share, 4)
        # Training sees the bounding box of the valid pixels only (with its context from the
        # raster, reflected at the raster border, as in inference): outside it there is
        # nothing to reconstruct (a scene that is 70 % nodata frame, like an EnMAP tile set,
        # trains 2x faster). BN statistics see less nodata.
        box = valid_bounding_box(valid)
        box_height, box_width = box[0].stop - box[0].start, box[1].stop - box[1].start
        crop_height, crop_width = crop_shape(box_height, box_width, self.training_pixels)
        if (crop_height, crop_width) != (box_height, box_width):
            monitor.info(f"Training on random {crop_height}x{crop_width} crops of the "
                         f"{box_height}x{box_width} valid area.")

        def training_crop() -> TrainingImage:
            # Crops without valid pixels carry no loss: draw again (bounded attempts).
            for _ in range(100):
                row = box[0].start + int(rng.integers(0, box_height - crop_height + 1))
                col = box[1].start + int(rng.integers(0, box_width - crop_width + 1))
                crop_valid = valid[row:row + crop_height, col:col + crop_width]
                if crop_valid.any():
                    break
            crop, context_valid = context_window(cube, valid, slice(row, row + crop_height),
                                                 slice(col, col + crop_width))
            scaled = scale_bands(crop, context_valid, self.band_min, self.band_max,
                                 self.band_fill)
            return TrainingImage.of(scaled, crop_valid, device)

        network = MS2ANetwork(bands).to(device)
        optimiser = torch.optim.Adam(network.parameters(), lr=self.learning_rate)
        whole_scene = (crop_height, crop_width) == (box_height, box_width)
        # The whole scene is one constant training image: its tensors, band softmax and band
        # mean are computed once, not per iteration (they do not depend on the weights).
        fixed = training_crop() if whole_scene else None
        loss_history: list[float] = []
        best_loss, best_iteration = math.inf, 0
        best_state = _state_copy(network)
        # Progress in proportion to the expected time of each stage (fitted to the benchmark
        # runs of bench/results.jsonl, 2 cores): an iteration ~0.03 s + 0.1 us per band x
        # pixel of its crop, k-means ~4 s, assignment ~1 us per pixel. Training is almost
        # all of it on the benchmark scenes; mapping a large scene takes a visible share.
        costs = (self.iterations * (0.03 + 1e-7 * bands * crop_height * crop_width), 4.0,
                 1e-6 * height * width)
        train_end = costs[0] / sum(costs)
        centres_end = (costs[0] + costs[1]) / sum(costs)
        train_monitor = monitor.stage(0.0, train_end)
        network.train()
        for iteration in range(1, self.iterations + 1):
            sample = fixed if fixed is not None else training_crop()
            loss = sample.step_loss(network, self.lam)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            loss_history.append(value)
            # The loss belongs to the weights before this step: keep those when it is lowest.
            # (The reference saves after the step, i.e. one step later; the weights that
            # produced the lowest loss are what "lowest-loss weights" means.)
            if value < best_loss:
                best_loss, best_iteration = value, iteration
                best_state = _state_copy(network)
            optimiser.step()
            train_monitor.progress(iteration / self.iterations)
        network.load_state_dict(best_state)
        seconds["training"] = time.perf_counter() - started
        monitor.info(f"Lowest loss {best_loss:.5f} at iteration {best_iteration} of "
                     f"{self.iterations}.")

        crops = [fixed] if fixed is not None else [training_crop()
                                                   for _ in range(BN_CALIBRATION_CROPS)]
        self._calibrate(network, crops)
        self.network = network

        started = time.perf_counter()
        reader = array_window_reader(cube, valid)
        self._fit_centres(reader, height, width, valid, rng,
                          monitor.stage(train_end, centres_end), context_share)
        seconds["kmeans"] = time.perf_counter() - started
        started = time.perf_counter()
        labels = np.zeros((height, width), dtype=np.int32)
        features = (np.zeros((height, width, CODE_CHANNELS), dtype=np.float32)
                    if return_features else None)
        for window, code, window_valid, spectra in self._tile_codes(
                reader, height, width, monitor.stage(centres_end, 1.0)):
            rows = slice(window.row, window.row + window.height)
            cols = slice(window.col, window.col + window.width)
            labels[rows, cols] = self._labels_of(code, window_valid, spectra)
            if features is not None:
                features[rows, cols] = code
        seconds["assignment"] = time.perf_counter() - started
        return MS2ANetResult(labels, loss_history, best_iteration, seconds, features)

    def _calibrate(self, network: MS2ANetwork, crops: list) -> None:
        """BatchNorm running statistics = batch statistics of the training image(s); freeze SA."""
        norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the crops
        network.train()
        with torch.no_grad():
            for crop in crops:
                network(crop.padded, pixel_softmax=crop.pixel_softmax)
        for norm in norms:
            norm.momentum = 0.1
        network.eval()
        with torch.no_grad():
            crop = crops[-1]
            association = association_from_softmax(crop.pixel_softmax,
                                                   network.association_weights(crop.padded))
        self.frozen_association = association.cpu().numpy().astype(np.float32)

    def _tile_codes(self, reader: WindowReader, height: int, width: int, monitor: Monitor,
                    ) -> Iterator[tuple[TileWindow, np.ndarray, np.ndarray, np.ndarray]]:
        """(window, M' (h, w, 36) of its core, core validity, core spectra (h, w, B)) for every
        tile, row-major."""
        if self.network is None:
            raise ValueError("The model is not trained: call fit() or load() first.")
        device = next(self.network.parameters()).device
        self.network.eval()
        windows = tile_windows(height, width, self.inference_tile, CODE_HALO)
        for index, window in enumerate(windows):
            cube, window_valid = reader(window)
            rows, cols = window.core_in_read
            # The halo clipped by the raster edge is the window reflected at that edge
            # (context_window), exactly as in training.
            padded, context_valid = context_window(cube, window_valid, rows, cols)
            scaled = scale_bands(padded, context_valid, self.band_min, self.band_max,
                                 self.band_fill)
            image = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))[None]
            with torch.no_grad():
                code = self.network.code(image.to(device))[0].cpu().numpy()
            yield (window, np.ascontiguousarray(code.transpose(1, 2, 0)),
                   window_valid[rows, cols], cube[rows, cols])
            monitor.progress((index + 1) / len(windows))

    def cluster_features(self, code: np.ndarray, spectra: np.ndarray) -> np.ndarray:
        """What k-means clusters, for pixels' codes (n, 36) and spectra (n, B).

        The paper: the code. Adaptive: the standardised spectra (block scaled to unit total
        variance) beside the code (block scaled to total variance ``code_weight ** 2``).
        """
        if self.code_weight is None:
            return np.asarray(code, dtype=np.float64)
        spectral = ((np.asarray(spectra, dtype=np.float64) - self.spectral_mean)
                    / self.spectral_scale)
        return np.hstack([spectral / math.sqrt(spectral.shape[1]),
                          np.asarray(code, dtype=np.float64) * self.code_weight])

    def _fit_centres(self, reader: WindowReader, height: int, width: int, valid: np.ndarray,
                     rng: np.random.Generator, monitor: Monitor,
                     context_share: float | None) -> None:
        from sklearn.cluster import KMeans

        n_valid = int(valid.sum())
        chosen = np.ones(n_valid, dtype=bool)
        if n_valid > KMEANS_MAX_PIXELS:
            chosen[:] = False
            chosen[rng.choice(n_valid, KMEANS_MAX_PIXELS, replace=False)] = True
        # Pixel order of `chosen`: row-major over the scene; collect tile by tile.
        chosen_grid = np.zeros(valid.shape, dtype=bool)
        chosen_grid[valid] = chosen
        codes, spectra = [], []
        for window, code, _, window_spectra in self._tile_codes(reader, height, width,
                                                                monitor.stage(0.0, 0.5)):
            core = chosen_grid[window.row:window.row + window.height,
                               window.col:window.col + window.width]
            codes.append(code[core])
            spectra.append(window_spectra[core])
        code_sample = np.concatenate(codes).astype(np.float64)
        spectra_sample = np.concatenate(spectra).astype(np.float64)
        if context_share is None:
            self.code_weight = None
            monitor.info(f"k-means on the 36-d code of {len(code_sample)} pixels.")
        else:
            spread = spectra_sample.std(axis=0)
            self.spectral_mean = spectra_sample.mean(axis=0)
            self.spectral_scale = np.where(spread > 0, spread, 1.0)
            # Block weights: the code's share of the total variance is context_share.
            code_variance = float(code_sample.var(axis=0).sum())
            self.code_weight = (math.sqrt(context_share / (1.0 - context_share) / code_variance)
                                if code_variance > 0 and context_share < 1.0 else 0.0)
            monitor.info(f"k-means on the standardised spectra ({spectra_sample.shape[1]} bands) "
                         f"and the 36-d code of {len(code_sample)} pixels; the code's share of "
                         f"the variance: {context_share:.2f}.")
        sample = self.cluster_features(code_sample, spectra_sample)
        if self.code_weight is None:
            kmeans = KMeans(self.n_clusters, n_init=10, random_state=self.seed).fit(sample)
        else:
            # The spectra define the clusters, the context refines them: k-means on the
            # spectral block first, then k-means on both blocks started from its partition
            # (k-means++ on both blocks at once sometimes settled on a partition that splits
            # one class and merges two: demo scene, seed 1).
            spectral = sample[:, :spectra_sample.shape[1]]
            partition = KMeans(self.n_clusters, n_init=10,
                               random_state=self.seed).fit_predict(spectral)
            if len(np.unique(partition)) == self.n_clusters:
                start = np.stack([sample[partition == j].mean(axis=0)
                                  for j in range(self.n_clusters)])
                kmeans = KMeans(self.n_clusters, init=start, n_init=1).fit(sample)
            else:  # fewer distinct spectra than clusters: no partition to start from
                kmeans = KMeans(self.n_clusters, n_init=10, random_state=self.seed).fit(sample)
        self.centres = kmeans.cluster_centers_.astype(np.float32)
        monitor.progress(1.0)

    def _labels_of(self, code: np.ndarray, window_valid: np.ndarray,
                   spectra: np.ndarray) -> np.ndarray:
        labels = np.zeros(window_valid.shape, dtype=np.int32)
        if window_valid.any():
            features = self.cluster_features(code[window_valid], spectra[window_valid])
            labels[window_valid] = nearest_centre(features, self.centres) + 1
        return labels

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """One file (torch.save of a dict), written to a temporary file and renamed."""
        if self.network is None:
            raise ValueError("The model is not trained: nothing to save.")
        payload = {
            "algorithm": ALGORITHM_NAME,
            "format_version": FORMAT_VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "centres": torch.from_numpy(self.centres),
            "band_min": torch.from_numpy(self.band_min),
            "band_max": torch.from_numpy(self.band_max),
            "band_fill": torch.from_numpy(self.band_fill),
            "band_numbers": list(self.band_numbers),
            "band_names": list(self.band_names),
            "source_band_count": int(self.source_band_count),
            "n_bands": self.n_bands,
            "frozen_association": torch.from_numpy(self.frozen_association),
            "cluster_features": None if self.code_weight is None else {
                "spectral_mean": torch.from_numpy(self.spectral_mean),
                "spectral_scale": torch.from_numpy(self.spectral_scale),
                "code_weight": float(self.code_weight)},
            "settings": {"n_clusters": self.n_clusters, "setting": self.setting, "lam": self.lam,
                         "iterations": self.iterations, "learning_rate": self.learning_rate,
                         "training_pixels": self.training_pixels, "seed": self.seed,
                         "inference_tile": self.inference_tile},
        }
        return write_model_file(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> MS2ANet:
        payload = read_model_file(path, ALGORITHM_NAME)
        if payload.get("algorithm") != ALGORITHM_NAME:
            raise ValueError(
                f"'{path}' is a model of the '{payload.get('algorithm')}' algorithm, not an "
                "MS2A-Net model."
            )
        if payload.get("format_version") not in (1, FORMAT_VERSION):
            raise ValueError(
                f"'{path}' has MS2A-Net model format version {payload.get('format_version')}; "
                f"this plugin reads versions 1 to {FORMAT_VERSION}. Train the model again."
            )
        try:
            # Version 1 files predate the settings: their k-means ran on the code alone.
            settings = {"setting": "paper", **payload["settings"]}
            model = cls(device=device, **settings)
            network = MS2ANetwork(int(payload["n_bands"]))
            network.load_state_dict(payload["state_dict"])
            model.network = network.to(resolve_device(device)).eval()
            model.centres = payload["centres"].numpy().astype(np.float32)
            model.band_min = payload["band_min"].numpy().astype(np.float32)
            model.band_max = payload["band_max"].numpy().astype(np.float32)
            if payload.get("band_fill") is not None:  # version 1 files: nodata was 0
                model.band_fill = payload["band_fill"].numpy().astype(np.float32)
            model.band_numbers = [int(b) for b in payload["band_numbers"]]
            model.source_band_count = int(payload["source_band_count"])
            model.band_names = [str(name) for name in payload.get("band_names", [])]
            model.frozen_association = payload["frozen_association"].numpy()
            features = payload.get("cluster_features")
            if features is not None:
                model.spectral_mean = features["spectral_mean"].numpy().astype(np.float64)
                model.spectral_scale = features["spectral_scale"].numpy().astype(np.float64)
                model.code_weight = float(features["code_weight"])
        except (KeyError, TypeError, RuntimeError, AttributeError) as error:
            raise ValueError(f"'{path}' is not a complete MS2A-Net model file ({error}).") \
                from error
        feature_count = CODE_CHANNELS + (0 if model.code_weight is None else model.n_bands)
        if model.centres.shape != (model.n_clusters, feature_count) or \
                len(model.band_numbers) != model.n_bands:
            raise ValueError(f"'{path}' is not a consistent MS2A-Net model file.")
        return model


# ------------------------------------------------------------------------------ inference


def predict_raster(model: MS2ANet, in_path: str | os.PathLike,
                   out_labels_path: str | os.PathLike,
                   out_features_path: str | os.PathLike | None = None,
                   monitor: Monitor | None = None) -> PredictionSummary:
    """Cluster a raster file tile by tile (memory bounded by the tile size, not the raster).

    Labels (0 = nodata, 1..k) and, optionally, the 36-band code (nodata -9999) are written with
    windowed writes to temporary files that are renamed at the end.
    """
    monitor = monitor or silent()
    started = time.perf_counter()
    grid = read_grid(in_path)
    # GDAL keeps every block it reads in its cache, up to 5 % of the RAM by default: on a large
    # raster that cache, not the tiles, would set the peak memory. Bound it for this run (this
    # is rasterio's own GDAL; QGIS's GDAL is not affected).
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        return _predict_raster(model, in_path, out_labels_path, out_features_path, monitor,
                               grid, started)


def _predict_raster(model: MS2ANet, in_path, out_labels_path, out_features_path,
                    monitor: Monitor, grid, started: float) -> PredictionSummary:
    with open_raster(in_path) as dataset:
        if dataset.count != model.source_band_count:
            raise ValueError(
                f"The model expects a raster with {model.source_band_count} band(s) (it uses "
                f"bands {_band_list(model.band_numbers)}); '{in_path}' has {dataset.count}. "
                "Apply the model to a raster of the same sensor and band layout."
            )
        if grid.height < 2 or grid.width < 2:
            raise ValueError(f"'{in_path}' is {grid.height}x{grid.width} pixels; MS2A-Net needs "
                             "at least 2x2 pixels.")
        _warn_on_band_name_mismatch(model, dataset, in_path, monitor)
        reader = raster_window_reader(dataset, model.band_numbers)
        sizes = np.zeros(model.n_clusters + 1, dtype=np.int64)
        label_dtype = smallest_unsigned_dtype(model.n_clusters)
        with contextlib.ExitStack() as stack:
            label_temp = stack.enter_context(atomic_output(out_labels_path))
            labels_out = stack.enter_context(open_for_writing(
                label_temp, _profile(grid, 1, label_dtype, 0)))
            features_out = None
            if out_features_path:
                features_temp = stack.enter_context(atomic_output(out_features_path))
                features_out = stack.enter_context(open_for_writing(
                    features_temp, _profile(grid, CODE_CHANNELS, "float32", FLOAT_NODATA)))
            for window, code, window_valid, spectra in model._tile_codes(
                    reader, grid.height, grid.width, monitor):
                labels = model._labels_of(code, window_valid, spectra)
                sizes += np.bincount(labels.ravel(), minlength=model.n_clusters + 1)
                labels_out.write(labels.astype(label_dtype), 1, window=window.core_window)
                if features_out is not None:
                    bands = code.transpose(2, 0, 1).copy()
                    bands[:, ~window_valid] = FLOAT_NODATA
                    features_out.write(bands, window=window.core_window)
            labels_out.set_band_description(1, "cluster")
            if features_out is not None:
                for index in range(CODE_CHANNELS):
                    features_out.set_band_description(index + 1, f"MS2A-Net code {index + 1}")
            # Close the datasets before atomic_output renames them (ExitStack unwinds LIFO).
    return PredictionSummary(int(sizes[1:].sum()), [int(s) for s in sizes[1:]],
                             time.perf_counter() - started)


def _warn_on_band_name_mismatch(model: MS2ANet, dataset, in_path, monitor: Monitor) -> None:
    """Same band count, different band names: most likely another sensor or band order.

    A warning, not an error: names also differ between products of one sensor (EnMAP band names
    carry each scene's calibrated wavelengths), and many rasters have no names at all.
    """
    if len(model.band_names) != len(model.band_numbers):
        return
    differing = []
    for band, trained_name in zip(model.band_numbers, model.band_names):
        name = dataset.descriptions[band - 1]
        if name and trained_name and name != trained_name and \
                not trained_name.startswith("Band "):
            differing.append(f"band {band}: '{name}' (model: '{trained_name}')")
    if differing:
        monitor.warn(
            f"{len(differing)} band name(s) of '{in_path}' differ from the raster the model was "
            f"trained on, e.g. {differing[0]}. Check that the raster has the same band layout."
        )


def _band_list(band_numbers: list[int]) -> str:
    if len(band_numbers) > 8:
        return f"{band_numbers[0]}..{band_numbers[-1]} ({len(band_numbers)} bands)"
    return ", ".join(str(b) for b in band_numbers)
