"""ONNX export of the embedder (asv/onnx_export.py): onnxruntime against PyTorch on 1-20 s of audio, to cosine
>= 0.9999, for an SSL upstream (tiny random wav2vec 2.0 + weighted-sum featurizer + x-vector; the weight-free
fbank + x-vector case runs on an exported model in test_use.py). Skipped, with the reason, where onnx / onnxscript /
onnxruntime are not installed (requirements.txt lists them, so CI has them)."""

import numpy as np
import pytest
import torch

NO_ORT = "onnxruntime is not installed (pip install -e '.[onnx]'; make setup installs it)"
onnxruntime = pytest.importorskip("onnxruntime", reason=NO_ORT)
pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")

from asv.config import LossConfig, ModelConfig  # noqa: E402
from asv.errors import UpstreamError  # noqa: E402
from asv.extract import ModelEmbedder  # noqa: E402
from asv.models import build_speaker_model  # noqa: E402
from asv.onnx_export import export_embedder  # noqa: E402
from asv.upstream import build_upstream  # noqa: E402

pytestmark = pytest.mark.slow
SECONDS = (1.0, 4.3, 20.0)


def random_embedder(upstream: str, ckpt=None, **model) -> ModelEmbedder:
    """Random weights throughout; featurizer weights and BatchNorm statistics moved off their initial values so a
    graph that dropped them would not match by accident."""
    torch.manual_seed(0)
    up = build_upstream(upstream, ckpt)
    sm = build_speaker_model(ModelConfig(upstream=upstream, **model), LossConfig(), up, num_classes=1)
    with torch.no_grad():
        for name, p in sm.named_parameters():
            if name.startswith("featurizer"):
                p.normal_()
        for m in sm.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return ModelEmbedder(up, sm.eval())


def check_parity(embedder: ModelEmbedder, path):
    contract = export_embedder(embedder, path)
    assert contract["min_samples"] >= embedder.min_samples and contract["max_samples"] >= 20 * 16000
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for seconds in SECONDS:
        wav = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        ref = embedder(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))[0].numpy()
        out = session.run(None, {"wav": wav[None]})[0][0]
        cosine = float(ref @ out / np.linalg.norm(ref) / np.linalg.norm(out))
        assert cosine >= 0.9999, (seconds, cosine)
    return contract


@pytest.mark.ssl_tiny
@pytest.mark.numerics
def test_wav2vec2_featurizer_xvector_onnx_matches_pytorch(tmp_path):
    from asv.random_upstreams import build_random_upstreams

    ckpt = build_random_upstreams(tmp_path, "tiny", ["wav2vec2_local"])["wav2vec2_local"]
    check_parity(random_embedder("wav2vec2_local", str(ckpt)), tmp_path / "w2v2.onnx")


def test_unsupported_upstream_is_refused_in_one_line(tmp_path):
    from asv.random_upstreams import build_random_upstreams

    ckpt = build_random_upstreams(tmp_path, "tiny", ["hf_wav2vec2_custom"])["hf_wav2vec2_custom"]
    with pytest.raises(UpstreamError, match="ONNX export supports") as err:
        export_embedder(random_embedder("hf_wav2vec2_custom", str(ckpt)), tmp_path / "hf.onnx")
    assert "\n" not in str(err.value)
