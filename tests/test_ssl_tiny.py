"""The multi-layer SSL path end to end, offline: tiny random wav2vec2 / HuBERT / WavLM / HF checkpoints
(asv/random_upstreams.py) -> train.py -> evaluate.py, in-process to keep the file under ~90 s on 2 cores.

Each family also runs a different downstream/loss/augmentation so every registry entry is exercised
end to end once. Run alone with `pytest -m ssl_tiny`.
"""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import evaluate
import prepare
import train
from asv.extract import Embedder
from asv.random_upstreams import NUM_HIDDEN_STATES, build_tiny_upstreams

pytestmark = pytest.mark.ssl_tiny

NUM_STATES = NUM_HIDDEN_STATES["tiny"]  # the input of every transformer layer + the encoder output
TRAIN = ["--batch_size", "4", "--gradient_accumulate", "1", "--max_secs", "1.5", "--log_step", "1"]
TRAIN += ["--num_workers", "0", "--wandb_mode", "disabled", "--lr", "1e-3"]
EVAL = ["--wandb_mode", "disabled", "--num_workers", "0"]
# Per family: which downstream / loss / extras its run covers (all registries end to end at least once).
RUNS = {
    "wav2vec2_local": [],
    "hubert_local": ["--downstream", "ecapa", "--embed_dim", "64", "--ecapa_channels", "64", "--loss", "aamsoftmax"],
    "wavlm_local": ["--loss", "subcenter_aam", "--margin", "0.2", "--margin_warmup_steps", "2", "--speed_perturb"],
    "hf_wav2vec2_custom": ["--downstream", "ecapa", "--embed_dim", "64", "--ecapa_channels", "64", "--loss", "softmax"],
}


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    return build_tiny_upstreams(tmp_path_factory.mktemp("tiny_upstreams"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ssl_demo")
    corpus = ["--demo_train_speakers", "4", "--demo_test_speakers", "3", "--demo_videos", "2"]
    corpus += ["--demo_utts_per_video", "2", "--demo_trials", "20", "--num_workers", "1"]
    prepare.main(["--dataset", "demo", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(tmp / "data"), *corpus])
    return tmp / "data"


def embed_files(embedder, paths):
    wavs = [torch.from_numpy(sf.read(str(p), dtype="float32")[0]) for p in paths]
    lens = torch.tensor([len(w) for w in wavs])
    return embedder(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens)


def test_checkpoints_are_plain_dicts(tiny_ckpts):
    for name, path in tiny_ckpts.items():
        if path.is_file():  # the HF one is a directory
            ckpt = torch.load(path, weights_only=True)  # raises on anything but tensors and builtins
            assert isinstance(ckpt, dict), name
            assert path.stat().st_size < 600_000, (name, path.stat().st_size)


@pytest.mark.parametrize("name", list(RUNS))
def test_train_evaluate_through_every_family(name, tiny_ckpts, data_dir, tmp_path):
    exp = tmp_path / "exp"
    args = [*TRAIN, *RUNS[name], "--upstream", name, "--upstream_ckpt", str(tiny_ckpts[name])]
    train.main([*args, "--data_dir", str(data_dir), "--exp_dir", str(exp), "--total_steps", "2", "--save_step", "2"])
    ckpt = exp / "step-2"
    weights = load_file(ckpt / "embedder.safetensors")
    assert weights["featurizer.weights"].shape == (NUM_STATES,)  # one weight per hidden state
    records = [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]
    log = [r for r in records if "train/loss" in r]  # the others are dev/eer records
    assert sorted(k for k in log[-1] if k.startswith("featurizer/")) == [f"featurizer/layer_{i}" for i in range(3)]
    assert all(math.isfinite(r["train/loss"]) for r in log)

    results = evaluate.main(["--ckpt_dir", str(ckpt), *EVAL])
    res = results["demo_test"][2]
    assert res["num_trials"] == 20 and all(math.isfinite(res[k]) for k in ("eer", "min_dcf@0.01"))

    # Reloading the checkpoint gives the same embeddings whatever the RNG state: nothing is left at init.
    wavs = sorted((data_dir.parent / "corpus").rglob("*.wav"))[:3]
    embeddings = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        embeddings.append(embed_files(Embedder(ckpt, torch.device("cpu"), {}), wavs))
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=0, atol=0)


def read_log(exp):
    return [json.loads(line) for line in (exp / "train_log.jsonl").read_text().splitlines()]


def test_upstream_trainable_updates_saves_and_reloads_the_upstream(tiny_ckpts, data_dir, tmp_path):
    name, exp = "wav2vec2_local", tmp_path / "ft"
    args = [*TRAIN, "--upstream", name, "--upstream_ckpt", str(tiny_ckpts[name]), "--upstream_trainable", "true"]
    args += ["--data_dir", str(data_dir), "--exp_dir", str(exp), "--save_step", "2", "--lr", "1e-2"]
    train.main([*args, "--total_steps", "2"])
    saved = load_file(exp / "step-2" / "embedder.safetensors")
    up = {k[len("upstream.") :]: v for k, v in saved.items() if k.startswith("upstream.")}
    assert up, "a fine-tuned upstream travels in embedder.safetensors"
    original = torch.load(tiny_ckpts[name], weights_only=True)["model_weight"]
    key = "encoder.layers.0.fc1.weight"
    saved_key = next(k for k in up if k.endswith(key))
    assert not torch.equal(up[saved_key], original[key]), "the upstream did not train"

    # The evaluation embedder loads those weights, not the original checkpoint's.
    embedder = Embedder(exp / "step-2", torch.device("cpu"), {})
    torch.testing.assert_close(embedder.upstream.state_dict()[saved_key], up[saved_key], rtol=0, atol=0)
    wavs = sorted((data_dir.parent / "corpus").rglob("*.wav"))[:2]
    tuned = embed_files(embedder, wavs)
    embedder.upstream.load_state_dict(
        {k: original[k[len(saved_key) - len(key) :]] if k.endswith(key) else v for k, v in up.items()}
    )
    assert not torch.allclose(embed_files(embedder, wavs), tuned)

    # Resume restores the fine-tuned upstream too and keeps training it.
    out = train.main([*args, "--total_steps", "3"])
    assert out == exp and json.loads((exp / "step-3" / "train_state.json").read_text())["step"] == 3
    resumed = load_file(exp / "step-3" / "embedder.safetensors")
    assert not torch.equal(resumed[f"upstream.{saved_key}"], up[saved_key])


def test_augmented_run_with_noise_and_reverb(tiny_ckpts, data_dir, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise" / "sub").mkdir(parents=True)
    sf.write(str(tmp_path / "noise" / "sub" / "n.wav"), (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    (tmp_path / "rir").mkdir()
    rir = np.exp(-np.arange(800) / 100.0).astype(np.float32) * rng.standard_normal(800).astype(np.float32)
    sf.write(str(tmp_path / "rir" / "r.wav"), rir, 16000)
    exp = tmp_path / "aug"
    args = [*TRAIN, "--upstream", "fbank", "--data_dir", str(data_dir), "--exp_dir", str(exp), "--total_steps", "2"]
    train.main([*args, "--noise_dir", str(tmp_path / "noise"), "--rir_dir", str(tmp_path / "rir"), "--aug_prob", "1"])
    assert (exp / "step-2" / "embedder.safetensors").is_file()
    with pytest.raises(SystemExit) as err:
        train.main([*args, "--exp_dir", str(tmp_path / "x"), "--noise_dir", str(tmp_path / "rir" / "none")])
    assert str(err.value).startswith("error: --noise_dir ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("wav2vec2_local", lambda d: d / "missing.pt", "does not exist"),
        ("hubert_local", lambda d: d / "garbage.pt", "is not an s3prl-converted hubert checkpoint"),
        ("wavlm_local", lambda d: d / "fairseq_like.pt", "is not a WavLM-style checkpoint"),
        ("hf_wav2vec2_custom", lambda d: d / "garbage.pt", "is not a directory written by transformers"),
    ],
)
def test_bad_upstream_ckpt_fails_with_one_line(name, make, expected, data_dir, tmp_path):
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    torch.save({"cfg": None, "weights": {}}, tmp_path / "fairseq_like.pt")
    path = make(tmp_path)
    args = [*TRAIN, "--upstream", name, "--upstream_ckpt", str(path), "--data_dir", str(data_dir)]
    with pytest.raises(SystemExit) as err:
        train.main([*args, "--exp_dir", str(tmp_path / "x"), "--total_steps", "1"])
    msg = str(err.value)
    assert msg.startswith(f"error: --upstream_ckpt {path} ") and expected in msg and "\n" not in msg, msg
