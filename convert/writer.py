"""Atomic output folders and HF-named safetensors shards.

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

import torch
from safetensors.torch import save_file

from .errors import KvSurgeonError

DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class OutputError(KvSurgeonError):
    pass


def parse_size(size: str | int) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            num = s[: -len(unit)]
            try:
                return int(float(num) * _UNITS[unit])
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise OutputError(f"cannot read size {size!r}: use e.g. 5GB, 500MB or 2GiB") from None


def _disk_full(e: OSError, where: Path) -> OutputError:
    return OutputError(
        f"no space left on the device holding {where}: free some space or choose another --out "
        f"(nothing was written under the target name)"
    )


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
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
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


class ShardWriter:
    """Collects tensors and writes ``model-0000k-of-0000n.safetensors`` shards plus an index.

    Shards are flushed as soon as they reach ``max_shard_size``, so memory holds at most one
    shard; the final names are assigned in ``finish`` once the shard count is known.
    """

    def __init__(self, folder: Path, max_shard_size: str | int = DEFAULT_MAX_SHARD, metadata: dict | None = None):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        if self.max_bytes <= 0:
            raise OutputError(f"--max-shard-size must be positive, got {max_shard_size!r}")
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor {name} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.partial"
        try:
            save_file(self._pending, str(self.folder / tmp_name), metadata=self.metadata)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _disk_full(e, self.folder) from e
            raise
        except Exception as e:  # safetensors wraps write errors in its own type
            if "No space left" in str(e):
                raise _disk_full(OSError(errno.ENOSPC, str(e)), self.folder) from e
            raise
        self._shards.append((tmp_name, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Write the last shard, give shards their HF names, write the index. Returns shard names."""
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise ValueError("no tensors were written")
        if n == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map: dict[str, str] = {}
        names = []
        for i, (tmp, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


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
