"""events/platform.py: parsing and normalising ``os/architecture[/variant]``, and choosing
a manifest from a manifest list or OCI index."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.platform import (
    DEFAULT_PLATFORM,
    PLATFORM_MAX,
    PLATFORM_PATTERN,
    InvalidPlatform,
    Platform,
    choose,
    from_descriptor,
    parse_platform,
)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM_V7 = Platform("linux", "arm", "v7")


def expect_refused(text: object, fragment: str) -> None:
    try:
        parsed = parse_platform(text)
    except InvalidPlatform as exc:
        assert fragment in str(exc)
        return
    raise AssertionError(f"{text!r} parsed as {parsed}")


# -- parsing and normalising --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("linux/amd64", AMD64, id="plain"),
        pytest.param("LINUX/x86_64", AMD64, id="capitals-and-x86_64"),
        pytest.param("linux/x86-64", AMD64, id="x86-64"),
        pytest.param("linux/amd64/v1", AMD64, id="amd64-v1-is-the-default"),
        pytest.param("linux/amd64/v3", Platform("linux", "amd64", "v3"), id="amd64-v3"),
        pytest.param("linux/arm64", ARM64, id="arm64"),
        pytest.param("linux/aarch64", ARM64, id="aarch64"),
        pytest.param("linux/arm64/v8", ARM64, id="arm64-v8-is-the-default"),
        pytest.param("linux/AArch64/V8", ARM64, id="aarch64-v8-capitals"),
        pytest.param("linux/arm", ARM_V7, id="arm-defaults-to-v7"),
        pytest.param("linux/arm/7", ARM_V7, id="arm-bare-variant"),
        pytest.param("linux/armhf", ARM_V7, id="armhf"),
        pytest.param("linux/arm/v6", Platform("linux", "arm", "v6"), id="arm-v6"),
        pytest.param("linux/armel", Platform("linux", "arm", "v6"), id="armel"),
        pytest.param("linux/i386", Platform("linux", "386"), id="i386"),
        pytest.param("linux/s390x", Platform("linux", "s390x"), id="s390x"),
        pytest.param("windows/amd64", Platform("windows", "amd64"), id="windows"),
    ],
)
def test_platforms_are_normalised(text: str, expected: Platform) -> None:
    platform = parse_platform(text)

    assert platform == expected
    assert parse_platform(str(platform)) == platform  # the normal form is a fixed point


def test_the_string_form_leaves_out_an_empty_variant() -> None:
    assert str(AMD64) == "linux/amd64"
    assert str(ARM_V7) == "linux/arm/v7"
    assert str(parse_platform(DEFAULT_PLATFORM)) == DEFAULT_PLATFORM


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("linux", "is not os/architecture[/variant]", id="no-architecture"),
        pytest.param("a/b/c/d", "is not os/architecture[/variant]", id="four-parts"),
        pytest.param("linux/", "is not os/architecture[/variant]", id="empty-architecture"),
        pytest.param("/amd64", "is not os/architecture[/variant]", id="empty-os"),
        pytest.param("linux//v7", "is not os/architecture[/variant]", id="empty-middle"),
        pytest.param("linux/amd 64", "is not os/architecture[/variant]", id="inner-space"),
        pytest.param("linux/amd64:v3", "is not os/architecture[/variant]", id="colon"),
        pytest.param("linux/" + "a" * 21, "is not os/architecture[/variant]", id="long-part"),
        pytest.param("linux/amd64é", "is not os/architecture[/variant]", id="non-ascii"),
        pytest.param("", "platform must be 1-64 characters", id="empty"),
        pytest.param("l" * (PLATFORM_MAX + 1), "platform must be 1-64 characters", id="long"),
        pytest.param(
            "linux/amd64 ",
            "is not os/architecture[/variant]",
            id="trailing-space",
        ),
        pytest.param(
            " linux/amd64",
            "is not os/architecture[/variant]",
            id="leading-space",
        ),
        pytest.param(
            "linux/amd64\n",
            "is not os/architecture[/variant]",
            id="trailing-newline",
        ),
        pytest.param(
            "linux/\u212a8s",
            "is not os/architecture[/variant]",
            id="kelvin-sign",
        ),
    ],
)
def test_bad_text_is_refused_with_a_reason(text: str, fragment: str) -> None:
    expect_refused(text, fragment)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(5, id="number"),
        pytest.param(b"linux/amd64", id="bytes"),
        pytest.param(["linux", "amd64"], id="list"),
        pytest.param({"os": "linux", "architecture": "amd64"}, id="object"),
    ],
)
def test_a_non_string_is_refused(value: object) -> None:
    expect_refused(value, "platform must be a string")


def test_invalid_platform_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_platform("linux")


# -- the documented pattern agrees with the parser ----------------------------------


@given(st.from_regex(PLATFORM_PATTERN, fullmatch=True))
def test_what_the_document_allows_parses(text: str) -> None:
    assert len(text) <= PLATFORM_MAX
    parse_platform(text)


@pytest.mark.parametrize(
    "text",
    [
        "linux",
        "a/b/c/d",
        "",
        "linux/amd 64",
        "linux/" + "a" * 21,
        "linux/amd64é",
        "linux/amd64 ",
        "linux/\u212a8s",
    ],
)
def test_what_the_document_refuses_is_refused(text: str) -> None:
    assert re.fullmatch(PLATFORM_PATTERN, text) is None
    expect_refused(text, "platform")


# -- index entries ------------------------------------------------------------------


def entry(platform: Any) -> dict[str, Any]:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + "0" * 64,
        "size": 1234,
        "platform": platform,
    }


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        pytest.param({"os": "linux", "architecture": "amd64"}, AMD64, id="amd64"),
        pytest.param(
            {"os": "linux", "architecture": "arm64", "variant": "v8"}, ARM64, id="arm64-v8"
        ),
        pytest.param({"os": "linux", "architecture": "arm"}, ARM_V7, id="arm-no-variant"),
        pytest.param(
            {"os": "linux", "architecture": "arm", "variant": "v6"},
            Platform("linux", "arm", "v6"),
            id="arm-v6",
        ),
        pytest.param({"os": "Linux", "architecture": "x86_64"}, AMD64, id="aliases"),
        pytest.param(
            {"os": "linux", "architecture": "amd64", "variant": 3}, AMD64, id="odd-variant"
        ),
        pytest.param(
            {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"},
            Platform("windows", "amd64"),
            id="windows-os-version",
        ),
        pytest.param(
            {"os": "unknown", "architecture": "unknown"},
            Platform("unknown", "unknown"),
            id="attestation",
        ),
    ],
)
def test_an_index_entry_names_its_platform(platform: Any, expected: Platform) -> None:
    assert from_descriptor(entry(platform)) == expected


@pytest.mark.parametrize(
    "descriptor",
    [
        pytest.param({"digest": "sha256:" + "0" * 64}, id="no-platform"),
        pytest.param(entry(None), id="null"),
        pytest.param(entry("linux/amd64"), id="a-string"),
        pytest.param(entry({"os": "linux"}), id="no-architecture"),
        pytest.param(entry({"architecture": "amd64"}), id="no-os"),
        pytest.param(entry({"os": "", "architecture": "amd64"}), id="empty-os"),
        pytest.param(entry({"os": "linux", "architecture": 64}), id="numeric-architecture"),
    ],
)
def test_an_index_entry_without_a_usable_platform_names_none(descriptor: Any) -> None:
    assert from_descriptor(descriptor) is None


# -- matching and choosing ------------------------------------------------------------


def test_a_request_without_a_variant_takes_any_variant() -> None:
    assert AMD64.matches(Platform("linux", "amd64", "v3"))
    assert not Platform("linux", "amd64", "v3").matches(AMD64)
    assert not ARM_V7.matches(Platform("linux", "arm", "v6"))
    assert not AMD64.matches(Platform("windows", "amd64"))
    assert not AMD64.matches(ARM64)


@pytest.mark.parametrize(
    ("wanted", "candidates", "expected"),
    [
        pytest.param(AMD64, [ARM64, AMD64], 1, id="exact"),
        pytest.param(AMD64, [AMD64, AMD64], 0, id="first-exact"),
        pytest.param(
            AMD64, [Platform("linux", "amd64", "v3"), AMD64], 1, id="exact-before-variant"
        ),
        pytest.param(
            AMD64, [ARM64, Platform("linux", "amd64", "v2")], 1, id="variant-less-fallback"
        ),
        pytest.param(ARM_V7, [Platform("linux", "arm", "v6"), ARM64], None, id="no-variant"),
        pytest.param(Platform("linux", "amd64", "v3"), [AMD64], None, id="needs-the-variant"),
        pytest.param(Platform("windows", "amd64"), [AMD64], None, id="other-os"),
        pytest.param(AMD64, [], None, id="empty"),
    ],
)
def test_choose_prefers_an_exact_match(
    wanted: Platform, candidates: list[Platform], expected: int | None
) -> None:
    assert choose(wanted, candidates) == expected
    assert choose(wanted, iter(candidates)) == expected  # any iterable, read once


def test_choose_picks_from_a_multi_platform_index() -> None:
    # Given a buildx index: two images and their attestation manifests
    index = [
        entry({"os": "linux", "architecture": "amd64"}),
        entry({"os": "linux", "architecture": "arm64", "variant": "v8"}),
        entry({"os": "unknown", "architecture": "unknown"}),
        entry({"os": "unknown", "architecture": "unknown"}),
    ]
    platforms = [from_descriptor(item) for item in index]
    listed = [(i, p) for i, p in enumerate(platforms) if p is not None]

    def pick(text: str) -> int | None:
        found = choose(parse_platform(text), (p for _, p in listed))
        return None if found is None else listed[found][0]

    # Then each request finds its image, whatever alias it was written with
    assert pick("linux/amd64") == 0
    assert pick("linux/aarch64") == 1
    assert pick("linux/arm64/v8") == 1
    assert pick("linux/arm/v7") is None


@pytest.mark.parametrize(
    "entry",
    [
        {"os": "linux", "architecture": "amd64/../x"},
        {"os": "linux\n", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": "v7 "},
    ],
    ids=["slash", "newline", "space"],
)
def test_an_index_entry_no_request_could_name_is_skipped(entry) -> None:
    assert from_descriptor({"platform": entry}) is None
