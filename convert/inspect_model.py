"""``kvsurgeon inspect``: what a checkpoint's attention costs, read from config and shard headers only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kvsurgeon.attention.kv_cache import layer_caches, summarize, text_config
from kvsurgeon.attention.serving import serving_support

from .io.checkpoint import LazyCheckpoint, read_config
from .io.resolve import resolve_model

CONTEXTS = (4096, 32768, 131072)


@dataclass
class Report:
    model: str
    path: str
    architecture: str
    model_type: str
    num_layers: int
    num_attention_heads: int | None
    dtype: str
    bytes_per_value: int
    parameters: int
    kv_values_per_token: int
    kv_bytes_per_token: int
    fixed_state_bytes: int
    kv_cache_bytes: dict[str, int]  # context length -> bytes, batch 1
    layers: list[dict]
    serving: list[dict]  # per engine: serves, reason, notes (kvsurgeon.attention.serving)

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(folder: Path, allow_pickle: bool = False) -> int:
    ckpt = LazyCheckpoint(folder, allow_pickle=allow_pickle)
    if ckpt.pickle:
        return sum(ckpt.get_tensor(k).numel() for k in ckpt.keys())
    total = 0
    for name in ckpt.keys():  # shapes come from the shard headers: no tensor is read
        n = 1
        for d in ckpt.info(name).shape:
            n *= d
        total += n
    return total


def inspect_model(name: str, revision: str | None = None, allow_pickle: bool = False) -> Report:
    path = resolve_model(name, revision=revision, allow_pickle=allow_pickle)
    config = read_config(path)
    tc = text_config(config)
    summary, layers = summarize(config)
    return Report(
        model=str(name),
        path=str(path),
        architecture=", ".join(config.get("architectures") or ["?"]),
        model_type=str(tc.get("model_type", config.get("model_type"))),
        num_layers=len(layers),
        num_attention_heads=tc.get("num_attention_heads"),
        dtype=summary.dtype,
        bytes_per_value=summary.bytes_per_value,
        parameters=count_parameters(path, allow_pickle),
        kv_values_per_token=summary.values_per_token,
        kv_bytes_per_token=summary.bytes_per_token,
        fixed_state_bytes=summary.fixed_bytes,
        kv_cache_bytes={str(c): summary.bytes_at(c, layers) for c in CONTEXTS},
        layers=[l.as_dict() for l in layers],
        serving=[e.as_dict() for e in serving_support(config)],
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def group_layers(layers: list[dict]) -> list[tuple[str, dict]]:
    """Runs of identical layers, e.g. ('0-29', {...}), for a compact table."""
    runs: list[tuple[int, int, dict]] = []
    for l in layers:
        key = {k: v for k, v in l.items() if k != "layer"}
        if runs and runs[-1][2] == key and runs[-1][1] == l["layer"] - 1:
            runs[-1] = (runs[-1][0], l["layer"], key)
        else:
            runs.append((l["layer"], l["layer"], key))
    return [(f"{a}" if a == b else f"{a}-{b}", k) for a, b, k in runs]
