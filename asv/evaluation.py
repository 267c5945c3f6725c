"""What evaluate.py does with a run's embeddings: per checkpoint, per trial list, and across checkpoints.

  embed_run                   every checkpoint's {wav path: embedding}, those of a frozen upstream in one pass
  fit_checkpoint_calibration  a checkpoint's cosine -> LLR map, fitted on the calibration list (calibration.json)
  as_norm_stats               per test file, its top-N cohort statistics (AS-norm)
  checkpoint_head             what results.json says of how a checkpoint was saved: scheduled, effective batch
  score_list                  one list at one checkpoint: results.json, scores.txt (and the score histogram)
  competing                   the checkpoints a selection compares: the scheduled saves (SUPERB's), or all
  write_selections            best_result.json (SUPERB's protocol) and selected_result.json (the dev list's choice)
  det_plots, print_table      the DET curves and the printed table over checkpoints

Results go where asv.rundir.EvalLayout says; their keys are in docs/evaluation.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from asv.calibration import Calibration, fit_calibration
from asv.config import load_train_config
from asv.conventions import SUPERB_EFFECTIVE_BATCH
from asv.errors import ConfigError
from asv.extract import Embedder, embed_cached, embed_checkpoints
from asv.manifest import DEV_LIST, Trial, read_train_csv, repeated_pairs
from asv.metrics import P_TARGETS, calibrated_metrics, metrics
from asv.rundir import EvalLayout, is_scheduled, read_train_state
from asv.scoring import as_norm, cohort_stats, speaker_means, trial_scores

SUPERB_SELECTION = "lowest EER on this list over the checkpoints (SUPERB's protocol: selected on test)"
DEV_SELECTION = f"lowest EER on the held-out '{DEV_LIST}' list (opt-in; its speakers were left out of training)"
# Why a checkpoint saved off the save_step schedule is marked in the table, and what happened to it.
OFF_SCHEDULE = "* off-schedule save (step 0, a preemption, or a last step that is no multiple of save_step)"
INCLUDED = "off-schedule checkpoints compete too (--include_off_schedule: not SUPERB's schedule)"
FALLBACK = "no scheduled checkpoint evaluated: best over off-schedule ones (not SUPERB's schedule)"
# What an exported model card says about the training data (prepare.json's summary).
SUMMARY_KEYS = ("dataset", "utterances", "speakers", "hours")

Results = dict[str, dict[int, dict]]  # {list name: {step: that list's results.json at that step}}


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


def checkpoint_head(ckpt: Path) -> dict:
    """results.json's entries on how checkpoint `ckpt` was saved: "scheduled" (one of the run's save_step
    saves), "effective_batch" (utterances per update; None: unknown, a checkpoint older than the record) and,
    when that is known and not SUPERB's, "effective_batch_note" saying the result is not SUPERB's recipe."""
    batch = read_train_state(ckpt).get("effective_batch")
    head = {"scheduled": is_scheduled(ckpt), "effective_batch": batch}
    if batch is not None and batch != SUPERB_EFFECTIVE_BATCH:
        head["effective_batch_note"] = (
            f"{batch} utterances per update (opt-in: not SUPERB's recipe of {SUPERB_EFFECTIVE_BATCH}, "
            "so not comparable to SUPERB's numbers)"
        )
    return head


def training_data_card(data_dir: Path) -> dict:
    """What an exported model directory's card says about the training data."""
    summary = prepared(data_dir).get("summary") or {}
    return {
        "description": describe_training_set(data_dir),
        "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary},
    }


