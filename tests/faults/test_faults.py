"""Fault injection against real processes and real servers: DCU loses nothing.

Each test kills, restarts or starves a real part of a running deployment and then checks
that every task ends where it should, with the reason recorded, and that the archive of
every completed task loads into the real engine with the source image's ID.
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
from pathlib import Path

import nats
import pytest

from tests.e2e.helpers import (
    HAPPY_PATH,
    fetch_object,
    incomplete_uploads,
    load_and_get_id,
    transitions_of_db,
)
from tests.faults.conftest import Cluster, wait_for_event, wait_for_progress
from tests.servers.nats import NatsFactory
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.e2e

HAPPY = HAPPY_PATH


def assert_archive_loads(
    cluster: Cluster, data: dict, image, docker_engine, s3_server, tmp_path: Path
) -> None:
    archive = tmp_path / f"{data['task_id']}.tar.gz"
    fetch_object(s3_server, cluster.config["minio"]["bucket"], data["minio_object_name"], archive)
    assert load_and_get_id(docker_engine, archive, [image.image_id]) == image.image_id


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.part"))


@pytest.mark.parametrize("stage", ["download", "compress", "upload"])
def test_worker_killed_mid_stage_is_redelivered(
    stage, cluster_factory, pushed_images, docker_engine, s3_server, tmp_path
) -> None:
    # Given a deployment whose stages are separate processes (slow gzip, so it can be hit)
    cluster = cluster_factory(
        storage={"compress_level": 3, "compress_threads": 1}, minio={"part_size": 5 * 1024 * 1024}
    ).start_all()
    image = pushed_images["large"]
    with cluster.recorder() as recorder:
        task_id = cluster.run_task(image.reference)
        # When the stage's worker is SIGKILLed as soon as the stage has started
        started = wait_for_event(recorder, task_id, f"{stage}_started")
        if stage == "upload":  # let some parts land, so the kill leaves a multipart upload
            wait_for_progress(recorder, task_id, "upload")
        cluster.processes[stage].kill()
        killed_worker = started["payload"]["worker"]
        completion = {"download": "downloaded", "compress": "compressed", "upload": "uploaded"}
        assert not [e for e in recorder.for_task(task_id) if e["type"] == completion[stage]], (
            "the stage finished before the kill; nothing was injected"
        )
        # and a replacement worker is started
        cluster.restart(stage, kill=False)
        data = cluster.gateway.wait_terminal(task_id, timeout=300)

    # Then the task completed through a redelivery to the new worker
    assert data["state"] == "completed", data
    starts = [
        e["payload"]["worker"] for e in cluster.events(task_id) if e["type"] == f"{stage}_started"
    ]
    assert starts[0] == killed_worker and len(starts) >= 2 and starts[-1] != killed_worker
    kinds = collections.Counter(e["type"] for e in cluster.events(task_id))
    assert kinds["downloaded"] == kinds["compressed"] == kinds["uploaded"] == 1
    assert transitions_of_db(cluster.workdir / "data" / "dcu.db", task_id) == HAPPY
    # the archive loads, and no half-written file or extra object is left
    assert_archive_loads(cluster, data, image, docker_engine, s3_server, tmp_path)
    assert leftovers(cluster.workdir / "data") == []
    assert not (cluster.workdir / "data" / "work" / task_id).exists()
    assert incomplete_uploads(s3_server, cluster.config["minio"]["bucket"]) == []


def test_nats_restart_loses_no_event(
    cluster_factory, pushed_images, nats_factory: NatsFactory
) -> None:
    # Given a deployment on its own NATS server, with tasks in every stage
    server = nats_factory()
    cluster = cluster_factory(bus=server).start_all()
    images = [pushed_images["large"], pushed_images["nested"], pushed_images["small"]]
    with cluster.recorder() as recorder:
        first = cluster.run_task(images[0].reference)
        wait_for_event(recorder, first, "download_started")
        ids = [first] + [cluster.run_task(i.reference) for i in images[1:]]
        time.sleep(0.5)
        # When NATS restarts under them
        server.restart()
    results = {t: cluster.gateway.wait_terminal(t, timeout=300) for t in ids}
    # Then every task completed, and every transition is in the log, in order
    assert {r["state"] for r in results.values()} == {"completed"}, results
    for task_id in ids:
        assert transitions_of_db(cluster.workdir / "data" / "dcu.db", task_id) == HAPPY


def test_s3_outage_within_the_retry_window(cluster_factory, pushed_images, tmp_path) -> None:
    # Given its own S3 server, with short timeouts and a retry window of several seconds
    s3 = S3Server(tmp_path / "s3").start()
    try:
        cluster = cluster_factory(
            s3=s3,
            minio={"connect_timeout": 1, "read_timeout": 1},
            workers={"max_retries": 6, "min_backoff_ms": 500, "max_backoff_ms": 2000},
        ).start_all()
        with cluster.recorder() as recorder:
            task_id = cluster.run_task(pushed_images["nested"].reference)
            wait_for_event(recorder, task_id, "compressed")
            # When S3 stops answering at upload time, and comes back 4 s later
            s3.pause()
            time.sleep(4)
            s3.resume()
            data = cluster.gateway.wait_terminal(task_id, timeout=120)
        # Then the upload was retried and the task completed
        assert data["state"] == "completed", data
        starts = [e for e in cluster.events(task_id) if e["type"] == "upload_started"]
        assert len(starts) >= 2, "the outage did not cause a retry"
    finally:
        s3.stop()


def test_engine_unreachable_fails_and_the_worker_keeps_serving(
    cluster_factory, pushed_images, tmp_path
) -> None:
    cluster = cluster_factory(
        docker={"host": f"unix://{tmp_path}/no-engine.sock"},
        download={"engine": "docker"},
        workers={"max_retries": 1},
    ).start_all()
    first = cluster.run_task(pushed_images["small"].reference)
    second = cluster.run_task(pushed_images["nested"].reference)
    for task_id in (first, second):
        data = cluster.gateway.wait_terminal(task_id, timeout=120)
        assert data["state"] == "failed"
        assert "cannot reach the Docker engine" in data["error_message"]
        assert "no-engine.sock" in data["error_message"] or "retries" in data["error_message"]
    assert cluster.processes["download"].process.alive()


def test_registry_engine_needs_no_docker_daemon(
    cluster_factory, pushed_images, docker_engine, s3_server, tmp_path
) -> None:
    # Given a deployment whose docker.host leads nowhere, on the default (registry) engine
    cluster = cluster_factory(docker={"host": f"unix://{tmp_path}/no-engine.sock"}).start_all()
    image = pushed_images["nested"]
    # When a task runs
    task_id = cluster.run_task(image.reference)
    data = cluster.gateway.wait_terminal(task_id, timeout=120)
    # Then it completes, and the archive loads to the source image's ID
    assert data["state"] == "completed", data
    assert data["engine"] == "registry"
    assert_archive_loads(cluster, data, image, docker_engine, s3_server, tmp_path)


def test_registry_errors_and_timeouts_fail_with_the_cause(
    cluster_factory, pushed_images, tmp_path
) -> None:
    # Given a registry stand-in that answers 500 and one that never answers
    broken = subprocess.Popen(["python3", "-c", BROKEN_REGISTRY], stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(broken.stdout.readline())
        cluster = cluster_factory(
            docker={"pull_timeout": 5},
            download={"read_timeout": 3, "request_attempts": 2},
            workers={"max_retries": 1},
        ).start_all()
        erroring = cluster.run_task(f"127.0.0.1:{ports['error']}/app:1")
        silent = cluster.run_task(f"127.0.0.1:{ports['silent']}/app:1")
        good = cluster.run_task(pushed_images["small"].reference)
        data = cluster.gateway.wait_terminal(erroring, timeout=120)
        assert data["state"] == "failed" and "500" in data["error_message"], data
        data = cluster.gateway.wait_terminal(silent, timeout=120)
        assert data["state"] == "failed", data
        assert (
            "did not answer in time" in data["error_message"]
            or "timeout" in data["error_message"].lower()
        ), data
        # and the same worker still completes the next task
        assert cluster.gateway.wait_terminal(good, timeout=120)["state"] == "completed"
    finally:
        broken.kill()
        broken.wait()
        broken.stdout.close()


# A stand-in for a misbehaving registry (FakeBrokenRegistry): one port answers every
# request with HTTP 500, the other accepts connections and never answers.
BROKEN_REGISTRY = r"""
import http.server, json, socket, threading, time
class Error(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(500); self.end_headers(); self.wfile.write(b"registry broken")
    do_HEAD = do_GET
    def log_message(self, *a): pass
error = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Error)
silent = socket.socket(); silent.bind(("127.0.0.1", 0)); silent.listen(50)
threading.Thread(target=error.serve_forever, daemon=True).start()
print(json.dumps({"error": error.server_port, "silent": silent.getsockname()[1]}), flush=True)
held = []
while True:
    conn, _ = silent.accept(); held.append(conn)
