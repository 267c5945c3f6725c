"""Stages 3-4 of SUPERB ASV: embed every test utterance once, score trials by cosine, report EER and minDCF.

    python evaluate.py --ckpt_dir exp/<run>/step-100000            # one checkpoint
    python evaluate.py --exp_dir exp/<run>                          # every checkpoint of a run
    python evaluate.py --exp_dir exp/<run> --test_ckpt_steps 100000 200000 --trial_names veri_test2
    python evaluate.py --ckpt_dir D --trials my_list.txt --wav_root /data/wavs   # any VoxCeleb-format list
    python evaluate.py --ckpt_dir D --pair a.wav b.wav              # one trial: score and decision
    accelerate launch evaluate.py --exp_dir exp/<run>               # shard the embedding over processes

The model is rebuilt from the checkpoint's own config.yaml. Writes under --out_dir (default <exp_dir>/evaluate):
  step-<N>/embeddings.npz            embedding cache (asv/extract.py): other lists / normalisations reuse it
  step-<N>/layer_weights.png         featurizer weight per upstream hidden state (multi-layer upstreams)
  <list>/step-<N>/results.json       EER (percent) + threshold, minDCF@0.01/@0.05 + thresholds (+ "as_norm")
  <list>/step-<N>/scores.txt         one line per trial: score label [score_asnorm]
  <list>/step-<N>/scores_hist.png    target / non-target score histogram
  <list>/det.png                     DET curves of the evaluated checkpoints
  <list>/selected_result.json        the checkpoint chosen on the held-out `dev` list (prepare.py --dev_speakers)
  <list>/best_result.json            the lowest EER on this list itself: SUPERB's protocol, selected on test
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from asv.audio import BadAudioError
from asv.checkpoint import CheckpointError, list_checkpoints, read_train_state, verify_checkpoint
from asv.config import parse
from asv.data import (
    DEV_LIST,
    ManifestError,
    Trial,
    read_train_csv,
    read_trials_csv,
    read_voxceleb_trials,
    trial_sets,
    unique_utterances,
)
from asv.extract import Embedder, audio_lengths, embed_cached, export_embeddings, load_config_or_die
from asv.metrics import metrics
from asv.scoring import as_norm, cohort_stats, speaker_means, trial_scores
from asv.tracking import wandb_mode


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
    # Prepared trial lists to score, by name (file stem in data_dir/trials; default: all of them).
    trial_names: list[str] | None = None
    # VoxCeleb-format trial lists ('<1|0> <wav1> <wav2>' per line) to score as well, without prepare.py.
    trials: list[str] | None = None
    # Root for relative paths in --trials files (tried as ROOT/p, ROOT/wav/p, ROOT/test/wav/p, ROOT/dev/wav/p);
    # default: the list's own directory, then the prepared corpus root.
    wav_root: str | None = None
    # Score one pair: two wav files; prints the cosine score and the decision at the dev-EER threshold.
    pair: list[str] | None = None
    # Apply the training gain + VAD to test audio (default: as the checkpoint was trained, i.e. raw unless set).
    test_effects: bool | None = None
    # Also report AS-norm scores: top-N cohort of training-speaker mean embeddings (off: SUPERB scores raw cosine).
    asnorm: bool = False
    # AS-norm: cohort scores kept per side (clipped to the number of training speakers).
    asnorm_top_n: int = 300
    # AS-norm: training utterances embedded per cohort speaker (whole utterances, first by id).
    asnorm_utts_per_speaker: int = 3
    # Batch budget in padded samples (items x longest): utterances are length-sorted into batches of at
    # most this much audio (400,000 = 25 s at 16 kHz; raise it on GPUs). Masks keep embeddings independent of batching.
    eval_max_frames: int = 400_000
    # DataLoader worker processes.
    num_workers: int = 2
    # Reuse and write step-<N>/embeddings.npz (false: always re-embed, write nothing).
    cache: bool = True
    # Also write the scored utterances' embeddings to DIR/step-<N>.npz (ids, paths, embeddings).
    export_embeddings: str | None = None
    # Write DET curves, score histograms and layer-weight plots (PNG, and to W&B).
    plots: bool = True
    # Where results go (default: <exp_dir>/evaluate).
    out_dir: str | None = None
    # W&B: auto | online | offline | disabled; EER is logged at each checkpoint's step.
    wandb_mode: str = "auto"


def checkpoints_to_evaluate(cfg: EvalConfig) -> tuple[Path, list[tuple[int, Path]]]:
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


def read_text_trials(path: Path, roots: list[Path]) -> list[Trial]:
    """A VoxCeleb-format list with each relative path resolved against the first root that has it."""
    cache: dict[str, str | None] = {}

    def resolve(p: str) -> str | None:
        if p not in cache:
            options = [Path(p)] if Path(p).is_absolute() else [r / sub / p for r in roots for sub in SUBDIRS]
            cache[p] = next((str(o) for o in options if o.is_file()), None)
        return cache[p]

    rows = [(label, a, b, resolve(a), resolve(b)) for label, a, b in read_voxceleb_trials(path)]
    missing = sorted({u for _, a, b, pa, pb in rows for u, p in ((a, pa), (b, pb)) if p is None})
    if missing:
        raise SystemExit(
            f"error: {path}: {len(missing)} utterances not found under {', '.join(map(str, roots))} "
            f"(first: {', '.join(missing[:3])}); pass --wav_root DIR"
        )
    return [Trial(a, b, pa, pb, label) for label, a, b, pa, pb in rows]


SUBDIRS = (".", "wav", "test/wav", "dev/wav")


def load_trial_lists(cfg: EvalConfig, data_dir: Path) -> dict[str, list[Trial]]:
    lists = trial_sets(data_dir) if data_dir.is_dir() else {}
    if cfg.trials and not cfg.trial_names:
        names = []  # only the given files, unless prepared lists are asked for too
    else:
        names = cfg.trial_names or list(lists)
        if not lists:
            raise SystemExit(
                f"error: {data_dir}/trials has no trial lists; run prepare.py, or pass --data_dir or --trials"
            )
    unknown = [n for n in names if n not in lists]
    if unknown:
        raise SystemExit(f"error: no trial list {unknown[0]} in {data_dir}/trials (have: {', '.join(lists)})")
    out = {n: read_trials_csv(lists[n]) for n in names}
    prepared = data_dir / "prepare.json"
    corpus_root = json.loads(prepared.read_text())["config"].get("dataset_root") if prepared.is_file() else None
    for f in cfg.trials or []:
        f = Path(f)
        if not f.is_file():
            raise SystemExit(f"error: --trials {f} does not exist")
        roots = [Path(cfg.wav_root)] if cfg.wav_root else [f.parent] + ([Path(corpus_root)] if corpus_root else [])
        if f.stem in out:
            raise SystemExit(
                f"error: --trials {f}: a trial list named {f.stem} is already being scored; rename the file"
            )
        out[f.stem] = read_text_trials(f, roots)
    return out


def cohort_items(data_dir: Path, per_speaker: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(id, wav_path) of the first `per_speaker` training utterances of every speaker, and their speakers."""
    by_spk: dict[str, list] = {}
    for u in read_train_csv(data_dir / "train.csv"):
        by_spk.setdefault(u.spk, []).append(u)
    chosen = [u for spk in sorted(by_spk) for u in sorted(by_spk[spk], key=lambda u: u.id)[:per_speaker]]
    return [(u.id, u.wav_path) for u in chosen], [u.spk for u in chosen]


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse(EvalConfig, argv)
    if cfg.pair is not None:
        return score_pair(cfg)
    exp_dir, ckpts = checkpoints_to_evaluate(cfg)
    first_cfg = load_config_or_die(ckpts[0][1])
    data_dir = Path(cfg.data_dir or first_cfg.data.data_dir)
    try:
        trials = load_trial_lists(cfg, data_dir)
    except ManifestError as err:  # a malformed line: the message names file and line
        raise SystemExit(f"error: {err}") from None
    names = list(trials)
    utts = unique_utterances([t for ts in trials.values() for t in ts])
    cohort, cohort_spk = cohort_items(data_dir, cfg.asnorm_utts_per_speaker) if cfg.asnorm else ([], [])
    out_root = Path(cfg.out_dir or exp_dir / "evaluate")

    mode = wandb_mode(cfg.wandb_mode)
    accelerator = Accelerator(log_with=None if mode == "disabled" else "wandb", mixed_precision="no")
    accelerator.init_trackers(
        "superb-asv",
        config={"exp_dir": str(exp_dir), "trials": names, "asnorm": cfg.asnorm},
        init_kwargs={"wandb": {"mode": mode, "dir": str(exp_dir), "name": f"{exp_dir.name}-eval", "job_type": "eval"}},
    )
    accelerator.print(
        f"evaluating {len(ckpts)} checkpoint(s) of {exp_dir} on {', '.join(names)}: "
        f"{sum(len(t) for t in trials.values())} trials, {len(utts)} unique utterances"
        + (
            f", AS-norm cohort of {len(set(cohort_spk))} speakers x {cfg.asnorm_utts_per_speaker} utterances"
            if cfg.asnorm
            else ""
        )
    )
    lengths = audio_lengths([p for _, p in utts + cohort])  # headers read once for every checkpoint
    upstream_cache: dict = {}
    results: dict[str, dict[int, dict]] = {n: {} for n in names}
    scored: dict[str, dict[int, tuple]] = {n: {} for n in names}  # for the DET plots
    for step, ckpt in ckpts:
        embedder = Embedder(ckpt, accelerator.device, upstream_cache)
        effects = embedder.test_effects if cfg.test_effects is None else cfg.test_effects
        try:
            vectors = embed_cached(
                embedder,
                utts + cohort,
                lengths,
                out_root / f"step-{step}" / "embeddings.npz" if cfg.cache else None,
                effects,
                accelerator,
                cfg.eval_max_frames,
                cfg.num_workers,
            )
        except BadAudioError as err:  # a file that went bad after prepare.py (from a worker: last line)
            msg = str(err).strip().splitlines()[-1].removeprefix("asv.audio.BadAudioError: ")
            raise SystemExit(f"error: {msg}; re-run prepare.py, which drops trials of bad files") from None
        if not accelerator.is_main_process:
            continue
        if cfg.export_embeddings:
            export_embeddings(Path(cfg.export_embeddings) / f"step-{step}.npz", utts, vectors)
        images = {}
        if cfg.plots and (w := embedder.model.layer_weights()) is not None:
            from asv.plots import layer_weights_plot

            images["featurizer/layer_weights"] = layer_weights_plot(
                w.cpu().numpy(), out_root / f"step-{step}" / "layer_weights.png", f"{exp_dir.name} step {step}"
            )
        if cfg.asnorm:
            models, _ = speaker_means(np.stack([vectors[p] for _, p in cohort]), cohort_spk)
            paths = [p for _, p in utts]
            mean, std = cohort_stats(np.stack([vectors[p] for p in paths]), models, cfg.asnorm_top_n)
            stats = {p: (m, s) for p, m, s in zip(paths, mean, std, strict=True)}
        for n in names:
            scores, labels = trial_scores(vectors, trials[n]), np.array([t.label for t in trials[n]])
            res = {
                "step": step,
                "ckpt_dir": str(ckpt),
                "trials": n,
                "num_trials": len(labels),
                "test_effects": effects,
                **metrics(scores, labels),
            }
            columns, fmt, header = [scores, labels], ["%.6f", "%d"], "score label"
            if cfg.asnorm:
                side = [
                    np.array([stats[getattr(t, f"wav_path{k}")][j] for t in trials[n]]) for k in (1, 2) for j in (0, 1)
                ]
                normed = as_norm(scores, (side[0], side[1]), (side[2], side[3]))
                res["as_norm"] = {"top_n": cfg.asnorm_top_n, "cohort_speakers": len(models), **metrics(normed, labels)}
                columns, fmt, header = [*columns, normed], [*fmt, "%.6f"], "score label score_asnorm"
            d = out_root / n / f"step-{step}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "results.json").write_text(json.dumps(res, indent=1))
            np.savetxt(d / "scores.txt", np.stack(columns, 1), fmt=fmt, header=header)
            results[n][step], scored[n][step] = res, (scores, labels)
            if cfg.plots:
                from asv.plots import score_histogram

                images[f"eval/{n}/score_histogram"] = score_histogram(
                    scores,
                    labels,
                    d / "scores_hist.png",
                    f"{n}, step {step}: EER {res['eer']:.2f}%",
                    res["eer_threshold"],
                )
            logged = {f"eval/{n}/{k}": res[k] for k in ("eer", "min_dcf@0.01", "min_dcf@0.05")}
            if cfg.asnorm:
                logged[f"eval/{n}/eer_asnorm"] = res["as_norm"]["eer"]
            accelerator.log(logged, step=step)
        log_images(accelerator, images, step)
        accelerator.print(" | ".join(f"{n} step {step}: EER {results[n][step]['eer']:.2f}%" for n in names))

    if accelerator.is_main_process:
        write_selections(results, out_root)
        if cfg.plots:
            plot_dets(results, scored, out_root, exp_dir.name, accelerator)
        print_table(results)
    accelerator.end_training()
    return results


