"""Parity with s3prl 0.4.18's own SuperbASV code, step by step: the harness of tests/test_s3prl_parity.py.

    .venv-bench/bin/python -m bench.parity SPEC.json     # s3prl's side (the test starts it)

Two halves that meet in files, because s3prl's runner needs .venv-bench's extras (pandas, librosa, ...)
while our code runs in .venv:

- s3prl's side (`s3prl_side`, in a .venv-bench child): SuperbASV's stages 0-1 on an s3prl-layout view of
  a generated corpus, then `Problem.train` itself (SuperbASV's default_config, builders, DataLoader with
  its default_collate_fn, loss / accumulate, clip, NaN skip, AdamW, its step_<N> checkpoint) on crops we
  hand it, then its real stage 3 on that checkpoint. Only the dataset is injected: a list of the given
  crops and the given batches of indices, so both sides see the same audio, crops and padding.
- our side (`our_training`, `our_checkpoint`, in the test process): train.py's step with
  `asv.config.TrainConfig()` defaults through Accelerate on the same crops, from s3prl's initial
  weights; s3prl's trained weights written as a train.py checkpoint for evaluate.py.

SPEC.json: {"work": DIR, "corpus": generated corpus root, "speakers": speakers.json, "crops": crops.pt,
"cases": [{"name", "upstream", "ckpt", "steps", "accumulate", "batches": [[i, ...], ...], "evaluate"}]}.
Per case it writes DIR/<name>/: init.pt (s3prl's initial weights, our names), losses.json (one loss per
batch, in order), s3prl/train/step_<steps>/ (final weights) and, with "evaluate",
s3prl/evaluate/test_trial/step_<steps>/result.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from bench.common import Corpus, s3prl_view

INIT_FILE, LOSSES_FILE = "init.pt", "losses.json"
S3PRL_TRIAL_LIST = "test_trial"  # stage 0 names its trial csv so; stage 3 writes evaluate/<it>/step_<N>/
# The sections of ASV.run's arguments that its stage 2 passes on to Problem.train.
STAGE2_KEYS = (
    "train",
    "build_model",
    "build_upstream",
    "build_featurizer",
    "build_downstream",
    "build_task",
    "save_model",
    "save_task",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
)


# ----------------------------------------------------------------------------- shared


def to_our_names(model_state: dict, loss_state: dict) -> dict[str, torch.Tensor]:
    """s3prl's UpstreamDownstreamModel + AM-softmax state as our SpeakerModel's: featurizer.* and downstream.*
    keep their names (same classes / layout), loss W becomes head.W, and the frozen upstream is dropped."""
    state = {k: v for k, v in model_state.items() if k.startswith(("featurizer.", "downstream."))}
    state.update({f"head.{k}": v for k, v in loss_state.items()})
    return state


def s3prl_final_state(case_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    """The weights s3prl's training saved at its last update, in our names."""
    ckpt = case_dir / "s3prl" / "train" / f"step_{steps}"
    model_state = torch.load(ckpt / "model" / "state_dict.pt", map_location="cpu", weights_only=True)
    task_state = torch.load(ckpt / "task" / "state.pt", map_location="cpu", weights_only=True)
    return to_our_names(model_state, task_state["loss_state"])


def build_crops(data_dir: Path, batch_size: int, num_batches: int, max_secs: float, seed: int = 0) -> dict:
    """Training crops as train.py draws them (TrainDataset: gain, VAD, crop of at most max_secs; EpochSampler
    order of epoch 0), cut into num_batches batches of batch_size: {"crops", "labels", "ids", "batches"}."""
    from asv.config import TrainConfig
    from asv.datasets import EpochSampler, load_train_set

    dataset, _, _ = load_train_set(data_dir, TrainConfig().data.min_secs, max_secs, seed)
    keys = list(EpochSampler(len(dataset), seed))[: batch_size * num_batches]
    if len(keys) < batch_size * num_batches:
        raise ValueError(f"{data_dir} has {len(dataset)} training utterances; need {batch_size * num_batches}")
    crops, labels = zip(*(dataset[k] for k in keys), strict=True)
    return {
        "crops": list(crops),
        "labels": list(labels),
        "ids": [dataset.utterances[i].id for _, i in keys],
        "batches": [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(num_batches)],
    }


# ----------------------------------------------------------------------------- our side (.venv)


