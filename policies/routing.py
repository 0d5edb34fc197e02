"""The cascade's decisions at serving time: which specialist a request goes to, and when it defers upwards.

Routing: each specialist branch scores a prompt (``learners.route_index``: the similarity of its embedding
to the branch's training prompts); a score at or above the branch's own calibrated threshold puts the
prompt in that branch's scope, and of the branches in scope the highest score wins. In no branch's scope,
the generalist answers. Thresholds are calibrated at promotion on held-out prompts of the branch's scope
against everyone else's, maximising balanced accuracy (the mean of the in-scope and out-of-scope rates, so
that a small scope is not swamped by a large rest).

Deferral: a specialist's confidence in its own answer (higher is surer, e.g. the mean log-probability of
its first answer tokens) below its threshold passes the request to its parent line. Stdlib only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

SCORE_KINDS = ("neighbours", "centroid")
"""What a branch's route score is (``learners.route_index``): top-k nearest-neighbour or centroid cosine."""


@dataclass(frozen=True)
class RoutingConfig:
    enabled: bool = True
    """``"model": "auto"`` routes each request to the specialist whose scope it is in; off, auto is the generalist."""
    embedder: str = "foundation"
    """What embeds prompts: "foundation" (generation 0's own weights, nothing more to ship) or the path of a
    transformers encoder directory (all-MiniLM-L6-v2 measured: routes reworded prompts right too, but 16.5 ms a
    request on 2 cores against the foundation's 1.4)."""
    embed_layers: int = 0
    """Blocks of the embedder run before mean pooling: 0 = the input embeddings only, -1 = all of them. Measured
    on the foundation: 0 routes 100% of held-out prompts of the four shared domains at p99 2.7 ms on 2 cores;
    each block adds ~5 ms and routes no better. A changed value needs every branch's index rebuilt."""
    max_prompt_tokens: int = 64
    """Prompts are embedded from their first this many tokens (a longer prompt costs no more to route)."""
    score: str = "neighbours"
    """The route score: "neighbours" (mean cosine of the k nearest training prompts) or "centroid"."""
    k: int = 4
    """Nearest training prompts averaged into the "neighbours" score."""
    min_index_prompts: int = 16
    """A specialist with fewer training prompts than this gets no index and is never routed to."""
    min_calibration_prompts: int = 8
    """Held-out prompts a specialist's scope needs (and as many out of it) to calibrate its threshold."""
    min_route_accuracy: float = 0.9
    """A specialist whose calibrated threshold reaches a lower balanced accuracy than this is not routed to:
    its scope cannot be told from the rest, and the generalist answers its prompts."""
    cache_size: int = 4096
    """Prompt embeddings kept in memory (a bounded LRU by content hash); 0 keeps none."""
    threads: int = 1
    """Torch threads for embedding a prompt (on 2 cores, 1 leaves the other to generation)."""
    deferral: bool = True
    """A specialist unsure of its answer defers to its parent line, up to the generalist."""
    deferral_budget: float = 0.02
    """On held-out rows, the specialist's mean loss on the rows it keeps may exceed its parent's on the same rows
    by at most this share (0.02 = 2%): the deferral threshold is the lowest confidence that keeps it so."""
    deferral_tokens: int = 8
    """First answer tokens whose mean log-probability is the specialist's confidence."""

    def problems(self) -> list[str]:
        out = []
        if not self.embedder.strip():
            out.append(f'routing.embedder = {self.embedder!r}: use "foundation" or the path of a transformers '
                       "encoder directory")
        if self.embed_layers < -1:
            out.append(f"routing.embed_layers = {self.embed_layers}: use 0 (input embeddings), a block count, "
                       "or -1 for all")
        if self.max_prompt_tokens < 1:
            out.append(f"routing.max_prompt_tokens = {self.max_prompt_tokens}: use 1 or more, e.g. 64")
        if self.score not in SCORE_KINDS:
            out.append(f"routing.score = {self.score!r}: use one of {', '.join(map(repr, SCORE_KINDS))}")
        for name in ("k", "min_index_prompts", "min_calibration_prompts", "deferral_tokens"):
            if getattr(self, name) < 1:
                out.append(f"routing.{name} = {getattr(self, name)}: use 1 or more")
        if not 0.5 <= self.min_route_accuracy <= 1.0:
            out.append(f"routing.min_route_accuracy = {self.min_route_accuracy}: use a balanced accuracy in "
                       "[0.5, 1], e.g. 0.9 (0.5 is chance)")
        if self.cache_size < 0:
            out.append(f"routing.cache_size = {self.cache_size}: use 0 (no cache) or more")
        if self.threads < 0:
            out.append(f"routing.threads = {self.threads}: use 0 (torch's default) or more, e.g. 1")
        if not (math.isfinite(self.deferral_budget) and self.deferral_budget >= 0.0):
            out.append(f"routing.deferral_budget = {self.deferral_budget}: use a share of 0 or more, e.g. 0.02")
        return out