def selected_step(results: dict[str, dict[int, dict]]) -> int | None:
    """The checkpoint with the lowest EER on the held-out dev list (ties: the earliest), if there is one."""
    if DEV_LIST not in results or not results[DEV_LIST]:
        return None
    return min(results[DEV_LIST].values(), key=lambda r: (r["eer"], r["step"]))["step"]


def write_selections(results: dict[str, dict[int, dict]], out_root: Path) -> None:
    chosen = selected_step(results)
    for n, by_step in results.items():
        best = min(by_step.values(), key=lambda r: (r["eer"], r["step"]))
        (out_root / n / "best_result.json").write_text(
            json.dumps({"selection": "lowest EER on this list (SUPERB protocol: selected on test)", **best}, indent=1)
        )
        if chosen is not None and n != DEV_LIST:
            (out_root / n / "selected_result.json").write_text(
                json.dumps({"selection": f"lowest EER on the held-out '{DEV_LIST}' list", **by_step[chosen]}, indent=1)
            )


def plot_dets(results, scored, out_root: Path, run_name: str, accelerator) -> None:
    """A DET plot per list: every checkpoint when there are few, else the first, selected, best and last."""
    from asv.plots import det_plot

    chosen = selected_step(results)
    for n, by_step in scored.items():
        steps = sorted(by_step)
        if len(steps) > 6:
            best = min(results[n].values(), key=lambda r: (r["eer"], r["step"]))["step"]
            steps = sorted({steps[0], steps[-1], best} | ({chosen} if chosen is not None else set()))
        curves = {}
        for s in steps:
            tag = " (dev-selected)" if s == chosen and n != DEV_LIST else ""
            curves[f"step {s}: EER {results[n][s]['eer']:.2f}%{tag}"] = by_step[s]
        path = det_plot(curves, out_root / n / "det.png", f"{run_name}: {n}")
        log_images(accelerator, {f"eval/{n}/det": path}, max(by_step))


