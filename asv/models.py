"""Trainable part of the recipe: featurizer (layer weighted sum) -> x-vector -> loss head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from asv.losses import build_loss

# Frames lost by the unpadded TDNN stack: (5-1)*1 + (3-1)*2 + (3-1)*3 = 14 (spec section 2.3).
XVECTOR_LENGTH_REDUCTION = 14


class TDNN(nn.Module):
    """Time-delay layer (Peddinti et al., 2015) as s3prl's: unfold over time, Linear, ReLU, no padding."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        context_size: int,
        dilation: int,
        dropout_p: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.input_size, self.context_size, self.dilation = input_size, context_size, dilation
        self.kernel = nn.Linear(input_size * context_size, output_size)
        self.drop = nn.Dropout(dropout_p) if dropout_p else nn.Identity()
        self.bn = nn.BatchNorm1d(output_size) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T - (ctx-1)*dil, out)
        span = (self.context_size - 1) * self.dilation + 1
        # (B, T', D, ctx) -> (B, T', ctx*D) in s3prl's (offset-major) order, so weights load as-is.
        frames = x.unfold(1, span, 1)[..., :: self.dilation]
        frames = frames.transpose(2, 3).reshape(x.size(0), -1, self.context_size * self.input_size)
        x = self.drop(F.relu(self.kernel(frames)))
        if self.bn is not None:
            x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return x


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean || unbiased std over the first `lengths[b]` frames of each item: (B, T, D) -> (B, 2D).

    Only valid frames count, so an embedding does not depend on what it is batched with. A single
    frame has no unbiased std (s3prl returns NaN); we return 0 there instead.
    """
    mask = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    n = lengths.clamp(min=1).to(x.dtype)[:, None]
    mean = (x * mask).sum(1) / n
    var = (((x - mean[:, None]) * mask) ** 2).sum(1) / (n - 1).clamp(min=1)
    # ReLU features often have zero variance (dead units); sqrt'(0) is infinite, so route those
    # entries through a constant to get a zero gradient there, as torch.std's backward does.
    positive = var > 0
    std = torch.where(positive, var, torch.ones_like(var)).sqrt() * positive
    return torch.cat([mean, std], dim=-1)


class SuperbXvector(nn.Module):
    """SUPERB's x-vector (Snyder et al., 2018) with the layout and parameter names of s3prl's SuperbXvector."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 512,
        hidden_size: int = 512,
        aggregation_size: int = 1500,
        dropout_p: float = 0.0,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.output_size = output_size
        self.projector = nn.Linear(input_size, hidden_size)
        self.tdnns = nn.Module()
        self.tdnns.module = nn.Sequential(
            TDNN(hidden_size, 512, 5, 1, dropout_p, batch_norm),
            TDNN(512, 512, 3, 2, dropout_p, batch_norm),
            TDNN(512, 512, 3, 3, dropout_p, batch_norm),
            TDNN(512, 512, 1, 1, dropout_p, batch_norm),
            TDNN(512, aggregation_size, 1, 1, dropout_p, batch_norm),
        )
        self.affine = nn.Module()
        self.affine.linear1 = nn.Linear(2 * aggregation_size, output_size)
        # linear2 only exists in training: the scored embedding is ReLU(linear1(pool)) (spec 2.3).
        self.affine.linear2 = nn.Linear(output_size, output_size)

    def forward(self, x: torch.Tensor, x_len: torch.Tensor) -> torch.Tensor:
        if (x_len <= XVECTOR_LENGTH_REDUCTION).any():
            raise ValueError(
                f"utterance too short for the x-vector: it needs at least {XVECTOR_LENGTH_REDUCTION + 1} "
                "upstream frames (0.15 s at 10 ms frames, 0.3 s at 20 ms)"
            )
        x = self.tdnns.module(self.projector(x))  # (B, T-14, 1500)
        x_len = x_len - XVECTOR_LENGTH_REDUCTION
        h = F.relu(self.affine.linear1(masked_mean_std(x, x_len)))
        if self.training:
            h = F.relu(self.affine.linear2(h))
        return h


DOWNSTREAMS = {"xvector": SuperbXvector}


class SpeakerModel(nn.Module):
    """Everything that trains: featurizer weights, downstream and loss head. The frozen upstream stays outside.

    `forward` returns (loss, logits) for training; `embed` returns the scored embedding, which only
    needs the featurizer and downstream (the `embedder_state_dict`).
    """

    def __init__(self, featurizer: nn.Module, downstream: nn.Module, head: nn.Module):
        super().__init__()
        self.featurizer, self.downstream, self.head = featurizer, downstream, head

    def embed(self, hidden_states: list[torch.Tensor], hidden_lens: list[torch.Tensor]) -> torch.Tensor:
        h, h_len = self.featurizer(hidden_states, hidden_lens)  # (B, T, D)
        return self.downstream(h, h_len)  # (B, E)

    def forward(self, hidden_states, hidden_lens, labels: torch.Tensor):
        return self.head(self.embed(hidden_states, hidden_lens), labels)

    def layer_weights(self) -> torch.Tensor | None:
        """Softmax-normalised featurizer weights, or None for a single-layer upstream."""
        w = getattr(self.featurizer, "weights", None)
        return None if w is None else F.softmax(w.detach().float(), dim=-1)

    def embedder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}


def build_speaker_model(model_cfg, loss_cfg, upstream, num_classes: int) -> SpeakerModel:
    """Featurizer + downstream + head for `upstream`, from the model and loss config sections."""
    from asv.upstream import Featurizer

    featurizer = Featurizer(
        upstream, layer_selections=model_cfg.layer_selections, normalize=model_cfg.featurizer_normalize
    )
    if model_cfg.downstream not in DOWNSTREAMS:
        raise ValueError(f"unknown downstream '{model_cfg.downstream}'; choose one of: {', '.join(DOWNSTREAMS)}")
    downstream = DOWNSTREAMS[model_cfg.downstream](
        featurizer.output_size,
        output_size=model_cfg.embed_dim,
        hidden_size=model_cfg.hidden_size,
        aggregation_size=model_cfg.aggregation_size,
        dropout_p=model_cfg.dropout_p,
        batch_norm=model_cfg.batch_norm,
    )
    head = build_loss(loss_cfg, model_cfg.embed_dim, num_classes)
    return SpeakerModel(featurizer, downstream, head)
