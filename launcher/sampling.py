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


LENGTH_GROUP_SIZE = 50  # global batches per mega-batch when grouping by length


def epoch_order(num_examples: int, batch: BatchPlan, seed: int, epoch: int, lengths=None) -> np.ndarray:
    """The examples of one epoch in training order, a whole number of global batches long.

    With ``lengths`` (group by length): the shuffled order is cut into mega-batches of
    LENGTH_GROUP_SIZE global batches, each sorted by length (longest first) and cut into global
    batches, and the global batches are shuffled again. Each step then holds examples of similar
    length (little padding) while the epoch order stays random, seeded, and - as without grouping -
    a function of (seed, epoch) only, independent of how a global batch is split over ranks.
    """
    order = epoch_permutation(num_examples, seed, epoch)[: steps_per_epoch(num_examples, batch) * batch.global_batch_size]
    if lengths is None:
        return order
    lengths = np.asarray(lengths)
    mega = batch.global_batch_size * LENGTH_GROUP_SIZE
    grouped = np.concatenate([
        chunk[np.argsort(-lengths[chunk], kind="stable")]
        for chunk in (order[start:start + mega] for start in range(0, len(order), mega))
    ]) if len(order) else order
    batches = grouped.reshape(-1, batch.global_batch_size)
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return batches[shuffle].reshape(-1)


def rank_micro_batches(
    num_examples: int, batch: BatchPlan, rank: int, seed: int, epoch: int, start_step: int = 0, lengths=None
):
    """Yield, for each optimizer step of ``epoch`` from ``start_step``, this rank's micro-batches
    (a list of ``grad_accum_steps`` lists of example indices)."""
    order = epoch_order(num_examples, batch, seed, epoch, lengths)
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
