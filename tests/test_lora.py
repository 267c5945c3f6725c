"""LoRA adapters on the upstream (--upstream_adapter lora, asv/adapters.py), on tiny random SSL checkpoints: only the
adapters, featurizer, downstream and head train; the adapters reach s3prl's fused attention; checkpoints hold the
adapters alone and resume; evaluate.py --export_model, asv.load_model and ONNX give the embeddings of the trained
model; bad settings fail in one line."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

import asv
import evaluate
import train
from asv.adapters import _check_reached, _hooks, add_adapters, is_adapter_tensor, merge_adapters
from asv.config import ModelConfig
from asv.errors import UpstreamError
from asv.extract import Embedder, ModelEmbedder
from asv.random_upstreams import SIZES, build_random_upstreams
from asv.upstream import build_upstream

pytestmark = [pytest.mark.ssl_tiny, pytest.mark.slow]

FAMILIES = ["wav2vec2_local", "hubert_local", "wavlm_local", "hf_wav2vec2_custom"]
RANK = 8  # ModelConfig's default
TRAIN = ["--batch_size", "4", "--gradient_accumulate", "1", "--max_secs", "1.5", "--log_step", "1"]
TRAIN += ["--num_workers", "0", "--wandb_mode", "disabled", "--lr", "1e-2", "--upstream_adapter", "lora"]
EVAL = ["--wandb_mode", "disabled", "--num_workers", "0", "--plots", "false"]
# fp32's unit roundoff: a K-term dot product is within K * U of exact, relatively (Higham 2002, section 3.1).
U = torch.finfo(torch.float32).eps / 2


def fp32_tolerance(*modules, frames: int) -> float:
    """Relative L2 distance two fp32 evaluations of the same network may differ by: each is within U times the sum
    of its reduction lengths of exact (every Linear and convolution, attention's softmax-weighted sum and the pooling
    over `frames`), layer gains ~1 (layer norm, batch norm), so twice that apart."""
    k = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                k += m.in_features
            elif isinstance(m, torch.nn.modules.conv._ConvNd):
                k += m.in_channels // m.groups * int(np.prod(m.kernel_size))
            elif type(m).__name__.endswith("Attention"):
                k += frames
    return 2 * U * (k + frames)


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    return build_random_upstreams(tmp_path_factory.mktemp("lora_upstreams"), "tiny")


def adapter_count(upstream: torch.nn.Module, rank: int) -> int:
    """r x (in + out) per adapted Linear layer: LoRA's A (r x in) and B (out x r)."""
    names = {n.split(".lora_")[0] for n, _ in upstream.named_parameters() if is_adapter_tensor(n)}
    return sum(rank * (m.in_features + m.out_features) for n, m in upstream.named_modules() if n in names)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapters_reach_the_forward_and_merge_into_a_plain_upstream(name, tiny_ckpts):
    torch.manual_seed(0)
    up = build_upstream(name, str(tiny_ckpts[name]))
    plain_keys = sorted(up.state_dict())
    wav, lens = 0.1 * torch.randn(2, 24_000), torch.tensor([24_000, 17_000])
    with torch.no_grad():
        base = up(wav, lens)[0]
    tuner = add_adapters(up, ModelConfig(upstream=name, upstream_adapter="lora"), check_reached=True)
    layers = SIZES["tiny"]["layers"]
    adapted = {n.split(".lora_")[0] for n, p in up.named_parameters() if p.requires_grad}
    assert len(adapted) == 6 * layers  # q, k, v, out and the two feed-forward layers of each transformer layer
    assert all(is_adapter_tensor(n) for n, p in up.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in up.parameters() if p.requires_grad) == adapter_count(up, RANK)
    for n, p in up.named_parameters():
        if n.endswith("lora_B.default.weight"):  # peft starts B at zero: move it so the adapters change something
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        tuned = up(wav, lens)[0]
    # The first state is the conv features, before any adapter; every transformer layer's output moves.
    assert torch.equal(tuned[0], base[0]) and all(
        relative(t, b) > 1e-3 for t, b in zip(tuned[1:], base[1:], strict=True)
    )

    merged = merge_adapters(tuner)
    assert sorted(merged.state_dict()) == plain_keys and not any(m in _hooks for m in merged.modules())
    with torch.no_grad():
        out = merged(wav, lens)[0]
    # Merging changes how the adapted layers round (W + s B A applied at once): each of those dot products over
    # in_features terms rounds within in_features x U, once per layer.
    bound = 2 * U * layers * max(m.in_features for m in merged.modules() if isinstance(m, torch.nn.Linear))
    for h, t in zip(out, tuned, strict=True):
        assert relative(h, t) <= bound


