import pytest
import torch
import torch.nn.functional as F

import asv.upstream  # noqa: F401  (installs the torchaudio shim before s3prl imports)
from asv.config import LossConfig, ModelConfig
from asv.losses import AMSoftmax, build_loss
from asv.models import (
    XVECTOR_LENGTH_REDUCTION,
    SuperbXvector,
    build_speaker_model,
    masked_mean_std,
)


def test_xvector_shapes_and_length_reduction():
    model = SuperbXvector(240).eval()
    x = torch.randn(3, 50, 240)
    out = model(x, torch.tensor([50, 30, XVECTOR_LENGTH_REDUCTION + 1]))
    assert out.shape == (3, 512)
    assert XVECTOR_LENGTH_REDUCTION == 14
    # The TDNN stack loses exactly 14 frames: 50 in, 36 out.
    assert model.tdnns.module(model.projector(x).transpose(1, 2)).shape == (3, 1500, 36)  # channels first
    with pytest.raises(ValueError, match="too short"):
        model(x[:, :14], torch.tensor([14, 14, 14]))


def test_parameter_count_matches_superb():
    # Spec 2.3: projector 393,728 + TDNNs 3,917,276 + affine 1,799,168 at input 768 = 6.11 M.
    assert sum(p.numel() for p in SuperbXvector(768).parameters()) == 6_110_172
    assert sum(p.numel() for p in SuperbXvector(240).projector.parameters()) == 123_392


@pytest.mark.numerics
def test_xvector_matches_s3prl_reference():
    from s3prl.nn.speaker_model import SuperbXvector as Reference

    torch.manual_seed(0)
    ref, ours = Reference(80), SuperbXvector(80)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x, lens = torch.randn(4, 90, 80), torch.tensor([90, 64, 31, 17])
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        torch.testing.assert_close(ours(x, lens), ref(x, lens), rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_conv_tdnn_with_batch_norm_matches_s3prl_outputs_and_gradients():
    # Our TDNN is a dilated conv1d over s3prl's Linear weights; s3prl unfolds and multiplies: the same sums in
    # another order. In float64 the two agree to ~1e-14 (rounding of sums of a few thousand terms), so 1e-9 of
    # each tensor's largest value leaves 5 orders of headroom while a wrong offset or channel order is O(1).
    # (In float32, BatchNorm's batch-mean subtraction amplifies that reordering to ~1e-3 of some gradients:
    # rounding, not a difference in the math, hence float64 for the gradients.)
    from s3prl.nn.speaker_model import SuperbXvector as Reference

    torch.manual_seed(0)
    ref, ours = Reference(80, batch_norm=True), SuperbXvector(80, batch_norm=True)
    ours.load_state_dict(ref.state_dict())
    x, lens = torch.randn(4, 90, 80), torch.tensor([90, 64, 31, 17])
    torch.testing.assert_close(ours(x, lens), ref(x, lens), rtol=1e-5, atol=1e-5)  # float32 forward
    ref, ours, x = ref.double(), ours.double(), x.double()
    out, expected = ours(x, lens), ref(x, lens)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9 * expected.abs().max().item())
    out.square().sum().backward()
    expected.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g = ref_grads[name].grad
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-9 * g.abs().max().item(), msg=name)


def test_tdnn_width_is_configurable_and_defaults_to_superb():
    assert SuperbXvector(240).tdnns.module[0].kernel.weight.shape == (512, 5 * 512)
    narrow = SuperbXvector(240, hidden_size=128, aggregation_size=750, tdnn_size=256)
    shapes = [tuple(t.kernel.weight.shape) for t in narrow.tdnns.module]
    assert shapes == [(256, 5 * 128), (256, 3 * 256), (256, 3 * 256), (256, 256), (750, 256)]
    assert narrow(torch.randn(2, 40, 240), torch.tensor([40, 20])).shape == (2, 512)


