"""Regression gates and the promotion decision.

A candidate and its parent are measured on the same suites; each gate turns one comparison into
pass/fail with its value, threshold and a signed margin (positive = passed with room, negative = by
how much it failed). A non-finite number never passes. Stdlib only, no I/O.

Losses are in nats per UTF-8 byte of the target text (``LOSS_UNIT``), not per token, so that models with
different tokenizers (a trimmed-vocabulary generation and its parent) are measured on one scale: the same
text scored with the same probability has the same loss per byte however many tokens cut it. The loss
gates compare relative changes, which need both sides in one unit and nothing more; a pair measured in
different units fails its gate rather than being compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

LOSS_UNIT = "nats/byte"
"""The unit of every loss the gates, reports and benches compare: summed NLL (nats) / UTF-8 bytes of target text."""
PER_TOKEN_LOSS_UNIT = "nats/token"
"""Mean NLL per target token: the per-token figures kept beside, labelled, and the unit of a record written
before losses were per byte (one with no ``loss_unit``). It depends on the tokenizer: compare it within one only."""


@dataclass(frozen=True)
class GateConfig:
    min_new_data_improvement: float = 0.02
    """Held-out loss on the new data must drop by at least this share of the parent's loss (0.02 = 2%)."""
    max_experience_regression: float = 0.05
    """Held-out loss on each earlier experience may rise by at most this share of the parent's loss."""
    max_foundation_regression: float = 0.05
    """Foundation probe loss may rise by at most this share of the parent's loss."""
    max_foundation_drift: float = 0.25
    """Foundation probe loss may rise by at most this share of generation 0's loss, summed over the lineage."""
    min_golden_pass_rate: float = 1.0
    """Share of golden prompts (user corrections) whose corrected answer the candidate must score best."""
    max_params_ratio: float = 1.0
    """Candidate parameters / parent parameters may be at most this (below 1.0 demands pruning)."""
    min_decode_speed_ratio: float = 0.8
    """Candidate decode tokens/s / parent decode tokens/s must be at least this (timing noise needs slack)."""
    max_prune_cost: float = 0.02
    """A pruned candidate's held-out loss on the new data may be at most this share above the unpruned
    candidate's it was cut from (after the heal): what the smaller size may cost its specialty."""

    def problems(self) -> list[str]:
        out = []
        for name in ("min_new_data_improvement", "max_experience_regression", "max_foundation_regression",
                     "max_foundation_drift", "min_golden_pass_rate", "max_params_ratio", "min_decode_speed_ratio",
                     "max_prune_cost"):
            value = getattr(self, name)
            if not math.isfinite(value):
                out.append(f"gates.{name} = {value}: use a finite number")
        if self.min_new_data_improvement >= 1.0:
            out.append(f"gates.min_new_data_improvement = {self.min_new_data_improvement}: use a share below 1")
        for name in ("max_experience_regression", "max_foundation_regression", "max_foundation_drift", "max_prune_cost"):
            if getattr(self, name) < 0.0:
                out.append(f"gates.{name} = {getattr(self, name)}: use 0 (no regression allowed) or more")
        if not 0.0 <= self.min_golden_pass_rate <= 1.0:
            out.append(f"gates.min_golden_pass_rate = {self.min_golden_pass_rate}: use a share in [0, 1]")
        if self.max_params_ratio <= 0.0:
            out.append(f"gates.max_params_ratio = {self.max_params_ratio}: use a positive ratio, e.g. 1.0 or 0.8")
        if self.min_decode_speed_ratio < 0.0:
            out.append(f"gates.min_decode_speed_ratio = {self.min_decode_speed_ratio}: use 0 (no budget) or more")
        return out


