"""asv.models.Featurizer (one matrix-vector product each way) against s3prl's own Featurizer: same parameters,
same outputs and weight gradients to float-summation tolerance, on inference-mode states without a clone."""

import math

import pytest
import torch
import torch.nn.functional as F

from asv.errors import ConfigError
from asv.models import Featurizer
from asv.upstream import s3prl_nn

L, B, T, D = 13, 3, 50, 32


class FakeUpstream:
    """What a featurizer reads from an S3PRLUpstream."""

    num_layers, hidden_sizes, downsample_rates = L, [D] * L, [320] * L


def states(seed: int):
    """Hidden states as s3prl's hooks hand them over (transposed (T, B, D) views), made in inference mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        hs = [torch.randn(T, B, D, generator=g).transpose(0, 1) for _ in range(L)]
        lens = [torch.tensor([50, 41, 7])] * L
    return hs, lens


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("selections", [None, [11, 0, 5], [4]], ids=["all", "three", "one"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.numerics
def test_matches_s3prl(selections, normalize):
    ours = Featurizer(FakeUpstream(), selections, normalize)
    ref = s3prl_nn().Featurizer(FakeUpstream(), selections, normalize)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert ours.layer_selections == ref.layer_selections and ours.output_size == ref.output_size
    w = torch.randn(len(ours.layer_selections), generator=torch.Generator().manual_seed(1))
    for f in (ours, ref):
        with torch.no_grad():
            f.weights.copy_(w)
    hs, lens = states(2)
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    out, out_len = ours(hs, lens)
    out.backward(grad)
    if len(ours.layer_selections) == 1:
        # s3prl asserts on a single selected state; the sum of one state with weight softmax([w]) = 1 is it.
        only = hs[selections[0]]
        torch.testing.assert_close(out, F.layer_norm(only, (D,)) if normalize else only, rtol=0, atol=0)
        return
    ref_out, ref_len = ref([h.clone() for h in hs], [n.clone() for n in lens])
    ref_out.backward(grad)
    assert torch.equal(out_len, ref_len)
    # Each output element sums L rounded products, in another order than s3prl's mul-then-sum: each side is
    # within L units of roundoff (2^-24) of the exact sum, so they differ by at most 2L (seen: ~1). Each
    # weight gradient is a dot product over B*T*D = 4800 terms, blocked differently on the two sides: its
    # rounding error grows like sqrt(terms) units per side, so 2.5 sqrt(terms) bounds both (seen: up to 22).
    assert rel(out, ref_out) < 2 * L * 2**-24
    assert rel(ours.weights.grad, ref.weights.grad) < math.sqrt(B * T * D) * 2**-24 * 2.5


def test_bf16_states_mix_in_fp32_like_s3prl():
    ours, ref = Featurizer(FakeUpstream()), s3prl_nn().Featurizer(FakeUpstream())
    hs, lens = states(4)
    low = [h.bfloat16() for h in hs]
    out, _ = ours(low, lens)
    assert out.dtype == ref(low, lens)[0].dtype == torch.float32


def test_single_state_upstream_passes_through():
    class OneState:
        num_layers, hidden_sizes, downsample_rates = 1, [D], [160]

    f = Featurizer(OneState())
    x, n = torch.randn(B, T, D), torch.tensor([50, 41, 7])
    out, out_len = f([x], [n])
    assert out is x and out_len is n and not list(f.parameters())


def test_bad_selection_is_a_config_error():
    with pytest.raises(ConfigError, match="from 0 to 12"):
        Featurizer(FakeUpstream(), [13])
