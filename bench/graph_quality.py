"""Quality of the graph-labelling embeddings on s2_aberystwyth, next to the paper's figures.

    python -m bench.graph_quality [--gnn gcn gatv2] [--sample 5000] [--seed 0] [--settings '{}']

Runs engine.graph_labelling.GraphLabelling on shared/data/s2_aberystwyth/cube.tif once per GNN
(each in its own process, so peak RSS is its own), then engine.embedding_quality on

* the GNN layer-2 embedding (the pipeline's output), and
* the raw CNN node features (result.segment_features): the paper's "graph generation" ablation,

with purity of the FCM clusters and of k-means (k = C) on each embedding against labels.tif.
Appends one JSON line per (GNN, embedding) to bench/results.jsonl and writes
bench/GRAPH_RESULTS.md.

The paper's figures (SWED Sentinel-2 tiles, 12 bands, 441 chips of 256 x 256, RTX 3090; its
GLCM and LBP columns are not computed here):
feature-based (Table 2), GCN 8: SSIM 0.9287, SAM 0.2887; GAT 8: SSIM 0.9256, SAM 0.2942.
context-aware (Table 3), GCN 8: SSIM 0.9624, SAM 0.2064; GAT 8: SSIM 0.9613, SAM 0.2092.
context-aware ablation (Table 6), graph generation (CNN features): SSIM 0.9853, SAM 0.2165.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run_all import machine  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "s2_aberystwyth"
RGB_BANDS = (2, 1, 0)  # 0-based red, green, blue of the 10-band Sentinel-2 stack (B2, B3, B4, ...)

PAPER = {
    # (gnn, embedding): (feature SSIM, feature SAM, context SSIM, context SAM); None = not given
    ("gcn", "gnn_layer2"): (0.9287, 0.2887, 0.9624, 0.2064),
    ("gatv2", "gnn_layer2"): (0.9256, 0.2942, 0.9613, 0.2092),
    ("gcn", "cnn_features"): (None, None, 0.9853, 0.2165),
    ("gatv2", "cnn_features"): (None, None, 0.9853, 0.2165),
}


def one_run(gnn: str, sample: int, seed: int, settings: dict) -> list[dict]:
    import numpy as np
    import torch

    from engine.embedding_quality import evaluate_embedding
    from engine.graph_labelling import GraphLabelling
    from engine.raster_io import read_labels, read_raster

    torch.set_num_threads(2)
    started = time.perf_counter()
    raster = read_raster(DATA / "cube.tif")
    labels, _ = read_labels(DATA / "labels.tif")
    result = GraphLabelling(gnn=gnn, seed=seed, **settings).fit(raster.cube, raster.valid,
                                                                RGB_BANDS)
    pipeline_seconds = time.perf_counter() - started
    rows = []
    for name, embedding in (("gnn_layer2", result.segment_embedding),
                            ("cnn_features", result.segment_features)):
        quality = evaluate_embedding(result, raster.cube, embedding=embedding, labels=labels,
                                     sample=sample, seed=seed)
        rows.append({
            "bench": "graph_quality", "scene": "s2_aberystwyth", "gnn": gnn, "embedding": name,
            "seed": seed, "settings": settings,
            "n_chips": result.n_chips, "n_segments": result.n_segments,
            "embedding_dim": int(np.asarray(embedding).shape[1]),
            **{k: (round(v, 4) if isinstance(v, float) else v)
               for k, v in quality.as_dict().items()},
            "pipeline_seconds": round(pipeline_seconds, 1),
            "stage_seconds": {k: round(v, 1)
                              for k, v in result.diagnostics.get("seconds", {}).items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        })
    return rows


def _figure(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def write_report(rows: list[dict], stamp: dict, path: Path) -> None:
    lines = [
        "# Graph labelling: embedding quality on s2_aberystwyth", "",
        f"- date: {stamp['date']}", f"- machine: {stamp['machine']}",
        f"- command: `{stamp['command']}`",
        "- measures: engine/embedding_quality.py (SAM in radians between segment mean spectra; "
        "SSIM on mean-filled bounding-box patches resized to 16 x 16, 7 x 7 window, per band, "
        "band range as data range). Feature-based: each segment vs its nearest segment by "
        "cosine in the embedding; context-aware: the 9 Hungarian-matched pairs of the two "
        "segments' 8-neighbourhoods. Purity: majority-class share of the labelled pixels per "
        "cluster (FCM argmax; k-means with k = C on the embedding).",
        "- paper: SWED tiles (12 bands, 441 chips of 256 x 256, ~500 segments per chip), "
        "Tables 2, 3 and 6; GLCM / LBP not computed here. The paper does not give feature-based "
        "figures for the CNN-feature ablation.", "",
        "| GNN | embedding | segments (evaluated) | feature SSIM (paper) | feature SAM (paper) | "
        "context SSIM (paper) | context SAM (paper) | purity FCM | purity k-means | "
        "pipeline s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        paper = PAPER.get((row["gnn"], row["embedding"]), (None,) * 4)
        lines.append(
            f"| {row['gnn']} | {row['embedding']} ({row['embedding_dim']}-d) | "
            f"{row['n_segments']} ({row['n_evaluated']}) | "
            f"{row['feature_ssim']:.4f} ({_figure(paper[0])}) | "
            f"{row['feature_sam']:.4f} ({_figure(paper[1])}) | "
            f"{row['context_ssim']:.4f} ({_figure(paper[2])}) | "
            f"{row['context_sam']:.4f} ({_figure(paper[3])}) | "
            f"{row['purity_fcm']:.4f} | {row['purity_kmeans']:.4f} | "
            f"{row['pipeline_seconds']} | {row['peak_rss_mb']} |")
    lines += ["", "Stage seconds per run:", ""]
    for row in rows:
        if row["embedding"] == "gnn_layer2":
            lines.append(f"- {row['gnn']}: {json.dumps(row['stage_seconds'])}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gnn", nargs="+", default=["gcn", "gatv2"])
    parser.add_argument("--sample", type=int, default=5000,
                        help="query segments evaluated per embedding (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="JSON passed to GraphLabelling")
    parser.add_argument("--output", default=str(REPO / "bench" / "GRAPH_RESULTS.md"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = json.loads(args.settings)
    if args.one:
        for row in one_run(args.gnn[0], args.sample, args.seed, settings):
            print(json.dumps(row))
        return 0
    if not (DATA / "cube.tif").exists():
        print(f"no data at {DATA}; nothing to do")
        return 0
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"),
             "command": "python -m bench.graph_quality " + " ".join(argv or sys.argv[1:]),
             "machine": machine()}
    rows: list[dict] = []
    for gnn in args.gnn:
        command = [sys.executable, "-m", "bench.graph_quality", "--one", "--gnn", gnn,
                   "--sample", str(args.sample), "--seed", str(args.seed),
                   "--settings", args.settings]
        print("$", " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        for line in done.stdout.strip().splitlines():
            if line.startswith("{"):
                row = {**json.loads(line), **stamp}
                rows.append(row)
                print("  ", line, flush=True)
    with open(REPO / "bench" / "results.jsonl", "a") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
    write_report(rows, stamp, Path(args.output))
    print(Path(args.output).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
