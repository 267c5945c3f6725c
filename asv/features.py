"""Dump what a trained model's featurizer feeds its downstream: the learned weighted sum of the upstream's hidden
states (or all of them), one file per utterance, batched and sharded like evaluation (s3prl#539, #550).

    python -m asv features --model models/demo --list wavs.txt --out_dir feats/
    accelerate launch -m asv features --model exp/run/step-500 --list wavs.txt --out_dir feats/ --all_layers

Writes under out_dir:
  <id>.npy | <id>.safetensors    (T, D) float32 weighted-sum features, or (L, T, D) with --all_layers; in
                                 safetensors the tensor is named "features" ("hidden_states" with --all_layers)
  index.csv                      id,wav_path,file,num_frames
  features.json                  what was dumped: model, upstream, frame stride in samples, dimensions, layer
                                 weights (softmax of the featurizer's), test effects
The id is the list's (`id path` lines) or the path relative to the files' common folder, extension dropped.
Padding never reaches a file: each utterance's hidden states are its batch-1 ones (asv.forward.embedding_features),
cut to its own number of frames.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.numpy import save_file
from torch.utils.data import DataLoader

from asv.datasets import EvalDataset, collate_eval
from asv.errors import ConfigError
from asv.extract import audio_lengths, length_sorted_batches
from asv.forward import embedding_features
from asv.progress import progress

FORMATS = ("npy", "safetensors")


def default_ids(paths: list[str]) -> list[str]:
    """Each path relative to the files' common folder, without its extension (unique whenever the paths are)."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [str(Path(os.path.relpath(p, common)).with_suffix("")) for p in absolute]


def dump_features(
    embedder,
    items: list[tuple[str, str]],
    out_dir: Path,
    all_layers: bool = False,
    fmt: str = "npy",
    effects: bool = False,
    accelerator=None,
    max_frames: int = 400_000,
    num_workers: int = 0,
) -> list[dict]:
    """Write one feature file per (id, wav_path) item; returns the index rows (on every process)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"two files would be written as {dup!r}: give unique ids ('id path' lines)")
    bad = next((i for i in ids if Path(i).is_absolute() or ".." in Path(i).parts), None)
    if bad is not None:
        raise ConfigError(f"id {bad!r} would write outside --out_dir: ids must be relative paths without '..'")
    out_dir = Path(out_dir)
    lengths = audio_lengths([p for _, p in items])
    batches = length_sorted_batches([lengths[p] for _, p in items], max_frames)
    dataset = EvalDataset(items, effects=effects)
    device = accelerator.device if accelerator else next(embedder.model.parameters()).device
    featurizer = embedder.model.featurizer
    main = accelerator is None or accelerator.is_main_process

    def run(my_batches) -> list[dict]:
        loader = DataLoader(dataset, batch_sampler=my_batches, collate_fn=collate_eval, num_workers=num_workers)
        rows = []
        for idx, wav, wav_len in progress(
            loader, sum(map(len, my_batches)), "features", "utt", size=lambda b: len(b[0]), enabled=main
        ):
            hidden, hidden_len = embedding_features(
                embedder.upstream, wav.to(device), wav_len.to(device), embedder.upstream_precision
            )
            with torch.inference_mode():
                if all_layers:
                    feats, n_frames = torch.stack(hidden, dim=1), hidden_len[0]  # (B, L, T, D)
                else:
                    feats, n_frames = featurizer(hidden, hidden_len)  # (B, T, D)
            for k, i in enumerate(idx.tolist()):
                x = feats[k][..., : int(n_frames[k]), :].float().cpu().numpy()
                rows.append(_write(out_dir, items[i], x, fmt, all_layers))
        return rows

    if accelerator is None or accelerator.num_processes == 1:
        rows = run(batches)
    else:
        with accelerator.split_between_processes(batches) as mine:
            rows = gather_object(run(mine))
    order = {i: k for k, i in enumerate(ids)}
    rows.sort(key=lambda r: order[r["id"]])
    if main:
        with open(out_dir / "index.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "wav_path", "file", "num_frames"])
            writer.writeheader()
            writer.writerows(rows)
        weights = embedder.model.layer_weights()
        meta = {
            "what": "all upstream hidden states (L, T, D)"
            if all_layers
            else "featurizer weighted sum (T, D)"
            if featurizer.weightings == 1
            else f"featurizer's {featurizer.weightings} weighted sums ({featurizer.weightings}, T, D)",
            "upstream": embedder.cfg.model.upstream,
            "frame_stride_samples": featurizer.downsample_rate,
            "dim": featurizer.output_size,
            "num_hidden_states": len(embedder.upstream.hidden_sizes),
            "layer_selections": getattr(featurizer, "layer_selections", None),
            "layer_weights": None if weights is None else weights.tolist(),
            "test_effects": effects,
            "format": fmt,
            "utterances": len(rows),
        }
        (out_dir / "features.json").write_text(json.dumps(meta, indent=1))
    return rows


def _write(out_dir: Path, item: tuple[str, str], x: np.ndarray, fmt: str, all_layers: bool) -> dict:
    utt_id, wav_path = item
    target = out_dir / f"{utt_id}.{fmt}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(target, x)
    else:
        save_file({"hidden_states" if all_layers else "features": np.ascontiguousarray(x)}, str(target))
    return {"id": utt_id, "wav_path": wav_path, "file": str(target.relative_to(out_dir)), "num_frames": x.shape[-2]}
