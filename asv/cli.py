"""`python -m asv embed|verify|score|features|export_onnx|push`: use a trained model from the shell.

    python -m asv verify --model models/demo a.wav b.wav                       # one pair
    python -m asv verify --model models/demo --enroll a1.wav a2.wav --test b.wav   # several enrollment files
    python -m asv embed --model models/demo --list wavs.txt --out emb.npz      # ids, paths, embeddings
    python -m asv score --model models/demo --trials trials.txt --out scores.txt [--enroll_models spk2utt]
    python -m asv features --model exp/run/step-500 --list wavs.txt --out_dir feats/ [--all_layers]
    python -m asv export_onnx --model models/demo                              # models/demo/embedder.onnx
    python -m asv push --model models/demo --repo_id you/superb-asv-demo       # the Hugging Face Hub

--model is a model directory (evaluate.py --export_model), a checkpoint exp/<run>/step-<N> or a Hub id. List and
score-file formats: asv/lists.py. embed, score and features batch like evaluation and shard over processes under
`accelerate launch -m asv ...`. Every bad input ends the command with one line `error: ...` (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from asv.errors import AsvError, ConfigError, ManifestError, describe

# Each command imports what it runs when it runs: the model code (torch, s3prl, accelerate) takes seconds to load, and
# `python -m asv --help` or a mistyped flag should answer at once.
from asv.lists import read_enrollment, read_trial_list, read_wav_list, resolve, score_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other error here, instead of the usage block
        raise ConfigError(f"{message} (python -m {self.prog} --help lists the flags)")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p, batch=True):
        p.add_argument("--model", required=True, help="model directory, checkpoint directory or Hub id")
        p.add_argument("--upstream_ckpt", help="local upstream checkpoint, when not where the model recorded it")
        p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator's, else cuda if available)")
        p.add_argument("--test_effects", type=_bool, help="apply the training gain + VAD (default: the model's)")
        if batch:
            p.add_argument("--max_frames", type=int, default=400_000, help="batch budget in padded samples")
            p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers reading audio")

    p = sub.add_parser("embed", help="embed audio files into an .npz (ids, paths, embeddings)")
    model_args(p)
    p.add_argument("wavs", nargs="*", help="audio files")
    p.add_argument("--list", help="wav list: 'path' or 'id path' per line")
    p.add_argument("--wav_root", help="root of relative paths in --list (default: its folder)")
    p.add_argument("--out", required=True, help="output .npz")

    p = sub.add_parser("verify", help="one trial: score, LLR, P(same), decision")
    model_args(p, batch=False)
    p.add_argument("pair", nargs="*", help="two audio files (or use --enroll / --test)")
    p.add_argument("--enroll", nargs="+", help="enrollment file(s) of the claimed speaker")
    p.add_argument("--test", nargs="+", help="test file(s)")
    p.add_argument("--prior", type=float, default=0.5, help="prior P(same speaker) of P(same)")
    p.add_argument("--threshold", type=float, help="cosine decision threshold (default: the model's)")

    p = sub.add_parser("score", help="score a trial list into a score file")
    model_args(p)
    p.add_argument("--trials", required=True, help="trial list (VoxCeleb, Kaldi/WeSpeaker or unlabelled)")
    p.add_argument("--enroll_models", help="enrollment models: 'model_id wav1 wav2 ...' (spk2utt) per line")
    p.add_argument("--wav_root", help="root of relative audio paths (default: the trial list's folder)")
    p.add_argument("--out", required=True, help="score file to write")
    p.add_argument("--format", default="wespeaker", choices=("wespeaker", "kaldi", "voxceleb"))
    p.add_argument("--score_type", default="cosine", choices=("cosine", "llr"), help="llr needs a calibration")

    p = sub.add_parser("features", help="dump weighted-sum (or all) hidden states per utterance")
    model_args(p)
    p.add_argument("wavs", nargs="*", help="audio files")
    p.add_argument("--list", help="wav list: 'path' or 'id path' per line")
    p.add_argument("--wav_root", help="root of relative paths in --list (default: its folder)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--all_layers", action="store_true", help="every upstream hidden state instead of the sum")
    p.add_argument("--format", default="npy", choices=("npy", "safetensors"))

    p = sub.add_parser("export_onnx", help="write embedder.onnx into a model directory")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")

    p = sub.add_parser("push", help="publish a model directory on the Hugging Face Hub")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--repo_id", required=True, help="owner/name")
    p.add_argument("--private", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        COMMANDS[args.command](args)
        return 0
    except AsvError as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1


def _load(args, accelerator=None):
    from asv.api import load_model

    device = args.device or (str(accelerator.device) if accelerator else None)
    return load_model(args.model, device, args.upstream_ckpt, args.test_effects)


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")


def _wav_items(args) -> list[tuple[str, str]]:
    if bool(args.wavs) == bool(args.list):
        raise ConfigError("give audio files or --list FILE (one of them)")
    items = read_wav_list(Path(args.list), args.wav_root) if args.list else [(None, w) for w in args.wavs]
    _check_files([p for _, p in items], args.list or "the command line")
    return items


def _check_files(paths: list[str], where: str) -> None:
    missing = sorted({p for p in paths if not Path(p).is_file()})
    if missing:
        raise ManifestError(
            f"{where}: {len(missing)} audio file(s) not found (first: {', '.join(missing[:3])}); check the paths "
            "or --wav_root"
        )


def cmd_embed(args) -> None:
    from asv.extract import export_embeddings

    items = [(i or p, p) for i, p in _wav_items(args)]  # unnamed files go by their path
    accelerator = _accelerator()
    model = _load(args, accelerator)
    vectors = model.embed_paths([p for _, p in items], accelerator, args.max_frames, args.num_workers)
    if accelerator.is_main_process:
        export_embeddings(Path(args.out), items, vectors)
        print(f"{len(items)} embeddings ({model.embedder.embed_dim}-d, raw) -> {args.out}")


def cmd_verify(args) -> dict:
    if args.enroll or args.test:
        if args.pair or not (args.enroll and args.test):
            raise ConfigError("pass --enroll FILE [FILE ...] and --test FILE, or two files, not both")
        enroll, test = args.enroll, args.test
    elif len(args.pair) == 2:
        enroll, test = args.pair[:1], args.pair[1:]
    else:
        raise ConfigError("verify takes two audio files, or --enroll FILE [FILE ...] --test FILE")
    _check_files(enroll + test, "verify")
    r = _load(args).verify(enroll, test, args.prior, args.threshold)
    print(f"score {r['score']:.4f} (cosine; {r['enroll_files']} enrollment file(s))")
    if r["llr"] is not None:
        print(f"llr {r['llr']:.4f}, P(same) {r['p_same']:.4f} at prior {r['prior']} ({r['calibration']})")
    else:
        print(f"llr -: {r['calibration']}")
    if r["threshold"] is None:
        print(f"decision -: {r['threshold_source']}")
    else:
        same = "same speaker" if r["same_speaker"] else "different speakers"
        print(f"decision: {same} (threshold {r['threshold']:.4f}: {r['threshold_source']})")
    return r


def cmd_score(args) -> None:
    from asv.metrics import calibrated_metrics, metrics
    from asv.scoring import enrollment_model

    trials, in_fmt = read_trial_list(Path(args.trials))
    root = Path(args.wav_root) if args.wav_root else Path(args.trials).parent
    models = read_enrollment(Path(args.enroll_models), args.wav_root) if args.enroll_models else {}
    names = {name for t in trials for name in (t.enroll, t.test)}
    sides = {name: models.get(name) or [resolve(name, [root])] for name in names}  # a model id, else a file
    files = sorted({f for fs in sides.values() for f in fs})
    _check_files(files, args.trials)
    accelerator = _accelerator()
    model = _load(args, accelerator)
    if args.score_type == "llr" and model.calibration is None:
        raise ConfigError(f"--score_type llr needs a calibrated model: {model.reference()[3]}")
    vectors = model.embed_paths(files, accelerator, args.max_frames, args.num_workers)
    if not accelerator.is_main_process:
        return
    unit = {name: enrollment_model(np.stack([vectors[f] for f in fs])) for name, fs in sides.items()}
    scores = np.array([float(unit[t.enroll] @ unit[t.test]) for t in trials])
    written = model.calibration.llr(scores) if args.score_type == "llr" else scores
    lines = [score_line(args.format, t, s) + "\n" for t, s in zip(trials, written, strict=True)]
    Path(args.out).write_text("".join(lines))
    print(f"{len(trials)} {args.score_type} scores ({in_fmt} trials, {len(files)} files): {args.out} ({args.format})")
    labels = [t.label for t in trials]
    if None in labels or len(set(labels)) < 2:
        return
    m = metrics(scores, labels)
    line = f"EER {m['eer']:.2f}%, minDCF@0.01 {m['min_dcf@0.01']:.4f}, min Cllr {m['min_cllr']:.4f}"
    if model.calibration is not None:
        c = calibrated_metrics(model.calibration.llr(scores), labels)
        line += f", Cllr {c['cllr']:.4f}, actDCF@0.01 {c['act_dcf@0.01']:.4f}"
        line += f" ({model.calibration.describe()}: held-out only if this list shares no trials with it)"
    print(line)


def cmd_features(args) -> None:
    from asv.features import default_ids, dump_features

    items = _wav_items(args)
    named = default_ids([p for _, p in items])  # unnamed files: their path below the files' common folder
    items = [(i or d, p) for (i, p), d in zip(items, named, strict=True)]
    accelerator = _accelerator()
    model = _load(args, accelerator)
    rows = dump_features(
        model.embedder,
        items,
        Path(args.out_dir),
        args.all_layers,
        args.format,
        model.test_effects,
        accelerator,
        args.max_frames,
        args.num_workers,
    )
    if accelerator.is_main_process:
        print(f"{len(rows)} feature files -> {args.out_dir} (index.csv, features.json)")


def cmd_export_onnx(args) -> None:
    from asv.onnx_export import export_onnx

    path = export_onnx(Path(args.model), opset=args.opset)
    print(f"wrote {path} (recorded in {Path(args.model) / 'model.json'})")


def cmd_push(args) -> None:
    from asv.hub import push_to_hub

    print(f"pushed {args.model}: {push_to_hub(args.model, args.repo_id, args.private)}")


COMMANDS = {
    "embed": cmd_embed,
    "verify": cmd_verify,
    "score": cmd_score,
    "features": cmd_features,
    "export_onnx": cmd_export_onnx,
    "push": cmd_push,
}
