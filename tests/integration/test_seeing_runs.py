"""Seeing a run: experiment trackers that survive a crash and a resume (real TensorBoard files, a
real MLflow server on 127.0.0.1, W&B offline), progress bars on a terminal only, the HTML report
as Chromium renders it, and the model card of every export (its load snippet runs).

One tracked run serves most tests: killed at step 23 (after steps 21-22 reached the trackers; the
newest checkpoint is step 20), then resumed to the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, REPO, check_ok, free_port, read_events, run_launcher, toy_recipe_dict, write_recipe

pytestmark = pytest.mark.slow

STEPS = 40
CRASH_AT = 23  # checkpoints every 10: resumes from step 20, repeating 21 and 22
BAR = "━"  # rich's bar glyph


def train_losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir, "train")}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite store, on a free port of 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, assets, isolated_env, mlflow_server):
    """A run reporting to TensorBoard, MLflow and W&B (offline): crashed at step 23, resumed. The
    resumed attempt also asks for push_to_hub, which cannot work offline."""
    root = tmp_path_factory.mktemp("tracked")
    recipe = toy_recipe_dict(
        assets, root / "run",
        training={"max_steps": STEPS, "micro_batch_size": 4, "global_batch_size": 8, "log_every": 1,
                  "learning_rate": 3e-3, "warmup_steps": 4},
        evaluation={"every_steps": 10, "best_metric": "f1_macro"},
        checkpoint={"every_steps": 10},
        output={"report": True},
        tracking={"report_to": ["tensorboard", "mlflow", "wandb"], "project": "seeing-runs",
                  "mlflow_tracking_uri": mlflow_server, "options": {"wandb": {"mode": "offline"}}},
    )
    path = write_recipe(root / "recipe.yaml", recipe)
    env = dict(isolated_env, WANDB_SILENT="true", WANDB_CACHE_DIR=str(root / "wandb-cache"),
               WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_DATA_DIR=str(root / "wandb-data"))
    crashed = run_launcher(["train", str(path)], dict(env, LAUNCHER_FAULT=f"0:{CRASH_AT}"))
    assert crashed.returncode == 1 and "injected fault" in crashed.stderr, crashed.stderr[-3000:]
    resumed = run_launcher(["train", str(path), "output.push_to_hub=true", "output.hub_repo_id=someone/toy"], env)
    return {"dir": root / "run", "url": mlflow_server, "crashed": crashed, "resumed": resumed}


def test_the_resumed_attempt_continued_from_the_checkpoint(tracked):
    assert "resumed from" in tracked["resumed"].stdout and "step-00000020" in tracked["resumed"].stdout
    assert sorted(train_losses(tracked["dir"])) == list(range(1, STEPS + 1))


def test_push_to_hub_offline_fails_with_one_line_after_the_export_is_safe(tracked):
    result, run_dir = tracked["resumed"], tracked["dir"]
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "output.push_to_hub: upload to someone/toy failed" in errors[0]
    assert f"the local export {run_dir / 'model'} is complete" in errors[0] and "hf upload someone/toy" in errors[0]
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "model" / "README.md").is_file()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


# ---- trackers ----------------------------------------------------------------------------------


def test_tensorboard_holds_every_step_once_equal_to_metrics_jsonl(tracked):
    """Read with TensorBoard's own reader. The crashed attempt's steps 21-22 are in the first event
    file; the resumed writer's purge_step makes the reader drop them, and they come again once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked["dir"]
    (logdir,) = (run_dir / "tensorboard").iterdir()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per attempt
    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    reader.Reload()
    loss = reader.Scalars("train/loss")
    expected = train_losses(run_dir)
    assert [e.step for e in loss] == sorted(expected)
    assert [e.value for e in loss] == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-6)
    for key in ("lr", "grad_norm", "samples_per_second", "tokens"):
        assert [e.step for e in reader.Scalars(f"train/{key}")] == sorted(expected), key
    evals = read_events(run_dir, "eval")
    validation = [e for e in evals if e["split"] == "validation"]
    f1 = reader.Scalars("validation/f1_macro")
    assert [(e.step, round(e.value, 5)) for e in f1] == [(e["step"], round(e["f1_macro"], 5)) for e in validation]
    assert [e.step for e in reader.Scalars("test/accuracy")] == [STEPS]
    assert reader.Scalars("memory/rank_parameter_bytes")[0].value > 0