@dataclass(frozen=True)
class RouteCalibration:
    threshold: float
    """A prompt whose score is >= this is in scope."""
    balanced_accuracy: float
    """(in-scope rate + out-of-scope rate) / 2 on the calibration prompts at ``threshold``."""
    in_scope_rate: float
    """Share of in-scope prompts at or above the threshold (recall)."""
    out_of_scope_rate: float
    """Share of out-of-scope prompts below it (they go elsewhere, as they should)."""


@dataclass(frozen=True)
class RouteDecision:
    branch: str | None
    """The specialist that answers, or None for the generalist."""
    score: float
    """The winner's score; for the generalist, that of the specialist closest to its threshold (nan: none scored)."""
    margin: float
    """Score minus that branch's threshold: >= 0 for the winner, < 0 for the generalist's closest miss."""
    reason: str


def route_curve(in_scope: Sequence[float], out_of_scope: Sequence[float]) -> list[RouteCalibration]:
    """Every distinct cut between the scores (midpoints of neighbouring distinct values, and the lowest score
    itself), lowest first, with its rates: the routing curve the report draws."""
    if not in_scope or not out_of_scope:
        raise ValueError(f"{len(in_scope)} in-scope and {len(out_of_scope)} out-of-scope scores: calibrating a "
                         "route threshold needs prompts of both")
    if not all(math.isfinite(s) for s in (*in_scope, *out_of_scope)):
        raise ValueError("a route score is not finite: score every calibration prompt with a finite number")
    values = sorted(set(in_scope) | set(out_of_scope))
    cuts = [values[0]] + [(a + b) / 2 for a, b in zip(values, values[1:])]  # midpoints: the widest margin
    ins, outs = sorted(in_scope), sorted(out_of_scope)
    curve, i_below, o_below = [], 0, 0
    for cut in cuts:  # ascending: advance the counts of scores below the cut
        while i_below < len(ins) and ins[i_below] < cut:
            i_below += 1
        while o_below < len(outs) and outs[o_below] < cut:
            o_below += 1
        tpr, tnr = 1.0 - i_below / len(ins), o_below / len(outs)
        curve.append(RouteCalibration(cut, (tpr + tnr) / 2, tpr, tnr))
    return curve


def calibrate_route_threshold(in_scope_scores: Sequence[float], out_of_scope_scores: Sequence[float]) -> RouteCalibration:
    """The cut with the best balanced accuracy; among equals the highest, since a prompt wrongly kept from a
    specialist still gets the generalist's answer, while one wrongly sent to a specialist gets a narrow one."""
    return max(route_curve(in_scope_scores, out_of_scope_scores), key=lambda c: (c.balanced_accuracy, c.threshold))


def route(scores_by_branch: Mapping[str, float], thresholds: Mapping[str, float]) -> RouteDecision:
    """The branch with the highest score among those at or above their own threshold; none: the generalist.

    A branch without a threshold (not calibrated) or with a non-finite score is never chosen. Equal scores
    go to the branch whose name sorts first, so the same request always goes to the same place.
    """
    eligible, best_miss = [], None
    for branch in sorted(scores_by_branch):
        score, threshold = scores_by_branch[branch], thresholds.get(branch)
        if threshold is None or not math.isfinite(score):
            continue
        if score >= threshold:
            eligible.append((score, branch, threshold))
        elif best_miss is None or score - threshold > best_miss[0] - best_miss[2]:
            best_miss = (score, branch, threshold)
    if eligible:
        score, branch, threshold = max(eligible, key=lambda e: e[0])  # max keeps the first of equals
        others = len(eligible) - 1
        return RouteDecision(branch, score, score - threshold,
                             f"{branch} scored {score:.3f} >= its threshold {threshold:.3f}"
                             + (f", highest of {others + 1} in scope" if others else ""))
    if best_miss is None:
        return RouteDecision(None, math.nan, math.nan, "no calibrated specialist scored the prompt")
    score, branch, threshold = best_miss
    return RouteDecision(None, score, score - threshold,
                         f"no specialist in scope (closest: {branch} {score:.3f} < its threshold {threshold:.3f})")


