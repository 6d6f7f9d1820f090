from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from events import naming
from events.reference import InvalidReference, parse_reference

TASK = "550e8400-e29b-41d4-a716-446655440000"


@pytest.mark.parametrize(
    ("text", "registry", "path", "tag", "digest", "pinned"),
    [
        ("nginx", None, "nginx", None, None, "nginx:latest"),
        ("nginx:latest", None, "nginx", "latest", None, "nginx:latest"),
        ("library/nginx:1.25", None, "library/nginx", "1.25", None, "library/nginx:1.25"),
        (
            "127.0.0.1:5000/team/sub/app:v1.2.3-rc.1",
            "127.0.0.1:5000",
            "team/sub/app",
            "v1.2.3-rc.1",
            None,
            "127.0.0.1:5000/team/sub/app:v1.2.3-rc.1",
        ),
        (
            "registry.example.com/a@sha256:" + "a" * 64,
            "registry.example.com",
            "a",
            None,
            "sha256:" + "a" * 64,
            "registry.example.com/a@sha256:" + "a" * 64,
        ),
        (
            "localhost:5000/x_y.z__w:T_1",
            "localhost:5000",
            "x_y.z__w",
            "T_1",
            None,
            "localhost:5000/x_y.z__w:T_1",
        ),
    ],
)
def test_valid_references(text, registry, path, tag, digest, pinned) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.path, ref.tag, ref.digest) == (registry, path, tag, digest)
    assert ref.pinned == pinned
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param(42, "must be a string", id="not-a-string"),
        pytest.param(None, "must be a string", id="null"),
        pytest.param("../etc/passwd", "not a valid image reference", id="dotdot"),
        pytest.param("nginx;rm -rf /", "not allowed", id="semicolon"),
        pytest.param("nginx latest", "not allowed", id="space"),
        pytest.param("nginx\n", "not allowed", id="newline"),
        pytest.param("ngin\x00x", "not allowed", id="nul"),
        pytest.param("x" * 10_000, "characters long", id="10k"),
        pytest.param("Nginx", "lowercase", id="uppercase"),
        pytest.param("nginx:lat$est", "not allowed", id="dollar"),
        pytest.param("ng\u0456nx", "not allowed", id="cyrillic-i-lookalike"),
        pytest.param("nginx:" + "a" * 129, "not a valid image reference", id="long-tag"),
        pytest.param("a" * 256, "longer than 255", id="long-name"),
        pytest.param("nginx@sha256:abc", "not a valid image reference", id="short-digest"),
        pytest.param("$(reboot)", "not allowed", id="command-substitution"),
        pytest.param("/nginx", "not a valid image reference", id="leading-slash"),
    ],
)
def test_hostile_references_are_refused_with_a_reason(text, fragment) -> None:
    with pytest.raises(InvalidReference, match=None) as info:
        parse_reference(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("nginx:latest", "nginx_latest.tar.gz"),
        (
            "127.0.0.1:5000/team/sub/app:v1.2.3-rc.1",
            "127.0.0.1_5000_team_sub_app_v1.2.3-rc.1.tar.gz",
        ),
        ("a@sha256:" + "b" * 64, "a_sha256_" + "b" * 64 + ".tar.gz"),
    ],
)
def test_archive_file_names(reference: str, expected: str) -> None:
    assert naming.archive_file_name(reference) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        "../../etc/passwd",
        "..",
        ".",
        "",
        "/abs/path",
        "a/../../b",
        "\x00",
        "x" * 5000,
        ".hidden",
        "a;rm -rf /",
        "名字:标签",
    ],
)
def test_archive_names_never_escape_their_directory(hostile: str, tmp_path: Path) -> None:
    name = naming.archive_file_name(hostile)
    assert "/" not in name and not name.startswith(".")
    assert len(name.encode()) <= 255
    target = Path(naming.archive_path(str(tmp_path), TASK, hostile))
    assert naming.inside(tmp_path, target)
    assert target.parent.name == TASK


def test_long_names_stay_distinct() -> None:
    a = naming.archive_file_name("r/" + "a" * 300 + ":1")
    b = naming.archive_file_name("r/" + "a" * 300 + ":2")
    assert a != b


def test_archive_path_keeps_the_configured_form() -> None:
    assert (
        naming.archive_path("./data/gzip", TASK, "nginx:latest")
        == f"./data/gzip/{TASK}/nginx_latest.tar.gz"
    )


@pytest.mark.parametrize("bad", ["../x", "not-a-uuid", "", "*", f"{TASK}/.."])
def test_task_ids_must_be_uuids(bad: str) -> None:
    with pytest.raises(naming.UnsafeName):
        naming.check_task_id(bad)


def test_object_name_sanitises_the_prefix() -> None:
    task = str(uuid.uuid4())
    assert naming.object_name("dcu/", task, "nginx:latest") == f"dcu/{task}/nginx_latest.tar.gz"
    assert naming.object_name("../x/./", task, "nginx") == f"x/{task}/nginx.tar.gz"
    assert naming.object_name("", task, "nginx") == f"{task}/nginx.tar.gz"


def test_inside_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    assert not naming.inside(root, root / "link" / "file")
    assert naming.inside(root, root / "file")
