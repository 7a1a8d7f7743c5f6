"""The README's commands are the contract: check they exist, and that what they run is sound."""

from __future__ import annotations

import os
import re

from conftest import REPO, check_ok, run_launcher, toy_recipe_dict, write_recipe

from launcher.paths import resolve_path
from launcher.recipe import load_recipe


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- ci:{name} -->\n```bash\n(.*?)```", text, re.S)
    assert match, f"README.md lost its <!-- ci:{name} --> block"
    return match.group(1).strip()


def test_readme_blocks_are_what_ci_runs():
    assert readme_block("quickstart") == "bash scripts/quickstart.sh"
    assert readme_block("test") == ".venv/bin/python -m pytest --durations=30"
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_block quickstart" in ci and "readme_block test" in ci
    for script in ("scripts/setup.sh", "scripts/quickstart.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), script


def test_quickstart_recipe_is_valid_and_its_offline_assets_are_installed():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert (resolve_path(recipe.model.name_or_path) / "config.json").exists()
    assert resolve_path(recipe.data.train).exists()
    assert recipe.training.precision == "fp32"


def test_accelerate_config_file_command_from_readme(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run", training={"max_steps": 3}))
    result = run_launcher(["train", str(path)], isolated_env, nproc=2,
                          accelerate_args=("--config_file", str(REPO / "accelerate_configs" / "cpu.yaml")))
    check_ok(result)
    assert "strategy ddp on 2 process(es) (gloo, cpu)" in result.stdout
