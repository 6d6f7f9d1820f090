"""What ``dcu submit --wait`` adds over the task it waits for.

    .venv/bin/python bench/submit_overhead.py [--runs 10] [--layer-mb 20] [--json-out FILE]

Starts a registry, moto's S3 server and nats-server on loopback (the tests' launchers),
pushes one image of a single ``--layer-mb`` MB layer (mixed data, gzip) with
``tests.servers.oci`` and runs one ``dcu serve`` (registry engine, ``download.reuse:
false`` so every run packages the image again, auth on with one token).

Each run is one ``dcu submit --wait --json IMAGE`` as a pipeline runs it (its own
process, stdout and stderr on pipes): its wall time from spawn to exit, minus the task's
own ``duration`` from the status it printed (from the gateway's ``requested`` event to
the task's end), is the overhead: the interpreter's start and imports, the POST, the
event stream's latency, the final ``/status`` read(s) and the exit. The start alone is
measured too (``dcu submit --help``, same process start and imports, no request), so the
report splits the overhead into "process start" and "the rest". Prints mean, median and
max of each, and the whole result as JSON.

Exits 1 when a run does not complete.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' launchers

from tests.servers.dcu_process import DCU, DcuProcess
from tests.servers.nats import NatsServer
from tests.servers.oci import PushedOciImage, push_image, write_layer_blob
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

MB = 1_000_000
TOKEN_NAME = "bench"
TOKEN = "bench-submit-" + uuid.uuid4().hex
RUN_TIMEOUT = 600.0


def service_config(nats: NatsServer, s3: S3Server, workdir: Path) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "mode": "release"},
        "auth": {"enabled": True, "tokens": {TOKEN_NAME: TOKEN}},
        "nats": {"url": nats.url},
        "minio": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key,
            "bucket": "dcu-bench-submit",
        },
        "download": {"cache_path": str(workdir / "blob-cache"), "reuse": False},
    }


def push_bench_image(registry: Registry, layer_mb: int, scratch: Path) -> PushedOciImage:
    blob = write_layer_blob(scratch / "layer.tar.gz", {"bench/data.bin": layer_mb * MB}, "gzip")
    try:
        return push_image(registry.url, "bench/submit", "1.0", [blob])
    finally:
        (scratch / "layer.tar.gz").unlink()


def client_env(server: str) -> dict[str, str]:
    # no other DCU_* variable: they would configure nothing here, and DCU_SERVER would
    # break a service started from this environment
    env = {key: value for key, value in os.environ.items() if not key.startswith("DCU_")}
    return {**env, "DCU_SERVER": server, "DCU_TOKEN": TOKEN}


def timed(
    argv: Sequence[str], env: dict[str, str]
) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    return time.perf_counter() - started, done


def one_run(server: str, image: str) -> dict[str, Any]:
    """One ``dcu submit --wait --json``: wall seconds, task seconds, overhead."""
    wall, done = timed([DCU, "submit", "--wait", "--json", image], client_env(server))
    if done.returncode != 0:
        raise RuntimeError(f"dcu submit exited {done.returncode}:\n{done.stderr}")
    status = json.loads(done.stdout)
    task = status["duration"] / 1000
    return {
        "task_id": status["task_id"],
        "wall_s": round(wall, 3),
        "task_s": round(task, 3),
        "overhead_s": round(wall - task, 3),
    }


def start_only(server: str) -> float:
    """Seconds for ``dcu submit --help``: the process start and imports, no request."""
    wall, done = timed([DCU, "submit", "--help"], client_env(server))
    if done.returncode != 0:
        raise RuntimeError(f"dcu submit --help exited {done.returncode}: {done.stderr}")
    return wall


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['runs']} runs of dcu submit --wait, image {report['image_mb']} MB blob")
    print(f"{'seconds':<34}{'mean':>8}{'median':>8}{'max':>8}")
    for label, key in (
        ("task (its status duration)", "task_s"),
        ("command wall time", "wall_s"),
        ("overhead (wall - task)", "overhead_s"),
        ("  process start (submit --help)", "start_s"),
        ("  the rest (overhead - start)", "rest_s"),
    ):
        row = report["summary"][key]
        print(f"{label:<34}{row['mean']:>8.3f}{row['median']:>8.3f}{row['max']:>8.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--layer-mb", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2),
        },
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="dcu-bench-submit-") as tmp:
        root = Path(tmp)
        registry = Registry(root / "registry")
        s3 = S3Server(root / "s3")
        nats = NatsServer(store=root / "nats")
        stops: list[Callable[[], None]] = []
        service: DcuProcess | None = None
        try:
            for server in (registry, s3, nats):
                server.start()
                stops.append(server.stop)
            image = push_bench_image(registry, args.layer_mb, root)
            report["image_mb"] = round(image.blob_bytes / MB, 1)
            workdir = root / "dcu"
            service = DcuProcess(
                workdir, service_config(nats, s3, workdir), ["serve"], name="dcu-submit-bench"
            ).start()
            server_url = f"http://127.0.0.1:{service.port}"
            one_run(server_url, image.reference)  # warm-up: blob cache, bucket, page cache
            runs = []
            starts = []
            for index in range(args.runs):
                starts.append(start_only(server_url))
                runs.append(one_run(server_url, image.reference))
                print(f"run {index + 1}: {runs[-1]}", flush=True)
        finally:
            if service is not None:
                service.stop()
            for stop in reversed(stops):
                stop()
            shutil.rmtree(root / "dcu", ignore_errors=True)
    overheads = [run["overhead_s"] for run in runs]
    start_mean = statistics.fmean(starts)
    report["details"] = runs
    report["summary"] = {
        "task_s": summary([run["task_s"] for run in runs]),
        "wall_s": summary([run["wall_s"] for run in runs]),
        "overhead_s": summary(overheads),
        "start_s": summary(starts),
        "rest_s": summary([value - start_mean for value in overheads]),
    }
    print(json.dumps(report, indent=2))
    print_report(report)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
