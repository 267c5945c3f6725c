"""Embedding extraction shared by evaluate.py, train.py (dev EER) and the Python API (asv.embed/asv.verify).

Each whole utterance is embedded once, in length-sorted batches under a padded-samples budget; the upstream gives
each utterance its batch-1 hidden states (asv.forward.embedding_features) and masks run through the featurizer and
pooling, so an embedding equals its batch-1 one, as s3prl evaluates. Batches are dealt to processes with Accelerate
and gathered. Per checkpoint, embeddings are cached in
`embeddings.npz`:

  ids          (N,) str     utterance ids as the trial lists name them
  paths        (N,) str     wav paths: the cache key, so the same audio under two ids is embedded once
  embeddings   (N, E) f32   raw (not L2-normalised) downstream outputs
  fingerprint  ()   str     sha256 of the checkpoint's config.yaml + embedder.safetensors (+ the test
                            effects and the frozen upstream file's size/mtime); a mismatch discards the cache
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from asv.adapters import add_adapters, merge_adapters, tuned_state_dict
from asv.audio import load_audio
from asv.config import load_train_config
from asv.datasets import RERUN_PREPARE, EvalDataset, collate_eval, length_buckets
from asv.errors import BadAudioError, one_line
from asv.forward import embedding_features, ieee_fp32
from asv.manifest import unique_utterances
from asv.metrics import compute_eer
from asv.models import XVECTOR_LENGTH_REDUCTION, build_speaker_model
from asv.progress import progress
from asv.rundir import check_weights_match
from asv.scoring import trial_scores
from asv.upstream import build_upstream

# On a CPU the test audio is read in the embedding process itself unless --num_workers asks for workers: reading a
# file costs ~1 ms raw, ~7 ms with the test effects, against ~0.8 s of a Base model's forward per utterance, and a
# forked worker makes the embedding process copy each heap page it writes again. GPUs keep 2 workers.
EVAL_WORKERS = {"cpu": 0}
DEFAULT_EVAL_WORKERS = 2

CACHE_VERSION = 2  # 2: batch-exact upstream (asv/batch_exact.py); older caches hold padded-batch embeddings


class ModelEmbedder:
    """Whole utterances -> embeddings through an upstream and a SpeakerModel (e.g. the one training)."""

    def __init__(self, upstream, model, upstream_precision: str = "fp32"):
        self.upstream, self.model, self.upstream_precision = upstream, model, upstream_precision

    @property
    def min_samples(self) -> int:
        """Shortest input giving the x-vector its XVECTOR_LENGTH_REDUCTION + 1 upstream frames; shorter test
        audio is wrap-padded to it (EvalDataset), so it still gets a finite embedding."""
        upstream = getattr(self.upstream, "module", self.upstream)  # a fine-tuned upstream may be DDP-wrapped
        return XVECTOR_LENGTH_REDUCTION * max(upstream.downsample_rates) + 1

    @property
    def embed_dim(self) -> int:
        return self.model.downstream.output_size

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor, wav_len: torch.Tensor) -> torch.Tensor:
        return self.embed_hidden(*self.hidden_states(wav, wav_len))

    def hidden_states(self, wav: torch.Tensor, wav_len: torch.Tensor):
        return embedding_features(self.upstream, wav, wav_len, self.upstream_precision)

    def embed_hidden(self, hidden: list[torch.Tensor], hidden_len: list[torch.Tensor]) -> torch.Tensor:
        """Featurizer + downstream, in IEEE fp32 as in training (asv.forward.ieee_fp32)."""
        with ieee_fp32():
            return self.model.embed(hidden, hidden_len)


class SharedUpstreamEmbedder:
    """Several checkpoints of one frozen upstream, embedded in one pass.

    Their upstream computes the same hidden states for an utterance whatever the checkpoint (same weights, same
    audio), so it runs once per utterance and each checkpoint's featurizer and downstream run on that output.
    s3prl's stage 3 runs the upstream again for every checkpoint, and SUPERB's protocol scores all 20. The
    embeddings come side by side, (B, sum of embed_dim), in the order of `embedders`.
    """

    def __init__(self, embedders: list[ModelEmbedder]):
        self.embedders = embedders
        self.model = embedders[0].model  # embed_all reads the device from it

    @property
    def min_samples(self) -> int:
        return self.embedders[0].min_samples

    @property
    def embed_dim(self) -> int:
        return sum(e.embed_dim for e in self.embedders)

    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor, wav_len: torch.Tensor) -> torch.Tensor:
        hidden, hidden_len = self.embedders[0].hidden_states(wav, wav_len)
        return torch.cat([e.embed_hidden(hidden, hidden_len) for e in self.embedders], dim=1)


class Embedder(ModelEmbedder):
    """Upstream + trained featurizer/downstream of one checkpoint, in eval mode."""

    def __init__(self, ckpt: Path, device="cpu", upstream_cache: dict | None = None, cfg=None):
        self.ckpt = Path(ckpt)
        # `cfg` overrides the directory's config.yaml: a model directory (asv/modeldir.py) resolves the upstream
        # checkpoint's path on this machine.
        self.cfg = cfg or load_train_config(self.ckpt / "config.yaml")
        upstream_cache = {} if upstream_cache is None else upstream_cache
        m = self.cfg.model
        key = (m.upstream, m.upstream_ckpt, m.upstream_normalize)
        if m.tunes_upstream:  # its own weights: built afresh, never shared (one upstream in memory at a time)
            upstream_cache.clear()
            self.upstream = build_upstream(*key).to(device)
        else:  # frozen upstreams are shared across checkpoints
            if key not in upstream_cache:
                upstream_cache.clear()
                upstream_cache[key] = build_upstream(*key).to(device)
            self.upstream = upstream_cache[key]
        tuner = add_adapters(self.upstream, m) if m.upstream_adapter != "none" else None
        self.model = build_speaker_model(m, self.cfg.loss, self.upstream, num_classes=1)
        expected = self.model.embedder_state_dict()
        if m.tunes_upstream:  # fine-tuned upstream weights, or adapters, travel in the embedder file
            expected.update({f"upstream.{k}": v for k, v in tuned_state_dict(self.upstream).items()})
        # Names and shapes first: a checkpoint of another upstream or head fails with one line.
        what = f"the model its config.yaml describes (upstream {m.upstream})"
        check_weights_match(self.ckpt / "embedder.safetensors", expected, what)
        state = load_file(self.ckpt / "embedder.safetensors")
        if m.tunes_upstream:
            # Adapters are the only upstream tensors an adapted upstream's checkpoint holds: its base is the upstream.
            tuned = {k[9:]: v for k, v in state.items() if k.startswith("upstream.")}
            self.upstream.load_state_dict(tuned, strict=tuner is None)
            state = {k: v for k, v in state.items() if not k.startswith("upstream.")}
        if tuner is not None:
            # Evaluation, model directories and ONNX graphs run the plain upstream the adapters merge into.
            self.upstream = merge_adapters(tuner)
        self.model.load_state_dict(state, strict=False)  # strict but for the head, which evaluation drops
        self.model.to(device).eval()
        self.test_effects = self.cfg.data.test_effects
        self.upstream_precision = self.cfg.run.upstream_precision

    def fingerprint(self, effects: bool) -> str:
        h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "effects": effects}).encode())
        for name in ("config.yaml", "embedder.safetensors"):
            with open(self.ckpt / name, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        up = self.cfg.model.upstream_ckpt
        if up and os.path.exists(up):  # a frozen upstream file replaced under the same name changes embeddings
            st = os.stat(up)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


def audio_lengths(paths: list[str]) -> dict[str, int]:
    """Samples per file from the headers (no decode): what the batcher sorts by."""
    lengths = {}
    for p in dict.fromkeys(paths):
        try:
            lengths[p] = sf.info(p).frames
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            load_audio(p)  # raises the BadAudioError prepare.py would report (missing, empty, not audio, ...)
            raise BadAudioError(p, "unreadable header", f"{one_line(err)}; {RERUN_PREPARE}") from None
    return lengths


def length_sorted_batches(lengths: list[int], max_frames: int) -> list[list[int]]:
    """Length-sorted batches of at most max_frames padded samples, in a fixed shuffled order: contiguous
    chunks of it (split_between_processes) then carry similar work. Raw lengths bound the VAD'd ones."""
    batches = length_buckets(lengths, max_frames)
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))]


