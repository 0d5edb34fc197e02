"""The foundation probe: generation 0's own answers to a fixed, diverse prompt set, recorded once.

Every later generation's loss on those answers measures how far it drifted from what the
foundation knew. (Chat-format QA probes would not do: a few steps of any QA training lower their
loss by teaching answer style, which hides real forgetting.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .context import Context

PROMPTS = Path(__file__).with_name("probe_prompts.json")
PROBE_FILE = "foundation_probe.json"
FOUNDATION_ID = 0
ANSWER_TOKENS = 48


def foundation_probe(context: Context) -> list[list[dict[str, str]]]:
    """The probe conversations (prompt, generation 0's answer), recorded on first use."""
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
            for r in _record(context)["rows"]]


def foundation_probe_loss(context: Context) -> float | None:
    """Generation 0's own loss on the probe: the reference that drift is measured from (None: no probe)."""
    loss = _record(context)["loss"]
    return None if loss is None else float(loss)


def _record(context: Context) -> dict[str, Any]:
    path = context.state / PROBE_FILE
    if path.exists():
        return json.loads(path.read_text())
    from selftune.learners import evaluate as ev

    model, tokenizer = ev.load_model(context.artifacts.path(FOUNDATION_ID))
    prompts = json.loads(PROMPTS.read_text())
    answers = ev.generate_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers) if a.strip()]
    conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
                     for r in rows]
    # A foundation that answers nothing (an untrained test model) has no probe; its gates are skipped.
    loss = ev.held_out_loss(model, tokenizer, conversations).loss if conversations else None
    record = {"generation": FOUNDATION_ID, "rows": rows, "loss": loss}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record
