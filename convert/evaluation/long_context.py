"""Long-context fidelity: passkey retrieval over a length x depth grid, and perplexity per position bucket.

A KV-cache conversion only pays off at long context, and short-window perplexity does not certify
it there (a calibrated MQA SmolLM2 at 1.99x ppl retrieved 0/5 passkeys). So this module measures
what a user serving long prompts would notice:

- **passkey**: a 5-digit key hidden at a depth of a filler text, then asked for. Scored with one
  forward over prompt + answer: a sample counts as retrieved when the argmax at every answer
  position is the answer token, which is exactly when greedy ``generate`` would emit the key
  (tests/test_long_context.py checks this against real ``generate``).
- **multikey**: several keys for named doors, one of them asked for; the depth is the asked key's.
  A miss whose first wrong token starts another door's key (``other_key``) is a model that still
  copies from far back but binds the wrong door: retrieval kept, the choice lost.
- **long perplexity**: windows of 2K-8K tokens, the next-token NLL averaged per position bucket
  (0-512, 512-1K, 1K-2K, ...), so one sees where a model degrades.

Prompts are generated (no download): the filler is built-in sentences or the user's own text, and the
keys come from a seeded generator, so the source and a conversion see identical prompts.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import KvSurgeonError, KvSurgeonWarning
from .perplexity import token_nll
from ..io.text_data import iter_texts

TASKS = ("passkey", "multikey", "long-ppl")
# The classic passkey filler (Mohtashami & Jaggi 2023): repetitive, so retrieval is all that is tested.
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEADER = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important info there.\n\n")
DOORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "silver", "golden")
SAMPLES_FOR_10_PERCENT = 10  # a cell of n samples resolves 1/n


class LongContextError(KvSurgeonError):
    pass


@dataclass
class LongContextOptions:
    """What to measure and how finely; the same options drive the CLI, ``convert --measure`` and benchmarks."""

    tasks: tuple[str, ...] = ("passkey",)
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # prompt tokens, each <= max_position_embeddings
    depths: int = 5  # evenly spaced from 0% to 100%
    samples: int = SAMPLES_FOR_10_PERCENT  # prompts per (length, depth) cell
    keys: int = 3  # multikey: keys hidden per prompt
    filler: str = "repeat"  # "repeat" (built-in sentences) or a data spec (.jsonl/.txt/.parquet/dataset id)
    text_field: str = "text"
    long_seq_len: int = 4096  # long-ppl window
    long_windows: int = 2  # long-ppl windows
    data: str | None = None  # long-ppl text (default: the built-in held-out text)
    seed: int = 0
    allow_beyond_context: bool = False

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise LongContextError(f"unknown long-context task {', '.join(bad)}; choose from {', '.join(TASKS)}")
        if self.depths < 1 or self.samples < 1 or self.keys < 1:
            raise LongContextError("--depths, --samples and --keys must be at least 1")
        if self.keys > len(DOORS):
            raise LongContextError(f"--keys {self.keys}: at most {len(DOORS)} keys per prompt")
        if not self.lengths and any(t in self.tasks for t in ("passkey", "multikey")):
            raise LongContextError("--lengths is empty: passkey and multikey need at least one prompt length, e.g. 1024,2048")
        if any(n < 64 for n in self.lengths):
            raise LongContextError(f"lengths {list(self.lengths)}: each must be at least 64 tokens")

    def depth_values(self) -> list[float]:
        return [0.0] if self.depths == 1 else [i / (self.depths - 1) for i in range(self.depths)]


def check_lengths(opts: LongContextOptions, max_positions: int | None, model_name: str = "the model") -> None:
    """Refuse lengths past the model's trained context unless the user overrides it, and thin cells."""
    longest = max([*opts.lengths, opts.long_seq_len if "long-ppl" in opts.tasks else 0])
    if max_positions and longest > max_positions and not opts.allow_beyond_context:
        raise LongContextError(
            f"length {longest} exceeds {model_name}'s max_position_embeddings ({max_positions}); "
            f"use lengths <= {max_positions}, or pass --allow-beyond-context to measure extrapolation"
        )
    if any(t in opts.tasks for t in ("passkey", "multikey")) and opts.samples < SAMPLES_FOR_10_PERCENT:
        warnings.warn(
            f"{opts.samples} samples per cell resolve only {100 / opts.samples:.0f}% steps; "
            f"use --samples {SAMPLES_FOR_10_PERCENT} or more to resolve 10%", KvSurgeonWarning, stacklevel=2,
        )


