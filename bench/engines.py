"""A/B benchmark in one run: the seed's pipeline against DCU's registry and docker engines.

    .venv/bin/python bench/engines.py [--size medium|large|both]
        [--variants seed,registry,docker] [--seed 1] [--blob-cache DIR] [--json-out FILE]

Starts a private dockerd, a registry, moto's S3 server and nats-server on loopback (the
tests' launchers), builds images of realistic content (``bench.content``: real ELF
binaries and text files from ``/usr``, generated logs, random assets; deterministic from
``--seed``) in Python and pushes them with ``tests.servers.oci`` (no ``docker build``):
"medium" is about 200 MB in 4 layers, "large" about 1.6 GB in 4 layers. Layer blobs are
gzip level 6 (zlib, as ``docker push`` writes them near enough); ``--blob-cache`` keeps
them between runs.

Then, for each image, in the same run:

* **seed**: ``docker pull``, ``docker save | gzip -6 > file`` (two processes and a pipe),
  ``fput_object`` with miniopy-async (what the original Go design did with minio-go);
  the image is removed from the engine before and after so every run pulls.
* **registry** / **docker**: a fresh ``dcu serve`` with ``download.engine`` set, a cold
  blob cache (``download.cache_path`` in a new directory) and ``download.reuse: false``;
  one ``POST /start``, ``/status`` polled until the task ends, the stage seconds read
  from its events (``GET /events/<task_id>``). The object is then fetched, ``docker
  load``ed, and its image ID and tag compared with the source.

Peak RSS (sum over a process and its descendants, sampled every 50 ms) is recorded for
the ``dcu`` process tree (overall and per task state) and for dockerd's (with containerd)
as the growth over its idle size. Prints a table per image and the whole result as JSON.

Stage names differ: the seed's ``pull`` / ``save+gzip`` / ``upload`` against DCU's
``download`` / ``compress`` / ``upload``. With the docker engine, DCU's download includes
the export the seed does in ``save``; compare totals first, stages second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' launchers

from miniopy_async.api import Minio

from bench.content import image_layers, layer_bytes
from tests.e2e.helpers import fetch_object
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine, docker_cli_binary
from tests.servers.nats import NatsServer
from tests.servers.oci import LayerBlob, PushedOciImage, push_image, write_layer_blob
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

SIZES = {"medium": 200_000_000, "large": 1_600_000_000}
VARIANTS = ("seed", "registry", "docker")
DCU_BUCKET = "dcu-bench"
SEED_BUCKET = "seed-bench"
MB = 1_000_000
CONTENT_VERSION = 2
"""Part of ``--blob-cache`` directory names: bump it when ``bench.content`` changes."""


# --- memory sampling ------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 when it is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class RssSampler:
    """Samples process trees every ``interval`` seconds in a thread; peaks per tree,
    overall and per ``state`` (set by the caller while it polls the task)."""

    def __init__(self, trees: dict[str, int], interval: float = 0.05) -> None:
        self.trees = trees
        self.interval = interval
        self.state = "idle"
        self.baseline = {name: tree_rss(pid) for name, pid in trees.items()}
        self.peak = dict(self.baseline)
        self.peak_by_state: dict[str, dict[str, int]] = {name: {} for name in trees}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            state = self.state
            for name, pid in self.trees.items():
                rss = tree_rss(pid)
                self.peak[name] = max(self.peak[name], rss)
                by_state = self.peak_by_state[name]
                by_state[state] = max(by_state.get(state, 0), rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- images ---------------------------------------------------------------------------


@dataclass
class BenchImage:
    name: str
    pushed: PushedOciImage
    tar_bytes: int
    """Sum of the uncompressed layer tars (what ``docker save`` roughly writes)."""
    build_seconds: float

    @property
    def reference(self) -> str:
        return self.pushed.reference

    def summary(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "image_id": self.pushed.image_id,
            "layers": len(self.pushed.layer_digests),
            "tar_mb": round(self.tar_bytes / MB, 1),
            "blob_mb": round(self.pushed.blob_bytes / MB, 1),
            "blob_ratio": round(self.pushed.blob_bytes / self.tar_bytes, 3),
            "layer_blob_mb": [round(size / MB, 1) for size in self.pushed.layer_sizes],
            "build_seconds": round(self.build_seconds, 1),
        }


def _cached_blobs(directory: Path) -> tuple[list[LayerBlob], int] | None:
    meta = directory / "layers.json"
    if not meta.exists():
        return None
    document = json.loads(meta.read_text())
    blobs = [LayerBlob(**{**entry, "path": Path(entry["path"])}) for entry in document["blobs"]]
    if not all(b.path is not None and b.path.stat().st_size == b.size for b in blobs):
        return None
    return blobs, int(document["tar_bytes"])


def layer_blobs(size_name: str, seed: int, directory: Path) -> tuple[list[LayerBlob], int]:
    """The gzip layer blobs of one bench image, from ``directory`` if made before."""
    cached = _cached_blobs(directory)
    if cached is not None:
        print(f"[{size_name}] reusing layer blobs from {directory}", flush=True)
        return cached
    directory.mkdir(parents=True, exist_ok=True)
    layers = image_layers(SIZES[size_name], seed)
    sizes = [layer_bytes(files) for files in layers]
    print(
        f"[{size_name}] compressing {len(layers)} layers of "
        f"{', '.join(f'{s / MB:.0f}' for s in sizes)} MB (gzip -6)",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=2) as pool:  # zlib releases the GIL
        futures = [
            pool.submit(write_layer_blob, directory / f"layer{index}.tar.gz", files, "gzip")
            for index, files in enumerate(layers)
        ]
        blobs = [future.result() for future in futures]
    tar_bytes = sum(sizes)
    document = {
        "blobs": [{**asdict(blob), "data": None, "path": str(blob.path)} for blob in blobs],
        "tar_bytes": tar_bytes,
    }
    (directory / "layers.json").write_text(json.dumps(document, indent=2))
    return blobs, tar_bytes


def build_image(registry: Registry, size_name: str, seed: int, cache: Path) -> BenchImage:
    started = time.monotonic()
    directory = cache / f"{size_name}-seed{seed}-v{CONTENT_VERSION}"
    blobs, tar_bytes = layer_blobs(size_name, seed, directory)
    pushed = push_image(registry.url, f"bench/{size_name}", f"seed{seed}", blobs)
    return BenchImage(size_name, pushed, tar_bytes, time.monotonic() - started)


# --- the seed pipeline ----------------------------------------------------------------


async def _s3_upload(s3: S3Server, bucket: str, name: str, path: Path) -> float:
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
    try:
        if not await client.bucket_exists(bucket):
            await client.make_bucket(bucket)
        started = time.monotonic()
        await client.fput_object(bucket, name, str(path))
        seconds = time.monotonic() - started
        await client.remove_object(bucket, name)  # moto keeps objects in memory
        return seconds
    finally:
        await client.close_session()  # type: ignore[no-untyped-call]


async def _s3_remove(s3: S3Server, bucket: str, name: str) -> None:
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
    try:
        await client.remove_object(bucket, name)
    finally:
        await client.close_session()  # type: ignore[no-untyped-call]


def save_gzip(engine: DockerEngine, reference: str, dest: Path) -> None:
    """``docker save <ref> | gzip -6 > dest`` as two processes joined by a pipe."""
    with dest.open("wb") as out:
        save = subprocess.Popen(
            [docker_cli_binary(), "save", reference],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=engine.env,
        )
        assert save.stdout is not None
        try:
            gzip = subprocess.Popen(
                ["gzip", "-6", "-c"], stdin=save.stdout, stdout=out, stderr=subprocess.PIPE
            )
        finally:
            save.stdout.close()  # gzip holds the read end; save gets SIGPIPE if gzip dies
        _, gzip_err = gzip.communicate()
        save_code = save.wait()
    if save_code != 0 or gzip.returncode != 0:
        raise RuntimeError(
            f"docker save | gzip failed: save={save_code} gzip={gzip.returncode} {gzip_err!r}"
        )


def run_seed(
    engine: DockerEngine,
    s3: S3Server,
    image: BenchImage,
    work: Path,
    sampler_trees: dict[str, int],
) -> dict[str, Any]:
    reference = image.reference
    engine.forget(reference)
    archive = work / f"seed-{image.name}.tar.gz"
    stages: dict[str, float] = {}
    with RssSampler(sampler_trees) as sampler:
        sampler.state = "pull"
        started = time.monotonic()
        engine.docker("pull", "--quiet", reference, timeout=3600)
        stages["download"] = time.monotonic() - started
        sampler.state = "save+gzip"
        started = time.monotonic()
        save_gzip(engine, reference, archive)
        stages["compress"] = time.monotonic() - started
        sampler.state = "upload"
        stages["upload"] = asyncio.run(
            _s3_upload(s3, SEED_BUCKET, f"seed/{image.name}.tar.gz", archive)
        )
    archive_bytes = archive.stat().st_size
    archive.unlink()
    engine.forget(reference)
    return {
        "stages": {k: round(v, 2) for k, v in stages.items()},
        "total_seconds": round(sum(stages.values()), 2),
        "archive_mb": round(archive_bytes / MB, 1),
        **_memory(sampler),
    }


# --- DCU ------------------------------------------------------------------------------


def _memory(sampler: RssSampler) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in sampler.trees:
        if name == "dockerd":
            found["dockerd_growth_mb"] = round(
                (sampler.peak[name] - sampler.baseline[name]) / MB, 1
            )
            continue
        found[f"{name}_peak_rss_mb"] = round(sampler.peak[name] / MB, 1)
        found[f"{name}_peak_rss_mb_by_state"] = {
            state: round(rss / MB, 1) for state, rss in sampler.peak_by_state[name].items()
        }
    return found


def dcu_config(
    engine_name: str, engine: DockerEngine, s3: S3Server, nats: NatsServer, workdir: Path
) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "mode": "release"},
        "nats": {"url": nats.url},
        "minio": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key,
            "bucket": DCU_BUCKET,
        },
        "docker": {"host": engine.host},
        "download": {
            "engine": engine_name,
            "cache_path": str(workdir / "blob-cache"),
            "reuse": False,
        },
    }


def wait_task(
    service: DcuProcess, task_id: str, sampler: RssSampler, timeout: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll ``/status`` until the task ends; returns its data and seconds per state."""
    deadline = time.monotonic() + timeout
    state_started = time.monotonic()
    state = "idle"
    seconds: dict[str, float] = {}
    while time.monotonic() < deadline:
        status, body = service.get(f"/status/{task_id}")
        if status != 200:
            raise RuntimeError(f"status of {task_id}: {status} {body}")
        data = body["data"]
        now = time.monotonic()
        if data["state"] != state:
            seconds[state] = seconds.get(state, 0.0) + now - state_started
            state, state_started = data["state"], now
            sampler.state = state
        if state in {"completed", "failed"}:
            return data, {k: round(v, 2) for k, v in seconds.items()}
        time.sleep(0.1)
    raise RuntimeError(f"task {task_id} not finished in {timeout:.0f}s:\n{service.log}")


