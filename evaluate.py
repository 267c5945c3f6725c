"""Stages 3-4 of SUPERB ASV: embed every test utterance once, score trials by cosine, report EER and minDCF.

    python evaluate.py --ckpt_dir exp/<run>/step-100000            # one checkpoint
    python evaluate.py --exp_dir exp/<run>                          # every checkpoint of a run
    python evaluate.py --exp_dir exp/<run> --test_ckpt_steps 100000 200000 --trial_names veri_test2
    python evaluate.py --ckpt_dir D --trials my_list.txt --wav_root /data/wavs   # any labelled text trial list
    python evaluate.py --ckpt_dir D --export_model models/mine      # + a shareable model directory (asv.load_model)
    accelerate launch evaluate.py --exp_dir exp/<run>               # shard the embedding over processes

One pair and the embeddings of a list of files are `python -m asv verify|embed --model D` (a checkpoint or a model
directory); an exported model's ONNX graph is `python -m asv export_onnx --model models/mine` (asv/cli.py).

The model is rebuilt from the checkpoint's own config.yaml. Every trial of every list is scored as listed.
Writes under --out_dir (default <exp_dir>/evaluate; asv/rundir.py EvalLayout):
  step-<N>/embeddings.npz            embedding cache (asv/extract.py): other lists / normalisations reuse it
  step-<N>/calibration.json          cosine -> LLR map fitted on --calibration_list (default: dev) at this step
  step-<N>/layer_weights.png         featurizer weight per upstream hidden state (multi-layer upstreams)
  <list>/step-<N>/results.json       EER (percent) + threshold, minDCF@0.01/@0.05 + thresholds, min Cllr, trial
                                     counts, the training set's protocol, whether the checkpoint is a scheduled
                                     save and its effective batch (+ "as_norm"); Cllr and actDCF@0.01/
                                     @0.05 of the calibrated scores on every list but the calibration list, and
                                     "calibration": where it was fitted, or why those metrics are absent
  <list>/step-<N>/scores.txt         one line per trial: score label [score_asnorm]
  <list>/step-<N>/scores_hist.png    target / non-target score histogram
  <list>/det.png                     DET curves of the evaluated checkpoints
  <list>/best_result.json            the lowest EER on this list itself: SUPERB's protocol, selected on test
  <list>/selected_result.json        the checkpoint chosen on the held-out `dev` list (opt-in: --dev_speakers)
Both compare the scheduled saves only (step > 0, a multiple of save_step), as SUPERB's best over its checkpoints;
those saved at a preemption, a last step off the schedule or step 0 are scored but compete only with
--include_off_schedule true, or when no scheduled one was evaluated.
The work per checkpoint and per list is asv/evaluation.py's; this script chooses what to evaluate and runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from asv.calibration import Calibration
from asv.config import EvalConfig, load_train_config, parse
from asv.errors import AsvError, CheckpointError, ConfigError, ManifestError, describe
from asv.evaluation import (
    DEV_SELECTION,
    Results,
    ScoredList,
    as_norm_stats,
    checkpoint_head,
    choose_calibration_list,
    cohort_items,
    competing,
    describe_training_set,
    det_plots,
    embed_run,
    fit_checkpoint_calibration,
    prepared,
    print_table,
    score_list,
    selected_step,
    training_data_card,
    write_selections,
)
from asv.extract import audio_lengths
from asv.manifest import DEV_LIST, Trial, read_text_trials, read_trials_csv, trial_sets, unique_utterances
from asv.modeldir import export_model
from asv.progress import progress
from asv.rundir import EvalLayout, list_checkpoints, read_train_state, usable, verify_checkpoint
from asv.tracking import start_tracking, wandb_mode


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = parse(EvalConfig, argv)
        exp_dir, ckpts = checkpoints_to_evaluate(cfg)
        data_dir = Path(cfg.data_dir or load_train_config(ckpts[0][1] / "config.yaml").data.data_dir)
        trials = load_trial_lists(cfg, data_dir)
        calibration_list, no_calibration = choose_calibration_list(cfg.calibration_list, trials)
        # Each audio file is embedded once, however many lists (and ids) name it.
        utts = unique_utterances([t for ts in trials.values() for t in ts])
        # AS-norm's cohort: training utterances, embedded by each checkpoint with the test files.
        cohort, cohort_spk = cohort_items(data_dir, cfg.asnorm_utts_per_speaker) if cfg.asnorm else ([], [])
        layout, training_set = EvalLayout.of_run(exp_dir, cfg.out_dir), describe_training_set(data_dir)
        mode = wandb_mode(cfg.wandb_mode)
        accelerator = Accelerator(log_with=None if mode == "disabled" else "wandb", mixed_precision="no")
        config = {"exp_dir": str(exp_dir), "trials": list(trials), "asnorm": cfg.asnorm}
        start_tracking(accelerator, "superb-asv", config, exp_dir, mode, f"{exp_dir.name}-eval", False, job_type="eval")
        accelerator.print(
            f"evaluating {len(ckpts)} checkpoint(s) of {exp_dir} on {', '.join(trials)}: "
            f"{sum(map(len, trials.values()))} trials, {len(utts)} unique utterances; training set: {training_set}"
            + (f"; AS-norm cohort of {len(set(cohort_spk))} speakers" if cfg.asnorm else "")
        )
        lengths = audio_lengths([p for _, p in utts + cohort])  # headers read once for every checkpoint
        upstream_cache: dict = {}  # one frozen upstream object for every checkpoint of it (and for the export)
        results: Results = {n: {} for n in trials}
        scored: dict[str, dict[int, ScoredList]] = {n: {} for n in trials}  # scores and labels, for the DET plots
        embedded = embed_run(
            ckpts,
            utts + cohort,
            lengths,
            accelerator=accelerator,
            upstream_cache=upstream_cache,
            layout=layout if cfg.cache else None,
            test_effects=cfg.test_effects,
            max_frames=cfg.eval_max_frames,
            num_workers=cfg.num_workers,
        )
        shown = progress(embedded, len(ckpts), "checkpoints", "ckpt", enabled=accelerator.is_main_process)
        for step, ckpt, embedder, effects, vectors in shown:
            # Every process embedded its share of the batches (gathered); the main one scores and writes.
            if not accelerator.is_main_process:
                continue
            images = {}
            if cfg.plots and (w := embedder.model.layer_weights()) is not None:
                from asv.plots import layer_weights_plot  # matplotlib loads (~1 s) only when figures are asked for

                title = f"{exp_dir.name} step {step}"
                images["featurizer/layer_weights"] = layer_weights_plot(
                    w.cpu().numpy(), layout.layer_weights(step), title
                )
            norm = None
            if cfg.asnorm:
                norm = as_norm_stats(
                    vectors,
                    test_paths=[p for _, p in utts],
                    cohort=[p for _, p in cohort],
                    cohort_speakers=cohort_spk,
                    top_n=cfg.asnorm_top_n,
                )
            # Each checkpoint's scores have their own scale: calibration is fitted per checkpoint.
            cal = fit_checkpoint_calibration(
                trials, vectors, list_name=calibration_list, why_not=no_calibration, step=step, ckpt=ckpt, layout=layout
            )
            # Read once per checkpoint: it decides whether this step may compete and labels a non-SUPERB batch.
            saved = checkpoint_head(ckpt)
            for n, ts in trials.items():
                head = {
                    "step": step,
                    "ckpt_dir": str(ckpt),
                    "trials": n,
                    "test_effects": effects,
                    "training_set": training_set,
                    **saved,
                }
                out = score_list(ts, vectors, head=head, layout=layout, calibration=cal, norm=norm, plots=cfg.plots)
                results[n][step], scored[n][step] = out.result, out
                images.update(out.images)
                logged = {f"eval/{n}/{k}": out.result[k] for k in ("eer", "min_dcf@0.01", "min_dcf@0.05")}
                if norm:
                    logged[f"eval/{n}/eer_asnorm"] = out.result["as_norm"]["eer"]
                accelerator.log(logged, step=step)
            log_images(accelerator, images, step)
            accelerator.print(" | ".join(f"{n} step {step}: EER {results[n][step]['eer']:.2f}%" for n in trials))

        # Across checkpoints: the best one on each list (SUPERB's protocol) and the one the dev list selects.
        if accelerator.is_main_process:
            write_selections(results, layout, cfg.include_off_schedule)
            if cfg.plots:
                dets = det_plots(results, scored, layout, exp_dir.name, cfg.include_off_schedule)
                for n, path in dets.items():
                    log_images(accelerator, {f"eval/{n}/det": path}, max(results[n]))
            print_table(results, training_set, cfg.include_off_schedule)
            if cfg.export_model:
                export(
                    cfg, ckpts=ckpts, results=results, layout=layout, data_dir=data_dir, upstream_cache=upstream_cache
                )
        accelerator.end_training()
        return results
    except AsvError as err:  # the library explains in one line; the script exits with it
        raise SystemExit(f"error: {describe(err)}") from None


def checkpoints_to_evaluate(cfg: EvalConfig) -> tuple[Path, list[tuple[int, Path]]]:
    """(run directory, [(step, checkpoint directory)]) of --ckpt_dir, or of --exp_dir's usable checkpoints."""
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


