"""``make bench-accuracy``: both deep methods in both settings against k-means, on every scene.

    python -m bench.accuracy [--scenes demo jasper_ridge enmap_potsdam s2_aberystwyth]
                             [--methods scdsc ms2anet kmeans_raw] [--settings adaptive paper]
                             [--seeds 0 1 2] [--jobs 2] [--report-only]

Every (scene, method, setting, seed) runs ``python -m bench.run_one`` in its own process with one
torch thread (``--jobs`` of them at a time; the machine this was written on has 2 cores), and
the deep methods get ``--settings '{"setting": S}'``; k-means on the standardised spectra
(``kmeans_raw``, n_init 10) has no setting. Each run's JSON line is appended to
bench/results.jsonl with ``"suite": "accuracy"``, the date, the machine and the command; the
table in bench/ACCURACY.md is rebuilt from all such lines (the latest run of each scene, method,
setting and seed), with OA, NMI and kappa on the labelled pixels (mean ± std over seeds),
seconds (wall, reading + clustering) and each method's NMI minus k-means' on the same scene.
``demo`` is the project's synthetic scene (``engine.demo_scene`` defaults), the others are the
scenes of ../shared/data (skipped when absent).

A run that fails (for example a method that does not know a setting yet) is reported with its
command and error and leaves no line; the others go on, and the exit code is 1.

``--adopt-paper-scdsc`` copies SCDSC's full runs of 2026-12-03 made before the settings existed
(``"settings": {}``, the code that is now the paper setting) into the suite as
``scdsc (paper)`` rows, marked ``"adopted_from"`` with their date and command, instead of
re-running them (s2_aberystwyth costs 11 minutes a run alone). Only valid while the paper
setting reproduces those runs: check one (``python -m bench.run_one --scene jasper_ridge
--method scdsc --seed 0 --settings '{"setting": "paper"}'`` gave NMI 0.4674 then).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.run_all import DATA, machine  # noqa: E402

SCENES = ["demo", "jasper_ridge", "enmap_potsdam", "s2_aberystwyth"]
METHODS = ["scdsc", "ms2anet", "kmeans_raw"]
SETTINGS = ["adaptive", "paper"]
BASELINE = "kmeans_raw"
# Rough cost order (slowest first), so two parallel jobs finish close together.
COST = {"s2_aberystwyth": 3, "enmap_potsdam": 2, "jasper_ridge": 1, "demo": 0}
RESULTS = HERE / "results.jsonl"
TABLE = HERE / "ACCURACY.md"


def planned_runs(scenes, methods, settings, seeds) -> list[dict]:
    runs = []
    for scene in scenes:
        for method in methods:
            for setting in ([None] if method.startswith("kmeans") else settings):
                for seed in seeds:
                    runs.append({"scene": scene, "method": method, "setting": setting,
                                 "seed": seed})
    deep_first = sorted(runs, key=lambda r: (-COST.get(r["scene"], 0),
                                             r["method"].startswith("kmeans")))
    return deep_first


def command_of(run: dict) -> list[str]:
    command = [sys.executable, "-m", "bench.run_one", "--scene", run["scene"], "--method",
               run["method"], "--seed", str(run["seed"])]
    if run["setting"]:
        command += ["--settings", json.dumps({"setting": run["setting"]})]
    return command


def execute(run: dict) -> dict | None:
    command = command_of(run)
    shown = " ".join(command[1:])
    env = dict(os.environ, BENCH_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                               check=False)
    if completed.returncode != 0:
        error = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"FAILED: python {shown}\n   {error}", flush=True)
        return None
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"python {shown}\n   NMI {row['nmi']:.4f} OA {row['oa']:.4f} "
          f"kappa {row['kappa']:.4f} {row['seconds']:.0f} s", flush=True)
    return {**row, "setting": run["setting"], "suite": "accuracy", "command": "python " + shown}


PRE_SETTING_DAY = "2026-12-03"


def adopt_paper_scdsc_rows() -> int:
    """Append SCDSC full-scene runs made on PRE_SETTING_DAY without settings as paper rows."""
    lines = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    adopted = {(r["scene"], r["seed"]) for r in lines
               if r.get("suite") == "accuracy" and r.get("method") == "scdsc"
               and r.get("setting") == "paper"}
    new = []
    for row in lines:
        if (row.get("method") == "scdsc" and row.get("settings") == {} and "[" not in row["scene"]
                and not row.get("superseded") and not row.get("suite")
                and row.get("date", "").startswith(PRE_SETTING_DAY)
                and (row["scene"], row["seed"]) not in adopted):
            new.append({**row, "setting": "paper", "suite": "accuracy",
                        "adopted_from": f"{row.get('date')}: {row.get('command')}"})
    with open(RESULTS, "a") as log:
        for row in new:
            log.write(json.dumps(row) + "\n")
    return len(new)


def label(row: dict) -> str:
    return row["method"] + (f" ({row['setting']})" if row.get("setting") else "")


def accuracy_rows() -> list[dict]:
    """Latest run of each (scene, method, setting, seed) of the suite or with a setting."""
    if not RESULTS.exists():
        return []
    latest: dict[tuple, dict] = {}
    for line in RESULTS.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        # Also full-scene runs of other commands that record their setting (e.g. MS2A-Net runs
        # of `python -m bench.run_all`, whose run_one writes "setting").
        recorded_setting = row.get("setting") in SETTINGS and "[" not in row.get("scene", "[")
        if row.get("superseded") or not (row.get("suite") == "accuracy" or recorded_setting):
            continue
        latest[(row["scene"], row["method"], row.get("setting"), row["seed"])] = row
    return list(latest.values())


def table(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["scene"], label(row))].append(row)
    baseline_nmi = {scene: float(np.mean([r["nmi"] for r in group]))
                    for (scene, name), group in groups.items() if name == BASELINE}
    order = {scene: index for index, scene in enumerate(SCENES)}
    lines = ["| scene | method (setting) | seeds | OA | NMI | kappa | NMI − k-means | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for (scene, name), group in sorted(groups.items(),
                                       key=lambda item: (order.get(item[0][0], 99), item[0][1])):
        def stat(key, group=group):
            values = np.array([g[key] for g in group], dtype=float)
            return f"{values.mean():.3f} ± {values.std():.3f}"

        nmi = float(np.mean([g["nmi"] for g in group]))
        delta = (f"{nmi - baseline_nmi[scene]:+.3f}" if scene in baseline_nmi
                 and name != BASELINE else "")
        seeds = ",".join(str(g["seed"]) for g in sorted(group, key=lambda g: g["seed"]))
        seconds = float(np.mean([g["seconds"] for g in group]))
        lines.append(f"| {scene} | {name} | {seeds} | {stat('oa')} | {stat('nmi')} | "
                     f"{stat('kappa')} | {delta} | {seconds:.0f} |")
    return lines


def write_table(output: Path = TABLE) -> None:
    rows = accuracy_rows()
    dates = sorted({row.get("date", "?")[:10] for row in rows})
    # Rows adopted from runs made before the suite existed carry no machine: leave them out.
    machines = sorted({row["machine"] for row in rows if row.get("machine")}) or ["?"]
    report = [
        "# Accuracy: SCDSC and MS2A-Net in both settings against k-means", "",
        "Written by `make bench-accuracy` (`python -m bench.accuracy`) from the lines of "
        "`bench/results.jsonl` with `\"suite\": \"accuracy\"` (latest run per scene, method, "
        "setting and seed; each line holds its command).", "",
        f"- run dates: {', '.join(dates) or 'none yet'}",
        *[f"- machine: {m}" for m in machines],
        "- OA and kappa after Hungarian matching, NMI, on labelled pixels; every valid pixel "
        "is clustered. Mean ± std over the seeds listed. `kmeans_raw`: k-means (n_init 10) on "
        "the standardised spectra. Seconds: wall time of the run (reading + clustering), one "
        "torch thread, up to two runs at a time on a shared 2-core machine. Rows with "
        "`adopted_from` in results.jsonl are SCDSC runs of the code that is now the paper "
        "setting, made before the setting existed (`--adopt-paper-scdsc`).", "",
        *table(rows), "",
    ]
    output.write_text("\n".join(report))
    print("\n".join(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=SCENES)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--settings", nargs="+", default=SETTINGS,
                        help="settings of the deep methods (passed as {\"setting\": S})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild bench/ACCURACY.md from results.jsonl")
    parser.add_argument("--adopt-paper-scdsc", action="store_true",
                        help="copy SCDSC's pre-setting runs of 2026-12-03 as paper rows")
    args = parser.parse_args(argv)
    if args.adopt_paper_scdsc:
        print(f"adopted {adopt_paper_scdsc_rows()} paper-setting SCDSC runs")
    if args.report_only or args.adopt_paper_scdsc:
        write_table()
        return 0
    scenes = [s for s in args.scenes if s == "demo" or (DATA / s / "cube.tif").exists()]
    for missing in sorted(set(args.scenes) - set(scenes)):
        print(f"skipping {missing}: no {DATA / missing / 'cube.tif'}")
    stamp = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
             "suite_command": "python -m bench.accuracy " + " ".join(argv or [])}
    runs = planned_runs(scenes, args.methods, args.settings, args.seeds)
    failures = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in as_completed([pool.submit(execute, run) for run in runs]):
            row = future.result()
            if row is None:
                failures += 1
                continue
            with open(RESULTS, "a") as log:  # appended as runs finish: a long suite keeps
                log.write(json.dumps({**row, **stamp}) + "\n")  # what it has done
    write_table()
    if failures:
        print(f"{failures} run(s) failed; see FAILED above", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
