"""Peak memory of MS2A-Net tiled inference ("Apply clustering model") against raster size.

    python -m bench.ms2anet_memory [--iterations 100] [--training-pixels 65536] [--tile 512]

1. Trains an MS2A-Net model on s2_aberystwyth (random crops of --training-pixels pixels) and
   saves it (in the work folder, never in the repository).
2. Writes a raster 16x the size of s2_aberystwyth by tiling its cube 4 x 4 (windowed writes, so
   this script never holds the big raster either).
3. Applies the model to s2_aberystwyth and to the 16x raster, each in its own child process that
   reports its own peak RSS (``resource.getrusage``) and wall time.
4. Scores both label rasters against the (tiled) reference labels, appends one line per raster
   to bench/results.jsonl and prints them with the ratio of the two peaks
   (target: 16x peak <= 1.2 x s2 peak).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
SCENE = "s2_aberystwyth"
N_CLUSTERS = 4
REPEAT = 4  # 4 x 4 copies = 16x the pixels
TARGET_RATIO = 1.2


def child(model_path: str, raster_path: str, out_path: str, threads: int) -> int:
    """Apply the model in this (fresh) process and print its peak RSS as JSON."""
    import torch

    from engine.ms2anet import MS2ANet, predict_raster

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = MS2ANet.load(model_path)
    summary = predict_raster(model, raster_path, out_path)
    print(json.dumps({
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "pixels": summary.n_valid,
    }))
    return 0


def tile_raster(source: Path, target: Path, repeat: int) -> tuple[int, int]:
    """Write ``source`` repeated ``repeat`` x ``repeat`` times, one source-sized block at a time."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(source) as dataset:
        profile = dataset.profile.copy()
        data = dataset.read()
        height, width = dataset.height, dataset.width
    profile.update(height=height * repeat, width=width * repeat, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", BIGTIFF="IF_SAFER")
    with rasterio.open(target, "w", **profile) as out:
        for row in range(repeat):
            for col in range(repeat):
                out.write(data, window=Window(col * width, row * height, width, height))
    return height * repeat, width * repeat


def score(labels_path: Path, truth: np.ndarray, repeat: int) -> dict:
    from engine.metrics import score_clustering
    from engine.raster_io import read_labels

    labels, _ = read_labels(labels_path)
    scores = score_clustering(np.tile(truth, (repeat, repeat)), labels)
    return {"scored": scores.n_scored, "oa": round(scores.overall_accuracy, 4),
            "nmi": round(scores.nmi, 4), "kappa": round(scores.kappa, 4)}


def run_child(model: Path, raster: Path, out: Path, threads: int) -> dict:
    command = [sys.executable, "-m", "bench.ms2anet_memory", "--child", str(model), str(raster),
               str(out), "--threads", str(threads)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"child failed: {' '.join(command)}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "RASTER", "OUT"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--training-pixels", type=int, default=65536)
    parser.add_argument("--tile", type=int, default=512, help="inference tile size (pixels)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new /tmp one)")
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child, args.threads)
    if not (DATA / SCENE).is_dir():
        print(f"no benchmark data at {DATA / SCENE}; nothing to do")
        return 0

    import torch

    from engine.ms2anet import MS2ANet
    from engine.raster_io import read_labels, read_raster

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ms2anet_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    source = DATA / SCENE / "cube.tif"

    started = time.perf_counter()
    raster = read_raster(source)
    model = MS2ANet(N_CLUSTERS, iterations=args.iterations, training_pixels=args.training_pixels,
                    seed=0, device="cpu", inference_tile=args.tile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(raster.cube, raster.valid, band_numbers=raster.band_numbers,
                  source_band_count=raster.cube.shape[2])
    model_path = model.save(work / "model.pt")
    del raster
    print(f"trained in {time.perf_counter() - started:.0f} s -> {model_path}", flush=True)

    big = work / "s2_x16.tif"
    height, width = tile_raster(source, big, REPEAT)
    print(f"wrote {big} ({height} x {width}, {height * width} pixels)", flush=True)

    truth, _ = read_labels(DATA / SCENE / "labels.tif")
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"),
             "command": "python -m bench.ms2anet_memory " + " ".join(argv or sys.argv[1:])}
    rows = []
    for name, path, repeat in ((SCENE, source, 1), (f"{SCENE}_x16", big, REPEAT)):
        out = work / f"labels_{name}.tif"
        measured = run_child(model_path, path, out, args.threads)
        rows.append({"scene": name, "method": "ms2anet-apply", "seed": 0, **measured,
                     **score(out, truth, repeat), "tile": args.tile,
                     "threads": args.threads})
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    for row in rows:
        row["peak_ratio_x16_over_x1"] = round(ratio, 3)
    with open(REPO / "bench" / "results.jsonl", "a") as log:
        for row in rows:
            log.write(json.dumps({**row, **stamp}) + "\n")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"peak RSS: s2 {rows[0]['peak_rss_mb']} MB, 16x {rows[1]['peak_rss_mb']} MB, ratio "
          f"{ratio:.3f} ({verdict} the <= {TARGET_RATIO} target); scratch files in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
