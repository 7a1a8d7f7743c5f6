"""Shared fixtures: tiny offline assets, recipe writing, and running the launcher as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from assets import write_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    return write_all(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def isolated_env(tmp_path_factory) -> dict:
    """Environment for launcher subprocesses: offline, private caches, one thread per rank."""
    cache = tmp_path_factory.mktemp("cache")
    env = dict(os.environ)
    env.update(
        LAUNCHER_CACHE=str(cache / "launcher"),
        HF_DATASETS_CACHE=str(cache / "hf-datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(autouse=True)
def _offline_cache(isolated_env, monkeypatch):
    """In-process tests use the same private caches as the subprocesses."""
    for key in ("LAUNCHER_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, isolated_env[key])


def toy_recipe_dict(assets: dict, out_dir: Path, **sections) -> dict:
    recipe = {
        "name": "toy",
        "model": {"name_or_path": assets["model"]},
        "data": {"train": assets["train"], "validation": assets["validation"], "test": assets["test"]},
        "training": {"epochs": 1, "micro_batch_size": 8, "learning_rate": 3e-3, "log_every": 5},
        # The report is seconds of plotting per run; the tests of the report turn it on.
        "output": {"dir": str(out_dir), "report": False},
    }
    return with_sections(recipe, sections)


def with_sections(recipe: dict, sections: dict) -> dict:
    """``recipe`` with each section's keys updated from ``sections`` (a non-dict value replaces it)."""
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(args, env, nproc: int | None = None, accelerate_args=(), timeout=900, cwd=REPO):
    """`python -m launcher ARGS` (nproc None) or `accelerate launch [...] -m launcher ARGS`."""
    if nproc is None:
        cmd = [sys.executable, "-m", "launcher", *args]
    else:
        cmd = [
            str(BIN / "accelerate"), "launch", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            *accelerate_args, "-m", "launcher", *args,
        ]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def check_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"


def read_events(run_dir: Path, event: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if event is None or e["event"] == event]
