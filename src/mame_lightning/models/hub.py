"""Upload an exported folder to the Hugging Face Hub (`export.push_to_hub=user/name`).

Everything that would make the upload fail is checked before training starts (repository id,
a token, offline mode), so a long run never ends in an upload that cannot happen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_HELP = "set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) or run `hf auth login`"


class HubError(ValueError):
    """export.push_to_hub cannot work as configured (the message says what to change)."""


def hub_token() -> str | None:
    """The token huggingface_hub would use: HF_TOKEN, else the one saved by `hf auth login`."""
    from huggingface_hub import get_token

    return get_token()


def check_push(repo_id: str, environ: Mapping[str, str] = os.environ) -> str:
    """Validate `repo_id` and find a token; returns the token or raises HubError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in str(repo_id):
        raise HubError(f"export.push_to_hub={repo_id!r}: give the repository as OWNER/NAME (e.g. my-lab/mame-siemens)")
    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as error:
        raise HubError(f"export.push_to_hub={repo_id!r}: not a valid Hub repository id ({error})") from error
    if str(environ.get("HF_HUB_OFFLINE", "")).strip().lower() in ("1", "true", "yes", "on"):
        raise HubError(f"export.push_to_hub={repo_id!r}: HF_HUB_OFFLINE is set, so nothing can be uploaded; "
                       "unset it or drop export.push_to_hub")
    token = hub_token()
    if not token:
        raise HubError(f"export.push_to_hub={repo_id!r}: no Hugging Face token found; {TOKEN_HELP}")
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool = True, token: str | None = None,
                message: str | None = None) -> str:
    """Create the model repository when missing and upload `folder` as one commit; returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder}: not an exported diffusers folder (no model_index.json); nothing uploaded")
    api = HfApi(token=token or check_push(repo_id))
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=message or f"Upload {folder.name} exported by mame_lightning")
    return str(url)


__all__ = ["HubError", "TOKEN_HELP", "check_push", "hub_token", "push_folder"]
