# HSI Cluster: build, test and install the QGIS plugin.
#
#   make demo      installs everything (Debian 12, as root), installs the plugin, runs the demo
#   make test      installs everything, runs the whole test suite (the single test entry point)
#
# `setup` is idempotent: Debian packages only when QGIS/Xvfb/venv support are missing, the venv
# only when requirements*.txt or constraints.txt changed since the last install (.stamp-venv).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV          := .venv
PY            := $(VENV)/bin/python
SYS_PYTHON    := /usr/bin/python3
QGIS_PROCESS  := /usr/bin/qgis_process.bin
APT_PACKAGES  := qgis python3-qgis qgis-providers xvfb xauth python3-venv
# Files whose presence means the Debian packages above are installed.
APT_SENTINELS := $(QGIS_PROCESS) /usr/lib/python3/dist-packages/qgis/core/__init__.py \
                 /usr/bin/Xvfb /usr/bin/xauth
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

PYTEST_ARGS  ?=
BENCH_ARGS   ?=
DEMO_ARGS    ?=
INSTALL_ARGS ?=

# Qt (QGIS) never needs a display here.
export QT_QPA_PLATFORM := offscreen

.PHONY: help setup system-deps test install package demo bench bench-clustering \
        bench-accuracy bench-memory bench-graph bench-dock bench-worker lint clean distclean

help:
	@echo "make demo       install everything, install the plugin, run scripts/demo.py"
	@echo "make test       install everything, run pytest (PYTEST_ARGS='-k ...')"
	@echo "make setup      Debian packages (QGIS, Xvfb) + .venv with requirements (idempotent)"
	@echo "make install    install the plugin into \$$HOME's default QGIS profile"
	@echo "                (INSTALL_ARGS='--link' to symlink, '--home DIR' for another HOME)"
	@echo "make package    build dist/hsi_cluster.zip (Install from ZIP in QGIS)"
	@echo "make bench      run every benchmark (bench-clustering BENCH_ARGS='...', bench-memory,"
	@echo "                bench-graph, bench-dock, bench-worker); results in bench/results.jsonl,"
	@echo "                RESULTS.md"
	@echo "make bench-accuracy  SCDSC and MS2A-Net (adaptive and paper settings) vs k-means,"
	@echo "                3 seeds, demo scene + ../shared/data -> bench/ACCURACY.md"
	@echo "make lint       ruff check"
	@echo "make clean      remove build/test outputs; 'make distclean' also removes .venv"

setup: system-deps .stamp-venv

system-deps:
	@missing=0; \
	for f in $(APT_SENTINELS); do [ -e "$$f" ] || missing=1; done; \
	$(SYS_PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing=1; \
	if [ "$$missing" = 0 ]; then \
	  echo "setup: Debian packages present (QGIS, Xvfb, python3-venv)"; \
	else \
	  echo "setup: installing Debian packages: $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    $(APT_PACKAGES); \
	fi

# The venv sees the system site-packages (PyQGIS from Debian). torch must come as exactly
# torch==2.13.0 (requirements.txt pins it), the CPU wheel that lies on this machine's disk.
.stamp-venv: requirements.txt requirements-dev.txt constraints.txt | system-deps
	@if [ -x $(PY) ] && grep -qs '^include-system-site-packages = true' $(VENV)/pyvenv.cfg; then \
	  echo "setup: reusing $(VENV)"; \
	else \
	  echo "setup: creating $(VENV)"; \
	  $(SYS_PYTHON) -m venv --clear --system-site-packages $(VENV); \
	fi
	$(PY) -m pip install -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -c 'import torch, numpy, sklearn, rasterio, qgis.core; print("setup: venv ok, torch", torch.__version__, "numpy", numpy.__version__)'
	@touch $@

test: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q tests $(PYTEST_ARGS)

install: setup
	$(PY) scripts/install_plugin.py $(INSTALL_ARGS)

package:
	python3 scripts/package_plugin.py

demo: setup install
	QT_QPA_PLATFORM=offscreen $(PY) scripts/demo.py $(DEMO_ARGS)

# Every benchmark appends to bench/results.jsonl; bench/RESULTS.md summarises them all.
bench: bench-clustering bench-memory bench-graph bench-dock bench-worker
	$(PY) -m bench.run_all --report-only > /dev/null

bench-clustering: setup
	$(PY) -m bench.run_all $(BENCH_ARGS)
	$(PY) -m bench.spatial_context

# Both deep methods in both settings against k-means on the standardised spectra, 3 seeds, on the
# demo scene and ../shared/data; e.g. BENCH_ARGS='--settings adaptive --scenes demo'.
bench-accuracy: setup
	$(PY) -m bench.accuracy $(BENCH_ARGS)

bench-memory: setup
	$(PY) -m bench.ms2anet_memory

bench-graph: setup
	$(PY) -m bench.graph_pipeline
	$(PY) -m bench.chip_matching --exact-queries 12 --candidates 20 30
	$(PY) -m bench.graph_quality

bench-dock: setup
	$(PY) -m bench.dock_bench

bench-worker: setup
	$(PY) -m bench.worker_overhead

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf dist build .pytest_cache .ruff_cache demo_out bench/out
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .stamp-*
