"""Shared pytest fixtures: a real QGIS application, a QGIS HOME with the plugin installed, and a
runner for ``qgis_process.bin``.

Run the suite with ``make test`` (it sets QT_QPA_PLATFORM=offscreen and uses the venv's Python,
which sees Debian's PyQGIS through ``--system-site-packages``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.install_plugin import (  # noqa: E402  (needs the repository on sys.path)
    venv_site_packages as installed_venv_site_packages,
)

# Qt must not look for a display; set before anything imports Qt.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

QGIS_PREFIX = "/usr"
QGIS_PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"  # holds the `processing` package
QGIS_PROCESS = "/usr/bin/qgis_process.bin"  # the binary itself, not the `qgis_process` wrapper
PROVIDER_ID = "hsicluster"
PROVIDER_FILE = REPO_ROOT / "processing_provider" / "provider.py"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
QGIS_PROCESS_TIMEOUT = 900  # seconds; `list` takes a few seconds, algorithm runs take longer

_KEEP_ALIVE: list = []  # Python providers registered by the tests (see register_hsi_provider)


def venv_site_packages() -> Path:
    """site-packages of the venv running the tests (else of the repository's .venv)."""
    found = installed_venv_site_packages()
    if found is None:
        raise RuntimeError("no venv: run the tests through `make test`")
    return found


def register_hsi_provider() -> bool:
    """Register a fresh HSIClusterProvider unless one is registered; False if there is no
    provider module yet. Import errors of an existing provider module are raised, not hidden."""
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    if registry.providerById(PROVIDER_ID) is not None:
        return True
    if not PROVIDER_FILE.exists():
        return False
    from processing_provider.provider import HSIClusterProvider

    provider = HSIClusterProvider()
    if not registry.addProvider(provider):
        raise RuntimeError(f"could not register the '{PROVIDER_ID}' Processing provider")
    # addProvider() does not take ownership from Python in QGIS 3.22: without a live Python
    # reference the provider's Python half is garbage-collected and the registry keeps a
    # provider whose id() is ''. Keep it alive for the whole session.
    _KEEP_ALIVE.append(provider)
    return True


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``shared_data`` when ../shared/data is absent."""
    if SHARED_DATA_DIR.is_dir():
        return
    skip = pytest.mark.skip(reason=f"shared data folder {SHARED_DATA_DIR} is absent")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qgis_app():
    """A headless QgsApplication with Processing initialised and the HSI Cluster provider
    registered (when processing_provider/provider.py exists). Started once per session."""
    from qgis.core import QgsApplication

    QgsApplication.setPrefixPath(QGIS_PREFIX, True)
    app = QgsApplication([], False)
    app.initQgis()

    if QGIS_PROCESSING_PLUGINS not in sys.path:
        sys.path.append(QGIS_PROCESSING_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    register_hsi_provider()

    yield app

    # exitQgis() was seen to exit cleanly here (also with a Python provider registered).
    app.exitQgis()


@pytest.fixture(scope="session")
def qgis_home(tmp_path_factory) -> Path:
    """A temporary HOME whose default QGIS profile has the plugin installed (copy mode) and
    enabled, with python_path.txt pointing at the venv's site-packages."""
    home = tmp_path_factory.mktemp("qgis_home")
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "install_plugin.py"),
            "--home",
            str(home),
            "--python-path",
            str(venv_site_packages()),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    runtime_dir = home / "xdg-runtime"
    runtime_dir.mkdir(mode=0o700)
    return home


@pytest.fixture(scope="session")
def run_qgis_process(qgis_home) -> Callable[..., subprocess.CompletedProcess]:
    """``run_qgis_process(args, check=True, timeout=QGIS_PROCESS_TIMEOUT)`` runs
    ``qgis_process.bin *args`` with HOME=qgis_home, QT_QPA_PLATFORM=offscreen and
    PYTHONPATH=<venv site-packages>, and returns the CompletedProcess (stdout/stderr as text).
    With ``check`` a non-zero exit fails the test, showing both streams."""
    if not Path(QGIS_PROCESS).exists():
        pytest.skip(f"{QGIS_PROCESS} is not installed (run `make setup`)")

    env = dict(os.environ)
    env.update(
        HOME=str(qgis_home),
        QT_QPA_PLATFORM="offscreen",
        XDG_RUNTIME_DIR=str(qgis_home / "xdg-runtime"),
        PYTHONPATH=os.pathsep.join(
            [str(venv_site_packages())] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )

    def run(
        args: list[str], check: bool = True, timeout: float = QGIS_PROCESS_TIMEOUT
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [QGIS_PROCESS, *[str(a) for a in args]],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"qgis_process.bin {' '.join(map(str, args))} exited with {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}",
                pytrace=False,
            )
        return proc

    return run


@pytest.fixture
def shared_data_dir() -> Path:
    """``<repo>/../shared/data``; the test is skipped when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA_DIR} is absent")
    return SHARED_DATA_DIR


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """A fresh output folder for one test."""
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for in-process training runs, restored afterwards: on 2 cores shared with
    other processes, torch's two threads oversubscribe and a small run gets several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
