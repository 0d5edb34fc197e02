"""The report model: what a generation's pages show, built from its generation.json, the cycle's evaluation
suites and the lineage. Pure (no templates, no plots, no files), and JSON-ready: report.json is this dict.

Losses are shown in bits per byte of the answers (``BITS_PER_BYTE``): the suites record nats per byte
(``gates.LOSS_UNIT``), comparable across tokenizers, and a bit is the unit people read. Every loss row
carries its ``unit``; the per-token figures recorded beside them are shown too, labelled ``nats/token``. A
record written before losses were per byte (no ``loss_unit``) is shown as it was measured, per token, and
labelled so: its byte counts were never recorded, so it cannot be converted here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from selftune.policies.gates import LOSS_UNIT, PER_TOKEN_LOSS_UNIT

BITS_PER_BYTE = "bits/byte"
"""The unit the reports show losses in (the suites' nats per byte, divided by ln 2)."""
PER_TOKEN = PER_TOKEN_LOSS_UNIT
"""The unit of the per-token figures shown beside (and of records written before losses were per byte)."""
REPORT_URL = "/v1/generations/{id}/report"
"""Where the HTTP API serves a generation's HTML report; the lineage page links there by default."""
CURVES = (("loss", f"training loss ({PER_TOKEN})"), ("ewc_penalty", "EWC penalty"),
          ("tokens_per_s", "throughput (tokens/s)"))
"""Training curves drawn, as (key in the learner's per-step records, title). The trainer's loss is per token."""
SUMMARY_METRICS = (
    ("new_data_loss", "new-data loss", "lower"),
    ("foundation_probe_loss", "foundation probe loss", "lower"),
    ("golden_pass_rate", "golden pass rate", "higher"),
    ("params", "parameters", "lower"),
    ("decode_tokens_per_s", "decode tokens/s", "higher"),
)
"""The headline numbers of a generation, parent vs child, and which direction is better."""
LOSSES = frozenset({"new_data_loss", "foundation_probe_loss"})
"""The summary's losses: shown per byte (``loss_view``), with their per-token figures beside."""


def build_report(generation_id: int, manifest: Mapping[str, Any], suites: Mapping[str, Any],
                 lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest plus what the pages show: headline numbers, forgetting matrix (losses in
    ``loss_unit_shown``), samples, lineage, curves.

    ``suites`` is the cycle's evaluate.json (``{"parent": {..., "samples": [...]}, "candidate": {...}}``);
    ``lineage`` the rows of ``views.generations_view`` (optional: the report then shows parent and branch only).
    JSON-ready: non-finite numbers become None (JSON has no NaN).
    """
    metrics = manifest.get("metrics") or {}
    candidate, parent = metrics.get("candidate") or {}, metrics.get("parent") or {}
    training = dict(manifest.get("training") or {})
    training["curves"] = normalise_curves(training.get("curves"))
    gates = list(manifest.get("gates") or [])
    return _json_safe({
        **manifest,
        "id": generation_id,
        "training": training,
        "summary": summary_rows(candidate, parent),
        "gates_passed": sum(1 for g in gates if g.get("passed")),
        "data_mix": data_mix(manifest.get("data") or {}, training),
        "forgetting": forgetting_rows(candidate, parent),
        "loss_unit_shown": loss_view(candidate, parent, None, None)["unit"],
        "samples": paired_samples(suites),
        "lineage": lineage_snippet(generation_id, manifest, lineage),
        "branch_view": branch_view(manifest),
        "pruning_view": pruning_view(manifest),
    })


def summary_rows(candidate: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Headline numbers parent -> child, each with its change and whether that change is for the better.

    Loss rows are in ``unit`` (bits/byte; nats/token for an old record) and carry ``per_token``: the
    per-token figures (``{"parent", "child", "unit"}``), or None where none were recorded beside them.
    """
    rows = []
    for key, label, better in SUMMARY_METRICS:
        if key in LOSSES:
            view = loss_view(candidate, parent, candidate.get(key), parent.get(key))
            before, after, unit = view["parent"], view["child"], view["unit"]
            per_token = _per_token(candidate, parent, candidate.get(f"{key}_per_token"), parent.get(f"{key}_per_token"))
        else:
            before, after, unit, per_token = finite(parent.get(key)), finite(candidate.get(key)), None, None
        relative = _relative(before, after)
        improved = None if relative is None or relative == 0 else (relative < 0) == (better == "lower")
        rows.append({"key": key, "label": label, "unit": unit, "parent": before, "child": after, "relative": relative,
                     "better": better, "improved": improved, "per_token": per_token})
    return rows


def loss_view(candidate: Mapping[str, Any], parent: Mapping[str, Any], child_loss: Any,
              parent_loss: Any) -> dict[str, Any]:
    """Two recorded losses as shown: in bits per byte if their suites say nats per byte, else (an old record,
    per token) as recorded, labelled per token. Suites in different units give no comparable pair: None."""
    units = {_unit_of(candidate), _unit_of(parent)}
    if len(units) > 1:
        return {"parent": None, "child": None, "unit": None}
    (unit,) = units
    return {"parent": shown_loss(parent_loss, unit), "child": shown_loss(child_loss, unit), "unit": shown_unit(unit)}


def shown_loss(loss: Any, unit: str) -> float | None:
    """A loss recorded in ``unit`` as the pages show it: nats per byte (``LOSS_UNIT``) in bits per byte (divided
    by ln 2), anything else (an old per-token record) as recorded; None if it is not a finite number."""
    value = finite(loss)
    if value is None:
        return None
    return value / math.log(2) if unit == LOSS_UNIT else value


def shown_unit(unit: str) -> str:
    """The unit ``shown_loss`` writes a loss recorded in ``unit`` in."""
    return BITS_PER_BYTE if unit == LOSS_UNIT else PER_TOKEN


def _unit_of(suite: Mapping[str, Any]) -> str:
    return str(suite.get("loss_unit") or PER_TOKEN_LOSS_UNIT)


def _per_token(candidate: Mapping[str, Any], parent: Mapping[str, Any], child: Any, before: Any) -> dict[str, Any] | None:
    """The per-token figures beside per-byte losses (none for an old record: its main figures are per token)."""
    if _unit_of(candidate) != LOSS_UNIT or (finite(child) is None and finite(before) is None):
        return None
    return {"parent": finite(before), "child": finite(child), "unit": PER_TOKEN}


EXCLUSION_LABELS = {
    "excluded_self_generated_unrated": "excluded: the service's own answer, no positive feedback",
    "excluded_self_generated": "excluded: the service's own answer (selection.self_generated = never)",
    "excluded_client_disconnected": "excluded: partial answer, its client went away",
}
"""Why a row was left out, where the reason's name alone would not say it."""


def data_mix(data: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """Rows by outcome (in the order they flow), new rows vs the replay pool (buffer and the foundation's
    rehearsal rows), how many training sequences
    were replayed (from the per-step ``replayed``/``sequences`` curves or ``training.replayed_sequences``),
    and rows excluded per selection filter."""
    counts = data.get("counts") or {}
    new = int(counts.get("train", len(data.get("train_ids") or [])))
    pool = int(counts.get("replay", len(data.get("replay_ids") or [])))
    curves = training.get("curves") or {}
    replayed = _total(curves.get("replayed"))
    replayed = replayed if replayed is not None else finite(training.get("replayed_sequences"))
    sequences = _total(curves.get("sequences"))
    if sequences is None and finite(training.get("steps")) and finite(training.get("batch_size")):
        sequences = training["steps"] * training["batch_size"]
    first = [k for k in ("interactions", "train", "held_out", "replay") if k in counts]
    ordered = [*first, *sorted(k for k in counts if k not in first)]  # the flow of rows, then the exclusions
    return {"new": new, "replay_pool": pool, "rehearsal": int(data.get("rehearsal_rows") or 0),
            "replayed": replayed, "sequences": sequences,
            "replay_share": replayed / sequences if replayed is not None and sequences else None,
            "counts": [{"key": k, "rows": counts[k],
                        "label": EXCLUSION_LABELS.get(k) or k.replace("excluded_", "excluded: ").replace("_", " ")}
                       for k in ordered],
            "exclusions": {k.removeprefix("excluded_"): v for k, v in counts.items() if k.startswith("excluded_")}}


def _total(values: Any) -> float | None:
    numbers = [v for v in (finite(x) for x in values or []) if v is not None]
    return sum(numbers) if numbers else None


def forgetting_rows(candidate: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The forgetting matrix: held-out loss of parent and child on the new data, every earlier experience
    (by domain) and the foundation probe, with the change (a rise is forgetting). In ``unit`` (bits/byte;
    nats/token for an old record), each row with its per-token figures beside (``per_token``, or None)."""
    rows = [_loss_row("new data (this cycle, held out)", "new", candidate, parent, "new_data_loss")]
    before, after = parent.get("experience_losses") or {}, candidate.get("experience_losses") or {}
    rows += [_loss_row(f"experience: {domain}", "experience", candidate, parent, "experience_losses", domain)
             for domain in sorted(set(before) | set(after))]
    if parent.get("foundation_probe_loss") is not None or candidate.get("foundation_probe_loss") is not None:
        rows.append(_loss_row("foundation probe", "foundation", candidate, parent, "foundation_probe_loss"))
    return rows


def _loss_row(name: str, kind: str, candidate: Mapping[str, Any], parent: Mapping[str, Any], key: str,
              domain: str | None = None) -> dict[str, Any]:
    """One suite of the matrix: the loss under ``key`` (of ``domain``, for experiences) and its per-token twin."""
    def pick(suite: Mapping[str, Any], field: str) -> Any:
        value = suite.get(field)
        return (value or {}).get(domain) if domain is not None else value

    view = loss_view(candidate, parent, pick(candidate, key), pick(parent, key))
    before, after = view["parent"], view["child"]
    return {"name": name, "kind": kind, "unit": view["unit"], "parent": before, "child": after,
            "delta": None if before is None or after is None else after - before, "relative": _relative(before, after),
            "per_token": _per_token(candidate, parent, pick(candidate, f"{key}_per_token"),
                                    pick(parent, f"{key}_per_token"))}


def branch_view(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The branch's configuration as this cycle ran it (``manifest["branch_config"]``): its scope (its domains,
    or every domain for a generalist), whether it is a specialist, and the settings that differ from the
    defaults, in the order recorded. None for a manifest written before branches recorded it."""
    config = manifest.get("branch_config")
    if not isinstance(config, Mapping):
        return None
    domains = [str(d) for d in config.get("domains") or []]
    settings = config.get("settings") or {}
    return {"domains": domains, "specialist": bool(config.get("specialist")),
            "scope": ", ".join(domains) if domains else "generalist: every domain",
            "settings": [{"key": str(k), "value": v} for k, v in settings.items()]}


PRUNING_COST = (("params", "parameters"), ("decode_tokens_per_s", "decode tokens/s"),
                ("new_data_loss", "specialty held-out loss (new data)"),
                ("foundation_probe_loss", "foundation probe loss"))
"""What pruning cost, parent vs the merged candidate before pruning (``metrics["unpruned"]``) vs the pruned one."""


def pruning_view(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """What pruning removed (vocabulary, layers, MLP channels) and what it cost (size, speed, loss), with the
    stepwise removals and the heal, from ``manifest["pruning"]`` (its ``vocab`` and ``heal``) and the parent's,
    the unpruned and the pruned candidate's suites. Every key optional. None when nothing was pruned or trimmed.

    Losses in the unit the pages show (``shown_loss``); the prune step measured its own in the unit of the
    candidate's suites."""
    pruning = manifest.get("pruning") or {}
    vocab = pruning.get("vocab") or {}
    if not (pruning.get("enabled") or vocab.get("enabled")):
        return None
    metrics = manifest.get("metrics") or {}
    parent, unpruned, pruned = (metrics.get(k) or {} for k in ("parent", "unpruned", "candidate"))
    heal = pruning.get("heal") or {}
    cost = _cost_rows(parent, unpruned, pruned)
    for row in cost:  # the merged candidate's size was recorded by the prune step before metrics["unpruned"] was
        if row["key"] == "params" and row["unpruned"] is None:
            row["unpruned"] = finite(vocab.get("parameters_before")) or finite(pruning.get("params_before"))
            row["vs_unpruned"] = _relative(row["unpruned"], row["pruned"])
    decode = {r["key"]: r for r in cost}.get("decode_tokens_per_s") or {}
    return {
        "layer_dropping": pruning.get("layer_dropping"),
        "reason": pruning.get("reason"),
        "vocab": _vocab_view(vocab) if vocab else None,
        "layers": _layers_view(pruning),
        "cost": cost,
        "decode_ratio": decode.get("ratio"),
        "stepwise": _stepwise_view(pruning, _unit_of(pruned)),
        "heal": {k: heal.get(k) for k in ("enabled", "reason", "kind", "steps", "tokens", "loss_first", "loss_last")}
        if heal else None,
    }


def _cost_rows(parent: Mapping[str, Any], unpruned: Mapping[str, Any],
               pruned: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parent, unpruned and pruned, each ``PRUNING_COST`` number that one of them has; losses shown per byte if
    all three suites measured them per byte (else not comparable: None)."""
    suites, rows = (parent, unpruned, pruned), []
    for key, label in PRUNING_COST:
        unit = None
        values = [finite(s.get(key)) for s in suites]
        if key in LOSSES:
            units = {_unit_of(s) for s, v in zip(suites, values) if v is not None}
            unit = shown_unit(units.pop()) if len(units) == 1 else None
            values = [shown_loss(s.get(key), _unit_of(s)) if unit else None for s in suites]
        before, middle, after = values
        if before is None and middle is None and after is None:
            continue
        rows.append({"key": key, "label": label, "unit": unit, "parent": before, "unpruned": middle, "pruned": after,
                     "vs_unpruned": _relative(middle, after), "vs_parent": _relative(before, after),
                     "ratio": after / before if before and after is not None else None})
    return rows


def _vocab_view(vocab: Mapping[str, Any]) -> dict[str, Any]:
    before, after = finite(vocab.get("vocab_size_before")), finite(vocab.get("vocab_size_after"))
    params_before, params_after = finite(vocab.get("parameters_before")), finite(vocab.get("parameters_after"))
    return {"enabled": bool(vocab.get("enabled")), "before": before, "after": after,
            "relative": _relative(before, after),
            "parameters_before": params_before, "parameters_after": params_after,
            "parameters_relative": _relative(params_before, params_after),
            "merges_before": finite(vocab.get("merges_before")), "merges_after": finite(vocab.get("merges_after")),
            "kept_by_reason": [{"reason": str(k).replace("_", " "), "tokens": v}
                               for k, v in (vocab.get("kept_by_reason") or {}).items()]}


def _layers_view(pruning: Mapping[str, Any]) -> dict[str, Any] | None:
    removed = list(pruning.get("layers_removed") or [])
    before, after = finite(pruning.get("layers_before")), finite(pruning.get("layers_after"))
    if before is None and after is None and not removed:
        return None
    width_before, width_after = pruning.get("intermediate_size_before"), pruning.get("intermediate_size_after")
    return {"before": before, "after": after, "removed": removed, "params_before": finite(pruning.get("params_before")),
            "params_after": finite(pruning.get("params_after")), "width_before": finite(width_before),
            "width_after": finite(width_after),
            "width_cut": finite(width_after) is not None and finite(width_before) is not None
            and width_after < width_before}


def _stepwise_view(pruning: Mapping[str, Any], unit: str) -> dict[str, Any] | None:
    """Each tried removal's specialty loss (shown per byte), against the unpruned loss and the budget above it."""
    unpruned = shown_loss(pruning.get("loss_unpruned"), unit)
    steps = [{"layer": s.get("layer"), "influence": finite(s.get("influence")), "loss": shown_loss(s.get("loss"), unit),
              "relative": _relative(unpruned, shown_loss(s.get("loss"), unit)), "params": finite(s.get("params")),
              "layers_left": s.get("layers_left"), "kept": bool(s.get("kept"))}
             for s in pruning.get("steps") or [] if isinstance(s, Mapping)]
    if unpruned is None and not steps:
        return None
    cost = finite(pruning.get("max_drop_cost"))
    after = shown_loss(pruning.get("loss_after"), unit)
    return {"unit": shown_unit(unit), "unpruned": unpruned, "after": after, "relative": _relative(unpruned, after),
            "max_cost": cost, "budget": None if unpruned is None or cost is None else unpruned + abs(unpruned) * cost,
            "stopped": pruning.get("stopped"), "steps": steps}


def paired_samples(suites: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parent's and child's answers to the same held-out prompts, side by side (matched by prompt)."""
    parent = {s.get("prompt"): s for s in (suites.get("parent") or {}).get("samples") or []}
    child = {s.get("prompt"): s for s in (suites.get("candidate") or {}).get("samples") or []}
    prompts = list(dict.fromkeys([*child, *parent]))  # the child's order first, then any the parent alone has
    return [{"prompt": prompt,
             "reference": (child.get(prompt) or parent.get(prompt) or {}).get("reference"),
             "parent": (parent.get(prompt) or {}).get("answer"),
             "child": (child.get(prompt) or {}).get("answer")} for prompt in prompts]


def normalise_curves(curves: Any) -> dict[str, list[Any]]:
    """The learner's per-step records as ``{key: [value per step]}``, whether given as that already or as a
    list of ``{"step", "loss", ...}`` records; missing values are None."""
    if not curves:
        return {}
    if isinstance(curves, Mapping):
        return {str(k): list(v) for k, v in curves.items() if isinstance(v, (list, tuple))}
    records = [r for r in curves if isinstance(r, Mapping)]
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def curve_stats(training: Mapping[str, Any]) -> list[dict[str, Any]]:
    """First, last, minimum and mean of each drawn curve (for Markdown, where there are no plots)."""
    curves = training.get("curves") or {}
    out = []
    for key, title in CURVES:
        values = [v for v in (finite(x) for x in curves.get(key) or []) if v is not None]
        if values:
            out.append({"key": key, "title": title, "first": values[0], "last": values[-1], "min": min(values),
                        "mean": sum(values) / len(values), "points": len(values)})
    return out


def lineage_snippet(generation_id: int, manifest: Mapping[str, Any],
                    rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Where the generation sits: its ancestors (root first), siblings (the parent's other children) and children."""
    known = {r["id"]: _lineage_node(r) for r in rows or []}
    me = known.get(generation_id) or _lineage_node({"id": generation_id, **manifest, "aliases": []})
    ancestors, seen, parent = [], {generation_id}, me["parent"]
    while parent is not None and parent not in seen:
        seen.add(parent)
        node = known.get(parent) or _lineage_node({"id": parent, "parent": None, "branch": None, "status": None})
        ancestors.insert(0, node)
        parent = node["parent"]
    others = [n for n in known.values() if n["id"] != generation_id]
    return {"self": me, "ancestors": ancestors,
            "siblings": [n for n in others if me["parent"] is not None and n["parent"] == me["parent"]],
            "children": [n for n in others if n["parent"] == generation_id],
            "known": bool(rows)}


def _lineage_node(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row.get("id"), "parent": row.get("parent"), "branch": row.get("branch"),
            "status": row.get("status"), "params": row.get("params"), "aliases": list(row.get("aliases") or [])}


def finite(value: Any) -> float | int | None:
    """A real, finite number as it is; anything else (None, NaN, infinity, a bool, text) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _relative(before: Any, after: Any) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / abs(before)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
