"""Experiment trackers behind one seam: the training loop reports events (the dicts that go to
metrics.jsonl); a ``Tracker`` turns them into scalars for TensorBoard, MLflow and W&B.

The trackers are accelerate's (``Accelerator(log_with=...)``, ``init_trackers``, each tracker's
``log``), on rank 0 only. Adding a tracker is adding it to ``TRACKER_PACKAGES`` and, if it needs a run
identity to resume, to ``_init_kwargs`` / ``identity`` below; the engine does not change.

A run that resumes from a checkpoint continues the same tracker run, without duplicate or missing
steps. Each checkpoint stores ``identity()``; on resume:
  - TensorBoard writes to the same directory with ``purge_step`` = resumed step + 1: its readers drop
    what the interrupted attempt wrote after the checkpoint, and the steps are written again.
  - MLflow reopens the same run id; W&B the same id with ``resume="allow"``. Neither can delete
    logged values, so what the interrupted attempt already logged (up to the step the tracker reports)
    is not sent again: a resumed run repeats those steps exactly (the resume invariant), so the
    values logged once are the values.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path

from .errors import LauncherError, TrainingError
from .schema import Recipe

# recipe name -> the Python package it needs (checked before any work starts)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"


def check_trackers(recipe: Recipe) -> None:
    """One line naming a tracker whose package is missing (before data, model or run directory)."""
    for name in recipe.tracking.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise LauncherError(
                f"tracking.report_to: {name} is not installed; pip install {TRACKER_PACKAGES[name]}, or remove it "
                f"from tracking.report_to (now {recipe.tracking.report_to})"
            )


def accelerator_kwargs(recipe: Recipe, run_dir: Path) -> dict:
    """What ``Accelerator(...)`` needs to own the recipe's trackers (TensorBoard logs under the run)."""
    if not recipe.tracking.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(recipe.tracking.report_to),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR))}


def project_name(recipe: Recipe) -> str:
    return recipe.tracking.project or recipe.name


