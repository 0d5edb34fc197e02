"""A specialist's routing index and thresholds, made when its cycle packages a generation.

``build_routing`` runs in ``package`` before the manifest is written (``copy_route_index`` then puts the files
into the generation directory, under its checksum); its result is ``generation.json``'s ``routing`` entry:

- the **index**: the branch's training prompts (this cycle's "train" rows, and its replay rows of its own
  scope: a buffer inherited at the fork also holds the parent's other domains) by their last user message,
  embedded as the service embeds requests (``service.cascade.make_embedder``), in ``router.faiss`` /
  ``router.json`` (``learners.route_index``);
- the **route threshold**, calibrated by balanced accuracy (``policies.routing.calibrate_route_threshold``) on
  prompts in scope (this cycle's held-out rows, and the parent's held-out rows of the scope's domains) against
  prompts out of it: the foundation's probe and rehearsal prompts (``cycle.probes``), and the held-out rows of
  every other branch's champion in domains outside this scope (their ``metrics.experiences``). A scope that
  cannot be told apart (``routing.min_route_accuracy``), too few prompts, routing off, or the generalist:
  ``{"enabled": false, "reason": ...}`` and no index, so the router never sends anything there;
- the **deferral threshold** (``routing.deferral``), calibrated on the held-out rows: the candidate's
  confidence (``service.cascade.answer_confidence``: mean log-probability of its first ``routing.deferral_tokens``
  greedy tokens) against each row's loss per byte under the candidate and under the parent it was trained
  from (``calibrate_deferral_threshold``, within ``routing.deferral_budget``). When no threshold keeps the
  candidate within budget, ``defer_all`` says it should pass everything up.

The result is kept in the cycle's directory (``ROUTING_RESULT``), so a resumed ``package`` does not redo it.
Module-level imports stay light (the manifest imports the names): torch and faiss load inside the functions.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from selftune.policies.errors import NotFoundError
from selftune.policies.records import CHAMPION
from selftune.policies.routing import (
    calibrate_deferral_threshold, calibrate_route_threshold, deferral_curve, route_curve,
)

from selftune.daemon.cycle.workdir import REPLAY_RESULT, SELECT_RESULT, Work

ROUTING_RESULT = "routing.json"
"""In the cycle's directory: what ``build_routing`` found, as ``generation.json`` records it."""
ROUTER_DIR = "router"
"""In the cycle's directory: the index files, copied into the generation by ``copy_route_index``."""
CURVE_POINTS = 48
"""Points kept of each calibration curve for the report (evenly spaced over the full curve)."""


def build_routing(work: Work) -> dict[str, Any]:
    """The branch's routing record (made once per cycle; see the module's docstring)."""
    done = work.read_optional(ROUTING_RESULT)
    if done is not None:
        return done
    shutil.rmtree(work.path(ROUTER_DIR), ignore_errors=True)
    result = _routing(work)
    work.write(ROUTING_RESULT, result)
    return result


def copy_route_index(work: Work, directory: Path) -> None:
    """Put ``router.faiss`` and ``router.json`` into the generation ``directory`` being filled, if there is an index."""
    from selftune.learners.route_index import INDEX_FILE, META_FILE

    source = work.path(ROUTER_DIR)
    if (work.read_optional(ROUTING_RESULT) or {}).get("enabled") and (source / META_FILE).exists():
        for name in (INDEX_FILE, META_FILE):
            shutil.copy2(source / name, directory / name)


def routing_record(work: Work) -> dict[str, Any]:
    """``generation.json``'s ``routing`` entry."""
    return work.read_optional(ROUTING_RESULT) or disabled("not built (a cycle packaged before routing existed)")


def disabled(reason: str, **facts: Any) -> dict[str, Any]:
    return {"enabled": False, "reason": reason, **facts}


