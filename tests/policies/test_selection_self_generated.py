"""Selection and the service's own answers: chat exchanges train only as ``selection.self_generated`` allows,
and answers cut off by a departed client never train."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from selftune.policies.config import Config
from selftune.policies.errors import ConfigError
from selftune.policies.ingest import RowDefaults, parse_row
from selftune.policies.records import Feedback, Interaction
from selftune.policies.selection import SelectionConfig, select_training_data

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NO_SPLIT = SelectionConfig(held_out_fraction=1e-12, min_train_rows=1)  # every kept row trains


def stored(interaction_id: int, source: str, **extra: object) -> Interaction:
    """A row as ingest stores it: parsed by the ingest parser under ``source`` (chat logs "api:chat")."""
    row = parse_row({"prompt": f"question {interaction_id}?", "response": f"answer {interaction_id}.",
                     "id": f"chatcmpl-{interaction_id}", **extra}, defaults=RowDefaults(source=source))
    return Interaction(interaction_id, row.branch, row.messages, T0, row.source, row.content_hash,
                       row.external_id, row.domain, row.tags, row.metadata)


def thumbs(feedback_id: int, interaction_id: int, up: bool, minutes: int = 0) -> Feedback:
    return Feedback(feedback_id, interaction_id, "thumbs", T0 + timedelta(minutes=minutes), thumbs_up=up)


def chosen(selection) -> list[int]:
    return sorted(r.interaction_id for r in (*selection.train, *selection.held_out))


CHATS = [stored(i, "api:chat") for i in range(1, 51)]
LOGGED = [stored(i, "api") for i in range(51, 56)]  # traffic applications logged themselves


def test_fifty_unrated_chat_exchanges_train_none_and_ten_thumbs_up_train_those_ten() -> None:
    config = SelectionConfig()  # the default: self_generated = "feedback_only"
    assert config.self_generated == "feedback_only"
    unrated = select_training_data(CHATS + LOGGED, [], config)
    assert chosen(unrated) == list(range(51, 56))
    assert unrated.counts()["excluded_self_generated_unrated"] == 50

    liked = list(range(3, 50, 5))  # ten of them
    rated = select_training_data(CHATS + LOGGED, [thumbs(n, n, True) for n in liked], config)
    assert chosen(rated) == liked + list(range(51, 56))
    assert rated.counts()["excluded_self_generated_unrated"] == 40


def test_a_correction_or_a_score_above_min_score_is_positive_but_thumbs_down_and_low_scores_are_not() -> None:
    config = replace(NO_SPLIT, min_score=0.5)
    feedback = [
        Feedback(1, 1, "correction", T0, corrected_response="a better answer."),
        Feedback(2, 2, "score", T0, score=0.9),
        Feedback(3, 3, "score", T0, score=0.1),
        thumbs(4, 4, False),
        thumbs(5, 5, True), thumbs(6, 5, False, minutes=1),  # the latest thumbs counts
        Feedback(7, 6, "preference", T0, chosen="x", rejected="y"),  # says nothing about the logged answer
    ]
    selection = select_training_data(CHATS[:7], feedback, config)
    assert chosen(selection) == [1, 2]
    assert dict(selection.excluded) == {3: "low_score", 4: "thumbs_down", 5: "thumbs_down",
                                        6: "self_generated_unrated", 7: "self_generated_unrated"}
    # Without min_score a score is no judgement of the answer: the exchange stays unrated.
    assert dict(select_training_data(CHATS[1:2], feedback, NO_SPLIT).excluded) == {2: "self_generated_unrated"}


def test_all_trains_every_exchange_and_never_trains_none_even_with_feedback() -> None:
    feedback = [thumbs(n, n, True) for n in range(1, 11)]
    assert chosen(select_training_data(CHATS, [], replace(NO_SPLIT, self_generated="all"))) == list(range(1, 51))
    never = select_training_data(CHATS + LOGGED, feedback, replace(NO_SPLIT, self_generated="never"))
    assert chosen(never) == list(range(51, 56))
    assert never.counts()["excluded_self_generated"] == 50


@pytest.mark.parametrize("policy", ["all", "feedback_only", "never"])
def test_an_answer_cut_off_by_a_departed_client_never_trains(policy: str) -> None:
    cut = [stored(1, "api:chat", finish_reason="client_disconnected"),
           stored(2, "api", finish_reason="client_disconnected"), stored(3, "api:chat", finish_reason="stop")]
    feedback = [thumbs(1, 1, True), Feedback(2, 2, "correction", T0, corrected_response="whole answer.")]
    selection = select_training_data(cut, feedback, replace(NO_SPLIT, self_generated=policy))
    assert dict(selection.excluded)[1] == dict(selection.excluded)[2] == "client_disconnected"
    assert selection.counts()["excluded_client_disconnected"] == 2
    assert (3 in chosen(selection)) == (policy == "all")


def test_an_unknown_policy_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"selection.self_generated = 'sometimes': use one of "
                                          r"'feedback_only', 'all', 'never'"):
        Config(selection=SelectionConfig(self_generated="sometimes"))
