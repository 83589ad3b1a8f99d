"""Model cards (README.md) for converted checkpoints.

The card states only what was measured: fidelity numbers come from the caller, and an empty list is rendered as
"not measured yet". The CardInfo is embedded as JSON in a trailing HTML comment so that `push` can re-render the
card later (e.g. with the final repo id) without the caller keeping any state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..errors import KvSurgeonError

logger = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
CONTEXT_TOKENS = 32768  # the KV section reports the cache size at this context length
_CARD_VERSION = 1
_MARKER = "kvsurgeon-card:"
_EMBED_RE = re.compile(r"<!--\s*" + re.escape(_MARKER) + r"\s*(\{.*?\})\s*-->", re.DOTALL)
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
# The Hub only accepts model ids in `base_model`; a local path there would make the card invalid.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelCardError(KvSurgeonError):
    """The model card or its embedded data cannot be used."""


@dataclass
class FidelityRow:
    """One measured comparison between the converted model and its source, on held-out text."""

    stage: str  # e.g. "after conversion", "after uptraining"
    data: str  # what was evaluated on, e.g. "wikitext-2 test"
    tokens: int
    ppl: float
    reference_ppl: float  # the source model's perplexity on the same tokens
    kl: float  # mean KL(reference || converted) per token
    top1_agreement: float  # fraction in [0, 1] of tokens where both models' argmax agree

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")
        if not 0.0 <= self.top1_agreement <= 1.0:
            raise ValueError(f"top1_agreement is a fraction in [0, 1], got {self.top1_agreement}")


@dataclass(kw_only=True)
class CardInfo:
    base_model: str  # Hub id or local path of the source checkpoint
    conversion: str  # kind: "gqa", "mqa", "mla", "hybrid", ...
    summary: str  # one paragraph: what was converted and how
    command: str | None = None  # the exact CLI command
    recipe: str | None = None  # YAML text of an uptrain recipe
    license: str | None = None  # copied from the source when known
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    # one sequence's cache at CONTEXT_TOKENS (windows and fixed states counted); None: per token x context
    kv_bytes_at_context_before: int | None = None
    kv_bytes_at_context_after: int | None = None
    fidelity: list[FidelityRow] = field(default_factory=list)
    long_context: list[dict] = field(default_factory=list)  # LongContextResult.as_dict(), reference first
    extra_tags: list[str] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)  # one line per engine (kvsurgeon.attention.serving)
    training_kernels: list[dict] = field(default_factory=list)  # uptraining: convert.kernels.LayerKernels rows

    def to_json_dict(self) -> dict[str, Any]:
        return {"version": _CARD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "CardInfo":
        data = dict(data)
        data.pop("version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            # Written by a newer kvsurgeon: keep what we understand rather than refusing the card.
            logger.warning("Ignoring unknown model card fields: %s", ", ".join(sorted(unknown)))
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["fidelity"] = [FidelityRow(**row) for row in kwargs.get("fidelity", [])]
        kwargs["extra_tags"] = list(kwargs.get("extra_tags", []))
        return cls(**kwargs)


# ---------------------------------------------------------------------------- rendering


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID_RE.match(name)) and not name.startswith((".", "/", "~"))


def _card_data(info: CardInfo) -> ModelCardData:
    """The card's YAML front matter, as the Hub defines it (``huggingface_hub.ModelCardData``; fields
    left None are not written). ``base_model`` only when it is a Hub id: the Hub rejects a local path."""
    hub = _is_hub_id(info.base_model)
    return ModelCardData(
        base_model=info.base_model if hub else None,
        base_model_relation="finetune" if hub else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.license or None,
        tags=[t for t in ("kvsurgeon", info.conversion, *info.extra_tags) if t],  # repeats dropped, order kept
    )


def _fence(text: str, lang: str) -> str:
    # A fence longer than any backtick run inside the text, so the block cannot be closed early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}\n"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def _kv_section(info: CardInfo) -> str:
    before, after = info.kv_bytes_per_token_before, info.kv_bytes_per_token_after
    at_before = info.kv_bytes_at_context_before if info.kv_bytes_at_context_before is not None else before * CONTEXT_TOKENS
    at_after = info.kv_bytes_at_context_after if info.kv_bytes_at_context_after is not None else after * CONTEXT_TOKENS
    lines = [
        "## KV cache\n",
        f"| | KV cache bytes per token | KV cache at {CONTEXT_TOKENS // 1024}K context |",
        "|---|---:|---:|",
        f"| source | {before:,} | {_mib(at_before)} |",
        f"| this model | {after:,} | {_mib(at_after)} |",
        "",
    ]
    if before > 0:
        change = (1.0 - after / before) * 100.0
        if change >= 0:
            lines.append(f"Reduction: **{change:.1f}%** fewer KV cache bytes per token.")
        else:
            lines.append(f"Note: the KV cache is **{-change:.1f}% larger** than the source's.")
    else:
        lines.append("Reduction: not available (the source's KV cache size is unknown).")
    if at_before > 0 and abs(at_after / at_before - after / max(before, 1)) > 1e-3:  # windows / fixed states
        lines.append(f"At {CONTEXT_TOKENS // 1024}K context: **{(1.0 - at_after / at_before) * 100.0:.1f}%** smaller "
                     "(sliding-window layers keep at most their window; linear layers a fixed state).")
    lines.append(f"Sizes are per sequence, for {CONTEXT_TOKENS:,} tokens, batch size 1.")
    return "\n".join(lines) + "\n"


def _num(x: float, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fidelity_section(info: CardInfo) -> str:
    head = "## Measured fidelity\n\n"
    if not info.fidelity:
        return head + "Not measured yet: no fidelity measurements were recorded for this checkpoint.\n"
    lines = [
        "Compared with the source model on the same tokens.\n",
        "| Stage | Data | Tokens | PPL | Source PPL | KL to source | Top-1 agreement |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in info.fidelity:
        lines.append(
            f"| {_cell(row.stage)} | {_cell(row.data)} | {row.tokens:,} | {_num(row.ppl, 3)} "
            f"| {_num(row.reference_ppl, 3)} | {_num(row.kl, 4)} | {_num(row.top1_agreement * 100, 2)}% |"
        )
    return head + "\n".join(lines) + "\n"


def _long_context_section(info: CardInfo) -> str:
    head = "## Long context\n\n"
    if not info.long_context:
        return head + "Not measured yet: run `kvsurgeon eval MODEL --reference SOURCE --tasks passkey,multikey,long-ppl`.\n"
    from ..evaluation.long_context import LongContextResult
    from ..evaluation.report import markdown

    return head + "Retrieval and perplexity by position, measured against the source on the same prompts.\n\n" + markdown(
        [LongContextResult(**row) for row in info.long_context]
    )


def _kernels_section(info: CardInfo) -> str:
    """The kernel each layer type's uptraining forward passes reached (recorded by the run, not inferred)."""
    rows = ["## Uptraining kernels\n\n", "| layer type | layers | kernel | fused | device |\n", "|---|---|---|---|---|\n"]
    for r in info.training_kernels:
        rows.append(f"| {r['layer_type']} | {r['layers']} | {_cell(r['kernel'])} | {'yes' if r['fused'] else 'no'} | {r['device']} |\n")
    return "".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _embed(info: CardInfo) -> str:
    # "--" may not appear inside an HTML comment; escaping it keeps the JSON valid and the comment closed.
    payload = json.dumps(info.to_json_dict(), ensure_ascii=True, sort_keys=True).replace("--", "-\\u002d")
    return f"<!-- {_MARKER} {payload} -->\n"


