"""Checkpoint directory bookkeeping that needs no ranks."""

from __future__ import annotations

import json

from launcher.engine.checkpoint import STATE_FILE, _prune, checkpoints_root


def _checkpoint(root, step: int):
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True)
    (directory / STATE_FILE).write_text(json.dumps({"step": step}))
    return directory


def _universal(root, step: int):
    directory = root / f"step-{step:08d}.universal" / "pytorch_model"
    directory.mkdir(parents=True)
    (directory.parent / "converted_from.json").write_text("{}")
    return directory.parent


def test_a_universal_conversion_is_pruned_with_its_checkpoint(tmp_path):
    root = checkpoints_root(tmp_path)
    for step in (10, 20, 30):
        _checkpoint(root, step)
    old, kept = _universal(root, 10), _universal(root, 20)
    _prune(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000020", "step-00000020.universal", "step-00000030"]
    assert not old.exists() and (kept / "pytorch_model").is_dir()
