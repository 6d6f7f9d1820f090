"""``GET /download/{task_id}``: a completed task's archive, without S3 credentials.

With S3 (or MinIO) the answer is a ``307`` to a URL presigned for
``minio.download_url_expiry`` seconds (the envelope's ``data`` names it too); with the
local directory store the gateway streams the file itself, ``Range`` requests included
(aiohttp's ``FileResponse``). Either way ``X-Checksum-Sha256`` carries the archive's
recorded sha256, so a client can check what it got. Reads are protected as every read
is (``auth.protect_reads``). An unknown task is a ``404``, a task that has not completed
(or failed) a ``409``, an archive the cleanup has already removed a ``404`` saying so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path, PurePosixPath

from aiohttp import web

from actors.object_store import ObjectStore, open_store
from events.states import TaskState
from gateway import envelope, models
from gateway.http import parse_path, respond
from gateway.keys import API, REPOSITORY, SETTINGS
from kernel.errors import Conflict, NotFound

log = logging.getLogger(__name__)

STORE = web.AppKey("store", ObjectStore)  # where the archives were uploaded
CHECKSUM_HEADER = "X-Checksum-Sha256"


async def locate(request: web.Request) -> tuple[Path | models.DownloadLink, dict[str, str]]:
    """Where the archive of the request's task is: the local file, or a presigned link;
    with the headers its answer carries. Raises NotFound, Conflict, StorageError,
    DatabaseError."""
    task_id = parse_path(request, models.TaskPath).task_id
    repository = request.app[REPOSITORY]
    try:
        task = await repository.get(task_id)
    except NotFound:
        raise NotFound(f"task {task_id} not found") from None
    state = TaskState(task.state)
    if state is not TaskState.COMPLETED or not task.minio_object_name:
        raise Conflict(
            f"task {task_id} is {state.value}; its archive can be downloaded once it is "
            f"{TaskState.COMPLETED.value}"
        )
    name = task.minio_object_name
    store = request.app[STORE]
    info = await store.stat(name)
    if info is None:
        retention = request.app[SETTINGS].storage.minio_retention_days
        raise NotFound(
            f"the archive of task {task_id} ({name}) no longer exists: the cleanup removes "
            f"objects after {retention:g} days"
        )
    sha256 = info.metadata.get("dcu-sha256")
    if not sha256:  # an object uploaded without it: the task's record
        detail = await repository.get_detail(task_id)
        sha256 = detail.archive_sha256 if detail else None
    headers = {CHECKSUM_HEADER: sha256} if sha256 else {}
    expiry = request.app[SETTINGS].minio.download_url_expiry
    where = await store.locate(name, timedelta(seconds=expiry))
    file_name = PurePosixPath(name).name
    if isinstance(where, Path):
        log.info("task %s: streaming %s", task_id, name)
        headers["Content-Disposition"] = f'attachment; filename="{file_name}"'
        return where, headers
    log.info("task %s: download link for %s, valid %gs", task_id, name, expiry)
    link = models.DownloadLink(
        url=where, file_name=file_name, bytes=info.size, sha256=sha256, expires_in=expiry
    )
    return link, headers


async def download(request: web.Request) -> web.StreamResponse:
    """The file (``Range`` too), or a ``307`` to the presigned link. Raises as ``locate``."""
    where, headers = await locate(request)
    if isinstance(where, Path):
        return web.FileResponse(where, headers=headers)
    response = respond(envelope.ok(where, "redirect to the archive", status=307))
    response.headers["Location"] = where.url
    response.headers.update(headers)
    return response


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE] = open_store(app[SETTINGS].minio)
    yield
    await app[STORE].close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_store_ctx)
    app.router.add_get(f"{API}/download/{{task_id}}", download)
