"""Stages 3-4 of SUPERB ASV: embed every test utterance once, score trials by cosine, report EER and minDCF.

    python evaluate.py --ckpt_dir exp/<run>/step-100000            # one checkpoint
    python evaluate.py --exp_dir exp/<run>                          # every checkpoint of a run
    python evaluate.py --exp_dir exp/<run> --test_ckpt_steps 100000 200000 --trial_names veri_test2

The model is rebuilt from the checkpoint's own config.yaml. Writes, per trial list and checkpoint,
<exp_dir>/evaluate/<list>/step-<N>/{results.json,scores.txt}, and <exp_dir>/evaluate/<list>/best_result.json
(the lowest EER over the evaluated checkpoints: SUPERB's protocol, which selects on the test set).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from asv.audio import BadAudioError
from asv.checkpoint import CheckpointError, check_weights_match, read_train_state, verify_checkpoint
from asv.config import load_train_config, parse
from asv.data import (
    EvalDataset,
    ManifestError,
    collate_eval,
    length_buckets,
    read_trials_csv,
    trial_sets,
    unique_utterances,
)
from asv.metrics import compute_eer, compute_min_dcf
from asv.models import XVECTOR_LENGTH_REDUCTION, build_speaker_model
from asv.upstream import UpstreamError, build_upstream, upstream_forward

P_TARGETS = (0.01, 0.05)


@dataclass
class EvalConfig:
    """evaluate.py: score checkpoints on prepared trial lists."""

    # One checkpoint directory (exp/<run>/step-<N>).
    ckpt_dir: str | None = None
    # A run directory: evaluate all its checkpoints (or --test_ckpt_steps).
    exp_dir: str | None = None
    # With --exp_dir, only these steps (default: every checkpoint).
    test_ckpt_steps: list[int] | None = None
    # Prepared data directory holding trials/*.csv (default: the one the checkpoint was trained on).
    data_dir: str | None = None
    # Trial lists to score, by name (file stem in data_dir/trials; default: all of them).
    trial_names: list[str] | None = None
    # Apply the training gain + VAD to test audio (default: as the checkpoint was trained, i.e. raw unless set).
    test_effects: bool | None = None
    # Batch budget in padded samples (items x longest): utterances are length-sorted into batches of at
    # most this much audio (400,000 = 25 s at 16 kHz; raise it on GPUs). Masks keep embeddings independent of batching.
    eval_max_frames: int = 400_000
    # DataLoader worker processes.
    num_workers: int = 2
    # Where results go (default: <exp_dir>/evaluate).
    out_dir: str | None = None
    # W&B: auto | online | offline | disabled; EER is logged at each checkpoint's step.
    wandb_mode: str = "auto"


def checkpoints_to_evaluate(cfg: EvalConfig) -> tuple[Path, list[tuple[int, Path]]]:
    from train import list_checkpoints

    if bool(cfg.ckpt_dir) == bool(cfg.exp_dir):
        raise SystemExit("error: pass exactly one of --ckpt_dir exp/<run>/step-<N> or --exp_dir exp/<run>")
    if cfg.ckpt_dir:
        ckpt = Path(cfg.ckpt_dir)
        if not (ckpt / "train_state.json").is_file():
            raise SystemExit(
                f"error: {ckpt} is not a checkpoint directory (no train_state.json); "
                "pass a step-<N> directory written by train.py"
            )
        try:
            verify_checkpoint(ckpt, for_resume=False)
        except CheckpointError as err:
            raise SystemExit(f"error: {err}") from None
        return ckpt.parent, [(read_train_state(ckpt)["step"], ckpt)]
    exp_dir = Path(cfg.exp_dir)
    ckpts = list_checkpoints(exp_dir)
    if not ckpts:
        raise SystemExit(f"error: {exp_dir} has no checkpoints (step-<N>/ with train_state.json); train first")
    if cfg.test_ckpt_steps:
        have = {s for s, _ in ckpts}
        missing = sorted(set(cfg.test_ckpt_steps) - have)
        if missing:
            raise SystemExit(f"error: {exp_dir} has no checkpoint for step(s) {missing}; it has {sorted(have)}")
        ckpts = [(s, d) for s, d in ckpts if s in set(cfg.test_ckpt_steps)]
    # A corrupt checkpoint among many is skipped with a warning, so the others still get scored.
    usable = []
    for step, ckpt in ckpts:
        try:
            verify_checkpoint(ckpt, for_resume=False)
            usable.append((step, ckpt))
        except CheckpointError as err:
            print(f"warning: skipping checkpoint {ckpt.name}: {err}", file=sys.stderr)
    if not usable:
        raise SystemExit(f"error: none of the {len(ckpts)} checkpoints in {exp_dir} is usable (warnings above)")
    return exp_dir, usable


class Embedder:
    """Upstream + trained featurizer/downstream of one checkpoint, in eval mode."""

    def __init__(self, ckpt: Path, device, upstream_cache: dict):
        self.cfg = load_config_or_die(ckpt)
        m = self.cfg.model
        key = (m.upstream, m.upstream_ckpt, m.upstream_normalize)
        if key not in upstream_cache or m.upstream_trainable:  # frozen upstreams are shared across checkpoints
            upstream_cache.clear()
            try:
                upstream_cache[key] = build_upstream(*key).to(device)
            except UpstreamError as err:
                raise SystemExit(f"error: {err}") from None
        self.upstream = upstream_cache[key]
        self.model = build_speaker_model(m, self.cfg.loss, self.upstream, num_classes=1)
        expected = self.model.embedder_state_dict()
        if m.upstream_trainable:  # fine-tuned upstream weights travel in the embedder file
            expected.update({f"upstream.{k}": v for k, v in self.upstream.state_dict().items()})
        try:  # names and shapes first: a checkpoint of another upstream or head fails with one line
            check_weights_match(
                ckpt / "embedder.safetensors", expected, f"the model its config.yaml describes (upstream {m.upstream})"
            )
        except CheckpointError as err:
            raise SystemExit(f"error: {err}") from None
        state = load_file(ckpt / "embedder.safetensors")
        if m.upstream_trainable:
            self.upstream.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("upstream.")})
            state = {k: v for k, v in state.items() if not k.startswith("upstream.")}
        self.model.load_state_dict(state, strict=False)  # strict but for the head, which evaluation drops
        self.model.to(device).eval()
        # The x-vector needs XVECTOR_LENGTH_REDUCTION + 1 upstream frames; shorter test audio is
        # wrap-padded up to this many samples (EvalDataset).
        stride = max(self.upstream.downsample_rates)
        self.min_samples = XVECTOR_LENGTH_REDUCTION * stride + 1

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor, wav_len: torch.Tensor) -> torch.Tensor:
        hidden, hidden_len = upstream_forward(self.upstream, wav, wav_len)
        return self.model.embed(hidden, hidden_len)


def load_config_or_die(ckpt: Path):
    try:
        return load_train_config(ckpt / "config.yaml")
    except (OSError, TypeError, ValueError, AttributeError) as err:
        raise SystemExit(f"error: {ckpt / 'config.yaml'} is not a train.py config ({err})") from None


def length_sorted_batches(items: list[tuple[str, str]], max_frames: int) -> list[list[int]]:
    """Length-sorted batches of at most max_frames padded samples, in a fixed shuffled order: contiguous
    chunks of it (split_between_processes) then carry similar work. Raw lengths bound the VAD'd ones."""
    lengths = []
    for _, path in items:
        try:
            lengths.append(sf.info(path).frames)
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            raise SystemExit(
                f"error: trial file {path} is unreadable ({err}); re-run prepare.py, which drops trials of bad files"
            ) from None
    batches = length_buckets(lengths, max_frames)
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))]


