"""Distillation losses and the packed training stream: tensors in, tensors out."""

from __future__ import annotations

import random
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..io.text_data import iter_texts


class DistillLosses(NamedTuple):
    loss: torch.Tensor  # what is minimised
    kl: torch.Tensor  # plain mean KL, detached
    ce: torch.Tensor  # mean CE on the data, detached
    answer_ce: torch.Tensor  # mean CE on the answer tokens, detached (0 when none are marked)
    answer_tokens: torch.Tensor  # how many answer tokens that mean is over (a sum across batches needs it)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    token_weights: torch.Tensor | None = None,
    answer_mask: torch.Tensor | None = None,
    answer_ce_weight: float = 0.0,
) -> DistillLosses:
    """(loss, kl, ce, answer_ce, answer_tokens) for next-token prediction. KL(teacher || student) at temperature T, scaled by
    T^2 so its gradient size does not depend on T (Hinton et al.); CE on the data's next tokens.

    ``token_weights`` (B, T), one per token of ``ids``, weighs the KL of predicting that token: the
    loss takes their weighted mean, so all-ones is the plain mean and a few heavy tokens (a code copied
    from far back) take a share of the loss that a plain mean over the window would not give them.
    The returned ``kl`` stays the plain mean, so runs with and without weights log comparable KL.

    ``answer_mask`` (B, T) marks tokens whose true value is known (a retrieval window's restated code);
    ``answer_ce_weight`` adds the mean CE of predicting them. Where the teacher itself is unsure which
    fact to copy, the KL alone teaches that doubt; the known answer does not. The returned
    ``answer_ce`` is that mean whatever the weight, so a run without it still logs how well the
    student restates the codes."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    T = temperature
    per_token = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    kl = per_token.mean() * T * T
    if token_weights is None:
        fit = kl
    else:
        w = token_weights[:, 1:].to(per_token)
        fit = (per_token * w).sum() / w.sum() * T * T
    ce_tok = F.cross_entropy(s.reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
    ce = ce_tok.mean()
    loss = kl_weight * fit + ce_weight * ce
    answer_ce = n_answers = torch.zeros((), device=ce.device)
    if answer_mask is not None:
        m = answer_mask[:, 1:].to(ce_tok)  # logits at t-1 predict the answer token at t
        n_answers = m.sum()
        answer_ce = (ce_tok * m).sum() / n_answers.clamp(min=1)  # no answers: 0
        if answer_ce_weight:
            loss = loss + answer_ce_weight * answer_ce
    return DistillLosses(loss, kl.detach(), ce.detach(), answer_ce.detach(), n_answers)


def answer_mask(shape: tuple[int, int], answers: list[Sequence[range]]) -> torch.Tensor:
    """(B, T) bool: True on each window's answer positions (``answers[b]``: window b's answer spans)."""
    m = torch.zeros(shape, dtype=torch.bool)
    for b, spans in enumerate(answers):
        for span in spans:
            m[b, span.start : span.stop] = True
    return m


def answer_weights(shape: tuple[int, int], answers: list[Sequence[range]], weight: float, lead: float | None = None) -> torch.Tensor:
    """(B, T) token weights: ``weight`` on each window's answer positions, 1 elsewhere; ``lead`` (if
    given) on each answer's first position instead, the token that picks which fact is copied."""
    w = torch.where(answer_mask(shape, answers), weight, 1.0)
    if lead is not None:
        for b, spans in enumerate(answers):
            for span in spans:
                if len(span):
                    w[b, span.start] = lead
    return w


