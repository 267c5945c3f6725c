"""The `mhfa` downstream (issue 23): MHFA against its formula written out, batch-exact embeddings, the registry and
the config, and train.py -> evaluate.py -> model directory -> ONNX through a tiny random wav2vec 2.0 (frozen and
fine-tuned)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import asv.upstream  # noqa: F401  (installs the torchaudio shim before s3prl imports)
import evaluate
import train
from asv.batch_exact import batch1_upstream_forward, exact_upstream_forward
from asv.config import DOWNSTREAM_NAMES, LossConfig, ModelConfig, TrainConfig, load_train_config, parse, save_config
from asv.errors import ConfigError
from asv.extract import Embedder, ModelEmbedder
from asv.models import DOWNSTREAMS, MHFA, build_speaker_model
from asv.random_upstreams import NUM_HIDDEN_STATES, build_random_upstreams
from asv.upstream import build_upstream, upstream_forward
from tests.test_batch_exact import MIN_COSINE, padded, utterances

TINY = dict(downstream="mhfa", mhfa_heads=3, mhfa_compression_dim=4, mhfa_embed_dim=5)
NUM_STATES = NUM_HIDDEN_STATES["tiny"]
TRAIN = ["--upstream", "wav2vec2_local", "--downstream", "mhfa", "--batch_size", "4", "--gradient_accumulate", "1"]
TRAIN += ["--max_secs", "1.5", "--log_step", "1", "--num_workers", "0", "--wandb_mode", "disabled", "--lr", "1e-3"]
EVAL = ["--wandb_mode", "disabled", "--num_workers", "0"]


class FakeUpstream:
    """What the featurizer reads from an upstream: three 6-d hidden states."""

    num_layers, hidden_sizes, downsample_rates = 3, [6, 6, 6], [320, 320, 320]


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_speaker_model(ModelConfig(**TINY), LossConfig(), FakeUpstream(), num_classes=2).eval()
    with torch.no_grad():
        model.featurizer.weights.normal_()  # off the uniform init, and different for keys and values
    return model


def hidden_batch(lengths: list[int], seed: int = 1):
    """Three (B, T, 6) hidden states; frames past each length hold large garbage, as padding may."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(len(lengths), max(lengths), 6, generator=g) for _ in range(3)]
    for b, n in enumerate(lengths):
        for h in hs:
            h[b, n:] = 1e3 * torch.randn(h.shape[1] - n, 6, generator=g)
    return hs, [torch.tensor(lengths)] * 3


