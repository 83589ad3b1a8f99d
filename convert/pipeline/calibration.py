"""Calibration activations, one decoder layer at a time.

The source model is never built with weights: transformers builds the whole model from its config
on the meta device (no memory), and each decoder layer is taken from it, filled with that layer's
tensors from the lazy checkpoint, run on the calibration hidden states, and dropped. Memory holds one layer plus the (windows x seq_len x hidden) activations.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from kvsurgeon.attention import FAMILIES, embedding_scale, family_for, sliding_windows
from kvsurgeon.attention.families import layer_types
from kvsurgeon.attention.reference import causal_mask

from ..io.checkpoint import LazyCheckpoint
from ..errors import KvSurgeonError
from ..io.text_data import BUILTIN_DATA, iter_texts, token_windows

# Shipped with the package so calibration works offline with no arguments (PSF-licensed Python docs).
DEFAULT_CALIB = BUILTIN_DATA / "calibration.jsonl"


@dataclass
class CalibConfig:
    data: str | None = None  # None: the built-in text
    tokens: int = 8192
    seq_len: int = 512
    text_field: str = "text"
    split: str = "train"
    windows_per_text: int | None = None  # at most this many windows' worth of tokens from each text; None: no cap
    retrieval: float = 0.0  # fraction of windows given long-range retrieval pairs (retrieval_window)

    def source(self) -> str:
        return self.data or str(DEFAULT_CALIB)


def calibration_ids(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    per_text = cfg.windows_per_text * cfg.seq_len if cfg.windows_per_text else None
    ids = token_windows(tokenizer, iter_texts(cfg.source(), cfg.text_field, cfg.split), cfg.seq_len, cfg.tokens, per_text=per_text)
    if not 0.0 <= cfg.retrieval <= 1.0:
        raise KvSurgeonError(f"--calib-retrieval {cfg.retrieval}: a fraction of windows, between 0 and 1")
    n = round(cfg.retrieval * ids.shape[0])
    if n:
        rng = random.Random(0)
        for w in range(0, ids.shape[0], max(1, ids.shape[0] // n))[:n]:  # spread over the windows
            ids[w] = torch.tensor(retrieval_window(tokenizer, ids[w].tolist(), rng))
    return ids


# Phrasing deliberately unlike the passkey eval's ("pass key", "door"), so calibration teaches the
# mechanism (find an earlier fact, copy it) rather than the benchmark's sentence.
_ITEMS = ("vault", "archive", "server room", "garden shed", "locker", "studio", "warehouse", "cabin")


RETRIEVAL_FACTS = 3  # facts per retrieval window (calibration's; training may ask for up to len(_ITEMS))
MAX_RETRIEVAL_FACTS = len(_ITEMS)  # each fact names a different item


def retrieval_window(tokenizer, ids: list[int], rng: random.Random, facts: int = RETRIEVAL_FACTS) -> list[int]:
    """The window's own text with ``facts`` "access code" sentences at random depths and, at its end,
    one of them restated in full: the source's attention then reaches back across the window to copy
    the code, so calibration sees (and weighs) the long-range retrieval its fits must keep."""
    return retrieval_window_with_answer(tokenizer, ids, rng, facts)[0]


def retrieval_window_with_answer(tokenizer, ids: list[int], rng: random.Random, facts: int = RETRIEVAL_FACTS,
                                 far: float = 0.0, asks: int = 1) -> tuple[list[int], tuple[range, ...]]:
    """``retrieval_window`` (same tokens, same draws from ``rng``) and the positions of each restated
    code's tokens: the ones only a copy from far back predicts (none when the window is left as text).

    ``far``: the chance that the (first) asked fact is moved into the window's first 10%, so the copy
    spans at least ~90% of the window (uniform depths put it there about one time in eight).
    ``asks``: how many distinct facts are restated at the end, one "Reminder" sentence each: every
    one is a choice among the window's facts, so a window teaches that choice ``asks`` times.
    Training-only; ``far=0, asks=1`` draw nothing extra, so calibration's windows are unchanged."""
    if not 1 <= facts <= MAX_RETRIEVAL_FACTS:
        raise ValueError(f"facts {facts}: between 1 and {MAX_RETRIEVAL_FACTS} (one item each)")
    if not 1 <= asks <= facts:
        raise ValueError(f"asks {asks}: between 1 and the window's {facts} facts")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    items = rng.sample(_ITEMS, facts)
    codes = [str(rng.randint(1000, 99999)) for _ in items]
    needles = [enc(f" The access code for the {it} is {c}. ") for it, c in zip(items, codes)]
    k = rng.randrange(facts)
    asked = [k] + (rng.sample([i for i in range(facts) if i != k], asks - 1) if asks > 1 else [])
    # Each reminder is encoded on its own (the first exactly as calibration always has), so each
    # code's span is found in its own sentence.
    tails = [enc(f" Reminder: the access code for the {items[i]} is {codes[i]}.") for i in asked]
    room = len(ids) - sum(map(len, tails)) - sum(map(len, needles))
    if room < len(ids) // 4:  # window too short for the facts to be far apart: leave it as text
        return ids, ()
    cuts = sorted(rng.randrange(int(0.8 * room)) for _ in needles)
    placed = list(zip(cuts, needles))
    if far and rng.random() < far:
        # The asked needle takes a cut in the first 10%; the others keep their order and cuts.
        others = [nd for i, nd in enumerate(needles) if i != k]
        placed = sorted([(rng.randrange(max(1, room // 10)), needles[k])] + list(zip(cuts[1:], others)), key=lambda p: p[0])
    out, pos = [], 0
    for c, nd in placed:
        out += ids[pos:c] + nd
        pos = c
    out += ids[pos:room]
    spans = []
    for i, tail in zip(asked, tails):
        spans.append(_code_span(tokenizer, tail, items[i], len(out)))
        out += tail
    return out, tuple(spans)


def _code_span(tokenizer, tail: list[int], item: str, offset: int) -> range:
    """Positions of the code in one reminder sentence ``tail`` that starts at ``offset``."""
    prefix = tokenizer(f" Reminder: the access code for the {item} is", add_special_tokens=False)["input_ids"]
    # The code starts where the sentence's prefix ends, if the tokenizer splits there, else the whole
    # sentence counts as the answer.
    start = len(prefix) if tail[: len(prefix)] == prefix else 0
    end = len(tail) - 1 if tail[-1:] == tokenizer(".", add_special_tokens=False)["input_ids"] else len(tail)  # the period is not copied
    # A tokenizer that splits digits (SmolLM2, Qwen) emits the space before the code as a token of its
    # own; any sentence predicts it, so the answer (and distill.lead_weight's first token) starts at
    # the code's first character, the token that picks which fact is copied.
    while start < end - 1 and not tokenizer.decode(tail[start : start + 1]).strip():
        start += 1
    return range(offset + start, offset + end)


class _Skeleton:
    """The whole transformers model for a config, built by ``AutoModelForCausalLM.from_config`` on the
    meta device: no weights and no memory, but the library's own choice of decoder-layer and RoPE
    modules for every layer. Calibration materialises one layer at a time from it."""

    def __init__(self, config_dict: dict):
        from transformers import AutoConfig, AutoModelForCausalLM

        fam = FAMILIES.get(config_dict["model_type"])
        self.cfg = AutoConfig.for_model(**config_dict)
        attn = fam.attn_impl if fam else "sdpa"  # eager where sdpa drops a feature (Gemma-2's soft cap)
        with torch.device("meta"):
            self.decoder = AutoModelForCausalLM.from_config(self.cfg, attn_implementation=attn).get_decoder()

    def rope(self):
        """The model's rotary embedding, built for real (its inverse frequencies computed on the CPU)."""
        return type(self.decoder.rotary_emb)(config=self.cfg)

    def meta_layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i, still on the meta device (a copy: the skeleton never holds weights)."""
        return copy.deepcopy(self.decoder.layers[i])

    def layer(self, i: int, state: dict[str, torch.Tensor], dtype, where: str, fam=None) -> torch.nn.Module:
        """Decoder layer i with ``state`` (its tensors, names relative to the layer) as its weights."""
        return _materialise(self.meta_layer(i), i, state, dtype, where, fam)


def _materialise(layer: torch.nn.Module, i: int, state: dict[str, torch.Tensor], dtype, where: str, fam=None):
    """Assign ``state`` to a meta-device decoder layer: the tensors become its weights, with no second copy."""
    if fam is not None and fam.experts is not None:  # MoE: stored per expert, held stacked by the module
        state = fam.experts.module_state(state)
    missing, unexpected = layer.load_state_dict({k: t.to(dtype) for k, t in state.items()}, strict=False, assign=True)
    if missing or unexpected:
        raise KvSurgeonError(f"layer {i} of {where} does not match its config: missing {missing}, unexpected {unexpected}")
    return layer.eval()


def _embedded(ckpt: LazyCheckpoint, ids: torch.Tensor, rope, dtype, config_dict: dict | None = None):
    """Layer 0's input hidden states for ids (B, T), with RoPE position embeddings for positions 0..T-1
    (a dict by layer type when the model has a RoPE per layer type, as Gemma-3)."""
    emb = ckpt.get_tensor("model.embed_tokens.weight")
    hidden = emb[ids].to(dtype)  # gather first: never a float32 copy of the whole table
    del emb
    if config_dict is not None and family_for(config_dict).embed_scale:
        # as the model does it: the scale rounded to the embedding dtype (Gemma), or a multiplier (Granite)
        hidden = hidden * torch.tensor(embedding_scale(config_dict), dtype=dtype)
    pos = torch.arange(ids.shape[1])[None]
    if "layer_type" in inspect.signature(rope.forward).parameters:
        types = sorted(set(layer_types(config_dict)))
        return hidden, {t: tuple(x.to(dtype) for x in rope(hidden, pos, t)) for t in types}, pos
    return hidden, tuple(t.to(dtype) for t in rope(hidden, pos)), pos


def _layer_kwargs(config_dict: dict, position_embeddings, position_ids, i: int, T: int, dtype, eager: bool) -> dict:
    """Keyword arguments running decoder layer i as the full model would: its layer type's RoPE, and an
    explicit causal mask when the layer's window cuts into T tokens or the attention is eager (which,
    unlike sdpa, applies no causal mask by itself)."""
    pe = position_embeddings
    if isinstance(pe, dict):
        pe = pe[layer_types(config_dict)[i]]
    kw = dict(position_embeddings=pe, position_ids=position_ids)
    window = sliding_windows(config_dict).get(i)
    if eager or (window and window < T):
        hidden = causal_mask(T, window if window and window < T else None)
        kw["attention_mask"] = torch.zeros(1, 1, T, T, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)
    return kw


class LayerStream:
    """Walks the source's decoder layers over calibration ids, yielding each layer's attention input.

    ``for i, x in stream: ...`` gives x = input_layernorm(h_i) of shape (B, T, hidden) in float32;
    the hidden states then advance through the *source* layer i.
    """

    def __init__(self, ckpt: LazyCheckpoint, config_dict: dict, ids: torch.Tensor, dtype=torch.float32):
        self.ckpt = ckpt
        self.config_dict = config_dict
        self.fam = family_for(config_dict)
        self.skeleton = _Skeleton(config_dict)
        self.dtype = dtype
        self.ids = ids
        self.hidden, self.position_embeddings, self.position_ids = _embedded(
            ckpt, ids, self.skeleton.rope(), dtype, config_dict)

    def layer_module(self, i: int):
        prefix = self.fam.layer_prefix.format(i=i)
        state = {k[len(prefix):]: self.ckpt.get_tensor(k) for k in self.ckpt.keys() if k.startswith(prefix)}
        return self.skeleton.layer(i, state, self.dtype, str(self.ckpt.folder), self.fam)

    @torch.inference_mode()
    def attention_input(self, layer) -> torch.Tensor:
        return layer.input_layernorm(self.hidden) if self.fam.input_norm else self.hidden.clone()

    @torch.inference_mode()
    def advance(self, layer) -> None:
        kw = _layer_kwargs(self.config_dict, self.position_embeddings, self.position_ids, layer.self_attn.layer_idx,
                           self.hidden.shape[1], self.dtype, self.fam.attn_impl == "eager")
        self.hidden = layer(self.hidden, **kw)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(self.config_dict["num_hidden_layers"]):
            layer = self.layer_module(i)
            yield i, self.attention_input(layer)
            self.advance(layer)
            del layer


class ConvertedStream:
    """Calibration hidden states on the *converted* model's own path (GPTQ-style sequential
    calibration): layer i is calibrated on what the already-converted layers 0..i-1 produce, so its
    fits see, and can compensate for, the drift those layers introduced.

    ``attention_input(i)`` gives x = input_layernorm(h_i) (B, T, hidden) in float32, reading only the
    source's input norm; ``advance(i, tensors)`` runs transformers' own decoder layer of the *target*
    config, built from the converted layer's tensors (output names), on h_i. Nothing but the norm is
    read from the source twice.
    """

    def __init__(self, ckpt: LazyCheckpoint, source_config: dict, target_config: dict, ids: torch.Tensor, dtype=torch.float32):
        self.ckpt = ckpt
        self.dtype = dtype
        self.fam = family_for(source_config)
        self.source = _Skeleton(source_config)
        self.target = _Skeleton(target_config)
        self.target_config = target_config
        self.target_fam = FAMILIES.get(target_config["model_type"])
        self.hidden, self.position_embeddings, self.position_ids = _embedded(
            ckpt, ids, self.target.rope(), dtype, source_config)

    @torch.inference_mode()
    def attention_input(self, i: int) -> torch.Tensor:
        if not self.fam.input_norm:
            return self.hidden.clone()
        layer = self.source.meta_layer(i)
        prefix = self.fam.layer_prefix.format(i=i) + "input_layernorm."
        norm = {k[len(prefix):]: self.ckpt.get_tensor(k).to(self.dtype) for k in self.ckpt.keys() if k.startswith(prefix)}
        layer.input_layernorm.load_state_dict(norm, assign=True)
        return layer.input_layernorm(self.hidden)

    @torch.inference_mode()
    def advance(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """tensors: every tensor of converted layer i under its output name (model.layers.{i}.*)."""
        prefix = f"model.layers.{i}."
        state = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        layer = self.target.layer(i, state, self.dtype, "the converted checkpoint", self.target_fam)
        if self.target_fam is None:  # MLA / hybrid classes: one RoPE, no windows
            kw = dict(position_embeddings=self.position_embeddings, position_ids=self.position_ids)
        else:
            kw = _layer_kwargs(self.target_config, self.position_embeddings, self.position_ids, i, self.hidden.shape[1],
                               self.dtype, self.target_fam.attn_impl == "eager")
        self.hidden = layer(self.hidden, **kw)
