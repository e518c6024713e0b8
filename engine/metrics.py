"""Scores of a clustering against reference labels: the one metrics path of the project.

Used by the Processing "Evaluate clustering" algorithm, the demo and the benchmarks, so every
number the project reports is computed the same way.

Conventions
-----------
* Labels are integer maps of any shape (flattened here). ``0`` means "unlabelled / nodata" in both
  the reference and the prediction (configurable through ``ignore_reference`` /
  ``ignore_predicted``).
* Cluster ids are arbitrary, so predicted clusters are matched one-to-one to reference classes
  with the Hungarian algorithm on the contingency table (maximising the number of agreeing
  pixels). When there are more clusters than classes, the surplus clusters map to no class and
  all their pixels count as errors; with fewer clusters than classes some classes get no cluster
  and have recall 0.
* NMI uses the arithmetic-mean normalisation ``2 I(G;P) / (H(G) + H(P))`` (as in the SCDSC paper
  and sklearn's ``average_method="arithmetic"``). NMI and ARI do not need the matching; OA, kappa
  and the per-class accuracies are computed on the Hungarian-mapped prediction.

NMI, kappa and ARI are computed here from the contingency table (they are a few lines each) so the
engine does not need scikit-learn at run time; the tests check them against sklearn.metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

# Value given, in the mapped prediction, to pixels of clusters that match no reference class.
UNMATCHED = -1


@dataclass(frozen=True)
class ClusteringScores:
    """Agreement between a clustering and reference labels over the scored pixels.

    ``n_scored`` pixels have both a reference label and a prediction. ``n_unpredicted`` pixels
    have a reference label but no prediction (e.g. nodata in the clustered cube, or masked out);
    they are *excluded* from every score rather than counted as errors, because "no prediction"
    is a coverage question, not a clustering error. Report ``coverage`` next to the scores when
    it is not 1.

    ``kappa`` is NaN when it is undefined (all scored pixels are one class and one cluster, so
    the chance agreement is 1).
    """

    overall_accuracy: float
    nmi: float
    kappa: float
    ari: float
    n_scored: int
    n_unpredicted: int = 0
    # Recall of each reference class after matching: correct pixels / reference pixels.
    per_class_accuracy: dict[int, float] = field(default_factory=dict)
    # Predicted cluster id -> reference class id (clusters without a class are absent).
    mapping: dict[int, int] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Fraction of reference-labelled pixels that had a prediction."""
        total = self.n_scored + self.n_unpredicted
        return self.n_scored / total if total else 0.0

    @property
    def average_accuracy(self) -> float:
        """Mean of the per-class recalls (AA), insensitive to class imbalance."""
        if not self.per_class_accuracy:
            return 0.0
        return float(np.mean(list(self.per_class_accuracy.values())))

    def to_dict(self) -> dict:
        """Plain-Python (JSON-friendly) copy, including ``coverage`` and ``average_accuracy``."""
        result = asdict(self)
        result["per_class_accuracy"] = dict(self.per_class_accuracy)
        result["mapping"] = dict(self.mapping)
        result["coverage"] = self.coverage
        result["average_accuracy"] = self.average_accuracy
        return result

    def summary(self) -> str:
        """One line for logs and reports."""
        return (
            f"OA={self.overall_accuracy:.4f} AA={self.average_accuracy:.4f} "
            f"kappa={self.kappa:.4f} NMI={self.nmi:.4f} ARI={self.ari:.4f} "
            f"(n={self.n_scored}, unpredicted={self.n_unpredicted})"
        )


def _as_label_vector(labels: np.ndarray, name: str) -> np.ndarray:
    """Flatten to int64, refusing non-integral values (e.g. NaN from a float raster)."""
    array = np.asarray(labels).ravel()
    if array.dtype.kind in "iub":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} labels must be integers (found non-integral values)")
        return array.astype(np.int64)
    raise ValueError(f"{name} labels must be an integer array, got dtype {array.dtype}")