def test_adapters_on_s3prl_attention_projections_are_seen_by_its_fused_attention(tiny_ckpts):
    """s3prl hands q/k/v/out_proj.weight to F.multi_head_attention_forward: without asv.adapters' hooks an adapter
    there never runs (it would train nothing). Attention projections alone must change the hidden states."""
    up = build_upstream("wavlm_local", str(tiny_ckpts["wavlm_local"]))
    wav, lens = 0.1 * torch.randn(1, 16_000), torch.tensor([16_000])
    with torch.no_grad():
        base = up(wav, lens)[0][-1]
    cfg = ModelConfig(upstream="wavlm_local", upstream_adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    add_adapters(up, cfg, check_reached=True)
    for n, p in up.named_parameters():
        if n.endswith("lora_B.default.weight"):
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        assert relative(up(wav, lens)[0][-1], base) > 1e-3
    for module in up.modules():  # what plain peft would give
        for handle in _hooks.pop(module, ()):
            handle.remove()
    with torch.no_grad():
        assert torch.equal(up(wav, lens)[0][-1], base)
    with pytest.raises(UpstreamError, match="never reach"):
        _check_reached(up)


@pytest.fixture(scope="module")
def lora_run(tiny_demo, tiny_ckpts, tmp_path_factory):
    """3 updates of a tiny WavLM with LoRA (checkpoints at 2 and 3; dev EER at each, through the unmerged adapters),
    the Run train.py built kept for inspection."""
    data, _ = tiny_demo
    exp = tmp_path_factory.mktemp("lora") / "exp"
    args = [*TRAIN, "--upstream", "wavlm_local", "--upstream_ckpt", str(tiny_ckpts["wavlm_local"])]
    args += ["--data_dir", str(data), "--exp_dir", str(exp), "--total_steps", "3", "--save_step", "2"]
    runs = []
    build_run = train.build_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_run", lambda *a, **k: runs.append(build_run(*a, **k)) or runs[-1])
        train.main(args)
    return exp, args, runs[0]


def test_lora_trains_only_adapters_featurizer_downstream_and_head(lora_run, tiny_ckpts):
    exp, _, run = lora_run
    up = run.upstream
    trainable_up = {n: p for n, p in up.named_parameters() if p.requires_grad}
    assert trainable_up and all(is_adapter_tensor(n) for n in trainable_up)
    assert sum(p.numel() for p in trainable_up.values()) == adapter_count(up, RANK)
    # The optimizer holds exactly those and the model's (featurizer, downstream, head) parameters.
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    expected = [*trainable_up.values(), *(p for p in run.model.parameters() if p.requires_grad)]
    assert in_optimizer == {id(p) for p in expected}
    assert all(p.requires_grad for p in run.model.parameters())

    # The base upstream is the checkpoint's, bit for bit, after 3 updates (AdamW's weight decay would move it).
    original = build_upstream("wavlm_local", str(tiny_ckpts["wavlm_local"])).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in up.state_dict().items() if not is_adapter_tensor(k)}
    assert base.keys() == original.keys() and all(torch.equal(base[k], original[k]) for k in original)
    assert all(v.abs().sum() > 0 for k, v in up.state_dict().items() if k.endswith("lora_B.default.weight"))

    # The checkpoint keeps the adapters only: in embedder.safetensors and in Accelerate's resume state.
    adapters = {k for k in up.state_dict() if is_adapter_tensor(k)}
    for step in (2, 3):
        saved = load_file(exp / f"step-{step}" / "embedder.safetensors")
        assert {k[len("upstream.") :] for k in saved if k.startswith("upstream.")} == adapters
        assert set(load_file(exp / f"step-{step}" / "model_1.safetensors")) == adapters
    model = yaml.safe_load((exp / "step-3" / "config.yaml").read_text())["model"]
    assert model["upstream_adapter"] == "lora" and model["lora_rank"] == RANK and model["lora_target_modules"] is None


