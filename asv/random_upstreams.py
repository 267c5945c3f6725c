"""Randomly initialised SSL checkpoints in the formats s3prl's *_local / *_custom loaders read.

No real weights can be downloaded offline, yet the multi-layer path needs SSL upstreams to test, and a
speed figure needs their real cost. A forward pass costs the same whatever the weights, so:

- tiny sizes (2 layers, 64 dims, 32-channel convs, ~430 KB, 3 hidden states at stride 320) exercise the code
  in tests, in both feature-extractor modes: `tiny` has wav2vec 2.0 / HuBERT / WavLM Base's group-normalised
  first conv layer, `tiny_large` Large's layer-normalised conv stack, pre-LN transformer and waveform
  normalisation;
- full sizes are the published architectures (`base`: 12 x 768, group norm, 95 M parameters; `large`:
  24 x 1024, layer norm, 317 M), built from s3prl's own config classes, for speed measurements.

Every .pt file is a plain dict of dicts, tensors and strings, so it loads with torch.load(weights_only=True).

    python -m asv.random_upstreams OUT_DIR                          # every family, tiny and tiny_large
    python -m asv.random_upstreams OUT_DIR --size base --family hubert_local     # HuBERT Base, 95 M
    python -m asv.random_upstreams OUT_DIR --size large --family wavlm_local     # WavLM Large, 317 M
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import asv.upstream  # noqa: F401  (the torchaudio shim must precede every s3prl import)

# Architecture per size. `extractor` is fairseq's extractor_mode ("default" = group norm in the first conv
# layer only, "layer_norm" = layer norm after every conv); `large` also puts layer norm first in each
# transformer layer and normalises the waveform per utterance, as the published Large checkpoints do.
SIZES = {
    "tiny": dict(layers=2, dim=64, ffn=128, heads=4, conv=32, conv_pos=16, conv_pos_groups=4, large=False),
    "tiny_large": dict(layers=2, dim=64, ffn=128, heads=4, conv=32, conv_pos=16, conv_pos_groups=4, large=True),
    "base": dict(layers=12, dim=768, ffn=3072, heads=12, conv=512, conv_pos=128, conv_pos_groups=16, large=False),
    "large": dict(layers=24, dim=1024, ffn=4096, heads=16, conv=512, conv_pos=128, conv_pos_groups=16, large=True),
}
# s3prl hub name -> file (or directory) the builder writes.
FILES = {
    "wav2vec2_local": "wav2vec2.pt",
    "hubert_local": "hubert.pt",
    "wavlm_local": "wavlm.pt",
    "hf_wav2vec2_custom": "hf_wav2vec2",
}
# Hidden states each size gives: the input of every transformer layer plus the encoder output.
NUM_HIDDEN_STATES = {size: s["layers"] + 1 for size, s in SIZES.items()}


def _conv_layers(channels: int) -> str:
    # The wav2vec 2.0 conv stack: kernel/stride (10,5), (3,2) x 4, (2,2) x 2, a total stride of 320.
    return f"[({channels},10,5)] + [({channels},3,2)] * 4 + [({channels},2,2)] * 2"


def _encoder(size: str) -> dict:
    s = SIZES[size]
    return dict(
        encoder_layers=s["layers"],
        encoder_embed_dim=s["dim"],
        encoder_ffn_embed_dim=s["ffn"],
        encoder_attention_heads=s["heads"],
        conv_feature_layers=_conv_layers(s["conv"]),
        conv_pos=s["conv_pos"],
        conv_pos_groups=s["conv_pos_groups"],
        extractor_mode="layer_norm" if s["large"] else "default",
        layer_norm_first=s["large"],
    )


def _plain(cfg) -> dict:
    """A dataclass config as a dict of builtins (enum-typed fields become their string value)."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg).items()}


