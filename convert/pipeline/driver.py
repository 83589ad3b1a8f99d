"""The streaming conversion driver shared by every converter.

resolve -> read config -> (calibration ids) -> for each layer: read only that layer's tensors,
optionally run calibration through it, transform its attention, write -> stream the remaining
tensors -> new config, tokenizer, generation config, model card -> validate -> atomic rename.

A converter supplies a ``Plan``: the new config and a function from one layer's neutral
attention (plus calibration inputs) to the tensors that replace it. ``convert_model`` runs the
steps in order (``_calibration_stream``, ``_copy_outside_layers``, ``_convert_layer`` per layer,
``_finish_folder``); ``check_output_loads`` is the last one: stock transformers loads the output
(and, below 2 GB, runs it once).
"""

from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kvsurgeon.attention import AttentionWeights, family_for, read_attention

from .calibration import CalibConfig, ConvertedStream, LayerStream, calibration_ids
from ..io.checkpoint import LazyCheckpoint, read_config
from ..errors import KvSurgeonError
from .preflight import check_coverage, check_source
from ..io.resolve import resolve_model
from ..io.safetensors_io import PlannedShardWriter, TensorSpec
from ..io.writer import atomic_output, copy_extras, parse_size, write_json

# (layer index, source attention in float32, calibration attention inputs (B, T, hidden) or None)
LayerTransform = Callable[[int, AttentionWeights, "torch.Tensor | None"], dict[str, torch.Tensor]]


@dataclass
class Plan:
    new_config: dict
    transform: LayerTransform
    needs_calibration: bool = False
    # Calibrate each layer on the converted model's own hidden states (layers 0..i-1 already
    # converted) instead of the source's: new_config must then name a transformers decoder layer.
    sequential: bool = False
    # Non-attention tensors are copied under the same name unless this maps them elsewhere;
    # None drops a tensor (e.g. one the transform already wrote in another form).
    rename: Callable[[str], "str | None"] = staticmethod(lambda name: name)
    # The card's "How it was converted". A callable is called when the card is written, after the last
    # layer, so it can state what the layers' transforms did (e.g. which attention transfers were undone).
    summary: "str | Callable[[], str]" = ""
    files: dict = field(default_factory=dict)  # extra JSON files for the output folder (e.g. a layer ranking)
    # Called once with the calibration token ids (windows, seq_len) before the first layer, for transforms
    # that read the text itself (e.g. where it repeats), not only its hidden states.
    on_calibration: "Callable[[torch.Tensor], None] | None" = None
    # Output tensors the source lacks, written as a copy of another source tensor: {new: source name}
    # (e.g. an untied lm_head from a tied embedding)
    copies: dict = field(default_factory=dict)

    def describe(self) -> str:
        return self.summary() if callable(self.summary) else self.summary


@dataclass
class ConvertOptions:
    out: Path
    overwrite: bool = False
    revision: str | None = None
    allow_pickle: bool = False
    max_shard_size: str = "2GB"
    dtype: str | None = None  # output dtype; None keeps the source's
    calib: CalibConfig = field(default_factory=CalibConfig)
    validate: bool = True
    progress: bool = True
    measure: str = "auto"  # auto | on | off: evaluate the output against the source before the rename (measure.py)


@dataclass
class ConvertResult:
    out: Path
    source: Path
    seconds: float
    layers: int
    bytes_written: int
    config: dict
    measured: object = None  # measure.Measured when convert --measure ran


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def convert_model(
    model: str, make_plan: Callable[[dict, LazyCheckpoint], Plan], opts: ConvertOptions, card: Callable[[Path, dict, Path, Plan], None] | None = None
) -> ConvertResult:
    """Resolve ``model``, plan its conversion, and write the output folder (atomically)."""
    t0 = time.time()
    src = resolve_model(model, revision=opts.revision, allow_pickle=opts.allow_pickle)
    config = read_config(src)
    fam = family_for(config)
    ckpt = LazyCheckpoint(src, allow_pickle=opts.allow_pickle)
    check_source(config, ckpt)  # preflight: nothing is written until the source, plan and coverage pass
    plan = make_plan(config, ckpt)
    plan_rename = plan.rename

    def rename(name: str) -> str | None:  # the family's legacy buffers have no place in any output
        return None if fam.is_legacy(name) else plan_rename(name)

    out_dtype_name, out_dtype = _output_dtype(opts, config)
    n_layers = config["num_hidden_layers"]
    stream = _calibration_stream(plan, opts, src, ckpt, config)
    layer_names = {i: [k for k in ckpt.keys() if k.startswith(fam.layer_prefix.format(i=i))] for i in range(n_layers)}
    in_layers = {k for names in layer_names.values() for k in names}

    new_config = _output_config(plan, out_dtype_name)
    specs, tied = planned_tensors(new_config, out_dtype)
    attn_all = {n for i in range(n_layers) for n in fam.attention_tensor_names(i, config)}
    check_coverage(ckpt, config, rename, attn_all, {s.name for s in specs}, tied)

    with atomic_output(opts.out, overwrite=opts.overwrite, protect=[src]) as tmp:
        writer = PlannedShardWriter(tmp, specs, parse_size(opts.max_shard_size), metadata={"converted_by": "kvsurgeon"})
        try:
            _copy_outside_layers(writer, ckpt, rename, in_layers, tied, plan.copies)
            for i in tqdm(range(n_layers), desc="convert", unit="layer", disable=not opts.progress):
                attn_names = set(fam.attention_tensor_names(i, config))
                others = [n for n in layer_names[i] if n not in attn_names]
                _convert_layer(i, writer, ckpt, config, plan, stream, rename, others)
            writer.finish()
        except ValueError as e:  # a tensor that does not fit the target config
            raise KvSurgeonError(f"internal error: the conversion produced a checkpoint its config cannot load: {e}") from e
        finally:
            writer.close()
            ckpt.close()
        _finish_folder(tmp, src, new_config, plan, card, opts.validate)
    return ConvertResult(Path(opts.out), src, time.time() - t0, n_layers, writer.total_bytes, new_config)