# ---- prompts --------------------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]  # prompt tokens, exactly the cell's length
    answer: list[int]  # the key's tokens
    length: int
    depth: float
    decoys: list[list[int]] = field(default_factory=list)  # multikey: the other doors' keys, tokenised as the answer


class FillerTokens:
    """An endless token stream of filler; each sample starts at its own offset so prompts differ."""

    def __init__(self, tokenizer, filler: str, text_field: str = "text", need: int = 0):
        if filler == "repeat":
            ids = tokenizer(REPEAT_FILLER * 8, add_special_tokens=False)["input_ids"]
            self.cyclic = True
        else:
            ids = []
            for text in iter_texts(filler, text_field):
                ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
                if len(ids) >= 4 * need:
                    break
            self.cyclic = False
            if len(ids) < need:
                raise LongContextError(
                    f"filler {filler!r} has {len(ids):,} tokens, fewer than the {need:,} the longest prompt needs; "
                    "pass a longer text, shorter --lengths, or --filler repeat"
                )
        self.ids = ids

    def take(self, n: int, rng: random.Random) -> list[int]:
        if self.cyclic:
            reps = n // len(self.ids) + 2
            start = rng.randrange(len(self.ids))
            return (self.ids * reps)[start : start + n]
        start = rng.randrange(len(self.ids) - n + 1)
        return self.ids[start : start + n]


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def make_prompt(tokenizer, filler: FillerTokens, length: int, depth: float, rng: random.Random, keys: int = 1) -> Prompt:
    """A prompt of exactly ``length`` tokens with the asked key's needle at ``depth`` of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    if keys == 1:
        key = _key(rng)
        needles = [enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")]
        question = enc(" What is the pass key? The pass key is")
        answer, decoys = enc(" " + key), []
        asked = 0
    else:
        doors = rng.sample(DOORS, keys)
        ks = [_key(rng) for _ in doors]
        needles = [enc(f" The pass key for the {d} door is {k}. Remember it. ") for d, k in zip(doors, ks)]
        asked = rng.randrange(keys)
        question = enc(f" What is the pass key for the {doors[asked]} door? The pass key for the {doors[asked]} door is")
        coded = [enc(" " + k) for k in ks]  # every key tokenised as the answer is: the asked one and its decoys
        answer, decoys = coded[asked], coded[:asked] + coded[asked + 1:]
    head = bos + enc(HEADER)
    n_fill = length - len(head) - sum(map(len, needles)) - len(question)
    if n_fill < 0:
        raise LongContextError(f"length {length} is too short for the passkey prompt ({length - n_fill} tokens without filler)")
    fill = filler.take(n_fill, rng)
    # The asked needle goes at `depth`; the other keys at random depths of their own.
    cuts = [round(depth * n_fill)] + [rng.randrange(n_fill + 1) for _ in range(keys - 1)]
    order = sorted(range(keys), key=lambda i: (cuts[i], i != asked))
    ids, pos = list(head), 0
    for i in order:
        ids += fill[pos : cuts[i]] + needles[i]
        pos = max(pos, cuts[i])
    ids += fill[pos:] + question
    assert len(ids) == length, (len(ids), length)
    return Prompt(ids=ids, answer=answer, length=length, depth=depth, decoys=decoys)


def prompt_grid(tokenizer, opts: LongContextOptions, keys: int) -> list[Prompt]:
    """All prompts of one task, in (length, depth, sample) order; the same options give the same prompts."""
    filler = FillerTokens(tokenizer, opts.filler, opts.text_field, need=max(opts.lengths))
    rng = random.Random(opts.seed * 1000 + keys)
    return [
        make_prompt(tokenizer, filler, n, d, rng, keys)
        for n in opts.lengths for d in opts.depth_values() for _ in range(opts.samples)
    ]


# ---- scoring --------------------------------------------------------------------------------------
def starts_other_key(argmax: list[int], first_miss: int | None, decoys: list[list[int]]) -> bool:
    """Whether greedy decoding, at its first wrong token, turns onto one of ``decoys``: up to and
    including that token (the teacher-forced argmax is greedy's output there) it spells a decoy."""
    if first_miss is None:
        return False
    said = argmax[: first_miss + 1]
    return any(d[: first_miss + 1] == said for d in decoys)


def answer_scores(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, A, V) logits at the answer positions, (B, A) answer ids -> (retrieved, answer log-prob) per row,
    and the (B, A) argmax ids.

    Retrieved means every position's argmax is the answer token: what greedy decoding would emit.
    """
    lp = F.log_softmax(logits.float(), dim=-1)
    top = lp.argmax(-1)
    return (top == answer).all(-1), lp.gather(-1, answer.unsqueeze(-1)).squeeze(-1).sum(-1), top


@torch.inference_mode()
def score_prompts(model, prompts: list[Prompt], batch_size: int = 1, desc: str = "passkey", progress: bool = True) -> list[dict]:
    """One forward per prompt (batched when prompt and answer lengths agree); logits only at the answer."""
    device = next(model.parameters()).device
    out: list[dict] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    i = 0
    while i < len(prompts):
        group = [prompts[i]]
        while (len(group) < batch_size and i + len(group) < len(prompts)
               and len(prompts[i + len(group)].ids) == len(group[0].ids)
               and len(prompts[i + len(group)].answer) == len(group[0].answer)):
            group.append(prompts[i + len(group)])
        a = len(group[0].answer)
        ids = torch.tensor([p.ids + p.answer[:-1] for p in group], device=device)
        logits = model(input_ids=ids, logits_to_keep=a).logits
        hit, logp, top = answer_scores(logits, torch.tensor([p.answer for p in group], device=device))
        for p, h, l, t in zip(group, hit.tolist(), logp.tolist(), top.tolist()):
            # The argmax at each answer position given the right tokens before it: up to and including the
            # first wrong token it is what greedy decoding says, so ``first_miss`` is where retrieval broke.
            miss = next((j for j, (x, y) in enumerate(zip(t, p.answer)) if x != y), None)
            row = {"length": p.length, "depth": p.depth, "retrieved": bool(h), "answer_logprob": float(l),
                   "argmax": t, "first_miss": miss}
            if p.decoys:
                row["other_key"] = starts_other_key(t, miss, p.decoys)
            out.append(row)
        i += len(group)
        bar.update(len(group))
    bar.close()
    return out


def grid_accuracy(rows: list[dict], lengths, depths) -> list[list[float]]:
    """Accuracy per (length, depth) cell, lengths as rows."""
    grid = []
    for n in lengths:
        line = []
        for d in depths:
            cell = [r["retrieved"] for r in rows if r["length"] == n and abs(r["depth"] - d) < 1e-9]
            line.append(sum(cell) / len(cell) if cell else float("nan"))
        grid.append(line)
    return grid


def bucket_edges(seq_len: int) -> list[int]:
    """0, 512, 1K, 2K, 4K, ... up to seq_len: fine where the short-window evals already look, coarse beyond."""
    edges = [0, 512]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return edges if seq_len > 512 else [0, seq_len]


def bucket_nll(nll: torch.Tensor, edges: list[int]) -> list[tuple[float, int]]:
    """(B, T-1) per-position NLL (position t predicts token t+1) -> (sum, count) per bucket of target position."""
    pos = torch.arange(1, nll.shape[1] + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (pos >= lo) & (pos < hi) if hi != edges[-1] else (pos >= lo)
        out.append((float(nll[:, m].double().sum()), int(m.sum()) * nll.shape[0]))
    return out


@torch.inference_mode()
def long_ppl(model, windows: torch.Tensor, edges: list[int], desc: str = "long-ppl", progress: bool = True) -> list[float]:
    """Perplexity per position bucket over (n, seq_len) windows, one window at a time (logits are large)."""
    device = next(model.parameters()).device
    sums = [[0.0, 0] for _ in edges[:-1]]
    for w in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = w.unsqueeze(0).to(device)
        nll = token_nll(model(input_ids=ids).logits, ids)
        for acc, (s, c) in zip(sums, bucket_nll(nll.cpu(), edges)):
            acc[0] += s
            acc[1] += c
    return [math.exp(s / c) if c else float("nan") for s, c in sums]


# ---- one model's report ---------------------------------------------------------------------------
@dataclass
class LongContextResult:
    model: str
    options: dict
    depths: list[float]
    passkey: list[list[float]] | None = None  # accuracy, lengths x depths
    multikey: list[list[float]] | None = None
    passkey_by_length: dict[str, float] = field(default_factory=dict)
    multikey_by_length: dict[str, float] = field(default_factory=dict)
    multikey_other_key_by_length: dict[str, float] = field(default_factory=dict)  # fraction starting another door's key
    # Mean log-probability of the whole key (nats, summed over its tokens) per length: continuous, so two models
    # scored on the same prompts compare far more finely than 10-30 prompts of accuracy do.
    passkey_logprob_by_length: dict[str, float] = field(default_factory=dict)
    multikey_logprob_by_length: dict[str, float] = field(default_factory=dict)
    long_ppl_buckets: list[str] | None = None  # "0-512", ...
    long_ppl: list[float] | None = None
    long_ppl_tokens: int = 0
    # Per prompt: length, depth, retrieved, answer_logprob, first_miss, other_key (multikey), and (from measure_long_context)
    # the key and what the model says in its place, as text.
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def as_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def _by_length(rows: list[dict], lengths, flag: str = "retrieved") -> dict[str, float]:
    """The mean of ``flag`` (a bool is a fraction) over each length's rows."""
    return {str(n): sum(r[flag] for r in rows if r["length"] == n) / max(1, sum(r["length"] == n for r in rows)) for n in lengths}


def long_ppl_windows(tokenizer, opts: LongContextOptions) -> torch.Tensor:
    from .perplexity import DEFAULT_EVAL_DATA
    from ..io.text_data import token_windows

    data = opts.data or str(DEFAULT_EVAL_DATA)
    need = opts.long_seq_len * opts.long_windows
    try:
        return token_windows(tokenizer, iter_texts(data, opts.text_field), opts.long_seq_len, need)
    except KvSurgeonError as e:
        raise LongContextError(f"long-ppl: {e}; pass a longer --data or lower --long-seq-len/--long-windows") from e


def measure_long_context(model, tokenizer, opts: LongContextOptions, name: str = "model",
                         batch_size: int = 1, progress: bool = True, windows: torch.Tensor | None = None) -> LongContextResult:
    """Run every task of ``opts`` on one loaded model."""
    depths = opts.depth_values()
    res = LongContextResult(model=name, options=asdict(opts), depths=depths)
    for task, keys in (("passkey", 1), ("multikey", opts.keys)):
        if task not in opts.tasks:
            continue
        prompts = prompt_grid(tokenizer, opts, keys)
        rows = score_prompts(model, prompts, batch_size, desc=f"{task} {name}", progress=progress)
        for p, r in zip(prompts, rows):
            r["key"], r["said"] = tokenizer.decode(p.answer).strip(), tokenizer.decode(r.pop("argmax")).strip()
        setattr(res, task, grid_accuracy(rows, opts.lengths, depths))
        setattr(res, f"{task}_by_length", _by_length(rows, opts.lengths))
        setattr(res, f"{task}_logprob_by_length", _by_length(rows, opts.lengths, "answer_logprob"))
        if task == "multikey":
            res.multikey_other_key_by_length = _by_length(rows, opts.lengths, "other_key")
        res.samples[task] = rows
    if "long-ppl" in opts.tasks:
        windows = long_ppl_windows(tokenizer, opts) if windows is None else windows
        edges = bucket_edges(opts.long_seq_len)
        res.long_ppl_buckets = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
        res.long_ppl = long_ppl(model, windows, edges, desc=f"long-ppl {name}", progress=progress)
        res.long_ppl_tokens = int(windows.numel() - windows.shape[0])
    return res


def iter_cells(res: LongContextResult, task: str) -> Iterator[tuple[int, float, float]]:
    grid = getattr(res, task)
    for n, line in zip(res.options["lengths"], grid or []):
        for d, acc in zip(res.depths, line):
            yield n, d, acc


def evaluate_long_context(model_name: str, opts: LongContextOptions, reference: str | None = None, dtype: str = "float32",
                          batch_size: int = 1, trust_remote_code: bool = False, progress: bool = True,
                          model=None, reference_model=None) -> list[LongContextResult]:
    """Load (or take) the model and optional reference, check lengths, and measure both on identical prompts."""
    from pathlib import Path

    from .perplexity import load_model, load_tokenizer
    from ..io.resolve import resolve_model

    path = Path(model_name) if model is not None and Path(model_name).is_dir() else resolve_model(model_name)
    ref_path = resolve_model(reference) if reference is not None else None
    tok = load_tokenizer(path, ref_path)
    for p, name in ((path, model_name), (ref_path, reference)):
        if p is not None:
            check_lengths(opts, _max_positions(p), name)
    if model is None:
        model, _ = load_model(model_name, dtype, trust_remote_code=trust_remote_code)
    windows = long_ppl_windows(tok, opts) if "long-ppl" in opts.tasks else None
    results = []
    if reference is not None:
        if reference_model is None:
            reference_model, _ = load_model(reference, dtype, trust_remote_code=trust_remote_code)
        results.append(measure_long_context(reference_model, tok, opts, _short(reference) + " (reference)", batch_size, progress, windows))
        del reference_model
    results.append(measure_long_context(model, tok, opts, _short(model_name), batch_size, progress, windows))
    return results


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1]


def _max_positions(folder) -> int | None:
    from kvsurgeon.attention.kv_cache import text_config

    from ..io.checkpoint import read_config

    cfg = text_config(read_config(folder))
    return cfg.get("max_position_embeddings")
