"""The header of an HSI Cluster model file: which algorithm saved it.

Every model file of the plugin is one ``torch.save`` of a dict whose ``"algorithm"`` entry names
the algorithm that wrote it ("ms2anet", "scdsc"). It is read with ``weights_only=True``, so a
file from elsewhere cannot run code while it is inspected; that also means a model dict may
hold only tensors, numbers, strings, lists and dicts (no numpy arrays).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch


def read_model_file(path: str | os.PathLike) -> dict:
    """The dict of an HSI Cluster model file; ValueError for a missing, corrupt or foreign file."""
    if not Path(path).is_file():
        raise ValueError(f"The model file '{path}' does not exist.")
    try:
        payload = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu",
                             weights_only=True)
    except Exception as error:  # torch raises many types for a file that is no torch pickle
        raise ValueError(
            f"'{path}' is not an HSI Cluster model file (it cannot be read: {error})."
        ) from error
    if not isinstance(payload, dict) or not isinstance(payload.get("algorithm"), str):
        raise ValueError(f"'{path}' is not an HSI Cluster model file (no algorithm name).")
    return payload


def model_kind(path: str | os.PathLike) -> str:
    """The algorithm that saved the model file ("ms2anet", "scdsc", ...)."""
    return read_model_file(path)["algorithm"]
