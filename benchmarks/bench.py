"""One command, one table: the launcher beside transformers' Trainer, the naive tutorial loop and the
machine's own matmul ceiling, on the same fine-tune (MiniLM-L6 on the Rotten Tomatoes snippets, fixed
optimizer steps, same micro-batch, accumulation, learning rate, fp32 on CPU).

    .venv/bin/python benchmarks/bench.py [--steps 60] [--repeats 3] [--quick]

Prints, for each way: samples/s and real (non-pad) tokens/s in steady state (after the first
optimizer step), peak RSS, time to the first optimizer step beyond library imports, dev accuracy,
achieved model FLOP/s as a fraction of the measured fp32 matmul ceiling; medians over repeats. Then
scaling on 2 gloo ranks, the tokenization cache, and per-rank memory under DDP and ZeRO-1/2/3
against the plan's estimate. Targets and results: docs/performance.md. Writes the raw numbers to
--json (default benchmarks/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = HERE / "minilm_rt.yaml"
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))


def env(threads: int) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return out


def matmul_ceiling(threads: int, sizes=(512, 1024, 2048), repeats: int = 10) -> float:
    """fp32 FLOP/s of square matmuls on this machine with `threads` threads: the best of several
    sizes and repeats, i.e. what this CPU can do at all."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(3):
            a @ b
        for _ in range(repeats):
            began = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - began))
    return best


