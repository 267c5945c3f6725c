"""LoRA against full fine-tuning of the upstream, side by side: trainable parameters, optimizer state, peak RSS,
seconds per update.

    .venv/bin/python -m asv.random_upstreams exp/bench/upstreams/large --size large --family wavlm_local  # 1.3 GB
    .venv/bin/python -m bench.lora                        # WavLM Large (317 M), CPU, 2 x 3 s crops, 3 timed updates
    .venv/bin/python -m bench.lora --sides frozen,lora,full --updates 5

Each side is train.py in its own child process (this module's `child` mode: train.py run as __main__ with an
optimizer-step hook), on the same corpus (bench/common.py's `tiny`: 3-4 s utterances, so every crop of --max_secs 3 is
about 3 s), upstream, batch, accumulation 1, seed and SUPERB's x-vector + AM-softmax: `full` fine-tunes the whole
upstream (--upstream_trainable true), `lora` trains LoRA adapters on it (--upstream_adapter lora, the defaults: rank
8 on every Linear layer of each transformer layer), `frozen` is SUPERB's. The hook records each update's time; after
the last timed one it records the parameters the optimizer updates, the bytes of its state tensors (AdamW: both
moments of each of them) and the process's peak RSS (VmHWM, exact), then ends the child before train.py's final
checkpoint (the full side's would write 5 GB). No DataLoader workers, no dev EER: one process, the training step
alone. Last line: `ratio=<lora/full seconds per update>`.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench.common import (
    ROOT,
    TINY,
    WORK,
    LoadMonitor,
    gib,
    machine_banner,
    our_python,
    peak_rss,
    prepare_corpus,
    run_child,
)

LARGE_WAVLM = ROOT / "exp/bench/upstreams/large/wavlm.pt"
SIDES = {
    "frozen": ("frozen (SUPERB)", []),
    "lora": ("LoRA", ["--upstream_adapter", "lora"]),
    "full": ("full fine-tuning", ["--upstream_trainable", "true"]),
}


def child(argv: list[str]) -> None:
    """train.py `argv` in this process; after BENCH_LORA_STOP optimizer updates, write the figures to
    BENCH_LORA_OUT (JSON) and exit at once."""
    out, stop = Path(os.environ["BENCH_LORA_OUT"]), int(os.environ["BENCH_LORA_STOP"])
    times: list[float] = []

    def on_step(optimizer, args, kwargs) -> None:
        times.append(time.monotonic())
        if len(times) < stop:
            return
        groups = optimizer.param_groups
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        record = {
            "step_times": times,
            "trainable": sum(p.numel() for g in groups for p in g["params"]),
            # asv.optim.build_optimizer_and_scheduler appends the upstream's group (fine-tuned or adapters) last,
            # after the downstream + head and the featurizer.
            "upstream_trainable": sum(p.numel() for p in groups[2]["params"]) if len(groups) > 2 else 0,
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
            "peak_rss": peak_rss(),
        }
        out.write_text(json.dumps(record))
        sys.stdout.flush()
        os._exit(0)  # before train.py's final checkpoint: the measurement is done

    register_optimizer_step_post_hook(on_step)
    sys.argv = ["train.py", *argv]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def run_side(work: Path, side: str, args, total: int) -> dict:
    result = work / f"{side}.json"
    result.unlink(missing_ok=True)
    exp = work / side
    cmd = [our_python(), "-m", "bench.lora", "child", "--data_dir", str(TINY.data_dir), "--exp_dir", str(exp)]
    cmd += ["--upstream", args.upstream, "--upstream_ckpt", str(args.upstream_ckpt), *SIDES[side][1]]
    cmd += ["--batch_size", str(args.batch_size), "--gradient_accumulate", "1", "--max_secs", str(args.max_secs)]
    cmd += ["--num_workers", "0", "--eval_dev", "false", "--wandb_mode", "disabled", "--mixed_precision", "no"]
    cmd += ["--total_steps", str(total + 1), "--log_step", str(total + 1), "--save_step", str(total + 1)]
    cmd += ["--auto_resume", "false"]
    shutil.rmtree(exp, ignore_errors=True)
    wall, _ = run_child(cmd, work / f"{side}.log", env={"BENCH_LORA_OUT": str(result), "BENCH_LORA_STOP": str(total)})
    r = json.loads(result.read_text())
    t = r["step_times"][args.warmup - 1 :] if args.warmup else r["step_times"]
    r["s_per_update"] = (t[-1] - t[0]) / (len(t) - 1)
    r["counted_updates"], r["wall_s"] = len(t) - 1, wall
    return r


def main(argv: list[str] | None = None) -> float | None:
    if argv is None and sys.argv[1:2] == ["child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", default="wavlm_local", help="s3prl hub name (a *_local name with its checkpoint)")
    parser.add_argument("--upstream_ckpt", type=Path, default=LARGE_WAVLM)
    parser.add_argument("--sides", default="lora,full", help=f"comma-separated, of: {', '.join(SIDES)}")
    parser.add_argument("--updates", type=int, default=3, help="timed optimizer updates per side")
    parser.add_argument("--warmup", type=int, default=1, help="updates before timing starts")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_secs", type=float, default=3.0, help="training crop, seconds")
    parser.add_argument("--json_out", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or not sides:
        raise SystemExit(f"error: --sides {args.sides}: choose from {', '.join(SIDES)}")
    if not Path(args.upstream_ckpt).exists():
        raise SystemExit(
            f"error: {args.upstream_ckpt} does not exist: python -m asv.random_upstreams {LARGE_WAVLM.parent} "
            "--size large --family wavlm_local writes it (1.3 GB)"
        )
    work = WORK / "lora"
    work.mkdir(parents=True, exist_ok=True)
    print(machine_banner())
    print(
        f"lora bench: {args.upstream} ({args.upstream_ckpt}), x-vector + AM-softmax, batch {args.batch_size} x "
        f"accumulation 1, crops of {args.max_secs:g} s, fp32, cpu; {args.updates} timed updates per side after "
        f"{args.warmup}",
        flush=True,
    )
    load = LoadMonitor()
    prepare_corpus(TINY)
    out: dict = {"setup": vars(args) | {"upstream_ckpt": str(args.upstream_ckpt)}}
    for side in sides:
        r = out[side] = run_side(work, side, args, args.warmup + args.updates)
        print(
            f"{SIDES[side][0]:<17}: {r['trainable']:,} trainable ({r['upstream_trainable']:,} in the upstream); "
            f"optimizer state {gib(r['optimizer_state_bytes'])}; peak RSS {gib(r['peak_rss'])}; "
            f"{r['s_per_update']:.1f} s/update over {r['counted_updates']}; child wall {r['wall_s']:.0f} s",
            flush=True,
        )
    out["load"] = load.stop()
    print(LoadMonitor.describe(out["load"]))

    rows = [
        ("trainable parameters", "trainable", lambda v: f"{v:,}"),
        ("  of them upstream", "upstream_trainable", lambda v: f"{v:,}"),
        ("optimizer state", "optimizer_state_bytes", gib),
        ("peak RSS", "peak_rss", gib),
        ("s/update", "s_per_update", lambda v: f"{v:.1f}"),
    ]
    both = "lora" in out and "full" in out
    print(f"{'':<22}" + "".join(f"{SIDES[s][0]:>20}" for s in sides) + (f"{'LoRA / full':>14}" if both else ""))
    for label, key, fmt in rows:
        ratio = f"{out['lora'][key] / out['full'][key]:>14.3f}" if both and out["full"][key] else ""
        print(f"{label:<22}" + "".join(f"{fmt(out[s][key]):>20}" for s in sides) + ratio)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    if both:
        ratio = out["lora"]["s_per_update"] / out["full"]["s_per_update"]
        print(f"ratio={ratio:.3f}")
        return ratio
    return None


if __name__ == "__main__":
    main()
