"""Using a trained model (issue 13), end to end on a tiny demo run: evaluate.py's calibrated metrics and
--export_model, asv.load_model in a fresh process against verifying with the checkpoint, model-directory validation,
multi-file enrollment, the `python -m asv` commands and the ONNX file of an exported model."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import asv
import evaluate
from asv import cli
from asv.calibration import Calibration
from asv.config import EvalConfig, parse
from asv.errors import CheckpointError, HubError
from asv.evaluation import choose_calibration_list
from asv.metrics import calibrated_metrics
from asv.scoring import enrollment_model, l2_normalise
from tests.conftest import ROOT
from tests.test_pipeline import TINY_CORPUS, TRAIN, run

pytestmark = pytest.mark.slow

EVAL = ["--wandb_mode", "disabled", "--num_workers", "0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny corpus with a dev list, 4 updates, evaluated and exported at step 4. (More training separates the
    24 dev trials perfectly, which leaves no finite calibration: fit_calibration refuses it, tested elsewhere.)"""
    tmp = tmp_path_factory.mktemp("use")
    data, exp, model = tmp / "data", tmp / "exp", tmp / "model"
    run(["prepare.py", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(data), *TINY_CORPUS])
    run(["train.py", *TRAIN, "--data_dir", str(data), "--exp_dir", str(exp), "--total_steps", "4"])
    evaluate.main(["--ckpt_dir", str(exp / "step-4"), *EVAL, "--plots", "false", "--export_model", str(model)])
    return data, exp, model


def trials_of(data, name="demo_test"):
    with open(data / "trials" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_results_hold_calibrated_metrics_on_held_out_lists_only(exported):
    _, exp, _ = exported
    ev = exp / "evaluate"
    res = json.loads((ev / "demo_test" / "step-4" / "results.json").read_text())
    cal = Calibration.load(ev / "step-4" / "calibration.json")
    assert cal.fitted_on["trials"] == "dev" and res["calibration"]["fitted_on"]["trials"] == "dev"
    # The reported numbers are the metric functions applied to the written scores and calibration.
    scores, labels = np.loadtxt(ev / "demo_test" / "step-4" / "scores.txt", unpack=True)
    expected = calibrated_metrics(cal.llr(scores), labels.astype(int))
    for key in ("cllr", "act_dcf@0.01", "act_dcf@0.05"):
        # scores.txt keeps 6 decimals: a score moves by <= 5e-7, its LLR by slope x that; Cllr's and actDCF's
        # sensitivity to one LLR is <= 1/n_class, so a relative 1e-3 covers the rounding with room.
        assert res[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-3), key
    assert res["min_cllr"] <= res["cllr"] + 1e-12
    dev = json.loads((ev / "dev" / "step-4" / "results.json").read_text())
    assert "min_cllr" in dev and "cllr" not in dev and "act_dcf@0.01" not in dev
    assert "calibration list" in dev["calibration"]["note"]


def test_no_calibration_list_says_why(exported, tmp_path):
    _, exp, _ = exported
    # SUPERB's default training set has no dev list: here it exists but is not scored, which is the same case.
    evaluate.main(
        ["--ckpt_dir", str(exp / "step-4"), *EVAL, "--plots", "false", "--out_dir", str(tmp_path)]
        + ["--trial_names", "demo_test"]
    )
    res = json.loads((tmp_path / "demo_test" / "step-4" / "results.json").read_text())
    assert "cllr" not in res and "act_dcf@0.01" not in res and "min_cllr" in res
    why = res["calibration"]["absent"]
    assert "no calibration list" in why and "--calibration_list" in why
    cfg = parse(EvalConfig, ["--calibration_list", "none"])[0]
    assert choose_calibration_list(cfg.calibration_list, {"dev": []})[0] is None


def test_fresh_process_load_model_equals_checkpoint_verify(exported, tmp_path):
    data, exp, model = exported
    t = trials_of(data)[0]
    pair = asv.verify(t["wav_path1"], t["wav_path2"], exp / "step-4")  # `python -m asv verify --model <ckpt dir>`
    # The model directory must load without the run directory or the data directory: hide both.
    hidden = [(exp, tmp_path / "exp"), (data, tmp_path / "data")]
    code = (
        "import asv, json, sys; m = asv.load_model(sys.argv[1]); print(json.dumps(m.verify(sys.argv[2], sys.argv[3])))"
    )
    for src, dst in hidden:
        src.rename(dst)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(model), t["wav_path1"], t["wav_path2"]],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        for src, dst in hidden:
            dst.rename(src)
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(fresh["score"] - pair["score"]) <= 1e-6
    assert fresh["llr"] == pytest.approx(pair["llr"], abs=1e-6) and 0 < fresh["p_same"] < 1
    assert fresh["threshold"] == pair["threshold"]  # both the dev EER threshold
    card = (model / "README.md").read_text()
    results = json.loads((model / "results.json").read_text())
    for name, r in results.items():
        assert f"| {name}" in card and f"{r['eer']:.2f}" in card