class PackedStream:
    """Documents joined with EOS, cut into (batch_size, seq_len) batches, deterministic in order.

    Rank-aware: each step takes ``world * batch_size`` consecutive windows of the one global stream and
    rank r keeps windows [r*batch_size, (r+1)*batch_size), so processes never train on the same
    window and N processes with batch b see exactly the windows one process with batch N*b sees.
    ``position`` counts global windows consumed (independent of the world size), so a resumed run skips
    exactly what the whole job already saw; the data repeats (a new epoch) when it runs out.

    ``retrieval``: the fraction of windows rewritten by ``calibration.retrieval_window``. Which windows,
    and their facts, follow from the global window index and ``seed`` alone, so ranks and resumes
    agree, and another seed gives another draw (seed 0 is the draw runs made before seeds counted).
    ``retrieval_far``: of those, the fraction whose asked fact sits in the window's first 10%.
    ``retrieval_facts``: facts stated in each retrieval window; ``retrieval_asks``: how many of them are
    restated at its end (each one an answer).

    ``seq_len`` is a length, or a function of the global window index (a curriculum: short windows,
    then long ones). Windows are cut one after another from the same token stream, so a stage with
    longer windows continues where the previous stage stopped, and skipping replays the same cuts.
    """

    def __init__(self, tokenizer, source: str, seq_len: int | Callable[[int], int], batch_size: int, text_field: str = "text",
                 split: str = "train", rank: int = 0, world: int = 1, retrieval: float = 0.0, seed: int = 0,
                 retrieval_far: float = 0.0, retrieval_asks: int = 1, retrieval_facts: int | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if not 0.0 <= retrieval <= 1.0:
            raise ValueError(f"retrieval {retrieval}: a fraction of windows, between 0 and 1")
        if not 0.0 <= retrieval_far <= 1.0:
            raise ValueError(f"retrieval_far {retrieval_far}: a fraction of retrieval windows, between 0 and 1")
        from ..pipeline.calibration import MAX_RETRIEVAL_FACTS, RETRIEVAL_FACTS

        facts = RETRIEVAL_FACTS if retrieval_facts is None else retrieval_facts
        if not 1 <= facts <= MAX_RETRIEVAL_FACTS:
            raise ValueError(f"retrieval_facts {facts}: between 1 and {MAX_RETRIEVAL_FACTS}")
        if not 1 <= retrieval_asks <= facts:
            raise ValueError(f"retrieval_asks {retrieval_asks}: between 1 and the {facts} facts of a retrieval window")
        self.retrieval, self.retrieval_far, self.retrieval_asks, self.seed = retrieval, retrieval_far, retrieval_asks, seed
        self.retrieval_facts = facts
        self.tok = tokenizer
        self.source, self.text_field, self.split = source, text_field, split
        self.seq_len_at = seq_len if callable(seq_len) else (lambda _index: seq_len)
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.position = 0

    def _windows(self) -> Iterator[list[int]]:
        index = 0
        while True:
            buf: list[int] = []
            produced = False
            n = self.seq_len_at(index)
            for text in iter_texts(self.source, self.text_field, self.split):
                buf.extend(self.tok(text, add_special_tokens=False)["input_ids"])
                if self.tok.eos_token_id is not None:
                    buf.append(self.tok.eos_token_id)
                while len(buf) >= n:
                    yield buf[:n]
                    buf = buf[n:]
                    produced = True
                    index += 1
                    n = self.seq_len_at(index)
            if not produced:
                raise ValueError(f"{self.source} holds fewer than {n} tokens")

    def _window(self, index: int, ids: list[int]) -> tuple[list[int], tuple[range, ...]]:
        """The window's tokens and its answer spans (the restated codes; none for plain text)."""
        if self.retrieval:
            rng = random.Random((self.seed << 32) + index)  # seed 0: Random(index), as before
            if rng.random() < self.retrieval:
                from ..pipeline.calibration import retrieval_window_with_answer

                return retrieval_window_with_answer(self.tok, ids, rng, facts=self.retrieval_facts, far=self.retrieval_far,
                                                    asks=self.retrieval_asks)
        return ids, ()

    def batches(self, skip_windows: int = 0) -> Iterator[torch.Tensor]:
        """(batch_size, seq_len) token windows for this rank."""
        for ids, _ in self.batches_with_answers(skip_windows):
            yield ids

    def batches_with_answers(self, skip_windows: int = 0) -> Iterator[tuple[torch.Tensor, list[tuple[range, ...]]]]:
        """As ``batches``, with each window's answer positions (``answer_weights`` turns them into loss weights)."""
        windows = self._windows()
        for _ in range(skip_windows):
            next(windows)
        self.position = skip_windows
        per_step = self.batch_size * self.world
        lo = self.rank * self.batch_size
        while True:
            first = self.position
            step = [next(windows) for _ in range(per_step)]
            self.position += per_step
            mine = [self._window(first + lo + j, w) for j, w in enumerate(step[lo : lo + self.batch_size])]
            yield torch.tensor([ids for ids, _ in mine], dtype=torch.long), [span for _, span in mine]


def window_digests(ids: torch.Tensor) -> torch.Tensor:
    """One int64 per window from its tokens (blake2b, identical in every process, unlike ``hash``):
    what the run gathers to count the distinct windows it trained on."""
    import hashlib

    rows = ids.detach().to("cpu", torch.int64).numpy()
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True) for r in rows],
        dtype=torch.int64,
    )
