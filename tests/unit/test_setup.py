"""The start-of-run sanity check: Accelerate's view of the world must be torch.distributed's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from launcher.engine.setup import check_topology
from launcher.errors import TopologyError


def test_matching_single_process_view_passes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    check_topology(SimpleNamespace(num_processes=1, process_index=0))


def test_accelerate_seeing_one_rank_of_two_is_refused(monkeypatch):
    # What `accelerate launch --use_deepspeed` on a CPU host does without an explicit gloo backend.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TopologyError) as info:
        check_topology(SimpleNamespace(num_processes=1, process_index=0))
    message = str(info.value)
    assert "accelerate: world 1, rank 0" in message and "launcher environment (WORLD_SIZE/RANK): world 2, rank 1" in message
