"""SCDSC models: saved after a run, applied to other rasters window by window.

A model file holds what maps a pixel to a cluster: the spectral preprocessing fitted on the
training scene (band standardisation, PCA, component standardisation), the autoencoder weights
(BatchNorm statistics recalibrated over the whole training scene) and the subspace bases, plus
the band list. The FINCH mini-clusters are a training device only and are not saved.

Applying a model reads the raster in windows with a halo of ``patch_size // 2 + 2`` pixels (the
7x7 latent window plus the two 3x3 encoder convolutions), reflects the halo beyond the raster
edge as training did, and writes labels window by window, so the result equals the labels of the
training run on the same raster and memory does not grow with the raster size.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from engine.device import resolve_device
from engine.model_file import read_model_file, write_model_file
from engine.monitor import Monitor, silent
from engine.preprocessing import SpectralPreprocessing, pixels_to_image
from engine.raster_io import _profile, atomic_output, read_grid, smallest_unsigned_dtype
from engine.scdsc import ENCODER_HALO, SCDSC, PatchAutoencoder, SubspaceBases
from engine.windowed_io import (
    GDAL_CACHE_BYTES,
    PredictionSummary,
    missing_halo,
    open_for_writing,
    open_raster,
    raster_window_reader,
    tile_windows,
)

ALGORITHM_NAME = "scdsc"
FORMAT_VERSION = 1
# Settings that define the network and the assignment (the rest only matter for training).
MODEL_SETTINGS = ("n_clusters", "n_components", "patch_size", "eta", "basis_dim",
                  "latent_channels", "inference_tile", "seed")


@dataclass
class SCDSCModel:
    """A trained SCDSC model, ready to assign pixels of any raster with the same bands."""

    estimator: SCDSC  # holds the settings (and the assignment code)
    autoencoder: PatchAutoencoder
    bases: SubspaceBases
    preprocessing: SpectralPreprocessing
    band_numbers: list[int]  # 1-based bands of the source raster the model reads
    source_band_count: int  # band count of the raster it was trained on

    @property
    def n_clusters(self) -> int:
        return self.estimator.n_clusters

    @property
    def halo(self) -> int:
        return self.estimator.patch_size_ // 2 + ENCODER_HALO


def save_scdsc_model(estimator: SCDSC, path: str | os.PathLike, band_numbers: list[int],
                     source_band_count: int) -> Path:
    """Write a fitted estimator as one model file (temporary file + rename)."""
    if not hasattr(estimator, "autoencoder_"):
        raise ValueError("The SCDSC model is not trained: nothing to save.")
    payload = {
        "algorithm": ALGORITHM_NAME,
        "format_version": FORMAT_VERSION,
        # The values the run used (the adaptive setting picks some from the scene).
        "settings": {name: getattr(estimator, name + "_", getattr(estimator, name))
                     for name in MODEL_SETTINGS},
        "setting": estimator.setting,
        "n_input_channels": int(estimator.preprocessing_.pca.components.shape[0]),
        "autoencoder": {name: tensor.detach().cpu()
                        for name, tensor in estimator.autoencoder_.state_dict().items()},
        "bases": estimator.bases_.kernels.detach().cpu(),
        "code_centre": estimator.bases_.code_centre.detach().cpu(),
        # weights_only loading accepts tensors, not numpy arrays.
        "preprocessing": {name: torch.from_numpy(np.asarray(array))
                          for name, array in estimator.preprocessing_.to_arrays().items()},
        "band_numbers": [int(b) for b in band_numbers],
        "source_band_count": int(source_band_count),
        "n_clusters": int(estimator.n_clusters),
    }
    return write_model_file(payload, path)


def load_scdsc_model(path: str | os.PathLike, device: str = "cpu") -> SCDSCModel:
    """Read a model file written by :func:`save_scdsc_model`; ValueError when it is none."""
    payload = read_model_file(path, ALGORITHM_NAME)
    if payload.get("algorithm") != ALGORITHM_NAME:
        raise ValueError(f"'{path}' is a model of the '{payload.get('algorithm')}' algorithm, "
                         "not an SCDSC model.")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"'{path}' has SCDSC model format version "
                         f"{payload.get('format_version')}; this plugin reads version "
                         f"{FORMAT_VERSION}. Train the model again.")
    torch_device = resolve_device(device)
    try:
        estimator = SCDSC(device=device, **payload["settings"])
        preprocessing = SpectralPreprocessing.from_arrays(
            {name: tensor.numpy() for name, tensor in payload["preprocessing"].items()})
        autoencoder = PatchAutoencoder(int(payload["n_input_channels"]),
                                       estimator.latent_channels)
        autoencoder.load_state_dict(payload["autoencoder"])
        bases = SubspaceBases(estimator.n_clusters, estimator.basis_dim,
                              estimator.latent_channels, estimator.patch_size_)
        bases.kernels.data.copy_(payload["bases"])
        if "code_centre" in payload:  # files of the paper setting before it existed: zero
            bases.code_centre.copy_(payload["code_centre"])
        band_numbers = [int(b) for b in payload["band_numbers"]]
        source_band_count = int(payload["source_band_count"])
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as error:
        raise ValueError(f"'{path}' is not a complete SCDSC model file ({error}).") from error
    if len(band_numbers) != preprocessing.bands.mean.shape[0]:
        raise ValueError(f"'{path}' is not a consistent SCDSC model file (band list).")
    return SCDSCModel(estimator, autoencoder.to(torch_device).eval(), bases.to(torch_device),
                      preprocessing, band_numbers, source_band_count)


@torch.no_grad()
def assign_window(model: SCDSCModel, cube: np.ndarray, valid: np.ndarray,
                  pad: tuple[int, int, int, int]) -> np.ndarray:
    """(k, h', w') soft assignments of the core of one read window.

    ``cube`` (h, w, B) and ``valid`` are the read window; ``pad`` (left, right, top, bottom) is
    the part of the halo outside the raster, reflected as the training run padded its scene.
    """
    image = np.zeros((*valid.shape, model.preprocessing.pca.components.shape[0]),
                     dtype=np.float32)
    if valid.any():
        image = pixels_to_image(model.preprocessing.transform(cube[valid]), valid)
    device = model.bases.kernels.device
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0)
    if any(pad):
        tensor = F.pad(tensor, pad, mode="reflect")
    features = model.estimator._features(model.autoencoder, tensor.to(device))
    return model.estimator._assign(model.bases, features)[0].cpu().numpy()


def apply_scdsc_model(model_path: str | os.PathLike, raster_path: str | os.PathLike,
                      out_path: str | os.PathLike, bands: list[int] | None = None,
                      monitor: Monitor | None = None, device: str = "cpu") -> PredictionSummary:
    """Cluster ``raster_path`` with a saved SCDSC model; labels (0 = nodata, 1..k) to
    ``out_path``, written window by window into a temporary file renamed at the end."""
    monitor = monitor or silent()
    started = time.perf_counter()
    model = load_scdsc_model(model_path, device=device)
    grid = read_grid(raster_path)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        return _apply(model, raster_path, out_path, bands, grid, monitor, started)


def _apply(model: SCDSCModel, raster_path, out_path, bands, grid, monitor: Monitor,
           started: float) -> PredictionSummary:
    band_numbers = list(bands) if bands else model.band_numbers
    halo = model.halo
    with open_raster(raster_path) as dataset:
        if not bands and dataset.count != model.source_band_count:
            raise ValueError(
                f"The SCDSC model was trained on a raster with {model.source_band_count} "
                f"band(s) (it uses {len(model.band_numbers)} of them); '{raster_path}' has "
                f"{dataset.count}. Apply the model to a raster of the same sensor and band "
                "layout.")
        if len(band_numbers) != len(model.band_numbers) or max(band_numbers) > dataset.count:
            raise ValueError(
                f"The SCDSC model needs {len(model.band_numbers)} band(s); the selection "
                f"{band_numbers} does not fit '{raster_path}' ({dataset.count} bands).")
        if min(grid.height, grid.width) <= halo:
            raise ValueError(
                f"'{raster_path}' ({grid.height} x {grid.width} pixels) is too small for this "
                f"model: its {model.estimator.patch_size_} x {model.estimator.patch_size_} patch "
                f"needs at least {halo + 1} x {halo + 1} pixels. Apply it to a larger raster.")
        reader = raster_window_reader(dataset, band_numbers)
        windows = tile_windows(grid.height, grid.width, model.estimator.inference_tile, halo)
        sizes = np.zeros(model.n_clusters + 1, dtype=np.int64)
        label_dtype = smallest_unsigned_dtype(model.n_clusters)
        with contextlib.ExitStack() as stack:
            temporary = stack.enter_context(atomic_output(out_path))
            labels_out = stack.enter_context(
                open_for_writing(temporary, _profile(grid, 1, label_dtype, 0)))
            for index, window in enumerate(windows):
                cube, valid = reader(window)
                soft = assign_window(model, cube, valid, missing_halo(window, halo))
                core_valid = valid[window.core_in_read]
                labels = np.where(core_valid, soft.argmax(axis=0) + 1, 0)
                sizes += np.bincount(labels.ravel(), minlength=model.n_clusters + 1)
                labels_out.write(labels.astype(label_dtype), 1, window=window.core_window)
                monitor.progress((index + 1) / len(windows))
            labels_out.set_band_description(1, "cluster")
    return PredictionSummary(int(sizes[1:].sum()), [int(s) for s in sizes[1:]],
                             time.perf_counter() - started)
