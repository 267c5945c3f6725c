"""Run one side of a benchmark in a child process: s3prl's own CLI, or one of our scripts.

    .venv-bench/bin/python -m bench.runner s3prl SuperbASV --target_dir DIR --cache_dir DIR ...
    .venv-bench/bin/python -m bench.runner script train.py --data_dir data/demo ...

`s3prl` installs the torchaudio sox shim (bench/s3prl_shim.py) and then runs exactly what
`python -m s3prl.main PROBLEM ...` runs. `script` runs a script of ours as `__main__`, with no shim: our
code must not need it. With BENCH_STEP_LOG=FILE in the environment, every optimizer step appends its
time.monotonic() to FILE, so both sides' update rates are measured the same way (the timestamps include
data-loading stalls, as a user sees them, and exclude start-up and the first-run caches).
With BENCH_SHAPE_LOG=FILE, every upstream forward (s3prl's S3PRLUpstream, which both sides use) appends
`batch padded_samples`, so both sides' padded audio per update can be compared (ours logs the padded batch
that asv.padding_trim computes without its padding, once, and each batch of a joint forward as its own). With
BENCH_CUDA_MEM=FILE, the process writes its peak CUDA memory (allocated and reserved bytes, JSON) there when it
exits. With BENCH_UPSTREAM_LOG=FILE, our script's training-step upstream forward appends `start end` per call.
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


def record_optimizer_steps(path: str) -> None:
    """Append a timestamp per optimizer step (any optimizer) to `path`, one per line, flushed at once."""
    log = open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the life of the process)

    def hook(optimizer, args, kwargs):
        log.write(f"{time.monotonic():.6f}\n")

    register_optimizer_step_post_hook(hook)


def record_upstream_batches(path: str, ours: bool) -> None:
    """Append `batch padded_samples` per S3PRLUpstream forward to `path` (import the torchaudio shim first)."""
    from s3prl.nn.upstream import S3PRLUpstream

    log = open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the life of the process)
    forward = S3PRLUpstream.forward
    inside_trim = [False]

    def logged(self, wavs, wavs_len):
        if not inside_trim[0]:
            log.write(f"{wavs.size(0)} {wavs.size(1)}\n")
        return forward(self, wavs, wavs_len)

    S3PRLUpstream.forward = logged
    if not ours:
        return
    from asv import padding_trim

    trimmed = padding_trim.trimmed_upstream_forward

    def logged_trim(upstream, wav, wav_len, *args, **kwargs):
        # The padded batch, once (its utterances then run one by one through S3PRLUpstream, unlogged).
        log.write(f"{wav.size(0)} {wav.size(1)}\n")
        inside_trim[0] = True
        try:
            return trimmed(upstream, wav, wav_len, *args, **kwargs)
        finally:
            inside_trim[0] = False

    padding_trim.trimmed_upstream_forward = logged_trim
    grouped = padding_trim.grouped_upstream_forward

    def logged_group(upstream, batches, *args, **kwargs):
        # Each batch of the joint forward as the padded batch it stands for (the joint one itself unlogged).
        for wav, wav_len in batches:
            log.write(f"{wav.size(0)} {int(wav_len.max())}\n")
        inside_trim[0] = True
        try:
            return grouped(upstream, batches, *args, **kwargs)
        finally:
            inside_trim[0] = False

    padding_trim.grouped_upstream_forward = logged_group


def record_upstream_time(path: str) -> None:
    """Append `start end` (time.monotonic()) per call of our training step's upstream forward
    (asv.upstream.upstream_features) to `path`: the share of each update our run spends in the upstream,
    measured in the run itself."""
    import asv.upstream

    log = open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the life of the process)

    def timed(fn):
        def call(*args, **kwargs):
            start = time.monotonic()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            log.write(f"{start:.6f} {time.monotonic():.6f}\n")
            return out

        return call

    asv.upstream.upstream_features = timed(asv.upstream.upstream_features)
    from asv import padding_trim  # --upstream_batches: the joint forward stands for its batches' calls

    padding_trim.grouped_upstream_forward = timed(padding_trim.grouped_upstream_forward)


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
    if os.environ.get("BENCH_STEP_LOG"):
        record_optimizer_steps(os.environ["BENCH_STEP_LOG"])
    if os.environ.get("BENCH_CUDA_MEM"):
        record_cuda_peak(os.environ["BENCH_CUDA_MEM"])
    mode, target, args = argv[0], argv[1], argv[2:]
    if mode == "s3prl":
        from bench import s3prl_shim

        s3prl_shim.install()
    else:
        import asv.upstream  # noqa: F401  (its torchaudio shim, before s3prl.nn is imported below)
    if os.environ.get("BENCH_SHAPE_LOG"):
        record_upstream_batches(os.environ["BENCH_SHAPE_LOG"], ours=mode == "script")
    if os.environ.get("BENCH_UPSTREAM_LOG") and mode == "script":
        record_upstream_time(os.environ["BENCH_UPSTREAM_LOG"])
    if mode == "s3prl":
        from s3prl import problem

        getattr(problem, target)().main(args)  # what s3prl/main.py does
    else:
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
