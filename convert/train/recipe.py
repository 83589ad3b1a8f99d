"""Uptraining recipes: YAML -> typed, validated dataclasses (plus ``key=value`` overrides).

One file names everything a run needs: the source, the conversion (same options as
``kvsurgeon convert``), data, token budget, stages, optimiser, distillation, precision, eval,
output and push. Unknown keys and bad values fail with the path of the offending key. ``base:``
names another recipe file whose keys this one inherits (``merge_recipe``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..pipeline.spec import ConversionSpec
from ..errors import KvSurgeonError
from .estimate import HardwareCfg
from .kernels import KernelChoice


class RecipeError(KvSurgeonError):
    pass


@dataclass
class DataCfg:
    train: str = ""  # .jsonl/.txt/.parquet or HF dataset id
    text_field: str = "text"
    split: str = "train"
    streaming: bool = True
    seq_len: int = 512
    eval: str | None = None  # held-out data for eval; None skips eval
    eval_split: str = "validation"
    eval_tokens: int = 8192
    # Fraction of training windows given long-range "access code" facts restated at the window's end
    # (calibration.retrieval_window): the teacher copies the code, so distillation trains retrieval.
    retrieval: float = 0.0
    # Of those windows, the fraction whose asked fact sits in the window's first 10%: the copy then
    # spans the whole window (at 4K, the distance uptrained MQA misses). 0 keeps uniform depths.
    retrieval_far: float = 0.0
    # Facts stated in each retrieval window (up to 8): each asked code is a choice among them, so more
    # facts make the choice harder (the multikey eval's misses copy another fact's code).
    retrieval_facts: int = 3
    # How many of a retrieval window's facts are restated at its end, one sentence each: every
    # restated code is a choice among the facts, so each window trains that choice this many times.
    retrieval_asks: int = 1


@dataclass
class StageCfg:
    name: str = ""  # default: "end_to_end" for a lone stage, "stage-N" for the Nth of several
    tokens: int = 0  # this stage's share of the budget
    trainable: Literal["new", "attention", "all", "lora"] = "attention"
    lr: float | None = None  # default: optim.lr
    # default: data.seq_len. Stages with rising lengths are a curriculum: retrieval over 2K, then 4K;
    # the data continues where the previous stage stopped.
    seq_len: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimCfg:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # "stage": each stage warms up and decays on its own (a curriculum's later stage re-warms to the
    # peak); "run": one warm-up at the start and one decay across every stage's steps, which a later
    # stage continues. Each stage has its own optimiser either way (their trainable sets may differ).
    schedule_span: Literal["stage", "run"] = "stage"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class DistillCfg:
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    # KL weight of the restated code's tokens in retrieval windows (data.retrieval), relative to every
    # other token's 1: in a plain mean those few copied tokens are ~0.3% of a 2K window's loss.
    answer_weight: float = 1.0
    # KL weight of the code's first token alone (None: answer_weight). Uptrained MQA's 4K misses are
    # that token: the leading digit, which picks the fact; the digits after it copy on their own.
    lead_weight: float | None = None
    # Cross-entropy on the restated code's true tokens (mean over them), added to the KL. The source
    # copies the wrong one of several facts often (multikey, SmolLM2: 40-65%), and the KL teaches that doubt.
    answer_ce: float = 0.0


@dataclass
class Recipe:
    source: str = ""
    output: str = ""
    conversion: ConversionSpec | None = None  # the same keys as `kvsurgeon convert`'s flags; None: student: only
    student: str | None = None  # an already-converted folder; skips the conversion
    data: DataCfg = field(default_factory=DataCfg)
    stages: list[StageCfg] = field(default_factory=lambda: [StageCfg()])
    optim: OptimCfg = field(default_factory=OptimCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    batch_size: int = 1
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where native, else fp32 (precision.py)
    gradient_checkpointing: bool = False
    # CPU: refuse a run whose step is estimated not to fit in the host's available memory (train/memory.py)
    memory_check: bool = True
    # auto: the fused kernels transformers binds on CUDA (FlashAttention-2, mamba_ssm, fla), PyTorch
    # elsewhere; fused: demand them (error naming what to install); torch: PyTorch paths everywhere
    kernels: KernelChoice = "auto"
    hardware: HardwareCfg | None = None  # GPU recipes: the hardware and time they are sized for
    eval_every: int = 0  # steps; 0: only before and after
    # Passkey prompts scored after training at the last stage's seq_len, on the student and the source
    # (one per depth, 0-100%), logged, put on the model card and warned about when retrieval collapsed.
    # None: 5 when data.retrieval is set and the length holds a prompt, else 0 (off).
    eval_passkey: int | None = None
    save_every: int = 50  # steps between resumable checkpoints
    keep_checkpoints: int = 2
    seed: int = 0  # torch/random, and which training windows carry retrieval facts and which facts
    push_to_hub: str | None = None
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still spans the budget

    def stage_seq_len(self, stage: StageCfg) -> int:
        return stage.seq_len or self.data.seq_len

    def tokens_per_step(self, stage: StageCfg) -> int:
        """Tokens one process trains on per optimiser step of ``stage``."""
        return self.batch_size * self.grad_accum * self.stage_seq_len(stage)

    def stage_steps(self, processes: int = 1) -> list[int]:
        """Optimiser steps per stage. Stage tokens are the job's global budget: with N processes each
        step trains on N x tokens_per_step distinct tokens, so there are N times fewer steps."""
        return [max(1, s.tokens // (self.tokens_per_step(s) * processes)) for s in self.stages]

    def validate(self) -> "Recipe":
        errs = []
        if not self.source:
            errs.append("source: required (Hub id or folder of the model to convert and distil from)")
        if not self.output:
            errs.append("output: required (folder for checkpoints, metrics and the final model)")
        if not self.data.train:
            errs.append("data.train: required (.jsonl/.txt/.parquet file or HF dataset id)")
        if self.data.seq_len < 2:
            errs.append(f"data.seq_len: must be >= 2, got {self.data.seq_len}")
        if not 0.0 <= self.data.retrieval <= 1.0:
            errs.append(f"data.retrieval: a fraction of training windows, between 0 and 1, got {self.data.retrieval}")
        # the options that act on retrieval windows: each refused out of its range, and when set without them
        from ..pipeline.calibration import MAX_RETRIEVAL_FACTS, RETRIEVAL_FACTS

        d, far, lead, asks = self.distill, self.data.retrieval_far, self.distill.lead_weight, self.data.retrieval_asks
        facts = self.data.retrieval_facts
        facts_ok = isinstance(facts, int) and 1 <= facts <= MAX_RETRIEVAL_FACTS
        for name, value, bad, allowed, is_set, what, off in (
            ("data.retrieval_far", far, not 0.0 <= far <= 1.0, "a fraction of retrieval windows, between 0 and 1",
             far != 0, "places the facts of retrieval windows", "leave retrieval_far at 0"),
            ("data.retrieval_facts", facts, not facts_ok, f"an integer from 1 to {MAX_RETRIEVAL_FACTS} (one item each)",
             facts != RETRIEVAL_FACTS, "sets the facts of retrieval windows", f"leave retrieval_facts at {RETRIEVAL_FACTS}"),
            ("data.retrieval_asks", asks, facts_ok and not (isinstance(asks, int) and 1 <= asks <= facts),
             f"an integer from 1 to the {facts} facts of a retrieval window (data.retrieval_facts)",
             asks != 1, "restates facts of retrieval windows", "leave retrieval_asks at 1"),
            ("distill.answer_weight", d.answer_weight, d.answer_weight <= 0, "must be > 0 (1 = the plain mean)",
             d.answer_weight != 1.0, "weighs the answers of retrieval windows", "leave answer_weight at 1"),
            ("distill.lead_weight", lead, lead is not None and lead <= 0, "must be > 0 (or null: the answer_weight)",
             lead is not None, "weighs the first answer token of retrieval windows", "leave lead_weight null"),
            ("distill.answer_ce", d.answer_ce, d.answer_ce < 0, "must be >= 0 (0 = off)",
             d.answer_ce != 0, "trains on the codes of retrieval windows", "leave answer_ce at 0"),
        ):
            if bad:
                errs.append(f"{name}: {allowed}, got {value}")
            elif is_set and not self.data.retrieval:
                errs.append(f"{name}: {what}, but data.retrieval is 0; set data.retrieval (e.g. 0.5) or {off}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                errs.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.stages:
            errs.append("stages: at least one stage is needed")
        for i, s in enumerate(self.stages):
            s.name = s.name or ("end_to_end" if len(self.stages) == 1 else f"stage-{i + 1}")
        names = [s.name for s in self.stages]
        for i, s in enumerate(self.stages):
            # the metrics, the figure's stage marks and the card tell stages apart by name
            if (first := names.index(s.name)) < i:
                errs.append(f"stages[{i}].name: {s.name!r} is also stages[{first}]'s name; give each stage its own "
                            f"name (e.g. {s.name}-{i + 1}), as the metrics tell stages apart by it")
            if s.seq_len is not None and s.seq_len < 2:
                errs.append(f"stages[{i}].seq_len: must be >= 2 (or unset for data.seq_len), got {s.seq_len}")
            elif s.tokens < self.tokens_per_step(s):
                errs.append(
                    f"stages[{i}].tokens: {s.tokens} is less than one optimiser step "
                    f"({self.tokens_per_step(s)} = batch_size x grad_accum x seq_len)"
                )
            if s.lr is not None and s.lr <= 0:
                errs.append(f"stages[{i}].lr: must be > 0")
        if self.optim.lr <= 0:
            errs.append(f"optim.lr: must be > 0, got {self.optim.lr}")
        if self.distill.temperature <= 0:
            errs.append(f"distill.temperature: must be > 0, got {self.distill.temperature}")
        if self.distill.kl_weight < 0 or self.distill.ce_weight < 0 or self.distill.kl_weight + self.distill.ce_weight == 0:
            errs.append("distill: kl_weight and ce_weight must be >= 0 and not both 0")
        if self.save_every < 1:
            errs.append("save_every: must be >= 1")
        if self.eval_passkey is not None and not (isinstance(self.eval_passkey, int) and self.eval_passkey >= 0):
            errs.append(f"eval_passkey: a number of prompts, >= 0 (0: off; null: 5 with data.retrieval), got {self.eval_passkey}")
        if self.hardware is not None:
            errs += self.hardware.problems(sum(s.tokens for s in self.stages))
        if self.conversion is None and not self.student:
            errs.append("conversion: set to: gqa/mqa/mla/hybrid (and its options), or give student: (an already-converted folder)")
        if errs:
            raise RecipeError("invalid recipe:\n  " + "\n  ".join(errs))
        return self


# keys older recipes used -> their replacement (named in the unknown-key error)
RENAMED = {"attn_implementation": "kernels"}


# ---- dict -> dataclass, strictly ---------------------------------------------------------------
def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = [RENAMED[key]] if key in RENAMED and RENAMED[key] in fields else difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown key {path + key!r}{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, path + key)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{path + missing[0]!r}: required")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except KvSurgeonError as e:  # a spec's own validation (e.g. --to mla needs --kv-lora-rank)
        raise RecipeError(f"{path.rstrip('.') or 'recipe'}: {e}") from e


def _coerce(tp, value: Any, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of the allowed types")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise RecipeError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``optim.lr=3e-4``, ``stages.0.tokens=100000``: values parse as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


# A conversion is one unit: a child recipe's block replaces its base's whole, so an MLA base's ranks never
# leak into a hybrid child.
WHOLE_SECTIONS = ("conversion",)


def merge_recipe(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, lists and scalars replace, and the
    ``conversion`` block replaces as a whole."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in WHOLE_SECTIONS:
            out[key] = _merge_mapping(out[key], value)
        else:
            out[key] = value
    return out


def _merge_mapping(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        out[key] = _merge_mapping(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_recipe_data(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One recipe file's mapping, with its ``base:`` chain (paths relative to the file) resolved."""
    if not p.is_file():
        via = f" (the base of {seen[-1]})" if seen else ""
        raise RecipeError(f"recipe {p} does not exist{via}")
    if p.resolve() in seen:
        chain = " -> ".join(str(s) for s in (*seen, p.resolve()))
        raise RecipeError(f"recipe bases form a cycle: {chain}; remove one 'base:' key")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of keys (source, conversion, data, ...), got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{p}: 'base' is the path of another recipe file, got {base!r}")
    return merge_recipe(_read_recipe_data(p.parent / base, (*seen, p.resolve())), data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, str]:
    """Returns the validated recipe and the YAML text actually used: ``base:`` resolved (so a run records
    every value it trained with), then overrides applied."""
    data = _read_recipe_data(Path(path))
    data = apply_overrides(data, overrides or [])
    recipe = _build(Recipe, data, "").validate()
    return recipe, yaml.safe_dump(data, sort_keys=False)


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "").validate()