def task_events(service: DcuProcess, task_id: str) -> dict[str, dict[str, Any]]:
    status, body = service.get(f"/events/{task_id}?include_progress=false")
    if status != 200:
        raise RuntimeError(f"events of {task_id}: {status} {body}")
    return {event["type"]: event["payload"] for event in body["data"]["events"]}


def verify_archive(engine: DockerEngine, archive: Path, image: BenchImage) -> dict[str, Any]:
    """``docker load`` the archive; the image ID and tag must be the source's."""
    engine.forget(image.reference)
    out = engine.docker("load", "-i", str(archive), timeout=3600).stdout
    loaded = re.findall(r"Loaded image: (\S+)", out)
    loaded_id = engine.docker(
        "image", "inspect", "--format", "{{.Id}}", image.reference, check=False
    ).stdout.strip()
    engine.forget(image.reference)
    return {
        "same_image_id": loaded_id == image.pushed.image_id,
        "same_tag": image.reference in loaded,
        "loaded": loaded,
    }


def run_dcu(
    engine_name: str,
    engine: DockerEngine,
    s3: S3Server,
    nats: NatsServer,
    image: BenchImage,
    work: Path,
    sampler_trees: dict[str, int],
) -> dict[str, Any]:
    workdir = work / f"dcu-{engine_name}-{image.name}"
    shutil.rmtree(workdir, ignore_errors=True)
    config = dcu_config(engine_name, engine, s3, nats, workdir)
    service = DcuProcess(workdir, config, ["serve"], name=f"dcu-{engine_name}").start()
    try:
        engine.forget(image.reference)
        assert service.process is not None
        trees = {"dcu": service.process.pid, **sampler_trees}
        with RssSampler(trees) as sampler:
            started = time.monotonic()
            status, body = service.post(
                "/start", {"username": "bench", "docker_image_name": image.reference}
            )
            if status not in {200, 201, 202}:
                raise RuntimeError(f"POST /start: {status} {body}")
            task_id = body["data"]["task_id"]
            data, state_seconds = wait_task(service, task_id, sampler, timeout=3600)
            wall = time.monotonic() - started
        if data["state"] != "completed":
            raise RuntimeError(f"task {task_id} {data['state']}: {data.get('error_message')}")
        events = task_events(service, task_id)
        archive = work / f"dcu-{engine_name}-{image.name}.tar.gz"
        fetch_object(s3, DCU_BUCKET, data["minio_object_name"], archive)
        archive_bytes = archive.stat().st_size
        verified = verify_archive(engine, archive, image)
        archive.unlink()
        asyncio.run(_s3_remove(s3, DCU_BUCKET, data["minio_object_name"]))
        downloaded = events.get("downloaded", {})
        compressed = events.get("compressed", {})
        stages = {
            "download": downloaded.get("seconds"),
            "compress": compressed.get("seconds"),
            "upload": events.get("uploaded", {}).get("seconds"),
        }
        return {
            "stages": stages,
            "total_seconds": round(wall, 2),
            "stage_sum_seconds": round(sum(v or 0 for v in stages.values()), 2),
            "seconds_by_state": state_seconds,
            "archive_mb": round(archive_bytes / MB, 1),
            "engine": downloaded.get("engine"),
            "compress_method": compressed.get("method"),
            "fetched_mb": _mb(downloaded.get("fetched_bytes")),
            "spliced_mb": _mb(compressed.get("spliced_bytes")),
            "tar_mb": _mb(compressed.get("bytes_in")),
            **_memory(sampler),
            "verify": verified,
        }
    except Exception as exc:
        tail = service.log.read_text(errors="replace")[-3000:] if service.log.exists() else ""
        raise RuntimeError(f"{exc}\n--- {service.name} log ---\n{tail}") from exc
    finally:
        service.stop()
        engine.forget(image.reference)
        shutil.rmtree(workdir, ignore_errors=True)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


