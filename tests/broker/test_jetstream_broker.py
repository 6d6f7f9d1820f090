"""The JetStream broker against a real nats-server.

Contract tests (``harness``) run against both the JetStream broker and dramatiq's
StubBroker; the rest exercise what only JetStream has: event bindings, durables shared by
replicas, redelivery, keep-alive, per-publish message ids and reconnects.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from typing import Any

import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed, ConnectionFailed, QueueJoinTimeout
from dramatiq.middleware import CurrentMessage
from nats.js import api

import dramatiq_jetstream.broker as broker_module
from dramatiq_jetstream import JetStreamBroker, durable_name
from tests.broker.conftest import BrokerHarness, JetStreamEnv, Recorder, declare, run, unique
from tests.polling import wait_until
from tests.servers.base import free_port

# -- contract: JetStream broker and StubBroker --------------------------------------------


def test_enqueued_message_runs_actor_with_args_and_is_settled(harness: BrokerHarness) -> None:
    broker = harness.broker()
    queue = unique("q")
    calls = Recorder()

    def record(number, text, *, payload):
        calls.add(number, text, payload)

    actor = declare(broker, record, queue_name=queue, actor_name=unique("a"))
    harness.worker(broker)

    actor.send(7, "seven", payload={"nested": [1, 2.5, None], "ok": True})

    [(_, number, text, payload)] = calls.wait_for(1)
    assert (number, text, payload) == (7, "seven", {"nested": [1, 2.5, None], "ok": True})
    harness.join(broker, queue, timeout=10_000)
    harness.assert_settled(broker, queue)


def test_retries_back_off_and_run_the_actor_again(harness: BrokerHarness) -> None:
    broker = harness.broker()
    queue = unique("q")
    attempts = Recorder()

    def flaky(value):
        attempts.add(value)
        if len(attempts) < 3:
            raise RuntimeError(f"attempt {len(attempts)} fails")

    actor = declare(
        broker,
        flaky,
        queue_name=queue,
        actor_name=unique("a"),
        max_retries=2,
        min_backoff=200,
        max_backoff=400,
    )
    harness.worker(broker)

    actor.send("v")

    calls = attempts.wait_for(3)
    assert [value for _, value in calls] == ["v", "v", "v"]
    times = [at for at, _ in calls]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    harness.join(broker, queue, timeout=10_000)
    time.sleep(0.5)
    assert len(attempts) == 3
    assert harness.dead_letter_errors(broker, queue) == []


def test_message_failing_for_good_is_dead_lettered_once(harness: BrokerHarness) -> None:
    broker = harness.broker()
    queue = unique("q")
    marker = uuid.uuid4().hex
    attempts = Recorder()

    def doomed(value):
        attempts.add(value)
        raise ValueError(f"boom {marker}")

    actor = declare(
        broker,
        doomed,
        queue_name=queue,
        actor_name=unique("a"),
        max_retries=1,
        min_backoff=100,
        max_backoff=200,
    )
    harness.worker(broker)

    actor.send(42)

    attempts.wait_for(2)
    harness.join(broker, queue, timeout=10_000)
    assert harness.dead_letter_errors(broker, queue) == [f"ValueError: boom {marker}"]
    # Then: it is never delivered again, even after the ack wait passed.
    time.sleep(1.5)
    assert len(attempts) == 2
    harness.assert_settled(broker, queue)


def test_join_waits_for_the_queue_to_drain(harness: BrokerHarness) -> None:
    broker = harness.broker()
    queue = unique("q")
    done = Recorder()

    def slow(value):
        time.sleep(0.1)
        done.add(value)

    actor = declare(broker, slow, queue_name=queue, actor_name=unique("a"))
    for value in range(6):
        actor.send(value)
    with pytest.raises(QueueJoinTimeout):
        harness.join(broker, queue, timeout=300)

    harness.worker(broker)
    harness.join(broker, queue, timeout=15_000)

    assert sorted(value for _, value in done.calls) == list(range(6))


def test_flush_drops_pending_messages(harness: BrokerHarness) -> None:
    broker = harness.broker()
    queue = unique("q")
    done = Recorder()

    def record(value):
        done.add(value)

    actor = declare(broker, record, queue_name=queue, actor_name=unique("a"))
    for value in range(5):
        actor.send(value)

    broker.flush(queue)
    harness.worker(broker)
    actor.send("after")

    done.wait_for(1)
    harness.join(broker, queue, timeout=10_000)
    time.sleep(0.5)
    assert [value for _, value in done.calls] == ["after"]


# -- JetStream only --------------------------------------------------------------------------


def test_dead_letter_carries_the_message_and_its_failure(js_env: JetStreamEnv) -> None:
    broker = js_env.broker()
    queue = unique("q")
    declare(broker, lambda: None, queue_name=queue, actor_name="known")
    js_env.worker(broker)
    message: dramatiq.Message[None] = dramatiq.Message(
        queue_name=queue, actor_name="unknown", args=(1, "x"), kwargs={"k": [2]}, options={}
    )

    broker.enqueue(message)

    broker.join(queue, timeout=10_000)
    [dead] = js_env.tool.messages(f"{js_env.prefix}.dead.{queue}")
    document = dead.json()
    assert document["error"].startswith("ActorNotFound")
    assert document["queue_name"] == queue
    assert document["message"]["message_id"] == message.message_id
    assert (document["message"]["args"], document["message"]["kwargs"]) == ([1, "x"], {"k": [2]})
    assert document["nats_subject"] == f"{js_env.prefix}.queue.{queue}"
    assert dead.headers["Nats-Msg-Id"] != message.message_id


def test_bound_event_reaches_actor_as_its_single_dict_argument(
    js_env: JetStreamEnv, caplog: pytest.LogCaptureFixture
) -> None:
    broker = js_env.broker()
    broker.add_middleware(CurrentMessage())
    queue = unique("compress")
    received = Recorder()

    def on_downloaded(*args, **kwargs):
        message = CurrentMessage.get_current_message()
        assert message is not None
        received.add(args, kwargs, message.message_id, message.options.get("nats_subject"))

    broker.bind_events(queue, "on_downloaded", [f"{js_env.prefix}.task.*.downloaded"])
    declare(broker, on_downloaded, queue_name=queue, actor_name="on_downloaded")
    js_env.worker(broker)
    subject = f"{js_env.prefix}.task.t1.downloaded"
    event = {"task_id": "t1", "type": "downloaded", "size": 12, "tags": ["a", "b"]}

    with caplog.at_level(logging.ERROR, logger="dramatiq_jetstream.broker"):
        js_env.tool.publish(subject, b"\x00not json")
        js_env.tool.publish_json(f"{js_env.prefix}.task.t1.uploaded", {"unbound": True})
        js_env.tool.publish_json(subject, event, msg_id="event-1")
        [(_, args, kwargs, message_id, nats_subject)] = received.wait_for(1)

    assert (args, kwargs) == ((event,), {})
    assert (message_id, nats_subject) == ("event-1", subject)
    assert any(
        "undecodable" in r.getMessage() and "not json" in r.getMessage() for r in caplog.records
    )
    broker.join(queue, timeout=10_000)
    time.sleep(0.3)
    assert len(received) == 1
    info = js_env.tool.consumer_info(queue)
    assert info.config.filter_subjects == [
        f"{js_env.prefix}.queue.{queue}",
        f"{js_env.prefix}.task.*.downloaded",
    ]


def test_flush_drops_delayed_messages_but_not_other_subscribers_events(
    js_env: JetStreamEnv,
) -> None:
    broker = js_env.broker()
    pattern = f"{js_env.prefix}.task.*.uploaded"
    flushed, kept = unique("flushed"), unique("kept")
    done = Recorder()
    for queue in (flushed, kept):

        def handle(event, queue=queue):
            done.add(queue, event)

        broker.bind_events(queue, f"handle_{queue}", [pattern])
        declare(broker, handle, queue_name=queue, actor_name=f"handle_{queue}")
    # Given: both durables exist with their bindings, an event and a delayed message wait.
    broker.consume(flushed).close()
    broker.consume(kept).close()
    js_env.tool.publish_json(f"{js_env.prefix}.task.t1.uploaded", "event")
    broker.actors[f"handle_{flushed}"].send_with_options(args=("delayed",), delay=100)

    broker.flush(flushed)
    js_env.worker(broker)

    [(_, queue, event)] = done.wait_for(1)
    assert (queue, event) == (kept, "event")
    broker.join(flushed, timeout=10_000)
    broker.join(kept, timeout=10_000)
    time.sleep(0.5)
    assert len(done) == 1


def test_replicas_sharing_a_queue_split_the_work(js_env: JetStreamEnv) -> None:
    queue = unique("q")
    done = Recorder()
    brokers = [js_env.broker(), js_env.broker()]
    actors = []
    for label, broker in zip(("first", "second"), brokers, strict=True):

        def work(value, label=label):
            time.sleep(0.1)
            done.add(label, value)

        actors.append(declare(broker, work, queue_name=queue, actor_name="work"))
        js_env.worker(broker)

    for value in range(20):
        actors[0].send(value)

    done.wait_for(20)
    brokers[0].join(queue, timeout=10_000)
    time.sleep(0.5)
    assert sorted(value for _, _, value in done.calls) == list(range(20))
    labels = {label for _, label, _ in done.calls}
    assert labels == {"first", "second"}


def test_every_queue_bound_to_an_event_gets_its_own_copy(js_env: JetStreamEnv) -> None:
    broker = js_env.broker()
    pattern = f"{js_env.prefix}.task.*.compressed"
    done = Recorder()
    queues = [unique("upload"), unique("audit")]
    for queue in queues:

        def handle(event, queue=queue):
            done.add(queue, event["n"])

        broker.bind_events(queue, f"handle_{queue}", [pattern])
        declare(broker, handle, queue_name=queue, actor_name=f"handle_{queue}")
    js_env.worker(broker)

    for n in range(5):
        js_env.tool.publish_json(f"{js_env.prefix}.task.t{n}.compressed", {"n": n})

    done.wait_for(10)
    for queue in queues:
        broker.join(queue, timeout=10_000)
    time.sleep(0.3)
    assert sorted(done.calls[i][1:] for i in range(len(done.calls))) == sorted(
        (queue, n) for queue in queues for n in range(5)
    )


def test_message_abandoned_by_a_dead_process_is_redelivered(js_env: JetStreamEnv) -> None:
    queue = unique("q")
    dying = js_env.broker(ack_wait=1.0)
    declare(dying, lambda value: None, queue_name=queue, actor_name="work")
    dying.enqueue(
        dramatiq.Message(
            queue_name=queue, actor_name="work", args=("precious",), kwargs={}, options={}
        )
    )
    consumer = dying.consume(queue, prefetch=1, timeout=1000)
    taken = wait_until(
        lambda: next(consumer),
        until=lambda message: message is not None,
        timeout=10,
        what=f"a message from {queue}",
        interval=0,
    )
    assert taken is not None and taken.args == ("precious",)

    # When: the process dies without acking (its connection and keep-alives just stop).
    # A graceful close() would hand the message back at once; forgetting what it holds
    # first makes the close as silent as a SIGKILL.
    with dying._lock:
        dying._outstanding.clear()
    dying.close()
    abandoned_at = time.monotonic()
    survivor = js_env.broker(ack_wait=1.0)
    done = Recorder()
    declare(survivor, lambda value: done.add(value), queue_name=queue, actor_name="work")
    js_env.worker(survivor)

    [(at, value)] = done.wait_for(1, timeout=10)
    assert value == "precious"
    assert at - abandoned_at >= 0.4
    survivor.join(queue, timeout=10_000)
    time.sleep(0.3)
    assert len(done) == 1


def test_long_work_is_kept_alive_and_not_redelivered(js_env: JetStreamEnv) -> None:
    queue = unique("q")
    started, finished = Recorder(), Recorder()
    brokers = [js_env.broker(ack_wait=1.0), js_env.broker(ack_wait=1.0)]
    actors = []
    for label, broker in zip(("first", "second"), brokers, strict=True):

        def long_work(value, label=label):
            started.add(label, value)
            time.sleep(3.0)
            finished.add(label, value)

        actors.append(declare(broker, long_work, queue_name=queue, actor_name="long_work"))
        js_env.worker(broker)

    actors[0].send("slow")

    finished.wait_for(1, timeout=15)
    brokers[0].join(queue, timeout=10_000)
    time.sleep(1.5)
    assert len(started) == 1 and len(finished) == 1
    info = js_env.tool.consumer_info(queue)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


def _update_stream(js_env: JetStreamEnv, **changes: Any) -> None:
    async def update(js: Any) -> None:
        config = (await js.stream_info(js_env.stream)).config
        await js.update_stream(dataclasses.replace(config, **changes))

    run(js_env.tool._with_js(update))


def test_a_retry_is_a_delayed_nak_that_needs_no_publish(js_env: JetStreamEnv) -> None:
    """Finding 4: a retry that is a second publish can be refused (stream full) after the
    original was acked, and the message is lost. A nak with delay writes nothing."""
    broker = js_env.broker()
    queue = unique("q")
    attempts = Recorder()

    def flaky():
        attempts.add()
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    actor = declare(
        broker, flaky, queue_name=queue, actor_name="flaky", max_retries=2, min_backoff=200
    )
    message = actor.send()
    # Given: a stream that refuses every further message.
    _update_stream(js_env, max_msgs=1, discard=api.DiscardPolicy.NEW)
    js_env.worker(broker)

    calls = attempts.wait_for(3)
    broker.join(queue, timeout=10_000)
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(calls)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    [stored] = js_env.tool.messages()
    assert dramatiq.Message.decode(stored.data).message_id == message.message_id
    info = js_env.tool.consumer_info(queue)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert info.delivered.stream_seq == 1 and info.ack_floor.stream_seq == 1


class _NackRecorder(dramatiq.Middleware):
    def __init__(self) -> None:
        self.nacked = Recorder()

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        self.nacked.add(type(message._exception).__name__, str(message._exception))


def _take_and_abandon(consumer: Any, broker: JetStreamBroker) -> Any:
    """Fetch the next message and forget it, as a SIGKILLed worker would."""
    taken = wait_until(
        lambda: next(consumer),
        until=lambda message: message is not None,
        timeout=15,
        what="the next message",
        interval=0,
    )
    assert taken is not None
    with broker._lock:
        broker._outstanding.clear()
    return taken


def test_a_message_past_max_deliver_is_failed_and_dead_lettered(js_env: JetStreamEnv) -> None:
    """Finding 5: JetStream's own max_deliver drops a message silently; the broker counts
    deliveries and hands the message to middleware and the dead letters instead."""
    queue = unique("q")
    dying = js_env.broker(ack_wait=0.5, max_deliver=2)
    declare(dying, lambda value: None, queue_name=queue, actor_name="work")
    dying.enqueue(
        dramatiq.Message(queue_name=queue, actor_name="work", args=("x",), kwargs={}, options={})
    )
    consumer = dying.consume(queue, prefetch=5, timeout=1000)
    # Given: two workers died holding the message.
    assert _take_and_abandon(consumer, dying).num_delivered == 1
    assert _take_and_abandon(consumer, dying).num_delivered == 2
    consumer.close()
    survivor = js_env.broker(ack_wait=0.5, max_deliver=2)
    nacks = _NackRecorder()
    survivor.add_middleware(nacks)
    ran = Recorder()
    declare(survivor, lambda value: ran.add(value), queue_name=queue, actor_name="work")
    js_env.worker(survivor)

    [(_, kind, reason)] = nacks.nacked.wait_for(1)
    survivor.join(queue, timeout=10_000)
    assert kind == "DeliveriesExceeded" and "max_deliver=2" in reason
    assert len(ran) == 0
    [dead] = js_env.tool.messages(f"{js_env.prefix}.dead.{queue}")
    assert dead.json()["error"].startswith("DeliveriesExceeded: delivered 2 times")
    assert dead.json()["num_delivered"] == 3
    info = js_env.tool.consumer_info(queue)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert info.config.max_deliver == -1


def test_a_refused_dead_letter_is_retried_not_terminated(js_env: JetStreamEnv) -> None:
    """Finding 5: when the dead-letter publish fails the message must not be terminated."""
    broker = js_env.broker(ack_wait=1.0)
    queue = unique("q")
    attempts = Recorder()

    def doomed():
        attempts.add()
        raise ValueError("boom")

    actor = declare(broker, doomed, queue_name=queue, actor_name="doomed", max_retries=0)
    actor.send()
    _update_stream(js_env, max_msgs=1, discard=api.DiscardPolicy.NEW)
    consumer = broker.consume(queue, prefetch=1, timeout=1000)
    proxy = None
    while proxy is None:
        proxy = next(consumer)
    proxy.stuff_exception(ValueError("boom"))

    with pytest.raises(ConnectionClosed):
        consumer.nack(proxy)
    assert js_env.tool.messages(f"{js_env.prefix}.dead.>") == []
    assert js_env.tool.consumer_info(queue).num_ack_pending == 1

    _update_stream(js_env, max_msgs=-1)
    consumer.nack(proxy)
    [dead] = js_env.tool.messages(f"{js_env.prefix}.dead.{queue}")
    assert dead.json()["error"] == "ValueError: boom"
    info = js_env.tool.consumer_info(queue)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    consumer.close()


def test_an_ack_to_a_deleted_durable_is_final_and_logged_once(
    js_env: JetStreamEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 8: "no responders" meant ConnectionClosed and a retry every 5 s, forever."""
    broker = js_env.broker(ack_wait=30.0)
    queue = unique("q")
    actor = declare(broker, lambda: None, queue_name=queue, actor_name="work")
    actor.send()
    actor.send()
    consumer = broker.consume(queue, prefetch=2, timeout=1000)
    taken = []
    while len(taken) < 2:
        if (proxy := next(consumer)) is not None:
            taken.append(proxy)

    async def delete(js: Any) -> None:
        await js.delete_consumer(js_env.stream, durable_name(queue))

    run(js_env.tool._with_js(delete))
    with caplog.at_level(logging.WARNING, logger="dramatiq_jetstream.broker"):
        consumer.ack(taken[0])
        consumer.requeue([taken[1]])

    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and durable_name(queue) in gone[0].getMessage()
    assert broker._outstanding == {}
    consumer.close()


