"""Continual learning (`continual:` in a recipe, run by `launcher run`): stages trained one after another,
one model carried through, and the forgetting matrix.

Each stage is a normal run (`launcher run`'s own path: plan, accelerate launch, checkpoints) in
`<output.dir>/stages/<index>-<name>/`, of the recipe with the stage's `data:`/`training:` keys over it,
`model.name_or_path` = the previous stage's export, and `data.labels` = the shared label space (the union of
the stages' label sets, in stage order, fixed before the first stage: one head, sized for every stage). With
`label_space: per_stage` each stage's recipe also gets `data.label_groups` = the stages' label sets, and the
task scores every example (trained, replayed or evaluated) among its own label's group only.
After stage i its export is evaluated (`launcher eval --jobs`, one process for the whole row: evaluation is exact
on any number of ranks) on the test split of every stage j <= i: the forgetting matrix. A finished stage and an evaluated cell
are skipped when the same command runs again, and an interrupted stage resumes from its checkpoint, so a
killed continual run resumes exactly.

replay: before stage i > 0, a buffer of earlier stages' training rows (an equal share per stage, chosen by
`replay.seed`: a pure function of the seed and the data) is written to `<stage>/replay/buffer.jsonl`, and
the stage trains on `<stage>/replay/train.jsonl`: its own training rows plus `ratio` of replayed ones, which
the run's seeded permutation spreads over the global batches. The files are written once, by this process,
before the stage's ranks start: every rank reads the same rows, and a resumed stage the same file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from ..data import load_validated_splits
from ..engine.ewc import FISHER_FILE
from ..engine.outputs import output_dir_for, recipe_differences
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_STOPPED, LauncherError
from ..files import write_json_atomic, write_text_atomic
from ..forgetting import summarize, table
from ..recipe import load_recipe
from ..report import write_report
from ..schema import ContinualSection
from ..tasks import TASKS
from ..tasks.classification import label_key
from .local import execute, print_plan
from .plan import LaunchRequest, build_plan, free_port
from .sweep_summary import point_state

PLAN_FILE = "continual.json"
SUPPORTED_TASKS = ("sequence_classification",)


@dataclass
class Stage:
    index: int
    name: str
    run_dir: Path
    own_overrides: list[str]  # the stage's data.* and training.* keys
    train_rows: list[dict] = field(default_factory=list)  # its training split, columns normalized (replay's pool)
    splits: dict = field(default_factory=dict)  # its validation/test rows, normalized (replay rewrites them)

    @property
    def export(self) -> Path:
        return self.run_dir / "model"

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "continual-eval"


@dataclass
class ContinualRun:
    recipe_path: Path
    base_overrides: list[str]
    settings: ContinualSection
    directory: Path
    stages: list[Stage]
    labels: list[str]
    columns: dict  # stage index -> {"text": ..., "text_pair": ..., "label": ...} column names
    label_groups: list[list[str]] = field(default_factory=list)  # label_space per_stage: the stages' label sets

    def overrides(self, stage: Stage, *, training: bool = True) -> list[str]:
        """Stage `stage`'s recipe: the user's overrides, no continual section, the stage's keys, the shared
        labels, its run directory, the previous stage's export (and, with replay, the mixed training file)."""
        result = [*self.base_overrides, "continual=null", *stage.own_overrides,
                  f"data.labels={json.dumps(self.labels)}", f"output.dir={json.dumps(str(stage.run_dir))}"]
        if self.label_groups:
            result.append(f"data.label_groups={json.dumps(self.label_groups)}")
        if stage.index > 0:
            result.append(f"model.name_or_path={json.dumps(str(self.stages[stage.index - 1].export))}")
        if training and self.settings.strategy == "ewc" and stage.index > 0:
            result += [f"ewc.fisher={json.dumps(str(fisher_dir(stage) / FISHER_FILE))}",
                       f"ewc.weight={self.settings.ewc.weight}"]
        if training and self.settings.strategy == "replay" and stage.index > 0:
            replay_dir = stage.run_dir / "replay"
            result += [f"data.train={json.dumps(str(replay_dir / 'train.jsonl'))}", "data.max_train_samples=null",
                       "data.dataset=null"]
            for split in ("validation", "test"):
                # The carved (or given) splits, as files: carving again from the mixed file would change them.
                value = json.dumps(str(replay_dir / f"{split}.jsonl")) if split in stage.splits else "null"
                result.append(f"data.{split}={value}")
            result += ["data.validation_size=0", "data.test_size=0"]
        return result

    def as_dict(self) -> dict:
        return {"recipe": str(self.recipe_path), "overrides": self.base_overrides, "directory": str(self.directory),
                "strategy": self.settings.strategy, "labels": self.labels,
                "label_space": self.settings.label_space, "label_groups": self.label_groups or None,
                "replay": self.settings.replay.model_dump() if self.settings.replay else None,
                "ewc": self.settings.ewc.model_dump() if self.settings.ewc else None,
                "stages": [{"index": s.index, "name": s.name, "run_dir": str(s.run_dir)} for s in self.stages]}