def test_mlflow_run_holds_every_step_exactly_once(tracked):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked["url"])
    experiment = client.get_experiment_by_name("seeing-runs")
    (run,) = client.search_runs([experiment.experiment_id])  # one run across both attempts
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # 21 and 22 not twice, none missing
    expected = train_losses(tracked["dir"])
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)
    validation = [e for e in read_events(tracked["dir"], "eval") if e["split"] == "validation"]
    f1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "validation/f1_macro")}
    assert f1 == pytest.approx({e["step"]: e["f1_macro"] for e in validation})
    assert run.data.params["training.learning_rate"] == "0.003" and run.data.params["plan.world_size"] == "1"
    checkpoint = tracked["dir"] / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json"
    assert json.loads(checkpoint.read_text())["trackers"]["mlflow"]["run_id"] == run.info.run_id


def test_wandb_offline_resumes_the_same_run(tracked):
    """W&B offline keeps one local record per attempt; both carry the run id stored in the
    checkpoints (so `wandb sync` sends them to one run)."""
    run_dir = tracked["dir"]
    saved = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    run_id = saved["trackers"]["wandb"]["id"]
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts), attempts
    assert all((a / f"run-{run_id}.wandb").stat().st_size > 0 for a in attempts)


def test_no_progress_bars_off_a_terminal(tracked):
    """Captured output (a pipe, like a Slurm .out file): plain log lines every log_every, no bars."""
    for result in (tracked["crashed"], tracked["resumed"]):
        assert BAR not in result.stdout and "\x1b[" not in result.stdout
    assert "step 21/40 |" in tracked["resumed"].stdout and "step 40/40 |" in tracked["resumed"].stdout


# ---- progress on a terminal --------------------------------------------------------------------


def run_in_terminal(args, env, timeout=600) -> tuple[int, str]:
    """Run `python -m launcher ARGS` on a pseudo-terminal, as a person in a shell would."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "launcher", *args], env)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory, assets, isolated_env):
    root = tmp_path_factory.mktemp("terminal")
    recipe = toy_recipe_dict(
        assets, root / "run",
        # a training set of its own, so its features are not in the cache and tokenizing shows
        data={"max_train_samples": 240},
        training={"max_steps": 30, "log_every": 10},
        evaluation={"every_steps": 15},
        checkpoint={"every_steps": 15},
        output={"report": True},
        tracking={"report_to": []},
    )
    env = dict(isolated_env, TERM="xterm-256color", COLUMNS="120", LINES="40")
    code, output = run_in_terminal(["train", str(write_recipe(root / "recipe.yaml", recipe))], env)
    assert code == 0, output[-4000:]
    return root / "run", output


def test_a_terminal_shows_progress_bars(terminal_run):
    _, output = terminal_run
    for bar in ("tokenizing train", "training", "evaluating validation", "writing checkpoint step 15",
                "evaluating test", "exporting the model"):
        assert re.search(re.escape(bar) + r".*" + BAR, output), bar
    assert re.search(r"training.*" + BAR + r".*30/30", output)  # the bar counts optimizer steps
    assert "loss " in output and "samples/s" in output
    assert "step 30/30 |" in output  # the log lines are still there


def test_tracking_can_be_switched_off(terminal_run):
    run_dir, _ = terminal_run
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "mlflow.db").exists()
    assert (run_dir / "report" / "index.html").is_file()


# ---- report ------------------------------------------------------------------------------------


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
IMAGES_LOADED = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, installed when missing (needs root and the Debian mirror)."""
    found = shutil.which("chromium")
    if found is None:
        if os.geteuid() != 0:
            pytest.skip("chromium is not installed and installing it (apt-get install chromium) needs root")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, timeout=900, env=env)
        if install.returncode != 0:  # a fresh machine has no package lists yet (as tests/slurm/start_cluster.sh)
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=900, env=env)
            install = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True,
                                     timeout=900, env=env)
        assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
        found = shutil.which("chromium")
    return found