# --- report ---------------------------------------------------------------------------


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """DCU / seed per stage and in total (below 1: DCU is faster)."""
    seed = results.get("seed")
    if seed is None or "error" in seed:
        return {}
    found: dict[str, dict[str, float | None]] = {}
    for variant, result in results.items():
        if variant == "seed" or "error" in result:
            continue
        row: dict[str, float | None] = {}
        for stage, seed_seconds in seed["stages"].items():
            value = result["stages"].get(stage)
            row[stage] = round(value / seed_seconds, 3) if value and seed_seconds else None
        row["total"] = round(result["total_seconds"] / seed["total_seconds"], 3)
        row["archive_size"] = round(result["archive_mb"] / seed["archive_mb"], 3)
        found[variant] = row
    return found


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return text.rjust(width)


def print_table(name: str, image: dict[str, Any], results: dict[str, Any]) -> None:
    print(
        f"\n== {name}: {image['reference']}  tar {image['tar_mb']} MB, blobs "
        f"{image['blob_mb']} MB ({image['layers']} layers)"
    )
    columns = [
        ("variant", 9),
        ("download", 9),
        ("compress", 9),
        ("upload", 8),
        ("total s", 8),
        ("archive", 8),
        ("rss MB", 8),
        ("dockerd+", 9),
        ("x seed", 7),
        ("ok", 4),
    ]
    print(" ".join(title.rjust(width) for title, width in columns))
    table_ratios = ratios(results)
    for variant, result in results.items():
        if "error" in result:
            print(f"{variant:>9} ERROR {result['error']}")
            continue
        verify = result.get("verify")
        values = [
            variant,
            result["stages"].get("download"),
            result["stages"].get("compress"),
            result["stages"].get("upload"),
            result["total_seconds"],
            result["archive_mb"],
            result.get("dcu_peak_rss_mb"),
            result.get("dockerd_growth_mb"),
            table_ratios.get(variant, {}).get("total"),
            None if verify is None else verify["same_image_id"] and verify["same_tag"],
        ]
        print(" ".join(_cell(v, w) for v, (_, w) in zip(values, columns, strict=True)))
    print("seed stages: download = docker pull, compress = docker save | gzip -6")


