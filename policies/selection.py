"""Data selection: which logged interactions train the next generation, and which are held out.

Answers cut off by a departed client never train. Feedback decides next (thumbs-down out, corrections
replace the response), then whether the service's own answers may train (``self_generated``: without it
each generation would learn the champion's unrated answers, a loop that drifts), then length bounds, then
exact duplicates; near-duplicates are found by the learners (faiss embeddings) and come in as
``drop_ids``. The held-out split hashes the interaction id, so a held-out row is held out in every
process and every generation, and never trains any of them. Stdlib only, no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .records import Feedback, Interaction, Message, content_hash

SELF_GENERATED_SOURCE = "api:chat"
"""The source of the exchanges the service answered itself (``/v1/chat/completions`` logs them under it)."""
SELF_GENERATED_POLICIES: tuple[str, ...] = ("feedback_only", "all", "never")
CLIENT_DISCONNECTED = "client_disconnected"
"""The ``finish_reason`` in the metadata of a partial answer whose client went away: it never trains."""

HELD_OUT_SALT = "selftune-held-out-v1"
"""Part of the split hash. Changing it would move held-out rows into training: never change it."""


@dataclass(frozen=True)
class SelectionConfig:
    held_out_fraction: float = 0.1
    """Share of interactions (by a hash of their id) kept out of training to measure every generation."""
    min_response_chars: int = 1
    """Rows whose response is shorter than this are dropped."""
    max_response_chars: int = 4000
    """Rows whose response is longer than this are dropped."""
    max_total_chars: int = 16000
    """Rows whose messages together are longer than this are dropped."""
    exclude_thumbs_down: bool = True
    """Drop rows whose latest thumbs feedback is down (unless a correction replaces the response)."""
    min_score: float = float("-inf")
    """Drop rows whose latest score feedback is below this (unless corrected); -inf keeps every score."""
    use_corrections: bool = True
    """A corrected response replaces the logged one (and becomes a golden prompt)."""
    self_generated: str = "feedback_only"
    """Which of the service's own chat answers may train: "feedback_only" (those with a thumbs up, a correction,
    or a score at or above min_score when that is set), "all", or "never"."""
    dedupe_exact: bool = True
    """Keep one row (the lowest id) of rows whose final messages are identical."""
    near_duplicate_similarity: float = 0.99
    """Cosine similarity of whole-row embeddings (prompt and answer, embedded as the router embeds prompts) at or
    above which two rows are near-duplicates, the lowest id kept; 1.0 turns it off. Measured with the
    foundation's input embeddings on 80 rows a domain and their reworded twins: 0.99 drops 50% of the twins and
    1% of distinct rows, 0.95 drops 78% of the twins but 15% of distinct rows."""
    min_train_rows: int = 16
    """A cycle needs at least this many training rows, else it waits for more data."""
    min_held_out_rows: int = 2
    """A cycle needs at least this many held-out rows to measure improvement, else it waits."""

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.held_out_fraction < 1.0:
            out.append(f"selection.held_out_fraction = {self.held_out_fraction}: use a share in (0, 1), e.g. 0.1")
        if self.min_response_chars < 0:
            out.append(f"selection.min_response_chars = {self.min_response_chars}: use 0 or more")
        if self.max_response_chars < max(self.min_response_chars, 1):
            out.append(
                f"selection.max_response_chars = {self.max_response_chars}: use at least min_response_chars "
                f"({self.min_response_chars}) and at least 1"
            )
        if self.max_total_chars < self.max_response_chars:
            out.append(
                f"selection.max_total_chars = {self.max_total_chars}: use at least max_response_chars "
                f"({self.max_response_chars})"
            )
        if self.self_generated not in SELF_GENERATED_POLICIES:
            choices = ", ".join(repr(p) for p in SELF_GENERATED_POLICIES)
            out.append(f"selection.self_generated = {self.self_generated!r}: use one of {choices}")
        if math.isnan(self.min_score):
            out.append("selection.min_score = nan: use a number, or -inf to keep every score")
        if not 0.0 < self.near_duplicate_similarity <= 1.0:
            out.append(
                f"selection.near_duplicate_similarity = {self.near_duplicate_similarity}: use a cosine in (0, 1]; "
                "1.0 turns near-duplicate removal off"
            )
        if self.min_train_rows < 1:
            out.append(f"selection.min_train_rows = {self.min_train_rows}: use 1 or more")
        if self.min_held_out_rows < 1:
            out.append(f"selection.min_held_out_rows = {self.min_held_out_rows}: use 1 or more")
        return out


@dataclass(frozen=True, slots=True)
class TrainingRow:
    """One selected exchange; its final assistant message is the target (the correction, if any)."""

    interaction_id: int
    messages: tuple[Message, ...]
    domain: str | None = None
    corrected: bool = False

    @property
    def prompt(self) -> str:
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str:
        return self.messages[-1].content


@dataclass(frozen=True, slots=True)
class GoldenPrompt:
    """A user's correction turned into a test: ``expected`` must be produced or scored above ``rejected``."""

    interaction_id: int
    context: tuple[Message, ...]
    expected: str
    rejected: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        users = [m.content for m in self.context if m.role == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True, slots=True)
