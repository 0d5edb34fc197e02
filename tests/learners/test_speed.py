"""Decode speed timed interleaved on the tiny Llama, under a CPU hog on every core (issue 17, point 1).

A candidate with its parent's shapes is never rejected for speed (the gate does not apply, and the interleaved
ratio stays near 1 however busy the machine is); a candidate that really decodes slower still fails the gate.
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from selftune.learners.evaluate import load_model
from selftune.learners.speed import DEFAULT_SPEED_PROMPT, compare_decode_speed, shape_difference
from selftune.policies.gates import GateConfig, GateResult, SuiteMetrics, evaluate_gates

SPEED = {"new_tokens": 8, "rounds": 6}
"""Short timings (the tiny model decodes ~2 ms a token): enough to show the ratio, fast enough for the suite."""


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


@contextmanager
def cpu_hog() -> Iterator[None]:
    """A process spinning on every core, and this one timing with one torch thread, as the cycle's worker does
    on 2 cores (``lm.set_threads(0)``): the busy machine of the issue, where a single-shot timing said 0.66x."""
    threads = torch.get_num_threads()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for hog in hogs:
            hog.kill()
            hog.wait()


def speed_gate(comparison) -> GateResult:
    """The cycle's speed gate on a comparison of parent (A) and candidate (B), recorded as ``suites.decode_speeds``
    records it."""
    parent = SuiteMetrics(new_data_loss=1.0, params=1, decode_tokens_per_s=comparison.a.tokens_per_s)
    candidate = SuiteMetrics(new_data_loss=0.5, params=1, decode_tokens_per_s=comparison.b.tokens_per_s,
                             same_shapes_as_parent=comparison.same_shapes)
    return next(r for r in evaluate_gates(candidate, parent, GateConfig()) if r.name == "decode_speed_ratio")


def unpruned_candidate(parent: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """The parent with every weight moved a little (what a merged LoRA adapter does): new values, same shapes."""
    candidate = copy.deepcopy(parent)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return candidate


def test_under_a_cpu_hog_ten_unpruned_candidates_of_ten_pass_the_speed_gate(tiny) -> None:
    parent, tokenizer = tiny
    gates, ratios = [], []
    with cpu_hog():
        for seed in range(10):
            comparison = compare_decode_speed(parent, unpruned_candidate(parent, seed), tokenizer, **SPEED)
            gates.append(speed_gate(comparison))
            ratios.append(comparison.ratio)
    assert [g.passed for g in gates] == [True] * 10, [g.reason for g in gates]
    assert all(g.reason.startswith("not applicable: same shapes as the parent") for g in gates), gates[0].reason
    assert all(g.value is None and g.margin is None for g in gates)
    # And the interleaved timing itself says "the same speed": the load falls on both alike. Measured on 2 busy
    # cores with these settings, the median of ten comparisons was 0.88-1.03 (12 sets); single ones 0.59-1.87
    # (runs of 8 tokens are short next to the scheduler's slices), so a single one is held within a factor 2.5.
    assert 0.8 <= statistics.median(ratios) <= 1.25, ratios
    assert all(0.4 <= r <= 2.5 for r in ratios), ratios


def test_under_the_same_hog_a_really_slower_candidate_still_fails_the_speed_gate(tiny) -> None:
    parent, tokenizer = tiny
    # On this tiny model the 49k-token head and generate's own work are most of a token's cost: twice the layers
    # (4) decode only ~0.9x as fast. Ten times the layers (20) is what decodes about 2.5x slower (CPU time, idle).
    config = copy.deepcopy(parent.config)
    config.num_hidden_layers = 20
    torch.manual_seed(0)
    slow = LlamaForCausalLM(config).eval()
    with cpu_hog():
        comparison = compare_decode_speed(parent, slow, tokenizer, **SPEED)
    gate = speed_gate(comparison)
    assert not comparison.same_shapes and "model.layers.10." in comparison.shape_difference
    assert comparison.ratio < GateConfig().min_decode_speed_ratio, comparison.to_dict()
    assert not gate.passed and gate.value == pytest.approx(comparison.ratio) and gate.margin < 0
    assert "tokens/s" in gate.reason and "at least 0.80x required" in gate.reason


def test_shape_difference_names_the_first_parameter_that_differs(tiny, tiny_model_dir: Path) -> None:
    parent, _ = tiny
    assert shape_difference(parent, unpruned_candidate(parent, 0)) == ""
    deeper = copy.deepcopy(parent.config)
    deeper.num_hidden_layers = 3
    assert shape_difference(parent, LlamaForCausalLM(deeper)).startswith("model.layers.2.")
    assert "only in the second model" in shape_difference(parent, LlamaForCausalLM(deeper))
    narrower = copy.deepcopy(parent.config)
    narrower.intermediate_size = 96  # MLP channels pruned
    assert shape_difference(parent, LlamaForCausalLM(narrower)) == (
        "model.layers.0.mlp.down_proj.weight: [64, 128] torch.float32 against [64, 96] torch.float32")
    half = load_model(tiny_model_dir, dtype=torch.bfloat16)[0]  # the same shapes in another dtype: other work
    assert "torch.float32 against" in shape_difference(parent, half)


def test_the_comparison_records_every_run_and_refuses_an_empty_one(tiny) -> None:
    parent, tokenizer = tiny
    prompts = (DEFAULT_SPEED_PROMPT, "Name a prime number.")
    comparison = compare_decode_speed(parent, parent, tokenizer, prompts=prompts, new_tokens=2, rounds=2, warmup=0)
    assert len(comparison.a.runs) == len(comparison.b.runs) == 4  # rounds x prompts
    assert comparison.a.tokens_per_s == statistics.median(comparison.a.runs) > 0
    assert comparison.ratio == comparison.b.tokens_per_s / comparison.a.tokens_per_s
    recorded = comparison.to_dict()
    assert recorded["same_shapes"] is True and recorded["rounds"] == 2 and recorded["b"]["new_tokens"] == 2
    with pytest.raises(ValueError, match="at least 2 tokens"):
        compare_decode_speed(parent, parent, tokenizer, new_tokens=1)
    with pytest.raises(ValueError, match="rounds = 0"):
        compare_decode_speed(parent, parent, tokenizer, rounds=0)
