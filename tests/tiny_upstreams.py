"""Tiny randomly initialised SSL checkpoints in the formats s3prl's *_local / *_custom loaders read.

None of the real weights can be downloaded here, so the tests build 2-layer, 64-dim models with
32-channel convs (~430 KB each, 3 hidden states at stride 320) to exercise the multi-layer path.
Every .pt file is a plain dict of dicts, tensors and strings, so it loads with torch.load(weights_only=True).

    python -m tests.tiny_upstreams OUT_DIR      # writes OUT_DIR/{wav2vec2,hubert,wavlm}.pt and OUT_DIR/hf_wav2vec2/
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

import asv.upstream  # noqa: F401  (the torchaudio shim must precede every s3prl import)

LAYERS, DIM, FFN, HEADS = 2, 64, 128, 4
# The wav2vec 2.0 conv stack (kernel/stride as in Base, total stride 320) with 32 channels.
CONV = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
# Names (s3prl hub) -> file written by build_tiny_upstreams.
TINY_UPSTREAMS = {
    "wav2vec2_local": "wav2vec2.pt",
    "hubert_local": "hubert.pt",
    "wavlm_local": "wavlm.pt",
    "hf_wav2vec2_custom": "hf_wav2vec2",
}
_ENCODER = dict(
    encoder_layers=LAYERS,
    encoder_embed_dim=DIM,
    encoder_ffn_embed_dim=FFN,
    encoder_attention_heads=HEADS,
    conv_feature_layers=CONV,
    conv_pos=16,
    conv_pos_groups=4,
    final_dim=DIM,
)


def _plain(cfg) -> dict:
    """A dataclass config as a dict of builtins (enum-typed fields become their string value)."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg).items()}


def build_wav2vec2(path: Path) -> None:
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(**_ENCODER, latent_vars=16, latent_groups=2, latent_dim=16)
    model = Wav2Vec2Model(cfg)
    torch.save(
        {"task_cfg": _plain(AudioPretrainingConfig()), "model_cfg": _plain(cfg), "model_weight": model.state_dict()},
        path,
    )


def build_hubert(path: Path) -> None:
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    cfg, task_cfg = HubertConfig(**_ENCODER, label_rate=50.0), HubertPretrainingConfig(label_rate=50.0)
    symbols = [[str(i) for i in range(8)]]  # one 8-unit label set: the size of the (unused) projection
    model = HubertModel(cfg, task_cfg, symbols)
    ckpt = {"task_cfg": _plain(task_cfg), "model_cfg": _plain(cfg), "model_weight": model.state_dict()}
    torch.save({**ckpt, "dictionaries_symbols": symbols}, path)


def build_wavlm(path: Path) -> None:
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    cfg = {k: v for k, v in _ENCODER.items() if k != "final_dim"} | {"relative_position_embedding": True}
    model = WavLM(WavLMConfig(cfg))
    torch.save({"cfg": cfg, "model": model.state_dict()}, path)


def build_hf_wav2vec2(path: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=8,
    )
    Wav2Vec2Model(cfg).save_pretrained(path)
    # s3prl falls back to downloading facebook/wav2vec2-base's extractor when the directory has none.
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(path)


def build_tiny_upstreams(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny checkpoint under out_dir; returns {s3prl hub name: --upstream_ckpt path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders = {
        "wav2vec2_local": build_wav2vec2,
        "hubert_local": build_hubert,
        "wavlm_local": build_wavlm,
        "hf_wav2vec2_custom": build_hf_wav2vec2,
    }
    paths = {}
    for name, build in builders.items():
        torch.manual_seed(seed)
        paths[name] = out_dir / TINY_UPSTREAMS[name]
        build(paths[name])
    return paths


if __name__ == "__main__":
    for name, path in build_tiny_upstreams(Path(sys.argv[1])).items():
        print(f"--upstream {name} --upstream_ckpt {path}")
