"""`launcher report RUN [RUN ...]`: a run (or several) as one self-contained HTML page, plotted with
matplotlib from what the run directory already holds (metrics.jsonl, metrics.json, recipe.yaml,
predictions/test.jsonl): training curves, validation metrics with the best checkpoint marked, the
confusion matrix and per-class table, sample predictions, the recipe, the plan and library versions.
Several runs: curves overlaid, final metrics side by side. A continual run's directory (`continual:`; its
metrics.json holds the forgetting matrix): the matrix as a table and a heatmap, the summary numbers, and
each stage's own report linked; several continual runs (naive vs replay vs ewc) side by side.

Images are embedded (base64 PNG), so the page can be copied or mailed on its own. The HTML is a few
string templates: no templating library is needed for tables and <img> tags.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import LauncherError
from .versions import library_versions

REPORT_DIR = "report"
SAMPLE_ROWS = 12
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
TRAIN_PANELS = (("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
                ("samples_per_second", "throughput (samples/s)"))
HIDDEN_COLUMNS = ("id", "probabilities", "truncated")


@dataclass
class RunData:
    path: Path
    name: str
    events: list[dict]
    metrics: dict | None
    recipe: dict | None
    status: dict | None
    predictions: list[dict] = field(default_factory=list)
    id2label: dict | None = None

    def of(self, kind: str, split: str | None = None) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind and (split is None or e.get("split") == split)]

    @property
    def start(self) -> dict:
        starts = self.of("start")
        return starts[0] if starts else {}

    @property
    def best(self) -> dict | None:
        return (self.metrics or {}).get("best")


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> RunData:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise LauncherError(f"{path}: not a run directory (no metrics.jsonl); name the output.dir of a run")
    events = []
    lines = (path / "metrics.jsonl").read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise LauncherError(f"{path / 'metrics.jsonl'}: line {number} is not JSON") from None
            # else: the last line of a run that is being written (or was killed mid-write)
    recipe = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else None
    predictions = []
    predictions_file = path / "predictions" / "test.jsonl"
    if predictions_file.is_file():
        with predictions_file.open() as handle:
            for line in handle:
                predictions.append(json.loads(line))
                if len(predictions) >= SAMPLE_ROWS:
                    break
    config = _read_json(path / "model" / "config.json") or {}
    id2label = config.get("id2label")
    name = (recipe or {}).get("name") or path.name
    return RunData(path, name, events, _read_json(path / "metrics.json"), recipe, _read_json(path / "status.json"),
                   predictions, id2label)


# ---- plots -----------------------------------------------------------------------------------------


def _figure(rows: int, cols: int, width: float = 11.0, height_per_row: float = 2.9, left: float = 0.6):
    """A grid of axes with fixed margins (in inches). matplotlib's constrained layout would place them
    for us, at twice the drawing time - which every training run pays when it writes its report."""
    from matplotlib.figure import Figure

    height = height_per_row * rows
    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.subplots(rows, cols, squeeze=False)
    figure.subplots_adjust(left=left / width, right=1 - 0.15 / width, top=1 - 0.3 / height, bottom=0.45 / height,
                           wspace=0.25, hspace=0.85 / (height_per_row - 0.85))
    return figure, axes


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (its 'smoothing' slider)."""
    out, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        count += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight ** count))
    return out


def _style(ax, title: str, xlabel: str = "optimizer step") -> None:
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def training_figure(runs: list[RunData]) -> str | None:
    if not any(run.of("train") for run in runs):
        return None
    figure, axes = _figure(2, 2)
    several = len(runs) > 1
    for index, run in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        train = run.of("train")
        steps = [e["step"] for e in train]
        for ax, (key, title) in zip(axes.flat, TRAIN_PANELS):
            values = [e.get(key, float("nan")) for e in train]
            if key == "loss":
                weight = 0.6 if len(values) <= 100 else 0.9
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=None if several else "raw")
                ax.plot(steps, smoothed(values, weight), color=color, linewidth=1.8,
                        label=run.name if several else f"smoothed (EMA {weight})")
            else:
                ax.plot(steps, values, color=color, linewidth=1.5, label=run.name if several else None)
            _style(ax, title)
    axes[0, 0].legend(fontsize=8, frameon=False)
    return _png(figure)


