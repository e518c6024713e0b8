"""The "Set up Python environment…" dialog with real widgets (offscreen): what, where, how
large; CPU/GPU choice; a real install (a tiny requirement file) with progress and log, then
"Remove environment"; a real cancel of the full install; no usable Python."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from hsi_cluster_plugin import environment as env
from hsi_cluster_plugin.installer_dialog import InstallerDialog

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = env.PythonCandidate("/usr/bin/python3", "the system Python", (3, 11))
REQUIREMENTS = (str(REPO_ROOT / "requirements.txt"), str(REPO_ROOT / "constraints.txt"))


def _wait_for(app, condition, limit_seconds: float = 300.0) -> None:
    """Let Qt run until ``condition()`` (a safety limit, not a speed assertion)."""
    deadline = time.monotonic() + limit_seconds
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        app.processEvents()
        time.sleep(0.05)


@pytest.fixture
def dialogs(qgis_app):
    made = []
    yield made
    for dialog in made:
        dialog.close()
        dialog.deleteLater()
    qgis_app.processEvents()


def _dialog(dialogs, tmp_path, **options) -> InstallerDialog:
    options.setdefault("environment_dir", str(tmp_path / "profile" / "python-env"))
    options.setdefault("base_python", SYSTEM_PYTHON)
    options.setdefault("gpu_name", "")
    options.setdefault("requirements", REQUIREMENTS)
    dialog = InstallerDialog(**options)
    dialogs.append(dialog)
    dialog.show()
    return dialog


def test_dialog_says_what_where_and_how_large(dialogs, tmp_path) -> None:
    dialog = _dialog(dialogs, tmp_path)
    text = dialog.summary_text()
    assert "torch 2.13.0, numpy, scipy" in text and "rasterio" in text and "constraints.txt" in text
    assert str(tmp_path / "profile" / "python-env") in text and "/usr/bin/python3" in text
    assert "about 1.8 GB" in text and "CPU build" in text
    assert dialog.cpu_button.isChecked() and not dialog.gpu_button.isEnabled()
    assert "no NVIDIA GPU found" in dialog.gpu_button.text()
    assert dialog.install_button.isEnabled() and not dialog.remove_button.isEnabled()
    assert not dialog.cancel_button.isEnabled()
    assert dialog.status.text() == "No environment yet."


def test_gpu_build_only_when_a_gpu_is_found(dialogs, tmp_path) -> None:
    dialog = _dialog(dialogs, tmp_path, gpu_name="NVIDIA T4")
    assert dialog.gpu_button.isEnabled() and "NVIDIA T4" in dialog.gpu_button.text()
    dialog.gpu_button.setChecked(True)
    assert dialog.build == "gpu"
    assert "GPU build" in dialog.summary_text() and "about 6.5 GB" in dialog.summary_text()


def test_no_usable_python_disables_install_and_says_what_to_do(dialogs, tmp_path) -> None:
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 'No module named ensurepip' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    dialog = _dialog(dialogs, tmp_path, base_python=None,
                     candidates=[env.PythonCandidate(str(fake), "a Python on PATH")])
    assert not dialog.install_button.isEnabled()
    text = dialog.summary_text()
    assert "no usable Python found" in text and "python.org" in text
    assert "No module named ensurepip" in text


def test_install_with_progress_and_log_then_remove(dialogs, tmp_path, qgis_app,
                                                   monkeypatch) -> None:
    # A tiny requirement file keeps this fast; the full set is installed by
    # tests/test_environment.py. No torch in it, so no torch index and no self-test.
    monkeypatch.setenv(env.ENV_VAR_TORCH_INDEX, "")
    tiny = tmp_path / "requirements.txt"
    tiny.write_text("psutil>=5.9\n")
    dialog = _dialog(dialogs, tmp_path, requirements=(str(tiny), ""),
                     options=env.InstallOptions(verify=False))
    changed = []
    dialog.environmentChanged.connect(changed.append)
    dialog.install_button.click()
    assert dialog.is_running() and dialog.cancel_button.isEnabled()
    assert not dialog.install_button.isEnabled()
    _wait_for(qgis_app, lambda: dialog.outcome)
    assert dialog.outcome == "installed", dialog.status.text()
    assert dialog.progress.value() == 100
    assert "Successfully installed psutil" in dialog.log.toPlainText()
    assert dialog.status.text().startswith("Installed in")
    assert dialog.remove_button.isEnabled() and dialog.install_button.text() == "Reinstall"
    target = Path(dialog.environment_dir)
    assert Path(env.venv_python(str(target))).is_file() and env.read_marker(str(target))

    dialog.remove_button.click()
    assert not target.exists() and dialog.status.text() == f"Removed {target}."
    assert not dialog.remove_button.isEnabled()
    assert changed == [str(target), str(target)]


def test_cancel_a_real_install(dialogs, tmp_path, qgis_app, monkeypatch) -> None:
    monkeypatch.setenv(env.ENV_VAR_TORCH_INDEX, "")
    dialog = _dialog(dialogs, tmp_path)
    dialog.install_button.click()
    _wait_for(qgis_app, lambda: "-m pip install" in dialog.log.toPlainText())
    dialog.cancel_button.click()
    _wait_for(qgis_app, lambda: dialog.outcome)
    assert dialog.outcome == "cancelled"
    assert dialog.status.text() == "Cancelled: nothing was changed."
    parent = Path(dialog.environment_dir).parent
    assert list(parent.iterdir()) == []
    assert dialog.install_button.isEnabled()


def test_plugin_opens_the_installer_and_closes_it_on_unload(qgis_app) -> None:
    from qgis.core import QgsApplication
    from qgis.PyQt import sip

    import hsi_cluster_plugin

    plugin = hsi_cluster_plugin.classFactory(None)
    plugin.initGui()  # no iface: no menu entry, no error
    assert plugin.environment_action is None
    dialog = plugin.show_environment_dialog()
    assert isinstance(dialog, InstallerDialog) and dialog.isVisible()
    assert plugin.show_environment_dialog() is dialog  # one dialog at a time
    expected = Path(QgsApplication.qgisSettingsDirPath()) / "hsi_cluster" / "python-env"
    assert Path(dialog.environment_dir) == expected
    assert dialog.base_python is not None  # this machine has a usable system Python
    plugin.unload()
    QgsApplication.sendPostedEvents(None, 52)  # QEvent.DeferredDelete
    assert sip.isdeleted(dialog) and plugin.environment_dialog is None


DESKTOP_SCRIPT = '''
import json, traceback
from qgis.PyQt.QtCore import QTimer
from qgis.core import QgsApplication
from qgis.utils import iface, plugins

def check():
    result = {}
    try:
        menus = [a.menu() for a in iface.pluginMenu().actions()
                 if a.menu() is not None and a.text().replace("&", "") == "HSI Cluster"]
        entries = [a for a in menus[0].actions() if a.text() == "Set up Python environment…"]
        result["entries"] = len(entries)
        entries[0].trigger()
        dialog = plugins["hsi_cluster"].environment_dialog
        QgsApplication.processEvents()
        result["visible"] = dialog.isVisible()
        result["where"] = dialog.environment_dir
    except Exception:
        result["error"] = traceback.format_exc()
    with open(OUT, "w") as handle:
        json.dump(result, handle)
    QgsApplication.exit(0)

QTimer.singleShot(2000, check)
'''


def _free_display() -> int:
    for number in range(90, 140):
        if not Path(f"/tmp/.X{number}-lock").exists() and \
                not Path(f"/tmp/.X11-unix/X{number}").exists():
            return number
    raise RuntimeError("no free X display number")


def test_desktop_qgis_menu_entry_opens_the_installer(qgis_home, tmp_path) -> None:
    """Real desktop QGIS under Xvfb: Plugins > HSI Cluster > Set up Python environment…"""
    import json
    import os
    import shutil
    import subprocess

    if not (shutil.which("Xvfb") and shutil.which("qgis")):
        pytest.skip("desktop QGIS or Xvfb missing (make setup installs them)")
    out = tmp_path / "result.json"
    script = tmp_path / "check.py"
    script.write_text(f"OUT = {str(out)!r}\n" + DESKTOP_SCRIPT, encoding="utf-8")
    display = _free_display()
    xvfb = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", "1280x1024x24"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = dict(os.environ, HOME=str(qgis_home), DISPLAY=f":{display}",
                   XDG_RUNTIME_DIR=str(qgis_home / "xdg-runtime"))
        env.pop("QT_QPA_PLATFORM", None)
        subprocess.run(["qgis", "--nologo", "--noversioncheck", "--code", str(script)],
                       env=env, capture_output=True, timeout=600)
    finally:
        xvfb.terminate()
        xvfb.wait(10)
    result = json.loads(out.read_text())
    assert "error" not in result, result.get("error")
    assert result["entries"] == 1 and result["visible"] is True
    assert result["where"].startswith(str(qgis_home)) and \
        result["where"].endswith("hsi_cluster/python-env")
