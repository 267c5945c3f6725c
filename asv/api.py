"""Python API: embed audio files and verify pairs with a trained checkpoint.

    import asv
    emb = asv.embed(["a.wav", "b.wav"], "exp/run/step-100000")        # (2, E) numpy array
    asv.verify("a.wav", "b.wav", "exp/run/step-100000")
    # {'score': 0.71, 'threshold': 0.42, 'same_speaker': True, 'threshold_source': 'dev EER threshold, ...'}

The decision threshold is the checkpoint's EER threshold on the held-out dev list (prepare.py
--dev_speakers): read from evaluate.py's results when present, else computed once (the dev embeddings
are then cached in <exp>/evaluate/step-<N>/embeddings.npz).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from asv.errors import BadAudioError
from asv.extract import Embedder, audio_lengths, embed_cached, trial_list_eer
from asv.manifest import DEV_LIST, read_trials_csv
from asv.rundir import EvalLayout, read_train_state, verify_checkpoint
from asv.scoring import cosine_scores


@lru_cache(maxsize=4)
def load_embedder(ckpt_dir: str, device: str | None = None) -> Embedder:
    verify_checkpoint(Path(ckpt_dir), for_resume=False)  # CheckpointError, naming the file, if it is not usable
    return Embedder(Path(ckpt_dir), device or ("cuda" if torch.cuda.is_available() else "cpu"))


def embed(
    wavs: str | list[str],
    ckpt_dir: str | Path,
    test_effects: bool | None = None,
    max_frames: int = 400_000,
    device: str | None = None,
) -> np.ndarray:
    """Embeddings (N, E) of whole wav files, in order; test_effects defaults to the checkpoint's setting."""
    paths = [wavs] if isinstance(wavs, (str, Path)) else list(wavs)
    paths = [str(p) for p in paths]
    for p in paths:
        if not Path(p).is_file():
            raise BadAudioError(p, "missing")
    embedder = load_embedder(str(ckpt_dir), device)
    effects = embedder.test_effects if test_effects is None else test_effects
    vectors = embed_cached(
        embedder, [(p, p) for p in paths], audio_lengths(paths), None, effects, max_frames=max_frames
    )
    return np.stack([vectors[p] for p in paths])


def dev_threshold(ckpt_dir: str | Path, test_effects: bool | None = None) -> tuple[float | None, str]:
    """(EER threshold on the dev list, where it came from), or (None, why not)."""
    ckpt = Path(ckpt_dir)
    step = read_train_state(ckpt)["step"]
    layout = EvalLayout.of_run(ckpt.parent)  # evaluate.py's default --out_dir
    saved = layout.results(DEV_LIST, step)
    if saved.is_file() and test_effects is None:
        return json.loads(saved.read_text())["eer_threshold"], f"dev EER threshold, from {saved}"
    embedder = load_embedder(str(ckpt))
    dev = Path(embedder.cfg.data.data_dir) / "trials" / f"{DEV_LIST}.csv"
    if not dev.is_file():
        return None, f"no threshold: {dev} does not exist (prepare.py --dev_speakers N builds it)"
    trials = read_trials_csv(dev)
    effects = embedder.test_effects if test_effects is None else test_effects
    lengths = audio_lengths([p for t in trials for p in (t.wav_path1, t.wav_path2)])
    eer, threshold = trial_list_eer(embedder, trials, lengths, layout.embeddings(step), effects)
    return threshold, f"dev EER threshold ({100 * eer:.2f}% EER on {len(trials)} dev trials)"


def verify(
    wav_a: str | Path, wav_b: str | Path, ckpt_dir: str | Path, threshold: float | None = None, test_effects=None
) -> dict:
    """Cosine score of two files and the decision at `threshold` (default: the checkpoint's dev-EER threshold)."""
    emb = embed([str(wav_a), str(wav_b)], ckpt_dir, test_effects=test_effects)
    score = float(cosine_scores(emb[:1], emb[1:])[0])
    source = "given"
    if threshold is None:
        threshold, source = dev_threshold(ckpt_dir, test_effects)
    return {
        "score": score,
        "threshold": threshold,
        "same_speaker": None if threshold is None else score >= threshold,
        "threshold_source": source,
    }
