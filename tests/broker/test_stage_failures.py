"""The stages' failure path on a real nats-server: a task's ``failed`` event is part of
giving a message up, retried until it is stored, and only then is the message
dead-lettered (issue 8, finding 5)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import dramatiq
import dramatiq.worker
import pytest
from dramatiq.middleware import AsyncIO, CurrentMessage

from actors.pipeline import FailTaskWhenGivenUp
from dramatiq_jetstream import Retries
from events.schema import Event, EventType, once_per_task_id
from kernel.errors import BusError, PermanentFailure
from kernel.settings import Settings, StorageSettings
from tests.broker.conftest import JetStreamEnv, Recorder, declare, unique


class FlakyPublisherRuntime:
    """Stands in for the stage runtime: records published events, refusing the first
    ``refusals`` publishes the way a full or leaderless stream would (BusError)."""

    def __init__(self, settings: Settings, refusals: int) -> None:
        self.settings = settings
        self.published = Recorder()
        self._refusals = refusals
        self._lock = threading.Lock()

    async def recorded(self, task_id: str, event_type: EventType) -> bool:
        return any(e.task_id == task_id and e.type is event_type for _, e in self.published.calls)

    async def publish(self, event: Event) -> None:
        with self._lock:
            if self._refusals > 0:
                self._refusals -= 1
                raise BusError("cannot publish failed: stream is full")
        self.published.add(event)


@pytest.fixture(autouse=True)
def quick_post_process_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    # dramatiq retries a nack that raised ConnectionClosed after 5 s; the test only needs
    # to see that it does, not to wait.
    monkeypatch.setattr(dramatiq.worker, "POST_PROCESS_MESSAGE_RETRY_DELAY_SECS", 0.1)


def test_failed_is_retried_until_stored_before_the_message_is_dead_lettered(
    js_env: JetStreamEnv, tmp_path: Path
) -> None:
    settings = Settings(storage=StorageSettings(work_path=str(tmp_path / "work")))
    runtime: Any = FlakyPublisherRuntime(settings, refusals=2)
    broker = js_env.broker(
        middleware=[AsyncIO(), CurrentMessage(), FailTaskWhenGivenUp(runtime), Retries()]
    )
    queue = unique("download")

    def download(event: dict[str, Any]) -> None:
        raise PermanentFailure("image not found: nope:latest")

    broker.bind_events(queue, "download", [f"{js_env.prefix}.task.*.requested"])
    declare(broker, download, queue_name=queue, actor_name="download", throws=(PermanentFailure,))
    js_env.worker(broker)
    task_id = str(uuid.uuid4())

    js_env.tool.publish_json(f"{js_env.prefix}.task.{task_id}.requested", {"task_id": task_id})

    [(_, event)] = runtime.published.wait_for(1)
    broker.join(queue, timeout=10_000)
    assert event.task_id == task_id and event.type is EventType.FAILED
    assert event.event_id == once_per_task_id(task_id, EventType.FAILED)
    assert event.payload.reason == f"{queue} failed: image not found: nope:latest"
    [dead] = js_env.tool.messages(f"{js_env.prefix}.dead.{queue}")
    assert dead.json()["error"] == "PermanentFailure: image not found: nope:latest"
    info = js_env.tool.consumer_info(queue)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    js_env.close()
    assert len(runtime.published) == 1


def test_a_message_whose_workers_keep_dying_fails_its_task(
    js_env: JetStreamEnv, tmp_path: Path
) -> None:
    settings = Settings(storage=StorageSettings(work_path=str(tmp_path / "work")))
    runtime: Any = FlakyPublisherRuntime(settings, refusals=0)
    queue = unique("compress")
    subject_filter = f"{js_env.prefix}.task.*.downloaded"
    task_id = str(uuid.uuid4())
    # Given: the message was delivered max_deliver times and never settled.
    dying = js_env.broker(ack_wait=0.5, max_deliver=1)
    dying.bind_events(queue, "compress", [subject_filter])
    declare(dying, lambda event: None, queue_name=queue, actor_name="compress")
    consumer = dying.consume(queue, prefetch=1, timeout=1000)
    js_env.tool.publish_json(f"{js_env.prefix}.task.{task_id}.downloaded", {"task_id": task_id})
    taken = None
    while taken is None:
        taken = next(consumer)
    with dying._lock:
        dying._outstanding.clear()
    consumer.close()
    survivor = js_env.broker(
        ack_wait=0.5,
        max_deliver=1,
        middleware=[AsyncIO(), CurrentMessage(), FailTaskWhenGivenUp(runtime), Retries()],
    )
    survivor.bind_events(queue, "compress", [subject_filter])
    ran = Recorder()
    declare(survivor, ran.add, queue_name=queue, actor_name="compress")
    js_env.worker(survivor)

    [(_, event)] = runtime.published.wait_for(1)
    survivor.join(queue, timeout=10_000)
    assert event.task_id == task_id and event.payload.stage == queue
    assert "max_deliver=1" in event.payload.reason and "retries" not in event.payload.reason
    assert len(ran) == 0
    assert len(js_env.tool.messages(f"{js_env.prefix}.dead.{queue}")) == 1
