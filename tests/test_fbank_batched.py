"""asv.upstream.fbank_batched: s3prl's `fbank` front-end on a batch of equal-length crops in one pass equals s3prl's
per-utterance forward (kaldi fbank, deltas, CMVN one utterance at a time), and a training step
(asv.forward.training_features) uses it only there.

Tolerances. The fast path runs the ops s3prl runs, batched, and on CPU its output is bit-identical to s3prl's in
every case here but the 0.03 s crops (3 frames; alone, their mel GEMM takes another kernel: <= 5e-6 apart); the
bounds say what other rounding would be allowed. In float64 both paths are exact to ~1e-15
relative, so 1e-9 on these O(1) (CMVN'd) features pins the math: framing, window, pre-emphasis, FFT size, mel
banks, log floor, deltas, CMVN and s3prl's length rule, any slip in which is O(0.1-1). In float32, a log-mel
rounded differently moves by ~1 ulp (~1e-6 at magnitudes up to 16), which CMVN divides by the band's std over the
crop (>= 0.018 in these signals): <= ~5e-5, hence 1e-4, the bound tests/test_batch_exact.py uses for O(1) hidden
states (s3prl's own float32 features are 4e-5 to 5e-3 away from its float64 ones here). Only identical rounding
passes on a band at the log floor for a whole crop (the silent crop below, at 0.5 and 1 s): CMVN divides rounding
noise by rounding noise there, in s3prl (values ~1e4) as in the fast path.
"""

import numpy as np
import pytest
import torch

import asv.forward as forward_module
from asv.batch_exact import exact_upstream_forward
from asv.forward import training_features
from asv.synth import draw_voice, synth_utterance
from asv.upstream import build_upstream

pytestmark = pytest.mark.numerics  # every test compares the batched front-end's output with s3prl's
FLOAT32_TOL = 1e-4
FLOAT64_TOL = 1e-9
# 0.03 s is under s3prl's 0.05 s minimum (zero-extended); 1 s crops of 64 are the demo's training batches.
CASES = [(2, 0.5), (64, 1.0), (5, 1.37), (3, 3.0), (4, 0.03)]


@pytest.fixture(scope="module")
def fbank():
    return build_upstream("fbank")


@pytest.fixture
def spy(monkeypatch):
    """The batch shape of each fast-path call (which still computes)."""
    calls = []
    real = forward_module.fbank_batched

    def counted(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(forward_module, "fbank_batched", counted)
    return calls


def signals(kind: str, batch: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(batch, samples) float32 with a DC offset: white noise, synthetic speech with its pauses, or that speech
    with the first crop silent (the offset alone)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    if kind == "noise":
        return torch.from_numpy(0.1 * rng.standard_normal((batch, n)) + 0.3).float()
    speech = np.stack([0.5 * synth_utterance(draw_voice(rng), seconds, rng) for _ in range(batch)])
    if kind == "silent":
        speech[0] = 0.0
    return torch.from_numpy(speech + 0.05).float()


def s3prl_forward(upstream, wav, wav_len):
    with torch.inference_mode():
        return upstream(wav, wav_len)


def train_forward(upstream, wav, wav_len):
    """What a training step feeds the featurizer for a frozen upstream."""
    return training_features(upstream, wav, wav_len, trainable=False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kind", ["noise", "speech", "silent"])
@pytest.mark.parametrize("batch,seconds", CASES)
def test_equals_s3prl_per_utterance(fbank, spy, kind, batch, seconds):
    wav = signals(kind, batch, seconds)
    wav_len = torch.full((batch,), wav.size(1))
    for x, tol in ((wav, FLOAT32_TOL), (wav.double(), FLOAT64_TOL)):
        expected, expected_len = s3prl_forward(fbank, x, wav_len)
        hidden, hidden_len = train_forward(fbank, x, wav_len)
        assert len(hidden) == len(expected) == len(hidden_len) == 1
        assert hidden[0].shape == expected[0].shape and hidden[0].dtype == x.dtype
        assert torch.equal(hidden_len[0], expected_len[0])
        assert max_diff(hidden[0], expected[0]) <= tol
    assert len(spy) == 2


def test_other_batches_take_s3prl_path(fbank, spy):
    wav = signals("noise", 3, 1.0)
    n = wav.size(1)
    batches = [
        (wav, torch.tensor([n, n - 700, n - 4000])),  # padded: unequal lengths
        (wav, torch.full((3,), n - 500)),  # equal lengths, but shorter than the padded width
        (wav[:1], torch.tensor([n])),  # a single utterance
    ]
    for x, x_len in batches:
        expected, expected_len = s3prl_forward(fbank, x, x_len)
        hidden, hidden_len = train_forward(fbank, x, x_len)
        assert all(map(torch.equal, hidden + hidden_len, expected + expected_len))
    # Other weight-free front-ends keep s3prl's path even on equal lengths.
    other, wav_len = build_upstream("fbank_no_cmvn"), torch.full((3,), n)
    assert torch.equal(train_forward(other, wav, wav_len)[0][0], s3prl_forward(other, wav, wav_len)[0][0])
    assert spy == []


def test_batch_exact_still_sees_each_utterance(fbank, spy):
    # exact_upstream_forward reads kaldi's per-utterance frame counts through the expert, so an equal-length
    # batch there must not bypass it.
    wav = signals("speech", 3, 1.37)
    wav_len = torch.full((3,), wav.size(1))
    hidden, _ = exact_upstream_forward(fbank, wav, wav_len)
    for i in range(3):
        alone, _ = s3prl_forward(fbank, wav[i : i + 1], wav_len[i : i + 1])
        assert torch.equal(hidden[0][i : i + 1], alone[0])
    assert spy == []


@pytest.mark.parametrize("batch,seconds", [(64, 1.0), (10, 8.0)])  # the demo's crops, SUPERB's
def test_training_step_features_unchanged(fbank, spy, batch, seconds):
    wav = signals("speech", batch, seconds, seed=1)
    wav_len = torch.full((batch,), wav.size(1))
    hidden, hidden_len = train_forward(fbank, wav, wav_len)
    expected, expected_len = s3prl_forward(fbank, wav, wav_len)
    assert spy == [wav.shape]
    assert not hidden[0].is_inference()  # usable in the training step's backward pass
    assert hidden[0].shape == expected[0].shape and torch.equal(hidden_len[0], expected_len[0])
    assert max_diff(hidden[0], expected[0]) <= FLOAT32_TOL
