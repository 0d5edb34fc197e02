"""Every configuration problem names the setting as the user writes it: ``section.key = value``."""

from __future__ import annotations

import dataclasses
import re

import pytest

from selftune.policies.config import SECTIONS

BAD_NUMBERS = (-(10**9), 10**9, float("nan"), -0.5, 1.5)


def _problems_with_one_bad_field(section: type) -> list[str]:
    problems: list[str] = []
    default = section()
    for f in dataclasses.fields(section):
        value = getattr(default, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        for bad in BAD_NUMBERS:
            try:
                problems += dataclasses.replace(default, **{f.name: type(value)(bad) if bad == bad else bad}).problems()
            except (TypeError, ValueError, OverflowError):
                continue
    return problems


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_each_problem_names_a_key_of_its_own_section(name: str) -> None:
    section = SECTIONS[name]
    keys = {f.name for f in dataclasses.fields(section)}
    for problem in _problems_with_one_bad_field(section):
        match = re.match(r"([a-z_]+)\.([a-z_]+) = ", problem)
        assert match, f"[{name}] problem does not start with 'section.key = ': {problem!r}"
        assert match.group(1) == name and match.group(2) in keys, f"[{name}] names another setting: {problem!r}"


def test_the_trim_section_finds_problems_to_check() -> None:
    assert _problems_with_one_bad_field(SECTIONS["trim"]), "no bad value produced a problem: the test checks nothing"
