"""Device choice and seeding for the torch parts of the engine."""

from __future__ import annotations

import random

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' uses a GPU when one is present and the CPU otherwise; 'cuda' without a GPU fails."""
    name = (name or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise ValueError(f"Unknown device '{name}': choose one of {', '.join(DEVICE_CHOICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "Device 'cuda' was asked for, but torch sees no GPU. Choose 'auto' or 'cpu'."
        )
    return torch.device(name)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
