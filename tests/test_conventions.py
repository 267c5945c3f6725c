"""asv.conventions holds s3prl's conventions once: they equal s3prl 0.4.18's own values and length rule, and the
registries chosen by name offer exactly the names the settings accept."""

import pytest
import torch

import asv.upstream  # noqa: F401  (the torchaudio shim precedes s3prl's imports)
from asv.config import CORPUS_NAMES, DOWNSTREAM_NAMES, LOSS_NAMES, registry
from asv.conventions import MIN_SAMPLES, SAMPLE_RATE, num_frames
from asv.upstream import build_upstream


def test_values_are_s3prls():
    from s3prl.nn import upstream as s3prl_upstream

    assert SAMPLE_RATE == s3prl_upstream.SAMPLE_RATE
    assert MIN_SAMPLES == int(s3prl_upstream.MIN_SECOND * s3prl_upstream.SAMPLE_RATE)


@pytest.mark.parametrize("samples", [1, 159, 160, 161, 799, 800, 16000, 16001, 24321])
def test_frame_count_is_the_one_s3prl_returns(samples):
    fbank = build_upstream("fbank")
    stride = fbank.downsample_rates[0]
    with torch.inference_mode():
        hidden, hidden_len = fbank(torch.randn(1, samples), torch.tensor([samples]))
    # s3prl cuts the padded batch to its longest item's frames; a lone item's are its own.
    assert int(hidden_len[0][0]) == num_frames(samples, stride) == hidden[0].size(1)
    assert int(num_frames(torch.tensor([samples]), stride)[0]) == num_frames(samples, stride)


def test_registries_offer_exactly_the_accepted_names():
    from asv.corpora import CORPORA
    from asv.losses import LOSSES
    from asv.models import DOWNSTREAMS

    assert (tuple(DOWNSTREAMS), tuple(LOSSES), tuple(CORPORA)) == (DOWNSTREAM_NAMES, LOSS_NAMES, CORPUS_NAMES)
    with pytest.raises(TypeError, match="edit both"):
        registry(("a", "b"), {"a": 1})