@dataclass(frozen=True)
class SuiteMetrics:
    """One model's numbers on the evaluation suites (the candidate's and its parent's are compared).

    Every loss here is in ``loss_unit``: nats per UTF-8 byte of the target text (``LOSS_UNIT``) for anything
    measured now. Per-token figures may sit beside them in the records; the gates never read them.
    """

    new_data_loss: float
    """Loss on the new data's held-out rows, in nats per byte of their answers (summed NLL / summed bytes)."""
    params: int
    """Parameter count."""
    experience_losses: Mapping[str, float] = field(default_factory=dict)
    """Held-out loss per earlier experience (by experience name), in nats per byte: the rows of the forgetting matrix."""
    foundation_probe_loss: float | None = None
    """Loss on the foundation probe set fixed at generation 0, in nats per byte; None if there is none."""
    golden_pass_rate: float | None = None
    """Share of golden prompts passed; None if there are no golden prompts yet."""
    golden_count: int = 0
    """How many golden prompts the pass rate is over."""
    decode_tokens_per_s: float | None = None
    """Greedy decode speed on this machine; None if not measured. A candidate's and its parent's are timed
    together, interleaved (``learners.speed``), so that the machine's load falls on both alike."""
    same_shapes_as_parent: bool = False
    """A candidate whose parameters have its parent's names, shapes and dtypes: the same work per token, so its
    speed is the parent's by construction and the speed gate does not apply (whatever the timing says)."""
    loss_unit: str = LOSS_UNIT
    """The unit of the losses above. ``from_dict`` reads a record without one as ``PER_TOKEN_LOSS_UNIT`` (it was
    written per token), so that an old number is never compared with a per-byte one as if it were one."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "new_data_loss": self.new_data_loss,
            "params": self.params,
            "experience_losses": dict(self.experience_losses),
            "foundation_probe_loss": self.foundation_probe_loss,
            "golden_pass_rate": self.golden_pass_rate,
            "golden_count": self.golden_count,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "same_shapes_as_parent": self.same_shapes_as_parent,
            "loss_unit": self.loss_unit,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteMetrics:
        return cls(
            new_data_loss=float(data["new_data_loss"]),
            params=int(data["params"]),
            experience_losses={str(k): float(v) for k, v in dict(data.get("experience_losses") or {}).items()},
            foundation_probe_loss=_optional_float(data.get("foundation_probe_loss")),
            golden_pass_rate=_optional_float(data.get("golden_pass_rate")),
            golden_count=int(data.get("golden_count") or 0),
            decode_tokens_per_s=_optional_float(data.get("decode_tokens_per_s")),
            same_shapes_as_parent=bool(data.get("same_shapes_as_parent")),
            loss_unit=str(data.get("loss_unit") or PER_TOKEN_LOSS_UNIT),
        )


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: float | None
    """The measured quantity (a relative change or a ratio); None when the gate does not apply."""
    threshold: float
    margin: float | None
    """Signed room: positive passed by that much, negative failed by that much; None if not applicable or non-finite."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite numbers become None (the reason says what they were)."""
        return {
            "name": self.name,
            "passed": self.passed,
            "value": _json_float(self.value),
            "threshold": _json_float(self.threshold),
            "margin": _json_float(self.margin),
            "reason": self.reason,
        }


