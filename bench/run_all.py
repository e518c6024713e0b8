"""``make bench``: every scene x method x seed in its own process; results to bench/RESULTS.md.

    python -m bench.run_all [--scenes ...] [--methods kmeans scdsc kmeans_raw ms2anet]
                            [--seeds 0 1 2] [--no-crop] [--settings JSON] [--report-only]

Each run's JSON line is appended to bench/results.jsonl; RESULTS.md is rewritten from all lines
of results.jsonl (runs may come in pieces) with the machine, the dates and the commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
SCENES = ["jasper_ridge", "enmap_potsdam", "s2_aberystwyth"]
# SCDSC against k-means on its PCA features (issue 2), MS2A-Net against k-means on the raw
# spectra (issue 3).
METHODS = ["kmeans", "scdsc", "kmeans_raw", "ms2anet"]
# The 110k-pixel crop of s2_aberystwyth for SCDSC's linear-scaling check (332 x 332 pixels).
CROPS = {"s2_aberystwyth": (332, 332)}
SCALING_METHODS = {"scdsc"}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()} · {cpu} · {os.cpu_count()} cores · {memory:.0f} GiB RAM · "
            f"Python {platform.python_version()}")


def run(scene: str, method: str, seed: int, crop=None, settings: str = "{}") -> dict:
    command = [sys.executable, "-m", "bench.run_one", "--scene", scene, "--method", method,
               "--seed", str(seed), "--settings", settings]
    if crop:
        command += ["--crop", str(crop[0]), str(crop[1])]
    print("$", " ".join(command[1:]), flush=True)
    completed = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"benchmark run failed: {' '.join(command)}")
    line = completed.stdout.strip().splitlines()[-1]
    print("  ", line, flush=True)
    return json.loads(line)


def summarise(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        # Runs with non-default estimator settings are a method of their own in the table.
        settings = row.get("settings") or {}
        label = row["method"] + (f" {json.dumps(settings, sort_keys=True)}" if settings else "")
        groups[(row["scene"], label)].append(row)
    lines = ["| scene | method | pixels clustered | scored | seeds | OA | NMI | kappa | "
             "seconds | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (scene, method), group in sorted(groups.items()):
        def stat(name, group=group):
            values = np.array([g[name] for g in group], dtype=float)
            return f"{values.mean():.4f} ± {values.std():.4f}"
        seconds = np.array([g["seconds"] for g in group])
        lines.append(
            f"| {scene} | {method} | {group[0]['pixels']} | {group[0]['scored']} | "
            f"{len(group)} | {stat('oa')} | {stat('nmi')} | {stat('kappa')} | "
            f"{seconds.mean():.1f} | {max(g['peak_rss_mb'] for g in group)} |"
        )
    return lines


def other_benchmarks(rows: list[dict]) -> list[str]:
    """Runs without clustering scores (pipeline timings, matching, memory): one line each."""
    if not rows:
        return []
    lines = ["Other benchmarks (timings and memory; see each script's docstring):", "",
             "| date | benchmark | scene | seconds | peak RSS MB | details |",
             "|---|---|---|---|---|---|"]
    skip = {"date", "command", "machine", "scene", "method", "bench", "seconds", "peak_rss_mb",
            "oa", "nmi", "kappa", "scored", "pixels"}
    for row in rows:
        details = ", ".join(f"{key} {value}" for key, value in row.items()
                            if key not in skip and not isinstance(value, (dict, list)))
        settings = row.get("settings") if isinstance(row.get("settings"), dict) else {}
        if settings.get("gnn") and "gnn" not in row:  # pipeline runs keep the GNN in settings
            details = f"gnn {settings['gnn']}, {details}"
        if " · " in row.get("machine", ""):  # the processor: timings differ between machines
            details = f"{row['machine'].split(' · ')[1]}, {details}"
        lines.append(f"| {row.get('date', '?')[:10]} | {row.get('bench') or row.get('method')} | "
                     f"{row.get('scene', '')} | {row.get('seconds', '')} | "
                     f"{row.get('peak_rss_mb', '')} | {details[:300]} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", nargs="+", default=SCENES)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-crop", action="store_true", help="skip the linear-scaling crop")
    parser.add_argument("--settings", default="{}", help="JSON passed to the estimators")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite RESULTS.md from results.jsonl")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(Path(args.output))
        return 0
    if not DATA.is_dir():
        print(f"no benchmark data at {DATA}; nothing to do")
        return 0

    rows: list[dict] = []
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"),
             "command": "python -m bench.run_all " + " ".join(argv or [])}
    for scene in args.scenes:
        for method in args.methods:
            for seed in args.seeds:
                rows.append(run(scene, method, seed, settings=args.settings))
            if scene in CROPS and not args.no_crop and method in SCALING_METHODS:
                rows.append(run(scene, method, args.seeds[0], CROPS[scene], args.settings))
    with open(HERE / "results.jsonl", "a") as log:
        for row in rows:
            log.write(json.dumps({**row, **stamp}) + "\n")
    write_report(Path(args.output))
    return 0


def write_report(output: Path) -> None:
    """RESULTS.md summarises every run recorded in results.jsonl (runs may come in pieces)."""
    recorded = [json.loads(line) for line in (HERE / "results.jsonl").read_text().splitlines()
                if line.strip()]
    # A run re-done with later code is marked "superseded" (with the date of the re-run): it
    # stays in results.jsonl as history but leaves the table.
    rows = [row for row in recorded if not row.get("superseded")]
    superseded = len(recorded) - len(rows)
    commands = sorted({(row.get("date", "?")[:10], row.get("command", "?")) for row in rows})

    report = [
        "# Benchmark results", "",
        f"- report written: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        "- commands (date, command; `make bench BENCH_ARGS='...'` runs the same):",
        *[f"  - {date}: `{command}`" for date, command in commands],
        "- OA / NMI / kappa on labelled pixels only; every valid pixel is clustered. OA and "
        "kappa after Hungarian matching. Seconds = reading + clustering, one process per run; "
        "peak RSS = that process's maximum resident set."
        + (f" {superseded} older runs re-done with later code are left out (marked "
           "`superseded` in results.jsonl)." if superseded else ""), "",
        *summarise([row for row in rows if row.get("oa") is not None]), "",
        *other_benchmarks([row for row in rows if row.get("oa") is None]),
        "Per-run lines are in `bench/results.jsonl`.", "",
    ]
    output.write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
