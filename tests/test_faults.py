"""Issue 6: bad input, faults and safe loading, each injected for real (`pytest -m faults`).

Bad audio is written as real bytes (cut-off WAVs, empty files, NaN samples, an m4a header), the
SIGKILL and the full disk hit real train.py processes, and every checkpoint file gets a live pickle
payload that would create a marker file if anything unpickled it.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from asv import audio
from asv.audio import SAMPLE_RATE, BadAudioError, load_audio
from asv.datasets import EvalDataset, load_train_set
from asv.errors import CheckpointError, ManifestError
from asv.manifest import (
    Trial,
    read_train_csv,
    read_trials_csv,
    read_voxceleb_trials,
    repeated_pairs,
    unique_utterances,
)
from asv.rundir import remove_interrupted_saves, verify_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.faults

TRAIN = [
    "--upstream",
    "fbank",
    "--batch_size",
    "4",
    "--gradient_accumulate",
    "1",
    "--max_secs",
    "1.0",
    "--min_secs",
    "0.5",
    "--log_step",
    "1",
    "--num_workers",
    "0",
    "--wandb_mode",
    "disabled",
]


def run(args, check=True, **kwargs):
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ, **kwargs
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def one_line_error(out, *needles):
    assert out.returncode != 0, out.stdout[-1000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), out.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def tone(seconds: float, sr: int = SAMPLE_RATE, freq: float = 200.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))).astype(
        np.float32
    )


def write_bad_files(d: Path) -> dict[str, str]:
    """Real broken files, by name -> the BadAudioError reason load_audio must give."""
    d.mkdir(parents=True, exist_ok=True)
    sf.write(d / "ok.wav", tone(1.0), SAMPLE_RATE, subtype="PCM_16")
    whole = (d / "ok.wav").read_bytes()
    (d / "truncated.wav").write_bytes(whole[: len(whole) // 2])  # header promises twice the data
    (d / "cut_header.wav").write_bytes(whole[:30])  # cut inside the header
    (d / "empty.wav").write_bytes(b"")
    (d / "garbage.wav").write_bytes(np.random.default_rng(1).bytes(4000))
    # An MP4/AAC container (VoxCeleb2's m4a): libsndfile has no decoder for it.
    (d / "speech.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A \x00\x00\x02\x00isomiso2" + bytes(2000))
    sf.write(d / "no_samples.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    nan = tone(1.0)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    inf = tone(1.0)
    inf[5] = np.inf
    sf.write(d / "inf.wav", inf, SAMPLE_RATE, subtype="FLOAT")
    return {
        "truncated.wav": "truncated",
        "cut_header.wav": "corrupt or truncated WAV header",
        "empty.wav": "empty file",
        "garbage.wav": "unsupported or unrecognised container",
        "speech.m4a": "unsupported or unrecognised container",
        "no_samples.wav": "no samples",
        "nan.wav": "NaN or inf samples",
        "inf.wav": "NaN or inf samples",
        "missing.wav": "missing",
    }


def write_odd_but_usable_files(d: Path) -> None:
    sf.write(d / "r8k.wav", tone(1.0, 8000), 8000, subtype="PCM_16")
    sf.write(d / "r44k.wav", tone(1.0, 44100), 44100, subtype="PCM_16")
    sf.write(d / "stereo.wav", np.stack([tone(1.0), -tone(1.0) * 0.5], 1), SAMPLE_RATE, subtype="PCM_16")
    sf.write(d / "speech.ogg", tone(1.0), SAMPLE_RATE)  # OGG Vorbis and MP3 decode through libsndfile
    sf.write(d / "speech.mp3", tone(1.0), SAMPLE_RATE)


# ----------------------------------------------------------------------------- bad audio


def test_load_audio_rejects_each_kind_of_bad_file(tmp_path):
    for name, reason in write_bad_files(tmp_path).items():
        with pytest.raises(BadAudioError, match=name) as err:
            load_audio(tmp_path / name)
        assert err.value.reason == reason, (name, err.value)


def test_load_audio_resamples_downmixes_and_warns_once(tmp_path, capsys, monkeypatch):
    write_odd_but_usable_files(tmp_path)
    monkeypatch.setattr(audio, "_resample_warned", False)
    for name in ("r8k.wav", "r44k.wav"):
        wav = load_audio(tmp_path / name)
        assert wav.dtype == np.float32 and abs(len(wav) - SAMPLE_RATE) <= 1 and np.isfinite(wav).all()
    assert capsys.readouterr().err.count("resampling to 16000 Hz") == 1  # once per process
    ref = tone(1.0)
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.wav"), ref * 0.25, atol=1e-3)
    for name in ("speech.ogg", "speech.mp3"):
        assert abs(len(load_audio(tmp_path / name)) - SAMPLE_RATE) < 2000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny generated corpus, prepared, plus a 1-step checkpoint trained on it (shared, never modified)."""
    import prepare

    tmp = tmp_path_factory.mktemp("faults")
    args = ["--dataset", "demo", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(tmp / "data")]
    args += ["--demo_train_speakers", "4", "--demo_test_speakers", "2", "--demo_videos", "2"]
    args += ["--demo_utts_per_video", "2", "--demo_trials", "12", "--num_workers", "1"]
    prepare.main(args)
    run(["train.py", *TRAIN, "--data_dir", str(tmp / "data"), "--exp_dir", str(tmp / "exp"), "--total_steps", "1"])
    return tmp


