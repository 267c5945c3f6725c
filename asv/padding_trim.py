"""A frozen upstream's training forward over a padded batch, computed without most of the padding.

s3prl's training step (and ours, which must take the same update) runs the upstream over the whole padded
batch: on a CPU that costs per padded sample, and a batch of 10 VoxCeleb-length utterances is 15-25 % padding.
What the x-vector reads of utterance i is its first ceil(len_i / stride) frames; in wav2vec 2.0, HuBERT and
WavLM those depend on the rest of the batch only through its padded width T (asv/batch_exact.py audits every
frame-mixing layer of these models):

1. the group norm of the first conv layer averages each channel over all conv frames of width T, and past
   len_i that conv's input is silence (zeros), so those frames hold the conv's output for silence;
2. HuBERT and WavLM chunk the sample mask into frames at width T (`forward_padding_mask`);
3. a frame past the mask is zeroed before the positional convolution and masked as an attention key, so it
   reads as nothing, exactly like a frame that is not there at all.

So each utterance runs alone on its samples plus the few padding samples its kept and mask-valid frames read,
with the group norm given the silence frames it does not compute and the mask computed at width T: the same
numbers as its row of the padded batch, up to float summation order (tests/test_padding_trim.py; the s3prl
parity test trains through it). On a CPU, where one utterance costs as much per second of audio as a batch
does, that is the padding's compute saved; on a GPU the padded batch is what runs fast, so it stays.

The same accounting lets several padded batches run as one (grouped_upstream_forward, --upstream_batches): on a GPU
one large batch keeps the device busier than the accumulation's several small ones, and each batch still gets
the features of its own padded forward.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack

import torch
import torch.nn.functional as F

from asv.batch_exact import (
    MIN_SAMPLES,
    Plan,
    _group_norm_per_utterance,
    _repeat_last_frames,
    conv_lengths,
    plan_for,
    shadow,
)
from asv.upstream import upstream_forward

# Per-utterance calls cost a few ms each in Python and kernel set-up: a real-size model (95 M+ parameters, ~0.1 s
# per second of audio on a 2-core CPU) gains the padding's compute, a tiny test model loses (tiny HuBERT: 0.19 s
# trimmed vs 0.08 s padded per batch of 10). The tests lower this to exercise the path on tiny models.
TRIM_MIN_PARAMETERS = 20_000_000


def trimmable(upstream, wav: torch.Tensor, wav_len: torch.Tensor) -> bool:
    """Whether trimmed_upstream_forward applies: a fairseq-style wav2vec 2.0 / HuBERT / WavLM of real size whose
    only group norm (if any) follows the first conv, on a CPU, in a batch that has padding to save."""
    if wav.device.type != "cpu" or wav.size(0) < 2 or bool((wav_len == wav_len.max()).all()):
        return False
    if int(wav_len.min()) < MIN_SAMPLES:  # S3PRLUpstream zero-extends a lone utterance this short, not a batch
        return False
    plan = plan_for(upstream, announce=False)
    if not plan.exact or plan.fairseq_model is None or any(layer != 0 for _, layer in plan.group_norms):
        return False
    return sum(p.numel() for p in plan.fairseq_model.parameters()) >= TRIM_MIN_PARAMETERS


def width_for(frames: int, convs: list[tuple[int, int]]) -> int:
    """The fewest samples from which the conv stack computes `frames` frames."""
    width = frames
    for kernel, stride in reversed(convs):
        width = (width - 1) * stride + kernel
    return width


@torch.inference_mode()
def trimmed_upstream_forward(upstream, wav: torch.Tensor, wav_len: torch.Tensor, precision: str = "fp32"):
    """What `upstream_forward(upstream, wav, wav_len, precision)` returns, on each utterance's first
    ceil(len / stride) frames (the frames past them are zeros here), one utterance at a time over its own
    samples. Call only where `trimmable` says so."""
    module = getattr(upstream, "module", upstream)
    plan = plan_for(module, announce=False)
    padded_width = int(wav_len.max())  # what s3prl's expert pads the batch to
    model_frames = int(conv_lengths(torch.tensor(padded_width), plan.convs))
    first_frames = int(conv_lengths(torch.tensor(padded_width), plan.convs[:1]))
    stride = module.downsample_rates[0]
    keep = torch.div(wav_len - 1, stride, rounding_mode="floor") + 1  # S3PRLUpstream's frames per utterance
    mask = _frame_mask(plan, wav_len, padded_width, model_frames)  # (B, model_frames), True on padding
    valid = (~mask).sum(-1)
    rows = []
    for i in range(wav.size(0)):
        n = int(wav_len[i])
        needed = max(int(keep[i]), int(valid[i]))  # frames kept, and frames the encoder attends to
        width = min(padded_width, width_for(needed, plan.convs))
        with ExitStack() as undo:
            model = plan.fairseq_model
            extract = functools.partial(_extended_extract, type(model).extract_features.__get__(model), width)
            undo.enter_context(shadow(model, "extract_features", extract))
            for gn, _ in plan.group_norms:
                fill = functools.partial(_group_norm_with_silence, gn, plan.first_conv, first_frames)
                undo.enter_context(shadow(gn, "forward", fill))
            if plan.mask_model is not None:
                frame_mask = functools.partial(_given_mask, mask[i : i + 1])
                undo.enter_context(shadow(plan.mask_model, "forward_padding_mask", frame_mask))
            rows.append(upstream_forward(module, wav[i : i + 1, :n], wav_len[i : i + 1], precision)[0])
    out_frames = len(range(0, padded_width, stride))
    hidden = []
    for layer in range(len(rows[0])):
        h = rows[0][layer].new_zeros(wav.size(0), out_frames, rows[0][layer].size(-1))
        for i, row in enumerate(rows):
            h[i, : int(keep[i])] = row[layer][0, : int(keep[i])]
        hidden.append(h)
    return hidden, [keep.clone() for _ in hidden]


def _frame_mask(plan: Plan, wav_len: torch.Tensor, width: int, frames: int) -> torch.Tensor:
    """The frame padding mask the model derives at the batch's padded width: HuBERT/WavLM chunk the sample mask
    (their own forward_padding_mask), wav2vec 2.0 counts conv frames of the valid samples."""
    samples = torch.arange(width, device=wav_len.device)[None, :] >= wav_len[:, None]
    if plan.mask_model is not None:
        features = samples.new_empty(len(wav_len), frames, 0)
        return type(plan.mask_model).forward_padding_mask(plan.mask_model, features, samples)
    return torch.arange(frames, device=wav_len.device)[None, :] >= conv_lengths(wav_len, plan.convs)[:, None]


def _extended_extract(extract, width: int, source: torch.Tensor, padding_mask=None, *args, **kwargs):
    """The model's extract_features on the utterance followed by zeros up to `width`, marked as padding (as in
    the padded batch, whose zeros past the utterance the kept frames read)."""
    extra = width - source.size(1)
    source = F.pad(source, (0, extra))
    if padding_mask is not None:
        padding_mask = F.pad(padding_mask, (0, extra), value=True)
    return extract(source, padding_mask, *args, **kwargs)


def _group_norm_with_silence(gn, first_conv, frames: int, x: torch.Tensor) -> torch.Tensor:
    """The group norm over `frames` conv frames, the ones past x being the first conv's output for silence
    (zeros in, its bias out), as in the padded batch; returns x's frames only."""
    missing = frames - x.size(-1)
    if missing > 0:
        silence = first_conv(x.new_zeros(1, first_conv.in_channels, first_conv.kernel_size[0])).to(x.dtype)
        x = torch.cat([x, silence.expand(x.size(0), -1, missing)], dim=-1)  # silence: (1, C, 1)
    return type(gn).forward(gn, x)[..., : x.size(-1) - max(missing, 0)]


