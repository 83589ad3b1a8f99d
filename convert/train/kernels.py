"""Which kernels uptraining runs per layer type, how to ask for them, and what was actually used.

transformers binds the fused kernels itself (transformers 5.2x):

* softmax layers through ``attn_implementation`` (``model.config._attn_implementation``):
  ``flash_attention_2`` (package flash-attn, CUDA) or ``sdpa`` (PyTorch; on CUDA torch picks its
  flash / memory-efficient / math backend per call) or ``eager``;
* linear layers through module-level functions decorated with
  ``use_kernel_func_from_hub_with_fallback(name, package)``: when ``package`` imports *at the time the
  modeling module is imported*, the wrapper calls the package's function, else the PyTorch function it
  wraps. Mamba2 (``GraniteMoeHybridMambaLayer``) trains through ``mamba2_split_conv1d_scan_combined``
  (mamba_ssm, one fused conv + scan + gated norm + out-proj) and otherwise ``causal_conv1d_fn`` +
  ``mamba2_chunk_scan``; Gated DeltaNet (``Qwen3_5GatedDeltaNet``, ``Qwen3NextGatedDeltaNet``) through
  ``causal_conv1d_fn`` (causal-conv1d) + ``torch_chunk_gated_delta_rule`` (flash-linear-attention).

The binding is per process and ignores the device, so a machine with the packages installed would
hand CPU tensors to Triton kernels. :class:`KernelRecorder` therefore sits on those module functions
for the length of a run: with ``torch`` it calls the PyTorch function, and either way it records the
implementation each call actually reached, which is what the metrics and the model card report.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import KvSurgeonError
from ..padded_sdpa import sdpa_for

KernelChoice = Literal["auto", "fused", "torch"]
KERNEL_CHOICES: tuple[str, ...] = ("auto", "fused", "torch")

# layer type -> (import names the fused path needs, pip distribution names) for the readable error
FUSED_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "softmax": (("flash_attn",), "flash-attn (pip install flash-attn --no-build-isolation)"),
    "mamba2": (("mamba_ssm", "causal_conv1d"), "mamba-ssm and causal-conv1d (pip install mamba-ssm causal-conv1d)"),
    "gated_deltanet": (("fla", "causal_conv1d"), "flash-linear-attention and causal-conv1d (pip install flash-linear-attention causal-conv1d)"),
}


class KernelError(KvSurgeonError):
    pass


@dataclass(frozen=True)
class Availability:
    """What this process could bind: CUDA, and which kernel packages import."""

    cuda: bool
    packages: frozenset[str]

    @classmethod
    def detect(cls) -> "Availability":
        names = {p for need, _ in FUSED_PACKAGES.values() for p in need}
        return cls(torch.cuda.is_available(), frozenset(n for n in names if importlib.util.find_spec(n) is not None))

    def has(self, layer_type: str) -> bool:
        return self.cuda and all(p in self.packages for p in FUSED_PACKAGES[layer_type][0])


def resolve(choice: str, avail: Availability | None = None) -> str:
    """``auto`` -> ``fused`` on CUDA, ``torch`` without; ``fused`` without CUDA is an error."""
    if choice not in KERNEL_CHOICES:
        raise KernelError(f"kernels: {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    avail = avail or Availability.detect()
    if choice == "auto":
        return "fused" if avail.cuda else "torch"
    if choice == "fused" and not avail.cuda:
        raise KernelError("kernels: fused needs a CUDA device (none found); use kernels: auto or torch on this machine")
    return choice


def layer_types_of(config: dict) -> Counter:
    """Layer types a checkpoint's config declares, counted (before any model is built)."""
    mt = config.get("model_type", "")
    types_ = config.get("layer_types") or ["full_attention"] * int(config.get("num_hidden_layers", 0))
    if mt == "granitemoehybrid":
        names = {"mamba": "mamba2", "attention": "softmax"}
    elif mt in ("qwen3_5", "qwen3_5_text", "qwen3_next"):
        names = {"linear_attention": "gated_deltanet"}
    else:
        names = {}
    return Counter(names.get(t, "softmax") for t in types_)