def test_events_bound_from_another_stream_and_queue_messages_both_arrive(
    js_env: JetStreamEnv,
) -> None:
    audit = unique("AUDIT")
    events = f"{js_env.prefix}x"
    run(js_env.tool._with_js(lambda js: js.add_stream(name=audit, subjects=[f"{events}.>"])))
    broker = js_env.broker()
    queue = unique("q")
    received = Recorder()
    broker.bind_events(queue, "handle", [f"{events}.task.*.requested"], stream=audit)
    actor = declare(
        broker, lambda value: received.add(value), queue_name=queue, actor_name="handle"
    )
    js_env.worker(broker)

    js_env.tool.publish_json(f"{events}.task.t1.requested", {"task_id": "t1"})
    actor.send("direct")

    calls = received.wait_for(2)
    assert sorted(str(value) for _, value in calls) == ["direct", "{'task_id': 't1'}"]
    broker.join(queue, timeout=10_000)
    info = run(js_env.tool._with_js(lambda js: js.consumer_info(audit, durable_name(queue))))
    assert info.config.filter_subjects == [f"{events}.task.*.requested"]
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


def test_worker_stop_hands_prefetched_messages_back_at_once(js_env: JetStreamEnv) -> None:
    queue = unique("q")
    stopping = js_env.broker(ack_wait=10.0)
    started = Recorder()

    def slow(value):
        started.add(value)
        time.sleep(0.5)

    actor = declare(stopping, slow, queue_name=queue, actor_name="work")
    for value in range(10):
        actor.send(value)
    worker = js_env.worker(stopping, threads=1)
    started.wait_for(1)

    # When: the worker stops with prefetched messages it never started.
    js_env.stop_worker(worker)
    stopped_at = time.monotonic()
    other = js_env.broker(ack_wait=10.0)
    done = Recorder()
    declare(other, lambda value: done.add(value), queue_name=queue, actor_name="work")
    js_env.worker(other)

    # Then: another replica gets them long before their 10 s ack wait would have run out.
    remaining = 10 - len(started)
    calls = done.wait_for(remaining, timeout=8)
    assert calls[-1][0] - stopped_at < 5
    processed = [value for _, value in started.calls] + [value for _, value in calls]
    assert sorted(processed) == list(range(10))


