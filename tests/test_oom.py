"""An out-of-memory batch leaves no trace: the update after it equals the update of a run that never saw it, on one
process and on two (where only one rank runs out of memory). The x-vector's precision settings during a training
step and an embedding are IEEE fp32, as s3prl's Linear-based TDNN computes on GPUs.

Run as a script under `accelerate launch` (the 2-process case), this file trains the fixed batches it is given and
saves the result; see `steps_with_oom`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

ACCUMULATE = 3
BATCHES = 7  # two updates of 3 batches, one of them dropped
CPU_2PROC = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def steps_with_oom(accelerator, drop: int | None, where: str, on_rank: int | None, skip: int | None):
    """Train the SUPERB x-vector (narrow) on fbank over BATCHES fixed batches per rank with train_step, accumulation
    ACCUMULATE. `drop`: the index of the batch whose forward runs out of memory `where` ("upstream" or "model"),
    on rank `on_rank` only (None: every rank). `skip`: a batch index the loader never gives (the reference).
    Returns the trainable weights after the updates, the number of updates and the dropped-batch count."""
    from asv import training
    from asv.config import LossConfig, ModelConfig
    from asv.models import build_speaker_model
    from asv.upstream import build_upstream

    torch.manual_seed(0)
    upstream = build_upstream("fbank")
    cfg = ModelConfig(upstream="fbank", hidden_size=32, tdnn_size=32, aggregation_size=64, embed_dim=16)
    model = build_speaker_model(cfg, LossConfig(), upstream, num_classes=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainee = training.Trainee(model, upstream, optimizer, None, accumulate=ACCUMULATE)
    stats = training.RunningStats("cpu", max_consecutive_skips=5)
    rank = accelerator.process_index
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data, the same in every run
    batches = []
    for _ in range(BATCHES):
        lengths = torch.randint(8000, 16000, (2,), generator=gen)
        wav = torch.randn(2, int(lengths.max()), generator=gen) * (torch.arange(int(lengths.max())) < lengths[:, None])
        batches.append((wav, lengths, torch.randint(0, 4, (2,), generator=gen)))

    calls = {"n": -1}
    real_features, real_forward = training.training_features, type(accelerator.unwrap_model(model)).forward

    def fails(i: int) -> bool:
        return i == drop and (on_rank is None or on_rank == rank)

    def features(*args, **kwargs):
        calls["n"] += 1
        if where == "upstream" and fails(calls["n"]):
            raise torch.OutOfMemoryError("injected")
        return real_features(*args, **kwargs)

    def forward(self, *args):
        if where == "model" and fails(calls["n"]):
            raise torch.OutOfMemoryError("injected")
        return real_forward(self, *args)

    updates = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "training_features", features)
        mp.setattr(type(accelerator.unwrap_model(model)), "forward", forward)
        for i, batch in enumerate(batches):
            if i == skip:
                calls["n"] += 1
                continue
            _, grad_norm = training.train_step(accelerator, trainee, batch, stats)
            updates += grad_norm is not None
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return weights, updates, stats.oom_batches


def assert_same_weights(a: dict, b: dict) -> None:
    # The same kernels on the same batches in the same order: equal to the bit, or a dropped batch left a trace.
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("where", ["upstream", "model"])
def test_an_out_of_memory_batch_leaves_no_trace(where):
    from accelerate import Accelerator

    # Batch 1 is the middle of the first update's three: the update must sum batches 0, 2 and 3.
    dropped, updates, ooms = steps_with_oom(Accelerator(cpu=True), drop=1, where=where, on_rank=None, skip=None)
    never_seen, ref_updates, _ = steps_with_oom(Accelerator(cpu=True), drop=None, where=where, on_rank=None, skip=1)
    assert (updates, ooms) == (2, 1) and ref_updates == 2
    assert_same_weights(dropped, never_seen)
    untouched, _, _ = steps_with_oom(Accelerator(cpu=True), drop=None, where=where, on_rank=None, skip=None)
    assert any(not torch.equal(dropped[k], untouched[k]) for k in dropped)  # the comparison is not vacuous


@pytest.mark.slow
def test_out_of_memory_on_one_of_two_processes_drops_the_batch_on_both(tmp_path):
    results = {}
    # Batch 2 would end the first update: rank 1's forward ran in DDP's syncing mode, and no backward pass follows it.
    for name, extra in {"dropped": ["--drop", "2", "--on_rank", "0"], "never_seen": ["--skip", "2"]}.items():
        out = tmp_path / f"{name}.pt"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
        cmd += ["--main_process_port", "29563", "tests/test_oom.py", str(out), *extra]
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **CPU_2PROC, "PYTHONPATH": str(ROOT)}
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = torch.load(out)
    assert results["dropped"]["updates"] == results["never_seen"]["updates"] == 2
    assert results["dropped"]["oom_batches"] == [1, 1]  # rank 1 ran its batch fine and dropped it too
    assert_same_weights(results["dropped"]["weights"], results["never_seen"]["weights"])


@pytest.mark.slow
def test_out_of_memory_in_a_backward_pass_stops_the_run_in_one_line(tmp_path, tiny_demo, monkeypatch):
    import accelerate

    import train
    from tests.test_pipeline import TRAIN

    def backward(self, loss, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(accelerate.Accelerator, "backward", backward)
    args = [*TRAIN, "--data_dir", str(tiny_demo[0]), "--exp_dir", str(tmp_path / "run"), "--total_steps", "2"]
    with pytest.raises(SystemExit) as err:
        train.main([*args, "--eval_dev", "false"])
    message = str(err.value)
    assert message.startswith("error: out of memory in a backward pass") and "\n" not in message
    assert "resume from the last checkpoint" in message


def test_the_downstream_computes_in_ieee_fp32_in_training_and_embedding(monkeypatch):
    """cuDNN runs conv1d in TF32 on Ampere and later by PyTorch's default, s3prl's Linear TDNN in IEEE fp32: the
    settings in force while our x-vector runs, forward and backward, are read from a hook (the same flags on CPU)."""
    from accelerate import Accelerator

    from asv import training
    from asv.config import LossConfig, ModelConfig
    from asv.extract import ModelEmbedder
    from asv.forward import fp32_precision
    from asv.models import build_speaker_model
    from asv.upstream import build_upstream

    upstream = build_upstream("fbank")
    model = build_speaker_model(ModelConfig(upstream="fbank"), LossConfig(), upstream, num_classes=2)
    seen = []
    model.downstream.register_forward_pre_hook(lambda m, a: seen.append(("forward", fp32_precision())))
    model.downstream.register_full_backward_hook(lambda m, gi, go: seen.append(("backward", fp32_precision())))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainee = training.Trainee(model, upstream, optimizer, None)
    wav, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    training.train_step(accelerator, trainee, (wav, lengths, torch.tensor([0, 1])), training.RunningStats("cpu", 5))
    ModelEmbedder(upstream, model.eval())(wav, lengths)
    ieee = {"cudnn.conv": "ieee", "cuda.matmul": "ieee"}
    assert [what for what, _ in seen] == ["forward", "backward", "forward"]
    assert all(flags == ieee for _, flags in seen), seen
    assert fp32_precision() != ieee  # PyTorch's defaults again outside (TF32 for cuDNN convolutions)


if __name__ == "__main__":  # one rank of the 2-process test: tests/test_oom.py OUT [--drop I --on_rank R] [--skip I]
    import argparse

    from accelerate import Accelerator

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--drop", type=int)
    parser.add_argument("--on_rank", type=int)
    parser.add_argument("--skip", type=int)
    args = parser.parse_args()
    accelerator = Accelerator()
    weights, updates, ooms = steps_with_oom(accelerator, args.drop, "model", args.on_rank, args.skip)
    counts = [int(n) for n in accelerator.gather(torch.tensor([ooms]))]
    if accelerator.is_main_process:
        torch.save({"weights": weights, "updates": updates, "oom_batches": counts}, args.out)
    accelerator.wait_for_everyone()
