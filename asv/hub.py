"""Publishing and fetching model directories (asv/modeldir.py) on the Hugging Face Hub.

    python -m asv push --model models/demo --repo_id you/superb-asv-demo      # needs `hf auth login`
    asv.load_model("you/superb-asv-demo")                                     # downloads, validates, loads

A repository holds exactly the model directory's files, so a download is validated like a local directory
(format_version, sha256 of every file). Without a network both directions fail with one HubError line
saying what to do instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from asv.errors import HubError, one_line
from asv.modeldir import read_model_dir

# owner/name as the Hub spells repository ids.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(str(source))) and not Path(source).exists()


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of `repo_id` (downloaded into the Hugging Face cache, or found there)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, library_name="superb-asv"))
    except Exception as err:  # huggingface_hub raises connection, not-found and auth errors of many types
        raise HubError(
            f"cannot fetch model '{repo_id}' from the Hugging Face Hub ({type(err).__name__}: {one_line(err, 120)}); "
            f"offline, copy the model directory here (e.g. `hf download {repo_id} --local-dir DIR` where there is "
            "a network) and pass DIR"
        ) from None


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a validated model directory to `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    read_model_dir(model_dir)  # never publish a directory that would not load (CheckpointError)
    if not REPO_ID.match(repo_id):
        raise HubError(f"--repo_id {repo_id!r} is not a Hub repository id of the form owner/name")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), commit_message=f"superb-asv model {model_dir.name}"
        )
    except Exception as err:  # network, authentication and permission errors alike
        raise HubError(
            f"cannot push {model_dir} to the Hugging Face Hub as {repo_id} ({type(err).__name__}: "
            f"{one_line(err, 120)}); log in with `hf auth login` (or pass a token) on a machine with a network"
        ) from None
    return str(getattr(info, "commit_url", info))