@dataclass(frozen=True)
class _Contingency:
    """``table[i, j]``: number of pixels of reference ``classes[i]`` in cluster ``clusters[j]``."""

    table: np.ndarray
    classes: np.ndarray
    clusters: np.ndarray


def _contingency(reference: np.ndarray, predicted: np.ndarray) -> _Contingency:
    classes, class_index = np.unique(reference, return_inverse=True)
    clusters, cluster_index = np.unique(predicted, return_inverse=True)
    flat = class_index.ravel() * clusters.size + cluster_index.ravel()
    table = np.bincount(flat, minlength=classes.size * clusters.size)
    return _Contingency(table.reshape(classes.size, clusters.size), classes, clusters)


def _mapping_from_table(contingency: _Contingency) -> dict[int, int]:
    # Rectangular tables are fine: min(n_classes, n_clusters) pairs are assigned.
    rows, cols = linear_sum_assignment(contingency.table, maximize=True)
    return {
        int(contingency.clusters[col]): int(contingency.classes[row])
        for row, col in zip(rows, cols, strict=True)
    }


def hungarian_mapping(reference: np.ndarray, predicted: np.ndarray) -> dict[int, int]:
    """Predicted cluster id -> reference class id, one-to-one, maximising agreeing pixels.

    All values given are used (no nodata filtering: filter before calling, or use
    :func:`score_clustering`). With more clusters than classes, the surplus clusters are absent
    from the result; with fewer clusters than classes, some classes receive no cluster.
    """
    reference_vector = _as_label_vector(reference, "reference")
    predicted_vector = _as_label_vector(predicted, "predicted")
    if reference_vector.shape != predicted_vector.shape:
        raise ValueError(
            f"reference and predicted differ in size: {np.shape(reference)} vs "
            f"{np.shape(predicted)}"
        )
    if reference_vector.size == 0:
        return {}
    return _mapping_from_table(_contingency(reference_vector, predicted_vector))


def _entropy(counts: np.ndarray, total: int) -> float:
    probabilities = counts[counts > 0] / total
    return float(-np.sum(probabilities * np.log(probabilities)))


def _nmi_arithmetic(contingency: _Contingency) -> float:
    table = contingency.table
    n_classes, n_clusters = table.shape
    # Both labellings unsplit: a perfect (if trivial) match, as sklearn defines it.
    if n_classes == n_clusters == 1:
        return 1.0
    total = int(table.sum())
    row_sums = table.sum(axis=1).astype(np.float64)
    col_sums = table.sum(axis=0).astype(np.float64)
    nonzero_rows, nonzero_cols = np.nonzero(table)
    joint = table[nonzero_rows, nonzero_cols].astype(np.float64)
    # I = sum p_ij log(p_ij / (p_i p_j)) written with counts to avoid tiny probabilities.
    log_ratio = np.log(joint * total / (row_sums[nonzero_rows] * col_sums[nonzero_cols]))
    mutual_information = max(float(np.sum(joint * log_ratio)) / total, 0.0)
    if mutual_information == 0.0:
        return 0.0
    normaliser = (_entropy(row_sums, total) + _entropy(col_sums, total)) / 2.0
    return min(mutual_information / normaliser, 1.0)


def _ari(contingency: _Contingency) -> float:
    # Pair-counting form (as sklearn): exact integer pair counts, float only at the end.
    table = contingency.table.astype(np.int64)
    total = int(table.sum())
    sum_squares = int(np.sum(table * table))
    row_square_sum = int(np.sum(table.sum(axis=1) ** 2))
    col_square_sum = int(np.sum(table.sum(axis=0) ** 2))
    together_both = sum_squares - total
    together_predicted_only = col_square_sum - sum_squares
    together_reference_only = row_square_sum - sum_squares
    apart_both = total * total - together_predicted_only - together_reference_only - sum_squares
    if together_predicted_only == 0 and together_reference_only == 0:
        return 1.0
    numerator = 2 * (together_both * apart_both - together_reference_only * together_predicted_only)
    denominator = (together_both + together_reference_only) * (
        together_reference_only + apart_both
    ) + (together_both + together_predicted_only) * (together_predicted_only + apart_both)
    return float(numerator / denominator)


