"""The neutral form of one attention layer: what every source family is read into and every
target layout is written from.

Shapes follow ``nn.Linear`` (out, in) split per head, so a projection round-trips with a view:

    q: (H, D, hidden)      q_proj.weight.view(H, D, hidden)
    k: (G, D, hidden)      k_proj.weight.view(G, D, hidden)
    v: (G, Dv, hidden)     v_proj.weight.view(G, Dv, hidden)
    o: (hidden, H, Dv)     o_proj.weight.view(hidden, H, Dv)

Query head ``h`` reads KV head ``h // (H // G)``, as in transformers' ``repeat_kv``.
RoPE is kept in the source's rotate-half layout: dims ``i`` and ``i + rotary_dim // 2`` form the
plane of frequency ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding as the source applies it."""

    theta: float
    head_dim: int
    rotary_dim: int  # dims that rotate, from partial_rotary_factor; the rest pass through
    rope_type: str = "default"  # "default", "llama3", "yarn", "linear", "dynamic", ...
    scaling: dict = field(default_factory=dict)  # the rest of rope_parameters, verbatim

    @property
    def partial_rotary_factor(self) -> float:
        return self.rotary_dim / self.head_dim

    def inv_freq(self) -> torch.Tensor:
        """Unscaled inverse frequencies, one per rotary plane (rotary_dim // 2 of them)."""
        idx = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64)
        return 1.0 / (self.theta ** (idx / self.rotary_dim))


@dataclass
class AttentionWeights:
    """One layer's attention in neutral per-head form."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    rope: RopeSpec
    q_bias: torch.Tensor | None = None  # (H, D)
    k_bias: torch.Tensor | None = None  # (G, D)
    v_bias: torch.Tensor | None = None  # (G, Dv)
    o_bias: torch.Tensor | None = None  # (hidden,)
    q_norm: torch.Tensor | None = None  # (D,) RMSNorm weight applied per head before RoPE (Qwen3)
    k_norm: torch.Tensor | None = None  # (D,)
    norm_eps: float = 1e-6  # eps of q_norm/k_norm
    # Gemma: norms multiply by (1 + w), stored as w; kept so the weights round-trip bit for bit
    norm_offset: float = 0.0
    # "head": q_norm/k_norm (D,) normalise each head (Qwen3, Gemma-3); "projection": they are (H, D)/(G, D)
    # and normalise the whole projection per token, all heads together (OLMo-2)
    qk_norm_scope: str = "head"
    scaling: float | None = None  # score scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5, Granite: attention_multiplier)
    softcap: float | None = None  # Gemma-2: scores become softcap * tanh(scores / softcap) before the softmax

    def __post_init__(self) -> None:
        H, D, hidden = self.q.shape
        G, Dk, hk = self.k.shape
        Gv, Dv, hv = self.v.shape
        if not (Dk == D and hk == hidden and hv == hidden and Gv == G):
            raise ValueError(f"inconsistent q/k/v shapes {tuple(self.q.shape)} {tuple(self.k.shape)} {tuple(self.v.shape)}")
        if tuple(self.o.shape) != (hidden, H, Dv):
            raise ValueError(f"o has shape {tuple(self.o.shape)}, expected {(hidden, H, Dv)}")
        if H % G:
            raise ValueError(f"{H} query heads cannot share {G} KV heads evenly")
        if self.qk_norm_scope not in ("head", "projection"):
            raise ValueError(f"qk_norm_scope must be 'head' or 'projection', got {self.qk_norm_scope!r}")

    @property
    def score_scale(self) -> float:
        return self.head_dim ** -0.5 if self.scaling is None else self.scaling

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.q.shape[2]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_index(self) -> torch.Tensor:
        """KV head read by each query head."""
        return torch.arange(self.num_heads) // self.group_size

    def with_(self, **changes) -> "AttentionWeights":
        return replace(self, **changes)

    def to(self, dtype: torch.dtype) -> "AttentionWeights":
        def cast(t):
            return None if t is None else t.to(dtype)

        return replace(
            self,
            q=cast(self.q), k=cast(self.k), v=cast(self.v), o=cast(self.o),
            q_bias=cast(self.q_bias), k_bias=cast(self.k_bias), v_bias=cast(self.v_bias),
            o_bias=cast(self.o_bias), q_norm=cast(self.q_norm), k_norm=cast(self.k_norm),
        )
