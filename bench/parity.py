"""Parity with s3prl 0.4.18's own SuperbASV code, step by step: the harness of tests/test_s3prl_parity.py, and a
long training run compared update by update.

    .venv/bin/python -m bench.parity --case long [--updates 300] [--work exp/bench/parity_long]
    .venv-bench/bin/python -m bench.parity SPEC.json     # s3prl's side alone (the test and --case long start it)

Two halves that meet in files, because s3prl's runner needs .venv-bench's extras (pandas, librosa, ...) while
our code runs in .venv:

- s3prl's side (`s3prl_side`, in a .venv-bench child): per case, SuperbASV's stages 0-1 on an s3prl-layout view
  of the case's generated corpus, then `Problem.train` itself (SuperbASV's default_config, builders, DataLoader
  with its default_collate_fn, loss / accumulate, clip, NaN skip, AdamW, its step_<N> checkpoint), then its real
  stage 3 on that checkpoint and, with "evaluate_ours", on our trained weights written in its checkpoint format.
  Only the dataset is injected: train.py's own crops (`TrainCrops`) in train.py's batch order, so both sides
  see the same audio, crops and batches; each side pads them with its own collate, and both record a digest
  of every padded batch they trained on.
- our side (`ParityRun`, `our_training`, `our_evaluation`, in .venv): train.py's step (asv.training.train_step)
  with `asv.config.TrainConfig()` defaults on the same batches, from s3prl's initial weights; evaluate.py on
  s3prl's trained weights (and on ours), written as train.py checkpoints.

`--case long` is SUPERB's training as it runs on VoxCeleb1, shortened: a generated corpus of 3-12 s utterances,
SUPERB's 8 s crops, batch 10 x accumulation 5, `--updates` updates (300) on fbank, every batch's loss compared,
then both sides' final weights scored by both evaluators. It prints a side-by-side summary and takes about
an hour on 2 cores (each side on one).

SPEC.json: {"work": DIR, "cases": [{"name", "upstream", "ckpt", "corpus" (generated tree), "data" (prepare.py's
output), "speakers", "max_secs", "keys" ([[epoch, index], ...]), "batches" ([[position in keys, ...], ...]),
"steps", "accumulate", "evaluate", "evaluate_ours"}]}. Per case it writes DIR/<name>/: init.pt (s3prl's initial
weights, our names), s3prl.json (its loss and batch digest per batch, in order, and its training time),
s3prl/train/step_<steps>/ (final weights) and, with "evaluate", s3prl/evaluate/test_trial/step_<steps>/result.yaml
and embeddings.pt ({wav path: embedding}); with "evaluate_ours" too, the same under s3prl_scores_ours/ for our
final weights, which our side writes as ours.pt.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, Corpus, LoadMonitor, machine_banner, s3prl_view

INIT_FILE, S3PRL_FILE, OURS_FILE, EMBEDDINGS_FILE = "init.pt", "s3prl.json", "ours.pt", "embeddings.pt"
# s3prl's target directories in a case's: its run, and the one its stage 3 scores our trained weights in (a
# checkpoint outside target/train/ would need --test_ckpt_dir, which its stage 3 breaks on: a str, not a Path).
S3PRL_TARGET, S3PRL_OURS_TARGET = "s3prl", "s3prl_scores_ours"
S3PRL_TRIAL_LIST = "test_trial"  # stage 0 names its trial csv so; stage 3 writes evaluate/<it>/step_<N>/
BENCH_PYTHON = ROOT / ".venv-bench/bin/python"
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
    ckpt = case_dir / S3PRL_TARGET / "train" / f"step_{steps}"
    model_state = torch.load(ckpt / "model" / "state_dict.pt", map_location="cpu", weights_only=True)
    task_state = torch.load(ckpt / "task" / "state.pt", map_location="cpu", weights_only=True)
    return to_our_names(model_state, task_state["loss_state"])


class TrainCrops:
    """train.py's training items by position: item j is what its TrainDataset yields for keys[j] = (epoch, index):
    gain, VAD and a crop of at most max_secs drawn from an RNG keyed by (seed, epoch, index), so every process
    that builds it on the same prepared data reads the same samples. (wav (T,) float32, speaker class)."""

    def __init__(self, data_dir, max_secs: float, keys: list, seed: int = 0):
        from asv.config import TrainConfig
        from asv.datasets import load_train_set

        self.dataset, _, _ = load_train_set(Path(data_dir), TrainConfig().data.min_secs, max_secs, seed)
        self.keys = [tuple(k) for k in keys]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        return self.dataset[self.keys[j]]

    def utterance_id(self, j: int) -> str:
        return self.dataset.utterances[self.keys[j][1]].id


def draw_batches(data_dir, batch_size: int, num_batches: int, seed: int = 0) -> dict:
    """The first num_batches batches train.py's loader yields: EpochSampler's order epoch after epoch, each epoch's
    last batch short as the DataLoader leaves it. {"keys": [[epoch, index], ...], "batches": [[position in keys,
    ...], ...]}."""
    from asv.config import TrainConfig
    from asv.datasets import EpochSampler, load_train_set

    data = TrainConfig().data
    dataset, _, _ = load_train_set(Path(data_dir), data.min_secs, data.max_secs, seed)
    sampler = EpochSampler(len(dataset), seed)
    keys, batches, epoch = [], [], 0
    while len(batches) < num_batches:
        sampler.set_epoch(epoch)
        epoch_keys = list(sampler)
        for start in range(0, len(epoch_keys), batch_size):
            if len(batches) == num_batches:
                break
            chunk = epoch_keys[start : start + batch_size]
            batches.append(list(range(len(keys), len(keys) + len(chunk))))
            keys += [list(k) for k in chunk]
        epoch += 1
    return {"keys": keys, "batches": batches}


def batch_digest(wav: torch.Tensor, wav_len: torch.Tensor, labels: torch.Tensor) -> str:
    """A padded batch's identity: shape, every sample, the lengths and the labels. Equal digests on both sides
    prove they trained on the same batches, padding included."""
    h = hashlib.sha256(str(tuple(wav.shape)).encode())
    for t, dtype in ((wav, torch.float32), (wav_len, torch.int64), (labels, torch.int64)):
        h.update(t.detach().to("cpu", dtype).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def generated_corpus(root: Path, data_dir: Path, **generate) -> None:
    """A generated VoxCeleb1-layout corpus (asv.synth.generate_corpus arguments) prepared by prepare.py as a
    VoxCeleb1 tree with every training speaker kept, as s3prl's view of it trains on; both once."""
    import prepare
    from asv.synth import generate_corpus

    marker = root / "parity_corpus.json"
    if not marker.is_file() or json.loads(marker.read_text()) != generate:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        generate_corpus(root, **generate)
        marker.write_text(json.dumps(generate))
    args = ["--dataset", "voxceleb1", "--dataset_root", str(root), "--trials", str(root / "trials.txt")]
    prepare.main([*args, "--out_dir", str(data_dir), "--dev_speakers", "0", "--num_workers", "1"])


