"""Turn a user's MODEL argument (a local folder or a Hub id) into a local folder.

Hub ids go through ``huggingface_hub.snapshot_download``, so the cache, ``HF_HUB_OFFLINE``,
``--revision`` and the token (``HF_TOKEN`` or a cached login, resolved by huggingface_hub) behave
exactly as they do for transformers. Only the files a conversion needs are fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import KvSurgeonError

# Everything but pickle weights; those are fetched only with allow_pickle.
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md", "LICENSE*"]
PICKLE_PATTERNS = ["*.bin"]


class ResolveError(KvSurgeonError):
    pass


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        return path.absolute()
    name = str(name)
    if not looks_like_hub_id(name):
        raise ResolveError(f"{name!r} is neither a local folder nor a Hub model id (owner/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = snapshot_download(name, revision=revision, allow_patterns=patterns)
    except GatedRepoError as e:
        raise ResolveError(f"{name} is gated: accept its licence on the Hub and log in (`hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise ResolveError(f"unknown model id {name!r}: no such repository (or it is private and you are not logged in)") from e
    except RevisionNotFoundError as e:
        raise ResolveError(f"model {name!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise ResolveError(
            f"{name!r} is not in the local Hub cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}). Download it once with network access, or pass a local folder."
        ) from e
    return Path(local)