def model_card(info: CardInfo, repo_id: str | None = None) -> ModelCard:
    """The model card (``huggingface_hub.ModelCard``) of a converted checkpoint: front matter from
    ``_card_data``, body rendered here; `repo_id` fills the loading snippet when known."""
    kind = info.conversion.upper()
    title = repo_id.split("/")[-1] if repo_id else f"{Path(info.base_model).name or info.base_model} ({kind})"
    if _is_hub_id(info.base_model):
        source = f"[{info.base_model}](https://huggingface.co/{info.base_model})"
    else:
        source = f"`{info.base_model}`"
    parts = [
        f"\n# {title}\n",
        f"\n{source} with its attention converted to **{kind}** by kvsurgeon to shrink the KV cache. "
        "It is saved as a stock transformers model class: no custom code is needed.\n",
        "\n## How it was converted\n\n",
        info.summary.strip() + "\n",
    ]
    if info.command:
        parts += ["\nCommand:\n\n", _fence(info.command, "bash")]
    if info.recipe:
        parts += ["\nUptraining recipe:\n\n", _fence(info.recipe, "yaml")]
    if not info.command and not info.recipe:
        parts.append("\nThe exact command was not recorded.\n")
    parts += ["\n", _kv_section(info), "\n", _fidelity_section(info), "\n", _long_context_section(info)]
    if info.serving:
        parts += ["\n## Serving\n\n", *(f"- {line}\n" for line in info.serving)]
    if info.training_kernels:
        parts += ["\n", _kernels_section(info)]
    load_from = repo_id or "path/to/this/folder"
    parts += [
        "\n## Loading\n\n",
        _fence(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{load_from}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")',
            "python",
        ),
        "\n",
        _embed(info),
    ]
    return ModelCard(f"---\n{_card_data(info).to_yaml()}\n---\n" + "".join(parts))


