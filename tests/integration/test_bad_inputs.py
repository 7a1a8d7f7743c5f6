"""The bad-input corpus: every case in tests/bad_inputs/ run as a user would, and refused properly.

Each case is a folder ``tests/bad_inputs/<case>/`` (folders starting with ``_`` hold shared files):

    recipe.yaml     the recipe (required)
    expected.txt    a substring the single ``error:`` line must contain (required)
    overrides.txt   optional: one KEY=VALUE per line, passed on the command line (# comments allowed)
    env.json        optional: extra environment variables for the run (e.g. an accelerate launch config)
    existing_run/   optional: copied to @OUT@/run before the run (a run directory already in the way)
    anything else   data files, fake models ... referenced from the recipe (relative paths are
                    resolved against the recipe's folder when they do not exist in the current dir)

Placeholders, replaced in every file of the case (as bytes) before the run:

    @MODEL@   the tiny test model directory (tests/assets.py)
    @CASE@    the case folder (a private copy of it: the corpus itself is never touched)
    @OUT@     a fresh directory for outputs (absent unless the case has existing_run/)
    @SHARED@  tests/bad_inputs/_shared (small valid train/validation CSVs)

The contract (README "Exit codes"): exit code 2, exactly one stderr line starting with ``error:``
that contains expected.txt, no traceback, and nothing written or changed in the output directory
(nor in the case folder). The launcher runs in an empty working directory, as ``python -m launcher
train RECIPE [OVERRIDES]`` - or, for the cases in IN_PROCESS, through the same entry function
(``launcher.cli.main``) in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_launcher

CORPUS = Path(__file__).resolve().parents[1] / "bad_inputs"
SHARED = CORPUS / "_shared"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith("_"))
TIMEOUT = 300  # a case that is not refused may train; the data is tiny, so this is generous

# Refused while `launcher train` loads the recipe and checks the launch (schema, overrides, batch arithmetic,
# the accelerate environment, trackers), before the run builds its Accelerator: these run in this process
# through launcher.cli.main, a fraction of a second each instead of an interpreter start (~4 s) each. A case
# listed here that gets as far as the Accelerator fails (it would leave accelerate's state in this process):
# move it out. Every other case - data, model, output directory, and the smoke cases misspelled_key and
# override_without_value (the real entry point's argv, stderr and exit code) - starts `python -m launcher train`.
IN_PROCESS = {
    "accelerate_grad_accum_conflict", "base_cycle", "base_missing_file", "best_metric_not_computed",
    "early_stopping_without_best_metric", "fp16_on_cpu", "global_batch_not_divisible",
    "grad_accum_contradicts_global_batch", "invalid_yaml", "missing_model_section", "misspelled_section",
    "name_with_slash", "negative_global_batch", "negative_learning_rate", "override_into_a_value",
    "override_unknown_key", "override_wrong_type", "push_to_hub_without_repo_id", "recipe_not_a_mapping",
    "recipe_not_utf8", "strategy_disagrees_with_accelerate", "tracker_option_set_by_launcher", "unknown_metric",
    "unknown_strategy", "unknown_task", "unknown_tracker", "wrong_type", "zero3_export_without_16bit_gather",
    "zero_micro_batch",
}


def train_in_process(argv, extra_env: dict, cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``launcher train`` run through its entry function in this process."""
    from accelerate.state import PartialState
    from launcher.cli import main

    for key, value in extra_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(cwd)
    accelerate_was_set_up = bool(PartialState._shared_state)
    capsys.readouterr()
    try:
        returncode = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        returncode = exc.code
    stderr = capsys.readouterr().err
    if not accelerate_was_set_up:
        assert not PartialState._shared_state, "the case got as far as the Accelerator: remove it from IN_PROCESS"
    return returncode, stderr


def snapshot(root: Path) -> dict | None:
    """Every entry under ``root`` (names, kinds, file bytes, link targets); None if root is absent."""
    if not os.path.lexists(root):
        return None
    if root.is_symlink() or not root.is_dir():
        return {".": root.read_bytes() if root.is_file() else f"<{root.stat().st_mode:o}>"}
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                entries[rel] = "<dir>"
            else:
                entries[rel] = path.read_bytes()
    return entries


def describe_changes(before: dict | None, after: dict | None) -> str:
    if before is None or after is None:
        return f"{'absent' if before is None else 'present'} before, {'absent' if after is None else 'present'} after" + (
            f" (now holds: {sorted(after)[:10]})" if after else ""
        )
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added[:10]}, removed {removed[:10]}, changed {changed[:10]}"


RAN: dict[str, int | str] = {}  # case -> the launcher's exit code, filled as the cases run


