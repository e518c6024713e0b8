"""HSI Cluster model files: one ``torch.save`` of a dict, written reproducibly, read safely.

Every model file of the plugin is one ``torch.save`` of a dict whose ``"algorithm"`` entry names
the algorithm that wrote it ("ms2anet", "scdsc"). It is read with ``weights_only=True``, so a
file from elsewhere cannot run code while it is inspected; that also means a model dict may
hold only tensors, numbers, strings, lists and dicts (no numpy arrays).

Reading checks the dict against the schema of the algorithm it names (:data:`SCHEMAS`: the
entries, their types, the settings the estimator accepts) before anything builds a network from
it, so a damaged, foreign or mislabelled file gives a message for a user, never a library's
internals (and never PyTorch's advice to load with ``weights_only=False``, which would let a
file run code).

:func:`write_model_file` writes the archive through a file object: ``torch.save`` to a path
names the zip records after the file name, so the random temporary name of an atomic write
would make two identical models differ in a few hundred bytes.
"""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import Callable
from pathlib import Path

import torch

from engine.safe_files import atomic_output


def write_model_file(payload: dict, path: str | os.PathLike) -> Path:
    """Save ``payload`` at ``path`` (temporary file + rename); the same payload gives the same
    bytes whatever the file is called."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # a file object: the archive's records get a fixed name
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())
    return Path(path)


# ------------------------------------------------------------------------------ schemas


def _tensor(value) -> bool:
    return isinstance(value, torch.Tensor)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_integer(value) -> bool:
    return _integer(value) and value > 0


def _integer_list(value) -> bool:
    return isinstance(value, list) and all(_integer(v) and v >= 1 for v in value) and bool(value)


def _string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _tensor_dict(value) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and _tensor(v) for k, v in value.items()))


def _settings(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _estimator_parameters(kind: str) -> set[str]:
    """The constructor parameters of the algorithm's estimator (its settings may use no other)."""
    if kind == "scdsc":
        from engine.scdsc import SCDSC as estimator
    else:
        from engine.ms2anet import MS2ANet as estimator
    return set(inspect.signature(estimator.__init__).parameters) - {"self"}


# Required entries per algorithm and what each must be; extra entries are allowed (a newer
# writer may add some), missing or mistyped ones are not.
SCHEMAS: dict[str, dict[str, Callable[[object], bool]]] = {
    "scdsc": {
        "format_version": _integer,
        "settings": _settings,
        "n_input_channels": _positive_integer,
        "autoencoder": _tensor_dict,
        "bases": _tensor,
        "preprocessing": _tensor_dict,
        "band_numbers": _integer_list,
        "source_band_count": _positive_integer,
        "n_clusters": _positive_integer,
    },
    "ms2anet": {
        "format_version": _integer,
        "state_dict": _tensor_dict,
        "centres": _tensor,
        "band_min": _tensor,
        "band_max": _tensor,
        "band_numbers": _integer_list,
        "band_names": _string_list,
        "source_band_count": _positive_integer,
        "n_bands": _positive_integer,
        "frozen_association": _tensor,
        "settings": _settings,
    },
}
# Settings every model of the algorithm must state.
REQUIRED_SETTINGS = {
    "scdsc": ("n_clusters", "patch_size", "basis_dim", "latent_channels"),
    "ms2anet": ("n_clusters",),
}
DISPLAY_NAMES = {"scdsc": "SCDSC", "ms2anet": "MS2A-Net"}


def validate_model(payload: dict, path: str | os.PathLike) -> None:
    """ValueError unless ``payload`` follows the schema of the algorithm its header names."""
    kind = payload["algorithm"]
    schema = SCHEMAS.get(kind)
    if schema is None:
        return  # not ours to judge: the caller says which algorithms it applies
    name = DISPLAY_NAMES[kind]
    damaged = f"'{path}' is a model of the '{kind}' algorithm but not a complete {name} model file"
    problems = [key for key, check in schema.items() if key not in payload
                or not check(payload[key])]
    if problems:
        raise ValueError(f"{damaged} (missing or invalid: {', '.join(problems)}). The file is "
                         "damaged or was not written by HSI Cluster; train the model again.")
    unknown = sorted(set(payload["settings"]) - _estimator_parameters(kind))
    missing = [key for key in REQUIRED_SETTINGS[kind] if key not in payload["settings"]]
    if unknown or missing:
        detail = (f"settings {unknown} belong to no {name} model" if unknown
                  else f"settings {missing} are missing")
        raise ValueError(f"{damaged} ({detail}). The file is damaged or was not written by "
                         f"HSI Cluster; train the model again.")
    bands = payload["band_numbers"]
    if max(bands) > payload["source_band_count"] or len(set(bands)) != len(bands):
        raise ValueError(f"{damaged} (its band list does not fit its band count). Train the "
                         "model again.")
    if kind == "ms2anet":
        n_bands = payload["n_bands"]
        shapes_fit = (len(bands) == n_bands
                      and tuple(payload["band_min"].shape) == (n_bands,)
                      and tuple(payload["band_max"].shape) == (n_bands,)
                      and payload["centres"].ndim == 2
                      and payload["centres"].shape[0] == payload["settings"]["n_clusters"])
        if not shapes_fit:
            raise ValueError(f"{damaged} (band and cluster counts disagree). Train the model "
                             "again.")


# ------------------------------------------------------------------------------ reading


def read_model_file(path: str | os.PathLike, expected: str | None = None) -> dict:
    """The dict of an HSI Cluster model file; ValueError for a missing, corrupt, foreign or
    inconsistent file, or (with ``expected``) a model of another algorithm."""
    if not Path(path).is_file():
        raise ValueError(f"The model file '{path}' does not exist.")
    try:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu",
                             weights_only=True)
    except Exception as error:  # torch raises many types for a file that is no torch pickle
        # Not the library's message: it may advise loading with weights_only=False, which would
        # let the file run code.
        raise ValueError(
            f"'{path}' is not an HSI Cluster model file, or it is damaged: it cannot be read "
            f"as one ({type(error).__name__}). Choose a model file saved by SCDSC or MS2A-Net "
            "clustering (their Model file output), or train the model again."
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("algorithm"), str):
        raise ValueError(f"'{path}' is not an HSI Cluster model file (no algorithm name).")
    if expected is not None and payload["algorithm"] != expected:
        raise ValueError(
            f"'{path}' is a model of the '{payload['algorithm']}' algorithm, not an "
            f"{DISPLAY_NAMES.get(expected, expected)} model."
        )
    validate_model(payload, path)
    return payload


def model_kind(path: str | os.PathLike) -> str:
    """The algorithm that saved the model file ("ms2anet", "scdsc", ...)."""
    return read_model_file(path)["algorithm"]