def model_shape() -> tuple[int, int, int, int]:
    """(non-embedding parameters, layers, hidden size, label count) of the benchmark model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from launcher.model_io import model_location
    from launcher.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    config = AutoConfig.from_pretrained(model_location(recipe), num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    total = sum(p.numel() for p in model.parameters())
    return total - embedding, config.num_hidden_layers, config.hidden_size, 2


def mean_train_length() -> float:
    """Mean real (non-pad) tokens per training example, truncated as the recipe says."""
    from transformers import AutoTokenizer

    from launcher.data import load_validated_splits
    from launcher.model_io import model_location
    from launcher.recipe import load_recipe
    from launcher.tasks import TASKS

    recipe = load_recipe(RECIPE)
    splits = load_validated_splits(recipe, TASKS[recipe.task](recipe)).raw
    tokenizer = AutoTokenizer.from_pretrained(model_location(recipe))
    lengths = [len(ids) for ids in tokenizer(list(splits["train"][recipe.data.text_column]), truncation=True,
                                            max_length=recipe.data.max_length)["input_ids"]]
    return sum(lengths) / len(lengths)


def flops_per_example(length: float, shape) -> float:
    """Forward + backward FLOPs of one example: 6 x non-embedding parameters x tokens, plus the
    attention score/value matmuls (12 x layers x length^2 x hidden)."""
    params, layers, hidden, _ = shape
    return 6 * params * length + 12 * layers * length**2 * hidden


def run_launcher(steps: int, nproc: int, out: Path, extra=()) -> dict:
    args = ["-m", "launcher", "train", str(RECIPE), f"training.max_steps={steps}", f"output.dir={out}",
            "output.overwrite=true", *extra]
    if nproc == 1:
        command = [PYTHON, *args]
    else:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_machines", "1", "--main_process_port", str(_free_port()), *args]
    result = subprocess.run(command, env=env(2 // nproc or 1), cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"launcher run failed:\n{result.stderr[-3000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(e for e in events if e["event"] == "first_step")
    last = [e for e in events if e["event"] == "train"][-1]
    end = next(e for e in events if e["event"] == "end")
    metrics = json.loads((out / "metrics.json").read_text())
    batch = next(e for e in events if e["event"] == "start")["global_batch_size"]
    return {
        "steady_seconds": last["elapsed_s"] - first["seconds_in_loop"], "steps": steps, "micro_batch_size": batch,
        "first_step_since_start": first["seconds_since_start"], "import_seconds": first["import_seconds"],
        "dev_accuracy": metrics["validation"]["accuracy"], "peak_rss_bytes": end["peak_rss_bytes"],
        "events": {"first_step": first},
    }


def run_script(script: str, steps: int, out: Path, seed: int | None = None, extra_env: dict | None = None,
               sampling: str | None = None, nproc: int = 1) -> dict:
    extra = ([str(seed) if seed is not None else "-"] + ([sampling] if sampling else [])) if seed is not None or sampling else []
    script_args = [str(HERE / script), str(RECIPE), str(steps), str(out), *extra]
    if nproc == 1:
        command = [PYTHON, *script_args]
    else:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--num_machines", "1", "--main_process_port", str(_free_port()), *script_args]
    result = subprocess.run(command, env={**env(2 // nproc or 1), **(extra_env or {})}, cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode:
        raise RuntimeError(f"{script} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(runs: list[dict], mean_length: float, shape, ceiling: float) -> dict:
    def median(key):
        return statistics.median(r[key] for r in runs)

    samples = [(r["steps"] - 1) * r["micro_batch_size"] / r["steady_seconds"] for r in runs]
    rate = statistics.median(samples)
    return {
        "samples_per_s": rate,
        "real_tokens_per_s": rate * mean_length,
        "peak_rss_mib": median("peak_rss_bytes") / 2**20,
        "first_step_beyond_imports_s": statistics.median(r["first_step_since_start"] - r["import_seconds"] for r in runs),
        "dev_accuracy": median("dev_accuracy"),
        "model_flops": rate * flops_per_example(mean_length, shape),
        "fraction_of_ceiling": rate * flops_per_example(mean_length, shape) / ceiling,
        "repeats": len(runs),
    }


def accuracy_parity(work: Path, steps: int, seeds: int) -> dict:
    """Dev accuracy of the launcher and of Trainer after the same longer run, over several seeds:
    early in training one seed's data order moves accuracy by several points, so one short run
    cannot show parity. (Timings here do not matter: accuracy does not depend on load.)"""
    out = {"steps": steps, "seeds": list(range(1, seeds + 1)), "launcher": [], "trainer": []}
    for seed in out["seeds"]:
        out["launcher"].append(run_launcher(steps, 1, work / f"acc-launcher-{seed}", extra=(f"training.seed={seed}",))["dev_accuracy"])
        out["trainer"].append(run_script("hf_trainer.py", steps, work / f"acc-trainer-{seed}.json", seed,
                                         sampling="group_by_length")["dev_accuracy"])
    return out


def memory_check(work: Path) -> list[dict]:
    """Per-rank optimizer state on 2 gloo ranks, measured after the first step, vs the plan."""
    from launcher.plan import Strategy, memory_estimate

    rows = []
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        out = work / f"memory-{strategy}"
        run_launcher(2, 2, out, extra=(f"distributed.strategy={strategy}",))
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = next(e for e in events if e["event"] == "first_step")
        start = next(e for e in events if e["event"] == "start")
        estimate = memory_estimate(start["parameters"], Strategy(strategy), "fp32", 2)
        rows.append({"strategy": strategy, "estimated_optimizer_bytes": estimate.optimizer,
                     "measured_optimizer_bytes": first["rank_optimizer_state_bytes"],
                     "measured_adam_moment_bytes": first["rank_adam_moment_bytes"],
                     "measured_master_weight_bytes": first["rank_master_weight_bytes"],
                     "estimated_parameter_bytes": estimate.parameters,
                     "measured_parameter_bytes": first["rank_parameter_bytes"]})
    ddp, ddp_moments = rows[0]["measured_optimizer_bytes"], rows[0]["measured_adam_moment_bytes"]
    for row in rows:
        row["optimizer_vs_ddp"] = row["measured_optimizer_bytes"] / ddp
        row["adam_moments_vs_ddp"] = row["measured_adam_moment_bytes"] / ddp_moments
    return rows


def cache_check(work: Path) -> dict:
    """Preprocessing time of a first run (tokenize) and a second run (read the cache), each in a
    fresh process, library imports excluded (as for time-to-first-step)."""
    timings = {}
    for attempt in ("first", "second"):
        code = ("import time, sys; from launcher.recipe import load_recipe; from launcher.tasks import TASKS; "
                "from launcher.data import prepare_data; from launcher.model_io import load_tokenizer; "
                "import datasets.arrow_dataset, datasets.load, pyarrow.compute; "
                f"r = load_recipe({str(RECIPE)!r}); t = TASKS[r.task](r); tok = load_tokenizer(r); "
                "s = time.perf_counter(); prepare_data(r, t, tok); print(time.perf_counter() - s)")
        result = subprocess.run([PYTHON, "-c", code], env=dict(env(2), LAUNCHER_CACHE=str(work / "cache")),
                                cwd=REPO, capture_output=True, text=True, check=True)
        timings[attempt] = float(result.stdout.strip().splitlines()[-1])
    timings["speedup"] = timings["first"] / timings["second"]
    return timings


def compile_check(work: Path, steps: int, repeats: int) -> dict:
    """training.compile (accelerate's dynamo_backend=inductor) against the same run eager, interleaved:
    time to the first optimizer step beyond imports (compilation included) and the steady-state rate
    after it, from step 10 to the last (the length-grouped batches change shape every step; torch marks
    the length dynamic after the first recompilation)."""
    rows = {"eager": [], "compiled": []}
    for i in range(repeats):
        for name, extra in (("eager", ()), ("compiled", ("training.compile=true",))):
            out = work / f"compile-{name}-{i}"
            run = run_launcher(steps, 1, out, extra=("training.log_every=10", *extra))
            events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            elapsed = {e["step"]: e["elapsed_s"] for e in events if e["event"] == "train"}
            rows[name].append({"first_step_beyond_imports_s": run["first_step_since_start"] - run["import_seconds"],
                               "samples_per_s": (steps - 10) * run["micro_batch_size"] / (elapsed[steps] - elapsed[10])})
    return {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 steps, 1 repeat, no memory/accuracy checks")
    parser.add_argument("--accuracy-steps", type=int, default=400, help="steps of the accuracy-parity runs (default 400; 0 skips)")
    parser.add_argument("--accuracy-seeds", type=int, default=3, help="seeds of the accuracy-parity runs (default 3)")
    parser.add_argument("--compile", action="store_true", help="also measure training.compile (minutes of compilation)")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="launcher-bench-"))
    sys.path.insert(0, str(REPO))

    ceiling = matmul_ceiling(threads=2)
    shape = model_shape()
    mean_length = mean_train_length()
    anchor = "Trainer, group_by_length"
    ways = {
        "launcher": lambda i: run_launcher(steps, 1, work / f"launcher-{i}"),
        anchor: lambda i: run_script("hf_trainer.py", steps, work / f"trainer-gbl-{i}.json", sampling="group_by_length"),
        "Trainer, random batches": lambda i: run_script("hf_trainer.py", steps, work / f"trainer-{i}.json"),
        "naive": lambda i: run_script("naive_loop.py", steps, work / f"naive-{i}.json"),
    }
    raw = {name: [] for name in ways}
    for i in range(repeats):  # interleaved, so slow drifts of the machine hit every way alike
        for name, run in ways.items():
            raw[name].append(run(i))
    table = {name: summarize(runs, mean_length, shape, ceiling) for name, runs in raw.items()}
    two = {"launcher": [], anchor: []}
    for i in range(repeats):
        two["launcher"].append(run_launcher(steps, 2, work / f"launcher-2ranks-{i}"))
        two[anchor].append(run_script("hf_trainer.py", steps, work / f"trainer-gbl-2ranks-{i}.json",
                                      sampling="group_by_length", nproc=2))
    two_ranks = {name: summarize(runs, mean_length, shape, ceiling) for name, runs in two.items()}
    results = {"steps": steps, "repeats": repeats, "matmul_ceiling_flops": ceiling, "mean_train_length": mean_length,
               "ways": table, "two_ranks": two_ranks, "cache": cache_check(work)}
    if not args.quick:
        if args.compile:
            results["compile"] = compile_check(work, steps, 1)  # compiling takes minutes on a CPU
        results["memory"] = memory_check(work)
        if args.accuracy_steps:
            results["accuracy"] = accuracy_parity(work, args.accuracy_steps, args.accuracy_seeds)

    print(f"\nmatmul ceiling (fp32, 2 threads, best of 512/1024/2048): {ceiling / 1e9:.1f} GFLOP/s; "
          f"mean real length {mean_length:.1f} tokens; {steps} steps x micro-batch 16, {repeats} repeat(s), medians\n")
    print("| way | samples/s | real tokens/s | peak RSS (MiB) | first step beyond imports (s) | dev accuracy | model GFLOP/s | of ceiling | vs Trainer, group_by_length |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [*table.items(), *((f"{name}, 2 gloo ranks (1 thread each)", row) for name, row in two_ranks.items())]
    for name, row in rows:
        base = two_ranks[anchor] if "2 gloo ranks" in name else table[anchor]
        print(f"| {name} | {row['samples_per_s']:.1f} | {row['real_tokens_per_s']:.0f} | {row['peak_rss_mib']:.0f} | "
              f"{row['first_step_beyond_imports_s']:.2f} | {row['dev_accuracy']:.4f} | {row['model_flops'] / 1e9:.1f} | "
              f"{row['fraction_of_ceiling']:.0%} | {row['samples_per_s'] / base['samples_per_s']:.2f}x |")
    launcher, trainer, naive = table["launcher"], table[anchor], table["naive"]
    print(f"\nlauncher / Trainer (group_by_length) samples/s: {launcher['samples_per_s'] / trainer['samples_per_s']:.2f}x "
          f"(target >= 1.2x); 2 ranks: {two_ranks['launcher']['samples_per_s'] / two_ranks[anchor]['samples_per_s']:.2f}x")
    print(f"launcher / Trainer (random batches) samples/s: "
          f"{launcher['samples_per_s'] / table['Trainer, random batches']['samples_per_s']:.2f}x")
    print(f"launcher / naive samples/s:   {launcher['samples_per_s'] / naive['samples_per_s']:.2f}x (target >= 3x)")
    print(f"2 ranks / 1 process:          {two_ranks['launcher']['samples_per_s'] / launcher['samples_per_s']:.2f}x "
          f"(the machine has 2 cores)")
    if "compile" in results:
        eager, compiled = results["compile"]["eager"], results["compile"]["compiled"]
        print(f"training.compile: first step beyond imports {eager['first_step_beyond_imports_s']:.1f} s -> "
              f"{compiled['first_step_beyond_imports_s']:.1f} s; samples/s from step 10: {eager['samples_per_s']:.1f} -> "
              f"{compiled['samples_per_s']:.1f} ({compiled['samples_per_s'] / eager['samples_per_s']:.2f}x)")
    cache = results["cache"]
    print(f"tokenization: first run {cache['first']:.2f} s, second run {cache['second']:.3f} s "
          f"({cache['speedup']:.0f}x faster; target >= 10x)")
    if "memory" in results:
        print("\n| strategy (2 ranks) | optimizer state / rank: estimated | measured (Adam m+v, fp32 master) | vs DDP | Adam m+v vs DDP | parameters / rank: estimated | measured |")
        print("|---|---|---|---|---|---|---|")
        for row in results["memory"]:
            mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
            print(f"| {row['strategy']} | {mib(row['estimated_optimizer_bytes'])} | {mib(row['measured_optimizer_bytes'])} "
                  f"({mib(row['measured_adam_moment_bytes'])}, {mib(row['measured_master_weight_bytes'])}) | "
                  f"{row['optimizer_vs_ddp']:.2f} | {row['adam_moments_vs_ddp']:.2f} | "
                  f"{mib(row['estimated_parameter_bytes'])} | {mib(row['measured_parameter_bytes'])} |")
    if "accuracy" in results:
        acc = results["accuracy"]
        mean = {k: statistics.mean(acc[k]) for k in ("launcher", "trainer")}
        spread = {k: statistics.pstdev(acc[k]) for k in ("launcher", "trainer")}
        print(f"\ndev accuracy after {acc['steps']} steps, seeds {acc['seeds']}: launcher {mean['launcher']:.4f} "
              f"(sd {spread['launcher']:.4f}; {acc['launcher']}), Trainer {mean['trainer']:.4f} (sd {spread['trainer']:.4f}; "
              f"{acc['trainer']}); difference {mean['launcher'] - mean['trainer']:+.4f} (target within 0.01)")
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
