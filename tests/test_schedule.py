"""Which checkpoints compete for SUPERB's best over checkpoints: the scheduled saves, not those saved at a preemption,
a last step off the schedule or step 0 (unless --include_off_schedule); and what train_state.json records of each
save. Fast: run directories and results are fabricated, nothing is trained."""

import json

import numpy as np
import pytest
import yaml

from asv.errors import CheckpointError
from asv.evaluation import print_table, write_selections
from asv.manifest import DEV_LIST, Trial
from asv.rundir import EvalLayout, TrainState, read_train_state


def result(step: int, eer: float, scheduled: bool, trials: str = "test") -> dict:
    """Just enough of a results.json for the selections and the table."""
    return {
        "step": step,
        "trials": trials,
        "scheduled": scheduled,
        "num_trials": 10,
        "eer": eer,
        "min_dcf@0.01": 0.5,
        "min_dcf@0.05": 0.4,
        "min_cllr": 0.3,
        "calibration": {"absent": "no calibration list"},
    }


def run_results(eers: dict[int, tuple[float, float]], off_schedule: set[int]) -> dict:
    """{list: {step: result}} of a run: {step: (test EER, dev EER)}."""
    return {
        n: {s: result(s, e[i], s not in off_schedule, n) for s, e in eers.items()}
        for i, n in enumerate(("test", DEV_LIST))
    }


