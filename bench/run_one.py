"""One benchmark run in its own process, so that its peak memory is its own.

    python -m bench.run_one --scene jasper_ridge --method scdsc --seed 0 [--crop ROWS COLS]

Prints one JSON line: scene, method, seed, pixels clustered, OA/NMI/kappa on labelled pixels,
wall seconds (reading + clustering), peak RSS in MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.metrics import score_clustering  # noqa: E402
from engine.preprocessing import standardised_pca_pixels  # noqa: E402
from engine.raster_io import pixel_size_metres, read_labels, read_raster  # noqa: E402

DATA = REPO.parent / "shared" / "data"
# "demo" is the project's own synthetic scene (engine.demo_scene defaults, generated on the fly).
N_CLASSES = {"jasper_ridge": 4, "enmap_potsdam": 6, "s2_aberystwyth": 4, "demo": 5}


def load_scene(scene: str):
    """(raster, truth) of a shared-data scene, or of the demo scene written to a temp folder."""
    if scene == "demo":
        import tempfile

        from engine.demo_scene import make_demo_scene

        with tempfile.TemporaryDirectory() as folder:
            demo = make_demo_scene(folder)
            raster = read_raster(demo.cube_path)
            truth, _ = read_labels(demo.truth_path)
        return raster, truth
    raster = read_raster(DATA / scene / "cube.tif")
    truth, _ = read_labels(DATA / scene / "labels.tif")
    return raster, truth


def standardised_bands(pixels: np.ndarray) -> np.ndarray:
    """The MS2A-Net issue's baseline features: the raw valid spectra, bands standardised."""
    pixels = pixels.astype(np.float64)
    spread = pixels.std(axis=0)
    return (pixels - pixels.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


# k-means baselines by method name: "kmeans" runs on the same standardised PCA features that
# SCDSC starts from (the SCDSC issue's baseline), "kmeans_raw" on the standardised spectra.
BASELINE_FEATURES = {
    "kmeans": lambda pixels: standardised_pca_pixels(pixels, 8),
    "kmeans_raw": standardised_bands,
}


def cluster(method: str, cube: np.ndarray, valid: np.ndarray, k: int, seed: int,
            settings: dict, pixel_size_m: float | None = None) -> tuple[np.ndarray, dict]:
    if method in BASELINE_FEATURES:
        from sklearn.cluster import KMeans

        features = BASELINE_FEATURES[method](cube[valid])
        assignment = KMeans(k, n_init=10, random_state=seed).fit_predict(features)
        labels = np.zeros(valid.shape, dtype=np.int32)
        labels[valid] = assignment + 1
        return labels, {}
    if method == "scdsc":
        import os

        import torch

        from engine.scdsc import SCDSC

        threads = int(os.environ.get("BENCH_TORCH_THREADS", torch.get_num_threads()))
        torch.set_num_threads(threads)
        estimator = SCDSC(n_clusters=k, seed=seed, **settings)
        result = estimator.fit(cube, valid, pixel_size_m=pixel_size_m)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return result.labels, {"selected_epoch": result.selected_epoch,
                               "context_scale": estimator.context_scale_,
                               "input_components": estimator.n_components_,
                               "torch_threads": threads,
                               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                               "stage_seconds": {k: round(v, 1) for k, v in
                                                 result.seconds.items()}}
    if method == "ms2anet":
        import os

        import torch

        from engine.ms2anet import MS2ANet

        # BENCH_TORCH_THREADS=1 on a shared machine: with more runnable threads than free
        # cores, torch's OpenMP threads spin-wait on each other (measured 3x slower at 2).
        threads = int(os.environ.get("BENCH_TORCH_THREADS", torch.get_num_threads()))
        torch.set_num_threads(threads)
        estimator = MS2ANet(n_clusters=k, seed=seed, device="cpu", **settings)
        result = estimator.fit(cube, valid)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # CPU seconds of the process so far: on a shared machine, wall seconds measure the
        # other jobs too; with one thread, CPU seconds ~ the wall time on a free core.
        return result.labels, {"setting": estimator.setting,
                               "context_correlation": estimator.context_correlation_,
                               "context_share": estimator.context_share_,
                               "learning_rate": estimator.learning_rate,
                               "chosen_iteration": result.chosen_iteration,
                               "lowest_loss": round(min(result.loss_history), 5),
                               "torch_threads": threads,
                               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                               "stage_seconds": {k: round(v, 1) for k, v in
                                                 result.seconds.items()}}
    raise ValueError(f"unknown method {method}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scene", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, nargs=2, metavar=("ROWS", "COLS"))
    parser.add_argument("--settings", default="{}", help="JSON of estimator keyword arguments")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    raster, truth = load_scene(args.scene)
    cube, valid = raster.cube, raster.valid
    if args.crop:
        rows, cols = args.crop
        cube, valid, truth = cube[:rows, :cols], valid[:rows, :cols], truth[:rows, :cols]
    labels, extra = cluster(args.method, cube, valid, N_CLASSES[args.scene], args.seed,
                            json.loads(args.settings),
                            pixel_size_metres(raster.crs_wkt, raster.transform, raster.height))
    seconds = time.perf_counter() - started
    scores = score_clustering(truth, labels)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "scene": args.scene + (f"[:{args.crop[0]},:{args.crop[1]}]" if args.crop else ""),
        "method": args.method, "seed": args.seed, "pixels": int(valid.sum()),
        "scored": scores.n_scored, "oa": round(scores.overall_accuracy, 4),
        "nmi": round(scores.nmi, 4), "kappa": round(scores.kappa, 4),
        "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb),
        "settings": json.loads(args.settings), **extra,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
