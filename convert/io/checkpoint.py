"""Lazy, read-only view of a checkpoint folder: tensors are loaded one at a time on request.

Shard headers are read (and checked against the file sizes) up front; each tensor is then one
``pread`` from the one open shard, with no memory map, so reading a 70B model costs the memory of
the tensors the caller currently holds, not of the model or of a shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from ..errors import KvSurgeonError
from .safetensors_io import SafetensorsFormatError, TensorInfo, read_header, read_tensor

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


class CheckpointError(KvSurgeonError):
    pass


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        hint = ""
        if (Path(folder) / "final" / "config.json").is_file():  # an uptrain run folder: its model is final/
            hint = f"; it looks like an uptraining run, whose model is {Path(folder) / 'final'}"
        raise CheckpointError(f"{folder} has no config.json: it is not a Hugging Face model folder{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e


class LazyCheckpoint:
    """``get_tensor(name)`` over the (possibly sharded) weights of one folder."""

    def __init__(self, folder: str | os.PathLike, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.allow_pickle = allow_pickle
        self.loads = 0  # tensors materialised so far: lets tests prove laziness
        self.pickle = False
        self._open_name: str | None = None
        self._fd: int | None = None
        self._infos: dict[str, TensorInfo] = {}
        self._pickle_cache: tuple[str, dict] | None = None
        self._weight_map = self._discover()

    # ---- discovery -------------------------------------------------------------------------
    def _discover(self) -> dict[str, str]:
        f = self.folder
        if (f / SAFE_INDEX).is_file():
            wm = self._index_map(f / SAFE_INDEX)
        elif (f / SAFE_SINGLE).is_file():
            wm = {k: SAFE_SINGLE for k in self._header(SAFE_SINGLE)}
        elif (f / PICKLE_INDEX).is_file() or (f / PICKLE_SINGLE).is_file():
            if not self.allow_pickle:
                raise CheckpointError(
                    f"{f} holds only pickle weights (*.bin), which can run arbitrary code when loaded. "
                    "Convert them to safetensors first, or pass --allow-pickle if you trust the source."
                )
            self.pickle = True
            if (f / PICKLE_INDEX).is_file():
                wm = self._index_map(f / PICKLE_INDEX)
            else:
                sd = self._load_pickle(PICKLE_SINGLE)
                wm = {k: PICKLE_SINGLE for k in sd}
        else:
            raise CheckpointError(f"{f} has no weights: expected {SAFE_SINGLE} or {SAFE_INDEX}")
        if not self.pickle and (f / SAFE_INDEX).is_file():
            for shard in sorted(set(wm.values())):
                table = self._header(shard)
                absent = [k for k, v in wm.items() if v == shard and k not in table]
                if absent:
                    raise CheckpointError(
                        f"shard {shard} in {f} lacks {absent[0]} (and {len(absent) - 1} more) listed in {SAFE_INDEX}; "
                        "the download is inconsistent: download the model again"
                    )
        return wm

    def _index_map(self, index: Path) -> dict[str, str]:
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid weight index ({e}); re-download the model") from e
        missing = sorted({s for s in wm.values() if not (self.folder / s).is_file()})
        if missing:
            raise CheckpointError(
                f"missing shard(s) {', '.join(missing)} listed in {index.name} under {self.folder}; "
                "the download is incomplete: download the model again"
            )
        return dict(wm)

    def _header(self, shard: str) -> dict[str, TensorInfo]:
        path = self.folder / shard
        try:
            table, _ = read_header(path)
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(
                f"corrupt or truncated shard {path.name} in {self.folder} ({e}); download the model again"
            ) from e
        self._infos.update(table)
        return table

    def _load_pickle(self, shard: str) -> dict:
        if self._pickle_cache and self._pickle_cache[0] == shard:
            return self._pickle_cache[1]
        try:
            sd = torch.load(self.folder / shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CheckpointError(f"corrupt shard {shard} in {self.folder} ({e}); download the model again") from e
        self._pickle_cache = (shard, sd)
        return sd

    # ---- access ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def shard_of(self, name: str) -> str:
        return self._weight_map[name]

    def shards(self) -> list[str]:
        return sorted(set(self._weight_map.values()))

    def info(self, name: str) -> TensorInfo:
        """dtype, shape and location of a tensor, from the header: nothing is read."""
        return self._infos[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._weight_map:
            raise CheckpointError(f"tensor {name!r} is not in {self.folder}")
        shard = self._weight_map[name]
        self.loads += 1
        if self.pickle:
            return self._load_pickle(shard)[name].clone()
        if self._open_name != shard:
            self.close()
            self._fd = os.open(self.folder / shard, os.O_RDONLY)
            self._open_name = shard
        try:
            return read_tensor(self._fd, self._infos[name])
        except (SafetensorsFormatError, OSError) as e:
            raise CheckpointError(
                f"corrupt or truncated shard {shard} in {self.folder} while reading {name} ({e}); "
                "download the model again"
            ) from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._open_name = None

    def total_bytes(self) -> int:
        return sum((self.folder / s).stat().st_size for s in self.shards())

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