class SelectionDecision:
    proceed: bool
    reason: str


@dataclass(frozen=True)
class Selection:
    train: tuple[TrainingRow, ...]
    held_out: tuple[TrainingRow, ...]
    excluded: tuple[tuple[int, str], ...]
    """(interaction id, reason) for every interaction left out, in id order."""
    decision: SelectionDecision

    def counts(self) -> dict[str, int]:
        """Rows per outcome, for reports: train, held_out and one entry per exclusion reason."""
        out = {"train": len(self.train), "held_out": len(self.held_out)}
        for _, reason in self.excluded:
            out[f"excluded_{reason}"] = out.get(f"excluded_{reason}", 0) + 1
        return out


def is_held_out(interaction_id: int | str, fraction: float) -> bool:
    """True if this interaction belongs to the held-out split: the same answer in every process.

    The first 8 bytes of SHA-256 of the id, read as a number in [0, 1), fall below ``fraction``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction {fraction}: use a share in [0, 1]")
    digest = hashlib.sha256(f"{HELD_OUT_SALT}:{interaction_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def select_training_data(
    interactions: Iterable[Interaction],
    feedback: Iterable[Feedback],
    config: SelectionConfig,
    drop_ids: Collection[int] = frozenset(),
) -> Selection:
    """Filter, deduplicate and split interactions into training and held-out rows.

    ``drop_ids``: interactions the learners found to be near-duplicates (or that the caller excludes
    for any other reason); they are recorded as ``near_duplicate``.
    """
    by_interaction = _group_feedback(feedback)
    kept: list[TrainingRow] = []
    excluded: list[tuple[int, str]] = []
    seen_hashes: set[str] = set()
    for interaction in sorted(interactions, key=lambda i: i.id):
        row, reason = _row_for(interaction, by_interaction.get(interaction.id, []), config)
        if reason is None and interaction.id in drop_ids:
            reason = "near_duplicate"
        if reason is None and config.dedupe_exact:
            key = content_hash(row.messages)  # type: ignore[union-attr]
            reason = "duplicate" if key in seen_hashes else None
            seen_hashes.add(key)
        if reason is None:
            kept.append(row)  # type: ignore[arg-type]
        else:
            excluded.append((interaction.id, reason))

    held_out = tuple(r for r in kept if is_held_out(r.interaction_id, config.held_out_fraction))
    train = tuple(r for r in kept if not is_held_out(r.interaction_id, config.held_out_fraction))
    return Selection(train, held_out, tuple(excluded), minimum_data_decision(len(train), len(held_out), config))


def minimum_data_decision(train_rows: int, held_out_rows: int, config: SelectionConfig) -> SelectionDecision:
    """Whether there is enough data for a cycle, and why (or why not)."""
    if train_rows < config.min_train_rows:
        return SelectionDecision(
            False,
            f"only {train_rows} training row(s), the minimum is {config.min_train_rows}: ingest more interactions "
            "or lower selection.min_train_rows",
        )
    if held_out_rows < config.min_held_out_rows:
        return SelectionDecision(
            False,
            f"only {held_out_rows} held-out row(s), the minimum is {config.min_held_out_rows}: ingest more "
            "interactions or raise selection.held_out_fraction",
        )
    return SelectionDecision(True, f"{train_rows} training and {held_out_rows} held-out rows")


def golden_prompts(interactions: Iterable[Interaction], feedback: Iterable[Feedback]) -> tuple[GoldenPrompt, ...]:
    """Every corrected interaction as a golden prompt: the latest correction against the logged response."""
    by_interaction = _group_feedback(feedback)
    out = []
    for interaction in sorted(interactions, key=lambda i: i.id):
        correction = _latest_correction(by_interaction.get(interaction.id, []))
        if correction is None:
            continue
        original = interaction.response
        rejected = (original,) if original and original != correction else ()
        out.append(GoldenPrompt(interaction.id, _context(interaction), correction, rejected))
    return tuple(out)


def _row_for(
    interaction: Interaction, feedback: list[Feedback], config: SelectionConfig
) -> tuple[TrainingRow | None, str | None]:
    """The training row for one interaction, or the reason it is left out."""
    if interaction.metadata.get("finish_reason") == CLIENT_DISCONNECTED:
        return None, CLIENT_DISCONNECTED
    self_generated = interaction.source == SELF_GENERATED_SOURCE
    if self_generated and config.self_generated == "never":
        return None, "self_generated"
    correction = _latest_correction(feedback) if config.use_corrections else None
    if correction is not None:
        messages = (*_context(interaction), Message("assistant", correction))
    else:
        if not interaction.response:
            return None, "no_response"
        thumbs = _latest(feedback, "thumbs")
        if config.exclude_thumbs_down and thumbs is not None and thumbs.thumbs_up is False:
            return None, "thumbs_down"
        score = _latest(feedback, "score")
        if score is not None and score.score is not None and score.score < config.min_score:
            return None, "low_score"
        if self_generated and config.self_generated == "feedback_only" and not _approved(thumbs, score, config):
            return None, "self_generated_unrated"
        messages = interaction.messages
    if not any(m.role == "user" for m in messages[:-1]):
        return None, "no_prompt"
    response = messages[-1].content
    if len(response) < config.min_response_chars:
        return None, "too_short"
    if len(response) > config.max_response_chars or sum(len(m.content) for m in messages) > config.max_total_chars:
        return None, "too_long"
    return TrainingRow(interaction.id, messages, interaction.domain, correction is not None), None


def _approved(thumbs: Feedback | None, score: Feedback | None, config: SelectionConfig) -> bool:
    """Positive feedback on the logged answer: a latest thumbs up, or a score that passes a set ``min_score``
    (without one, a score's scale is unknown, so it approves nothing)."""
    if thumbs is not None and thumbs.thumbs_up:
        return True
    return (score is not None and score.score is not None and math.isfinite(config.min_score)
            and score.score >= config.min_score)


def _context(interaction: Interaction) -> tuple[Message, ...]:
    """The messages before the final assistant turn."""
    messages = interaction.messages
    return messages[:-1] if messages and messages[-1].role == "assistant" else messages


def _group_feedback(feedback: Iterable[Feedback]) -> dict[int, list[Feedback]]:
    out: dict[int, list[Feedback]] = {}
    for item in feedback:
        out.setdefault(item.interaction_id, []).append(item)
    for items in out.values():
        items.sort(key=lambda f: (f.created_at, f.id))
    return out


def _latest(feedback: list[Feedback], kind: str) -> Feedback | None:
    matching = [f for f in feedback if f.kind == kind]
    return matching[-1] if matching else None


def _latest_correction(feedback: list[Feedback]) -> str | None:
    correction = _latest(feedback, "correction")
    if correction is not None and correction.corrected_response:
        return correction.corrected_response
    return None
