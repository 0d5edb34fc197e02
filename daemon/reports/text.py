"""Numbers and user text for people: the template filters, shared by the pages (render, lineage) and the plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from selftune.daemon.reports.model import finite


def number(value: Any) -> str:
    """Numbers for people: 4 significant digits, thousands separators for integers, '-' for missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def brief(value: Any) -> str:
    """A nested value in one short line: numbers per key as their range, lists by length, the rest as JSON."""
    if isinstance(value, Mapping):
        numbers = [v for v in (finite(x) for x in value.values()) if v is not None]
        if numbers and len(numbers) == len(value):
            low, high = min(numbers), max(numbers)
            return f"{len(value)} entries, {number(low)}" + ("" if low == high else f" to {number(high)}")
        return clip(json.dumps(value, default=str), 120)
    if isinstance(value, (list, tuple)):
        return clip(", ".join(number(v) for v in value), 120) if len(value) <= 12 else f"{len(value)} entries"
    return number(value)


def percent(value: Any) -> str:
    """A signed change as a percentage, '-' when missing."""
    share = finite(value)
    if share is None:
        return "-"
    return f"{share * 100:+.2g}%" if 0 < abs(share) < 0.0005 else f"{share:+.1%}"  # tiny: not "+0.0%"


def ratio(value: Any) -> str:
    """A ratio as a factor ("×1.31"), '-' when missing."""
    factor = finite(value)
    return "-" if factor is None else f"×{factor:.2f}"


def compact(value: Any) -> str:
    """A number short enough for a label inside a plot (134.5M, 28.3k, 41.25), '-' when missing."""
    amount = finite(value)
    if amount is None:
        return "-"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(amount) >= size:
            return f"{amount / size:.1f}{suffix}"
    return number(amount)


def count(value: Any) -> str:
    """An integer with thousands separators; anything else as ``number`` writes it."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else number(value)


def markdown_cell(value: Any) -> str:
    """User text inside a Markdown table cell or line: one line, pipes escaped, and "<" so that no HTML gets in
    (">" and "&" stay readable: alone they start no tag)."""
    text = " ".join(str("-" if value is None else value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def clip(text: Any, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_class(status: Any) -> str:
    """The CSS class of a generation status badge."""
    return {"promoted": "ok", "candidate": "wait", "rejected": "bad", "failed": "bad"}.get(str(status), "other")
