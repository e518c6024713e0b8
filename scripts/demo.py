#!/usr/bin/env python3
"""HSI Cluster demo: a synthetic scene clustered by the installed plugin through qgis_process.

``make demo`` runs it after ``make install`` (the plugin sits in $HOME's default QGIS profile):

1. writes the demo scene (``engine.demo_scene`` defaults) into ``demo_out/``;
2. runs ``qgis_process.bin run hsicluster:scdsc`` on it -> ``scdsc_clusters.tif`` (+ ``.qml``);
3. writes the quicklooks ``scdsc_clusters.png`` and ``truth.png``;
4. runs ``qgis_process.bin run hsicluster:evaluateclustering`` against the truth raster and
   prints OA / NMI / kappa, next to the same scores computed directly with ``engine.metrics``.

Usage::

    .venv/bin/python scripts/demo.py [--epochs N] [--seed S] [--out DIR] [--threads T]

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
    from engine.quicklook import default_palette, write_label_quicklook
    from engine.raster_io import read_labels

    started = time.perf_counter()
    check_installation()
    env = qgis_env(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] demo scene -> {out}", flush=True)
    scene = make_demo_scene(out)
    truth, _ = read_labels(scene.truth_path)
    print(f"  {scene.cube_path.name}: {truth.shape[0]} x {truth.shape[1]} pixels, "
          f"{scene.n_classes} classes ({', '.join(scene.class_names)})")

    print(f"[2/4] SCDSC clustering ({args.epochs} epochs, seed {args.seed}) via qgis_process",
          flush=True)
    clusters_path = out / f"{CLUSTERS_NAME}.tif"
    clock = time.perf_counter()
    report = run_qgis_process(SCDSC_ID, {
        "INPUT": scene.cube_path, "N_CLUSTERS": scene.n_classes, "EPOCHS": args.epochs,
        "SEED": args.seed, "OUTPUT": clusters_path,
    }, env)
    for line in report.get("log", {}).get("info", [])[-1:]:
        print(f"  {line}")
    if not clusters_path.exists() or not clusters_path.with_suffix(".qml").exists():
        raise DemoError(f"qgis_process reported success but {clusters_path} (or its .qml) "
                        "is missing")
    print(f"  -> {clusters_path} (+ {clusters_path.with_suffix('.qml').name}) "
          f"in {time.perf_counter() - clock:.1f} s")

    print("[3/4] quicklooks", flush=True)
    labels, _ = read_labels(clusters_path)
    scores = score_clustering(truth, labels)
    # Colour each cluster like the truth class it is matched to, so the two PNGs compare at a
    # glance (the .qml keeps the plain cluster palette).
    truth_palette = default_palette(scene.n_classes)
    cluster_palette = list(default_palette(max(int(labels.max()), scene.n_classes)))
    for cluster, class_id in scores.mapping.items():
        if cluster >= 1:
            cluster_palette[cluster - 1] = truth_palette[class_id - 1]
    truth_png = write_label_quicklook(truth, out / "truth.png", truth_palette)
    clusters_png = write_label_quicklook(labels, out / f"{CLUSTERS_NAME}.png", cluster_palette)
    print(f"  -> {clusters_png} (clusters coloured as their matched class)\n  -> {truth_png}")

    print("[4/4] evaluation against the truth via qgis_process", flush=True)
    evaluation = run_qgis_process(EVALUATE_ID, {
        "INPUT": clusters_path, "REFERENCE_RASTER": scene.truth_path,
    }, env)["results"]
    qgis_scores = {name: float(evaluation[name]) for name in ("OA", "NMI", "KAPPA")}
    engine_scores = {"OA": scores.overall_accuracy, "NMI": scores.nmi, "KAPPA": scores.kappa}
    print(f"  qgis_process   : OA {qgis_scores['OA']:.4f}  NMI {qgis_scores['NMI']:.4f}  "
          f"kappa {qgis_scores['KAPPA']:.4f}  ({int(evaluation['N_SCORED'])} pixels)")
    print(f"  engine.metrics : OA {engine_scores['OA']:.4f}  NMI {engine_scores['NMI']:.4f}  "
          f"kappa {engine_scores['KAPPA']:.4f}  ({scores.n_scored} pixels)")
    mismatched = [name for name in qgis_scores
                  if not (math.isclose(qgis_scores[name], engine_scores[name], abs_tol=1e-9)
                          or math.isnan(qgis_scores[name]) and math.isnan(engine_scores[name]))]
    if mismatched or int(evaluation["N_SCORED"]) != scores.n_scored:
        raise DemoError(f"the two evaluations disagree on {mismatched or ['N_SCORED']}")

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
