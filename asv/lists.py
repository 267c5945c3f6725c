"""The text list and score-file formats `python -m asv` and evaluate.py read and write, in other toolkits' shapes.

Read:
  wav list        one file per line: `path`, or `id path`
  enrollment      one speaker model per line, Kaldi spk2utt style `model_id wav1 wav2 ...` or `model_id wav1,wav2`
  trial list      per line one of (the whole file in one format):
                    `<1|0> enroll test`               VoxCeleb / s3prl
                    `enroll test target|nontarget`    Kaldi trials, WeSpeaker
                    `enroll test`                     unlabelled
                  `enroll` (and `test`) name an enrollment model id when one is defined, else an audio file.
Write (score files):
  wespeaker       `enroll test score [target|nontarget]`   (the label when the trial list has one)
  kaldi           `enroll test score`
  voxceleb        `score enroll test`                       (VoxSRC submission order)
Relative audio paths resolve against a root (default: the list's own folder), in VoxCeleb's layout too: `resolve`,
the one place a relative audio path becomes a file (evaluate.py's --trials and `python -m asv` alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asv.errors import ManifestError

SCORE_FORMATS = ("wespeaker", "kaldi", "voxceleb")
KALDI_LABELS = {"target": 1, "nontarget": 0}
# Where a relative path is looked for below a root: the root itself, then VoxCeleb's layout (lists name
# <spk>/<video>/<utt>.wav below wav/ of the corpus, or of its test/ or dev/ part).
SEARCHED_SUBDIRS = (".", "wav", "test/wav", "dev/wav")


@dataclass
class ListedTrial:
    enroll: str  # as written in the list: a model id or a path
    test: str
    label: int | None  # 1 same speaker, 0 different, None unlabelled
    line: int


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read {path} ({err})") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise ManifestError(f"{path} is empty")
    return rows


def resolve(path: str, roots: Sequence[Path]) -> str:
    """An absolute path as it is; a relative one below the first root that has it (SEARCHED_SUBDIRS, in order), else
    below the first root, as written (the caller reports it missing)."""
    if Path(path).is_absolute():
        return str(Path(path))
    options = [Path(root) / sub / path for root in roots for sub in SEARCHED_SUBDIRS]
    return str(next((o for o in options if o.is_file()), options[0]))


def read_wav_list(path: Path, root: Path | None = None) -> list[tuple[str | None, str]]:
    """(id, path) per line; the id is None on 'path'-only lines (the caller names those files)."""
    root = Path(root) if root else Path(path).parent
    out = []
    for n, parts in _lines(path):
        if len(parts) not in (1, 2):
            raise ManifestError(f"{path}:{n}: expected 'path' or 'id path', got {' '.join(parts)[:80]!r}")
        out.append((parts[0] if len(parts) == 2 else None, resolve(parts[-1], [root])))
    return out


def read_enrollment(path: Path, root: Path | None = None) -> dict[str, list[str]]:
    """{model id: [audio paths]} from spk2utt-style lines (files separated by spaces or commas)."""
    root = Path(root) if root else Path(path).parent
    models: dict[str, list[str]] = {}
    for n, parts in _lines(path):
        files = [f for part in parts[1:] for f in part.split(",") if f]
        if not files:
            raise ManifestError(f"{path}:{n}: expected 'model_id wav1 [wav2 ...]', got {' '.join(parts)[:80]!r}")
        if parts[0] in models:
            raise ManifestError(f"{path}:{n}: model {parts[0]!r} is defined twice")
        models[parts[0]] = [resolve(f, [root]) for f in files]
    return models


def _row_format(parts: list[str]) -> str | None:
    if len(parts) == 3 and parts[0] in ("0", "1"):
        return "voxceleb"
    if len(parts) == 3 and parts[2] in KALDI_LABELS:
        return "kaldi"
    if len(parts) == 2:
        return "unlabelled"
    return None


def read_trial_list(path: Path) -> tuple[list[ListedTrial], str]:
    """The trials of a text trial list in order, and the format it is in (the first line decides; every line must
    agree). The one text trial-list parser: `python -m asv score` reads it directly, evaluate.py through
    asv.manifest.read_text_trials."""
    rows = _lines(path)
    fmt = _row_format(rows[0][1])
    expected = {
        "voxceleb": "'<1|0> enroll test'",
        "kaldi": "'enroll test target|nontarget'",
        "unlabelled": "'enroll test'",
    }
    if fmt is None:
        raise ManifestError(
            f"{path}:{rows[0][0]}: not a trial line: expected {', '.join(expected.values())}, "
            f"got {' '.join(rows[0][1])[:80]!r}"
        )
    trials = []
    for n, parts in rows:
        if _row_format(parts) != fmt:
            raise ManifestError(
                f"{path}:{n}: expected {expected[fmt]} like line {rows[0][0]}, got {' '.join(parts)[:80]!r}"
            )
        if fmt == "voxceleb":
            trials.append(ListedTrial(parts[1], parts[2], int(parts[0]), n))
        elif fmt == "kaldi":
            trials.append(ListedTrial(parts[0], parts[1], KALDI_LABELS[parts[2]], n))
        else:
            trials.append(ListedTrial(parts[0], parts[1], None, n))
    return trials, fmt


def score_line(fmt: str, trial: ListedTrial, score: float) -> str:
    if fmt == "wespeaker":
        label = "" if trial.label is None else (" target" if trial.label else " nontarget")
        return f"{trial.enroll} {trial.test} {score:.6f}{label}"
    if fmt == "kaldi":
        return f"{trial.enroll} {trial.test} {score:.6f}"
    if fmt == "voxceleb":
        return f"{score:.6f} {trial.enroll} {trial.test}"
    raise ManifestError(f"unknown score format {fmt!r}; choose one of: {', '.join(SCORE_FORMATS)}")
