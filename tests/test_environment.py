"""The engine environment: where the worker Python is, which Python the installer builds from
(each platform's layout, as a pure function over a fake file system), the pip plan, GPU
detection, removal, and the real installer end to end (a fresh venv from the system Python with
the project's requirement files), cancelled, and without network."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hsi_cluster_plugin import environment as env_mod
from hsi_cluster_plugin.environment import (
    FileSystemView,
    InstallCancelled,
    Installer,
    InstallError,
    InstallOptions,
    InstallPlan,
    base_python_candidates,
    find_worker_python,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeFileSystem:
    """Files given as full paths; folders are implied by them."""

    def __init__(self, files, sep: str = "/", texts: dict | None = None):
        self.sep = sep
        self.files = set(files) | set(texts or {})
        self.texts = dict(texts or {})

    def list_dir(self, folder: str) -> list:
        prefix = folder.rstrip(self.sep) + self.sep
        return sorted({f[len(prefix):].split(self.sep)[0] for f in self.files
                       if f.startswith(prefix)})

    def view(self) -> FileSystemView:
        return FileSystemView(is_file=self.files.__contains__, list_dir=self.list_dir,
                              read_text=self.texts.get)


def _paths(candidates) -> list:
    return [c.path for c in candidates]


# ------------------------------------------------------------------------------ base Python


def test_windows_layout_prefers_the_python_qgis_ships_then_python_org_then_path() -> None:
    qgis = r"C:\Program Files\QGIS 3.34.1"
    fs = FakeFileSystem([
        qgis + r"\apps\Python312\python3.exe",
        qgis + r"\apps\Python312\python.exe",
        qgis + r"\bin\qgis-bin.exe",
        r"C:\Users\ann\AppData\Local\Programs\Python\Python311\python.exe",
        r"C:\Program Files\Python313\python.exe",
        r"C:\Program Files\Python38\python.exe",  # too old
        r"C:\Users\ann\AppData\Local\Microsoft\WindowsApps\python.exe",  # Store stub
        r"C:\tools\py\python.exe",
    ], sep="\\")
    environ = {"LOCALAPPDATA": r"C:\Users\ann\AppData\Local",
               "ProgramFiles": r"C:\Program Files",
               "PATH": r"C:\Users\ann\AppData\Local\Microsoft\WindowsApps;C:\tools\py"}
    found = base_python_candidates("win32", environ, fs.view(), qgis + r"\apps\qgis",
                                   sys_executable=qgis + r"\bin\qgis-bin.exe")
    assert _paths(found) == [
        qgis + r"\apps\Python312\python3.exe",
        r"C:\Program Files\Python313\python.exe",
        r"C:\Users\ann\AppData\Local\Programs\Python\Python311\python.exe",
        r"C:\tools\py\python.exe",
    ]
    assert found[0].source == "the Python shipped with QGIS" and found[0].version == (3, 12)


def test_windows_qgis_322_python39_is_too_old_and_sys_executable_is_never_offered() -> None:
    qgis = r"C:\OSGeo4W"
    fs = FakeFileSystem([qgis + r"\apps\Python39\python3.exe",
                         r"C:\Program Files\Python311\python.exe"], sep="\\")
    found = base_python_candidates("win32", {"ProgramFiles": r"C:\Program Files"}, fs.view(),
                                   qgis + r"\apps\qgis-ltr")
    assert _paths(found) == [r"C:\Program Files\Python311\python.exe"]
    # sys.executable is excluded even when it looks like a Python (case-insensitive path).
    found = base_python_candidates("win32", {"ProgramFiles": r"C:\Program Files"}, fs.view(),
                                   "", sys_executable=r"c:\program files\python311\PYTHON.EXE")
    assert found == []


def test_qgis_sys_prefix_finds_its_python_whatever_the_install_layout() -> None:
    # Windows: QGIS's sys.prefix is its apps\Python3x folder (the prefix path may not say).
    fs = FakeFileSystem([r"D:\GIS\QGIS\apps\Python312\python.exe"], sep="\\")
    found = base_python_candidates("win32", {}, fs.view(), "",
                                   sys_executable=r"D:\GIS\QGIS\bin\qgis-bin.exe",
                                   sys_prefix=r"D:\GIS\QGIS\apps\Python312")
    assert _paths(found) == [r"D:\GIS\QGIS\apps\Python312\python.exe"]
    # macOS: the framework Python inside a QGIS.app installed outside /Applications.
    framework = "/Users/ann/Apps/QGIS.app/Contents/Frameworks/Python.framework/Versions/3.11"
    fs = FakeFileSystem([framework + "/bin/python3"])
    found = base_python_candidates("darwin", {}, fs.view(), "",
                                   sys_executable="/Users/ann/Apps/QGIS.app/Contents/MacOS/QGIS",
                                   sys_prefix=framework)
    assert _paths(found) == [framework + "/bin/python3"] and found[0].version == (3, 11)


def test_macos_layout_qgis_bundle_then_python_org_homebrew_and_command_line_tools() -> None:
    fs = FakeFileSystem([
        "/Applications/QGIS-LTR.app/Contents/MacOS/QGIS",
        "/Applications/QGIS-LTR.app/Contents/MacOS/bin/python3",
        "/Applications/QGIS.app/Contents/Frameworks/Python.framework/Versions/3.12/bin/python3",
        "/Library/Frameworks/Python.framework/Versions/3.11/bin/python3",
        "/Library/Frameworks/Python.framework/Versions/3.13/bin/python3",
        "/opt/homebrew/opt/python@3.12/bin/python3.12",
        "/opt/homebrew/bin/python3",
        "/usr/bin/python3",  # the stub that asks to install the Command Line Tools
        "/Library/Developer/CommandLineTools/usr/bin/python3",
    ])
    found = base_python_candidates(
        "darwin", {"PATH": "/usr/bin:/opt/homebrew/bin"}, fs.view(),
        "/Applications/QGIS-LTR.app/Contents/MacOS",
        sys_executable="/Applications/QGIS-LTR.app/Contents/MacOS/QGIS")
    assert _paths(found) == [
        "/Applications/QGIS.app/Contents/Frameworks/Python.framework/Versions/3.12/bin/python3",
        "/Applications/QGIS-LTR.app/Contents/MacOS/bin/python3",
        "/Library/Frameworks/Python.framework/Versions/3.13/bin/python3",
        "/opt/homebrew/opt/python@3.12/bin/python3.12",
        "/Library/Frameworks/Python.framework/Versions/3.11/bin/python3",
        "/opt/homebrew/bin/python3",
        "/Library/Developer/CommandLineTools/usr/bin/python3",
    ]
    assert "/usr/bin/python3" not in _paths(found)


def test_linux_layout_system_python_then_path() -> None:
    fs = FakeFileSystem(["/usr/bin/python3", "/usr/bin/python3.11", "/usr/bin/python3.9",
                         "/home/ann/.pyenv/shims/python3"])
    found = base_python_candidates("linux", {"PATH": "/home/ann/.pyenv/shims:/usr/bin"},
                                   fs.view(), "/usr", sys_executable="/usr/bin/qgis")
    assert _paths(found) == ["/usr/bin/python3", "/usr/bin/python3.11",
                             "/home/ann/.pyenv/shims/python3"]


def test_version_from_path() -> None:
    assert env_mod.version_from_path(r"C:\QGIS\apps\Python312\python3.exe") == (3, 12)
    assert env_mod.version_from_path("/x/Python.framework/Versions/3.9/bin/python3") == (3, 9)
    assert env_mod.version_from_path("/opt/homebrew/opt/python@3.13/bin/python3.13") == (3, 13)
    assert env_mod.version_from_path("/usr/bin/python3") is None


def test_choose_base_python_runs_the_candidates(tmp_path) -> None:
    broken = tmp_path / "python3"
    broken.write_text("#!/bin/sh\necho 'no venv here' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    candidates = [env_mod.PythonCandidate(str(broken), "a broken one"),
                  env_mod.PythonCandidate("/usr/bin/python3", "the system Python")]
    chosen, rejected = env_mod.choose_base_python(candidates)
    assert chosen.path == "/usr/bin/python3" and chosen.version >= env_mod.MIN_PYTHON
    assert rejected[0][0].path == str(broken) and "no venv here" in rejected[0][1]


# ------------------------------------------------------------------------------ worker Python


def test_worker_python_order_setting_env_installer_make_install_checkout() -> None:
    plugin = "/home/ann/.local/share/QGIS/QGIS3/profiles/default/python/plugins/hsi_cluster"
    env_dir = "/home/ann/.local/share/QGIS/QGIS3/profiles/default/hsi_cluster/python-env"
    files = {"/opt/py/bin/python3", "/env/var/python", env_dir + "/bin/python",
             "/src/hsi/.venv/bin/python"}
    texts = {plugin + "/python_path.txt": "/src/hsi/.venv/lib/python3.11/site-packages\n"}
    fs = FakeFileSystem(files, texts=texts)

    def search(setting="", environ=None, present=None):
        view = FakeFileSystem(present if present is not None else files, texts=texts).view()
        return find_worker_python(setting, environ or {}, env_dir, plugin, "linux", view)

    assert search("/opt/py/bin/python3", {"HSI_CLUSTER_PYTHON": "/env/var/python"}).found.path \
        == "/opt/py/bin/python3"
    assert search("", {"HSI_CLUSTER_PYTHON": "/env/var/python"}).found.source \
        == "HSI_CLUSTER_PYTHON"
    assert search().found.path == env_dir + "/bin/python"
    made = search(present={"/src/hsi/.venv/bin/python"}).found
    assert made.source == "the checkout's .venv (make install)"
    missing = search("/gone/python", present=set())
    assert missing.found is None
    assert "names '/gone/python', which does not exist" in missing.explain()
    assert fs.list_dir("/src/hsi") == [".venv"]


def test_worker_python_windows_layouts() -> None:
    plugin = r"C:\Users\ann\AppData\Roaming\QGIS\QGIS3\profiles\default\python\plugins\hsi"
    texts = {plugin + r"\python_path.txt": "C:\\src\\hsi\\.venv\\Lib\\site-packages\n"}
    fs = FakeFileSystem({r"C:\src\hsi\.venv\Scripts\python.exe"}, sep="\\", texts=texts)
    found = find_worker_python("", {}, r"C:\nowhere", plugin, "win32", fs.view()).found
    assert found.path == r"C:\src\hsi\.venv\Scripts\python.exe"
    # A source checkout: the .venv beside hsi_cluster_plugin/.
    fs = FakeFileSystem({r"C:\src\hsi\.venv\Scripts\python.exe"}, sep="\\")
    found = find_worker_python("", {}, None, r"C:\src\hsi\hsi_cluster_plugin", "win32",
                               fs.view()).found
    assert found.source == "the .venv of this source checkout"


def test_this_checkout_finds_its_own_venv() -> None:
    search = find_worker_python("", {}, None, str(REPO_ROOT / "hsi_cluster_plugin"))
    assert search.found is not None and Path(search.found.path).is_file()


# ------------------------------------------------------------------------------ plan and GPU


def test_pip_plan_cpu_gpu_and_platforms(tmp_path) -> None:
    requirements, constraints = env_mod.requirement_files(str(REPO_ROOT / "hsi_cluster_plugin"))
    assert Path(requirements).name == "requirements.txt" and Path(constraints).is_file()
    assert env_mod.torch_requirement(Path(requirements).read_text()) == "torch==2.13.0"
    assert env_mod.torch_index_url("cpu", "linux", {}) == env_mod.CPU_TORCH_INDEX
    assert env_mod.torch_index_url("gpu", "win32", {}) == env_mod.CUDA_TORCH_INDEX
    assert env_mod.torch_index_url("cpu", "darwin", {}) == ""
    assert env_mod.torch_index_url("cpu", "linux", {env_mod.ENV_VAR_TORCH_INDEX: ""}) == ""
    plan = InstallPlan("/usr/bin/python3", str(tmp_path / "env"), requirements, constraints,
                       "cpu", env_mod.CPU_TORCH_INDEX, "linux")
    first, second = env_mod.pip_commands(plan, "/env/bin/python")
    assert first[:4] == ["/env/bin/python", "-m", "pip", "install"]
    assert first[-3:] == ["--extra-index-url", env_mod.CPU_TORCH_INDEX, "torch==2.13.0"]
    assert second[-2:] == ["-r", requirements] and ["-c", constraints] == \
        second[second.index("-c"):second.index("-c") + 2]
    plan.torch_index = ""
    assert len(env_mod.pip_commands(plan, "/env/bin/python")) == 1
    assert env_mod.size_estimate_mb("gpu", "linux") > env_mod.size_estimate_mb("cpu", "linux")
    assert env_mod.size_estimate_mb("gpu", "darwin") == env_mod.size_estimate_mb("cpu", "darwin")


def test_gpu_detection_with_a_real_nvidia_smi_program(tmp_path) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA RTX A2000'\necho 'NVIDIA T4'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    assert env_mod.detect_nvidia_gpu(which=lambda name: str(tool)) == "NVIDIA RTX A2000, NVIDIA T4"
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert env_mod.detect_nvidia_gpu(which=lambda name: str(tool)) == ""
    assert env_mod.detect_nvidia_gpu(which=lambda name: None) == ""


def test_remove_environment_only_removes_what_the_installer_made(tmp_path) -> None:
    made = tmp_path / "python-env"
    (made / "bin").mkdir(parents=True)
    (made / env_mod.MARKER_FILE).write_text(json.dumps({"build": "cpu"}))
    assert env_mod.remove_environment(str(made)) is True
    assert not made.exists() and list(tmp_path.iterdir()) == []
    assert env_mod.remove_environment(str(made)) is False
    foreign = tmp_path / "someone-elses"
    foreign.mkdir()
    with pytest.raises(InstallError, match="not made by the HSI Cluster installer"):
        env_mod.remove_environment(str(foreign))
    assert foreign.is_dir()


# ------------------------------------------------------------------------------ the installer


def _system_plan(target: Path, torch_index: str = "") -> InstallPlan:
    chosen, rejected = env_mod.choose_base_python(env_mod.base_python_candidates(
        sys_executable=sys.executable))
    assert chosen is not None, rejected
    requirements, constraints = env_mod.requirement_files(str(REPO_ROOT / "hsi_cluster_plugin"))
    # torch_index "": this machine's pip configuration provides the torch 2.13.0 CPU wheel from
    # a local folder; PyTorch's CPU index (the default on Linux) is not reachable here.
    return InstallPlan(chosen.path, str(target), requirements, constraints, "cpu", torch_index)


def _no_leftovers(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_installer_cancel_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "python-env"
    installer = Installer(_system_plan(target))
    stages = []

    def on_progress(fraction, stage):
        stages.append(stage)
        if stage == "Installing packages":
            installer.cancel()

    installer.on_progress = on_progress
    with pytest.raises(InstallCancelled):
        installer.run()
    assert "Creating the virtual environment" in stages
    assert not target.exists()
    _no_leftovers(tmp_path)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the with-block ends


def _offline_env() -> dict:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("PIP_"):
            del env[name]
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
               PIP_INDEX_URL=f"http://127.0.0.1:{_closed_port()}/simple")
    return env


@pytest.mark.slow
def test_real_installer_end_to_end_then_offline_reinstall_keeps_it(tmp_path) -> None:
    target = tmp_path / "profile" / "hsi_cluster" / "python-env"
    log, progress = [], []
    installer = Installer(_system_plan(target), on_log=log.append,
                          on_progress=lambda f, s: progress.append(f))
    marker = installer.run()

    python = Path(env_mod.venv_python(str(target)))
    assert python.is_file()
    # Built in a temporary folder, moved into place: its scripts point at the final folder.
    header = "\n".join((target / "bin" / "pip").read_text().splitlines()[:2])
    assert f"{target}/bin/python" in header and "building" not in header
    assert marker["versions"]["torch"].startswith("2.13.0")
    assert set(marker["versions"]) == {"numpy", "scipy", "scikit-learn", "scikit-image",
                                       "rasterio", "affine", "psutil", "torch", "hnswlib",
                                       "umap-learn", "torch-geometric", "geopandas", "shapely"}
    assert env_mod.read_marker(str(target)) == marker
    assert marker["algorithms"]["labellingembedding"] == [] and marker["algorithms"]["scdsc"] == []
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any("Successfully installed" in line for line in log)
    # Not QGIS's Python, not the test venv: no QGIS, no pytest in the new environment.
    check = subprocess.run([str(python), "-c", "import qgis"], capture_output=True)
    assert check.returncode != 0
    _no_leftovers(target.parent)
    print(f"installed {marker['size_mb']} MB in {marker['seconds']} s")

    # No network: the second run fails cleanly and the first environment still works.
    offline = Installer(_system_plan(target, torch_index=env_mod.CPU_TORCH_INDEX),
                        InstallOptions(env=_offline_env()))
    with pytest.raises(InstallError, match="could not be downloaded"):
        offline.run()
    _no_leftovers(target.parent)
    assert env_mod.read_marker(str(target)) == marker
    from processing_provider.worker_client import engine_root

    done = subprocess.run(
        [str(python), "-c", "import numpy, rasterio, engine.job_protocol; print('ok')"],
        capture_output=True, text=True, env={**env_mod.clean_python_environment(),
                                             "PYTHONPATH": engine_root()})
    assert done.stdout.strip() == "ok", done.stderr


def test_threaded_installer_reports_from_another_thread(tmp_path) -> None:
    """The dialog runs the installer in a thread: an error there comes back as a value."""
    plan = _system_plan(tmp_path / "env")
    plan.base_python = str(tmp_path / "no-python")
    errors = []

    def run():
        try:
            Installer(plan).run()
        except (InstallError, OSError) as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert errors and not (tmp_path / "env").exists()
    _no_leftovers(tmp_path)


def test_installed_plugin_carries_the_requirement_files(tmp_path) -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "install_plugin.py"), "--home",
                    str(tmp_path), "--no-python-path"], check=True, capture_output=True,
                   timeout=120)
    plugin = next(tmp_path.rglob("hsi_cluster/environment.py")).parent
    requirements, constraints = env_mod.requirement_files(str(plugin))
    assert Path(requirements).parent == plugin and Path(constraints).parent == plugin
    assert Path(requirements).read_text() == (REPO_ROOT / "requirements.txt").read_text()


def test_environment_module_is_qgis_side_code() -> None:
    import ast

    tree = ast.parse(Path(env_mod.__file__).read_text(encoding="utf-8"), feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"torch", "numpy", "rasterio", "scipy", "sklearn", "osgeo"}


# ------------------------------------------------------------------------------ command line


def test_default_profile_dirs_without_qgis() -> None:
    assert env_mod.default_profile_dir("linux", {}, "/home/ann") == \
        "/home/ann/.local/share/QGIS/QGIS3/profiles/default"
    assert env_mod.default_profile_dir("linux", {"XDG_DATA_HOME": "/data"}, "/home/ann") == \
        "/data/QGIS/QGIS3/profiles/default"
    assert env_mod.default_profile_dir("darwin", {}, "/Users/ann") == \
        "/Users/ann/Library/Application Support/QGIS/QGIS3/profiles/default"
    assert env_mod.default_profile_dir("win32", {"APPDATA": r"C:\Users\ann\AppData\Roaming"},
                                       r"C:\Users\ann") == \
        r"C:\Users\ann\AppData\Roaming\QGIS\QGIS3\profiles\default"


def test_missing_environment_message_says_how_to_create_it() -> None:
    search = env_mod.WorkerPythonSearch(found=None, rejected=[
        (env_mod.PythonCandidate("/gone/python", env_mod.ENV_VAR_PYTHON), "does not exist")])
    headless = env_mod.missing_environment_message(search, desktop=False)
    assert headless.startswith("HSI_CLUSTER_PYTHON names '/gone/python', which does not exist.")
    assert 'environment.py" install' in headless and "1.8 GB" in headless
    desktop = env_mod.missing_environment_message(env_mod.WorkerPythonSearch(None), True)
    assert "Plugins ▸ HSI Cluster ▸ Set up Python environment…" in desktop


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "hsi_cluster_plugin" / "environment.py"), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd="/")


def test_command_line_where_install_remove(tmp_path) -> None:
    env = dict(os.environ, HSI_CLUSTER_PYTHON=sys.executable)
    where = _cli("where", env=env)
    assert where.returncode == 0 and where.stdout.strip() == \
        f"{sys.executable} (HSI_CLUSTER_PYTHON)"

    tiny = tmp_path / "requirements.txt"
    tiny.write_text("psutil>=5.9\n")
    target = tmp_path / "env"
    env = dict(os.environ, HSI_CLUSTER_TORCH_INDEX_URL="")
    done = _cli("install", "--target", str(target), "--requirements", str(tiny),
                "--no-verify", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[100%] Done" in done.stdout and "The environment is ready" in done.stdout
    assert env_mod.read_marker(str(target))["build"] == "cpu"
    assert _cli("where", "--target", str(target), env=dict(os.environ)).stdout.startswith(
        env_mod.venv_python(str(target)))
    removed = _cli("remove", "--target", str(target))
    assert removed.returncode == 0 and not target.exists()


def test_retarget_scripts_points_shebangs_at_the_final_folder(tmp_path) -> None:
    building = tmp_path / ".python-env-building-1"
    (building / "bin").mkdir(parents=True)
    pip = building / "bin" / "pip"
    pip.write_text(f"#!{building}/bin/python\nimport sys\nprint('{building}')\n")
    (building / "bin" / "activate").write_text("# no shebang\n")
    long = building / "bin" / "torchrun"  # pip's form when the path is too long for #!
    long.write_text(f"#!/bin/sh\n'''exec' '{building}/bin/python' \"$0\" \"$@\"\n' '''\nx\n")
    (building / "bin" / "python").symlink_to("/usr/bin/python3")
    changed = env_mod.retarget_scripts(str(building), str(tmp_path / "python-env"))
    assert sorted(changed) == sorted([str(pip), str(long)])
    assert long.read_text().splitlines()[1] == \
        f"'''exec' '{tmp_path}/python-env/bin/python' \"$0\" \"$@\""
    # Only the #! line changes.
    assert pip.read_text() == f"#!{tmp_path}/python-env/bin/python\nimport sys\n" \
        f"print('{building}')\n"