def render_model_card(info: CardInfo, repo_id: str | None = None) -> str:
    """README.md text for a converted checkpoint (``model_card`` as text)."""
    return str(model_card(info, repo_id=repo_id))


# ---------------------------------------------------------------------------- files


def write_model_card(folder: str | Path, info: CardInfo, repo_id: str | None = None) -> Path:
    """Write README.md into `folder` and return its path."""
    path = Path(folder) / CARD_FILENAME
    model_card(info, repo_id=repo_id).save(path)
    return path


def read_card_info(folder: str | Path) -> CardInfo | None:
    """The CardInfo embedded in `folder`/README.md, or None if there is no README or it was not written by us."""
    path = Path(folder) / CARD_FILENAME
    if not path.is_file():
        return None
    matches = _EMBED_RE.findall(path.read_text(encoding="utf-8"))
    if not matches:
        return None
    try:
        return CardInfo.from_json_dict(json.loads(matches[-1]))
    except (ValueError, TypeError) as e:
        raise ModelCardError(
            f"{path} has kvsurgeon card data that cannot be read ({e}). "
            "Re-create the card with `write_model_card` or delete the `<!-- kvsurgeon-card: ... -->` line."
        ) from e


def refresh_model_card(folder: str | Path, repo_id: str) -> bool:
    """Re-render README.md from its embedded CardInfo with the final repo id; False if there is nothing to refresh.

    Suitable as `push_folder(..., refresh_card=refresh_model_card)`.
    """
    info = read_card_info(folder)
    if info is None:
        return False
    write_model_card(folder, info, repo_id=repo_id)
    return True


def _front_matter_of(text: str) -> dict[str, Any] | None:
    text = text.lstrip("\ufeff")
    if not _FRONT_MATTER_RE.match(text):
        return None  # no metadata block (checked first: ModelCard would log a warning for it)
    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError):
        return None  # a broken source card should not stop a conversion; we just don't know the license


def _source_folder(config_or_folder: Any) -> Path | None:
    if isinstance(config_or_folder, (str, Path)):
        candidate = str(config_or_folder)
    else:
        candidate = getattr(config_or_folder, "_name_or_path", None) or getattr(config_or_folder, "name_or_path", None)
        if not candidate:
            return None
    path = Path(candidate).expanduser()
    if path.is_dir():
        return path
    if _is_hub_id(candidate):
        # A Hub id: use the README from the local cache if it was downloaded; never reach the network here.
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(candidate, CARD_FILENAME)
        except Exception:
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def source_license(config_or_folder: Any) -> str | None:
    """The license in the source's README.md front matter, or None when unknown.

    Accepts a checkpoint folder, a Hub id (looked up in the local cache only), or a transformers config whose
    `_name_or_path` points at one of those.
    """
    folder = _source_folder(config_or_folder)
    if folder is None:
        return None
    readme = folder / CARD_FILENAME
    if not readme.is_file():
        return None
    meta = _front_matter_of(readme.read_text(encoding="utf-8", errors="replace"))
    license_ = meta.get("license") if meta else None
    return license_.strip() if isinstance(license_, str) and license_.strip() else None
