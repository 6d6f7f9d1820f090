"""The plain-Python cleanup domain: expiry, cron ticks, names, event round trips."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from events import naming, subjects
from events.cleanup import (
    CleanupCompleted,
    CleanupEvent,
    CleanupEventType,
    CleanupKind,
    CleanupRequested,
    CleanupResult,
    Reason,
    admin_request,
    check_cron,
    completion_id,
    is_dcu_object,
    is_task_id,
    next_tick,
    object_prefix,
    parse_kind,
    scheduled_request,
    select_expired,
    tick_msg_id,
)
from events.formats import ArchiveFormat
from events.schema import DecodeError

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TASK = "0b6f3c5e-3a8d-4a43-9c8e-5d0f2b7a9e11"


@dataclass(frozen=True)
class Item:
    name: str
    last_modified: datetime


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


class TestSelectExpired:
    def test_picks_only_what_is_older_than_the_retention(self) -> None:
        items = [
            Item("old", ago(days=2)),
            Item("edge", ago(days=1)),  # exactly the retention: not older, kept
            Item("young", ago(hours=23)),
            Item("older", ago(days=30)),
        ]
        assert [i.name for i in select_expired(items, NOW, 1)] == ["old", "older"]

    def test_zero_retention_expires_everything_before_now(self) -> None:
        items = [Item("past", ago(seconds=1)), Item("now", NOW), Item("future", ago(days=-1))]
        assert [i.name for i in select_expired(items, NOW, 0)] == ["past"]

    def test_fractional_days_and_other_time_zones(self) -> None:
        tz = datetime(2026, 3, 10, 20, 0).astimezone().tzinfo
        items = [Item("a", ago(hours=13).astimezone(tz)), Item("b", ago(hours=11))]
        assert [i.name for i in select_expired(items, NOW, 0.5)] == ["a"]

    @pytest.mark.parametrize(
        ("now", "items", "retention"),
        [
            pytest.param(NOW.replace(tzinfo=None), [], 1, id="naive-now"),
            pytest.param(NOW, [Item("x", datetime(2020, 1, 1))], 1, id="naive-item"),
            pytest.param(NOW, [], -1, id="negative-retention"),
        ],
    )
    def test_refuses_ambiguous_input(self, now, items, retention) -> None:
        with pytest.raises(ValueError):
            select_expired(items, now, retention)


class TestNextTick:
    @pytest.mark.parametrize(
        ("cron", "after", "expected"),
        [
            pytest.param("0 0 * * *", NOW, datetime(2026, 3, 11, tzinfo=UTC), id="daily"),
            pytest.param(
                "0 0 * * *",
                datetime(2026, 3, 11, tzinfo=UTC),
                datetime(2026, 3, 12, tzinfo=UTC),
                id="strictly-after-a-tick",
            ),
            # 2026-03-10 is a Tuesday: the next Sunday is the 15th.
            pytest.param("0 0 * * 0", NOW, datetime(2026, 3, 15, tzinfo=UTC), id="weekly"),
            pytest.param("*/15 * * * *", NOW, NOW + timedelta(minutes=15), id="quarter-hour"),
            pytest.param("@daily", NOW, datetime(2026, 3, 11, tzinfo=UTC), id="alias"),
        ],
    )
    def test_ticks_in_utc(self, cron: str, after: datetime, expected: datetime) -> None:
        tick = next_tick(cron, after)
        assert tick == expected
        assert tick.utcoffset() == timedelta(0)

    def test_another_zone_is_converted_to_utc_first(self) -> None:
        after = NOW.astimezone(datetime(2026, 1, 1).astimezone().tzinfo)
        assert next_tick("0 0 * * *", after) == datetime(2026, 3, 11, tzinfo=UTC)

    @pytest.mark.parametrize(
        "cron",
        [
            pytest.param("", id="empty"),
            pytest.param("every day", id="words"),
            pytest.param("61 0 * * *", id="out-of-range"),
            pytest.param("0 0 * *", id="four-fields"),
            pytest.param("0 0 0 * * * *", id="seven-fields"),
            pytest.param("0 0 31 2 *", id="never-fires"),
        ],
    )
    def test_invalid_expressions_name_the_key(self, cron: str) -> None:
        with pytest.raises(ValueError, match=r"storage\.cleanup_gzip_cron: invalid cron"):
            check_cron(cron, "storage.cleanup_gzip_cron")

    def test_check_cron_accepts_the_seed_defaults(self) -> None:
        assert check_cron(" 0 0 * * 0 ", "k") == "0 0 * * 0"
        assert check_cron("0 0 * * *", "k") == "0 0 * * *"

    def test_naive_after_is_refused(self) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            next_tick("0 0 * * *", NOW.replace(tzinfo=None))

    def test_next_tick_names_the_key_too(self) -> None:
        with pytest.raises(ValueError, match=r"^my\.key: invalid cron expression 'x y z'"):
            next_tick("x y z", NOW, key="my.key")


class TestNames:
    def test_task_ids_are_canonical_uuids_only(self) -> None:
        assert is_task_id(TASK)
        assert not is_task_id(TASK.upper())
        assert not is_task_id(TASK.replace("-", ""))
        assert not is_task_id("{" + TASK + "}")
        assert not is_task_id("notes")
        assert not is_task_id("")

    @pytest.mark.parametrize("fmt", list(ArchiveFormat))
    @pytest.mark.parametrize("prefix", ["dcu/", "dcu", "/dcu//", "a/b/", "", "./"])
    def test_object_prefix_matches_how_objects_are_named(
        self, prefix: str, fmt: ArchiveFormat
    ) -> None:
        name = naming.object_name(prefix, TASK, "nginx:latest", fmt)
        assert name.endswith(f"/nginx_latest{fmt.suffix}")
        assert name.startswith(object_prefix(prefix))
        assert is_dcu_object(name, prefix)

    @pytest.mark.parametrize("prefix", ["dcu/", "", "a/b"])
    def test_reuse_pointers_are_dcu_objects(self, prefix: str) -> None:
        assert is_dcu_object(naming.reuse_pointer_name(prefix, "0f" * 32), prefix)

    @pytest.mark.parametrize(
        "name",
        [
            f"dcu/{TASK}/x.zip",
            f"dcu/{TASK}/x.tar.zst",
            f"dcu/{TASK}/.x.tar.gz",
            f"dcu/{TASK}/sub/x.tar.gz",
            f"dcu/{TASK.upper()}/x.tar.gz",
            "dcu/notes.tar.gz",
            f"other/{TASK}/x.tar.gz",
            f"dcuX/{TASK}/x.tar.gz",
            "dcu/reuse/" + "a" * 63 + ".json",
            "dcu/reuse/" + "A" * 64 + ".json",
            "dcu/reuse/" + "a" * 64 + ".txt",
            "dcu/reuse/sub/" + "a" * 64 + ".json",
        ],
    )
    def test_foreign_keys_are_not_dcu_objects(self, name: str) -> None:
        assert not is_dcu_object(name, "dcu/")

    def test_kinds_and_subjects(self) -> None:
        assert parse_kind("objects") is CleanupKind.OBJECTS
        with pytest.raises(ValueError, match="expected one of: gzip, objects"):
            parse_kind("minio")
        with pytest.raises(ValueError, match="expected one of"):
            parse_kind(["gzip"])
        assert subjects.cleanup(CleanupKind.GZIP, CleanupEventType.REQUESTED, "x") == (
            "x.cleanup.gzip.requested"
        )
        assert (
            subjects.every_cleanup_kind(CleanupEventType.COMPLETED, "x") == "x.cleanup.*.completed"
        )
        assert subjects.all_cleanup("x") == "x.cleanup.>"


class TestEvents:
    def test_scheduled_request_round_trip(self) -> None:
        tick = datetime(2026, 3, 11, tzinfo=UTC)
        event = scheduled_request(CleanupKind.GZIP, tick, "host:1:timer", now=NOW)
        wire = json.loads(event.encode())
        assert wire == {
            "event_id": event.event_id,
            "kind": "gzip",
            "type": "requested",
            "schema_version": 1,
            "time": "2026-03-10T12:00:00.000000Z",
            "payload": {
                "reason": "schedule",
                "requested_by": "host:1:timer",
                "scheduled_for": "2026-03-11T00:00:00.000000Z",
            },
        }
        assert CleanupEvent.decode(event.encode()) == event
        assert event.msg_id == "cleanup-gzip-2026-03-11T00:00:00.000000Z"
        assert event.msg_id == tick_msg_id(CleanupKind.GZIP, tick)
        assert subjects.for_cleanup(event, "p") == "p.cleanup.gzip.requested"

    def test_replicas_build_the_same_ids_for_one_tick(self) -> None:
        tick = datetime(2026, 3, 11, tzinfo=UTC)
        a = scheduled_request(CleanupKind.OBJECTS, tick, "a")
        b = scheduled_request(CleanupKind.OBJECTS, tick, "b")
        other = scheduled_request(CleanupKind.GZIP, tick, "a")
        assert (a.event_id, a.msg_id) == (b.event_id, b.msg_id)
        assert a.event_id != other.event_id and a.msg_id != other.msg_id

    def test_admin_request_has_no_tick_and_its_own_id(self) -> None:
        event = admin_request(CleanupKind.OBJECTS, "ops")
        assert event.msg_id == event.event_id
        wire = json.loads(event.encode())
        assert wire["payload"] == {"reason": "admin", "requested_by": "ops"}
        decoded = CleanupEvent.decode(event.encode())
        assert decoded == event
        assert isinstance(decoded.payload, CleanupRequested)
        assert decoded.payload.reason is Reason.ADMIN

    def test_completed_round_trip_and_stable_id(self) -> None:
        result = CleanupResult(kind=CleanupKind.GZIP)
        result.removed(10)
        result.removed(5)
        result.kept = 2
        result.error("x/y.tar.gz: Permission denied")
        result.seconds = 0.12345
        event = result.completed("req-1")
        assert event.event_id == completion_id("req-1") == result.completed("req-1").event_id
        assert json.loads(event.encode())["payload"] == {
            "request_id": "req-1",
            "deleted": 2,
            "bytes_freed": 15,
            "kept": 2,
            "errors": ["x/y.tar.gz: Permission denied"],
            "seconds": 0.123,
        }
        decoded = CleanupEvent.decode(event.encode())
        assert decoded == event
        assert isinstance(decoded.payload, CleanupCompleted)

    def test_errors_are_short_and_capped(self) -> None:
        result = CleanupResult(kind=CleanupKind.OBJECTS)
        for n in range(25):
            result.error(f"{n}: " + "x" * 500)
        errors = result.completed("r").payload.to_dict()["errors"]
        assert len(errors) == 21
        assert errors[-1] == "… and 5 more"
        assert all(len(e) <= 200 for e in errors)

    def test_decoding_ignores_unknown_fields(self) -> None:
        raw = json.dumps(
            {
                "event_id": "e",
                "kind": "objects",
                "type": "completed",
                "time": "2026-03-10T12:00:00Z",
                "future": 1,
                "payload": {"request_id": "r", "deleted": 1, "bytes_freed": 2, "new": "x"},
            }
        ).encode()
        event = CleanupEvent.decode(raw)
        assert event.payload == CleanupCompleted(request_id="r", deleted=1, bytes_freed=2, kept=0)

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b"not json", id="not-json"),
            pytest.param(b"[]", id="not-object"),
            pytest.param(
                b'{"event_id":"e","kind":"tmp","type":"requested","time":"2026-01-01T00:00:00Z",'
                b'"payload":{"reason":"admin"}}',
                id="unknown-kind",
            ),
            pytest.param(
                b'{"event_id":"e","kind":"gzip","type":"requested","time":"2026-01-01T00:00:00Z",'
                b'"payload":{"reason":"whim"}}',
                id="unknown-reason",
            ),
            pytest.param(
                b'{"event_id":"e","kind":"gzip","type":"completed","time":"2026-01-01T00:00:00Z",'
                b'"payload":{"request_id":"r","deleted":1,"bytes_freed":1,"errors":"x"}}',
                id="errors-not-a-list",
            ),
            pytest.param(
                b'{"event_id":"e","kind":"gzip","type":"requested","time":"yesterday",'
                b'"payload":{"reason":"admin"}}',
                id="bad-time",
            ),
        ],
    )
    def test_decode_errors_keep_the_raw_bytes(self, raw: bytes) -> None:
        with pytest.raises(DecodeError) as caught:
            CleanupEvent.decode(raw)
        assert caught.value.raw == raw
