"""Does spatial context help on a scene? k-means on box-filtered features, and FINCH purity.

    python -m bench.spatial_context [--scenes ...] [--windows 1 3 5 7 9] [--seeds 0]
                                    [--finch-max-pixels 100000]

Both deep methods bring spatial context into the clustering: SCDSC through 7x7 latent patches,
17x17 FINCH patches and its smoothing term; MS2A-Net through 5x5 convolutions dilated up to 4
(a 17x17 receptive field). Whether that context can help on a scene is measured here without
any network: k-means (k = number of classes, n_init 10) on the features of each pixel averaged
over a w x w window of valid pixels (``engine.scdsc.masked_box_filter``), for the two baseline
feature sets of the issues ("raw": standardised spectra, MS2A-Net's baseline; "pca": the
standardised 8 principal components SCDSC starts from, SCDSC's baseline). Window 1 is the plain
baseline. If the scores fall as the window grows, every extra pixel of context costs agreement
with that scene's reference labels.

It also scores the FINCH mini-clusters SCDSC trains with (its default settings: 17x17 patches,
300 patch-PCA components, partition 1): ``purity`` is the share of labelled pixels whose
mini-cluster's majority class is their class. SCDSC's non-local term pulls every mini-cluster to
one cluster, so impure mini-clusters pull pixels away from their class. FINCH is skipped for
scenes above ``--finch-max-pixels`` valid pixels (s2_aberystwyth takes about 6 minutes).

Each result is one line in bench/results.jsonl (methods ``kmeans_raw_box<w>`` and
``kmeans_pca_box<w>``, and ``finch_purity``); bench/RESULTS.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402

from bench.run_all import DATA, SCENES, machine, write_report  # noqa: E402
from bench.run_one import BASELINE_FEATURES, N_CLASSES  # noqa: E402
from engine.finch import mini_clusters  # noqa: E402
from engine.metrics import score_clustering  # noqa: E402
from engine.patch_features import patch_pca_features  # noqa: E402
from engine.preprocessing import pixels_to_image  # noqa: E402
from engine.raster_io import read_labels, read_raster  # noqa: E402
from engine.scdsc import SCDSC, masked_box_filter  # noqa: E402


def box_filtered_pixels(pixels: np.ndarray, valid: np.ndarray, window: int) -> np.ndarray:
    """(n_valid, C) mean of each valid pixel's features over its window x window valid pixels."""
    if window == 1:
        return pixels
    image = torch.from_numpy(pixels_to_image(pixels.astype(np.float32), valid))
    grid = image.permute(2, 0, 1).unsqueeze(0)
    mask = torch.from_numpy(valid).to(grid.dtype)[None, None]
    smoothed = masked_box_filter(grid, mask, window)[0].permute(1, 2, 0).numpy()
    return smoothed[valid]


def purity(reference: np.ndarray, groups: np.ndarray) -> float:
    """Share of labelled pixels (reference > 0) in the majority class of their group."""
    labelled = reference > 0
    table = np.zeros((groups.max() + 1, reference.max() + 1), dtype=np.int64)
    np.add.at(table, (groups[labelled], reference[labelled]), 1)
    return float(table.max(axis=1).sum() / max(table.sum(), 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", nargs="+", default=SCENES)
    parser.add_argument("--windows", nargs="+", type=int, default=[1, 3, 5, 7, 9])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--finch-max-pixels", type=int, default=100_000)
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"no benchmark data at {DATA}; nothing to do")
        return 0
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
             "command": "python -m bench.spatial_context " + " ".join(argv or sys.argv[1:])}
    rows = []
    for scene in args.scenes:
        raster = read_raster(DATA / scene / "cube.tif")
        truth, _ = read_labels(DATA / scene / "labels.tif")
        valid, k = raster.valid, N_CLASSES[scene]
        pixels = raster.cube[valid]
        features = {name: BASELINE_FEATURES[method](pixels).astype(np.float32)
                    for name, method in (("raw", "kmeans_raw"), ("pca", "kmeans"))}
        for name, feature_pixels in features.items():
            for window in args.windows:
                smoothed = box_filtered_pixels(feature_pixels, valid, window)
                for seed in args.seeds:
                    started = time.perf_counter()
                    assignment = KMeans(k, n_init=10, random_state=seed).fit_predict(smoothed)
                    labels = np.zeros(valid.shape, dtype=np.int32)
                    labels[valid] = assignment + 1
                    scores = score_clustering(truth, labels)
                    rows.append({
                        "bench": "spatial_context", "scene": scene,
                        "method": f"kmeans_{name}_box{window}", "seed": seed,
                        "pixels": int(valid.sum()), "scored": scores.n_scored,
                        "oa": round(scores.overall_accuracy, 4), "nmi": round(scores.nmi, 4),
                        "kappa": round(scores.kappa, 4),
                        "seconds": round(time.perf_counter() - started, 1),
                        "peak_rss_mb": round(
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                    })
                    print(json.dumps(rows[-1]), flush=True)
        if valid.sum() <= args.finch_max_pixels:
            started = time.perf_counter()
            defaults = SCDSC(n_clusters=k, setting="paper")  # the published FINCH settings
            image = pixels_to_image(features["pca"], valid)
            patch_features = patch_pca_features(
                image, valid, patch_size=defaults.finch_patch_size_,
                n_components=defaults.finch_components, seed=0)
            groups = mini_clusters(patch_features, partition_index=defaults.finch_partition)
            rows.append({
                "bench": "finch_purity", "scene": scene, "method": "finch_purity",
                "patch_size": defaults.finch_patch_size_, "partition": defaults.finch_partition,
                "n_mini_clusters": int(groups.max() + 1),
                "purity": round(purity(truth[valid], groups), 4),
                "seconds": round(time.perf_counter() - started, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    with open(REPO / "bench" / "results.jsonl", "a") as log:
        for row in rows:
            log.write(json.dumps({**row, **stamp}) + "\n")
    write_report(REPO / "bench" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
