"""Text in, fixed token windows out: the one data path for calibration, eval and benchmarks.

A data spec is a ``.jsonl`` / ``.txt`` / ``.parquet`` file or a Hugging Face dataset id
(``name`` or ``name:config``, streamed). Documents are joined with the EOS token and cut into
windows of ``seq_len`` tokens, in file order, so the same spec always yields the same windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from ..errors import KvSurgeonError

# Built-in texts shipped with the package (calibration and held-out eval; see data/calibration-COPYRIGHT).
BUILTIN_DATA = Path(__file__).parent / "data"


class DataError(KvSurgeonError):
    pass


def iter_texts(spec: str, text_field: str = "text", split: str = "validation") -> Iterator[str]:
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n} is not valid JSON ({e})") from e
                    if text_field not in row:
                        raise DataError(f"{path}:{n} has no field {text_field!r} (fields: {', '.join(row)}); pass --text-field")
                    yield row[text_field]
        elif suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise DataError("reading .parquet needs pyarrow: pip install 'kvsurgeon[data]'") from e
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(table.column_names)}); pass --text-field")
            yield from (t for t in table.column(text_field).to_pylist() if t)
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .txt or .parquet")
        return
    if suffix in (".jsonl", ".txt", ".parquet", ".json", ".csv") or spec.startswith((".", "/", "~")):
        raise DataError(f"data file {spec} does not exist")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec!r} is not a file; loading Hub datasets needs `pip install 'kvsurgeon[data]'`") from e
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise DataError(f"cannot load dataset {spec!r} (split {split!r}): {e}") from e
    for row in ds:
        if text_field not in row:
            raise DataError(f"dataset {spec!r} has no field {text_field!r} (fields: {', '.join(row)}); pass --text-field")
        if row[text_field]:
            yield row[text_field]


def token_windows(
    tokenizer,
    texts: Iterator[str],
    seq_len: int,
    max_tokens: int | None = None,
    skip_tokens: int = 0,
    per_text: int | None = None,
) -> torch.Tensor:
    """(n, seq_len) int64 windows covering at most ``max_tokens`` tokens.

    ``skip_tokens`` drops that many tokens first, so calibration and evaluation can draw
    disjoint windows from one file. ``per_text`` keeps only the first ``per_text`` tokens of each
    text, so a small budget spans many documents instead of the first one or two.
    """
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    sep = tokenizer.eos_token_id
    need = skip_tokens + (max_tokens if max_tokens else float("inf"))
    buf: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buf.extend(ids[:per_text] if per_text else ids)
        if sep is not None:
            buf.append(sep)
        if len(buf) >= need:
            break
    buf = buf[skip_tokens:]
    n = len(buf) // seq_len
    if max_tokens:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise DataError(f"not enough text for one window of {seq_len} tokens (got {len(buf)} tokens)")
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)
