"""Batched vs one-utterance-at-a-time embeddings, plain s3prl forward vs asv.batch_exact, per upstream family.

    .venv/bin/python -m bench.batch_exact                      # tiny + tiny_large random checkpoints, fbank, mfcc
    .venv/bin/python -m bench.batch_exact --sizes base large   # the published sizes (slow on a CPU)

For each upstream: one padded batch of utterances of 1 to 8 s, embedded through a randomly initialised
featurizer + SUPERB x-vector (eval mode), compared with each utterance embedded alone (s3prl's batch-1
evaluation). Prints the lowest cosine and the largest hidden-state difference on valid frames, for the plain
batched forward and the exact one, then the upstream CPU time of each path (least of --repeats, one thread) on that
batch and on a length-sorted batch of 3.0 to 3.5 s utterances (what evaluation's length buckets give).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asv.batch_exact import exact_upstream_forward, plan_for
from asv.config import LossConfig, ModelConfig
from asv.conventions import SAMPLE_RATE
from asv.models import build_speaker_model
from asv.random_upstreams import BUILDERS, SIZES, build_random_upstreams
from asv.upstream import build_upstream, upstream_forward
from bench.common import machine_banner


def noise_utterances(seconds, seed: int = 0) -> list[torch.Tensor]:
    """Noise with a slowly varying spectrum (so frames differ), 0.1 peak-ish, at SAMPLE_RATE."""
    rng = np.random.default_rng(seed)
    shaped = [np.convolve(rng.standard_normal(int(s * SAMPLE_RATE)), rng.standard_normal(32), "same") for s in seconds]
    return [0.1 * torch.from_numpy(x).float() for x in shaped]


def batch_of(wavs):
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), torch.tensor([len(w) for w in wavs])


def compare(upstream, model, wavs) -> dict:
    """Lowest cosine and largest |hidden difference| on valid frames vs batch 1, for both batched paths."""
    wav, wav_len = batch_of(wavs)
    out = {}
    with torch.inference_mode():
        singles = [upstream_forward(upstream, w[None], torch.tensor([len(w)])) for w in wavs]
        single_emb = torch.cat([model.embed(*s) for s in singles])
        for path, forward in (("plain", upstream_forward), ("exact", exact_upstream_forward)):
            hs, hs_len = forward(upstream, wav, wav_len)
            diff = 0.0
            for i, (sh, sl) in enumerate(singles):
                for layer in range(len(hs)):
                    assert int(hs_len[layer][i]) == int(sl[layer][0]), "lengths differ from batch 1"
                    n = int(sl[layer][0])
                    diff = max(diff, (hs[layer][i, :n] - sh[layer][0, :n]).abs().max().item())
            cos = torch.nn.functional.cosine_similarity(model.embed(hs, hs_len), single_emb).min().item()
            out[path] = (cos, diff)
    return out


def timings(upstream, wavs, repeats: int) -> dict:
    """Least CPU time of `repeats` runs of each upstream path (the featurizer and x-vector cost the same on all
    three), on one thread: CPU time of a single thread barely moves when other processes share the cores, where
    wall time (and the spin-waiting of idle OpenMP threads) does."""
    wav, wav_len = batch_of(wavs)
    paths = {
        "plain": lambda: upstream_forward(upstream, wav, wav_len),
        "exact": lambda: exact_upstream_forward(upstream, wav, wav_len),
        "batch1": lambda: [upstream_forward(upstream, w[None], torch.tensor([len(w)])) for w in wavs],
    }
    times = {name: [] for name in paths}
    with torch.inference_mode():
        for run in paths.values():
            run()  # warm-up (allocator, the one-time plan)
        for _ in range(repeats):
            for name, run in paths.items():
                t = time.process_time()
                run()
                times[name].append(time.process_time() - t)
    return {name: min(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "tiny_large"])
    parser.add_argument("--families", nargs="+", choices=list(BUILDERS), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_baseline", action="store_true", help="skip fbank and mfcc")
    args = parser.parse_args(argv)
    print(machine_banner())
    torch.set_num_threads(1)
    mixed = noise_utterances(np.linspace(1.0, 8.0, 8))
    bucket = noise_utterances(np.linspace(3.0, 3.5, 8), seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(size, name, str(path)) for size in args.sizes for name, path in build_random_upstreams(
            Path(tmp) / size, size, args.families).items()]  # fmt: skip
        if not args.no_baseline:
            runs += [("-", "fbank", None), ("-", "mfcc", None)]
        for size, name, ckpt in runs:
            upstream = build_upstream(name, ckpt)
            torch.manual_seed(0)
            model = build_speaker_model(ModelConfig(upstream=name), LossConfig(), upstream, num_classes=4).eval()
            plan = plan_for(upstream)
            res = compare(upstream, model, mixed)
            t_mixed, t_bucket = timings(upstream, mixed, args.repeats), timings(upstream, bucket, args.repeats)
            rows.append((name, size, "exact" if plan.exact else "batch 1", res, t_mixed, t_bucket))
            print(f"done {name} {size}", flush=True)
    print(
        "\n| upstream | size | path | min cos plain | min cos exact | max abs dh plain | max abs dh exact "
        "| upstream CPU s, 1-8 s batch: plain / exact / batch 1 | 3-3.5 s bucket: plain / exact / batch 1 |"
    )
    print("|" + "---|" * 9)
    for name, size, how, res, tm, tb in rows:
        print(
            f"| {name} | {size} | {how} | {res['plain'][0]:.7f} | {res['exact'][0]:.7f} | {res['plain'][1]:.2e} | "
            f"{res['exact'][1]:.2e} | {tm['plain']:.3f} / {tm['exact']:.3f} / {tm['batch1']:.3f} | "
            f"{tb['plain']:.3f} / {tb['exact']:.3f} / {tb['batch1']:.3f} |"
        )


if __name__ == "__main__":
    main()
