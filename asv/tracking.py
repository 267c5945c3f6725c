"""Experiment tracking: W&B through Accelerate, and the run's JSON-lines log beside it."""

from __future__ import annotations

import json
import netrc
import os
import time
from pathlib import Path


def wandb_mode(requested: str) -> str:
    """'auto' means W&B's own WANDB_MODE when it is set, else online for a logged-in user (API key in the
    environment or ~/.netrc), else offline. An explicit --wandb_mode wins over everything."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class JsonLog:
    """exp/<run>/train_log.jsonl: one JSON record per line, each with its "step"; only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def drop_after(self, step: int) -> None:
        """A killed run may have logged past its last checkpoint: drop those lines before resuming from it."""
        if self.enabled and self.path.is_file():
            kept = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= step]
            self.path.write_text("".join(r + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def start_tracking(
    accelerator, project: str, config: dict, run_dir: Path, mode: str, name: str, resume: bool, **wandb_kwargs
):
    """Start W&B through Accelerate (a no-op with log_with=None). With `resume`, the run id lives in
    run_dir/wandb_id.txt, so a resumed training run appends to its W&B run instead of starting a new one."""
    kwargs = {"mode": mode, "dir": str(run_dir), "name": name, **wandb_kwargs}
    if resume:
        id_file = Path(run_dir) / "wandb_id.txt"
        if accelerator.is_main_process and not id_file.exists():
            id_file.write_text(os.environ.get("WANDB_RUN_ID") or f"{name}-{int(time.time())}")
        accelerator.wait_for_everyone()
        kwargs.update(id=id_file.read_text(), resume="allow")
    accelerator.init_trackers(project, config=config, init_kwargs={"wandb": kwargs})
