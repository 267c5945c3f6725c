"""Trainable part of the recipe: featurizer (layer weighted sums) -> downstream (xvector, ecapa, mhfa) -> loss head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from asv.config import DOWNSTREAM_NAMES, registry
from asv.errors import ConfigError, UpstreamError
from asv.losses import build_loss

# Frames lost by the unpadded TDNN stack: (5-1)*1 + (3-1)*2 + (3-1)*3 = 14 (spec section 2.3).
XVECTOR_LENGTH_REDUCTION = 14


class TDNN(nn.Module):
    """Time-delay layer (Peddinti et al., 2015) as s3prl's: context frames at a dilation, Linear, ReLU, no padding.

    s3prl unfolds the context into a (B, T', ctx*D) copy and multiplies it by a Linear. The same sums run here
    as one dilated conv1d whose kernel is a view of that Linear's weight (s3prl's parameter names and layout,
    so state dicts load unchanged): no context copy is materialised (it is ctx times the input, and its
    gradient as large again), and the convolution goes through oneDNN, which picks its kernels by the CPU's
    instruction set rather than its vendor.
    """

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, out, T - (ctx-1)*dil), channels first
        if self.context_size == 1:
            x = F.conv1d(x, self.kernel.weight[:, :, None], self.kernel.bias)
        else:
            # Linear column c*D + d multiplies frame offset c, channel d (s3prl's offset-major unfold order).
            weight = self.kernel.weight.view(-1, self.context_size, self.input_size).transpose(1, 2)
            x = F.conv1d(x, weight, self.kernel.bias, dilation=self.dilation)
        x = self.drop(F.relu(x))
        return x if self.bn is None else self.bn(x)


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean || unbiased std over the first `lengths[b]` frames of each item: (B, T, D) -> (B, 2D).

    Only valid frames count, so an embedding does not depend on what it is batched with. A single
    frame has no unbiased std (s3prl returns NaN); we return 0 there instead.
    """
    mask = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
    n = lengths.clamp(min=1).to(x.dtype)[:, None]
    mean = (x * mask).sum(1) / n
    var = (((x - mean[:, None]) * mask) ** 2).sum(1) / (n - 1).clamp(min=1)
    return torch.cat([mean, _std(var)], dim=-1)


def _std(var: torch.Tensor) -> torch.Tensor:
    """sqrt(var) with a zero gradient where var is 0. ReLU features often have zero variance (dead units), and
    sqrt'(0) is infinite, so those entries go through a constant, as torch.std's backward does."""
    positive = var > 0
    return torch.where(positive, var, torch.ones_like(var)).sqrt() * positive


class SuperbXvector(nn.Module):
    """SUPERB's x-vector (Snyder et al., 2018) with the layout and parameter names of s3prl's SuperbXvector.

    `tdnn_size` is the width of TDNN layers 1-4, which s3prl hard-codes to 512 (the default here too).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 512,
        hidden_size: int = 512,
        aggregation_size: int = 1500,
        dropout_p: float = 0.0,
        batch_norm: bool = False,
        tdnn_size: int = 512,
    ):
        super().__init__()
        self.output_size = output_size
        self.projector = nn.Linear(input_size, hidden_size)
        self.tdnns = nn.Module()
        w = tdnn_size
        self.tdnns.module = nn.Sequential(
            TDNN(hidden_size, w, 5, 1, dropout_p, batch_norm),
            TDNN(w, w, 3, 2, dropout_p, batch_norm),
            TDNN(w, w, 3, 3, dropout_p, batch_norm),
            TDNN(w, w, 1, 1, dropout_p, batch_norm),
            TDNN(w, aggregation_size, 1, 1, dropout_p, batch_norm),
        )
        self.affine = nn.Module()
        self.affine.linear1 = nn.Linear(2 * aggregation_size, output_size)
        # linear2 only exists in training: the scored embedding is ReLU(linear1(pool)) (spec 2.3).
        self.affine.linear2 = nn.Linear(output_size, output_size)

    def forward(self, x: torch.Tensor, x_len: torch.Tensor) -> torch.Tensor:
        # A data-dependent check cannot be traced; ONNX export guards the input length instead (asv/onnx_export.py).
        if not torch.compiler.is_exporting() and (x_len <= XVECTOR_LENGTH_REDUCTION).any():
            raise ValueError(
                f"utterance too short for the x-vector: it needs at least {XVECTOR_LENGTH_REDUCTION + 1} "
                "upstream frames (0.15 s at 10 ms frames, 0.3 s at 20 ms)"
            )
        # The TDNN stack runs channels first, the layout its convolutions take, so no layer transposes.
        x = self.tdnns.module(self.projector(x).transpose(1, 2))  # (B, 1500, T-14)
        pooled = masked_mean_std(x.transpose(1, 2), x_len - XVECTOR_LENGTH_REDUCTION)
        h = F.relu(self.affine.linear1(pooled))
        if self.training:
            h = F.relu(self.affine.linear2(h))
        return h


def _length_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, 1, T) float mask, 1 on the first lengths[b] frames of each item: for (B, C, T) conv activations."""
    return (torch.arange(x.size(-1), device=x.device)[None, :] < lengths[:, None]).unsqueeze(1).to(x.dtype)


