"""An embedding must not depend on what it is batched with: batched == batch-size-1 through the whole model."""

import numpy as np
import pytest
import torch

from asv.config import LossConfig, ModelConfig
from asv.datasets import length_buckets
from asv.models import build_speaker_model
from asv.upstream import build_upstream, upstream_forward


def test_length_buckets_respect_the_budget_and_cover_everything():
    lengths = [5, 1, 9, 3, 3, 20, 7]
    batches = length_buckets(lengths, max_frames=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12
    assert [5] in batches  # longer than the budget: alone


@pytest.mark.numerics
def test_batched_embeddings_equal_single_utterance_embeddings():
    torch.manual_seed(0)
    upstream = build_upstream("fbank")
    model = build_speaker_model(ModelConfig(), LossConfig(), upstream, num_classes=4).eval()
    rng = np.random.default_rng(0)
    # 1 s to 20 s of noise with a slowly varying spectrum, so frames differ.
    wavs = [
        torch.from_numpy(np.convolve(rng.standard_normal(int(s * 16000)), rng.standard_normal(32), "same")).float()
        * 0.1
        for s in (1.0, 2.3, 4.7, 9.1, 13.0, 20.0)
    ]
    with torch.no_grad():
        single = torch.stack(
            [model.embed(*upstream_forward(upstream, w[None], torch.tensor([len(w)])))[0] for w in wavs]
        )
        lens = torch.tensor([len(w) for w in wavs])
        batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        batched = model.embed(*upstream_forward(upstream, batch, lens))
    cos = torch.nn.functional.cosine_similarity(single, batched, dim=1)
    assert cos.min() >= 0.9999, cos
