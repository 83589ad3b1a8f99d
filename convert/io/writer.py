"""Atomic output folders (the shards themselves: ``safetensors_io.PlannedShardWriter``).

Everything is written into a hidden temporary sibling of the target and renamed into place only
when complete, so a crash, a kill -9 or a full disk never leaves a partial model under the
target name, and an existing folder is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import KvSurgeonError


class OutputError(KvSurgeonError):
    pass


def parse_size(size: str | int) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes, read by transformers' ``convert_file_size_to_int`` (the parser
    ``save_pretrained(max_shard_size=...)`` uses), case-insensitively: units are bytes, so '2gb' is 2e9
    and never transformers' lower-case-b bits. A bare number is a byte count."""
    if isinstance(size, int):
        return size
    from transformers.utils.hub import convert_file_size_to_int

    s = str(size).strip().replace(" ", "")
    try:
        return int(s) if s.isdigit() else convert_file_size_to_int(s.upper())
    except ValueError:
        raise OutputError(f"cannot read size {size!r}: use a whole number and a unit, e.g. 5GB, 500MB or 2GiB") from None


def _disk_full(e: OSError, where: Path) -> OutputError:
    return OutputError(
        f"no space left on the device holding {where}: free some space or choose another --out "
        f"(nothing was written under the target name)"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Temporary siblings left by a killed writer (kill -9, power loss): their pid is gone."""
    removed = []
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_output(target: str | os.PathLike, overwrite: bool = False, protect: list[Path] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success move it to ``target``.

    ``protect`` lists folders (the source model) that must never be replaced or written into.
    """
    target = Path(target).absolute()
    for p in protect or []:
        p = Path(p).absolute()
        if target == p or p in target.parents or target in p.parents:
            raise OutputError(f"refusing to write to {target}: it overlaps the source model {p}; choose another --out")
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it, or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _umask_modes(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(e, target) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_modes(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would: some writers (safetensors via
    ``save_pretrained``) create 0600 temporaries, which would hide a shared model from other users."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


# Files that describe how to use the model rather than its weights: carried over unchanged.
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "LICENSE",
)


def copy_extras(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in EXTRA_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def write_json(path: Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
