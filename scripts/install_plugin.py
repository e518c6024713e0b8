#!/usr/bin/env python3
"""Install the HSI Cluster QGIS plugin into a QGIS profile (pure Python, no QGIS import).

The installed plugin folder ``hsi_cluster`` holds:

* the contents of ``hsi_cluster_plugin/`` at its root (``__init__.py``, ``plugin.py``, ...),
* ``metadata.txt`` from the repository root, and ``requirements.txt`` / ``constraints.txt``
  (what the environment installer installs),
* ``engine/`` and ``processing_provider/`` as sub-folders,
* ``python_path.txt``: the site-packages folder of the repository's venv, which the plugin adds
  to ``sys.path`` when its Python dependencies (torch, ...) are not importable otherwise.

The plugin is then enabled with ``hsi_cluster=true`` under ``[PythonPlugins]`` in the profile's
``QGIS/QGIS3.ini``; every other line of that file is kept as it was.

``plugin_entries()`` / ``iter_plugin_files()`` are the single definition of what goes into the
plugin; ``scripts/package_plugin.py`` imports them to build the zip.

Usage::

    python3 scripts/install_plugin.py                 # copy into $HOME's default profile
    python3 scripts/install_plugin.py --home /tmp/h   # into another HOME
    python3 scripts/install_plugin.py --link          # symlink the sources (development)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "hsi_cluster"
PYTHON_PATH_FILE = "python_path.txt"
PROFILE_REL = Path(".local/share/QGIS/QGIS3/profiles/default")
PLUGINS_SECTION = "PythonPlugins"

# Folders of the repository copied into the plugin as sub-folders of the same name.
_PACKAGE_DIRS = ("engine", "processing_provider")
# Files of the repository root copied to the plugin root when present.
# requirements.txt and constraints.txt: what the plugin's environment installer installs.
_ROOT_FILES = ("metadata.txt", "LICENSE", "requirements.txt", "constraints.txt")
_EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def _excluded(path: Path) -> bool:
    return path.name in _EXCLUDED_DIRS or path.name.endswith(_EXCLUDED_SUFFIXES)


def plugin_entries(repo_root: Path = REPO_ROOT) -> list[tuple[Path, str]]:
    """Top-level entries of the plugin folder: ``(source path, name inside the plugin)``.

    A source is a file or a folder; folders are taken whole (minus caches, see
    :func:`iter_plugin_files`). This is the one place that says what the plugin contains.
    """
    repo_root = Path(repo_root)
    plugin_pkg = repo_root / "hsi_cluster_plugin"
    if not (plugin_pkg / "__init__.py").is_file():
        raise FileNotFoundError(f"{plugin_pkg}/__init__.py not found: is {repo_root} the repo?")
    entries = [(p, p.name) for p in sorted(plugin_pkg.iterdir()) if not _excluded(p)]
    for name in _ROOT_FILES:
        if (repo_root / name).is_file():
            entries.append((repo_root / name, name))
    for name in _PACKAGE_DIRS:
        if (repo_root / name).is_dir():
            entries.append((repo_root / name, name))
    names = [name for _, name in entries]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"plugin entries collide: {sorted(duplicates)}")
    if "metadata.txt" not in names:
        raise FileNotFoundError(f"{repo_root}/metadata.txt not found")
    return entries


def iter_plugin_files(repo_root: Path = REPO_ROOT) -> Iterator[tuple[Path, str]]:
    """Every file of the plugin: ``(source file, path relative to the plugin folder)``.

    Paths use ``/`` separators; caches and compiled files are left out.
    """
    for src, name in plugin_entries(repo_root):
        if src.is_file():
            yield src, name
            continue
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if not _excluded(Path(d)))
            for filename in sorted(filenames):
                file = Path(dirpath) / filename
                if _excluded(file):
                    continue
                yield file, f"{name}/{file.relative_to(src).as_posix()}"


def venv_site_packages(repo_root: Path = REPO_ROOT) -> Path | None:
    """site-packages of the venv running this Python, else of the repository's ``.venv``."""
    if sys.prefix != sys.base_prefix:
        return Path(sysconfig.get_paths()["purelib"])
    found = sorted((Path(repo_root) / ".venv" / "lib").glob("python3*/site-packages"))
    return found[0] if found else None


