"""`launcher sweep --summary DIR`: one row per point of a sweep (from `DIR/sweep.json`), read from what
each point's run wrote: its status, steps, best validation metric (evaluation.best_metric, else the
task's headline metric) and test metrics, sorted best first in the metric's own direction (the task
says which metrics are lower-is-better). Written to DIR/summary.json and DIR/summary.md.

The files are written by the functions in WRITERS, each `(SweepSummary) -> Path`; another output (an
HTML report overlaying the points' curves) is one more function in that list.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..errors import LauncherError, RecipeError
from ..files import write_json_atomic, write_text_atomic
from ..recipe import validate_recipe
from ..report import write_report
from ..tasks import TASKS

PLAN_FILE = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"


@dataclass
class PointResult:
    index: int
    name: str
    overrides: list[str]
    run_dir: str
    status: str  # finished / stopped / running / new
    steps: int | None = None
    metric: str | None = None  # the metric the points are ranked by
    greater_is_better: bool | None = None
    best_validation: float | None = None
    best_step: int | None = None
    validation: dict[str, float] = field(default_factory=dict)  # the scalars of metrics.json "validation"
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class SweepSummary:
    directory: Path
    recipe: str
    points: list[PointResult]  # best first; points without a validation metric last, in sweep order

    def as_dict(self) -> dict:
        return {"directory": str(self.directory), "recipe": self.recipe, "points": [asdict(p) for p in self.points]}

    @property
    def run_dirs(self) -> list[Path]:
        return [Path(p.run_dir) for p in self.points]


def point_state(run_dir: Path) -> str:
    """finished / stopped / running / new, from what the run wrote (a crashed run still says running)."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    try:
        return json.loads((run_dir / "status.json").read_text()).get("state") or "unknown"
    except (OSError, ValueError):
        return "new"


def read_plan(directory: Path) -> dict:
    path = directory / PLAN_FILE
    if not directory.is_dir():
        raise LauncherError(f"--summary {directory}: not a directory; give a sweep directory (it holds {PLAN_FILE})")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LauncherError(f"--summary {directory}: no {PLAN_FILE} here; give the directory `launcher sweep` "
                            f"wrote (it prints it; default runs/<recipe name>-sweep)") from None
    except ValueError as exc:
        raise LauncherError(f"{path}: not valid JSON ({exc})") from None


def scalars(metrics: dict | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"}


def ranking_metric(recipe) -> tuple[str, bool]:
    """(metric, greater is better): evaluation.best_metric, else the first key of the first configured metric."""
    task = TASKS[recipe.task](recipe)
    evaluation = recipe.evaluation
    if evaluation.best_metric:
        return evaluation.best_metric, task.best_is_greater()
    first = (evaluation.metrics or list(task.default_metrics) or ["loss"])[0]
    headline = task.metric_keys.get(first, [first.split(":", 1)[-1]])[0]
    return headline, headline not in task.lower_is_better


def _saved_recipe(run_dir: Path):
    try:
        return validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}, str(run_dir / "recipe.yaml"))
    except (OSError, yaml.YAMLError, RecipeError):
        return None  # not started yet (or from another launcher version): no metric to rank by


def point_result(entry: dict) -> PointResult:
    run_dir = Path(entry["run_dir"])
    result = PointResult(index=entry["index"], name=entry["name"], overrides=list(entry["overrides"]),
                         run_dir=str(run_dir), status=point_state(run_dir))
    recipe = _saved_recipe(run_dir)
    if recipe is not None:
        result.metric, result.greater_is_better = ranking_metric(recipe)
    try:
        status = json.loads((run_dir / "status.json").read_text())
        result.steps = status.get("step")
    except (OSError, ValueError):
        pass
    if result.status != "finished":
        return result
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result.validation, result.test = scalars(metrics.get("validation")), scalars(metrics.get("test"))
    result.steps = (metrics.get("train") or {}).get("steps", result.steps)
    best = metrics.get("best")
    if best and best.get("metric") == result.metric:
        result.best_validation, result.best_step = best["value"], best["step"]
    elif result.metric in result.validation:
        result.best_validation = result.validation[result.metric]
    return result


def _sort_key(point: PointResult):
    value = point.best_validation
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, "", 0.0, point.index)
    return (0, point.metric or "", -value if point.greater_is_better else value, point.index)


def summarize(directory: Path) -> SweepSummary:
    directory = Path(directory)
    plan = read_plan(directory)
    points = sorted((point_result(entry) for entry in plan["points"]), key=_sort_key)
    return SweepSummary(directory=directory, recipe=plan.get("recipe", ""), points=points)


# ---- writing it -------------------------------------------------------------------------------------

def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(summary: SweepSummary) -> str:
    metrics = list(dict.fromkeys(p.metric for p in summary.points if p.metric)) or ["-"]
    metric = metrics[0] if len(metrics) == 1 else "metric"
    arrow = ""
    directions = {p.greater_is_better for p in summary.points if p.metric}
    if len(directions) == 1:
        arrow = " (higher is better)" if directions.pop() else " (lower is better)"
    # metrics.json's validation is the best evaluation's when evaluation.best_metric is set, else the last one's.
    header = ["rank", "point", "status", "steps", f"validation {metric}", "best step", f"test {metric}", "test loss"]
    rows = []
    for rank, point in enumerate(summary.points, 1):
        shown_metric = point.best_validation if len(metrics) == 1 else f"{point.metric}={_number(point.best_validation)}"
        rows.append([str(rank) if point.best_validation is not None else "-", point.name, point.status,
                     _number(point.steps), _number(shown_metric),
                     _number(point.best_step), _number(point.test.get(point.metric or "")), _number(point.test.get("loss"))])
    lines = [f"# Sweep summary: {summary.directory}", "",
             f"Recipe {summary.recipe}; {len(summary.points)} point(s), best first by validation {metric}{arrow}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(summary: SweepSummary) -> Path:
    path = summary.directory / SUMMARY_JSON
    write_json_atomic(path, summary.as_dict())
    return path


def write_markdown(summary: SweepSummary) -> Path:
    path = summary.directory / SUMMARY_MARKDOWN
    write_text_atomic(path, markdown_table(summary))
    return path


def write_overlay_report(summary: SweepSummary) -> Path | None:
    """DIR/report/index.html: every started point's curves overlaid and their final metrics side by side
    (launcher/report.py, as `launcher report RUN RUN ...`)."""
    started = [run for run in summary.run_dirs if (run / "metrics.jsonl").is_file()]
    return write_report(started, summary.directory / "report") if started else None


# What `--summary` (and the end of a local sweep) writes; another output is one more function here.
WRITERS: list[Callable[[SweepSummary], Path | None]] = [write_json, write_markdown, write_overlay_report]


def write_summary(summary: SweepSummary) -> list[Path]:
    return [path for path in (writer(summary) for writer in WRITERS) if path is not None]
