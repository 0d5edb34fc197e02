"""Feedback per interaction is capped, on every path that stores it, on SQLite and PostgreSQL (conftest.py)."""

from __future__ import annotations

import pytest

from selftune.policies.errors import ConflictError
from selftune.policies.records import FeedbackIn, InteractionIn, Message
from selftune.storage import Store
from selftune.storage import models as m
from selftune.storage.repositories.interactions import MAX_FEEDBACK_PER_INTERACTION

from .test_store_contract import row_count

CAP = MAX_FEEDBACK_PER_INTERACTION


def scores(n: int, start: int = 0) -> tuple[FeedbackIn, ...]:
    return tuple(FeedbackIn("score", score=float(start + i)) for i in range(n))


def row(external_id: str, feedback: tuple[FeedbackIn, ...] = ()) -> InteractionIn:
    return InteractionIn((Message("user", "q"), Message("assistant", "a")), external_id=external_id, feedback=feedback)


def test_an_interaction_takes_feedback_up_to_the_cap_and_then_a_clear_error(store: Store) -> None:
    assert CAP == 100
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch([row("full", scores(CAP - 1))])
        full = uow.interactions.find_by_external_id("main", "full")
        assert full is not None
        uow.feedback.add(full.id, FeedbackIn("thumbs", thumbs_up=True))  # the 100th
    refused = rf"interaction {full.id} has 100 feedback item\(s\); 1 more would pass the cap of 100 per interaction"
    with pytest.raises(ConflictError, match=refused):
        with store.transaction(write=True) as uow:
            uow.feedback.add(full.id, FeedbackIn("thumbs", thumbs_up=False))
    # after the fact, through ingest: refused whole as well
    with pytest.raises(ConflictError, match=rf"interaction {full.id} has 100 feedback item\(s\); 2 more"):
        with store.transaction(write=True) as uow:
            uow.interactions.add_batch([row("other"), row("full", scores(2, start=500))])
    assert row_count(store, m.feedback) == CAP and row_count(store, m.interactions) == 1


def test_a_new_row_with_more_feedback_than_the_cap_is_refused_and_nothing_is_written(store: Store) -> None:
    with pytest.raises(ConflictError, match=r"row 'huge' has 0 feedback item\(s\); 101 more would pass the cap of 100"):
        with store.transaction(write=True) as uow:
            uow.interactions.add_batch([row("small", scores(3)), row("huge", scores(CAP + 1))])
    assert row_count(store, m.interactions) == 0 and row_count(store, m.feedback) == 0
