"""The "Set up Python environment…" dialog: says what will be installed, where and roughly how
large, lets the user choose a CPU or (when an NVIDIA GPU is found) a GPU build, runs the
installer with a progress bar and a log, cancels it, and removes the environment again.

Only ``qgis.PyQt`` widgets; the work is :class:`environment.Installer`, run in a Python thread
whose messages a timer moves into the widgets (widgets are touched from the GUI thread only).
"""

from __future__ import annotations

import html
import os
import queue
import re
import threading

from qgis.PyQt.QtCore import Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSizePolicy,
    QVBoxLayout,
)

from . import environment as env

POLL_MS = 100


def _requirement_names(path: str) -> list:
    """Package names of a requirements file; exact pins keep their version (torch 2.13.0)."""
    names = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = line.partition("==")
            if version:
                names.append(f"{name.strip()} {version.strip()}")
            else:
                names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
    return names


class InstallerDialog(QDialog):
    """Set up (or remove) the engine's Python environment.

    Everything the dialog would discover can be passed in (tests, or a caller that knows):
    ``environment_dir`` (default: in the QGIS profile), ``base_python`` (a PythonCandidate;
    default: the first usable one), ``gpu_name`` ("" = no GPU; default: ask nvidia-smi),
    ``requirements`` ((requirements.txt, constraints.txt)), ``options`` (InstallOptions);
    ``candidates``: the base Pythons to try when ``base_python`` is not given.
    """

    environmentChanged = pyqtSignal(str)  # the environment folder, after install or removal

    def __init__(self, parent=None, environment_dir: str | None = None, base_python=None,
                 gpu_name: str | None = None, requirements: tuple | None = None,
                 options: env.InstallOptions | None = None, candidates: list | None = None):
        super().__init__(parent)
        self.setObjectName("HSIClusterInstallerDialog")
        self.setWindowTitle("HSI Cluster – Python environment")
        self.environment_dir = environment_dir or env.default_environment_dir()
        self.options = options or env.InstallOptions()
        self.gpu_name = env.detect_nvidia_gpu() if gpu_name is None else gpu_name
        self.requirements, self.constraints = requirements or env.requirement_files()
        self.rejected_pythons: list = []
        if base_python is None:
            if candidates is None:
                candidates = env.qgis_base_python_candidates()
            base_python, self.rejected_pythons = env.choose_base_python(candidates,
                                                                        self.options.env)
        self.base_python = base_python
        self.installer: env.Installer | None = None
        self.thread: threading.Thread | None = None
        self.messages: queue.Queue = queue.Queue()
        self.outcome = ""  # "installed", "cancelled", "failed", "removed"
        self._build()
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._drain)
        self._refresh()

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        intro = QLabel("HSI Cluster runs its engine in a Python environment of its own, "
                       "separate from QGIS's Python (nothing is installed into QGIS).")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        form = QFormLayout()
        self.summary_labels = {}
        for key, title in (("what", "Installs"), ("where", "Where"), ("from", "Built from"),
                           ("size", "Size")):
            label = QLabel()
            label.setObjectName(f"{key}Label")
            label.setWordWrap(True)
            label.setTextFormat(Qt.TextFormat.RichText)  # scoped enum: PyQt5 and PyQt6
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            # Wrapped labels must not be squeezed below the height of their wrapped text.
            label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
            form.addRow(f"<b>{title}:</b>", label)
            self.summary_labels[key] = label
        layout.addLayout(form)

        build_box = QGroupBox("Build")
        build_layout = QVBoxLayout(build_box)
        self.cpu_button = QRadioButton("CPU (works on every computer)")
        self.cpu_button.setObjectName("cpuButton")
        gpu_text = (f"GPU, NVIDIA CUDA ({self.gpu_name})" if self.gpu_name
                    else "GPU, NVIDIA CUDA (no NVIDIA GPU found)")
        self.gpu_button = QRadioButton(gpu_text)
        self.gpu_button.setObjectName("gpuButton")
        self.gpu_button.setEnabled(bool(self.gpu_name))
        self.cpu_button.setChecked(True)
        self.build_group = QButtonGroup(self)
        self.build_group.addButton(self.cpu_button)
        self.build_group.addButton(self.gpu_button)
        self.cpu_button.toggled.connect(lambda _checked: self._refresh())
        build_layout.addWidget(self.cpu_button)
        build_layout.addWidget(self.gpu_button)
        layout.addWidget(build_box)

        self.status = QLabel()
        self.status.setObjectName("statusLabel")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.log = QPlainTextEdit()
        self.log.setObjectName("installerLog")
        self.log.setReadOnly(True)
        self.log.setMinimumHeight(160)
        layout.addWidget(self.log)

        buttons = QHBoxLayout()
        self.install_button = QPushButton("Install")
        self.install_button.setObjectName("installButton")
        self.install_button.clicked.connect(self.start_install)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.clicked.connect(self.cancel_install)
        self.remove_button = QPushButton("Remove environment")
        self.remove_button.setObjectName("removeButton")
        self.remove_button.clicked.connect(self.remove_environment)
        self.close_button = QPushButton("Close")
        self.close_button.setObjectName("closeButton")
        self.close_button.clicked.connect(self.close)
        for button in (self.install_button, self.cancel_button, self.remove_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        layout.addLayout(buttons)
        self.resize(680, 620)

    def summary_text(self) -> str:
        """The summary as plain text (what, where, from, size)."""
        return "\n".join(label.text() for label in self.summary_labels.values())

    @property
    def build(self) -> str:
        return "gpu" if self.gpu_button.isChecked() else "cpu"

    def size_text(self) -> str:
        size = env.size_estimate_mb(self.build) / 1000.0
        return f"about {size:.1f} GB on disk (a similar amount is downloaded)"

    def _refresh(self) -> None:
        packages = ", ".join(_requirement_names(self.requirements))
        if self.base_python is not None:
            version = ".".join(str(v) for v in (self.base_python.version or ()))
            source = (f"{html.escape(self.base_python.path)} ({self.base_python.source}"
                      + (f", Python {version}" if version else "") + ")")
        else:
            tried = "; ".join(f"{c.path}: {why}" for c, why in self.rejected_pythons)
            source = ("<b>no usable Python found</b>: install Python "
                      f"{env.MIN_PYTHON[0]}.{env.MIN_PYTHON[1]}–{env.MAX_PYTHON[0]}."
                      f"{env.MAX_PYTHON[1]} (python.org, or your system's package manager) "
                      "and open this dialog again." + (f" Tried: {html.escape(tried)}"
                                                       if tried else ""))
        labels = self.summary_labels
        labels["what"].setText(html.escape(packages) + (
            f" (versions pinned by {html.escape(os.path.basename(self.constraints))})"
            if self.constraints else ""))
        labels["where"].setText(html.escape(self.environment_dir))
        labels["from"].setText(source)
        labels["size"].setText(f"{self.size_text()}; {self.build.upper()} build of PyTorch.")
        running = self.thread is not None and self.thread.is_alive()
        marker = env.read_marker(self.environment_dir)
        self.install_button.setEnabled(not running and self.base_python is not None)
        self.install_button.setText("Reinstall" if marker else "Install")
        self.cancel_button.setEnabled(running)
        self.remove_button.setEnabled(not running and marker is not None)
        self.cpu_button.setEnabled(not running)
        self.gpu_button.setEnabled(not running and bool(self.gpu_name))
        if running:
            return
        if marker:
            self.status.setText(
                f"Installed: {str(marker.get('build', '?')).upper()} build, Python "
                f"{marker.get('python', '?')}, torch "
                f"{(marker.get('versions') or {}).get('torch', '?')}, "
                f"{marker.get('size_mb', '?')} MB, created {marker.get('created', '?')}.")
        elif not self.outcome:
            self.status.setText("No environment yet.")

    # ------------------------------------------------------------------ actions
    def start_install(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        plan = env.InstallPlan(
            base_python=self.base_python.path, target=self.environment_dir,
            requirements=self.requirements, constraints=self.constraints, build=self.build,
            torch_index=env.torch_index_url(self.build, environ=self.options.env),
        )
        self.installer = env.Installer(
            plan, self.options,
            on_log=lambda text: self.messages.put(("log", text)),
            on_progress=lambda fraction, stage: self.messages.put(("progress", fraction,
                                                                   stage)),
        )
        self.outcome = ""
        self.progress.setValue(0)
        self.log.clear()
        self.status.setText(f"Installing the {self.build.upper()} build…")

        def work(installer: env.Installer = self.installer) -> None:
            try:
                marker = installer.run()
            except env.InstallCancelled:
                self.messages.put(("done", "cancelled", "Cancelled: nothing was changed."))
            except env.InstallError as error:
                self.messages.put(("done", "failed", str(error)))
            except Exception as error:  # a bug: still tell the user, never kill QGIS
                self.messages.put(("done", "failed", f"{type(error).__name__}: {error}"))
            else:
                self.messages.put(("done", "installed",
                                   f"Installed in {marker.get('seconds')} s "
                                   f"({marker.get('size_mb')} MB)."))

        self.thread = threading.Thread(target=work, name="hsi-cluster-installer", daemon=True)
        self.thread.start()
        self._timer.start()
        self._refresh()

    def cancel_install(self) -> None:
        if self.installer is not None and self.thread is not None and self.thread.is_alive():
            self.installer.cancel()
            self.status.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

    def remove_environment(self) -> None:
        try:
            removed = env.remove_environment(self.environment_dir)
        except (env.InstallError, OSError) as error:
            self.status.setText(f"Not removed: {error}")
            return
        self.outcome = "removed" if removed else self.outcome
        self.status.setText(f"Removed {self.environment_dir}." if removed
                            else "There is no environment to remove.")
        self._refresh()
        if removed:
            self.environmentChanged.emit(self.environment_dir)

    def is_running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # ------------------------------------------------------------------ messages
    def _drain(self) -> None:
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                break
            if message[0] == "log":
                self.log.appendPlainText(message[1])
            elif message[0] == "progress":
                self.progress.setValue(int(round(100 * message[1])))
                self.status.setText(f"{message[2]}…")
            elif message[0] == "done":
                self._timer.stop()
                if self.thread is not None:
                    self.thread.join(5)
                self.outcome = message[1]
                self._refresh()
                self.status.setText(message[2])
                self.log.appendPlainText(message[2])
                if self.outcome == "installed":
                    self.progress.setValue(100)
                    self.environmentChanged.emit(self.environment_dir)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        """Closing while installing cancels the install (its folder is removed)."""
        if self.is_running():
            self.cancel_install()
            self.thread.join(10)
            self._drain()
        super().closeEvent(event)
