"""A small U-Net trained on chips against fuzzy c-means memberships (graph-labelling pipeline).

Spec: ../shared/papers/graph-labelling-tool-sentinel2-2025.txt, section 2.4: U-Net with 5 levels
(64 -> 1024 kernels), Dice + BCE (combo) loss against the c-means memberships, random rotation
and noise, early stopping after 15 epochs without improvement, 64 activation maps from the last
layer.

Why the defaults are smaller than the paper's
---------------------------------------------
The paper's network (31 M parameters, 55 GFLOPs per 256 x 256 forward pass) trained 10 hours on
an RTX 3090. On a laptop CPU with 2 cores one forward+backward pass of that network over a
Sentinel-2 scene of 0.9 M pixels takes many minutes, i.e. hours for a useful number of epochs.
The defaults ``depth=3, width=8`` (8-16-32-64 kernels) give 0.12 M parameters and 0.7 G
multiply-adds per 256 x 256 x 12 pass, against 49 G for this module at depth 4, width 64 (the
paper's network): 1/70 of the work. The receptive field is still ~70 pixels, several SLIC
segments, which is what the node features need: the activations are averaged per segment, so
the fine spatial precision of a deep, wide decoder is lost in the mean, and the target (c-means
memberships) is a smooth per-pixel function of the spectrum that a small network fits within a
few epochs. Width 16 costs 3.6x the multiply-adds of width 8 (measured ~4x the time per step on
2 shared cores), which would take the U-Net stage alone past the 10-minute budget for the whole
pipeline on s2_aberystwyth (930 x 947 x 10); bench/graph_pipeline.py measures the stages.
The activation width stays the paper's 64 (``feature_channels``).

Departures, and why
-------------------
* Depth counts the down-sampling steps (the paper's 5 levels = depth 4). Chip sides that are not
  a multiple of 2**depth (or shorter than 2 * 2**depth) are padded (edge replication) inside
  ``forward`` and the output cropped, so edge chips of any size >= 2**depth work.
* Predictions are per-class sigmoids (multi-label, as the paper's BCE); the Dice and BCE terms
  are each averaged over classes and summed with equal weight.
* Nodata pixels are zero in the input and carry no weight in either loss term.
* Early stopping watches the loss on held-out chips (every fourth chip, as the paper's 75/25
  split); the weights of the best epoch are kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.monitor import Monitor, silent

# ----------------------------------------------------------------------------------- losses


def masked_dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss per class, averaged over classes:
    1 - (2 sum(p t) + eps) / (sum p + sum t + eps).

    ``probabilities`` and ``target`` are (N, C, H, W), ``mask`` (N, 1, H, W) with 1 at pixels
    that count. ``eps`` (Laplace smoothing) keeps empty classes at loss 0 rather than NaN."""
    dims = (0, 2, 3)
    intersection = (probabilities * target * mask).sum(dims)
    total = (probabilities * mask).sum(dims) + (target * mask).sum(dims)
    return (1.0 - (2.0 * intersection + eps) / (total + eps)).mean()


def masked_bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over classes and valid pixels."""
    elementwise = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weight = mask.expand_as(elementwise)
    return (elementwise * weight).sum() / weight.sum().clamp_min(1.0)


def combo_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dice + BCE (the paper's variant of the combo loss), nodata masked."""
    return masked_dice_loss(torch.sigmoid(logits), target, mask) + masked_bce_loss(
        logits, target, mask
    )


