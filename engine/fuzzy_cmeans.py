"""Fuzzy c-means (Bezdek 1984) on pixel spectra: the soft targets of the graph-labelling pipeline.

Spec: ../shared/papers/graph-labelling-tool-sentinel2-2025.txt, section 2.2. The paper clusters
all spectral bands of a subsample of the tile and then applies the fitted centres to every pixel.
Here the bands are standardised first (Sentinel-2 bands differ several-fold in range, and the
distance in c-means would otherwise be dominated by the brightest bands); the subsample is a
seeded uniform random sample of valid pixels (``sample_size``); centres start from a seeded
k-means++ draw, so well separated clusters are found reliably. Everything is numpy float64, so a
seed gives the same centres on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.monitor import Monitor, silent

MEMBERSHIP_CHUNK = 262_144  # pixels per chunk when computing memberships (bounded memory)


@dataclass
class FuzzyCMeansModel:
    """Fitted c-means: centres in standardised band space plus the standardisation itself."""

    centres: np.ndarray  # (C, B) float64, standardised space
    band_mean: np.ndarray  # (B,) float64
    band_std: np.ndarray  # (B,) float64, 1 where a band is constant
    fuzziness: float
    n_iterations: int

    def standardise(self, pixels: np.ndarray) -> np.ndarray:
        return (np.asarray(pixels, dtype=np.float64) - self.band_mean) / self.band_std

    def memberships(self, pixels: np.ndarray, monitor: Monitor | None = None) -> np.ndarray:
        """(n, C) float32 memberships of raw (unstandardised) pixel spectra, rows sum to 1."""
        monitor = monitor or silent()
        pixels = np.asarray(pixels)
        out = np.empty((pixels.shape[0], self.centres.shape[0]), dtype=np.float32)
        for start in range(0, pixels.shape[0], MEMBERSHIP_CHUNK):
            stop = min(start + MEMBERSHIP_CHUNK, pixels.shape[0])
            out[start:stop] = fcm_memberships(
                self.standardise(pixels[start:stop]), self.centres, self.fuzziness
            )
            monitor.progress(stop / max(pixels.shape[0], 1))
        return out


def band_standardisation(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation (1 for constant bands, so they standardise to 0)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    mean = pixels.mean(axis=0)
    std = pixels.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, C) squared Euclidean distances, never negative."""
    d2 = (
        (points**2).sum(axis=1, keepdims=True)
        - 2.0 * points @ centres.T
        + (centres**2).sum(axis=1)[None, :]
    )
    return np.maximum(d2, 0.0)


def fcm_memberships(points: np.ndarray, centres: np.ndarray, fuzziness: float = 2.0) -> np.ndarray:
    """u_ik = 1 / sum_j (d_ik / d_ij)^(2/(m-1)), computed stably as normalised d^(-2/(m-1)).

    A point exactly on a centre gets membership 1 there (distances are floored at a tiny value,
    which gives the same limit)."""
    d2 = np.maximum(squared_distances(np.asarray(points, np.float64), centres), 1e-12)
    # Work relative to the nearest centre so that large distances do not underflow.
    ratio = d2.min(axis=1, keepdims=True) / d2
    weights = ratio ** (1.0 / (fuzziness - 1.0))
    return weights / weights.sum(axis=1, keepdims=True)


def kmeans_plus_plus(points: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded k-means++ draw of initial centres."""
    n = points.shape[0]
    centres = np.empty((n_clusters, points.shape[1]), dtype=np.float64)
    centres[0] = points[rng.integers(n)]
    closest = squared_distances(points, centres[:1])[:, 0]
    for index in range(1, n_clusters):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: repeat a random one
            centres[index] = points[rng.integers(n)]
        else:
            centres[index] = points[rng.choice(n, p=closest / total)]
        closest = np.minimum(closest, squared_distances(points, centres[index : index + 1])[:, 0])
    return centres


def fit_centres(
    points: np.ndarray,
    n_clusters: int,
    fuzziness: float = 2.0,
    max_iterations: int = 150,
    tolerance: float = 1e-5,
    rng: np.random.Generator | None = None,
    monitor: Monitor | None = None,
) -> tuple[np.ndarray, int]:
    """Alternate memberships and weighted centres until the centres move less than ``tolerance``
    (in standardised units). Returns (centres, iterations run)."""
    monitor = monitor or silent()
    rng = rng if rng is not None else np.random.default_rng(0)
    points = np.asarray(points, dtype=np.float64)
    centres = kmeans_plus_plus(points, n_clusters, rng)
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        weights = fcm_memberships(points, centres, fuzziness) ** fuzziness
        updated = (weights.T @ points) / np.maximum(weights.sum(axis=0), 1e-12)[:, None]
        shift = float(np.abs(updated - centres).max())
        centres = updated
        monitor.progress(iteration / max_iterations)
        if shift < tolerance:
            break
    monitor.progress(1.0)
    return centres, iteration


class FuzzyCMeans:
    """Fuzzy c-means on the valid pixels, fitted on a sample, scikit-learn style.

    >>> model = FuzzyCMeans(n_clusters=8, seed=0).fit(cube[valid])
    >>> memberships = model.memberships(cube[valid])   # (n_valid, 8), rows sum to 1
    """

    def __init__(
        self,
        n_clusters: int = 8,
        fuzziness: float = 2.0,
        sample_size: int = 50_000,
        max_iterations: int = 150,
        tolerance: float = 1e-5,
        seed: int = 0,
    ):
        self.n_clusters = n_clusters
        self.fuzziness = fuzziness
        self.sample_size = sample_size
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.seed = seed

    def fit(self, pixels: np.ndarray, monitor: Monitor | None = None) -> FuzzyCMeansModel:
        """Fit on (n, B) raw spectra of valid pixels."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.shape[0] == 0:
            raise ValueError("Fuzzy c-means needs at least one valid pixel; the raster has none.")
        if self.n_clusters < 2:
            raise ValueError(
                f"The number of fuzzy c-means clusters must be at least 2; got {self.n_clusters}."
            )
        if self.fuzziness <= 1.0:
            raise ValueError(f"The fuzziness exponent must exceed 1; got {self.fuzziness}.")
        if pixels.shape[0] < self.n_clusters:
            raise ValueError(
                f"{self.n_clusters} fuzzy c-means clusters need at least as many valid pixels; "
                f"the raster has {pixels.shape[0]}. Choose fewer clusters."
            )
        rng = np.random.default_rng(self.seed)
        if pixels.shape[0] > self.sample_size:
            chosen = np.sort(rng.choice(pixels.shape[0], self.sample_size, replace=False))
            sample = pixels[chosen]
        else:
            sample = pixels
        mean, std = band_standardisation(sample)
        standardised = (np.asarray(sample, np.float64) - mean) / std
        centres, iterations = fit_centres(
            standardised, self.n_clusters, self.fuzziness, self.max_iterations, self.tolerance,
            rng, monitor,
        )
        return FuzzyCMeansModel(centres, mean, std, self.fuzziness, iterations)
