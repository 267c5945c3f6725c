"""The `ecapa` downstream: structure against s3prl's ECAPA_TDNN, parameter counts, batch invariance."""

import numpy as np
import pytest
import torch

import asv.upstream  # noqa: F401  (installs the torchaudio shim before s3prl imports)
from asv.config import LossConfig, ModelConfig
from asv.models import DOWNSTREAMS, EcapaTdnn, build_speaker_model
from asv.upstream import build_upstream, upstream_forward


def ecapa_params(D: int, C: int, E: int, mfa: int = 1536, se: int = 128, att: int = 128, scale: int = 8) -> int:
    """ECAPA-TDNN parameter count by hand: weights + biases of every conv/linear, 2 per BatchNorm channel."""
    w = C // scale
    block = (C * C + C) + 2 * C  # 1x1 conv + BN
    block += (scale - 1) * ((w * w * 3 + w) + 2 * w)  # Res2Net k=3 convs + BNs
    block += (C * C + C) + 2 * C  # 1x1 conv + BN
    block += (C * se + se) + (se * C + C)  # squeeze-excitation
    total = (D * C * 5 + C) + 2 * C + 3 * block  # first conv k=5 + BN, three blocks
    total += 3 * C * mfa + mfa  # multi-layer feature aggregation
    total += (3 * mfa * att + att) + 2 * att + (att * mfa + mfa)  # attention with global context
    total += 2 * (2 * mfa) + (2 * mfa * E + E) + 2 * E  # BN, Linear, BN
    return total


@pytest.mark.parametrize("C, paper_millions", [(512, 6.2), (1024, 14.7)])
def test_parameter_count_matches_hand_count_and_paper(C, paper_millions):
    n = sum(p.numel() for p in EcapaTdnn(80, 192, channels=C).parameters())
    assert n == ecapa_params(80, C, 192)
    # Desplanques et al. 2020, Table 1 (80-d fbank, 192-d embedding): 6.2 M and 14.7 M.
    assert round(n / 1e6, 1) == paper_millions


def test_config_selects_channels():
    small = DOWNSTREAMS["ecapa"](80, ModelConfig(downstream="ecapa", embed_dim=192))
    big = DOWNSTREAMS["ecapa"](80, ModelConfig(downstream="ecapa", embed_dim=192, ecapa_channels=1024))
    assert small.conv1.out_channels == 512 and big.conv1.out_channels == 1024 and small.output_size == 192


@pytest.mark.numerics
def test_frame_level_layers_match_s3prl_ecapa():
    """Same blocks as s3prl.nn.speaker_model.ECAPA_TDNN (SE bottleneck 128, Res2Net scale 8, 1536-ch MFA)."""
    from s3prl.nn.speaker_model import ECAPA_TDNN

    torch.manual_seed(0)
    ref, ours = ECAPA_TDNN(40, 1536, C=64).eval(), EcapaTdnn(40, 16, channels=64).eval()
    rename = {"layer4.": "mfa.", "se.se.1.": "se.down.", "se.se.3.": "se.up."}
    mapped = {}
    for k, v in ref.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        for i in (1, 2, 3):
            k = k.replace(f"layer{i}.", f"blocks.{i - 1}.")
        mapped[k] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith(("pool.", "bn_pool.", "fc.", "bn_embed.")) for k in missing)
    # Randomise BN statistics so the comparison covers them.
    for m in [*ref.modules(), *ours.modules()]:
        if isinstance(m, torch.nn.BatchNorm1d):
            torch.manual_seed(m.num_features)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 50, 40)
    mask = torch.ones(2, 1, 50)
    with torch.no_grad():
        h = ours.bn1(torch.relu(ours.conv1(x.transpose(1, 2))))
        outs = []
        for block in ours.blocks:
            outs.append(block(h if not outs else h + sum(outs), mask))
        ours_frames = torch.relu(ours.mfa(torch.cat(outs, 1))).transpose(1, 2)
        torch.testing.assert_close(ours_frames, ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.numerics
def test_ecapa_batched_embeddings_equal_single_utterance_embeddings():
    torch.manual_seed(0)
    upstream = build_upstream("fbank")
    cfg = ModelConfig(downstream="ecapa", embed_dim=192)
    model = build_speaker_model(cfg, LossConfig(), upstream, num_classes=4)
    # Non-trivial BatchNorm statistics, so padded frames would leak through their bias if unmasked.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-1, 1)
    model.eval()
    rng = np.random.default_rng(0)
    wavs = [
        torch.from_numpy(np.convolve(rng.standard_normal(int(s * 16000)), rng.standard_normal(32), "same")).float()
        * 0.1
        for s in (0.5, 1.3, 2.7, 6.1)
    ]
    with torch.no_grad():
        single = torch.stack(
            [model.embed(*upstream_forward(upstream, w[None], torch.tensor([len(w)])))[0] for w in wavs]
        )
        lens = torch.tensor([len(w) for w in wavs])
        batched = model.embed(
            *upstream_forward(upstream, torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens)
        )
    cos = torch.nn.functional.cosine_similarity(single, batched, dim=1)
    assert cos.min() >= 0.9999, cos


def test_ecapa_trains_one_step():
    model = EcapaTdnn(24, 16, channels=32)
    out = model(torch.randn(3, 40, 24), torch.tensor([40, 33, 12]))
    out.sum().backward()
    assert out.shape == (3, 16) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