def scalars(event: dict) -> tuple[int | None, dict]:
    """(step, {tracker key: number}) for one metrics.jsonl event; the same numbers, grouped by kind."""
    kind, step = event.get("event"), event.get("step")
    numbers = {k: v for k, v in event.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step")}
    if kind == "train":
        return step, {f"train/{k}": v for k, v in numbers.items()}
    if kind == "eval":
        return step, {f"{event['split']}/{k}": v for k, v in numbers.items()}
    if kind in ("first_step", "end"):  # memory held by rank 0 (model states; peak RSS at the end)
        return step, {f"memory/{k}": v for k, v in numbers.items() if k.endswith("_bytes")}
    if kind == "skipped_step":
        return step, {"train/skipped_step": 1}
    return step, {}


def _flat_config(data: dict, prefix: str = "") -> dict:
    """Recipe + plan as flat hyper-parameters: trackers take str/int/float/bool only."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "config_overrides":
            flat.update(_flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


class Tracker:
    """The seam the training loop calls (through RankLog.event): one method per moment."""

    def record(self, event: dict) -> None:
        """One metrics.jsonl event (start, train, eval, checkpoint, first_step, resume, end, skipped_step)."""

    def identity(self) -> dict:
        """What a resumed run needs to continue the same tracker runs (stored in every checkpoint)."""
        return {}


class AccelerateTrackers(Tracker):
    """accelerate's trackers for ``recipe.tracking.report_to``, on the main process."""

    def __init__(self, accelerator, recipe: Recipe, run_dir: Path, resumed_step: int | None, saved: dict):
        self.accelerator, self.recipe, self.run_dir = accelerator, recipe, run_dir
        self.resumed_step = resumed_step
        self.saved = saved or {}
        self._identity: dict = {}
        # tracker name -> {key: last step it already holds}: not sent again (see the module docstring)
        self._already_logged: dict[str, dict[str, int]] = {}
        self._start()

    def _init_kwargs(self) -> dict:
        tracking, saved = self.recipe.tracking, self.saved
        run_name = tracking.run_name or self.recipe.name
        kwargs = {name: dict(tracking.options.get(name, {})) for name in tracking.report_to}
        if "tensorboard" in kwargs and self.resumed_step is not None:
            # Events at or after purge_step in earlier files are dropped by TensorBoard's readers.
            kwargs["tensorboard"]["purge_step"] = self.resumed_step + 1
        if "mlflow" in kwargs:
            kwargs["mlflow"].update(run_name=run_name, run_id=saved.get("mlflow", {}).get("run_id"))
        if "wandb" in kwargs:
            run_id = saved.get("wandb", {}).get("id") or uuid.uuid4().hex[:12]
            kwargs["wandb"].update(id=run_id, resume="allow", name=run_name, dir=str(self.run_dir))
        return kwargs

    def _start(self) -> None:
        tracking = self.recipe.tracking
        if "mlflow" in tracking.report_to:
            import mlflow

            uri = tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)
        try:
            self.accelerator.init_trackers(project_name(self.recipe), init_kwargs=self._init_kwargs())
        except Exception as exc:  # noqa: BLE001 - a server that is not there, a bad option: say so in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrainingError(
                f"tracking: could not start {', '.join(tracking.report_to)} ({type(exc).__name__}: {first[:300]}); "
                f"check tracking.mlflow_tracking_uri / tracking.options, or remove the tracker from tracking.report_to"
            ) from None
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                self._identity["tensorboard"] = {"logging_dir": tracker.logging_dir}
            elif tracker.name == "mlflow":
                import mlflow

                run_id = tracker.active_run.info.run_id
                self._identity["mlflow"] = {"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}
                if self.resumed_step is not None:
                    self._already_logged["mlflow"] = _mlflow_logged_steps(run_id)
            elif tracker.name == "wandb":
                self._identity["wandb"] = {"id": tracker.run.id, "project": tracker.run.project}
                if self.resumed_step is not None and tracker.run.step:
                    # W&B resumes at its last step and ignores earlier ones: do not send them.
                    self._already_logged["wandb"] = {"*": tracker.run.step - 1}

    def identity(self) -> dict:
        return self._identity

    def record(self, event: dict) -> None:
        if event.get("event") == "start":
            config = {**_flat_config(self.recipe.model_dump(mode="json")),
                      **_flat_config({k: v for k, v in event.items() if k not in ("event", "time")}, "plan.")}
            for tracker in list(self.accelerator.trackers):
                self._call(tracker, tracker.store_init_configuration, config)
            return
        step, values = scalars(event)
        if not values:
            return
        for tracker in list(self.accelerator.trackers):
            logged = self._already_logged.get(tracker.name)
            send = values if not logged else {
                k: v for k, v in values.items() if step is None or step > logged.get(k, logged.get("*", -1))}
            if send:
                self._call(tracker, tracker.log, send, step=step)

    def _call(self, tracker, method, *args, **kwargs) -> None:
        """A tracker that fails (a server gone away) is dropped with one warning; training goes on and
        metrics.jsonl keeps every value."""
        try:
            method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracker error; the run must not die of it
            self.accelerator.trackers.remove(tracker)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"warning: tracker {tracker.name} failed ({type(exc).__name__}: {first[:200]}); it gets no further "
                  f"values in this attempt, metrics.jsonl has them all", file=sys.stderr, flush=True)


def _mlflow_logged_steps(run_id: str) -> dict[str, int]:
    """The last step of every metric the MLflow run already holds."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def start_tracking(accelerator, recipe: Recipe, run_dir: Path, resumed_step: int | None = None,
                   saved: dict | None = None) -> Tracker:
    """The tracker for this rank: accelerate's trackers on the main process, nothing elsewhere."""
    if not accelerator.is_main_process or not recipe.tracking.report_to:
        return Tracker()
    return AccelerateTrackers(accelerator, recipe, run_dir, resumed_step, saved or {})