def eval_workers(requested: int | None, device) -> int:
    """DataLoader workers for embedding on `device`: `requested`, or by default EVAL_WORKERS' choice."""
    if requested is not None:
        return requested
    return EVAL_WORKERS.get(getattr(device, "type", str(device)), DEFAULT_EVAL_WORKERS)


def embed_all(
    embedder: Embedder,
    dataset: EvalDataset,
    batches: list[list[int]],
    *,
    accelerator: Accelerator | None = None,
    num_workers: int | None = 0,
    desc: str = "embedding",
) -> np.ndarray:
    """(N, E) embeddings in dataset order, each whole utterance once, batch by batch; `num_workers` None is
    eval_workers' default for the device.

    With an accelerator, batches are dealt to processes with split_between_processes (no padding, so
    no duplicates) and the results gathered as objects on every rank.
    """
    device = accelerator.device if accelerator else next(embedder.model.parameters()).device
    num_workers = eval_workers(num_workers, device)
    out = np.zeros((len(dataset), embedder.embed_dim), dtype=np.float32)

    def run(my_batches) -> list:
        loader = DataLoader(dataset, batch_sampler=my_batches, collate_fn=collate_eval, num_workers=num_workers)
        # Each process shows its own share; the main process's bar stands for all of them.
        shown = progress(
            loader, sum(map(len, my_batches)), desc, "utt", size=lambda b: len(b[0]), enabled=_is_main(accelerator)
        )
        return [
            (idx.numpy(), embedder(wav.to(device), wav_len.to(device)).float().cpu().numpy())
            for idx, wav, wav_len in shown
        ]

    if accelerator is None or accelerator.num_processes == 1:
        parts = run(batches)
    else:
        with accelerator.split_between_processes(batches) as my_batches:
            mine = run(my_batches)
        parts = gather_object(mine)
    for idx, emb in parts:
        out[idx] = emb
    return out