def _cohen_kappa(reference: np.ndarray, mapped: np.ndarray) -> float:
    # Confusion over the union of labels; UNMATCHED only ever appears on the predicted side,
    # so its expected agreement is 0 and it just lowers the observed agreement.
    confusion = _contingency(reference, mapped)
    labels = np.union1d(confusion.classes, confusion.clusters)
    row_totals = np.zeros(labels.size)
    col_totals = np.zeros(labels.size)
    row_totals[np.searchsorted(labels, confusion.classes)] = confusion.table.sum(axis=1)
    col_totals[np.searchsorted(labels, confusion.clusters)] = confusion.table.sum(axis=0)
    total = float(reference.size)
    observed = float(np.count_nonzero(reference == mapped)) / total
    expected = float(np.dot(row_totals, col_totals)) / (total * total)
    if labels.size == 1:
        # One label on both sides: chance agreement is 1 and kappa is undefined.
        return float("nan")
    return (observed - expected) / (1.0 - expected)


def _apply_mapping(predicted: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    mapped = np.full(predicted.shape, UNMATCHED, dtype=np.int64)
    for cluster, reference_class in mapping.items():
        mapped[predicted == cluster] = reference_class
    return mapped


def score_clustering(
    reference: np.ndarray,
    predicted: np.ndarray,
    ignore_reference: int | None = 0,
    ignore_predicted: int | None = 0,
) -> ClusteringScores:
    """Score ``predicted`` cluster ids against ``reference`` class ids.

    Inputs may have any shape (both are flattened) but must have the same shape. Only pixels
    where ``reference != ignore_reference`` and ``predicted != ignore_predicted`` are scored
    (pass ``None`` to disable either filter). Pixels with a reference label but no prediction
    are excluded from the scores and counted in ``n_unpredicted`` (see :class:`ClusteringScores`);
    pixels without a reference label are simply not evaluated.

    Raises ``ValueError`` when the shapes differ, labels are not integers, or no pixel is
    scorable.
    """
    if np.shape(reference) != np.shape(predicted):
        raise ValueError(
            f"reference and predicted must have the same shape: {np.shape(reference)} vs "
            f"{np.shape(predicted)}"
        )
    reference_vector = _as_label_vector(reference, "reference")
    predicted_vector = _as_label_vector(predicted, "predicted")

    labelled = np.ones(reference_vector.shape, dtype=bool)
    if ignore_reference is not None:
        labelled &= reference_vector != ignore_reference
    has_prediction = np.ones(predicted_vector.shape, dtype=bool)
    if ignore_predicted is not None:
        has_prediction &= predicted_vector != ignore_predicted
    scored = labelled & has_prediction
    n_scored = int(np.count_nonzero(scored))
    n_unpredicted = int(np.count_nonzero(labelled & ~has_prediction))
    if n_scored == 0:
        raise ValueError(
            "no pixel to score: no pixel has both a reference label and a prediction "
            f"({int(np.count_nonzero(labelled))} labelled, "
            f"{int(np.count_nonzero(has_prediction))} predicted)"
        )

    reference_scored = reference_vector[scored]
    predicted_scored = predicted_vector[scored]
    contingency = _contingency(reference_scored, predicted_scored)
    mapping = _mapping_from_table(contingency)
    mapped = _apply_mapping(predicted_scored, mapping)
    correct = reference_scored == mapped

    per_class_accuracy = {
        int(reference_class): float(np.mean(correct[reference_scored == reference_class]))
        for reference_class in contingency.classes
    }
    return ClusteringScores(
        overall_accuracy=float(np.mean(correct)),
        nmi=_nmi_arithmetic(contingency),
        kappa=_cohen_kappa(reference_scored, mapped),
        ari=_ari(contingency),
        n_scored=n_scored,
        n_unpredicted=n_unpredicted,
        per_class_accuracy=per_class_accuracy,
        mapping=mapping,
    )
