"""SCDSC: scalable context-preserving deep subspace clustering (Remote Sensing 2025).

Li, X. et al., Remote Sensing 17(24), 4030, 2025, doi:10.3390/rs17244030, sections 3-4, and the
facts about the authors' reference code in the project's method notes.

Two settings
------------
``setting="paper"`` is the published configuration: bands standardised, 8 principal components
each standardised (whitened), a 7x7 latent patch, a 7x7 box smoothing of the soft assignments,
FINCH on 17x17 patches, k-means on the latent codes to initialise the bases, DEC's refined target.

``setting="adaptive"`` (the default) keeps the paper's model (the autoencoder, subspace bases,
soft assignment, mini-cluster and smoothing KL terms, basis constraint, epoch selection) and
changes what the paper fixed for its 1-2.5 m airborne scenes, because those choices do not carry
over to other sensors (evidence: bench/ACCURACY.md and the notes of issue 13):

* Input: principal components of the standardised bands that keep 99.9% of their variance (at
  least 8; all bands of a multispectral sensor), divided by one common scale instead of each by
  its own (``engine.preprocessing.SpectralPreprocessing``, ``whiten=False``). Whitening gives the
  8th, mostly noisy, component the weight of the 1st: k-means on the whitened 8 components of
  s2_aberystwyth scores NMI 0.668 against 0.840 on the standardised bands, enmap_potsdam 0.257
  against 0.390. FINCH's patch features are then only centred, not z-scored per dimension.
* Context scale from the scene (``engine.scene_context.choose_context_scale``): the latent patch,
  the smoothing window and the FINCH patch are one window, 1x1 up to the paper's 7x7, covering
  at most 50 m of ground when the pixel size is known (1x1 at 20-30 m, 5x5 at 10 m, 7x7 at
  2.5 m like the paper), and no wider than the largest window whose corner neighbours are at
  most twice as dissimilar (median semivariance) as adjacent pixels. The choice and its
  evidence are written to the run's log. On Jasper Ridge (20 m) the 1x1 context lifts SCDSC
  from NMI 0.644 at 3x3 to 0.732, above k-means (0.720; seed 0). The semivariogram bound alone
  does not tell these scenes apart (it allows 3x3 on all three real scenes, 7x7 on the demo).
* Edge-respecting context (``engine.scene_context``): in the smoothing term a neighbour counts
  with the weight exp(-||x_p - x_q||^2 / 2h^2) of its spectral distance, h^2 the median squared
  distance of adjacent pixels (no tuned constant), so a two-pixel road is not averaged into the
  fields around it; the FINCH mini-clusters are built on the input smoothed with the same
  weights.
* Initial partition from the input: the k-means that splits the sampled pixels before the
  per-cluster SVD runs on their (edge-aware smoothed) input spectra instead of their latent
  codes; the bases are still the top singular directions of each part's codes.
* Refined target with a size prior (:func:`refined_target`): DEC's division by the cluster
  frequency pulls every cluster towards 1/k; on a whole scene with flat initial assignments this
  grows a 7.5 % road class to a quarter of Jasper Ridge. The adaptive target multiplies by the
  cluster shares at the start of joint training, so the division pulls each cluster back to its
  own initial share instead (a uniform prior gives DEC's target exactly). Dropping the division
  instead lets clusters die (issue 2's notes).

Measured (bench/ACCURACY.md, mean NMI of 3 seeds, adaptive / paper / k-means on the standardised
spectra): Jasper Ridge 0.720 / 0.405 / 0.720, demo scene 0.723 / 0.565 (seed 0) / 0.824,
enmap_potsdam 0.337 / 0.264 / 0.390, s2_aberystwyth 0.884 (seed 0; 3x3 context) / 0.690 /
0.840. The adaptive setting is far better than the paper's on every scene measured, but still
loses to k-means on the demo scene and enmap_potsdam. On the demo scene its initialisation
alone (k-means on the edge-aware input + SVD, epoch 0) scored 0.79, and joint training moves
away from it. Tried and dropped: centring the latent codes before the SVD
and the affinity (``centre_codes=True``; Jasper Ridge 0.36), the latent-code k-means
initialisation with the other adaptive choices (``init_partition="codes"``; 0.57 at 3x3).

How this implementation differs from the reference, and why
---------------------------------------------------------
* Patches without the 49x redundancy. The reference cuts a 7x7x8 patch around every pixel, runs
  the convolutional autoencoder on each patch and flattens the 32x7x7 latent map into a 1568-d
  code z_i. Every pixel is thus encoded 49 times. Here the same encoder (same layers, same
  weights) runs once over the reflect-padded image, and z_i is the 7x7 window of that feature map
  around pixel i. The projections z_i^T D_j for all pixels are then a single 2-D convolution of
  the feature map with D reshaped to (k*d, 32, 7, 7) kernels. The model, its parameters and the
  loss are the paper's; the one difference is that the 3x3 convolutions at a patch's edge see the
  real neighbouring pixels instead of the zero padding of an isolated patch. Work and memory are
  O(n) with a small constant, and no patch stack is ever materialised.
* Every valid pixel is clustered (the reference clusters only ground-truth pixels; a user has
  none). Nodata pixels are excluded from every loss and written as 0.
* Large scenes. An epoch of the paper is one full-batch step. A scene with more pixels than
  ``batch_pixels`` is trained on a random set of tiles per epoch (same losses on that batch; the
  mini-cluster means use the members inside the batch), so memory stays bounded and the cost of
  an epoch does not grow with the scene. Scenes that fit are trained exactly full-batch.
* k-means + SVD initialisation of the bases uses the codes of a random sample of valid pixels
  (``init_sample`` pixels): the codes of all pixels of a large scene would not fit in memory.
* KL terms use torch's elementwise 'mean' reduction, as the reference does (the paper writes
  sums); beta1 = 3 and beta2 in 1..8 were tuned with that scaling. The basis constraint uses
  unsquared Frobenius norms with weight 1e-3, as the reference (the paper writes squared norms).
* Epoch selection is the reference's: the epoch with the largest share of pixels whose max(s)
  exceeds 0.9 (no labels used). Before the final pass the BatchNorm statistics of the selected
  weights are recomputed over the whole scene, so that inference equals the full-batch forward
  pass of that epoch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.device import resolve_device, seed_everything
from engine.finch import mini_clusters
from engine.kmeans import cancellable_kmeans
from engine.monitor import Monitor, silent
from engine.patch_features import patch_pca_features
from engine.preprocessing import (
    SpectralPreprocessing,
    pixels_to_image,
    variance_preserving_components,
)
from engine.scene_context import (
    choose_context_scale,
    edge_aware_smoothing,
    neighbour_bandwidth,
    spectral_neighbour_weights,
    weighted_neighbour_mean,
)

# Two 3x3 convolutions in the encoder: a feature is exact (no zero padding effect) only this far
# inside a tile, so tiles carry this much extra context.
ENCODER_HALO = 2
CONFIDENCE_THRESHOLD = 0.9


# --------------------------------------------------------------------------------------------
# Pure numerics of the method
# --------------------------------------------------------------------------------------------


def subspace_affinity(projections: torch.Tensor, n_clusters: int, basis_dim: int) -> torch.Tensor:
    """||z_i^T D_j||^2 from the (n, k*d) projections onto all basis vectors."""
    return projections.reshape(-1, n_clusters, basis_dim).pow(2).sum(dim=2)


def soft_assignment(affinity: torch.Tensor, eta: float, basis_dim: int) -> torch.Tensor:
    """s_ij = (||z_i^T D_j||^2 + eta d) / ((eta + 1) d), each row normalised to sum to 1."""
    unnormalised = (affinity + eta * basis_dim) / ((eta + 1.0) * basis_dim)
    return unnormalised / unnormalised.sum(dim=1, keepdim=True)


def refined_target(assignment: torch.Tensor, size_prior: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """DEC-style sharpened target: w = s^2 / column_sum(s), rows normalised.

    With ``size_prior`` (k shares summing to 1) the columns are w = s^2 * prior_j / f_j, f_j the
    share of column j in ``assignment``: the division by f_j no longer pulls every cluster to
    1/k, it pulls cluster j back to its prior share (a cluster below it is boosted, one above it
    damped) while s^2 sharpens. A uniform prior is the paper's target exactly.
    """
    frequency = assignment.sum(dim=0, keepdim=True).clamp_min(1e-12)
    weights = assignment.pow(2) / frequency
    if size_prior is not None:
        weights = weights * size_prior.reshape(1, -1)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


def kl_divergence(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """KL(target || predicted), elementwise mean as torch's KLDivLoss(reduction='mean')."""
    log_ratio = target.clamp_min(1e-12).log() - predicted.clamp_min(1e-12).log()
    return (target * log_ratio).mean()


