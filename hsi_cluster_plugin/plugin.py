"""The QGIS plugin class: registers the HSI Cluster Processing provider and offers the embedding
dock (toolbar button and Plugins > HSI Cluster menu).

Loading this plugin must never break QGIS start-up: every step is wrapped, and failures are
logged to the message log under the tag "HSI Cluster" (and shown in the message bar in desktop
QGIS) instead of raised.
"""

from __future__ import annotations

import os
import traceback

from qgis.core import Qgis, QgsApplication, QgsMessageLog

from .dependencies import add_configured_python_path, install_hint, missing_dependencies

LOG_TAG = "HSI Cluster"
PROVIDER_ID = "hsicluster"
MENU = "&HSI Cluster"


def _log(message: str, level=Qgis.Info) -> None:
    QgsMessageLog.logMessage(message, LOG_TAG, level)


def _is_deleted(obj) -> bool:
    try:
        from qgis.PyQt import sip

        return sip.isdeleted(obj)
    except Exception:
        return False


class HSIClusterPlugin:
    """Plugin object created by ``classFactory``; ``iface`` is None under ``qgis_process``."""

    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None  # the embedding dock, created the first time it is shown
        self.dock_action = None
        self.environment_action = None  # Plugins > HSI Cluster > Set up Python environment…
        self.environment_dialog = None
        self.missing: list[str] = []
        self._warned = False

    # -- Processing -------------------------------------------------------------------------
    def initProcessing(self) -> None:
        """Register the Processing provider if the Python dependencies import.

        Called by ``qgis_process`` (and by :meth:`initGui` in desktop QGIS). Safe to call again:
        an already registered provider is kept.
        """
        if self.provider is not None and not _is_deleted(self.provider):
            return
        self.provider = None
        try:
            self.missing = missing_dependencies()
            if self.missing:
                added = add_configured_python_path()
                if added:
                    _log(f"added to sys.path for dependencies: {', '.join(added)}")
                    self.missing = missing_dependencies()
            if self.missing:
                self._warn_missing()
                return

            from processing_provider.provider import HSIClusterProvider

            provider = HSIClusterProvider()
            if QgsApplication.processingRegistry().addProvider(provider):
                self.provider = provider
            else:
                _log(
                    f"could not register the Processing provider '{PROVIDER_ID}' "
                    "(is another provider with that id already registered?)",
                    Qgis.Warning,
                )
        except Exception:
            _log(
                "failed to initialise the Processing provider:\n" + traceback.format_exc(),
                Qgis.Critical,
            )

    def _warn_missing(self) -> None:
        hint = install_hint(self.missing)
        _log(hint, Qgis.Warning)
        if self.iface is None or self._warned:
            return
        self._warned = True
        try:
            self.iface.messageBar().pushMessage(
                LOG_TAG,
                "missing Python packages: "
                + ", ".join(self.missing)
                + ". See View > Panels > Log Messages (tab 'HSI Cluster') for how to install them.",
                level=Qgis.Warning,
                duration=0,
            )
        except Exception:
            _log("could not show the message bar warning:\n" + traceback.format_exc())

    # -- GUI ----------------------------------------------------------------------------------
    def initGui(self) -> None:
        """Desktop QGIS entry point (``qgis_process`` only calls :meth:`initProcessing`)."""
        try:
            self.initProcessing()
        except Exception:
            _log("initGui failed:\n" + traceback.format_exc(), Qgis.Critical)
        try:
            self._add_dock_action()
        except Exception:
            _log("could not add the embedding panel:\n" + traceback.format_exc(), Qgis.Critical)
        try:
            self._add_environment_action()
        except Exception:
            _log("could not add the environment menu entry:\n" + traceback.format_exc(),
                 Qgis.Critical)

    def _add_environment_action(self) -> None:
        """Plugins > HSI Cluster > Set up Python environment… (the installer dialog)."""
        if self.iface is None or self.environment_action is not None:
            return
        from qgis.PyQt.QtWidgets import QAction

        action = QAction("Set up Python environment…", self.iface.mainWindow())
        action.setObjectName("HSIClusterEnvironmentAction")
        action.triggered.connect(self.show_environment_dialog)
        self.iface.addPluginToMenu(MENU, action)
        self.environment_action = action

    def show_environment_dialog(self):
        """Open the environment installer (one dialog at a time); returns it."""
        try:
            if self.environment_dialog is None or _is_deleted(self.environment_dialog):
                from .installer_dialog import InstallerDialog

                parent = self.iface.mainWindow() if self.iface is not None else None
                self.environment_dialog = InstallerDialog(parent)
            self.environment_dialog.show()
            self.environment_dialog.raise_()
            return self.environment_dialog
        except Exception:
            _log("could not open the environment installer:\n" + traceback.format_exc(),
                 Qgis.Critical)
            return None

    def _add_dock_action(self) -> None:
        """Toolbar button, View menu and Plugins > HSI Cluster menu entries toggling the
        embedding dock (the dock itself also appears under View > Panels once created). The dock
        needs only numpy and PyQGIS, so it is offered even when the Processing dependencies are
        missing."""
        if self.iface is None or self.dock_action is not None:
            return
        from qgis.PyQt.QtGui import QIcon
        from qgis.PyQt.QtWidgets import QAction

        icon = QIcon(os.path.join(os.path.dirname(__file__), "icon_embedding.svg"))
        action = QAction(icon, "HSI Cluster embedding panel", self.iface.mainWindow())
        action.setObjectName("HSIClusterEmbeddingPanelAction")
        action.setCheckable(True)
        action.setToolTip("Show the segment embedding (UMAP) of a labelling layer, brush it, "
                          "label segments")
        action.toggled.connect(self.show_dock)
        self.iface.addToolBarIcon(action)
        self.iface.addPluginToMenu(MENU, action)
        view_menu = self.iface.viewMenu()
        if view_menu is not None:
            view_menu.addAction(action)
        self.dock_action = action

    def create_dock(self):
        """The embedding dock (created once); works without ``iface`` too (tests)."""
        if self.dock is None or _is_deleted(self.dock):
            from .dock.embedding_dock import EmbeddingDock

            parent = self.iface.mainWindow() if self.iface is not None else None
            self.dock = EmbeddingDock(self.iface, parent)
            if self.iface is not None:
                from qgis.PyQt.QtCore import Qt

                self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
                layer = self.iface.activeLayer()
                if layer is not None:
                    self.dock.set_layer(layer)
            if self.dock_action is not None:
                self.dock.setToggleVisibilityAction(self.dock_action)
        return self.dock

    def show_dock(self, visible: bool = True) -> None:
        try:
            if visible or self.dock is not None:
                self.create_dock().setUserVisible(bool(visible))
        except Exception:
            _log("could not show the embedding panel:\n" + traceback.format_exc(), Qgis.Critical)

    def _remove_dock(self) -> None:
        dock, self.dock = self.dock, None
        action, self.dock_action = self.dock_action, None
        if action is not None and self.iface is not None:
            try:
                self.iface.removePluginMenu(MENU, action)
                self.iface.removeToolBarIcon(action)
                view_menu = self.iface.viewMenu()
                if view_menu is not None:
                    view_menu.removeAction(action)
            except Exception:
                _log("could not remove the panel action:\n" + traceback.format_exc())
        if dock is not None and not _is_deleted(dock):
            dock.close_down()
            if self.iface is not None:
                self.iface.removeDockWidget(dock)
            dock.setParent(None)
            dock.deleteLater()
        if action is not None and not _is_deleted(action):
            action.deleteLater()

    def _remove_environment_action(self) -> None:
        dialog, self.environment_dialog = self.environment_dialog, None
        if dialog is not None and not _is_deleted(dialog):
            dialog.close()  # cancels a running install
            dialog.deleteLater()
        action, self.environment_action = self.environment_action, None
        if action is not None and self.iface is not None:
            self.iface.removePluginMenu(MENU, action)
        if action is not None and not _is_deleted(action):
            action.deleteLater()

    def unload(self) -> None:
        """Remove the dock and the provider; safe to call more than once."""
        try:
            self._remove_dock()
        except Exception:
            _log("removing the embedding panel failed:\n" + traceback.format_exc(), Qgis.Warning)
        try:
            self._remove_environment_action()
        except Exception:
            _log("removing the environment menu entry failed:\n" + traceback.format_exc(),
                 Qgis.Warning)
        provider, self.provider = self.provider, None
        if provider is None or _is_deleted(provider):
            return
        try:
            registry = QgsApplication.processingRegistry()
            if registry.providerById(PROVIDER_ID) is not None:
                registry.removeProvider(provider)
        except Exception:
            _log("unload failed:\n" + traceback.format_exc(), Qgis.Warning)
