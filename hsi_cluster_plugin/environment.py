"""The engine's Python environment: where it is, and the opt-in installer that builds one.

QGIS side (Python 3.9 syntax at runtime, standard library only; ``qgis.core`` only inside the
few functions that read QGIS settings). The engine itself (torch, rasterio, ...) runs in a worker
process with *this* environment's Python, never inside QGIS.

**Which Python runs the worker**, first found wins:

1. an explicit setting: the plugin setting ``hsi_cluster/python`` or ``HSI_CLUSTER_PYTHON``;
2. the environment the installer made, ``<QGIS profile folder>/hsi_cluster/python-env``;
3. the checkout's ``.venv`` that ``make install`` points the installed plugin at (through
   ``python_path.txt``), or the ``.venv`` beside a source checkout.

**Which Python the installer builds from** (:func:`base_python_candidates`): never
``sys.executable``, which inside QGIS on Windows and macOS is the QGIS binary. On Windows the
Python QGIS ships (``<QGIS>/apps/Python3x/python3.exe``), python.org installs, ``PATH``; on macOS
the Python inside ``QGIS.app`` (``Contents/MacOS/bin`` or ``Contents/Frameworks``), python.org,
Homebrew, the Command Line Tools' Python; on Linux the system Python and ``PATH``. The search is
a pure function over an injectable view of the file system and environment, so every platform's
layout is unit-tested on any machine; :func:`choose_base_python` then runs the candidates to
check their version and that they can make a venv.

**The installer** (:class:`Installer`) builds the venv in a temporary folder beside the target,
installs the project's requirement files with pip (CPU build of torch by default, a CUDA build
only when asked and an NVIDIA GPU is found), imports every package and runs the worker's
``selftest`` job in it, and only then swaps it into place. Cancel or any failure (no network,
for one) removes the temporary folder and leaves a previous environment as it was. Nothing is
ever installed into QGIS's own Python.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import ntpath
import os
import posixpath
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ENV_VAR_PYTHON = "HSI_CLUSTER_PYTHON"
ENV_VAR_TORCH_INDEX = "HSI_CLUSTER_TORCH_INDEX_URL"  # "" = use pip's own configuration
SETTING_PYTHON = "hsi_cluster/python"
ENVIRONMENT_FOLDER = "hsi_cluster"
ENVIRONMENT_NAME = "python-env"
MARKER_FILE = "hsi_cluster_environment.json"  # written into every environment we build
PYTHON_PATH_FILE = "python_path.txt"
MIN_PYTHON = (3, 10)  # the engine's requirement (torch 2.13 has no wheels for older Pythons)
MAX_PYTHON = (3, 13)  # newest Python the pinned requirements have wheels for
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
REQUIREMENTS_FILE = "requirements.txt"
CONSTRAINTS_FILE = "constraints.txt"

# Disk size of a finished environment, MB. Linux CPU was measured here (the end-to-end test,
# torch 2.13.0+cpu, Python 3.11); the others are rough: the CUDA build adds the NVIDIA
# libraries (about 4 GB on Linux and Windows), macOS wheels are smaller than Linux's.
SIZE_ESTIMATE_MB = {
    ("linux", "cpu"): 1800,
    ("linux", "gpu"): 6500,
    ("windows", "cpu"): 1700,
    ("windows", "gpu"): 5500,
    ("darwin", "cpu"): 1200,
}

_PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def platform_name(value: str | None = None) -> str:
    """"windows", "darwin" or "linux" (anything else counts as linux)."""
    value = value or sys.platform
    if value.startswith("win"):
        return "windows"
    if value == "darwin":
        return "darwin"
    return "linux"


def _paths(platform: str):
    return ntpath if platform == "windows" else posixpath


# ----------------------------------------------------------------------------- file-system view


@dataclass(frozen=True)
class FileSystemView:
    """What discovery may look at. :func:`real_file_system` reads the disk; tests pass a fake."""

    is_file: Callable[[str], bool]
    list_dir: Callable[[str], list]
    read_text: Callable[[str], str | None]


def _list_dir(path: str) -> list:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def real_file_system() -> FileSystemView:
    return FileSystemView(is_file=os.path.isfile, list_dir=_list_dir, read_text=_read_text)


@dataclass(frozen=True)
class PythonCandidate:
    path: str
    source: str  # where it was found, for messages ("QGIS's own Python", "HSI_CLUSTER_PYTHON")
    version: tuple | None = None  # (major, minor) when the layout says it


_VERSION_IN_PATH = re.compile(r"python[-_]?(\d)\.?(\d{1,2})(?!\d)", re.IGNORECASE)
_VERSIONS_FOLDER = re.compile(r"versions[\\/](\d)\.(\d{1,2})(?!\d)", re.IGNORECASE)


def version_from_path(path: str) -> tuple | None:
    """(3, 12) from ".../Python312/python.exe", ".../Versions/3.12/...", ".../python3.12"."""
    for pattern in (_VERSIONS_FOLDER, _VERSION_IN_PATH):
        matches = pattern.findall(path)
        if matches:
            major, minor = matches[-1]
            return int(major), int(minor)
    return None


def venv_python(venv_dir: str, platform: str | None = None) -> str:
    platform = platform_name(platform)
    paths = _paths(platform)
    if platform == "windows":
        return paths.join(venv_dir, "Scripts", "python.exe")
    return paths.join(venv_dir, "bin", "python")


# ----------------------------------------------------------------------------- the worker Python


@dataclass
class WorkerPythonSearch:
    """The worker Python found (or None) and the configured ones that were not usable."""

    found: PythonCandidate | None
    rejected: list = field(default_factory=list)  # (PythonCandidate, reason)

    def explain(self) -> str:
        lines = [f"{c.source} names '{c.path}', which {reason}." for c, reason in self.rejected]
        return " ".join(lines)


def _venv_from_site_packages(site_packages: str, platform: str) -> str | None:
    """The venv folder of ``<venv>/lib/pythonX.Y/site-packages`` / ``<venv>/Lib/site-packages``."""
    paths = _paths(platform)
    folder = site_packages.rstrip("/\\")
    if paths.basename(folder).lower() != "site-packages":
        return None
    parent = paths.dirname(folder)
    if paths.basename(parent).lower() == "lib":  # Windows layout
        return paths.dirname(parent)
    if paths.basename(paths.dirname(parent)).lower() == "lib":  # lib/pythonX.Y
        return paths.dirname(paths.dirname(parent))
    return None


def worker_python_candidates(setting: str, environ: dict, environment_dir: str | None,
                             plugin_dir: str, platform: str | None = None,
                             fs: FileSystemView | None = None) -> list:
    """Every place the worker Python may be, in the documented order (pure)."""
    platform = platform_name(platform)
    paths = _paths(platform)
    fs = fs or real_file_system()
    candidates = []
    if setting:
        candidates.append(PythonCandidate(setting, "the plugin setting 'Python environment'"))
    if environ.get(ENV_VAR_PYTHON):
        candidates.append(PythonCandidate(environ[ENV_VAR_PYTHON], ENV_VAR_PYTHON))
    if environment_dir:
        candidates.append(PythonCandidate(venv_python(environment_dir, platform),
                                          "the environment the installer made"))
    path_file = fs.read_text(paths.join(plugin_dir, PYTHON_PATH_FILE)) or ""
    for line in path_file.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        venv = _venv_from_site_packages(line, platform)
        if venv:
            candidates.append(PythonCandidate(venv_python(venv, platform),
                                              "the checkout's .venv (make install)"))
    checkout_venv = paths.join(paths.dirname(plugin_dir), ".venv")
    candidates.append(PythonCandidate(venv_python(checkout_venv, platform),
                                      "the .venv of this source checkout"))
    return candidates


def find_worker_python(setting: str, environ: dict, environment_dir: str | None,
                       plugin_dir: str, platform: str | None = None,
                       fs: FileSystemView | None = None) -> WorkerPythonSearch:
    """The first existing worker Python; explicitly configured ones that are missing are
    reported (they are a user's mistake worth naming), the others are silently skipped."""
    fs = fs or real_file_system()
    search = WorkerPythonSearch(found=None)
    for candidate in worker_python_candidates(setting, environ, environment_dir, plugin_dir,
                                              platform, fs):
        if fs.is_file(candidate.path):
            search.found = candidate
            return search
        if candidate.source in (ENV_VAR_PYTHON, "the plugin setting 'Python environment'"):
            search.rejected.append((candidate, "does not exist"))
    return search


# ----------------------------------------------------------------------------- the base Python


def _qgis_root(qgis_prefix: str, platform: str) -> str:
    """The QGIS installation root from QgsApplication.prefixPath()."""
    paths = _paths(platform)
    prefix = qgis_prefix.rstrip("/\\")
    if platform == "windows":
        # <root>/apps/qgis or <root>/apps/qgis-ltr
        if paths.basename(paths.dirname(prefix)).lower() == "apps":
            return paths.dirname(paths.dirname(prefix))
        return prefix
    if platform == "darwin":
        # <...>/QGIS.app/Contents/MacOS
        marker = prefix.find(".app/Contents")
        if marker >= 0:
            return prefix[: marker + len(".app")]
        return prefix
    return prefix


def _sorted_by_version(candidates: list) -> list:
    """Newest Python first; unknown versions last, in their given order."""
    return sorted(candidates, key=lambda c: tuple(-v for v in (c.version or (0, 0))))


def base_python_candidates(platform: str | None = None, environ: dict | None = None,
                           fs: FileSystemView | None = None, qgis_prefix: str = "",
                           sys_executable: str = "", sys_prefix: str = "") -> list:
    """Pythons the installer could build the venv from, most trusted first (pure).

    ``qgis_prefix`` is QgsApplication.prefixPath(); ``sys_prefix`` is QGIS's ``sys.prefix``,
    the folder of the Python QGIS embeds (on Windows and macOS it holds a real interpreter).

    ``sys_executable`` (the Python running QGIS, which is the QGIS binary on Windows and macOS)
    is never offered. Candidates whose path shows a version outside MIN_PYTHON..MAX_PYTHON are
    left out; the others are checked by running them (:func:`choose_base_python`).
    """
    platform = platform_name(platform)
    paths = _paths(platform)
    environ = dict(os.environ if environ is None else environ)
    fs = fs or real_file_system()
    found: list = []

    def add(path: str, source: str) -> None:
        if fs.is_file(path):
            found.append(PythonCandidate(path, source, version_from_path(path)))

    def children(folder: str, pattern: str) -> list:
        return [paths.join(folder, name) for name in fs.list_dir(folder)
                if re.fullmatch(pattern, name, re.IGNORECASE)]

    group: list = []
    if platform == "windows":
        root = _qgis_root(qgis_prefix, platform) if qgis_prefix else ""
        folders = [sys_prefix] if sys_prefix else []
        if root:
            folders += children(paths.join(root, "apps"), r"python3\d+")
        for folder in folders:
            for exe in ("python3.exe", "python.exe"):
                add(paths.join(folder, exe), "the Python shipped with QGIS")
                if found and found[-1].path == paths.join(folder, exe):
                    break
        group, found = found, []
        local = environ.get("LOCALAPPDATA", "")
        roots = [paths.join(local, "Programs", "Python")] if local else []
        for variable in ("ProgramFiles", "ProgramW6432", "ProgramFiles(x86)"):
            if environ.get(variable):
                roots.append(environ[variable])
        for base in roots:
            for folder in children(base, r"python3\d+(-32|-arm64)?"):
                add(paths.join(folder, "python.exe"), "a python.org Python")
        group += _sorted_by_version(found)
        found = []
        names = ("python.exe", "python3.exe")
    elif platform == "darwin":
        bundles = []
        if qgis_prefix:
            bundles.append(_qgis_root(qgis_prefix, platform))
        bundles += [paths.join("/Applications", name) for name in fs.list_dir("/Applications")
                    if re.fullmatch(r"QGIS.*\.app", name)]
        if sys_prefix:
            add(paths.join(sys_prefix, "bin", "python3"), "the Python shipped with QGIS")
        for bundle in dict.fromkeys(bundles):
            add(paths.join(bundle, "Contents", "MacOS", "bin", "python3"),
                "the Python shipped with QGIS")
            frameworks = paths.join(bundle, "Contents", "Frameworks", "Python.framework",
                                    "Versions")
            for folder in children(frameworks, r"3\.\d+"):
                add(paths.join(folder, "bin", "python3"), "the Python shipped with QGIS")
        group, found = _sorted_by_version(found), []
        for folder in children("/Library/Frameworks/Python.framework/Versions", r"3\.\d+"):
            add(paths.join(folder, "bin", "python3"), "a python.org Python")
        for prefix in ("/opt/homebrew", "/usr/local"):
            for folder in children(paths.join(prefix, "opt"), r"python@3\.\d+"):
                version = folder.rsplit("@", 1)[-1]
                add(paths.join(folder, "bin", f"python{version}"), "a Homebrew Python")
        group += _sorted_by_version(found)
        found = []
        for prefix in ("/opt/homebrew/bin", "/usr/local/bin"):
            add(paths.join(prefix, "python3"), "a Homebrew Python")
        # /usr/bin/python3 is a stub that opens an install dialog when the Command Line Tools
        # are missing: offer the tools' own Python only when it is there.
        add("/Library/Developer/CommandLineTools/usr/bin/python3",
            "the Command Line Tools' Python")
        group += found
        found = []
        names = ("python3",)
    else:
        for folder in ("/usr/bin", "/usr/local/bin"):
            add(paths.join(folder, "python3"), "the system Python")
            for path in children(folder, r"python3\.\d+"):
                add(path, "the system Python")
        group, found = found, []
        names = ("python3",)
    for folder in environ.get("PATH", "").split(";" if platform == "windows" else ":"):
        if not folder or "windowsapps" in folder.lower():  # Microsoft Store stubs
            continue
        for name in names:
            path = paths.join(folder, name)
            if platform == "darwin" and path == "/usr/bin/python3":
                continue  # the Command Line Tools stub (see above)
            add(path, "a Python on PATH")
    group += found

    result: list = []
    seen = set()
    excluded = sys_executable.lower() if platform == "windows" else sys_executable
    for candidate in group:
        key = candidate.path.lower() if platform == "windows" else candidate.path
        if key in seen or (sys_executable and key == excluded):
            continue
        seen.add(key)
        if candidate.version and not (MIN_PYTHON <= candidate.version <= MAX_PYTHON):
            continue
        result.append(candidate)
    return result


_PROBE = ("import sys, venv, ensurepip; "
          "print('%d.%d' % sys.version_info[:2])")


def probe_python(path: str, env: dict | None = None, timeout: float = 30.0) -> tuple:
    """(major, minor) of a Python that can make a venv (has venv and ensurepip); or raise."""
    completed = subprocess.run([path, "-I", "-c", _PROBE], capture_output=True, text=True,
                               timeout=timeout, env=clean_python_environment(env),
                               **_no_window())
    if completed.returncode != 0:
        raise RuntimeError((completed.stderr or completed.stdout).strip().splitlines()[-1:]
                           or f"exit code {completed.returncode}")
    major, minor = completed.stdout.strip().split(".")
    return int(major), int(minor)


def choose_base_python(candidates: list, env: dict | None = None) -> tuple:
    """The first candidate that runs, has a supported version and can make a venv;
    (candidate or None, [(candidate, why not)])."""
    rejected = []
    for candidate in candidates:
        try:
            version = probe_python(candidate.path, env)
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as error:
            rejected.append((candidate, f"cannot make a venv ({error})"))
            continue
        if not (MIN_PYTHON <= version <= MAX_PYTHON):
            rejected.append((candidate, f"is Python {version[0]}.{version[1]}; HSI Cluster "
                             f"needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} to "
                             f"{MAX_PYTHON[0]}.{MAX_PYTHON[1]}"))
            continue
        return PythonCandidate(candidate.path, candidate.source, version), rejected
    return None, rejected


# ----------------------------------------------------------------------------- QGIS-bound helpers


def default_environment_dir() -> str:
    """``<QGIS profile folder>/hsi_cluster/python-env`` (QGIS needed)."""
    from qgis.core import QgsApplication

    return os.path.join(QgsApplication.qgisSettingsDirPath(), ENVIRONMENT_FOLDER,
                        ENVIRONMENT_NAME)


def python_setting() -> str:
    from qgis.core import QgsSettings

    return str(QgsSettings().value(SETTING_PYTHON, "") or "")


def locate_worker_python(plugin_dir: str | None = None) -> WorkerPythonSearch:
    """The search with this QGIS's settings and folders."""
    return find_worker_python(python_setting(), dict(os.environ), default_environment_dir(),
                              plugin_dir or _PLUGIN_DIR)


def qgis_base_python_candidates() -> list:
    from qgis.core import QgsApplication

    return base_python_candidates(qgis_prefix=QgsApplication.prefixPath(),
                                  sys_executable=sys.executable, sys_prefix=sys.prefix)


# ----------------------------------------------------------------------------- the plan


def requirement_files(plugin_dir: str | None = None) -> tuple:
    """(requirements.txt, constraints.txt) of the installed plugin or the source checkout."""
    plugin_dir = plugin_dir or _PLUGIN_DIR
    for folder in (plugin_dir, os.path.dirname(plugin_dir)):
        requirements = os.path.join(folder, REQUIREMENTS_FILE)
        if os.path.isfile(requirements):
            constraints = os.path.join(folder, CONSTRAINTS_FILE)
            return requirements, constraints if os.path.isfile(constraints) else ""
    raise FileNotFoundError(f"{REQUIREMENTS_FILE} is missing from the plugin ({plugin_dir}); "
                            "reinstall the plugin.")


def torch_requirement(requirements_text: str) -> str:
    """The torch line of a requirements file ("torch==2.13.0")."""
    for line in requirements_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(r"torch\s*([=<>!~]|$)", line):
            return line
    raise ValueError("the requirements name no torch")


def torch_index_url(build: str, platform: str | None = None,
                    environ: dict | None = None) -> str:
    """Where torch comes from: "" = pip's configuration (PyPI). On Linux and Windows the CPU
    build needs PyTorch's CPU index (PyPI's Linux wheel pulls in the CUDA libraries)."""
    environ = os.environ if environ is None else environ
    if ENV_VAR_TORCH_INDEX in environ:
        return environ[ENV_VAR_TORCH_INDEX]
    platform = platform_name(platform)
    if build == "gpu":
        return CUDA_TORCH_INDEX
    return "" if platform == "darwin" else CPU_TORCH_INDEX


@dataclass
class InstallPlan:
    base_python: str
    target: str  # the environment folder
    requirements: str
    constraints: str = ""
    build: str = "cpu"
    torch_index: str = ""
    platform: str = field(default_factory=platform_name)

    def size_estimate_mb(self) -> int:
        return size_estimate_mb(self.build, self.platform)


def size_estimate_mb(build: str, platform: str | None = None) -> int:
    platform = platform_name(platform)
    return SIZE_ESTIMATE_MB.get((platform, build), SIZE_ESTIMATE_MB[(platform, "cpu")])


PIP_OPTIONS = ("--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--retries", "2", "--timeout", "30")


def pip_commands(plan: InstallPlan, python: str) -> list:
    """The pip runs of a plan (pure): torch from its index first when it has one, then the
    requirement files under the constraints (the installed torch already satisfies them)."""
    constraints = ["-c", plan.constraints] if plan.constraints else []
    base = [python, "-m", "pip", "install", *PIP_OPTIONS]
    commands = []
    if plan.torch_index:
        with open(plan.requirements, encoding="utf-8") as handle:
            torch_line = torch_requirement(handle.read())
        commands.append([*base, *constraints, "--extra-index-url", plan.torch_index,
                         torch_line])
    commands.append([*base, *constraints, "-r", plan.requirements])
    return commands


# ----------------------------------------------------------------------------- GPU


def detect_nvidia_gpu(which: Callable = shutil.which, run: Callable = subprocess.run) -> str:
    """The name(s) of the NVIDIA GPU(s) that ``nvidia-smi`` sees, or "" (no torch needed)."""
    tool = which("nvidia-smi")
    if not tool:
        return ""
    try:
        completed = run([tool, "--query-gpu=name", "--format=csv,noheader"],
                        capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if completed.returncode != 0:
        return ""
    return ", ".join(line.strip() for line in completed.stdout.splitlines() if line.strip())


# ----------------------------------------------------------------------------- running things


def _no_window() -> dict:
    if os.name == "nt":
        return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    return {}


def clean_python_environment(env: dict | None = None) -> dict:
    """``env`` (default os.environ) without the variables that point a Python at QGIS's own."""
    result = dict(os.environ if env is None else env)
    for name in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE",
                 "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__", "VIRTUAL_ENV"):
        result.pop(name, None)
    result["PYTHONNOUSERSITE"] = "1"
    result["PYTHONIOENCODING"] = "utf-8"
    return result


class InstallCancelled(Exception):
    """The user cancelled the installer."""


class InstallError(Exception):
    """The installer failed; the message says why and what to do."""


def _engine_root() -> str:
    from engine import job_protocol

    return os.path.dirname(os.path.dirname(os.path.abspath(job_protocol.__file__)))


def folder_size_mb(folder: str) -> float:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total / 1e6


def read_marker(environment_dir: str) -> dict | None:
    text = _read_text(os.path.join(environment_dir, MARKER_FILE))
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def remove_environment(environment_dir: str) -> bool:
    """Delete an environment the installer made (its marker file proves it); False if there is
    none. A folder without the marker is refused, so a wrong setting cannot delete a folder."""
    if not os.path.isdir(environment_dir):
        return False
    if read_marker(environment_dir) is None:
        raise InstallError(f"'{environment_dir}' was not made by the HSI Cluster installer (no "
                           f"{MARKER_FILE}); it is left alone. Delete it by hand if you want.")
    trash = _sibling(environment_dir, "removing")
    os.replace(environment_dir, trash)  # atomic: the environment is gone or still whole
    shutil.rmtree(trash, ignore_errors=True)
    return True


def retarget_scripts(venv_dir: str, final_dir: str) -> list:
    """Point the ``#!`` lines of the venv's scripts (pip, torchrun, ...) at the folder the venv
    is moved to; returns the files changed. The installer builds in a temporary folder and
    runs everything as ``python -m``, but a user running ``bin/pip`` should find it working.
    (Windows' Scripts/*.exe launchers embed the path in binary; they are left as they are.)"""
    scripts = os.path.join(venv_dir, "bin")
    old = os.path.abspath(venv_dir).encode()
    new = os.path.abspath(final_dir).encode()
    changed = []
    for name in _list_dir(scripts):
        path = os.path.join(scripts, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as handle:
                header = handle.readline()
                if not header.startswith(b"#!"):
                    continue
                if header.startswith(b"#!/bin/sh"):  # pip's form for paths too long for #!:
                    header += handle.readline()  # the next line execs the venv's python
                if old not in header:
                    continue
                rest = handle.read()
            with open(path, "wb") as handle:
                handle.write(header.replace(old, new) + rest)
            changed.append(path)
        except OSError:
            continue
    return changed


def _sibling(target: str, what: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}-{what}-{os.getpid()}-{int(time.time() * 1000)}")


@dataclass
class InstallOptions:
    """How to run the installer's subprocesses (tests point pip at a closed port, say)."""

    env: dict | None = None  # the subprocess environment (default: this process's)
    cancel_grace_seconds: float = 1.5
    verify: bool = True


class Installer:
    """Builds the environment of a plan; reports through callables (thread-agnostic).

    ``run()`` blocks; the dialog runs it in a thread and polls :attr:`messages`. Progress is
    a fraction 0..1 per step: venv 0-5 %, torch 5-45 %, the rest 45-85 %, checks 85-100 %.
    """

    def __init__(self, plan: InstallPlan, options: InstallOptions | None = None,
                 on_log: Callable | None = None, on_progress: Callable | None = None):
        self.plan = plan
        self.options = options or InstallOptions()
        self.on_log = on_log or (lambda text: None)
        self.on_progress = on_progress or (lambda fraction, stage: None)
        self._cancel = threading.Event()
        self._process: subprocess.Popen | None = None
        self.building_dir = ""

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ------------------------------------------------------------------ subprocesses
    def _env(self) -> dict:
        return clean_python_environment(self.options.env)

    def _run(self, command: list, start: float, end: float, stage: str,
             expected_lines: int = 0) -> list:
        """Run ``command``; stream its lines to the log; progress grows with the lines seen.
        Cancel: terminate, then kill after the grace time. Returns the output lines."""
        self.on_progress(start, stage)
        self.on_log("$ " + " ".join(command))
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self._env(), **_no_window())
        except OSError as error:
            raise InstallError(f"{stage} failed: cannot run '{command[0]}' ({error}).") \
                from error
        self._process = process
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for raw in iter(process.stdout.readline, b""):
                lines.put(raw.decode("utf-8", errors="replace").rstrip())
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        output: list = []
        cancel_time = None
        seen = 0
        while True:
            if self.cancelled and cancel_time is None:
                cancel_time = time.monotonic()
                process.terminate()
            if cancel_time is not None and process.poll() is None and \
                    time.monotonic() - cancel_time > self.options.cancel_grace_seconds:
                process.kill()
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            output.append(line)
            self.on_log(line)
            if expected_lines and line.startswith(("Collecting", "Processing", "Requirement")):
                seen += 1
                self.on_progress(start + (end - start) * min(seen / expected_lines, 0.95),
                                 stage)
        process.wait()
        self._process = None
        if self.cancelled:
            raise InstallCancelled()
        if process.returncode != 0:
            raise InstallError(self._explain_failure(stage, output, process.returncode))
        self.on_progress(end, stage)
        return output

    @staticmethod
    def _explain_failure(stage: str, output: list, code: int) -> str:
        text = "\n".join(output)
        network = ("Could not find a version", "No matching distribution", "NewConnectionError",
                   "Connection refused", "Failed to establish", "Temporary failure in name",
                   "Network is unreachable", "ProxyError", "SSLError", "ReadTimeout")
        last = [line for line in output if line.strip()][-3:]
        detail = " | ".join(last)
        if any(marker in text for marker in network):
            return (f"{stage} failed: the packages could not be downloaded (no network, a "
                    f"proxy, or the package index is unreachable). Connect to the internet "
                    f"(or set pip's proxy) and try again. pip said: {detail}")
        return f"{stage} failed (exit code {code}): {detail}"

    # ------------------------------------------------------------------ steps
    def _verify(self, python: str) -> dict:
        """Import every engine package and run one tiny job (the worker's selftest)."""
        job = {"protocol": 1, "algorithm": "selftest", "threads": 1}
        with tempfile.TemporaryDirectory(prefix="hsi-cluster-check-") as folder:
            job_path = os.path.join(folder, "selftest.json")
            with open(job_path, "w", encoding="utf-8") as handle:
                json.dump(job, handle)
            env = dict(self.options.env if self.options.env is not None else os.environ)
            env["PYTHONPATH"] = _engine_root()
            saved, self.options.env = self.options.env, env
            try:
                output = self._run([python, "-m", "engine.worker", job_path], 0.85, 0.99,
                                   "Checking the environment")
            except InstallError as error:
                raise InstallError(f"The new environment does not work: {error}") from error
            finally:
                self.options.env = saved
        from engine import job_protocol

        for line in reversed(output):
            try:
                event = job_protocol.parse_event(line)
            except job_protocol.ProtocolError:
                continue
            if event["event"] == job_protocol.RESULT:
                return event.get("figures") or {}
        raise InstallError("The new environment's self-test gave no result.")

    def run(self) -> dict:
        """Build, verify, swap in. Returns the marker (what was installed); raises
        InstallCancelled or InstallError, leaving any previous environment as it was."""
        plan = self.plan
        parent = os.path.dirname(os.path.abspath(plan.target))
        os.makedirs(parent, exist_ok=True)
        self.building_dir = _sibling(plan.target, "building")
        started = time.monotonic()
        try:
            self._run([plan.base_python, "-m", "venv", self.building_dir], 0.0, 0.05,
                      "Creating the virtual environment")
            python = venv_python(self.building_dir, plan.platform)
            commands = pip_commands(plan, python)
            spans = [(0.05, 0.45), (0.45, 0.85)] if len(commands) == 2 else [(0.05, 0.85)]
            for command, (start, end) in zip(commands, spans):
                self._run(command, start, end, "Installing packages",
                          expected_lines=5 if "-r" not in command else 70)
            figures = self._verify(python) if self.options.verify else {}
            marker = {
                "build": plan.build,
                "base_python": plan.base_python,
                "python": figures.get("python", ""),
                "versions": figures.get("versions", {}),
                "algorithms": figures.get("algorithms", {}),  # algorithm -> what stops it
                "created": datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (3.9)
                .isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - started, 1),
                "size_mb": round(folder_size_mb(self.building_dir)),
            }
            with open(os.path.join(self.building_dir, MARKER_FILE), "w",
                      encoding="utf-8") as handle:
                json.dump(marker, handle, indent=2)
            if self.cancelled:
                raise InstallCancelled()
            retarget_scripts(self.building_dir, plan.target)
            self._swap_in()
        except BaseException:
            shutil.rmtree(self.building_dir, ignore_errors=True)
            raise
        self.on_progress(1.0, "Done")
        self.on_log(f"The environment is ready: {plan.target} ({marker['size_mb']} MB).")
        return marker

    def _swap_in(self) -> None:
        target = self.plan.target
        old = ""
        try:
            if os.path.exists(target):
                old = _sibling(target, "previous")
                os.replace(target, old)
            try:
                os.replace(self.building_dir, target)
            except OSError:
                if old:
                    os.replace(old, target)
                raise
        except OSError as error:  # Windows: a running worker keeps the old folder in use
            raise InstallError(
                f"The new environment is ready but cannot replace the old one at '{target}' "
                f"({error}). Stop running HSI Cluster algorithms (or restart QGIS) and try "
                "again; the old environment is unchanged.") from error
        if old:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- without QGIS


