"""Rows as the cycle's step results hold them: ``{"id", "messages": [{"role", "content"}, ...], "domain"}``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from selftune.policies.records import Interaction, Message


def row(interaction_id: int, turns: tuple[Message, ...], domain: str | None) -> dict[str, Any]:
    return {"id": interaction_id, "messages": messages(turns), "domain": domain or "default"}


def messages(turns: tuple[Message, ...]) -> list[dict[str, str]]:
    return [asdict(m) for m in turns]


def interaction_row(interaction: Interaction) -> dict[str, Any]:
    return row(interaction.id, interaction.messages, interaction.domain)


def conversations(rows: Iterable[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The rows' messages, as the learners' losses take them."""
    return [r["messages"] for r in rows]


def prompt_and_answer(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each row's last prompt and its answer (the traffic pruning scores on)."""
    return [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in rows]


def count_by_domain(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(r["domain"] or "default" for r in rows))
