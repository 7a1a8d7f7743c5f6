"""Per-rank memory of a training step, and the cheapest strategy that fits (`distributed.strategy: auto`).

Pure: model shape, parameter counts, the recipe's batch and a memory budget in; bytes, a table and a
decision out. Nothing here looks at the machine (launch/plan.py detects the budget) or at torch.

The ladder, cheapest first: ddp -> zero1 -> zero2 -> zero3 -> zero3 + gradient checkpointing ->
zero3_offload -> zero3_offload + gradient checkpointing. A rung costs more than the one before it: more communication
(ZeRO-2's reduce-scatter, ZeRO-3's gathers of every layer's weights in forward and backward), a second
forward of every layer (checkpointing, ~1/3 more compute), transfers to host memory and the optimizer
step on the CPU (offload). `auto` takes the first rung whose estimate fits in HEADROOM of the budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from .errors import LauncherError, TopologyError
from .plan import Strategy, format_bytes, memory_estimate

# Use at most this share of a rank's memory: the estimate leaves out the CUDA context and kernels'
# workspaces (~0.5-1 GiB on a GPU), allocator fragmentation, and communication buffers.
HEADROOM = 0.85


@dataclass(frozen=True)
class Rung:
    strategy: Strategy
    checkpointing: bool = False

    def __str__(self) -> str:
        return f"{self.strategy} + checkpointing" if self.checkpointing else str(self.strategy)


# FSDP goes here when it lands: `fsdp_grad_op` (shards optimizer state and gradients) beside zero2,
# `fsdp` (also the weights) beside zero3; each is one more Rung, the accounting is ZeRO's.
LADDER: tuple[Rung, ...] = (
    Rung(Strategy("ddp")),
    Rung(Strategy("zero1")),
    Rung(Strategy("zero2")),
    Rung(Strategy("zero3")),
    Rung(Strategy("zero3"), checkpointing=True),
    Rung(Strategy("zero3_offload")),
    Rung(Strategy("zero3_offload"), checkpointing=True),
)


# ------------------------------------------------------------------------------------------
# Sizes on the command line

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "--memory-per-rank") -> int:
    """'16GiB', '800MiB', '1.5TB' -> bytes (KiB/MiB/GiB/TiB: powers of 1024; KB/MB/GB/TB: of 1000)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise LauncherError(f"{option} {text!r}: give a size with its unit, e.g. 16GiB, 800MiB or 1.5TB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# ------------------------------------------------------------------------------------------
# The model's shape, as the activation estimate needs it


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int  # transformer blocks (encoder + decoder for encoder-decoder models)
    num_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # SiLU-gated MLP (Llama, Mistral, Qwen, ...): three intermediate-sized projections
    attention_dropout: float
    eager_attention: bool  # attention probabilities are materialized by the implementation itself
    lm_logits: bool  # the task's head produces logits over the vocabulary at every position


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_shape(config, lm_logits: bool) -> ModelShape | None:
    """The numbers the activation estimate needs, read from a transformers config (the common attribute
    names of BERT-, GPT-2-, Llama-, T5- and BART-style configs); None when they cannot be read."""
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if _first(config, "encoder_layers") is not None:  # BART-style encoder-decoder
        layers = config.encoder_layers + _first(config, "decoder_layers", default=0)
    elif getattr(config, "is_encoder_decoder", False) and _first(config, "num_decoder_layers") is not None:
        layers = config.num_layers + config.num_decoder_layers  # T5
    heads = _first(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    vocab = _first(config, "vocab_size")
    if not (hidden and layers and heads and vocab):
        return None
    intermediate = _first(config, "intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", default=4 * hidden)
    activation = str(_first(config, "hidden_act", "activation_function", "feed_forward_proj", default=""))
    gated = "silu" in activation or "swish" in activation or activation.startswith("gated")
    dropout = float(_first(config, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout_rate",
                           default=0.0) or 0.0)
    implementation = getattr(config, "_attn_implementation", None)
    return ModelShape(hidden_size=int(hidden), num_layers=int(layers), num_heads=int(heads),
                      intermediate_size=int(intermediate), vocab_size=int(vocab), gated_mlp=gated,
                      attention_dropout=dropout, eager_attention=implementation == "eager", lm_logits=lm_logits)


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_estimate(shape: ModelShape, micro_batch_size: int, max_length: int, precision: str,
                        checkpointing: bool, device: str = "cuda") -> float:
    """Peak bytes of activations in one forward + backward of one micro batch at full length.

    Per token (b = bytes per activation element: 4 in fp32, 2 in bf16/fp16; h hidden, i intermediate,
    a heads, T = max_length, V vocab), each layer keeps b x (9.5 h + (4 if gated else 2) i) - the norm
    inputs and outputs, q/k/v (k/v at full width: with a padding mask the key/value heads are repeated to
    every query head), the attention output, dropout masks, and the MLP's intermediate tensors - plus the
    attention probabilities b x a x T (x 3 with attention dropout: probabilities, dropped, mask) where
    they are materialized (eager attention, or SDPA with dropout on a CPU), else the padding mask SDPA
    keeps per layer (4 x T); once, b x 6 h for embeddings, final norm and the backward's temporaries;
    and with logits over the vocabulary, 4 x V x 4 bytes: the logits, the float log-softmax the loss
    keeps, and their two gradients. Checkpointing keeps each layer's input (b x h) and one layer's
    activations at a time (recomputed in backward). Calibrated against measured peaks on a CPU
    (benchmarks/memory.py, within 10 % for MiniLM-L6 and a SmolLM2-135M shape); on a GPU, fused
    attention kernels keep less, so the estimate errs high there.
    """
    b = activation_bytes(precision)
    h, length = shape.hidden_size, max_length
    layer = b * (9.5 * h + (4 if shape.gated_mlp else 2) * shape.intermediate_size)
    materialized = shape.eager_attention or (device == "cpu" and shape.attention_dropout > 0)
    if materialized:
        layer += b * shape.num_heads * length * (3 if shape.attention_dropout > 0 else 1)
    else:
        layer += 4 * length
    once = b * 6 * h + (4 * shape.vocab_size * 4 if shape.lm_logits else 0)
    layers = shape.num_layers * b * h + layer if checkpointing else shape.num_layers * layer
    return float(micro_batch_size * length * (layers + once))


# ------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class ModelFacts:
    """What the plan knows of the model, counted on the meta device (launch/plan.py)."""

    num_parameters: int
    trainable_parameters: int
    largest_block_parameters: int  # the most parameters ZeRO-3 gathers at once (a layer or the embedding)
    shape: ModelShape | None  # None: the shape could not be read, activations cannot be estimated
    checkpointing_refused: str | None  # why gradient checkpointing cannot be used, if it cannot


@dataclass(frozen=True)
class RungEstimate:
    rung: Rung
    weights: float  # bytes per rank on the device (ZeRO-3: the shard + the gathered working set)
    gradients: float
    optimizer: float  # AdamW's moments + DeepSpeed's fp32 master copy, this rank's share
    activations: float
    host: float  # bytes per rank moved to host memory (offload)
    budget_total: float  # what counts against the rank's budget (on a CPU host, offloaded bytes too)
    refused: str | None = None  # why the recipe cannot run on this rung at all

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def rung_estimate(rung: Rung, facts: ModelFacts, precision: str, world_size: int, micro_batch_size: int,
                  max_length: int, device: str, refused: str | None = None) -> RungEstimate:
    strategy = rung.strategy
    everything = memory_estimate(facts.num_parameters, strategy, precision, world_size)
    trained = memory_estimate(facts.trainable_parameters, strategy, precision, world_size)
    weights, gradients, optimizer = everything.parameters, trained.gradients, trained.optimizer
    host = 0.0
    if strategy.offload:
        # Offload keeps this rank's shard of every weight and its share of the trained weights'
        # optimizer state in host memory (frozen weights have no optimizer state).
        sharded = Strategy("zero3")
        host = (memory_estimate(facts.num_parameters, sharded, precision, world_size).parameters
                + memory_estimate(facts.trainable_parameters, sharded, precision, world_size).optimizer)
    if strategy.shards_weights:
        # ZeRO-3 gathers each module's full weights for its forward and backward (and prefetches the
        # next): about two of the largest blocks live at once.
        weights += 2 * facts.largest_block_parameters * (2 if precision != "fp32" else 4)
    activations = (activation_estimate(facts.shape, micro_batch_size, max_length, precision, rung.checkpointing, device)
                   if facts.shape is not None else math.nan)
    device_total = weights + gradients + optimizer + activations
    budget_total = device_total + (host if device == "cpu" else 0.0)
    return RungEstimate(rung, weights, gradients, optimizer, activations, host, budget_total, refused)


@dataclass(frozen=True)
class MemoryChoice:
    rows: tuple[RungEstimate, ...]
    chosen: RungEstimate
    budget: float  # bytes per rank
    budget_source: str  # where the budget came from, in words

    @property
    def usable(self) -> float:
        return HEADROOM * self.budget

    def table(self) -> list[str]:
        """The table the decision was made from: one row per rung."""
        unit, scale = next(((u, f) for u, f in (("GiB", 2**30), ("MiB", 2**20)) if self.usable >= f), ("KiB", 2**10))

        def cell(value: float) -> str:
            return "?" if math.isnan(value) else f"{value / scale:.2f}"

        lines = [f"memory per rank: {format_bytes(self.budget)} ({self.budget_source}); usable {HEADROOM:.0%} = "
                 f"{format_bytes(self.usable)}; {unit} per rank:",
                 f"{'rung':<30}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}  fits"]
        for row in self.rows:
            verdict = ("no: " + row.refused) if row.refused else ("yes" if row.budget_total <= self.usable else "no")
            host = f" (+{format_bytes(row.host)} on the host)" if row.host and not row.refused else ""
            marker = "  <- chosen" if row is self.chosen else ""
            lines.append(f"{str(row.rung):<30}{cell(row.weights):>9}{cell(row.gradients):>9}{cell(row.optimizer):>9}"
                         f"{cell(row.activations):>9}{cell(row.budget_total):>9}  {verdict}{host}{marker}")
        return lines

    def reason(self) -> str:
        skipped = self.rows[: self.rows.index(self.chosen)]
        fits = f"{format_bytes(self.chosen.budget_total)} of {format_bytes(self.usable)} usable"
        if not skipped:
            return f"the cheapest rung fits, {fits}"
        why = ", ".join(f"{row.rung} {'cannot run' if row.refused else 'needs ' + format_bytes(row.budget_total)}"
                        for row in skipped)
        return f"the cheapest that fits, {fits}; {why}"


def choose_strategy(facts: ModelFacts, precision: str, world_size: int, micro_batch_size: int, max_length: int,
                    device: str, budget: float, budget_source: str,
                    why_not: Callable[[Rung], str | None] = lambda rung: None,
                    ladder: tuple[Rung, ...] = LADDER) -> MemoryChoice:
    """The first rung of ``ladder`` that the recipe can run on (``why_not`` says why a rung cannot, e.g. a check
    of plan.check_launch) and whose estimate fits HEADROOM x ``budget``. Refuses (TopologyError) when none
    does, naming the numbers and what to change."""
    if facts.shape is None:
        raise TopologyError(
            "distributed.strategy=auto picks a strategy from an estimate of activation memory, but this model's config "
            "does not name its hidden size, layers, heads and vocabulary in a way the launcher reads; set "
            "distributed.strategy (ddp, zero1, zero2, zero3, zero3_offload)"
        )
    rows = []
    for rung in ladder:
        refused = why_not(rung)
        if refused is None and rung.checkpointing and facts.checkpointing_refused:
            refused = facts.checkpointing_refused
        rows.append(rung_estimate(rung, facts, precision, world_size, micro_batch_size, max_length, device, refused))
    usable = HEADROOM * budget
    fitting = [row for row in rows if row.refused is None and row.budget_total <= usable]
    if fitting:
        return MemoryChoice(tuple(rows), fitting[0], budget, budget_source)
    runnable = [row for row in rows if row.refused is None]
    if not runnable:
        raise TopologyError("distributed.strategy=auto: no strategy can run this recipe ("
                            + "; ".join(f"{row.rung}: {row.refused}" for row in rows) + ")")
    smallest = min(runnable, key=lambda row: row.budget_total)
    per_example = smallest.activations / micro_batch_size
    fits_batch = math.floor((usable - (smallest.budget_total - smallest.activations)) / per_example) if per_example else 0
    hint = (f"micro_batch_size {fits_batch} would fit with {smallest.rung}" if 1 <= fits_batch < micro_batch_size
            else "even micro_batch_size 1 does not fit")
    raise TopologyError(
        f"distributed.strategy=auto: nothing fits in {format_bytes(usable)} per rank ({HEADROOM:.0%} of "
        f"{format_bytes(budget)}, {budget_source}): "
        + ", ".join(f"{row.rung} {format_bytes(row.budget_total)}" for row in runnable)
        + f" (activations {format_bytes(smallest.activations)} at micro_batch_size {micro_batch_size} x data.max_length "
        f"{max_length}; {hint}); lower training.micro_batch_size (raise grad_accum_steps to keep the global batch), "
        f"add ranks (--nproc, --nodes), or shorten data.max_length"
    )