# ----------------------------------------------------------------------------------- network


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` down-sampling steps and ``width`` kernels at the top level (doubled
    per level). ``features`` gives the ``feature_channels`` activation maps, ``forward`` the
    class logits computed from them by a 1x1 convolution."""

    def __init__(
        self,
        in_channels: int,
        n_classes: int,
        depth: int = 3,
        width: int = 8,
        feature_channels: int = 64,
    ):
        super().__init__()
        if depth < 1 or width < 1 or feature_channels < 1:
            raise ValueError("U-Net depth, width and feature channels must be positive.")
        self.depth = depth
        widths = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [_double_conv(in_channels, widths[0])]
            + [_double_conv(widths[level - 1], widths[level]) for level in range(1, depth + 1)]
        )
        self.upsamplers = nn.ModuleList(
            [nn.ConvTranspose2d(widths[level], widths[level - 1], 2, stride=2)
             for level in range(depth, 0, -1)]
        )
        self.decoders = nn.ModuleList(
            [_double_conv(2 * widths[level - 1], widths[level - 1])
             for level in range(depth, 0, -1)]
        )
        self.feature_head = nn.Sequential(
            nn.Conv2d(widths[0], feature_channels, 1), nn.ReLU(inplace=True)
        )
        self.class_head = nn.Conv2d(feature_channels, n_classes, 1)

    @property
    def downsampling(self) -> int:
        return 2**self.depth

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(N, B, H, W) -> (N, feature_channels, H, W) activation maps."""
        height, width = image.shape[-2:]
        factor = self.downsampling
        # Pad to a multiple of the factor, and to at least two bottleneck cells per side:
        # BatchNorm cannot normalise a 1 x 1 bottleneck of a single chip while training.
        pad_rows = max((-height) % factor, 2 * factor - height)
        pad_cols = max((-width) % factor, 2 * factor - width)
        x = F.pad(image, (0, pad_cols, 0, pad_rows), mode="replicate") if (
            pad_rows or pad_cols) else image
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = decoder(torch.cat([skips.pop(), upsample(x)], dim=1))
        return self.feature_head(x)[..., :height, :width]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.class_head(self.features(image))


# ----------------------------------------------------------------------------------- training


@dataclass
class ChipTensors:
    """One chip ready for training: standardised bands, memberships and valid mask."""

    image: torch.Tensor  # (B, h, w) float32, 0 at nodata
    target: torch.Tensor  # (C, h, w) float32 memberships, 0 at nodata
    mask: torch.Tensor  # (1, h, w) float32, 1 at valid pixels


@dataclass
class UNetTrainingReport:
    epochs_run: int
    best_epoch: int
    best_validation_loss: float
    train_losses: list[float] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def augment(chip: ChipTensors, generator: torch.Generator, noise_std: float) -> ChipTensors:
    """Random rotation by a multiple of 90 degrees (exact on the pixel grid, no resampling) and
    additive Gaussian noise on the valid pixels of the input."""
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    image = torch.rot90(chip.image, turns, dims=(1, 2))
    target = torch.rot90(chip.target, turns, dims=(1, 2))
    mask = torch.rot90(chip.mask, turns, dims=(1, 2))
    if noise_std > 0:
        noise = torch.randn(image.shape, generator=generator) * noise_std
        image = image + noise * mask
    return ChipTensors(image, target, mask)


def _batch(chip: ChipTensors, device: torch.device):
    return (chip.image[None].to(device), chip.target[None].to(device), chip.mask[None].to(device))


def train_unet(
    model: UNet,
    training: list[ChipTensors],
    validation: list[ChipTensors],
    max_epochs: int,
    patience: int,
    learning_rate: float,
    noise_std: float,
    generator: torch.Generator,
    device: torch.device,
    monitor: Monitor | None = None,
    chips_per_epoch: int | None = None,
) -> UNetTrainingReport:
    """Train chip by chip (one chip per step, chips differ in size at the scene's edges) with
    Adam; stop after ``patience`` epochs without a better validation loss; keep the best weights.

    An epoch is ``chips_per_epoch`` training chips (all when None), drawn from a running seeded
    permutation so that successive epochs go through all chips before any repeats. The paper's
    epochs pass over thousands of chips of many tiles; one scene has tens, so a fixed budget per
    epoch makes early stopping check often and keeps the training time independent of the
    scene's size.
    """
    monitor = monitor or silent()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    report = UNetTrainingReport(0, 0, float("inf"))
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    per_epoch = len(training) if chips_per_epoch is None else min(chips_per_epoch, len(training))
    queue: list[int] = []
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = []
        while len(order) < per_epoch:
            if not queue:
                queue = torch.randperm(len(training), generator=generator).tolist()
            order.append(queue.pop())
        total = 0.0
        for step, index in enumerate(order):
            image, target, mask = _batch(augment(training[index], generator, noise_std), device)
            loss = combo_loss(model(image), target, mask)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
            monitor.progress((epoch - 1 + (step + 1) / len(order)) / max_epochs)
        report.train_losses.append(total / len(order))
        validation_loss = evaluate_loss(model, validation, device, monitor)
        report.validation_losses.append(validation_loss)
        report.epochs_run = epoch
        monitor.info(f"U-Net epoch {epoch}: training loss {report.train_losses[-1]:.4f}, "
                     f"validation loss {validation_loss:.4f}")
        if validation_loss < report.best_validation_loss - 1e-6:
            report.best_validation_loss = validation_loss
            report.best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
            if since_best >= patience:
                report.stopped_early = True
                break
    model.load_state_dict(best_state)
    model.eval()
    monitor.progress(1.0)
    return report


@torch.no_grad()
def evaluate_loss(
    model: UNet, chips: list[ChipTensors], device: torch.device, monitor: Monitor | None = None
) -> float:
    """Pixel-weighted mean combo loss over chips, in evaluation mode (no augmentation)."""
    model.eval()
    total, weight = 0.0, 0.0
    for chip in chips:
        image, target, mask = _batch(chip, device)
        pixels = float(mask.sum())
        if pixels == 0:
            continue
        total += float(combo_loss(model(image), target, mask)) * pixels
        weight += pixels
        if monitor is not None:
            monitor.check()
    return total / weight if weight else float("nan")


def chip_tensors(
    image: np.ndarray, memberships: np.ndarray, valid: np.ndarray
) -> ChipTensors:
    """From (h, w, B) standardised bands, (h, w, C) memberships and (h, w) valid mask."""
    mask = valid.astype(np.float32)
    return ChipTensors(
        image=torch.from_numpy(np.ascontiguousarray((image * mask[..., None]).transpose(2, 0, 1))),
        target=torch.from_numpy(
            np.ascontiguousarray((memberships * mask[..., None]).transpose(2, 0, 1))
        ),
        mask=torch.from_numpy(mask[None]),
    )
