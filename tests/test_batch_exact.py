"""Batched evaluation equals s3prl's one-utterance-at-a-time evaluation (asv/batch_exact.py), for every family.

Tiny random checkpoints (asv/random_upstreams.py) in both feature-extractor modes: `tiny` has the
group-normalised first conv layer of the Base models, `tiny_large` Large's layer norms and waveform
normalisation. Utterances of 0.03 s to 8 s share one padded batch.
"""

import json

import numpy as np
import pytest
import torch

import asv.extract
import evaluate
import prepare
import train
from asv.batch_exact import batch1_upstream_forward, exact_upstream_forward, plan_for
from asv.config import LossConfig, ModelConfig
from asv.extract import ModelEmbedder
from asv.models import build_speaker_model
from asv.random_upstreams import build_random_upstreams
from asv.upstream import build_upstream, upstream_forward

FAMILIES = ["wav2vec2_local", "hubert_local", "wavlm_local", "hf_wav2vec2_custom"]
CASES = [(name, size) for size in ("tiny", "tiny_large") for name in FAMILIES] + [("fbank", None), ("mfcc", None)]
# 1 to 8 s: every length leaves frames between the conv length and ceil(len / stride) (s3prl's repeated last
# frame), and the 0.03 s one is under s3prl's 0.05 s minimum (zero-extended when alone). The x-vector needs
# 15 frames, so the embedding checks leave that one out.
SECONDS = [1.0, 2.3, 3.7, 5.2, 8.0]
TOO_SHORT = 0.03
# Hidden states are O(1) (layer-normalised or CMVN'd). Batched and single runs sum the same products in a
# different order (other GEMM blockings, the batch's longer attention rows hold exact zeros): fp32 rounding of a
# sum of n terms is bounded by ~n * 2^-24 relative, n <= 400 (attention over 8 s at 20 ms) -> ~2.4e-5 per
# reduction, compounded over a few layers.
HIDDEN_TOL = 1e-4
MIN_COSINE = 0.99999  # the acceptance bar for embeddings (issue 10)


def utterances(seconds, seed=0):
    rng = np.random.default_rng(seed)
    # Noise with a slowly varying spectrum, so frames differ from one another.
    shaped = [np.convolve(rng.standard_normal(int(s * 16000)), rng.standard_normal(32), "same") for s in seconds]
    return [0.1 * torch.from_numpy(x).float() for x in shaped]


def padded(wavs):
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact_upstreams")
    return {size: build_random_upstreams(tmp / size, size) for size in ("tiny", "tiny_large")}


def load(ckpts, name, size):
    return build_upstream(name, str(ckpts[size][name]) if size else None)


def valid_frame_gap(hs, lens, singles) -> float:
    """Largest |batched - single| over each utterance's valid frames; asserts the lengths are batch 1's."""
    gap = 0.0
    for i, (sh, sl) in enumerate(singles):
        for layer in range(len(hs)):
            n = int(sl[layer][0])
            assert int(lens[layer][i]) == n, (i, layer)
            gap = max(gap, (hs[layer][i, :n] - sh[layer][0, :n]).abs().max().item())
    return gap


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{s or 'signal'}" for n, s in CASES])
@pytest.mark.numerics
def test_batched_equals_batch_1(name, size, ckpts):
    upstream = load(ckpts, name, size)
    assert plan_for(upstream).exact, plan_for(upstream).reason
    wavs = utterances([*SECONDS, TOO_SHORT])
    wav, wav_len = padded(wavs)
    with torch.inference_mode():
        singles = [upstream_forward(upstream, w[None], torch.tensor([len(w)])) for w in wavs]
        exact = exact_upstream_forward(upstream, wav, wav_len)
        plain = upstream_forward(upstream, wav, wav_len)
    assert valid_frame_gap(*exact, singles) < HIDDEN_TOL
    # The input does exercise a leak: s3prl's own padded forward differs from batch 1 (at least in the frames
    # it computes from padding where a lone utterance repeats its last frame).
    assert valid_frame_gap(*plain, singles) > 100 * HIDDEN_TOL

    torch.manual_seed(0)
    model = build_speaker_model(ModelConfig(upstream=name), LossConfig(), upstream, num_classes=4).eval()
    with torch.inference_mode():  # the reference: s3prl's batch-1 hidden states through the same model
        single = torch.cat([model.embed(*s) for s in singles[: len(SECONDS)]])
    # Both branches of asv.forward.embedding_features: the GPU's batch-exact batch, the CPU's one by one.
    for forward in (exact_upstream_forward, batch1_upstream_forward):
        with torch.inference_mode():
            batched = model.embed(*forward(upstream, *padded(wavs[: len(SECONDS)])))
        assert torch.nn.functional.cosine_similarity(single, batched).min() >= MIN_COSINE, forward.__name__
    assert torch.equal(ModelEmbedder(upstream, model)(*padded(wavs[: len(SECONDS)])), batched)  # CPU: batch 1


