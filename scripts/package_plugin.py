#!/usr/bin/env python3
"""Build the QGIS plugin zip ``dist/hsi_cluster.zip`` (pure Python, no QGIS import).

The zip has a single top folder ``hsi_cluster/`` with the same files that
``scripts/install_plugin.py`` installs (both use ``install_plugin.iter_plugin_files``), minus
``python_path.txt``, which only makes sense on the machine that ran ``make install``. It installs
in desktop QGIS with Plugins > Manage and Install Plugins > Install from ZIP.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from install_plugin import PLUGIN_NAME, REPO_ROOT, iter_plugin_files  # noqa: E402

# Fixed timestamp so that two builds of the same sources give the same zip.
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)


def build_zip(output: Path, repo_root: Path = REPO_ROOT) -> Path:
    """Write the plugin zip to ``output`` and return it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for src, rel in iter_plugin_files(repo_root):
            info = zipfile.ZipInfo(f"{PLUGIN_NAME}/{rel}", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = 0o755 if src.stat().st_mode & 0o111 else 0o644
            info.external_attr = (0o100000 | mode) << 16  # regular file + permissions
            zf.writestr(info, src.read_bytes())
    tmp.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=REPO_ROOT / "dist" / f"{PLUGIN_NAME}.zip",
        help="zip to write (default: dist/hsi_cluster.zip)",
    )
    args = parser.parse_args(argv)
    out = build_zip(args.output)
    with zipfile.ZipFile(out) as zf:
        count = len(zf.namelist())
    print(f"wrote {out} ({count} files, {out.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
