from __future__ import annotations

import pytest

from selftune.policies.errors import InvalidRecordError
from selftune.policies.ingest import RowDefaults, parse_row
from selftune.policies.records import Message

EXPECTED = (Message("user", "What is 2+2?"), Message("assistant", "4"))


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
    {"prompt": "What is 2+2?", "response": "4"},
])
def test_three_formats_parse_to_the_same_interaction(row: dict) -> None:
    parsed = parse_row(row)
    assert parsed.messages == EXPECTED
    assert parsed.content_hash == parse_row({"prompt": "What is 2+2?", "response": "4"}).content_hash


def test_extra_fields_are_kept() -> None:
    row = {"prompt": "p", "response": "r", "id": 17, "domain": "math", "tags": ["a"], "source": "x", "term": "t",
           "feedback": {"thumbs": "down", "correction": "better"}}
    parsed = parse_row(row, defaults=RowDefaults(branch="b", domain="fallback"))
    assert (parsed.external_id, parsed.domain, parsed.tags, parsed.branch) == ("17", "math", ("a",), "b")
    assert parsed.metadata == {"source": "x", "term": "t"}
    assert [f.kind for f in parsed.feedback] == ["thumbs", "correction"]
    assert parsed.feedback[0].thumbs_up is False and parsed.feedback[1].corrected_response == "better"
    assert parsed.dedupe_key == "id:17"


def test_domain_default_applies_only_when_row_has_none() -> None:
    assert parse_row({"prompt": "p", "response": "r"}, defaults=RowDefaults(domain="d")).domain == "d"


def test_dedupe_key_falls_back_to_content_hash() -> None:
    a = parse_row({"prompt": "p", "response": "r"})
    assert a.dedupe_key == f"sha256:{a.content_hash}"
    assert a.content_hash != parse_row({"prompt": "p", "response": "r2"}).content_hash


@pytest.mark.parametrize(("row", "needle"), [
    ([1, 2], "expected a JSON object"),
    ({"text": "x"}, "unknown row format"),
    ({"prompt": "p"}, "'response' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be a non-empty assistant"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "'robot'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no user message"),
    ({"conversations": [{"from": [], "value": "q"}, {"from": "gpt", "value": "a"}]}, "from [] is not one of"),
    ({"prompt": "p", "response": "r", "feedback": "meh"}, "feedback 'meh'"),
    ({"prompt": "p", "response": "r", "feedback": {"score": float("nan")}}, "finite number"),
    ({"prompt": "p", "response": "r", "feedback": {"chosen": "a"}}, "'rejected' must be a non-empty string"),
    ({"prompt": "p", "response": "r", "tags": "x"}, "'tags' must be a list"),
    ({"prompt": "p", "response": "r", "id": True}, "'id' must be a string or an integer"),
])
def test_malformed_rows_name_the_problem(row: object, needle: str) -> None:
    with pytest.raises(InvalidRecordError, match=None) as info:
        parse_row(row)
    assert needle in str(info.value)


def test_overlong_message_names_the_setting() -> None:
    with pytest.raises(InvalidRecordError, match="max_message_chars = 5"):
        parse_row({"prompt": "p", "response": "r" * 6}, defaults=RowDefaults(max_message_chars=5))


def test_forced_format_rejects_other_shapes() -> None:
    with pytest.raises(InvalidRecordError, match="'messages' must be a list"):
        parse_row({"prompt": "p", "response": "r"}, fmt="openai")


def test_routed_domains_go_to_their_branch() -> None:
    defaults = RowDefaults(branch="main", routes={"hacker_jargon": "jargon"})
    assert parse_row({"prompt": "p", "response": "r", "domain": "hacker_jargon"}, defaults=defaults).branch == "jargon"
    assert parse_row({"prompt": "p", "response": "r", "domain": "python"}, defaults=defaults).branch == "main"
    assert parse_row({"prompt": "p", "response": "r"}, defaults=defaults).branch == "main"


def test_an_openai_fine_tuning_row_keeps_developer_text_parts_and_weights() -> None:
    parsed = parse_row({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "4", "weight": 1}]})
    assert parsed.messages == (Message("system", "Be brief."), Message("user", "What is 2+2?"),
                               Message("assistant", "5", 0), Message("user", "Again?"), Message("assistant", "4"))
    assert parsed.messages[2].as_dict() == {"role": "assistant", "content": "5", "weight": 0}
    without_weight = [{"role": m.role, "content": m.content} for m in parsed.messages]
    assert parse_row({"messages": without_weight}).content_hash != parsed.content_hash  # other training data


def test_an_openai_preference_row_is_the_preferred_exchange_with_a_preference() -> None:
    row = {"input": {"messages": [{"role": "user", "content": "What is 2+2?"}], "tools": []},
           "preferred_output": [{"role": "assistant", "content": "4"}],
           "non_preferred_output": [{"role": "assistant", "content": "5"}], "id": "p1"}
    parsed = parse_row(row)
    assert parsed.messages == EXPECTED and parsed.external_id == "p1" and parsed.metadata == {}
    assert [(f.kind, f.chosen, f.rejected) for f in parsed.feedback] == [("preference", "4", "5")]
    assert parse_row(row, fmt="preference") == parsed


@pytest.mark.parametrize(("row", "needle"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c"}, {"role": "assistant", "content": "a"}]},
     "message 1 is a tool call or result ('tool_calls'): selftune does not train on tool use"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "1"},
                   {"role": "assistant", "content": "a"}]}, "message 1 is a tool call or result (role 'tool')"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "message 1: weight 0.5 must be 0"),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},
     "only on an assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "message 0: content part 0 is 'image_url'"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [
        {"role": "assistant", "content": "a"}]}, "'non_preferred_output' must be a list of one assistant message"),
    ({"input": [], "preferred_output": [], "non_preferred_output": []}, "'input' must be an object"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant",
      "content": "a", "weight": 2}], "non_preferred_output": []}, "'preferred_output': message 0: weight 2"),
    ({"instruction": "q", "input": "", "output": "a"}, "unknown row format"),
])
def test_openai_rows_that_cannot_be_trained_on_as_they_are_say_why(row: dict, needle: str) -> None:
    with pytest.raises(InvalidRecordError) as info:
        parse_row(row)
    assert needle in str(info.value)