def build_wav2vec2(path: Path, size: str) -> None:
    from s3prl.upstream.wav2vec2.wav2vec2_model import AudioPretrainingConfig, Wav2Vec2Config, Wav2Vec2Model

    tiny = size.startswith("tiny")
    quantizer = dict(latent_vars=16, latent_groups=2, latent_dim=16) if tiny else {}
    final_dim = SIZES[size]["dim"] if tiny else (768 if SIZES[size]["large"] else 256)
    cfg = Wav2Vec2Config(**_encoder(size), final_dim=final_dim, **quantizer)
    task_cfg = AudioPretrainingConfig(normalize=SIZES[size]["large"])
    model = Wav2Vec2Model(cfg)
    torch.save({"task_cfg": _plain(task_cfg), "model_cfg": _plain(cfg), "model_weight": model.state_dict()}, path)


def build_hubert(path: Path, size: str) -> None:
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    tiny = size.startswith("tiny")
    final_dim = SIZES[size]["dim"] if tiny else (768 if SIZES[size]["large"] else 256)
    cfg = HubertConfig(**_encoder(size), final_dim=final_dim, label_rate=50.0)
    task_cfg = HubertPretrainingConfig(label_rate=50.0, normalize=SIZES[size]["large"])
    # One label set: 8 units for the tiny models, the 504 k-means units of HuBERT Base / Large's last iteration.
    symbols = [[str(i) for i in range(8 if tiny else 504)]]
    model = HubertModel(cfg, task_cfg, symbols)
    ckpt = {"task_cfg": _plain(task_cfg), "model_cfg": _plain(cfg), "model_weight": model.state_dict()}
    torch.save({**ckpt, "dictionaries_symbols": symbols}, path)


def build_wavlm(path: Path, size: str) -> None:
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    # WavLM Base+ / Large: gated relative position bias (320 buckets, max distance 800).
    cfg = _encoder(size) | dict(
        relative_position_embedding=True,
        num_buckets=320,
        max_distance=800,
        gru_rel_pos=True,
        normalize=SIZES[size]["large"],
    )
    model = WavLM(WavLMConfig(cfg))
    torch.save({"cfg": cfg, "model": model.state_dict()}, path)


def build_hf_wav2vec2(path: Path, size: str) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    s = SIZES[size]
    cfg = Wav2Vec2Config(
        hidden_size=s["dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        conv_dim=(s["conv"],) * 7,
        num_conv_pos_embeddings=s["conv_pos"],
        num_conv_pos_embedding_groups=s["conv_pos_groups"],
        feat_extract_norm="layer" if s["large"] else "group",
        do_stable_layer_norm=s["large"],
        vocab_size=8,
    )
    Wav2Vec2Model(cfg).save_pretrained(path)
    # s3prl falls back to downloading facebook/wav2vec2-base's extractor when the directory has none.
    # HF's Large models normalise the waveform and take an attention mask; Base models do neither.
    Wav2Vec2FeatureExtractor(return_attention_mask=s["large"], do_normalize=s["large"]).save_pretrained(path)


BUILDERS = {
    "wav2vec2_local": build_wav2vec2,
    "hubert_local": build_hubert,
    "wavlm_local": build_wavlm,
    "hf_wav2vec2_custom": build_hf_wav2vec2,
}


def build_random_upstreams(
    out_dir: Path, size: str = "tiny", families: list[str] | None = None, seed: int = 0
) -> dict[str, Path]:
    """Write one random checkpoint per family under out_dir; returns {s3prl hub name: --upstream_ckpt path}."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in families or list(BUILDERS):
        if name not in BUILDERS:
            raise ValueError(f"unknown family {name!r}; choose one of: {', '.join(BUILDERS)}")
        torch.manual_seed(seed)
        paths[name] = out_dir / FILES[name]
        BUILDERS[name](paths[name], size)
    return paths


def build_tiny_upstreams(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The tiny group-norm (Base-style) checkpoint of every family: what the ssl_tiny tests train through."""
    return build_random_upstreams(out_dir, "tiny", seed=seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=list(SIZES), nargs="+", default=["tiny", "tiny_large"])
    parser.add_argument("--family", choices=list(BUILDERS), nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for size in args.size:
        out = args.out_dir / size if len(args.size) > 1 else args.out_dir
        for name, path in build_random_upstreams(out, size, args.family, args.seed).items():
            print(f"--upstream {name} --upstream_ckpt {path}")


if __name__ == "__main__":
    main()