Action = Literal["promote", "await_approval", "reject"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    failed_gates: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """The generation's status after this decision."""
        return {"promote": "promoted", "await_approval": "candidate", "reject": "rejected"}[self.action]


def evaluate_gates(
    candidate: SuiteMetrics,
    parent: SuiteMetrics,
    config: GateConfig,
    foundation: SuiteMetrics | None = None,
    unpruned: SuiteMetrics | None = None,
    scope: Sequence[str] | None = None,
) -> list[GateResult]:
    """Every gate for a candidate against its parent (and generation 0, for the cumulative drift gate).

    The loss gates compare relative changes of losses in nats per byte, so a candidate whose tokenizer cuts
    the same text into fewer, longer tokens is judged on the text, not on its token count. ``unpruned``: the
    candidate before pruning, which the pruned one may trail by ``max_prune_cost`` at most. ``scope``: a
    specialist's domains; its earlier experiences outside them are measured and recorded, not gated.
    """
    units = (candidate.loss_unit, parent.loss_unit)
    results = [
        _relative_improvement_gate(
            "new_data_improvement", candidate.new_data_loss, parent.new_data_loss, config.min_new_data_improvement,
            "held-out loss on the new data", units,
        )
    ]
    for name in sorted(set(parent.experience_losses) | set(candidate.experience_losses)):
        result = _relative_regression_gate(
            f"experience_regression[{name}]", candidate.experience_losses.get(name),
            parent.experience_losses.get(name), config.max_experience_regression,
            f"held-out loss on earlier experience {name!r}", units,
        )
        if scope is not None and name not in scope:
            result = _not_gated(result, f"outside the branch's scope ({', '.join(scope)}): measured, not gated")
        results.append(result)
    if unpruned is not None:
        results.append(
            _relative_regression_gate(
                "prune_cost", candidate.new_data_loss, unpruned.new_data_loss, config.max_prune_cost,
                "held-out loss on the new data vs the unpruned candidate", (candidate.loss_unit, unpruned.loss_unit),
            )
        )
    if candidate.foundation_probe_loss is not None or parent.foundation_probe_loss is not None:
        results.append(
            _relative_regression_gate(
                "foundation_regression", candidate.foundation_probe_loss, parent.foundation_probe_loss,
                config.max_foundation_regression, "foundation probe loss vs the parent", units,
            )
        )
    if foundation is not None and foundation.foundation_probe_loss is not None:
        results.append(
            _relative_regression_gate(
                "foundation_drift", candidate.foundation_probe_loss, foundation.foundation_probe_loss,
                config.max_foundation_drift, "foundation probe loss vs generation 0",
                (candidate.loss_unit, foundation.loss_unit),
            )
        )
    results.append(_golden_gate(candidate, config.min_golden_pass_rate))
    results.append(_params_gate(candidate.params, parent.params, config.max_params_ratio))
    results.append(_speed_gate(candidate, parent, config.min_decode_speed_ratio))
    return results


def promotion_decision(results: Sequence[GateResult], auto_promote: bool) -> Decision:
    """Promote (or await approval) only if every gate passed; otherwise reject, naming the failures."""
    if not results:
        return Decision("reject", "no gates were evaluated: refuse to promote an unmeasured candidate")
    failed = tuple(r.name for r in results if not r.passed)
    if failed:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in results if not r.passed)
        return Decision("reject", f"{len(failed)} gate(s) failed: {reasons}", failed)
    if auto_promote:
        return Decision("promote", f"all {len(results)} gates passed")
    return Decision("await_approval", f"all {len(results)} gates passed; promote it with `selftune promote`")


def _relative_improvement_gate(
    name: str, candidate: float, parent: float, minimum: float, what: str, units: tuple[str, str]
) -> GateResult:
    mismatch = _unit_mismatch(units, what)
    if mismatch:
        return GateResult(name, False, None, minimum, None, mismatch)
    problem = _non_finite(candidate, parent, what)
    if problem:
        return GateResult(name, False, _value_or_none(candidate, parent), minimum, None, problem)
    if parent <= 0.0:
        return GateResult(name, False, None, minimum, None, f"parent's {what} is {parent}: nothing left to improve")
    value = (parent - candidate) / parent
    margin = value - minimum
    verdict = "at least" if margin >= 0 else "below the required"
    return GateResult(
        name, margin >= 0, value, minimum, margin,
        f"{what} {parent:.4f} -> {candidate:.4f} {units[0]}: {value:+.2%} improvement, {verdict} {minimum:.2%}",
    )


def _relative_regression_gate(
    name: str, candidate: float | None, parent: float | None, maximum: float, what: str, units: tuple[str, str]
) -> GateResult:
    if candidate is None or parent is None:
        missing = "candidate" if candidate is None else "parent"
        return GateResult(name, False, None, maximum, None, f"{what}: the {missing} was not measured on it")
    mismatch = _unit_mismatch(units, what)
    if mismatch:
        return GateResult(name, False, None, maximum, None, mismatch)
    problem = _non_finite(candidate, parent, what)
    if problem:
        return GateResult(name, False, _value_or_none(candidate, parent), maximum, None, problem)
    if parent <= 0.0:
        return GateResult(name, False, None, maximum, None, f"reference {what} is {parent}: cannot compare")
    value = (candidate - parent) / parent
    margin = maximum - value
    verdict = "within" if margin >= 0 else "beyond"
    return GateResult(
        name, margin >= 0, value, maximum, margin,
        f"{what} {parent:.4f} -> {candidate:.4f} {units[0]}: {value:+.2%}, {verdict} the allowed {maximum:.2%} regression",
    )


