"""Batched upstream forward that equals s3prl's one-utterance-at-a-time forward (SuperbASV evaluates at batch 1).

Padding leaks into a padded batch of S3PRLUpstream in three places, all found in s3prl 0.4.18's code:

1. The group-normalised first conv layer of wav2vec 2.0 / HuBERT / WavLM Base (fairseq extractor_mode "default",
   HF feat_extract_norm "group") normalises each channel over the whole padded time axis. Here each utterance is
   normalised over its own valid conv frames only, by the module's own forward on that slice (same kernel, same
   dtype handling as batch 1).
2. HuBERT and WavLM derive the frame padding mask by chunking the sample mask (`forward_padding_mask`), which marks
   as valid up to one frame past the last one the convolutions computed from real samples; attention then reads a
   frame made of padding. Here the mask comes from the conv arithmetic, as wav2vec 2.0 and HF already do.
3. S3PRLUpstream pads a lone utterance's hidden states to ceil(len/stride) frames by repeating its last frame
   (`_match_length`); in a batch the frames between the utterance's conv length and ceil(len/stride) are computed
   from padding instead (fbank/mfcc: zeros). Here they are replaced by the last valid frame, per utterance.

Everything else in these models only mixes frames through attention (masked) or through the positional
convolution, whose input the models already zero on padded frames. Utterances shorter than s3prl's 0.05 s
minimum are zero-extended to it, as S3PRLUpstream does to a lone short utterance.

The patches are installed on the loaded modules only inside `exact_upstream_forward` and removed on the way out
(instance attributes shadowing the class's methods), so the training forward is s3prl's, padding and all, and
runs no extra code. An upstream without a plan here (any other s3prl hub name, or a variant whose modules this
audit does not cover, e.g. conformer layers) is embedded one utterance at a time, said once on stderr: a checked
batch proves nothing about other length mixes, and batch 1 is the reference anyway.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from asv.conventions import MIN_SAMPLES, num_frames
from asv.upstream import upstream_forward

# Layers whose output at one frame can read other frames; each one in a model must be one its plan accounts for
# (attention is not listed: every model covered here masks padded keys).
TIME_MIXING = (
    nn.modules.conv._ConvNd,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.RNNBase,
)


@dataclass
class Plan:
    """How one loaded upstream is made batch-exact; `reason` says why not when `exact` is False."""

    exact: bool
    reason: str = ""
    convs: list[tuple[int, int]] = field(default_factory=list)  # (kernel, stride) of the conv feature extractor
    group_norms: list[tuple[nn.Module, int]] = field(default_factory=list)  # (module, index of its conv layer)
    mask_model: nn.Module | None = None  # a HuBERT/WavLM model whose forward_padding_mask is replaced
    kaldi: nn.Module | None = None  # a baseline (fbank/mfcc) expert whose per-utterance frame counts are read
    announced: bool = False


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(upstream, announce: bool = True) -> Plan:
    """The plan for this upstream, built once per module (and, with `announce`, the batch-1 fallback said once)."""
    upstream = getattr(upstream, "module", upstream)  # a fine-tuned upstream may be DDP-wrapped
    if upstream not in _plans:
        _plans[upstream] = _build_plan(upstream)
    plan = _plans[upstream]
    if announce and not plan.exact and not plan.announced and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: embedding one utterance at a time: {plan.reason}", file=sys.stderr)
        plan.announced = True
    return plan


def exact_upstream_forward(upstream, wav: torch.Tensor, wav_len: torch.Tensor, precision: str = "fp32"):
    """Hidden states and lengths of a padded batch, each utterance's equal to what it gets alone (batch 1).

    wav (B, T) padded audio, wav_len (B,) its lengths; returns ([(B, T', D)] per layer, [(B,)] per layer) like
    S3PRLUpstream, frames past each length unspecified.
    """
    module = getattr(upstream, "module", upstream)
    wav = wav.squeeze(-1) if wav.dim() == 3 else wav
    plan = plan_for(module)
    with _modes_kept(module):
        if not plan.exact:
            return _one_by_one(module, wav, wav_len, precision)
        return _exact(module, plan, wav, wav_len, precision)


@contextmanager
def _modes_kept(module: nn.Module):
    """upstream_forward puts the upstream in eval mode (dropout off, as SuperbASV evaluates); a fine-tuned one
    goes back to training afterwards, as s3prl's runner puts trainable modules back after evaluating."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def batch1_upstream_forward(upstream, wav: torch.Tensor, wav_len: torch.Tensor, precision: str = "fp32"):
    """What exact_upstream_forward returns, computed as s3prl's evaluation does: each utterance alone."""
    module = getattr(upstream, "module", upstream)
    wav = wav.squeeze(-1) if wav.dim() == 3 else wav
    with _modes_kept(module):
        return _one_by_one(module, wav, wav_len, precision)


def _exact(module, plan: Plan, wav: torch.Tensor, wav_len: torch.Tensor, precision: str):
    """One padded forward with the plan's patches, then s3prl's per-utterance frame counts."""
    # A lone utterance under 0.05 s is zero-extended to it and modelled as that longer input; do the same per
    # utterance (in a batch, s3prl extends only when the longest one is that short).
    model_len = wav_len.clamp(min=MIN_SAMPLES)
    width = max(wav.size(1), int(model_len.max()))
    valid = torch.arange(width, device=wav.device)[None, :] < wav_len[:, None]
    wav = torch.nn.functional.pad(wav, (0, width - wav.size(1))) * valid
    with _patched(plan, model_len) as frames:
        hs, _ = upstream_forward(module, wav, model_len, precision)
    model_frames = frames() if plan.kaldi is not None else conv_lengths(model_len, plan.convs)
    return _repeat_last_frames(hs, wav_len, model_frames, module.downsample_rates)


def _one_by_one(upstream, wav: torch.Tensor, wav_len: torch.Tensor, precision: str):
    """The reference itself: each utterance alone, the outputs padded into a batch."""
    outs = [
        upstream_forward(upstream, wav[i : i + 1, : int(n)], wav_len[i : i + 1], precision)
        for i, n in enumerate(wav_len)
    ]
    hs, lens = [], []
    for layer in range(len(outs[0][0])):
        hs.append(torch.nn.utils.rnn.pad_sequence([o[0][layer][0] for o in outs], batch_first=True))
        lens.append(torch.cat([o[1][layer] for o in outs]))
    return hs, lens


def conv_lengths(lengths: torch.Tensor, convs: list[tuple[int, int]]) -> torch.Tensor:
    """Output frames of an unpadded conv stack: the frames computed from real samples only."""
    for kernel, stride in convs:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


def _repeat_last_frames(hs, wav_len, model_frames, strides):
    """s3prl's per-utterance length rule: ceil(len / stride) frames, the model's own frames first, then its
    last one repeated (S3PRLUpstream._match_length on a batch of one)."""
    out_hs, out_lens = [], []
    for h, stride in zip(hs, strides, strict=True):
        h_len = num_frames(wav_len, stride)
        t = int(h_len.max())
        src = torch.minimum(torch.arange(t, device=h.device)[None, :], (model_frames - 1)[:, None])  # (B, t)
        out_hs.append(h.gather(1, src[..., None].expand(-1, -1, h.size(-1))))
        out_lens.append(h_len)
    return out_hs, out_lens


@contextmanager
def _patched(plan: Plan, model_len: torch.Tensor):
    """Install the plan's patches on the modules for one forward; yields a getter of the kaldi frame counts."""
    recorded: list[int] = []
    with ExitStack() as undo:
        for gn, layer in plan.group_norms:
            valid = conv_lengths(model_len, plan.convs[: layer + 1])
            undo.enter_context(shadow(gn, "forward", functools.partial(_group_norm_per_utterance, gn, valid)))
        if plan.mask_model is not None:
            fn = functools.partial(_conv_padding_mask, plan.convs)
            undo.enter_context(shadow(plan.mask_model, "forward_padding_mask", fn))
        if plan.kaldi is not None:
            fn = functools.partial(_recording_extractor, plan.kaldi, recorded)
            undo.enter_context(shadow(plan.kaldi, "_extractor_forward", fn))
        yield lambda: torch.tensor(recorded, device=model_len.device)


@contextmanager
def shadow(obj, name: str, fn):
    setattr(obj, name, fn)
    try:
        yield
    finally:
        delattr(obj, name)  # the class's method shows through again


def _group_norm_per_utterance(gn: nn.Module, valid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> (B, C, T): the module's own forward on each utterance's valid frames, zeros after them."""
    out = torch.zeros_like(x)
    for i, n in enumerate(valid.tolist()):
        out[i : i + 1, :, :n] = type(gn).forward(gn, x[i : i + 1, :, :n])
    return out


def _conv_padding_mask(convs, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T_feat) True on frames past each utterance's conv length (replaces HuBERT/WavLM's chunked rule)."""
    frames = conv_lengths((~padding_mask).sum(-1), convs)
    return torch.arange(features.size(1), device=features.device)[None, :] >= frames[:, None]


def _recording_extractor(expert: nn.Module, recorded: list, wavs):
    feats = type(expert)._extractor_forward(expert, wavs)
    recorded.extend(len(f) for f in feats)
    return feats


# ---- plans: one per expert family; every time-mixing layer of the model must be accounted for


def _build_plan(upstream) -> Plan:
    expert = upstream.upstream
    family = type(expert).__module__.removeprefix("s3prl.upstream.").removesuffix(".expert")
    what = f"upstream {family} ({type(expert).__module__}.{type(expert).__name__})"
    if len(set(upstream.downsample_rates)) != 1:
        return Plan(False, f"{what} has layers at different strides")
    builder = {
        "baseline": _baseline_plan,
        "wav2vec2": _fairseq_plan,
        "hubert": _fairseq_plan,
        "wavlm": _fairseq_plan,
        "hf_wav2vec2": _hf_plan,
    }.get(family)
    if builder is None or type(expert).__name__ != "UpstreamExpert":
        return Plan(False, f"{what} has no batch-exact plan (asv/batch_exact.py covers fbank/mfcc, wav2vec2, "
                    "hubert, wavlm and hf_wav2vec2)")  # fmt: skip
    plan = builder(expert)
    if not plan.exact:
        plan.reason = f"{what}: {plan.reason}"
    return plan


def _baseline_plan(expert) -> Plan:
    if "kaldi" not in expert.config:  # torchaudio front-ends run over the padded batch (STFT frames see padding)
        return Plan(False, "its features are computed on the padded batch")
    return Plan(True, kaldi=expert)


def _conv_stack(extractor: nn.Module) -> tuple[list[tuple[int, int]], list[tuple[nn.Module, int]], list] | str:
    """(kernel, stride) per conv layer, the group norms among them, and the modules covered; or why not."""
    convs, norms, covered = [], [], []
    for i, block in enumerate(extractor.conv_layers):
        conv = [m for m in block.modules() if isinstance(m, nn.Conv1d)]
        if len(conv) != 1 or conv[0].padding != (0,) or conv[0].dilation != (1,):
            return f"conv layer {i} is not one unpadded, undilated Conv1d"
        convs.append((conv[0].kernel_size[0], conv[0].stride[0]))
        norms += [(m, i) for m in block.modules() if isinstance(m, nn.GroupNorm)]
        covered += [m for m in block.modules() if isinstance(m, TIME_MIXING)]
    return convs, norms, covered


def _audit(model: nn.Module, covered: list, layers, layer_types: tuple) -> str:
    """Why the model is not covered ('' if it is): an unknown encoder layer or an unaccounted time-mixing module."""
    odd = [type(layer).__name__ for layer in layers if not isinstance(layer, layer_types)]
    if odd:
        return f"encoder layers of type {odd[0]} are not covered (e.g. conformer convolutions)"
    ids = {id(m) for m in covered}
    for name, m in model.named_modules():
        if isinstance(m, TIME_MIXING) and id(m) not in ids:
            return f"module {name} ({type(m).__name__}) mixes frames and is not covered"
    return ""


def _fairseq_plan(expert) -> Plan:
    """wav2vec 2.0 (s3prl's fairseq copy), HuBERT and WavLM: conv extractor, positional conv, transformer."""
    from s3prl.upstream.wav2vec2.wav2vec2_model import TransformerSentenceEncoderLayer
    from s3prl.upstream.wavlm.WavLM import TransformerSentenceEncoderLayer as WavLMLayer

    model = expert.model
    if getattr(model, "crop_seq_to_multiple", 1) != 1:  # would crop by the batch's length, not the utterance's
        return Plan(False, "crop_seq_to_multiple != 1")
    if getattr(model, "input_quantizer", None) is not None:
        return Plan(False, "its input is quantized")
    if not getattr(expert, "apply_padding_mask", True):
        return Plan(False, "the expert runs without a padding mask")
    if getattr(model.feature_extractor, "conv_type", "default") != "default":
        return Plan(False, "its feature extractor is not a 1-D conv stack")
    stack = _conv_stack(model.feature_extractor)
    if isinstance(stack, str):
        return Plan(False, stack)
    convs, norms, covered = stack
    # The positional convolution reads neighbouring frames; the encoder zeroes padded frames before it, so
    # they read as the zero padding a lone utterance's conv sees. Only a single conv block (no norm or
    # bias between stacked ones, pos_conv_depth 1) keeps that true.
    pos = model.encoder.pos_conv
    pos_convs = [] if pos is None else [m for m in pos.modules() if isinstance(m, TIME_MIXING)]
    if len(pos_convs) > 1:
        return Plan(False, "its positional convolution is a stack (pos_conv_depth > 1)")
    why = _audit(model, covered + pos_convs, model.encoder.layers, (TransformerSentenceEncoderLayer, WavLMLayer))
    if why:
        return Plan(False, why)
    # wav2vec 2.0 already derives its frame mask from the conv arithmetic; HuBERT and WavLM chunk the sample mask.
    mask_model = model if hasattr(model, "forward_padding_mask") else None
    return Plan(True, convs=convs, group_norms=norms, mask_model=mask_model)


def _hf_plan(expert) -> Plan:
    """transformers' Wav2Vec2Model as s3prl's hf_wav2vec2 expert runs it (with an attention mask)."""
    from transformers.models.wav2vec2 import modeling_wav2vec2 as hf

    model = expert.model
    if type(model) is not hf.Wav2Vec2Model or model.adapter is not None:
        return Plan(False, f"{type(model).__name__} with adapter={model.adapter is not None} is not covered")
    stack = _conv_stack(model.feature_extractor)
    if isinstance(stack, str):
        return Plan(False, stack)
    convs, norms, covered = stack
    # HF zeroes frames outside the attention mask before the positional convolution (Wav2Vec2Encoder.forward).
    pos_convs = [m for m in model.encoder.pos_conv_embed.modules() if isinstance(m, TIME_MIXING)]
    layer_types = (hf.Wav2Vec2EncoderLayer, hf.Wav2Vec2EncoderLayerStableLayerNorm)
    why = _audit(model, covered + pos_convs, model.encoder.layers, layer_types)
    if why:
        return Plan(False, why)
    return Plan(True, convs=convs, group_norms=norms)