# ----------------------------------------------------------------------------- our side (.venv)


def our_training(cfg, crops, batches, init_state: dict, num_classes: int, accumulate: int, progress_every: int = 0):
    """train.py's step on the given batches, from init_state: {"losses": one per batch, "digests": one per batch,
    "state": the final weights, "seconds"}.

    train.py's own step (asv.training.train_step: frozen upstream in inference mode, SpeakerModel forward ->
    (loss, logits), backward of loss / accumulate, on the batch that completes an update clip_grad_norm_ and the
    optimizer step unless the norm is not finite) on batches padded by train.py's collate_train, with train.py's
    Accelerator settings (no Accelerate accumulation: train_step counts `accumulate` batches itself); fp32 (a
    signal-processing upstream runs unautocast in train.py too).
    """
    from accelerate import Accelerator

    from asv.datasets import collate_train
    from asv.models import build_speaker_model
    from asv.optim import build_optimizer_and_scheduler
    from asv.training import RunningStats, Trainee, train_step
    from asv.upstream import build_upstream

    accelerator = Accelerator(mixed_precision=cfg.run.mixed_precision, step_scheduler_with_optimizer=False)
    upstream = build_upstream(cfg.model.upstream, cfg.model.upstream_ckpt, cfg.model.upstream_normalize)
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes)
    model.load_state_dict(init_state)  # strict: every tensor of ours has an s3prl counterpart
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, model, None)
    model, optimizer = accelerator.prepare(model, optimizer)
    stats = RunningStats(accelerator.device, cfg.run.max_consecutive_skips, cfg.optim.gradient_clipping)
    head = accelerator.unwrap_model(model).head
    model.train()
    trainee = Trainee(model, upstream, optimizer, scheduler, accumulate=accumulate)
    losses, digests, step, t0 = [], [], 0, time.perf_counter()
    for index in batches:
        batch = collate_train([crops[i] for i in index])
        digests.append(batch_digest(*batch))
        head.set_step(step)  # the margin schedule (none by default) follows the update count, as in train.py
        loss, grad_norm = train_step(accelerator, trainee, batch, stats)
        if loss is None:  # s3prl would have trained on it: the comparison is off from here
            raise RuntimeError(f"our side dropped batch {len(losses)} (out of memory)")
        losses.append(loss.item())
        step += grad_norm is not None
        if progress_every and grad_norm is not None and step % progress_every == 0:
            print(f"[parity] ours: update {step} ({time.perf_counter() - t0:.0f} s)", flush=True)
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    accelerator.free_memory()
    return {"losses": losses, "digests": digests, "state": state, "seconds": time.perf_counter() - t0}


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