def default_profile_dir(platform: str | None = None, environ: dict | None = None,
                        home: str | None = None) -> str:
    """QGIS 3's default profile folder, found without QGIS (for the command line)."""
    platform = platform_name(platform)
    environ = os.environ if environ is None else environ
    home = home or os.path.expanduser("~")
    paths = _paths(platform)
    if platform == "windows":
        base = environ.get("APPDATA") or paths.join(home, "AppData", "Roaming")
    elif platform == "darwin":
        base = paths.join(home, "Library", "Application Support")
    else:
        base = environ.get("XDG_DATA_HOME") or paths.join(home, ".local", "share")
    return paths.join(base, "QGIS", "QGIS3", "profiles", "default")


def setup_command(python: str = "") -> str:
    """The command that sets the environment up without the dialog (e.g. for qgis_process)."""
    python = python or ("py -3" if os.name == "nt" else "python3")
    return f'{python} "{os.path.join(_PLUGIN_DIR, "environment.py")}" install'


def missing_environment_message(search: WorkerPythonSearch, desktop: bool) -> str:
    """What to tell a user who runs an algorithm before the environment exists."""
    where = ("open Plugins ▸ HSI Cluster ▸ Set up Python environment…" if desktop
             else f"run: {setup_command()}")
    text = ("HSI Cluster's algorithms run in a Python environment of their own, and there is "
            f"none yet. To create it (about {size_estimate_mb('cpu') / 1000:.1f} GB), {where}. "
            f"To use an existing Python with the requirements installed, set {ENV_VAR_PYTHON}.")
    explained = search.explain()
    return f"{explained} {text}" if explained else text


