"""Task events for tests, as the stages would publish them, with strictly increasing,
deterministic times: what the persistence suite applies to a repository and the gateway
tier records as rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from events.schema import (
    Compressed,
    CompressStarted,
    Downloaded,
    DownloadStarted,
    Event,
    Failed,
    Payload,
    Progress,
    Requested,
    Uploaded,
    UploadStarted,
)

T0 = datetime(2026, 11, 27, 19, 40, 21, 123456, tzinfo=UTC)


class Timeline:
    """Builds a task's events with strictly increasing, deterministic times."""

    def __init__(self, task_id: str | None = None, start: datetime = T0) -> None:
        self.task_id = task_id or str(uuid.uuid4())
        self.now = start

    def event(self, payload: Payload, *, after: timedelta = timedelta(seconds=1.5)) -> Event:
        self.now += after
        return Event(task_id=self.task_id, payload=payload, time=self.now)

    def requested(
        self, image: str = "nginx:latest", user: str = "test_user", platform: str | None = None
    ) -> Event:
        return Event(
            task_id=self.task_id,
            payload=Requested(username=user, docker_image_name=image, platform=platform),
            time=self.now,
        )

    def happy_path(self, image: str = "nginx:latest", user: str = "test_user") -> list[Event]:
        safe = image.replace(":", "_").replace("/", "_")
        return [
            self.requested(image, user),
            self.event(DownloadStarted(worker="w1")),
            self.event(
                Downloaded(
                    docker_image_name=image, image_id="sha256:abc", tar_path="/t.tar", bytes=1000
                )
            ),
            self.event(CompressStarted(worker="w2")),
            self.event(
                Compressed(
                    docker_image_name=image,
                    image_id="sha256:abc",
                    gzip_file_name=f"./data/gzip/{safe}.tar.gz",
                    bytes_in=1000,
                    bytes_out=400,
                    sha256="f" * 64,
                )
            ),
            self.event(UploadStarted(worker="w3")),
            self.event(
                Uploaded(
                    bucket="dcu-artifacts",
                    minio_object_name=f"dcu/{safe}.tar.gz",
                    bytes=400,
                    sha256="f" * 64,
                )
            ),
        ]

    def failed(
        self, reason: str = "pull failed: manifest unknown", stage: str = "download"
    ) -> Event:
        return self.event(Failed(stage=stage, reason=reason))

    def progress(self, done: int, total: int | None = 1000, stage: str = "download") -> Event:
        return self.event(
            Progress(stage=stage, bytes_done=done, bytes_total=total, rate=12.5),
            after=timedelta(milliseconds=100),
        )
