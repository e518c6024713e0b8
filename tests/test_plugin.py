"""The QGIS plugin package, its installer and zip, and loading it in real QGIS (no mocks)."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import (
    PROVIDER_FILE,
    PROVIDER_ID,
    QGIS_PROCESS,
    REPO_ROOT,
    register_hsi_provider,
    venv_site_packages,
)

INSTALL = REPO_ROOT / "scripts" / "install_plugin.py"
PACKAGE = REPO_ROOT / "scripts" / "package_plugin.py"
PLUGIN_REL = Path(".local/share/QGIS/QGIS3/profiles/default/python/plugins/hsi_cluster")
INI_REL = Path(".local/share/QGIS/QGIS3/profiles/default/QGIS/QGIS3.ini")
SYSTEM_PYTHON = "/usr/bin/python3"  # the Python QGIS itself runs: no torch there

needs_provider = pytest.mark.skipif(
    not PROVIDER_FILE.exists(),
    reason="processing_provider/provider.py does not exist yet (the lead is writing it)",
)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], check=True, capture_output=True, text=True, timeout=120
    )


def _read_metadata(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # QGIS metadata keys are camelCase
    parser.read_string(text)
    return parser["general"]


# -- the plugin package -------------------------------------------------------------------------


def test_class_factory_without_iface():
    import hsi_cluster_plugin
    from hsi_cluster_plugin.plugin import HSIClusterPlugin

    plugin = hsi_cluster_plugin.classFactory(None)
    assert isinstance(plugin, HSIClusterPlugin)
    assert plugin.iface is None
    assert plugin.provider is None
    # The package made the engine importable as a top-level package.
    import engine.monitor

    assert Path(engine.monitor.__file__).resolve().is_relative_to(REPO_ROOT)


def test_missing_dependencies_empty_in_venv():
    from hsi_cluster_plugin.dependencies import missing_dependencies

    assert missing_dependencies() == []


def test_install_hint_names_the_constraints():
    from hsi_cluster_plugin.dependencies import install_hint

    hint = install_hint(["torch"])
    assert "torch==2.13.0" in hint
    assert "numpy<2" in hint
    assert "affine<3" in hint
    assert "make install" in hint


def test_add_configured_python_path(tmp_path, monkeypatch):
    from hsi_cluster_plugin.dependencies import ENV_VAR, add_configured_python_path

    from_env = tmp_path / "from_env"
    from_file = tmp_path / "from_file"
    for folder, module in ((from_env, "hsi_dep_env_probe"), (from_file, "hsi_dep_file_probe")):
        folder.mkdir()
        (folder / f"{module}.py").write_text("VALUE = 42\n")
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "python_path.txt").write_text(f"{from_file}\n{tmp_path / 'does_not_exist'}\n")
    monkeypatch.setenv(ENV_VAR, str(from_env))
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test

    added = add_configured_python_path(str(plugin_dir))
    assert added == [str(from_env), str(from_file)]
    assert sys.path[:2] == added
    assert add_configured_python_path(str(plugin_dir)) == []  # only once
    import hsi_dep_env_probe
    import hsi_dep_file_probe

    assert hsi_dep_env_probe.VALUE == hsi_dep_file_probe.VALUE == 42
    sys.modules.pop("hsi_dep_env_probe")
    sys.modules.pop("hsi_dep_file_probe")


# -- Processing registration in a real QgsApplication -------------------------------------------


@needs_provider
def test_init_processing_registers_provider_and_unload_removes_it(qgis_app):
    from qgis.core import QgsApplication

    import hsi_cluster_plugin

    registry = QgsApplication.processingRegistry()
    # The session fixture registered its own provider; take it out so the plugin can add one.
    if registry.providerById(PROVIDER_ID) is not None:
        assert registry.removeProvider(PROVIDER_ID)
    try:
        plugin = hsi_cluster_plugin.classFactory(None)
        plugin.initProcessing()
        provider = registry.providerById(PROVIDER_ID)
        assert provider is not None, "initProcessing() registered no 'hsicluster' provider"
        assert plugin.provider is not None and plugin.provider.id() == PROVIDER_ID
        assert len(provider.algorithms()) > 0
        assert all(a.id().startswith(f"{PROVIDER_ID}:") for a in provider.algorithms())

        plugin.initProcessing()  # a second call keeps the one provider
        assert [p.id() for p in registry.providers()].count(PROVIDER_ID) == 1

        plugin.unload()
        assert registry.providerById(PROVIDER_ID) is None
        assert plugin.provider is None
        plugin.unload()  # safe twice
    finally:
        register_hsi_provider()  # restore the session's provider for other tests
    assert registry.providerById(PROVIDER_ID) is not None


# -- install script -----------------------------------------------------------------------------


def test_install_plugin_layout_and_ini(tmp_path):
    ini = tmp_path / INI_REL
    ini.parent.mkdir(parents=True)
    ini.write_text(
        textwrap.dedent(
            """\
            [General]
            SomeUnrelatedKey=keep me

            [PythonPlugins]
            OtherPlugin=true
            hsi_cluster=false

            [qgis]
            symbolsListGroupsIndex=0
            """
        )
    )
    _script(INSTALL, "--home", tmp_path)
    _script(INSTALL, "--home", tmp_path)  # reinstalling is harmless

    plugin_dir = tmp_path / PLUGIN_REL
    for rel in (
        "__init__.py",
        "plugin.py",
        "dependencies.py",
        "metadata.txt",
        "icon.svg",
        "engine/monitor.py",
        "processing_provider",
        "python_path.txt",
    ):
        assert (plugin_dir / rel).exists(), rel
    assert not list(plugin_dir.rglob("__pycache__"))
    assert not any(p.is_symlink() for p in plugin_dir.rglob("*"))
    assert (plugin_dir / "metadata.txt").read_text() == (REPO_ROOT / "metadata.txt").read_text()
    python_path = (plugin_dir / "python_path.txt").read_text().split()
    assert python_path == [str(venv_site_packages().resolve())]

    lines = ini.read_text().splitlines()
    assert "SomeUnrelatedKey=keep me" in lines
    assert "symbolsListGroupsIndex=0" in lines
    section = lines[lines.index("[PythonPlugins]") + 1 : lines.index("[qgis]")]
    assert "OtherPlugin=true" in section  # case kept
    assert [line for line in section if line.startswith("hsi_cluster")] == ["hsi_cluster=true"]


def test_install_plugin_creates_ini_and_links(tmp_path):
    _script(INSTALL, "--home", tmp_path, "--link", "--no-python-path")
    plugin_dir = tmp_path / PLUGIN_REL
    assert (plugin_dir / "engine").is_symlink()
    assert (plugin_dir / "engine").resolve() == REPO_ROOT / "engine"
    assert (plugin_dir / "plugin.py").resolve() == REPO_ROOT / "hsi_cluster_plugin" / "plugin.py"
    assert not (plugin_dir / "python_path.txt").exists()
    assert (tmp_path / INI_REL).read_text() == "[PythonPlugins]\nhsi_cluster=true\n"

    # Copy mode over a linked install replaces the links and leaves the sources alone.
    _script(INSTALL, "--home", tmp_path)
    assert not (plugin_dir / "engine").is_symlink()
    assert (REPO_ROOT / "engine" / "monitor.py").is_file()


# -- package script -----------------------------------------------------------------------------


def test_package_zip_layout_and_import(tmp_path):
    out = tmp_path / "hsi_cluster.zip"
    _script(PACKAGE, "--output", out)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        metadata = _read_metadata(zf.read("hsi_cluster/metadata.txt").decode("utf-8"))
        zf.extractall(tmp_path / "unzipped")

    assert {name.split("/", 1)[0] for name in names} == {"hsi_cluster"}
    for rel in ("__init__.py", "plugin.py", "dependencies.py", "icon.svg", "engine/monitor.py"):
        assert f"hsi_cluster/{rel}" in names, rel
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "hsi_cluster/python_path.txt" not in names
    assert metadata["hasProcessingProvider"] == "yes"
    assert metadata["name"] == "HSI Cluster"
    assert metadata["qgisMinimumVersion"] == "3.22"
    assert metadata["icon"] == "icon.svg"

    # The unzipped plugin, imported on its own, makes its bundled engine a top-level package.
    code = "import sys; sys.path.insert(0, sys.argv[1]); exec(sys.argv[2])"
    probe = (
        "import hsi_cluster, engine.monitor\n"
        "print(engine.monitor.__file__)\n"
        "print(type(hsi_cluster.classFactory(None)).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "unzipped"), probe],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    engine_file, class_name = proc.stdout.split()
    assert Path(engine_file).is_relative_to(tmp_path / "unzipped" / "hsi_cluster")
    assert class_name == "HSIClusterPlugin"


# -- qgis_process.bin ---------------------------------------------------------------------------


@needs_provider
def test_qgis_process_lists_provider(run_qgis_process):
    proc = run_qgis_process(["list"])
    assert f"{PROVIDER_ID}:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@needs_provider
def test_qgis_process_finds_dependencies_through_python_path_txt(qgis_home):
    """Without PYTHONPATH, QGIS's own Python lacks torch: the plugin must fall back on the venv
    named in python_path.txt (what `make install` sets up for desktop QGIS)."""
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import torch"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} imports torch by itself: the fallback is not exercised")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HSI_CLUSTER_PYTHONPATH")}
    env.update(HOME=str(qgis_home), QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run(
        [QGIS_PROCESS, "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{PROVIDER_ID}:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_plugin_without_dependencies_loads_and_registers_nothing(tmp_path):
    """In QGIS's own Python with no fallback path, the plugin must neither raise nor register a
    provider, and must log how to install the dependencies."""
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import torch"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} imports torch by itself: nothing is missing there")
    plugins_dir = tmp_path / "plugins"
    plugins_dir.mkdir()
    _script(INSTALL, "--home", tmp_path / "home", "--no-python-path")
    (plugins_dir / "hsi_cluster").symlink_to(tmp_path / "home" / PLUGIN_REL)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(plugins_dir)!r})
        from qgis.core import QgsApplication
        QgsApplication.setPrefixPath("/usr", True)
        app = QgsApplication([], False)
        app.initQgis()
        messages = []
        QgsApplication.messageLog().messageReceived.connect(
            lambda msg, tag, level: messages.append((tag, msg)))
        import hsi_cluster
        plugin = hsi_cluster.classFactory(None)
        plugin.initProcessing()
        plugin.initGui()
        print("MISSING", ",".join(plugin.missing))
        print("PROVIDER", QgsApplication.processingRegistry().providerById("hsicluster"))
        print("LOGGED", any(tag == "HSI Cluster" and "torch==2.13.0" in msg
                            for tag, msg in messages))
        plugin.unload()
        print("DONE")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HSI_CLUSTER_PYTHONPATH")}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "torch" in out["MISSING"].split(",")
    assert out["PROVIDER"] == "None"
    assert out["LOGGED"] == "True"
    assert "DONE" in proc.stdout