@dataclass(frozen=True)
class DeferralPoint:
    threshold: float
    """The specialist keeps the rows whose confidence is >= this and defers the rest to its parent."""
    kept_share: float
    """Share of rows the specialist keeps."""
    specialist_loss: float
    """The specialist's mean loss on the rows it keeps (nan when it keeps none)."""
    parent_loss: float
    """The parent's mean loss on those same rows (nan when none)."""
    cascade_loss: float
    """Mean loss over all rows: the specialist's where kept, the parent's where deferred."""

    def within(self, budget: float) -> bool:
        """The specialist's kept answers are within ``budget`` (a share) of the parent's on the same rows."""
        return self.kept_share == 0.0 or self.specialist_loss <= (1.0 + budget) * self.parent_loss


def deferral_curve(confidences: Sequence[float], specialist_losses: Sequence[float],
                   parent_losses: Sequence[float]) -> list[DeferralPoint]:
    """For each distinct confidence as threshold (lowest first), what keeping rows at or above it gives; the
    last point (threshold inf) defers everything: the deferral curve the report draws."""
    n = len(confidences)
    if n == 0 or len(specialist_losses) != n or len(parent_losses) != n:
        raise ValueError(f"{n} confidences, {len(specialist_losses)} specialist and {len(parent_losses)} parent "
                         "losses: pass one of each per held-out row, at least one row")
    if not all(math.isfinite(x) for x in (*confidences, *specialist_losses, *parent_losses)):
        raise ValueError("a confidence or loss is not finite: measure every held-out row with finite numbers")
    rows = sorted(zip(confidences, specialist_losses, parent_losses))
    # suffix sums from the top: the rows kept at threshold rows[i][0] are rows[i:] (no subtraction, no drift)
    spec_from = list(accumulate((r[1] for r in reversed(rows)), initial=0.0))[::-1]
    parent_from = list(accumulate((r[2] for r in reversed(rows)), initial=0.0))[::-1]
    parent_total = parent_from[0]
    points = []
    for i in range(n):
        if i and rows[i][0] == rows[i - 1][0]:
            continue  # a threshold keeps every row of its value: one point per distinct confidence
        kept = n - i
        points.append(DeferralPoint(rows[i][0], kept / n, spec_from[i] / kept, parent_from[i] / kept,
                                    (spec_from[i] + parent_total - parent_from[i]) / n))
    points.append(DeferralPoint(math.inf, 0.0, math.nan, math.nan, parent_total / n))
    return points


def calibrate_deferral_threshold(confidences: Sequence[float], specialist_losses: Sequence[float],
                                 parent_losses: Sequence[float], budget: float) -> DeferralPoint:
    """The lowest confidence threshold at which the specialist's answers stay within the loss budget.

    Precisely: the specialist keeps the rows with confidence >= t and defers the rest to its parent; t is the
    lowest value for which the specialist's mean loss on the rows it keeps is at most ``(1 + budget)`` times
    the parent's mean loss on those same rows. Lowest, because every deferral costs a second, larger model's
    answer. Comparing on the same rows asks "are the answers it gives about as good as its parent's would
    be?", and it implies the cascade's mean loss over all rows is within ``budget`` of always-parent too (the
    kept rows' excess is at most budget x their parent loss, which is at most budget x all rows'). When no
    threshold keeps any row within budget, the point at ``inf`` (defer everything) comes back.
    """
    if not (math.isfinite(budget) and budget >= 0.0):
        raise ValueError(f"deferral budget {budget}: use a share of 0 or more, e.g. 0.02")
    return next(p for p in deferral_curve(confidences, specialist_losses, parent_losses) if p.within(budget))


def should_defer(confidence: float, threshold: float | None) -> bool:
    """Defer when the confidence is below the threshold, or not a number; no threshold (not calibrated): never."""
    if threshold is None:
        return False
    return not (math.isfinite(confidence) and confidence >= threshold)