def _not_gated(result: GateResult, why: str) -> GateResult:
    """The measurement kept (value, threshold, margin), the verdict not counted against the candidate."""
    return GateResult(result.name, True, result.value, result.threshold, result.margin, f"{result.reason} ({why})")


def _golden_gate(candidate: SuiteMetrics, minimum: float) -> GateResult:
    rate = candidate.golden_pass_rate
    if rate is None or candidate.golden_count == 0:
        return GateResult("golden_prompts", True, None, minimum, None, "no golden prompts yet: not applicable")
    if not math.isfinite(rate):
        return GateResult("golden_prompts", False, rate, minimum, None, f"golden pass rate is {rate} (non-finite)")
    margin = rate - minimum
    return GateResult(
        "golden_prompts", margin >= 0, rate, minimum, margin,
        f"{rate:.0%} of {candidate.golden_count} golden prompts passed, {minimum:.0%} required",
    )


def _params_gate(candidate: int, parent: int, maximum: float) -> GateResult:
    if parent <= 0 or candidate <= 0:
        return GateResult("params_ratio", False, None, maximum, None, f"parameter counts {candidate} / {parent}: invalid")
    ratio = candidate / parent
    margin = maximum - ratio
    return GateResult(
        "params_ratio", margin >= 0, ratio, maximum, margin,
        f"{candidate:,} / {parent:,} parameters = {ratio:.3f}, at most {maximum:.3f} allowed",
    )


def _speed_gate(candidate_suite: SuiteMetrics, parent_suite: SuiteMetrics, minimum: float) -> GateResult:
    candidate, parent = candidate_suite.decode_tokens_per_s, parent_suite.decode_tokens_per_s
    if candidate_suite.same_shapes_as_parent:  # timing noise, or another process's load, is all a ratio could show
        timed = f" (timed {parent:.1f} -> {candidate:.1f} tokens/s)" if candidate and parent else ""
        return GateResult("decode_speed_ratio", True, None, minimum, None,
                          f"not applicable: same shapes as the parent, so the same speed by construction{timed}")
    if candidate is None or parent is None:
        if minimum <= 0.0:
            return GateResult("decode_speed_ratio", True, None, minimum, None, "decode speed not measured: no budget set")
        missing = "candidate" if candidate is None else "parent"
        return GateResult(
            "decode_speed_ratio", False, None, minimum, None, f"decode speed of the {missing} was not measured"
        )
    problem = _non_finite(candidate, parent, "decode tokens/s")
    if problem:
        return GateResult("decode_speed_ratio", False, _value_or_none(candidate, parent), minimum, None, problem)
    if parent <= 0.0:
        return GateResult("decode_speed_ratio", False, None, minimum, None, f"parent decode speed {parent}: invalid")
    ratio = candidate / parent
    margin = ratio - minimum
    return GateResult(
        "decode_speed_ratio", margin >= 0, ratio, minimum, margin,
        f"decode {parent:.1f} -> {candidate:.1f} tokens/s = {ratio:.2f}x, at least {minimum:.2f}x required",
    )


def _unit_mismatch(units: tuple[str, str], what: str) -> str:
    """Why two losses cannot be compared ('' if they can): a relative change is unit-free only within one unit."""
    candidate, reference = units
    if candidate == reference:
        return ""
    return (f"{what}: the candidate's is in {candidate} and the reference's in {reference}, which do not compare; "
            f"measure both in {LOSS_UNIT} (run the cycle's evaluate step again)")


def _non_finite(candidate: float, parent: float, what: str) -> str:
    if not math.isfinite(candidate):
        return f"candidate's {what} is {candidate} (non-finite): the model is broken"
    if not math.isfinite(parent):
        return f"reference {what} is {parent} (non-finite): cannot compare against it"
    return ""


def _value_or_none(candidate: float, parent: float) -> float | None:
    """The non-finite number itself, so that the record shows what went wrong."""
    return candidate if not math.isfinite(candidate) else parent


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
