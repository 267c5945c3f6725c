"""--init_from: a run starts from another run's weights (staged training), with a new optimizer and schedule, and
refuses a checkpoint that does not fit in one line naming the key."""

import pytest
from safetensors.numpy import load_file

from tests.test_pipeline import TRAIN, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tiny_demo, tmp_path_factory):
    exp = tmp_path_factory.mktemp("staged") / "stage1"
    run(["train.py", *TRAIN, "--data_dir", str(tiny_demo[0]), "--exp_dir", str(exp), "--total_steps", "2"])
    return exp / "step-2"


def test_a_run_starts_from_the_weights_of_another_with_a_new_optimizer(tmp_path, tiny_demo, source):
    exp = tmp_path / "stage2"
    args = ["train.py", *TRAIN, "--data_dir", str(tiny_demo[0]), "--exp_dir", str(exp), "--init_from", str(source)]
    # Another margin and learning rate: the loss settings and the optimizer may change between stages.
    out = run([*args, "--total_steps", "1", "--save_initial", "true", "--margin", "0.5", "--lr", "1e-5"])
    assert f"initialised from {source}:" in out.stdout and "(a new optimizer and schedule)" in out.stdout
    start, trained = load_file(exp / "step-0" / "model.safetensors"), load_file(source / "model.safetensors")
    assert start.keys() == trained.keys()
    for k in start:
        assert (start[k] == trained[k]).all(), k  # copied exactly
    assert "step 1/1" in out.stdout  # the new run counts its own updates from 0
    # Once the run has checkpoints of its own it resumes from them, not from --init_from.
    out = run([*args, "--total_steps", "2", "--margin", "0.5", "--lr", "1e-5"])
    assert "resumed from" in out.stdout and "initialised from" not in out.stdout


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path, tiny_demo, source):
    args = ["train.py", *TRAIN, "--data_dir", str(tiny_demo[0]), "--total_steps", "1", "--init_from", str(source)]
    wider = run([*args, "--exp_dir", str(tmp_path / "a"), "--tdnn_size", "96"], check=False)
    (line,) = wider.stderr.strip().splitlines()
    assert line.startswith(f"error: {source / 'model.safetensors'} does not fit this model: downstream.")
    assert "is shape [64] there, the model needs shape [96]" in line
    missing = run([*args, "--exp_dir", str(tmp_path / "b"), "--init_from", str(tmp_path)], check=False)
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path} is not a checkpoint directory")
