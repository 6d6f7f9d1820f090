"""Archive formats and bundles in one run, against the seed's ``docker-archive+gzip``.

    .venv/bin/python bench/formats.py [--size medium|large] [--seed 1]
        [--blob-cache DIR] [--json-out FILE]

Starts a private dockerd, a registry, moto's S3 server and nats-server on loopback (the
tests' launchers), builds and pushes the ``bench.engines`` image of ``--size`` (realistic
content from ``bench.content``; ``--blob-cache`` keeps its layer blobs between runs) and
runs one fresh ``dcu serve`` (``download.engine: registry``, ``download.reuse: false``)
for everything below.

**Formats.** One ``POST /start`` per archive format: ``docker-archive+gzip`` (the seed's
``.tar.gz``, the baseline), ``docker-archive`` (``.tar``) and ``oci-archive``
(``.oci.tar``). The blob cache is shared by the service's tasks, so a first, unmeasured
``docker-archive+gzip`` task fetches the blobs from the registry (shown as the ``cold``
row) and every measured task then reads them from the cache (``download_bytes_cached``
in ``/status``; the ``cached`` column). Per format: the archive's size, the compress
stage's seconds (its ``compressed`` event), the seconds from ``POST`` to ``completed``
(``/status`` polled every 0.1 s), and each as a ratio to ``docker-archive+gzip``. The
object is fetched from S3: the docker formats are ``docker load``ed and their image ID
and tag compared with the source. Docker 20.10 cannot load an ``oci-archive``; for it the
tar's ``index.json`` must name a manifest that lists the pushed config and layers, and
the tar must hold those blobs. The bench image has Docker media types, whose manifest the
service stores renamed to OCI types (another digest), so one more ``oci-archive`` task
packages the same blobs pushed with OCI media types (the ``OCI push`` row): there
``index.json`` must name the pushed manifest digest and hold the manifest byte for byte.

**Bundle.** Two more images are pushed that share the image's first two (base) layer
blobs and add one small layer each. Each of the three is packaged alone and then all
three as one ``POST /bundle``, all ``docker-archive+gzip``; every archive is
``docker load``ed and checked. Prints the singles' total, the bundle, what the bundle
saved, the ``shared_bytes`` the service reports, and checks ``bundle <= singles - base
layers``.

Exits 1 when a task fails, a field is missing or a check does not hold (the report says
which); the whole result is printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' launchers

from bench.engines import (
    CONTENT_VERSION,
    DCU_BUCKET,
    MB,
    BenchImage,
    RssSampler,
    _cell,
    _s3_remove,
    build_image,
    dcu_config,
    layer_blobs,
    task_events,
    verify_archive,
    wait_task,
)
from events.formats import ArchiveFormat
from tests.e2e.helpers import fetch_object
from tests.servers.dcu_process import DcuProcess
from tests.servers.docker_engine import DockerEngine
from tests.servers.nats import NatsServer
from tests.servers.oci import (
    OCI_MANIFEST,
    LayerBlob,
    LayerFiles,
    PushedOciImage,
    layer_blob,
    push_image,
)
from tests.servers.registry import Registry
from tests.servers.s3 import S3Server

BASELINE = ArchiveFormat.DOCKER_GZIP
FORMATS = (ArchiveFormat.DOCKER_GZIP, ArchiveFormat.DOCKER, ArchiveFormat.OCI)
SHARED_LAYERS = 2
"""The bundle's extra images share this many of the bench image's first layers."""
OWN_LAYER_BYTES = 4 * MB
COLD = "(cold) docker-archive+gzip"
OCI_PUSH = "oci-archive, OCI push"
TASK_TIMEOUT = 3600.0


class TaskFailed(RuntimeError):
    """A task ended ``failed`` (or could not be started); says what the service said."""


@dataclass
class TaskRun:
    """One finished task: its ``/status`` data, events, the fetched object and timings."""

    label: str
    task_id: str
    data: dict[str, Any]
    events: dict[str, dict[str, Any]]
    wall_seconds: float
    state_seconds: dict[str, float]
    archive: Path
    peak_rss: int

    @property
    def archive_bytes(self) -> int:
        return self.archive.stat().st_size


# --- tasks ------------------------------------------------------------------------------


def run_task(
    service: DcuProcess, s3: S3Server, path: str, body: dict[str, Any], work: Path, label: str
) -> TaskRun:
    """``POST`` a start or bundle, wait for the task, read its events, fetch its object
    (then delete it from the store). Raises TaskFailed with the task's error_message."""
    assert service.process is not None
    with RssSampler({"dcu": service.process.pid}) as sampler:
        started = time.monotonic()
        status, answer = service.post(path, body)
        if status not in {200, 201, 202}:
            raise TaskFailed(f"{label}: POST {path}: HTTP {status} {answer}")
        task_id = answer["data"]["task_id"]
        data, state_seconds = wait_task(service, task_id, sampler, timeout=TASK_TIMEOUT)
        wall = time.monotonic() - started
    if data["state"] != "completed":
        raise TaskFailed(
            f"{label}: task {task_id} {data['state']}: error_message={data.get('error_message')!r}"
        )
    events = task_events(service, task_id)
    name = data.get("minio_object_name")
    if not name:
        raise TaskFailed(f"{label}: task {task_id} completed without minio_object_name: {data}")
    archive = work / Path(name).name
    fetch_object(s3, DCU_BUCKET, name, archive)
    asyncio.run(_s3_remove(s3, DCU_BUCKET, name))  # moto keeps objects in memory
    return TaskRun(label, task_id, data, events, wall, state_seconds, archive, sampler.peak["dcu"])


