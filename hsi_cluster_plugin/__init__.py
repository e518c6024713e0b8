"""HSI Cluster: hyperspectral clustering methods for QGIS (plugin entry point).

QGIS imports this package and calls :func:`classFactory`. Before anything else the plugin puts its
own folder on ``sys.path``, so that ``engine`` and ``processing_provider``, which sit inside the
installed plugin folder, import as top-level packages. In a source checkout, where they sit next to
``hsi_cluster_plugin/`` rather than inside it, the checkout root is put on ``sys.path`` instead.
"""

import os
import sys

_PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def _add_own_folder_to_sys_path() -> None:
    if os.path.isdir(os.path.join(_PLUGIN_DIR, "engine")):
        folder = _PLUGIN_DIR  # installed plugin: engine/ is inside the plugin folder
    else:
        folder = os.path.dirname(_PLUGIN_DIR)  # source checkout: engine/ is beside it
    if folder not in sys.path:
        sys.path.insert(0, folder)


_add_own_folder_to_sys_path()


def classFactory(iface):
    """Called by QGIS (desktop with its ``iface``, ``qgis_process`` with ``None``)."""
    from .plugin import HSIClusterPlugin

    return HSIClusterPlugin(iface)
