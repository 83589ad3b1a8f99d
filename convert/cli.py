"""The ``kvsurgeon`` command line."""

from __future__ import annotations

import json
import sys
import typing
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kvsurgeon.attention import UnsupportedArchitectureError
from kvsurgeon.attention.reference import RopeTableError

from .errors import KvSurgeonError, KvSurgeonWarning
from .token_counts import parse_token_counts

app = typer.Typer(
    help="Rewrite the attention of Hugging Face LLM checkpoints to shrink or remove the KV cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_ = Console()
err = Console(stderr=True)


def fail(e: Exception) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


# ---- convert -------------------------------------------------------------------------------------
def convert(
    model: str = typer.Argument(..., help="source: Hub model id or local folder"),
    out: Path = typer.Option(..., "--out", help="output folder (written atomically)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the source"),
    max_shard_size: str = typer.Option("2GB", help="largest output shard, e.g. 2GB, 500MB"),
    dtype: Optional[str] = typer.Option(None, help="output dtype: float32 | bfloat16 | float16 (default: the source's)"),
    allow_pickle: bool = typer.Option(False, help="allow reading *.bin pickle weights (can run code)"),
    push_to_hub: Optional[str] = typer.Option(None, help="push the result to this Hub repo id"),
    measure: str = typer.Option(
        "auto", help="evaluate the output against the source on built-in held-out text before writing the card: "
        "512-window ppl/KL, passkey at 1K-2K, ppl by position. auto: on when cheap (<= 500M parameters on CPU, "
        "~1.5 min for SmolLM2-135M on 2 cores; <= 8B on CUDA) | on | off",
    ),
    **conversion,  # every ConversionSpec field, as the flags _with_spec_options declares
) -> None:
    """Convert MODEL's attention and write a stock transformers checkpoint to --out."""
    from .pipeline.spec import ConversionSpec, run_conversion
    from .pipeline.driver import ConvertOptions

    try:
        spec = ConversionSpec(**conversion)
        opts = ConvertOptions(
            out=out, overwrite=overwrite, revision=revision, allow_pickle=allow_pickle,
            max_shard_size=max_shard_size, dtype=dtype, measure=measure,
        )
        res = run_conversion(model, spec, opts)
    except (KvSurgeonError, UnsupportedArchitectureError, RopeTableError) as e:
        fail(e)
    out_console = err if push_to_hub else out_
    out_console.print(
        f"wrote {res.out} ({res.bytes_written / 2**20:.1f} MiB, {res.layers} layers) in {res.seconds:.1f}s", highlight=False
    )
    if res.measured is not None:
        out_console.print(f"measured against the source: {res.measured.note}", highlight=False)
    elif measure != "off":
        out_console.print("not measured (--measure auto skips models this size); run `kvsurgeon eval` or pass --measure on", highlight=False)
    from kvsurgeon.attention.serving import serving_support

    for e in serving_support(res.config):
        out_console.print(f"served by {e.describe()}", highlight=False, soft_wrap=True)
    if push_to_hub:
        _push(res.out, push_to_hub)


def _with_spec_options(fn):
    """Give ``fn`` (which takes ``**conversion``) one typer option per ConversionSpec field, so the
    flags, their defaults and help text are the spec's own."""
    import inspect as _inspect

    from .pipeline.spec import spec_cli_params

    sig = _inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params = own[:1]  # the MODEL argument, then the spec's options, then output and I/O
    for name, tp, default, flag, help in spec_cli_params():
        args = typing.get_args(tp)
        if type(None) in args:  # typer wants Optional[X], not X | None
            tp = Optional[next(a for a in args if a is not type(None))]
        panel = "Calibration" if name.startswith("calib") or name == "text_field" else "Conversion"
        params.append(_inspect.Parameter(name, _inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=tp,
                                         default=typer.Option(default, flag, help=help, rich_help_panel=panel)))
    fn.__signature__ = sig.replace(parameters=params + own[1:])
    return fn


app.command()(_with_spec_options(convert))


def spec_from_argv(argv: list[str]):
    """The ConversionSpec that ``kvsurgeon convert ARGV`` would run, parsed by the real command
    (nothing runs): for scripts that build a plan themselves, and for the round-trip tests."""
    from dataclasses import fields

    from .pipeline.spec import ConversionSpec

    cmd = typer.main.get_command(app).commands["convert"]
    params = cmd.make_context("convert", list(argv)).params
    return ConversionSpec(**{f.name: params[f.name] for f in fields(ConversionSpec)})


# ---- inspect -------------------------------------------------------------------------------------
@app.command()
def inspect(
    model: str = typer.Argument(..., help="Hub model id or local folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    allow_pickle: bool = typer.Option(False, help="allow reading *.bin pickle weights"),
) -> None:
    """Layer types, KV heads and KV-cache bytes per token and at 4K/32K/128K context."""
    from kvsurgeon.attention.serving import EngineSupport

    from .inspect_model import group_layers, human_bytes, inspect_model

    try:
        r = inspect_model(model, revision=revision, allow_pickle=allow_pickle)
    except (KvSurgeonError, UnsupportedArchitectureError, ValueError) as e:
        fail(e)
    if as_json:
        print(json.dumps(r.as_dict(), indent=2))
        return
    out_.print(f"[bold]{r.model}[/]  ({r.path})", highlight=False)
    out_.print(
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
            human_bytes(l["fixed_values"] * r.bytes_per_value + l["fixed_fp32_values"] * 4) if l["fixed_values"] else "-",
        )
    out_.print(t)
    s = Table(title=f"KV cache, batch 1, {r.dtype}")
    s.add_column("per token", justify="right")
    for ctx in r.kv_cache_bytes:
        s.add_column(f"{int(ctx) // 1024}K context", justify="right")
    s.add_row(f"{r.kv_bytes_per_token:,} B", *(human_bytes(b) for b in r.kv_cache_bytes.values()))
    out_.print(s)
    for e in r.serving:
        out_.print(f"served by {EngineSupport(**{**e, 'notes': tuple(e['notes'])}).describe()}", highlight=False, soft_wrap=True)


# ---- eval ----------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Hub model id or local folder to evaluate (any causal LM, stock class or not)"),
    data: Optional[str] = typer.Option(None, "--data", help="ppl/long-ppl text: .jsonl/.txt/.parquet file or HF dataset id (default: built-in held-out Python docs)"),
    reference: Optional[str] = typer.Option(None, help="reference model (usually the source): KL and top-1, and the same long-context prompts side by side"),
    tasks: str = typer.Option(
        "ppl", help="comma-separated: ppl (short windows), passkey, multikey, long-ppl (ppl per position bucket); 'all' for every task. "
        "Cost: one forward per prompt; passkey = lengths x depths x samples prompts per model (SmolLM2-135M fp32 on 2 CPU cores: ~2.5 s at 1K, ~10 s at 4K)",
    ),
    max_tokens: int = typer.Option(16384, help="ppl: tokens to evaluate (whole windows)"),
    seq_len: int = typer.Option(512, help="ppl: window length"),
    lengths: str = typer.Option("1024,2048,4096", help="passkey/multikey: prompt lengths in tokens (1K, 2K... accepted)"),
    depths: int = typer.Option(5, help="passkey/multikey: key depths, evenly spaced from 0% to 100%"),
    samples: int = typer.Option(10, help="passkey/multikey: prompts per (length, depth) cell; 10 resolves 10%"),
    keys: int = typer.Option(3, help="multikey: keys hidden per prompt (one is asked for)"),
    filler: str = typer.Option("repeat", help="passkey filler: 'repeat' (built-in sentences) or your own text file/dataset"),
    long_seq_len: int = typer.Option(4096, help="long-ppl: window length (reported per 0-512, 512-1K, 1K-2K, ... bucket)"),
    long_windows: int = typer.Option(2, help="long-ppl: number of windows"),
    allow_beyond_context: bool = typer.Option(False, help="allow lengths past max_position_embeddings (extrapolation)"),
    png: Optional[Path] = typer.Option(None, help="long-context heatmap PNG (accuracy by length x depth, reference beside model)"),
    seed: int = typer.Option(0, help="seed for keys and filler offsets"),
    batch_size: int = typer.Option(1),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 | auto"),
    text_field: str = typer.Option("text", help="text field of jsonl/parquet/dataset rows"),
    split: str = typer.Option("validation", help="split, for HF dataset ids"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object; long context lists every prompt's "
                                 "key, what the model says in its place, and the first wrong token (first_miss)"),
    trust_remote_code: bool = typer.Option(False, help="allow custom modeling code from the model repo"),
) -> None:
    """Fidelity of MODEL: short-window perplexity and, against --reference, KL and top-1 agreement;
    long-context retrieval (passkey, multikey) over a length x depth grid and perplexity by position."""
    from .evaluation.perplexity import evaluate
    from .evaluation.long_context import TASKS, LongContextOptions, evaluate_long_context

    try:
        want = [t.strip() for t in tasks.split(",") if t.strip()]
        if want == ["all"]:
            want = ["ppl", *TASKS]
        unknown = [t for t in want if t != "ppl" and t not in TASKS]
        if unknown:
            raise KvSurgeonError(f"--tasks: unknown {', '.join(unknown)}; choose from ppl, {', '.join(TASKS)}, all")
        long_tasks = tuple(t for t in want if t in TASKS)
        # the options first, so a bad --lengths is refused before the short-window ppl is spent
        opts = LongContextOptions(
            tasks=long_tasks, lengths=parse_token_counts(lengths, "--lengths"), depths=depths, samples=samples, keys=keys,
            filler=filler, text_field=text_field, long_seq_len=long_seq_len, long_windows=long_windows,
            data=data, seed=seed, allow_beyond_context=allow_beyond_context,
        ) if long_tasks else None
        r = None
        if "ppl" in want:
            r = evaluate(
                model, data, reference=reference, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                dtype=dtype, text_field=text_field, split=split, trust_remote_code=trust_remote_code,
            )
        long = evaluate_long_context(model, opts, reference, dtype, batch_size, trust_remote_code) if opts else None
    except (KvSurgeonError, UnsupportedArchitectureError) as e:
        fail(e)
    if png is not None and long:
        from .evaluation.report import heatmap_png

        heatmap_png(long, png)
        err.print(f"wrote {png}", highlight=False)
    if as_json:
        # the short-window fields stay at the top level (as before long context existed); long context under its own key
        print(json.dumps({**(r.as_dict() if r else {}), **({"long_context": [x.as_dict(with_samples=True) for x in long]} if long else {})}, indent=2))
        return
    if r is not None:
        _print_ppl(r)
    if long:
        _print_long(long)


def _print_ppl(r) -> None:
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
    out_.print(t)


def _print_long(results) -> None:
    from .evaluation.report import extra_lines, summary_rows

    head, rows = summary_rows(results)
    o = results[0].options
    t = Table(title=f"long context: {len(results[0].depths)} depths x {o['samples']} samples per length")
    for i, c in enumerate(head):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    out_.print(t)
    for extra in extra_lines(results):
        out_.print(extra, highlight=False)


# ---- uptrain -------------------------------------------------------------------------------------
@app.command()
def uptrain(
    recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. optim.lr=3e-4"),
    resume: bool = typer.Option(False, help="continue from the newest checkpoint in the recipe's output"),
    push_to_hub: Optional[str] = typer.Option(None, help="push the final model to this Hub repo id"),
) -> None:
    """Convert (per the recipe) and distil from the source; same runner as scripts/uptrain.py."""
    from .train.recipe import load_recipe
    from .train.uptrain import uptrain as run

    try:
        r, text = load_recipe(recipe, list(overrides or []))
        if push_to_hub:
            r.push_to_hub = push_to_hub
        final = run(r, text, resume=resume)
    except KvSurgeonError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(130 if str(e).startswith("interrupted") else 2)
    out_.print(f"done: {final}", highlight=False)


# ---- push ----------------------------------------------------------------------------------------
def _push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None, message: str | None = None) -> None:
    from .hub.model_card import refresh_model_card
    from .hub.publish import push_folder

    try:
        url = push_folder(
            folder, repo_id, private=private, revision=revision, commit_message=message, refresh_card=refresh_model_card
        )
    except KvSurgeonError as e:
        fail(e)
    out_.print(f"pushed {folder} -> {url}", highlight=False)


@app.command()
def push(
    folder: Path = typer.Argument(..., help="converted checkpoint folder"),
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. my-org/SmolLM2-135M-MLA"),
    private: bool = typer.Option(False, help="create the repo as private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to (created if missing)"),
    commit_message: Optional[str] = typer.Option(None, help="commit message"),
) -> None:
    """Validate FOLDER, refresh its model card and upload it (token from HF_TOKEN or a cached login)."""
    _push(folder, repo_id, private, revision, commit_message)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """kvsurgeon's own warnings as one readable line; anyone else's as Python prints them."""
    if issubclass(category, KvSurgeonWarning):
        err.print(f"[bold yellow]warning:[/] {message}", highlight=False)
    else:
        _default(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
