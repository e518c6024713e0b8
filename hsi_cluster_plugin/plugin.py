"""The QGIS plugin class: registers the HSI Cluster Processing provider.

Loading this plugin must never break QGIS start-up: every step is wrapped, and failures are
logged to the message log under the tag "HSI Cluster" (and shown in the message bar in desktop
QGIS) instead of raised.
"""

from __future__ import annotations

import traceback

from qgis.core import Qgis, QgsApplication, QgsMessageLog

from .dependencies import add_configured_python_path, install_hint, missing_dependencies

LOG_TAG = "HSI Cluster"
PROVIDER_ID = "hsicluster"


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
            # A dock widget (interactive clustering panel) will be created here later.
        except Exception:
            _log("initGui failed:\n" + traceback.format_exc(), Qgis.Critical)

    def unload(self) -> None:
        """Remove the provider from the registry; safe to call more than once."""
        provider, self.provider = self.provider, None
        if provider is None or _is_deleted(provider):
            return
        try:
            registry = QgsApplication.processingRegistry()
            if registry.providerById(PROVIDER_ID) is not None:
                registry.removeProvider(provider)
        except Exception:
            _log("unload failed:\n" + traceback.format_exc(), Qgis.Warning)