def open_in_chromium(chromium, page: Path, tmp_path, *args):
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def test_report_renders_its_images_in_chromium(tracked, chromium, tmp_path):
    import numpy as np
    from PIL import Image

    report = tracked["dir"] / "report" / "index.html"
    assert report.is_file()  # written by `launcher train` at the end
    page = report.read_text()
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMAGES_LOADED + "</body>"))
    dom = open_in_chromium(chromium, probe, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))
    loaded = int(re.search(r'data-loaded="(\d+)"', dom.stdout).group(1))
    assert images >= 3 and loaded == images  # training, validation, confusion matrix: every one decoded
    shot = tmp_path / "report.png"
    result = open_in_chromium(chromium, report, tmp_path, "--window-size=1200,1800", f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1800, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # plots and text, not a blank page
    assert (pixels.std(axis=(0, 1)) > 20).all()


def test_report_shows_the_run(tracked):
    page = (tracked["dir"] / "report" / "index.html").read_text()
    for part in ("Training", "Validation", "best checkpoint", "confusion matrix", "Per class (test)",
                 "Sample predictions (test)", "Resolved recipe", "Plan", "Library versions", "transformers",
                 "resumed", "step 20"):
        assert part in page, part
    metrics = json.loads((tracked["dir"] / "metrics.json").read_text())
    for name, scores in metrics["test"]["per_class"].items():
        assert f"<td>{name}</td><td>{scores['precision']:.4f}</td>" in page


def test_report_compares_several_runs(tracked, terminal_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher", "report", str(tracked["dir"]), str(terminal_run[0]),
                             "--output", str(tmp_path / "compare")], cwd=REPO, capture_output=True, text=True, timeout=300)
    check_ok(result)
    page = (tmp_path / "compare" / "index.html").read_text()
    # both runs are of the recipe `toy`: they are told apart by the ends of their paths
    first, second = re.search(r"Comparison of ([^,<]+), ([^<]+)<", page).groups()
    assert first != second and str(tracked["dir"]).endswith(first) and str(terminal_run[0]).endswith(second)
    assert page.count("<img") == 2  # training and validation, overlaid
    table = page.split("<h2>Final metrics</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 3  # header + one row per run
    assert "test/accuracy" in table


def test_report_of_something_else_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launcher", "report", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}: not a run directory (no metrics.jsonl); name the output.dir of a run"


# ---- model card --------------------------------------------------------------------------------


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_export_has_a_model_card(tracked, assets):
    from huggingface_hub import ModelCard

    run_dir = tracked["dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / "checkpoints" / f"best-step-{metrics['best']['step']:08d}"
    for export in (run_dir / "model", best):
        card = ModelCard.load(export / "README.md")
        assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
        assert {"recipe-launcher", "sequence_classification", "full"} <= set(card.data.tags)
        text = card.text
        assert f"fine-tuned from `{assets['model']}` with **full** fine-tuning" in text
        assert "| train | `data.train" in text and "| 400 |" in text  # data files and sizes
        assert "world size 1 = global 8" in text and "| strategy | ddp |" in text
        assert f"| accuracy | {metrics['validation']['accuracy']:.4f} |" in text
        assert "- torch " in text and "- transformers " in text
    model_card = (run_dir / "model" / "README.md").read_text()
    assert f"| accuracy | {metrics['validation']['accuracy']:.4f} | {metrics['test']['accuracy']:.4f} |" in model_card


def test_the_model_card_load_snippet_runs(tracked):
    run_dir = tracked["dir"]
    (snippet,) = python_blocks((run_dir / "model" / "README.md").read_text())
    assert f"pipeline('text-classification', model='{run_dir / 'model'}')" in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})  # noqa: S102 - the card's own code, as a reader would paste it
    first = json.loads((run_dir / "predictions" / "test.jsonl").read_text().splitlines()[0])
    assert f"'label': '{first['prediction']}'" in printed.getvalue()


# ---- a tracker that is not installed -------------------------------------------------------------


def test_a_tracker_that_is_not_installed_is_one_line_before_any_work(assets, isolated_env, tmp_path):
    hide = tmp_path / "no_mlflow"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as if mlflow were not installed\n")
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run",
                                                                   tracking={"report_to": ["tensorboard", "mlflow"]}))
    env = dict(isolated_env, PYTHONPATH=str(hide), PYTHONDONTWRITEBYTECODE="1")
    for args in (["train", str(path)], ["run", str(path), "--dry-run"]):
        result = run_launcher(args, env)
        assert result.returncode == 2, result.stderr[-3000:]
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
            "error: tracking.report_to: mlflow is not installed; pip install mlflow, or remove it from "
            "tracking.report_to (now ['tensorboard', 'mlflow'])"]
        assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_tracking_server_that_is_not_there_is_one_line(assets, isolated_env, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(
        assets, tmp_path / "run", tracking={"report_to": ["mlflow"], "mlflow_tracking_uri": nobody}))
    result = run_launcher(["train", str(path)], dict(isolated_env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: tracking: could not start mlflow (") and "127.0.0.1" in errors[0]
    assert "remove the tracker from tracking.report_to" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
