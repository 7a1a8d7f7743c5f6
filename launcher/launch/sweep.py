"""`launcher sweep`: one recipe, many override sets, one run directory per point.

The points come from a grid (`--grid training.learning_rate=1e-5,3e-5 --grid training.seed=1,2`: the
cartesian product, in the order given) and/or a `sweep:` file (`grid: {key: [values]}` and `points:
[{key: value}, ...]`; with both, every listed point is combined with every grid combination). Each
point is named after its overrides (`learning_rate=1e-05_seed=1`: stable, so a grown grid keeps the
points it already ran) and runs in `<sweep dir>/<name>/` with `output.dir` set to it.

Every point is checked before any starts: first each point's recipe (cheap: a bad value in point 5
is one line naming the point and the key), then each point's full launch plan (the checks `launcher
run` makes: batch arithmetic, data, the run directory). Then, locally, the points run one after
another through the same `execute` as `launcher run` (finished points are skipped, a stopped one
resumes from its checkpoint, a stop request stops the sweep with exit 75); on Slurm they become one
job array (launch/slurm.py renders it from the same template as a single job).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..engine.outputs import recipe_differences
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_STOPPED, LauncherError, RecipeError
from ..files import write_json_atomic
from ..recipe import load_recipe, parse_override
from ..schema import Recipe
from ..tasks import TASKS
from .local import execute
from .plan import LaunchPlan, LaunchRequest, build_plan, free_port
from .slurm import SlurmRequest, array_spec, check_request, sbatch_path, submit, write_array_job
from .sweep_summary import PLAN_FILE, point_state, summarize, write_summary

SWEEP_FILE_KEYS = ("grid", "points")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 100


@dataclass(frozen=True)
class SweepPoint:
    index: int
    name: str
    settings: dict[str, str]  # dotted key -> the override's value text, as the recipe parses it
    run_dir: Path

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings.items()]


@dataclass
class Sweep:
    recipe_path: Path
    base_overrides: list[str]  # the command line's KEY=VALUE, under every point's own
    directory: Path
    points: list[SweepPoint]

    def overrides(self, point: SweepPoint) -> list[str]:
        """What the point's recipe is loaded with: the sweep's overrides, the point's, its run directory."""
        return [*self.base_overrides, *point.overrides, f"output.dir={json.dumps(str(point.run_dir))}"]

    def as_dict(self) -> dict:
        return {
            "recipe": str(self.recipe_path),
            "overrides": self.base_overrides,
            "directory": str(self.directory),
            "points": [{"index": p.index, "name": p.name, "overrides": p.overrides, "run_dir": str(p.run_dir)}
                       for p in self.points],
        }


# ---- the points ----------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """`1e-5,3e-5` -> ['1e-5', '3e-5']; commas inside [...], {...} or quotes stay (`[a,b],[c]` is two values).
    Own code: csv splits inside brackets, and a YAML flow list would read `1e-5,3e-5` as one string."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values


