"""s3prl's wav2vec 2.0 / HuBERT / WavLM attention already runs on torch's fused scaled_dot_product_attention.

Their fairseq-style MultiheadAttention modules hand self-attention to F.multi_head_attention_forward with
need_weights=False (WavLM passes its gated relative position bias as the float attn_mask), and that path
calls F.scaled_dot_product_attention, with or without a key padding mask. So no runtime patch of those
modules is needed for fused attention; this guards it: if an s3prl or torch upgrade sends the attention
back to the manual bmm/softmax path, the call count drops to zero and this fails.
"""

import pytest
import torch
import torch.nn.functional as F

from asv.random_upstreams import SIZES, build_random_upstreams
from asv.upstream import build_upstream, upstream_forward

FAMILIES = ["wav2vec2_local", "hubert_local", "wavlm_local"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_random_upstreams(tmp_path_factory.mktemp("up"), "tiny", FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("lengths", [[16_000], [16_000, 9_000]], ids=["one", "padded"])
def test_attention_goes_through_sdpa(ckpts, name, lengths, monkeypatch):
    up = build_upstream(name, str(ckpts[name]))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    # F.multi_head_attention_forward looks the function up in torch.nn.functional's namespace at call time.
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    wav = 0.1 * torch.randn(len(lengths), max(lengths), generator=torch.Generator().manual_seed(0))
    upstream_forward(up, wav, torch.tensor(lengths))
    assert len(calls) == SIZES["tiny"]["layers"]  # once per transformer layer
    if len(lengths) > 1:  # the padded keys are masked in every call
        assert all(mask is not None for mask in calls)
