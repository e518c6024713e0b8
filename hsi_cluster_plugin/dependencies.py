"""Checks for the plugin's Python dependencies (no QGIS import).

QGIS runs plugins in its own Python (Debian: the system ``python3``), which usually lacks torch
and friends. Two ways to provide them:

* ``make install`` from a source checkout writes ``python_path.txt`` into the installed plugin
  folder, naming the checkout's venv site-packages; :func:`add_configured_python_path` puts it on
  ``sys.path``. The environment variable ``HSI_CLUSTER_PYTHONPATH`` (``os.pathsep``-separated)
  does the same for any folder.
* ``pip install --user`` into QGIS's Python (see :func:`install_hint`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ENV_VAR = "HSI_CLUSTER_PYTHONPATH"
PYTHON_PATH_FILE = "python_path.txt"

# Import name -> pip requirement, in the order they are reported.
REQUIRED = {
    "torch": "torch==2.13.0",
    "numpy": "numpy<2",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "rasterio": "rasterio",
}

_HERE = os.path.dirname(os.path.abspath(__file__))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_dependencies() -> list[str]:
    """Import names of the required modules that cannot be imported, in a fixed order.

    Every module is looked up with ``find_spec`` (cheap); torch is also really imported, since
    an installed but broken torch (wrong Python, missing shared library) is a common failure.
    """
    importlib.invalidate_caches()
    missing = [name for name in REQUIRED if not _importable(name)]
    if "torch" not in missing:
        try:
            import torch  # noqa: F401
        except Exception:  # any failure (ImportError, OSError from a .so) means unusable
            missing.insert(0, "torch")
    return missing


def configured_python_paths(plugin_dir: str | None = None) -> list[str]:
    """Folders named by ``$HSI_CLUSTER_PYTHONPATH`` and by ``python_path.txt``, in that order.

    Only existing folders are returned, each once.
    """
    candidates = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    path_file = os.path.join(plugin_dir or _HERE, PYTHON_PATH_FILE)
    if os.path.isfile(path_file):
        with open(path_file, encoding="utf-8") as handle:
            candidates += [
                line.strip() for line in handle if line.strip() and not line.startswith("#")
            ]
    result: list[str] = []
    for candidate in candidates:
        folder = os.path.abspath(os.path.expanduser(candidate.strip()))
        if os.path.isdir(folder) and folder not in result:
            result.append(folder)
    return result


def add_configured_python_path(plugin_dir: str | None = None, prepend: bool = True) -> list[str]:
    """Put the configured folders on ``sys.path``; return the ones newly added.

    They are prepended by default: the venv holds versions that work together (e.g. a numpy that
    its scipy was built for), so they should win over older system copies not yet imported.
    """
    added: list[str] = []
    for folder in configured_python_paths(plugin_dir):
        if folder in sys.path:
            continue
        added.append(folder)
    if prepend:
        sys.path[0:0] = added
    else:
        sys.path.extend(added)
    if added:
        importlib.invalidate_caches()
    return added


def install_hint(missing: list[str] | None = None) -> str:
    """What the user should run to get the dependencies, as plain text."""
    if missing is None:
        missing = missing_dependencies()
    what = ", ".join(missing) if missing else "none"
    return (
        f"HSI Cluster needs Python packages that QGIS's Python cannot import (missing: {what}).\n"
        "Install them into the Python that runs QGIS (on Debian/Ubuntu: /usr/bin/python3):\n"
        "    python3 -m pip install --user torch==2.13.0 'numpy<2' scipy scikit-learn "
        "scikit-image rasterio 'affine<3'\n"
        "(add --break-system-packages on Debian 12 and newer). Keep numpy<2: QGIS's GDAL "
        "bindings are built against numpy 1.x; affine<3 keeps rasterio working.\n"
        "Or, from a source checkout of HSI Cluster, run `make install`: it builds a venv with "
        "everything and writes its site-packages path to python_path.txt in the plugin folder, "
        f"which the plugin adds to sys.path (the {ENV_VAR} environment variable works too).\n"
        "Then restart QGIS."
    )
