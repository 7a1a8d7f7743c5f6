"""Safety defaults a user relies on without reading the code."""

from __future__ import annotations

import re
from pathlib import Path

from launcher.schema import ModelSection

PACKAGE = Path(__file__).resolve().parents[2] / "launcher"


def sources():
    return {path: path.read_text() for path in PACKAGE.rglob("*.py")}


def test_remote_code_is_off_unless_the_recipe_says_so():
    assert ModelSection(name_or_path="m").trust_remote_code is False


def test_no_unsafe_deserialization_in_the_launcher():
    for path, text in sources().items():
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, path
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_weights_are_written_as_safetensors():
    text = (PACKAGE / "finetune.py").read_text()
    assert "safe_serialization=True" in text
    assert "load_kwargs={\"weights_only\": True}" in (PACKAGE / "engine" / "checkpoint.py").read_text()