def load_trial_lists(cfg: EvalConfig, data_dir: Path) -> dict[str, list[Trial]]:
    """The lists to score by name: prepared ones (--trial_names, default all), --trials files, and the
    --calibration_list, which is scored too since calibration needs its scores."""
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
        # Relative paths: below --wav_root, else the list's own folder, then the corpus prepare.py read.
        roots = [Path(cfg.wav_root)] if cfg.wav_root else [f.parent] + ([Path(corpus_root)] if corpus_root else [])
        out[f.stem] = read_text_trials(f, roots)

    for f in map(Path, cfg.trials or []):
        add_file(f, "--trials")
    cal = cfg.calibration_list
    if cal and cal != "none" and cal not in out and Path(cal).stem not in out:
        if cal in lists:
            out[cal] = read_trials_csv(lists[cal])
        elif Path(cal).suffix or "/" in cal:
            add_file(Path(cal), "--calibration_list")
        else:
            raise ConfigError(f"--calibration_list {cal}: no such list in {data_dir}/trials (have: {', '.join(lists)})")
    return out


def log_images(accelerator: Accelerator, images: dict[str, Path], step: int) -> None:
    """The figures to W&B, when it is on."""
    if not images or not accelerator.log_with:
        return
    import wandb  # only with W&B on: an optional package

    accelerator.get_tracker("wandb", unwrap=True).log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)


