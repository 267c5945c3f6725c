"""Speaker-classification heads. Each maps (embedding, label) to (loss, logits) and owns its weights."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AMSoftmax(nn.Module):
    """Additive-margin softmax (Wang et al., 2018, arXiv 1801.05599), as s3prl's `amsoftmax`."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float, scale: float):
        super().__init__()
        self.margin, self.scale = margin, scale
        # (D, C) and xavier-normal init exactly as s3prl, so state dicts are interchangeable.
        self.W = nn.Parameter(torch.empty(embed_dim, num_classes))
        nn.init.xavier_normal_(self.W, gain=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = F.normalize(x, dim=1, eps=1e-12) @ F.normalize(self.W, dim=0, eps=1e-12)  # (B, C)
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.size(1)))
        return F.cross_entropy(logits, labels), logits


class Softmax(nn.Module):
    """Plain softmax on the L2-normalised embedding (s3prl's `softmax` loss type)."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float, scale: float):
        super().__init__()
        # margin/scale do not apply; accepted so every head shares one constructor signature.
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(F.normalize(x, dim=1))
        return F.cross_entropy(logits, labels), logits


LOSSES = {"amsoftmax": AMSoftmax, "softmax": Softmax}


def build_loss(name: str, embed_dim: int, num_classes: int, margin: float, scale: float) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](embed_dim, num_classes, margin, scale)
