"""prepare.py's use of the machine: how many processes decode by default, and the rate it reports."""

import json
import os
import re

import pytest

from asv.config import PrepareConfig, parse
from asv.corpora import worker_count

# The smallest demo corpus prepare.py accepts with a trial list: 4 training and 4 test files.
SMALL_DEMO = ["--demo_train_speakers", "2", "--demo_test_speakers", "2", "--demo_videos", "1"]
SMALL_DEMO += ["--demo_utts_per_video", "2", "--demo_trials", "4", "--dev_speakers", "0"]


def test_num_workers_defaults_to_the_usable_cores(monkeypatch):
    cfg, _ = parse(PrepareConfig, [])
    assert cfg.num_workers is None  # saved as None: prepare.json's config names no machine's core count
    assert worker_count(cfg.num_workers) == len(os.sched_getaffinity(0))
    # taskset / a cpuset allowing 5 of the machine's cores: 5 workers, whatever os.cpu_count() says.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert worker_count(None) == 5
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS has no affinity call
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert worker_count(None) == 7
    assert worker_count(3) == 3 and worker_count(1) == 1  # a number given is used as given


@pytest.mark.slow
def test_prepare_reports_its_decode_rate_and_reuses_its_output_across_worker_counts(tmp_path, capsys):
    import prepare

    args = ["--dataset", "demo", "--dataset_root", str(tmp_path / "corpus"), "--out_dir", str(tmp_path / "data")]
    args += SMALL_DEMO
    out = prepare.main(args)  # the default worker count: a pool of the usable cores (2 on the CI machine)
    cores = len(os.sched_getaffinity(0))
    printed = capsys.readouterr().out
    line = re.search(r"^decoded (\d+) files in [\d.]+ s with (.+): ([\d.]+) files/s$", printed, re.M)
    assert line, printed
    assert int(line[1]) == 8  # 4 training files + 4 test files, each decoded once
    pool = f"{cores} worker processes" if cores > 1 else "no worker processes"
    assert line[2] == pool and float(line[3]) > 0
    record = json.loads((out / "prepare.json").read_text())
    assert record["config"]["num_workers"] is None
    decode = record["summary"]["decode"]
    assert decode["files"] == 8 and decode["workers"] == cores
    assert decode["files_per_s"] == pytest.approx(decode["files"] / decode["seconds"], rel=0.1)
    # The worker count changes how fast, never what is written: another count reuses the output.
    prepare.main([*args, "--num_workers", "1"])
    assert "already prepared" in capsys.readouterr().out
