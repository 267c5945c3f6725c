"""The GPU check of issue 11: s3prl's SuperbASV runner vs ours on full-size random upstreams, one GPU.

    bash bench/fetch_wheels.sh && bash bench/gpu_check.sh     # on the GPU machine (see bench/README.md)
    bash bench/gpu_check.sh --cpu                              # dry run here: tiny upstreams, tiny sizes, CPU

For HuBERT Base (95 M, hubert_local) and WavLM Large (317 M, wavlm_local), random weights built on the spot
(asv.random_upstreams): training at SUPERB's batch (10 x accumulation 5) on a VoxCeleb1-like corpus
(bench/common.py LONG: 4-12 s utterances, so batches are padded to the 8 s crop as on VoxCeleb1) with
s3prl's runner in fp32, ours in fp32 and ours with the frozen upstream in bf16 (--upstream_precision bf16):
updates/s and peak GPU memory; evaluation (s3prl's stage 3 at batch 1 vs ours batched, fp32 and bf16 upstream)
in utterances/s, with the same-weights EER check and the cosine between s3prl's embeddings and ours. It records the
fp32 precision flags in force in our x-vector's forward (a hook on the downstream) in that evaluation and in one
training step (asv.training.train_step), and outside it. From its own measurements it projects the wall time of the
full SUPERB run (200,000 updates of 50 utterances) and of one pass over VoxCeleb1's 4,874 test utterances.
Writes gpu_check-<mode>-<time>.md and .json under --out_dir (and into $OUT when that is set: the device tool
brings back what is there). The --cpu dry mode runs every part with tiny upstreams and tiny sizes; its figures
are CPU figures and say so.
"""

from __future__ import annotations

import os

# Before anything imports tqdm (its settings are read when the class is defined): s3prl's evaluation loop
# would draw a bar per utterance (bench/eval_speed.py; the training children drop the variable again).
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import eval_speed, train_speed  # noqa: E402
from bench.common import ROOT, WORK, gib, gpu_description, machine_banner  # noqa: E402

# SUPERB ASV's full run (s3prl's SuperbASV default_config): 200,000 updates of 10 x 5 utterances.
FULL_UPDATES, FULL_BATCH, FULL_ACCUMULATE = 200_000, 10, 5
VOXCELEB1_TEST_UTTERANCES = 4_874
SIDES = [
    ("s3prl", "s3prl runner, fp32"),
    ("ours", "ours, fp32"),
    ("ours_bf16", "ours, upstream bf16"),
]
# Per mode: corpus, device, DataLoader workers (s3prl's default is 6), batch and accumulation, the upstreams
# (hub name, random_upstreams size, label) and how much of each to time. The GPU plan fits ~8 minutes on one
# H100/H200; the dry run's sizes only exercise the code.
PLANS = {
    "gpu": dict(
        corpus="long",
        device="cuda",
        workers=6,
        batch=FULL_BATCH,
        accumulate=FULL_ACCUMULATE,
        upstreams=[("hubert_local", "base", "HuBERT Base"), ("wavlm_local", "large", "WavLM Large")],
        updates=20,  # x 3 sides x 2 upstreams, with evaluation: the plan's 8 minutes
        warmup=3,
        max_utts=100,
    ),
    "cpu": dict(
        corpus="tiny",
        device="cpu",
        workers=0,  # no worker processes to start (and import librosa) for a handful of tiny batches
        batch=4,
        accumulate=2,
        # One upstream: the loop over upstreams is the same code either way, and each costs the dry run (a CI
        # test) about a minute of process starts. The Large-style feature extractor is built and run by
        # tests/test_batch_exact.py and tests/test_ssl_tiny.py.
        upstreams=[("hubert_local", "tiny", "tiny HuBERT")],
        updates=2,
        warmup=1,
        max_utts=8,
    ),
}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def check_upstream(plan: dict, name: str, size: str, label: str, out_dir: Path) -> dict:
    """Train and eval benches for one upstream; returns their figures."""
    from asv.random_upstreams import FILES, build_random_upstreams

    t0 = time.monotonic()
    ckpt = WORK / "upstreams" / size / FILES[name]
    if not ckpt.exists():  # the weights are random and seeded: a file from an earlier run is the same
        build_random_upstreams(ckpt.parent, size, [name])
    print(f"\n=== {label}: {name} {ckpt} (built in {time.monotonic() - t0:.0f} s)", flush=True)
    common = ["--upstream", name, "--upstream_ckpt", str(ckpt), "--corpus", plan["corpus"], "--device", plan["device"]]
    train_json, eval_json = out_dir / f"train-{name}-{size}.json", out_dir / f"eval-{name}-{size}.json"
    t0 = time.monotonic()
    train_speed.main(
        common
        + ["--batch_size", str(plan["batch"]), "--accumulate", str(plan["accumulate"])]
        + ["--workers", str(plan["workers"]), "--updates", str(plan["updates"]), "--warmup", str(plan["warmup"])]
        + ["--sides", ",".join(side for side, _ in SIDES), "--no_extras", "--json_out", str(train_json)]
    )
    train_s = time.monotonic() - t0
    t0 = time.monotonic()
    eval_speed.main(
        common
        + ["--max_utts", str(plan["max_utts"]), "--repeats", "1", "--extra_precision", "bf16"]
        + ["--workers", str(plan["workers"]), "--s3prl_workers", str(plan["workers"])]
        + ["--json_out", str(eval_json)]
    )
    eval_s = time.monotonic() - t0
    return {
        "label": label,
        "upstream": name,
        "size": size,
        "train": json.loads(train_json.read_text()),
        "eval": json.loads(eval_json.read_text()),
        "train_step_precision": train_step_precision(plan["device"], name, str(ckpt)),
        "seconds": {"train": train_s, "eval": eval_s},
    }


