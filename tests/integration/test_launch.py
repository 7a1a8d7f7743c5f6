"""Launch anywhere: `launcher run` (plan, dry run, execution, multi-node on loopback), the shipped
accelerate configs, and `launcher debug`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, check_ok, free_port, read_events, run_launcher, toy_recipe_dict, write_recipe

CONFIGS = REPO / "accelerate_configs"


def launcher_run(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "launcher", "run", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def toy(assets, tmp_path):
    return write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run", training={"max_steps": 4}))


def test_dry_run_prints_the_plan_and_starts_nothing(toy, isolated_env, tmp_path):
    result = launcher_run([str(toy), "--nproc", "2", "--strategy", "zero3", "--dry-run", "training.global_batch_size=16"],
                          isolated_env)
    check_ok(result)
    out = " ".join(result.stdout.split())  # the table may wrap
    assert "1 node(s) x 2 process(es) = 2 (cpu, gloo)" in out
    assert "micro_batch_size 8 x grad_accum_steps 1 x world_size 2 = global_batch_size 16" in out
    assert "zero3" in out and "fp32" in out
    assert "4 optimizer steps; 25 per epoch over 400 training features" in out
    # ZeRO-3 shards parameters, gradients and optimizer state over the 2 ranks
    assert "parameters 42.63 KiB, gradients 42.63 KiB, optimizer state 85.26 KiB" in out
    assert "accelerate launch --config_file" in out and "-m launcher train" in out and "distributed.strategy=zero3" in out
    run_dir = tmp_path / "run"
    assert not (run_dir / "recipe.yaml").exists() and not (run_dir / "metrics.jsonl").exists()  # nothing ran
    config = yaml.safe_load((run_dir / "launch" / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert config["deepspeed_config"]["zero_stage"] == 3
    assert "gradient_accumulation_steps" not in json.dumps(config)  # batch sizes live in the recipe only
    ds = json.loads((run_dir / "launch" / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nproc", "3", "training.global_batch_size=16"], "global_batch_size=16 cannot be split over world size 3"),
        (["--nodes", "0"], "--nodes 0: need at least 1 node"),
        (["--nodes", "2"], "--nodes > 1 needs --main-address"),
        (["--config-file", str(CONFIGS / "single_gpu.yaml")], "selects GPUs (gpu_ids: 0"),
        (["--config-file", str(CONFIGS / "deepspeed_zero2.yaml"), "distributed.strategy=zero3"],
         "distributed.strategy=zero3 but accelerate was launched with DeepSpeed zero2"),
        (["training.precision=fp16"], "fp16 needs a GPU"),
    ],
)
def test_bad_launch_requests_are_refused_before_anything_starts(toy, isolated_env, tmp_path, args, expected):
    result = launcher_run([str(toy), *args], isolated_env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_deepspeed_missing_is_a_clear_error(toy, isolated_env, tmp_path):
    blocker = tmp_path / "no_deepspeed"
    blocker.mkdir()
    (blocker / "deepspeed.py").write_text("raise ImportError('blocked for this test')\n")
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n == 'deepspeed' else real(n, *a); "
            "from launcher.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "run", str(toy), "--strategy", "zero2", "--dry-run"],
                            env=isolated_env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "strategy zero2 needs DeepSpeed, which is not installed" in result.stderr


def test_run_executes_two_cpu_ranks_and_writes_its_configs(toy, isolated_env, tmp_path):
    result = launcher_run([str(toy), "--nproc", "2"], isolated_env)
    check_ok(result)
    run_dir = tmp_path / "run"
    assert read_events(run_dir, "start")[0]["world_size"] == 2
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / "launch" / "command.sh").exists()
    assert (run_dir / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name)).to_dict()
    raw = yaml.safe_load((CONFIGS / name).read_text())
    keys = set(raw) | set(raw.get("deepspeed_config") or {})
    for owned_by_recipe in ("gradient_accumulation_steps", "gradient_clipping", "deepspeed_config_file"):
        assert owned_by_recipe not in keys, f"{name} sets {owned_by_recipe}: the recipe owns it"
    assert config["mixed_precision"] == "no"  # precision comes from the recipe


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi_gpu.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                  "fsdp.yaml"])
def test_cpu_runnable_configs_train(assets, isolated_env, tmp_path, name):
    """Plain `accelerate launch --config_file FILE -m launcher train RECIPE` (2 CPU ranks)."""
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run", training={"max_steps": 3}))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(CONFIGS / name),
         "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "launcher", "train", str(path)],
        env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    check_ok(result)
    start = read_events(tmp_path / "run", "start")[0]
    assert start["world_size"] == 2
    expected = {"multi_gpu.yaml": "ddp", "fsdp.yaml": "fsdp"}.get(name) or name.split("_")[1].split(".")[0]
    assert start["strategy"] == expected


@pytest.mark.slow
def test_two_nodes_on_loopback_without_slurm(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run", training={"max_steps": 5}))
    port = str(free_port())
    nodes = [
        subprocess.Popen([sys.executable, "-m", "launcher", "run", str(path), "--nodes", "2", "--node-rank", str(rank),
                          "--nproc", "1", "--main-address", "127.0.0.1", "--main-port", port],
                         env=isolated_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert read_events(tmp_path / "run", "start")[0]["world_size"] == 2
    assert len(read_events(tmp_path / "run", "end")) == 1  # one set of metrics, written once
    assert "2 node(s) x 1 process(es) = 2" in " ".join(outputs[1][0].split())


def test_debug_mode_shows_a_decoded_batch_and_runs_every_path(assets, isolated_env, tmp_path):
    recipe = toy_recipe_dict(assets, tmp_path / "run", distributed={"strategy": "zero2"}, training={"epochs": 5})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = run_launcher(["debug", str(path)], isolated_env)
    check_ok(result)
    assert "distributed.strategy=ddp" in result.stdout and "training.max_steps=3" in result.stdout
    decoded = [line for line in result.stdout.splitlines() if line.startswith("  label ")]
    assert len(decoded) == 8 and all("[CLS]" in line and "[SEP]" in line for line in decoded)
    assert "validation @ step 3" in result.stdout and "test:" in result.stdout
    debug_dir = Path(str(tmp_path / "run") + "-debug")
    assert (debug_dir / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run").exists()  # the real run directory is untouched


def test_debug_mode_fails_loudly(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run", data={"text_column": "review"}))
    result = run_launcher(["debug", str(path)], isolated_env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "data.text_column='review' is not a column" in result.stderr