def test_prepare_reports_every_bad_file_and_keeps_going(demo, tmp_path, capsys):
    import prepare

    bad = write_bad_files(tmp_path / "audio")
    write_odd_but_usable_files(tmp_path / "audio")
    good = sorted((demo / "corpus" / "dev" / "wav").rglob("*.wav"))[:4]
    rows = [(str(p), "spkA", f"a{i}") for i, p in enumerate(good[:2])] + [
        (str(p), "spkB", f"b{i}") for i, p in enumerate(good[2:])
    ]
    del bad["missing.wav"]  # a listed file that does not exist is a manifest error, before any decoding
    rows += [(str(tmp_path / "audio" / n), "spkC", n) for n in bad]  # every other bad kind in training
    rows += [(str(tmp_path / "audio" / n), "spkD", n) for n in ("r8k.wav", "r44k.wav", "stereo.wav", "speech.ogg")]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("wav_path", "spk", "id"), *rows])
    test_wavs = sorted((demo / "corpus" / "test" / "wav").rglob("*.wav"))
    trials = [f"1 {test_wavs[0]} {test_wavs[1]}", f"0 {test_wavs[0]} {tmp_path / 'audio' / 'nan.wav'}"]
    trials += [f"0 {test_wavs[1]} {tmp_path / 'audio' / 'speech.mp3'}"]
    (tmp_path / "trials.txt").write_text("\n".join(trials) + "\n")
    capsys.readouterr()
    out = prepare.main(
        ["--dataset", "manifest", "--train_csv", str(tmp_path / "train.csv"), "--trials", str(tmp_path / "trials.txt")]
        + ["--dev_speakers", "0"]
        + ["--out_dir", str(tmp_path / "out"), "--num_workers", "2"]
    )
    printed = capsys.readouterr().out
    listed = dict(line.split("\t")[:2] for line in (out / "bad_files.txt").read_text().splitlines())
    expected = {str(tmp_path / "audio" / n): r for n, r in bad.items()}
    assert listed == expected
    assert f"warning: {len(bad)} unusable audio files" in printed and "2 NaN or inf samples" in printed
    assert "2 files are not 16000 Hz (1 at 8000 Hz, 1 at 44100 Hz)" in printed and "1 multi-channel" in printed
    train = read_train_csv(out / "train.csv")
    assert sorted(u.id for u in train) == ["a0", "a1", "b0", "b1", "r44k.wav", "r8k.wav", "speech.ogg", "stereo.wav"]
    assert {u.id: u.num_samples for u in train}["r8k.wav"] == SAMPLE_RATE  # lengths at 16 kHz
    assert json.loads((out / "speakers.json").read_text()) == {"spkA": 0, "spkB": 1, "spkD": 2}
    # The trial with the NaN file is dropped and counted; the mp3 one stays.
    assert len(read_trials_csv(out / "trials" / "trials.csv")) == 2 and "(1 dropped: unusable audio)" in printed
    summary = json.loads((out / "prepare.json").read_text())["summary"]
    assert summary["audio"]["bad_files"] == len(bad) and summary["dropped_trials"] == {"trials": 1}


