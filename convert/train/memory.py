"""Host memory a training step needs at least, estimated before the run starts.

On a CPU an out-of-memory run is killed by the kernel with no message, minutes in (MLA -75% at 4K
windows without gradient checkpointing: killed past 24 GB). What a step must hold at once is exact and
cheap to count: the tensors autograd saves for the backward pass, counted by a ``saved_tensors_hooks``
pack hook over one student forward plus the distillation loss. That count is a polynomial in the window
length (projections grow with T, materialised attention scores with T^2), so three short probes fit it
exactly and it is extrapolated to the recipe's length. Per decoder layer, too: under gradient
checkpointing a step keeps only each layer's input plus what lies outside the layers, and recomputes
one layer at a time.

The estimate is a floor, beyond the loaded models: AdamW's two moments (8 bytes per trainable
parameter) plus, at the end of the forward pass, every saved tensor (with checkpointing: the saved
tensors outside the layers, each layer's input and the largest layer's saved tensors, recomputed).
Transients and the allocator come on top: for SmolLM2 MLA -75% the peak beyond the loaded models was
9.5 GB against a 7.4 GB floor on 2,048-token windows, and 6.7 GB against 3.5 GB with checkpointing on
4,096 (``scripts/bench_memory.py``). So a floor above the memory available is a run that cannot fit
(refused); one above half of it may not (a warning). The probes themselves peak at ~3.9 GB beyond the
loaded models for that model, below any of those steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# three points fit a quadratic exactly; multiples of the linear-attention chunk sizes (64, 256), whose
# torch paths pad the window to a whole chunk; seconds for a 135M model
PROBE_LENGTHS = (256, 512, 1024)


def probe_lengths(seq_len: int) -> tuple[int, ...]:
    """Windows no longer than the probes are measured as they are; longer ones are extrapolated."""
    return (seq_len,) if seq_len <= PROBE_LENGTHS[-1] else PROBE_LENGTHS


@dataclass
class SavedBytes:
    """Bytes autograd saves for one forward: outside the decoder layers, per layer, and each layer's input."""

    outside: int
    layers: list[int]
    layer_inputs: list[int]

    @property
    def total(self) -> int:
        return self.outside + sum(self.layers)


@dataclass
class StepMemory:
    seq_len: int
    batch_size: int
    optimizer: int  # AdamW's moments of the trainable parameters
    activations: int  # saved tensors alive at once at seq_len

    @property
    def floor(self) -> int:
        return self.optimizer + self.activations


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's checkpointable blocks (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def saved_bytes(model, forward: Callable[[], torch.Tensor]) -> SavedBytes:
    """Run ``forward`` (a student forward plus loss) and count the distinct storages autograd saves,
    attributed to the decoder layer running when they were saved."""
    layers = decoder_layers(model)
    index = {id(m): i for i, m in enumerate(layers)}
    current: list[int | None] = [None]
    per_layer: list[dict[int, int]] = [{} for _ in layers]
    inputs = [0] * len(layers)
    outside: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        (outside if current[0] is None else per_layer[current[0]])[s.data_ptr()] = s.nbytes()
        # alive until the count is done (so no address is reused), but not by the graph: returning the
        # tensor itself would tie a saved output to its own grad_fn, a cycle that kept ~2.5 GB alive
        keep.append(t.detach())

    def pre(m, args, kwargs):
        current[0] = index[id(m)]
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            inputs[current[0]] = x.numel() * x.element_size()

    def post(m, args, kwargs, out):
        current[0] = None

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in layers]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):  # no backward: nothing is unpacked
            forward()
    finally:
        for h in handles:
            h.remove()
    # a storage saved both inside a layer and outside it (a layer's output, the next one's input) counts once
    seen = set(outside)
    layer_bytes = []
    for d in per_layer:
        layer_bytes.append(sum(b for p, b in d.items() if p not in seen))
        seen |= set(d)
    return SavedBytes(outside=sum(outside.values()), layers=layer_bytes, layer_inputs=inputs)


def quadratic_at(xs: tuple[int, ...], ys: list[float], x: float) -> float:
    """The quadratic through three points, evaluated at x (Lagrange form: exact on the probes)."""
    if len(xs) == 1:  # measured at the length itself
        return ys[0]
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    return (y0 * (x - x1) * (x - x2) / ((x0 - x1) * (x0 - x2))
            + y1 * (x - x0) * (x - x2) / ((x1 - x0) * (x1 - x2))
            + y2 * (x - x0) * (x - x1) / ((x2 - x0) * (x2 - x1)))


def probe(model, run_step: Callable[[int], torch.Tensor], lengths: tuple[int, ...]) -> list[SavedBytes]:
    """SavedBytes at each probe length. The model runs in eval mode so transformers does not checkpoint
    (the full saved set is what is measured; checkpointing is then modelled from the per-layer split);
    the graph is dropped without a backward."""
    was = model.training
    model.eval()
    try:
        return [saved_bytes(model, lambda n=n: run_step(n)) for n in lengths]
    finally:
        model.train(was)
        # hand the probes' freed heap back to the OS (glibc keeps freed small blocks: ~1.2 GB after one
        # SmolLM2 MLA forward at 1,024 tokens), so they do not add to the run's peak
        from ..pipeline.driver import release_memory

        release_memory()


def estimate_step(probes: list[SavedBytes], seq_len: int, batch_size: int, trainable_params: int,
                  gradient_checkpointing: bool, lengths: tuple[int, ...]) -> StepMemory:
    """Extrapolate batch-1 probes to ``seq_len`` x ``batch_size``."""

    def at(values: list[float]) -> float:
        # the constant term (weights autocast copies once per step) does not grow with the batch
        c = quadratic_at(lengths, values, 0) if len(lengths) == 3 else 0.0
        return max(0.0, c + batch_size * (quadratic_at(lengths, values, seq_len) - c))

    n_layers = len(probes[0].layers)
    layer = [at([p.layers[i] for p in probes]) for i in range(n_layers)]
    largest = max(layer, default=0.0)
    outside = at([p.outside for p in probes])
    if gradient_checkpointing:
        activations = outside + sum(at([p.layer_inputs[i] for p in probes]) for i in range(n_layers)) + largest
    else:
        activations = outside + sum(layer)
    return StepMemory(seq_len=seq_len, batch_size=batch_size, optimizer=8 * trainable_params, activations=int(activations))


def _proc_kib(path: str, key: str) -> int | None:
    """A ``Key:  N kB`` line of a /proc file, in bytes; None where it cannot be read (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory_available() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's remaining limit if lower;
    None where neither can be read (not Linux)."""
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def process_rss() -> int | None:
    """This process's resident memory now (the loaded models, before the check adds anything)."""
    return _proc_kib("/proc/self/status", "VmRSS")


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def local_processes() -> int:
    """Processes of this job on this host (they share its memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
