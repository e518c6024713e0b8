"""Result of the graph-labelling pipeline (segments, embeddings, chips), shared by the engine,
the Processing algorithm that writes it to a GeoPackage, and the benchmarks.

Segment ids are dense, 0..n_segments-1; a segment never crosses a chip boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GraphLabellingResult:
    segment_ids: np.ndarray  # (H, W) int32 segment id per pixel, -1 = nodata / no segment
    segment_chip: np.ndarray  # (n_segments,) int32 chip id of each segment
    segment_pixel_count: np.ndarray  # (n_segments,) int64
    segment_centroid_rc: np.ndarray  # (n_segments, 2) float64 (row, col) pixel centroid
    segment_features: np.ndarray  # (n_segments, F) float32 mean CNN activations (node features)
    segment_membership: np.ndarray  # (n_segments, C) float32 mean fuzzy c-means membership
    segment_fcm_cluster: np.ndarray  # (n_segments,) int32, 1..C (argmax of mean membership)
    segment_embedding: np.ndarray  # (n_segments, E) float32, GNN layer-2 output
    segment_umap: np.ndarray  # (n_segments, 2) float32
    edges: np.ndarray  # (2, n_edges) int64 directed edges to the k nearest segment centroids
    chip_windows: np.ndarray  # (n_chips, 4) int64 row_off, col_off, height, width (pixels)
    chip_umap: np.ndarray  # (n_chips, 2) float32, NaN rows for chips without segments
    chip_neighbours: np.ndarray  # (n_chips, m) int64 most similar chips, -1 = padding
    chip_neighbour_similarity: np.ndarray  # (n_chips, m) float32 matched cosine similarity
    fcm_centres: np.ndarray  # (C, bands) float32, in the standardised band space
    diagnostics: dict = field(default_factory=dict)  # losses, epochs run, timings per stage

    @property
    def n_segments(self) -> int:
        return int(self.segment_chip.shape[0])

    @property
    def n_chips(self) -> int:
        return int(self.chip_windows.shape[0])
