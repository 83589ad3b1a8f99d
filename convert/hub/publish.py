"""Push a converted checkpoint folder to the Hugging Face Hub.

The folder is checked locally first (``check_publishable_folder``: config loads without custom code, every weight
file is present) so that a broken checkpoint never reaches the Hub. ``push_folder`` then creates the repository
and branch if needed (``_ensure_repo``) and uploads in one commit or, for large folders, with the resumable
uploader. Transient Hub failures are retried with exponential backoff; everything
else becomes a PublishError that says what to do. The token is handed to huggingface_hub only: it is never logged,
and error messages are scrubbed of it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Literal, TypeVar

from ..errors import KvSurgeonError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Junk that must not end up in a model repo: dotfiles/dot-folders (incl. .cache), bytecode, temp files.
# fnmatch's "*" also matches "/", so "*/.*" covers dotfiles at any depth.
IGNORE_PATTERNS: tuple[str, ...] = (".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "*.tmp*")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_COMMIT_MESSAGE = "Upload checkpoint converted with kvsurgeon"

Uploader = Literal["upload_folder", "upload_large_folder"]


class PublishError(KvSurgeonError):
    """The checkpoint cannot be published; the message names the problem and the fix."""


# ---------------------------------------------------------------------------- local checks


def check_publishable_folder(folder: str | Path) -> None:
    """Raise PublishError unless `folder` holds a config stock transformers parses and every safetensors
    weight file it names (the files are not loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: pass the output folder of the conversion.")
    if not (folder / "config.json").is_file():
        raise PublishError(
            f"{folder} has no config.json: save the model with `model.save_pretrained(folder)` before pushing."
        )
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder))  # no trust_remote_code: the pushed model must load with stock classes
    except Exception as e:
        raise PublishError(
            f"{folder}/config.json cannot be loaded by transformers without custom code ({type(e).__name__}: {e}). "
            "Re-save the converted model with `save_pretrained` so it uses a stock transformers class."
        ) from e

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PublishError(
                f"{index} is not a valid safetensors index ({e}). Re-save the model with `save_pretrained`."
            ) from e
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise PublishError(
                f"{index} lists {len(missing)} weight shard(s) that are not in the folder: {', '.join(missing)}. "
                "Copy the missing shards in, or re-save the model with `save_pretrained`."
            )
        if not shards:
            raise PublishError(f"{index} lists no weight shards. Re-save the model with `save_pretrained`.")
    elif not (folder / "model.safetensors").is_file():
        raise PublishError(
            f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json. "
            "Save the model with `model.save_pretrained(folder)` (safetensors is the default)."
        )


def files_to_upload(folder: str | Path) -> list[Path]:
    """Files of `folder` that a push sends, after the junk patterns are applied."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(relative, ignore_patterns=list(IGNORE_PATTERNS))
    return [folder / rel for rel in kept]


def _choose_uploader(total_bytes: int, threshold: int) -> Uploader:
    """Large folders go through the resumable multi-commit uploader; small ones in one commit."""
    return "upload_large_folder" if total_bytes > threshold else "upload_folder"


# ---------------------------------------------------------------------------- errors and retries


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP stack has changed library across versions (requests, httpx, httpx2): take the
    # network-level error classes from whichever is installed rather than pinning one.
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in ("TimeoutException", "NetworkError", "RemoteProtocolError"):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                errors.append(cls)
    return tuple(errors)


def _status(e: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def _is_transient(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, HfHubHTTPError):
        return _status(e) in TRANSIENT_STATUS
    if isinstance(e, OfflineModeIsEnabled):
        return False
    return isinstance(e, _transport_errors())


def _secrets(token: str | None) -> list[str]:
    # Values that must never appear in a message: the explicit token and the environment's.
    values = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    return [v for v in values if v and len(v) >= 4]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _describe(e: BaseException) -> str:
    status = _status(e)
    return f"HTTP {status}" if status is not None else type(e).__name__


def _publish_error(e: BaseException, what: str, repo_id: str, endpoint: str, attempts: int) -> PublishError | None:
    """The user-facing error for a failed Hub call, or None if `e` is not a Hub/network problem."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(e)
    if status == 401:
        return PublishError(
            f"not authenticated: set HF_TOKEN or run `hf auth login` (the Hub at {endpoint} rejected the request "
            f"to {what})."
        )
    if status == 403:
        return PublishError(
            f"no write permission to {repo_id}: use a token with write access to that namespace "
            "(a fine-grained token needs write permission on the repo), or push to a namespace you own."
        )
    if isinstance(e, RevisionNotFoundError):
        return PublishError(f"revision not found in {repo_id} while trying to {what}: check the --revision value.")
    if isinstance(e, RepositoryNotFoundError):
        return PublishError(
            f"repository {repo_id} not found while trying to {what}: check the repo id and that your token can see it."
        )
    if isinstance(e, HfHubHTTPError) and _is_transient(e):
        return PublishError(
            f"could not {what}: the Hub answered {_describe(e)} on {attempts} attempt(s). "
            "It may be down or rate limiting; try again later (re-running the push is safe)."
        )
    if isinstance(e, HfHubHTTPError):
        detail = e.server_message or str(e).splitlines()[0]
        return PublishError(f"could not {what}: the Hub answered {_describe(e)}: {detail}")
    if isinstance(e, OfflineModeIsEnabled):
        return PublishError("cannot push while offline mode is on: unset HF_HUB_OFFLINE.")
    if isinstance(e, HFValidationError):
        return PublishError(f"invalid repo id {repo_id!r}: use the form 'namespace/name' ({e}).")
    if isinstance(e, _transport_errors()):
        return PublishError(
            f"could not {what}: cannot reach the Hub at {endpoint} ({type(e).__name__}) after {attempts} attempt(s). "
            "Check your network connection and HF_ENDPOINT."
        )
    if isinstance(e, ValueError) and "README.md" in str(e):
        return PublishError(f"the Hub rejected README.md: {e}")
    return None


