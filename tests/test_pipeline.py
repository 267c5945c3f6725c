"""End to end on CPU: prepare the generated corpus, train a few updates, resume, evaluate; 1 and 2 processes."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TINY_CORPUS = [
    "--demo_train_speakers",
    "8",  # 6 train, 2 held out for the dev list
    "--dev_speakers",
    "2",
    "--demo_test_speakers",
    "4",
    "--demo_videos",
    "2",
    "--demo_utts_per_video",
    "2",
    "--demo_trials",
    "40",
    "--num_workers",
    "1",
]
TRAIN = [
    "--upstream",
    "fbank",
    "--batch_size",
    "4",
    "--gradient_accumulate",
    "2",
    "--max_secs",
    "1.5",
    "--log_step",
    "1",
    "--num_workers",
    "0",
    "--wandb_mode",
    "disabled",
    # These tests check the pipeline's mechanics (checkpoints, resume, sharding, schedules), so a narrow x-vector
    # keeps each run's compute and checkpoints small (20 MB instead of 250 MB per run). SUPERB's widths are
    # checked against s3prl in tests/test_models.py and run through train.py in tests/test_faults.py.
    "--hidden_size",
    "64",
    "--tdnn_size",
    "64",
    "--aggregation_size",
    "128",
]
# What a terminal progress bar leaves in a pipe or a log file: carriage returns, ANSI codes, block characters,
# tqdm's "%|" and "it/s]".
BAR_FRAGMENTS = ("\r", "\x1b[", "\u2588", "\u258f", "%|", "it/s]")


def assert_line_based(out: subprocess.CompletedProcess, *progress_lines: str) -> None:
    """A script's output to a pipe is whole lines, with no bar fragments, and shows the expected progress lines
    (regular expressions; the run sets ASV_PROGRESS_EVERY_S=0 so that short jobs print them too)."""
    text = out.stdout + out.stderr
    for fragment in BAR_FRAGMENTS:
        assert fragment not in text, f"{fragment!r} in non-terminal output:\n{text[-2000:]}"
    for pattern in progress_lines:
        assert re.search(pattern, text, re.MULTILINE), f"no line matching {pattern!r} in:\n{text[-2000:]}"


def run(args, env=None, check=True):
    out = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# Where launch_2proc runs each process: on the CPU (a GPU machine too) with one intra-op thread. A one-process run
# compared with it gets the same, so that a batch of the same shape runs the same kernels in the same float order.
CPU_ONE_THREAD = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def launch_2proc(args):
    cmd = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/cpu_2proc.yaml",
        "--main_process_port",
        "29561",
        *args,
    ]
    return run(cmd, env=CPU_ONE_THREAD)


@pytest.fixture(scope="module")
def data_dir(tiny_demo):
    return tiny_demo[0]


def losses(exp_dir):
    records = map(json.loads, (exp_dir / "train_log.jsonl").read_text().splitlines())
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_prepare_writes_the_documented_artifacts(data_dir):
    header = (data_dir / "train.csv").read_text().splitlines()[0]
    assert header == "id,wav_path,spk,num_samples"
    speakers = json.loads((data_dir / "speakers.json").read_text())
    assert list(speakers) == sorted(speakers) and list(speakers.values()) == list(range(6))
    vad = json.loads((data_dir / "vad.json").read_text())
    assert vad["gain_db"] == -3.0 and len(vad["intervals"]) == 6 * 2 * 2
    trials = (data_dir / "trials" / "demo_test.csv").read_text().splitlines()
    assert trials[0] == "id1,id2,wav_path1,wav_path2,label" and len(trials) == 41
    dev = (data_dir / "trials" / "dev.csv").read_text().splitlines()
    assert len(dev) == 1 + 24  # 2 held-out speakers x 4 utterances: all 12 target pairs + 12 non-target
    dev_spk = {u.split("/")[0] for line in dev[1:] for u in line.split(",")[:2]}
    assert len(dev_spk) == 2
    # Test and dev speakers never appear in training.
    train_spk = {line.split(",")[2] for line in (data_dir / "train.csv").read_text().splitlines()[1:]}
    trial_spk = {line.split(",")[0].split("/")[0] for line in trials[1:]}
    assert not train_spk & trial_spk and not train_spk & dev_spk


def test_prepare_output_without_a_terminal_is_line_based(tiny_demo):
    _, out = tiny_demo
    assert_line_based(out, r"^train files: 24/24 files \(", r"^trial files: \d+/\d+ files \(")


def test_prepare_is_idempotent(data_dir):
    out = run(
        [
            "prepare.py",
            "--dataset",
            "demo",
            "--dataset_root",
            str(data_dir.parent / "corpus"),
            "--out_dir",
            str(data_dir),
            *TINY_CORPUS,
        ]
    )
    assert "already prepared" in out.stdout


def test_prepare_voxceleb1_errors_are_one_line(tmp_path, data_dir):
    out = run(["prepare.py", "--dataset", "voxceleb1", "--dataset_root", "/nonexistent"], check=False)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "/nonexistent" in out.stderr
    bad = tmp_path / "trials.txt"
    bad.write_text("1 id10001/abc/00001.wav id10002/abc/00001.wav\n0 id10001/abc/00001.wav nope/x/y.wav\n")
    out = run(
        [
            "prepare.py",
            "--dataset",
            "voxceleb1",
            "--dataset_root",
            str(data_dir.parent / "corpus"),
            "--trials",
            str(bad),
            "--out_dir",
            str(tmp_path / "out"),
        ],
        check=False,
    )
    assert out.returncode != 0 and "3 trial utterances" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_train_resume_evaluate(tmp_path, data_dir):
    exp = tmp_path / "exp"
    common = [*TRAIN, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--save_step", "2"]
    lines = {"ASV_PROGRESS_EVERY_S": "0"}  # a progress line per item, to check non-terminal output below
    out = run(["train.py", *common, "--total_steps", "4", "--save_initial", "true"], env=lines)
    assert_line_based(out, r"^step 4/4 epoch \d+ loss ", r"^embedding: 8/8 utt \(", r"^step 2: dev EER ")
    assert sorted(p.name for p in exp.glob("step-*")) == ["step-0", "step-2", "step-4"]
    ckpt = exp / "step-4"
    for name in ("embedder.safetensors", "model.safetensors", "optimizer.bin", "config.yaml", "train_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 4

    out = run(["train.py", *common, "--total_steps", "6"])  # auto-resume continues at the next step
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert [s for s, _ in losses(exp)] == [1, 2, 3, 4, 5, 6]

    out = run(["evaluate.py", "--exp_dir", str(exp), "--wandb_mode", "disabled", "--num_workers", "0"], env=lines)
    # The four checkpoints share one frozen upstream (fbank): embedded in one pass.
    assert_line_based(out, r"^checkpoints: 4/4 ckpt \(", r"^embedding 4 checkpoints: \d+/\d+ utt \(")
    for step in (0, 2, 4, 6):
        res = json.loads((exp / "evaluate" / "demo_test" / f"step-{step}" / "results.json").read_text())
        assert res["num_trials"] == 40
        assert all(math.isfinite(res[k]) for k in ("eer", "min_dcf@0.01", "min_dcf@0.05"))
        assert 0 <= res["eer"] <= 100
    best = json.loads((exp / "evaluate" / "demo_test" / "best_result.json").read_text())
    # Step 0 (--save_initial) is no scheduled save: it is scored but does not compete.
    assert best["competing_steps"] == [2, 4, 6] and best["excluded_steps"] == [0]
    assert best["eer"] == min(
        json.loads((exp / "evaluate" / "demo_test" / f"step-{s}" / "results.json").read_text())["eer"]
        for s in (2, 4, 6)
    )


@pytest.mark.numerics
def test_resumed_run_reproduces_the_uninterrupted_loss_log(tmp_path, data_dir):
    base = [*TRAIN, "--data_dir", str(data_dir), "--save_step", "3"]
    run(["train.py", *base, "--exp_dir", str(tmp_path / "a"), "--total_steps", "6"])
    run(["train.py", *base, "--exp_dir", str(tmp_path / "b"), "--total_steps", "3"])
    run(["train.py", *base, "--exp_dir", str(tmp_path / "b"), "--total_steps", "6"])
    # 6 updates x 2 batches x 4 utterances = 48 > 8 utterances: the resumed run crosses epochs too.
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def sgd_rounding(w_a: np.ndarray, w_b: np.ndarray, update: np.ndarray) -> np.ndarray:
    """The most rounding alone puts between two float32 SGD steps w0 - lr * d, d = g + weight_decay * w0, taken from
    the same w0 with gradients g that differ by next to nothing: half an ulp of the new weight in each run (one ulp
    of the larger), plus d and lr * d rounded in each run (under 4 ulps of the update)."""
    return np.spacing(np.maximum(np.abs(w_a), np.abs(w_b))) + 4 * np.spacing(np.abs(update).astype(np.float32))


@pytest.mark.numerics
def test_two_processes_same_layout_and_scores(tmp_path, data_dir):
    # SGD, not AdamW: Adam divides by sqrt(v), so a float-order difference in a near-zero gradient element
    # moves that weight by up to ~lr whatever the data. SGD's update is linear in the gradient, so equal gradient
    # sums give equal weight changes up to rounding. One update, not two: the second one's gradient would be taken
    # at weights that already differ, through ReLUs and statistics pooling, where no rounding bound follows.
    sgd = ["--optimizer", "SGD", "--lr", "0.1", "--total_steps", "1", "--save_step", "1"]
    exp = tmp_path / "exp2"
    args = ["train.py", *TRAIN, *sgd, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--batch_size", "2"]
    out = launch_2proc(args)
    assert (
        "effective batch 8 (opt-in: not SUPERB's 50, so not SUPERB's recipe) = 2 per device x 2 processes x 2"
        in out.stdout
    )
    ckpt = exp / "step-1"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (ckpt / "embedder.safetensors").is_file() and not list(exp.glob(".tmp-*"))
    # One process with 2 per device x 4 accumulation runs the two ranks' four batches (the same utterances and
    # crops, the same shapes, so the same per-batch losses and gradients) and sums them in another order:
    # ((b1 + b2) + b3) + b4 where the ranks sum (b1 + b3) + (b2 + b4). The scalings differ by powers of two only.
    one = tmp_path / "exp1"
    common = ["train.py", *TRAIN, *sgd, "--data_dir", str(data_dir)]
    run(
        [*common, "--exp_dir", str(one), "--batch_size", "2", "--gradient_accumulate", "4", "--save_initial", "true"],
        env=CPU_ONE_THREAD,
    )
    # The logged loss is a float32 sum of the four positive batch losses (each x 2 utterances), divided by 8 (exact):
    # any order is within 3 roundings (3 x 2**-24 relative) of the exact sum, as positive terms do not cancel, so
    # two orders agree to 2 x 3 units; 8 leaves room for the second-order terms.
    np.testing.assert_allclose([v for _, v in losses(one)], [v for _, v in losses(exp)], rtol=8 * 2.0**-24)
    # The gradient's float-order spread, measured on this CPU: one process with TRAIN's 4 per device x 2
    # accumulation sees the same utterances and crops, but every kernel of its forward and backward runs on other
    # shapes and its gradient is summed in a third order.
    spread = tmp_path / "exp1_batch4"
    run([*common, "--exp_dir", str(spread)], env=CPU_ONE_THREAD)
    from safetensors.numpy import load_file

    w0 = load_file(one / "step-0" / "embedder.safetensors")  # the same seeded initialisation in every run
    w1, w2 = load_file(one / "step-1" / "embedder.safetensors"), load_file(ckpt / "embedder.safetensors")
    w4 = load_file(spread / "step-1" / "embedder.safetensors")
    for k in w0:
        update1, update2, update4 = (w[k].astype(np.float64) - w0[k] for w in (w1, w2, w4))
        assert np.abs(update1).max() > 0, k  # every tensor trains: the comparison below is not vacuous
        # lr x the gradients' difference: at most what separates the batch-4 run from the batch-2 run, or what
        # rounding could hide of it, taken over the tensor; twice that, as the ranks only reorder a 4-term sum
        # where the batch-4 run changes every kernel's shapes too, and one measurement may fall low.
        measured = (np.abs(update4 - update1) + sgd_rounding(w4[k], w1[k], update1)).max()
        bound = sgd_rounding(w2[k], w1[k], update1) + 2 * measured
        # About 3 ulps of the weights: a wrong gradient (a rank's batches missing, the sum not averaged) moves a
        # tensor by a good part of its update, far beyond it.
        assert bound.max() < 0.01 * np.abs(update1).max(), (k, bound.max(), np.abs(update1).max())
        excess = np.abs(update2 - update1) / bound
        assert excess.max() <= 1, f"{k}: {excess.max():.2f} x the rounding bound {bound.max():.3g} at most"
    # Sharded evaluation gathers every utterance exactly once, each batch of the one-process run embedded by one of
    # the processes (the batches are dealt out whole, and both runs have one thread): the same computation, so the
    # same scores, to the last digit scores.txt keeps.
    evaluate = ["evaluate.py", "--ckpt_dir", str(ckpt), "--wandb_mode", "disabled", "--num_workers", "0"]
    launch_2proc([*evaluate, "--out_dir", str(tmp_path / "ev2")])
    run([*evaluate, "--out_dir", str(tmp_path / "ev1")], env=CPU_ONE_THREAD)
    s2 = np.loadtxt(tmp_path / "ev2" / "demo_test" / "step-1" / "scores.txt")
    s1 = np.loadtxt(tmp_path / "ev1" / "demo_test" / "step-1" / "scores.txt")
    np.testing.assert_array_equal(s2, s1)


def test_download_needing_upstream_fails_with_one_line(tmp_path, data_dir):
    out = run(
        [
            "train.py",
            *TRAIN,
            "--upstream",
            "wavlm_large",
            "--data_dir",
            str(data_dir),
            "--exp_dir",
            str(tmp_path / "x"),
            "--total_steps",
            "1",
        ],
        check=False,
    )
    assert out.returncode != 0
    assert "--upstream_ckpt" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_wandb_offline_run_is_written(tmp_path, data_dir):
    exp = tmp_path / "wb"
    run(
        [
            "train.py",
            *TRAIN,
            "--data_dir",
            str(data_dir),
            "--exp_dir",
            str(exp),
            "--total_steps",
            "1",
            "--wandb_mode",
            "offline",
        ],
        env={"WANDB_MODE": "offline"},
    )
    assert list((exp / "wandb").glob("offline-run-*"))


def test_scheduler_runs_and_old_checkpoints_are_pruned(tmp_path, data_dir):
    exp = tmp_path / "sched"
    args = ["train.py", *TRAIN, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--total_steps", "3"]
    args += ["--save_step", "1", "--keep_num_ckpts", "2", "--lr", "1e-3"]
    run([*args, "--scheduler", "StepLR", "--scheduler_kwargs", "{step_size: 1, gamma: 0.5}"])
    records = [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]  # the dev/eer records carry no LR
    # Stepped once per optimizer update (s3prl's scheduler block never runs).
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])
    assert sorted(p.name for p in exp.glob("step-*")) == ["step-2", "step-3"]
