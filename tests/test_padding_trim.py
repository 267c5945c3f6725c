"""Training's upstream forward without the padding (asv/padding_trim.py) equals the padded batch's, per family.

Tiny random checkpoints in both feature-extractor modes (`tiny`: Base's group-normalised first conv layer;
`tiny_large`: Large's layer norms and waveform normalisation), utterances of 0.06 s to 8 s in one batch.
"""

import pytest
import torch

from asv import padding_trim
from asv.batch_exact import plan_for
from asv.padding_trim import trimmable, trimmed_upstream_forward
from asv.random_upstreams import build_random_upstreams
from asv.upstream import build_upstream, upstream_forward
from tests.test_batch_exact import HIDDEN_TOL, padded, utterances

FAMILIES = ["wav2vec2_local", "hubert_local", "wavlm_local"]
CASES = [(name, size) for size in ("tiny", "tiny_large") for name in FAMILIES]
SECONDS = [0.06, 1.0, 2.3, 3.7, 5.2, 8.0, 7.99]


@pytest.fixture(autouse=True)
def trim_tiny_models(monkeypatch):
    monkeypatch.setattr(padding_trim, "TRIM_MIN_PARAMETERS", 0)  # train.py trims real-size models only


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trim_upstreams")
    return {size: build_random_upstreams(tmp / size, size) for size in ("tiny", "tiny_large")}


def kept_frame_gap(hs, lens, ref_hs, ref_lens) -> float:
    """Largest |trimmed - padded| over each utterance's kept frames; asserts shapes and lengths are the padded's."""
    gap = 0.0
    for h, n, rh, rn in zip(hs, lens, ref_hs, ref_lens, strict=True):
        assert h.shape == rh.shape and torch.equal(n, rn)
        for i, k in enumerate(rn.tolist()):
            gap = max(gap, (h[i, :k] - rh[i, :k]).abs().max().item())
    return gap


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_trimmed_equals_the_padded_batch(name, size, ckpts):
    upstream = build_upstream(name, str(ckpts[size][name]))
    wav, wav_len = padded(utterances(SECONDS))
    assert trimmable(upstream, wav, wav_len)
    widths = []
    hook = plan_for(upstream).first_conv.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[-1]))
    try:
        hs, lens = trimmed_upstream_forward(upstream, wav, wav_len)
    finally:
        hook.remove()
    ref_hs, ref_lens = upstream_forward(upstream, wav, wav_len)
    assert kept_frame_gap(hs, lens, ref_hs, ref_lens) < HIDDEN_TOL
    # One run per utterance, none wider than the batch, together well under the padded batch's samples (the
    # first conv also computes its output for silence once per run of the group-normalised models: kernel wide).
    widths = [w for w in widths if w > plan_for(upstream).first_conv.kernel_size[0]]
    assert len(widths) == len(SECONDS) and max(widths) == wav.size(1)
    assert sum(widths) < 0.75 * wav.numel()
    model = plan_for(upstream).fairseq_model
    assert "extract_features" not in vars(model)  # the patches are gone again
    assert all("forward" not in vars(gn) for gn, _ in plan_for(upstream).group_norms)


def test_the_padding_statistics_are_what_makes_it_equal(ckpts):
    # Without the padding's statistics (a short utterance run alone), the Base group norm gives other features:
    # the equality above is not that of a model padding cannot reach.
    upstream = build_upstream("hubert_local", str(ckpts["tiny"]["hubert_local"]))
    wavs = utterances([1.0, 8.0])
    wav, wav_len = padded(wavs)
    ref_hs, ref_lens = upstream_forward(upstream, wav, wav_len)
    alone, _ = upstream_forward(upstream, wavs[0][None], wav_len[:1])
    k = int(ref_lens[-1][0])
    assert (alone[-1][0, :k] - ref_hs[-1][0, :k]).abs().max().item() > 100 * HIDDEN_TOL


def test_where_it_does_not_apply(ckpts, monkeypatch):
    hubert = build_upstream("hubert_local", str(ckpts["tiny"]["hubert_local"]))
    wav, wav_len = padded(utterances([1.0, 2.0]))
    monkeypatch.setattr(padding_trim, "TRIM_MIN_PARAMETERS", 20_000_000)
    assert not trimmable(hubert, wav, wav_len)  # a tiny model: the per-utterance calls would cost more
    monkeypatch.setattr(padding_trim, "TRIM_MIN_PARAMETERS", 0)
    assert not trimmable(hubert, wav[:1], wav_len[:1])  # nothing to save
    assert not trimmable(hubert, *padded(utterances([2.0, 2.0])))
    assert not trimmable(hubert, *padded(utterances([0.03, 2.0])))  # S3PRLUpstream extends a lone one that short
    hf = build_upstream("hf_wav2vec2_custom", str(ckpts["tiny"]["hf_wav2vec2_custom"]))
    assert not trimmable(hf, wav, wav_len)
    assert not trimmable(build_upstream("fbank"), wav, wav_len)


# Three training batches of an update, each padded to its own longest utterance (widths 8.0, 3.7 and 5.2 s);
# lengths with odd sample counts so frame counts and the HuBERT/WavLM mask chunking differ between the widths.
GROUPS = [[2.3, 8.0, 0.9], [3.7, 1.0], [5.2, 4.4, 2.05, 5.1999]]


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_one_forward_over_the_batches_of_an_update_equals_each_batch_own(name, size, ckpts):
    upstream = build_upstream(name, str(ckpts[size][name]))
    batches = [padded(utterances(secs, seed=k)) for k, secs in enumerate(GROUPS)]
    assert padding_trim.groupable(upstream, batches)
    calls = []
    hook = plan_for(upstream).first_conv.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    try:
        grouped = padding_trim.grouped_upstream_forward(upstream, batches)
    finally:
        hook.remove()
    assert [c[0] for c in calls if c[-1] > 400] == [sum(len(n) for _, n in batches)]  # one forward, every row
    for (wav, wav_len), (hs, lens) in zip(batches, grouped, strict=True):
        ref_hs, ref_lens = upstream_forward(upstream, wav, wav_len)
        assert kept_frame_gap(hs, lens, ref_hs, ref_lens) < HIDDEN_TOL
    assert all("forward" not in vars(gn) for gn, _ in plan_for(upstream).group_norms)


def test_a_plain_joint_batch_would_differ(ckpts):
    # The same utterances padded to the widest batch without the per-batch statistics and masks: another
    # update than s3prl's for the group-normalised Base models, which is what grouped_upstream_forward avoids.
    upstream = build_upstream("hubert_local", str(ckpts["tiny"]["hubert_local"]))
    batches = [padded(utterances(secs, seed=k)) for k, secs in enumerate(GROUPS)]
    wav = torch.cat([torch.nn.functional.pad(w, (0, 8 * 16000 - w.size(1))) for w, _ in batches])
    joint_hs, _ = upstream_forward(upstream, wav, torch.cat([n for _, n in batches]))
    ref_hs, ref_lens = upstream_forward(upstream, *batches[1])
    k = int(ref_lens[-1][0])
    assert (joint_hs[-1][3, :k] - ref_hs[-1][0, :k]).abs().max().item() > 100 * HIDDEN_TOL
