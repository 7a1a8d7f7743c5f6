"""The versions of the libraries a run depends on (recorded in the start event, the model card, the report)."""

from __future__ import annotations

import platform
from importlib import metadata

LIBRARIES = ("recipe-launcher", "torch", "transformers", "accelerate", "deepspeed", "datasets", "peft", "tokenizers",
             "safetensors", "huggingface_hub")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