def _is_main(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_main_process


def load_cache(path: Path, fingerprint: str) -> dict[str, tuple[str, np.ndarray]]:
    """{wav_path: (id, embedding)} from a cache file written for this exact checkpoint, else empty."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return {}
            return {p: (i, e) for i, p, e in zip(z["ids"], z["paths"], z["embeddings"], strict=True)}
    except (OSError, ValueError, KeyError):  # a torn or foreign file is only a cache: rebuild it
        return {}


def save_cache(path: Path, fingerprint: str, entries: dict[str, tuple[str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = sorted(entries)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        ids=np.array([entries[p][0] for p in paths], dtype=str),
        paths=np.array(paths, dtype=str),
        embeddings=np.stack([entries[p][1] for p in paths]).astype(np.float32),
        fingerprint=np.array(fingerprint),
    )
    tmp.replace(path)


def embed_cached(
    embedder: Embedder,
    items: list[tuple[str, str]],
    lengths: dict[str, int],
    *,
    cache_file: Path | None,
    effects: bool,
    **options,
) -> dict[str, np.ndarray]:
    """{wav_path: embedding} for every (id, wav_path) in items, embedding only what the cache lacks; `options` are
    embed_checkpoints' (accelerator, max_frames, num_workers, desc)."""
    return embed_checkpoints([embedder], items, lengths, cache_files=[cache_file], effects=effects, **options)[0]


def embed_checkpoints(
    embedders: list[Embedder],
    items: list[tuple[str, str]],
    lengths: dict[str, int],
    *,
    cache_files: list[Path | None],
    effects: bool,
    accelerator: Accelerator | None = None,
    max_frames: int = 400_000,
    num_workers: int | None = 0,
    desc: str = "embedding",
) -> list[dict[str, np.ndarray]]:
    """embed_cached for several checkpoints of one frozen upstream (the same upstream object and precision): what
    any of their caches lacks is embedded in one pass (SharedUpstreamEmbedder), the upstream once. `lengths`: samples
    per wav path (audio_lengths), which the batches are sorted by; `num_workers` None is eval_workers' default."""
    if len({(id(e.upstream), e.upstream_precision) for e in embedders}) != 1:
        raise ValueError("embed_checkpoints needs checkpoints that share one upstream and its precision")
    entries = [load_cache(f, e.fingerprint(effects)) if f else {} for e, f in zip(embedders, cache_files, strict=True)]
    todo = list({p: (i, p) for i, p in items if any(p not in cached for cached in entries)}.values())
    if todo:
        embedder = embedders[0] if len(embedders) == 1 else SharedUpstreamEmbedder(embedders)
        batches = length_sorted_batches([lengths[p] for _, p in todo], max_frames)
        dataset = EvalDataset(todo, effects=effects, min_samples=embedder.min_samples)
        emb = embed_all(embedder, dataset, batches, accelerator=accelerator, num_workers=num_workers, desc=desc)
        start = 0
        for e, cached, cache_file in zip(embedders, entries, cache_files, strict=True):
            part = emb[:, start : start + e.embed_dim]
            start += e.embed_dim
            cached.update({p: (i, v) for (i, p), v in zip(todo, part, strict=True)})
            if cache_file and _is_main(accelerator):
                save_cache(cache_file, e.fingerprint(effects), cached)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return [{p: v for p, (_, v) in cached.items()} for cached in entries]


def export_embeddings(path: Path, items: list[tuple[str, str]], vectors: dict[str, np.ndarray]) -> None:
    """Write ids, paths and embeddings (the cache format, without a fingerprint) for use outside the recipe."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        ids=np.array([i for i, _ in items], dtype=str),
        paths=np.array([p for _, p in items], dtype=str),
        embeddings=np.stack([vectors[p] for _, p in items]).astype(np.float32),
    )


def trial_list_scores(
    embedder, trials, lengths: dict[str, int], *, cache_file: Path | None, effects: bool, accelerator=None
) -> np.ndarray:
    """Cosine scores of `embedder` on a trial list, each utterance embedded once (through `cache_file`)."""
    vectors = embed_cached(
        embedder, unique_utterances(trials), lengths, cache_file=cache_file, effects=effects, accelerator=accelerator
    )
    return trial_scores(vectors, trials)


def trial_list_eer(
    embedder, trials, lengths: dict[str, int], *, cache_file: Path | None, effects: bool, accelerator=None
) -> tuple[float, float]:
    """(EER as a fraction, its threshold) of `embedder` on a trial list: the dev-list figure train.py logs at
    each checkpoint."""
    scores = trial_list_scores(
        embedder, trials, lengths, cache_file=cache_file, effects=effects, accelerator=accelerator
    )
    return compute_eer(scores, [t.label for t in trials])
