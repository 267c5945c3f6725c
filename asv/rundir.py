"""The run directory: every path under exp/<run>/, and when a checkpoint in it is safe to resume or evaluate.

    exp/<run>/
      config.yaml                 the resolved TrainConfig of the latest launch
      train_log.jsonl             one JSON record per log step and per dev evaluation ({"step": N, ...})
      train_summary.json          written when training ends: steps, skips, seconds, data statistics
      embedder.safetensors        the last checkpoint's embedder (featurizer + downstream [+ upstream])
      wandb_id.txt, wandb/        the W&B run this directory logs to (resumed, never duplicated)
      step-<N>/                   a checkpoint: embedder.safetensors, model.safetensors (+ loss head),
                                  optimizer.bin, scheduler.bin, random_states_<rank>.pkl, config.yaml and
                                  train_state.json, written last: its presence marks a complete checkpoint
      .tmp-step-<N>/, .old-step-<N>/   a save in progress (cleaned up on the next start)
      evaluate/                   evaluate.py's outputs (EvalLayout; --out_dir puts them elsewhere)

Nothing here unpickles: safetensors headers, JSON and YAML are read as data, and Accelerate's
optimizer/scheduler/RNG files go through `accelerate.utils.load`, i.e. `torch.load(weights_only=True)`
(tensors, containers and numpy arrays only), the same call its `load_state` makes afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from asv.errors import CheckpointError, one_line

# Written by Accelerate's save_state and train.py; evaluation needs only the last three.
RESUME_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl")
EVAL_FILES = ("embedder.safetensors", "config.yaml", "train_state.json")
# Accelerate's pickles of registered objects: its load_state reads them with weights_only=False.
CUSTOM_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Other torch-serialised files Accelerate writes (optimizer_1.bin, scheduler.bin, random_states_1.pkl, ...).
TORCH_FILES = re.compile(r"^(optimizer|scheduler|sampler|scaler|random_states)(_\d+)?\.(bin|pkl|pt)$")


class TrainState:
    """Loop position, checkpointed as train_state.json (JSON, so loading it runs no code), with what evaluation
    needs to know of each save. train.py sets `scheduled` (step > 0 and a multiple of save_step: SUPERB's best
    over checkpoints compares only those) and `effective_batch` (utterances per optimizer update over all
    processes, as resolved at run time) before each save; None means unknown."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.scheduled: bool | None = None
        self.effective_batch: int | None = None

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "scheduled": self.scheduled,
            "effective_batch": self.effective_batch,
        }

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = d["step"], d["epoch"], d["batch_in_epoch"]
        # Files written before the two marks existed lack them: unknown.
        self.scheduled, self.effective_batch = d.get("scheduled"), d.get("effective_batch")


def step_dir(exp_dir: Path, step: int) -> Path:
    return Path(exp_dir) / f"step-{step}"


@dataclass
class EvalLayout:
    """evaluate.py's outputs under `root` (default exp/<run>/evaluate)."""

    root: Path

    @classmethod
    def of_run(cls, exp_dir: Path, out_dir: str | Path | None = None) -> EvalLayout:
        return cls(Path(out_dir) if out_dir else Path(exp_dir) / "evaluate")

    def embeddings(self, step: int) -> Path:  # the per-checkpoint embedding cache (asv/extract.py)
        return self.root / f"step-{step}" / "embeddings.npz"

    def calibration(self, step: int) -> Path:  # the score -> LLR map fitted at this checkpoint (asv/calibration.py)
        return self.root / f"step-{step}" / "calibration.json"

    def layer_weights(self, step: int) -> Path:
        return self.root / f"step-{step}" / "layer_weights.png"

    def scored(self, trials: str, step: int) -> Path:  # results.json, scores.txt, scores_hist.png
        return self.root / trials / f"step-{step}"

    def results(self, trials: str, step: int) -> Path:
        return self.scored(trials, step) / "results.json"

    def det(self, trials: str) -> Path:
        return self.root / trials / "det.png"

    def selected(self, trials: str) -> Path:  # the test result at the dev-selected checkpoint
        return self.root / trials / "selected_result.json"

    def best(self, trials: str) -> Path:  # the lowest EER on the list itself (SUPERB's protocol)
        return self.root / trials / "best_result.json"