def validation_keys(runs: list[RunData]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        for event in run.of("eval", "validation"):
            for key, value in event.items():
                if key not in ("time", "event", "split", "step", "num_examples") and isinstance(value, (int, float)):
                    keys.setdefault(key)
    return list(keys)


def validation_figure(runs: list[RunData]) -> str | None:
    keys = validation_keys(runs)
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    figure, axes = _figure(rows, cols, height_per_row=2.5)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for index, run in enumerate(runs):
        color = COLORS[index % len(COLORS)]
        evals = run.of("eval", "validation")
        best = run.best
        for ax, key in zip(axes.flat, keys):
            points = [(e["step"], e[key]) for e in evals if isinstance(e.get(key), (int, float))]
            if not points:
                continue
            ax.plot(*zip(*points), color=color, marker="o", markersize=3.5, linewidth=1.5,
                    label=run.name if len(runs) > 1 else None)
            if best:
                ax.axvline(best["step"], color=color, linestyle=":", linewidth=1)
                at_best = [v for s, v in points if s == best["step"]]
                if at_best:
                    ax.plot([best["step"]], at_best, marker="*", markersize=13, color=color,
                            markeredgecolor="black", markeredgewidth=0.6, linestyle="none",
                            label="best checkpoint" if key == best["metric"] and len(runs) == 1 else None)
            _style(ax, key)
    for ax, key in zip(axes.flat, keys):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    return _png(figure)


def confusion_figure(matrix: list[list[int]], labels: list[str], title: str) -> str:
    import numpy as np

    values = np.asarray(matrix)
    size = max(3.2, 0.55 * len(labels) + 2.2)
    figure, axes = _figure(1, 1, width=size + 1.4, height_per_row=size, left=1.1)
    ax = axes[0, 0]
    image = ax.imshow(values, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center",
                  fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    threshold = values.max() / 2 if values.size else 0
    for (row, col), value in np.ndenumerate(values):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=9,
                color="white" if value > threshold else "#111827")
    return _png(figure)


# ---- HTML ------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    return html.escape(text if len(text) <= 220 else text[:217] + "...")


def _table(header, rows, classes=None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _labels(run: RunData, per_class: dict | None, size: int) -> list[str]:
    if run.id2label and len(run.id2label) == size:
        return [run.id2label[str(i)] for i in range(size)]
    if per_class and len(per_class) == size:
        return list(per_class)
    return [str(i) for i in range(size)]


def _summary_cards(run: RunData) -> str:
    start, status = run.start, run.status or {}
    final = _scalars((run.metrics or {}).get("test")) or _scalars((run.metrics or {}).get("validation"))
    split = "test" if _scalars((run.metrics or {}).get("test")) else "validation"
    headline = next((k for k in ("accuracy", "f1_macro", "f1", "exact_match", "bleu", "rougeL", "perplexity")
                     if k in final), None)
    cards = [("status", f"{status.get('state', '?')}, step {status.get('step', '?')} of {status.get('total_steps', '?')}"),
             ("task", f"{(run.recipe or {}).get('task', '?')} · {start.get('finetune_method', '?')}"),
             ("ranks × strategy", f"{start.get('world_size', '?')} × {start.get('strategy', '?')}")]
    if headline:
        cards.append((f"{split} {headline}", _fmt(final[headline])))
    if run.best:
        cards.append((f"best {run.best['metric']}", f"{_fmt(run.best['value'])} @ step {run.best['step']}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{v}</div></div>' for k, v in cards
    ) + "</div>"


def _per_class_table(per_class: dict) -> str:
    rows = [(name, s.get("precision"), s.get("recall"), s.get("f1"), s.get("support")) for name, s in per_class.items()]
    return _table(("class", "precision", "recall", "F1", "support"), rows)


def _class_section(run: RunData) -> str:
    parts = []
    for split in ("test", "validation"):
        metrics = (run.metrics or {}).get(split) or {}
        per_class = next((metrics[k] for k in ("per_class", "per_type", "per_relation") if isinstance(metrics.get(k), dict)), None)
        matrix = metrics.get("confusion_matrix")
        if not per_class and not matrix:
            continue
        parts.append(f"<h2>Per class ({split})</h2>")
        parts.append('<div class="row">')
        if matrix:
            labels = _labels(run, metrics.get("per_class"), len(matrix))
            parts.append(f'<div>{_img(confusion_figure(matrix, labels, f"confusion matrix ({split})"), "confusion matrix")}</div>')
        if per_class:
            parts.append(f"<div>{_per_class_table(per_class)}</div>")
        parts.append("</div>")
        break  # the test split when there is one; it is what the run is judged on
    return "".join(parts)


def _predictions_section(run: RunData) -> str:
    rows = run.predictions
    if not rows:
        return ""
    columns = [c for c in rows[0] if c not in HIDDEN_COLUMNS]
    gold = next((c for c in ("label", "reference", "tags", "answer", "answers") if c in columns), None)
    guess = next((c for c in ("prediction", "generated", "predicted_tags") if c in columns), None)
    classes = ["miss" if gold and guess and row.get(gold) != row.get(guess) else "" for row in rows]
    note = f" Rows where {guess} differs from {gold} are marked." if gold and guess else ""
    return (f"<h2>Sample predictions (test)</h2><p class=\"note\">The first {len(rows)} rows of "
            f"predictions/test.jsonl.{note}</p>" + _table(columns, [[row.get(c) for c in columns] for row in rows], classes))


def _final_metrics_table(runs: list[RunData]) -> str:
    keys: dict[str, None] = {}
    for run in runs:
        for split in ("validation", "test"):
            for key in _scalars((run.metrics or {}).get(split)):
                if key != "num_examples":
                    keys.setdefault(f"{split}/{key}")
    header = ("run", *keys, "best step", "steps")
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        values = [_scalars(metrics.get(k.split("/", 1)[0])).get(k.split("/", 1)[1], "") for k in keys]
        rows.append((run.name, *values, (run.best or {}).get("step", ""), (run.status or {}).get("step", "")))
    return _table(header, rows)


def _plan_table(run: RunData) -> str:
    start = run.start
    batch = (f"{start.get('micro_batch_size')} micro × {start.get('grad_accum_steps')} accumulation × "
             f"{start.get('world_size')} ranks = {start.get('global_batch_size')}") if start else "?"
    rows = [("world size", start.get("world_size")), ("strategy", start.get("strategy")), ("global batch", batch),
            ("optimizer steps", f"{start.get('total_steps')} ({start.get('steps_per_epoch')} per epoch)"),
            ("parameters", f"{start.get('trainable_parameters', 0):,} trainable of {start.get('parameters', 0):,}"),
            ("fine-tuning method", start.get("finetune_method")),
            ("examples", start.get("examples")), ("truncated", start.get("truncated")),
            ("resumed", ", ".join(f"step {e['step']}" for e in run.of("resume")) or "no")]
    return _table(("", ""), rows)


def _versions_table(run: RunData) -> str:
    versions = run.start.get("versions")
    if not versions:
        versions = {name: f"{v} (now; the run did not record it)" for name, v in library_versions().items()}
    return _table(("library", "version"), list(versions.items()))


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;background:#f6f7f9;color:#111827}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:4px 0 2px}h2{font-size:17px;margin:28px 0 10px;padding-top:8px;border-top:1px solid #e5e7eb}
.sub{color:#6b7280;font-size:13px;margin-bottom:14px}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:9px 12px;min-width:110px}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#6b7280}.card .v{font-size:16px;font-weight:600;margin-top:2px}
img{max-width:100%;background:#fff;border:1px solid #e5e7eb;border-radius:10px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0;border:1px solid #e5e7eb}
th,td{padding:5px 10px;border-bottom:1px solid #eef0f3;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}tr.miss td{background:#fef2f2}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
pre{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:12px;font-size:12px;overflow:auto;max-height:420px}
.note{color:#6b7280;font-size:13px}details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


def render(runs: list[RunData]) -> str:
    several = len(runs) > 1
    title = "Comparison of " + ", ".join(r.name for r in runs) if several else f"Run report: {runs[0].name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<div class="sub">{" · ".join(html.escape(str(r.path)) for r in runs)}</div>']
    if not several:
        parts.append(_summary_cards(runs[0]))
    else:
        parts.append("<h2>Final metrics</h2>" + _final_metrics_table(runs))
    training = training_figure(runs)
    if training:
        parts.append("<h2>Training</h2>" + _img(training, "training curves"))
    validation = validation_figure(runs)
    if validation:
        marked = "" if several else " The star marks the best checkpoint (the dotted line its step)."
        parts.append(f"<h2>Validation</h2><p class=\"note\">Every validation metric against the optimizer step.{marked}</p>"
                     + _img(validation, "validation metrics"))
    if not several:
        run = runs[0]
        if run.metrics:
            metrics = run.metrics
            keys = [k for k in dict.fromkeys([*_scalars(metrics.get("validation")), *_scalars(metrics.get("test"))])]
            rows = [(k, _scalars(metrics.get("validation")).get(k, ""), _scalars(metrics.get("test")).get(k, ""))
                    for k in keys]
            parts.append("<h2>Final metrics</h2>" + _table(("metric", "validation (best weights)", "test"), rows))
        parts.append(_class_section(run))
        parts.append(_predictions_section(run))
    for run in runs:
        suffix = f" — {html.escape(run.name)}" if several else ""
        parts.append(f"<h2>Plan{suffix}</h2>" + _plan_table(run))
        if run.recipe:
            parts.append(f"<details{' open' if not several else ''}><summary>Resolved recipe{suffix}</summary><pre>"
                         + html.escape(yaml.safe_dump(run.recipe, sort_keys=False)) + "</pre></details>")
        parts.append(f"<h2>Library versions{suffix}</h2>" + _versions_table(run))
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")


def default_output(runs: list[Path]) -> Path:
    if len(runs) == 1:
        return Path(runs[0]) / REPORT_DIR
    return Path(os.path.commonpath([str(Path(r).resolve()) for r in runs])) / REPORT_DIR


def distinct_names(data: list[RunData]) -> list[RunData]:
    """Runs of one recipe (a sweep's points, two attempts) share its name: label them by the shortest
    end of their paths that tells them apart."""
    if len({run.name for run in data}) == len(data):
        return data
    for depth in range(1, max(len(run.path.parts) for run in data) + 1):
        labels = ["/".join(run.path.parts[-depth:]) for run in data]
        if len(set(labels)) == len(labels):
            return [replace(run, name=label) for run, label in zip(data, labels)]
    return data


# ---- continual runs ----------------------------------------------------------------------------------


@dataclass
class ContinualData:
    path: Path
    name: str
    result: dict  # metrics.json's `continual`: stages, matrix, the summary numbers


def continual_result(path: Path) -> dict | None:
    """metrics.json's `continual` section when `path` is a continual run's directory, else None."""
    metrics = _read_json(Path(path) / "metrics.json")
    return metrics.get("continual") if isinstance(metrics, dict) and isinstance(metrics.get("continual"), dict) else None


def load_continual(path: Path) -> ContinualData:
    result = continual_result(path)
    plan = _read_json(Path(path) / "continual.json") or {}
    first = Path(plan["stages"][0]["run_dir"]) / "recipe.yaml" if plan.get("stages") else None
    recipe = yaml.safe_load(first.read_text()) if first is not None and first.is_file() else None
    name = (recipe or {}).get("name") or Path(path).name
    return ContinualData(Path(path), f"{name} ({result.get('strategy', '?')})", result)


def forgetting_figure(runs: list[ContinualData]) -> str:
    """One heatmap per run: the metric on stage j (column) after training stage i (row); above the
    diagonal is not measured (blank)."""
    import numpy as np

    size = max(len(run.result["stages"]) for run in runs)
    side = max(2.6, 0.9 * size + 1.6)
    figure, axes = _figure(1, len(runs), width=(side + 0.4) * len(runs) + 0.8, height_per_row=side, left=1.1)
    for ax, run in zip(axes.flat, runs):
        stages, matrix = run.result["stages"], run.result["matrix"]
        values = np.full((len(stages), len(stages)), np.nan)
        for i, row in enumerate(matrix):
            values[i, : len(row)] = row
        ax.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(stages)), stages, fontsize=8, rotation=30 if len(stages) > 3 else 0)
        ax.set_yticks(range(len(stages)), stages, fontsize=8)
        ax.set_xlabel(f"{run.result.get('metric', 'metric')} on stage", fontsize=9)
        ax.set_ylabel("after training stage", fontsize=9)
        ax.set_title(run.name if len(runs) > 1 else "forgetting matrix", fontsize=10, loc="left", fontweight="bold")
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=9, color="#111827")
    return _png(figure)


def matrix_table(result: dict) -> str:
    """Rows: after training stage i; columns: stage j; cells: the metric (blank above the diagonal)."""
    stages, matrix = result["stages"], result["matrix"]
    rows = [(f"after {stages[i]}", *[row[j] if j < len(row) else "" for j in range(len(stages))])
            for i, row in enumerate(matrix)]
    return _table((f"{result.get('metric', 'metric')}: after \\ on", *stages), rows)


SUMMARY_KEYS = (("average_accuracy", "average accuracy"), ("average_forgetting", "average forgetting"),
                ("backward_transfer", "backward transfer"))


def _label_space(result: dict) -> str:
    if result.get("label_space") == "per_stage":  # each stage's examples scored among their own stage's labels
        groups = " | ".join(", ".join(group) for group in result.get("label_groups") or [])
        return f"Label space per stage (task-incremental): {html.escape(groups)}"
    return f"Shared label space: {html.escape(', '.join(result.get('labels', [])))}"


def _stage_links(run: ContinualData, directory: Path) -> str:
    plan = _read_json(run.path / "continual.json") or {}
    rows = []
    for stage in plan.get("stages", []):
        stage_dir = Path(stage["run_dir"])
        page = stage_dir / REPORT_DIR / "index.html"
        link = (f'<a href="{html.escape(os.path.relpath(page, directory))}">report</a>' if page.is_file()
                else f"launcher report {html.escape(str(stage_dir))}")
        rows.append(f"<tr><td>{stage['index']}</td><td>{html.escape(stage['name'])}</td>"
                    f"<td>{html.escape(str(stage_dir))}</td><td>{link}</td></tr>")
    if not rows:
        return ""
    return ("<table><thead><tr><th>stage</th><th>name</th><th>run directory</th><th>its report</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def render_continual(runs: list[ContinualData], directory: Path) -> str:
    several = len(runs) > 1
    title = ("Comparison of " + ", ".join(r.name for r in runs)) if several else f"Continual run: {runs[0].name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<div class="sub">{" · ".join(html.escape(str(r.path)) for r in runs)}</div>',
             '<p class="note">The forgetting matrix: the metric on stage j\'s test split (column) after training '
             "stage i (row). Average accuracy: the mean of the last row; average forgetting: the mean over earlier "
             "stages of their best value before the last stage minus their last value; backward transfer: the mean "
             "over earlier stages of their last value minus their value right after their own stage (negative: "
             "forgetting).</p>"]
    if several:
        parts.append("<h2>Summary</h2>" + _table(("run", "strategy", *[label for _, label in SUMMARY_KEYS]),
                     [(r.name, r.result.get("strategy"), *[r.result.get(k) for k, _ in SUMMARY_KEYS]) for r in runs]))
    else:
        result = runs[0].result
        cards = [("strategy", html.escape(str(result.get("strategy")))),
                 *[(label, _fmt(result.get(key))) for key, label in SUMMARY_KEYS]]
        parts.append('<div class="cards">' + "".join(
            f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{v}</div></div>' for k, v in cards
        ) + "</div>")
    parts.append("<h2>Forgetting matrix</h2>" + _img(forgetting_figure(runs), "forgetting matrix"))
    for run in runs:
        suffix = f" — {html.escape(run.name)}" if several else ""
        parts.append(f"<h2>Matrix{suffix}</h2>" + matrix_table(run.result))
        parts.append(f"<h2>Stages{suffix}</h2>" + _stage_links(run, directory))
        parts.append(f"<p class=\"note\">{_label_space(run.result)}</p>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")


def write_report(runs: list[Path], output: Path | None = None) -> Path:
    """Write ``index.html`` for the runs into ``output`` (default: RUN/report, or the runs' common
    parent/report for several) and return its path. The file appears whole or not at all."""
    directory = Path(output) if output is not None else default_output([Path(r) for r in runs])
    continual = [Path(run) for run in runs if continual_result(Path(run)) is not None]
    if continual and len(continual) < len(runs):
        raise LauncherError(f"{continual[0]} is a continual run and {next(r for r in runs if Path(r) not in continual)} "
                            f"is not; report continual runs together, or a continual run's stages (its stages/*)")
    if continual:
        page = render_continual(distinct_names([load_continual(run) for run in continual]), directory)
    else:
        page = render(distinct_names([load_run(Path(run)) for run in runs]))
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "index.html"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".index.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