def attn_implementation(choice: str, avail: Availability | None = None, config=None) -> str:
    """What to pass to ``from_pretrained``: FlashAttention-2 when fused and installed, else SDPA (padded to
    one head width where ``config``'s values are narrower, so PyTorch's fused CPU kernel runs)."""
    avail = avail or Availability.detect()
    if resolve(choice, avail) == "fused" and avail.has("softmax"):
        return "flash_attention_2"
    return sdpa_for(config) if config is not None else "sdpa"


def require_fused(choice: str, configs: list[dict], avail: Availability | None = None) -> None:
    """``kernels: fused`` demands every layer type's package: name the missing ones and the fix."""
    if choice != "fused":
        return
    avail = avail or Availability.detect()
    resolve(choice, avail)  # no CUDA: says so
    need = Counter()
    for c in configs:
        need.update(layer_types_of(c))
    missing = [f"{t} layers ({n}): {FUSED_PACKAGES[t][1]}" for t, n in sorted(need.items()) if not avail.has(t)]
    if missing:
        raise KernelError("kernels: fused, but these fused kernels are not installed:\n  " + "\n  ".join(missing)
                          + "\ninstall them, or set kernels: auto to use the fused kernels that are present and PyTorch for the rest")


# ---- what a run actually used -------------------------------------------------------------------
def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not getattr(fn, "__closure__", None):
        return {}
    return {n: c.cell_contents for n, c in zip(code.co_freevars, fn.__closure__)}


def _hub_inner(fn):
    """With the `kernels` package (a transformers dependency from 5.25) a module-level kernel name is a
    hub-replaceable nn.Module whose forward closes over the function as `func`: that function, else None."""
    return _closure(type(fn).forward).get("func") if isinstance(fn, torch.nn.Module) else None


def _fallback_parts(fn) -> dict | None:
    """The closure of transformers' ``use_kernel_func_from_hub_with_fallback`` wrapper: the bound
    ``implementation`` and the ``torch_function`` it replaces; None for any other function."""
    inner = _hub_inner(fn)
    parts = _closure(inner if inner is not None else fn)
    return parts if {"implementation", "torch_function"} <= set(parts) else None


def _package(impl) -> str:
    mod = getattr(impl, "__module__", "") or ""
    return "torch" if mod.startswith("transformers.") else mod.split(".")[0]