def _print_progress() -> Callable:
    last = {"stage": "", "percent": -10}

    def report(fraction: float, stage: str) -> None:
        percent = int(100 * fraction)
        if stage != last["stage"] or percent >= last["percent"] + 10:
            print(f"[{percent:3d}%] {stage}", flush=True)
            last.update(stage=stage, percent=percent)

    return report


def main(argv: list | None = None) -> int:
    """``python environment.py where|install|remove``: the installer without QGIS."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="environment.py", description="HSI Cluster's Python environment, without QGIS.")
    parser.add_argument("command", choices=("where", "install", "remove"))
    parser.add_argument("--target", help="the environment folder (default: in QGIS's default "
                                         "profile, where the plugin looks for it)")
    parser.add_argument("--gpu", action="store_true",
                        help="the CUDA build of PyTorch (needs an NVIDIA GPU)")
    parser.add_argument("--python", help="the Python to build from (default: found)")
    parser.add_argument("--requirements", help="requirements file (default: the plugin's)")
    parser.add_argument("--constraints", default=None, help="constraints file")
    parser.add_argument("--no-verify", action="store_true", help="skip the self-test")
    args = parser.parse_args(argv)
    root = _PLUGIN_DIR if os.path.isdir(os.path.join(_PLUGIN_DIR, "engine")) \
        else os.path.dirname(_PLUGIN_DIR)
    if root not in sys.path:
        sys.path.insert(0, root)  # the engine's protocol module, for the self-test
    target = args.target or os.path.join(default_profile_dir(), ENVIRONMENT_FOLDER,
                                         ENVIRONMENT_NAME)
    if args.command == "where":
        search = find_worker_python("", dict(os.environ), target, _PLUGIN_DIR)
        if search.found is None:
            print(missing_environment_message(search, desktop=False))
            return 1
        print(f"{search.found.path} ({search.found.source})")
        return 0
    if args.command == "remove":
        try:
            removed = remove_environment(target)
        except InstallError as error:
            print(error)
            return 1
        print(f"removed {target}" if removed else f"there is no environment at {target}")
        return 0
    if args.gpu and not detect_nvidia_gpu():
        print("--gpu: nvidia-smi finds no NVIDIA GPU; install the CPU build (without --gpu).")
        return 1
    if args.python:
        chosen, rejected = choose_base_python([PythonCandidate(args.python, "--python")])
    else:
        chosen, rejected = choose_base_python(base_python_candidates(sys_executable=""))
    if chosen is None:
        for candidate, why in rejected:
            print(f"{candidate.path}: {why}")
        print(f"No Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}-{MAX_PYTHON[0]}.{MAX_PYTHON[1]} that "
              "can make a venv was found; install one (python.org) or pass --python.")
        return 1
    if args.requirements:
        requirements, constraints = args.requirements, args.constraints or ""
    else:
        requirements, constraints = requirement_files()
    build = "gpu" if args.gpu else "cpu"
    plan = InstallPlan(chosen.path, target, requirements, constraints, build,
                       torch_index_url(build))
    print(f"Installing the {build.upper()} build into {target} (about "
          f"{plan.size_estimate_mb() / 1000:.1f} GB) from {chosen.path}", flush=True)
    installer = Installer(plan, InstallOptions(verify=not args.no_verify),
                          on_log=lambda text: print(text, flush=True),
                          on_progress=_print_progress())
    try:
        installer.run()
    except KeyboardInterrupt:
        print("cancelled; nothing was changed")
        return 1
    except InstallError as error:
        print(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