def checkpoint(tmp_path, step: int, state: dict | None = None, save_step: int | None = 2):
    """A checkpoint directory with what the schedule reads: train_state.json (`state` added to the loop position)
    and, unless save_step is None, config.yaml."""
    d = tmp_path / f"step-{step}"
    d.mkdir()
    (d / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": 0, **(state or {})}))
    if save_step is not None:
        (d / "config.yaml").write_text(yaml.safe_dump({"run": {"save_step": save_step}, "model": {}}))
    return d


# Steps 10 and 20 are scheduled (save_step 10); 0 (--save_initial) and 25 (a preemption) are not, and 25 has the
# lowest EER on both lists.
EERS = {0: (40.0, 41.0), 10: (20.0, 18.0), 20: (15.0, 19.0), 25: (5.0, 6.0)}


def test_off_schedule_checkpoint_is_scored_but_not_selected(tmp_path, capsys):
    results = run_results(EERS, off_schedule={0, 25})
    layout = EvalLayout(tmp_path)
    for n in results:
        (tmp_path / n).mkdir()
    write_selections(results, layout)
    best = json.loads(layout.best("test").read_text())
    assert best["step"] == 20 and "SUPERB" in best["selection"]
    assert best["competing_steps"] == [10, 20] and best["excluded_steps"] == [0, 25]
    selected = json.loads(layout.selected("test").read_text())
    assert selected["step"] == 10 and selected["competing_steps"] == [10, 20]  # dev: 18 at 10, 6 at 25

    print_table(results, "all 8 training speakers")
    out = capsys.readouterr().out.splitlines()
    row = {int(line.split()[2].rstrip("*")): line for line in out if line.startswith("test ")}
    assert row[25].split()[2] == "25*" and row[0].split()[2] == "0*" and row[20].split()[2] == "20"
    assert "best on test" in row[20] and "best" not in row[25] and "selected on dev" in row[10]
    footnote = [line for line in out if line.startswith("* off-schedule")]
    assert len(footnote) == 1 and "left out" in footnote[0] and "--include_off_schedule true" in footnote[0]


def test_include_off_schedule_lets_them_compete(tmp_path, capsys):
    from asv.config import EvalConfig, parse

    cfg, _ = parse(EvalConfig, ["--exp_dir", "exp/run", "--include_off_schedule", "true"])
    assert cfg.include_off_schedule and not parse(EvalConfig, ["--exp_dir", "exp/run"])[0].include_off_schedule
    results = run_results(EERS, off_schedule={0, 25})
    for n in results:
        (tmp_path / n).mkdir()
    write_selections(results, EvalLayout(tmp_path), cfg.include_off_schedule)
    best = json.loads(EvalLayout(tmp_path).best("test").read_text())
    assert best["step"] == 25 and best["competing_steps"] == [0, 10, 20, 25] and best["excluded_steps"] == []
    assert "--include_off_schedule" in best["selection"]
    assert json.loads(EvalLayout(tmp_path).selected("test").read_text())["step"] == 25

    print_table(results, "all 8 training speakers", cfg.include_off_schedule)
    out = capsys.readouterr().out
    assert "best on test" in next(line for line in out.splitlines() if line.startswith("test ") and " 25* " in line)
    assert "off-schedule checkpoints compete too" in out


def test_without_a_scheduled_checkpoint_the_best_is_over_the_others_and_says_so(tmp_path, capsys):
    # A short run: total_steps 4 with save_step 10 saves only step 4, off the schedule.
    results = run_results({2: (30.0, 31.0), 4: (25.0, 26.0)}, off_schedule={2, 4})
    for n in results:
        (tmp_path / n).mkdir()
    write_selections(results, EvalLayout(tmp_path))
    best = json.loads(EvalLayout(tmp_path).best("test").read_text())
    assert best["step"] == 4 and best["competing_steps"] == [2, 4] and best["excluded_steps"] == []
    assert "no scheduled checkpoint evaluated: best over off-schedule ones" in best["selection"]
    print_table(results, "all 8 training speakers")
    assert "no scheduled checkpoint evaluated" in capsys.readouterr().out


def test_old_train_state_loads_and_its_schedule_is_inferred_from_save_step(tmp_path):
    from asv.rundir import is_scheduled

    state = TrainState()
    state.load_state_dict(read_train_state(checkpoint(tmp_path, 3)))  # no "scheduled", no "effective_batch"
    assert (state.step, state.scheduled, state.effective_batch) == (3, None, None)
    # config.yaml's save_step is 2: step 0 (--save_initial) and 3 (off the schedule) are not scheduled saves.
    assert [is_scheduled(checkpoint(tmp_path, s)) for s in (0, 4)] == [False, True]
    assert not is_scheduled(tmp_path / "step-3")
    assert is_scheduled(checkpoint(tmp_path, 5, save_step=None))  # nothing to infer from: it competes, as before
    # The mark, when written, wins over the inference.
    assert is_scheduled(checkpoint(tmp_path, 7, {"scheduled": True}))

    state.scheduled, state.effective_batch = False, 32
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved["scheduled"] is False and saved["effective_batch"] == 32


@pytest.mark.parametrize(
    "bad", [{"scheduled": "yes"}, {"scheduled": 1}, {"effective_batch": 0}, {"effective_batch": "fifty"}]
)
def test_malformed_marks_are_refused_in_one_line(tmp_path, bad):
    ckpt = checkpoint(tmp_path, 10, bad)
    with pytest.raises(CheckpointError) as err:
        read_train_state(ckpt)
    key = next(iter(bad))
    message = str(err.value)
    assert "\n" not in message and str(ckpt / "train_state.json") in message and key in message
    assert "correct it, or delete the key" in message


def test_results_carry_the_effective_batch_and_say_when_it_is_not_superbs(tmp_path, capsys):
    from asv.evaluation import CheckpointCalibration, checkpoint_head, score_list

    rng = np.random.default_rng(0)
    vectors = {f"{i}.wav": rng.standard_normal(8) for i in range(6)}
    trials = [Trial(str(i), str(j), f"{i}.wav", f"{j}.wav", int(i % 2 == j % 2)) for i in range(6) for j in range(i)]
    layout, no_cal = EvalLayout(tmp_path / "evaluate"), CheckpointCalibration(None, "no calibration list")
    heads = {
        10: checkpoint_head(checkpoint(tmp_path, 10, {"scheduled": True, "effective_batch": 32})),
        20: checkpoint_head(checkpoint(tmp_path, 20, {"scheduled": True, "effective_batch": 50})),
        30: checkpoint_head(checkpoint(tmp_path, 30)),  # an older checkpoint: the batch is unknown
    }
    written = {}
    for step, head in heads.items():
        score_list(trials, vectors, head={"trials": "test", "step": step, **head}, layout=layout, calibration=no_cal)
        written[step] = json.loads(layout.results("test", step).read_text())
    assert written[10]["effective_batch"] == 32 and written[10]["scheduled"] is True
    assert "not SUPERB's recipe of 50" in written[10]["effective_batch_note"]
    assert written[20]["effective_batch"] == 50 and "effective_batch_note" not in written[20]
    assert written[30]["effective_batch"] is None and "effective_batch_note" not in written[30]
    assert written[30]["scheduled"] is True  # inferred: 30 is a multiple of its config.yaml's save_step 2

    print_table({"test": written}, "all 8 training speakers")
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("effective batch:")] == [
        f"effective batch: {written[10]['effective_batch_note']}"
    ]
