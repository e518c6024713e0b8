#!/usr/bin/env python3
"""HSI Cluster demo: a synthetic scene clustered by the installed plugin through qgis_process.

``make demo`` runs it after ``make install`` (the plugin sits in $HOME's default QGIS profile):

1. writes the demo scene (``engine.demo_scene`` defaults) into ``demo_out/``;
2. runs ``qgis_process.bin run hsicluster:scdsc`` on it (default setting unless ``--setting``)
   -> ``scdsc_clusters.tif`` (+ ``.qml``);
3. runs k-means on the standardised spectra (k = number of classes, n_init 10, the same seed),
   the baseline a user compares with -> ``kmeans_clusters.tif``;
4. writes the quicklooks ``truth.png``, ``scdsc_clusters.png``, ``kmeans_clusters.png`` and
   ``comparison.png`` (truth | SCDSC | k-means side by side, each cluster coloured as the truth
   class it is matched to);
5. runs ``qgis_process.bin run hsicluster:evaluateclustering`` on the SCDSC map and prints
   OA / NMI / kappa of SCDSC and of k-means side by side, whichever is better.

Usage::

    .venv/bin/python scripts/demo.py [--epochs N] [--seed S] [--setting adaptive|paper]
                                     [--out DIR] [--threads T]

Exits non-zero with a message saying what failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.install_plugin import (  # noqa: E402  (needs the repository on sys.path)
    venv_site_packages as installed_venv_site_packages,
)

QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")
PLUGIN_DIR_REL = Path(".local/share/QGIS/QGIS3/profiles/default/python/plugins/hsi_cluster")
SCDSC_ID = "hsicluster:scdsc"
EVALUATE_ID = "hsicluster:evaluateclustering"
DEFAULT_EPOCHS = 400  # the algorithm's (and the paper's) default
CLUSTERS_NAME = "scdsc_clusters"
KMEANS_NAME = "kmeans_clusters"
SETTINGS = ["adaptive", "paper"]  # order of the algorithm's SETTING enum


def kmeans_on_standardised_spectra(cube, valid, n_clusters: int, seed: int):
    """k-means (n_init 10) on the valid spectra, bands standardised; (H, W) labels, 0 = nodata."""
    import numpy as np
    from sklearn.cluster import KMeans

    from engine.preprocessing import BandStandardiser

    pixels = cube[valid]
    features = BandStandardiser.fit(pixels).transform(pixels)
    assignment = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(features)
    labels = np.zeros(valid.shape, dtype=np.int32)
    labels[valid] = assignment + 1
    return labels


def write_labels(path, labels, grid) -> None:
    """Cluster raster on the scene's grid (smallest unsigned type, 0 = nodata)."""
    from engine.raster_io import write_label_raster

    write_label_raster(path, labels, grid, int(labels.max()))


def matched_palette(scores, labels, truth_palette):
    """Each cluster coloured like the truth class it is matched to (Hungarian matching)."""
    from engine.quicklook import default_palette

    palette = list(default_palette(max(int(labels.max()), len(truth_palette))))
    for cluster, class_id in scores.mapping.items():
        if cluster >= 1:
            palette[cluster - 1] = truth_palette[class_id - 1]
    return palette


class DemoError(RuntimeError):
    """A step failed; the message says which and what to do."""


def venv_site_packages() -> Path:
    found = installed_venv_site_packages()
    if found is None:
        raise DemoError("no virtual environment found: run `make setup` (or `make demo`) first")
    return found


def qgis_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)  # HOME unchanged: `make install` used the real default profile
    env["QT_QPA_PLATFORM"] = "offscreen"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(venv_site_packages())] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_installation() -> None:
    if not QGIS_PROCESS.exists():
        raise DemoError(f"{QGIS_PROCESS} is missing: install QGIS with `make setup`.")
    plugin_dir = Path.home() / PLUGIN_DIR_REL
    if not (plugin_dir / "__init__.py").exists():
        raise DemoError(
            f"the plugin is not installed in {plugin_dir}: run `make install` (or `make demo`)."
        )