def our_training(cfg, crops: dict, batches: list[list[int]], init_state: dict, num_classes: int):
    """(loss per batch, final weights) of train.py's step on the given batches, from init_state.

    train.py's own step (asv.training.train_step: frozen upstream in inference mode, SpeakerModel forward ->
    (loss, logits), Accelerate's accumulate + backward, on the syncing batch clip_grad_norm_ and the optimizer
    step unless the norm is not finite) on batches padded by train.py's collate_train, with train.py's
    Accelerator settings; fp32 (a signal-processing upstream runs unautocast in train.py too).
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    from asv.datasets import collate_train
    from asv.models import build_speaker_model
    from asv.optim import build_optimizer_and_scheduler
    from asv.training import RunningStats, Trainee, train_step
    from asv.upstream import build_upstream

    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.optim.gradient_accumulate, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
    )
    upstream = build_upstream(cfg.model.upstream, cfg.model.upstream_ckpt, cfg.model.upstream_normalize)
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes)
    model.load_state_dict(init_state)  # strict: every tensor of ours has an s3prl counterpart
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, model, None)
    model, optimizer = accelerator.prepare(model, optimizer)
    stats = RunningStats(accelerator.device, cfg.run.max_consecutive_skips, cfg.optim.gradient_clipping)
    head = accelerator.unwrap_model(model).head
    model.train()
    trainee = Trainee(model, upstream, optimizer, scheduler)
    losses, step = [], 0
    for index in batches:
        batch = collate_train([(crops["crops"][i], crops["labels"][i]) for i in index])
        head.set_step(step)  # the margin schedule (none by default) follows the update count, as in train.py
        loss, _ = train_step(accelerator, trainee, batch, stats)
        losses.append(loss.item())
        step += accelerator.sync_gradients
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    accelerator.free_memory()
    return losses, state


def our_checkpoint(out: Path, cfg, state: dict, step: int) -> Path:
    """A train.py checkpoint directory (config.yaml, embedder.safetensors, train_state.json) holding `state`,
    which evaluate.py scores like any other."""
    from safetensors.torch import save_file

    from asv.config import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}, out / "embedder.safetensors")
    (out / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": 0}))
    return out


# ----------------------------------------------------------------------------- s3prl's side (.venv-bench)


def s3prl_config(problem, target: Path, root: Path, cache: Path, case: dict) -> dict:
    """SuperbASV.default_config() as its CLI would resolve it, with only what the comparison must set: the
    upstream, the run length, the accumulation, CPU, and no DataLoader workers. Everything else (model,
    loss, optimizer, clipping) stays s3prl's default, which is what our TrainConfig() defaults must equal."""
    from omegaconf import OmegaConf

    overrides = dict(
        target_dir=str(target),
        cache_dir=str(cache),
        device="cpu",
        num_workers=0,
        test_ckpt_steps=[case["steps"]],
        prepare_data=dict(dataset_root=str(root)),
        build_upstream=dict(name=case["upstream"], **({"path_or_url": case["ckpt"]} if case["ckpt"] else {})),
        train=dict(
            total_steps=case["steps"],
            gradient_accumulate=case["accumulate"],
            log_step=case["steps"],
            save_step=case["steps"],
        ),
    )
    config = OmegaConf.merge(OmegaConf.create(problem.default_config()), overrides)
    return OmegaConf.to_container(config, resolve=True, throw_on_missing=True)


def s3prl_stages(problem, config: dict, start: int, stop: int | None) -> None:
    """problem.run(...) for stages start..stop; s3prl ends a run that stops early with exit(0)."""
    try:
        problem.run(**{**config, "start": start, "stop": stop})
    except SystemExit as err:
        if err.code not in (0, None):
            raise