def read_train_state(ckpt: Path) -> dict:
    """train_state.json ({"step", "epoch", "batch_in_epoch"}, and "scheduled", "effective_batch" when written
    since they exist), validated."""
    path = Path(ckpt) / "train_state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) for k in ("step", "epoch", "batch_in_epoch")
        ):
            raise ValueError("needs integer step, epoch and batch_in_epoch")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({one_line(err)})") from None
    scheduled, batch = state.get("scheduled"), state.get("effective_batch")
    if scheduled is not None and not isinstance(scheduled, bool):
        raise CheckpointError(
            f'{path}: "scheduled" is {scheduled!r}, not true or false; correct it, or delete the key to have it '
            "inferred from the checkpoint's config.yaml save_step"
        )
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise CheckpointError(
            f'{path}: "effective_batch" is {batch!r}, not a positive integer; correct it, or delete the key '
            "(the effective batch is then reported as unknown)"
        )
    return state


def is_scheduled(ckpt: Path) -> bool:
    """Whether checkpoint `ckpt` is one of its run's scheduled saves (step > 0, a multiple of save_step), not one
    made at a preemption signal, at a last step off the schedule, or by --save_initial."""
    state = read_train_state(ckpt)
    if state.get("scheduled") is not None:
        return state["scheduled"]
    # Written before train_state.json carried the mark: the save_step of the launch that saved it tells, since
    # each checkpoint holds the config.yaml of its own launch (a resume may change save_step).
    try:
        save_step = yaml.safe_load((Path(ckpt) / "config.yaml").read_text())["run"]["save_step"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
        save_step = None
    if not isinstance(save_step, int) or isinstance(save_step, bool) or save_step < 1:
        return True  # no way to tell: it competes, as every checkpoint did before the mark
    return state["step"] > 0 and state["step"] % save_step == 0


def _check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header; safetensors also checks the data really covers them (truncation)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError or its own Rust panics
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({one_line(err)})") from None


def verify_checkpoint(ckpt: Path, for_resume: bool = True) -> None:
    """Raise CheckpointError unless every file `ckpt` needs is present and loads without unpickling."""
    ckpt = Path(ckpt)
    if not (ckpt / "train_state.json").is_file():
        raise CheckpointError(
            f"{ckpt} is not a checkpoint directory (no train_state.json); pass a step-<N> directory written by train.py"
        )
    read_train_state(ckpt)
    needed = EVAL_FILES + (RESUME_FILES if for_resume else ())
    missing = [n for n in needed if not (ckpt / n).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt} lacks {', '.join(missing)} (an incomplete copy?)")
    try:
        cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise ValueError("not a train.py config")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'} is unreadable ({one_line(err)})") from None
    _check_safetensors(ckpt / "embedder.safetensors")
    if not for_resume:
        return
    for path in sorted(ckpt.iterdir()):
        if CUSTOM_PICKLE.match(path.name):
            raise CheckpointError(
                f"{path} is a pickle, which Accelerate would load with weights_only=False (it can run code); "
                "train.py keeps the loop position in train_state.json and never writes it: delete the file"
            )
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        elif TORCH_FILES.match(path.name):
            try:
                load(str(path), map_location="cpu", mmap=True)  # weights_only=True: refuses code
            except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
                raise CheckpointError(f"{path} is corrupt or holds more than tensors ({one_line(err)})") from None


def check_weights_match(path: Path, expected: dict, what: str) -> None:
    """`path`'s tensors must have exactly the names and shapes of `expected` (a state dict): a checkpoint of
    another upstream or head then fails here with one line instead of deep inside load_state_dict."""
    have = _check_safetensors(Path(path))
    want = {k: tuple(v.shape) for k, v in expected.items()}
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            got = "absent" if k not in have else f"shape {list(have[k])}"
            need = "absent" if k not in want else f"shape {list(want[k])}"
            raise CheckpointError(
                f"{path} does not fit {what}: {k} is {got} there, the model needs {need} "
                "(a checkpoint of another upstream, layer selection or head?)"
            )


def load_initial_weights(ckpt: Path, model: torch.nn.Module, upstream: torch.nn.Module | None) -> str:
    """--init_from: another run's checkpoint `ckpt` (a step-<N>/) as this run's starting point. Its
    model.safetensors (featurizer, downstream, loss head) must fit `model` name for name and shape for shape; a
    fine-tuned upstream in its embedder.safetensors (upstream.* tensors: full weights or adapters) goes into
    `upstream`, whose weights must include every one of those names with the same shape. A mismatch is refused in
    one line naming the first key. Weights only: the optimizer, the schedule and the loop position start afresh.
    Returns what was loaded, for the banner."""
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt, for_resume=False)
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: --init_from needs a step-<N> directory written by train.py")
    check_weights_match(path, model.state_dict(), "this model")
    model.load_state_dict(load_file(str(path)))
    prefix = "upstream."
    tuned = {
        k[len(prefix) :]: v for k, v in load_file(str(ckpt / "embedder.safetensors")).items() if k.startswith(prefix)
    }
    if not tuned:
        return f"{len(model.state_dict())} tensors of the featurizer, downstream and head"
    if upstream is None:
        raise CheckpointError(
            f"{ckpt} holds a fine-tuned upstream, which this run would freeze and never save: pass "
            "--upstream_trainable true (or the adapter it was trained with), or --init_from a frozen-upstream run"
        )
    have = {k: tuple(v.shape) for k, v in upstream.state_dict().items()}
    for k, v in sorted(tuned.items()):
        if have.get(k) != tuple(v.shape):
            got = "absent" if k not in have else f"shape {list(have[k])}"
            raise CheckpointError(
                f"{ckpt / 'embedder.safetensors'} does not fit this run's upstream: {prefix}{k} is shape "
                f"{list(v.shape)} there, {got} here (another upstream, or another adapter setting?)"
            )
    upstream.load_state_dict(tuned, strict=False)
    return f"{len(model.state_dict())} tensors of the featurizer, downstream and head, {len(tuned)} of the upstream"


