"""Cancel latency of the two stages that used to ignore a cancel for seconds (issue 17.9), at
realistic sizes: SCDSC's k-means initialisation on 20,000 sampled latent codes (32 channels x
7 x 7 = 1,568-d, the default ``init_sample``) and the labelling pipeline's segment UMAP of
16,831 x 64-d embeddings (the segment count of s2_aberystwyth) in a fresh process (numba import
and compilation included, as in a user's first run).

Each is cancelled ``--after`` seconds into the stage (the cancel flag is set then; the stage sees
it at its next check); the latency is the time from that moment to the stage raising
``Cancelled``. For the k-means stage the uninterruptible time of the code it
replaced (scikit-learn's ``KMeans(n_init=10)`` in one call) is measured too. The tests
(tests/test_bad_inputs.py) check every stage of every algorithm on tiny data; this is the
at-scale figure. Appends one JSON line to bench/results.jsonl.

    python -m bench.cancel_latency [--after 0.5] [--no-log]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_all import machine  # noqa: E402

STAGE_SCRIPT = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from engine.monitor import Cancelled, Monitor
after = {after}
stage = {stage!r}
rng = np.random.default_rng(0)
started = time.monotonic()
cancel_at = []
def cancelled():
    if time.monotonic() - started > after:
        cancel_at.append(time.monotonic())
        return True
    return False
monitor = Monitor(is_cancelled=cancelled)
if stage == "kmeans":
    from engine.kmeans import cancellable_kmeans
    codes = np.abs(rng.normal(size=(20_000, 1568))).astype(np.float32)
    codes[:7000] += 0.5
    started = time.monotonic()
    try:
        cancellable_kmeans(codes, 6, 10, 0, monitor)
    except Cancelled:
        pass
    latency = time.monotonic() - (started + after)  # from the moment cancel was pressed
    from sklearn.cluster import KMeans
    clock = time.monotonic()
    KMeans(6, n_init=10, random_state=0).fit(codes)
    before = time.monotonic() - clock
    print(json.dumps({{"latency_s": latency, "uninterruptible_before_s": before}}))
else:
    from engine.embedding_umap import segment_umap
    embedding = rng.normal(size=(16_831, 64)).astype(np.float32)
    started = time.monotonic()
    try:
        segment_umap(embedding, monitor=monitor)
    except Cancelled:
        pass
    print(json.dumps({{"latency_s": time.monotonic() - (started + after)}}))
"""


def measure(stage: str, after: float) -> dict:
    script = STAGE_SCRIPT.format(repo=str(REPO), after=after, stage=stage)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=0.5)
    parser.add_argument("--no-log", action="store_true")
    args = parser.parse_args(argv)
    kmeans = measure("kmeans", args.after)
    umap = measure("umap", args.after)
    row = {
        "bench": "cancel_latency",
        "kmeans_init_latency_s": round(kmeans["latency_s"], 2),
        "kmeans_init_uninterruptible_before_s": round(kmeans["uninterruptible_before_s"], 2),
        "segment_umap_latency_s": round(umap["latency_s"], 2),
        "cancel_after_s": args.after,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python -m bench.cancel_latency",
    }
    print(json.dumps(row))
    if not args.no_log:
        with open(REPO / "bench" / "results.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