@pytest.mark.numerics
def test_embedding_does_not_depend_on_batch_padding():
    torch.manual_seed(0)
    model = SuperbXvector(40).eval()
    a, b = torch.randn(1, 60, 40), torch.randn(1, 25, 40)
    batch = torch.zeros(2, 60, 40)
    batch[0], batch[1, :25] = a[0], b[0]
    together = model(batch, torch.tensor([60, 25]))
    torch.testing.assert_close(together[1], model(b, torch.tensor([25]))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_pooling_single_frame_and_dead_units_are_finite():
    x = torch.zeros(2, 5, 3, requires_grad=True)  # zero variance everywhere, like dead ReLU units
    pooled = masked_mean_std(x, torch.tensor([1, 5]))
    assert torch.isfinite(pooled).all()
    pooled.sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.randn(1, 6, 4)
    torch.testing.assert_close(masked_mean_std(y, torch.tensor([6]))[0, 4:], y[0].std(0))


@pytest.mark.numerics
def test_amsoftmax_against_formula_and_s3prl():
    from s3prl.nn.speaker_loss import amsoftmax

    torch.manual_seed(0)
    x, y = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    ours = AMSoftmax(16, 5, margin=0.4, scale=30.0)
    W = ours.W.detach()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=0, keepdim=True))
    logits = 30.0 * (cos - 0.4 * F.one_hot(y, 5))
    expected = -(logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(1)).mean()
    loss, out_logits = ours(x, y)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out_logits, logits)
    ref = amsoftmax(16, 5, margin=0.4, scale=30)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ref(x, y)[0], loss)


@pytest.mark.numerics
def test_amsoftmax_without_margin_is_scaled_cosine_cross_entropy():
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    head = AMSoftmax(8, 3, margin=0.0, scale=10.0)
    cos = F.normalize(x, dim=1) @ F.normalize(head.W, dim=0)
    torch.testing.assert_close(head(x, y)[0], F.cross_entropy(10.0 * cos, y))


class FakeUpstream:
    """What Featurizer reads from an upstream: sizes, strides, layer count."""

    num_layers, hidden_sizes, downsample_rates = 3, [4, 4, 4], [320, 320, 320]


@pytest.mark.numerics
def test_featurizer_weights_start_uniform_and_select_layers():
    hs = [torch.full((1, 2, 4), float(i)) for i in range(3)]
    lens = [torch.tensor([2])] * 3
    model = build_speaker_model(ModelConfig(), LossConfig(), FakeUpstream(), num_classes=2)
    assert torch.equal(model.featurizer.weights.detach(), torch.zeros(3))
    torch.testing.assert_close(model.layer_weights(), torch.full((3,), 1 / 3))
    mixed, _ = model.featurizer(hs, lens)
    torch.testing.assert_close(mixed, torch.full((1, 2, 4), 1.0))  # mean of 0, 1, 2
    picked = build_speaker_model(ModelConfig(layer_selections=[2, 0]), LossConfig(), FakeUpstream(), 2)
    assert picked.featurizer.layer_selections == [0, 2]
    torch.testing.assert_close(picked.featurizer(hs, lens)[0], torch.full((1, 2, 4), 1.0))  # mean of 0, 2
    with torch.no_grad():
        picked.featurizer.weights.copy_(torch.tensor([0.0, 100.0]))
    torch.testing.assert_close(picked.featurizer(hs, lens)[0], torch.full((1, 2, 4), 2.0))


def test_registries_reject_unknown_names():
    with pytest.raises(ValueError, match="amsoftmax"):
        build_loss(LossConfig(loss="arcface"), 8, 2)
    with pytest.raises(ValueError, match="xvector"):
        build_speaker_model(ModelConfig(downstream="resnet"), LossConfig(), FakeUpstream(), 2)


def test_weight_free_upstream_starts_without_the_full_s3prl_hub():
    # s3prl.hub imports every upstream's code (transformers included, ~4 CPU-s per script start); fbank needs
    # none of it. In a fresh process, as train.py and evaluate.py start.
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys; import asv.upstream as u; up = u.build_upstream('fbank'); "
        "assert 'transformers' not in sys.modules and up.upstream.__class__.__module__.startswith('s3prl.upstream'); "
        "names = u.list_upstreams(); assert {'fbank', 'hubert', 'wavlm_large'} <= set(names), len(names); "
        "import s3prl.hub; assert s3prl.hub.hubert.__module__ == 's3prl.upstream.hubert.hubconf'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
