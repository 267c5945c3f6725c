"""--init_from: a run starts from another run's weights (staged training), with a new optimizer and schedule, and
refuses a checkpoint that does not fit in one line naming the key."""

import pytest
from safetensors.numpy import load_file

from tests.conftest import ROOT
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


def test_the_three_beyond_superb_stages_run_end_to_end(tmp_path, tiny_demo, capsys):
    """configs/beyond_superb/ on the tiny demo corpus with a tiny random WavLM: each stage trains from the previous
    one through train.py and is scored by evaluate.py (mechanics, not quality). Only what the machine and the
    corpus force is changed: the data, the upstream, the lengths, the sizes and the step counts."""
    import yaml

    import evaluate
    import train
    from asv.random_upstreams import build_tiny_upstreams

    ckpt = build_tiny_upstreams(tmp_path / "upstreams")["wavlm_local"]
    previous, results = None, {}
    for stage in ("1_frozen", "2_joint", "3_lmft"):
        cfg = yaml.safe_load((ROOT / "configs" / "beyond_superb" / f"{stage}.yaml").read_text())
        exp = tmp_path / stage
        cfg["data"].update(data_dir=str(tiny_demo[0]), noise_dir=None, rir_dir=None, batch_size=4, num_workers=0)
        cfg["data"].update(max_secs=min(cfg["data"]["max_secs"], 1.5))
        cfg["model"].update(upstream="wavlm_local", upstream_ckpt=str(ckpt), mhfa_heads=4, mhfa_compression_dim=16)
        cfg["optim"].update(effective_batch=8, warmup_steps=1)
        cfg["loss"]["margin_warmup_steps"] = min(cfg["loss"].get("margin_warmup_steps", 0), 2)
        cfg["run"].update(exp_dir=str(exp), total_steps=2, save_step=2, log_step=1, wandb_mode="disabled")
        if previous:
            assert cfg["run"]["init_from"].startswith("exp/beyond_superb/")  # the previous stage's last step
            cfg["run"]["init_from"] = str(previous / "step-2")
        (tmp_path / f"{stage}.yaml").write_text(yaml.safe_dump(cfg))
        train.main(["--config_path", str(tmp_path / f"{stage}.yaml")])
        assert ("initialised from" in capsys.readouterr().out) == (previous is not None), stage
        results[stage] = evaluate.main(["--exp_dir", str(exp), "--wandb_mode", "disabled", "--num_workers", "0"])
        previous = exp
    for stage, res in results.items():
        assert 0 <= res["demo_test"][2]["eer"] <= 100, stage
    # Stage 1 froze the upstream; stages 2 and 3 fine-tuned it and carry it in their checkpoints.
    assert not any(
        k.startswith("upstream.") for k in load_file(tmp_path / "1_frozen" / "step-2" / "embedder.safetensors")
    )
    assert any(k.startswith("upstream.") for k in load_file(tmp_path / "3_lmft" / "step-2" / "embedder.safetensors"))
