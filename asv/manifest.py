"""The prepared-data contract between prepare.py, train.py and evaluate.py: row types, readers and writers.

A prepared data directory holds:
  train.csv          id,wav_path,spk,num_samples   one row per training utterance (raw length in samples)
  speakers.json      {"id10001": 0, ...}           sorted speaker -> class index, the one place it is derived
  vad.json           {"gain_db": -3.0, "vad": "...", "intervals": {id: [[start, end], ...]}}
                     sample intervals the VAD keeps, computed once on the gained audio; their total
                     is the post-VAD length the min_secs filter uses
  trials/<name>.csv  id1,id2,wav_path1,wav_path2,label   label 1 = same speaker, one row per listed trial
  bad_files.txt      path<TAB>reason<TAB>detail         files prepare.py could not use (excluded from the above)
  prepare.json       {"config": ..., "summary": ...}    what produced it (a rerun with the same config is a no-op)
Ids are VoxCeleb-style relative paths ("id10270/x6uYqmx31kE/00001.wav") and always strings.

Trial lists are scored exactly as given: a pair listed twice is scored twice, as s3prl does (SUPERB's
voxceleb1_test_v2.txt lists 338 of its 37,720 pairs twice, in either order).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

from asv.errors import ManifestError
from asv.lists import read_trial_list, resolve

TRAIN_FIELDS = ["id", "wav_path", "spk", "num_samples"]
TRIAL_FIELDS = ["id1", "id2", "wav_path1", "wav_path2", "label"]
# The trial list prepare.py builds from held-out training speakers (trials/dev.csv): it selects checkpoints.
DEV_LIST = "dev"


@dataclass
class Utterance:
    id: str
    wav_path: str
    spk: str
    num_samples: int


@dataclass
class Trial:
    id1: str
    id2: str
    wav_path1: str
    wav_path2: str
    label: int


def write_csv(path: Path, fields: list[str], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, k) for k in fields])
    tmp.replace(path)  # never leave a half-written manifest behind


def _read_csv(path: Path, fields: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, the row's values of `fields` in that order) pairs; every value a string (ids like '00012' keep
    their zeros: s3prl#481). Read as csv.DictReader reads (blank lines skipped, a repeated column name meaning its
    last column) at a fraction of its cost per row, which a train.csv of 1.09 M rows (VoxCeleb2) pays."""
    if not path.is_file():
        raise ManifestError(f"{path} not found: run prepare.py first (or pass the right --data_dir)")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = set(fields) - set(header)
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected {','.join(fields)}")
        column = {name: k for k, name in enumerate(header)}
        pick = itemgetter(*(column[k] for k in fields))
        needed = max(column[k] for k in fields) + 1
        rows = []
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            # Where DictReader would file extra cells under None, or fill a missing one we read with None.
            if len(row) > len(header) or len(row) < needed:
                raise ManifestError(f"{path}:{line}: expected {len(header)} comma-separated fields")
            values = pick(row)
            if not all(map(str.strip, values)):
                raise ManifestError(
                    f"{path}:{line}: empty {next(k for k, v in zip(fields, values, strict=True) if not v.strip())}"
                )
            rows.append((line, values))
        return rows


def read_train_csv(path: Path) -> list[Utterance]:
    utterances, first_line = [], {}
    for line, (utt_id, wav_path, spk, num_samples) in _read_csv(path, TRAIN_FIELDS):
        if utt_id in first_line:
            raise ManifestError(f"{path}:{line}: duplicate id {utt_id!r} (first at line {first_line[utt_id]})")
        first_line[utt_id] = line
        if not num_samples.isdigit():
            raise ManifestError(f"{path}:{line}: num_samples must be a non-negative integer, got {num_samples!r}")
        utterances.append(Utterance(utt_id, wav_path, spk, int(num_samples)))
    return utterances


def check_trials(path: Path, rows: list[tuple[int, Trial]]) -> list[Trial]:
    """The trials, every one kept. A pair listed with both labels (in either order) is an error naming both
    lines; so is an utterance id naming two different files."""
    labels: dict[tuple[str, str], tuple[int, int]] = {}
    paths: dict[str, tuple[str, int]] = {}
    for line, t in rows:
        for utt, wav in ((t.id1, t.wav_path1), (t.id2, t.wav_path2)):
            prev = paths.setdefault(utt, (wav, line))
            if prev[0] != wav:
                raise ManifestError(f"{path}:{line}: id {utt!r} is {wav}, but {prev[0]} at line {prev[1]}")
        first, label = labels.setdefault((min(t.id1, t.id2), max(t.id1, t.id2)), (line, t.label))
        if label != t.label:
            raise ManifestError(f"{path}:{line}: pair listed with label {t.label} here and {label} at line {first}")
    return [t for _, t in rows]


def repeated_pairs(trials: list[Trial]) -> int:
    """How many trials repeat a pair listed before them, in either order (information: they are scored)."""
    return len(trials) - len({(min(t.id1, t.id2), max(t.id1, t.id2)) for t in trials})