def _masked_mean_std(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time of (B, C, T) x with (B, C|1, T) weights summing to 1 over T."""
    mean = (x * w).sum(-1, keepdim=True)
    std = ((x * x * w).sum(-1, keepdim=True) - mean * mean).clamp(min=eps).sqrt()
    return mean, std


class SEModule(nn.Module):
    """Squeeze-excitation over channels (Hu et al., 2018) whose squeeze averages valid frames only."""

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.down, self.up = nn.Conv1d(channels, bottleneck, 1), nn.Conv1d(bottleneck, channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, C, T), (B, 1, T)
        s = (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)  # (B, C, 1)
        return x * torch.sigmoid(self.up(F.relu(self.down(s))))


class SERes2Block(nn.Module):
    """ECAPA's SE-Res2Block: 1x1 conv, Res2Net dilated convs over `scale` channel groups, 1x1 conv, SE, residual."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int = 8):
        super().__init__()
        self.width = channels // scale
        self.conv1, self.bn1 = nn.Conv1d(channels, self.width * scale, 1), nn.BatchNorm1d(self.width * scale)
        pad = kernel_size // 2 * dilation  # "same" length, so the time axis and the mask never change
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, kernel_size, dilation=dilation, padding=pad) for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))
        self.conv3, self.bn3 = nn.Conv1d(self.width * scale, channels, 1), nn.BatchNorm1d(channels)
        self.se = SEModule(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        # Padded frames are re-zeroed after every BatchNorm (its bias makes them non-zero): a dilated conv
        # near the end of an utterance then sees the same zeros as when the utterance is alone.
        groups = (self.bn1(F.relu(self.conv1(x))) * mask).split(self.width, dim=1)
        out, sp = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            sp = groups[i] if i == 0 else sp + groups[i]
            sp = bn(F.relu(conv(sp))) * mask
            out.append(sp)
        out = torch.cat([*out, groups[-1]], dim=1)
        out = self.bn3(F.relu(self.conv3(out))) * mask
        return self.se(out, mask) + x


class AttentiveStatsPooling(nn.Module):
    """Channel- and context-dependent attentive statistics pooling (ECAPA-TDNN section 2.2): (B, C, T) -> (B, 2C).

    Padded frames get zero attention and are left out of the global context (mean, std) too.
    """

    def __init__(self, channels: int, attention_channels: int = 128):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv1d(3 * channels, attention_channels, 1),
            nn.ReLU(),
            nn.BatchNorm1d(attention_channels),
            nn.Tanh(),
            nn.Conv1d(attention_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = x.size(-1)
        mean, std = _masked_mean_std(x, mask / mask.sum(-1, keepdim=True))
        context = torch.cat([x, mean.expand(-1, -1, T), std.expand(-1, -1, T)], dim=1)  # (B, 3C, T)
        scores = self.attention(context).masked_fill(mask == 0, float("-inf"))
        mean, std = _masked_mean_std(x, F.softmax(scores, dim=-1))  # (B, C, 1) each
        return torch.cat([mean, std], dim=1).squeeze(-1)


class EcapaTdnn(nn.Module):
    """ECAPA-TDNN (Desplanques et al., Interspeech 2020, arXiv 2005.07143) on upstream features.

    conv k5 -> SE-Res2Blocks (k3, dilation 2, 3, 4; each fed the sum of the previous outputs, as in
    s3prl's ECAPA_TDNN) -> multi-layer feature aggregation (1x1 conv over the 3 block outputs, 1536
    channels) -> attentive statistics pooling -> BN -> Linear -> BN. All convolutions keep the length,
    and padded frames are masked everywhere, so in eval mode an embedding does not depend on its batch.
    (In training, BatchNorm statistics include padded frames; crops there are of similar length.)
    """

    def __init__(self, input_size: int, output_size: int = 192, channels: int = 512, mfa_channels: int = 1536):
        super().__init__()
        self.output_size = output_size
        self.conv1, self.bn1 = nn.Conv1d(input_size, channels, 5, padding=2), nn.BatchNorm1d(channels)
        self.blocks = nn.ModuleList(SERes2Block(channels, 3, d) for d in (2, 3, 4))
        self.mfa = nn.Conv1d(3 * channels, mfa_channels, 1)
        self.pool = AttentiveStatsPooling(mfa_channels)
        self.bn_pool = nn.BatchNorm1d(2 * mfa_channels)
        self.fc, self.bn_embed = nn.Linear(2 * mfa_channels, output_size), nn.BatchNorm1d(output_size)

    def forward(self, x: torch.Tensor, x_len: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, E)
        x = x.transpose(1, 2)  # (B, D, T)
        mask = _length_mask(x, x_len)
        x = self.bn1(F.relu(self.conv1(x * mask))) * mask  # (B, C, T)
        outs = []
        for block in self.blocks:
            x_in = x if not outs else x + sum(outs)
            outs.append(block(x_in, mask))
        h = F.relu(self.mfa(torch.cat(outs, dim=1))) * mask  # (B, 1536, T)
        return self.bn_embed(self.fc(self.bn_pool(self.pool(h, mask))))


class MHFA(nn.Module):
    """Multi-head factorized attentive pooling (Peng et al., "An attention-based backend allowing efficient
    fine-tuning of transformer models for speaker verification", SLT 2022, arXiv 2210.01273), the backend of BUT's
    WeSpeaker SSL recipe: (B, 2, T, D) keys and values, (B,) lengths -> (B, E).

    Keys and values are the featurizer's two softmax layer weightings of the upstream's hidden states
    (`layer_weightings` below: the paper's w_k and w_v, as `featurizer.weights` rows 0 and 1). Each is compressed
    by a Linear to `compression_dim`; a Linear maps every compressed key frame to one score per head, a softmax over
    the utterance's own frames makes each head's scores pooling weights, each head pools the compressed values with
    them, and the heads' pooled vectors, concatenated, are projected to the embedding. The module names are
    WeSpeaker's (`cmp_linear_k`, `cmp_linear_v`, `att_head`, `pooling_fc`; its `weights_k` and `weights_v` are the
    featurizer's rows), so its MHFA weights map over by name.

    Padded frames get zero weight, and there is no BatchNorm or dropout: training and evaluation compute the
    same function, and an embedding does not depend on its batch.
    """

    # The featurizer gives this downstream two weighted sums of the hidden states, keys and values, in place of
    # SUPERB's one (build_speaker_model reads it; a downstream without it reads one).
    layer_weightings = 2

    def __init__(self, input_size: int, output_size: int = 256, heads: int = 64, compression_dim: int = 128):
        super().__init__()
        self.output_size = output_size
        self.cmp_linear_k = nn.Linear(input_size, compression_dim)
        self.cmp_linear_v = nn.Linear(input_size, compression_dim)
        self.att_head = nn.Linear(compression_dim, heads)
        self.pooling_fc = nn.Linear(heads * compression_dim, output_size)

    def forward(self, x: torch.Tensor, x_len: torch.Tensor) -> torch.Tensor:  # (B, 2, T, D) -> (B, E)
        keys, values = x.unbind(1)
        padded = (torch.arange(x.size(2), device=x.device)[None, :] >= x_len[:, None]).unsqueeze(-1)  # (B, T, 1)
        scores = self.att_head(self.cmp_linear_k(keys)).masked_fill(padded, float("-inf"))  # (B, T, H)
        weights = F.softmax(scores, dim=1)  # over frames, per head
        # A padded frame's weight is exactly 0, but 0 times a non-finite value is not 0, and batch-exact upstream
        # forwards leave padded frames unspecified: the values there are zeroed too.
        values = self.cmp_linear_v(values).masked_fill(padded, 0.0)  # (B, T, C)
        pooled = weights.transpose(1, 2) @ values  # (B, H, C)
        return self.pooling_fc(pooled.flatten(1))


# name -> constructor from the featurizer's output size and the model config section (asv.config.ModelConfig).
DOWNSTREAMS = registry(
    DOWNSTREAM_NAMES,
    {
        "xvector": lambda d, m: SuperbXvector(
            d, m.embed_dim, m.hidden_size, m.aggregation_size, m.dropout_p, m.batch_norm, m.tdnn_size
        ),
        "ecapa": lambda d, m: EcapaTdnn(d, m.embed_dim, channels=m.ecapa_channels),
        "mhfa": lambda d, m: MHFA(d, m.mhfa_embed_dim, m.mhfa_heads, m.mhfa_compression_dim),
    },
)


def _common_size_and_stride(upstream) -> tuple[int, int]:
    """The size and stride all the upstream's hidden states share: what a layer-weighted sum needs."""
    if len(set(upstream.hidden_sizes)) != 1 or len(set(upstream.downsample_rates)) != 1:
        raise UpstreamError(
            f"the upstream's hidden states differ in size ({sorted(set(upstream.hidden_sizes))}) or stride "
            f"({sorted(set(upstream.downsample_rates))}): the layer-weighted sum needs them equal"
        )
    return upstream.hidden_sizes[0], upstream.downsample_rates[0]


class Featurizer(nn.Module):
    """s3prl's Featurizer (s3prl/nn/upstream.py): softmax-weighted sum of the upstream's hidden states, with
    the same parameter (`weights`, zeros at init), layer selection (sorted 0-based indices), optional
    parameter-free layer norm, output size/stride and lengths (those of the first selected state).

    The sum is one matrix-vector product over the stacked states, whose backward for the weights is one
    more: s3prl multiplies and sums a layers x frames x dims temporary in each direction, three times the
    memory traffic (on a 2-core CPU, 0.30 s -> 0.09 s per HuBERT Base batch of 10 x 5 s, forward and
    backward). Stacking copies the states into an ordinary tensor, so inference-mode states from a frozen
    upstream need no clone first (asv.forward.training_features). A single selected state also works (s3prl
    asserts there); a single-state upstream passes through unchanged.

    `weightings` > 1 gives that many independent weighted sums of the same states, side by side (B, weightings,
    T, D), `weights` then (weightings, layers): MHFA's keys and values. The one product becomes a matrix product,
    and a single-state upstream's state is repeated.
    """

    def __init__(
        self, upstream, layer_selections: list[int] | None = None, normalize: bool = False, weightings: int = 1
    ):
        super().__init__()
        self._output_size, self._downsample_rate = _common_size_and_stride(upstream)
        self.normalize, self.weightings = normalize, weightings
        if upstream.num_layers > 1:
            selections = sorted(layer_selections) if layer_selections is not None else range(upstream.num_layers)
            self.layer_selections = list(selections)
            if not self.layer_selections or not 0 <= self.layer_selections[0] <= self.layer_selections[-1] < (
                upstream.num_layers
            ):
                raise ConfigError(
                    f"--layer_selections {layer_selections}: the upstream has {upstream.num_layers} hidden states; "
                    f"pick indices from 0 to {upstream.num_layers - 1}"
                )
            layers = len(self.layer_selections)
            # One weighting keeps s3prl's (layers,) parameter, so SUPERB checkpoints load unchanged.
            self.weights = nn.Parameter(torch.zeros(layers) if weightings == 1 else torch.zeros(weightings, layers))

    @property
    def output_size(self) -> int:
        return self._output_size

    @property
    def downsample_rate(self) -> int:
        return self._downsample_rate

    def forward(self, all_hs: list[torch.Tensor], all_lens: list[torch.Tensor]):
        if len(all_hs) == 1:
            h = all_hs[0]
            return (h if self.weightings == 1 else h.unsqueeze(1).expand(-1, self.weightings, -1, -1)), all_lens[0]
        stacked = torch.stack([all_hs[i] for i in self.layer_selections])  # (L, B, T, D)
        if self.normalize:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])
        # In fp32 even under autocast: s3prl's fp32 weights times bf16/fp16 states promote to fp32 too.
        with torch.autocast(stacked.device.type, enabled=False):
            w = F.softmax(self.weights.float(), dim=-1)  # (L,) or (weightings, L)
            mixed = (w @ stacked.float().flatten(1)).view(*w.shape[:-1], *stacked.shape[1:])
        if self.weightings > 1:
            mixed = mixed.transpose(0, 1)  # (weightings, B, T, D) -> (B, weightings, T, D)
        return mixed, all_lens[self.layer_selections[0]]


