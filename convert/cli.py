"""The ``kvsurgeon`` command line."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kvsurgeon.attention import UnsupportedArchitectureError

from .errors import KvSurgeonError

app = typer.Typer(
    help="Rewrite the attention of Hugging Face LLM checkpoints to shrink or remove the KV cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


# ---- inspect -------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: str = typer.Argument(..., help="Hub model id or local folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    allow_pickle: bool = typer.Option(False, help="allow reading *.bin pickle weights"),
) -> None:
    """Layer types, KV heads and KV-cache bytes per token and at 4K/32K/128K context."""
    from .inspect_model import group_layers, human_bytes, inspect_model

    try:
        r = inspect_model(model, revision=revision, allow_pickle=allow_pickle)
    except (KvSurgeonError, UnsupportedArchitectureError, ValueError) as e:
        fail(e)
    if as_json:
        print(json.dumps(r.as_dict(), indent=2))
        return
    out.print(f"[bold]{r.model}[/]  ({r.path})", highlight=False)
    out.print(
        f"architecture {r.architecture} (model_type {r.model_type}), {r.num_layers} layers, "
        f"{r.parameters:,} parameters, dtype {r.dtype}",
        highlight=False,
    )
    t = Table(title="attention layers")
    for c in ("layers", "type", "KV heads", "head dim", "values/token", "fixed state"):
        t.add_column(c, justify="right" if c != "type" else "left")
    for span, l in group_layers(r.layers):
        t.add_row(
            span,
            l["kind"] + (f" (window {l['window']})" if l.get("window") else ""),
            str(l["kv_heads"] if l["kv_heads"] is not None else "-"),
            str(l["head_dim"] if l["head_dim"] is not None else "-"),
            str(l["values_per_token"]),
            human_bytes(l["fixed_values"] * (r.kv_bytes_per_token // max(r.kv_values_per_token, 1) or 2)) if l["fixed_values"] else "-",
        )
    out.print(t)
    s = Table(title=f"KV cache, batch 1, {r.dtype}")
    s.add_column("per token", justify="right")
    for ctx in r.kv_cache_bytes:
        s.add_column(f"{int(ctx) // 1024}K context", justify="right")
    s.add_row(f"{r.kv_bytes_per_token:,} B", *(human_bytes(b) for b in r.kv_cache_bytes.values()))
    out.print(s)


# ---- eval ----------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Hub model id or local folder to evaluate"),
    data: str = typer.Option(..., "--data", help=".jsonl/.txt/.parquet file or HF dataset id"),
    reference: Optional[str] = typer.Option(None, help="reference model (usually the source) for KL and top-1"),
    max_tokens: int = typer.Option(16384, help="tokens to evaluate (whole windows)"),
    seq_len: int = typer.Option(512, help="window length"),
    batch_size: int = typer.Option(1),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 | auto"),
    text_field: str = typer.Option("text", help="text field of jsonl/parquet/dataset rows"),
    split: str = typer.Option("validation", help="split, for HF dataset ids"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    trust_remote_code: bool = typer.Option(False, help="allow custom modeling code from the model repo"),
) -> None:
    """Perplexity on fixed windows; with --reference, KL(reference||model) and top-1 agreement."""
    from .evaluate import evaluate

    try:
        r = evaluate(
            model, data, reference=reference, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
            dtype=dtype, text_field=text_field, split=split, trust_remote_code=trust_remote_code,
        )
    except (KvSurgeonError, UnsupportedArchitectureError) as e:
        fail(e)
    if as_json:
        print(json.dumps(r.as_dict(), indent=2))
        return
    t = Table(title=f"eval on {r.data}: {r.windows} x {r.seq_len} tokens ({r.tokens:,} predicted)")
    for c in ("model", "ppl", "KL(ref||model)", "top-1 agree", "KV bytes/token"):
        t.add_column(c, justify="left" if c == "model" else "right")
    if r.reference is not None:
        t.add_row(r.reference + " (reference)", f"{r.reference_ppl:.3f}", "-", "-", f"{r.reference_kv_bytes_per_token:,}")
    t.add_row(
        r.model,
        f"{r.ppl:.3f}",
        f"{r.kl:.4f}" if r.kl is not None else "-",
        f"{r.top1_agreement:.3%}" if r.top1_agreement is not None else "-",
        f"{r.kv_bytes_per_token:,}",
    )
    out.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
