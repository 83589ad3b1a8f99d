"""The demo's summary table fits an 80-column terminal with nothing cut, and its PNG is written."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo_report import Row, markdown, png, terminal_table  # noqa: E402

ROWS = [
    Row("source", "source: HuggingFaceTB/SmolLM2-135M-Instruct (GQA 9/3)", 23040, 1.0, 0.0, 0.8, "HF+vLLM", 0.0, ""),
    Row("MQA", "MQA, calibrated merge", 7680, 1.99, 0.712, 0.0, "HF+vLLM", 187.0, "kvsurgeon convert X --to mqa"),
    Row("MLA-50%", "MLA -50%", 11520, 1.16, 0.151, 0.6, "HF", 1234.0, "kvsurgeon convert X --to mla"),
    Row("hybrid-50%", "hybrid", 115200, 12.34, 1.0, 1.0, "HF+vLLM", 99999.0, "kvsurgeon convert X --to hybrid"),
]


def test_terminal_table_fits_80_columns_uncut():
    console = Console(width=80, record=True, force_terminal=False)
    console.print(terminal_table(ROWS, title="SmolLM2-135M, no training (9.9 min)"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for cell in ("KV B/tok", "passkey", "served", "hybrid-50%", "115,200", "12.34x", "99999 s", "3,600 MiB"):
        assert cell in text, cell


def test_markdown_and_png(tmp_path):
    args = Namespace(calib_tokens=2048, transfer_tokens=2048, eval_tokens=4096, passkey_samples=2, passkey_length=2048)
    md = markdown(ROWS, "title", args)
    assert md.count("\n| ") == len(ROWS) + 1 and "`kvsurgeon convert X --to mla`" in md and "transformers+vLLM" in md
    png(ROWS, tmp_path / "s.png", "title")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