def our_evaluation(ckpt: Path, out_dir: Path, trial_list: str, *flags: str) -> dict:
    """evaluate.py on one checkpoint: {"eer" (%), "num_trials", "scores" ((N, 2): score, label per trial, as
    scores.txt has them), "embeddings" ({resolved wav path: embedding})}."""
    import evaluate
    from asv.rundir import EvalLayout

    argv = ["--ckpt_dir", str(ckpt), "--out_dir", str(out_dir), "--trial_names", trial_list, "--num_workers", "0"]
    res = evaluate.main([*argv, "--cache", "true", "--plots", "false", "--wandb_mode", "disabled", *flags])
    step = json.loads((ckpt / "train_state.json").read_text())["step"]
    layout = EvalLayout(Path(out_dir))
    with np.load(layout.embeddings(step)) as z:
        embeddings = {str(Path(p).resolve()): e for p, e in zip(z["paths"], z["embeddings"], strict=True)}
    return {
        "eer": res[trial_list][step]["eer"],
        "num_trials": res[trial_list][step]["num_trials"],
        "scores": np.loadtxt(layout.scored(trial_list, step) / "scores.txt"),
        "embeddings": embeddings,
    }


class SideFailed(RuntimeError):
    """s3prl's side (the .venv-bench child) failed or timed out; the message ends with its log's last lines."""


