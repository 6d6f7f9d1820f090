"""The message catalogue: every key in every language, and Accept-Language negotiation."""

from __future__ import annotations

import pytest

from events import messages
from events.messages import Language, negotiate
from events.states import TaskState


def test_every_key_has_every_language() -> None:
    for key, texts in messages.CATALOGUE.items():
        assert set(texts) == set(Language), key
        assert all(text.strip() for text in texts.values()), key


def test_every_state_has_a_display_in_each_language() -> None:
    for state in TaskState:
        assert state.display_in(Language.EN) == messages.text(f"state.{state}", Language.EN)
        assert state.display == state.display_in(Language.ZH)
    assert TaskState.COMPRESSING.display == "压缩镜像中"  # the seed's status example
    assert TaskState.COMPRESSING.display_in(Language.EN) == "compressing image"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, Language.ZH),
        ("", Language.ZH),
        ("en", Language.EN),
        ("EN-us", Language.EN),
        ("en-US,en;q=0.9", Language.EN),
        ("zh-CN,zh;q=0.9,en;q=0.8", Language.ZH),
        ("fr, en;q=0.5", Language.EN),  # French is not ours: the next one we have
        ("en;q=0.2, zh;q=0.8", Language.ZH),  # weights, not order, decide
        ("zh;q=0.5, en;q=0.5", Language.ZH),  # a tie keeps the header's order
        ("en;q=0", Language.ZH),  # q=0 means "not this one"
        ("en;q=abc", Language.ZH),  # a malformed weight counts as 0
        ("*", Language.ZH),
        ("de, fr", Language.ZH),
        (";;;,,,", Language.ZH),
    ],
)
def test_accept_language_picks_the_preferred_language_we_have(
    header: str | None, expected: Language
) -> None:
    assert negotiate(header) is expected


def test_the_configured_default_applies_when_nothing_matches() -> None:
    assert negotiate("de", Language.EN) is Language.EN
    assert negotiate(None, Language.EN) is Language.EN
    assert negotiate("zh", Language.EN) is Language.ZH


def test_a_huge_header_is_read_in_bounded_time() -> None:
    # past 32 ranges nothing more is read: a later "en" does not count
    header = ",".join(["de"] * 40 + ["en"])
    assert negotiate(header) is Language.ZH


def test_catalogue_filters_by_prefix() -> None:
    states = messages.catalogue(Language.EN, "state.")
    assert states["state.failed"] == "failed"
    assert all(key.startswith("state.") for key in states)
