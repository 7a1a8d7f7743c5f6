"""The activation estimate `distributed.strategy: auto` decides from, against what a training step really
holds; and what gradient checkpointing saves. Measured with benchmarks/memory.py (deterministic on a CPU:
every tensor storage followed from allocation to release, not the process RSS)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
bench = sys.modules["memory_benchmark"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

MiB = 2**20
# (model, micro batch, length): two shapes each, small enough to measure in seconds on a CPU
SHAPES = [("MiniLM-L6", 4, 64), ("MiniLM-L6", 2, 256), ("SmolLM2-135M shape", 1, 128), ("SmolLM2-135M shape", 4, 32)]


@pytest.fixture(scope="module")
def measured():
    """Each shape measured at 1 and 2 layers (the full depths are extrapolated: every layer adds the same
    bytes, see test_each_layer_adds_the_same_bytes), with and without checkpointing."""
    results = {}
    for name, case in bench.CASES.items():
        for depth in (1, 2):
            config = case.config(depth)
            model = bench.build(config, case.causal_lm)
            for _, micro_batch, length in (s for s in SHAPES if s[0] == name):
                batch = case.batch(micro_batch, length, config.vocab_size)
                for checkpointing in (False, True):
                    results[name, micro_batch, length, checkpointing, depth] = bench.run_model(model, batch, case.loss, checkpointing)
    return results


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("name, micro_batch, length", SHAPES)
def test_activation_estimate_is_within_30_percent_of_the_measured_peak(measured, name, micro_batch, length, checkpointing):
    case = bench.CASES[name]
    layers = case.config().num_hidden_layers
    one, two = (measured[name, micro_batch, length, checkpointing, depth] for depth in (1, 2))
    peak = one.peak + (layers - 1) * (two.peak - one.peak)
    estimate = bench.estimate(case, micro_batch, length, checkpointing)
    print(f"{name} {micro_batch} x {length} checkpointing={checkpointing}: estimate {estimate / MiB:.1f} MiB, "
          f"measured peak {peak / MiB:.1f} MiB, ratio {estimate / peak:.2f}")
    assert 0.7 <= estimate / peak <= 1.3


def test_each_layer_adds_the_same_bytes():
    """What makes measuring 1 and 2 layers and extrapolating to 6 or 30 sound."""
    case = bench.CASES["MiniLM-L6"]
    batch = case.batch(4, 64, 30522)
    steps = [bench.run_model(bench.build(case.config(depth), False), batch, case.loss, False) for depth in (1, 2, 3)]
    saved = [b.saved - a.saved for a, b in zip(steps, steps[1:])]
    peaks = [b.peak - a.peak for a, b in zip(steps, steps[1:])]
    assert saved[0] == saved[1] and abs(peaks[0] - peaks[1]) <= 0.01 * peaks[0], (saved, peaks)


def test_checkpointing_lowers_the_peak_of_a_larger_batch():
    """MiniLM-L6 (all 6 layers) at micro batch 16 x 128, through the engine's enable_gradient_checkpointing."""
    case = bench.CASES["MiniLM-L6"]
    config = case.config()
    model = bench.build(config, False)
    batch = case.batch(16, 128, config.vocab_size)
    plain = bench.run_model(model, batch, case.loss, checkpointing=False)
    checkpointed = bench.run_model(model, batch, case.loss, checkpointing=True)
    print(f"MiniLM-L6 16 x 128: peak {plain.peak / MiB:.1f} MiB without checkpointing, {checkpointed.peak / MiB:.1f} MiB "
          f"with ({plain.peak / checkpointed.peak:.2f}x lower)")
    # Six layers of activations (~90 MiB each with attention probabilities) become six layer inputs (6 MiB) plus one layer.
    assert checkpointed.peak < 0.3 * plain.peak
