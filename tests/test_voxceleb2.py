"""Issue 23: --dataset voxceleb2. A tiny VoxCeleb2-dev tree of real AAC .m4a files (the generated voices, encoded
with PyAV) and a tiny VoxCeleb1 wav tree (dev + test) with cleaned-list-style trial lists: converted once to FLAC,
resumed after an interruption, trained on for a few updates and scored on the Vox1-O-style list."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare
from asv.audio import SAMPLE_RATE, apply_gain, decode_with_pyav, keep_intervals, load_audio, random_crop, read_crop
from asv.synth import generate_corpus
from tests.test_pipeline import TRAIN, run

# The lists --dataset voxceleb2 scores by default, as the files they come from.
LIST_FILES = {"voxceleb1_o_clean": "veri_test2.txt", "voxceleb1_e_clean": "list_test_all2.txt"}
LIST_FILES["voxceleb1_h_clean"] = "list_test_hard2.txt"
CORRUPT = "id00004/corruptvideo/00001.m4a"


def write_m4a(path: Path, wav: np.ndarray) -> None:
    """`wav` (float, 16 kHz mono) as AAC in an MP4 container, as VoxCeleb2 ships it."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for start in range(0, len(wav), 1024):
            frame = av.AudioFrame.from_ndarray(wav[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """(vox2 root, vox1 root): the generated corpus's training speakers as VoxCeleb2-dev .m4a (4 speakers x 2 videos
    x 2 utterances, plus one corrupt file), its test speakers as VoxCeleb1 wavs, one of them under dev/wav (the
    cleaned -E/-H lists use all of VoxCeleb1), and the three cleaned lists' files in the VoxCeleb1 root."""
    pytest.importorskip("av")
    tmp = tmp_path_factory.mktemp("vox")
    gen, vox2, vox1 = tmp / "generated", tmp / "VoxCeleb2", tmp / "VoxCeleb1"
    # 3.5-4.5 s: every utterance keeps more than SUPERB's 2 s after the VAD, so all 16 train.
    sizes = dict(num_train_speakers=4, num_test_speakers=3, videos_per_speaker=2, utts_per_video=2, num_trials=24)
    generate_corpus(gen, **sizes, min_seconds=3.5, max_seconds=4.5)
    for rel in sorted(p.relative_to(gen / "dev" / "wav") for p in (gen / "dev" / "wav").rglob("*.wav")):
        wav, _ = sf.read(gen / "dev" / "wav" / rel, dtype="float32")
        write_m4a(vox2 / "dev" / "aac" / rel.with_suffix(".m4a"), wav)
    (vox2 / "dev" / "aac" / CORRUPT).parent.mkdir(parents=True)
    (vox2 / "dev" / "aac" / CORRUPT).write_bytes(b"\x00\x00\x00\x20ftypM4A " + os.urandom(2000))
    (vox1 / "dev" / "wav").mkdir(parents=True)
    shutil.move(gen / "test" / "wav", vox1 / "test" / "wav")
    shutil.move(vox1 / "test" / "wav" / "id10003", vox1 / "dev" / "wav" / "id10003")
    lines = (gen / "trials.txt").read_text().splitlines(keepends=True)
    for name, count in (("veri_test2.txt", 16), ("list_test_all2.txt", len(lines)), ("list_test_hard2.txt", 8)):
        (vox1 / name).write_text("".join(lines[:count]))
    return vox2, vox1


def vox2_args(vox2: Path, vox1: Path, tmp: Path, *extra: str) -> list[str]:
    args = ["--dataset", "voxceleb2", "--dataset_root", str(vox2), "--voxceleb1_root", str(vox1)]
    return [*args, "--out_dir", str(tmp / "data"), "--cache_dir", str(tmp / "cache"), *extra]


@pytest.mark.slow
def test_voxceleb2_converts_once_resumes_trains_and_scores_vox1(corpora, tmp_path, capsys):
    vox2, vox1 = corpora
    data = prepare.main(vox2_args(vox2, vox1, tmp_path))
    printed = capsys.readouterr().out
    assert "converting 17 of 17 .m4a files" in printed and "converted 17 files in" in printed
    decoded = data / "decoded"
    rows = [line.split(",") for line in (data / "train.csv").read_text().splitlines()[1:]]
    assert len(rows) == 16 and {spk for _, _, spk, _ in rows} == {"id00001", "id00002", "id00003", "id00004"}
    assert all(p.startswith(str(decoded)) and p.endswith(".flac") and i.endswith(".m4a") for i, p, _, _ in rows)
    # The corrupt .m4a is named in bad_files.txt and left out, as any unusable file.
    bad = (data / "bad_files.txt").read_text().splitlines()
    assert len(bad) == 1 and bad[0].startswith(str(vox2 / "dev" / "aac" / CORRUPT) + "\tundecodable audio\t")

    # The FLAC holds the AAC decode as 16-bit samples, and training's seek-reads of it are exact.
    utt_id, flac = rows[0][0], rows[0][1]
    info = sf.info(flac)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", SAMPLE_RATE, 1)
    pcm = decode_with_pyav(vox2 / "dev" / "aac" / utt_id)
    assert np.array_equal(sf.read(flac, dtype="int16")[0], np.clip(np.rint(pcm * 32768), -32768, 32767))
    intervals = json.loads((data / "vad.json").read_text())["intervals"][utt_id]
    whole = random_crop(keep_intervals(apply_gain(load_audio(flac), -3.0), intervals), 16000, np.random.default_rng(1))
    assert np.array_equal(read_crop(flac, intervals, 16000, np.random.default_rng(1), -3.0), whole)

    # Trials: the cleaned lists by name, every line as listed, resolved over VoxCeleb1's test and dev parts.
    record = json.loads((data / "prepare.json").read_text())
    lines = len((vox1 / "list_test_all2.txt").read_text().splitlines())
    assert record["summary"]["trials"] == {"voxceleb1_o_clean": 16, "voxceleb1_e_clean": lines, "voxceleb1_h_clean": 8}
    paths = {p for line in (data / "trials" / "voxceleb1_e_clean.csv").read_text().splitlines()[1:]
             for p in line.split(",")[2:4]}  # fmt: skip
    assert any("/dev/wav/id10003/" in p for p in paths) and any("/test/wav/" in p for p in paths)
    conversion = record["summary"]["conversion"]
    assert conversion["files"] == 17 and conversion["reused"] == 0 and conversion["failed"] == 1
    assert conversion["files_per_s"] > 0

    # An interrupted conversion: two files never finished (one left as a partial file). A rerun converts only those.
    for row in rows[3:5]:
        os.unlink(row[1])
    Path(rows[3][1] + ".partial").write_bytes(b"fLaC half a file")
    prepare.main([*vox2_args(vox2, vox1, tmp_path), "--force", "--num_workers", "1"])
    assert "converting 3 of 17 .m4a files" in capsys.readouterr().out  # the two, and the corrupt one again
    assert not list(decoded.rglob("*.partial")) and all(Path(row[1]).is_file() for row in rows)

    exp = tmp_path / "exp"
    out = run(["train.py", *TRAIN, "--data_dir", str(data), "--exp_dir", str(exp), "--total_steps", "2"])
    assert (exp / "step-2" / "embedder.safetensors").is_file(), out.stdout
    args = ["evaluate.py", "--exp_dir", str(exp), "--trial_names", "voxceleb1_o_clean"]
    run([*args, "--wandb_mode", "disabled", "--num_workers", "0", "--plots", "false"])
    result = json.loads((exp / "evaluate" / "voxceleb1_o_clean" / "step-2" / "results.json").read_text())
    assert result["num_trials"] == 16 and 0 <= result["eer"] <= 100


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_voxceleb2_needs_both_roots_and_says_which_layout_it_expects(tmp_path):
    assert "--voxceleb1_root" in one_line_error(["--dataset", "voxceleb2", "--dataset_root", str(tmp_path)])
    (tmp_path / "VoxCeleb2" / "dev" / "audio").mkdir(parents=True)
    message = one_line_error(vox2_args(tmp_path / "VoxCeleb2", tmp_path / "VoxCeleb1", tmp_path))
    assert f"expected {tmp_path}/VoxCeleb2/dev/aac/<spk>/<video>/<utt>.m4a" in message
    (tmp_path / "VoxCeleb2" / "aac" / "id00001").mkdir(parents=True)  # the layout without dev/ is accepted
    message = one_line_error(vox2_args(tmp_path / "VoxCeleb2", tmp_path / "VoxCeleb1", tmp_path))
    assert f"no VoxCeleb1 wav tree under {tmp_path}/VoxCeleb1" in message


def test_voxceleb2_without_pyav_says_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "VoxCeleb2" / "dev" / "aac" / "id00001").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError, as where it is not installed
    message = one_line_error(vox2_args(tmp_path / "VoxCeleb2", tmp_path / "VoxCeleb1", tmp_path))
    assert "PyAV" in message and "pip install av" in message


def test_voxceleb2_offline_names_the_trial_list_to_place(tmp_path, monkeypatch):
    (tmp_path / "VoxCeleb2" / "dev" / "aac" / "id00001").mkdir(parents=True)
    (tmp_path / "VoxCeleb1" / "test" / "wav").mkdir(parents=True)

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    message = one_line_error(vox2_args(tmp_path / "VoxCeleb2", tmp_path / "VoxCeleb1", tmp_path))
    assert "cannot download trial list veri_test2.txt" in message and "name resolution" in message
    assert f"place it at {tmp_path}/VoxCeleb1/veri_test2.txt or {tmp_path}/cache/veri_test2.txt" in message


def test_voxceleb2_names_trial_audio_missing_from_voxceleb1(tmp_path):
    pytest.importorskip("av")
    vox2, vox1 = tmp_path / "VoxCeleb2", tmp_path / "VoxCeleb1"
    (vox2 / "aac" / "id00001").mkdir(parents=True)
    for part in ("test", "dev"):
        (vox1 / part / "wav").mkdir(parents=True)
    listed = tmp_path / "my_list.txt"
    listed.write_text("1 id10001/abcdefghijk/00001.wav id10999/zzzzzzzzzzz/00001.wav\n")
    message = one_line_error(vox2_args(vox2, vox1, tmp_path, "--trials", str(listed)))
    assert f"{listed}: 2 trial utterances are not under {vox1}/test/wav or {vox1}/dev/wav" in message
    assert "--voxceleb1_root" in message and not (tmp_path / "data" / "decoded").exists()  # said before converting


def test_a_full_disk_ends_the_conversion_in_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    pytest.importorskip("av")
    from asv import corpora
    from asv.errors import ConfigError

    write_m4a(tmp_path / "a.m4a", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32))

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"fLaC")  # what a write cut short leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpora.sf, "write", disk_full)
    with pytest.raises(ConfigError, match="No space left on device.*--decoded_dir DIR"):
        corpora.convert(str(tmp_path / "a.m4a"), str(tmp_path / "out" / "a.flac"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
