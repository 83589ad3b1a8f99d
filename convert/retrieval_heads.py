"""Which query heads copy from far back, measured on calibration text, so a calibrated fit (the KV-head merge,
MLA's joint latent) can favour them.

In-context retrieval runs through a few "retrieval heads" (Wu et al. 2024, "Retrieval Head"; DuoAttention):
when the next token repeats something seen long before, they put their attention on that earlier copy. On
SmolLM2-135M about ten of its 270 heads do (layers 17-23), and an MQA merge that weighs every head alike
blurs exactly the keys they match on (BENCHMARKS.md, "Retrieval heads weighted in the MQA merge").

No planted facts are needed: in ordinary text a bigram that recurs ``far`` or more tokens back is such a
copy. Each head's score is its mean attention from the row that predicts the repeat to the earlier
occurrence, computed with the source layer's own attention on the calibration inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsurgeon.attention.neutral import AttentionWeights
from kvsurgeon.attention.reference import causal_prob_blocks, resolve_rope, source_qk, source_score_block

FAR = 64  # a repeat counts as a copy from far back at this distance or more
RETRIEVAL_WEIGHT = 0.0  # --retrieval-heads' default
HEADS_FILE = "kvsurgeon_retrieval_heads.json"


def repeat_pairs(ids: torch.Tensor, far: int = FAR) -> torch.Tensor:
    """(P, 3) long rows ``(window, t, s)`` of calibration windows ``ids`` (B, T): the row t predicts token
    t+1, which with token t repeats the bigram at s-1, s, at least ``far`` back (``t - s >= far``; the
    nearest such s). Row t's attention on key s is then a copy from far back."""
    out = []
    for b, row in enumerate(ids.tolist()):
        last: dict[tuple[int, int], int] = {}  # bigram -> where it last ended, at least ``far`` back
        for t in range(1, len(row) - 1):
            s_new = t - far  # the bigram ending at s_new becomes old enough for row t
            if s_new >= 1:
                last[(row[s_new - 1], row[s_new])] = s_new
            s = last.get((row[t], row[t + 1]))
            if s is not None:
                out.append((b, t, s))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 3)


def copy_scores(attn: AttentionWeights, x: torch.Tensor, pairs: torch.Tensor, *,
                inv_freq: torch.Tensor | None = None, attention_scaling: float | None = None) -> torch.Tensor:
    """(H,) float64: each query head's mean attention probability a(t, s) over ``pairs`` (``repeat_pairs``)
    on the windows x (B, T, hidden); zeros without pairs. Scored by blocks of query rows, as the merge's
    own statistics are, so a long window never holds (H, T, T)."""
    H = attn.num_heads
    total = torch.zeros(H, dtype=torch.float64)
    if not len(pairs):
        return total
    inv_freq, scaling = resolve_rope(attn, inv_freq, attention_scaling)
    T = x.shape[-2]
    for b in pairs[:, 0].unique().tolist():
        mine = pairs[pairs[:, 0] == b]
        q, k = source_qk(attn, x[b], inv_freq, scaling)
        for s, e, lo, p in causal_prob_blocks(source_score_block(attn, q, k), T):
            rows = mine[(mine[:, 1] >= s) & (mine[:, 1] < e)]
            if len(rows):
                total += p[:, rows[:, 1] - s, rows[:, 2] - lo].sum(-1)
    return total / len(pairs)


def retrieval_head_weights(scores: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-head importance for a calibrated fit: ``1 + weight * score`` (every head keeps weight >= 1)."""
    return 1 + weight * scores


@dataclass
class RetrievalWeighting:
    """``--retrieval-heads W`` through one conversion: the calibration windows' far repeats (``on_calibration``,
    before the first layer), then each layer's copy scores and head weights. ``record`` is what the output's
    HEADS_FILE holds; the plan hands it to the writer, which serialises it after the last layer."""

    weight: float
    pairs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record.update(retrieval_weight=self.weight, far=FAR, copies=0, copy_scores={})

    def on_calibration(self, ids: torch.Tensor) -> None:
        self.pairs = repeat_pairs(ids)
        self.record["copies"] = len(self.pairs)

    def head_weights(self, i: int, attn: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
        """(H,) weights for layer i, its source attention ``attn`` on the calibration inputs x (B, T, hidden)."""
        scores = copy_scores(attn, x, self.pairs)
        self.record["copy_scores"][i] = [round(float(v), 4) for v in scores]
        return retrieval_head_weights(scores, self.weight)

    def summary(self) -> str:
        """How the card says the heads were weighted, after "query heads"."""
        return f"weighted by 1 + {self.weight:g} x their copy attention ({HEADS_FILE})"
