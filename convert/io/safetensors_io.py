"""safetensors read and write with explicit file I/O instead of memory maps.

Why not ``safe_open``/``save_file``: a memory-mapped shard counts every page it touches in the
process's RSS until it is unmapped, and ``save_file`` needs a whole shard in memory. Here a
tensor is read with one ``pread`` and written with one ``pwrite`` at an offset planned in advance,
so converting a 16 GB checkpoint holds one layer, not one shard.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor table and metadata of one file; checks that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise SafetensorsFormatError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"header is not valid JSON ({e})") from e
    meta = header.pop("__metadata__", {}) or {}
    table = {}
    start = 8 + n
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            b, e = h["data_offsets"]
            shape = tuple(int(s) for s in h["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsFormatError(f"bad header entry for {name}: {h}") from err
        numel = 1
        for s in shape:
            numel *= s
        if e - b != numel * torch.empty(0, dtype=dtype).element_size():
            raise SafetensorsFormatError(f"{name}: byte range {b}..{e} does not match shape {shape} {h['dtype']}")
        if start + e > size:
            raise SafetensorsFormatError(f"{name} ends at byte {start + e} but the file has {size}: truncated")
        table[name] = TensorInfo(dtype, shape, start + b, start + e)
    return table, meta


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    buf = bytearray(info.nbytes)
    view = memoryview(buf)
    got = 0
    while got < info.nbytes:  # pread may return short reads on large tensors
        chunk = os.preadv(fd, [view[got:]], info.begin + got)
        if chunk == 0:
            raise SafetensorsFormatError(f"unexpected end of file at byte {info.begin + got}")
        got += chunk
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty(0, dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class PlannedShardWriter:
    """Every output tensor's shard and offset are fixed before the first byte is written.

    ``write(name, tensor)`` checks the tensor against the plan (so a converter that produced a
    wrong shape fails at once, naming the tensor) and ``pwrite``s it in place; tensors may arrive
    in any order. ``finish`` checks that nothing is missing and writes the index.
    """

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int, metadata: dict | None = None):
        self.folder = Path(folder)
        self.meta = {"format": "pt", **(metadata or {})}
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if groups[-1] and size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.slots: dict[str, tuple[int, TensorInfo]] = {}
        self.fds: list[int] = []
        self.total_bytes = sum(s.nbytes for s in specs)
        for fi, (fname, group) in enumerate(zip(self.files, groups)):
            header: dict = {"__metadata__": self.meta}
            off = 0
            for s in group:
                header[s.name] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
                off += s.nbytes
            hbytes = json.dumps(header, separators=(",", ":")).encode()
            hbytes += b" " * (-len(hbytes) % 8)
            start = 8 + len(hbytes)
            for s in group:
                b, e = header[s.name]["data_offsets"]
                self.slots[s.name] = (fi, TensorInfo(s.dtype, s.shape, start + b, start + e))
            fd = os.open(self.folder / fname, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
            self.fds.append(fd)
            _pwrite_all(fd, struct.pack("<Q", len(hbytes)) + hbytes, 0)
            os.ftruncate(fd, start + off)  # sparse: no data written yet
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.slots:
            raise ValueError(f"{name} is not part of the planned output (the target config does not have it)")
        if name in self.written:
            raise ValueError(f"{name} written twice")
        fi, info = self.slots[name]
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, the target config expects {info.shape}")
        t = tensor.detach().to(device="cpu", dtype=info.dtype).contiguous().reshape(-1)
        if t.numel():  # a byte view of the tensor's own memory: no copy
            _pwrite_all(self.fds[fi], memoryview(t.view(torch.uint8).numpy()), info.begin)
        self.written.add(name)

    def finish(self) -> list[str]:
        missing = sorted(set(self.slots) - self.written)
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[:3]}")
        for fd in self.fds:
            os.fsync(fd)
        self.close()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.files[fi] for name, (fi, _) in sorted(self.slots.items())},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def __enter__(self) -> "PlannedShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
