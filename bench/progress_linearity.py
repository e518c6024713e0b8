"""How linear in time SCDSC's progress bar is (issue 12): one run with default settings, the
progress reported at each moment against the share of the run's time elapsed.

    python -m bench.progress_linearity RASTER [--threads 1]

Prints one JSON line: the run's seconds, the largest |progress - elapsed share| and the progress
shown at 10/25/50/75 % of the run's time. A straight bar has deviation 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raster")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clusters", type=int, default=5)
    args = parser.parse_args()

    import torch

    from engine.monitor import Monitor
    from engine.raster_io import read_raster
    from engine.scdsc import SCDSC

    torch.set_num_threads(args.threads)
    raster = read_raster(args.raster)
    trace: list[tuple[float, float]] = []
    start = time.perf_counter()
    monitor = Monitor(on_progress=lambda f: trace.append((time.perf_counter() - start, f)))
    SCDSC(n_clusters=args.clusters, seed=0).fit(raster.cube, raster.valid, monitor)
    total = time.perf_counter() - start
    deviation = max(abs(fraction - elapsed / total) for elapsed, fraction in trace)
    at = {share: next(f for t, f in trace if t >= share * total) for share in (0.1, 0.25, 0.5,
                                                                              0.75)}
    print(json.dumps({
        "raster": args.raster, "pixels": int(raster.valid.sum()), "seconds": round(total, 1),
        "max_deviation": round(deviation, 3),
        "progress_at_time_share": {str(k): round(v, 3) for k, v in at.items()},
        "machine": platform.processor() or platform.machine(),
        "date": datetime.now().isoformat(timespec="seconds"),
    }))


if __name__ == "__main__":
    main()