def test_resume_with_adapters_equals_the_uninterrupted_run(lora_run, tmp_path):
    exp, args, _ = lora_run
    resumed = tmp_path / "exp"
    resumed.mkdir()
    shutil.copytree(exp / "step-2", resumed / "step-2")
    lines = (exp / "train_log.jsonl").read_text().splitlines()
    (resumed / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    train.main([*args[: args.index("--exp_dir")], "--exp_dir", str(resumed), "--total_steps", "3", "--save_step", "2"])
    for name in ("embedder.safetensors", "model_1.safetensors", "model.safetensors"):
        a, b = load_file(resumed / "step-3" / name), load_file(exp / "step-3" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in lines]
    # The dev EER at each checkpoint embedded through the unmerged adapters, in inference mode.
    assert [r["step"] for r in full if "dev/eer" in r] == [2, 3]
    assert [r["train/loss"] for r in log if "train/loss" in r] == [r["train/loss"] for r in full if "train/loss" in r]


def test_init_from_a_lora_run_loads_its_adapters_and_refuses_another_rank(lora_run, tmp_path):
    exp, args, _ = lora_run
    start = [*args[: args.index("--exp_dir")], "--init_from", str(exp / "step-3"), "--save_initial", "true"]
    train.main([*start, "--exp_dir", str(tmp_path / "a"), "--total_steps", "1"])
    initial, trained = (
        load_file(tmp_path / "a" / "step-0" / "embedder.safetensors"),
        load_file(exp / "step-3" / "embedder.safetensors"),
    )
    assert initial.keys() == trained.keys() and all(torch.equal(initial[k], trained[k]) for k in trained)
    with pytest.raises(SystemExit) as err:
        train.main([*start, "--exp_dir", str(tmp_path / "b"), "--total_steps", "1", "--lora_rank", "4"])
    msg = str(err.value)
    assert "does not fit this run's upstream" in msg and "lora_A.default.weight" in msg and "\n" not in msg, msg


def test_trained_lora_model_round_trips_export_load_model_and_onnx(lora_run, tiny_demo, tmp_path):
    exp, _, run = lora_run
    data, _ = tiny_demo
    model_dir = tmp_path / "model"
    evaluate.main(["--exp_dir", str(exp), *EVAL, "--export_model", str(model_dir)])
    meta = json.loads((model_dir / "model.json").read_text())
    step = meta["source"]["step"]
    assert meta["upstream"]["adapter"]["kind"] == "lora" and meta["upstream"]["adapter"]["rank"] == RANK
    assert "LoRA adapters" in (model_dir / "README.md").read_text()

    wavs = sorted(str(p) for p in (data.parent / "corpus").rglob("*.wav"))[:4]
    from_dir = asv.load_model(model_dir, "cpu").embed(wavs)
    from_ckpt = asv.load_model(exp / f"step-{step}", "cpu").embed(wavs)
    assert np.array_equal(from_dir, from_ckpt)  # the same files, the same merged upstream

    # Against the training-time upstream, its adapters unmerged (the last checkpoint is the trained state).
    embedder = Embedder(exp / "step-3", "cpu")
    merged = np.stack([embedder(*one(w))[0].numpy() for w in wavs])
    unmerged = np.stack([ModelEmbedder(run.upstream, run.model.eval())(*one(w))[0].numpy() for w in wavs])
    frames = max(len(sf.read(w)[0]) for w in wavs) // 320
    tolerance = fp32_tolerance(embedder.upstream, embedder.model, frames=frames)
    for a, b in zip(merged, unmerged, strict=True):
        assert relative(a, b) <= tolerance

    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: torch's ONNX exporter needs it")
    from asv.onnx_export import OnnxEmbedder, export_onnx

    export_onnx(model_dir)
    session = OnnxEmbedder(model_dir).session
    for w, ref in zip(wavs, from_dir, strict=True):
        out = session.run(None, {"wav": sf.read(w, dtype="float32")[0][None]})[0][0]
        assert relative(out, ref) <= tolerance


def one(path: str):
    wav = torch.from_numpy(sf.read(path, dtype="float32")[0])[None]
    return wav, torch.tensor([wav.size(1)])


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--lora_target_modules", "q_proj", "nothing"], "--lora_target_modules nothing matches no module of upstream"),
        (["--lora_target_modules", "conv_layers.0.0"], "a Conv1d: LoRA adapts Linear layers"),
        (["--lora_target_modules", "post_extract_proj", "fc1", "grep_linear"], None),  # all reached: it trains
        (["--lora_target_modules", "encoder.layers.0.fc1", "layers.1.fc2"], None),
        (["--lora_dropout", "0.1"], "--lora_dropout 0.1 drops an adapter's input"),
        (["--upstream_trainable", "true"], "--upstream_adapter lora trains adapters on a frozen upstream"),
        (["--upstream_precision", "bf16"], "--upstream_precision bf16 applies to a frozen upstream"),
        (["--upstream", "fbank"], "upstream fbank has no Linear layers to adapt"),
    ],
)
def test_bad_adapter_settings_fail_in_one_line(extra, expected, tiny_demo, tiny_ckpts, tmp_path):
    data, _ = tiny_demo
    upstream = (
        []
        if "--upstream" in extra
        else ["--upstream", "wavlm_local", "--upstream_ckpt", str(tiny_ckpts["wavlm_local"])]
    )
    args = [*TRAIN, *upstream, "--data_dir", str(data), "--exp_dir", str(tmp_path / "x"), "--total_steps", "1", *extra]
    if expected is None:
        assert train.main(args) == tmp_path / "x"
        return
    with pytest.raises(SystemExit) as err:
        train.main(args)
    msg = str(err.value)
    assert msg.startswith("error: ") and expected in msg and "\n" not in msg, msg


def test_an_unreached_target_and_a_mismatched_checkpoint_fail_in_one_line(lora_run, tiny_ckpts, tmp_path):
    # wav2vec 2.0's final_proj belongs to its pre-training loss: the hidden states never go through it.
    up = build_upstream("wav2vec2_local", str(tiny_ckpts["wav2vec2_local"]))
    cfg = ModelConfig(upstream="wav2vec2_local", upstream_adapter="lora", lora_target_modules=["fc1", "final_proj"])
    with pytest.raises(
        UpstreamError, match=r"the LoRA adapters on upstream\.model\.final_proj never reach the hidden states"
    ):
        add_adapters(up, cfg, check_reached=True)

    # A checkpoint whose config.yaml names another rank than its adapters have.
    exp, _, _ = lora_run
    ckpt = tmp_path / "step-3"
    shutil.copytree(exp / "step-3", ckpt)
    text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(text.replace(f"lora_rank: {RANK}", "lora_rank: 4"))
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--ckpt_dir", str(ckpt), *EVAL, "--out_dir", str(tmp_path / "ev")])
    msg = str(err.value)
    assert "does not fit" in msg and "lora_A.default.weight is shape [8, " in msg and "\n" not in msg, msg
