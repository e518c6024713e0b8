"""Scale benchmark of SCDSC's FINCH stage: patch-PCA features + FINCH (2 partitions).

Runs on a synthetic 930 x 947 x 8 scene (the size of the scale scene: 880,710 pixels) made of
spatially smooth random fields plus noise, and prints wall time per step, peak RSS, the number of
patch-PCA components used and the recall of the approximate first neighbours against the exact
ones on a random subsample of query points (searched over all points).

    .venv/bin/python bench/finch_scale.py                # defaults of the engine
    .venv/bin/python bench/finch_scale.py --components 300 --height 300 --width 300

Not a test: run it by hand, once, on an otherwise idle machine.

Measured (2 cores shared with other jobs, the run got ~1 core on average), defaults (64 comps):
patch_pca_features 9.2 s, finch 101.3 s (partitions of 217,345 and 65,929 clusters), FINCH
stage 110.5 s, peak RSS 1.02 GB, round-0 recall@1 0.9998 on 5000 queries. With
``--components 300``: 22.8 s + 240.8 s = 263.6 s, peak RSS 2.6 GB, recall 1.000 (1000 queries).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.finch import finch  # noqa: E402
from engine.monitor import Monitor  # noqa: E402
from engine.patch_features import default_n_components, patch_pca_features  # noqa: E402


def synthetic_scene(height: int, width: int, bands: int, seed: int = 0) -> np.ndarray:
    """(H, W, bands) float32: smooth random fields at a few spatial scales plus white noise."""
    rng = np.random.default_rng(seed)
    scene = np.empty((height, width, bands), dtype=np.float32)
    for band in range(bands):
        field = np.zeros((height, width), dtype=np.float64)
        for sigma, weight in ((24.0, 1.0), (8.0, 0.6), (3.0, 0.3)):
            smooth = gaussian_filter(rng.standard_normal((height, width)), sigma)
            field += weight * smooth / smooth.std()
        scene[..., band] = field + 0.2 * rng.standard_normal((height, width))
    return scene


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def exact_neighbours_of(
    queries: np.ndarray, unit_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbour (and its similarity) of the rows ``queries`` among all unit rows."""
    data = torch.from_numpy(unit_rows)
    block = max(1, 2**25 // len(unit_rows))  # ~128 MB of similarities at a time
    best_index = np.empty(queries.size, dtype=np.int64)
    best_similarity = np.empty(queries.size, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, queries.size, block):
            rows = torch.from_numpy(queries[start : start + block])
            similarity = data[rows] @ data.T
            similarity[torch.arange(rows.numel()), rows] = -torch.inf
            value, index = similarity.max(dim=1)
            best_index[start : start + block] = index.numpy()
            best_similarity[start : start + block] = value.numpy()
    return best_index, best_similarity


RUN_START = time.perf_counter()


def timestamped(text: str) -> None:
    print(f"  [{time.perf_counter() - RUN_START:7.1f} s] {text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=930)
    parser.add_argument("--width", type=int, default=947)
    parser.add_argument("--bands", type=int, default=8)
    parser.add_argument("--components", type=int, default=None, help="default: engine's choice")
    parser.add_argument("--recall-queries", type=int, default=5000)
    args = parser.parse_args()

    start = time.perf_counter()
    image = synthetic_scene(args.height, args.width, args.bands)
    valid = np.ones(image.shape[:2], dtype=bool)
    n = int(valid.sum())
    components = default_n_components(n) if args.components is None else args.components
    print(f"scene {image.shape}, {n} valid pixels, made in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    features = patch_pca_features(
        image, valid, n_components=components, monitor=Monitor(on_info=timestamped)
    )
    features_seconds = time.perf_counter() - start
    print(
        f"patch_pca_features: {features.shape[1]} components, {features_seconds:.1f} s, "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )

    start = time.perf_counter()
    result = finch(features, max_partitions=2, monitor=Monitor(on_info=timestamped))
    finch_seconds = time.perf_counter() - start
    print(
        f"finch(max_partitions=2): clusters per partition {result.n_clusters}, "
        f"{finch_seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MB"
    )
    print(f"FINCH stage total (features + finch): {features_seconds + finch_seconds:.1f} s")

    queries = np.sort(np.random.default_rng(1).choice(n, args.recall_queries, replace=False))
    start = time.perf_counter()
    # patch_pca_features returns unit rows, so inner products are cosine similarities.
    exact_index, exact_similarity = exact_neighbours_of(queries, features)
    approximate = result.neighbours[0][queries]
    approximate_similarity = np.einsum("ij,ij->i", features[queries], features[approximate])
    same = approximate == exact_index
    # A different row that is exactly as similar (a tie) is as good a first neighbour.
    as_good = approximate_similarity >= exact_similarity - 1e-6
    print(
        f"round-0 neighbours vs exact on {queries.size} queries: identical {same.mean():.4f}, "
        f"recall (as similar as the best) {as_good.mean():.4f} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(f"peak RSS of the whole run: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
