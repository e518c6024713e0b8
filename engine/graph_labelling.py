"""Graph labelling (Sentinel-2 labelling tool, 2025): segments, CNN features, GNN embeddings,
UMAP views of segments and chips.

Spec: ../shared/papers/graph-labelling-tool-sentinel2-2025.txt, sections 2-3, and the notes in
../shared/docs/method-notes.md. The steps, each a module of its own:

1. fuzzy c-means memberships of every valid pixel on all bands (engine.fuzzy_cmeans);
2. the raster cut into chips; SLIC on the RGB bands of each chip (engine.segments);
3. a U-Net trained on the chips against the memberships (Dice + BCE, rotation and noise, early
   stopping) whose last layer gives ``feature_channels`` activation maps (engine.unet);
4. node features = mean activations per segment; edges to the k nearest segment centroids;
5. a 3-layer GCN / GATv2 trained against the mean membership per segment, embeddings from
   layer 2 (engine.gnn);
6. UMAP of the segment embeddings; chip similarity = mean cosine of Hungarian-matched segment
   embeddings (engine.chip_similarity), then UMAP of the chips (engine.embedding_umap).

The engine works in pixel space: chips, centroids and neighbours are in rows/columns, so a raster
in EPSG:4326 (non-square ground pixels) is handled like any other; ground areas are the writer's
business. Memory stays bounded by the scene arrays (bands + memberships); the activation maps are
computed chip by chip and reduced to segment means at once, never stored for the whole scene.

>>> result = GraphLabelling(seed=0).fit(raster.cube, raster.valid, rgb_bands=(2, 1, 0))
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from engine.chip_similarity import nearest_chips
from engine.device import resolve_device, seed_everything
from engine.embedding_umap import chip_umap, segment_umap
from engine.fuzzy_cmeans import FuzzyCMeans
from engine.gnn import GNN_CHOICES, train_gnn
from engine.graph_result import GraphLabellingResult
from engine.monitor import Monitor, silent
from engine.segments import (
    chip_windows,
    knn_edges,
    segment_means,
    segment_pixel_stats,
    segment_scene,
    segment_sums,
    stretch_rgb,
    windows_with_data,
)
from engine.unet import UNet, chip_tensors, train_unet

MIN_BANDS = 3
MAX_VALIDATION_CHIPS = 8
# Progress share of each stage (fractions of the whole run), roughly their share of the runtime.
# Measured on s2_aberystwyth (bench/graph_pipeline.py).
STAGES = {
    "fuzzy_cmeans": (0.00, 0.02),
    "slic": (0.02, 0.03),
    "unet_training": (0.03, 0.40),
    "unet_features": (0.40, 0.42),
    "graph": (0.42, 0.42),
    "gnn": (0.42, 0.55),
    "segment_umap": (0.55, 0.85),
    "chip_similarity": (0.85, 0.99),
    "chip_umap": (0.99, 1.00),
}


class GraphLabelling:
    """The graph-labelling embedding pipeline, scikit-learn style.

    Parameters (defaults chosen to run s2_aberystwyth, 0.9 M pixels x 10 bands, in minutes on
    2 CPU cores; see engine.unet for the U-Net size):

    n_fcm_clusters: C, fuzzy c-means clusters = U-Net and GNN targets (paper: 8).
    chip_size: side of the square chips in pixels. 128 rather than the paper's 256 so that a
        scene of ~1000 x 1000 pixels gives ~50 chips for the chip-level view, not ~16.
    segments_per_chip, compactness: SLIC settings per chip (paper: ~500 segments).
    n_neighbours: k spatial neighbours per segment (paper: 8).
    gnn: "gcn" (hidden 60) or "gatv2" (8 heads x 8).
    unet_depth, unet_width: down-sampling steps and kernels of the top level (doubled per level).
    feature_channels: activation maps of the U-Net's last layer = node features (paper: 64).
    unet_epochs, unet_patience: maximum epochs and early-stopping patience (paper: 15 with 600
        epochs; smaller here to fit the time budget).
    unet_chips_per_epoch: training chips per epoch (None = all); a fixed budget keeps the U-Net
        time independent of the scene size (at most unet_epochs x this many chip steps).
    gnn_epochs: full-batch GNN training epochs.
    chip_neighbours, chip_candidates: nearest chips kept per chip, and candidate chips per chip
        for the exact Hungarian matching (None = all pairs); see engine.chip_similarity. 30
        candidates (twice the 15 neighbours) kept 99.4 % of the true 15 nearest chips of 441
        at a 15th of the cost of all pairs (bench/chip_matching.py).
    fcm_sample: pixels the fuzzy c-means centres are fitted on.
    seed, device: "auto" uses a GPU if torch sees one, else the CPU.
    """

    def __init__(
        self,
        n_fcm_clusters: int = 8,
        chip_size: int = 128,
        segments_per_chip: int = 500,
        compactness: float = 10.0,
        n_neighbours: int = 8,
        gnn: str = "gcn",
        unet_depth: int = 3,
        unet_width: int = 8,
        feature_channels: int = 64,
        unet_epochs: int = 50,
        unet_patience: int = 8,
        unet_chips_per_epoch: int | None = 12,
        unet_learning_rate: float = 2e-3,
        noise_std: float = 0.05,
        gnn_epochs: int = 200,
        gnn_learning_rate: float = 0.01,
        chip_neighbours: int = 15,
        chip_candidates: int | None = 30,
        umap_neighbours: int = 15,
        fcm_sample: int = 50_000,
        seed: int = 0,
        device: str = "auto",
    ):
        self.n_fcm_clusters = n_fcm_clusters
        self.chip_size = chip_size
        self.segments_per_chip = segments_per_chip
        self.compactness = compactness
        self.n_neighbours = n_neighbours
        self.gnn = gnn
        self.unet_depth = unet_depth
        self.unet_width = unet_width
        self.feature_channels = feature_channels
        self.unet_epochs = unet_epochs
        self.unet_patience = unet_patience
        self.unet_chips_per_epoch = unet_chips_per_epoch
        self.unet_learning_rate = unet_learning_rate
        self.noise_std = noise_std
        self.gnn_epochs = gnn_epochs
        self.gnn_learning_rate = gnn_learning_rate
        self.chip_neighbours = chip_neighbours
        self.chip_candidates = chip_candidates
        self.umap_neighbours = umap_neighbours
        self.fcm_sample = fcm_sample
        self.seed = seed
        self.device = device

    # ---------------------------------------------------------------- validation
    @property
    def downsampling(self) -> int:
        return 2**self.unet_depth

    def _validate(self, cube: np.ndarray, valid: np.ndarray, rgb_bands: Sequence[int]) -> None:
        if cube.ndim != 3:
            raise ValueError(
                f"The cube must be (height, width, bands) as read by engine.raster_io; got shape "
                f"{cube.shape}."
            )
        if valid.shape != cube.shape[:2]:
            raise ValueError(
                f"The valid mask {valid.shape} does not match the cube's {cube.shape[:2]} "
                "(height, width); pass the cube as (height, width, bands)."
            )
        n_bands = cube.shape[2]
        if n_bands < MIN_BANDS:
            raise ValueError(
                f"The raster has {n_bands} band(s); graph labelling needs at least {MIN_BANDS} "
                "(RGB for the segments, all bands for the features). Choose a multispectral "
                "raster."
            )
        if len(rgb_bands) != 3:
            raise ValueError(
                f"Give exactly three RGB bands (red, green, blue) for the segmentation; got "
                f"{len(rgb_bands)}."
            )
        outside = [int(b) for b in rgb_bands if not 0 <= int(b) < n_bands]
        if outside:
            raise ValueError(
                f"RGB band position(s) {outside} are out of range: the cube has {n_bands} bands "
                f"(positions 0..{n_bands - 1}). Choose red, green and blue bands of the raster."
            )
        if self.gnn.lower() not in GNN_CHOICES:
            raise ValueError(
                f"Unknown GNN type '{self.gnn}': choose one of {', '.join(GNN_CHOICES)}."
            )
        for name, value, least in (
            ("number of fuzzy c-means clusters", self.n_fcm_clusters, 2),
            ("number of SLIC segments per chip", self.segments_per_chip, 1),
            ("number of spatial neighbours per segment", self.n_neighbours, 1),
            ("U-Net depth", self.unet_depth, 1),
            ("U-Net width", self.unet_width, 1),
            ("number of activation maps", self.feature_channels, 1),
            ("number of U-Net epochs", self.unet_epochs, 1),
            ("U-Net early-stopping patience", self.unet_patience, 1),
            ("number of U-Net chips per epoch",
             1 if self.unet_chips_per_epoch is None else self.unet_chips_per_epoch, 1),
            ("number of GNN epochs", self.gnn_epochs, 1),
        ):
            if value < least:
                raise ValueError(f"The {name} must be at least {least}; got {value}.")
        if self.compactness <= 0:
            raise ValueError(f"The SLIC compactness must be positive; got {self.compactness}.")
        if self.chip_size < self.downsampling:
            raise ValueError(
                f"Chips of {self.chip_size} pixels are smaller than the U-Net's down-sampling "
                f"factor {self.downsampling} (2^depth, depth {self.unet_depth}). Choose a chip "
                f"size of at least {self.downsampling} pixels or a smaller U-Net depth."
            )
        smallest = min(cube.shape[:2])
        if smallest < self.downsampling:
            raise ValueError(
                f"The raster ({cube.shape[0]} x {cube.shape[1]} pixels) is smaller than the "
                f"U-Net's down-sampling factor {self.downsampling} (2^depth). Choose a larger "
                "raster or a smaller U-Net depth."
            )
        if not valid.any():
            raise ValueError(
                "The raster has no valid pixel (all nodata). Check its nodata value and the band "
                "selection."
            )
        if not np.isfinite(cube[valid]).all():
            raise ValueError("The cube holds NaN or infinite values at valid pixels; mask them.")

    # ---------------------------------------------------------------- public API
    def fit(
        self,
        cube: np.ndarray,
        valid: np.ndarray,
        rgb_bands: Sequence[int],
        monitor: Monitor | None = None,
    ) -> GraphLabellingResult:
        """Build the embeddings of ``cube`` (H, W, B) float32 (as engine.raster_io.read_raster
        returns it) with ``valid`` the (H, W) mask. ``rgb_bands`` are the 0-based positions of
        the red, green and blue bands along the cube's band axis."""
        monitor = monitor or silent()
        cube = np.asarray(cube, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        rgb_bands = [int(b) for b in rgb_bands]
        self._validate(cube, valid, rgb_bands)
        previous_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(cube, valid, rgb_bands, monitor)
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)

    def _fit(self, cube: np.ndarray, valid: np.ndarray, rgb_bands: list[int],
             monitor: Monitor) -> GraphLabellingResult:
        seed_everything(self.seed)  # numpy draws below use their own seeded generators
        device = resolve_device(self.device)
        seconds: dict[str, float] = {}
        started = time.perf_counter()

        def stage(name: str) -> Monitor:
            monitor.check()
            return monitor.stage(*STAGES[name])

        # 1. Fuzzy c-means on all bands of the valid pixels.
        clock = time.perf_counter()
        monitor.info(f"Fuzzy c-means ({self.n_fcm_clusters} clusters, {cube.shape[2]} bands)…")
        step = stage("fuzzy_cmeans")
        pixels = cube[valid]
        fcm = FuzzyCMeans(self.n_fcm_clusters, sample_size=self.fcm_sample, seed=self.seed).fit(
            pixels, step.stage(0.0, 0.7))
        memberships = fcm.memberships(pixels, step.stage(0.7, 1.0))
        standardised = np.zeros(cube.shape, dtype=np.float32)
        standardised[valid] = fcm.standardise(pixels).astype(np.float32)
        membership_image = np.zeros(valid.shape + (self.n_fcm_clusters,), dtype=np.float32)
        membership_image[valid] = memberships
        del pixels
        seconds["fuzzy_cmeans"] = time.perf_counter() - clock

        # 2. Chips and SLIC segments.
        clock = time.perf_counter()
        # Edge remainders narrower than half a chip, or than the U-Net's down-sampling factor,
        # are merged into their neighbour chip.
        min_chip = max(self.chip_size // 2, self.downsampling)
        windows = windows_with_data(chip_windows(*valid.shape, self.chip_size, min_chip), valid)
        smallest_chip = int(windows[:, 2:].min())
        if smallest_chip < self.downsampling:
            raise ValueError(
                f"A chip of {smallest_chip} pixels is smaller than the U-Net's down-sampling "
                f"factor {self.downsampling}. Choose a larger chip size or a smaller U-Net depth."
            )
        monitor.info(f"SLIC on {len(windows)} chips of {self.chip_size} pixels…")
        rgb = stretch_rgb(cube[..., rgb_bands], valid)
        segment_ids, segment_chip = segment_scene(
            rgb, valid, windows, self.segments_per_chip, self.compactness, stage("slic"))
        del rgb
        n_segments = int(segment_chip.shape[0])
        if n_segments < self.n_neighbours + 1:
            raise ValueError(
                f"The scene yields only {n_segments} segment(s), too few for "
                f"{self.n_neighbours} spatial neighbours per segment (needs at least "
                f"{self.n_neighbours + 1}). Choose more SLIC segments per chip, fewer neighbours, "
                "or a larger raster."
            )
        pixel_count, centroid = segment_pixel_stats(segment_ids, n_segments)
        valid_ids = segment_ids[valid].astype(np.int64)
        segment_membership = segment_means(valid_ids, memberships, n_segments).astype(np.float32)
        del memberships
        seconds["slic"] = time.perf_counter() - clock
        monitor.info(f"{n_segments} segments")

        # 3. U-Net on the chips against the memberships.
        clock = time.perf_counter()
        chips = [
            chip_tensors(standardised[r:r + h, c:c + w], membership_image[r:r + h, c:c + w],
                         valid[r:r + h, c:c + w])
            for r, c, h, w in windows
        ]
        del membership_image
        # The paper holds out every fourth chip; with fewer than 4 chips all chips do both jobs.
        held_out = [i for i in range(len(chips)) if i % 4 == 3]
        training = [chips[i] for i in range(len(chips)) if i % 4 != 3] if held_out else chips
        validation = [chips[i] for i in held_out] if held_out else chips
        # Evaluating every held-out chip each epoch would grow with the scene: keep an evenly
        # spread subset of at most MAX_VALIDATION_CHIPS.
        stride = -(-len(validation) // MAX_VALIDATION_CHIPS)
        validation = validation[::stride]
        model = UNet(cube.shape[2], self.n_fcm_clusters, self.unet_depth, self.unet_width,
                     self.feature_channels).to(device)
        generator = torch.Generator().manual_seed(self.seed)
        monitor.info(f"U-Net training (depth {self.unet_depth}, width {self.unet_width}, "
                     f"{len(training)} training / {len(validation)} validation chips, device "
                     f"{device})…")
        unet_report = train_unet(
            model, training, validation, self.unet_epochs, self.unet_patience,
            self.unet_learning_rate, self.noise_std, generator, device, stage("unet_training"),
            self.unet_chips_per_epoch)
        seconds["unet_training"] = time.perf_counter() - clock
        monitor.info(f"U-Net: {unet_report.epochs_run} epochs, best {unet_report.best_epoch} "
                     f"(validation loss {unet_report.best_validation_loss:.4f})")

        # 4. Node features: mean activations per segment, chip by chip.
        clock = time.perf_counter()
        step = stage("unet_features")
        feature_sums = np.zeros((n_segments, self.feature_channels), dtype=np.float64)
        model.eval()
        with torch.no_grad():
            for index, ((r, c, h, w), chip) in enumerate(zip(windows, chips)):
                ids = segment_ids[r:r + h, c:c + w].reshape(-1)
                inside = ids >= 0
                activations = model.features(chip.image[None].to(device))[0]
                values = activations.reshape(self.feature_channels, -1).T.cpu().numpy()
                feature_sums += segment_sums(ids[inside], values[inside], n_segments)
                step.progress((index + 1) / len(windows))
        segment_features = (feature_sums / np.maximum(pixel_count, 1)[:, None]).astype(np.float32)
        del chips, standardised
        seconds["unet_features"] = time.perf_counter() - clock

        # 5. Spatial kNN graph and GNN.
        clock = time.perf_counter()
        stage("graph")
        edges = knn_edges(centroid, self.n_neighbours)
        seconds["graph"] = time.perf_counter() - clock
        clock = time.perf_counter()
        monitor.info(f"{self.gnn.upper()} on {n_segments} nodes / {edges.shape[1]} edges…")
        torch.manual_seed(self.seed)
        embedding, gnn_report = train_gnn(
            self.gnn, segment_features, edges, segment_membership, self.gnn_epochs,
            self.gnn_learning_rate, device=device, monitor=stage("gnn"))
        seconds["gnn"] = time.perf_counter() - clock

        # 6. UMAP of segments; chip similarity; UMAP of chips.
        clock = time.perf_counter()
        monitor.info("UMAP of the segment embeddings…")
        step = stage("segment_umap")
        umap_segments = segment_umap(embedding, self.seed, self.umap_neighbours,
                                     monitor=step)
        step.progress(1.0)
        seconds["segment_umap"] = time.perf_counter() - clock

        clock = time.perf_counter()
        n_chips = len(windows)
        m = max(1, min(self.chip_neighbours, n_chips - 1))
        candidates = self.chip_candidates
        if candidates is not None:
            candidates = max(candidates, m)
        monitor.info(f"Chip similarity (Hungarian matching, {n_chips} chips)…")
        neighbours, similarity = nearest_chips(
            embedding, segment_chip, n_chips, n_neighbours=m, n_candidates=candidates,
            monitor=stage("chip_similarity"))
        seconds["chip_similarity"] = time.perf_counter() - clock

        clock = time.perf_counter()
        step = stage("chip_umap")
        has_segments = np.bincount(segment_chip, minlength=n_chips) > 0
        umap_chips = chip_umap(neighbours, similarity, has_segments, self.seed, monitor=step)
        step.progress(1.0)
        seconds["chip_umap"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started

        return GraphLabellingResult(
            segment_ids=segment_ids,
            segment_chip=segment_chip.astype(np.int32),
            segment_pixel_count=pixel_count,
            segment_centroid_rc=centroid,
            segment_features=segment_features,
            segment_membership=segment_membership,
            segment_fcm_cluster=(segment_membership.argmax(axis=1) + 1).astype(np.int32),
            segment_embedding=embedding,
            segment_umap=umap_segments,
            edges=edges,
            chip_windows=windows.astype(np.int64),
            chip_umap=umap_chips,
            chip_neighbours=neighbours.astype(np.int64),
            chip_neighbour_similarity=similarity.astype(np.float32),
            fcm_centres=fcm.centres.astype(np.float32),
            diagnostics={
                "seconds": seconds,
                "device": str(device),
                "fcm_iterations": fcm.n_iterations,
                "unet_epochs_run": unet_report.epochs_run,
                "unet_best_epoch": unet_report.best_epoch,
                "unet_best_validation_loss": unet_report.best_validation_loss,
                "unet_train_losses": unet_report.train_losses,
                "unet_validation_losses": unet_report.validation_losses,
                "unet_stopped_early": unet_report.stopped_early,
                "gnn_losses": gnn_report.losses,
                "embedding_dim": gnn_report.embedding_dim,
                "n_segments": n_segments,
                "n_chips": n_chips,
                "n_edges": int(edges.shape[1]),
            },
        )