def start_body(image: str, fmt: ArchiveFormat) -> dict[str, Any]:
    return {"username": "bench", "docker_image_name": image, "format": str(fmt)}


def field(
    mapping: dict[str, Any], key: str, where: str, problems: list[str], *, nullable: bool = False
) -> Any:
    """``mapping[key]``; a missing key (or a null, unless ``nullable``) is a problem."""
    if key not in mapping or (mapping[key] is None and not nullable):
        problems.append(f"{where}: no {key!r} (got {sorted(mapping)})")
        return None
    return mapping[key]


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


# --- verification -----------------------------------------------------------------------


def _descriptors(manifest: bytes) -> list[tuple[str, int]]:
    """``(digest, size)`` of a manifest's config and layers, in order."""
    document = json.loads(manifest)
    return [(d["digest"], d["size"]) for d in [document["config"], *document["layers"]]]


def verify_oci(archive: Path, pushed: PushedOciImage) -> dict[str, Any]:
    """The ``oci-archive`` holds ``oci-layout``, an ``index.json`` of one manifest whose
    blob has that digest and lists the pushed config and layers, and those blobs.

    A manifest pushed with OCI media types must be stored byte for byte, so ``index.json``
    must name the pushed manifest digest. The service stores a Docker schema 2 manifest
    with its media types renamed to OCI ones (``actors.archive``), which changes its
    digest: ``same_manifest_digest`` is then reported, not required.
    """
    with tarfile.open(archive, "r:") as tar:
        members = {member.name: member for member in tar.getmembers()}

        def read(name: str) -> bytes | None:
            handle = tar.extractfile(name) if name in members else None
            return None if handle is None else handle.read()

        def blob(digest: str) -> str:
            return f"blobs/sha256/{digest.partition(':')[2]}"

        found: dict[str, Any] = {
            "oci_layout": "oci-layout" in members,
            "pushed_manifest_digest": pushed.manifest_digest,
            "pushed_manifest_media_type": pushed.manifest_media_type,
        }
        index = read("index.json")
        if index is None:
            return {**found, "index_json": False, "ok": False}
        entries = json.loads(index).get("manifests", [])
        found["index_digests"] = [entry.get("digest") for entry in entries]
        found["same_manifest_digest"] = found["index_digests"] == [pushed.manifest_digest]
        annotations = entries[0].get("annotations", {}) if entries else {}
        found["ref_name"] = annotations.get("org.opencontainers.image.ref.name")
        stored = read(blob(entries[0]["digest"])) if len(entries) == 1 else None
        found["manifest_blob_matches_index"] = (
            stored is not None
            and f"sha256:{hashlib.sha256(stored).hexdigest()}" == entries[0]["digest"]
        )
        found["stored_manifest_media_type"] = (
            None if stored is None else json.loads(stored).get("mediaType")
        )
        found["same_manifest_bytes"] = stored == pushed.manifest
        found["same_config_and_layers"] = stored is not None and _descriptors(
            stored
        ) == _descriptors(pushed.manifest)
        found["config_blob"] = blob(pushed.image_id) in members
        found["layer_blobs"] = all(
            blob(digest) in members and members[blob(digest)].size == size
            for digest, size in zip(pushed.layer_digests, pushed.layer_sizes, strict=True)
        )
    required = [
        "oci_layout",
        "manifest_blob_matches_index",
        "same_config_and_layers",
        "config_blob",
        "layer_blobs",
    ]
    if pushed.manifest_media_type == OCI_MANIFEST:
        required += ["same_manifest_digest", "same_manifest_bytes"]
    found["ok"] = all(found[key] for key in required)
    return found