def default_python_paths(repo_root: Path = REPO_ROOT) -> list[Path]:
    """Site-packages folder(s) the installed plugin should fall back on.

    The repository's ``.venv`` when it exists, else the venv running this script (if any).
    """
    found = sorted((Path(repo_root) / ".venv" / "lib").glob("python3*/site-packages"))
    if found:
        return [p.resolve() for p in found]
    if sys.prefix != sys.base_prefix:  # running inside some venv
        return [Path(sysconfig.get_paths()["purelib"]).resolve()]
    return []


def profile_dir(home: Path) -> Path:
    return Path(home) / PROFILE_REL


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def install_files(plugin_dir: Path, repo_root: Path = REPO_ROOT, link: bool = False) -> None:
    """(Re)create ``plugin_dir`` from the sources: copies, or symlinks with ``link``."""
    _remove(plugin_dir)
    plugin_dir.mkdir(parents=True)
    if link:
        for src, name in plugin_entries(repo_root):
            (plugin_dir / name).symlink_to(src.resolve(), target_is_directory=src.is_dir())
        return
    for src, rel in iter_plugin_files(repo_root):
        dest = plugin_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def write_python_path(plugin_dir: Path, paths: list[Path]) -> Path | None:
    target = plugin_dir / PYTHON_PATH_FILE
    if target.exists() or target.is_symlink():
        target.unlink()
    if not paths:
        return None
    target.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    return target


def enable_in_ini(ini_path: Path, plugin_name: str = PLUGIN_NAME) -> None:
    """Set ``<plugin_name>=true`` under ``[PythonPlugins]``, keeping every other line as it is.

    A line-based edit rather than configparser: QGIS3.ini holds Qt-style keys (case-sensitive,
    ``\\`` escapes, ``@Variant(...)`` values) that a configparser round-trip could alter.
    """
    ini_path.parent.mkdir(parents=True, exist_ok=True)
    text = ini_path.read_text(encoding="utf-8") if ini_path.exists() else ""
    lines = text.splitlines()
    entry = f"{plugin_name}=true"
    header = f"[{PLUGINS_SECTION}]"

    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [header, entry]
    else:
        end = next(
            (j for j in range(start + 1, len(lines)) if lines[j].strip().startswith("[")),
            len(lines),
        )
        key_lines = [
            j for j in range(start + 1, end) if lines[j].split("=", 1)[0].strip() == plugin_name
        ]
        if key_lines:
            lines[key_lines[0]] = entry
            for j in reversed(key_lines[1:]):
                del lines[j]
        else:
            # Insert after the section's last non-blank line, so a blank separator stays last.
            insert_at = end
            while insert_at > start + 1 and not lines[insert_at - 1].strip():
                insert_at -= 1
            lines.insert(insert_at, entry)
    ini_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def install(
    home: Path,
    repo_root: Path = REPO_ROOT,
    link: bool = False,
    python_paths: list[Path] | None = None,
) -> Path:
    """Install the plugin into ``home``'s default QGIS profile; return the plugin folder."""
    profile = profile_dir(home)
    plugin_dir = profile / "python" / "plugins" / PLUGIN_NAME
    install_files(plugin_dir, repo_root, link=link)
    if python_paths is None:
        python_paths = default_python_paths(repo_root)
    write_python_path(plugin_dir, python_paths)
    enable_in_ini(profile / "QGIS" / "QGIS3.ini")
    return plugin_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.path.expanduser("~")),
        help="HOME whose default QGIS profile receives the plugin (default: $HOME)",
    )
    parser.add_argument(
        "--link", action="store_true", help="symlink the sources instead of copying them"
    )
    parser.add_argument(
        "--python-path",
        type=Path,
        action="append",
        help="site-packages folder written to python_path.txt (repeatable; default: the "
        "repository's .venv site-packages)",
    )
    parser.add_argument(
        "--no-python-path", action="store_true", help="do not write python_path.txt"
    )
    args = parser.parse_args(argv)

    paths = [] if args.no_python_path else args.python_path
    if paths:
        paths = [p.resolve() for p in paths]
    plugin_dir = install(args.home, link=args.link, python_paths=paths)
    mode = "linked" if args.link else "copied"
    print(f"HSI Cluster plugin {mode} into {plugin_dir}")
    python_path_file = plugin_dir / PYTHON_PATH_FILE
    if python_path_file.exists():
        print(f"dependency fallback path(s) in {python_path_file}:")
        print(python_path_file.read_text(encoding="utf-8").rstrip())
    print(f"enabled in {profile_dir(args.home) / 'QGIS' / 'QGIS3.ini'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