# --- main -----------------------------------------------------------------------------


def _variants(text: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"variants are {','.join(VARIANTS)}, not {unknown}")
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["medium", "large", "both"], default="medium")
    parser.add_argument("--variants", type=_variants, default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--blob-cache", type=Path, help="keep generated layer blobs here")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    sizes = ["medium", "large"] if args.size == "both" else [args.size]
    report: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version(),
        },
        "variants": args.variants,
        "images": {},
    }
    with tempfile.TemporaryDirectory(prefix="dcu-bench-") as tmp:
        root = Path(tmp)
        cache = args.blob_cache or root / "blobs"
        engine = DockerEngine(root / "dockerd")
        registry = Registry(root / "registry")
        s3 = S3Server(root / "s3")
        nats = NatsServer(store=root / "nats")
        stops: list[Callable[[], None]] = []
        try:
            for server in (engine, registry, s3, nats):
                server.start()
                stops.append(server.stop)
            assert engine.process is not None
            docker_tree = {"dockerd": engine.process.pid}
            for size_name in sizes:
                image = build_image(registry, size_name, args.seed, cache)
                print(f"[{size_name}] pushed {image.reference}: {image.summary()}", flush=True)
                results: dict[str, Any] = {}
                for variant in args.variants:
                    print(f"[{size_name}] running {variant} ...", flush=True)
                    try:
                        if variant == "seed":
                            results[variant] = run_seed(engine, s3, image, root, docker_tree)
                        else:
                            results[variant] = run_dcu(
                                variant, engine, s3, nats, image, root, docker_tree
                            )
                    except Exception as exc:  # report the others even if one variant fails
                        results[variant] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                    print(f"[{size_name}] {variant}: {json.dumps(results[variant])}", flush=True)
                report["images"][size_name] = {
                    "image": image.summary(),
                    "results": results,
                    "ratios_dcu_over_seed": ratios(results),
                }
                print_table(size_name, image.summary(), results)
        finally:
            for stop in reversed(stops):
                stop()
    print(json.dumps(report, indent=2))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
