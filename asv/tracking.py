"""Experiment tracking: W&B through Accelerate, and the run's JSON-lines log beside it."""

from __future__ import annotations

import netrc
import os


def wandb_mode(requested: str) -> str:
    """'auto' means online for a logged-in user (API key in the environment or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"
