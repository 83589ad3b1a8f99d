"""Shared by the conversion benchmarks: run one `kvsurgeon convert` in a child process (so its peak
RSS is its own), evaluate the result against the source, and print a markdown table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAIN = SHARED / "pydocs-train.jsonl"
VALID = SHARED / "pydocs-valid.jsonl"
# The last pydocs-train documents: the ablations score on them, so calibration (the first documents) and the
# uptraining set (bench_uptrain_long.held_out_train) leave them out.
ABLATION_DOCS = 200


def missing_text(*paths: Path) -> str | None:
    """The refusal for a bench whose ../shared text is absent (None when every file is there): checked with the
    arguments, before a conversion or the source's measurement would trip over it."""
    for p in paths:
        if not p.is_file():
            return f"{p} not found: the benches train on pydocs-train and measure on pydocs-valid, kept in ../shared/data beside the checkout"
    return None


def named(text: str, flag: str, example: str) -> tuple[str, str]:
    """A bench row given as NAME=VALUE (a name and convert arguments, or a name and a folder): both sides non-empty,
    else a ValueError naming the flag and an example, for argparse to refuse with."""
    name, eq, value = text.partition("=")
    if not (name.strip() and eq and value.strip()):
        raise ValueError(f"{flag} {text!r}: expected a name, '=' and what it names, e.g. {example!r}")
    return name.strip(), value.strip()


@contextmanager
def ablation_eval_file():
    """The last ABLATION_DOCS pydocs-train documents as a temporary .jsonl path."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        f.writelines(TRAIN.read_text().splitlines(keepends=True)[-ABLATION_DOCS:])
        f.flush()
        yield f.name


def run_measured(argv: list[str], stats: Path) -> dict:
    """Run one kvsurgeon CLI command in a child process that records its own wall time, peak RSS and
    bytes read/written (/proc/self/io), so each measurement is that command's alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(stats), *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    st = json.loads(stats.read_text()) if stats.is_file() else {"exit": proc.returncode}
    if proc.returncode or st.get("exit"):
        raise SystemExit(f"failed: kvsurgeon {' '.join(argv)}\n{proc.stderr.decode()[-3000:]}")
    st["command"] = "kvsurgeon " + " ".join(argv)
    return st


def convert(args: list[str], out: Path) -> dict:
    # --measure off: the benchmark measures on its own data; the conversion's time and memory stay its own
    return run_measured(["convert", SOURCE, *args, "--out", str(out), "--overwrite", "--measure", "off"], out.parent / f"{out.name}.stats.json")


def _child(stats: str, argv: list[str]) -> None:
    from kvsurgeon.convert.cli import app

    t0 = time.time()
    code = 0
    try:
        # without standalone mode, click returns a typer.Exit's code instead of raising it
        code = int(app(argv, standalone_mode=False) or 0)
    except SystemExit as e:
        code = int(e.code or 0)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    Path(stats).write_text(json.dumps({
        "seconds": time.time() - t0, "exit": code,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "read_bytes": int(io["rchar"]), "written_bytes": int(io["wchar"]),
    }))


def evaluate(folder: Path | str, max_tokens: int, seq_len: int, reference_model=None):
    from kvsurgeon.convert.evaluation.perplexity import evaluate as ev, load_model

    model, path = load_model(str(folder))
    return ev(str(path), str(VALID), reference=SOURCE, max_tokens=max_tokens, seq_len=seq_len, progress=False,
              model=model, reference_model=reference_model)


def reference_model():
    from kvsurgeon.convert.evaluation.perplexity import load_model

    return load_model(SOURCE)[0]


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(**r) if "{" in fmt else str(r.get(fmt, "")) for _, fmt in cols) + " |")
    return "\n".join(lines)


def dump(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2:])