def read_trials_csv(path: Path) -> list[Trial]:
    rows = []
    for line, (id1, id2, wav_path1, wav_path2, label) in _read_csv(path, TRIAL_FIELDS):
        if label not in ("0", "1"):
            raise ManifestError(f"{path}:{line}: label must be 0 or 1, got {label!r}")
        rows.append((line, Trial(id1, id2, wav_path1, wav_path2, int(label))))
    return check_trials(path, rows)


def read_text_trials(path: Path, roots: Sequence[Path] | None = None) -> list[Trial]:
    """A labelled text trial list (asv.lists.read_trial_list: VoxCeleb `<1|0> a b` or Kaldi `a b target|nontarget`)
    as Trials in order, checked as the prepared lists are. With `roots`, each relative path resolves against them
    (asv.lists.resolve) and every file must exist; without, the paths stay as written (ids stay strings)."""
    listed, fmt = read_trial_list(path)
    if fmt == "unlabelled":
        raise ManifestError(
            f"{path}: unlabelled trials ('enroll test'); scoring needs a label on every line: "
            "'<1|0> enroll test' or 'enroll test target|nontarget'"
        )
    names = {name for t in listed for name in (t.enroll, t.test)}
    found = {name: resolve(name, roots) if roots else name for name in names}  # each name resolved once
    missing = sorted(name for name, p in found.items() if roots and not Path(p).is_file())
    if missing:
        raise ManifestError(
            f"{path}: {len(missing)} utterances not found under {', '.join(map(str, roots))} "
            f"(first: {', '.join(missing[:3])}); pass --wav_root DIR"
        )
    rows = [(t.line, Trial(t.enroll, t.test, found[t.enroll], found[t.test], t.label)) for t in listed]
    return check_trials(path, rows)


def read_voxceleb_trials(path: Path) -> list[tuple[int, str, str]]:
    """(label, utt1, utt2) per trial of a labelled text trial list, in order, as written (read_text_trials)."""
    return [(t.label, t.id1, t.id2) for t in read_text_trials(path)]


def speaker_map(utterances: list[Utterance]) -> dict[str, int]:
    return {spk: i for i, spk in enumerate(sorted({u.spk for u in utterances}))}


def trial_sets(data_dir: Path) -> dict[str, Path]:
    """Prepared trial lists by name (file stem)."""
    return {p.stem: p for p in sorted((Path(data_dir) / "trials").glob("*.csv"))}


def unique_utterances(trials: list[Trial]) -> list[tuple[str, str]]:
    """Unique (id, wav_path) over both trial columns, sorted by path: each audio file is embedded exactly
    once, even when two lists name it differently."""
    seen = {}
    for t in trials:
        seen.setdefault(t.wav_path1, t.id1)
        seen.setdefault(t.wav_path2, t.id2)
    return [(i, p) for p, i in sorted(seen.items())]


def make_trials(utts: list[tuple[str, str, str]], num_trials: int, seed: int | np.random.Generator) -> list[Trial]:
    """Balanced trials over (id, wav_path, spk) with VoxCeleb-style ids (spk/video/utt): up to num_trials // 2
    same-speaker pairs, across videos first (the harder, VoxCeleb-like case) and topped up with same-video
    ones, and as many different-speaker pairs; no pair twice; random order and random enrolment side.
    Memory grows with the same-speaker pairs only, so it also serves for large dev lists."""
    rng = np.random.default_rng(seed)
    half = num_trials // 2
    by_spk: dict[str, list[int]] = {}
    for k, (_, _, spk) in enumerate(utts):
        by_spk.setdefault(spk, []).append(k)
    video = [u[0].split("/")[1] if u[0].count("/") >= 2 else "" for u in utts]
    same = [(a, b) for idx in by_spk.values() for n, a in enumerate(idx) for b in idx[n + 1 :]]
    cross = [p for p in same if video[p[0]] != video[p[1]] or not video[p[0]]]
    crossing = set(cross)
    same_video = [p for p in same if p not in crossing]
    targets = [cross[k] for k in rng.permutation(len(cross))[:half]]
    targets += [same_video[k] for k in rng.permutation(len(same_video))[: half - len(targets)]]
    num_non = len(utts) * (len(utts) - 1) // 2 - len(same)
    non_targets: set[tuple[int, int]] = set()
    while len(non_targets) < min(len(targets), num_non):
        a, b = (int(x) for x in rng.integers(len(utts), size=2))
        if utts[a][2] != utts[b][2]:
            non_targets.add((min(a, b), max(a, b)))
    pairs = [(1, a, b) for a, b in targets] + [(0, a, b) for a, b in sorted(non_targets)]
    out = []
    for k in rng.permutation(len(pairs)):
        label, a, b = pairs[k]
        if rng.random() < 0.5:
            a, b = b, a
        out.append(Trial(utts[a][0], utts[b][0], utts[a][1], utts[b][1], label))
    return out
