"""Greedy backward selection of layers, the loop both end-to-end searches share (``swa.search``:
which layers stay global; ``hybrid.search``: which stay attention). Per-layer costs do not compose
when most layers are converted, so every step scores whole sets: from ``start``, drop the member whose
removal costs least, until ``keep`` remain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Step(Generic[T]):
    dropped: int
    kept: frozenset[int]
    result: T  # the cost of ``kept``: the chosen trial
    trials: dict[int, T]  # member -> cost of the set without it


@dataclass
class Pruned(Generic[T]):
    kept: frozenset[int]  # what remains: ``start`` itself when nothing was dropped
    steps: list[Step[T]]


def prune_greedily(start: set[int], keep: int, cost: Callable[[frozenset[int]], T],
                   value: Callable[[T], float] = float, on_trial: Callable[[], None] | None = None,
                   on_step: Callable[[Step[T]], None] | None = None) -> Pruned[T]:
    """Drop one member per step, the one whose removal gives the lowest ``value(cost(rest))`` (ties: the
    lowest index), until ``keep`` remain. ``cost`` sees the kept set; ``on_trial`` runs after each
    scoring (a progress bar), ``on_step`` after each drop (a log line)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    kept = frozenset(start)
    steps: list[Step[T]] = []
    while len(kept) > keep:
        trials = {}
        for member in sorted(kept):
            trials[member] = cost(kept - {member})
            if on_trial:
                on_trial()
        drop = min(trials, key=lambda m: (value(trials[m]), m))
        kept = kept - {drop}
        steps.append(Step(drop, kept, trials[drop], trials))
        if on_step:
            on_step(steps[-1])
    return Pruned(kept, steps)


def greedy_trials(start: int, keep: int) -> int:
    """How many scorings ``prune_greedily`` makes from ``start`` members down to ``keep``."""
    return sum(range(keep + 1, start + 1))
