"""Shared fixtures: tiny offline assets, recipe writing, and running the launcher as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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


@pytest.fixture(scope="session")
def invariance_ddp_run(tmp_path_factory, assets, isolated_env) -> Path:
    """test_distributed's invariance recipe (micro batch 4) on 1 node x 2 DDP ranks: its 4x1x2 split and
    test_multinode's one-node reference are the same run, trained once per session."""
    from test_distributed import invariance_recipe

    root = tmp_path_factory.mktemp("s412")
    path = write_recipe(root / "recipe.yaml", invariance_recipe(assets, root / "run", micro_batch_size=4))
    check_ok(run_launcher(["train", str(path)], isolated_env, nproc=2, accelerate_args=("--multi_gpu",)))
    return root / "run"


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
    if Path(cwd) != REPO:
        # `-m launcher` from another directory would import whichever launcher is installed (an editable
        # install may point at another checkout): run this checkout's.
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def check_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-6000:]}"


def read_events(run_dir: Path, event: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if event is None or e["event"] == event]


# Measured per-step loss gaps (test -> max relative difference), printed at the end of the session:
# the numbers behind "within 1e-5", for the docs' launch matrix and the closing notes.
LOSS_GAPS: dict[str, float] = {}


def assert_same_losses(candidate: list[float], reference: list[float], rel: float = 1e-5, atol: float | None = None) -> float:
    """Per-step losses equal within ``rel`` (relative; or ``atol`` absolute); records the largest relative gap
    under the running test."""
    assert len(candidate) == len(reference) > 0, (len(candidate), len(reference))
    gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(candidate, reference))
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    LOSS_GAPS[test] = max(gap, LOSS_GAPS.get(test, 0.0))
    assert candidate == pytest.approx(reference, rel=rel, abs=atol), f"largest relative gap {gap:.2e} > {rel:.0e}"
    return gap


def pytest_terminal_summary(terminalreporter):
    if LOSS_GAPS:
        terminalreporter.section("per-step loss gaps (largest relative difference to the reference run)")
        for test, gap in sorted(LOSS_GAPS.items()):
            terminalreporter.write_line(f"{gap:9.2e}  {test}")


def wait_for_step(run_dir: Path, step: int, process, timeout: float) -> None:
    """Wait until a running job (a Popen) has logged training step ``step`` in run_dir; fail if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the job ended (exit {process.returncode}) before {run_dir} step {step}:\n{err[-3000:]}")
        try:
            if any(e["step"] >= step for e in read_events(run_dir, "train")):
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{run_dir}: step {step} not reached in {timeout} s")


def losses(run_dir: Path) -> list[float]:
    """The per-step training losses a run logged (log_every 1)."""
    return [e["loss"] for e in read_events(run_dir, "train")]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


# The attention key bias adds the same q.b_k to every score of a softmax row, so its gradient is zero
# in exact arithmetic: what it gets is float noise, which differs with the reduction order (micro x
# accumulation x ranks, ZeRO's partitions). It therefore stays near its initial 0, and two correct runs
# may hold different noise there: a relative difference is noise over noise. It is compared absolutely,
# on the scale of the distance training moves a weight: an Adam step moves a weight with a real
# gradient by about the learning rate, so `steps` steps by up to ~learning_rate x steps; the key bias
# moves by a small fraction of that (measured between topologies: 5.6e-6 x lr x steps for the tiny BERT,
# 7e-5 x for the tiny GPT-2). Allowed: 1e-3 x learning_rate x steps - above the noise, and a thousandth
# of what a key bias that trained, was exported from another tensor or was re-initialised would show.
def key_bias_tolerance(learning_rate: float, steps: int) -> float:
    return 1e-3 * learning_rate * steps


def split_key_bias(name: str, tensor):
    """(the attention key bias in this parameter or None, the rest of it): BERT's
    ``attention.self.key.bias`` is all key bias, GPT-2's fused ``attn.c_attn.bias`` is q|k|v."""
    import torch

    if name.endswith("attention.self.key.bias"):
        return tensor, tensor[:0]
    if name.endswith("attn.c_attn.bias"):
        third = tensor.numel() // 3
        return tensor[third:2 * third], torch.cat([tensor[:third], tensor[2 * third:]])
    return None, tensor


def assert_same_key_bias(name: str, a, b, atol: float) -> None:
    gap = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert gap <= atol, f"{name} (attention key bias): absolute difference {gap:.2e} > {atol:.0e}"


def assert_same_weights(a: dict, b: dict, key_bias_atol: float, rel: float = 1e-5) -> None:
    """Every parameter of ``b`` equals ``a``'s: relative difference (of the norms) at most ``rel``; the
    attention key bias within ``key_bias_atol`` (see key_bias_tolerance) absolutely."""
    assert a.keys() == b.keys()
    for name in a:
        (a_key, x), (b_key, y) = split_key_bias(name, a[name].double()), split_key_bias(name, b[name].double())
        if a_key is not None:
            assert_same_key_bias(name, a_key, b_key, key_bias_atol)
        if x.numel():
            diff = (x - y).norm() / x.norm().clamp_min(1e-12)
            assert diff <= rel, f"{name}: relative difference {diff:.2e}"
