"""Training robustness: SIGKILL and preemption resume exactly, guards skip and abort, batch arithmetic, sweeps."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from asv.config import TrainConfig, parse
from tests.conftest import ROOT
from tests.test_pipeline import CPU_ONE_THREAD, TRAIN, launch_2proc, losses, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tiny_demo):
    return tiny_demo[0]


def start(args):
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def without(args: list[str], *flags: str) -> list[str]:
    """`args` less each of `flags` and its value."""
    kept = []
    for i, a in enumerate(args):
        if a not in flags and not (i and args[i - 1] in flags):
            kept.append(a)
    return kept


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.numerics
def test_sigkill_at_any_point_then_resume_reproduces_the_loss_log(tmp_path, data_dir):
    base = ["train.py", *TRAIN, "--data_dir", str(data_dir), "--total_steps", "8", "--save_step", "3"]
    run([*base, "--exp_dir", str(tmp_path / "ref")])
    exp = tmp_path / "killed"
    proc = start([*base, "--exp_dir", str(exp)])
    # Kill as soon as the first checkpoint is complete: the run has usually logged past it by then.
    wait_for(lambda: (exp / "step-3" / "train_state.json").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run([*base, "--exp_dir", str(exp)])
    assert "resumed from" in out.stdout
    assert losses(exp) == losses(tmp_path / "ref")  # identical values, no duplicated steps


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes(tmp_path, data_dir):
    exp = tmp_path / "preempted"
    base = ["train.py", *TRAIN, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--save_step", "1000"]
    proc = start([*base, "--total_steps", "1000"])
    wait_for(lambda: (exp / "train_log.jsonl").is_file() and len(losses(exp)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-2000:]
    assert "saved step" in output
    step = json.loads(next(exp.glob("step-*/train_state.json")).read_text())["step"]
    assert step >= 2 and step < 1000
    out = run([*base, "--total_steps", str(step + 2)])
    assert f"at step {step}" in out.stdout and [s for s, _ in losses(exp)] == list(range(1, step + 3))


def test_non_finite_losses_are_skipped_counted_and_abort_when_persistent(tmp_path, data_dir, monkeypatch):
    import train
    from asv.models import SpeakerModel

    forward = SpeakerModel.forward
    calls = {"n": 0}

    def sometimes_nan(self, *args):
        loss, logits = forward(self, *args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in nan_calls else loss), logits

    monkeypatch.setattr(SpeakerModel, "forward", sometimes_nan)
    common = [*TRAIN, "--data_dir", str(data_dir), "--save_step", "100", "--eval_dev", "false"]
    nan_calls = {3}  # the 2nd update's first batch (2 batches per update)
    exp = train.main([*common, "--exp_dir", str(tmp_path / "a"), "--total_steps", "4"])
    summary = json.loads((exp / "train_summary.json").read_text())
    assert summary["skipped_updates"] == 1 and summary["steps"] == 4
    logged = [json.loads(r) for r in (exp / "train_log.jsonl").read_text().splitlines()]
    assert all(r["train/loss"] == r["train/loss"] for r in logged)  # the NaN batch is not in the mean

    nan_calls = set(range(1000))
    calls["n"] = 0
    with pytest.raises(SystemExit, match="3 updates skipped or batches dropped in a row"):
        train.main([*common, "--exp_dir", str(tmp_path / "b"), "--total_steps", "10", "--max_consecutive_skips", "3"])


def test_effective_batch_sets_the_plan_or_says_why_not(tmp_path, data_dir):
    common = ["train.py", *TRAIN, "--data_dir", str(data_dir), "--total_steps", "1", "--eval_dev", "false"]
    # TRAIN fixes --gradient_accumulate 2; without it the plan follows --effective_batch.
    free = without(common, "--gradient_accumulate")
    out = run([*free, "--exp_dir", str(tmp_path / "a"), "--effective_batch", "12", "--batch_size", "5"])
    assert "effective batch 12 (opt-in: not SUPERB's 50" in out.stdout
    assert "= 4 per device x 1 processes x 3 accumulation" in out.stdout
    out = run([*free, "--exp_dir", str(tmp_path / "superb"), "--batch_size", "10", "--max_secs", "1.5"])
    assert "effective batch 50 (SUPERB's) = 10 per device x 1 processes x 5 accumulation" in out.stdout
    assert json.loads((tmp_path / "superb" / "train_summary.json").read_text())["effective_batch"] == 50
    bad = run([*common, "--exp_dir", str(tmp_path / "b"), "--effective_batch", "10"], check=False)
    assert bad.returncode != 0 and "--effective_batch 10" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # SUPERB's 50 cannot be split over 3 processes: refused before anything loads (no banner), in one line.
    three = run([*free, "--exp_dir", str(tmp_path / "c")], check=False, env={"WORLD_SIZE": "3"})
    assert three.returncode != 0 and "training" not in three.stdout, three.stdout
    assert three.stderr.strip().splitlines() == [
        "error: SUPERB's effective batch of 50 cannot be split evenly over 3 processes: launch 1, 2, 5, 10, 25, 50 "
        "processes, or pass --effective_batch E with E a multiple of 3 (results are then labelled as not SUPERB's "
        "recipe)"
    ]


def test_dev_eer_is_logged_at_each_checkpoint_and_sweep_runs_get_their_own_directory(tmp_path, data_dir):
    exp = tmp_path / "sweep"
    env = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run7"}
    run(
        ["train.py", *TRAIN, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--total_steps", "2"]
        + ["--save_step", "1"],
        env=env,
    )
    trial = exp / "sweep-abc123-run7"
    records = [json.loads(r) for r in (trial / "train_log.jsonl").read_text().splitlines()]
    dev = [(r["step"], r["dev/eer"]) for r in records if "dev/eer" in r]
    assert [s for s, _ in dev] == [1, 2] and all(0 <= e <= 100 for _, e in dev)


def test_a_sweep_trial_without_a_dev_list_stops_before_training(tmp_path, data_dir):
    # sweeps/*.yaml minimise dev/eer: a data dir prepared without --dev_speakers would train every trial blind.
    bare = tmp_path / "no_dev"
    shutil.copytree(data_dir, bare)
    (bare / "trials" / "dev.csv").unlink()
    env = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run8"}
    args = ["train.py", *TRAIN, "--exp_dir", str(tmp_path / "exp"), "--total_steps", "2"]
    for data, extra in ((bare, []), (data_dir, ["--eval_dev", "false"])):
        out = run([*args, "--data_dir", str(data), *extra], env=env, check=False)
        assert out.returncode != 0 and "training" not in out.stdout
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("error: this W&B sweep minimises dev/eer") and "--dev_speakers" in line
    assert not (tmp_path / "exp").exists()


def test_any_process_count_trains_superbs_effective_batch_or_stops_in_one_line(tmp_path, data_dir):
    # Default batch flags: TRAIN without its --batch_size 4 and --gradient_accumulate 2.
    args = [
        "train.py",
        *without(TRAIN, "--batch_size", "--gradient_accumulate"),
        "--data_dir",
        str(data_dir),
        "--total_steps",
        "1",
        "--eval_dev",
        "false",
    ]
    out = launch_2proc([*args, "--exp_dir", str(tmp_path / "two")])
    assert "effective batch 50 (SUPERB's) = 5 per device x 2 processes x 5 accumulation" in out.stdout
    assert json.loads((tmp_path / "two" / "step-1" / "train_state.json").read_text())["effective_batch"] == 50
    three = run(
        ["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
        + ["--num_processes", "3", "--main_process_port", "29562", *args, "--exp_dir", str(tmp_path / "three")],
        env=CPU_ONE_THREAD,
        check=False,
    )
    said = [line for line in (three.stdout + three.stderr).splitlines() if line.startswith("error:")]
    assert three.returncode != 0 and "training" not in three.stdout
    assert said == [
        "error: SUPERB's effective batch of 50 cannot be split evenly over 3 processes: launch 1, 2, 5, 10, 25, 50 "
        "processes, or pass --effective_batch E with E a multiple of 3 (results are then labelled as not SUPERB's "
        "recipe)"
    ]
    assert not (tmp_path / "three").exists()  # stopped before anything was written


def test_sweep_agent_arguments_parse():
    # `wandb agent` passes --key=value pairs (sweeps/*.yaml use ${args}).
    cfg, _ = parse(TrainConfig, ["--lr=0.0003", "--batch_size=20", "--upstream_trainable=true", "--margin=0.2"])
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.model.upstream_trainable, cfg.loss.margin) == (3e-4, 20, True, 0.2)
    import yaml

    for name in ("lr.yaml", "lr_batch.yaml"):
        sweep = yaml.safe_load((ROOT / "sweeps" / name).read_text())
        assert sweep["metric"] == {"name": "dev/eer", "goal": "minimize"}
        args = [
            f"--{k}={v['values'][0] if 'values' in v else v.get('min', v.get('value'))}"
            for k, v in sweep["parameters"].items()
        ]
        parse(TrainConfig, args)  # every swept key is a real flag


@pytest.mark.numerics
def test_layerdrop_off_and_gradient_checkpointing_keep_results():
    from asv.upstream import disable_layerdrop, enable_gradient_checkpointing

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, scale=1.0):
            return torch.tanh(self.fc(x)) * scale

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layerdrop = 0.1
            self.layers = torch.nn.ModuleList([Layer() for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x, scale=0.9)
            return x

    torch.manual_seed(0)
    enc = Encoder()
    x = torch.randn(4, 8)
    enc(x).sum().backward()
    ref = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    assert disable_layerdrop(enc) == 1 and enc.layerdrop == 0.0
    assert enable_gradient_checkpointing(enc) == 3
    enc(x).sum().backward()
    for a, b in zip(ref, [p.grad for p in enc.parameters()], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("finite", [True, False])
def test_non_finite_update_is_skipped_and_counted(finite):
    """A non-finite gradient leaves parameters and AdamW's moments and step counts untouched while the schedule moves
    on, as in s3prl's runner, and the skip is counted."""
    from accelerate import Accelerator

    from asv.config import OptimConfig
    from asv.optim import build_optimizer_and_scheduler
    from asv.training import RunningStats, update

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = OptimConfig(scheduler="StepLR", scheduler_kwargs="{step_size: 1, gamma: 0.5}")
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, None)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    stats = RunningStats("cpu", max_consecutive_skips=5)
    for step in range(2):  # one good update first, so the moments and step counts are not all zero
        loss = model(torch.randn(8, 4)).square().mean() * (1.0 if step == 0 or finite else float("nan"))
        accelerator.backward(loss)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        state = {k: v.clone() for k, v in optimizer.optimizer.state[next(model.parameters())].items()}
        lr = optimizer.param_groups[0]["lr"]
        update(accelerator, optimizer, scheduler, stats)
        optimizer.zero_grad()
    moved = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    now = optimizer.optimizer.state[next(model.parameters())]
    assert moved == finite
    assert all(torch.equal(state[k], now[k]) for k in state) != finite  # moments and step count
    assert optimizer.param_groups[0]["lr"] == lr / 2  # the schedule steps either way
    assert stats.skipped_updates == (0 if finite else 1)
