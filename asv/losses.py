"""Speaker-classification heads. Each maps (embedding, label) to (loss, logits) and owns its weights.

Heads with a margin take an optional linear warm-up of that margin by global optimizer step
(`set_step`, called by train.py before every batch), as WeSpeaker's MarginScheduler does per iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from asv.config import LOSS_NAMES, registry


def margin_at(step: int, margin: float, warmup_steps: int) -> float:
    """Linear ramp 0 -> margin over the first warmup_steps updates (0: the full margin from the start)."""
    if warmup_steps <= 0:
        return margin
    return margin * min(1.0, step / warmup_steps)


class Head(nn.Module):
    """Base of every head: a margin that follows the global step (a no-op for margin-free heads)."""

    def __init__(self, margin: float = 0.0, margin_warmup_steps: int = 0):
        super().__init__()
        self.max_margin, self.margin_warmup_steps = margin, margin_warmup_steps
        self.margin = margin_at(0, margin, margin_warmup_steps)

    def set_step(self, step: int) -> None:
        self.margin = margin_at(step, self.max_margin, self.margin_warmup_steps)


def cosine_logits(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Cosine between each embedding and each column of W: (B, D) x (D, N) -> (B, N)."""
    return F.normalize(x, dim=1, eps=1e-12) @ F.normalize(W, dim=0, eps=1e-12)


def additive_angular_margin(cos: torch.Tensor, labels: torch.Tensor, margin: float, easy_margin: bool) -> torch.Tensor:
    """Target cosines replaced by cos(theta + m) (ArcFace), with s3prl's / InsightFace's fallback.

    cos(theta + m) stops decreasing once theta + m > pi, so past theta = pi - m the target logit
    becomes cos(theta) - sin(pi - m) * m instead (CosFace-like); `easy_margin` applies the angular
    margin only where cos(theta) > 0 and leaves the rest unchanged.
    """
    sine = (1.0 - cos * cos).clamp(0, 1).sqrt()
    phi = cos * math.cos(margin) - sine * math.sin(margin)  # cos(theta + m)
    if easy_margin:
        phi = torch.where(cos > 0, phi, cos)
    else:
        phi = torch.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    target = F.one_hot(labels, cos.size(1)).bool()
    return torch.where(target, phi, cos)


class AMSoftmax(Head):
    """Additive-margin softmax (Wang et al., 2018, arXiv 1801.05599), as s3prl's `amsoftmax`."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float, scale: float, margin_warmup_steps: int = 0):
        super().__init__(margin, margin_warmup_steps)
        self.scale = scale
        # (D, C) and xavier-normal init exactly as s3prl, so state dicts are interchangeable.
        self.W = nn.Parameter(torch.empty(embed_dim, num_classes))
        nn.init.xavier_normal_(self.W, gain=1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = cosine_logits(x, self.W)  # (B, C)
        logits = self.scale * (cos - self.margin * F.one_hot(labels, cos.size(1)))
        return F.cross_entropy(logits, labels), logits


class AAMSoftmax(Head):
    """Additive angular margin softmax, ArcFace (Deng et al., 2019, arXiv 1801.07698), as s3prl's legacy
    `AAMSoftmaxLoss` (there s=15, m=0.3; here --scale and --margin)."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        margin: float,
        scale: float,
        easy_margin: bool = False,
        margin_warmup_steps: int = 0,
    ):
        super().__init__(margin, margin_warmup_steps)
        self.scale, self.easy_margin = scale, easy_margin
        self.W = nn.Parameter(torch.empty(embed_dim, num_classes))
        nn.init.xavier_normal_(self.W, gain=1)

    def class_cosines(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(x, self.W)  # (B, C)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.class_cosines(x)
        logits = self.scale * additive_angular_margin(cos, labels, self.margin, self.easy_margin)
        return F.cross_entropy(logits, labels), logits


class SubcenterAAMSoftmax(AAMSoftmax):
    """Sub-center ArcFace (Deng et al., ECCV 2020): K centres per class, a class's cosine is its closest
    centre's, so noisy utterances can gather at a non-dominant centre (WeSpeaker's `arc_margin_subcenter`)."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        margin: float,
        scale: float,
        subcenters: int = 3,
        easy_margin: bool = False,
        margin_warmup_steps: int = 0,
    ):
        super().__init__(embed_dim, num_classes * subcenters, margin, scale, easy_margin, margin_warmup_steps)
        self.num_classes, self.subcenters = num_classes, subcenters

    def class_cosines(self, x: torch.Tensor) -> torch.Tensor:
        cos = cosine_logits(x, self.W)  # (B, C*K), class-major: column c*K + k is centre k of class c
        return cos.view(x.size(0), self.num_classes, self.subcenters).amax(dim=2)  # (B, C)


class Softmax(Head):
    """Plain softmax on the L2-normalised embedding (s3prl's `softmax` loss type)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(F.normalize(x, dim=1))
        return F.cross_entropy(logits, labels), logits


# name -> constructor from the loss config section (asv.config.LossConfig), embedding size and class count.
LOSSES = registry(
    LOSS_NAMES,
    {
        "amsoftmax": lambda c, d, n: AMSoftmax(d, n, c.margin, c.scale, c.margin_warmup_steps),
        "aamsoftmax": lambda c, d, n: AAMSoftmax(d, n, c.margin, c.scale, c.easy_margin, c.margin_warmup_steps),
        "subcenter_aam": lambda c, d, n: SubcenterAAMSoftmax(
            d, n, c.margin, c.scale, c.subcenters, c.easy_margin, c.margin_warmup_steps
        ),
        "softmax": lambda c, d, n: Softmax(d, n),
    },
)


def build_loss(loss_cfg, embed_dim: int, num_classes: int) -> Head:
    """The head named by loss_cfg.loss, for embed_dim-sized embeddings and num_classes speakers."""
    if loss_cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss_cfg.loss}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[loss_cfg.loss](loss_cfg, embed_dim, num_classes)
