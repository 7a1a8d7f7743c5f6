"""Padding-free packing (sft.packing) against padded batches, on real dialogues: real (non-pad)
tokens/s of the launcher's own optimizer step (FineTuneRun._optimizer_step: collate, forward, the
task's summed loss, backward, clipping, AdamW) on the ChatterBot conversations
(recipes/data/chatterbot_english.jsonl, with the settings of recipes/dialogue_chatterbot.yaml: its
system prompt, max_length 128; micro-batch 8, 2 accumulation steps: global batch 16), with a randomly initialized Llama of SmolLM2-135M's
proportions, scaled down: its vocabulary (49152, tied embeddings), head size 64, 3 query heads per
key/value head, MLP 8/3 x hidden; by default 3 heads (hidden 192, intermediate 512) and 4 layers
(SmolLM2-135M: 9 heads, hidden 576, 30 layers: --heads 9 --layers 30). fp32 on CPU, 1 thread (the
steadiest timing on a shared machine; --threads).

    .venv/bin/python benchmarks/packing.py [--steps 6] [--tries 3] [--accum 2] [--heads 3] [--layers 4]   # ~4 minutes

Three ways, interleaved step by step in one process (one model, one optimizer), so that the load of
a shared machine hits all alike:
- padded, random batches: the sampler's batches (`training.group_by_length: false`), padded;
- padded, length-grouped: the sampler's length-grouped batches (`group_by_length: true`, as the
  shipped recipe), padded;
- packed: the random batches again (the same examples, step for step), `sft.packing: true`.
After one warm-up step of each, every step is run --tries times per way (the ways interleaved, each
try in a rotated order) and its fastest try kept: load from other processes only ever adds time.
Each step gives each way's real tokens/s and its ratio to the padded random run's at the same step
(the packed one on the very same examples); the table shows medians over steps. (That packing gives the padded run's losses is
what tests/integration/test_sft_packing.py proves; here only speed is measured.) Needs the tokenizer
from scripts/prepare_dialogue_assets.py (recipes/data/smollm2-tokenizer/).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
DATA = REPO / "recipes" / "data" / "chatterbot_english.jsonl"
TOKENIZER = REPO / "recipes" / "data" / "smollm2-tokenizer"
SYSTEM_PROMPT = "You are a friendly chatbot. Answer in one or two sentences."  # as recipes/dialogue_chatterbot.yaml
WAYS = ("padded, random batches", "padded, length-grouped", "packed")


def write_model(directory: Path, heads: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=49152, hidden_size=64 * heads, intermediate_size=64 * heads * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 3,
                         max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    for item in TOKENIZER.iterdir():
        shutil.copy(item, directory / item.name)
    return directory


def recipe(model: Path, out: Path, steps: int, accum: int = 2, precision: str = "fp32") -> dict:
    return {
        "name": "packing-bench", "task": "causal_lm_sft",
        "model": {"name_or_path": str(model)},
        "data": {"train": str(DATA), "text_column": "messages", "validation_size": 0, "test_size": 8,
                 "max_length": 128, "cache_dir": str(out.parent / "cache")},
        "training": {"max_steps": steps, "micro_batch_size": 8, "global_batch_size": 8 * accum, "learning_rate": 2e-5,
                     "warmup_steps": 0, "precision": precision, "group_by_length": False},
        "evaluation": {"every_epoch": False, "metrics": ["perplexity"]},
        "sft": {"system_prompt": SYSTEM_PROMPT, "generate_max_new_tokens": 0},
        "output": {"dir": str(out), "export_model": False, "save_predictions": False, "report": False},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per way (after one warm-up step each)")
    parser.add_argument("--tries", type=int, default=3, help="times each step is run per way (the fastest counts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches of 8 per optimizer step")
    parser.add_argument("--heads", type=int, default=3, help="query heads (a multiple of 3); hidden = 64 x heads")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 on a GPU (benchmarks/gpu.sh)")
    args = parser.parse_args()
    if not TOKENIZER.is_dir() or not DATA.exists():
        print(f"error: {TOKENIZER} or {DATA} is missing; run `python scripts/prepare_dialogue_assets.py` first")
        return 2
    import torch

    from launcher.engine.run import FineTuneRun
    from launcher.engine.telemetry import LossWindow
    from launcher.recipe import validate_recipe
    from launcher.sampling import rank_micro_batches

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="packing-bench-"))
    model = write_model(work / "model", args.heads, args.layers)
    run = FineTuneRun(validate_recipe(recipe(model, work / "run", args.steps + 1, args.accum, args.precision)))
    try:
        run.setup()
        run.model.train()
        run.window = LossWindow()
        features, batch, seed = run.train_features, run.topology.batch, run.recipe.training.seed
        lengths = run._train_lengths()
        random_batches = rank_micro_batches(len(features), batch, 0, seed, 0)
        grouped_batches = rank_micro_batches(len(features), batch, 0, seed, 0, lengths=lengths)
        seconds = {way: [] for way in WAYS}
        tokens = {way: [] for way in WAYS}
        fed = {way: [] for way in WAYS}
        for step in range(args.steps + 1):
            chosen = {"padded, random batches": next(random_batches), "padded, length-grouped": next(grouped_batches)}
            chosen["packed"] = chosen["padded, random batches"]
            fastest = {way: float("inf") for way in WAYS}
            for attempt in range(args.tries if step > 0 else 1):  # the first step of each way warms up
                shift = (step + attempt) % 3
                for way in WAYS[shift:] + WAYS[:shift]:  # rotate who goes first
                    run.task.sft.packing = way == "packed"
                    started = time.perf_counter()
                    run._optimizer_step(chosen[way])
                    if run.accelerator.device.type == "cuda":
                        torch.cuda.synchronize()  # the step only queued its kernels
                    fastest[way] = min(fastest[way], time.perf_counter() - started)
            if step == 0:
                continue
            for way in WAYS:
                micro_batches = chosen[way]
                seconds[way].append(fastest[way])
                tokens[way].append(sum(int(lengths[i]) for mb in micro_batches for i in mb))
                fed[way].append(sum(int(lengths[mb].max()) * len(mb) if way != "packed" else int(lengths[mb].sum())
                                    for mb in micro_batches))
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)
    rates = {way: [t / sec for t, sec in zip(tokens[way], seconds[way])] for way in WAYS}

    def median_ratio(way, base):
        return statistics.median(a / b for a, b in zip(rates[way], rates[base]))

    print(f"\nChatterBot, SmolLM2-shaped Llama (hidden {64 * args.heads}, {args.layers} layers, vocab 49152), "
          f"micro-batch 8 x {args.accum} accumulation, {args.threads} thread(s), {args.steps} optimizer steps per way, "
          f"fastest of {args.tries} interleaved tries each, medians over steps\n")
    print("| way | real tokens/s | tokens fed | padding | vs padded random | vs padded grouped |")
    print("|---|---|---|---|---|---|")
    for way in WAYS:
        padding = 1 - sum(tokens[way]) / sum(fed[way])
        print(f"| {way} | {statistics.median(rates[way]):.0f} | {sum(fed[way])} | {padding:.0%} | "
              f"{median_ratio(way, 'padded, random batches'):.2f}x | {median_ratio(way, 'padded, length-grouped'):.2f}x |")
    same = [a / b for a, b in zip(rates["packed"], rates["padded, random batches"])]
    print(f"\npacked / padded on the same examples, per step: {', '.join(f'{r:.2f}' for r in same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