def train_step_precision(device: str, name: str, ckpt: str) -> dict:
    """The fp32 precision flags in force when our x-vector's forward starts in one real training step
    (asv.training.train_step, train.py's step: fp32, the frozen upstream on `device`), and outside it after the
    step. The flags do not depend on the audio: two seeded random utterances stand in for a batch of the corpus."""
    from accelerate import Accelerator

    from asv.config import TrainConfig, parse
    from asv.forward import fp32_precision
    from asv.models import build_speaker_model
    from asv.training import RunningStats, Trainee, train_step
    from asv.upstream import build_upstream

    cfg, _ = parse(TrainConfig, ["--upstream", name, "--upstream_ckpt", ckpt, "--mixed_precision", "no"])
    accelerator = Accelerator(mixed_precision="no", cpu=device == "cpu")
    upstream = build_upstream(name, ckpt, cfg.model.upstream_normalize).to(accelerator.device)
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    in_downstream: list[dict] = []
    eval_speed.record_fp32_precision(accelerator.unwrap_model(model).downstream, in_downstream)
    lengths = torch.tensor([3 * 16_000, 2 * 16_000])
    wav = torch.randn(2, int(lengths.max()), generator=torch.Generator().manual_seed(0)) * 0.1
    model.train()
    trainee = Trainee(model, upstream, optimizer, None)
    train_step(accelerator, trainee, (wav, lengths, torch.tensor([0, 1])), RunningStats(accelerator.device, 3))
    outside = fp32_precision()
    del model, optimizer, trainee, upstream
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next upstream's benches run in child processes: leave them the memory
    return {"in_downstream": in_downstream, "outside": outside}


def cosine(x: float) -> str:
    """A cosine near 1 with its distance from 1 (what decides whether two embeddings agree)."""
    return f"{x:.8f} (1 - cos {1 - x:.1e})"