def test_model_directory_is_validated_in_one_line(exported, tmp_path, monkeypatch):
    from asv.api import load_model
    from asv.hub import push_to_hub

    _, exp, model = exported

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(model, d)
        edit(d)
        with pytest.raises((CheckpointError, HubError)) as err:
            load_model(d)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "lacks calibration.json" in broken("missing", lambda d: (d / "calibration.json").unlink())
    assert "sha256" in broken("tampered", lambda d: (d / "embedder.safetensors").open("r+b").write(b"\0" * 64))

    def version(d):
        meta = json.loads((d / "model.json").read_text())
        (d / "model.json").write_text(json.dumps({**meta, "format_version": 99}))

    assert "upgrade superb-asv" in broken("version", version)

    def other_weights(d):  # a consistent directory whose weights are another model's: names/shapes checked
        from safetensors.torch import load_file, save_file

        from asv.modeldir import sha256_path

        state = load_file(d / "embedder.safetensors")
        key = next(k for k in state if k.endswith("projector.weight"))
        state[key] = state[key][:, :10].contiguous()
        save_file(state, d / "embedder.safetensors")
        meta = json.loads((d / "model.json").read_text())
        meta["files"]["embedder.safetensors"] = sha256_path(d / "embedder.safetensors")
        (d / "model.json").write_text(json.dumps(meta))

    assert "projector.weight" in broken("shapes", other_weights)
    with pytest.raises(CheckpointError, match="no model.json"):
        load_model(exp)  # a run directory is neither a model nor a checkpoint directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the network paths fail at once, with what to do instead
    with pytest.raises(HubError, match="offline, copy the model directory") as err:
        load_model("superb-asv-tests/no-such-model")
    assert "\n" not in str(err.value)
    with pytest.raises(HubError, match="hf auth login"):
        push_to_hub(model, "superb-asv-tests/no-such-model")


def test_multi_file_enrollment_through_the_cli(exported, tmp_path, capsys):
    """Models of several files named in a Kaldi trial list through spk2utt, scored by `python -m asv score` and
    `verify --enroll`: each score is the cosine of the renormalised mean of unit embeddings with the test file.
    (That averaging lowers EER is tested on synthetic embeddings in test_calibration.py and measured on the demo
    run in the README: a 4-update model scores this tiny corpus near chance either way.)"""
    data, _, model = exported
    utts = sorted({(r[f"id{k}"], r[f"wav_path{k}"]) for r in trials_of(data) for k in (1, 2)})
    by_spk: dict = {}
    for utt, path in utts:
        spk, video, _ = utt.split("/")
        by_spk.setdefault(spk, {}).setdefault(video, []).append(path)
    # Each test speaker enrolls with the utterances of one recording and is tested on those of the others.
    enroll = {spk: v[sorted(v)[0]] for spk, v in by_spk.items()}
    tests = [(spk, p) for spk, v in by_spk.items() for video in sorted(v)[1:] for p in v[video]]
    models = tmp_path / "spk2utt"
    models.write_text("".join(f"{spk} {' '.join(files)}\n" for spk, files in enroll.items()))
    single = tmp_path / "single"
    single.write_text("".join(f"{spk} {files[0]}\n" for spk, files in enroll.items()))
    trials = tmp_path / "trials.txt"  # Kaldi format, the enrollment column naming models
    trials.write_text("".join(f"{m} {p} {'target' if m == s else 'nontarget'}\n" for m in enroll for s, p in tests))
    for name, spk2utt in (("multi", models), ("single", single)):
        out = tmp_path / f"{name}.scores"
        assert (
            cli.main(
                ["score", "--model", str(model), "--trials", str(trials), "--enroll_models", str(spk2utt)]
                + ["--out", str(out)]
            )
            == 0
        )
        rows = [line.split() for line in out.read_text().splitlines()]  # enroll test score label (WeSpeaker)
        assert [r[:2] for r in rows] == [line.split()[:2] for line in trials.read_text().splitlines()]
        assert {r[3] for r in rows} == {"target", "nontarget"}
    # One multi-enrollment score by hand: the renormalised mean of the unit embeddings, cosine with the test.
    from asv.api import load_model

    m = load_model(model)
    spk, test = next(iter(enroll)), tests[0][1]
    emb = m.embed([*enroll[spk], test])
    first = (tmp_path / "multi.scores").read_text().splitlines()[0].split()
    assert float(first[2]) == pytest.approx(float(enrollment_model(emb[:-1]) @ l2_normalise(emb[-1])), abs=1e-6)
    first = (tmp_path / "single.scores").read_text().splitlines()[0].split()
    assert float(first[2]) == pytest.approx(float(l2_normalise(emb[0]) @ l2_normalise(emb[-1])), abs=1e-6)
    assert cli.main(["verify", "--model", str(model), "--enroll", *enroll[spk], "--test", test]) == 0
    assert f"score {float(first[2]):.4f} (cosine; {len(enroll[spk])} enrollment file(s))" in capsys.readouterr().out