@pytest.mark.numerics
def test_patches_live_only_inside_the_embedding_forward(ckpts):
    """Training keeps s3prl's padded behaviour (its group norm sees the padding) and runs no added code."""
    upstream = load(ckpts, "hubert_local", "tiny")
    plan = plan_for(upstream)
    patched = [gn for gn, _ in plan.group_norms] + [plan.mask_model]
    assert len(patched) == 2 and all(m is not None for m in patched)
    wav, wav_len = padded(utterances([1.0, 3.0]))
    with torch.inference_mode():
        before = upstream_forward(upstream, wav, wav_len)
        seen = []
        hook = plan.group_norms[0][0].register_forward_hook(lambda m, i, o: seen.append("forward" in vars(m)))
        exact_upstream_forward(upstream, wav, wav_len)
        hook.remove()
        after = upstream_forward(upstream, wav, wav_len)
    assert seen == [True]  # patched during the embedding forward ...
    for m in patched:  # ... and nothing shadows the class methods afterwards
        assert not {"forward", "forward_padding_mask"} & set(vars(m))
    for h0, h1 in zip(before[0], after[0], strict=True):
        torch.testing.assert_close(h0, h1, rtol=0, atol=0)


def test_a_fine_tuned_upstream_goes_back_to_training(ckpts):
    """The dev EER mid-run must not leave a fine-tuned upstream in eval mode (dropout off) for the rest of training."""
    upstream = load(ckpts, "wav2vec2_local", "tiny").train()
    encoder = upstream.upstream.model.encoder
    encoder.layers[0].eval()  # per-module modes come back as they were, not all-train
    seen = []
    encoder.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    with torch.inference_mode():
        exact_upstream_forward(upstream, *padded(utterances([1.0, 2.0])))
    assert seen == [False]  # embedded in eval mode, as SuperbASV does
    assert upstream.training and not encoder.layers[0].training
    assert all(m.training for m in encoder.layers[1].modules())