def export(cfg: EvalConfig, *, ckpts, results: Results, layout: EvalLayout, data_dir: Path, upstream_cache):
    """--export_model: the model directory of --ckpt_dir's checkpoint, or of the one selected on the dev list."""
    if cfg.ckpt_dir:
        step, ckpt = ckpts[0]
        selection = "chosen by the user (evaluate.py --ckpt_dir)"
        earlier = [json.loads(p.read_text()) for p in layout.root.glob("*/selected_result.json")]
        if any(r.get("step") == step for r in earlier):
            selection += f"; it is also the checkpoint with the lowest EER on the held-out '{DEV_LIST}' list"
    else:
        step = selected_step(results, cfg.include_off_schedule)
        if step is None:
            raise ConfigError(
                f"--export_model with --exp_dir exports the checkpoint selected on the held-out '{DEV_LIST}' list, "
                "and none was scored; pass --ckpt_dir exp/<run>/step-<N> to choose one"
            )
        ckpt = dict(ckpts)[step]
        contenders, note = competing(results[DEV_LIST], cfg.include_off_schedule)
        selection = f"{DEV_SELECTION}, among steps {', '.join(map(str, sorted(contenders)))}"
        selection += f"; {note}" if note else ""
    at_step = {n: by_step[step] for n, by_step in results.items()}
    fitted = next((r["calibration"] for r in at_step.values() if "slope" in r["calibration"]), None)
    cal = Calibration.load(layout.calibration(step)) if fitted else None
    # The decision threshold: the EER threshold on the calibration list, else on the dev list, else none.
    ref = cal.list_name if cal else (DEV_LIST if DEV_LIST in at_step else None)
    threshold = None
    if ref:
        r = at_step[ref]
        threshold = {"value": r["eer_threshold"], "source": f"EER threshold on '{ref}' ({r['num_trials']} trials)"}
    training = training_data_card(data_dir)
    out = export_model(ckpt, Path(cfg.export_model), at_step, selection, training, cal, threshold, upstream_cache)
    print(f"model directory: {out} (step {step}; load it with asv.load_model('{out}') or python -m asv ... --model)")


if __name__ == "__main__":
    main(sys.argv[1:])