def embed_all(
    embedder: Embedder, dataset: EvalDataset, batches: list[list[int]], accelerator: Accelerator, num_workers: int
) -> np.ndarray:
    """(N, E) embeddings in dataset order, each whole utterance once, batch by batch.

    Batches are dealt to processes with Accelerate's split_between_processes (no padding, so no
    duplicates) and the results gathered as objects on every rank.
    """
    out = np.zeros((len(dataset), embedder.model.downstream.output_size), dtype=np.float32)
    mine = []
    with accelerator.split_between_processes(batches) as my_batches:
        loader = DataLoader(dataset, batch_sampler=my_batches, collate_fn=collate_eval, num_workers=num_workers)
        for idx, wav, wav_len in loader:
            emb = embedder(wav.to(accelerator.device), wav_len.to(accelerator.device))
            mine.append((idx.numpy(), emb.float().cpu().numpy()))
    for idx, emb in gather_object(mine):
        out[idx] = emb
    return out


def cosine_scores(emb: np.ndarray, index: dict[str, int], trials) -> np.ndarray:
    a = emb[[index[t.id1] for t in trials]]
    b = emb[[index[t.id2] for t in trials]]
    num = (a * b).sum(1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    return num / den


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    eer, eer_thr = compute_eer(scores, labels)
    out = {"eer": 100.0 * eer, "eer_threshold": eer_thr}
    for p in P_TARGETS:
        dcf, thr = compute_min_dcf(scores, labels, p_target=p)
        out[f"min_dcf@{p}"], out[f"min_dcf@{p}_threshold"] = dcf, thr
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(EvalConfig, argv)
    exp_dir, ckpts = checkpoints_to_evaluate(cfg)
    first_cfg = load_config_or_die(ckpts[0][1])
    data_dir = Path(cfg.data_dir or first_cfg.data.data_dir)
    lists = trial_sets(data_dir)
    if not lists:
        raise SystemExit(f"error: {data_dir}/trials has no trial lists; run prepare.py or pass --data_dir")
    names = cfg.trial_names or list(lists)
    unknown = [n for n in names if n not in lists]
    if unknown:
        raise SystemExit(f"error: no trial list {unknown[0]} in {data_dir}/trials (have: {', '.join(lists)})")
    try:
        trials = {n: read_trials_csv(lists[n]) for n in names}
    except ManifestError as err:
        raise SystemExit(f"error: {err}") from None
    utts = unique_utterances([t for n in names for t in trials[n]])
    index = {u: i for i, (u, _) in enumerate(utts)}
    out_root = Path(cfg.out_dir or exp_dir / "evaluate")

    from train import wandb_mode

    mode = wandb_mode(cfg.wandb_mode)
    accelerator = Accelerator(log_with=None if mode == "disabled" else "wandb", mixed_precision="no")
    accelerator.init_trackers(
        "superb-asv",
        config={"exp_dir": str(exp_dir), "trials": names},
        init_kwargs={"wandb": {"mode": mode, "dir": str(exp_dir), "name": f"{exp_dir.name}-eval", "job_type": "eval"}},
    )
    accelerator.print(
        f"evaluating {len(ckpts)} checkpoint(s) of {exp_dir} on {', '.join(names)}: "
        f"{sum(len(t) for t in trials.values())} trials, {len(utts)} unique utterances"
    )
    batches = length_sorted_batches(utts, cfg.eval_max_frames)  # the same for every checkpoint
    upstream_cache: dict = {}
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    for step, ckpt in ckpts:
        embedder = Embedder(ckpt, accelerator.device, upstream_cache)
        effects = embedder.cfg.data.test_effects if cfg.test_effects is None else cfg.test_effects
        dataset = EvalDataset(utts, effects=effects, min_samples=embedder.min_samples)
        try:
            emb = embed_all(embedder, dataset, batches, accelerator, cfg.num_workers)
        except BadAudioError as err:  # a file that went bad after prepare.py (from a worker: last line)
            msg = str(err).strip().splitlines()[-1].removeprefix("asv.audio.BadAudioError: ")
            raise SystemExit(f"error: {msg}; re-run prepare.py, which drops trials of bad files") from None
        if not accelerator.is_main_process:
            continue
        for n in names:
            scores = cosine_scores(emb, index, trials[n])
            labels = np.array([t.label for t in trials[n]])
            res = {
                "step": step,
                "ckpt_dir": str(ckpt),
                "trials": n,
                "num_trials": len(labels),
                "test_effects": effects,
                **metrics(scores, labels),
            }
            d = out_root / n / f"step-{step}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "results.json").write_text(json.dumps(res, indent=1))
            np.savetxt(d / "scores.txt", np.stack([scores, labels], 1), fmt=["%.6f", "%d"], header="score label")
            results[n][step] = res
            accelerator.log(
                {
                    f"eval/{n}/eer": res["eer"],
                    f"eval/{n}/min_dcf@0.01": res["min_dcf@0.01"],
                    f"eval/{n}/min_dcf@0.05": res["min_dcf@0.05"],
                },
                step=step,
            )
        accelerator.print(" | ".join(f"{n} step {step}: EER {results[n][step]['eer']:.2f}%" for n in names))

    if accelerator.is_main_process:
        for n in names:
            best = min(results[n].values(), key=lambda r: r["eer"])
            (out_root / n).mkdir(parents=True, exist_ok=True)
            (out_root / n / "best_result.json").write_text(json.dumps(best, indent=1))
        print_table(results)
    accelerator.end_training()
    return results


def print_table(results: dict[str, dict[int, dict]]) -> None:
    print(f"\n{'trials':<20} {'step':>8} {'EER %':>8} {'minDCF@0.01':>12} {'minDCF@0.05':>12}")
    for n, by_step in results.items():
        best = min(by_step.values(), key=lambda r: r["eer"])["step"]
        for step, r in sorted(by_step.items()):
            mark = "  <- best (selected on test, SUPERB protocol)" if step == best and len(by_step) > 1 else ""
            print(f"{n:<20} {step:>8} {r['eer']:>8.2f} {r['min_dcf@0.01']:>12.4f} {r['min_dcf@0.05']:>12.4f}{mark}")


if __name__ == "__main__":
    main(sys.argv[1:])