def report(mode: str, plan: dict, results: list[dict], environment: dict) -> str:
    """The markdown report: environment, training and evaluation tables (EER check), embeddings vs s3prl's,
    downstream precision, projection."""
    unit = "GPU" if mode == "gpu" else "CPU (dry run, tiny upstreams: NOT a GPU figure)"
    lines = [f"# GPU check ({mode} mode), {environment['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in environment.items() if k != "date"]
    lines += [
        f"- plan: corpus {plan['corpus']}, batch {plan['batch']} x accumulation {plan['accumulate']}, "
        f"{plan['workers']} DataLoader workers per side; {plan['updates']} timed updates after {plan['warmup']} "
        f"warm-up per training run; evaluation on at most {plan['max_utts']} test utterances",
        "",
        f"## Training ({unit})",
        "",
        "| upstream | side | updates/s | s/update | padded audio s/update | peak GPU memory | vs s3prl |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s3 = r["train"]["s3prl"]["updates_per_s"]
        for side, label in SIDES:
            x = r["train"][side]
            mem = gib(x["peak_cuda_allocated"]) if x["peak_cuda_allocated"] else "n/a (CPU)"
            lines.append(
                f"| {r['label']} | {label} | {x['updates_per_s']:.3f} | {1 / x['updates_per_s']:.3f} | "
                f"{x['padded_seconds_per_update']:.0f} | {mem} | {x['updates_per_s'] / s3:.2f}x |"
            )
    lines += [
        "",
        f"## Evaluation ({unit}): steady-state utterances/s (each side's model build left out)",
        "",
        "| upstream | utterances | s3prl batch 1 | ours batched fp32 | ours batched, upstream bf16 | ours/s3prl | "
        "EER s3prl | EER ours | difference (<= 0.01) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["eval"]
        verdict = eval_speed.eer_verdict(e["eer_difference"], e["max_score_difference"], e["swapped_pairs"])
        lines.append(
            f"| {r['label']} | {e['utterances']} | {e['s3prl']['utt_per_s']:.2f} | {e['ours']['utt_per_s']:.2f} | "
            f"{e['ours_bf16']['utt_per_s']:.2f} | {e['ratio']:.2f}x | {e['s3prl']['eer']:.3f}% | "
            f"{e['ours']['eer']:.3f}% | {e['eer_difference']:.3f} ({verdict}) |"
        )
    lines += [
        "",
        "## Embeddings: ours vs s3prl's stage 3 (batch 1), same weights",
        "",
        "Cosine between s3prl's embedding of each test utterance and ours, over the evaluation's utterances.",
        "",
        "| upstream | embeddings | fp32: min cosine | fp32: mean cosine | upstream bf16: min cosine | "
        "upstream bf16: mean cosine |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        fp32, bf16 = r["eval"]["ours"]["cosine_vs_s3prl"], r["eval"]["ours_bf16"]["cosine_vs_s3prl"]
        lines.append(
            f"| {r['label']} | {fp32['embeddings']} | {cosine(fp32['min'])} | {cosine(fp32['mean'])} | "
            f"{cosine(bf16['min'])} | {cosine(bf16['mean'])} |"
        )
    lines += [
        "",
        "## Downstream fp32 precision",
        "",
        "PyTorch's fp32 precision flags (asv.forward.fp32_precision) in force when our x-vector's forward starts, "
        "recorded by a hook on the downstream during the real calls, and in the same process outside it "
        "(`none`: PyTorch's default for the backend, TF32 for cuDNN convolutions, IEEE for CUDA matmuls). "
        "s3prl's TDNN is a Linear layer, a matmul: IEEE fp32 by PyTorch's default.",
        "",
        "| upstream | call | in the x-vector's forward | outside it |",
        "|---|---|---|---|",
    ]
    for r in results:
        calls = [
            ("embedding, ours fp32", r["eval"]["ours"]["downstream_precision"]),
            ("embedding, ours upstream bf16", r["eval"]["ours_bf16"]["downstream_precision"]),
            ("training step, ours fp32", r["train_step_precision"]),
        ]
        for call, p in calls:
            lines.append(
                f"| {r['label']} | {call} | {eval_speed.describe_precision(p['in_downstream'])} | "
                f"{eval_speed.describe_precision(p['outside'])} |"
            )
    lines += [
        "",
        f"## Projection from these {unit} figures",
        "",
        f"Full SUPERB ASV: {FULL_UPDATES:,} updates x {FULL_BATCH * FULL_ACCUMULATE} utterances "
        f"(wall time = {FULL_UPDATES:,} / updates/s; training only, no checkpoint evaluation)"
        + (
            ""
            if plan["batch"] * plan["accumulate"] == FULL_BATCH * FULL_ACCUMULATE
            else f". The dry run's updates are {plan['batch']} x {plan['accumulate']} utterances, not 50"
        )
        + f"; one evaluation pass = {VOXCELEB1_TEST_UTTERANCES:,} VoxCeleb1 test utterances / utterances/s.",
        "",
        "| upstream | side | full training run | one VoxCeleb1 test pass |",
        "|---|---|---|---|",
    ]
    for r in results:
        e = r["eval"]
        for side, label in SIDES:
            train_s = FULL_UPDATES / r["train"][side]["updates_per_s"]
            eval_s = VOXCELEB1_TEST_UTTERANCES / e[side]["utt_per_s"]
            lines.append(f"| {r['label']} | {label} | {hours(train_s)} | {hours(eval_s)} |")
    lines += [
        "",
        "Bench wall time: "
        + ", ".join(
            f"{r['label']} train {r['seconds']['train']:.0f} s, eval {r['seconds']['eval']:.0f} s" for r in results
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=list(PLANS), default="gpu")
    parser.add_argument("--out_dir", default=None, help="default: bench/results (gpu), exp/bench/gpu_check_dry (cpu)")
    args = parser.parse_args(argv)
    plan = PLANS[args.mode]
    if args.mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; on a machine without a GPU run `bash bench/gpu_check.sh --cpu`")
    out_dir = Path(args.out_dir or (ROOT / "bench/results" if args.mode == "gpu" else WORK / "gpu_check_dry"))
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(machine_banner(), flush=True)
    environment = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "gpu": gpu_description() if torch.cuda.is_available() else "none (CPU dry run)",
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda or "none",
        "python": platform.python_version(),
    }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    md, js = out_dir / f"gpu_check-{args.mode}-{stamp}.md", out_dir / f"gpu_check-{args.mode}-{stamp}.json"
    results = []
    for name, size, label in plan["upstreams"]:
        results.append(check_upstream(plan, name, size, label, out_dir))
        # Rewritten after each upstream: a run stopped at the device's time limit still returns what it measured.
        text = report(args.mode, plan, results, environment)
        md.write_text(text)
        js.write_text(json.dumps({"environment": environment, "plan": plan, "results": results}, indent=1))
        if os.environ.get("OUT"):  # the device tool's folder: what is written there comes back
            for f in (md, js):
                shutil.copy(f, Path(os.environ["OUT"]) / f.name)
    print("\n" + text)
    print(f"gpu check ({args.mode}) done in {time.monotonic() - started:.0f} s; report: {md}", flush=True)
    return md


if __name__ == "__main__":
    main(sys.argv[1:])