"""


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("engine", ["registry", "docker"])
@pytest.mark.parametrize("where", ["work_path", "gzip_path"])
def test_disk_full_fails_with_a_clear_reason(
    where, engine, cluster_factory, pushed_images, tiny_disk
) -> None:
    # Given the work (or archive) directory on a 40 MB file system, and a 300 MB image
    # (downloaded by either engine: the docker engine's export once hung here under load)
    cluster = cluster_factory(
        storage={where: str(tiny_disk)},
        workers={"max_retries": 1},
        download={"engine": engine},
    ).start_all()
    task_id = cluster.run_task(pushed_images["large"].reference)
    data = cluster.gateway.wait_terminal(task_id, timeout=240)
    # Then the task failed saying so, and the partial files are gone
    assert data["state"] == "failed", data
    message = data["error_message"]
    assert "not enough disk" in message or "disk full" in message, message
    assert str(tiny_disk) in message or "data/" in message or "tiny" in message
    assert leftovers(tiny_disk) == []
    used = sum(p.stat().st_size for p in tiny_disk.rglob("*") if p.is_file())
    assert used < 1_000_000, f"{used} bytes left behind on the small disk"


def test_gateway_and_persistence_restarts_lose_nothing(cluster_factory, pushed_images) -> None:
    cluster = cluster_factory().start_all()
    image = pushed_images["large"]
    with cluster.recorder() as recorder:
        task_id = cluster.run_task(image.reference)
        other = cluster.run_task(pushed_images["nested"].reference)
        wait_for_event(recorder, task_id, "download_started")
        # When the gateway and the persistence process are killed and restarted mid-task
        cluster.processes["persist"].kill()
        cluster.restart("gateway")
        time.sleep(1)
        cluster.restart("persist", kill=False)
    for tid in (task_id, other):
        data = cluster.gateway.wait_terminal(tid, timeout=300)
        assert data["state"] == "completed", data
        assert transitions_of_db(cluster.workdir / "data" / "dcu.db", tid) == HAPPY


def test_stuck_task_is_failed_with_the_reason(cluster_factory, pushed_images) -> None:
    # Given a deployment with one download worker (and no other stage's) and a 2 s
    # progress deadline
    cluster = cluster_factory(workers={"stuck_after": 2, "watchdog_interval": 0.5})
    cluster.start("gateway", name="gateway")
    cluster.start("persist", name="persist")
    worker = cluster.start("download", name="download")
    with cluster.recorder() as recorder:
        task_id = cluster.run_task(pushed_images["large"].reference)
        # When that worker dies mid-download, and no other takes the task over
        wait_for_event(recorder, task_id, "download_started")
        worker.kill()
        assert not [e for e in recorder.for_task(task_id) if e["type"] == "downloaded"], (
            "the download finished before the kill; nothing was injected"
        )
    # Then the watchdog fails the task, saying what it saw in the stream and the database
    data = cluster.gateway.wait_terminal(task_id, timeout=60)
    assert data["state"] == "failed"
    message = data["error_message"]
    assert message.startswith("stuck: no event for "), message
    assert "s in the stream (last: " in message and "and no progress since " in message
    assert "while downloading (workers.stuck_after=2s)" in message
    assert message.endswith("its download workers are gone or stalled")


def test_duplicates_do_not_redo_work(cluster_factory, pushed_images) -> None:
    cluster = cluster_factory().start_all()
    task_id = cluster.run_task(pushed_images["nested"].reference)
    data = cluster.gateway.wait_terminal(task_id)
    assert data["state"] == "completed"
    archive = cluster.workdir / data["gzip_file_name"]
    before = archive.stat().st_mtime_ns
    events = {e["type"]: e for e in cluster.events(task_id)}

    # When the StartTask and a stage's input event are delivered again (new message ids,
    # so JetStream's de-duplication does not hide them)
    async def redeliver() -> None:
        nc = await nats.connect(cluster.nats_url)
        js = nc.jetstream()
        for kind in ("requested", "downloaded", "compressed"):
            event = dict(events[kind])
            event.pop("seq")
            await js.publish(
                f"{cluster.prefix}.task.{task_id}.{kind}",
                json.dumps(event).encode(),
                headers={"Nats-Msg-Id": f"again-{kind}-{time.time()}"},
            )
        await nc.close()

    import asyncio

    asyncio.run(redeliver())
    time.sleep(4)
    # Then no stage ran again and the archive was not touched
    kinds = collections.Counter(e["type"] for e in cluster.events(task_id))
    assert kinds["download_started"] == kinds["compress_started"] == kinds["upload_started"] == 1
    assert archive.stat().st_mtime_ns == before
    _, body = cluster.gateway.get("/query?username=ops&page_size=100")
    assert body["data"]["total"] == 1
    assert cluster.gateway.get(f"/status/{task_id}")[1]["data"]["state"] == "completed"


@pytest.mark.parametrize(("grace", "finishes_itself"), [(60, True), (0.5, False)])
def test_sigterm_finishes_or_hands_back(
    grace, finishes_itself, cluster_factory, pushed_images, docker_engine, s3_server, tmp_path
) -> None:
    # The engine's pull of the large image is what a SIGTERM can reliably land in; the
    # registry engine fetches it in about a second, faster than the signal can be sent.
    cluster = cluster_factory(
        nats={"ack_wait": 30},
        workers={"shutdown_grace": grace},
        download={"engine": "docker"},
    ).start_all()
    image = pushed_images["large"]
    with cluster.recorder() as recorder:
        task_id = cluster.run_task(image.reference)
        started = wait_for_event(recorder, task_id, "download_started")
        # When the download worker gets SIGTERM mid-download
        worker = cluster.processes["download"]
        began = time.monotonic()
        code = worker.terminate(timeout=grace + 30)
        stopped_in = time.monotonic() - began
        assert code == 0
        if not finishes_itself:
            # a replacement takes the handed-back message at once (not after ack_wait=30 s)
            cluster.start("download")
        data = cluster.gateway.wait_terminal(task_id, timeout=240)
    assert data["state"] == "completed", data
    downloads = [
        e["payload"]["worker"] for e in cluster.events(task_id) if e["type"] == "download_started"
    ]
    if finishes_itself:
        assert downloads == [started["payload"]["worker"]]
    else:
        assert stopped_in < 15
        assert len(downloads) == 2 and downloads[1] != downloads[0]
        assert data["duration"] < 25_000, "waited for ack_wait instead of a hand-back"
    assert_archive_loads(cluster, data, image, docker_engine, s3_server, tmp_path)
