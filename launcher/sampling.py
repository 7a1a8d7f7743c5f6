"""Which rank sees which examples, in which order.

Training: one seeded permutation per epoch over the whole training set, cut into global batches
of ``global_batch_size``; each global batch is split into contiguous per-rank slices, and each
slice into ``grad_accum_steps`` micro-batches. So the *set* of examples in optimizer step k is the
same whatever the split into micro-batch x accumulation x ranks, which is what makes the update
topology-independent. The last incomplete global batch of an epoch is dropped (a different tail
each epoch) so every optimizer step has the same size on every rank.

Evaluation: each rank takes a contiguous block of ceil(N / world) examples, wrapping around to pad
the last block; all ranks therefore run the same number of forward passes (required under ZeRO-3,
where forward is a collective), and the padding is removed by de-duplicating on example id.
"""

from __future__ import annotations

import math

import numpy as np

from .plan import BatchPlan


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch: BatchPlan) -> int:
    return num_examples // batch.global_batch_size


def rank_micro_batches(
    num_examples: int, batch: BatchPlan, rank: int, seed: int, epoch: int, start_step: int = 0
):
    """Yield, for each optimizer step of ``epoch`` from ``start_step``, this rank's micro-batches
    (a list of ``grad_accum_steps`` lists of example indices)."""
    order = epoch_permutation(num_examples, seed, epoch)
    per_rank = batch.micro_batch_size * batch.grad_accum_steps
    for step in range(start_step, steps_per_epoch(num_examples, batch)):
        global_slice = order[step * batch.global_batch_size:(step + 1) * batch.global_batch_size]
        mine = global_slice[rank * per_rank:(rank + 1) * per_rank]
        yield [
            mine[i * batch.micro_batch_size:(i + 1) * batch.micro_batch_size].tolist()
            for i in range(batch.grad_accum_steps)
        ]


def eval_shard(num_examples: int, world_size: int, rank: int) -> list[int]:
    """This rank's evaluation indices: equal length on every rank; duplicates only as padding."""
    if num_examples == 0:
        return []
    per_rank = math.ceil(num_examples / world_size)
    return [(rank * per_rank + i) % num_examples for i in range(per_rank)]
