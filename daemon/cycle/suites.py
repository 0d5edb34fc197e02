"""What the evaluate step measures on one model, and the suites the gates read.

Every model is measured on the same rows with its own tokenizer, in nats per byte of the answers
(``LOSS_UNIT``), so a candidate with a trimmed vocabulary is on its parent's scale; per-token figures sit
beside them under ``*_per_token`` keys, for reading, not for the gates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# torch and transformers load at import: only the cycle's worker imports this module.
from selftune.learners import evaluate as ev
from selftune.learners.speed import compare_decode_speed
from selftune.policies.errors import NotFoundError
from selftune.policies.gates import LOSS_UNIT, PER_TOKEN_LOSS_UNIT, GateResult, SuiteMetrics

from selftune.daemon.cycle.probes import foundation_probe_loss
from selftune.daemon.cycle.rows import conversations, interaction_row
from selftune.daemon.cycle.workdir import Work

SAMPLE_ANSWER_TOKENS = 48


def measure(directory: Path, *, held_out: list[dict[str, Any]], max_length: int,
            earlier: dict[str, list[dict[str, Any]]] | None = None, probe: list[Any] | None = None,
            golden: list[dict[str, Any]] = (), samples: int = 0) -> dict[str, Any]:
    """One model's suite: held-out loss on the new rows (cut at ``max_length``, as training cuts them), on each
    earlier experience and on the foundation probe; golden prompts; parameters; sample answers. (Decode speed is
    timed for two models together: ``decode_speeds``.)"""
    model, tokenizer = ev.load_model(directory)
    non_finite = ev.first_non_finite_parameter(model)
    if non_finite:  # nothing to score: a broken model is rejected, not measured
        return {"non_finite_parameter": non_finite}
    new_data = ev.held_out_loss(model, tokenizer, conversations(held_out), max_length=max_length)
    losses = {domain: ev.held_out_loss(model, tokenizer, conversations(rows), max_length=max_length)
              for domain, rows in (earlier or {}).items() if rows}
    foundation = ev.held_out_loss(model, tokenizer, probe) if probe else None
    choices = [(g["messages"], [g["expected"], *g["rejected"]], 0) for g in golden if g["rejected"]]
    return {
        "loss_unit": LOSS_UNIT,
        "new_data_loss": new_data.loss,
        "experience_losses": {domain: result.loss for domain, result in losses.items()},
        "foundation_probe_loss": foundation.loss if foundation else None,
        "per_token_unit": PER_TOKEN_LOSS_UNIT,
        "new_data_loss_per_token": new_data.loss_per_token,
        "experience_losses_per_token": {domain: result.loss_per_token for domain, result in losses.items()},
        "foundation_probe_loss_per_token": foundation.loss_per_token if foundation else None,
        "golden_pass_rate": ev.choice_accuracy(model, tokenizer, choices).accuracy if choices else None,
        "golden_count": len(choices),
        "params": ev.parameter_count(model),
        "samples": _samples(model, tokenizer, held_out[:samples]) if samples else [],
    }


def decode_speeds(parent_dir: Path, timed: Mapping[str, Path | None]) -> dict[str, dict[str, Any]]:
    """Decode tokens/s of the parent and of each model in ``timed`` (by suite name; None: not timed), as suite
    fields. Each is timed interleaved with the parent (``speed.compare_decode_speed``), so that another process's
    load falls on both alike, and records whether it has the parent's shapes (then the speed gate does not apply).

    Two models are in memory at a time: the parent and the one timed against it."""
    parent, parent_tokenizer = ev.load_model(parent_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, directory in timed.items():
        if directory is None:
            continue
        model, tokenizer = ev.load_model(directory)
        comparison = compare_decode_speed(parent, model, parent_tokenizer, tokenizer)
        del model  # before the next one loads
        out.setdefault("parent", {"decode_tokens_per_s": comparison.a.tokens_per_s})
        out[name] = {"decode_tokens_per_s": comparison.b.tokens_per_s, "same_shapes_as_parent": comparison.same_shapes,
                     "decode_speed": comparison.to_dict()}
    return out


def suite_metrics(values: dict[str, Any]) -> SuiteMetrics:
    """The gates' view of a recorded suite."""
    return SuiteMetrics.from_dict({k: v for k, v in values.items() if k != "samples"})


def finite_weights_gate(suite: dict[str, Any]) -> GateResult | None:
    """A failed ``finite_weights`` gate if ``measure`` found a NaN or Inf weight in the model (None: all finite)."""
    name = suite.get("non_finite_parameter")
    if not name:
        return None
    return GateResult("finite_weights", False, None, 0.0, None,
                      f"the candidate's weight {name} holds non-finite values: the model is broken")


def foundation_suite(work: Work) -> SuiteMetrics:
    """Generation 0's loss on its own probe answers (nats per byte), for the cumulative drift gate."""
    return SuiteMetrics(new_data_loss=math.nan, params=0, foundation_probe_loss=foundation_probe_loss(work.context))


def experience_rows(work: Work, limit: int) -> dict[str, list[dict[str, Any]]]:
    """Held-out rows of every earlier experience along the lineage, by domain (rows since deleted are skipped)."""
    earlier = work.parent.metrics.get("experiences", {})
    out = {}
    with work.context.store.transaction() as tx:
        for domain, ids in earlier.items():
            rows = []
            for interaction_id in ids[:limit]:
                try:
                    rows.append(interaction_row(tx.interactions.get(interaction_id)))
                except NotFoundError:
                    continue
            out[domain] = rows
    return out


def _samples(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    answers = ev.generate_answers(model, tokenizer, [r["messages"][-2]["content"] for r in rows],
                                  max_new_tokens=SAMPLE_ANSWER_TOKENS)
    return [{"prompt": r["messages"][-2]["content"], "reference": r["messages"][-1]["content"], "answer": a}
            for r, a in zip(rows, answers)]