def is_continual(recipe_path: str | Path, overrides: list[str]) -> bool:
    return load_recipe(recipe_path, overrides).continual is not None


def _value(value) -> str:
    return json.dumps(value)


def _stage_error(index: int, name: str, exc: LauncherError) -> LauncherError:
    error = type(exc)(f"continual.stages[{index}] ({name}): {exc}")
    error.exit_code = exc.exit_code
    return error


def make_continual(recipe_path: str | Path, overrides: list[str]) -> ContinualRun:
    """Every stage's recipe loaded and its data read (labels, columns, test split) before any work."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    settings = recipe.continual
    if recipe.task not in SUPPORTED_TASKS:
        raise LauncherError(f"continual: task {recipe.task} is not supported; continual runs share one label space "
                            f"across stages, which task {' or '.join(SUPPORTED_TASKS)} has")
    if recipe.finetune.method != "full" and not recipe.finetune.merge_on_export:
        raise LauncherError(f"continual: finetune.method={recipe.finetune.method} exports an adapter, not a model the "
                            f"next stage can start from; use method full, or set finetune.merge_on_export=true")
    if settings.metric not in recipe.evaluation.metrics:
        raise LauncherError(f"continual.metric: {settings.metric!r} is not among evaluation.metrics "
                            f"({', '.join(recipe.evaluation.metrics)}); add it there or choose one of them")
    directory = output_dir_for(recipe).resolve()
    stages = []
    for index, spec in enumerate(settings.stages):
        own = [f"data.{k}={_value(v)}" for k, v in spec.data.items()] + \
              [f"training.{k}={_value(v)}" for k, v in spec.training.items()]
        stages.append(Stage(index, spec.name, directory / "stages" / f"{index}-{spec.name}", own))
    run = ContinualRun(recipe_path, list(overrides), settings, directory, stages, [], {})
    labels: list[str] = []
    stage_labels: list[list[str]] = []
    for stage in stages:
        stage_overrides = [o for o in run.overrides(stage, training=False) if not o.startswith("data.labels=")]
        try:
            stage_recipe = load_recipe(recipe_path, stage_overrides)
            data = stage_recipe.data
            if data.test is None and data.test_size == 0:
                raise LauncherError("no test split for the forgetting matrix; give data.test or data.test_size")
            task = TASKS[stage_recipe.task](stage_recipe)
            prepared = load_validated_splits(stage_recipe, task)
        except LauncherError as exc:
            raise _stage_error(stage.index, stage.name, exc) from None
        labels += [name for name in task.label_names if name not in labels]
        stage_labels.append(list(task.label_names))
        columns = {"text": data.text_column, "text_pair": data.text_pair_column, "label": data.label_column}
        run.columns[stage.index] = columns
        if settings.strategy == "replay":
            stage.train_rows = _normalized(prepared.raw["train"], columns)
            stage.splits = {split: _normalized(prepared.raw[split], columns)
                            for split in ("validation", "test") if split in prepared.raw}
    if settings.strategy == "replay":
        pairs = {run.columns[s.index]["text_pair"] is not None for s in stages}
        if len(pairs) > 1:
            raise LauncherError("continual: replay mixes rows of every stage into one file; the stages must all have "
                                "data.text_pair_column, or none")
    run.labels = labels
    if settings.label_space == "per_stage":
        run.label_groups = label_groups(stage_labels, [s.name for s in stages])
    return run


def label_groups(stage_labels: list[list[str]], names: list[str]) -> list[list[str]]:
    """label_space per_stage: the distinct label sets of the stages (in stage order), each a group an example
    is scored within, found by the example's label; so a label may belong to one set only."""
    groups: list[list[str]] = []
    owner: dict[str, int] = {}
    for index, own in enumerate(stage_labels):
        if any(set(own) == set(group) for group in groups):
            continue
        for name in own:
            if name in owner:
                raise LauncherError(f"continual.label_space: per_stage scores each example among its own stage's "
                                    f"labels, found by its label, but label {name!r} is in stage {owner[name]} "
                                    f"({names[owner[name]]}) and stage {index} ({names[index]}) with different label "
                                    f"sets; give the stages equal or disjoint label sets, or use label_space: shared")
            owner[name] = index
        groups.append(list(own))
    return groups


