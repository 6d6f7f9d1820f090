"""End-to-end timing: one task for a ~200 MB image through a real ``dcu serve``.

    .venv/bin/python bench/pipeline.py [--size-mb 200]

Starts a private dockerd, a registry, moto's S3 server and nats-server on loopback (the
same launchers the tests use), pushes a ``FROM scratch`` image of mixed data in four
layers, runs ``dcu serve`` pointed at all of them, starts one task and prints the task
time, the stage times from its events, the archive size and the compress throughput.
Then it downloads the object, ``docker load``s it and compares the image ID.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' server launchers

from tests.e2e.helpers import fetch_object, load_and_get_id, stream_events
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.images import build_and_push
from tests.servers.nats import NatsServer
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcu-bench-") as tmp:
        root = Path(tmp)
        engine = DockerEngine(root / "dockerd").start()
        registry = Registry(root / "registry")
        s3 = S3Server(root / "s3")
        nats = NatsServer(store=root / "nats")
        service: DcuProcess | None = None
        try:
            registry.start()
            s3.start()
            nats.start()
            per_layer = args.size_mb * 1_000_000 // 4
            image = build_and_push(
                engine,
                registry,
                "bench/app",
                "1.0",
                [{f"layer{i}/data.bin": per_layer} for i in range(4)],
            )
            config = {
                "server": {"host": "127.0.0.1", "mode": "release"},
                "nats": {"url": nats.url},
                "minio": {
                    "endpoint": s3.endpoint,
                    "access_key": s3.access_key,
                    "secret_key": s3.secret_key,
                    "bucket": "dcu-bench",
                },
                "docker": {"host": engine.host},
            }
            service = DcuProcess(root / "service", config, ["serve"], name="bench").start()
            started = time.monotonic()
            _, body = service.post(
                "/start", {"username": "bench", "docker_image_name": image.reference}
            )
            data = service.wait_terminal(body["data"]["task_id"], timeout=900)
            wall = time.monotonic() - started
            assert data["state"] == "completed", data
            events = {e["type"]: e for e in stream_events(nats.url, "DCU", "dcu.task.>")}
            compressed = events["compressed"]["payload"]
            archive = root / "archive.tar.gz"
            fetch_object(s3, "dcu-bench", data["minio_object_name"], archive)
            loaded = load_and_get_id(engine, archive, [image.image_id])
            print(
                json.dumps(
                    {
                        "image_bytes": image.size_bytes,
                        "tar_bytes": compressed["bytes_in"],
                        "archive_bytes": compressed["bytes_out"],
                        "task_seconds_wall": round(wall, 2),
                        "task_duration_ms": data["duration"],
                        "download_seconds": events["downloaded"]["payload"]["seconds"],
                        "compress_seconds": compressed["seconds"],
                        "compress_mb_per_s": round(
                            compressed["bytes_in"] / 1e6 / compressed["seconds"], 1
                        ),
                        "upload_seconds": events["uploaded"]["payload"]["seconds"],
                        "docker_load_same_id": loaded == image.image_id,
                    },
                    indent=2,
                )
            )
        finally:
            if service is not None:
                service.stop()
            nats.stop()
            s3.stop()
            registry.stop()
            engine.stop()


if __name__ == "__main__":
    main()
