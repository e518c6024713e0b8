"""SCDSC: scalable context-preserving deep subspace clustering (Remote Sensing 2025).

Spec: ../shared/papers/scdsc-deep-subspace-clustering-2025.txt, sections 3-4, and the facts about
the authors' reference code in ../shared/docs/method-notes.md.

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
from sklearn.cluster import KMeans
from torch import nn

from engine.device import resolve_device, seed_everything
from engine.finch import mini_clusters
from engine.monitor import Monitor, silent
from engine.patch_features import patch_pca_features
from engine.preprocessing import SpectralPreprocessing, pixels_to_image

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


def refined_target(assignment: torch.Tensor) -> torch.Tensor:
    """DEC-style sharpened target: w = s^2 / column_sum(s), rows normalised."""
    weights = assignment.pow(2) / assignment.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return weights / weights.sum(dim=1, keepdim=True)


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

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """z^T D for every pixel whose full patch lies inside ``features`` (valid convolution)."""
        return F.conv2d(features, self.kernels)


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


class SCDSC:
    """Scalable context-preserving deep subspace clustering, scikit-learn style.

    >>> result = SCDSC(n_clusters=5, seed=0).fit(cube, valid)
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_components: int = 8,
        patch_size: int = 7,
        smoothing_window: int = 7,
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
        finch_patch_size: int = 17,
        finch_components: int = 300,
        finch_partition: int = 1,
        init_sample: int = 20_000,
        kmeans_n_init: int = 10,
        seed: int = 0,
        device: str = "auto",
    ):
        self.n_clusters = n_clusters
        self.n_components = n_components
        self.patch_size = patch_size
        self.smoothing_window = smoothing_window
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

    # ---------------------------------------------------------------- validation
    def _validate(self, cube: np.ndarray, valid: np.ndarray) -> None:
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
        if self.patch_size % 2 == 0 or self.patch_size < 1:
            raise ValueError(f"The patch size must be odd; got {self.patch_size}.")
        if self.smoothing_window % 2 == 0 or self.smoothing_window < 1:
            raise ValueError(f"The smoothing window must be odd; got {self.smoothing_window}.")
        pad = self.patch_size // 2 + ENCODER_HALO
        if min(cube.shape[:2]) <= pad:
            raise ValueError(
                f"The raster ({cube.shape[0]} x {cube.shape[1]} pixels) is smaller than the "
                f"{self.patch_size} x {self.patch_size} patch the network needs."
            )
        if not np.isfinite(cube[valid]).all():
            raise ValueError("The cube holds NaN or infinite values at valid pixels; mask them.")

    # ---------------------------------------------------------------- stages
    def _mini_clusters(self, image: np.ndarray, valid: np.ndarray, monitor: Monitor) -> np.ndarray:
        features = patch_pca_features(
            image, valid, patch_size=self.finch_patch_size, n_components=self.finch_components,
            seed=self.seed, monitor=monitor.stage(0.0, 0.5),
        )
        return mini_clusters(
            features, partition_index=self.finch_partition, monitor=monitor.stage(0.5, 1.0),
            seed=self.seed,
        )

    def _scene_tensors(
        self, image: np.ndarray, valid: np.ndarray, mini: np.ndarray, device: torch.device
    ) -> _SceneTensors:
        pad = self.patch_size // 2 + ENCODER_HALO
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
        radius = self.patch_size // 2
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
        size = self.patch_size
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
        kmeans = KMeans(self.n_clusters, n_init=self.kmeans_n_init, random_state=self.seed)
        assignment = kmeans.fit_predict(codes)
        monitor.progress(0.8)
        bases = np.zeros((self.n_clusters * self.basis_dim, codes.shape[1]), dtype=np.float32)
        for cluster in range(self.n_clusters):
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
        assignment_grid = self._assign(bases, features)  # (B, k, rows, cols)
        mask = valid.unsqueeze(1).to(assignment_grid.dtype)
        assignment = assignment_grid.permute(0, 2, 3, 1)[valid]  # (n, k)
        # Non-local term: mini-cluster means pulled towards their sharpened version.
        means = mini_cluster_means(assignment, mini[valid], n_mini)
        non_local = kl_divergence(refined_target(means).detach(), means)
        # Local term: assignments pulled towards their masked spatial average.
        smoothed = masked_box_filter(assignment_grid.detach(), mask, self.smoothing_window)
        spatial_smoothing_target = smoothed.permute(0, 2, 3, 1)[valid]
        local = kl_divergence(spatial_smoothing_target, assignment)
        constraint = basis_constraint(bases.kernels, self.n_clusters, self.basis_dim)
        total = (reconstruction + self.beta * constraint + self.beta1 * non_local
                 + self.beta2 * local)
        confident = float((assignment.detach().max(dim=1).values > CONFIDENCE_THRESHOLD)
                          .float().mean())
        return {"total": total, "reconstruction": reconstruction, "basis": constraint,
                "non_local": non_local, "local": local, "confident_share": confident}

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
        self, cube: np.ndarray, valid: np.ndarray, monitor: Monitor | None = None
    ) -> SCDSCResult:
        """Cluster every valid pixel of ``cube`` (H, W, B); ``valid`` is the (H, W) mask."""
        monitor = monitor or silent()
        cube = np.asarray(cube, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        self._validate(cube, valid)
        rng = seed_everything(self.seed)
        device = resolve_device(self.device)
        seconds: dict[str, float] = {}
        started = time.perf_counter()

        monitor.info(f"SCDSC: {int(valid.sum())} valid pixels, {cube.shape[2]} bands, "
                     f"k = {self.n_clusters}, device {device}")
        preprocessing = SpectralPreprocessing.fit(cube[valid], self.n_components)
        image = pixels_to_image(preprocessing.transform(cube[valid]), valid)
        stages = self.stage_fractions(int(valid.sum()), valid.size)
        monitor.check()

        clock = time.perf_counter()
        monitor.info("Mini-clusters (FINCH on 17x17 patches)…")
        mini = self._mini_clusters(image, valid, monitor.stage(*stages["finch"]))
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
                              self.patch_size).to(device)
        with torch.no_grad():
            bases.kernels.copy_(self._initial_bases(autoencoder, scene, rng,
                                                    monitor.stage(*stages["initialisation"])))
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