def parse_grid_args(args: list[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2` options -> {KEY: [V1, V2]} (value texts, parsed later as the recipe parses overrides)."""
    grid: dict[str, list[str]] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--grid {arg!r}: expected KEY=V1,V2,... with a dotted key, e.g. --grid training.seed=1,2,3")
        values = split_values(raw)
        if any(not value for value in values):
            raise RecipeError(f"--grid {arg!r}: an empty value; give values separated by commas, e.g. {key}=1,2,3")
        if key in grid:
            raise RecipeError(f"--grid {key}: given twice; put all its values in one --grid {key}=V1,V2,...")
        grid[key] = values
    return grid


def value_text(value: Any) -> str:
    """A YAML value from a sweep file as override text that the recipe parses back to the same value."""
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else None
        if parsed == value:
            return value
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text[:-len("...")].strip() if text.endswith("\n...") else text


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def read_sweep_file(path: Path) -> tuple[dict[str, list[str]], list[dict[str, str]] | None]:
    """A sweep file -> (grid, points); values as override text. Every problem is one line naming the key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"--sweep {path}: file not found") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"--sweep {path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"{path}: a sweep file is a mapping with grid: and/or points:, e.g. grid: {{training.seed: [1, 2]}}")
    for key in data:
        if key not in SWEEP_FILE_KEYS:
            raise RecipeError(f"{path}: {key}: unknown key{_did_you_mean(str(key), SWEEP_FILE_KEYS)}; "
                              f"a sweep file has {' and/or '.join(SWEEP_FILE_KEYS)}")
    grid: dict[str, list[str]] = {}
    raw_grid = data.get("grid") or {}
    if not isinstance(raw_grid, dict):
        raise RecipeError(f"{path}: grid: must map dotted recipe keys to lists of values, e.g. training.seed: [1, 2]")
    for key, values in raw_grid.items():
        _check_key(path, f"grid.{key}", key, values)
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{path}: grid.{key}: give a non-empty list of values, e.g. {key}: [1, 2]")
        grid[str(key)] = [value_text(v) for v in values]
    points = None
    if "points" in data:
        raw_points = data["points"]
        if not isinstance(raw_points, list) or not raw_points:
            raise RecipeError(f"{path}: points: give a non-empty list of mappings, e.g. - {{training.learning_rate: 1.0e-5}}")
        points = []
        for number, point in enumerate(raw_points, 1):
            if not isinstance(point, dict):
                raise RecipeError(f"{path}: points[{number}]: must be a mapping of dotted recipe keys to values")
            for key, value in point.items():
                _check_key(path, f"points[{number}].{key}", key, value)
            points.append({str(k): value_text(v) for k, v in point.items()})
    return grid, points


def _check_key(path: Path, where: str, key, value) -> None:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"{path}: {where}: keys are dotted recipe keys, e.g. training.learning_rate")
    if isinstance(value, dict):
        raise RecipeError(f"{path}: {where}: a section; name each key in full instead, e.g. {key}.{next(iter(value), 'key')}")


def expand(grid: dict[str, list[str]], points: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Every point's settings, in a fixed order: each listed point (or one empty point) x the grid's
    cartesian product (the first key varies slowest)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{**point, **combo} for point in (points or [{}]) for combo in combos]


def _name_value(text: str) -> str:
    value = parse_override(f"x={text}")[1]
    if isinstance(value, str):
        try:
            value = float(value)  # YAML reads 1e-5 (no dot) as a string; the recipe reads it as a number
        except ValueError:
            return value
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return value_text(value)


def point_names(settings: list[dict[str, str]]) -> list[str]:
    """Stable, filesystem-safe names from the overrides: `learning_rate=1e-05_seed=1`. A key is shown by
    its last part unless two swept keys share it; names that would collide get a short hash."""
    keys = list(dict.fromkeys(k for point in settings for k in point))
    short = {}
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        short[key] = last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key
    names = []
    for point in settings:
        name = "_".join(f"{short[k]}={_name_value(v)}" for k, v in point.items()) or "base"
        name = _NAME_UNSAFE.sub("-", name).strip("-.") or "point"
        if len(name) > _MAX_NAME:
            name = name[:_MAX_NAME] + "-" + _digest(point)
        names.append(name)
    counts = {name: names.count(name) for name in names}
    return [f"{name}-{_digest(point)}" if counts[name] > 1 else name for name, point in zip(names, settings)]


def _digest(point: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]


def default_directory(recipe_path: Path, overrides: list[str]) -> Path:
    return Path("runs") / f"{load_recipe(recipe_path, overrides).name}-sweep"


def make_sweep(recipe_path: str | Path, base_overrides: list[str], grid: dict[str, list[str]],
               points: list[dict[str, str]] | None, directory: Path | None) -> Sweep:
    recipe_path = Path(recipe_path)
    settings = expand(grid, points)
    if not grid and not points:
        raise RecipeError("launcher sweep: no points; give --grid KEY=V1,V2 (repeatable) or --sweep FILE")
    for text in base_overrides:
        if parse_override(text)[0] == ["output", "dir"]:
            raise RecipeError(f"override {text!r}: a sweep sets output.dir for each point; use --dir for the sweep directory")
    for point in settings:
        if "output.dir" in point:
            raise RecipeError("sweep: output.dir is set for each point (<sweep dir>/<point name>); use --dir instead")
        for key, value in point.items():
            if "\n" in value:
                raise RecipeError(f"sweep: {key}: a value with a line break ({value!r}); give it on one line")
    directory = (directory or default_directory(recipe_path, base_overrides)).resolve()
    names = point_names(settings)
    return Sweep(recipe_path, list(base_overrides), directory,
                 [SweepPoint(i, name, point, directory / name) for i, (name, point) in enumerate(zip(names, settings))])


def _describe(point: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "no overrides"


# ---- checking every point before any starts ------------------------------------------------------

def _point_error(point: SweepPoint, exc: LauncherError) -> LauncherError:
    error = type(exc)(f"sweep point {point.index} ({point.name}): {exc}")
    error.exit_code = exc.exit_code
    return error


def load_point_recipes(sweep: Sweep) -> list[Recipe]:
    """Every point's recipe (cheap; the whole sweep is refused at the first bad point, or at a point
    whose recipe equals an earlier one's: training.seed=1 and training.seed=1.0 are one run)."""
    recipes: list[Recipe] = []
    seen: dict[str, int] = {}
    for point in sweep.points:
        try:
            recipe = load_recipe(sweep.recipe_path, sweep.overrides(point))
        except LauncherError as exc:
            raise _point_error(point, exc) from None
        identity = recipe.model_dump(mode="json")
        identity["output"].pop("dir")
        identity = json.dumps(identity, sort_keys=True)
        if identity in seen:
            raise RecipeError(f"sweep point {point.index} ({_describe(point.settings)}) gives the same recipe as point "
                              f"{seen[identity]}; remove the duplicate")
        seen[identity] = point.index
        recipes.append(recipe)
    return recipes


def check_finished(point: SweepPoint, recipe: Recipe) -> None:
    """A finished point is skipped only if it is a run of this point's recipe."""
    saved = yaml.safe_load((point.run_dir / "recipe.yaml").read_text()) if (point.run_dir / "recipe.yaml").is_file() else {}
    differences = recipe_differences(saved or {}, recipe.model_dump(mode="json"))
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise LauncherError(
            f"sweep point {point.index} ({point.name}): {point.run_dir} holds a finished run of a different recipe "
            f"({shown}); choose another --dir, or delete that directory to run the point again"
        )


def plan_points(sweep: Sweep, request: LaunchRequest) -> tuple[dict[int, LaunchPlan], list[int]]:
    """Launch plans for the points still to run, and the indices of the finished ones (skipped)."""
    recipes = load_point_recipes(sweep)
    plans, finished = {}, []
    for point, recipe in zip(sweep.points, recipes):
        if point_state(point.run_dir) == "finished":
            try:
                TASKS[recipe.task](recipe).check_limits()  # as the run did: a default length may be lowered
            except LauncherError as exc:
                raise _point_error(point, exc) from None
            check_finished(point, recipe)
            finished.append(point.index)
            continue
        try:
            plans[point.index] = build_plan(sweep.recipe_path, sweep.overrides(point), request)
        except LauncherError as exc:
            raise _point_error(point, exc) from None
    return plans, finished


def print_points(sweep: Sweep, plans: dict[int, LaunchPlan], finished: list[int]) -> None:
    print(f"sweep of {len(sweep.points)} point(s) over {sweep.recipe_path} in {sweep.directory}")
    width = max(len(p.name) for p in sweep.points)
    for point in sweep.points:
        plan = plans.get(point.index)
        if plan is None:
            what = "finished: skipped"
        else:
            steps = "?" if plan.total_steps is None else plan.total_steps  # a dry run without the (Hub) data
            what = (f"{steps} steps on {plan.nodes}x{plan.procs_per_node} {plan.device}, "
                    + (f"resuming from {plan.resume_from.name}" if plan.resume_from else "new"))
        print(f"  {point.index:>3}  {point.name:<{width}}  {what}")


def write_sweep_file(sweep: Sweep) -> Path:
    path = sweep.directory / PLAN_FILE
    write_json_atomic(path, sweep.as_dict())
    return path


# ---- running the points here, one after another --------------------------------------------------

def run_local(sweep: Sweep, request: LaunchRequest, dry_run: bool = False) -> int:
    plans, finished = plan_points(sweep, request)
    print_points(sweep, plans, finished)
    if dry_run:
        print("dry run: nothing started, nothing written")
        return EXIT_OK
    write_sweep_file(sweep)
    failed, stop = [], []

    def request_stop(signum, frame):  # between points (during one, execute() asks its ranks to stop)
        print(f"launcher sweep: {signal.Signals(signum).name}: stopping before the next point", file=sys.stderr, flush=True)
        stop.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return _run_points(sweep, request, plans, failed, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_points(sweep: Sweep, request: LaunchRequest, plans: dict[int, LaunchPlan], failed: list, stop: list) -> int:
    for point in sweep.points:
        plan = plans.get(point.index)
        if plan is None:
            continue
        if stop:
            print(f"sweep stopped before point {point.index} ({point.name}); run the same command again to resume "
                  f"(finished points are skipped)", file=sys.stderr)
            return EXIT_STOPPED
        print(f"\n=== sweep point {point.index} of {len(sweep.points)}: {point.name} ===", flush=True)
        if plan.main_port is not None and request.main_port is None:
            # Chosen when the plan was made, possibly minutes ago: take one that is free now.
            plan = replace(plan, main_port=free_port())
        code = execute(plan)
        if code == EXIT_STOPPED:
            print(f"sweep stopped at point {point.index} ({point.name}); run the same command again to resume "
                  f"(finished points are skipped)", file=sys.stderr)
            return EXIT_STOPPED
        if code != EXIT_OK:
            failed.append(point)
            print(f"sweep point {point.index} ({point.name}) failed (exit {code}); going on with the next point",
                  file=sys.stderr, flush=True)
    summary_paths = write_summary(summarize(sweep.directory))
    if failed:
        print(f"sweep: {len(failed)} point(s) failed: {', '.join(p.name for p in failed)}; run the same command "
              f"again to retry them (finished points are skipped)", file=sys.stderr)
        return EXIT_FAILURE
    print(f"sweep finished: {len(sweep.points)} point(s); summary: {', '.join(str(p) for p in summary_paths)}")
    return EXIT_OK


# ---- or as one Slurm job array -------------------------------------------------------------------

def run_slurm(sweep: Sweep, request: LaunchRequest, slurm: SlurmRequest, limit: int | None = None,
              submit_now: bool = False) -> int:
    """Render (and submit) one job array: a task per point still to run, each a whole job of its own."""
    check_request(slurm)
    if limit is not None and limit < 1:
        raise LauncherError(f"--array {limit}: at least 1 point must be able to run at a time")
    if submit_now:
        sbatch_path()  # fail before writing anything if it cannot be submitted
    plans, finished = plan_points(sweep, request)
    print_points(sweep, plans, finished)
    if not plans:
        print(f"every point is finished; nothing to submit (summary: launcher sweep --summary {sweep.directory})")
        return EXIT_OK
    write_sweep_file(sweep)
    script = write_array_job(plans, [p.run_dir for p in sweep.points], slurm, sweep.directory, limit)
    print(f"sbatch script: {script} (job array {array_spec(sorted(plans), limit)}: one task per point to run)")
    if submit_now:
        print(f"submitted job array {submit(script)}")
    else:
        print(f"submit with: sbatch {script}")
    return EXIT_OK
