"""`make demo`: generate + prepare the demo corpus, train on fbank, evaluate every checkpoint, compare.

Prints one table (per checkpoint EER %, minDCF@0.01, minDCF@0.05, plus the untrained step-0 model and a
mean-MFCC cosine baseline on the same trials) and writes exp/demo/summary.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from asv.audio import load_audio
from asv.baseline import mean_mfcc_scores
from asv.manifest import read_trials_csv
from asv.metrics import metrics

ROOT = Path(__file__).resolve().parents[1]

DATA, EXP, CONFIG = ROOT / "data/demo", ROOT / "exp/demo", ROOT / "configs/demo.yaml"


def run(args: list[str]) -> float:
    t0 = time.time()
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.time() - t0


def main() -> dict:
    # 88 training-side speakers, 8 held out: 80 train (as before the dev split) and the dev list picks the checkpoint.
    run(["prepare.py", "--dataset", "demo", "--demo_train_speakers", "88", "--dev_speakers", "8"])
    if EXP.exists():  # the demo always trains from scratch so its timings mean something
        shutil.rmtree(EXP)
    train_seconds = run(["train.py", "--config_path", str(CONFIG)])
    eval_seconds = run(["evaluate.py", "--exp_dir", str(EXP)])

    trials = read_trials_csv(DATA / "trials" / "demo_test.csv")
    labels = np.array([t.label for t in trials])
    baseline = metrics(mean_mfcc_scores([(t.wav_path1, t.wav_path2) for t in trials], load_audio), labels)
    rows = {
        int(p.parent.name.split("-")[1]): json.loads((p).read_text())
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
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "trials": len(trials),
    }
    (EXP / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = (
        summary["trained_eer"] <= summary["untrained_eer"] / 2 and summary["trained_eer"] < summary["mfcc_baseline_eer"]
    )
    print(
        f"\ntrain {train_seconds:.0f} s, evaluate {eval_seconds:.0f} s; final EER {summary['trained_eer']:.2f}% vs "
        f"untrained {summary['untrained_eer']:.2f}% and mean-MFCC {summary['mfcc_baseline_eer']:.2f}%: "
        f"{'training worked' if ok else 'TRAINING DID NOT BEAT THE REFERENCES'}"
    )
    print(f"summary: {EXP / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