def log_images(accelerator, images: dict[str, Path], step: int) -> None:
    if not images or not accelerator.log_with:
        return
    import wandb

    accelerator.get_tracker("wandb", unwrap=True).log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)


def print_table(results: dict[str, dict[int, dict]]) -> None:
    chosen = selected_step(results)
    asnorm = any("as_norm" in r for by_step in results.values() for r in by_step.values())
    extra = f" {'AS-norm EER %':>14}" if asnorm else ""
    print(f"\n{'trials':<20} {'step':>8} {'EER %':>8} {'minDCF@0.01':>12} {'minDCF@0.05':>12}{extra}")
    for n, by_step in results.items():
        best = min(by_step.values(), key=lambda r: (r["eer"], r["step"]))["step"]
        for step, r in sorted(by_step.items()):
            marks = []
            if step == chosen and n != DEV_LIST and len(by_step) > 1:
                marks.append("<- selected on dev")
            if step == best and len(by_step) > 1 and n != DEV_LIST:
                marks.append("<- best on test (SUPERB protocol)")
            col = f" {r['as_norm']['eer']:>14.2f}" if "as_norm" in r else ""
            print(
                f"{n:<20} {step:>8} {r['eer']:>8.2f} {r['min_dcf@0.01']:>12.4f} {r['min_dcf@0.05']:>12.4f}{col}"
                + ("  " + " ".join(marks) if marks else "")
            )


def score_pair(cfg: EvalConfig) -> dict:
    from asv.api import verify

    if len(cfg.pair) != 2 or not cfg.ckpt_dir:
        raise SystemExit("error: --pair takes two wav files and needs --ckpt_dir exp/<run>/step-<N>")
    result = verify(cfg.pair[0], cfg.pair[1], cfg.ckpt_dir, test_effects=cfg.test_effects)
    if result["threshold"] is None:
        print(f"score {result['score']:.4f} ({result['threshold_source']})")
    else:
        decision = "same speaker" if result["same_speaker"] else "different speakers"
        print(
            f"score {result['score']:.4f}, threshold {result['threshold']:.4f} "
            f"({result['threshold_source']}): {decision}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
