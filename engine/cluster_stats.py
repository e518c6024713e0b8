"""Per-cluster pixel counts and areas of a cluster map, for the log and the outputs' metadata."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from affine import Affine


@dataclass(frozen=True)
class ClusterStatistics:
    """``pixels[c - 1]`` valid pixels in cluster c; ``pixel_area`` in ``area_unit``."""

    pixels: np.ndarray
    pixel_area: float
    area_unit: str

    @property
    def areas(self) -> np.ndarray:
        return self.pixels * self.pixel_area

    @property
    def total_pixels(self) -> int:
        return int(self.pixels.sum())

    def lines(self, class_name: str = "Cluster") -> list[str]:
        """One log line per cluster: pixels, share of the clustered pixels, area."""
        total = max(self.total_pixels, 1)
        hectares = self.area_unit == "square metre"
        lines = []
        for cluster, (count, area) in enumerate(zip(self.pixels.tolist(), self.areas.tolist()),
                                                start=1):
            text = (f"{class_name} {cluster}: {count:,} pixels ({100.0 * count / total:.1f} %), "
                    f"{area:,.6g} {self.area_unit}")
            if hectares:
                text += f" ({area / 1e4:,.2f} ha)"
            lines.append(text)
        return lines

    def metadata(self) -> dict[str, str]:
        """GDAL metadata items: CLUSTER_<c>_PIXELS, CLUSTER_<c>_AREA, AREA_UNIT, PIXEL_AREA."""
        items = {"AREA_UNIT": self.area_unit, "PIXEL_AREA": f"{self.pixel_area:.10g}",
                 "N_CLUSTERS": str(len(self.pixels))}
        for cluster, (count, area) in enumerate(zip(self.pixels.tolist(), self.areas.tolist()),
                                                start=1):
            items[f"CLUSTER_{cluster}_PIXELS"] = str(int(count))
            items[f"CLUSTER_{cluster}_AREA"] = f"{area:.10g}"
        return items


def area_unit(crs_wkt: str | None) -> str:
    """Square of the CRS's linear unit ("square metre"), "square degree" for a geographic CRS,
    "square pixel unit" without a CRS."""
    if not crs_wkt:
        return "square pixel unit"
    from rasterio.crs import CRS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crs = CRS.from_wkt(crs_wkt)
    if crs.is_geographic:
        return "square degree"
    unit = (crs.linear_units or "unit").lower()
    return "square metre" if unit in ("metre", "meter", "m") else f"square {unit}"


def pixel_area(transform: Affine) -> float:
    """Area of one pixel in map units² (|determinant| of the affine transform)."""
    return float(abs(transform.a * transform.e - transform.b * transform.d))


def cluster_statistics_from_counts(counts, transform: Affine,
                                   crs_wkt: str | None) -> ClusterStatistics:
    return ClusterStatistics(np.asarray(counts, dtype=np.int64), pixel_area(transform),
                             area_unit(crs_wkt))


def cluster_statistics(labels: np.ndarray, n_clusters: int, transform: Affine,
                       crs_wkt: str | None) -> ClusterStatistics:
    """Statistics of a label map (0 = nodata, clusters 1..n_clusters)."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=n_clusters + 1)
    return cluster_statistics_from_counts(counts[1:n_clusters + 1], transform, crs_wkt)