def verify_docker(engine: DockerEngine, archive: Path, image: BenchImage) -> dict[str, Any]:
    found = verify_archive(engine, archive, image)
    return {**found, "ok": found["same_image_id"] and found["same_tag"]}


def verify_bundle(
    engine: DockerEngine, archive: Path, images: Sequence[BenchImage]
) -> dict[str, Any]:
    """``verify_archive`` per image of the bundle (each load starts without that image)."""
    found = {image.reference: verify_docker(engine, archive, image) for image in images}
    engine.forget(*(image.reference for image in images))
    return {"images": found, "ok": all(result["ok"] for result in found.values())}


# --- formats ----------------------------------------------------------------------------


def format_result(
    run: TaskRun, fmt: ArchiveFormat, verify: dict[str, Any], problems: list[str]
) -> dict[str, Any]:
    """The figures of one format task; what the service left out or got wrong goes to
    ``problems``."""
    where = f"{run.label} ({run.task_id})"
    data, events = run.data, run.events
    status_format = field(data, "format", f"{where} /status", problems)
    if status_format is not None and status_format != str(fmt):
        problems.append(f"{where}: /status format {status_format!r}, requested {fmt}")
    status_bytes = field(data, "archive_bytes", f"{where} /status", problems)
    if status_bytes is not None and status_bytes != run.archive_bytes:
        problems.append(f"{where}: archive_bytes {status_bytes}, object has {run.archive_bytes}")
    if not str(data.get("minio_object_name", "")).endswith(fmt.suffix):
        problems.append(f"{where}: object {data.get('minio_object_name')} lacks {fmt.suffix}")
    fetched = field(data, "download_bytes_fetched", f"{where} /status", problems, nullable=True)
    cached = field(data, "download_bytes_cached", f"{where} /status", problems, nullable=True)
    compressed = events.get("compressed")
    if compressed is None:
        problems.append(f"{where}: no compressed event (got {sorted(events)})")
        compressed = {}
    else:
        for key in ("seconds", "method", "bytes_in", "bytes_out"):
            field(compressed, key, f"{where} compressed event", problems)
        # shared_bytes: only a bundle's event has it (null fields are left out of events)
    if not verify.get("ok"):
        problems.append(f"{where}: archive check failed: {verify}")
    return {
        "format": str(fmt),
        "task_id": run.task_id,
        "object": data.get("minio_object_name"),
        "archive_bytes": run.archive_bytes,
        "archive_mb": round(run.archive_bytes / MB, 1),
        "status_format": status_format,
        "status_archive_bytes": status_bytes,
        "compress_seconds": compressed.get("seconds"),
        "compress_method": compressed.get("method"),
        "compress_bytes_in_mb": _mb(compressed.get("bytes_in")),
        "compress_bytes_out_mb": _mb(compressed.get("bytes_out")),
        "event_shared_bytes": compressed.get("shared_bytes"),
        "status_shared_bytes": data.get("shared_bytes"),
        "download_seconds": events.get("downloaded", {}).get("seconds"),
        "upload_seconds": events.get("uploaded", {}).get("seconds"),
        "total_seconds": round(run.wall_seconds, 2),
        "service_duration_seconds": None
        if data.get("duration") is None
        else round(data["duration"] / 1000, 2),
        "seconds_by_state": run.state_seconds,
        "fetched_mb": _mb(fetched),
        "cached_mb": _mb(cached),
        "blobs_from_cache": bool(cached) and not fetched,
        "dcu_peak_rss_mb": round(run.peak_rss / MB, 1),
        "verify": verify,
    }


