"""Every head in asv.losses.LOSSES against a hand-written formula on small tensors, plus the margin schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from asv.config import LossConfig
from asv.losses import LOSSES, AAMSoftmax, AMSoftmax, SubcenterAAMSoftmax, build_loss, margin_at


def cosines(x, W):
    return (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=0, keepdim=True))


def arcface_reference(cos, y, m, s, easy_margin=False):
    """ArcFace written element by element: s*cos(theta_y + m) for the target, s*cos(theta_j) elsewhere."""
    logits = s * cos.clone()
    for b in range(cos.size(0)):
        c = cos[b, y[b]].item()
        theta = math.acos(max(-1.0, min(1.0, c)))
        if easy_margin:
            target = math.cos(theta + m) if c > 0 else c
        elif theta + m <= math.pi:  # cos(theta + m) is still decreasing in theta
            target = math.cos(theta + m)
        else:
            target = c - math.sin(math.pi - m) * m
        logits[b, y[b]] = s * target
    return logits


def ce(logits, y):
    return -(logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(1)).mean()


def test_every_registered_loss_builds_and_returns_loss_and_logits():
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    for name in LOSSES:
        head = build_loss(LossConfig(loss=name, margin=0.2), 8, 3)
        loss, logits = head(x, y)
        assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (4, 3), name
        head.set_step(10)  # every head takes the step, margin or not


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.numerics
def test_aamsoftmax_against_formula(easy_margin):
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    head = AAMSoftmax(6, 4, margin=0.3, scale=15.0, easy_margin=easy_margin)
    # Make two targets nearly opposite their class so the theta + m > pi branch is exercised.
    x[0] = -head.W.detach()[:, 0] + 0.01 * torch.randn(6)
    x[1] = -head.W.detach()[:, 1]
    expected = arcface_reference(cosines(x, head.W.detach()), y, 0.3, 15.0, easy_margin)
    loss, logits = head(x, y)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ce(expected, y), rtol=1e-5, atol=1e-4)


@pytest.mark.numerics
def test_aamsoftmax_matches_s3prl_legacy_loss():
    from s3prl.downstream.sv_voxceleb1.model import AAMSoftmaxLoss

    torch.manual_seed(0)
    x, y = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    ours = AAMSoftmax(16, 5, margin=0.3, scale=15.0)
    ref = AAMSoftmaxLoss(16, 5, s=15, m=0.3)
    with torch.no_grad():
        ref.weight.copy_(ours.W.T)  # s3prl stores (C, D)
    torch.testing.assert_close(ours(x, y)[0], ref(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_aamsoftmax_without_margin_is_scaled_cosine_cross_entropy():
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    head = AAMSoftmax(8, 3, margin=0.0, scale=10.0)
    torch.testing.assert_close(head(x, y)[0], F.cross_entropy(10.0 * cosines(x, head.W), y))


@pytest.mark.numerics
def test_subcenter_aam_takes_the_closest_centre_per_class():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    head = SubcenterAAMSoftmax(6, 3, margin=0.2, scale=30.0, subcenters=4)
    W = head.W.detach()
    assert W.shape == (6, 3 * 4)
    all_cos = cosines(x, W)  # columns c*K + k
    best = torch.stack([torch.stack([all_cos[:, c * 4 + k] for k in range(4)], 1).max(1).values for c in range(3)], 1)
    expected = arcface_reference(best, y, 0.2, 30.0)
    loss, logits = head(x, y)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ce(expected, y), rtol=1e-5, atol=1e-4)


@pytest.mark.numerics
def test_subcenter_aam_with_one_centre_is_aamsoftmax():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    sub = SubcenterAAMSoftmax(8, 3, margin=0.2, scale=30.0, subcenters=1)
    aam = AAMSoftmax(8, 3, margin=0.2, scale=30.0)
    aam.load_state_dict(sub.state_dict())
    torch.testing.assert_close(sub(x, y)[0], aam(x, y)[0])


@pytest.mark.numerics
def test_softmax_is_linear_cross_entropy_on_normalised_embeddings():
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    head = build_loss(LossConfig(loss="softmax"), 8, 3)
    expected = F.normalize(x, dim=1) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(x, y)[0], ce(expected, y))


@pytest.mark.numerics
def test_margin_warmup_ramps_linearly_by_global_step():
    assert [margin_at(s, 0.2, 100) for s in (0, 25, 100, 500)] == pytest.approx([0.0, 0.05, 0.2, 0.2])
    assert margin_at(0, 0.2, 0) == 0.2  # no warm-up: the full margin at once
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    for cls in (AMSoftmax, AAMSoftmax):
        head = cls(8, 3, margin=0.4, scale=30.0, margin_warmup_steps=10)
        plain = cosines(x, head.W.detach()) * 30.0
        torch.testing.assert_close(head(x, y)[1], plain)  # step 0: margin 0
        head.set_step(5)
        assert head.margin == pytest.approx(0.2)
        fixed = cls(8, 3, margin=0.2, scale=30.0)
        fixed.load_state_dict(head.state_dict())
        torch.testing.assert_close(head(x, y)[0], fixed(x, y)[0])
