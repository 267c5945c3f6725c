"""Stages 0-1 of SUPERB ASV: turn a corpus into the manifests train.py and evaluate.py read.

    python prepare.py                                    # generate + prepare the embedded demo corpus
    python prepare.py --dataset voxceleb1 --dataset_root /data/VoxCeleb1
    python prepare.py --dataset voxceleb2 --dataset_root /data/VoxCeleb2 --voxceleb1_root /data/VoxCeleb1
    python prepare.py --dataset manifest --train_csv my_train.csv --trials my_trials.txt

Writes --out_dir (default data/<dataset>): train.csv, speakers.json, vad.json, trials/<name>.csv, bad_files.txt
and prepare.json (formats in asv/manifest.py and the README). Defaults are SUPERB's: every training speaker
trains and every trial of every list is kept as listed; `--dev_speakers 0.05` opts into held-out model
selection, which changes the training set. Every training and trial file is decoded once: unusable ones are
listed, not fatal. A second run with the same settings (--num_workers aside) reuses what is there; --force redoes
it. VoxCeleb2's .m4a are first converted once to FLAC (--decoded_dir): a rerun converts only what is missing, so
an interrupted run resumes (--force keeps the converted files). Decoding uses every core this process may run on
unless --num_workers says otherwise; the last line gives the files/s it reached.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from asv.audio import VAD_DESCRIPTION
from asv.config import PrepareConfig, parse
from asv.corpora import (
    CORPORA,
    EXPECTED_TRIALS,
    audio_report,
    corpus_version,
    hold_out_dev,
    prepared_dir,
    probe_all,
    worker_count,
    workers_phrase,
)
from asv.errors import AsvError, ManifestError, describe
from asv.manifest import TRAIN_FIELDS, TRIAL_FIELDS, Utterance, repeated_pairs, speaker_map, write_csv

# Settings that change how prepare.py runs, never what it writes: a run that differs only in them reuses the output.
RUN_ONLY_FIELDS = ("num_workers", "force")


def main(argv: list[str] | None = None) -> Path:
    try:
        cfg, _ = parse(PrepareConfig, argv)
        t0 = time.time()
        out = prepared_dir(cfg)
        if already_prepared(out, cfg):
            return out
        corpus = CORPORA[cfg.dataset](cfg)
        if not corpus.train and corpus.bad:
            first = next(iter(corpus.bad.values()))
            raise ManifestError(
                f"none of the {len(corpus.bad)} training files could be converted (first: {first.detail})"
            )
        if not corpus.train:
            raise ManifestError("no training utterances found (every speaker appears in a trial list?)")
        held_out = hold_out_dev(corpus, cfg.dev_speakers, cfg.dev_utts_per_speaker, cfg.dev_trials, cfg.seed)
        if held_out:
            print(
                f"dev selection (opt-in): {len(held_out)} training speakers held out of train.csv for trials/dev.csv; "
                "numbers from this training set are not comparable to SUPERB's (use --dev_speakers 0 for those)"
            )

        # Lengths and VAD intervals in one decode per file, cached per corpus in vad.json. Trial files are
        # decoded too, so every bad file is reported here and not hours into training or evaluation.
        workers, t_decode = worker_count(cfg.num_workers), time.monotonic()
        train_probes = probe_all([p for _, p, _ in corpus.train], cfg.gain_db, True, workers, "train files")
        train_paths = {p for _, p, _ in corpus.train}
        trial_paths = sorted({p for ts in corpus.trials.values() for t in ts for p in (t.wav_path1, t.wav_path2)})
        trial_paths = [p for p in trial_paths if p not in train_paths]
        probes = dict(zip(trial_paths, probe_all(trial_paths, cfg.gain_db, False, workers, "trial files"), strict=True))
        # The rate the decoding reached, worker start-up included: what --num_workers buys on this machine.
        decoded, decode_s = len(train_probes) + len(trial_paths), time.monotonic() - t_decode
        probes.update((p, r) for (_, p, _), r in zip(corpus.train, train_probes, strict=True))
        probes.update(corpus.bad)  # sources that never became a file to decode (an undecodable .m4a)
        report, audio_counts = audio_report(probes)
        out.mkdir(parents=True, exist_ok=True)
        # path<TAB>reason<TAB>detail, one line per unusable file (empty when all are fine).
        bad_lines = [f"{p}\t{r.bad}\t{r.detail}" for p, r in sorted(probes.items()) if r.bad]
        (out / "bad_files.txt").write_text("".join(line + "\n" for line in bad_lines))
        kept = [(u, r) for u, r in zip(corpus.train, train_probes, strict=True) if not r.bad]
        utterances = [Utterance(i, p, s, r.num_samples) for (i, p, s), r in kept]
        if not utterances:
            raise ManifestError(f"all {len(corpus.train)} training files are unusable; see {out}/bad_files.txt")
        # A trial with an unusable side cannot be scored: it is dropped and counted (the summary and
        # results.json show the reduced count) rather than failing the whole list.
        dropped = {}
        for name, rows in corpus.trials.items():
            good = [t for t in rows if not probes[t.wav_path1].bad and not probes[t.wav_path2].bad]
            dropped[name], corpus.trials[name] = len(rows) - len(good), good
            if not good:
                raise ManifestError(f"every trial of {name} uses an unusable file; see {out}/bad_files.txt")

        write_csv(out / "train.csv", TRAIN_FIELDS, utterances)
        (out / "speakers.json").write_text(json.dumps(speaker_map(utterances), indent=0))
        intervals = {u.id: r.intervals for u, (_, r) in zip(utterances, kept, strict=True)}
        (out / "vad.json").write_text(
            json.dumps({"gain_db": cfg.gain_db, "vad": VAD_DESCRIPTION, "intervals": intervals})
        )
        for old in (out / "trials").glob("*.csv"):
            old.unlink()
        for name, rows in corpus.trials.items():
            write_csv(out / "trials" / f"{name}.csv", TRIAL_FIELDS, rows)
        summary = {
            "dataset": cfg.dataset,
            "out_dir": str(out),
            "utterances": len(utterances),
            "speakers": len({u.spk for u in utterances}),
            "dev_speakers": held_out,
            "hours": round(sum(u.num_samples for u in utterances) / 16000 / 3600, 3),
            "hours_after_vad": round(sum(e - s for _, r in kept for s, e in r.intervals) / 16000 / 3600, 3),
            "trials": {name: len(rows) for name, rows in corpus.trials.items()},
            "repeated_pairs": {name: repeated_pairs(rows) for name, rows in corpus.trials.items()},
            "dropped_trials": dropped,
            "audio": audio_counts,
            "audio_report": report,
            "seconds": round(time.time() - t0, 1),
            "decode": {
                "files": decoded,
                "seconds": round(decode_s, 2),
                "workers": workers,
                "files_per_s": round(decoded / decode_s, 1),
            },
        }
        if corpus.conversion:
            summary["conversion"] = corpus.conversion
        record = {"config": asdict(cfg), "corpus_version": corpus_version(cfg.dataset), "summary": summary}
        (out / "prepare.json").write_text(json.dumps(record, indent=1))
        print_summary(summary)
        d = summary["decode"]
        pool = workers_phrase(d["workers"])
        print(f"decoded {d['files']} files in {d['seconds']:.1f} s with {pool}: {d['files_per_s']:.1f} files/s")
        return out
    except AsvError as err:  # the library explains in one line; the script exits with it
        raise SystemExit(f"error: {describe(err)}") from None


def already_prepared(out: Path, cfg: PrepareConfig) -> bool:
    """True (after printing its summary) when out/prepare.json records this exact config and corpus version."""
    marker = out / "prepare.json"
    if not marker.is_file() or cfg.force:
        return False
    previous = json.loads(marker.read_text())
    # A setting added since that run is absent from its record; it ran as that setting's default does.
    recorded = {**asdict(PrepareConfig()), **previous["config"]}
    same = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS} == {
        k: v for k, v in recorded.items() if k not in RUN_ONLY_FIELDS
    }
    if same and previous.get("corpus_version") == corpus_version(cfg.dataset):
        print(f"{out} is already prepared (prepare.json matches; --force redoes it)")
        print_summary(previous["summary"])
        return True
    print(f"{out} was prepared with other settings: redoing it")
    return False


def print_summary(s: dict) -> None:
    for line in s.get("audio_report", []):
        print(line)

    def trials(name: str, count: int) -> str:
        notes = []
        if s.get("dropped_trials", {}).get(name):
            notes.append(f"{s['dropped_trials'][name]} dropped: unusable audio")
        if s.get("repeated_pairs", {}).get(name):
            notes.append(f"{s['repeated_pairs'][name]} repeat a listed pair and are scored again, as in s3prl")
        if name in EXPECTED_TRIALS and count != EXPECTED_TRIALS[name]:
            notes.append(f"the official list has {EXPECTED_TRIALS[name]}")
        return f"{name}: {count}" + (f" ({'; '.join(notes)})" if notes else "")

    held_out = len(s.get("dev_speakers", []))
    print(
        f"{s['out_dir']}: {s['utterances']} training utterances, {s['speakers']} speakers "
        + (f"(+{held_out} held out for the dev list) " if held_out else "(all training speakers, as SUPERB) ")
        + f"{s['hours']} h ({s['hours_after_vad']} h after VAD); trials: "
        + ", ".join(trials(n, c) for n, c in s["trials"].items())
    )


if __name__ == "__main__":
    main(sys.argv[1:])
