"""Run one side of a benchmark in a child process: s3prl's own CLI, or one of our scripts.

    .venv-bench/bin/python -m bench.runner s3prl SuperbASV --target_dir DIR --cache_dir DIR ...
    .venv/bin/python -m bench.runner script train.py --data_dir data/demo ...

`s3prl` installs the torchaudio sox shim (bench/s3prl_shim.py) and then runs exactly what
`python -m s3prl.main PROBLEM ...` runs. `script` runs a script of ours as `__main__`, with no shim: our
code must not need it. Environment variables, each naming a file:

- BENCH_STEP_LOG: every optimizer step (any optimizer, both sides) appends its time.monotonic(), so both sides'
  update rates are measured the same way (data-loading stalls included, start-up excluded by the reader).
- BENCH_SHAPE_LOG: every training-step upstream forward appends `batch padded_samples`: s3prl's
  S3PRLUpstream.forward, ours asv.forward.training_features (the one function our step runs its upstream
  through), so both sides' padded audio per update can be compared. Ours adds `start end` (time.monotonic())
  on a CPU: the share of each update its upstream takes, in the run itself (on a GPU that would need a sync
  per step, which the step itself avoids).
- BENCH_CUDA_MEM: at exit, the process's peak CUDA memory (allocated and reserved bytes, JSON).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def line_log(path: str):
    return open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the life of the process)


def record_optimizer_steps(path: str) -> None:
    log = line_log(path)
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: log.write(f"{time.monotonic():.6f}\n"))


def record_s3prl_upstream(path: str) -> None:
    from s3prl.nn.upstream import S3PRLUpstream

    log, forward = line_log(path), S3PRLUpstream.forward

    def logged(self, wavs, wavs_len):
        log.write(f"{wavs.size(0)} {wavs.size(1)}\n")
        return forward(self, wavs, wavs_len)

    S3PRLUpstream.forward = logged


def record_our_upstream(path: str) -> None:
    import asv.training  # train_step calls training_features through this module's name for it

    log, features = line_log(path), asv.training.training_features

    def logged(upstream, wav, wav_len, **kwargs):
        start = time.monotonic()
        out = features(upstream, wav, wav_len, **kwargs)
        times = f" {start:.6f} {time.monotonic():.6f}" if wav.device.type == "cpu" else ""
        log.write(f"{wav.size(0)} {wav.size(1)}{times}\n")
        return out

    asv.training.training_features = logged


def record_cuda_peak(path: str) -> None:
    """At exit (s3prl's --stop ends with exit(0), which still runs atexit), write this process's peak CUDA memory."""

    def write():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
            with open(path, "w") as f:
                json.dump(peak, f)

    atexit.register(write)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("s3prl", "script"):
        raise SystemExit("usage: python -m bench.runner {s3prl PROBLEM | script FILE.py} [args ...]")
    mode, target, args = argv[0], argv[1], argv[2:]
    env = os.environ.get
    if env("BENCH_STEP_LOG"):
        record_optimizer_steps(env("BENCH_STEP_LOG"))
    if env("BENCH_CUDA_MEM"):
        record_cuda_peak(env("BENCH_CUDA_MEM"))
    if mode == "s3prl":
        from bench import s3prl_shim

        s3prl_shim.install()
        if env("BENCH_SHAPE_LOG"):
            record_s3prl_upstream(env("BENCH_SHAPE_LOG"))
        from s3prl import problem

        getattr(problem, target)().main(args)  # what s3prl/main.py does
    else:
        if env("BENCH_SHAPE_LOG"):
            record_our_upstream(env("BENCH_SHAPE_LOG"))
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