def test_every_folder_is_a_case_and_the_docs_count_them():
    """Nothing in the corpus is left out: every entry besides the README and _shared is a case folder
    with a recipe and an expected message, and the docs' counts are the corpus's."""
    assert set(os.listdir(CORPUS)) - set(CASES) == {"README.md", "_shared"}
    assert IN_PROCESS < set(CASES), f"IN_PROCESS names no case: {sorted(IN_PROCESS - set(CASES))}"
    for case in CASES:
        folder = CORPUS / case
        assert folder.is_dir() and not folder.is_symlink(), f"{case}: not a folder"
        assert (folder / "recipe.yaml").is_file(), f"{case}: no recipe.yaml"
        assert (folder / "expected.txt").read_text().strip(), f"{case}: empty expected.txt"
        if (folder / "env.json").exists():
            env = json.loads((folder / "env.json").read_text())
            assert all(isinstance(v, str) for v in env.values()), f"{case}: env.json values must be strings"
    repo = CORPUS.parents[1]
    for doc, claim in (("README.md", r"a\s+corpus\s+of\s+(\d+)\s+broken"),
                       ("docs/failure-and-resume.md", r"holds\s+(\d+)\s+such\s+cases")):
        (count,) = re.findall(claim, (repo / doc).read_text())
        assert int(count) == len(CASES), f"{doc} says {count} cases, the corpus has {len(CASES)}"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_with_one_line_and_exit_2(case, assets, isolated_env, tmp_path, monkeypatch, capsys):
    case_dir = tmp_path / "case"
    shutil.copytree(CORPUS / case, case_dir, symlinks=True)
    out = tmp_path / "out"
    replacements = {
        b"@MODEL@": assets["model"].encode(),
        b"@CASE@": str(case_dir).encode(),
        b"@OUT@": str(out).encode(),
        b"@SHARED@": str(SHARED).encode(),
    }
    for path in sorted(case_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            content = original = path.read_bytes()
            for placeholder, value in replacements.items():
                content = content.replace(placeholder, value)
            if content != original:
                path.write_bytes(content)

    if (case_dir / "existing_run").is_dir():
        out.mkdir()
        shutil.copytree(case_dir / "existing_run", out / "run", symlinks=True)

    expected = (case_dir / "expected.txt").read_text(encoding="utf-8").strip()
    overrides = []
    if (case_dir / "overrides.txt").exists():
        lines = (case_dir / "overrides.txt").read_text(encoding="utf-8").splitlines()
        overrides = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    extra_env = {}
    if (case_dir / "env.json").exists():
        extra_env = json.loads((case_dir / "env.json").read_text(encoding="utf-8"))
    cwd = tmp_path / "cwd"  # an empty working directory: relative paths must come from the recipe's folder
    cwd.mkdir()

    out_before, case_before = snapshot(out), snapshot(case_dir)
    argv = ["train", str(case_dir / "recipe.yaml"), *overrides]
    if case in IN_PROCESS:
        returncode, stderr = train_in_process(argv, extra_env, cwd, monkeypatch, capsys)
    else:
        try:
            result = run_launcher(argv, {**isolated_env, **extra_env}, cwd=cwd, timeout=TIMEOUT)
            returncode, stderr = result.returncode, result.stderr
        except subprocess.TimeoutExpired as exc:
            returncode = "timeout"
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    RAN[case] = returncode

    problems = []
    if returncode != 2:
        problems.append(f"exit code {returncode}, expected 2 (bad input)")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} lines start with 'error:', expected exactly 1")
    if not any(expected in line for line in errors[:1]):
        problems.append(f"the error line does not contain {expected!r}")
    if "Traceback" in stderr:
        problems.append("a traceback was printed (without --verbose)")
    out_after = snapshot(out)
    if out_after != out_before:
        problems.append(f"the output directory changed: {describe_changes(out_before, out_after)}")
    case_after = snapshot(case_dir)
    if case_after != case_before:
        problems.append(f"the case folder (next to the recipe) changed: {describe_changes(case_before, case_after)}")
    assert not problems, (
        f"case {case}:\n  - " + "\n  - ".join(problems)
        + f"\nexpected in the error line: {expected}\nerror lines: {errors}\nSTDERR (tail):\n{stderr[-3000:]}"
    )


def test_every_case_ran(request):
    """Runs after the cases (pytest keeps file order): each case folder was run through the launcher
    in this session - none returned early or went missing from the parametrization."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_is_refused_with_one_line_and_exit_2"}
    if selected != set(CASES):
        pytest.skip(f"{len(selected)} of the {len(CASES)} cases were selected in this session")
    assert sorted(RAN) == CASES, f"not run: {sorted(set(CASES) - set(RAN))}"