def run_qgis_process(algorithm: str, parameters: dict[str, object],
                     env: dict[str, str]) -> dict:
    """Run one algorithm with ``--json``; return the parsed report (raises DemoError)."""
    command = [str(QGIS_PROCESS), "--json", "run", algorithm, "--",
               *[f"{name}={value}" for name, value in parameters.items()]]
    print("  $ " + " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except OSError as error:
        raise DemoError(f"could not start {QGIS_PROCESS}: {error}") from error
    report = None
    if "{" in proc.stdout:
        try:
            report = json.loads(proc.stdout[proc.stdout.index("{"):])
        except json.JSONDecodeError:
            report = None
    if proc.returncode != 0 or report is None or "results" not in report:
        raise DemoError(
            f"qgis_process.bin run {algorithm} failed (exit code {proc.returncode}).\n"
            f"--- stdout (end) ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr (end) ---\n{proc.stderr[-3000:]}\n"
            "Is the plugin installed and enabled (`make install`)? "
            f"`{QGIS_PROCESS} list | grep hsicluster` should list it."
        )
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description="Cluster the synthetic demo scene with the installed HSI Cluster plugin "
                    "through qgis_process, and score it against the truth.",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"SCDSC training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--setting", choices=["adaptive", "paper"], default=None,
                        help="SCDSC setting (default: the algorithm's default, adaptive)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo_out",
                        help="output folder (default demo_out/ in the repository)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the clustering (default: the environment's; "
                             "1 helps on a machine whose cores are busy with other work)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def demo(args: argparse.Namespace) -> None:
    from engine.demo_scene import make_demo_scene
    from engine.metrics import score_clustering
    from engine.quicklook import default_palette, write_label_quicklook, write_panels_quicklook
    from engine.raster_io import read_labels, read_raster

    started = time.perf_counter()
    check_installation()
    env = qgis_env(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    print(f"[1/5] demo scene -> {out}", flush=True)
    scene = make_demo_scene(out)
    truth, _ = read_labels(scene.truth_path)
    print(f"  {scene.cube_path.name}: {truth.shape[0]} x {truth.shape[1]} pixels, "
          f"{scene.n_classes} classes ({', '.join(scene.class_names)})")

    setting_text = args.setting or "default"
    print(f"[2/5] SCDSC clustering ({setting_text} setting, {args.epochs} epochs, seed "
          f"{args.seed}) via qgis_process", flush=True)
    clusters_path = out / f"{CLUSTERS_NAME}.tif"
    clock = time.perf_counter()
    parameters = {"INPUT": scene.cube_path, "N_CLUSTERS": scene.n_classes, "EPOCHS": args.epochs,
                  "SEED": args.seed, "OUTPUT": clusters_path}
    if args.setting:
        parameters["SETTING"] = SETTINGS.index(args.setting)
    report = run_qgis_process(SCDSC_ID, parameters, env)
    for line in report.get("log", {}).get("info", [])[-1:]:
        print(f"  {line}")
    if not clusters_path.exists() or not clusters_path.with_suffix(".qml").exists():
        raise DemoError(f"qgis_process reported success but {clusters_path} (or its .qml) "
                        "is missing")
    print(f"  -> {clusters_path} (+ {clusters_path.with_suffix('.qml').name}) "
          f"in {time.perf_counter() - clock:.1f} s")

    print("[3/5] k-means on the standardised spectra (the baseline)", flush=True)
    clock = time.perf_counter()
    raster = read_raster(scene.cube_path)
    kmeans_labels = kmeans_on_standardised_spectra(raster.cube, raster.valid, scene.n_classes,
                                                   args.seed)
    kmeans_path = out / f"{KMEANS_NAME}.tif"
    write_labels(kmeans_path, kmeans_labels, raster.grid)
    print(f"  -> {kmeans_path} in {time.perf_counter() - clock:.1f} s")

    print("[4/5] quicklooks", flush=True)
    labels, _ = read_labels(clusters_path)
    scores = score_clustering(truth, labels)
    kmeans_scores = score_clustering(truth, kmeans_labels)
    truth_palette = default_palette(scene.n_classes)
    scdsc_palette = matched_palette(scores, labels, truth_palette)
    kmeans_palette = matched_palette(kmeans_scores, kmeans_labels, truth_palette)
    truth_png = write_label_quicklook(truth, out / "truth.png", truth_palette)
    clusters_png = write_label_quicklook(labels, out / f"{CLUSTERS_NAME}.png", scdsc_palette)
    kmeans_png = write_label_quicklook(kmeans_labels, out / f"{KMEANS_NAME}.png",
                                       kmeans_palette)
    comparison_png = write_panels_quicklook(
        [(truth, truth_palette), (labels, scdsc_palette), (kmeans_labels, kmeans_palette)],
        out / "comparison.png")
    print(f"  -> {comparison_png}: truth | SCDSC | k-means (clusters coloured as their matched "
          f"class)\n  -> {truth_png}, {clusters_png}, {kmeans_png}")

    print("[5/5] evaluation against the truth (SCDSC via qgis_process)", flush=True)
    evaluation = run_qgis_process(EVALUATE_ID, {
        "INPUT": clusters_path, "REFERENCE_RASTER": scene.truth_path,
    }, env)["results"]
    qgis_scores = {name: float(evaluation[name]) for name in ("OA", "NMI", "KAPPA")}
    engine_scores = {"OA": scores.overall_accuracy, "NMI": scores.nmi, "KAPPA": scores.kappa}
    mismatched = [name for name in qgis_scores
                  if not (math.isclose(qgis_scores[name], engine_scores[name], abs_tol=1e-9)
                          or math.isnan(qgis_scores[name]) and math.isnan(engine_scores[name]))]
    if mismatched or int(evaluation["N_SCORED"]) != scores.n_scored:
        raise DemoError(f"the two evaluations disagree on {mismatched or ['N_SCORED']}")
    print(f"  {'':28} {'OA':>7} {'NMI':>7} {'kappa':>7}   ({scores.n_scored} labelled pixels)")
    print(f"  {'SCDSC (' + setting_text + ' setting)':28} {qgis_scores['OA']:7.4f} "
          f"{qgis_scores['NMI']:7.4f} {qgis_scores['KAPPA']:7.4f}")
    print(f"  {'k-means, standardised bands':28} {kmeans_scores.overall_accuracy:7.4f} "
          f"{kmeans_scores.nmi:7.4f} {kmeans_scores.kappa:7.4f}")
    better = "SCDSC" if qgis_scores["NMI"] > kmeans_scores.nmi else "k-means"
    print(f"  higher NMI on this scene: {better}")

    print(f"done in {time.perf_counter() - started:.1f} s; outputs in {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        demo(args)
    except DemoError as error:
        print(f"demo failed after {time.perf_counter() - started:.1f} s: {error}",
              file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - any failure must end with a clear message
        traceback.print_exc()
        print(f"demo failed after {time.perf_counter() - started:.1f} s: "
              f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