def list_checkpoints(exp_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, dir), oldest first. train_state.json is written last, so a
    directory without it is an interrupted save and is ignored; the step is read from it, not the name."""
    found = []
    for d in Path(exp_dir).glob("step-*"):
        if (d / "train_state.json").is_file():
            try:
                found.append((read_train_state(d)["step"], d))
            except CheckpointError as err:
                print(f"warning: skipping checkpoint {d.name}: {err}", file=sys.stderr)
    return sorted(found)


def usable(checkpoints: list[tuple[int, Path]], for_resume: bool, newest_only: bool = False) -> list[tuple[int, Path]]:
    """The checkpoints that verify, warning about each one that does not (a corrupt checkpoint among many is
    skipped, so the others still serve). newest_only: from the newest down, stop at the first that verifies."""
    good = []
    for step, ckpt in reversed(checkpoints):
        try:
            verify_checkpoint(ckpt, for_resume)
        except CheckpointError as err:
            print(f"warning: skipping checkpoint {ckpt.name}: {err}", file=sys.stderr)
            continue
        good.insert(0, (step, ckpt))
        if newest_only:
            break
    return good


def remove_interrupted_saves(exp_dir: Path) -> list[Path]:
    """Clean up after a save killed mid-way: delete `.tmp-step-*` (never renamed, so incomplete or
    unconfirmed), and put back a `.old-step-N` whose `step-N` replacement never arrived."""
    stale = sorted(Path(exp_dir).glob(".tmp-step-*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    for d in sorted(Path(exp_dir).glob(".old-step-*")):
        final = d.parent / d.name[len(".old-") :]
        if final.exists():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.rename(final)
        stale.append(d)
    return stale


def save_checkpoint(accelerator, weights_fn, config_fn, state: TrainState, exp_dir: Path, keep: int | None) -> Path:
    """Write exp_dir/step-<N>/ through a temporary directory so a crash never leaves a half checkpoint.

    Accelerate's save_state writes the trainable weights, optimizer, scheduler and RNG states; on the main
    process `weights_fn()` gives the embedder's tensors and `config_fn(path)` writes config.yaml. Only the
    newest `keep` checkpoints are kept, pruned after the new one is in place (a failed save costs none).
    """
    final, tmp = step_dir(exp_dir, state.step), Path(exp_dir) / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank has written its RNG state before the rename
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in weights_fn().items()}, tmp / "embedder.safetensors")
            config_fn(tmp / "config.yaml")
            # The loop position as JSON, written last: its presence marks a complete checkpoint.
            (tmp / "train_state.json").write_text(json.dumps(state.state_dict()))
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, quota, I/O error (torch says RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(exp_dir)
        kept = f"{previous[-1][1]} is untouched" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {final} ({one_line(err)}); {kept}. Free disk space and rerun "
            "the same command: it resumes from the newest checkpoint"
        ) from None
    if accelerator.is_main_process:
        # Renames only, so a kill at any point leaves either the old or the new step-N complete
        # (remove_interrupted_saves puts a stranded .old-step-N back).
        old = Path(exp_dir) / f".old-step-{state.step}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if keep:
            for _, stale in list_checkpoints(exp_dir)[:-keep]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def check_resumable(saved_cfg, cfg, ckpt: Path) -> None:
    """The model and loss sections of a TrainConfig must match the checkpoint's; the rest may change on resume."""
    for section in ("model", "loss"):
        old, new = dataclasses.asdict(getattr(saved_cfg, section)), dataclasses.asdict(getattr(cfg, section))
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(
                f"{ckpt} was trained with {k}={old.get(k)!r}, this run has {k}={new[k]!r}; "
                "use the same setting or a new --exp_dir"
            )
