"""Python API: load a trained model and embed, score and verify audio files.

    import asv
    model = asv.load_model("models/demo")          # a model directory (evaluate.py --export_model), a checkpoint
                                                   # exp/<run>/step-<N>, or a Hugging Face Hub id "you/model"
    emb = model.embed(["a.wav", "b.wav"])          # (2, E) numpy array, raw downstream outputs
    model.score("a.wav", "b.wav")                  # cosine
    model.verify(["a1.wav", "a2.wav"], "b.wav")    # several enrollment files: mean of unit vectors, renormalised
    # {'score': 0.71, 'llr': 2.3, 'p_same': 0.91, 'prior': 0.5, 'threshold': 0.42, 'same_speaker': True,
    #  'threshold_source': 'dev EER threshold ...', 'calibration': "calibrated on 'dev' (1680 trials)"}

    asv.embed(["a.wav"], "exp/run/step-500"); asv.verify("a.wav", "b.wav", "exp/run/step-500")  # one-call forms

`llr` is the calibrated log-likelihood ratio (asv/calibration.py) and `p_same` the posterior probability of the
same speaker at the stated prior; both are None when the model has no calibration. The decision is the cosine
against the EER threshold of the held-out list (a model directory records it; for a checkpoint it is read
from evaluate.py's dev results, else computed once from trials/dev.csv, whose embeddings are then cached
in <exp>/evaluate/step-<N>/embeddings.npz, and the calibration with it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from asv.calibration import Calibration, fit_calibration, posterior
from asv.errors import BadAudioError, CheckpointError, ConfigError
from asv.extract import Embedder, audio_lengths, embed_cached, trial_list_scores
from asv.hub import download, looks_like_repo_id
from asv.manifest import DEV_LIST, read_trials_csv, unique_utterances
from asv.metrics import compute_eer
from asv.modeldir import MODEL_JSON, read_model_dir
from asv.rundir import EvalLayout, read_train_state, verify_checkpoint
from asv.scoring import enrollment_model

Files = str | Path | Sequence[str | Path]


def _paths(wavs: Files) -> list[str]:
    paths = [str(wavs)] if isinstance(wavs, (str, Path)) else [str(p) for p in wavs]
    if not paths:
        raise ConfigError("no audio files given")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f"{len(missing)} of {len(paths)} files not found" if len(missing) > 1 else ""
        raise BadAudioError(missing[0], "missing", more)
    return paths


class Verifier:
    """A trained embedder with its decision threshold and calibration: what `load_model` returns."""

    def __init__(self, embedder: Embedder, source: str, test_effects: bool | None = None, model_dir=None):
        self.embedder, self.source, self.model_dir = embedder, source, model_dir
        self.test_effects = embedder.test_effects if test_effects is None else test_effects
        self._reference = None  # (threshold, threshold_source, calibration, why_no_calibration), on first need

    def embed_paths(self, paths: list[str], accelerator=None, max_frames=400_000, num_workers=0) -> dict:
        """{path: embedding} of unique files, in length-sorted batches, sharded over `accelerator`'s processes."""
        return embed_cached(
            self.embedder,
            [(p, p) for p in dict.fromkeys(paths)],
            audio_lengths(paths),
            cache_file=None,
            effects=self.test_effects,
            accelerator=accelerator,
            max_frames=max_frames,
            num_workers=num_workers,
        )

    def embed(self, wavs: Files, max_frames: int = 400_000) -> np.ndarray:
        """(N, E) embeddings of whole files, in order (raw: L2-normalise before comparing)."""
        paths = _paths(wavs)
        vectors = self.embed_paths(paths, max_frames=max_frames)
        return np.stack([vectors[p] for p in paths])

    def enroll(self, wavs: Files) -> np.ndarray:
        """The unit-length speaker model of one or several files (asv.scoring.enrollment_model)."""
        return enrollment_model(self.embed(wavs))

    def score(self, enroll: Files, test: Files) -> float:
        """Cosine between the two sides; a side given as several files is their enrollment model."""
        paths_a, paths_b = _paths(enroll), _paths(test)
        vectors = self.embed_paths(paths_a + paths_b)
        a = enrollment_model(np.stack([vectors[p] for p in paths_a]))
        b = enrollment_model(np.stack([vectors[p] for p in paths_b]))
        return float(a @ b)

    @property
    def calibration(self) -> Calibration | None:
        return self.reference()[2]

    def llr(self, scores) -> np.ndarray | None:
        cal = self.calibration
        return None if cal is None else cal.llr(scores)

    def verify(self, enroll: Files, test: Files, prior: float = 0.5, threshold: float | None = None) -> dict:
        """Score, calibrated LLR, P(same speaker) at `prior`, and the decision at `threshold` (default: the
        model's EER threshold on its held-out list)."""
        score = self.score(enroll, test)
        ref_threshold, source, cal, why = self.reference()
        if threshold is None:
            threshold = ref_threshold
        else:
            source = "given"
        llr = None if cal is None else float(cal.llr(score))
        return {
            "score": score,
            "llr": llr,
            "p_same": None if llr is None else float(posterior(llr, prior)),
            "prior": prior,
            "threshold": threshold,
            "same_speaker": None if threshold is None else score >= threshold,
            "threshold_source": source,
            "calibration": cal.describe() if cal else why,
            "enroll_files": len(_paths(enroll)),
        }

    def reference(self) -> tuple[float | None, str, Calibration | None, str]:
        if self._reference is None:
            if self.model_dir is not None:
                threshold, source = self.model_dir.threshold
                cal = self.model_dir.calibration
                if self.test_effects != self.embedder.test_effects:
                    source += f" (fitted with test_effects={self.embedder.test_effects})"
                self._reference = (threshold, source, cal, "" if cal else "no calibration in the model directory")
            else:
                self._reference = checkpoint_reference(self.embedder, self.test_effects)
        return self._reference


