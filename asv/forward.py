"""How a frozen upstream runs: the one place that decides, for a training step and for an embedding.

Training takes s3prl's own forward over the padded batch (SuperbASV's training step; its padding is part of the
recipe: wav2vec 2.0's group norm and HuBERT/WavLM's frame mask see it), the `fbank` front-end's equal-length crops
computed a chunk at a time (asv.upstream.fbank_batched, bit for bit s3prl's per-utterance loop). Evaluation gives
each utterance its batch-1 hidden states, as s3prl's stage 3 does: on a CPU by running it alone (s3prl's
computation itself, and ~10 % faster there than the padded batch), elsewhere by the padded batch made batch-exact
(asv.batch_exact), which keeps a GPU busy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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