def _routing(work: Work) -> dict[str, Any]:
    from selftune.learners.route_index import RouteIndex

    from selftune.daemon.service.cascade import make_embedder

    config = work.config.routing
    if not work.branch["specialist"]:
        return disabled("the generalist has no scope: it answers what no specialist takes")
    if not config.enabled:
        return disabled("routing.enabled is false")
    scope = set(work.branch["domains"])
    data = work.read(SELECT_RESULT)
    replayed = [r for r in work.read(REPLAY_RESULT) if r["domain"] in scope]
    indexed = _prompts([*data["train"], *replayed])
    in_scope = _prompts([*data["held_out"], *_experience_rows(work, {work.parent.id: scope}, inside=True)])
    others = _experience_rows(work, _other_champions(work), inside=False, scope=scope)
    out_of_scope = _prompts(_foundation_rows() + others)
    counts = {"index_prompts": len(indexed), "in_scope": len(in_scope), "out_of_scope": len(out_of_scope)}
    if len(indexed) < config.min_index_prompts:
        return disabled(f"{len(indexed)} training prompts, routing.min_index_prompts is {config.min_index_prompts}",
                        **counts)
    if min(len(in_scope), len(out_of_scope)) < config.min_calibration_prompts:
        return disabled(f"{len(in_scope)} prompts in scope and {len(out_of_scope)} out of it to calibrate on, "
                        f"routing.min_calibration_prompts is {config.min_calibration_prompts}", **counts)
    embedder = make_embedder(work.context, config)
    index = RouteIndex.build(embedder.embed(indexed), embedder.settings(), k=config.k, score_kind=config.score)
    ins = [float(s) for s in index.scores(embedder.embed(in_scope)).of(config.score)]
    outs = [float(s) for s in index.scores(embedder.embed(out_of_scope)).of(config.score)]
    calibration = calibrate_route_threshold(ins, outs)
    facts = {**counts, "threshold": calibration.threshold, "balanced_accuracy": calibration.balanced_accuracy,
             "in_scope_rate": calibration.in_scope_rate, "out_of_scope_rate": calibration.out_of_scope_rate,
             "score": config.score, "k": index.k, "embedder": embedder.settings(),
             "curve": [[c.threshold, c.in_scope_rate, c.out_of_scope_rate]
                       for c in _thin(route_curve(ins, outs))]}
    if calibration.balanced_accuracy < config.min_route_accuracy:
        return disabled(f"balanced accuracy {calibration.balanced_accuracy:.3f} < routing.min_route_accuracy "
                        f"{config.min_route_accuracy}: its scope cannot be told from the rest", **facts)
    index.with_threshold(calibration.threshold).save(work.path(ROUTER_DIR))
    return {"enabled": True, **facts, "deferral": _deferral(work, data["held_out"][:work.config.cycle.max_eval_rows])}