def test_training_replaces_a_file_that_went_bad_after_prepare(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    lines = (data / "train.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    rows[0][1] = str(tmp_path / "deleted.wav")  # gone
    rows[1][1] = str(tmp_path / "overwritten.wav")  # now garbage
    (tmp_path / "overwritten.wav").write_bytes(b"RIFF" + bytes(10))
    (data / "train.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")

    dataset, _, _ = load_train_set(data, min_secs=0.5, max_secs=1.0, seed=0)
    assert [u.wav_path for u in dataset.utterances[:2]] == [rows[0][1], rows[1][1]]
    first = [dataset[(0, i)] for i in range(3)]
    again = [dataset[(0, i)] for i in range(3)]
    assert dataset.num_unreadable.value == 6  # item 0 hits 2 bad files, item 1 one; twice over
    for (wa, la), (wb, lb) in zip(first, again, strict=True):  # deterministic substitute
        assert torch.equal(wa, wb) and la == lb
    assert first[0][1] == first[1][1] == first[2][1]  # 0 and 1 both fall through to utterance 2's label

    exp = tmp_path / "exp"
    out = run(
        ["train.py", *TRAIN, "--data_dir", str(data), "--exp_dir", str(exp), "--total_steps", "2", "--num_workers", "1"]
    )
    assert "deleted.wav: missing" in out.stderr and "overwritten.wav" in out.stderr
    log = [json.loads(x) for x in (exp / "train_log.jsonl").read_text().splitlines()]
    log = [r for r in log if "train/loss" in r]  # not the dev-EER records
    assert log[-1]["step"] == 2 and log[-1]["train/unreadable_files"] >= 1  # counted across the worker


def test_too_short_and_odd_test_audio_gets_a_finite_embedding(demo, tmp_path):
    write_odd_but_usable_files(tmp_path)
    sf.write(tmp_path / "short.wav", tone(0.05), SAMPLE_RATE)  # 800 samples: 3 fbank frames, x-vector needs 15
    ds = EvalDataset([("s", str(tmp_path / "short.wav"))], min_samples=2241)
    _, wav = ds[0]
    assert len(wav) == 2241 and torch.equal(wav[800:1600], wav[:800])  # wrap-padded: the audio repeats

    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    ref = sorted((demo / "corpus" / "test" / "wav").rglob("*.wav"))[0]
    rows = [("short", "r", str(tmp_path / "short.wav"), str(ref), "1")]
    rows += [(n, "r", str(tmp_path / n), str(ref), "0") for n in ("r8k.wav", "stereo.wav", "speech.mp3")]
    with open(data / "trials" / "odd.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id1", "id2", "wav_path1", "wav_path2", "label"), *rows])
    run(
        ["evaluate.py", "--ckpt_dir", str(demo / "exp" / "step-1"), "--data_dir", str(data), "--trial_names", "odd"]
        + ["--out_dir", str(tmp_path / "ev"), "--wandb_mode", "disabled", "--num_workers", "0"]
    )
    scores = np.loadtxt(tmp_path / "ev" / "odd" / "step-1" / "scores.txt")
    assert scores.shape == (4, 2) and np.isfinite(scores).all()


# ----------------------------------------------------------------------------- trial lists and CSVs


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 a.wav b.wav\n1 a.wav\n", ":2: expected"),
        ("1 a.wav b.wav\n2 a.wav c.wav\n", ":2: expected"),
        ("1 a.wav b.wav\ntrue a.wav c.wav\n", ":2: expected"),
        ("1 a.wav b.wav\n\n0 a.wav b.wav\n", ":3: pair listed with label 0 here and 1 at line 1"),
    ],
)
def test_voxceleb_trial_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ManifestError, match=message) as err:
        read_voxceleb_trials(tmp_path / "t.txt")
    assert str(tmp_path / "t.txt") in str(err.value) and "\n" not in str(err.value)


def test_repeated_trials_are_kept_as_listed_and_counted(tmp_path):
    # s3prl scores every line of a list, repeats included (voxceleb1_test_v2.txt repeats 338 of 37,720 pairs).
    (tmp_path / "t.txt").write_text("1 a.wav b.wav\n1 b.wav a.wav\n0 a.wav c.wav\n1 a.wav b.wav\n")
    rows = read_voxceleb_trials(tmp_path / "t.txt")
    assert rows == [(1, "a.wav", "b.wav"), (1, "b.wav", "a.wav"), (0, "a.wav", "c.wav"), (1, "a.wav", "b.wav")]
    assert repeated_pairs([Trial(a, b, a, b, label) for label, a, b in rows]) == 2


