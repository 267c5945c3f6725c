"""Stages 3-4 of SUPERB ASV: embed every test utterance once, score trials by cosine, report EER and minDCF.

    python evaluate.py --ckpt_dir exp/<run>/step-100000            # one checkpoint
    python evaluate.py --exp_dir exp/<run>                          # every checkpoint of a run
    python evaluate.py --exp_dir exp/<run> --test_ckpt_steps 100000 200000 --trial_names veri_test2
    python evaluate.py --ckpt_dir D --trials my_list.txt --wav_root /data/wavs   # any VoxCeleb-format list
    python evaluate.py --ckpt_dir D --pair a.wav b.wav              # one trial: score and decision
    python evaluate.py --ckpt_dir D --export_model models/mine      # + a shareable model directory (asv.load_model)
    accelerate launch evaluate.py --exp_dir exp/<run>               # shard the embedding over processes

The model is rebuilt from the checkpoint's own config.yaml. Every trial of every list is scored as listed.
Writes under --out_dir (default <exp_dir>/evaluate; asv/rundir.py EvalLayout):
  step-<N>/embeddings.npz            embedding cache (asv/extract.py): other lists / normalisations reuse it
  step-<N>/calibration.json          cosine -> LLR map fitted on --calibration_list (default: dev) at this step
  step-<N>/layer_weights.png         featurizer weight per upstream hidden state (multi-layer upstreams)
  <list>/step-<N>/results.json       EER (percent) + threshold, minDCF@0.01/@0.05 + thresholds, min Cllr, trial
                                     counts, the training set's protocol (+ "as_norm"); Cllr and actDCF@0.01/
                                     @0.05 of the calibrated scores on every list but the calibration list, and
                                     "calibration": where it was fitted, or why those metrics are absent
  <list>/step-<N>/scores.txt         one line per trial: score label [score_asnorm]
  <list>/step-<N>/scores_hist.png    target / non-target score histogram
  <list>/det.png                     DET curves of the evaluated checkpoints
  <list>/best_result.json            the lowest EER on this list itself: SUPERB's protocol, selected on test
  <list>/selected_result.json        the checkpoint chosen on the held-out `dev` list (opt-in: --dev_speakers)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from asv.calibration import Calibration, fit_calibration
from asv.config import EvalConfig, load_train_config, parse
from asv.errors import AsvError, CheckpointError, ConfigError, ManifestError, describe
from asv.extract import Embedder, audio_lengths, embed_cached, embed_checkpoints, export_embeddings
from asv.hostmem import retain_freed_memory_on
from asv.manifest import (
    DEV_LIST,
    Trial,
    read_train_csv,
    read_trials_csv,
    read_voxceleb_trials,
    repeated_pairs,
    trial_sets,
    unique_utterances,
)
from asv.metrics import P_TARGETS, calibrated_metrics, metrics
from asv.progress import progress
from asv.rundir import EvalLayout, list_checkpoints, read_train_state, usable, verify_checkpoint
from asv.scoring import as_norm, cohort_stats, speaker_means, trial_scores
from asv.tracking import start_tracking, wandb_mode

SUPERB_SELECTION = "lowest EER on this list over the checkpoints (SUPERB's protocol: selected on test)"
DEV_SELECTION = f"lowest EER on the held-out '{DEV_LIST}' list (opt-in; its speakers were left out of training)"


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = parse(EvalConfig, argv)
        if cfg.pair is not None:
            return score_pair(cfg)
        exp_dir, ckpts = checkpoints_to_evaluate(cfg)
        data_dir = Path(cfg.data_dir or load_train_config(ckpts[0][1] / "config.yaml").data.data_dir)
        trials = load_trial_lists(cfg, data_dir)
        calibration_list, no_calibration = choose_calibration_list(cfg, trials)
        utts = unique_utterances([t for ts in trials.values() for t in ts])
        cohort, cohort_spk = cohort_items(data_dir, cfg.asnorm_utts_per_speaker) if cfg.asnorm else ([], [])
        layout, training_set = EvalLayout.of_run(exp_dir, cfg.out_dir), describe_training_set(data_dir)
        mode = wandb_mode(cfg.wandb_mode)
        accelerator = Accelerator(log_with=None if mode == "disabled" else "wandb", mixed_precision="no")
        retain_freed_memory_on(accelerator.device)  # a CPU reuses each utterance's activations' memory
        config = {"exp_dir": str(exp_dir), "trials": list(trials), "asnorm": cfg.asnorm}
        start_tracking(accelerator, "superb-asv", config, exp_dir, mode, f"{exp_dir.name}-eval", False, job_type="eval")
        accelerator.print(
            f"evaluating {len(ckpts)} checkpoint(s) of {exp_dir} on {', '.join(trials)}: "
            f"{sum(map(len, trials.values()))} trials, {len(utts)} unique utterances; training set: {training_set}"
            + (f"; AS-norm cohort of {len(set(cohort_spk))} speakers" if cfg.asnorm else "")
        )
        lengths = audio_lengths([p for _, p in utts + cohort])  # headers read once for every checkpoint
        upstream_cache: dict = {}
        results: dict[str, dict[int, dict]] = {n: {} for n in trials}
        scored: dict[str, dict[int, tuple]] = {n: {} for n in trials}  # for the DET plots
        embedded = checkpoint_embeddings(cfg, ckpts, utts + cohort, lengths, layout, accelerator, upstream_cache)
        shown = progress(embedded, len(ckpts), "checkpoints", "ckpt", enabled=accelerator.is_main_process)
        for step, ckpt, embedder, effects, vectors in shown:
            if not accelerator.is_main_process:
                continue
            if cfg.export_embeddings:
                export_embeddings(Path(cfg.export_embeddings) / f"step-{step}.npz", utts, vectors)
            images = {}
            if cfg.plots and (w := embedder.model.layer_weights()) is not None:
                from asv.plots import layer_weights_plot

                title = f"{exp_dir.name} step {step}"
                images["featurizer/layer_weights"] = layer_weights_plot(
                    w.cpu().numpy(), layout.layer_weights(step), title
                )
            norm = asnorm_stats(vectors, utts, cohort, cohort_spk, cfg.asnorm_top_n) if cfg.asnorm else None
            cal = calibrate(trials, vectors, calibration_list, no_calibration, step, ckpt, layout)
            for n, ts in trials.items():
                info = {"step": step, "ckpt_dir": str(ckpt), "trials": n, "test_effects": effects}
                info["training_set"] = training_set
                res, scores = score_list(ts, vectors, norm, info, layout, cfg.plots, cal)
                results[n][step], scored[n][step] = res, scores
                images.update(res.pop("_images"))
                logged = {f"eval/{n}/{k}": res[k] for k in ("eer", "min_dcf@0.01", "min_dcf@0.05")}
                if norm:
                    logged[f"eval/{n}/eer_asnorm"] = res["as_norm"]["eer"]
                accelerator.log(logged, step=step)
            log_images(accelerator, images, step)
            accelerator.print(" | ".join(f"{n} step {step}: EER {results[n][step]['eer']:.2f}%" for n in trials))

        if accelerator.is_main_process:
            write_selections(results, layout)
            if cfg.plots:
                plot_dets(results, scored, layout, exp_dir.name, accelerator)
            print_table(results, training_set)
            if cfg.export_model:
                export(cfg, ckpts, results, layout, data_dir, upstream_cache)
        accelerator.end_training()
        return results
    except AsvError as err:  # the library explains in one line; the script exits with it
        raise SystemExit(f"error: {describe(err)}") from None


def checkpoint_embeddings(cfg: EvalConfig, ckpts, items, lengths, layout: EvalLayout, accelerator, upstream_cache):
    """(step, ckpt, embedder, test effects, {wav_path: embedding}) per checkpoint, in order.

    The checkpoints of a frozen upstream are embedded first, together (asv.extract.embed_checkpoints): the
    upstream runs once per utterance for all of them, where s3prl runs it again for each checkpoint. Those of a
    fine-tuned upstream each carry their own, and are embedded one at a time as their turn comes."""

    def effects_of(embedder):
        return embedder.test_effects if cfg.test_effects is None else cfg.test_effects

    def cache_of(step):
        return layout.embeddings(step) if cfg.cache else None

    groups: dict[tuple, list] = {}
    for step, ckpt in ckpts:
        if not load_train_config(ckpt / "config.yaml").model.upstream_trainable:
            embedder = Embedder(ckpt, accelerator.device, upstream_cache)
            key = (id(embedder.upstream), embedder.upstream_precision, effects_of(embedder))
            groups.setdefault(key, []).append((step, embedder))
    joint = {}
    for (_, _, effects), members in groups.items():
        steps, embedders = zip(*members, strict=True)
        desc = f"embedding step {steps[0]}" if len(steps) == 1 else f"embedding {len(steps)} checkpoints"
        vectors = embed_checkpoints(
            list(embedders),
            items,
            lengths,
            [cache_of(s) for s in steps],
            effects,
            accelerator,
            cfg.eval_max_frames,
            cfg.num_workers,
            desc,
            cfg.engine,
            cfg.onnx_cache_dir,
        )
        joint.update({s: (e, effects, v) for s, e, v in zip(steps, embedders, vectors, strict=True)})
    for step, ckpt in ckpts:
        if step in joint:
            yield step, ckpt, *joint.pop(step)
            continue
        embedder = Embedder(ckpt, accelerator.device, upstream_cache)
        effects = effects_of(embedder)
        vectors = embed_cached(
            embedder,
            items,
            lengths,
            cache_of(step),
            effects,
            accelerator,
            cfg.eval_max_frames,
            cfg.num_workers,
            f"embedding step {step}",
        )
        yield step, ckpt, embedder, effects, vectors


def checkpoints_to_evaluate(cfg: EvalConfig) -> tuple[Path, list[tuple[int, Path]]]:
    if bool(cfg.ckpt_dir) == bool(cfg.exp_dir):
        raise ConfigError("pass exactly one of --ckpt_dir exp/<run>/step-<N> or --exp_dir exp/<run>")
    if cfg.ckpt_dir:
        ckpt = Path(cfg.ckpt_dir)
        verify_checkpoint(ckpt, for_resume=False)
        return ckpt.parent, [(read_train_state(ckpt)["step"], ckpt)]
    exp_dir = Path(cfg.exp_dir)
    ckpts = list_checkpoints(exp_dir)
    if not ckpts:
        raise CheckpointError(f"{exp_dir} has no checkpoints (step-<N>/ with train_state.json); train first")
    if cfg.test_ckpt_steps:
        have = {s for s, _ in ckpts}
        missing = sorted(set(cfg.test_ckpt_steps) - have)
        if missing:
            raise CheckpointError(f"{exp_dir} has no checkpoint for step(s) {missing}; it has {sorted(have)}")
        ckpts = [(s, d) for s, d in ckpts if s in set(cfg.test_ckpt_steps)]
    good = usable(ckpts, for_resume=False)  # a corrupt one is skipped with a warning; the others are scored
    if not good:
        raise CheckpointError(f"none of the {len(ckpts)} checkpoints in {exp_dir} is usable (warnings above)")
    return exp_dir, good


SUBDIRS = (".", "wav", "test/wav", "dev/wav")


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
        raise ManifestError(
            f"{path}: {len(missing)} utterances not found under {', '.join(map(str, roots))} "
            f"(first: {', '.join(missing[:3])}); pass --wav_root DIR"
        )
    return [Trial(a, b, pa, pb, label) for label, a, b, pa, pb in rows]


def load_trial_lists(cfg: EvalConfig, data_dir: Path) -> dict[str, list[Trial]]:
    lists = trial_sets(data_dir) if data_dir.is_dir() else {}
    if cfg.trials and not cfg.trial_names:
        names = []  # only the given files, unless prepared lists are asked for too
    else:
        names = cfg.trial_names or list(lists)
        if not lists:
            raise ManifestError(f"{data_dir}/trials has no trial lists; run prepare.py, or pass --data_dir or --trials")
    unknown = [n for n in names if n not in lists]
    if unknown:
        raise ConfigError(f"no trial list {unknown[0]} in {data_dir}/trials (have: {', '.join(lists)})")
    out = {n: read_trials_csv(lists[n]) for n in names}
    corpus_root = prepared(data_dir).get("config", {}).get("dataset_root")

    def add_file(f: Path, flag: str) -> None:
        if not f.is_file():
            raise ConfigError(f"{flag} {f} does not exist")
        if f.stem in out:
            raise ConfigError(f"{flag} {f}: a trial list named {f.stem} is already being scored; rename the file")
        roots = [Path(cfg.wav_root)] if cfg.wav_root else [f.parent] + ([Path(corpus_root)] if corpus_root else [])
        out[f.stem] = read_text_trials(f, roots)

    for f in map(Path, cfg.trials or []):
        add_file(f, "--trials")
    cal = cfg.calibration_list
    if cal and cal != "none" and cal not in out and Path(cal).stem not in out:
        if cal in lists:  # a prepared list that was not asked for: scored too, since calibration needs its scores
            out[cal] = read_trials_csv(lists[cal])
        elif Path(cal).suffix or "/" in cal:
            add_file(Path(cal), "--calibration_list")
        else:
            raise ConfigError(f"--calibration_list {cal}: no such list in {data_dir}/trials (have: {', '.join(lists)})")
    return out


def choose_calibration_list(cfg: EvalConfig, trials: dict) -> tuple[str | None, str]:
    """(name of the list calibration is fitted on, or None and why not)."""
    if cfg.calibration_list == "none":
        return None, "calibration switched off (--calibration_list none)"
    if cfg.calibration_list:
        return (cfg.calibration_list if cfg.calibration_list in trials else Path(cfg.calibration_list).stem), ""
    if DEV_LIST in trials:
        return DEV_LIST, ""
    return None, (
        f"no calibration list: the held-out '{DEV_LIST}' list is not scored (prepare.py --dev_speakers N builds one) "
        "and no --calibration_list NAME|FILE was given"
    )


def calibrate(trials, vectors, name: str | None, why_not: str, step: int, ckpt: Path, layout: EvalLayout) -> dict:
    """This checkpoint's cosine -> LLR calibration, fitted on list `name` and saved as calibration.json:
    {"cal": Calibration or None, "why": why there is none, "pairs": the calibration list's pairs}."""
    if name is None:
        return {"cal": None, "why": why_not, "pairs": set()}
    ts = trials[name]
    try:
        provenance = {"trials": name, "step": step, "ckpt_dir": str(ckpt)}
        cal = fit_calibration(trial_scores(vectors, ts), [t.label for t in ts], provenance)
    except ConfigError as err:  # e.g. an untrained step-0 model: no calibration at this step, the others go on
        return {"cal": None, "why": f"not calibrated at step {step}: {err}", "pairs": set()}
    cal.save(layout.calibration(step))
    return {"cal": cal, "why": "", "pairs": {frozenset((t.wav_path1, t.wav_path2)) for t in ts}}


def calibrated_results(trials: list[Trial], name: str, scores, labels, cal: dict) -> dict:
    """Cllr and actDCF of the calibrated scores when `name` shares no trial with the calibration list, and the
    "calibration" entry saying where it was fitted, or why those metrics are absent."""
    c: Calibration | None = cal["cal"]
    if c is None:
        return {"calibration": {"absent": f"{cal['why']}; cllr and act_dcf need scores calibrated on another list"}}
    where = {"fitted_on": c.fitted_on, "slope": c.slope, "offset": c.offset}
    shared = sum(frozenset((t.wav_path1, t.wav_path2)) in cal["pairs"] for t in trials)
    if shared:
        why = "this is the calibration list" if name == c.list_name else f"{shared} of its trials are in it"
        return {"calibration": {**where, "note": f"{why}: Cllr and actDCF would not be held-out, so they are absent"}}
    out = calibrated_metrics(c.llr(scores), labels)
    for p in P_TARGETS:  # the Bayes decision threshold on the raw cosine scale
        out[f"act_dcf@{p}_threshold"] = c.score_at(out[f"act_dcf@{p}_llr_threshold"])
    return {**out, "calibration": where}


def prepared(data_dir: Path) -> dict:
    """data_dir/prepare.json (what prepare.py recorded), or {} for data prepared elsewhere."""
    path = Path(data_dir) / "prepare.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def describe_training_set(data_dir: Path) -> str:
    """Whether the checkpoints trained on SUPERB's training set: results say so next to every number."""
    summary = prepared(data_dir).get("summary")
    if not summary:
        return f"unknown (no prepare.json in {data_dir})"
    held_out = len(summary.get("dev_speakers", []))
    if held_out:
        return (
            f"{summary['speakers']} speakers; {held_out} held out for dev selection "
            "(opt-in: not SUPERB's training set, so not comparable to SUPERB's numbers)"
        )
    return f"all {summary['speakers']} training speakers (SUPERB's protocol)"


def cohort_items(data_dir: Path, per_speaker: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(id, wav_path) of the first `per_speaker` training utterances of every speaker, and their speakers."""
    by_spk: dict[str, list] = {}
    for u in read_train_csv(data_dir / "train.csv"):
        by_spk.setdefault(u.spk, []).append(u)
    chosen = [u for spk in sorted(by_spk) for u in sorted(by_spk[spk], key=lambda u: u.id)[:per_speaker]]
    return [(u.id, u.wav_path) for u in chosen], [u.spk for u in chosen]


def asnorm_stats(vectors, utts, cohort, cohort_spk, top_n: int) -> dict:
    """Per test file, the (mean, std) of its top-N scores against the cohort of training-speaker means."""
    models, _ = speaker_means(np.stack([vectors[p] for _, p in cohort]), cohort_spk)
    paths = [p for _, p in utts]
    mean, std = cohort_stats(np.stack([vectors[p] for p in paths]), models, top_n)
    stats = dict(zip(paths, zip(mean, std, strict=True), strict=True))
    return {"top_n": top_n, "cohort_speakers": len(models), "stats": stats}


def score_list(trials: list[Trial], vectors, norm: dict | None, info: dict, layout: EvalLayout, plots: bool, cal):
    """Score one list at one checkpoint; write results.json, scores.txt (and the histogram). Returns the result
    (with "_images" for W&B) and the (scores, labels) pair the DET plot needs."""
    scores, labels = trial_scores(vectors, trials), np.array([t.label for t in trials])
    res = {**info, "num_trials": len(labels), "num_target": int(labels.sum()), **metrics(scores, labels)}
    res.update(calibrated_results(trials, info["trials"], scores, labels, cal))
    res["repeated_pairs"] = repeated_pairs(trials)  # scored as listed, like s3prl
    columns, fmt, header = [scores, labels], ["%.6f", "%d"], "score label"
    if norm:
        stats = norm["stats"]
        side = [np.array([stats[getattr(t, f"wav_path{k}")][j] for t in trials]) for k in (1, 2) for j in (0, 1)]
        normed = as_norm(scores, (side[0], side[1]), (side[2], side[3]))
        res["as_norm"] = {"top_n": norm["top_n"], "cohort_speakers": norm["cohort_speakers"], **metrics(normed, labels)}
        columns, fmt, header = [*columns, normed], [*fmt, "%.6f"], "score label score_asnorm"
    d = layout.scored(info["trials"], info["step"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res, indent=1))
    np.savetxt(d / "scores.txt", np.stack(columns, 1), fmt=fmt, header=header)
    res["_images"] = {}
    if plots:
        from asv.plots import score_histogram

        title = f"{info['trials']}, step {info['step']}: EER {res['eer']:.2f}%"
        hist = score_histogram(scores, labels, d / "scores_hist.png", title, res["eer_threshold"])
        res["_images"][f"eval/{info['trials']}/score_histogram"] = hist
    return res, (scores, labels)


def selected_step(results: dict[str, dict[int, dict]]) -> int | None:
    """The checkpoint with the lowest EER on the held-out dev list (ties: the earliest), if there is one."""
    if DEV_LIST not in results or not results[DEV_LIST]:
        return None
    return min(results[DEV_LIST].values(), key=lambda r: (r["eer"], r["step"]))["step"]


def best_step(by_step: dict[int, dict]) -> int:
    return min(by_step.values(), key=lambda r: (r["eer"], r["step"]))["step"]


def write_selections(results: dict[str, dict[int, dict]], layout: EvalLayout) -> None:
    chosen = selected_step(results)
    for n, by_step in results.items():
        best = by_step[best_step(by_step)]
        layout.best(n).write_text(json.dumps({"selection": SUPERB_SELECTION, **best}, indent=1))
        if chosen is not None and n != DEV_LIST:
            layout.selected(n).write_text(json.dumps({"selection": DEV_SELECTION, **by_step[chosen]}, indent=1))


def plot_dets(results, scored, layout: EvalLayout, run_name: str, accelerator) -> None:
    """A DET plot per list: every checkpoint when there are few, else the first, selected, best and last."""
    from asv.plots import det_plot

    chosen = selected_step(results)
    for n, by_step in scored.items():
        steps = sorted(by_step)
        if len(steps) > 6:
            extra = {chosen} if chosen is not None else set()
            steps = sorted({steps[0], steps[-1], best_step(results[n])} | extra)
        curves = {}
        for s in steps:
            tag = " (dev-selected)" if s == chosen and n != DEV_LIST else ""
            curves[f"step {s}: EER {results[n][s]['eer']:.2f}%{tag}"] = by_step[s]
        path = det_plot(curves, layout.det(n), f"{run_name}: {n}")
        log_images(accelerator, {f"eval/{n}/det": path}, max(by_step))


def log_images(accelerator, images: dict[str, Path], step: int) -> None:
    if not images or not accelerator.log_with:
        return
    import wandb

    accelerator.get_tracker("wandb", unwrap=True).log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)


def print_table(results: dict[str, dict[int, dict]], training_set: str) -> None:
    chosen = selected_step(results)
    asnorm = any("as_norm" in r for by_step in results.values() for r in by_step.values())
    extra = f" {'AS-norm EER %':>14}" if asnorm else ""
    print(f"\ntraining set: {training_set}")
    print(
        f"{'trials':<20} {'#trials':>8} {'step':>8} {'EER %':>8} {'minDCF@0.01':>12} {'minDCF@0.05':>12} "
        f"{'minCllr':>8} {'Cllr':>8} {'actDCF@0.01':>12} {'actDCF@0.05':>12}{extra}"
    )
    for n, by_step in results.items():
        best = best_step(by_step)
        for step, r in sorted(by_step.items()):
            marks = []
            if step == chosen and n != DEV_LIST and len(by_step) > 1:
                marks.append("<- selected on dev")
            if step == best and len(by_step) > 1 and n != DEV_LIST:
                marks.append("<- best on test (SUPERB protocol)")
            col = f" {r['as_norm']['eer']:>14.2f}" if "as_norm" in r else ""
            cal = " ".join(_cell(r.get(k), w) for k, w in (("cllr", 8), ("act_dcf@0.01", 12), ("act_dcf@0.05", 12)))
            print(
                f"{n:<20} {r['num_trials']:>8} {step:>8} {r['eer']:>8.2f} {r['min_dcf@0.01']:>12.4f} "
                f"{r['min_dcf@0.05']:>12.4f} {r['min_cllr']:>8.4f} {cal}{col}"
                + ("  " + " ".join(marks) if marks else "")
            )
    entries = [r["calibration"] for by_step in results.values() for r in by_step.values()]
    notes = {e.get("absent") or e.get("note", "") for e in entries}
    fitted = {e["fitted_on"]["trials"] for e in entries if "slope" in e}
    if fitted:
        print(f"Cllr, actDCF: cosine calibrated to LLRs on {', '.join(sorted(fitted))} at each step (calibration.json)")
    for note in sorted(filter(None, notes)):
        print(f"  '-': {note}")


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def export(cfg: EvalConfig, ckpts, results: dict[str, dict[int, dict]], layout: EvalLayout, data_dir: Path, cache):
    """--export_model: the model directory of --ckpt_dir's checkpoint, or of the one selected on the dev list."""
    from asv.modeldir import export_model

    if cfg.ckpt_dir:
        step, ckpt = ckpts[0]
        selection = "chosen by the user (evaluate.py --ckpt_dir)"
        earlier = [json.loads(p.read_text()) for p in layout.root.glob("*/selected_result.json")]
        if any(r.get("step") == step for r in earlier):
            selection += f"; it is also the checkpoint with the lowest EER on the held-out '{DEV_LIST}' list"
    else:
        step = selected_step(results)
        if step is None:
            raise ConfigError(
                f"--export_model with --exp_dir exports the checkpoint selected on the held-out '{DEV_LIST}' list, "
                "and none was scored; pass --ckpt_dir exp/<run>/step-<N> to choose one"
            )
        ckpt = dict(ckpts)[step]
        selection = f"{DEV_SELECTION}, among steps {', '.join(map(str, sorted(results[DEV_LIST])))}"
    at_step = {n: by_step[step] for n, by_step in results.items()}
    fitted = next((r["calibration"] for r in at_step.values() if "slope" in r["calibration"]), None)
    cal = Calibration.load(layout.calibration(step)) if fitted else None
    ref = cal.list_name if cal else (DEV_LIST if DEV_LIST in at_step else None)
    threshold = None
    if ref:
        r = at_step[ref]
        threshold = {"value": r["eer_threshold"], "source": f"EER threshold on '{ref}' ({r['num_trials']} trials)"}
    summary = {k: v for k, v in (prepared(data_dir).get("summary") or {}).items() if k in SUMMARY_KEYS}
    training = {"description": describe_training_set(data_dir), "summary": summary}
    out = export_model(ckpt, Path(cfg.export_model), at_step, selection, training, cal, threshold, cache)
    if cfg.export_onnx:
        from asv.onnx_export import export_onnx

        export_onnx(out)
    print(f"model directory: {out} (step {step}; load it with asv.load_model('{out}') or python -m asv ... --model)")


SUMMARY_KEYS = ("dataset", "utterances", "speakers", "hours")


def score_pair(cfg: EvalConfig) -> dict:
    from asv.api import verify

    if len(cfg.pair) != 2 or not cfg.ckpt_dir:
        raise ConfigError("--pair takes two wav files and needs --ckpt_dir exp/<run>/step-<N>")
    result = verify(cfg.pair[0], cfg.pair[1], cfg.ckpt_dir, test_effects=cfg.test_effects)
    if result["threshold"] is None:
        print(f"score {result['score']:.4f} ({result['threshold_source']})")
    else:
        decision = "same speaker" if result["same_speaker"] else "different speakers"
        print(
            f"score {result['score']:.4f}, threshold {result['threshold']:.4f} "
            f"({result['threshold_source']}): {decision}"
        )
    if result["llr"] is not None:
        llr, p_same = result["llr"], result["p_same"]
        print(f"llr {llr:.4f}, P(same) {p_same:.4f} at prior {result['prior']} ({result['calibration']})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