def run_formats(
    service: DcuProcess,
    engine: DockerEngine,
    s3: S3Server,
    image: BenchImage,
    oci_image: BenchImage,
    work: Path,
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """A cold baseline task (fills the blob cache), one task per format, then an
    ``oci-archive`` of ``oci_image`` (the same blobs pushed with OCI media types)."""
    results: dict[str, dict[str, Any]] = {}
    plan = [
        (COLD, BASELINE, image),
        *((str(fmt), fmt, image) for fmt in FORMATS),
        (OCI_PUSH, ArchiveFormat.OCI, oci_image),
    ]
    for label, fmt, source in plan:
        print(f"[formats] {label}: {fmt} of {source.reference} ...", flush=True)
        try:
            run = run_task(service, s3, "/start", start_body(source.reference, fmt), work, label)
            if fmt.docker_layout:
                verify = verify_docker(engine, run.archive, source)
            else:
                verify = verify_oci(run.archive, source.pushed)
            results[label] = format_result(run, fmt, verify, problems)
            run.archive.unlink()
        except Exception as exc:  # report the other formats even if one fails
            problems.append(f"{label}: {type(exc).__name__}: {exc}"[:3000])
            results[label] = {"format": str(fmt), "error": f"{type(exc).__name__}: {exc}"[:3000]}
        print(f"[formats] {label}: {json.dumps(results[label])}", flush=True)
    base = results.get(str(BASELINE), {})
    for result in results.values():
        if "error" in result or "error" in base:
            continue
        result["x_size"] = _ratio(result["archive_bytes"], base["archive_bytes"])
        result["x_compress"] = _ratio(result["compress_seconds"], base["compress_seconds"])
        result["x_total"] = _ratio(result["total_seconds"], base["total_seconds"])
    return results


def print_formats(image: BenchImage, results: dict[str, dict[str, Any]]) -> None:
    summary = image.summary()
    print(
        f"\n== formats: {image.reference}  tar {summary['tar_mb']} MB, blobs "
        f"{summary['blob_mb']} MB ({summary['layers']} layers); ratios against the "
        f"{BASELINE} row"
    )
    columns = [
        ("format", 26),
        ("archive MB", 10),
        ("x size", 7),
        ("method", 7),
        ("compress s", 10),
        ("x compr", 7),
        ("total s", 8),
        ("x total", 7),
        ("fetched", 8),
        ("cached", 7),
        ("ok", 5),
    ]
    print(" ".join(title.rjust(width) for title, width in columns))
    for label, result in results.items():
        name = label
        if "error" in result:
            print(f"{name:>26} ERROR {result['error']}")
            continue
        values = [
            name,
            result["archive_mb"],
            result.get("x_size"),
            result["compress_method"],
            result["compress_seconds"],
            result.get("x_compress"),
            result["total_seconds"],
            result.get("x_total"),
            result["fetched_mb"],
            result["cached_mb"],
            result["verify"].get("ok"),
        ]
        print(" ".join(_cell(v, w) for v, (_, w) in zip(values, columns, strict=True)))
    print(
        "total s: POST to completed; fetched / cached: MB of blobs from the registry / the "
        "blob cache (download_bytes_fetched / download_bytes_cached); the cold row filled "
        "the cache and is not the baseline. ok: docker load + image ID and tag; oci-archive: "
        "index.json's manifest lists the pushed config and layers, blobs present"
    )
    for label, result in results.items():
        verify = result.get("verify", {})
        if "same_manifest_digest" in verify:
            print(
                f"{label}: index.json manifest digest {verify['index_digests']}, pushed "
                f"{verify['pushed_manifest_digest']} ({verify['pushed_manifest_media_type']}):"
                f" same digest {verify['same_manifest_digest']}, stored manifest type "
                f"{verify['stored_manifest_media_type']}"
            )


# --- bundle -----------------------------------------------------------------------------


def image_with_blobs(
    registry: Registry, size_name: str, seed: int, cache: Path
) -> tuple[BenchImage, list[LayerBlob]]:
    """``build_image``, and its layer blobs (from the blob directory it just filled)."""
    image = build_image(registry, size_name, seed, cache)
    blobs, _ = layer_blobs(size_name, seed, cache / f"{size_name}-seed{seed}-v{CONTENT_VERSION}")
    if tuple(blob.digest for blob in blobs) != image.pushed.layer_digests:
        raise RuntimeError("the cached layer blobs are not the pushed image's layers")
    return image, blobs


def push_sharing(
    registry: Registry, base: BenchImage, blobs: Sequence[LayerBlob], seed: int
) -> list[BenchImage]:
    """Two images of the base image's first ``SHARED_LAYERS`` blobs plus a small own
    layer each (mixed data, seeded by its path)."""
    images = []
    for name in ("app-b", "app-c"):
        started = time.monotonic()
        files: LayerFiles = {
            f"opt/{name}/VERSION": f"{name} seed {seed}\n".encode(),
            f"opt/{name}/app.bin": OWN_LAYER_BYTES,
        }
        own = layer_blob(files)
        shared = list(blobs[:SHARED_LAYERS])
        pushed = push_image(
            registry.url, f"bench/{base.name}-{name}", f"seed{seed}", [*shared, own]
        )
        # tar_bytes 0: not known without the shared layers' tars, and not used here
        images.append(BenchImage(name, pushed, 0, time.monotonic() - started))
    return images


def run_bundle(
    service: DcuProcess,
    engine: DockerEngine,
    s3: S3Server,
    images: Sequence[BenchImage],
    shared_blob_bytes: int,
    work: Path,
    problems: list[str],
) -> dict[str, Any]:
    """Each image alone, then all as one bundle, ``docker-archive+gzip``."""
    result: dict[str, Any] = {
        "images": [image.reference for image in images],
        "shared_layers": SHARED_LAYERS,
        "shared_layer_blob_bytes": shared_blob_bytes,
        "singles": {},
    }
    singles_bytes = 0
    for image in images:
        label = f"single {image.name}"
        print(f"[bundle] {label} ...", flush=True)
        try:
            run = run_task(
                service, s3, "/start", start_body(image.reference, BASELINE), work, label
            )
            verify = verify_docker(engine, run.archive, image)
            if not verify["ok"]:
                problems.append(f"{label}: archive check failed: {verify}")
            result["singles"][image.reference] = {
                "task_id": run.task_id,
                "archive_bytes": run.archive_bytes,
                "archive_mb": round(run.archive_bytes / MB, 1),
                "total_seconds": round(run.wall_seconds, 2),
                "verify": verify,
            }
            singles_bytes += run.archive_bytes
            run.archive.unlink()
        except Exception as exc:
            problems.append(f"{label}: {type(exc).__name__}: {exc}"[:3000])
            result["singles"][image.reference] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
        print(f"[bundle] {label}: {json.dumps(result['singles'][image.reference])}", flush=True)
    print("[bundle] bundle of all three ...", flush=True)
    body = {
        "username": "bench",
        "name": f"bench-{images[0].name}-bundle",
        "images": [image.reference for image in images],
        "format": str(BASELINE),
    }
    try:
        run = run_task(service, s3, "/bundle", body, work, "bundle")
    except Exception as exc:
        problems.append(f"bundle: {type(exc).__name__}: {exc}"[:3000])
        result["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        return result
    where = f"bundle ({run.task_id})"
    status_shared = field(run.data, "shared_bytes", f"{where} /status", problems)
    event_shared = field(
        run.events.get("compressed", {}), "shared_bytes", f"{where} compressed event", problems
    )
    status_format = field(run.data, "format", f"{where} /status", problems)
    if status_format is not None and status_format != str(BASELINE):
        problems.append(f"{where}: /status format {status_format!r}, requested {BASELINE}")
    status_images = field(run.data, "images", f"{where} /status", problems) or []
    listed = [(entry.get("docker_image_name"), entry.get("image_id")) for entry in status_images]
    expected = [(image.reference, image.pushed.image_id) for image in images]
    if status_images and listed != expected:
        problems.append(f"{where}: /status images {listed}, expected {expected}")
    status_bytes = field(run.data, "archive_bytes", f"{where} /status", problems)
    if status_bytes is not None and status_bytes != run.archive_bytes:
        problems.append(f"{where}: archive_bytes {status_bytes}, object has {run.archive_bytes}")
    verify = verify_bundle(engine, run.archive, images)
    if not verify["ok"]:
        problems.append(f"{where}: archive check failed: {verify}")
    bundle_bytes = run.archive_bytes
    run.archive.unlink()
    complete = len(result["singles"]) == len(images) and not any(
        "error" in single for single in result["singles"].values()
    )
    # Each image after the first stores the shared base layers again in its single.
    expected_shared = shared_blob_bytes * (len(images) - 1)
    result.update(
        {
            "bundle": {
                "task_id": run.task_id,
                "object": run.data.get("minio_object_name"),
                "archive_bytes": bundle_bytes,
                "archive_mb": round(bundle_bytes / MB, 1),
                "total_seconds": round(run.wall_seconds, 2),
                "compress_seconds": run.events.get("compressed", {}).get("seconds"),
                "compress_method": run.events.get("compressed", {}).get("method"),
                "status_images": status_images,
                "verify": verify,
            },
            "singles_bytes": singles_bytes if complete else None,
            "saved_bytes": singles_bytes - bundle_bytes if complete else None,
            "shared_bytes_status": status_shared,
            "shared_bytes_event": event_shared,
            "expected_shared_bytes": expected_shared,
        }
    )
    if complete:
        limit = singles_bytes - shared_blob_bytes
        result["check_bundle_le_singles_minus_shared_layers"] = {
            "bundle": bundle_bytes,
            "limit": limit,
            "ok": bundle_bytes <= limit,
        }
        if bundle_bytes > limit:
            problems.append(
                f"bundle {bundle_bytes} B > singles {singles_bytes} - {shared_blob_bytes}"
            )
        # Stricter, for information: the bundle saves every repeated copy.
        result["bundle_le_singles_minus_expected_shared"] = (
            bundle_bytes <= singles_bytes - expected_shared
        )
    if status_shared is not None and status_shared != expected_shared:
        problems.append(
            f"{where}: shared_bytes {status_shared}, expected {expected_shared} "
            f"({len(images) - 1} x {shared_blob_bytes} B of shared layer blobs)"
        )
    if status_shared is not None and event_shared is not None and status_shared != event_shared:
        problems.append(f"{where}: /status shared_bytes {status_shared} != event {event_shared}")
    return result


def print_bundle(result: dict[str, Any]) -> None:
    print(
        f"\n== bundle ({BASELINE}): {len(result['images'])} images sharing "
        f"{result['shared_layers']} base layers of {_mb(result['shared_layer_blob_bytes'])} MB "
        "(blobs)"
    )
    columns = [("archive", 60), ("MB", 8), ("total s", 8), ("ok", 5)]
    print(" ".join(title.rjust(width) for title, width in columns))
    for reference, single in result["singles"].items():
        if "error" in single:
            print(f"{reference:>60} ERROR {single['error']}")
            continue
        values = [reference, single["archive_mb"], single["total_seconds"], single["verify"]["ok"]]
        print(" ".join(_cell(v, w) for v, (_, w) in zip(values, columns, strict=True)))
    if "error" in result:
        print(f"{'bundle':>60} ERROR {result['error']}")
        return
    bundle = result["bundle"]
    values = [
        "bundle of all three",
        bundle["archive_mb"],
        bundle["total_seconds"],
        bundle["verify"]["ok"],
    ]
    print(" ".join(_cell(v, w) for v, (_, w) in zip(values, columns, strict=True)))
    print(f"singles total MB:           {_cell(_mb(result['singles_bytes']), 8)}")
    print(f"bundle MB:                  {_cell(bundle['archive_mb'], 8)}")
    print(f"saved MB:                   {_cell(_mb(result['saved_bytes']), 8)}")
    print(
        f"shared_bytes MB (status):   {_cell(_mb(result['shared_bytes_status']), 8)}"
        f"   (compressed event: {_mb(result['shared_bytes_event'])}; expected "
        f"{len(result['images']) - 1} x {_mb(result['shared_layer_blob_bytes'])} = "
        f"{_mb(result['expected_shared_bytes'])})"
    )
    check = result.get("check_bundle_le_singles_minus_shared_layers")
    if check is not None:
        print(
            f"check bundle <= singles - shared layers: {check['bundle']} <= {check['limit']} "
            f"B: {'PASS' if check['ok'] else 'FAIL'}  (stricter, singles - shared_bytes "
            f"expected: {result['bundle_le_singles_minus_expected_shared']})"
        )


# --- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["medium", "large"], default="medium")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--blob-cache", type=Path, help="keep generated layer blobs here")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    began = time.monotonic()
    problems: list[str] = []
    report: dict[str, Any] = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version(),
        },
        "size": args.size,
        "seed": args.seed,
        "baseline": str(BASELINE),
    }
    with tempfile.TemporaryDirectory(prefix="dcu-bench-formats-") as tmp:
        root = Path(tmp)
        cache = args.blob_cache or root / "blobs"
        engine = DockerEngine(root / "dockerd")
        registry = Registry(root / "registry")
        s3 = S3Server(root / "s3")
        nats = NatsServer(store=root / "nats")
        stops: list[Callable[[], None]] = []
        service: DcuProcess | None = None
        try:
            for server in (engine, registry, s3, nats):
                server.start()
                stops.append(server.stop)
            image, blobs = image_with_blobs(registry, args.size, args.seed, cache)
            print(f"[{args.size}] pushed {image.reference}: {image.summary()}", flush=True)
            sharing = push_sharing(registry, image, blobs, args.seed)
            for other in sharing:
                print(f"[bundle] pushed {other.reference}: {other.pushed.layer_sizes}", flush=True)
            started = time.monotonic()
            oci_pushed = push_image(
                registry.url, f"bench/{args.size}-oci", f"seed{args.seed}", blobs, media="oci"
            )
            oci_image = BenchImage(
                f"{args.size}-oci", oci_pushed, image.tar_bytes, time.monotonic() - started
            )
            print(f"[formats] pushed {oci_image.reference} (OCI media types)", flush=True)
            report["image"] = image.summary()
            report["oci_image"] = oci_image.summary()
            workdir = root / "dcu"
            config = dcu_config("registry", engine, s3, nats, workdir)
            service = DcuProcess(workdir, config, ["serve"], name="dcu-formats").start()
            work = root / "archives"
            work.mkdir()
            try:
                report["formats"] = run_formats(
                    service, engine, s3, image, oci_image, work, problems
                )
                shared_blob_bytes = sum(image.pushed.layer_sizes[:SHARED_LAYERS])
                report["bundle"] = run_bundle(
                    service, engine, s3, [image, *sharing], shared_blob_bytes, work, problems
                )
            except Exception as exc:
                tail = service.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}\n--- {service.name} log ---\n{tail}") from exc
            if problems and service.log.exists():
                report["dcu_log_tail"] = service.log.read_text(errors="replace")[-3000:]
        finally:
            if service is not None:
                service.stop()
            for stop in reversed(stops):
                stop()
            shutil.rmtree(root / "dcu", ignore_errors=True)
    report["problems"] = problems
    report["run_seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, indent=2))
    print_formats(image, report["formats"])
    print_bundle(report["bundle"])
    print(f"\nrun took {report['run_seconds']} s")
    if problems:
        print("\nPROBLEMS:")
        for problem in problems:
            print(f"- {problem}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