def test_numeric_looking_ids_stay_strings(tmp_path):
    # s3prl#481: ids parsed as numbers lose their zeros, so '007' and '7' collapse into one utterance.
    (tmp_path / "t.txt").write_text("1 007 0012\n0 7 12\n")
    assert read_voxceleb_trials(tmp_path / "t.txt") == [(1, "007", "0012"), (0, "7", "12")]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id1", "id2", "wav_path1", "wav_path2", "label"), ("007", "0012", "x", "y", "1")])
        csv.writer(f).writerow(("7", "12", "x7", "y12", "0"))
    trials = read_trials_csv(tmp_path / "t.csv")
    assert sorted(u for u, _ in unique_utterances(trials)) == ["0012", "007", "12", "7"]
    (tmp_path / "train.csv").write_text("id,wav_path,spk,num_samples\n0001,a.wav,007,16000\n1,b.wav,7,16000\n")
    assert [(u.id, u.spk) for u in read_train_csv(tmp_path / "train.csv")] == [("0001", "007"), ("1", "7")]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("t.csv", "id1,id2,wav_path1,wav_path2,label\na,b,x,y,1\na,c,x,z,2\n", ":3: label must be 0 or 1, got '2'"),
        ("t.csv", "id1,id2,wav_path1,wav_path2,label\na,b,x,y,1\na,c,x,z\n", ":3: expected 5 comma-separated"),
        ("t.csv", "id1,id2,wav_path1,wav_path2,label\na,b,x,y,1,extra\n", ":2: expected 5 comma-separated"),
        ("t.csv", "id1,id2,wav_path1,wav_path2,label\na,,x,y,1\n", ":2: empty id2"),
        (
            "t.csv",
            "id1,id2,wav_path1,wav_path2,label\na,b,x,y,1\na,c,OTHER,z,0\n",
            ":3: id 'a' is OTHER, but x at line 2",
        ),
        ("t.csv", "id1,id2,wav_path1,wav_path2,label\na,b,x,y,1\nb,a,y,x,0\n", ":3: pair listed with label 0"),
        ("t.csv", "id1,id2,wav_path1,label\na,b,x,1\n", "missing column(s) wav_path2"),
        ("train.csv", "id,wav_path,spk,num_samples\na,x,s,10\nb,y,s,ten\n", ":3: num_samples must be"),
        ("train.csv", "id,wav_path,spk,num_samples\na,x,s,10\na,y,s,10\n", ":3: duplicate id 'a' (first at line 2)"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    reader = read_train_csv if name == "train.csv" else read_trials_csv
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        reader(tmp_path / name)
    assert str(err.value).startswith(str(tmp_path / name))


def test_unknown_speaker_and_bad_trial_csv_fail_in_one_line(demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    with open(data / "train.csv", "a") as f:
        f.write("extra,/nonexistent.wav,id99999,16000\n")
    with pytest.raises(ManifestError, match="speaker 'id99999' of extra is not in"):
        load_train_set(data, 0.5, 1.0, 0)
    import evaluate
    import train

    with pytest.raises(SystemExit, match="error: .*id99999.*re-run prepare.py") as err:
        train.main([*TRAIN, "--data_dir", str(data), "--exp_dir", str(tmp_path / "x")])
    assert "\n" not in str(err.value)
    trials = data / "trials" / "demo_test.csv"
    trials.write_text(trials.read_text() + "a,b,x,y,maybe\n")
    n = len(trials.read_text().splitlines())
    with pytest.raises(SystemExit, match=f"error: {trials}:{n}: label must be 0 or 1") as err:
        evaluate.main(["--ckpt_dir", str(demo / "exp" / "step-1"), "--data_dir", str(data)])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- checkpoints


KILL_DURING_SAVE = """
import os, signal, sys
import accelerate.checkpointing as ckpt
import train
real_save = ckpt.save
def save(obj, f, *args, **kwargs):  # SIGKILL right after the optimizer state of step 2 hit the disk
    real_save(obj, f, *args, **kwargs)
    if ".tmp-step-2" in str(f) and "optimizer" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.save = save
train.main(sys.argv[1:])
"""


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(demo, tmp_path):
    exp = tmp_path / "exp"
    args = [*TRAIN, "--data_dir", str(demo / "data"), "--exp_dir", str(exp), "--save_step", "1", "--total_steps", "3"]
    out = run(["-c", KILL_DURING_SAVE, *args], check=False)
    assert out.returncode == -9  # really killed, mid-save
    assert sorted(p.name for p in exp.iterdir() if "step" in p.name) == [".tmp-step-2", "step-1"]
    assert (exp / ".tmp-step-2" / "optimizer.bin").is_file() and not (exp / ".tmp-step-2" / "train_state.json").exists()
    verify_checkpoint(exp / "step-1")
    out = run(["train.py", *args[:-1], "2"])
    assert "cleaned up .tmp-step-2" in out.stdout and "resumed from" in out.stdout and "at step 1" in out.stdout
    assert sorted(p.name for p in exp.iterdir() if "step" in p.name) == ["step-1", "step-2"]


def test_interrupted_replacement_of_a_checkpoint_is_undone(tmp_path):
    (tmp_path / ".old-step-5").mkdir()  # killed between the two renames: step-5 itself is gone
    (tmp_path / ".old-step-5" / "train_state.json").write_text("{}")
    (tmp_path / ".tmp-step-7").mkdir()
    remove_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


class Payload:
    """Unpickling this creates `marker`: the test for 'no pickle executes on load'."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant(path: Path, marker: Path) -> None:
    if path.suffix in (".bin", ".pkl"):
        torch.save(Payload(marker), path)  # torch's zip format, as the real files
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_resume_and_evaluate_skip_corrupt_and_booby_trapped_checkpoints(demo, tmp_path):
    exp, marker = tmp_path / "exp", tmp_path / "PWNED"
    good = demo / "exp" / "step-1"
    # The payload is live: torch.load without weights_only runs it.
    plant(tmp_path / "probe.bin", tmp_path / "probe_marker")
    torch.load(tmp_path / "probe.bin", weights_only=False)
    assert (tmp_path / "probe_marker").exists()

    shutil.copytree(good, exp / "step-1")
    files = sorted(p.name for p in good.iterdir()) + ["custom_checkpoint_0.pkl"]
    corruptions = {"truncated model": "model.safetensors", "missing optimizer": "optimizer.bin"}
    step = 10
    for what, name in corruptions.items():
        d = exp / f"step-{step}"
        shutil.copytree(good, d)
        (d / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": 1}))
        if what.startswith("truncated"):
            (d / name).write_bytes((d / name).read_bytes()[:5000])
        else:
            (d / name).unlink()
        step += 1
    planted = {}
    for name in files:  # one booby-trapped file per checkpoint, newest first in line
        d = exp / f"step-{step}"
        planted[name] = step
        shutil.copytree(good, d)
        (d / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": 1}))
        plant(d / name, marker)
        step += 1
    (exp / "step-99").mkdir()  # garbage marker file
    (exp / "step-99" / "train_state.json").write_text("{not json")

    out = run(["train.py", *TRAIN, "--data_dir", str(demo / "data"), "--exp_dir", str(exp), "--total_steps", "2"])
    assert "resumed from" in out.stdout and "step-1 at step 1" in out.stdout
    skipped = [line for line in out.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert {line.split()[3].rstrip(":") for line in skipped} == {f"step-{s}" for s in [*range(10, step), 99]}
    assert any("custom_checkpoint_0.pkl is a pickle" in line for line in skipped)
    assert any("random_states_0.pkl is corrupt or holds more than tensors" in line for line in skipped)
    assert not marker.exists()

    # Evaluation reads config.yaml, train_state.json and embedder.safetensors: trapped ones are skipped,
    # a trapped file that evaluation never opens leaves the checkpoint usable.
    steps = [1, planted["config.yaml"], planted["embedder.safetensors"], planted["custom_checkpoint_0.pkl"]]
    out = run(
        ["evaluate.py", "--exp_dir", str(exp), "--wandb_mode", "disabled", "--num_workers", "0"]
        + ["--test_ckpt_steps", *map(str, steps)]
    )
    assert not marker.exists()
    evaluated = sorted(int(p.name[5:]) for p in (exp / "evaluate" / "demo_test").glob("step-*"))
    assert evaluated == [1, planted["custom_checkpoint_0.pkl"]]
    assert "embedder.safetensors is corrupt" in out.stderr and "config.yaml" in out.stderr


def test_disk_full_during_save_fails_clearly_and_keeps_the_last_checkpoint(demo, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(demo / "exp" / "step-1", exp / "step-1")
    args = [*TRAIN, "--data_dir", str(demo / "data"), "--exp_dir", str(exp), "--total_steps", "2"]
    # No root for a tiny tmpfs: cap the file size of the real process instead (the kernel then
    # fails the write with EFBIG, as it fails it with ENOSPC on a full disk). Checkpoint files are MBs.
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # noqa: E731
    out = run(["train.py", *args, "--keep_num_ckpts", "1"], check=False, preexec_fn=limit)
    line = one_line_error(out, "could not write checkpoint", "step-2", "step-1 is untouched")
    assert "File too large" in line or "os error 27" in line
    assert sorted(p.name for p in exp.iterdir() if "step" in p.name) == ["step-1"]  # not pruned, no temp dir
    verify_checkpoint(exp / "step-1")


def test_enospc_in_save_state_is_reported_and_cleaned_up(tmp_path):
    from asv.rundir import TrainState, save_checkpoint

    class FullDisk:  # just enough of an Accelerator for save_checkpoint
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / "train_state.json").write_text('{"step": 3, "epoch": 0, "batch_in_epoch": 3}')
    state = TrainState()
    state.step = 4
    with pytest.raises(CheckpointError, match="No space left on device.*step-3 is untouched"):
        save_checkpoint(FullDisk(), None, None, state, tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


def test_checkpoint_of_another_upstream_or_head_is_refused(demo, tmp_path):
    from asv.extract import Embedder

    ckpt = tmp_path / "step-1"
    shutil.copytree(demo / "exp" / "step-1", ckpt)
    cfg_text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(cfg_text.replace("upstream: fbank", "upstream: mfcc"))
    with pytest.raises(CheckpointError, match=r"does not fit .*upstream mfcc.*projector.weight") as err:
        Embedder(ckpt, "cpu", {})
    assert "\n" not in str(err.value)

    # Resume: same config, but a model.safetensors whose head was trained on other speakers.
    (ckpt / "config.yaml").write_text(cfg_text)
    weights = load_file(ckpt / "model.safetensors")
    weights = {
        k: (torch.zeros(v.shape[0], 7) if k.startswith("head.") and v.ndim == 2 else v) for k, v in weights.items()
    }
    save_file(weights, ckpt / "model.safetensors")
    out = run(
        [
            "train.py",
            *TRAIN,
            "--data_dir",
            str(demo / "data"),
            "--exp_dir",
            str(tmp_path / "x"),
            "--resume_ckpt_dir",
            str(ckpt),
        ],
        check=False,
    )
    one_line_error(out, "does not fit this model", "head.")
    from asv.config import load_train_config
    from asv.rundir import check_resumable

    cfg = load_train_config(ckpt / "config.yaml")
    cfg.model.upstream = "mfcc"
    with pytest.raises(CheckpointError, match="trained with upstream='fbank', this run has upstream='mfcc'"):
        check_resumable(load_train_config(ckpt / "config.yaml"), cfg, ckpt)


# ----------------------------------------------------------------------------- config


def test_unknown_flags_keys_and_empty_run_dirs_are_one_line_errors(tmp_path):
    import evaluate
    import prepare
    import train

    for main in (prepare.main, train.main, evaluate.main):
        with pytest.raises(SystemExit, match="unrecognized arguments: --no_such_flag"):
            main(["--no_such_flag", "1"])
    (tmp_path / "c.yaml").write_text("run:\n  total_step: 5\n")
    with pytest.raises(SystemExit, match="unknown key 'run.total_step'"):
        train.main(["--config_path", str(tmp_path / "c.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no checkpoints"):
        evaluate.main(["--exp_dir", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="is not a checkpoint directory"):
        evaluate.main(["--ckpt_dir", str(tmp_path / "empty")])


def test_verify_checkpoint_names_the_bad_file(demo, tmp_path):
    ckpt = tmp_path / "step-1"
    shutil.copytree(demo / "exp" / "step-1", ckpt)
    (ckpt / "random_states_0.pkl").write_bytes((ckpt / "random_states_0.pkl").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="random_states_0.pkl is corrupt"):
        verify_checkpoint(ckpt)
    verify_checkpoint(ckpt, for_resume=False)  # evaluation does not need it


def test_library_raises_typed_errors_instead_of_exiting(demo, tmp_path):
    """asv.verify / asv.embed run inside the user's Python process: a bad checkpoint or audio file must raise
    an AsvError the caller can catch, never end the process (SystemExit is not an Exception)."""
    import asv
    from asv.errors import AsvError, BadAudioError

    wavs = sorted((demo / "corpus" / "test" / "wav").rglob("*.wav"))[:2]
    ckpt = tmp_path / "step-1"
    shutil.copytree(demo / "exp" / "step-1", ckpt)
    (ckpt / "embedder.safetensors").write_bytes((ckpt / "embedder.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="embedder.safetensors is corrupt"):
        asv.verify(wavs[0], wavs[1], ckpt)
    bad = write_bad_files(tmp_path / "audio")
    good_ckpt = demo / "exp" / "step-1"
    for name in ("truncated.wav", "garbage.wav", "missing.wav"):
        with pytest.raises(BadAudioError) as err:
            asv.verify(wavs[0], tmp_path / "audio" / name, good_ckpt)
        assert isinstance(err.value, AsvError) and name in str(err.value) and bad[name] in str(err.value)
    # The process is still alive and the library still works after the errors.
    assert np.isfinite(asv.verify(wavs[0], wavs[1], good_ckpt)["score"])


@pytest.mark.parametrize(
    "flags, choices",
    [(["--loss", "foo"], "'amsoftmax', 'aamsoftmax'"), (["--mixed_precision", "fp8"], "'no', 'fp16', 'bf16'")],
)
def test_a_bad_choice_fails_at_parse_time_in_one_line(tmp_path, flags, choices):
    # Nothing is loaded before the flags are checked: the data directory does not even exist.
    out = run(["train.py", *flags, "--data_dir", str(tmp_path / "nowhere")], check=False)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: argument " + flags[0])
    assert choices in out.stderr


def test_superb_defaults_every_speaker_trains_and_every_listed_trial_is_kept(demo, tmp_path):
    """Issue 10: a VoxCeleb-layout tree whose trial list repeats pairs (as voxceleb1_test_v2.txt does, in either
    order) gives a trials CSV with exactly as many rows as the list, and by default no speaker is held out."""
    import prepare

    out = run(["prepare.py", "--help"])
    help_text = out.stdout.split("  --dev_speakers float")[1].split("  --dev_trials")[0]
    assert "(default: 0.0)" in help_text and "CHANGES THE" in help_text
    test_utts = sorted(
        str(p.relative_to(demo / "corpus" / "test" / "wav")) for p in (demo / "corpus").rglob("test/wav/*/*/*.wav")
    )
    a, b, c = test_utts[0], test_utts[1], test_utts[-1]
    lines = [f"1 {a} {b}", f"0 {a} {c}", f"1 {b} {a}", f"1 {a} {b}", f"0 {c} {a}"]
    (tmp_path / "vox_list.txt").write_text("\n".join(lines) + "\n")
    data = prepare.main(
        ["--dataset", "voxceleb1", "--dataset_root", str(demo / "corpus"), "--trials", str(tmp_path / "vox_list.txt")]
        + ["--out_dir", str(tmp_path / "data"), "--num_workers", "1"]
    )
    trials = read_trials_csv(data / "trials" / "vox_list.csv")
    assert [(t.label, t.id1, t.id2) for t in trials] == [(int(x[0]), *x[2:].split()) for x in lines]
    summary = json.loads((data / "prepare.json").read_text())["summary"]
    assert summary["repeated_pairs"] == {"vox_list": 3} and summary["dev_speakers"] == []
    train_speakers = {p.name for p in (demo / "corpus" / "dev" / "wav").iterdir()}
    assert summary["speakers"] == len(train_speakers) and not (data / "trials" / "dev.csv").exists()
