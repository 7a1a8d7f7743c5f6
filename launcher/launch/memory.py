"""What the plan needs to choose a strategy from memory: the model, counted on the meta device, and the
memory each rank has. The arithmetic and the decision are launcher/memory.py (pure)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import LauncherError
from ..finetune import apply_method, checkpointing_refusal, transformer_blocks
from ..memory import LADDER, MemoryChoice, ModelFacts, Rung, choose_strategy, model_shape, parse_size
from ..plan import BatchPlan, check_launch, format_bytes
from ..recipe import with_overrides
from ..schema import Recipe

LM_HEADS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")  # logits over the vocabulary at every position


def model_facts(recipe: Recipe, task, num_parameters: int) -> ModelFacts:
    """Shape, trainable parameters (the fine-tuning method applied), ZeRO-3's largest gathered block and
    whether gradient checkpointing is possible - all from the meta-device model, no weights read."""
    import torch

    model = task.meta_model()
    refused = checkpointing_refusal(model)
    shape = model_shape(model.config, lm_logits=task.auto_model_class in LM_HEADS)
    blocks = [sum(p.numel() for p in block.parameters()) for block in transformer_blocks(model)]
    embedding = model.get_input_embeddings()
    largest = max(blocks + [embedding.weight.numel() if embedding is not None else 0])
    base = sum(p.numel() for p in model.parameters())
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads a property transformers 5 deprecates
        trained = apply_method(model, recipe, task)  # (changes `model` in place)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    # The method's own weights (LoRA matrices, adapters, prefixes) add to the base model's count.
    extra = sum(p.numel() for p in trained.parameters()) - base
    return ModelFacts(num_parameters=num_parameters + max(extra, 0), trainable_parameters=trainable,
                      largest_block_parameters=largest, shape=shape, checkpointing_refused=refused)


def host_memory() -> int:
    """This machine's memory, or the container's limit if it has a lower one (cgroup v2)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def gpu_memory() -> int:
    import torch

    # Total, not free, memory: free memory needs a CUDA context in this process, which would then hold
    # memory on every GPU for the whole run. Memory other processes hold is not subtracted.
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def memory_budget(memory_per_rank: str | None, device: str, procs_per_node: int, remote: bool) -> tuple[float, str]:
    """Bytes each rank may use and where that number comes from, in words."""
    if memory_per_rank is not None:
        return float(parse_size(memory_per_rank)), "--memory-per-rank"
    if device == "cuda":
        if remote:
            raise LauncherError(
                "distributed.strategy=auto picks a strategy from the GPUs' memory, which this machine cannot see for "
                "a Slurm job: pass --memory-per-rank (e.g. 80GiB for an 80 GB GPU) or --strategy"
            )
        return float(gpu_memory()), "the smallest visible GPU's total memory"
    host = host_memory()
    where = "this machine's memory" if remote else "host memory"
    return host / procs_per_node, f"{where} {format_bytes(host)} / {procs_per_node} process(es) per node"


def _first_clause(message: str) -> str:
    return message.split(";")[0]


def choose(recipe: Recipe, facts: ModelFacts, batch: BatchPlan, env_view: dict, device: str, budget: float,
           budget_source: str) -> MemoryChoice:
    """`distributed.strategy: auto`: the first rung of the ladder this recipe can run on and fits."""
    training = recipe.training

    def why_not(rung: Rung) -> str | None:
        checkpointing = rung.checkpointing or training.gradient_checkpointing
        try:
            check_launch(training.model_copy(update={"gradient_checkpointing": checkpointing}), rung.strategy, batch,
                         env_view, cuda=device == "cuda")
            if checkpointing and not training.gradient_checkpointing:
                with_overrides(recipe, ["training.gradient_checkpointing=true"])  # the recipe's own checks
        except LauncherError as exc:
            return _first_clause(str(exc))
        return None

    ladder = LADDER
    if training.gradient_checkpointing:  # asked for: every rung has it
        ladder = tuple(dict.fromkeys(Rung(rung.strategy, True) for rung in LADDER))
    return choose_strategy(facts, training.precision, batch.world_size, batch.micro_batch_size, recipe.data.max_length,
                           device, budget, budget_source, why_not, ladder=ladder)