def s3prl_train(problem_cls, config: dict, target: Path, case_dir: Path, items: list[dict], batches) -> None:
    """Stage 2 as ASV.run calls it (s3prl/problem/asv/run.py), on the given items and batches.

    A subclass records what the comparison needs without changing a computation: s3prl's initial weights
    (saved when the task is built, before any update) and every batch's loss (a forward hook on the loss).
    """
    import pickle

    losses: list[float] = []

    class Recording(problem_cls):
        def build_task(self, build_task, model, encoder, test_trials=None):
            task = super().build_task(build_task, model, encoder, test_trials)
            init = to_our_names(task.model.state_dict(), task.loss.state_dict())
            # Written then renamed: the test process waits for this file and starts training from it.
            torch.save({k: v.clone() for k, v in init.items()}, case_dir / (INIT_FILE + ".tmp"))
            os.replace(case_dir / (INIT_FILE + ".tmp"), case_dir / INIT_FILE)
            task.loss.register_forward_hook(lambda module, args, out: losses.append(out[0].item()))
            return task

    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    config = {k: config.get(k) or {} for k in STAGE2_KEYS}  # ASV.run turns absent sections into {} too
    problem = Recording()
    train_dir = target / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # auto_resume would continue an earlier run
    problem.train(
        config["train"],
        train_dir,
        dict(
            build_model=config["build_model"],
            model_output_size=len(encoder),
            build_upstream=config["build_upstream"],
            build_featurizer=config["build_featurizer"],
            build_downstream=config["build_downstream"],
        ),
        dict(build_task=config["build_task"], encoder=encoder),
        config["save_model"],
        config["save_task"],
        config["build_optimizer"],
        config["build_scheduler"],
        config["evaluate"],
        items,
        batches,  # a list of index lists is a batch sampler (set_epoch is optional)
        problem.build_collate_fn({}, "train"),
        None,
        None,
        None,
        num_workers=0,
        world_size=1,
        rank=0,
        eval_batch=-1,
        device="cpu",
    )
    # Written last and renamed into place: it tells the test process that step_<N> is saved.
    (case_dir / (LOSSES_FILE + ".tmp")).write_text(json.dumps(losses))
    os.replace(case_dir / (LOSSES_FILE + ".tmp"), case_dir / LOSSES_FILE)


def s3prl_classes(target: Path) -> dict[str, int]:
    """{speaker directory name: class index} as s3prl's stages 0-1 assign them (train.csv's spk column is
    VoxCeleb1SV's own label, spk2int.pkl encodes it)."""
    import csv
    import pickle

    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    with open(target / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {Path(r["wav_path"]).parts[-3]: encoder.encode(int(r["spk"])) for r in rows}


def s3prl_side(spec_path: Path) -> None:
    from bench import s3prl_shim

    s3prl_shim.install()  # before the first s3prl import
    from s3prl.problem import SuperbASV

    print(f"[parity] s3prl imported (process cpu {time.process_time():.1f} s)", flush=True)
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    root, cache = s3prl_view(work, corpus=Corpus("parity", work / "unused", Path(spec["corpus"]), "trials"))
    crops = torch.load(spec["crops"], weights_only=True)
    # Items as SuperbASV's train dataset yields them (x, x_len, class_id, unique_name); its
    # default_collate_fn pads x with zeros, as ours does.
    items = [
        {"x": x, "x_len": len(x), "class_id": int(y), "unique_name": u}
        for x, y, u in zip(crops["crops"], crops["labels"], crops["ids"], strict=True)
    ]
    speakers = json.loads(Path(spec["speakers"]).read_text())
    configs = {}
    # Every training first, then every stage 3: the test process trains alongside, then evaluates alongside.
    for case in spec["cases"]:
        t0 = time.perf_counter()
        case_dir = work / case["name"]
        target = case_dir / "s3prl"
        case_dir.mkdir(parents=True, exist_ok=True)
        configs[case["name"]] = config = s3prl_config(SuperbASV(), target, root, cache, case)
        s3prl_stages(SuperbASV(), config, 0, 1)  # train.csv, test_trial.csv, spk2int.pkl
        if s3prl_classes(target) != speakers:  # labels go over as integers: both sides must number speakers alike
            raise SystemExit(f"error: s3prl's speaker classes differ from {spec['speakers']}")
        s3prl_train(SuperbASV, config, target, case_dir, items, case["batches"])
        print(
            f"[parity] {case['name']}: s3prl trained {case['steps']} updates ({time.perf_counter() - t0:.1f} s, "
            f"process cpu {time.process_time():.1f} s)",
            flush=True,
        )
    for case in spec["cases"]:
        if case.get("evaluate"):
            t0 = time.perf_counter()
            s3prl_stages(SuperbASV(), configs[case["name"]], 3, None)
            print(
                f"[parity] {case['name']}: s3prl stage 3 ({time.perf_counter() - t0:.1f} s, "
                f"process cpu {time.process_time():.1f} s)",
                flush=True,
            )


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: .venv-bench/bin/python -m bench.parity SPEC.json")
    # s3prl's train loop counts its updates on its tqdm bar: a disabled bar would never end it.
    os.environ.pop("TQDM_DISABLE", None)
    s3prl_side(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
