"""Spectral preprocessing shared by the methods: band standardisation and PCA over valid pixels.

All statistics are computed over valid (non-nodata) pixels only; nodata pixels are written as 0,
which after standardisation is the mean of every channel, so they are neutral inputs for the
convolutions that see them at the edge of the valid area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BandStandardiser:
    """Per-band mean / standard deviation fitted on valid pixels."""

    mean: np.ndarray  # (B,)
    std: np.ndarray  # (B,)

    @classmethod
    def fit(cls, pixels: np.ndarray) -> BandStandardiser:
        pixels = np.asarray(pixels, dtype=np.float64)
        mean = pixels.mean(axis=0)
        std = pixels.std(axis=0)
        # A constant band carries no information; dividing by 1 keeps it at 0 instead of NaN.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        return ((pixels - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True)
class PCAProjection:
    """Principal axes of standardised valid pixels, largest variance first."""

    mean: np.ndarray  # (B,)
    components: np.ndarray  # (n_components, B)
    explained_variance_ratio: np.ndarray  # (n_components,)

    @classmethod
    def fit(cls, pixels: np.ndarray, n_components: int) -> PCAProjection:
        pixels = np.asarray(pixels, dtype=np.float64)
        n_components = min(n_components, pixels.shape[1])
        mean = pixels.mean(axis=0)
        # B x B covariance: O(n B^2) time and O(B^2) memory, whatever the pixel count.
        covariance = np.cov(pixels - mean, rowvar=False).reshape(pixels.shape[1], pixels.shape[1])
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1][:n_components]
        components = eigenvectors[:, order].T
        # Fix each axis' sign (largest absolute loading positive) so runs are reproducible.
        signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(axis=1)])
        components = components * signs[:, None]
        total = max(float(eigenvalues.clip(min=0).sum()), 1e-12)
        ratio = eigenvalues[order].clip(min=0) / total
        return cls(
            mean=mean.astype(np.float32),
            components=components.astype(np.float32),
            explained_variance_ratio=ratio.astype(np.float32),
        )

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        return ((pixels - self.mean) @ self.components.T).astype(np.float32)


@dataclass(frozen=True)
class SpectralPreprocessing:
    """SCDSC's input: standardise bands, PCA, then scale the components.

    ``whiten=True`` is the reference: every component is standardised on its own, so the 8th
    component weighs as much as the 1st. ``whiten=False`` divides all components by one common
    scale (their root mean variance), which keeps the Euclidean geometry of the standardised
    spectra (distances shrink by one factor) instead of inflating the low-variance, mostly noisy
    components.

    Kept as fitted statistics (not only applied once) so that a saved model transforms another
    raster exactly as it transformed its training scene.
    """

    bands: BandStandardiser
    pca: PCAProjection
    components: BandStandardiser

    @classmethod
    def fit(cls, pixels: np.ndarray, n_components: int,
            whiten: bool = True) -> SpectralPreprocessing:
        bands = BandStandardiser.fit(pixels)
        standardised = bands.transform(pixels)
        pca = PCAProjection.fit(standardised, n_components)
        components = BandStandardiser.fit(pca.transform(standardised))
        if not whiten:
            common = float(np.sqrt(np.mean(components.std.astype(np.float64) ** 2)))
            components = BandStandardiser(
                mean=components.mean, std=np.full_like(components.std, max(common, 1e-12)))
        return cls(bands=bands, pca=pca, components=components)

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        return self.components.transform(self.pca.transform(self.bands.transform(pixels)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "band_mean": self.bands.mean, "band_std": self.bands.std,
            "pca_mean": self.pca.mean, "pca_components": self.pca.components,
            "pca_explained_variance_ratio": self.pca.explained_variance_ratio,
            "component_mean": self.components.mean, "component_std": self.components.std,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SpectralPreprocessing:
        def array(name: str) -> np.ndarray:
            return np.asarray(arrays[name], dtype=np.float32)

        return cls(
            bands=BandStandardiser(array("band_mean"), array("band_std")),
            pca=PCAProjection(array("pca_mean"), array("pca_components"),
                              array("pca_explained_variance_ratio")),
            components=BandStandardiser(array("component_mean"), array("component_std")),
        )


def variance_preserving_components(pixels: np.ndarray, minimum: int, share: float) -> int:
    """Fewest principal components of the standardised ``pixels`` that keep ``share`` of their
    variance, at least ``minimum`` (and at most the band count)."""
    standardised = BandStandardiser.fit(pixels).transform(pixels)
    ratio = PCAProjection.fit(standardised, standardised.shape[1]).explained_variance_ratio
    needed = int(np.searchsorted(np.cumsum(ratio), share - 1e-9) + 1)
    return int(min(standardised.shape[1], max(minimum, needed)))


def standardised_pca_pixels(pixels: np.ndarray, n_components: int) -> np.ndarray:
    """The reference SCDSC input: standardise bands, PCA, then standardise the components."""
    return SpectralPreprocessing.fit(pixels, n_components).transform(pixels)


def pixels_to_image(pixels: np.ndarray, valid: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Scatter (n_valid, C) rows back onto an (H, W, C) grid in row-major order."""
    image = np.full((*valid.shape, pixels.shape[1]), fill, dtype=np.float32)
    image[valid] = pixels
    return image