def test_cli_embed_features_and_errors(exported, tmp_path, capsys):
    data, exp, model = exported
    paths = sorted({r["wav_path1"] for r in trials_of(data)})[:3]
    wavs = tmp_path / "wavs.txt"
    wavs.write_text("".join(f"utt{k} {p}\n" for k, p in enumerate(paths)))
    assert cli.main(["embed", "--model", str(model), "--list", str(wavs), "--out", str(tmp_path / "e.npz")]) == 0
    from asv.api import load_model

    with np.load(tmp_path / "e.npz") as z:
        assert list(z["ids"]) == ["utt0", "utt1", "utt2"] and list(z["paths"]) == paths
        np.testing.assert_allclose(z["embeddings"], load_model(model).embed(paths), rtol=1e-5, atol=1e-6)
    # Features of a checkpoint: the weighted sum the x-vector reads, one file per utterance, cut to its frames.
    out = tmp_path / "feats"
    assert cli.main(["features", "--model", str(exp / "step-4"), *paths, "--out_dir", str(out)]) == 0
    index = list(csv.DictReader(open(out / "index.csv")))
    meta = json.loads((out / "features.json").read_text())
    assert len(index) == 3 and meta["dim"] == 240 and meta["frame_stride_samples"] == 160
    import soundfile as sf

    for row in index:
        x = np.load(out / row["file"])
        # fbank: one frame per 10 ms hop over the file (S3PRLUpstream's length: (samples - 1) // 160 + 1)
        assert x.shape == ((sf.info(row["wav_path"]).frames - 1) // 160 + 1, 240) and np.isfinite(x).all()
    capsys.readouterr()
    missing = str(tmp_path / "nope.wav")
    assert cli.main(["verify", "--model", str(model), paths[0], missing]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and missing in err and "\n" not in err
    bad = tmp_path / "bad_trials.txt"
    bad.write_text(f"1 {paths[0]} {paths[1]}\n{paths[0]} {paths[1]} target\n")  # two formats in one file
    assert cli.main(["score", "--model", str(model), "--trials", str(bad), "--out", str(tmp_path / "s")]) == 1
    assert f"{bad}:2: expected '<1|0> enroll test' like line 1" in capsys.readouterr().err


def test_onnx_file_of_the_exported_model_matches_pytorch(exported, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    import soundfile as sf

    from asv.api import load_model
    from asv.onnx_export import OnnxEmbedder

    data, _, exported_dir = exported
    model = tmp_path / "model"
    shutil.copytree(exported_dir, model)
    assert cli.main(["export_onnx", "--model", str(model)]) == 0
    meta = json.loads((model / "model.json").read_text())
    assert "embedder.onnx" in meta["files"] and meta["onnx"]["min_samples"] >= meta["audio"]["min_samples"]
    rng = np.random.default_rng(0)
    paths = sorted({r["wav_path1"] for r in trials_of(data)})[:2]
    for seconds in (1.0, 4.3, 20.0):
        p = tmp_path / f"noise{seconds}.wav"
        sf.write(p, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        paths.append(str(p))
    ref = l2_normalise(load_model(model).embed(paths))
    out = l2_normalise(OnnxEmbedder(model).embed(paths))
    assert ((ref * out).sum(1) >= 0.9999).all(), (ref * out).sum(1)