def masked_box_filter(grid: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window box of the valid pixels only (reflect at the borders).

    ``grid`` is (B, K, H, W), ``mask`` (B, 1, H, W) with 1 for valid pixels. Dividing the box sum
    of the masked values by the box sum of the mask makes nodata pixels contribute nothing.
    """
    half = window // 2
    mode = "reflect" if min(grid.shape[-2:]) > half else "replicate"
    padded_values = F.pad(grid * mask, (half, half, half, half), mode=mode)
    padded_mask = F.pad(mask, (half, half, half, half), mode=mode)
    summed = F.avg_pool2d(padded_values, window, stride=1)
    weight = F.avg_pool2d(padded_mask, window, stride=1)
    return summed / weight.clamp_min(1e-12)


def basis_constraint(bases: torch.Tensor, n_clusters: int, basis_dim: int) -> torch.Tensor:
    """||D^T D ⊙ I − I||_F + ||D^T D ⊙ O||_F with O zero on the d x d diagonal blocks."""
    columns = bases.reshape(n_clusters * basis_dim, -1)  # one row per basis vector
    gram = columns @ columns.T
    identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    same_subspace = torch.block_diag(
        *[torch.ones(basis_dim, basis_dim, device=gram.device, dtype=gram.dtype)] * n_clusters
    )
    return torch.linalg.norm(gram * identity - identity) + torch.linalg.norm(
        gram * (1.0 - same_subspace)
    )


def mini_cluster_means(
    assignment: torch.Tensor, mini_cluster_ids: torch.Tensor, n_mini_clusters: int
) -> torch.Tensor:
    """Mean soft assignment of each mini-cluster that has members in ``assignment``."""
    sums = torch.zeros(n_mini_clusters, assignment.shape[1], device=assignment.device,
                       dtype=assignment.dtype).index_add(0, mini_cluster_ids, assignment)
    counts = torch.bincount(mini_cluster_ids, minlength=n_mini_clusters)
    present = counts > 0
    return sums[present] / counts[present].unsqueeze(1).to(assignment.dtype)


# --------------------------------------------------------------------------------------------
# Torch modules
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class PatchAutoencoder(nn.Module):
    """The reference's convolutional autoencoder, run fully convolutionally over an image."""

    def __init__(self, in_channels: int, latent_channels: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, 1),
            *_conv_bn_relu(32, 32, 3),
            *_conv_bn_relu(32, latent_channels, 3),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, in_channels, 1),
        )


