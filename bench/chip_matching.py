"""Benchmark of the chip-level matching (engine.chip_similarity.nearest_chips).

    python -m bench.chip_matching [--chips 441] [--segments 500] [--dim 64]
        [--candidates 20 30 50] [--exact-queries 40] [--source synthetic|s2|both]

Times the paper's bottleneck (441 chips x 500 segments x 64-d embeddings, Hungarian matching of
chip pairs): the exact search over all pairs and the pruned search (exact matching on the top
``n_candidates`` per chip, ranked by the sliced-Wasserstein proxy of engine.chip_similarity) for
a few ``n_candidates``, and the recall of the true 15 nearest chips. The exact all-pairs search
at full size takes long on 2 cores, so it is measured on ``--exact-queries`` query chips against
all chips and extrapolated to all pairs (pairs / 2 because the search solves each unordered pair
once); recall is measured on the same query chips. Each configuration runs in its own process so
its peak RSS is its own. The exact reference is timed in CPU seconds on one thread; the pruned
search runs as the product does, on one thread per core (scipy's assignment releases the GIL),
and reports wall and CPU seconds.

Embeddings are not iid noise (on which every proxy fails and no neighbour structure exists):

* ``synthetic``: a 21 x 21 grid of chips; each chip is a mixture of a few land-cover types whose
  proportions vary smoothly over the grid (neighbouring chips look alike), each type has
  sub-types, and each segment's embedding is its sub-type's prototype + noise, mixed with the
  chip's mean as a GNN's neighbourhood aggregation does.
* ``s2``: the real Sentinel-2 scene (shared/data/s2_aberystwyth) cut into 21 x 21 chips of
  44 x 45 pixels; 2 x 2 pixel blocks (~495 per chip) play the segments; embedding = a fixed
  random two-layer network of the block's standardised spectrum and of its 3 x 3 block
  neighbourhood's mean (a stand-in for CNN + GNN features on real land cover).

Appends one JSON line per configuration to bench/results.jsonl (machine, date, command).
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run_all import machine  # noqa: E402
from engine.chip_similarity import _Chips, matched_mean, nearest_chips  # noqa: E402

DATA = REPO.parent / "shared" / "data"
N_NEIGHBOURS = 15


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def synthetic_embeddings(n_chips: int = 441, n_segments: int = 500, dim: int = 64,
                         n_types: int = 10, n_subtypes: int = 3, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(segment_embedding, segment_chip) with land-cover-like structure (see module doc)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_chips)))
    types = rng.normal(size=(n_types, dim))
    subtypes = types[:, None, :] + 0.5 * rng.normal(size=(n_types, n_subtypes, dim))
    # Smooth type-abundance fields over the chip grid; softmax with a temperature that leaves a
    # few dominant types per chip.
    fields = np.stack([_smooth(rng, (side, side), 2.0) for _ in range(n_types)], axis=-1)
    logits = 2.5 * fields.reshape(-1, n_types)[:n_chips]
    proportions = np.exp(logits - logits.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    embeddings = []
    chip_ids = []
    for chip in range(n_chips):
        count = int(rng.integers(int(0.9 * n_segments), n_segments + 1))
        kind = rng.choice(n_types, size=count, p=proportions[chip])
        sub = rng.integers(0, n_subtypes, size=count)
        own = subtypes[kind, sub] + 0.6 * rng.normal(size=(count, dim))
        mixed = 0.75 * own + 0.25 * own.mean(axis=0)  # neighbourhood aggregation
        embeddings.append(np.maximum(mixed, 0.0) + 0.05 * rng.normal(size=mixed.shape))
        chip_ids.append(np.full(count, chip))
    return (np.concatenate(embeddings).astype(np.float32),
            np.concatenate(chip_ids).astype(np.int32))


def s2_embeddings(dim: int = 64, grid: int = 21, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(segment_embedding, segment_chip) from the real Sentinel-2 scene (see module doc)."""
    from scipy.ndimage import uniform_filter

    from engine.raster_io import read_raster

    raster = read_raster(DATA / "s2_aberystwyth" / "cube.tif")
    cube, valid = raster.cube, raster.valid
    pixels = cube[valid]
    standard = (cube - pixels.mean(axis=0)) / pixels.std(axis=0)
    standard[~valid] = 0.0
    chip_h, chip_w = cube.shape[0] // grid, cube.shape[1] // grid
    block_h, block_w = chip_h // 2, chip_w // 2
    rng = np.random.default_rng(seed)
    bands = cube.shape[2]
    w1 = rng.normal(size=(2 * bands, 128)) / np.sqrt(2 * bands)
    w2 = rng.normal(size=(128, dim)) / np.sqrt(128)
    embeddings = []
    chip_ids = []
    for row in range(grid):
        for col in range(grid):
            window = standard[row * chip_h:row * chip_h + 2 * block_h,
                              col * chip_w:col * chip_w + 2 * block_w]
            ok = valid[row * chip_h:row * chip_h + 2 * block_h,
                       col * chip_w:col * chip_w + 2 * block_w]
            blocks = window.reshape(block_h, 2, block_w, 2, bands).mean(axis=(1, 3))
            block_ok = ok.reshape(block_h, 2, block_w, 2).all(axis=(1, 3))
            context = uniform_filter(blocks, size=(3, 3, 1), mode="nearest")
            features = np.concatenate([blocks, context], axis=-1)[block_ok]
            hidden = np.maximum(features @ w1, 0.0)
            embeddings.append(hidden @ w2)
            chip_ids.append(np.full(len(features), row * grid + col))
    return (np.concatenate(embeddings).astype(np.float32),
            np.concatenate(chip_ids).astype(np.int32))