def test_patches_are_removed_when_the_forward_fails(ckpts, monkeypatch):
    upstream = load(ckpts, "wavlm_local", "tiny")
    model = upstream.upstream.model
    gn = plan_for(upstream).group_norms[0][0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(model.encoder, "forward", out_of_memory)  # fails after the patched layers ran
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        exact_upstream_forward(upstream, *padded(utterances([1.0, 2.0])))
    assert "forward" not in vars(gn) and "forward_padding_mask" not in vars(model)


def tiny_conformer(path):
    """wav2vec 2.0 with conformer layers (s3prl's wav2vec2_conformer_* names): depthwise convs over padded frames."""
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config, Wav2Vec2Model

    from asv.random_upstreams import _encoder, _plain

    quantizer = dict(latent_vars=16, latent_groups=2, latent_dim=16, final_dim=64)
    cfg = Wav2Vec2Config(**_encoder("tiny"), **quantizer, layer_type="conformer", pos_enc_type="abs")
    weights = Wav2Vec2Model(cfg).state_dict()
    torch.save({"task_cfg": _plain(AudioPretrainingConfig()), "model_cfg": _plain(cfg), "model_weight": weights}, path)
    return build_upstream("wav2vec2_local", str(path))


def test_uncovered_upstreams_fall_back_to_batch_1(ckpts, capsys, tmp_path):
    """No plan (a torchaudio front-end over the padded batch), an unknown encoder layer or an unaccounted
    time-mixing module: one utterance at a time, announced once."""
    odd = load(ckpts, "wav2vec2_local", "tiny")
    odd.upstream.model.encoder.extra = torch.nn.BatchNorm1d(4)  # a variant this audit has never seen
    wavs = utterances([1.0, 2.5, 0.6])
    wav, wav_len = padded(wavs)
    cases = [
        (build_upstream("mel"), "its features are computed on the padded batch"),
        (tiny_conformer(tmp_path / "conformer.pt"), "encoder layers of type ConformerWav2Vec2EncoderLayer"),
        (odd, "module encoder.extra (BatchNorm1d)"),
    ]
    for upstream, why in cases:
        assert not plan_for(upstream).exact
        with torch.inference_mode():
            singles = [upstream_forward(upstream, w[None], torch.tensor([len(w)])) for w in wavs]
            for _ in range(2):
                hs, lens = exact_upstream_forward(upstream, wav, wav_len)
                assert valid_frame_gap(hs, lens, singles) == 0.0  # it is batch 1
        err = capsys.readouterr().err
        assert err.count("note: embedding one utterance at a time") == 1 and why in err, err


@pytest.fixture(scope="module")
def hubert_run(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exact_eval")
    corpus = ["--demo_train_speakers", "4", "--demo_test_speakers", "3", "--demo_videos", "2"]
    corpus += ["--demo_utts_per_video", "2", "--demo_trials", "20", "--num_workers", "1"]
    prepare.main(["--dataset", "demo", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(tmp / "data"), *corpus])
    args = ["--upstream", "hubert_local", "--upstream_ckpt", str(ckpts["tiny"]["hubert_local"])]
    args += ["--batch_size", "4", "--gradient_accumulate", "1", "--max_secs", "1.5", "--num_workers", "0"]
    args += ["--wandb_mode", "disabled", "--lr", "1e-3", "--total_steps", "2", "--save_step", "2"]
    train.main([*args, "--data_dir", str(tmp / "data"), "--exp_dir", str(tmp / "exp")])
    return tmp / "exp" / "step-2"


@pytest.mark.slow
@pytest.mark.numerics
def test_evaluate_gives_the_batch_1_eer(hubert_run, tmp_path, monkeypatch):
    """evaluate.py's length-sorted batches (2.5-6 s demo utterances, several per batch) score as batch 1 does."""
    # The GPU's branch of asv.forward.embedding_features (batch-exact padded batches), here on CPU.
    monkeypatch.setattr(asv.extract, "embedding_features", exact_upstream_forward)
    results = {}
    for budget in ("400000", "1"):  # the default; 1 sample puts every utterance in a batch of its own
        out = tmp_path / budget
        argv = ["--ckpt_dir", str(hubert_run), "--eval_max_frames", budget, "--out_dir", str(out)]
        evaluate.main([*argv, "--cache", "false", "--plots", "false", "--wandb_mode", "disabled", "--num_workers", "0"])
        res = json.loads((out / "demo_test" / "step-2" / "results.json").read_text())
        results[budget] = (res, np.loadtxt(out / "demo_test" / "step-2" / "scores.txt"))
    (batched, batched_scores), (single, single_scores) = results["400000"], results["1"]
    assert batched["num_trials"] == 20 and batched["eer"] == single["eer"]
    # Cosine scores of embeddings equal to ~1e-6 relative; scores.txt rounds to 6 decimals.
    np.testing.assert_allclose(batched_scores, single_scores, rtol=0, atol=2e-6)