class SubspaceBases(nn.Module):
    """D: k*d basis vectors in the 7x7xC latent patch space, stored as convolution kernels."""

    def __init__(self, n_clusters: int, basis_dim: int, latent_channels: int, patch_size: int):
        super().__init__()
        self.n_clusters = n_clusters
        self.basis_dim = basis_dim
        self.kernels = nn.Parameter(
            torch.zeros(n_clusters * basis_dim, latent_channels, patch_size, patch_size)
        )
        # Per-channel mean of the latent codes, subtracted before projecting (adaptive setting;
        # zero, i.e. the paper's uncentred codes, otherwise).
        self.register_buffer("code_centre", torch.zeros(latent_channels))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """z^T D for every pixel whose full patch lies inside ``features`` (valid convolution)."""
        return F.conv2d(features - self.code_centre.view(1, -1, 1, 1), self.kernels)


# --------------------------------------------------------------------------------------------
# Tiles: extent maths as pure functions
# --------------------------------------------------------------------------------------------


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets of ``tile``-pixel tiles covering 0..length (the last flush with the end)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile))
    starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(row, col, rows, cols) of tiles covering an image; end tiles overlap their neighbour."""
    rows, cols = min(tile, height), min(tile, width)
    return [
        (r, c, rows, cols) for r in tile_origins(height, rows) for c in tile_origins(width, cols)
    ]


# --------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------


@dataclass
class SCDSCResult:
    """Outcome of :meth:`SCDSC.fit`. Labels: 0 = nodata, clusters 1..k."""

    labels: np.ndarray  # (H, W) int32
    soft_assignments: np.ndarray  # (H, W, k) float32, 0 at nodata pixels
    selected_epoch: int
    confident_share: float  # share of pixels with max(s) > 0.9 at the selected epoch
    n_mini_clusters: int
    seconds: dict[str, float] = field(default_factory=dict)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"
    full_batch: bool = True


@dataclass
class _SceneTensors:
    """The padded network input and per-pixel lookups, all on the training device."""

    image: torch.Tensor  # (C, H + 2p, W + 2p), reflect padded
    valid: torch.Tensor  # (H, W) bool
    mini_cluster_grid: torch.Tensor  # (H, W) int64, -1 at nodata
    pad: int


PAPER_COMPONENTS = 8
# Share of the standardised spectra's variance the adaptive input keeps (at least 8 components).
VARIANCE_KEPT = 0.999
# Settings: "paper" is the published configuration; "adaptive" (the default) chooses input and
# context from the scene, see the module docstring. Values: "auto" = from the scene's pixels,
# "scale" / "2scale+1" = from the context scale.
SETTINGS: dict[str, dict] = {
    "paper": {"n_components": PAPER_COMPONENTS, "whiten_input": True, "context_scale": None,
              "patch_size": 7, "smoothing_window": 7, "finch_patch_size": 17,
              "context_weighting": "box", "target": "paper", "init_partition": "codes",
              "centre_codes": False},
    "adaptive": {"n_components": "auto", "whiten_input": False, "context_scale": "auto",
                 "patch_size": "scale", "smoothing_window": "scale",
                 "finch_patch_size": "scale", "context_weighting": "spectral",
                 "target": "size_prior", "init_partition": "spectra", "centre_codes": False},
}


class SCDSC:
    """Scalable context-preserving deep subspace clustering, scikit-learn style.

    >>> result = SCDSC(n_clusters=5, seed=0).fit(cube, valid)
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        setting: str = "adaptive",
        n_components: int | None = None,
        whiten_input: bool | None = None,
        context_scale: int | None = None,
        patch_size: int | None = None,
        smoothing_window: int | None = None,
        context_weighting: str | None = None,
        target: str | None = None,
        init_partition: str | None = None,
        centre_codes: bool | None = None,
        beta: float = 1e-3,
        beta1: float = 3.0,
        beta2: float = 1.0,
        eta: float = 5.0,
        basis_dim: int = 5,
        latent_channels: int = 32,
        epochs: int = 400,
        learning_rate: float = 1e-3,
        pretrain_steps: int = 300,
        pretrain_learning_rate: float = 1e-3,
        pretrain_batch_pixels: int = 16_384,
        batch_pixels: int = 262_144,
        training_tile: int = 128,
        inference_tile: int = 512,
        finch_patch_size: int | None = None,
        finch_components: int = 300,
        finch_partition: int = 1,
        init_sample: int = 20_000,
        kmeans_n_init: int = 10,
        seed: int = 0,
        device: str = "auto",
    ):
        if setting not in SETTINGS:
            raise ValueError(f"Unknown SCDSC setting '{setting}'; choose one of "
                             f"{', '.join(SETTINGS)}.")
        self.n_clusters = n_clusters
        self.setting = setting
        self.n_components = n_components
        self.whiten_input = whiten_input
        self.context_scale = context_scale
        self.patch_size = patch_size
        self.smoothing_window = smoothing_window
        self.context_weighting = context_weighting
        self.target = target
        self.init_partition = init_partition
        self.centre_codes = centre_codes
        self.beta = beta
        self.beta1 = beta1
        self.beta2 = beta2
        self.eta = eta
        self.basis_dim = basis_dim
        self.latent_channels = latent_channels
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.pretrain_steps = pretrain_steps
        self.pretrain_learning_rate = pretrain_learning_rate
        self.pretrain_batch_pixels = pretrain_batch_pixels
        self.batch_pixels = batch_pixels
        self.training_tile = training_tile
        self.inference_tile = inference_tile
        self.finch_patch_size = finch_patch_size
        self.finch_components = finch_components
        self.finch_partition = finch_partition
        self.init_sample = init_sample
        self.kmeans_n_init = kmeans_n_init
        self.seed = seed
        self.device = device
        # Settings that do not depend on the scene are resolved now (explicit values win over
        # the setting's); the scene-dependent ones ("auto" = None) when fit() sees the scene.
        self._resolve(None, None)

    def _resolve(self, pixels: np.ndarray | None, image_shape: tuple | None) -> None:
        """Effective settings as attributes with a trailing underscore."""
        defaults = SETTINGS[self.setting]

        def pick(name):
            value = getattr(self, name)
            return defaults[name] if value is None else value

        self.whiten_input_ = bool(pick("whiten_input"))
        self.context_weighting_ = pick("context_weighting")
        self.target_ = pick("target")
        self.init_partition_ = pick("init_partition")
        self.centre_codes_ = bool(pick("centre_codes"))
        if self.init_partition_ not in ("codes", "spectra"):
            raise ValueError(f"init_partition must be 'codes' or 'spectra'; got "
                             f"'{self.init_partition_}'.")
        if self.context_weighting_ not in ("box", "spectral"):
            raise ValueError(f"context_weighting must be 'box' or 'spectral'; got "
                             f"'{self.context_weighting_}'.")
        if self.target_ not in ("paper", "size_prior"):
            raise ValueError(f"target must be 'paper' or 'size_prior'; got '{self.target_}'.")
        n_components = pick("n_components")
        if n_components == "auto" and pixels is not None:
            n_components = variance_preserving_components(
                pixels, minimum=PAPER_COMPONENTS, share=VARIANCE_KEPT)
        self.n_components_ = n_components
        self.context_scale_ = pick("context_scale")
        self._resolve_scale(self.context_scale_)

    def _resolve_scale(self, scale) -> None:
        defaults = SETTINGS[self.setting]
        self.context_scale_ = scale
        for name in ("patch_size", "smoothing_window", "finch_patch_size"):
            value = getattr(self, name)
            value = defaults[name] if value is None else value
            if value == "scale" and isinstance(scale, int):
                value = scale
            elif value == "2scale+1" and isinstance(scale, int):
                value = 2 * scale + 1
            setattr(self, name + "_", value)

    # ---------------------------------------------------------------- validation
    def _validate(self, cube: np.ndarray, valid: np.ndarray) -> None:
        self._validate_input(cube, valid)
        self._validate_sizes(cube, valid)

    def _validate_input(self, cube: np.ndarray, valid: np.ndarray) -> None:
        if cube.ndim != 3:
            raise ValueError(f"cube must be (height, width, bands); got shape {cube.shape}")
        if valid.shape != cube.shape[:2]:
            raise ValueError(f"valid mask {valid.shape} does not match the cube {cube.shape[:2]}")
        if cube.shape[2] < 3:
            raise ValueError(f"SCDSC needs at least 3 bands; the cube has {cube.shape[2]}.")
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise ValueError("The raster has no valid pixel to cluster.")
        if self.n_clusters < 2:
            raise ValueError(f"The number of clusters must be at least 2; got {self.n_clusters}.")
        if self.n_clusters * self.basis_dim > n_valid:
            raise ValueError(
                f"{self.n_clusters} clusters need at least {self.n_clusters * self.basis_dim} "
                f"valid pixels ({self.basis_dim} basis vectors each); the raster has {n_valid}. "
                "Choose fewer clusters or a larger raster."
            )
        if not np.isfinite(cube[valid]).all():
            raise ValueError("The cube holds NaN or infinite values at valid pixels; mask them.")

    def _validate_sizes(self, cube: np.ndarray, valid: np.ndarray) -> None:
        if self.patch_size_ % 2 == 0 or self.patch_size_ < 1:
            raise ValueError(f"The patch size must be odd; got {self.patch_size_}.")
        if self.smoothing_window_ % 2 == 0 or self.smoothing_window_ < 1:
            raise ValueError(f"The smoothing window must be odd; got {self.smoothing_window_}.")
        pad = self.patch_size_ // 2 + ENCODER_HALO
        if min(cube.shape[:2]) <= pad:
            raise ValueError(
                f"The raster ({cube.shape[0]} x {cube.shape[1]} pixels) is too small: with a "
                f"{self.patch_size_} x {self.patch_size_} patch the network needs at least "
                f"{pad + 1} x {pad + 1} pixels (the patch plus its encoder's {ENCODER_HALO}-pixel "
                "border, reflected at the raster edge). Choose a larger raster or a smaller "
                "patch size."
            )

    # ---------------------------------------------------------------- stages
    def _mini_clusters(self, image: np.ndarray, valid: np.ndarray, monitor: Monitor) -> np.ndarray:
        features = patch_pca_features(
            image, valid, patch_size=self.finch_patch_size_, n_components=self.finch_components,
            seed=self.seed, monitor=monitor.stage(0.0, 0.5),
            standardise=self.whiten_input_,
        )
        return mini_clusters(
            features, partition_index=self.finch_partition, monitor=monitor.stage(0.5, 1.0),
            seed=self.seed,
        )

    def _scene_tensors(
        self, image: np.ndarray, valid: np.ndarray, mini: np.ndarray, device: torch.device
    ) -> _SceneTensors:
        pad = self.patch_size_ // 2 + ENCODER_HALO
        channels_first = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        padded = F.pad(channels_first.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")[0]
        mini_grid = np.full(valid.shape, -1, dtype=np.int64)
        mini_grid[valid] = mini
        return _SceneTensors(
            image=padded.to(device),
            valid=torch.from_numpy(valid).to(device),
            mini_cluster_grid=torch.from_numpy(mini_grid).to(device),
            pad=pad,
        )

    def _crop(self, scene: _SceneTensors, tile: tuple[int, int, int, int]) -> torch.Tensor:
        row, col, rows, cols = tile
        return scene.image[:, row : row + rows + 2 * scene.pad, col : col + cols + 2 * scene.pad]

    def _random_tiles(
        self, scene: _SceneTensors, n_pixels: int, rng: np.random.Generator
    ) -> list[tuple[int, int, int, int]]:
        height, width = scene.valid.shape
        if height * width <= n_pixels:
            return [(0, 0, height, width)]
        side = int(max(16, min(self.training_tile, np.sqrt(n_pixels))))
        rows, cols = min(side, height), min(side, width)
        count = max(1, n_pixels // (rows * cols))
        tiles = []
        attempts = 0
        while len(tiles) < count and attempts < 50 * count:
            attempts += 1
            row = int(rng.integers(0, height - rows + 1))
            col = int(rng.integers(0, width - cols + 1))
            if bool(scene.valid[row : row + rows, col : col + cols].any()):
                tiles.append((row, col, rows, cols))
        return tiles or [(0, 0, rows, cols)]

    def _features(self, autoencoder: PatchAutoencoder, batch: torch.Tensor) -> torch.Tensor:
        """Encoder output, trimmed by the halo in which zero padding would show."""
        features = autoencoder.encoder(batch)
        return features[..., ENCODER_HALO:-ENCODER_HALO, ENCODER_HALO:-ENCODER_HALO]

    def _reconstruction_loss(
        self, autoencoder: PatchAutoencoder, features: torch.Tensor, batch: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        radius = self.patch_size_ // 2
        core = slice(radius, -radius) if radius else slice(None)
        reconstruction = autoencoder.decoder(features)[..., core, core]
        target = batch[..., ENCODER_HALO:-ENCODER_HALO, ENCODER_HALO:-ENCODER_HALO][..., core, core]
        squared = (reconstruction - target).pow(2).mean(dim=1)  # (B, rows, cols)
        return squared[valid].mean()

    def _stack(self, scene: _SceneTensors, tiles: list[tuple[int, int, int, int]]):
        batch = torch.stack([self._crop(scene, tile) for tile in tiles])
        valid = torch.stack([scene.valid[r : r + h, c : c + w] for r, c, h, w in tiles])
        mini = torch.stack([scene.mini_cluster_grid[r : r + h, c : c + w] for r, c, h, w in tiles])
        return batch, valid, mini

    def _pretrain(self, autoencoder: PatchAutoencoder, scene: _SceneTensors,
                  rng: np.random.Generator, monitor: Monitor) -> list[float]:
        optimiser = torch.optim.Adam(autoencoder.parameters(), lr=self.pretrain_learning_rate)
        autoencoder.train()
        losses = []
        for step in range(self.pretrain_steps):
            batch, valid, _ = self._stack(
                scene, self._random_tiles(scene, self.pretrain_batch_pixels, rng)
            )
            features = self._features(autoencoder, batch)
            loss = self._reconstruction_loss(autoencoder, features, batch, valid)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            monitor.progress((step + 1) / max(self.pretrain_steps, 1))
        return losses

    @torch.no_grad()
    def _scene_pass(self, autoencoder: PatchAutoencoder, scene: _SceneTensors,
                    visit, monitor: Monitor) -> None:
        """Run the encoder over the scene tile by tile; ``visit(tile, features)`` per tile."""
        height, width = scene.valid.shape
        tiles = tile_grid(height, width, self.inference_tile)
        for index, tile in enumerate(tiles):
            features = self._features(autoencoder, self._crop(scene, tile).unsqueeze(0))
            visit(tile, features)
            monitor.progress((index + 1) / len(tiles))

    def _initial_bases(self, autoencoder: PatchAutoencoder, scene: _SceneTensors,
                       rng: np.random.Generator, monitor: Monitor) -> torch.Tensor:
        """k-means on sampled latent codes, then the top-d right singular vectors per cluster."""
        autoencoder.eval()
        valid_rows, valid_cols = np.nonzero(scene.valid.cpu().numpy())
        take = rng.choice(valid_rows.size, size=min(self.init_sample, valid_rows.size),
                          replace=False)
        sample_rows, sample_cols = valid_rows[take], valid_cols[take]
        size = self.patch_size_
        codes = np.empty((take.size, self.latent_channels * size * size), dtype=np.float32)

        def collect(tile, features):
            row, col, rows, cols = tile
            inside = ((sample_rows >= row) & (sample_rows < row + rows)
                      & (sample_cols >= col) & (sample_cols < col + cols))
            # Windows of the feature map: pixel (r, c) of the tile has its patch at [r:r+size].
            windows = features[0].unfold(1, size, 1).unfold(2, size, 1)  # (C, rows, cols, s, s)
            local_r = torch.from_numpy(sample_rows[inside] - row)
            local_c = torch.from_numpy(sample_cols[inside] - col)
            picked = windows[:, local_r, local_c]  # (C, m, s, s)
            codes[inside] = picked.permute(1, 0, 2, 3).reshape(picked.shape[1], -1).cpu().numpy()

        self._scene_pass(autoencoder, scene, collect, monitor.stage(0.0, 0.4))
        if self.centre_codes_:
            # The ReLU codes are all positive: uncentred, every cluster's top singular vector is
            # close to the common mean direction and all assignments come out flat.
            centre = codes.reshape(codes.shape[0], self.latent_channels, -1).mean(axis=(0, 2))
            codes -= np.repeat(centre, size * size)[None, :].astype(np.float32)
            self._initial_code_centre = torch.from_numpy(centre.astype(np.float32))
        if self.init_partition_ == "spectra":
            # Partition the sampled pixels by their (context-smoothed) input spectra; the bases
            # are still the top singular directions of each part's latent codes.
            partitioned = self._context_image[sample_rows, sample_cols]
        else:
            partitioned = codes
        # Restart by restart, so a cancel stops within one restart (same result as KMeans).
        assignment = cancellable_kmeans(partitioned, self.n_clusters, self.kmeans_n_init,
                                        self.seed, monitor.stage(0.4, 0.8))
        bases = np.zeros((self.n_clusters * self.basis_dim, codes.shape[1]), dtype=np.float32)
        for cluster in range(self.n_clusters):
            monitor.check()
            members = codes[assignment == cluster]
            directions = np.zeros((0, codes.shape[1]), dtype=np.float32)
            if members.shape[0] > 0:
                _, _, right = np.linalg.svd(members, full_matrices=False)
                directions = right[: self.basis_dim]
            if directions.shape[0] < self.basis_dim:  # tiny cluster: fill with random directions
                extra = rng.standard_normal((self.basis_dim - directions.shape[0], codes.shape[1]))
                extra /= np.linalg.norm(extra, axis=1, keepdims=True)
                directions = np.vstack([directions, extra.astype(np.float32)])
            rows = slice(cluster * self.basis_dim, (cluster + 1) * self.basis_dim)
            bases[rows] = directions
        monitor.progress(1.0)
        return torch.from_numpy(bases).reshape(
            self.n_clusters * self.basis_dim, self.latent_channels, size, size
        )

    def _assign(self, bases: SubspaceBases, features: torch.Tensor) -> torch.Tensor:
        """(B, k, rows, cols) soft assignments of every pixel of a batch of feature maps."""
        projections = bases.project(features)  # (B, k*d, rows, cols)
        batch, _, rows, cols = projections.shape
        flat = projections.permute(0, 2, 3, 1).reshape(-1, projections.shape[1])
        assignment = soft_assignment(
            subspace_affinity(flat, self.n_clusters, self.basis_dim), self.eta, self.basis_dim
        )
        return assignment.reshape(batch, rows, cols, self.n_clusters).permute(0, 3, 1, 2)

    def _joint_losses(self, autoencoder, bases, batch, valid, mini, n_mini) -> dict:
        features = self._features(autoencoder, batch)
        reconstruction = self._reconstruction_loss(autoencoder, features, batch, valid)
        if self.centre_codes_:
            with torch.no_grad():
                bases.code_centre.copy_(features.mean(dim=(0, 2, 3)))
        assignment_grid = self._assign(bases, features)  # (B, k, rows, cols)
        mask = valid.unsqueeze(1).to(assignment_grid.dtype)
        assignment = assignment_grid.permute(0, 2, 3, 1)[valid]  # (n, k)
        # Non-local term: mini-cluster means pulled towards their sharpened version.
        means = mini_cluster_means(assignment, mini[valid], n_mini)
        prior = None
        if self.target_ == "size_prior":
            if self._size_prior is None:  # the shares at the start of joint training
                self._size_prior = means.detach().mean(dim=0)
            prior = self._size_prior
        non_local = kl_divergence(refined_target(means, prior).detach(), means)
        # Local term: assignments pulled towards their masked spatial average.
        if self.context_weighting_ == "spectral":
            smoothed = weighted_neighbour_mean(
                assignment_grid.detach(), self._neighbour_weights(batch, valid),
                self.smoothing_window_)
        else:
            smoothed = masked_box_filter(assignment_grid.detach(), mask, self.smoothing_window_)
        spatial_smoothing_target = smoothed.permute(0, 2, 3, 1)[valid]
        local = kl_divergence(spatial_smoothing_target, assignment)
        constraint = basis_constraint(bases.kernels, self.n_clusters, self.basis_dim)
        total = (reconstruction + self.beta * constraint + self.beta1 * non_local
                 + self.beta2 * local)
        confident = float((assignment.detach().max(dim=1).values > CONFIDENCE_THRESHOLD)
                          .float().mean())
        return {"total": total, "reconstruction": reconstruction, "basis": constraint,
                "non_local": non_local, "local": local, "confident_share": confident}

    @torch.no_grad()
    def _recentre_codes(self, autoencoder: PatchAutoencoder, bases: SubspaceBases,
                        scene: _SceneTensors) -> None:
        """Code centre = mean latent features over the whole scene, as the inference sees it."""
        autoencoder.eval()
        total = torch.zeros(self.latent_channels, dtype=torch.float64)
        count = 0

        def accumulate(tile, features):
            nonlocal total, count
            total += features.sum(dim=(0, 2, 3)).double().cpu()
            count += features.shape[0] * features.shape[2] * features.shape[3]

        self._scene_pass(autoencoder, scene, accumulate, silent())
        bases.code_centre.copy_((total / max(count, 1)).to(bases.code_centre))

    @torch.no_grad()
    def _neighbour_weights(self, batch: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Spectral neighbour weights of the batch's core pixels (cached for a fixed batch)."""
        cached = self._weights_cache
        if cached is not None and cached[0] is batch:
            return cached[1]
        pad = self.patch_size_ // 2 + ENCODER_HALO
        rows, cols = valid.shape[-2:]
        core = batch[..., pad : pad + rows, pad : pad + cols]
        weights = spectral_neighbour_weights(core, valid, self.smoothing_window_,
                                             self.context_bandwidth_)
        self._weights_cache = (batch, weights)
        return weights

    def _recalibrate_batchnorm(self, autoencoder: PatchAutoencoder, scene: _SceneTensors,
                               monitor: Monitor) -> None:
        """Running BatchNorm statistics = the average over the scene's tiles (exact if one)."""
        norms = [m for m in autoencoder.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the pass
        autoencoder.train()
        height, width = scene.valid.shape
        tiles = tile_grid(height, width, max(self.inference_tile, int(np.sqrt(self.batch_pixels))))
        with torch.no_grad():
            for index, tile in enumerate(tiles):
                features = autoencoder.encoder(self._crop(scene, tile).unsqueeze(0))
                autoencoder.decoder(features)
                monitor.progress((index + 1) / len(tiles))
        for norm in norms:
            norm.momentum = 0.1
        autoencoder.eval()

    # ---------------------------------------------------------------- progress
    def stage_fractions(self, n_valid: int, n_pixels: int) -> dict[str, tuple[float, float]]:
        """Where each stage starts and ends on the 0..1 progress bar, in proportion to its
        expected run time, so that progress is roughly linear in time.

        The costs are fitted to the stage times of the benchmark runs in bench/results.jsonl
        (2026-12-03, 2 cores, default settings): FINCH ~2 s + 0.2 ms per valid pixel;
        pretraining ~0.032 s per step of 16,384 pixels; initialisation ~15 s; a joint training
        epoch ~0.05 s + 1.1 s per 262,144 pixels of its batch; assignment ~2 us per pixel.
        With fixed fractions (training 50 % of the bar) a 400-epoch run stood at 43 % after
        40 s of a run lasting minutes.
        """
        batch = min(n_pixels, self.batch_pixels)
        seconds = {
            "finch": 2.0 + 2e-4 * n_valid,
            "pretraining": 0.032 * self.pretrain_steps * self.pretrain_batch_pixels / 16_384,
            "initialisation": 15.0,
            "training": self.epochs * (0.05 + 1.1 * batch / 262_144),
            "recalibration": 1e-6 * n_pixels,
            "assignment": 2e-6 * n_pixels,
        }
        total = sum(seconds.values())
        fractions, start = {}, 0.0
        for stage, cost in seconds.items():
            end = min(start + cost / total, 1.0)
            fractions[stage] = (start, end)
            start = end
        fractions["assignment"] = (fractions["assignment"][0], 1.0)
        return fractions

    # ---------------------------------------------------------------- public API
    def fit(
        self, cube: np.ndarray, valid: np.ndarray, monitor: Monitor | None = None,
        pixel_size_m: float | None = None,
    ) -> SCDSCResult:
        """Cluster every valid pixel of ``cube`` (H, W, B); ``valid`` is the (H, W) mask.

        ``pixel_size_m`` (ground size of a pixel, e.g. ``engine.raster_io.pixel_size_metres``)
        bounds the context scale of the adaptive setting; without it the scene's semivariogram
        alone chooses.
        """
        monitor = monitor or silent()
        cube = np.asarray(cube, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        self._validate_input(cube, valid)
        rng = seed_everything(self.seed)
        device = resolve_device(self.device)
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        self._size_prior = None
        self._weights_cache = None

        monitor.info(f"SCDSC ({self.setting} setting): {int(valid.sum())} valid pixels, "
                     f"{cube.shape[2]} bands, k = {self.n_clusters}, device {device}")
        self._resolve(cube[valid], valid.shape)
        preprocessing = SpectralPreprocessing.fit(cube[valid], self.n_components_,
                                                  whiten=self.whiten_input_)
        image = pixels_to_image(preprocessing.transform(cube[valid]), valid)
        stages = self.stage_fractions(int(valid.sum()), valid.size)
        monitor.check()
        explained = float(preprocessing.pca.explained_variance_ratio.sum())
        monitor.info(f"Input: {self.n_components_} principal components "
                     f"({'whitened' if self.whiten_input_ else 'common scale, not whitened'}), "
                     f"{explained:.2%} of the standardised bands' variance")
        self.context_bandwidth_ = neighbour_bandwidth(image, valid, seed=self.seed)
        if self.context_scale_ == "auto":
            scale, evidence = choose_context_scale(image, valid, pixel_size_m)
            self._resolve_scale(scale)
            monitor.info(f"Context scale chosen from the scene: {scale} x {scale} ({evidence})")
        self._validate_sizes(cube, valid)
        monitor.info(f"Context: latent patch {self.patch_size_} x {self.patch_size_}, "
                     f"{self.context_weighting_} smoothing {self.smoothing_window_} x "
                     f"{self.smoothing_window_}, FINCH patches {self.finch_patch_size_} x "
                     f"{self.finch_patch_size_}; refined target: {self.target_}")
        monitor.check()

        clock = time.perf_counter()
        monitor.info("Mini-clusters (FINCH)…")
        self._context_image = image
        if self.context_weighting_ == "spectral" and self.smoothing_window_ > 1:
            # Context from same-material neighbours only, so that a thin road or river keeps
            # its own mini-clusters and initial cluster.
            self._context_image = edge_aware_smoothing(image, valid, self.smoothing_window_,
                                                       self.context_bandwidth_)
        mini = self._mini_clusters(self._context_image, valid, monitor.stage(*stages["finch"]))
        n_mini = int(mini.max()) + 1
        monitor.info(f"{n_mini} mini-clusters")
        seconds["finch"] = time.perf_counter() - clock

        scene = self._scene_tensors(image, valid, mini, device)
        autoencoder = PatchAutoencoder(image.shape[2], self.latent_channels).to(device)

        clock = time.perf_counter()
        monitor.info("Pretraining the autoencoder…")
        self._pretrain(autoencoder, scene, rng, monitor.stage(*stages["pretraining"]))
        seconds["pretraining"] = time.perf_counter() - clock

        clock = time.perf_counter()
        monitor.info("Initial subspace bases (k-means + SVD)…")
        bases = SubspaceBases(self.n_clusters, self.basis_dim, self.latent_channels,
                              self.patch_size_).to(device)
        with torch.no_grad():
            bases.kernels.copy_(self._initial_bases(autoencoder, scene, rng,
                                                    monitor.stage(*stages["initialisation"])))
            if self.centre_codes_:
                bases.code_centre.copy_(self._initial_code_centre)
        seconds["initialisation"] = time.perf_counter() - clock

        clock = time.perf_counter()
        monitor.info(f"Joint training ({self.epochs} epochs)…")
        height, width = valid.shape
        full_batch = height * width <= self.batch_pixels
        optimiser = torch.optim.Adam(
            list(autoencoder.parameters()) + list(bases.parameters()), lr=self.learning_rate
        )
        training = monitor.stage(*stages["training"])
        history: list[dict[str, float]] = []
        best_share, best_epoch = -1.0, 0
        best_state = None
        fixed_batch = self._stack(scene, [(0, 0, height, width)]) if full_batch else None
        for epoch in range(self.epochs):
            autoencoder.train()
            batch, batch_valid, batch_mini = fixed_batch or self._stack(
                scene, self._random_tiles(scene, self.batch_pixels, rng)
            )
            losses = self._joint_losses(autoencoder, bases, batch, batch_valid, batch_mini, n_mini)
            # The assignment of this forward pass belongs to the weights before this step.
            if losses["confident_share"] > best_share:
                best_share, best_epoch = losses["confident_share"], epoch
                best_state = (copy.deepcopy(autoencoder.state_dict()),
                              copy.deepcopy(bases.state_dict()))
            optimiser.zero_grad()
            losses["total"].backward()
            optimiser.step()
            history.append({name: float(value.detach()) if torch.is_tensor(value) else value
                            for name, value in losses.items()})
            training.progress((epoch + 1) / max(self.epochs, 1))
        if best_state is not None:
            autoencoder.load_state_dict(best_state[0])
            bases.load_state_dict(best_state[1])
        seconds["training"] = time.perf_counter() - clock

        clock = time.perf_counter()
        monitor.info(f"Selected epoch {best_epoch} ({best_share:.1%} of pixels with max(s) > 0.9); "
                     "assigning every pixel…")
        self._recalibrate_batchnorm(autoencoder, scene, monitor.stage(*stages["recalibration"]))
        if self.centre_codes_:
            self._recentre_codes(autoencoder, bases, scene)
        soft = self.assign(autoencoder, bases, scene, monitor.stage(*stages["assignment"]))
        soft[~valid] = 0.0
        labels = np.where(valid, soft.argmax(axis=2) + 1, 0).astype(np.int32)
        seconds["assignment"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        self.autoencoder_, self.bases_ = autoencoder, bases
        self.preprocessing_ = preprocessing
        return SCDSCResult(
            labels=labels, soft_assignments=soft, selected_epoch=best_epoch,
            confident_share=best_share, n_mini_clusters=n_mini, seconds=seconds,
            loss_history=history, device=str(device), full_batch=full_batch,
        )

    def assign(self, autoencoder: PatchAutoencoder, bases: SubspaceBases, scene: _SceneTensors,
               monitor: Monitor) -> np.ndarray:
        """(H, W, k) soft assignments of every pixel, tile by tile with exact halos."""
        autoencoder.eval()
        height, width = scene.valid.shape
        soft = np.zeros((height, width, self.n_clusters), dtype=np.float32)

        def store(tile, features):
            row, col, rows, cols = tile
            grid = self._assign(bases, features)[0]  # (k, rows, cols)
            soft[row : row + rows, col : col + cols] = grid.permute(1, 2, 0).cpu().numpy()

        self._scene_pass(autoencoder, scene, store, monitor)
        return soft

