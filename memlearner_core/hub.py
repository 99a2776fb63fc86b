"""Fetching a checkpoint from the Hugging Face Hub into a model folder, once.

A repo is stored as ``<folder>/<owner>--<name>/``; when that folder already holds exactly one safetensors file it
is used without touching the network, so graphs that name a repo keep working offline after the first run.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ValueError):
    """A repo that cannot be used or reached; the message says what to do instead."""


def fetch_safetensors(repo_id: str, folder: str | Path) -> Path:
    """The single ``.safetensors`` file of ``repo_id``, downloaded into ``folder/<owner>--<name>/`` if absent."""
    repo_id = repo_id.strip()
    if not REPO_ID.match(repo_id):
        raise HubError(f"'{repo_id}' is not a Hugging Face repo id (owner/name, e.g. Thrcle/DiT-Mem-1.3B)")
    dest = Path(folder) / repo_id.replace("/", "--")
    local = sorted(dest.glob("*.safetensors")) if dest.is_dir() else []
    if len(local) == 1:
        return local[0]
    if len(local) > 1:
        raise HubError(f"{dest} holds {len(local)} safetensors files; keep the one encoder file there")
    import huggingface_hub

    try:
        files = [f for f in huggingface_hub.list_repo_files(repo_id) if f.endswith(".safetensors")]
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise HubError(f"could not list {repo_id} on the Hugging Face Hub ({type(e).__name__}: {e}); download its "
                       f".safetensors file into {dest} by hand") from e
    if len(files) != 1:
        raise HubError(f"{repo_id} has {len(files)} safetensors files ({', '.join(files) or 'none'}); download the "
                       f"encoder file into {dest} by hand")
    return Path(huggingface_hub.hf_hub_download(repo_id, files[0], local_dir=dest))
