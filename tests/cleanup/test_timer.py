"""The cleanup timer against a real nats-server, driven by a fake clock (no waiting)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest

from actors.timer import CleanupTimer
from tests.cleanup.conftest import Bus, FakeClock
from tests.polling import eventually

# 2026-01-03 is a Saturday: 30 s later both the daily (gzip) and the weekly (objects,
# Sundays) schedules tick.
START = datetime(2026, 1, 3, 23, 59, 30, tzinfo=UTC)
TICK = datetime(2026, 1, 4, tzinfo=UTC)


async def stored(bus: Bus) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """Every message in the test's stream: (subject, headers, JSON body)."""
    nc = await nats.connect(bus.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(bus.settings.audit_stream)
        found: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        if not info.state.messages:
            return found
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(bus.settings.audit_stream, seq)
            found.append((str(msg.subject), dict(msg.headers or {}), json.loads(msg.data or b"")))
        return found
    finally:
        await nc.close()


async def run_until_parked(timers: list[tuple[CleanupTimer, FakeClock]], loops: int) -> None:
    """Run the timers until ``loops`` schedule loops wait beyond the clock's horizon."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(timer.run(stop)) for timer, _ in timers]

    def parked() -> int:
        for task in tasks:
            if task.done():
                task.result()  # a timer that died: show why
        return sum(clock.parked for _, clock in timers)

    try:
        await eventually(
            parked,
            until=lambda count: count >= loops,
            timeout=20,
            what=f"{loops} schedule loops parked past the horizon",
            interval=0.01,
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_two_timers_put_each_tick_on_the_bus_once(
    event_bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.timer")
    # Given two timer replicas whose clocks both reach Sunday midnight
    settings = event_bus.dcu_settings()
    timers = []
    for name in ("replica-a", "replica-b"):
        clock = FakeClock(now=START, horizon=TICK + timedelta(hours=1))
        timers.append(
            (
                CleanupTimer(settings, clock=clock, sleep=clock.sleep, name=name),
                clock,
            )
        )

    # When both publish that tick for both kinds
    await run_until_parked(timers, loops=4)

    # Then the stream holds exactly one request per kind
    messages = await stored(event_bus)
    prefix = event_bus.prefix
    assert sorted(subject for subject, _, _ in messages) == [
        f"{prefix}.cleanup.gzip.requested",
        f"{prefix}.cleanup.objects.requested",
    ]
    for subject, headers, body in messages:
        kind = subject.split(".")[2]
        assert headers["Nats-Msg-Id"] == f"cleanup-{kind}-2026-01-04T00:00:00.000000Z"
        assert body["kind"] == kind and body["type"] == "requested"
        assert body["payload"]["reason"] == "schedule"
        assert body["payload"]["scheduled_for"] == "2026-01-04T00:00:00.000000Z"
        assert body["payload"]["requested_by"] in {"replica-a", "replica-b"}
    # because the second replica's copy of each was recognised as a duplicate
    duplicates = [r for r in caplog.records if "already published" in r.getMessage()]
    assert len(duplicates) == 2
    # and neither timer waited for real: every sleep went to the fake clock
    for _, clock in timers:
        assert clock.sleeps[0] == 30


async def test_a_tick_noticed_too_late_is_skipped_not_replayed(event_bus: Bus) -> None:
    # Given a host that oversleeps by five minutes (suspended, say)
    clock = FakeClock(now=START, horizon=TICK + timedelta(hours=1), overshoot=300)
    timer = CleanupTimer(event_bus.dcu_settings(), clock=clock, sleep=clock.sleep)

    # When the timer wakes up well past the tick
    await run_until_parked([(timer, clock)], loops=2)

    # Then nothing was published for it
    assert await stored(event_bus) == []


async def test_the_next_tick_follows_the_cron_expression(event_bus: Bus) -> None:
    settings = event_bus.dcu_settings(
        cleanup_gzip_cron="*/10 * * * *", cleanup_minio_cron="0 0 1 1 *"
    )
    clock = FakeClock(now=START, horizon=START + timedelta(minutes=25))
    timer = CleanupTimer(settings, clock=clock, sleep=clock.sleep)

    await run_until_parked([(timer, clock)], loops=2)

    ticks = [body["payload"]["scheduled_for"] for _, _, body in await stored(event_bus)]
    assert ticks == [
        "2026-01-04T00:00:00.000000Z",
        "2026-01-04T00:10:00.000000Z",
        "2026-01-04T00:20:00.000000Z",
    ]
    # long waits are cut into slices so a changed wall clock is noticed
    assert max(clock.sleeps) <= 60


@pytest.mark.parametrize(
    ("field", "key"),
    [
        pytest.param("cleanup_gzip_cron", "storage.cleanup_gzip_cron", id="gzip"),
        pytest.param("cleanup_minio_cron", "storage.cleanup_minio_cron", id="minio"),
    ],
)
def test_an_invalid_schedule_is_refused_naming_its_key(field: str, key: str) -> None:
    # The settings refuse it (for every role, not only the timer), naming the key once
    from pydantic import ValidationError

    from kernel.settings import Settings, describe_error

    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"storage": {field: "0 25 * * *"}})
    assert describe_error(caught.value).startswith(f"{key}: invalid cron expression '0 25 * * *'")
