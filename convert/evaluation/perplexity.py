"""Fidelity of a converted model: perplexity over fixed windows and, against a reference,
per-token KL(reference || model) and top-1 agreement."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvsurgeon.attention.kv_cache import kv_bytes_per_token

from .. import hardware
from ..io.checkpoint import read_config
from ..errors import KvSurgeonError
from ..io.resolve import resolve_model
from ..io.text_data import BUILTIN_DATA, iter_texts, token_windows

# Held out from the built-in calibration text (Python docs, PSF licence): the default for eval and convert --measure.
DEFAULT_EVAL_DATA = BUILTIN_DATA / "heldout.jsonl"


# ---- math: tensors in, sums out ----------------------------------------------------------------
def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token NLL of (B, T, V) logits on (B, T) ids: position t predicts token t+1."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of (B, T, V) logits on (B, T) ids, and the number of predictions."""
    nll = token_nll(logits, ids)
    return float(nll.double().sum()), nll.numel()


def kl_per_position(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) at each position, from log-probabilities over the last (vocabulary) dim."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)


def kl_top1_sums(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, int]:
    """Summed KL(ref || model) over predicting positions, and how many top-1 tokens agree."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    lr = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = kl_per_position(lr, lp)
    agree = (lp.argmax(-1) == lr.argmax(-1)).sum()
    return float(kl.double().sum()), int(agree)


@dataclass
class EvalResult:
    model: str
    data: str
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    ppl: float
    kv_bytes_per_token: int
    reference: str | None = None
    reference_ppl: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    reference_kv_bytes_per_token: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_model(name: str, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..padded_sdpa import sdpa_for

    path = resolve_model(name, revision=revision)
    if dtype not in DTYPES:
        raise KvSurgeonError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, attn_implementation=sdpa_for(config)
    )
    model.eval()
    warn_slow_half_precision(model)
    return model, path


def warn_slow_half_precision(model) -> None:
    """A bf16/fp16 model on a CPU without native kernels for its dtype runs its matmuls through a reference
    GEMM (bf16: 33-65x slower than float32 here, scripts/bench_precision.py); say so, with the fix."""
    if model.dtype in (torch.bfloat16, torch.float16) and model.device.type == "cpu" and not hardware.cpu_has_native(model.dtype):
        name = str(model.dtype).removeprefix("torch.")
        warnings.warn(f"evaluating in {name} on a CPU without native {name} kernels (no AVX512/AMX): matmuls run "
                      "tens of times slower than float32 (bf16: 33-65x here); pass --dtype float32", stacklevel=2)


def load_tokenizer(*folders: Path):
    from transformers import AutoTokenizer

    for f in folders:
        if f is not None and ((Path(f) / "tokenizer.json").is_file() or (Path(f) / "tokenizer_config.json").is_file()):
            return AutoTokenizer.from_pretrained(f)
    raise KvSurgeonError(f"no tokenizer found in {', '.join(str(f) for f in folders if f)}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate(
    model_name: str,
    data: str | None,
    reference: str | None = None,
    max_tokens: int = 16384,
    seq_len: int = 512,
    batch_size: int = 1,
    dtype: str = "float32",
    text_field: str = "text",
    split: str = "validation",
    trust_remote_code: bool = False,
    progress: bool = True,
    model=None,
    reference_model=None,
) -> EvalResult:
    """Evaluate ``model_name`` (optionally already loaded as ``model``) on fixed windows of ``data``."""
    path = Path(model_name) if model is not None and Path(model_name).is_dir() else resolve_model(model_name)
    if model is None:
        model, path = load_model(model_name, dtype, trust_remote_code=trust_remote_code)
    ref_path = None
    if reference is not None and reference_model is None:
        reference_model, ref_path = load_model(reference, dtype, trust_remote_code=trust_remote_code)
    elif reference is not None:  # already loaded: still resolve its folder (a Hub id too) for config and tokenizer
        ref_path = resolve_model(reference)
    tok = load_tokenizer(path, ref_path)
    data = str(data or DEFAULT_EVAL_DATA)
    windows = token_windows(tok, iter_texts(data, text_field, split), seq_len, max_tokens)

    nll = kl = 0.0
    ref_nll = 0.0
    agree = count = 0
    bar = tqdm(total=windows.shape[0] * (seq_len - 1), unit="tok", desc="eval", disable=not progress)
    for start in range(0, windows.shape[0], batch_size):
        # windows are built on the CPU; each model takes them on its own device (a CUDA student and
        # teacher under accelerate), and the sums are taken on the student's device
        ids = windows[start : start + batch_size].to(_device(model))
        logits = model(input_ids=ids).logits
        s, n = nll_sum(logits, ids)
        nll += s
        count += n
        if reference_model is not None:
            ref_logits = reference_model(input_ids=ids.to(_device(reference_model))).logits.to(logits.device)
            ref_nll += nll_sum(ref_logits, ids)[0]
            k, a = kl_top1_sums(logits, ref_logits)
            kl += k
            agree += a
        bar.update(n)
        bar.set_postfix(ppl=f"{math.exp(nll / count):.2f}")
    bar.close()

    result = EvalResult(
        model=str(model_name),
        data=str(data),
        tokens=count,
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        ppl=math.exp(nll / count),
        kv_bytes_per_token=kv_bytes_per_token(read_config(path)) if (path / "config.json").is_file() else -1,
    )
    if reference_model is not None:
        result.reference = str(reference)
        result.reference_ppl = math.exp(ref_nll / count)
        result.kl = kl / count
        result.top1_agreement = agree / count
        if ref_path is not None and (ref_path / "config.json").is_file():
            result.reference_kv_bytes_per_token = kv_bytes_per_token(read_config(ref_path))
    return result