def _deferral(work: Work, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The deferral threshold on the held-out rows: candidate's confidence vs candidate's and parent's losses."""
    config = work.config.routing
    if not config.deferral:
        return disabled("routing.deferral is false")
    if len(rows) < config.min_calibration_prompts:
        return disabled(f"{len(rows)} held-out rows, routing.min_calibration_prompts is "
                        f"{config.min_calibration_prompts}")
    from selftune.learners import evaluate as ev
    from selftune.learners.chat import generation_prompt_ids

    from selftune.daemon.service.cascade import answer_confidence

    conversations = [r["messages"] for r in rows]
    candidate, tokenizer = ev.load_model(work.candidate_dir)
    confidences = [answer_confidence(candidate, tokenizer, generation_prompt_ids(tokenizer, c[:-1]),
                                     config.deferral_tokens) for c in conversations]
    losses = ev.row_losses(candidate, tokenizer, conversations, work.config.train.max_length)
    del candidate
    parent_losses = ev.row_losses(*ev.load_model(work.parent_dir), conversations, work.config.train.max_length)
    usable = [i for i in range(len(rows))
              if losses[i] is not None and parent_losses[i] is not None and math.isfinite(confidences[i])]
    if len(usable) < config.min_calibration_prompts:
        return disabled(f"{len(usable)} held-out rows with an answer to score, routing.min_calibration_prompts is "
                        f"{config.min_calibration_prompts}")
    args = ([confidences[i] for i in usable], [losses[i] for i in usable], [parent_losses[i] for i in usable])
    point = calibrate_deferral_threshold(*args, config.deferral_budget)
    defer_all = not math.isfinite(point.threshold)
    return {"enabled": True, "threshold": None if defer_all else point.threshold, "defer_all": defer_all,
            "kept_share": point.kept_share, "specialist_loss": _finite(point.specialist_loss),
            "parent_loss": _finite(point.parent_loss), "cascade_loss": point.cascade_loss,
            "parent_only_loss": sum(args[2]) / len(usable), "specialist_only_loss": sum(args[1]) / len(usable),
            "budget": config.deferral_budget, "tokens": config.deferral_tokens, "rows": len(usable),
            "parent": work.parent.id, "loss_unit": "nats/byte",
            "curve": [[_finite(p.threshold), p.kept_share, p.cascade_loss] for p in _thin(deferral_curve(*args))]}


# -- the prompts ------------------------------------------------------------------------------------------------


def _prompts(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Each row's last user message, once each, in order; rows without one are left out."""
    from selftune.daemon.service.cascade import last_user_message

    seen: dict[str, None] = {}
    for r in rows:
        text = last_user_message(r["messages"]).strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def _foundation_rows() -> list[dict[str, Any]]:
    """The probe and rehearsal prompts (general ones, out of every specialist's scope), as rows."""
    import json

    from selftune.daemon.cycle.probes import PROBE_PROMPTS, REHEARSAL_PROMPTS

    prompts = [p for f in (PROBE_PROMPTS, REHEARSAL_PROMPTS) for p in json.loads(f.read_text(encoding="utf-8"))]
    return [{"messages": [{"role": "user", "content": p}]} for p in prompts]


def _other_champions(work: Work) -> dict[int, set[str] | None]:
    """{generation id: its branch's scope (None: the generalist's)} of every other branch's champion."""
    with work.context.store.transaction() as tx:
        scopes = {b.name: set(b.domains) or None for b in tx.branches.list()}
        return {a.generation_id: scopes.get(a.branch) for a in tx.aliases.list()
                if a.name == CHAMPION and a.branch != work.cycle.branch}


def _experience_rows(work: Work, generations: Mapping[int, set[str] | None], *, inside: bool,
                     scope: set[str] | None = None) -> list[dict[str, Any]]:
    """Held-out rows recorded in these generations' ``metrics.experiences``: with ``inside``, those of the
    domains given per generation; else those of each generation's own domains (any, for the generalist)
    outside ``scope``. Rows deleted since are skipped."""
    limit = work.config.cycle.max_eval_rows
    ids: dict[int, None] = {}
    with work.context.store.transaction() as tx:
        for generation_id, domains in generations.items():
            found = tx.generations.find(generation_id)
            for domain, members in ((found.metrics or {}).get("experiences", {}) if found else {}).items():
                wanted = (domain in (domains or ())) if inside else (
                    domain not in (scope or ()) and (domains is None or domain in domains))
                if wanted:
                    ids.update(dict.fromkeys(members[:limit]))
        rows = []
        for interaction_id in ids:
            try:
                rows.append({"messages": [{"role": m.role, "content": m.content}
                                          for m in tx.interactions.get(interaction_id).messages]})
            except NotFoundError:
                continue
    return rows


def _thin(points: list[Any]) -> list[Any]:
    if len(points) <= CURVE_POINTS:
        return points
    step = (len(points) - 1) / (CURVE_POINTS - 1)
    return [points[round(i * step)] for i in range(CURVE_POINTS)]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- near-duplicates in the cycle's data selection -----------------------------------------------------------


ROW_TOKENS = 256
"""Whole rows are embedded from their first this many tokens (the answer too: a reworded question with the same
answer is a duplicate, the same question with another answer is not)."""


def near_duplicate_drops(work: Work, interactions: Sequence[Any]) -> dict[int, int]:
    """{dropped interaction id: the id kept in its place} among ``interactions`` whose whole rows (prompt and
    answer) are at least ``selection.near_duplicate_similarity`` alike, embedded as the router embeds prompts
    (``[routing]``'s embedder and layers); the lowest id of each group stays. {} when the similarity is 1.0."""
    threshold = work.config.selection.near_duplicate_similarity
    if threshold >= 1.0 or len(interactions) < 2:
        return {}
    from selftune.learners.embed import near_duplicates

    from selftune.daemon.service.cascade import make_embedder

    embedder = make_embedder(work.context, work.config.routing, max_tokens=ROW_TOKENS)
    texts = ["\n".join(m.content for m in i.messages) for i in interactions]
    return near_duplicates([i.id for i in interactions], embedder.embed(texts), threshold)
