"""`make demo`: generate + prepare the demo corpus, train on fbank, evaluate every checkpoint, compare.

    make demo                        # setup (once), then this
    python tools/demo.py [--seed 1]  # this alone, in .venv; --seed changes the training seed (corpus fixed)

Four stages, each announced with its number and followed by its time; inside each, the script's own
progress (a bar on a terminal, plain lines in a log). Prints one table (per checkpoint EER %, minDCF@0.01,
minDCF@0.05, plus the untrained step-0 model and a mean-MFCC cosine baseline on the same trials), the
checkpoint selected on the held-out dev speakers, the acceptance check, and the wall time of the whole
command; writes exp/demo/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from asv.audio import load_audio
from asv.baseline import mean_mfcc_scores
from asv.corpora import worker_count
from asv.manifest import read_trials_csv
from asv.metrics import metrics

ROOT = Path(__file__).resolve().parents[1]

DATA, EXP, CONFIG = ROOT / "data/demo", ROOT / "exp/demo", ROOT / "configs/demo.yaml"
# 88 training-side speakers, 8 held out: 80 train and the dev list picks the checkpoint.
PREPARE = ["--dataset", "demo", "--demo_train_speakers", "88", "--dev_speakers", "8"]
# What the demo must show: the trained x-vector well below the untrained signal-processing baseline, within a
# time budget that fits 2 CPU cores of either vendor (issue 14).
MAX_EER_VS_BASELINE = 0.7
MAX_TRAIN_EVAL_SECONDS = 300
STAGES = 4


def stage(number: int, title: str) -> float:
    print(f"\n[demo {number}/{STAGES}] {title}", flush=True)
    return time.time()


def run(args: list[str], env: dict[str, str]) -> float:
    t0 = time.time()
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, env=env)
    return time.time() - t0


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def machine() -> str:
    """The CPU and the threads torch will use: the demo's times depend on both (README, 'The demo')."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    blocks = [dict(line.split(":", 1) for line in b.splitlines() if ":" in line) for b in info.split("\n\n")]
    blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks if b]
    model = blocks[0].get("model name", "unknown CPU") if blocks else "unknown CPU"
    flags = blocks[0].get("flags", "").split() if blocks else []
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    # Logical CPUs sharing a core (SMT siblings) share its FMA units: what matters for GEMM throughput.
    cores = len({(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b})
    usable = worker_count(None)  # the cores this process may run on
    physical = f" on {cores} physical core{'s' if cores != 1 else ''}" if cores else ""
    return (
        f"{model} ({isa}); {usable} usable logical CPUs{physical}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="training seed (the corpus stays the same)")
    # `make demo` passes the time it started, so the closing line covers setup too.
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    t_start = args.started or time.time()
    t_script = time.time()
    env = dict(os.environ)  # W&B offline unless you are logged in (or set WANDB_MODE), as for train.py
    host = machine()
    print(f"machine: {host}", flush=True)

    t0 = stage(1, "prepare: generate the demo corpus (once) and write the manifests")
    run(["prepare.py", *PREPARE], env)
    prepare_seconds = time.time() - t0

    stage(2, f"train: SUPERB's x-vector on fbank, configs/demo.yaml (seed {args.seed})")
    if EXP.exists():  # the demo always trains from scratch so its timings mean something
        shutil.rmtree(EXP)
    train_seconds = run(["train.py", "--config_path", str(CONFIG), "--seed", str(args.seed)], env)

    stage(3, "evaluate: every checkpoint on the test trials and the dev list")
    eval_seconds = run(["evaluate.py", "--exp_dir", str(EXP)], env)

    t0 = stage(4, "baseline: mean-MFCC cosine scores on the same trials")
    trials = read_trials_csv(DATA / "trials" / "demo_test.csv")
    labels = np.array([t.label for t in trials])
    pairs = [(t.wav_path1, t.wav_path2) for t in trials]
    baseline = metrics(mean_mfcc_scores(pairs, load_audio, desc="mean-MFCC"), labels)
    baseline_seconds = time.time() - t0

    rows = {
        int(p.parent.name.split("-")[1]): json.loads(p.read_text())
        for p in (EXP / "evaluate" / "demo_test").glob("step-*/results.json")
    }
    steps = sorted(rows)
    best = min((rows[s] for s in steps if s > 0), key=lambda r: r["eer"])
    selected = json.loads((EXP / "evaluate" / "demo_test" / "selected_result.json").read_text())

    print(f"\ndemo results on {len(trials)} trials (exp/demo/evaluate/demo_test)")
    print(f"{'system':<28} {'EER %':>7} {'minDCF@0.01':>12} {'minDCF@0.05':>12}")
    print(
        f"{'mean-MFCC cosine baseline':<28} {baseline['eer']:>7.2f} {baseline['min_dcf@0.01']:>12.4f} "
        f"{baseline['min_dcf@0.05']:>12.4f}"
    )
    for s in steps:
        name = "step 0 (untrained)" if s == 0 else f"step {s}"
        name += " *" if s == selected["step"] else ""
        r = rows[s]
        print(f"{name:<28} {r['eer']:>7.2f} {r['min_dcf@0.01']:>12.4f} {r['min_dcf@0.05']:>12.4f}")
    print(
        f"* selected on the held-out dev speakers: step {selected['step']}, test EER {selected['eer']:.2f}% "
        f"(best on test, SUPERB's protocol: step {best['step']}, {best['eer']:.2f}%)"
    )
    print(f"DET curves: {EXP / 'evaluate' / 'demo_test' / 'det.png'}")

    wall = time.time() - t_start
    summary = {
        # trained_eer is the last checkpoint's: picking the best one on these trials would be selecting on test.
        "untrained_eer": rows[0]["eer"],
        "trained_eer": rows[steps[-1]]["eer"],
        "trained_step": steps[-1],
        "selected_on_dev_step": selected["step"],
        "selected_on_dev_eer": selected["eer"],
        "best_on_test_eer": best["eer"],
        "best_on_test_step": best["step"],
        "mfcc_baseline_eer": baseline["eer"],
        "trials": len(trials),
        "seed": args.seed,
        "setup_seconds": round(t_script - t_start, 1),
        "prepare_seconds": round(prepare_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "baseline_seconds": round(baseline_seconds, 1),
        "wall_seconds": round(wall, 1),
        "machine": host,
    }
    (EXP / "summary.json").write_text(json.dumps(summary, indent=1))
    bound = MAX_EER_VS_BASELINE * summary["mfcc_baseline_eer"]
    worked = summary["trained_eer"] <= bound
    in_time = train_seconds + eval_seconds <= MAX_TRAIN_EVAL_SECONDS
    print(
        f"\nfinal EER {summary['trained_eer']:.2f}% vs mean-MFCC {summary['mfcc_baseline_eer']:.2f}% "
        f"(x{summary['trained_eer'] / summary['mfcc_baseline_eer']:.2f}; the demo asks <= x{MAX_EER_VS_BASELINE}) "
        f"and untrained {summary['untrained_eer']:.2f}%: "
        + ("training worked" if worked else "TRAINING DID NOT BEAT THE BASELINE BY THE MARGIN")
    )
    print(
        f"train {train_seconds:.0f} s + evaluate {eval_seconds:.0f} s = {train_seconds + eval_seconds:.0f} s "
        f"(budget {MAX_TRAIN_EVAL_SECONDS} s{'' if in_time else ': OVER'}); prepare {prepare_seconds:.0f} s, "
        f"baseline {baseline_seconds:.0f} s" + (f", setup {summary['setup_seconds']:.0f} s" if args.started else "")
    )
    print(f"summary: {EXP / 'summary.json'}")
    print(f"{'make demo' if args.started else 'tools/demo.py'} took {minutes(wall)} in all")
    return summary


if __name__ == "__main__":
    main()
