import subprocess
import sys

import pytest

from asv.config import TrainConfig, load_train_config, parse, save_config
from asv.conventions import SUPERB_EFFECTIVE_BATCH
from asv.errors import ConfigError
from asv.optim import BatchPlan, plan_batches
from tests.conftest import ROOT

# Every SuperbASV.default_config field (spec 3.1) that belongs to training, as the flag that carries it.
DEFAULT_CONFIG_FLAGS = [
    "--exp_dir",
    "--min_secs",
    "--max_secs",
    "--batch_size",
    "--upstream",
    "--upstream_ckpt",
    "--upstream_normalize",
    "--layer_selections",
    "--featurizer_normalize",
    "--upstream_trainable",
    "--downstream",
    "--loss",
    "--margin",
    "--scale",
    "--optimizer",
    "--lr",
    "--scheduler",
    "--scheduler_kwargs",
    "--total_steps",
    "--log_step",
    "--save_step",
    "--gradient_clipping",
    "--gradient_accumulate",
    "--auto_resume",
    "--resume_ckpt_dir",
    "--keep_num_ckpts",
    "--seed",
]


def test_train_help_lists_every_default_config_field():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for flag in DEFAULT_CONFIG_FLAGS:
        assert flag in out.stdout, flag
    # The comment above each field is its help text.
    assert "Drop training utterances" in out.stdout


@pytest.mark.parametrize("script", ["prepare.py", "evaluate.py"])
def test_other_scripts_print_their_help(script):
    # argparse formats each field's comment with %: a bare % in one breaks --help for the whole script.
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--" in out.stdout and "Traceback" not in out.stderr


def test_defaults_are_the_superb_recipe():
    cfg = TrainConfig()
    assert (cfg.data.min_secs, cfg.data.max_secs, cfg.data.batch_size) == (2.0, 8.0, 10)
    assert (cfg.loss.loss, cfg.loss.margin, cfg.loss.scale) == ("amsoftmax", 0.4, 30.0)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.gradient_clipping) == ("AdamW", 1e-4, 1000.0)
    # SuperbASV's batch_size 10 x gradient_accumulate 5 on one device, the same 50 per update on any other count.
    assert plan_batches(cfg.optim, cfg.data.batch_size, 1) == BatchPlan(10, 1, 5)
    assert (cfg.run.total_steps, cfg.run.log_step, cfg.run.save_step) == (200_000, 500, 10_000)
    assert (
        cfg.model.layer_selections is None and not cfg.model.upstream_trainable and not cfg.model.featurizer_normalize
    )


@pytest.mark.parametrize(
    "processes, plan", [(1, (10, 5)), (2, (5, 5)), (5, (10, 1)), (10, (5, 1)), (25, (2, 1)), (50, (1, 1))]
)
def test_superbs_50_per_update_on_any_process_count_that_divides_it(processes, plan):
    got = plan_batches(TrainConfig().optim, 10, processes)
    assert (got.per_device, got.accumulate) == plan and got.effective == SUPERB_EFFECTIVE_BATCH


@pytest.mark.parametrize("processes", [3, 4, 8, 16])
def test_a_process_count_that_does_not_divide_50_is_refused_with_the_ways_out(processes):
    with pytest.raises(ConfigError) as err:
        plan_batches(TrainConfig().optim, 10, processes)
    assert "launch 1, 2, 5, 10, 25, 50 processes, or pass --effective_batch E" in str(err.value)


def test_effective_batch_and_fixed_accumulation_plans():
    optim = TrainConfig().optim
    optim.effective_batch = 64
    assert plan_batches(optim, 10, 8) == BatchPlan(8, 8, 1)  # 8 per process: the largest batch <= 10 dividing it
    assert plan_batches(optim, 10, 1) == BatchPlan(8, 1, 8)
    optim.effective_batch, optim.gradient_accumulate = None, 3
    assert plan_batches(optim, 4, 2).effective == 24  # the batch is fixed at --batch_size
    optim.effective_batch = 25
    with pytest.raises(ConfigError, match="pass only one of the two"):
        plan_batches(optim, 4, 2)
    with pytest.raises(ConfigError, match="--gradient_accumulate 0: needs a positive count"):
        parse(TrainConfig, ["--gradient_accumulate", "0"])


def test_yaml_selects_non_default_loss_and_flags_override_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  loss: softmax\nrun:\n  total_steps: 7\nlr: 0.5\n")
    cfg, _ = parse(TrainConfig, ["--config_path", str(path)])
    assert (cfg.loss.loss, cfg.run.total_steps, cfg.optim.lr) == ("softmax", 7, 0.5)
    cfg, _ = parse(TrainConfig, ["--config_path", str(path), "--lr", "0.1", "--loss", "amsoftmax"])
    assert (cfg.loss.loss, cfg.optim.lr, cfg.run.total_steps) == ("amsoftmax", 0.1, 7)


@pytest.mark.parametrize(
    "text, key", [("run:\n  total_stepz: 3\n", "run.total_stepz"), ("learning_rate: 1\n", "learning_rate")]
)
def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key):
        parse(TrainConfig, ["--config_path", str(path)])


def test_unknown_flag_is_an_error():
    with pytest.raises(ConfigError, match="--learning_rate"):
        parse(TrainConfig, ["--learning_rate", "1"])


def test_saved_config_round_trips(tmp_path):
    cfg, _ = parse(TrainConfig, ["--upstream", "mfcc", "--layer_selections", "0", "2", "--margin", "0.2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_train_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("kwargs", ["{max_lr:0.003}", "[1, 2]", "{a: [1"])
def test_scheduler_kwargs_that_are_not_a_mapping_fail_at_parse_time(kwargs):
    with pytest.raises(ConfigError, match="not a YAML mapping"):
        parse(TrainConfig, ["--scheduler", "OneCycleLR", "--scheduler_kwargs", kwargs])


def test_wandb_auto_follows_wandb_mode_then_login(monkeypatch, tmp_path):
    from asv.tracking import wandb_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"  # an explicit flag wins
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_optimizer_choices_are_torch_optimizers_the_loop_can_step():
    import torch

    from asv.config import OPTIMIZERS

    for name in OPTIMIZERS:
        cls = getattr(torch.optim, name)
        assert issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer, name
    with pytest.raises((ConfigError, SystemExit), match="LBFGS"):  # it needs a closure at every step: not offered
        parse(TrainConfig, ["--optimizer", "LBFGS"])


def test_optimizer_keywords_and_warmup_ramp_then_the_scheduler():
    import torch

    from asv.optim import build_optimizer_and_scheduler

    cfg, _ = parse(
        TrainConfig,
        ["--optimizer", "SGD", "--optimizer_kwargs", "{momentum: 0.9, nesterov: true}", "--lr", "0.1"]
        + ["--warmup_steps", "3", "--scheduler", "ExponentialLR", "--scheduler_kwargs", "{gamma: 0.5}"],
    )
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, torch.nn.Linear(2, 2), None)
    assert (optimizer.defaults["momentum"], optimizer.defaults["nesterov"]) == (0.9, True)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # lr x k/4 for k = 1..4 over the ramp, then halved at each update from the full rate.
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.05, 0.025], rel=1e-12)
    with pytest.raises(ConfigError, match="--optimizer_kwargs"):
        build_optimizer_and_scheduler(
            parse(TrainConfig, ["--optimizer_kwargs", "{momentum: 0.9}"])[0].optim, torch.nn.Linear(2, 2), None
        )
