"""Who sees which examples: the property that makes training topology-independent and eval exact."""

from __future__ import annotations

import itertools

import pytest

from launcher.plan import BatchPlan
from launcher.sampling import eval_shard, rank_micro_batches, steps_per_epoch

SPLITS = [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (1, 1, 8)]


def step_sets(num_examples, micro, accum, world, seed=7, epoch=0):
    plan = BatchPlan(micro, accum, world, micro * accum * world)
    per_rank = [list(rank_micro_batches(num_examples, plan, rank, seed, epoch)) for rank in range(world)]
    steps = []
    for step in range(steps_per_epoch(num_examples, plan)):
        members = [i for rank in range(world) for micro_batch in per_rank[rank][step] for i in micro_batch]
        assert all(len(mb) == micro for rank in range(world) for mb in per_rank[rank][step])
        steps.append(members)
    return steps


def test_each_step_holds_the_same_examples_whatever_the_split():
    reference = [sorted(s) for s in step_sets(103, 8, 1, 1)]
    for micro, accum, world in SPLITS:
        assert [sorted(s) for s in step_sets(103, micro, accum, world)] == reference


def test_no_example_repeats_within_an_epoch_and_the_tail_is_dropped():
    steps = step_sets(103, 2, 2, 2)
    seen = list(itertools.chain.from_iterable(steps))
    assert len(seen) == len(set(seen)) == 96  # 12 steps of 8; 7 examples fall off
    assert steps_per_epoch(103, BatchPlan(2, 2, 2, 8)) == 12


def test_order_changes_per_epoch_and_is_seeded():
    assert step_sets(64, 4, 1, 2, epoch=0) != step_sets(64, 4, 1, 2, epoch=1)
    assert step_sets(64, 4, 1, 2, seed=1) == step_sets(64, 4, 1, 2, seed=1)
    assert step_sets(64, 4, 1, 2, seed=1) != step_sets(64, 4, 1, 2, seed=2)


def test_resume_from_a_step_continues_the_same_sequence():
    plan = BatchPlan(2, 2, 2, 8)
    full = list(rank_micro_batches(100, plan, 1, 3, 0))
    assert list(rank_micro_batches(100, plan, 1, 3, 0, start_step=5)) == full[5:]


@pytest.mark.parametrize("num_examples, world", [(37, 2), (53, 2), (5, 8), (1, 3), (64, 4)])
def test_eval_shards_are_equal_length_and_cover_everything(num_examples, world):
    shards = [eval_shard(num_examples, world, rank) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank (ZeRO-3)
    assert set(itertools.chain.from_iterable(shards)) == set(range(num_examples))
    assert sum(len(s) for s in shards) - num_examples < world  # padding is less than one per rank


def test_grouping_by_length_cuts_padding_keeps_steps_split_independent_and_seeded():
    import numpy as np

    from launcher.sampling import epoch_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 120, size=1000)
    plan = BatchPlan(4, 2, 2, 16)
    grouped = epoch_order(1000, plan, seed=3, epoch=0, lengths=lengths)
    plain = epoch_order(1000, plan, seed=3, epoch=0)

    def padded_tokens(order, micro):
        batches = order.reshape(-1, micro)
        return int(sum(lengths[b].max() * len(b) for b in batches))

    assert padded_tokens(grouped, 4) < 0.7 * padded_tokens(plain, 4)
    # the same examples are used (only the order changes) and the order is seeded
    assert sorted(grouped.tolist()) == sorted(plain.tolist())
    assert np.array_equal(grouped, epoch_order(1000, plan, seed=3, epoch=0, lengths=lengths))
    assert not np.array_equal(grouped, epoch_order(1000, plan, seed=3, epoch=1, lengths=lengths))
    # the set of examples in each step does not depend on micro x accumulation x ranks
    for micro, accum, world in [(16, 1, 1), (8, 2, 1), (2, 4, 2), (1, 1, 16)]:
        other = BatchPlan(micro, accum, world, 16)
        per_rank = [list(rank_micro_batches(1000, other, r, 3, 0, lengths=lengths)) for r in range(world)]
        for step, expected in enumerate(grouped.reshape(-1, 16)):
            got = sorted(i for r in range(world) for mb in per_rank[r][step] for i in mb)
            assert got == sorted(expected.tolist())