def test_queue_limit_bounds_messages_in_flight(js_env: JetStreamEnv) -> None:
    broker = js_env.broker()
    queue = unique("q")
    broker.set_queue_limits({queue: 1})
    running, peak, done = [0], [0], Recorder()
    lock = threading.Lock()

    def work(value):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        done.add(value)

    actor = declare(broker, work, queue_name=queue, actor_name="work")
    for value in range(4):
        actor.send(value)
    js_env.worker(broker, threads=3)

    done.wait_for(4)
    assert peak[0] == 1


def test_both_messages_are_processed_across_a_server_restart(js_env: JetStreamEnv) -> None:
    broker = js_env.broker()
    queue = unique("q")
    done = Recorder()
    actor = declare(broker, lambda value: done.add(value), queue_name=queue, actor_name="work")
    js_env.worker(broker)

    actor.send("before")
    done.wait_for(1)
    js_env.server.restart()
    actor.send("after")

    calls = done.wait_for(2, timeout=30)
    assert [value for _, value in calls] == ["before", "after"]
    broker.join(queue, timeout=15_000)


def test_enqueue_during_an_outage_is_stored_once_the_server_is_back(
    js_env: JetStreamEnv,
) -> None:
    broker = js_env.broker()
    queue = unique("q")
    done = Recorder()
    actor = declare(broker, lambda value: done.add(value), queue_name=queue, actor_name="work")
    js_env.worker(broker)
    actor.send("warm-up")
    done.wait_for(1)
    # The ack follows the actor's return; stopping the server before it lands would make
    # the warm-up a legitimate redelivery (at-least-once), which is not what this tests.
    broker.join(queue, timeout=10_000)

    js_env.server.stop()
    sending = threading.Thread(target=actor.send, args=("during",))
    sending.start()
    time.sleep(1.0)
    js_env.server.start()
    sending.join(20)

    assert not sending.is_alive()
    calls = done.wait_for(2, timeout=30)
    assert [value for _, value in calls] == ["warm-up", "during"]
    broker.join(queue, timeout=15_000)
    assert len(js_env.tool.messages(f"{js_env.prefix}.queue.{queue}")) == 2


