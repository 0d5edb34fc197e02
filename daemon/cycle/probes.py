"""Generation 0's own answers to fixed prompt sets, recorded once: the foundation probe and the rehearsal set.

The probe measures drift: every later generation's loss on generation 0's answers says how far it moved
from what the foundation knew. (Chat-format QA probes would not do: a few steps of any QA training lower
their loss by teaching answer style, which hides real forgetting.)

The rehearsal set keeps that knowledge: generation 0's answers to other general prompts, disjoint from the
probe's, are replayed in every cycle at their own share of each batch (``replay.rehearsal_ratio``), so
that specialising never trains on new data alone (the
"self-synthesized rehearsal" idea: with no pre-training data at hand, the model's own outputs stand in).

The probe's loss is recorded in nats per byte of the answers (``LOSS_UNIT``, with a ``unit`` field), as
every generation's probe loss is measured, so the drift gate compares like with like across tokenizers.
A record written before (no ``unit``: per token) is converted where it is read: its per-token loss times
generation 0's target tokens over target bytes on the same rows (``evaluate.target_counts``), the
exact per-byte value of the same measurement. Converting, rather than measuring again, keeps the reference
number that earlier generations were gated against; the record is rewritten with its unit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# torch and transformers load at import: only the cycle's worker (and benchmarks) import this module.
from selftune.learners import evaluate as ev
from selftune.learners.lm import load_tokenizer
from selftune.policies.gates import LOSS_UNIT, PER_TOKEN_LOSS_UNIT
from selftune.policies.records import FOUNDATION_ID

from selftune.daemon.context import Context

PROBE_PROMPTS = Path(__file__).with_name("probe_prompts.json")
REHEARSAL_PROMPTS = Path(__file__).with_name("rehearsal_prompts.json")
PROBE_FILE = "foundation_probe.json"
"""In the state directory: the probe rows and generation 0's loss on them (``unit``: nats/byte), recorded once."""
REHEARSAL_FILE = "foundation_rehearsal.json"
"""In the state directory: the rehearsal rows, recorded once."""
ANSWER_TOKENS = 160
"""Answers the foundation does not end within this many tokens are left out (a cut-off turn is not its answer)."""


def foundation_probe(context: Context) -> list[list[dict[str, str]]]:
    """The probe conversations (prompt, generation 0's answer), recorded on first use."""
    return [_conversation(r) for r in _record(context, PROBE_PROMPTS, PROBE_FILE, with_loss=True)["rows"]]


def foundation_probe_loss(context: Context) -> float | None:
    """Generation 0's own loss on the probe, in nats per byte: the reference drift is measured from (None: no probe)."""
    loss = _record(context, PROBE_PROMPTS, PROBE_FILE, with_loss=True)["loss"]
    return None if loss is None else float(loss)


def foundation_rehearsal(context: Context, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` rehearsal rows (generation 0's answers to general prompts), as learner rows."""
    if count <= 0:
        return []
    rows = _record(context, REHEARSAL_PROMPTS, REHEARSAL_FILE, with_loss=False)["rows"]
    return [{"id": f"foundation:{i}", "messages": _conversation(r), "domain": "foundation"}
            for i, r in enumerate(rows[:count])]


def _conversation(row: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]


def _record(context: Context, prompts_file: Path, name: str, *, with_loss: bool) -> dict[str, Any]:
    path = context.state / name
    if path.exists():
        record = json.loads(path.read_text())
        if with_loss and "unit" not in record:
            record = _per_byte(context, record)
            _write(path, record)
        return record
    model, tokenizer = ev.load_model(context.artifacts.path(FOUNDATION_ID))
    prompts = json.loads(prompts_file.read_text())
    answers = ev.complete_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers) if a and a.strip()]
    record: dict[str, Any] = {"generation": FOUNDATION_ID, "rows": rows}
    if with_loss:
        # A foundation that answers nothing (an untrained test model) has no probe; its gates are skipped.
        measured = ev.held_out_loss(model, tokenizer, [_conversation(r) for r in rows]) if rows else None
        record.update(_loss_fields(measured))
    _write(path, record)
    return record


def _loss_fields(measured: ev.LossResult | None) -> dict[str, Any]:
    """The probe record's loss: per byte (``loss``, the reference), with the per-token figure labelled beside."""
    if measured is None:
        return {"loss": None, "unit": LOSS_UNIT}
    return {"loss": measured.loss, "unit": LOSS_UNIT, "loss_per_token": measured.loss_per_token,
            "per_token_unit": PER_TOKEN_LOSS_UNIT, "tokens": measured.tokens, "bytes": measured.bytes}


def _per_byte(context: Context, record: dict[str, Any]) -> dict[str, Any]:
    """A probe record written per token (no ``unit``) in nats per byte: the same measurement, divided by bytes."""
    if record.get("loss") is None or not record.get("rows"):
        return {**record, "loss": None, "unit": LOSS_UNIT}
    tokenizer = load_tokenizer(context.artifacts.path(FOUNDATION_ID))
    tokens, size = ev.target_counts(tokenizer, [_conversation(r) for r in record["rows"]])
    per_token = float(record["loss"])
    return {**record, "loss": per_token * tokens / size, "unit": LOSS_UNIT, "loss_per_token": per_token,
            "per_token_unit": PER_TOKEN_LOSS_UNIT, "tokens": tokens, "bytes": size}


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