def _layer_type(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    if name.endswith("MambaLayer") or name.endswith("Mamba2Mixer"):
        return "mamba2"
    if name.endswith("GatedDeltaNet"):
        return "gated_deltanet"
    if name.endswith("Attention") and hasattr(module, "config"):
        return "softmax"
    return None


@dataclass
class LayerKernels:
    """One layer type of one model: how many layers, and the kernel the run reached."""

    layer_type: str  # softmax | mamba2 | gated_deltanet
    layers: int
    kernel: str  # e.g. flash_attention_2, sdpa, mamba_ssm, causal_conv1d+fla, torch
    fused: bool
    device: str
    calls: dict[str, str] = dataclasses.field(default_factory=dict)  # linear layers: function -> package


class KernelRecorder:
    """Sits on the fallback-wrapped kernel functions of the given models' linear layers for a run.

    ``mode="torch"`` sends every call to transformers' PyTorch function (even where a package was
    bound); ``"fused"`` calls the bound implementation. Each call records function -> package, so
    :meth:`report` states what the forward passes reached, not what imports."""

    def __init__(self, mode: str, models: list[torch.nn.Module]):
        if mode not in ("fused", "torch"):
            raise KernelError(f"KernelRecorder takes a resolved mode (fused/torch), got {mode!r}")
        self.mode = mode
        self.models = models
        self.called: dict[tuple[str, str], str] = {}  # (modeling module, function) -> package reached
        self._saved: list[tuple[object, str, object]] = []

    def _targets(self):
        """(modeling module, function name, layer type) for every fallback function a linear layer calls."""
        seen = set()
        for model in self.models:
            for m in model.modules():
                lt = _layer_type(m)
                if lt in (None, "softmax") or type(m) in seen:
                    continue
                seen.add(type(m))
                mod = sys.modules[type(m).__module__]
                names = list(inspect.unwrap(type(m).forward).__code__.co_names)
                # transformers >= 5.25 calls helpers (causal_conv1d_forward, mamba2_scan_forward) that call
                # the fallback functions by the module's global names: follow them one level
                for n in list(names):
                    f = getattr(mod, n, None)
                    inner = _hub_inner(f)
                    if inner is not None and _fallback_parts(f) is None and getattr(inner, "__module__", None) == mod.__name__:
                        names += inner.__code__.co_names
                for n in dict.fromkeys(names):
                    if _fallback_parts(getattr(mod, n, None)) is not None:
                        yield mod, n

    def install(self) -> "KernelRecorder":
        for mod, name in self._targets():
            wrapper = getattr(mod, name)
            parts = _fallback_parts(wrapper)
            torch_fn, impl = parts["torch_function"], parts["implementation"]
            use_torch = self.mode == "torch"
            key = (mod.__name__, name)
            target = torch_fn if use_torch else wrapper
            package = "torch" if use_torch else _package(impl)

            def shim(*args, _target=target, _key=key, _package=package, **kwargs):
                out = _target(*args, **kwargs)
                # mamba2_split_conv1d_scan_combined's PyTorch stand-in returns None: the layer then takes
                # its unfused path, so that call did no work and is not a kernel the run used
                if out is not None:
                    self.called[_key] = _package
                return out

            shim.__wrapped__ = wrapper
            self._saved.append((mod, name, wrapper))
            setattr(mod, name, shim)
        return self

    def remove(self) -> None:
        while self._saved:
            mod, name, fn = self._saved.pop()
            setattr(mod, name, fn)

    def __enter__(self) -> "KernelRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def report(self, model: torch.nn.Module) -> list[LayerKernels]:
        """Per layer type of ``model``: the kernel its forward passes reached (call it after one)."""
        counts: Counter = Counter()
        calls: dict[str, dict[str, str]] = {}
        attn: dict[str, set[str]] = {}
        for m in model.modules():
            lt = _layer_type(m)
            if lt is None:
                continue
            counts[lt] += 1
            if lt == "softmax":
                attn.setdefault(lt, set()).add(m.config._attn_implementation)
            else:
                mod = type(m).__module__
                calls.setdefault(lt, {}).update({f: p for (mn, f), p in self.called.items() if mn == mod})
        device = str(next(model.parameters()).device.type)
        out = []
        for lt, n in sorted(counts.items()):
            if lt == "softmax":
                impl = "+".join(sorted(attn[lt]))
                out.append(LayerKernels(lt, n, impl, impl == "flash_attention_2", device))
                continue
            c = calls.get(lt, {})
            pkgs = sorted(set(c.values()))
            kernel = "+".join(pkgs) if pkgs else "not called yet"
            out.append(LayerKernels(lt, n, kernel, bool(pkgs) and "torch" not in pkgs, device, dict(sorted(c.items()))))
        return out


def report_rows(layers: list[LayerKernels]) -> list[dict]:
    return [dataclasses.asdict(x) for x in layers]


def check_fused(mode_choice: str, layers: list[LayerKernels], who: str) -> None:
    """``kernels: fused`` promised fused kernels: fail if a layer type reached a PyTorch path."""
    if mode_choice != "fused":
        return
    bad = [f"{x.layer_type}: {x.kernel}" for x in layers if not x.fused]
    if bad:
        raise KernelError(f"kernels: fused, but the {who} ran PyTorch paths ({'; '.join(bad)}): transformers did not bind the "
                          "installed packages (check that they import on this GPU), or set kernels: auto")
