import os
from pathlib import Path

# The checkout root (pytest puts it on sys.path: pyproject's pythonpath); the scripts run from here.
ROOT = Path(__file__).resolve().parents[1]
# Tests never talk to W&B's servers.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