def checkpoint_reference(embedder: Embedder, effects: bool) -> tuple[float | None, str, Calibration | None, str]:
    """(dev EER threshold, where it came from, calibration, why there is none) of a checkpoint directory."""
    ckpt = embedder.ckpt
    step = read_train_state(ckpt)["step"]
    layout = EvalLayout.of_run(ckpt.parent)  # evaluate.py's default --out_dir
    saved, cal_file = layout.results(DEV_LIST, step), layout.calibration(step)
    if saved.is_file() and effects == embedder.test_effects:
        threshold = json.loads(saved.read_text())["eer_threshold"]
        cal = Calibration.load(cal_file) if cal_file.is_file() else None
        why = "" if cal else f"no calibration: no {cal_file} (evaluate.py writes it when a calibration list is scored)"
        return threshold, f"dev EER threshold, from {saved}", cal, why
    dev = Path(embedder.cfg.data.data_dir) / "trials" / f"{DEV_LIST}.csv"
    if not dev.is_file():
        why = f"{dev} does not exist (prepare.py --dev_speakers N builds it)"
        return None, f"no threshold: {why}", None, f"no calibration: {why}"
    trials = read_trials_csv(dev)
    lengths = audio_lengths([p for _, p in unique_utterances(trials)])
    scores = trial_list_scores(embedder, trials, lengths, cache_file=layout.embeddings(step), effects=effects)
    labels = [t.label for t in trials]
    eer, threshold = compute_eer(scores, labels)
    try:
        cal, why = fit_calibration(scores, labels, {"trials": DEV_LIST, "step": step, "ckpt_dir": str(ckpt)}), ""
    except ConfigError as err:
        cal, why = None, f"no calibration: {err}"
    return threshold, f"dev EER threshold ({100 * eer:.2f}% EER on {len(trials)} dev trials)", cal, why


def load_model(
    source: str | Path,
    device: str | None = None,
    upstream_ckpt: str | None = None,
    test_effects: bool | None = None,
    revision: str | None = None,
) -> Verifier:
    """A Verifier from a model directory, a checkpoint directory (exp/<run>/step-<N>) or a Hugging Face Hub id.

    Needs neither the training data nor the run directory for a model directory. `upstream_ckpt` points at
    a local upstream checkpoint (*_local upstreams) that is not where the model recorded it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(source)
    if not path.exists() and looks_like_repo_id(str(source)):
        path = download(str(source), revision)
    if (path / MODEL_JSON).is_file() or (path.is_dir() and not (path / "train_state.json").is_file()):
        model_dir = read_model_dir(path, upstream_ckpt)
        embedder = Embedder(path, device, cfg=model_dir.cfg)
        return Verifier(embedder, str(source), test_effects, model_dir)
    if not path.exists():
        raise CheckpointError(
            f"{source} is neither a model directory, a checkpoint directory nor a Hugging Face Hub id (owner/name)"
        )
    verify_checkpoint(path, for_resume=False)  # CheckpointError, naming the file, if it is not usable
    if upstream_ckpt:
        raise ConfigError("upstream_ckpt applies to model directories; a checkpoint uses its config.yaml's")
    return Verifier(Embedder(path, device), str(source), test_effects)


@lru_cache(maxsize=4)
def _cached(source: str, device: str | None, test_effects: bool | None) -> Verifier:
    return load_model(source, device, test_effects=test_effects)


def embed(
    wavs: Files,
    source: str | Path,
    test_effects: bool | None = None,
    max_frames: int = 400_000,
    device: str | None = None,
) -> np.ndarray:
    """Embeddings (N, E) of whole files, in order; test_effects defaults to the model's setting."""
    return _cached(str(source), device, test_effects).embed(wavs, max_frames)


def verify(
    enroll: Files,
    test: Files,
    source: str | Path,
    threshold: float | None = None,
    test_effects: bool | None = None,
    prior: float = 0.5,
) -> dict:
    """load_model(source).verify(enroll, test): score, llr, p_same and the decision."""
    return _cached(str(source), None, test_effects).verify(enroll, test, prior, threshold)


def dev_threshold(ckpt_dir: str | Path, test_effects: bool | None = None) -> tuple[float | None, str]:
    """(EER threshold on the dev list, where it came from), or (None, why not)."""
    return _cached(str(ckpt_dir), None, test_effects).reference()[:2]