class S3prlSide:
    """bench/parity.py SPEC.json in a .venv-bench child. Its files appear as it goes (init.pt before its first
    update, s3prl.json once its checkpoint is saved, result.yaml per stage-3 checkpoint), so our side starts on
    each as soon as it exists."""

    def __init__(self, spec_path: Path, log: Path, timeout_s: float):
        if not BENCH_PYTHON.exists():
            raise SideFailed(f"{BENCH_PYTHON} is missing: run `make test` (or `bash bench/setup.sh`) to build it")
        self.log, self.timeout_s = log, timeout_s
        # s3prl's train loop counts updates on its tqdm bar: TQDM_DISABLE would make it run forever.
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BENCH_PYTHON), "-m", "bench.parity", str(spec_path)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.deadline = time.monotonic() + timeout_s

    def fail(self, what: str):
        self.kill()
        text = self.log.read_text()
        hint = (
            "\n(.venv-bench lacks a package: rebuild it with `bash bench/setup.sh`)"
            if "ModuleNotFoundError" in text
            else ""
        )
        tail = "\n".join(text.splitlines()[-30:])
        raise SideFailed(f"s3prl's side (bench/parity.py) {what}; last lines of {self.log}:\n{tail}{hint}")

    def wait_for(self, path: Path) -> Path:
        while not path.exists():
            if self.proc.poll() is not None:
                self.fail(f"exited with {self.proc.returncode} before writing {path}")
            if time.monotonic() > self.deadline:
                self.fail(f"did not finish in {self.timeout_s:.0f} s")
            time.sleep(0.2)
        return path

    def finish(self) -> None:
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.fail(f"did not finish in {self.timeout_s:.0f} s")
        if self.proc.returncode != 0:
            self.fail(f"exited with {self.proc.returncode}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ParityRun:
    """Both sides of a spec's cases: s3prl's in its child (started here), ours in this process, each case's steps
    taken as soon as the child's files allow."""

    def __init__(self, work: Path, cases: list[dict], timeout_s: float):
        self.work, self.cases = Path(work), {c["name"]: c for c in cases}
        for name in self.cases:  # an earlier run's files would read as this one's
            shutil.rmtree(self.case_dir(name), ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        spec = self.work / "spec.json"
        spec.write_text(json.dumps({"work": str(self.work), "cases": cases}))
        self.s3prl = S3prlSide(spec, self.work / "s3prl.log", timeout_s)

    def case_dir(self, name: str) -> Path:
        return self.work / name

    def train_ours(self, name: str, cfg, progress_every: int = 0) -> dict:
        """Our training of the case from s3prl's initial weights (as soon as it has built them): our_training's
        result plus "init"."""
        case = self.cases[name]
        init = torch.load(self.s3prl.wait_for(self.case_dir(name) / INIT_FILE), weights_only=True)
        crops = TrainCrops(case["data"], case["max_secs"], case["keys"])
        num_classes = len(json.loads(Path(case["speakers"]).read_text()))
        out = our_training(cfg, crops, case["batches"], init, num_classes, case["accumulate"], progress_every)
        if case.get("evaluate_ours"):  # s3prl's stage 3 scores these weights too
            tmp = self.case_dir(name) / (OURS_FILE + ".tmp")
            torch.save(out["state"], tmp)
            os.replace(tmp, self.case_dir(name) / OURS_FILE)
        return out | {"init": init}

    def s3prl_training(self, name: str) -> dict:
        """s3prl's training of the case, once done: {"losses", "digests", "seconds", "state" (final, our names)}."""
        case_dir = self.case_dir(name)
        record = json.loads(self.s3prl.wait_for(case_dir / S3PRL_FILE).read_text())
        return record | {"state": s3prl_final_state(case_dir, self.cases[name]["steps"])}

    def s3prl_evaluation(self, name: str, ours: bool = False) -> dict:
        """s3prl's stage 3 on its own trained weights (or ours), once done: {"eer" (%), "embeddings" ({resolved
        wav path: embedding})}."""
        import yaml

        target = self.case_dir(name) / (S3PRL_OURS_TARGET if ours else S3PRL_TARGET)
        test_dir = target / "evaluate" / S3PRL_TRIAL_LIST / f"step_{self.cases[name]['steps']}"
        result = self.s3prl.wait_for(test_dir / "result.yaml")
        embeddings = torch.load(test_dir / EMBEDDINGS_FILE, weights_only=True)
        return {
            "eer": 100.0 * yaml.safe_load(result.read_text())["EER"],
            "embeddings": {p: e.numpy() for p, e in embeddings.items()},
        }

    def finish(self) -> None:
        self.s3prl.finish()

    def kill(self) -> None:
        self.s3prl.kill()


# ----------------------------------------------------------------------------- s3prl's side (.venv-bench)


def s3prl_config(problem, target: Path, root: Path, cache: Path, case: dict) -> dict:
    """SuperbASV.default_config() as its CLI would resolve it, with only what the comparison must set: the
    upstream, the run length, the accumulation, CPU, no DataLoader workers, and the checkpoint stage 3 scores.
    Everything else (model, loss, optimizer, clipping) stays s3prl's default, which is what our TrainConfig()
    defaults must equal."""
    from omegaconf import OmegaConf

    steps = case["steps"]
    overrides = dict(
        target_dir=str(target),
        cache_dir=str(cache),
        device="cpu",
        num_workers=0,
        test_ckpt_steps=[steps],
        prepare_data=dict(dataset_root=str(root)),
        build_upstream=dict(name=case["upstream"], **({"path_or_url": case["ckpt"]} if case["ckpt"] else {})),
        train=dict(total_steps=steps, gradient_accumulate=case["accumulate"], log_step=steps, save_step=steps),
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


class S3prlItems:
    """The crops as SuperbASV's train dataset yields items (x, x_len, class_id, unique_name); its
    default_collate_fn pads x with zeros, as ours does."""

    def __init__(self, crops: TrainCrops):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, j: int) -> dict:
        x, y = self.crops[j]
        return {"x": x, "x_len": len(x), "class_id": int(y), "unique_name": self.crops.utterance_id(j)}


def s3prl_train(problem_cls, config: dict, target: Path, case_dir: Path, items, batches) -> None:
    """Stage 2 as ASV.run calls it (s3prl/problem/asv/run.py), on the given items and batches.

    A subclass and a wrapped collate record what the comparison needs without changing a computation: s3prl's
    initial weights (saved when the task is built, before any update), every batch's loss (a forward hook on the
    loss) and the digest of every padded batch.
    """
    import pickle

    losses: list[float] = []
    digests: list[str] = []

    class Recording(problem_cls):
        def build_task(self, build_task, model, encoder, test_trials=None):
            task = super().build_task(build_task, model, encoder, test_trials)
            init = to_our_names(task.model.state_dict(), task.loss.state_dict())
            # Written then renamed: the other process waits for this file and starts training from it.
            torch.save({k: v.clone() for k, v in init.items()}, case_dir / (INIT_FILE + ".tmp"))
            os.replace(case_dir / (INIT_FILE + ".tmp"), case_dir / INIT_FILE)
            task.loss.register_forward_hook(lambda module, args, out: losses.append(out[0].item()))
            return task

    problem = Recording()
    collate = problem.build_collate_fn({}, "train")

    def recording_collate(samples):
        batch = collate(samples)
        digests.append(batch_digest(batch["x"], batch["x_len"], batch["class_id"]))
        return batch

    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    config = {k: config.get(k) or {} for k in STAGE2_KEYS}  # ASV.run turns absent sections into {} too
    train_dir = target / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # auto_resume would continue an earlier run
    t0 = time.perf_counter()
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
        recording_collate,
        None,
        None,
        None,
        num_workers=0,
        world_size=1,
        rank=0,
        eval_batch=-1,
        device="cpu",
    )
    # Written last and renamed into place: it tells the other process that step_<N> is saved.
    record = {"losses": losses, "digests": digests, "seconds": time.perf_counter() - t0}
    (case_dir / (S3PRL_FILE + ".tmp")).write_text(json.dumps(record))
    os.replace(case_dir / (S3PRL_FILE + ".tmp"), case_dir / S3PRL_FILE)


def s3prl_classes(target: Path) -> dict[str, int]:
    """{speaker directory name: class index} as s3prl's stages 0-1 assign them (train.csv's spk column is
    VoxCeleb1SV's own label, spk2int.pkl encodes it)."""
    import pickle

    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    with open(target / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {Path(r["wav_path"]).parts[-3]: encoder.encode(int(r["spk"])) for r in rows}


def record_test_embeddings() -> None:
    """s3prl's stage 3 also saves the embeddings it scores, {resolved wav path: embedding}, as EMBEDDINGS_FILE
    beside its result.yaml: its test_reduction, wrapped, reads them from the same cached results first."""
    from s3prl.task.speaker_verification_task import SpeakerVerification

    reduction = SpeakerVerification.test_reduction

    def recording(self, cached_results, _dump_dir):
        results = self.parse_cached_results(cached_results)
        dump_dir = Path(_dump_dir)
        with open(dump_dir.parents[2] / f"{S3PRL_TRIAL_LIST}.csv", newline="") as f:  # target/evaluate/<list>/<ckpt>
            paths = {}
            for row in csv.DictReader(f):
                paths[row["id1"]], paths[row["id2"]] = row["wav_path1"], row["wav_path2"]
        embeddings = {
            str(Path(paths[n]).resolve()): e.clone()
            for n, e in zip(results["unique_name"], results["spk_embedding"], strict=True)
        }
        torch.save(embeddings, dump_dir / EMBEDDINGS_FILE)
        return reduction(self, cached_results, _dump_dir)

    SpeakerVerification.test_reduction = recording


def s3prl_checkpoint_with(target: Path, other: Path, steps: int, state: dict) -> None:
    """other/train/step_<steps>: s3prl's own final checkpoint (target's) with our weights in place of its
    featurizer, downstream and loss (the frozen upstream and every argument file stay its own)."""
    src, dst = target / "train" / f"step_{steps}", other / "train" / f"step_{steps}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    model_state = torch.load(dst / "model/state_dict.pt", map_location="cpu", weights_only=True)
    task_state = torch.load(dst / "task/state.pt", map_location="cpu", weights_only=True)
    ours = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = set(to_our_names(model_state, {})) ^ set(ours)
    if missing:
        raise SystemExit(f"error: our weights and s3prl's checkpoint name different tensors: {sorted(missing)[:5]}")
    model_state.update(ours)
    task_state["loss_state"] = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    torch.save(model_state, dst / "model/state_dict.pt")
    torch.save(task_state, dst / "task/state.pt")


def wait_for_our_weights(path: Path) -> dict:
    """Our final weights once our side has written them; gives up when the process that started this one is gone."""
    parent = os.getppid()
    while not path.exists():
        if os.getppid() != parent:
            raise SystemExit(f"error: our side exited before writing {path}")
        time.sleep(0.5)
    return torch.load(path, map_location="cpu", weights_only=True)


def s3prl_side(spec_path: Path) -> None:
    from bench import s3prl_shim

    s3prl_shim.install()  # before the first s3prl import
    from s3prl.problem import SuperbASV

    print(f"[parity] s3prl imported (process cpu {time.process_time():.1f} s)", flush=True)
    record_test_embeddings()
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    views = {}
    # Every training first, then every stage 3: the other process trains alongside, then evaluates alongside.
    for case in spec["cases"]:
        t0 = time.perf_counter()
        case_dir = work / case["name"]
        target = case_dir / S3PRL_TARGET
        case_dir.mkdir(parents=True, exist_ok=True)
        corpus = Corpus(case["name"], case_dir / "unused", Path(case["corpus"]).resolve(), "trials")
        views[case["name"]] = root, cache = s3prl_view(case_dir, corpus=corpus)
        config = s3prl_config(SuperbASV(), target, root, cache, case)
        s3prl_stages(SuperbASV(), config, 0, 1)  # train.csv, test_trial.csv, spk2int.pkl
        if s3prl_classes(target) != json.loads(Path(case["speakers"]).read_text()):
            # Labels go over as integers: both sides must number the speakers alike.
            raise SystemExit(f"error: s3prl's speaker classes differ from {case['speakers']}")
        items = S3prlItems(TrainCrops(case["data"], case["max_secs"], case["keys"]))
        s3prl_train(SuperbASV, config, target, case_dir, items, case["batches"])
        print(
            f"[parity] {case['name']}: s3prl trained {case['steps']} updates ({time.perf_counter() - t0:.1f} s, "
            f"process cpu {time.process_time():.1f} s)",
            flush=True,
        )
    for case in spec["cases"]:
        if case.get("evaluate"):
            t0 = time.perf_counter()
            case_dir = work / case["name"]
            targets = [case_dir / S3PRL_TARGET] + ([case_dir / S3PRL_OURS_TARGET] if case.get("evaluate_ours") else [])
            for target in targets:
                config = s3prl_config(SuperbASV(), target, *views[case["name"]], case)
                if target.name == S3PRL_OURS_TARGET:  # its stages 0-1 again, and our weights as its checkpoint
                    s3prl_stages(SuperbASV(), config, 0, 1)
                    state = wait_for_our_weights(case_dir / OURS_FILE)
                    s3prl_checkpoint_with(case_dir / S3PRL_TARGET, target, case["steps"], state)
                s3prl_stages(SuperbASV(), config, 3, None)
            print(
                f"[parity] {case['name']}: s3prl stage 3 ({time.perf_counter() - t0:.1f} s, "
                f"process cpu {time.process_time():.1f} s)",
                flush=True,
            )


# ----------------------------------------------------------------------------- --case long


# VoxCeleb1-like lengths (3-12 s; VoxCeleb1's mean is 8.2 s): with SUPERB's 8 s crops most batches of 10 mix
# whole utterances of 3-8 s with 8 s crops, so nearly every one is padded, as on the real corpus. 320 training
# utterances of 40 speakers: 300 updates of 50 crops are ~47 epochs, each with new crops.
LONG_CORPUS = dict(num_train_speakers=40, num_test_speakers=20, videos_per_speaker=2, utts_per_video=4)
LONG_CORPUS |= dict(num_trials=1000, min_seconds=3.0, max_seconds=12.0)
LONG_TIMEOUT_S = 6 * 3600


def long_case(args) -> dict:
    # Everything our side runs, imported now: a run of an hour or two must not mix code versions if files change.
    import evaluate  # noqa: F401
    from asv.config import TrainConfig
    from asv.conventions import SUPERB_EFFECTIVE_BATCH

    work = Path(args.work).resolve()  # s3prl's view of the corpus links to it: absolute paths
    root, data = work / "corpus", work / "data"
    t_start = time.monotonic()
    generated_corpus(root, data, **LONG_CORPUS)
    cfg = TrainConfig()  # SUPERB's recipe: 8 s crops, batch 10, lr 1e-4, ...
    cfg.data.data_dir, cfg.model.upstream = str(data), args.upstream
    accumulate = SUPERB_EFFECTIVE_BATCH // cfg.data.batch_size  # SUPERB's 5 (s3prl's default_config too)
    drawn = draw_batches(data, cfg.data.batch_size, args.updates * accumulate, cfg.run.seed)
    case = dict(name="long", upstream=args.upstream, ckpt=None, corpus=str(root), data=str(data))
    case |= dict(speakers=str(data / "speakers.json"), max_secs=cfg.data.max_secs, **drawn)
    case |= dict(steps=args.updates, accumulate=accumulate, evaluate=True, evaluate_ours=True)
    print(machine_banner(), flush=True)
    load = LoadMonitor()
    run = ParityRun(work / "run", [case], LONG_TIMEOUT_S)
    print(f"[parity] corpus ready ({time.monotonic() - t_start:.0f} s); s3prl's side log: {run.s3prl.log}", flush=True)
    try:
        ours = run.train_ours("long", cfg, progress_every=25)
        print(f"[parity] ours trained ({ours['seconds']:.0f} s)", flush=True)
        record = {k: ours[k] for k in ("losses", "digests", "seconds")}  # kept, whatever happens next
        (run.case_dir("long") / "ours.json").write_text(json.dumps(record))
        theirs = run.s3prl_training("long")
        evals = {}
        for weights, state in (("s3prl", theirs["state"]), ("ours", ours["state"])):
            ckpt = our_checkpoint(work / "ckpt" / weights / f"step-{args.updates}", cfg, state, args.updates)
            evals[("ours", weights)] = our_evaluation(ckpt, work / "eval" / weights, "trials")
        for weights in ("s3prl", "ours"):
            evals[("s3prl", weights)] = run.s3prl_evaluation("long", ours=weights == "ours")
        run.finish()
    finally:
        run.kill()
        load = load.stop()
    return dict(case=case, ours=ours, s3prl=theirs, evals=evals, wall=time.monotonic() - t_start, load=load)


def relative_differences(ours, theirs) -> np.ndarray:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    return np.abs(ours - theirs) / np.abs(theirs)


def long_summary(r: dict, log_step: int) -> dict:
    """Print the side-by-side summary of `long_case`'s result; return its figures."""
    case, accumulate = r["case"], r["case"]["accumulate"]
    ours, theirs = np.array(r["ours"]["losses"]), np.array(r["s3prl"]["losses"])
    if len(ours) != len(theirs):
        raise SystemExit(f"error: {len(ours)} losses on our side, {len(theirs)} on s3prl's")
    rel = relative_differences(ours, theirs)
    same_batches = sum(a == b for a, b in zip(r["ours"]["digests"], r["s3prl"]["digests"], strict=True))
    worst = int(rel.argmax())
    epochs = {case["keys"][i][0] for b in case["batches"] for i in b}
    print(f"\n== long case: {case['steps']} updates of batch {len(case['batches'][0])} x accumulation {accumulate}, "
          f"{len(case['batches'])} batches over {len(epochs)} epochs, upstream {case['upstream']}")  # fmt: skip
    print(f"identical padded batches (digest of samples, lengths, labels): {same_batches} of {len(ours)}")
    print(f"\n{'update':>6} {'s3prl loss':>11} {'ours loss':>11} {'rel diff':>9} {'max batch rel diff':>19}")
    rows = []
    for end in range(log_step, case["steps"] + 1, log_step):
        window = slice((end - log_step) * accumulate, end * accumulate)  # the batches of the logged updates
        s, o = theirs[window].mean(), ours[window].mean()
        rows.append(
            {"update": end, "s3prl": s, "ours": o, "rel": abs(o - s) / abs(s), "max_batch_rel": rel[window].max()}
        )
        print(f"{end:>6} {s:>11.6f} {o:>11.6f} {rows[-1]['rel']:>9.2e} {rows[-1]['max_batch_rel']:>19.2e}")
    where = f"batch {worst} (update {worst // accumulate + 1}, its batch {worst % accumulate + 1} of {accumulate})"
    print(f"max relative loss difference over every batch: {rel.max():.3e} at {where}: "
          f"s3prl {theirs[worst]:.6f}, ours {ours[worst]:.6f}")  # fmt: skip
    first_update = rel[:accumulate].max()
    print(f"before the first update (same weights on both sides): max relative difference {first_update:.3e}")
    weights = max((r["ours"]["state"][k] - v).abs().max().item() for k, v in r["s3prl"]["state"].items())
    moved = max((v - r["ours"]["init"][k]).abs().max().item() for k, v in r["s3prl"]["state"].items())
    print(f"final weights: max |ours - s3prl| {weights:.3e} (largest move from the initial weights {moved:.3e})")
    e = r["evals"]
    print(f"\n{'EER %':<24} {'s3prl stage 3':>14} {'our evaluate.py':>16}")
    for w, label in (("s3prl", "s3prl-trained weights"), ("ours", "our trained weights")):
        print(f"{label:<24} {e[('s3prl', w)]['eer']:>14.4f} {e[('ours', w)]['eer']:>16.4f}")
    print(f"({e[('ours', 's3prl')]['num_trials']} trials)")
    emb = {
        w: float(
            max(
                np.linalg.norm(e[("ours", w)]["embeddings"][p] - v) / np.linalg.norm(v)
                for p, v in e[("s3prl", w)]["embeddings"].items()
            )
        )
        for w in ("s3prl", "ours")
    }
    print(f"embeddings, same weights, s3prl stage 3 vs evaluate.py: max relative L2 difference {emb['s3prl']:.2e} "
          f"(s3prl-trained), {emb['ours']:.2e} (ours)")  # fmt: skip
    print(f"\ntraining time: s3prl {r['s3prl']['seconds']:.0f} s, ours {r['ours']['seconds']:.0f} s (at the same time, "
          f"one core each); whole run {r['wall']:.0f} s\n{LoadMonitor.describe(r['load'])}")  # fmt: skip
    return {
        "updates": case["steps"],
        "batches": len(ours),
        "identical_batches": same_batches,
        "max_rel_loss_diff": float(rel.max()),
        "max_rel_loss_diff_batch": worst,
        "max_rel_loss_diff_before_first_update": float(first_update),
        "logged": [{k: float(v) for k, v in row.items()} for row in rows],
        "max_weight_diff": weights,
        "eer": {f"{ev}_eval_{w}_weights": float(e[(ev, w)]["eer"]) for ev, w in e},
        "max_rel_embedding_diff": emb,
        "seconds": {"s3prl_training": r["s3prl"]["seconds"], "ours_training": r["ours"]["seconds"], "wall": r["wall"]},
        "load": r["load"],
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", help="s3prl's side: run SPEC.json's cases (in .venv-bench)")
    parser.add_argument("--case", choices=["long"], help="both sides of a built-in case, then its summary")
    parser.add_argument("--updates", type=int, default=300, help="optimizer updates (of 10 x 5 crops)")
    parser.add_argument("--upstream", default="fbank", help="a weight-free s3prl upstream (fbank, mfcc, ...)")
    parser.add_argument("--log_step", type=int, default=25, help="updates per row of the loss table")
    parser.add_argument("--work", default=str(ROOT / "exp/bench/parity_long"), help="corpus, checkpoints, logs")
    parser.add_argument("--json_out", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if (args.spec is None) == (args.case is None):
        parser.error("give SPEC.json (s3prl's side) or --case long")
    if args.spec:
        # s3prl's train loop counts its updates on its tqdm bar: a disabled bar would never end it.
        os.environ.pop("TQDM_DISABLE", None)
        s3prl_side(Path(args.spec))
        return
    # The two sides train at the same time, one core each (the child inherits the setting).
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("WANDB_MODE", "disabled")
    figures = long_summary(long_case(args), args.log_step)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
