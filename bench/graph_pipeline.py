"""Time the whole graph-labelling pipeline (defaults) on a scene and record it.

    python -m bench.graph_pipeline [--scene s2_aberystwyth] [--rgb 3 2 1] [--seed 0]
                                   [--settings '{"gnn": "gatv2"}'] [--no-record]

Reads ../shared/data/<scene>/cube.tif, runs GraphLabelling(...).fit with the default parameters
(overridden by --settings), prints the time of every stage and the peak RSS, and appends one JSON
line to bench/results.jsonl (scene, method, seconds, stage_seconds, peak_rss_mb, sizes, machine,
date, command). The target of issue 4 is the whole pipeline in under 10 minutes on 2 cores.
``--rgb`` takes the 1-based band numbers of red, green and blue in the file (s2_aberystwyth:
bands 3, 2, 1 are B4 red, B3 green, B2 blue).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.run_all import machine  # noqa: E402
from engine.graph_labelling import GraphLabelling  # noqa: E402
from engine.monitor import Monitor  # noqa: E402
from engine.raster_io import read_raster  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scene", default="s2_aberystwyth")
    parser.add_argument("--rgb", nargs=3, type=int, default=[3, 2, 1],
                        help="1-based band numbers of red, green, blue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="JSON of GraphLabelling parameters")
    parser.add_argument("--no-record", action="store_true", help="do not append to results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice, one per core); on a "
                             "machine shared with other jobs 1 thread avoids OpenMP spinning")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = DATA / args.scene / "cube.tif"
    if not path.exists():
        print(f"no scene at {path}; nothing to do")
        return 0
    settings = json.loads(args.settings)

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    raster = read_raster(path)
    read_seconds = time.perf_counter() - started
    rgb = [raster.band_numbers.index(band) for band in args.rgb]
    names = [raster.band_names[i] for i in rgb]
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{args.scene}: {raster.height} x {raster.width} x {len(raster.band_numbers)}, "
          f"{raster.n_valid} valid pixels; RGB bands {args.rgb} ({names})", flush=True)
    monitor = Monitor(on_info=lambda text: print(f"  [{time.perf_counter() - started:7.1f} s] "
                                                 f"{text}", flush=True))
    estimator = GraphLabelling(seed=args.seed, **settings)
    result = estimator.fit(raster.cube, raster.valid, rgb, monitor=monitor)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024
    cpu_seconds = usage.ru_utime + usage.ru_stime
    load_after = os.getloadavg()[0]

    stage_seconds = {"read": round(read_seconds, 1),
                     **{k: round(v, 1) for k, v in result.diagnostics["seconds"].items()}}
    print("stage seconds:")
    for name, value in stage_seconds.items():
        print(f"  {name:16s} {value:8.1f}")
    print(f"total {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU, peak RSS {peak_mb:.0f} MB, "
          f"load average {load_before:.1f} before / {load_after:.1f} after (other jobs share "
          "the cores)")
    row = {
        "scene": args.scene,
        "method": "graph_labelling",
        "seed": args.seed,
        "pixels": raster.n_valid,
        # An embedding, not a clustering: no scores, but the fields keep bench/run_all.py's
        # summary table (which expects them in every line) working.
        "scored": 0, "oa": None, "nmi": None, "kappa": None,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb),
        "cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "stage_seconds": stage_seconds,
        "n_segments": result.n_segments,
        "n_chips": result.n_chips,
        "unet_epochs_run": result.diagnostics["unet_epochs_run"],
        "unet_best_validation_loss": round(result.diagnostics["unet_best_validation_loss"], 4),
        "settings": {k: v for k, v in vars(estimator).items()},
        "machine": machine(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.graph_pipeline " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(row))
    if not args.no_record:
        with open(REPO / "bench" / "results.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
