"""Diagnostic: SCDSC's accuracy at every training epoch (not part of `make bench`).

    python -m bench.scdsc_trace [--scene jasper_ridge] [--seed 0] [--settings '{"beta2": 8}']
                                [--target paper|unbalanced|keep-sizes]

Runs SCDSC on ../shared/data/<scene> with the given settings and scores the argmax of each
epoch's soft assignment against the scene's labels (OA after Hungarian matching, NMI), so one can
see whether joint training improves on the k-means + SVD initialisation (epoch 0) or drifts away
from it, and which epoch the label-free selection keeps. It also prints the size of each cluster
on the labelled pixels per reported epoch beside the true class sizes, largest first, and the
median over valid pixels of max_j s_ij (how flat the soft assignment is; 1/k is flat).

``--target`` swaps the refined target of the non-local term, as ablations of DEC's balancing
term, not settings of the method: ``paper`` is the paper's (s^2 divided by the cluster
frequency, rows normalised); ``unbalanced`` is s^2 with rows normalised (no division;
``--unbalanced-target`` is the old spelling); ``keep-sizes`` sharpens rows (s^2) and then rescales
columns (Sinkhorn, 20 rounds) so that the target keeps the current hard cluster sizes of the
mini-clusters instead of pulling them towards equal sizes. Prints one JSON line; runs on one
thread so that results are reproducible on a machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import engine.scdsc as scdsc_module  # noqa: E402
from bench.run_one import N_CLASSES, load_scene  # noqa: E402
from engine.metrics import score_clustering  # noqa: E402
from engine.raster_io import pixel_size_metres  # noqa: E402

DATA = REPO.parent / "shared" / "data"
REPORTED_EPOCHS = (0, 1, 5, 10, 25, 50, 100, 200, 300)


def unbalanced_target(assignment: torch.Tensor) -> torch.Tensor:
    weights = assignment.pow(2)
    return weights / weights.sum(dim=1, keepdim=True)


def size_keeping_target(assignment: torch.Tensor, rounds: int = 20) -> torch.Tensor:
    """Rows sharpened (s^2), columns rescaled to the current hard cluster sizes (Sinkhorn)."""
    hard = torch.nn.functional.one_hot(assignment.argmax(dim=1), assignment.shape[1])
    sizes = hard.sum(dim=0, keepdim=True).to(assignment.dtype).clamp_min(1.0)
    target = unbalanced_target(assignment)
    for _ in range(rounds):
        target = target * (sizes / target.sum(dim=0, keepdim=True).clamp_min(1e-12))
        target = target / target.sum(dim=1, keepdim=True)
    return target


TARGETS = {"unbalanced": unbalanced_target, "keep-sizes": size_keeping_target}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scene", default="jasper_ridge", choices=sorted(N_CLASSES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="JSON of SCDSC parameters")
    parser.add_argument("--target", default="paper", choices=["paper", *TARGETS])
    parser.add_argument("--unbalanced-target", action="store_true", help="= --target unbalanced")
    args = parser.parse_args(argv)
    cube_path = DATA / args.scene / "cube.tif"
    if args.scene != "demo" and not cube_path.exists():
        print(f"no scene at {cube_path}; nothing to do")
        return 0
    torch.set_num_threads(1)
    target = "unbalanced" if args.unbalanced_target else args.target
    if target in TARGETS:
        scdsc_module.refined_target = TARGETS[target]
    raster, truth = load_scene(args.scene)
    epoch_labels: list[np.ndarray] = []
    # Median over valid pixels of max_j s_ij: how flat the soft assignment is (1/k = flat).
    epoch_median_max: list[float] = []

    class TracedSCDSC(scdsc_module.SCDSC):
        def _joint_losses(self, autoencoder, bases, batch, valid, mini, n_mini):
            losses = super()._joint_losses(autoencoder, bases, batch, valid, mini, n_mini)
            with torch.no_grad():
                grid = self._assign(bases, self._features(autoencoder, batch))
            if grid.shape[0] == 1 and grid.shape[2:] == raster.valid.shape:  # full batch only
                labels = grid[0].argmax(dim=0).cpu().numpy() + 1
                epoch_labels.append(np.where(raster.valid, labels, 0))
                peak = grid[0].max(dim=0).values.cpu().numpy()[raster.valid]
                epoch_median_max.append(round(float(np.median(peak)), 3))
            return losses

    def score(labels: np.ndarray) -> list[float]:
        scores = score_clustering(truth, labels)
        return [round(scores.overall_accuracy, 3), round(scores.nmi, 3)]

    def cluster_sizes(labels: np.ndarray) -> list[int]:
        """Labelled pixels per cluster, largest first: shows DEC-style balancing at work."""
        counts = np.bincount(labels[truth > 0], minlength=N_CLASSES[args.scene] + 1)[1:]
        return sorted((int(c) for c in counts), reverse=True)

    settings = json.loads(args.settings)
    started = time.perf_counter()
    result = TracedSCDSC(n_clusters=N_CLASSES[args.scene], seed=args.seed,
                         **settings).fit(raster.cube, raster.valid, pixel_size_m=pixel_size_metres(
                             raster.crs_wkt, raster.transform, raster.height))
    epochs = [e for e in (*REPORTED_EPOCHS, len(epoch_labels) - 1) if 0 <= e < len(epoch_labels)]
    print(json.dumps({
        "scene": args.scene, "seed": args.seed, "settings": settings,
        "target": target,
        "seconds": round(time.perf_counter() - started, 1),
        "final_oa_nmi": score(result.labels), "selected_epoch": result.selected_epoch,
        "epoch_oa_nmi": {e: score(epoch_labels[e]) for e in sorted(set(epochs))},
        "class_sizes": cluster_sizes(truth),
        "epoch_cluster_sizes": {e: cluster_sizes(epoch_labels[e]) for e in sorted(set(epochs))},
        "epoch_median_max_s": {e: epoch_median_max[e] for e in sorted(set(epochs))},
        "command": "python -m bench.scdsc_trace " + " ".join(argv or sys.argv[1:]),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
