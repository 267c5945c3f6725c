"""With default flags the result is SUPERB's: our training step and evaluation against s3prl 0.4.18's own code.

Training: from the same initial weights (s3prl's, copied into ours), on the same batches (train.py's crops of
a generated corpus, zero-padded by each side's own collate), N updates of train.py's step (TrainConfig()
defaults) and of s3prl's Problem.train with SuperbASV's default_config give the same loss sequence and
final weights, for fbank and a tiny random HuBERT. Evaluation: s3prl's trained weights, scored by its real
stage 3 (batch 1) and by our evaluate.py (batched), give the same EER.

s3prl's runner needs .venv-bench (bench/setup.sh, built by `make test`), so its side runs there, in one child
process (bench/parity.py) while ours runs here. Run alone: `pytest -m parity`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml

import evaluate
import prepare
from asv.config import TrainConfig
from asv.metrics import compute_eer
from asv.random_upstreams import build_random_upstreams
from bench.parity import (
    INIT_FILE,
    LOSSES_FILE,
    S3PRL_TRIAL_LIST,
    build_crops,
    our_checkpoint,
    our_training,
    s3prl_final_state,
)
from tests.conftest import ROOT

# slow too: it runs prepare.py, evaluate.py and s3prl's runner end to end (about a minute on 2 idle cores).
pytestmark = [pytest.mark.parity, pytest.mark.slow, pytest.mark.numerics]

BENCH_PYTHON = ROOT / ".venv-bench/bin/python"
# 6 training speakers (none held out: s3prl trains on every dev speaker), 3 test speakers x 10 utterances and
# 240 trials, 120 of them target: one target trial is 0.83 points of miss rate. One prepare worker: spawning
# more costs more than it saves on 90 files.
NUM_TRIALS = 240
CORPUS = ["--demo_train_speakers", "6", "--dev_speakers", "0", "--demo_test_speakers", "3", "--demo_videos", "2"]
CORPUS += ["--demo_utts_per_video", "5", "--demo_trials", str(NUM_TRIALS), "--num_workers", "1"]
# Crops of at most 3 s: utterances of 2-3 s after VAD stay whole, so about half the batches carry padding
# (5 of the 10 drawn here; 3 of fbank's 5).
BATCH_SIZE, MAX_SECS = 3, 3.0
# Both accumulation paths (an update every batch; gradients summed over two batches), and the EER on the
# multi-layer path. fbank's evaluation (its single hidden state goes through the same featurizer, x-vector
# and scoring) would add ~40 % to the runtime for little: bench/eval_speed.py compares fbank EERs.
CASES = {
    "fbank": dict(upstream="fbank", steps=5, accumulate=1, evaluate=False),
    "hubert": dict(upstream="hubert_local", steps=5, accumulate=2, evaluate=True),
}
EVALUATED = [name for name, c in CASES.items() if c["evaluate"]]
TRIAL_LIST = "demo_test"
EVAL_FLAGS = ["--trial_names", TRIAL_LIST, "--num_workers", "0", "--cache", "false", "--plots", "false"]
EVAL_FLAGS += ["--wandb_mode", "disabled"]
CHILD_TIMEOUT_S = 600


def train_config(name: str, upstream_ckpt: str | None, data_dir) -> TrainConfig:
    """TrainConfig() with only what the comparison fixes: the data, the upstream and the accumulation."""
    cfg = TrainConfig()
    cfg.data.data_dir = str(data_dir)
    cfg.model.upstream, cfg.model.upstream_ckpt = CASES[name]["upstream"], upstream_ckpt
    cfg.optim.gradient_accumulate = CASES[name]["accumulate"]
    return cfg


class S3prlSide:
    """bench/parity.py in a .venv-bench child; its files appear as it goes (init.pt before its first update,
    losses.json once its checkpoint is saved), so our side can start on each as soon as it exists."""

    def __init__(self, spec_path, log):
        self.log = log
        # s3prl's train loop counts updates on its tqdm bar: TQDM_DISABLE would make it run forever.
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BENCH_PYTHON), "-m", "bench.parity", str(spec_path)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.deadline = time.monotonic() + CHILD_TIMEOUT_S

    def fail(self, what: str):
        self.proc.kill()
        text = self.log.read_text()
        missing = "ModuleNotFoundError" in text
        hint = "\n(.venv-bench lacks a package: rebuild it with `bash bench/setup.sh`)" if missing else ""
        tail = "\n".join(text.splitlines()[-30:])
        pytest.fail(f"s3prl's side (bench/parity.py) {what}; last lines of {self.log}:\n{tail}{hint}", pytrace=False)

    def wait_for(self, path) -> None:
        while not path.exists():
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode} before writing {path}")
            if time.monotonic() > self.deadline:
                self.fail(f"did not finish in {CHILD_TIMEOUT_S} s")
            time.sleep(0.2)

    def finish(self) -> None:
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.fail(f"did not finish in {CHILD_TIMEOUT_S} s")
        if self.proc.returncode != 0:
            self.fail(f"exited with {self.proc.returncode}")


# Largest cosine difference float order can make between two implementations of the same embedding (fp32
# embeddings agree to ~1e-7 relative, so cosines of them to ~1e-7): a bound with a 10x margin.
SCORE_ROUNDING = 1e-6


def our_eer(ckpt, out_dir, *flags) -> tuple[float, int]:
    """(EER %, trials) of evaluate.py on one checkpoint."""
    res = evaluate.main(["--ckpt_dir", str(ckpt), "--out_dir", str(out_dir), *EVAL_FLAGS, *flags])
    step = json.loads((ckpt / "train_state.json").read_text())["step"]
    return res[TRIAL_LIST][step]["eer"], res[TRIAL_LIST][step]["num_trials"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    if not BENCH_PYTHON.exists():
        pytest.fail(f"{BENCH_PYTHON} is missing: run `make test` (or `bash bench/setup.sh`) to build it", pytrace=False)
    tmp = tmp_path_factory.mktemp("parity")
    t0 = time.monotonic()

    def clock(what: str) -> None:  # where the time goes (pytest -s shows it)
        print(f"[parity] {time.monotonic() - t0:6.1f} s (this process: {time.process_time():.1f} cpu s): {what}")

    data, work = tmp / "data", tmp / "work"
    prepare.main(["--dataset", "demo", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(data), *CORPUS])
    hubert = build_random_upstreams(tmp / "upstreams", "tiny", ["hubert_local"])["hubert_local"]
    ckpts = {"fbank": None, "hubert": str(hubert)}
    crops = build_crops(data, BATCH_SIZE, max(c["steps"] * c["accumulate"] for c in CASES.values()), MAX_SECS)
    torch.save(crops, tmp / "crops.pt")
    clock("corpus prepared, crops drawn")
    cases = [
        dict(name=name, upstream=c["upstream"], ckpt=ckpts[name], steps=c["steps"], accumulate=c["accumulate"])
        | dict(batches=crops["batches"][: c["steps"] * c["accumulate"]], evaluate=c["evaluate"])
        for name, c in CASES.items()
    ]
    spec = dict(work=str(work), corpus=str(tmp / "corpus"), speakers=str(data / "speakers.json"))
    (tmp / "spec.json").write_text(json.dumps(spec | dict(crops=str(tmp / "crops.pt"), cases=cases)))
    s3prl = S3prlSide(tmp / "spec.json", tmp / "s3prl.log")
    num_classes = len(json.loads((data / "speakers.json").read_text()))
    results = {}
    try:
        for case in cases:  # alongside s3prl's training of the same case
            name = case["name"]
            s3prl.wait_for(work / name / INIT_FILE)
            cfg = train_config(name, ckpts[name], data)
            init = torch.load(work / name / INIT_FILE, weights_only=True)
            losses, state = our_training(cfg, crops, case["batches"], init, num_classes)
            results[name] = dict(cfg=cfg, init=init, losses=losses, state=state)
            clock(f"{name}: our training done")
        for case in cases:  # alongside s3prl's stage 3
            name, r = case["name"], results[case["name"]]
            s3prl.wait_for(work / name / LOSSES_FILE)
            r["s3prl_losses"] = json.loads((work / name / LOSSES_FILE).read_text())
            r["s3prl_state"] = s3prl_final_state(work / name, case["steps"])
            if not case["evaluate"]:
                continue
            # s3prl's trained weights as a train.py checkpoint: both evaluations score exactly the same model.
            r["ckpt"] = our_checkpoint(
                tmp / "ours" / name / f"step-{case['steps']}", r["cfg"], r["s3prl_state"], case["steps"]
            )
            r["eer"], r["num_trials"] = our_eer(r["ckpt"], tmp / "eval" / name)
            r["scores"] = np.loadtxt(tmp / "eval" / name / TRIAL_LIST / f"step-{case['steps']}" / "scores.txt")
            clock(f"{name}: our evaluation done")
        s3prl.finish()
    finally:
        if s3prl.proc.poll() is None:
            s3prl.proc.kill()
    clock("s3prl's side done")
    for case in (c for c in cases if c["evaluate"]):
        result = work / case["name"] / "s3prl/evaluate" / S3PRL_TRIAL_LIST / f"step_{case['steps']}/result.yaml"
        results[case["name"]]["s3prl_eer"] = 100.0 * yaml.safe_load(result.read_text())["EER"]
    return results


def adam_step_bound(beta1: float, beta2: float, t: int) -> float:
    """Largest |m_hat / sqrt(v_hat)| Adam can reach at step t, whatever the gradients (Cauchy-Schwarz on the
    bias-corrected moments): sqrt(sum_s w_s^2 / u_s), w and u the weights of gradient s in m_hat and v_hat.
    It is 1 at t = 1 and ~1.04 at t = 10 for (0.9, 0.999): an update moves an element by at most ~lr."""
    w = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1**t) for s in range(1, t + 1)]
    u = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2**t) for s in range(1, t + 1)]
    return math.sqrt(sum(a * a / b for a, b in zip(w, u, strict=True)))


@pytest.mark.parametrize("name", list(CASES))
def test_initial_weights_are_copied_whole(parity, name):
    """Every trainable tensor of ours came from s3prl's freshly built model and loss (names and shapes match
    one to one: the copy is a strict load_state_dict), including the layer weights of a multi-layer upstream."""
    r = parity[name]
    assert set(r["init"]) == set(r["state"])
    assert "head.W" in r["init"]
    assert ("featurizer.weights" in r["init"]) == (name != "fbank")  # one hidden state: no layer weights


@pytest.mark.parametrize("name", list(CASES))
def test_training_loss_sequence_matches_s3prl(parity, name):
    """The same loss, batch after batch, over N updates.

    Tolerance: both sides compute the loss of identical weights on identical inputs in fp32, with reductions
    in another order (our dilated conv1d TDNN + masked pooling vs s3prl's F.unfold + Linear and per-utterance
    loops), so the first loss differs in its last bits (one ulp of a loss near 14 is 2^-20, 7e-8 relative).
    The weights then drift apart by float order alone: Adam normalises each gradient, so wherever a gradient is
    at rounding level, rounding picks the sign of a full lr step. The size of that drift, measured on these
    cases with our own code only (the same TDNN as conv1d and as s3prl's unfold + Linear, all else equal):
    up to 4.9e-5 relative over 5 updates (tiny HuBERT), 1.2e-6 (fbank). Rounding noise of 2^-24 on the
    gradients alone gave 1.1e-6: a convolution sums thousands of products in a different order, which a
    one-ulp model underestimates. rtol 3e-4 allows six times the measured drift, while a step that differs in
    substance lands outside it by ten times or more (measured on these cases): lr 10 % off 3e-3, the other
    accumulation 3e-2, clipping at 1 instead of 1000 1e-2. Weight decay 0 instead of 0.01 moves them by 4e-7
    to 6e-6 in 5 updates, within float-order drift: this check cannot see it.
    """
    r = parity[name]
    ours, theirs = np.array(r["losses"]), np.array(r["s3prl_losses"])
    case = CASES[name]
    assert len(ours) == len(theirs) == case["steps"] * case["accumulate"]
    rel = np.abs(ours - theirs) / np.abs(theirs)
    print(f"{name}: loss max abs diff {np.abs(ours - theirs).max():.3g}, max rel diff {rel.max():.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=3e-4, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_final_weights_match_s3prl(parity, name):
    """After N updates no element is further from s3prl's than two Adam runs from the same weights can be.

    Float-order noise decides the sign of an update wherever a gradient is at rounding level, and Adam turns
    that into a full step, so the bound is Adam's: each update moves an element by at most lr x
    adam_step_bound (weight decay, lr x 0.01 x |w|, is the same on both sides), hence the two sides stay within
    2 x lr x the sum of those bounds. That is a coarse check (a wrong initial copy, a learning rate several
    times off, another optimizer); the loss sequence above is the fine one.
    """
    r = parity[name]
    cfg = r["cfg"].optim
    beta1, beta2 = 0.9, 0.999  # torch.optim.AdamW's defaults, which both sides use
    atol = 2 * cfg.lr * sum(adam_step_bound(beta1, beta2, t) for t in range(1, CASES[name]["steps"] + 1))
    worst = {k: (r["state"][k] - v).abs().max().item() for k, v in r["s3prl_state"].items()}
    moved = max((r["s3prl_state"][k] - r["init"][k]).abs().max().item() for k in r["init"])
    print(f"{name}: max weight diff {max(worst.values()):.3g} (bound {atol:.3g}); largest move {moved:.3g}")
    assert set(r["state"]) == set(r["s3prl_state"])
    assert moved > 0.5 * cfg.lr  # both sides really trained
    for k, diff in worst.items():
        assert diff <= atol, f"{k}: {diff:.3g} > {atol:.3g}"


@pytest.mark.parametrize("name", EVALUATED)
def test_eer_matches_s3prl_stage3(parity, name, tmp_path):
    """s3prl's stage 3 (batch 1) and evaluate.py (length-sorted batches) score the same weights on the same
    trial list to the same EER.

    Both take the EER from sklearn's ROC with brentq interpolation, so equal scores give equal EERs; the
    embeddings differ only by rounding (whole utterances, masked pooling), which moves no trial across the
    threshold: 0.01 points is far below one trial (0.83 points of miss rate here).
    """
    r = parity[name]
    print(f"{name}: EER ours {r['eer']:.4f} %, s3prl {r['s3prl_eer']:.4f} %, {r['num_trials']} trials")
    assert r["num_trials"] == NUM_TRIALS
    # The two sides' cosines differ by float order only (~1e-7; SCORE_ROUNDING bounds it with room). If moving
    # every target down and every non-target up by that much (and the reverse) changes the EER, this list has
    # an opposite-label pair closer than rounding and no CPU-independent test can ask for exact equality: then
    # s3prl's EER must lie inside that window. Otherwise the EERs must agree to 0.01 point.
    scores, labels = r["scores"][:, 0], r["scores"][:, 1].astype(int)
    window = sorted(100 * compute_eer(scores + sign * SCORE_ROUNDING * (2 * labels - 1), labels)[0] for sign in (-1, 1))
    print(f"{name}: EER of our scores moved by +-{SCORE_ROUNDING:g} towards / away from the threshold: {window}")
    if window[1] - window[0] > 0.01:
        assert window[0] - 0.01 <= r["s3prl_eer"] <= window[1] + 0.01, (window, r["s3prl_eer"])
        return
    if abs(r["eer"] - r["s3prl_eer"]) > 0.01:
        # Tell a batching effect (padding inside the upstream) from a model or scoring difference.
        batch1, _ = our_eer(r["ckpt"], tmp_path, "--eval_max_frames", "1")
        pytest.fail(
            f"{name}: EER {r['eer']:.4f} % (evaluate.py, batched) vs {r['s3prl_eer']:.4f} % (s3prl stage 3, batch 1); "
            f"evaluate.py with --eval_max_frames 1 (batch 1): {batch1:.4f} %"
        )
