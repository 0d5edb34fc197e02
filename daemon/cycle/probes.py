"""Generation 0's own answers to fixed prompt sets, recorded once: the foundation probe and the rehearsal set.

The probe measures drift: every later generation's loss on generation 0's answers says how far it moved
from what the foundation knew. (Chat-format QA probes would not do: a few steps of any QA training lower
their loss by teaching answer style, which hides real forgetting.)

The rehearsal set keeps that knowledge: generation 0's answers to other general prompts, disjoint from the
probe's, are replayed in every cycle at their own share of each batch (``replay.rehearsal_ratio``), so
that specialising never trains on new data alone (the
"self-synthesized rehearsal" idea: with no pre-training data at hand, the model's own outputs stand in).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# torch and transformers load at import: only the cycle's worker (and benchmarks) import this module.
from selftune.learners import evaluate as ev
from selftune.policies.records import FOUNDATION_ID

from selftune.daemon.context import Context

PROBE_PROMPTS = Path(__file__).with_name("probe_prompts.json")
REHEARSAL_PROMPTS = Path(__file__).with_name("rehearsal_prompts.json")
PROBE_FILE = "foundation_probe.json"
"""In the state directory: the probe rows and generation 0's loss on them, recorded once."""
REHEARSAL_FILE = "foundation_rehearsal.json"
"""In the state directory: the rehearsal rows, recorded once."""
ANSWER_TOKENS = 160
"""Answers the foundation does not end within this many tokens are left out (a cut-off turn is not its answer)."""


def foundation_probe(context: Context) -> list[list[dict[str, str]]]:
    """The probe conversations (prompt, generation 0's answer), recorded on first use."""
    return [_conversation(r) for r in _record(context, PROBE_PROMPTS, PROBE_FILE, with_loss=True)["rows"]]


def foundation_probe_loss(context: Context) -> float | None:
    """Generation 0's own loss on the probe: the reference that drift is measured from (None: no probe)."""
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
        return json.loads(path.read_text())
    model, tokenizer = ev.load_model(context.artifacts.path(FOUNDATION_ID))
    prompts = json.loads(prompts_file.read_text())
    answers = ev.complete_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers) if a and a.strip()]
    record: dict[str, Any] = {"generation": FOUNDATION_ID, "rows": rows}
    if with_loss:
        # A foundation that answers nothing (an untrained test model) has no probe; its gates are skipped.
        record["loss"] = ev.held_out_loss(model, tokenizer, [_conversation(r) for r in rows]).loss if rows else None
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record
