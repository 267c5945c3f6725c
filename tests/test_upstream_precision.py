"""--upstream_precision: bf16/fp16 autocast of the frozen upstream alone, fp32 hidden states out, the trained
head untouched; fbank-like front-ends and the default stay exactly fp32."""

import pytest
import torch

import train
from asv.config import TrainConfig
from asv.errors import ConfigError
from asv.extract import Embedder, ModelEmbedder
from asv.models import build_speaker_model
from asv.random_upstreams import build_random_upstreams
from asv.upstream import build_upstream, check_upstream_precision, upstream_forward


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
    ckpt = build_random_upstreams(tmp_path_factory.mktemp("up"), "tiny", ["hubert_local"])["hubert_local"]
    return str(ckpt), build_upstream("hubert_local", str(ckpt))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(3, 24_000, generator=g)
    return wav, torch.tensor([24_000, 17_000, 9_000])


@pytest.mark.numerics
def test_default_is_plain_fp32(hubert):
    _, up = hubert
    wav, lens = batch()
    ref, ref_len = up(wav, lens)  # s3prl's own forward, no autocast anywhere
    out, out_len = upstream_forward(up, wav, lens)
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_len, out_len, strict=True):
        assert torch.equal(a, b)


# Unit roundoff: bf16 keeps 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.numerics
def test_low_precision_upstream_returns_fp32_close_to_fp32(hubert, precision):
    _, up = hubert
    wav, lens = batch(1)
    ref, _ = upstream_forward(up, wav, lens)
    out, _ = upstream_forward(up, wav, lens, precision)
    assert all(h.dtype == torch.float32 for h in out)
    worst = max(((o - r).norm() / r.norm()).item() for o, r in zip(out, ref, strict=True))
    assert worst > 0  # autocast ran: the results are not the fp32 ones
    # Each hidden state has passed a handful of rounded operands since the last layer norm (a matmul's input
    # and weights, its output cast), whose relative errors of about u add up roughly in quadrature: ~3u was
    # seen on every tiny family in both extractor modes, and 8u bounds it without hiding a wrong dtype
    # (fp16 arithmetic in a bf16 run would still pass, bf16 in an fp16 run would not).
    assert worst < 8 * UNIT_ROUNDOFF[precision], worst


@pytest.mark.numerics
def test_weight_free_front_end_ignores_precision():
    up = build_upstream("fbank")
    wav, lens = batch(2)
    ref, _ = upstream_forward(up, wav, lens)
    out, _ = upstream_forward(up, wav, lens, "bf16")
    assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))


def test_head_stays_fp32(hubert):
    _, up = hubert
    cfg = TrainConfig()
    model = build_speaker_model(cfg.model, cfg.loss, up, num_classes=4).eval()
    emb = ModelEmbedder(up, model, "bf16")(*batch(3))
    assert emb.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_choices_are_config_errors(hubert):
    _, up = hubert
    with pytest.raises(ConfigError, match="choose one of fp32, bf16, fp16"):
        upstream_forward(up, *batch(), "int8")
    with pytest.raises(ConfigError, match="frozen upstream"):
        check_upstream_precision("bf16", trainable=True)
    check_upstream_precision("fp32", trainable=True)  # the default is always allowed


@pytest.mark.slow
def test_train_saves_it_and_evaluation_reads_it(hubert, tmp_path):
    import prepare

    ckpt, _ = hubert
    corpus = ["--demo_train_speakers", "4", "--demo_test_speakers", "2", "--demo_videos", "1"]
    corpus += ["--demo_utts_per_video", "3", "--demo_trials", "6", "--num_workers", "1", "--dev_speakers", "0"]
    data = tmp_path / "data"
    prepare.main(["--dataset", "demo", "--dataset_root", str(tmp_path / "corpus"), "--out_dir", str(data), *corpus])
    args = ["--upstream", "hubert_local", "--upstream_ckpt", ckpt, "--upstream_precision", "bf16"]
    args += ["--batch_size", "4", "--gradient_accumulate", "1", "--max_secs", "1.5", "--num_workers", "0"]
    args += ["--total_steps", "2", "--save_step", "2", "--wandb_mode", "disabled"]
    exp = train.main([*args, "--data_dir", str(data), "--exp_dir", str(tmp_path / "exp")])
    embedder = Embedder(exp / "step-2")
    assert embedder.upstream_precision == "bf16"
    with pytest.raises(SystemExit, match="frozen upstream"):
        train.main([*args, "--upstream_trainable", "true", "--data_dir", str(data), "--exp_dir", str(tmp_path / "x")])
