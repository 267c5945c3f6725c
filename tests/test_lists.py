"""Pure pieces of using a model: list and score-file formats (asv/lists.py), the one audio-path resolver and text
trial-list reader evaluate.py and `python -m asv` share, the upstream-checkpoint check of a model directory
(asv/modeldir.py), Hub ids (asv/hub.py)."""

import pytest

from asv.errors import CheckpointError, ManifestError
from asv.hub import looks_like_repo_id
from asv.lists import ListedTrial, read_enrollment, read_trial_list, read_wav_list, resolve, score_line
from asv.manifest import read_text_trials
from asv.modeldir import resolve_upstream_ckpt, sha256_path


def test_trial_list_formats(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("1 a.wav b.wav\n0 a.wav c.wav\n")
    trials, fmt = read_trial_list(f)
    assert fmt == "voxceleb" and [(t.enroll, t.test, t.label) for t in trials] == [
        ("a.wav", "b.wav", 1),
        ("a.wav", "c.wav", 0),
    ]
    f.write_text("spk1 b.wav target\n\nspk1 c.wav nontarget\n")
    trials, fmt = read_trial_list(f)
    assert fmt == "kaldi" and [t.label for t in trials] == [1, 0] and trials[1].line == 3
    f.write_text("a.wav b.wav\n")
    assert read_trial_list(f)[1] == "unlabelled" and read_trial_list(f)[0][0].label is None
    for text, where in [("1 a b\nx b target\n", ":2:"), ("a b c d\n", ":1:"), ("2 a b\n", ":1:")]:
        f.write_text(text)
        with pytest.raises(ManifestError, match=f"{f}{where}"):
            read_trial_list(f)


def test_one_resolver_and_one_labelled_reader(tmp_path):
    # A relative path: ROOT/p, else VoxCeleb's ROOT/wav/p, ROOT/test/wav/p, ROOT/dev/wav/p, over the roots in order.
    corpus, other = tmp_path / "corpus", tmp_path / "other"
    for f in (corpus / "test/wav/a/v/1.wav", corpus / "dev/wav/b/v/1.wav", other / "a/v/1.wav"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    assert resolve("a/v/1.wav", [corpus]) == str(corpus / "test/wav/a/v/1.wav")
    assert resolve("a/v/1.wav", [other, corpus]) == str(other / "a/v/1.wav")
    assert resolve("b/v/1.wav", [other, corpus]) == str(corpus / "dev/wav/b/v/1.wav")
    assert resolve("c.wav", [other, corpus]) == str(other / "c.wav")  # nowhere: the first root's, for the error
    assert resolve("/abs/c.wav", [corpus]) == "/abs/c.wav"
    f = tmp_path / "t.txt"
    f.write_text("a/v/1.wav b/v/1.wav nontarget\n")  # Kaldi's labels read as VoxCeleb's
    (t,) = read_text_trials(f, [corpus])
    assert (t.id1, t.wav_path2, t.label) == ("a/v/1.wav", str(corpus / "dev/wav/b/v/1.wav"), 0)
    f.write_text("1 a/v/1.wav x/y/2.wav\n")
    with pytest.raises(ManifestError, match=f"{f}: 1 utterances not found .*x/y/2.wav.*--wav_root") as err:
        read_text_trials(f, [corpus])
    assert "\n" not in str(err.value)
    f.write_text("a.wav b.wav\n")
    with pytest.raises(ManifestError, match=f"{f}: unlabelled trials"):
        read_text_trials(f)


def test_enrollment_and_wav_lists(tmp_path):
    f = tmp_path / "spk2utt"
    f.write_text("alice a1.wav a2.wav\nbob /abs/b1.wav,b2.wav\n")
    assert read_enrollment(f) == {
        "alice": [str(tmp_path / "a1.wav"), str(tmp_path / "a2.wav")],
        "bob": ["/abs/b1.wav", str(tmp_path / "b2.wav")],
    }
    f.write_text("alice a1.wav\nalice a2.wav\n")
    with pytest.raises(ManifestError, match="defined twice"):
        read_enrollment(f)
    f.write_text("alice\n")
    with pytest.raises(ManifestError, match=f"{f}:1"):
        read_enrollment(f)
    w = tmp_path / "wavs"
    w.write_text("x.wav\nutt2 y.wav\n")
    assert read_wav_list(w, root=tmp_path / "r") == [
        (None, str(tmp_path / "r" / "x.wav")),
        ("utt2", str(tmp_path / "r" / "y.wav")),
    ]


def test_score_lines():
    t = ListedTrial("spk1", "b.wav", 1, 1)
    assert score_line("wespeaker", t, 0.5) == "spk1 b.wav 0.500000 target"
    assert score_line("kaldi", t, 0.5) == "spk1 b.wav 0.500000"
    assert score_line("voxceleb", t, -0.25) == "-0.250000 spk1 b.wav"
    assert score_line("wespeaker", ListedTrial("a", "b", None, 1), 1.0) == "a b 1.000000"


def test_upstream_checkpoint_must_be_the_recorded_one(tmp_path):
    ckpt = tmp_path / "hubert.pt"
    ckpt.write_bytes(b"weights")
    up = {"name": "hubert_local", "ckpt": str(ckpt), "ckpt_sha256": sha256_path(ckpt)}
    meta = tmp_path / "model.json"
    assert resolve_upstream_ckpt(up, None, meta) == str(ckpt)
    moved = tmp_path / "elsewhere.pt"
    ckpt.rename(moved)
    with pytest.raises(CheckpointError, match="upstream_ckpt=PATH") as err:
        resolve_upstream_ckpt(up, None, meta)
    assert "hubert.pt" in str(err.value) and "\n" not in str(err.value)
    assert resolve_upstream_ckpt(up, str(moved), meta) == str(moved)
    moved.write_bytes(b"other weights")
    with pytest.raises(CheckpointError, match="not the upstream checkpoint this model was trained on"):
        resolve_upstream_ckpt(up, str(moved), meta)
    # Weight-free upstreams and hub-fetched checkpoints have nothing local to check.
    assert resolve_upstream_ckpt({"name": "fbank", "ckpt": None, "ckpt_sha256": None}, None, meta) is None
    hub = {"name": "hf_wav2vec2_custom", "ckpt": "facebook/wav2vec2-base", "ckpt_sha256": None}
    assert resolve_upstream_ckpt(hub, None, meta) == "facebook/wav2vec2-base"


def test_directory_hash_covers_names_and_contents(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"abc")
    before = sha256_path(d)
    (d / "model.safetensors").write_bytes(b"abd")
    assert sha256_path(d) != before
    (d / "model.safetensors").write_bytes(b"abc")
    assert sha256_path(d) == before
    (d / "model.safetensors").rename(d / "other.safetensors")
    assert sha256_path(d) != before


def test_hub_ids(tmp_path):
    assert looks_like_repo_id("you/superb-asv-demo") and looks_like_repo_id("org/name.v2")
    assert not looks_like_repo_id("models/demo/") and not looks_like_repo_id("demo") and not looks_like_repo_id("a/b/c")
    (tmp_path / "you").mkdir()
    (tmp_path / "you" / "model").mkdir()
    assert not looks_like_repo_id(str(tmp_path / "you" / "model"))