def _with_retries(
    what: str,
    call: Callable[[], T],
    *,
    retries: int,
    backoff_seconds: float,
    repo_id: str,
    endpoint: str,
    secrets: list[str],
) -> T:
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            if attempt < retries and _is_transient(e):
                delay = backoff_seconds * 2**attempt
                attempt += 1
                logger.warning("Could not %s (%s); retry %d/%d in %.2fs.", what, _describe(e), attempt, retries, delay)
                time.sleep(delay)
                continue
            error = _publish_error(e, what, repo_id, endpoint, attempt + 1)
            if error is None:
                raise
            raise PublishError(_redact(str(error), secrets)) from e


# ---------------------------------------------------------------------------- push


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    large_folder_threshold_bytes: int = 5 * 2**30,
    retries: int = 3,
    backoff_seconds: float = 1.0,
    refresh_card: Callable[[Path, str], object] | None = None,
) -> str:
    """Upload a converted checkpoint folder to `repo_id` and return the commit URL.

    `token=None` lets huggingface_hub resolve it (HF_TOKEN or the cached `hf auth login`); `endpoint=None` uses
    HF_ENDPOINT / the public Hub. `refresh_card(folder, repo_id)` is called after the local checks and before any
    upload, e.g. `kvsurgeon.convert.hub.model_card.refresh_model_card` to put the final repo id into README.md.
    """
    from huggingface_hub import HfApi, constants

    folder = _checked_folder(folder, repo_id, refresh_card)
    resolved_endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=resolved_endpoint, token=token)
    total_bytes = sum(p.stat().st_size for p in files_to_upload(folder))
    uploader = _choose_uploader(total_bytes, large_folder_threshold_bytes)
    call = partial(_with_retries, retries=retries, backoff_seconds=backoff_seconds, repo_id=repo_id,
                   endpoint=resolved_endpoint, secrets=_secrets(token))
    _ensure_repo(api, call, repo_id, private, revision)
    logger.info("Uploading %s (%d bytes) to %s with %s.", folder, total_bytes, repo_id, uploader)
    if uploader == "upload_large_folder" and hasattr(api, "upload_large_folder"):
        sha = _upload_large_folder(api, call, folder, repo_id, private, revision)
        return f"{resolved_endpoint}/{repo_id}/commit/{sha}"
    return _upload_folder(api, call, folder, repo_id, revision, commit_message)


def _checked_folder(folder: str | Path, repo_id: str, refresh_card: Callable[[Path, str], object] | None) -> Path:
    """The folder, once it and the repo id pass the local checks, with its card refreshed."""
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    check_publishable_folder(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise PublishError(f"invalid repo id {repo_id!r}: use the form 'namespace/name' ({e}).") from e
    if refresh_card is not None:
        refresh_card(folder, repo_id)
    return folder


def _ensure_repo(api, call: Callable, repo_id: str, private: bool, revision: str | None) -> None:
    """Create the repository and a named branch if they do not exist yet."""
    from huggingface_hub import constants

    # Look before creating: create_repo(exist_ok=True) on a repo we cannot write falls back to a code path that
    # mishandles an explicit endpoint differing from HF_ENDPOINT (huggingface_hub 2.x); the write then fails
    # with a clear 403 instead.
    exists = call("look up the repository", lambda: api.repo_exists(repo_id, repo_type="model"))
    if not exists:
        call("create the repository", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    # A named branch must exist before committing to it; "main" always does and PR refs cannot be created.
    if revision is not None and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/"):
        call(
            f"create branch {revision!r}",
            lambda: api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True),
        )


def _upload_large_folder(api, call: Callable, folder: Path, repo_id: str, private: bool, revision: str | None) -> str:
    """huggingface_hub 1.x: resumable, multi-commit; it returns nothing, so the head commit is read back."""
    call(
        "upload the folder",
        lambda: api.upload_large_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            private=private,
            ignore_patterns=list(IGNORE_PATTERNS),
            print_report=False,
        ),
    )
    info = call("read the new commit", lambda: api.repo_info(repo_id, revision=revision, repo_type="model"))
    return info.sha


def _upload_folder(api, call: Callable, folder: Path, repo_id: str, revision: str | None, commit_message: str | None) -> str:
    """One upload_folder call. huggingface_hub >= 2 has no upload_large_folder: its upload_folder is itself
    resumable and splits large folders into several commits when hf_xet is installed."""
    commit = call(
        "upload the folder",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            ignore_patterns=list(IGNORE_PATTERNS),  # a fresh list: upload_folder appends to it
        ),
    )
    return str(commit.commit_url)