def cohort_items(data_dir: Path, per_speaker: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(id, wav_path) of the first `per_speaker` training utterances of every speaker, and their speakers."""
    by_spk: dict[str, list] = {}
    for u in read_train_csv(Path(data_dir) / "train.csv"):
        by_spk.setdefault(u.spk, []).append(u)
    chosen = [u for spk in sorted(by_spk) for u in sorted(by_spk[spk], key=lambda u: u.id)[:per_speaker]]
    return [(u.id, u.wav_path) for u in chosen], [u.spk for u in chosen]


def embed_run(
    ckpts: list[tuple[int, Path]],
    items: list[tuple[str, str]],
    lengths: dict[str, int],
    *,
    accelerator: Accelerator,
    upstream_cache: dict,
    layout: EvalLayout | None,
    test_effects: bool | None,
    max_frames: int,
    num_workers: int | None,
) -> Iterator[tuple[int, Path, Embedder, bool, dict[str, np.ndarray]]]:
    """(step, ckpt, embedder, test effects, {wav_path: embedding}) per checkpoint, in order; embeddings cached
    under `layout` (None: none read or written); `test_effects` None: each checkpoint's own.

    The checkpoints of a frozen upstream are embedded first, together (asv.extract.embed_checkpoints): the
    upstream runs once per utterance for all of them, where s3prl runs it again for each checkpoint. Those of a
    fine-tuned upstream each carry their own, and are embedded one at a time as their turn comes."""
    options = {"accelerator": accelerator, "max_frames": max_frames, "num_workers": num_workers}

    def effects_of(embedder: Embedder) -> bool:
        return embedder.test_effects if test_effects is None else test_effects

    def cache_of(step: int) -> Path | None:
        return layout.embeddings(step) if layout else None

    groups: dict[tuple, list] = {}
    for step, ckpt in ckpts:
        if not load_train_config(ckpt / "config.yaml").model.tunes_upstream:
            embedder = Embedder(ckpt, accelerator.device, upstream_cache)
            key = (id(embedder.upstream), embedder.upstream_precision, effects_of(embedder))
            groups.setdefault(key, []).append((step, embedder))
    joint = {}
    for (_, _, effects), members in groups.items():
        steps, embedders = zip(*members, strict=True)
        desc = f"embedding step {steps[0]}" if len(steps) == 1 else f"embedding {len(steps)} checkpoints"
        cache_files = [cache_of(s) for s in steps]
        vectors = embed_checkpoints(
            list(embedders), items, lengths, cache_files=cache_files, effects=effects, desc=desc, **options
        )
        joint.update({s: (e, effects, v) for s, e, v in zip(steps, embedders, vectors, strict=True)})
    for step, ckpt in ckpts:
        if step in joint:
            yield step, ckpt, *joint.pop(step)
            continue
        embedder = Embedder(ckpt, accelerator.device, upstream_cache)
        effects, desc = effects_of(embedder), f"embedding step {step}"
        vectors = embed_cached(
            embedder, items, lengths, cache_file=cache_of(step), effects=effects, desc=desc, **options
        )
        yield step, ckpt, embedder, effects, vectors


def choose_calibration_list(requested: str | None, scored: dict[str, list[Trial]]) -> tuple[str | None, str]:
    """(name of the list calibration is fitted on, "") or (None, why there is none); `requested`: the
    --calibration_list (a list name, a file or 'none'), `scored`: the lists being scored, by name."""
    if requested == "none":
        return None, "calibration switched off (--calibration_list none)"
    if requested:
        return (requested if requested in scored else Path(requested).stem), ""
    if DEV_LIST in scored:
        return DEV_LIST, ""
    return None, (
        f"no calibration list: the held-out '{DEV_LIST}' list is not scored (prepare.py --dev_speakers N builds one) "
        "and no --calibration_list NAME|FILE was given"
    )


@dataclass
class CheckpointCalibration:
    """A checkpoint's cosine -> LLR map, or why it has none, and the pairs of the list it was fitted on."""

    calibration: Calibration | None
    why_absent: str = ""
    fitted_pairs: set[frozenset] = field(default_factory=set)


def fit_checkpoint_calibration(
    trials: dict[str, list[Trial]],
    vectors: dict[str, np.ndarray],
    *,
    list_name: str | None,
    why_not: str,
    step: int,
    ckpt: Path,
    layout: EvalLayout,
) -> CheckpointCalibration:
    """This checkpoint's calibration, fitted on list `list_name` (None: none, for reason `why_not`) and saved as
    its calibration.json."""
    if list_name is None:
        return CheckpointCalibration(None, why_not)
    listed = trials[list_name]
    try:
        provenance = {"trials": list_name, "step": step, "ckpt_dir": str(ckpt)}
        cal = fit_calibration(trial_scores(vectors, listed), [t.label for t in listed], provenance)
    except ConfigError as err:  # e.g. an untrained step-0 model: no calibration at this step, the others go on
        return CheckpointCalibration(None, f"not calibrated at step {step}: {err}")
    cal.save(layout.calibration(step))
    return CheckpointCalibration(cal, "", {frozenset((t.wav_path1, t.wav_path2)) for t in listed})


def calibrated_results(
    trials: list[Trial], *, list_name: str, scores: np.ndarray, labels: np.ndarray, calibration: CheckpointCalibration
) -> dict:
    """Cllr and actDCF of the calibrated scores when the list shares no trial with the calibration list, and the
    "calibration" entry saying where it was fitted, or why those metrics are absent."""
    c = calibration.calibration
    if c is None:
        why = calibration.why_absent
        return {"calibration": {"absent": f"{why}; cllr and act_dcf need scores calibrated on another list"}}
    where = {"fitted_on": c.fitted_on, "slope": c.slope, "offset": c.offset}
    shared = sum(frozenset((t.wav_path1, t.wav_path2)) in calibration.fitted_pairs for t in trials)
    if shared:
        why = "this is the calibration list" if list_name == c.list_name else f"{shared} of its trials are in it"
        return {"calibration": {**where, "note": f"{why}: Cllr and actDCF would not be held-out, so they are absent"}}
    out = calibrated_metrics(c.llr(scores), labels)
    for p in P_TARGETS:  # the Bayes decision threshold on the raw cosine scale
        out[f"act_dcf@{p}_threshold"] = c.score_at(out[f"act_dcf@{p}_llr_threshold"])
    return {**out, "calibration": where}


@dataclass
class AsNormStats:
    """Per test file, the (mean, std) of its top-N scores against the cohort of training-speaker means."""

    top_n: int
    cohort_speakers: int
    by_path: dict[str, tuple[float, float]]


def as_norm_stats(
    vectors: dict[str, np.ndarray], *, test_paths: list[str], cohort: list[str], cohort_speakers: list[str], top_n: int
) -> AsNormStats:
    """AS-norm statistics of `test_paths` against the mean embeddings of the cohort's speakers (`cohort`: wav
    paths, `cohort_speakers`: their speakers)."""
    models, _ = speaker_means(np.stack([vectors[p] for p in cohort]), cohort_speakers)
    mean, std = cohort_stats(np.stack([vectors[p] for p in test_paths]), models, top_n)
    return AsNormStats(top_n, len(models), dict(zip(test_paths, zip(mean, std, strict=True), strict=True)))


@dataclass
class ScoredList:
    """One list scored at one checkpoint: its results.json, its scores and labels, and the figures written."""

    result: dict
    scores: np.ndarray
    labels: np.ndarray
    images: dict[str, Path]


def score_list(
    trials: list[Trial],
    vectors: dict[str, np.ndarray],
    *,
    head: dict,
    layout: EvalLayout,
    calibration: CheckpointCalibration,
    norm: AsNormStats | None = None,
    plots: bool = False,
) -> ScoredList:
    """Score one list at one checkpoint and write its results.json, scores.txt (and with `plots`, the score
    histogram). `head`: results.json's first entries, holding "trials" (the list's name) and "step"."""
    name, step = head["trials"], head["step"]
    scores, labels = trial_scores(vectors, trials), np.array([t.label for t in trials])
    res = {**head, "num_trials": len(labels), "num_target": int(labels.sum()), **metrics(scores, labels)}
    res.update(calibrated_results(trials, list_name=name, scores=scores, labels=labels, calibration=calibration))
    res["repeated_pairs"] = repeated_pairs(trials)  # scored as listed, like s3prl
    columns, fmt, header = [scores, labels], ["%.6f", "%d"], "score label"
    if norm:
        side = [np.array([norm.by_path[getattr(t, f"wav_path{k}")][j] for t in trials]) for k in (1, 2) for j in (0, 1)]
        normed = as_norm(scores, (side[0], side[1]), (side[2], side[3]))
        res["as_norm"] = {"top_n": norm.top_n, "cohort_speakers": norm.cohort_speakers, **metrics(normed, labels)}
        columns, fmt, header = [*columns, normed], [*fmt, "%.6f"], "score label score_asnorm"
    out_dir = layout.scored(name, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    np.savetxt(out_dir / "scores.txt", np.stack(columns, 1), fmt=fmt, header=header)
    images = {}
    if plots:
        from asv.plots import score_histogram  # matplotlib loads (~1 s) only when figures are asked for

        title = f"{name}, step {step}: EER {res['eer']:.2f}%"
        hist = score_histogram(scores, labels, out_dir / "scores_hist.png", title, res["eer_threshold"])
        images[f"eval/{name}/score_histogram"] = hist
    return ScoredList(res, scores, labels, images)


def competing(by_step: dict[int, dict], include_off_schedule: bool = False) -> tuple[dict[int, dict], str]:
    """The results a selection compares, and a note when they are not just the scheduled saves. SUPERB's best
    over checkpoints is over the save_step schedule; a checkpoint saved at a preemption, a last step off it or
    step 0 would join that comparison by accident of when the run stopped. When no scheduled checkpoint was
    evaluated (a short run saving only an off-schedule last step), the best over what exists beats none."""
    scheduled = {s: r for s, r in by_step.items() if r["scheduled"]}
    if len(scheduled) == len(by_step):
        return by_step, ""
    if include_off_schedule:
        return by_step, INCLUDED
    return (scheduled, "") if scheduled else (by_step, FALLBACK)


def selected_step(results: Results, include_off_schedule: bool = False) -> int | None:
    """The checkpoint with the lowest EER on the held-out dev list (ties: the earliest), if there is one."""
    if DEV_LIST not in results or not results[DEV_LIST]:
        return None
    return best_step(competing(results[DEV_LIST], include_off_schedule)[0])


def best_step(by_step: dict[int, dict]) -> int:
    """The step with the lowest EER (ties: the earliest)."""
    return min(by_step.values(), key=lambda r: (r["eer"], r["step"]))["step"]


def _selection(how: str, by_step: dict[int, dict], include_off_schedule: bool) -> dict:
    """A selection file's head: how it chose, and which steps competed and which were left out."""
    contenders, note = competing(by_step, include_off_schedule)
    return {
        "selection": f"{how}; {note}" if note else how,
        "competing_steps": sorted(contenders),
        "excluded_steps": sorted(set(by_step) - set(contenders)),
    }


def write_selections(results: Results, layout: EvalLayout, include_off_schedule: bool = False) -> None:
    """best_result.json per list; selected_result.json per list but the dev list, when the dev list is scored.
    Off-schedule checkpoints compete only with `include_off_schedule` (or when no scheduled one was evaluated)."""
    chosen = selected_step(results, include_off_schedule)
    for n, by_step in results.items():
        head = _selection(SUPERB_SELECTION, by_step, include_off_schedule)
        best = by_step[best_step(competing(by_step, include_off_schedule)[0])]
        layout.best(n).write_text(json.dumps({**head, **best}, indent=1))
        if chosen is not None and n != DEV_LIST:
            head = _selection(DEV_SELECTION, results[DEV_LIST], include_off_schedule)
            layout.selected(n).write_text(json.dumps({**head, **by_step[chosen]}, indent=1))


def det_plots(
    results: Results,
    scored: dict[str, dict[int, ScoredList]],
    layout: EvalLayout,
    run_name: str,
    include_off_schedule: bool = False,
) -> dict:
    """A DET plot per list, {list name: its PNG}: every checkpoint when there are few, else the first, selected,
    best and last."""
    from asv.plots import det_plot  # matplotlib loads (~1 s) only when figures are asked for

    chosen, paths = selected_step(results, include_off_schedule), {}
    for n, by_step in scored.items():
        steps = sorted(by_step)
        if len(steps) > 6:
            extra = {chosen} if chosen is not None else set()
            best = best_step(competing(results[n], include_off_schedule)[0])
            steps = sorted({steps[0], steps[-1], best} | extra)
        curves = {}
        for s in steps:
            tag = " (dev-selected)" if s == chosen and n != DEV_LIST else ""
            curves[f"step {s}: EER {results[n][s]['eer']:.2f}%{tag}"] = (by_step[s].scores, by_step[s].labels)
        paths[n] = det_plot(curves, layout.det(n), f"{run_name}: {n}")
    return paths


def print_table(results: Results, training_set: str, include_off_schedule: bool = False) -> None:
    """Every list at every checkpoint, the selected and best ones marked, off-schedule saves starred with what
    the selections did with them, and what the calibration columns mean."""
    chosen = selected_step(results, include_off_schedule)
    rows = [r for by_step in results.values() for r in by_step.values()]
    asnorm = any("as_norm" in r for r in rows)
    extra = f" {'AS-norm EER %':>14}" if asnorm else ""
    print(f"\ntraining set: {training_set}")
    for note in sorted({r["effective_batch_note"] for r in rows if "effective_batch_note" in r}):
        print(f"effective batch: {note}")
    print(
        f"{'trials':<20} {'#trials':>8} {'step':>8}  {'EER %':>8} {'minDCF@0.01':>12} {'minDCF@0.05':>12} "
        f"{'minCllr':>8} {'Cllr':>8} {'actDCF@0.01':>12} {'actDCF@0.05':>12}{extra}"
    )
    off_schedule = set()  # what the selections did with the starred rows, per list
    for n, by_step in results.items():
        contenders, note = competing(by_step, include_off_schedule)
        best = best_step(contenders)
        if len(contenders) < len(by_step):
            note = "left out of the best and the dev selection (--include_off_schedule true lets them compete)"
        if any(not r["scheduled"] for r in by_step.values()):
            off_schedule.add(note)
        for step, r in sorted(by_step.items()):
            marks = []
            if step == chosen and n != DEV_LIST and len(by_step) > 1:
                marks.append("<- selected on dev")
            if step == best and len(by_step) > 1 and n != DEV_LIST:
                marks.append("<- best on test (SUPERB protocol)")
            col = f" {r['as_norm']['eer']:>14.2f}" if "as_norm" in r else ""
            cal = " ".join(_cell(r.get(k), w) for k, w in (("cllr", 8), ("act_dcf@0.01", 12), ("act_dcf@0.05", 12)))
            star = " " if r["scheduled"] else "*"
            print(
                f"{n:<20} {r['num_trials']:>8} {step:>8}{star} {r['eer']:>8.2f} {r['min_dcf@0.01']:>12.4f} "
                f"{r['min_dcf@0.05']:>12.4f} {r['min_cllr']:>8.4f} {cal}{col}"
                + ("  " + " ".join(marks) if marks else "")
            )
    for note in sorted(off_schedule):
        print(f"{OFF_SCHEDULE}: {note}")
    entries = [r["calibration"] for r in rows]
    notes = {e.get("absent") or e.get("note", "") for e in entries}
    fitted = {e["fitted_on"]["trials"] for e in entries if "slope" in e}
    if fitted:
        print(f"Cllr, actDCF: cosine calibrated to LLRs on {', '.join(sorted(fitted))} at each step (calibration.json)")
    for note in sorted(filter(None, notes)):
        print(f"  '-': {note}")


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"
