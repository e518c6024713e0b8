"""A process that is not a well-behaved worker, to test how the QGIS client copes.

``python -m tests.fake_worker JOB [--stdin-control] --mode MODE``: ``garbage`` prints a line
that is no event onto the protocol channel, ``silent`` exits 0 without any event,
``exit3`` reports progress and exits with code 3 without an error event.
"""

from __future__ import annotations

import argparse
import json
import sys

parser = argparse.ArgumentParser()
parser.add_argument("job")
parser.add_argument("--stdin-control", action="store_true")
parser.add_argument("--mode", required=True)
args = parser.parse_args()

if args.mode == "garbage":
    print(json.dumps({"event": "progress", "fraction": 0.1, "stage": "fake"}), flush=True)
    print("Loading weights... 100%|██████████| this is no event", flush=True)
    sys.exit(0)
if args.mode == "silent":
    sys.exit(0)
if args.mode == "exit3":
    print(json.dumps({"event": "progress", "fraction": 0.5, "stage": "fake"}), flush=True)
    sys.exit(3)
raise SystemExit(f"unknown mode {args.mode}")