def _given_mask(mask: torch.Tensor, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    return mask[:, : features.size(1)]


def groupable(upstream, batches) -> bool:
    """Whether grouped_upstream_forward applies: a fairseq-style wav2vec 2.0 / HuBERT / WavLM whose every
    frame-mixing layer asv.batch_exact accounts for, and batches no shorter than the minimum S3PRLUpstream
    zero-extends a batch to (it would then count the zeros as samples)."""
    plan = plan_for(upstream, announce=False)
    long_enough = all(int(n.max()) >= MIN_SAMPLES for _, n in batches)
    return plan.exact and plan.fairseq_model is not None and long_enough and len(batches) > 1


@torch.inference_mode()
def grouped_upstream_forward(upstream, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32"):
    """[(hidden, hidden_len)] per batch: what `upstream_forward(upstream, wav, wav_len, precision)` returns for each
    (wav, wav_len) of `batches`, from one forward over all their utterances (on a GPU one large batch keeps it
    busier than several small ones). Call only where `groupable` says so.

    Each batch's width W (its longest utterance, to which s3prl's expert pads it) reaches its features in the
    ways listed at the top of this module, and in one more: S3PRLUpstream cuts or extends the model's frames to
    len(range(0, W, stride)), repeating the last one. In the joint forward, padded to the widest batch, each row's
    group norm runs over the conv frames of its own batch's W (the same silence frames past its samples), its
    frame mask is the one its batch computes at W, and its frames past its batch's last model frame repeat that
    frame; everything else only mixes frames through masked attention and the zeroed positional convolution."""
    module = getattr(upstream, "module", upstream)
    plan = plan_for(module, announce=False)
    widths = [int(wav_len.max()) for _, wav_len in batches]
    width = max(widths)
    wav = torch.cat([F.pad(w[:, :bw], (0, width - bw)) for (w, _), bw in zip(batches, widths, strict=True)])
    wav_len = torch.cat([n for _, n in batches])
    row_width = torch.cat([torch.full_like(n, w) for (_, n), w in zip(batches, widths, strict=True)])
    model_frames = conv_lengths(row_width, plan.convs)  # per row: the frames its own batch's model computes
    with ExitStack() as undo:
        for gn, layer in plan.group_norms:
            valid = conv_lengths(row_width, plan.convs[: layer + 1])  # on the host: read per row
            undo.enter_context(shadow(gn, "forward", functools.partial(_group_norm_per_utterance, gn, valid)))
        if plan.mask_model is not None:
            frames = int(conv_lengths(torch.tensor(width), plan.convs))
            masks = [
                _frame_mask(plan, n, w, int(conv_lengths(torch.tensor(w), plan.convs)))
                for (_, n), w in zip(batches, widths, strict=True)
            ]
            mask = torch.cat([F.pad(m, (0, frames - m.size(1)), value=True) for m in masks]).to(wav.device)
            undo.enter_context(shadow(plan.mask_model, "forward_padding_mask", functools.partial(_given_mask, mask)))
        hidden, _ = upstream_forward(module, wav, wav_len, precision)
    # Each batch's rows, ended as its own forward ends them: ceil(len / stride) frames per utterance, its batch's
    # last model frame repeated past it (asv.batch_exact's rule for a lone utterance, with that batch's frames).
    sizes = [len(n) for _, n in batches]
    per_batch = zip(*(h.split(sizes) for h in hidden), strict=True)
    return [
        _repeat_last_frames(list(hs), n, last.to(hs[0].device), module.downsample_rates)
        for (_, n), hs, last in zip(batches, per_batch, model_frames.split(sizes), strict=True)
    ]