def _output_dtype(opts: ConvertOptions, config: dict) -> tuple[str, torch.dtype]:
    """The output dtype's name and torch dtype: ``opts.dtype``, else the source's."""
    name = opts.dtype or source_dtype(config)
    if name not in DTYPES:
        raise KvSurgeonError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name, DTYPES[name]


def _calibration_stream(plan: Plan, opts: ConvertOptions, src: Path, ckpt: LazyCheckpoint, config: dict):
    """The per-layer calibration inputs, if the plan needs any: through the converted layers
    (``ConvertedStream``, sequential plans) or the source's (``LayerStream``)."""
    if not plan.needs_calibration:
        return None
    from ..evaluation.perplexity import load_tokenizer

    ids = calibration_ids(load_tokenizer(src), opts.calib)
    if plan.on_calibration is not None:
        plan.on_calibration(ids)
    return ConvertedStream(ckpt, config, plan.new_config, ids) if plan.sequential else LayerStream(ckpt, config, ids)


def _output_config(plan: Plan, dtype_name: str) -> dict:
    new_config = dict(plan.new_config)
    new_config["dtype"] = dtype_name
    new_config.pop("torch_dtype", None)
    return new_config


def _copy_outside_layers(writer: PlannedShardWriter, ckpt: LazyCheckpoint, rename, in_layers: set[str], tied: set[str],
                         copies: dict) -> None:
    """Stream every tensor outside the decoder layers (renamed; tied ones are not stored), then the
    plan's extra copies the source lacks."""
    for name in ckpt.keys():
        new_name = rename(name)
        if name not in in_layers and new_name is not None and new_name not in tied:
            writer.write(new_name, ckpt.get_tensor(name))
    for new_name, name in copies.items():
        if new_name not in ckpt and new_name not in tied:
            writer.write(new_name, ckpt.get_tensor(name))


def _attention_inputs(stream, i: int) -> torch.Tensor | None:
    """Layer i's calibration attention inputs (windows, seq_len, hidden), positions from 0, or None."""
    if isinstance(stream, ConvertedStream):
        return stream.attention_input(i)
    if stream is None:
        return None
    layer = stream.layer_module(i)
    x = stream.attention_input(layer)
    # advance and free the float32 layer before the transform's own float64 work:
    # on an 8B layer that is ~0.9 GB less at the peak
    stream.advance(layer)
    del layer
    return x


def _convert_layer(i: int, writer: PlannedShardWriter, ckpt: LazyCheckpoint, config: dict, plan: Plan, stream, rename,
                   others: list[str]) -> None:
    """Layer i: its attention transformed and written, its other tensors (``others``) copied; a
    sequential stream then runs the converted layer to feed the next one."""
    attn = read_attention(ckpt, config, i)
    x = _attention_inputs(stream, i)
    converted = plan.transform(i, attn.to(torch.float32), x)
    for name, t in converted.items():
        writer.write(name, t)
    sequential = isinstance(stream, ConvertedStream)
    for name in others:
        new_name = rename(name)
        if new_name is not None:
            t = ckpt.get_tensor(name)
            writer.write(new_name, t)
            if sequential:  # the converted layer is rebuilt from these; otherwise free each at once
                converted[new_name] = t
            del t
    if sequential:
        stream.advance(i, converted)
    del converted
    release_memory()


def _finish_folder(tmp: Path, src: Path, new_config: dict, plan: Plan, card, validate: bool) -> None:
    """Config, the plan's extra files, the source's tokenizer and extras, the card; then the check
    that stock transformers loads and runs it."""
    write_json(tmp / "config.json", new_config)
    for fname, obj in plan.files.items():
        write_json(tmp / fname, obj)
    copy_extras(src, tmp)
    if card is not None:
        card(tmp, new_config, src, plan)
    if validate:
        check_output_loads(tmp)


def release_memory() -> None:
    """Hand freed heap back to the OS between layers. glibc keeps freed blocks of the dynamic mmap
    threshold's size in the heap, so one layer's float64 temporaries would otherwise stay resident
    and add to the next layer's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def planned_tensors(config: dict, dtype: torch.dtype) -> tuple[list[TensorSpec], set[str]]:
    """Every tensor stock transformers expects for ``config``, from a meta-device model (no memory),
    and the names it ties to another tensor (those are not stored)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(cfg, "tie_word_embeddings", False) else set()
    specs = []
    # names and shapes as checkpoints store them: transformers 5 holds MoE experts stacked in memory but
    # save_pretrained writes one tensor per expert (revert_weight_conversion; shapes only, on meta)
    from transformers.core_model_loading import revert_weight_conversion

    for name, t in revert_weight_conversion(model, model.state_dict()).items():
        if name in tied:
            continue
        specs.append(TensorSpec(name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype))
    return specs, tied


def check_output_loads(folder: Path, full_load_below: int = 2 * 2**30) -> None:
    """Stock transformers must load the output. Names and shapes were enforced while writing; here
    the config is parsed and, for models small enough, loaded for real and run once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.from_pretrained(folder)
    if LazyCheckpoint(folder).total_bytes() < full_load_below:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits = m(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
        if not torch.isfinite(logits).all():
            raise KvSurgeonError("converted model produces non-finite logits")