def load(source: str, n_chips: int, n_segments: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if source == "s2":
        return s2_embeddings(dim)
    return synthetic_embeddings(n_chips, n_segments, dim)


def exact_rows(embedding: np.ndarray, chip: np.ndarray, n_chips: int, queries: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """True top-k chips (and similarities) of each query chip by exact matching against all."""
    chips = _Chips(embedding, chip.astype(np.int64), n_chips)
    top = np.full((queries.size, k), -1, dtype=np.int64)
    top_values = np.full((queries.size, k), np.nan)
    solved = 0
    start = time.process_time()
    for row, a in enumerate(queries):
        values = np.full(n_chips, -np.inf)
        for b in range(n_chips):
            if b != a and chips.counts[b] and chips.counts[a]:
                values[b] = matched_mean(chips.of(a) @ chips.of(b).T)
                solved += 1
        order = np.lexsort((np.arange(n_chips), -values))[:k]
        top[row] = order
        top_values[row] = values[order]
    return top, top_values, time.process_time() - start, solved


def one_run(args: argparse.Namespace) -> dict:
    embedding, chip = load(args.source, args.chips, args.segments, args.dim)
    n_chips = int(chip.max()) + 1
    rng = np.random.default_rng(1)
    queries = np.sort(rng.choice(n_chips, size=min(args.exact_queries, n_chips), replace=False))
    row = {"bench": "chip_matching", "source": args.source, "chips": n_chips,
           "segments": int(len(chip)), "dim": int(embedding.shape[1]),
           "n_neighbours": N_NEIGHBOURS}
    if args.mode == "exact":
        top, values, cpu_seconds, solved = exact_rows(embedding, chip, n_chips, queries,
                                                  N_NEIGHBOURS)
        all_pairs = n_chips * (n_chips - 1) // 2
        per_pair = cpu_seconds / solved
        np.save(args.truth, top)
        np.save(str(args.truth).replace(".npy", "_values.npy"), values)
        row.update({"mode": "exact", "query_chips": int(queries.size), "pairs_solved": solved,
                    "seconds_per_pair": round(per_pair, 5),
                    "cpu_seconds": round(per_pair * all_pairs, 1), "extrapolated": True,
                    "unordered_pairs": all_pairs})
    else:
        start, cpu_start = time.perf_counter(), time.process_time()
        neighbours, found = nearest_chips(embedding, chip, n_chips, N_NEIGHBOURS,
                                          n_candidates=args.candidates)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        truth = np.load(args.truth)
        hits = [np.intersect1d(truth[i], neighbours[q]).size for i, q in enumerate(queries)]
        truth_values = np.load(str(args.truth).replace(".npy", "_values.npy"))
        # How much similarity the pruned lists lose: mean over the query chips of the mean
        # similarity of the true 15 nearest minus that of the 15 found (0 when identical).
        deficit = float(np.mean(truth_values.mean(axis=1) - found[queries].mean(axis=1)))
        first = [int(truth[i, 0] == neighbours[q, 0]) for i, q in enumerate(queries)]
        row.update({"mode": "pruned", "n_candidates": args.candidates,
                    "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                    "extrapolated": False,
                    "recall_at_15": round(float(np.sum(hits)) / truth.size, 4),
                    "nearest_kept": round(float(np.mean(first)), 4),
                    "similarity_deficit": round(deficit, 5),
                    "recall_query_chips": int(queries.size)})
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chips", type=int, default=441)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 30, 50])
    parser.add_argument("--exact-queries", type=int, default=40)
    parser.add_argument("--source", choices=["synthetic", "s2", "both"], default="both")
    parser.add_argument("--no-log", action="store_true", help="do not append to results.jsonl")
    # internal: one configuration in this process
    parser.add_argument("--mode", choices=["exact", "pruned"], help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:
        if isinstance(args.candidates, list):
            args.candidates = args.candidates[0]
        print(json.dumps(one_run(args)))
        return 0

    import torch

    torch.set_num_threads(1)
    sources = ["synthetic", "s2"] if args.source == "both" else [args.source]
    if "s2" in sources and not (DATA / "s2_aberystwyth" / "cube.tif").exists():
        print("no s2_aberystwyth data; skipping the s2 source")
        sources.remove("s2")
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"),
             "command": "python -m bench.chip_matching " + " ".join(argv or sys.argv[1:]),
             "machine": machine()}
    rows = []
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    for source in sources:
        truth = out / f"chip_truth_{source}.npy"
        common = [sys.executable, "-m", "bench.chip_matching", "--source", source,
                  "--chips", str(args.chips), "--segments", str(args.segments),
                  "--dim", str(args.dim), "--exact-queries", str(args.exact_queries),
                  "--truth", str(truth)]
        configs = [["--mode", "exact"]] + [["--mode", "pruned", "--candidates", str(c)]
                                           for c in args.candidates]
        for config in configs:
            done = subprocess.run(common + config, cwd=REPO, capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            row = {**json.loads(done.stdout.strip().splitlines()[-1]), **stamp}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_log:
        with open(REPO / "bench" / "results.jsonl", "a") as log:
            for row in rows:
                log.write(json.dumps(row) + "\n")
    print()
    print("| source | chips x segments | mode | n_candidates | CPU seconds | wall seconds | "
          "recall@15 | "
          "nearest kept | similarity deficit | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cpu = f"{row['cpu_seconds']}" + (" (extrapolated)" if row["extrapolated"] else "")
        wall = row.get("seconds", "—")
        print(f"| {row['source']} | {row['chips']} x {row['segments'] // row['chips']} | "
              f"{row['mode']} | {row.get('n_candidates', 'all')} | {cpu} | {wall} | "
              f"{row.get('recall_at_15', 1.0)} | {row.get('nearest_kept', 1.0)} | "
              f"{row.get('similarity_deficit', 0.0)} | "
              f"{row['peak_rss_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