def test_unreachable_server_or_missing_stream_fails_to_connect(js_env: JetStreamEnv) -> None:
    with pytest.raises(ConnectionFailed):
        JetStreamBroker(url=f"nats://127.0.0.1:{free_port()}", stream=js_env.stream)
    with pytest.raises(ConnectionFailed):
        JetStreamBroker(url=js_env.server.url, stream=unique("missing"))


@pytest.mark.parametrize(
    ("queue_name", "expected"),
    [
        pytest.param("compress", "compress", id="plain"),
        pytest.param("with-dash_and_underscore", "with-dash_and_underscore", id="safe-chars"),
    ],
)
def test_durable_name_keeps_safe_names(queue_name: str, expected: str) -> None:
    assert durable_name(queue_name) == expected


def test_durable_name_sanitises_and_keeps_names_apart() -> None:
    delayed = durable_name("compress.DQ")
    assert delayed.startswith("compress_DQ-")
    assert not any(c in delayed for c in ".*> \t")
    assert delayed != durable_name("compress_DQ")
    assert delayed != durable_name("compress*DQ")


def test_enqueue_raises_connection_closed_when_the_server_stays_away(
    js_env: JetStreamEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "_PUBLISH_DEADLINE", 1.0)
    monkeypatch.setattr(broker_module, "_REQUEST_TIMEOUT", 0.5)
    broker = js_env.broker()
    queue = unique("q")
    actor = declare(broker, lambda: None, queue_name=queue, actor_name="work")
    actor.send()

    js_env.server.stop()

    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        actor.send()
    assert time.monotonic() - started < 5


def test_closing_hands_back_what_it_still_holds(js_env: JetStreamEnv) -> None:
    # Given a message taken by a broker that is then closed gracefully (ack_wait 30 s)
    queue = unique("q")
    leaving = js_env.broker(ack_wait=30.0)
    declare(leaving, lambda value: None, queue_name=queue, actor_name="work")
    leaving.enqueue(
        dramatiq.Message(queue_name=queue, actor_name="work", args=("x",), kwargs={}, options={})
    )
    consumer = leaving.consume(queue, prefetch=1, timeout=1000)
    taken = wait_until(
        lambda: next(consumer),
        until=lambda message: message is not None,
        timeout=10,
        what=f"a message from {queue}",
        interval=0,
    )
    assert taken is not None
    # When it closes without acking
    leaving.close()
    closed_at = time.monotonic()
    # Then another replica gets the message long before ack_wait
    survivor = js_env.broker(ack_wait=30.0)
    done = Recorder()
    declare(survivor, lambda value: done.add(value), queue_name=queue, actor_name="work")
    js_env.worker(survivor)
    [(at, value)] = done.wait_for(1, timeout=10)
    assert value == "x"
    assert at - closed_at < 10