def mhfa_formula(model, hs: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """Peng et al.'s MHFA written out in float64 for each utterance alone, from the model's parameters."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = []
    for b, n in enumerate(lengths):
        states = [h[b, :n].double() for h in hs]  # L x (n, D)
        w = p["featurizer.weights"].exp() / p["featurizer.weights"].exp().sum(-1, keepdim=True)  # (2, L) softmax
        keys = sum(w[0, i] * s for i, s in enumerate(states))  # (n, D)
        values = sum(w[1, i] * s for i, s in enumerate(states))
        k = keys @ p["downstream.cmp_linear_k.weight"].T + p["downstream.cmp_linear_k.bias"]  # (n, C)
        v = values @ p["downstream.cmp_linear_v.weight"].T + p["downstream.cmp_linear_v.bias"]
        scores = k @ p["downstream.att_head.weight"].T + p["downstream.att_head.bias"]  # (n, H)
        a = (scores - scores.max(0).values).exp()
        a = a / a.sum(0)  # each head's weights over the n frames sum to 1
        pooled = torch.stack([(a[:, h, None] * v).sum(0) for h in range(a.shape[1])])  # (H, C)
        out.append(p["downstream.pooling_fc.weight"] @ pooled.reshape(-1) + p["downstream.pooling_fc.bias"])
    return torch.stack(out)


@pytest.mark.numerics
def test_mhfa_matches_its_formula():
    model, lengths = tiny_model(), [7, 4, 1]
    hs, lens = hidden_batch(lengths)
    with torch.no_grad():
        out = model.embed(hs, lens)
    # float32 against float64: with O(1) inputs and weights, each of the chain's reductions (3 layers, 6 inputs,
    # 4 compressed dims, <= 7 frames, 12 pooled values) rounds to ~(terms x 2^-24) of its O(1) size, ~1e-6 in
    # all; 1e-5 leaves ten times that, while a wrong axis, mask or order is O(0.1).
    torch.testing.assert_close(out.double(), mhfa_formula(model, hs, lengths), rtol=0, atol=1e-5)
    with torch.no_grad():  # no dropout or BatchNorm: training computes the same function
        assert torch.equal(model.train().embed(hs, lens), out)


@pytest.mark.numerics
def test_padding_never_reaches_an_embedding():
    model, lengths = tiny_model(), [7, 4, 1]
    hs, lens = hidden_batch(lengths)
    with torch.no_grad():
        batched = model.embed(hs, lens)
        alone = [model.embed([h[b : b + 1, :n] for h in hs], [torch.tensor([n])] * 3) for b, n in enumerate(lengths)]
    single = torch.cat(alone)
    assert F.cosine_similarity(batched, single).min() >= MIN_COSINE


@pytest.fixture(scope="module")
def w2v2(tmp_path_factory):
    return build_random_upstreams(tmp_path_factory.mktemp("mhfa_upstream"), "tiny", ["wav2vec2_local"])[
        "wav2vec2_local"
    ]


@pytest.mark.numerics
def test_embeddings_are_batch_exact_through_an_ssl_upstream(w2v2):
    """As tests/test_batch_exact.py checks the x-vector: 1-8 s in one padded batch against each alone."""
    upstream = build_upstream("wav2vec2_local", str(w2v2))
    model = build_speaker_model(ModelConfig(upstream="wav2vec2_local", **TINY), LossConfig(), upstream, 4).eval()
    with torch.no_grad():
        model.featurizer.weights.normal_()
    wavs = utterances([1.0, 2.3, 3.7, 8.0])
    with torch.inference_mode():
        single = torch.cat([model.embed(*upstream_forward(upstream, w[None], torch.tensor([len(w)]))) for w in wavs])
        for forward in (exact_upstream_forward, batch1_upstream_forward):
            batched = model.embed(*forward(upstream, *padded(wavs)))
            assert F.cosine_similarity(single, batched).min() >= MIN_COSINE, forward.__name__
    assert ModelEmbedder(upstream, model).embed_dim == 5


def test_registry_and_config_accept_mhfa(tmp_path):
    assert "mhfa" in DOWNSTREAM_NAMES and isinstance(DOWNSTREAMS["mhfa"](768, ModelConfig(downstream="mhfa")), MHFA)
    cfg, _ = parse(TrainConfig, ["--downstream", "mhfa"])
    m = cfg.model
    assert (m.mhfa_heads, m.mhfa_compression_dim, m.mhfa_embed_dim) == (64, 128, 256)  # the paper's
    assert TrainConfig().model.embed_dim == 512  # SUPERB's x-vector keeps its own
    yaml_file = tmp_path / "mhfa.yaml"
    yaml_file.write_text("model:\n  downstream: mhfa\n  mhfa_heads: 8\n")
    assert parse(TrainConfig, ["--config_path", str(yaml_file)])[0].model.mhfa_heads == 8
    with pytest.raises(ConfigError, match="--mhfa_embed_dim"):  # not silently ignored
        parse(TrainConfig, ["--downstream", "mhfa", "--embed_dim", "192"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_train_config(tmp_path / "config.yaml") == cfg
    # A config.yaml saved before mhfa existed lacks its fields and loads with their defaults.
    old = TrainConfig()
    save_config(old, tmp_path / "old.yaml")
    text = "\n".join(line for line in (tmp_path / "old.yaml").read_text().splitlines() if "mhfa_" not in line)
    (tmp_path / "old.yaml").write_text(text)
    assert load_train_config(tmp_path / "old.yaml") == old


def test_parameter_count_on_a_base_upstream():
    """13 hidden states of 768 (wav2vec 2.0 / HuBERT / WavLM Base) with the defaults: 2.30 M."""

    class Base:
        num_layers, hidden_sizes, downsample_rates = 13, [768] * 13, [320] * 13

    model = build_speaker_model(ModelConfig(downstream="mhfa"), LossConfig(), Base(), num_classes=2)
    L, D, C, H, E = 13, 768, 128, 64, 256
    by_hand = 2 * L + 2 * (D * C + C) + (C * H + H) + (H * C * E + E)  # weightings, compressions, heads, projection
    trained = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    assert sum(p.numel() for p in trained) == by_hand == 2_302_554
    assert model.featurizer.weights.shape == (2, L) and model.head.W.shape[0] == E
    torch.testing.assert_close(model.layer_weights(), torch.full((L,), 1 / L))  # the values' weighting


def test_a_single_state_upstream_feeds_both_keys_and_values():
    class Fbank:
        num_layers, hidden_sizes, downsample_rates = 1, [6], [160]

    torch.manual_seed(0)
    model = build_speaker_model(ModelConfig(**TINY), LossConfig(), Fbank(), num_classes=2).eval()
    hs, lens = hidden_batch([5, 3])
    with torch.no_grad():
        out = model.embed(hs[:1], lens[:1])
    assert model.layer_weights() is None and out.shape == (2, 5) and torch.isfinite(out).all()


def read_log(exp):
    return [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(w2v2, tiny_demo, tmp_path_factory):
    """Two updates of MHFA on a frozen tiny wav2vec 2.0, evaluated and exported as a model directory."""
    data, _ = tiny_demo
    tmp = tmp_path_factory.mktemp("mhfa_run")
    exp, model_dir = tmp / "exp", tmp / "model"
    args = [*TRAIN, "--upstream_ckpt", str(w2v2), "--data_dir", str(data), "--exp_dir", str(exp)]
    train.main([*args, "--total_steps", "2", "--save_step", "2"])
    results = evaluate.main(["--ckpt_dir", str(exp / "step-2"), *EVAL, "--export_model", str(model_dir)])
    return data, exp, model_dir, results


@pytest.mark.slow
@pytest.mark.ssl_tiny
def test_train_and_evaluate(trained):
    _, exp, _, results = trained
    weights = load_file(exp / "step-2" / "embedder.safetensors")
    assert weights["featurizer.weights"].shape == (2, NUM_STATES)  # keys' and values' weightings
    assert weights["downstream.pooling_fc.weight"].shape == (256, 64 * 128)
    log = [r for r in read_log(exp) if "train/loss" in r]
    assert all(math.isfinite(r["train/loss"]) for r in log)
    expected = [f"featurizer/layer_{i}" for i in range(NUM_STATES)]
    assert sorted(k for k in log[-1] if k.startswith("featurizer/")) == expected
    res = results["demo_test"][2]
    assert all(math.isfinite(res[k]) for k in ("eer", "min_dcf@0.01"))
    assert (exp / "evaluate" / "step-2" / "layer_weights.png").is_file()


def corpus_wavs(data, n=3) -> list[str]:
    return sorted(str(p) for p in (data.parent / "corpus").rglob("*.wav"))[:n]


@pytest.mark.slow
@pytest.mark.ssl_tiny
def test_model_directory_round_trip(trained):
    from asv.api import load_model

    data, exp, model_dir, _ = trained
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["embedding"] == {**meta["embedding"], "downstream": "mhfa", "dim": 256}
    paths = corpus_wavs(data)
    from_dir, from_ckpt = load_model(model_dir, "cpu").embed(paths), load_model(exp / "step-2", "cpu").embed(paths)
    assert from_dir.shape == (3, 256) and np.array_equal(from_dir, from_ckpt)  # same weights, same computation


@pytest.mark.slow
@pytest.mark.ssl_tiny
@pytest.mark.numerics
def test_onnx_of_the_model_directory_matches_pytorch(trained, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    import shutil

    import soundfile as sf

    from asv.api import load_model
    from asv.onnx_export import OnnxEmbedder, export_onnx
    from asv.scoring import l2_normalise

    data, _, exported, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(exported, model_dir)
    export_onnx(model_dir)
    paths = corpus_wavs(data, 2)
    rng = np.random.default_rng(0)
    for seconds in (1.0, 4.3, 20.0):
        p = tmp_path / f"noise{seconds}.wav"
        sf.write(p, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        paths.append(str(p))
    ref = l2_normalise(load_model(model_dir, "cpu").embed(paths))
    out = l2_normalise(OnnxEmbedder(model_dir).embed(paths))
    # The bar tests/test_onnx.py sets for the x-vector: onnxruntime's kernels sum in other orders than PyTorch's.
    assert ((ref * out).sum(1) >= 0.9999).all(), (ref * out).sum(1)


@pytest.mark.slow
@pytest.mark.ssl_tiny
def test_fine_tuned_upstream(w2v2, tiny_demo, tmp_path):
    data, _ = tiny_demo
    exp = tmp_path / "ft"
    args = [*TRAIN, "--upstream_ckpt", str(w2v2), "--data_dir", str(data), "--exp_dir", str(exp)]
    train.main([*args, "--upstream_trainable", "true", "--total_steps", "2", "--eval_dev", "false"])
    saved = load_file(exp / "step-2" / "embedder.safetensors")
    assert saved["featurizer.weights"].shape == (2, NUM_STATES)
    key = "encoder.layers.0.fc1.weight"
    tuned = next(v for k, v in saved.items() if k.startswith("upstream.") and k.endswith(key))
    original = torch.load(w2v2, weights_only=True)["model_weight"][key]
    assert not torch.equal(tuned, original), "the upstream did not train"
    embedder = Embedder(exp / "step-2", torch.device("cpu"), {})
    wavs = utterances([1.0, 2.5])
    assert torch.isfinite(embedder(*padded(wavs))).all()


@pytest.mark.slow
@pytest.mark.numerics
def test_onnx_of_a_single_state_upstream_matches_pytorch(tmp_path):
    """fbank's one hidden state feeds both keys and values: the ONNX graph's other featurizer branch."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    import onnxruntime

    from asv.onnx_export import export_embedder

    torch.manual_seed(0)
    up = build_upstream("fbank")
    embedder = ModelEmbedder(up, build_speaker_model(ModelConfig(upstream="fbank", **TINY), LossConfig(), up, 1).eval())
    export_embedder(embedder, tmp_path / "mhfa.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "mhfa.onnx"), providers=["CPUExecutionProvider"])
    for wav in utterances([1.0, 4.3]):
        ref = embedder(wav[None], torch.tensor([len(wav)]))[0].numpy()
        out = session.run(None, {"wav": wav[None].numpy()})[0][0]
        assert float(ref @ out / np.linalg.norm(ref) / np.linalg.norm(out)) >= 0.9999  # tests/test_onnx.py's bar
