"""Synthetic segment GeoPackages for the dock widget tests and bench/dock_bench.py.

The file has the layout of GRAPH_INTERFACE.md (what "Build labelling embedding" writes): a
``segments`` layer (square polygons on a grid, grouped in square chips), a ``chips`` layer, and the
attribute-only ``segment_embeddings`` table. Classes are spatially coherent patches (nearest of a
few random seed points); each class is one Gaussian blob in UMAP space and in embedding space, so
brushing a blob selects a patch on the map and label propagation has something to find.
Written with OGR in one transaction per layer: 100k segments take a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from osgeo import ogr, osr

ogr.UseExceptions()
osr.UseExceptions()


@dataclass
class SyntheticSegments:
    path: Path
    n_segments: int
    n_chips: int
    umap: np.ndarray  # (n, 2) float64, row i = feature with segment_id i (fid i + 1)
    cls: np.ndarray  # (n,) int, 1..n_classes (= fcm_cluster)
    chip: np.ndarray  # (n,) int chip id
    embedding: np.ndarray  # (n, dim) float64
    cell: float  # side of one square segment in CRS units
    origin: tuple[float, float]  # (x, y) of the upper-left corner


def make_segment_gpkg(
    path: str | Path,
    side: int = 20,
    chip_side: int = 5,
    n_classes: int = 4,
    dim: int = 8,
    epsg: int = 32633,
    seed: int = 0,
    cell: float = 10.0,
    origin: tuple[float, float] = (500000.0, 5800000.0),
    with_chips: bool = True,
    with_embeddings: bool = True,
    umap_fields: bool = True,
) -> SyntheticSegments:
    """Write ``side x side`` square segments (row-major; segment_id = fid - 1) to ``path``."""
    path = Path(path)
    if path.exists():
        path.unlink()
    rng = np.random.default_rng(seed)
    n = side * side
    rows, cols = np.divmod(np.arange(n), side)
    seeds = rng.uniform(0, side, size=(n_classes, 2))
    d2 = (rows[:, None] - seeds[None, :, 0]) ** 2 + (cols[:, None] - seeds[None, :, 1]) ** 2
    cls = np.argmin(d2, axis=1) + 1
    angles = np.linspace(0, 2 * np.pi, n_classes, endpoint=False)
    centres = np.stack([6 * np.cos(angles), 6 * np.sin(angles)], axis=1)
    umap = centres[cls - 1] + rng.normal(0, 1.0, size=(n, 2))
    emb_centres = rng.normal(0, 3.0, size=(n_classes, dim))
    embedding = emb_centres[cls - 1] + rng.normal(0, 0.5, size=(n, dim))
    chips_per_row = -(-side // chip_side)
    chip = (rows // chip_side) * chips_per_row + cols // chip_side
    n_chips = int(chip.max()) + 1

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    driver = ogr.GetDriverByName("GPKG")
    ds = driver.CreateDataSource(str(path))
    x0, y0 = origin

    def square(r0: float, c0: float, h: float, w: float) -> str:
        xa, xb = x0 + c0 * cell, x0 + (c0 + w) * cell
        ya, yb = y0 - r0 * cell, y0 - (r0 + h) * cell
        return f"(({xa} {ya},{xb} {ya},{xb} {yb},{xa} {yb},{xa} {ya}))"

    seg = ds.CreateLayer("segments", srs, ogr.wkbMultiPolygon, ["FID=fid"])
    for name, kind in (("segment_id", ogr.OFTInteger), ("chip_id", ogr.OFTInteger),
                       ("n_pixels", ogr.OFTInteger), ("umap_x", ogr.OFTReal),
                       ("umap_y", ogr.OFTReal), ("fcm_cluster", ogr.OFTInteger),
                       ("label", ogr.OFTString), ("area", ogr.OFTReal)):
        if not umap_fields and name in ("umap_x", "umap_y"):
            continue
        seg.CreateField(ogr.FieldDefn(name, kind))
    defn = seg.GetLayerDefn()
    seg.StartTransaction()
    for i in range(n):
        f = ogr.Feature(defn)
        f.SetFID(i + 1)
        f.SetField("segment_id", i)
        f.SetField("chip_id", int(chip[i]))
        f.SetField("n_pixels", 1)
        if umap_fields:
            f.SetField("umap_x", float(umap[i, 0]))
            f.SetField("umap_y", float(umap[i, 1]))
        f.SetField("fcm_cluster", int(cls[i]))
        f.SetFieldNull("label")
        f.SetField("area", cell * cell)
        f.SetGeometry(ogr.CreateGeometryFromWkt(f"MULTIPOLYGON({square(rows[i], cols[i], 1, 1)})"))
        seg.CreateFeature(f)
    seg.CommitTransaction()

    if with_chips:
        lay = ds.CreateLayer("chips", srs, ogr.wkbPolygon, ["FID=fid"])
        for name, kind in (("chip_id", ogr.OFTInteger), ("umap_x", ogr.OFTReal),
                           ("umap_y", ogr.OFTReal), ("n_segments", ogr.OFTInteger)):
            lay.CreateField(ogr.FieldDefn(name, kind))
        defn = lay.GetLayerDefn()
        lay.StartTransaction()
        for c in range(n_chips):
            members = chip == c
            cr, cc = divmod(c, chips_per_row)
            f = ogr.Feature(defn)
            f.SetFID(c + 1)
            f.SetField("chip_id", c)
            f.SetField("umap_x", float(umap[members, 0].mean()))
            f.SetField("umap_y", float(umap[members, 1].mean()))
            f.SetField("n_segments", int(members.sum()))
            h = min(chip_side, side - cr * chip_side)
            w = min(chip_side, side - cc * chip_side)
            f.SetGeometry(ogr.CreateGeometryFromWkt(
                f"POLYGON{square(cr * chip_side, cc * chip_side, h, w)}"))
            lay.CreateFeature(f)
        lay.CommitTransaction()

    if with_embeddings:
        lay = ds.CreateLayer("segment_embeddings", None, ogr.wkbNone, ["FID=fid"])
        lay.CreateField(ogr.FieldDefn("segment_id", ogr.OFTInteger))
        for j in range(dim):
            lay.CreateField(ogr.FieldDefn(f"e{j}", ogr.OFTReal))
        defn = lay.GetLayerDefn()
        lay.StartTransaction()
        for i in range(n):
            f = ogr.Feature(defn)
            f.SetFID(i + 1)
            f.SetField("segment_id", i)
            for j in range(dim):
                f.SetField(j + 1, float(embedding[i, j]))
            lay.CreateFeature(f)
        lay.CommitTransaction()
    ds = None
    return SyntheticSegments(path, n, n_chips, umap, cls, chip, embedding, cell, origin)
