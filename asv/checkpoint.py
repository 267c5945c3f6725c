"""Checkpoint integrity: when a step-<N>/ directory is safe to resume or evaluate from.

Nothing here unpickles: safetensors headers, JSON and YAML are read as data, and Accelerate's
optimizer/scheduler/RNG files go through `accelerate.utils.load`, i.e. `torch.load(weights_only=True)`
(tensors, containers and numpy arrays only), the same call its `load_state` makes afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

from asv.errors import CheckpointError

# Written by Accelerate's save_state and train.py; evaluation needs only the last three.
RESUME_FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl")
EVAL_FILES = ("embedder.safetensors", "config.yaml", "train_state.json")
# Accelerate's pickles of registered objects: its load_state reads them with weights_only=False.
CUSTOM_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Other torch-serialised files Accelerate writes (optimizer_1.bin, scheduler.bin, random_states_1.pkl, ...).
TORCH_FILES = re.compile(r"^(optimizer|scheduler|sampler|scaler|random_states)(_\d+)?\.(bin|pkl|pt)$")


def read_train_state(ckpt: Path) -> dict:
    """train_state.json ({"step", "epoch", "batch_in_epoch"}), validated."""
    path = Path(ckpt) / "train_state.json"
    try:
        state = json.loads(path.read_text())
        if not all(isinstance(state.get(k), int) for k in ("step", "epoch", "batch_in_epoch")):
            raise ValueError("needs integer step, epoch and batch_in_epoch")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({_one_line(err)})") from None
    return state


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header; safetensors also checks the data really covers them (truncation)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError or its own Rust panics
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({_one_line(err)})") from None


def verify_checkpoint(ckpt: Path, for_resume: bool = True) -> None:
    """Raise CheckpointError unless every file `ckpt` needs is present and loads without unpickling."""
    ckpt = Path(ckpt)
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
        raise CheckpointError(f"{ckpt / 'config.yaml'} is unreadable ({_one_line(err)})") from None
    _check_safetensors(ckpt / "embedder.safetensors")
    if not for_resume:
        return
    from accelerate.utils import load

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
                raise CheckpointError(f"{path} is corrupt or holds more than tensors ({_one_line(err)})") from None


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


def newest_usable(checkpoints: list[tuple[int, Path]]) -> Path | None:
    """The newest checkpoint that verifies, warning about each newer one that does not; None if none does."""
    for _, ckpt in reversed(checkpoints):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as err:
            print(f"warning: skipping checkpoint {ckpt.name}: {err}", file=sys.stderr)
    return None


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
