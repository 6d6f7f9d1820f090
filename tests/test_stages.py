"""Stage functions on real files, with the bus replaced by a recorder (the stages take
their publisher as a plain callable; the broker and NATS are tested in tests/broker)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import pytest

from actors import stages
from dcu.errors import BusError
from dcu.settings import load_settings
from events.schema import Compressed, Downloaded, Event, EventType


class RecordingBus:
    """Stands in for NATS: records published events; refuses ``refuse`` events once."""

    def __init__(self, refuse: EventType | None = None) -> None:
        self.events: list[Event] = []
        self.refuse = refuse

    async def emit(self, event: Event) -> None:
        if event.type is self.refuse:
            self.refuse = None
            raise BusError("stream refused the publish (test)")
        self.events.append(event)

    async def recorded(self, task_id: str, event_type: EventType) -> bool:
        return any(e.task_id == task_id and e.type is event_type for e in self.events)


def _context(tmp_path: Path, bus: RecordingBus) -> stages.StageContext:
    settings = load_settings(
        None,
        storage={"work_path": str(tmp_path / "work"), "gzip_path": str(tmp_path / "gzip")},
    )
    return stages.StageContext(
        settings=settings,
        engine=None,
        store=None,  # type: ignore[arg-type]  # compress never uploads
        emit=bus.emit,
        worker="test",
        recorded=bus.recorded,
    )


def _image_tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        data = b"[]"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


async def test_a_refused_compressed_publish_keeps_the_input_for_the_redelivery(
    tmp_path: Path,
) -> None:
    # Given an engine tar in the task's work directory
    task_id = str(uuid.uuid4())
    bus = RecordingBus(refuse=EventType.COMPRESSED)
    ctx = _context(tmp_path, bus)
    tar = ctx.work_tar(task_id)
    _image_tar(tar)
    event = Event(
        task_id=task_id,
        payload=Downloaded(
            docker_image_name="nginx:latest", image_id="sha256:x", tar_path=str(tar), bytes=1
        ),
    )
    # When the stage's completion cannot be published
    with pytest.raises(BusError):
        await stages.compress(ctx, event)
    # Then its input is still there, so the redelivery completes the stage
    assert tar.exists()
    done = await stages.compress(ctx, event, attempt=2)
    assert done is not None and isinstance(done.payload, Compressed)
    assert not tar.parent.exists()
    assert Path(done.payload.gzip_file_name).exists()
