"""The greedy backward loop both layer searches use: whole sets scored, cheapest removal first."""

import pytest

from kvsurgeon.convert.greedy import greedy_trials, prune_greedily


def test_prune_drops_the_cheapest_removal_of_whole_sets_and_counts_its_trials():
    # cost of a kept set: sum of what the removed layers cost, plus an interaction that per-layer
    # costs cannot see: removing 2 and 3 together costs 10 more than either alone
    alone = {0: 1.0, 1: 5.0, 2: 0.5, 3: 0.6, 4: 2.0}
    full = frozenset(alone)
    calls = []

    def cost(kept: frozenset[int]) -> float:
        calls.append(kept)
        removed = full - kept
        return sum(alone[i] for i in removed) + (10.0 if {2, 3} <= removed else 0.0)

    seen = []
    pruned = prune_greedily(set(full), 2, cost, on_step=seen.append)
    steps = pruned.steps
    # step 1 drops 2 (0.5); step 2 would drop 3 alone (0.6) but with 2 gone it costs 11.1: drops 0;
    # step 3 then drops 4 (3.5 + 2.0) before 3 (1.5 + 0.6 + 10)
    assert [s.dropped for s in steps] == [2, 0, 4]
    assert pruned.kept == steps[-1].kept == frozenset({1, 3})
    assert steps[1].trials[3] == pytest.approx(11.1) and steps[1].result == pytest.approx(1.5)
    assert seen == steps
    assert len(calls) == greedy_trials(5, 2) == 5 + 4 + 3


def test_prune_breaks_ties_by_lowest_index_and_reads_a_value_from_rich_results():
    steps = prune_greedily({3, 1, 2}, 1, lambda kept: {"score": 1.0, "n": len(kept)}, value=lambda r: r["score"]).steps
    assert [s.dropped for s in steps] == [1, 2]
    assert steps[-1].kept == frozenset({3}) and steps[-1].result == {"score": 1.0, "n": 1}


def test_prune_to_the_start_size_scores_nothing_and_a_negative_keep_is_refused():
    pruned = prune_greedily({1, 2}, 2, lambda kept: pytest.fail("scored"))
    assert pruned.steps == [] and pruned.kept == frozenset({1, 2})  # the start itself
    with pytest.raises(ValueError, match="keep must be >= 0"):
        prune_greedily({1}, -1, float)
