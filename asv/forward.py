"""How a frozen upstream runs: the one place that decides, for a training step and for an embedding.

Training takes s3prl's own forward over the padded batch (SuperbASV's training step; its padding is part of the
recipe: wav2vec 2.0's group norm and HuBERT/WavLM's frame mask see it), the `fbank` front-end's equal-length crops
computed a chunk at a time (asv.upstream.fbank_batched, bit for bit s3prl's per-utterance loop). Evaluation gives
each utterance its batch-1 hidden states, as s3prl's stage 3 does: on a CPU by running it alone (s3prl's
computation itself, and ~10 % faster there than the padded batch), elsewhere by the padded batch made batch-exact
(asv.batch_exact), which keeps a GPU busy.

The downstream (featurizer, x-vector or ECAPA, loss head) computes in IEEE fp32 (`ieee_fp32`) in training and
evaluation: s3prl's TDNN is unfold + Linear, a matmul, which PyTorch runs in full fp32 on CUDA, while our TDNN is
conv1d, which cuDNN would run in TF32 (a 10-bit mantissa) on Ampere and later by PyTorch's default. The upstream keeps
PyTorch's defaults, as it has in s3prl. --mixed_precision's autocast still applies inside: it is the user's choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from asv.batch_exact import batch1_upstream_forward, exact_upstream_forward
from asv.upstream import fbank_batchable, fbank_batched, upstream_forward


def training_features(
    upstream,
    wav: torch.Tensor,
    wav_len: torch.Tensor,
    *,
    trainable: bool,
    autocast: AbstractContextManager | None = None,
    upstream_precision: str = "fp32",
):
    """The hidden states and lengths a training step feeds the featurizer. A fine-tuned upstream runs with autograd
    under `autocast` (--mixed_precision); a frozen one in inference mode, autocast to `upstream_precision` alone,
    its outputs made usable by the step's backward pass."""
    with autocast or nullcontext():
        if trainable:
            return upstream(wav, wav_len)
        if fbank_batchable(upstream, wav, wav_len):
            with torch.inference_mode():
                hidden, hidden_len = fbank_batched(upstream, wav, wav_len)
        else:
            hidden, hidden_len = upstream_forward(upstream, wav, wav_len, upstream_precision)
    # Several states need nothing: the featurizer stacks them into an ordinary tensor first, and that copy is all
    # the backward pass keeps. A single state goes straight to the downstream, which saves its input for the
    # backward pass, and an inference-mode tensor cannot be saved: it is cloned.
    if len(hidden) > 1:
        return hidden, hidden_len
    return [h.clone() for h in hidden], [n.clone() for n in hidden_len]


def embedding_features(upstream, wav: torch.Tensor, wav_len: torch.Tensor, upstream_precision: str = "fp32"):
    """Hidden states and lengths of a padded batch of whole utterances, each utterance's equal to what it gets
    alone (batch 1, s3prl's evaluation): each one alone on a CPU, the batch-exact padded batch elsewhere."""
    forward = batch1_upstream_forward if wav.device.type == "cpu" else exact_upstream_forward
    return forward(upstream, wav, wav_len, upstream_precision)


# PyTorch's TF32 switches for cuDNN convolutions and CUDA matmuls, by their torch >= 2.9 names.
FP32_PRECISION_FLAGS = ("cudnn.conv", "cuda.matmul")


def _flag_owner(name: str):
    owner = torch.backends
    for part in name.split("."):
        owner = getattr(owner, part)
    return owner


def fp32_precision() -> dict[str, str]:
    """The fp32 precision in force for each flag of FP32_PRECISION_FLAGS: "ieee", "tf32" or "none" (PyTorch's
    default for that backend: TF32 for cuDNN convolutions, IEEE for CUDA matmuls). The same on CPU builds, which
    is how the tests see what a GPU would run."""
    if not hasattr(torch.backends.cudnn, "conv"):  # torch 2.8: the legacy booleans
        legacy = {"cudnn.conv": torch.backends.cudnn.allow_tf32, "cuda.matmul": torch.backends.cuda.matmul.allow_tf32}
        return {k: "tf32" if v else "ieee" for k, v in legacy.items()}
    return {name: _flag_owner(name).fp32_precision for name in FP32_PRECISION_FLAGS}


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Convolutions and matmuls in IEEE fp32 inside (no TF32), the previous settings restored after. Both the
    forward and the backward pass of the downstream run inside it (cuDNN reads the flag when each kernel runs)."""
    before = fp32_precision()
    _set_fp32_precision({name: "ieee" for name in before})
    try:
        yield
    finally:
        _set_fp32_precision(before)


def _set_fp32_precision(values: dict[str, str]) -> None:
    if not hasattr(torch.backends.cudnn, "conv"):  # torch 2.8
        torch.backends.cudnn.allow_tf32 = values["cudnn.conv"] == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = values["cuda.matmul"] == "tf32"
        return
    for name, value in values.items():
        _flag_owner(name).fp32_precision = value