def _normalized(dataset, columns: dict) -> list[dict]:
    rows = []
    for row in dataset:
        normalized = {"text": row[columns["text"]], "label": label_key(row[columns["label"]])}
        if columns["text_pair"]:
            normalized["text_pair"] = row[columns["text_pair"]]
        rows.append(normalized)
    return rows


# ---- replay --------------------------------------------------------------------------------------

def replay_buffer(pools: list[list[dict]], buffer_size: int, seed: int) -> list[dict]:
    """The buffer before a stage: an equal share of `buffer_size` from each earlier stage's training rows
    (the first stages take the remainder), each share a seeded draw without replacement. A pure function of
    the seed and the rows: every rank and every resumption gets the same buffer."""
    shares = [buffer_size // len(pools) + (1 if j < buffer_size % len(pools) else 0) for j in range(len(pools))]
    buffer = []
    for stage, (rows, share) in enumerate(zip(pools, shares)):
        chosen = np.random.default_rng([seed, 0, stage]).permutation(len(rows))[:share]
        buffer += [{"stage": stage, "row": int(r), **rows[r]} for r in chosen]
    return buffer


def replay_count(own_rows: int, ratio: float, buffer_rows: int) -> int:
    """Replayed rows so that they are `ratio` of the mixed training set (at most the whole buffer)."""
    return min(buffer_rows, round(ratio * own_rows / (1 - ratio)))


def replay_rows(buffer: list[dict], count: int, seed: int, stage: int) -> list[dict]:
    chosen = np.random.default_rng([seed, 1, stage]).permutation(len(buffer))[:count]
    return [buffer[k] for k in sorted(chosen)]


def _renamed(rows: list[dict], columns: dict) -> list[dict]:
    names = {"text": columns["text"], "text_pair": columns["text_pair"], "label": columns["label"]}
    return [{names[k]: v for k, v in row.items() if k in names} for row in rows]


def _write_once(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.is_file():
        if path.read_text() != text:
            raise LauncherError(f"{path}: differs from the replay rows this recipe and its data give now (the data or "
                                f"replay settings changed since the stage started); delete {path.parent.parent} to run "
                                f"the stage again, or restore the data")
        return
    write_text_atomic(path, text)


def write_replay_files(run: ContinualRun, stage: Stage) -> str:
    """The stage's buffer and mixed training file (and its validation/test rows); a line saying what they hold."""
    settings = run.settings.replay
    buffer = replay_buffer([s.train_rows for s in run.stages[: stage.index]], settings.buffer_size, settings.seed)
    count = replay_count(len(stage.train_rows), settings.ratio, len(buffer))
    replayed = replay_rows(buffer, count, settings.seed, stage.index)
    columns = run.columns[stage.index]
    directory = stage.run_dir / "replay"
    _write_once(directory / "buffer.jsonl", buffer)
    _write_once(directory / "train.jsonl", _renamed(stage.train_rows + replayed, columns))
    for split, rows in stage.splits.items():
        _write_once(directory / f"{split}.jsonl", _renamed(rows, columns))
    share = count / (count + len(stage.train_rows))
    return (f"replay: {len(buffer)} rows in the buffer, {count} replayed + {len(stage.train_rows)} new "
            f"({share:.1%} replayed)")


# ---- running --------------------------------------------------------------------------------------

def check_finished(run: ContinualRun, stage: Stage) -> None:
    """A finished stage is skipped only if it is a run of this stage's recipe."""
    saved = yaml.safe_load((stage.run_dir / "recipe.yaml").read_text()) if (stage.run_dir / "recipe.yaml").is_file() else {}
    current = load_recipe(run.recipe_path, run.overrides(stage)).model_dump(mode="json")
    differences = recipe_differences(saved or {}, current)
    if differences:
        raise LauncherError(f"continual stage {stage.index} ({stage.name}): {stage.run_dir} holds a finished run of a "
                            f"different recipe ({'; '.join(differences[:3])}); choose another output.dir, or delete "
                            f"that directory to run the stage again")


def print_stages(run: ContinualRun) -> None:
    print(f"continual run of {len(run.stages)} stages ({run.settings.strategy}) in {run.directory}")
    if run.label_groups:
        print(f"  one head over {len(run.labels)} labels, label_space per_stage: each example scored among its own "
              f"stage's: {' | '.join(', '.join(g) for g in run.label_groups)}")
    else:
        print(f"  shared label space ({len(run.labels)}): {', '.join(run.labels)}")
    for stage in run.stages:
        state = point_state(stage.run_dir)
        print(f"  {stage.index:>3}  {stage.name}  {'finished: skipped' if state == 'finished' else state}")


def run_continual(recipe_path: str | Path, overrides: list[str], request: LaunchRequest, dry_run: bool = False) -> int:
    if request.nodes > 1:
        raise LauncherError("continual: a continual run goes stage after stage on this machine; --nodes > 1 is not "
                            "supported (run each stage's recipe with launcher run/slurm by hand)")
    run = make_continual(recipe_path, overrides)
    print_stages(run)
    first = run.stages[0]
    finished = {s.index for s in run.stages if point_state(s.run_dir) == "finished"}
    for stage in run.stages:
        if stage.index in finished:
            check_finished(run, stage)
    if dry_run:
        if first.index not in finished:
            print_plan(build_plan(run.recipe_path, run.overrides(first), request))
        print("dry run: nothing started, nothing written (later stages are planned when the one before has finished)")
        return EXIT_OK
    write_json_atomic(run.directory / PLAN_FILE, run.as_dict())
    stop: list[int] = []

    def request_stop(signum, frame):  # between stages (during one, execute() asks its ranks to stop)
        print(f"launcher run: {signal.Signals(signum).name}: stopping before the next stage", file=sys.stderr, flush=True)
        stop.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for stage in run.stages:
            code = _run_stage(run, stage, request, finished, stop)
            if code != EXIT_OK:
                return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = write_matrix(run)
    sys.stdout.write(table([s.name for s in run.stages], result["matrix"], result["metric"]))
    print(f"average accuracy {result['average_accuracy']:.4f}, average forgetting {result['average_forgetting']:.4f}, "
          f"backward transfer {result['backward_transfer']:.4f}; {run.directory / 'metrics.json'}")
    if load_recipe(run.recipe_path, run.base_overrides).output.report:
        _report(run)
    return EXIT_OK


def _report(run: ContinualRun) -> None:
    """The run's page (the matrix, the summary, each stage's report linked), as a finished run writes its own."""
    try:
        print(f"report: {write_report([run.directory])}")
    except Exception as exc:  # noqa: BLE001 - the matrix is on record; the report can be rebuilt
        print(f"continual: could not write the report ({type(exc).__name__}: {exc}); retry with: launcher report "
              f"{run.directory}", file=sys.stderr)


def _stopped(stage: Stage) -> int:
    print(f"continual run stopped at stage {stage.index} ({stage.name}); run the same command again to resume "
          f"(finished stages are skipped)", file=sys.stderr)
    return EXIT_STOPPED


def _run_stage(run: ContinualRun, stage: Stage, request: LaunchRequest, finished: set, stop: list) -> int:
    if stop:
        return _stopped(stage)
    if stage.index not in finished:
        print(f"\n=== continual stage {stage.index} of {len(run.stages)}: {stage.name} ===", flush=True)
        if run.settings.strategy == "replay" and stage.index > 0:
            print(write_replay_files(run, stage), flush=True)
        if run.settings.strategy == "ewc" and stage.index > 0:
            code = _fisher(run, stage)
            if code != EXIT_OK:
                return code
        plan = build_plan(run.recipe_path, run.overrides(stage), request)
        if plan.main_port is not None and request.main_port is None:
            plan = replace(plan, main_port=free_port())
        code = execute(plan)
        if code == EXIT_STOPPED:
            return _stopped(stage)
        if code != EXIT_OK:
            print(f"continual stage {stage.index} ({stage.name}) failed (exit {code}); run the same command again "
                  f"to retry it (finished stages are skipped)", file=sys.stderr)
            return code
    if stop:
        return _stopped(stage)
    return _evaluate(run, stage, run.stages[: stage.index + 1])


def fisher_dir(stage: Stage) -> Path:
    return stage.run_dir / "ewc"


def _fisher(run: ContinualRun, stage: Stage) -> int:
    """The previous stage's Fisher (on its own training data, at its export), unless already on record."""
    previous = run.stages[stage.index - 1]
    if (fisher_dir(stage) / FISHER_FILE).is_file():
        return EXIT_OK
    command = [sys.executable, "-m", "launcher", "fisher", str(run.recipe_path), *run.overrides(previous, training=False),
               "--checkpoint", str(previous.export), "--output", str(fisher_dir(stage)),
               "--samples", str(run.settings.ewc.fisher_samples)]
    print(f"--- ewc: the Fisher of {previous.name}'s model on its training data", flush=True)
    code = subprocess.run(command).returncode
    if code != EXIT_OK:
        print(f"continual: the Fisher of stage {previous.index} failed (exit {code}); run the same command again "
              f"to retry", file=sys.stderr)
        return code if code == 2 else EXIT_FAILURE
    return EXIT_OK


def cell_path(trained: Stage, seen: Stage) -> Path:
    return trained.eval_dir / f"{seen.index}-{seen.name}" / "test.json"


def _evaluate(run: ContinualRun, trained: Stage, seen: list[Stage]) -> int:
    """Stage `trained`'s export on the test split of every stage in `seen` whose cell is not on record yet, in
    one process (`launcher eval --jobs`: evaluation is exact on any number of ranks; one process start per
    stage instead of one per cell)."""
    pending = [s for s in seen if not cell_path(trained, s).is_file()]
    if not pending:
        return EXIT_OK
    jobs = trained.eval_dir / "jobs.json"
    write_json_atomic(jobs, [{"overrides": run.overrides(s, training=False), "output": str(cell_path(trained, s).parent)}
                             for s in pending])
    command = [sys.executable, "-m", "launcher", "eval", str(run.recipe_path), "--checkpoint", str(trained.export),
               "--split", "test", "--jobs", str(jobs)]
    print(f"--- after {trained.name}: evaluating on the test split of {', '.join(s.name for s in pending)}", flush=True)
    code = subprocess.run(command).returncode
    if code != EXIT_OK:
        print(f"continual: evaluating stage {trained.index}'s model on the stages' test splits failed (exit {code}); "
              f"run the same command again to retry (finished cells are kept)", file=sys.stderr)
        return code if code == 2 else EXIT_FAILURE
    return EXIT_OK


def read_matrix(run: ContinualRun) -> list[list[float]]:
    metric = run.settings.metric
    matrix = []
    for trained in run.stages:
        row = []
        for seen in run.stages[: trained.index + 1]:
            metrics = json.loads(cell_path(trained, seen).read_text())["metrics"]
            if metric not in metrics:
                raise LauncherError(f"continual.metric: {metric!r} is not among the evaluation's metrics "
                                    f"({', '.join(metrics)}); set continual.metric to one of them")
            row.append(metrics[metric])
        matrix.append(row)
    return matrix


def write_matrix(run: ContinualRun) -> dict:
    matrix = read_matrix(run)
    result = {"strategy": run.settings.strategy, "metric": run.settings.metric,
              "stages": [s.name for s in run.stages], "labels": run.labels,
              "label_space": run.settings.label_space, "label_groups": run.label_groups or None, "matrix": matrix,
              **summarize(matrix),
              "cells": [[str(cell_path(t, s)) for s in run.stages[: t.index + 1]] for t in run.stages]}
    write_json_atomic(run.directory / "metrics.json", {"continual": result})
    return result
