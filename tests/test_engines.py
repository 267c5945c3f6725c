"""asv/engines.py: the frozen upstream on onnxruntime gives each utterance the hidden states PyTorch gives it alone
(s3prl's batch-1 evaluation), the graph is exported once and found again by its weights, and --engine auto takes
it only where it can run and pays. Skipped where onnxruntime / onnxscript are not installed (make setup installs
the onnx extra)."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")

from asv import engines  # noqa: E402
from asv.batch_exact import batch1_upstream_forward  # noqa: E402
from asv.config import LossConfig, ModelConfig  # noqa: E402
from asv.errors import UpstreamError  # noqa: E402
from asv.extract import ModelEmbedder, use_engine  # noqa: E402
from asv.models import build_speaker_model  # noqa: E402
from asv.random_upstreams import build_random_upstreams  # noqa: E402
from asv.upstream import build_upstream  # noqa: E402

pytestmark = pytest.mark.slow
# (family, size): HuBERT with Large's layer-normalised extractor and waveform normalisation, WavLM with Base's
# group norm and its gated relative position bias. wav2vec 2.0's graph is tests/test_onnx.py's (the embedder's
# graph runs the same UpstreamGraph). Each export takes ~25 s on 2 cores, so each family and mode once.
CASES = [("hubert_local", "tiny_large"), ("wavlm_local", "tiny")]
SECONDS = [1.0, 2.37, 6.0]  # odd lengths: partial conv windows and frame counts of either parity


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for size in {s for _, s in CASES}:
        out.update(
            {
                (n, size): p
                for n, p in build_random_upstreams(root / size, size, [n for n, s in CASES if s == size]).items()
            }
        )
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


def padded_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    wavs = [torch.from_numpy((0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32)) for s in SECONDS]
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs])


@pytest.mark.parametrize("name,size", CASES)
def test_onnxruntime_hidden_states_equal_pytorch_batch1(ckpts, cache, name, size):
    up = build_upstream(name, str(ckpts[(name, size)]))
    onnx = engines.onnx_upstream(up, 4801, cache, announce=lambda *a, **k: None)
    wav, wav_len = padded_batch()
    ref, ref_len = batch1_upstream_forward(up, wav, wav_len)
    out, out_len = onnx.forward(wav, wav_len)
    assert len(out) == len(ref)
    for k, (a, b) in enumerate(zip(out, ref, strict=True)):
        assert torch.equal(out_len[k], ref_len[k])
        for i, n in enumerate(ref_len[k].tolist()):
            # fp32 kernels of two libraries sum in different orders: a few ulps per layer, 2.5e-6 of the largest
            # value measured on a full-size HuBERT Base. A tenth of a percent of padding in the group norm, or a
            # frame of the wrong mask, moves them by 1e-2 or more (tests/test_batch_exact.py).
            scale = float(b[i, :n].abs().max())
            err = float((a[i, :n] - b[i, :n]).abs().max())
            assert err <= 1e-4 * scale, (name, k, i, err / scale)


def test_graph_is_exported_once_and_keyed_by_the_weights(ckpts, cache, tmp_path, monkeypatch):
    import asv.onnx_export

    up = build_upstream("wavlm_local", str(ckpts[("wavlm_local", "tiny")]))
    graph = engines.onnx_upstream(up, 4801, cache, announce=lambda *a, **k: None).path  # the module's export
    exports = []

    def export(upstream, path, min_samples, opset=None):  # the graph exported above, as a fresh export writes it
        exports.append(path)
        path.write_bytes(graph.read_bytes())
        return min_samples, 600 * 16000

    monkeypatch.setattr(asv.onnx_export, "export_upstream", export)
    said = []
    engines.onnx_upstream(up, 4801, tmp_path, announce=said.append)
    assert len(exports) == 1 and len(said) == 1 and "exporting" in said[0]
    assert engines.cached(up, tmp_path)
    engines.onnx_upstream(up, 4801, tmp_path, announce=said.append)  # from the cache: no export
    assert len(exports) == 1 and len(said) == 1
    assert not list(tmp_path.glob("*.tmp.onnx"))  # written aside, then renamed into place
    other = build_upstream("wavlm_local", str(ckpts[("wavlm_local", "tiny")]))
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # another upstream's weights: another graph
    assert not engines.cached(other, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".onnx"] == [f"{engines.upstream_fingerprint(up)}.onnx"]


def test_auto_takes_onnxruntime_only_where_it_runs_and_pays(ckpts, cache):
    up = build_upstream("wavlm_local", str(ckpts[("wavlm_local", "tiny")]))
    hour, minute = 3600.0, 60.0
    fresh = cache / "empty"
    assert engines.choose("auto", up, torch.device("cpu"), "fp32", 11 * hour, fresh)[0] == "onnxruntime"
    name, why = engines.choose("auto", up, torch.device("cpu"), "fp32", 5 * minute, fresh)
    assert name == "torch" and "would not pay" in why
    engines.onnx_upstream(up, 4801, cache, announce=lambda *a, **k: None)
    assert engines.choose("auto", up, "cpu", "fp32", 5 * minute, cache) == ("onnxruntime", "its graph is cached")
    for device, precision in ((torch.device("cuda", 0), "fp32"), (torch.device("cpu"), "bf16")):
        assert engines.choose("auto", up, device, precision, 11 * hour, cache)[0] == "torch"
        with pytest.raises(UpstreamError, match="--engine onnxruntime cannot run here") as err:
            engines.choose("onnxruntime", up, device, precision, 11 * hour, cache)
        assert "\n" not in str(err.value)
    fbank = build_upstream("fbank")
    name, why = engines.choose("auto", fbank, "cpu", "fp32", 11 * hour, cache)
    assert name == "torch" and "not a wav2vec 2.0 / HuBERT / WavLM" in why
    assert engines.choose("torch", up, "cpu", "fp32", 11 * hour, cache)[0] == "torch"


def test_embeddings_on_either_engine_agree(ckpts, cache):
    up = build_upstream("wavlm_local", str(ckpts[("wavlm_local", "tiny")]))
    torch.manual_seed(0)
    model = build_speaker_model(ModelConfig(upstream="wavlm_local"), LossConfig(), up, num_classes=1).eval()
    embedder = ModelEmbedder(up, model)
    wav, wav_len = padded_batch(1)
    ref = embedder(wav, wav_len)
    assert use_engine(embedder, "onnxruntime", 10.0, cache) == "onnxruntime" and embedder.onnx is not None
    out = embedder(wav, wav_len)
    cosine = torch.nn.functional.cosine_similarity(out, ref)
    assert float(cosine.min()) >= 0.99999, cosine
    assert use_engine(embedder, "torch", 10.0, cache) == "torch" and embedder.onnx is None
