"""Lists for trying `python -m asv` on the demo corpus's test speakers (README "Using a trained model").

    python tools/demo_lists.py data/demo_lists        # after `make demo` (or prepare.py --dataset demo)

Writes, for the test speakers of data/demo_corpus (none of them seen in training):
  wavs.txt          every test file, one per line
  spk2utt           one enrollment model per speaker: all files of its first two recordings (Kaldi spk2utt style)
  spk2utt_single    the same models from one file only (the first)
  trials.txt        Kaldi-format trials `model test target|nontarget`: every model against every file of the
                    speakers' last recording (every recording has its own channel, so targets cross channels)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", type=Path, default=Path("data/demo_corpus/test/wav"))
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        raise SystemExit(f"error: {args.corpus} does not exist; run `make demo` (or prepare.py --dataset demo) first")
    speakers = sorted(p.resolve() for p in args.corpus.iterdir() if p.is_dir())  # absolute: lists work anywhere
    recordings = {s.name: sorted(v for v in s.iterdir() if v.is_dir()) for s in speakers}
    enroll = {s: [str(w) for v in videos[:-1] for w in sorted(v.glob("*.wav"))] for s, videos in recordings.items()}
    tests = [(s, str(w)) for s, videos in recordings.items() for w in sorted(videos[-1].glob("*.wav"))]
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    every = sorted({w for files in enroll.values() for w in files} | {w for _, w in tests})
    (out / "wavs.txt").write_text("".join(f"{w}\n" for w in every))
    (out / "spk2utt").write_text("".join(f"{s} {' '.join(files)}\n" for s, files in enroll.items()))
    (out / "spk2utt_single").write_text("".join(f"{s} {files[0]}\n" for s, files in enroll.items()))
    lines = [f"{m} {w} {'target' if m == s else 'nontarget'}\n" for s, w in tests for m in enroll]
    (out / "trials.txt").write_text("".join(lines))
    print(f"{len(enroll)} models, {len(tests)} test files, {len(lines)} trials -> {out}")


if __name__ == "__main__":
    main()
