"""Distillation losses and the packed training stream: tensors in, tensors out."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .text_data import iter_texts


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for next-token prediction. KL(teacher || student) at temperature T, scaled by
    T^2 so its gradient size does not depend on T (Hinton et al.); CE on the data's next tokens."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    T = temperature
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1).mean() * T * T
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return kl_weight * kl + ce_weight * ce, kl.detach(), ce.detach()


class PackedStream:
    """Documents joined with EOS, cut into (batch_size, seq_len) batches, deterministic in order.

    ``position`` counts batches handed out, so a resumed run skips exactly what it already saw;
    the data repeats (a new epoch) when it runs out.
    """

    def __init__(self, tokenizer, source: str, seq_len: int, batch_size: int, text_field: str = "text", split: str = "train"):
        self.tok = tokenizer
        self.source, self.text_field, self.split = source, text_field, split
        self.seq_len, self.batch_size = seq_len, batch_size
        self.position = 0

    def _windows(self) -> Iterator[list[int]]:
        while True:
            buf: list[int] = []
            produced = False
            for text in iter_texts(self.source, self.text_field, self.split):
                buf.extend(self.tok(text, add_special_tokens=False)["input_ids"])
                if self.tok.eos_token_id is not None:
                    buf.append(self.tok.eos_token_id)
                while len(buf) >= self.seq_len:
                    yield buf[: self.seq_len]
                    buf = buf[self.seq_len :]
                    produced = True
            if not produced:
                raise ValueError(f"{self.source} holds fewer than {self.seq_len} tokens")

    def batches(self, skip: int = 0) -> Iterator[torch.Tensor]:
        windows = self._windows()
        for _ in range(skip * self.batch_size):
            next(windows)
        self.position = skip
        while True:
            batch = [next(windows) for _ in range(self.batch_size)]
            self.position += 1
            yield torch.tensor(batch, dtype=torch.long)