class SpeakerModel(nn.Module):
    """Everything that trains: featurizer weights, downstream and loss head. The frozen upstream stays outside.

    `forward` returns (loss, logits) for training; `embed` returns the scored embedding, which only
    needs the featurizer and downstream (the `embedder_state_dict`).
    """

    def __init__(self, featurizer: nn.Module, downstream: nn.Module, head: nn.Module):
        super().__init__()
        self.featurizer, self.downstream, self.head = featurizer, downstream, head

    def embed(self, hidden_states: list[torch.Tensor], hidden_lens: list[torch.Tensor]) -> torch.Tensor:
        h, h_len = self.featurizer(hidden_states, hidden_lens)  # (B, T, D); MHFA's keys and values (B, 2, T, D)
        return self.downstream(h, h_len)  # (B, E)

    def forward(self, hidden_states, hidden_lens, labels: torch.Tensor):
        return self.head(self.embed(hidden_states, hidden_lens), labels)

    def layer_weights(self) -> torch.Tensor | None:
        """Softmax-normalised featurizer weights, or None for a single-layer upstream. Of several weightings, the
        last: MHFA's values, the layers whose content is pooled into the embedding (its keys' weighting only decides
        which frames are pooled)."""
        w = getattr(self.featurizer, "weights", None)
        return None if w is None else F.softmax(w.detach().float(), dim=-1).view(-1, w.shape[-1])[-1]

    def embedder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}


def build_speaker_model(model_cfg, loss_cfg, upstream, num_classes: int) -> SpeakerModel:
    """Featurizer + downstream + head for `upstream`, from the model and loss config sections."""
    if model_cfg.downstream not in DOWNSTREAMS:
        raise ValueError(f"unknown downstream '{model_cfg.downstream}'; choose one of: {', '.join(DOWNSTREAMS)}")
    # The downstream first: it says how many weighted sums the featurizer gives it (MHFA: keys and values).
    downstream = DOWNSTREAMS[model_cfg.downstream](_common_size_and_stride(upstream)[0], model_cfg)
    featurizer = Featurizer(
        upstream,
        layer_selections=model_cfg.layer_selections,
        normalize=model_cfg.featurizer_normalize,
        weightings=getattr(downstream, "layer_weightings", 1),
    )
    head = build_loss(loss_cfg, downstream.output_size, num_classes)
    return SpeakerModel(featurizer, downstream, head)
