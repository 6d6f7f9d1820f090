"""Event codec benchmark: how many task events a second the pydantic models encode and decode.

    .venv/bin/python bench/event_codec.py [-n 50000] [--repeat 5]

Builds two typical events (a ``downloaded`` fact of the registry engine and a
``progress`` report), then times, on one core, each way an event crosses the wire:
``encode()`` (model to bytes), ``Event.decode`` (bytes to a validated event: what the
persistence subscriber and the gateway do), ``Event.from_dict`` (the dict the dramatiq
broker already parsed to a validated event: what the stage actors do) and building the
event in Python (validation included). Each figure is the best of ``--repeat`` runs of
``-n`` events, alternating the two kinds; it prints events/s and microseconds an event.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from events.schema import Downloaded, Event, Progress

TASK = "550e8400-e29b-41d4-a716-446655440000"
T0 = datetime(2026, 11, 27, 19, 40, 21, 123456, tzinfo=UTC)


def downloaded_payload() -> Downloaded:
    return Downloaded(
        docker_image_name="registry.example.com/team/app:1.4.2",
        image_id="sha256:" + "a" * 64,
        tar_path="./data/work/550e8400-e29b-41d4-a716-446655440000/plan.json",
        bytes=191_234_048,
        seconds=4.217,
        engine="registry",
        layout="blobs",
        manifest_digest="sha256:" + "b" * 64,
        platform="linux/amd64",
        fetched_bytes=120_000_000,
        cached_bytes=71_234_048,
    )


def progress_payload() -> Progress:
    return Progress(stage="download", bytes_done=96_000_000, bytes_total=191_234_048, rate=2.4e7)


def samples() -> list[Event]:
    return [
        Event(task_id=TASK, payload=downloaded_payload(), time=T0),
        Event(task_id=TASK, payload=progress_payload(), time=T0),
    ]


def best_rate(n: int, repeat: int, run: Callable[[int], None]) -> float:
    """Events a second of the fastest of ``repeat`` runs of ``run(n)``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - started)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000, help="events a run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    events = samples()
    raws = [event.encode() for event in events]
    dicts: list[dict[str, Any]] = [json.loads(raw) for raw in raws]
    for event, raw, data in zip(events, raws, dicts, strict=True):
        assert Event.decode(raw) == event == Event.from_dict(data)  # a faithful round trip

    def encode(n: int) -> None:
        for i in range(n):
            events[i & 1].encode()

    def decode(n: int) -> None:
        for i in range(n):
            Event.decode(raws[i & 1])

    def from_dict(n: int) -> None:
        for i in range(n):
            Event.from_dict(dicts[i & 1])

    def build(n: int) -> None:
        for i in range(n):
            payload = downloaded_payload() if i & 1 else progress_payload()
            Event(task_id=TASK, payload=payload, time=T0)

    variants: list[tuple[str, Callable[[int], None]]] = [
        ("encode (event -> bytes)", encode),
        ("decode (bytes -> event)", decode),
        ("from_dict (parsed dict -> event)", from_dict),
        ("build (payload + event in Python)", build),
    ]
    print(
        f"{args.n} events a run (downloaded {len(raws[0])} B, progress {len(raws[1])} B), "
        f"best of {args.repeat}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"{'operation':36} {'events/s':>10} {'us/event':>9}")
    for name, run in variants:
        rate = best_rate(args.n, args.repeat, run)
        print(f"{name:36} {rate:10,.0f} {1e6 / rate:9.1f}")


if __name__ == "__main__":
    main()
