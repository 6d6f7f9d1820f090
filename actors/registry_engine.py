"""The registry download engine: an image's verified blobs, straight from its registry.

No daemon: the manifest is resolved (a manifest list or OCI index narrowed to one
platform), the config and layer blobs are fetched in parallel into the shared blob cache
(``actors.blob_cache``), each blob's digest and each layer's diff_id are verified
(inflating once, with ISA-L), and the task's directory gets hard links to the blobs and a
``plan.json`` that the compress stage turns into the archive (``actors.archive``).

Refused, with a message that says why: schema 1 manifests, foreign or non-distributable
layers, unknown layer types, a platform the image does not have (the message lists the
ones it has), a single-platform image of another platform than the one asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.archive import (
    DOCKER_MANIFEST,
    LAYER_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ArchiveImage,
    ArchiveLayer,
    LayerInfo,
    check_diff_id,
    inspect_layer,
)
from actors.blob_cache import BlobCache
from actors.registry_client import (
    Endpoint,
    Manifest,
    RegistryClient,
    RegistryRefused,
    parse_json_document,
)
from events import platform as platforms
from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.naming import PLAN_FILE
from events.platform import Platform
from events.reference import DEFAULT_TAG, ImageReference
from kernel.errors import ImageNotFound, PermanentFailure, StorageError, UpstreamError
from kernel.settings import Settings

log = logging.getLogger(__name__)

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
FOREIGN_MARKERS = ("foreign", "nondistributable")
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_LOCK_POLL = 0.1  # seconds between tries for a blob another task is fetching
PLAN_VERSION = 2  # 2: several images, each with its manifest blob

ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise RegistryRefused(f"{what} is not an object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise RegistryRefused(f"{what} has no sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryRefused(f"{what} has no valid size")
        return cls(media_type=media_type if isinstance(media_type, str) else "", digest=digest,
                   size=size)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    endpoint: Endpoint
    repository: str
    manifest: Manifest
    config: Descriptor
    layers: tuple[Descriptor, ...]
    platform: str  # what the index entry said, or the requested one for a plain manifest
    from_index: bool
    explicit: bool  # the caller named the platform (not the default)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in {d.digest: d for d in self.layers}.values())


@dataclass(frozen=True, slots=True)
class PlanLayer:
    blob: str  # file name inside the task directory's ``blobs/``
    media_type: str
    digest: str
    size: int
    diff_id: str
    tar_size: int
    spliceable: bool


@dataclass(frozen=True, slots=True)
class PlanImage:
    """One image of a plan: its blobs in the task directory and the names it gets."""

    reference: str  # as the caller wrote it
    image_id: str  # the config digest: what ``docker load`` reports
    config_blob: str
    layers: tuple[PlanLayer, ...]
    repo_tags: tuple[str, ...]  # the docker layouts' RepoTags
    ref_name: str  # the OCI layout's name (see ``image_name``)
    manifest_digest: str
    platform: str
    manifest_blob: str = ""  # empty in a version 1 plan: no OCI layout from it
    manifest_media_type: str = ""

    def archive_image(self, task_dir: Path) -> ArchiveImage:
        """The image for ``actors.archive.write_archive``; reads the config and manifest
        (blocking). Raises OSError when they cannot be read."""
        blobs = task_dir / "blobs"
        return ArchiveImage(
            config=(blobs / self.config_blob).read_bytes(),
            layers=[
                ArchiveLayer(
                    blob=blobs / layer.blob,
                    media_type=layer.media_type,
                    info=LayerInfo(layer.diff_id, layer.tar_size, layer.spliceable),
                    digest=layer.digest,
                    size=layer.size,
                )
                for layer in self.layers
            ],
            repo_tags=self.repo_tags,
            ref_name=self.ref_name,
            manifest=(blobs / self.manifest_blob).read_bytes() if self.manifest_blob else b"",
            manifest_media_type=self.manifest_media_type,
        )


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """What the compress stage needs to write the archive; ``plan.json`` in the task dir.
    One image for a task, several for a bundle (in the order asked)."""

    images: tuple[PlanImage, ...]
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def read(cls, path: Path) -> ImagePlan:
        """Raises PermanentFailure when the file is missing or not a plan. A version 1
        plan (one image, written before bundles) is read as a plan of that image."""
        try:
            data = json.loads(path.read_text())
            if "images" not in data:
                data = {"images": [{**data, "reference": "", "ref_name": ""}], "version": 1}
            return cls(
                images=tuple(
                    PlanImage(
                        **{
                            **image,
                            "layers": tuple(PlanLayer(**layer) for layer in image["layers"]),
                            "repo_tags": tuple(str(tag) for tag in image["repo_tags"]),
                        }
                    )
                    for image in data["images"]
                ),
                version=int(data.get("version", PLAN_VERSION)),
            )
        except FileNotFoundError:
            raise PermanentFailure(
                f"download plan {path} is missing (removed, or not on a shared volume)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PermanentFailure(f"download plan {path} is unreadable: {exc}") from None

    def archive_images(self, task_dir: Path) -> list[ArchiveImage]:
        """Blocking. Raises PermanentFailure when a config or manifest is gone."""
        try:
            return [image.archive_image(task_dir) for image in self.images]
        except OSError as exc:
            raise PermanentFailure(f"download plan's blobs are unreadable: {exc}") from None


@dataclass(frozen=True, slots=True)
class Downloaded:
    plan: ImagePlan
    plan_path: Path
    tar_bytes: int  # the uncompressed layers: about what ``docker save`` would write
    fetched_bytes: int
    cached_bytes: int


def repo_tags(ref: ImageReference) -> tuple[str, ...]:
    """The ``RepoTags`` of ``ref`` in a docker archive: its fully qualified name
    (``docker.io/library/nginx:latest``), which every loader reads as that image. (``docker
    save`` writes the familiar ``nginx:latest``; docker reads both alike, but podman loads
    a familiar name as ``localhost/nginx:latest``.) A reference by digest has none unless it
    names a tag too (``name:tag@sha256:...``): a docker archive cannot carry a digest."""
    if ref.digest and not ref.tag:
        return ()
    return (ref.canonical,)


def reuse_key(
    manifest_digest: str, tags: Sequence[str], fmt: ArchiveFormat = DEFAULT_FORMAT
) -> str:
    """Identifies an archive's content: its format, the image manifest's digest (one
    platform's: it pins the config and every layer) and the tags written into it."""
    text = json.dumps(
        {"format": f"{fmt}/1", "manifest": manifest_digest, "tags": list(tags)},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _refuse_unsupported(media_type: str, document: dict[str, Any], what: str) -> None:
    if media_type in SCHEMA1 or document.get("schemaVersion") == 1:
        raise RegistryRefused(
            f"{what} is a Docker schema 1 manifest, which is deprecated and not supported; "
            "push the image again with a current client"
        )


def _layers_of(document: dict[str, Any], what: str) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    config = Descriptor.parse(document.get("config"), f"{what}: config")
    raw_layers = document.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryRefused(f"{what} lists no layers")
    layers = tuple(
        Descriptor.parse(entry, f"{what}: layer {index}") for index, entry in enumerate(raw_layers)
    )
    for layer in layers:
        if any(marker in layer.media_type for marker in FOREIGN_MARKERS):
            raise RegistryRefused(
                f"{what}: layer {layer.digest} is foreign/non-distributable ({layer.media_type}); "
                "such layers are not in the registry and cannot be packaged for offline use"
            )
        if layer.media_type not in LAYER_TYPES:
            raise RegistryRefused(f"{what}: layer {layer.digest} has unsupported type "
                                  f"{layer.media_type or '(none)'}")  # fmt: skip
    return config, layers


class RegistryEngine:
    """Resolves and downloads images for the download stage; one per worker process."""

    def __init__(self, settings: Settings, client: RegistryClient | None = None) -> None:
        self._settings = settings
        self.client = client or RegistryClient(settings.download, settings.docker)
        self.cache = BlobCache(
            Path(settings.download.cache_path), settings.download.cache_max_bytes
        )

    async def close(self) -> None:
        await self.client.close()

    async def resolve(self, ref: ImageReference, wanted: Platform, explicit: bool) -> ResolvedImage:
        """The image manifest of ``ref`` for ``wanted``, from the first mirror that has it.

        ``explicit``: the caller asked for this platform (a single-platform image of
        another platform is refused; otherwise it is taken as the engine would).
        Raises ImageNotFound, RegistryRefused, RegistryUnavailable.
        """
        repository = ref.repository
        endpoints = self.client.endpoints(ref.registry_host)
        failure: Exception | None = None
        for endpoint in endpoints:
            try:
                return await self._resolve_at(endpoint, repository, ref, wanted, explicit)
            except (ImageNotFound, UpstreamError, RegistryRefused) as exc:
                if endpoint is endpoints[-1]:
                    raise
                log.info("mirror %s failed for %s (%s); trying the next", endpoint.host, ref, exc)
                failure = exc
        raise RegistryRefused(f"no endpoint for {ref}: {failure}")  # pragma: no cover

    async def _resolve_at(
        self,
        endpoint: Endpoint,
        repository: str,
        ref: ImageReference,
        wanted: Platform,
        explicit: bool,
    ) -> ResolvedImage:
        reference = ref.digest or ref.tag or DEFAULT_TAG
        manifest = await self.client.get_manifest(endpoint, repository, reference, MANIFEST_ACCEPT)
        what = f"manifest of {ref}"
        document = parse_json_document(manifest.body, what)
        media_type = manifest.media_type or str(document.get("mediaType", ""))
        _refuse_unsupported(media_type, document, what)
        if media_type in {DOCKER_LIST, OCI_INDEX} or (
            "manifests" in document and "layers" not in document
        ):
            entries = document.get("manifests")
            if not isinstance(entries, list):
                raise RegistryRefused(f"{what}: index lists no manifests")
            listed: list[tuple[Platform, Descriptor]] = []
            for index, entry in enumerate(entries):
                found = platforms.from_descriptor(entry) if isinstance(entry, dict) else None
                if found is None or found.os == "unknown":
                    continue  # attestation manifests and the like
                listed.append((found, Descriptor.parse(entry, f"{what}: entry {index}")))
            chosen = platforms.choose(wanted, [p for p, _ in listed])
            if chosen is None:
                available = ", ".join(sorted({str(p) for p, _ in listed})) or "none"
                raise ImageNotFound(
                    f"image {ref} has no {wanted} variant; available platforms: {available}"
                )
            chosen_platform, descriptor = listed[chosen]
            manifest = await self.client.get_manifest(
                endpoint, repository, descriptor.digest, MANIFEST_ACCEPT
            )
            what = f"{wanted} manifest of {ref}"
            document = parse_json_document(manifest.body, what)
            media_type = manifest.media_type or str(document.get("mediaType", ""))
            _refuse_unsupported(media_type, document, what)
            if "manifests" in document:
                raise RegistryRefused(f"{what}: an index inside an index is not supported")
            config, layers = _layers_of(document, what)
            return ResolvedImage(
                endpoint, repository, manifest, config, layers, str(chosen_platform), True, explicit
            )
        config, layers = _layers_of(document, what)
        return ResolvedImage(
            endpoint, repository, manifest, config, layers, str(wanted), False, explicit
        )

    @contextlib.asynccontextmanager
    async def _fetch_lock(self, digest: str) -> AsyncIterator[None]:
        lock = await asyncio.to_thread(self.cache.lock_path, digest)
        handle = await asyncio.to_thread(lock.open, "a")
        try:
            # Polled rather than blocking in a thread: waiters must not fill the default
            # executor that the lock's holder needs for its own writes.
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    async def _blob(
        self,
        resolved: ResolvedImage,
        descriptor: Descriptor,
        dest: Path,
        counted: Callable[[int], None],
    ) -> tuple[int, int]:
        """Put ``descriptor``'s verified blob at ``dest``; returns (fetched, cached) bytes."""
        async with self._fetch_lock(descriptor.digest):
            if self.cache.lookup(descriptor.digest) is not None:
                try:
                    await asyncio.to_thread(self.cache.link_into, descriptor.digest, dest)
                    counted(descriptor.size)
                    return 0, descriptor.size
                except FileNotFoundError:
                    pass  # evicted between the lookup and the link: fetch it again
            if dropped := await asyncio.to_thread(self.cache.drop_parts, descriptor.digest):
                log.info("removed %d unfinished fetch(es) of %s", dropped, descriptor.digest)
            part = self.cache.part(descriptor.digest)
            try:
                fetched = await self.client.fetch_blob(
                    resolved.endpoint,
                    resolved.repository,
                    descriptor.digest,
                    descriptor.size,
                    part,
                    counted,
                )
                await asyncio.to_thread(self.cache.commit, part, descriptor.digest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
            await asyncio.to_thread(self.cache.link_into, descriptor.digest, dest)
            return fetched.transferred, 0

    async def _layer_info(self, descriptor: Descriptor, path: Path) -> LayerInfo:
        info = self.cache.layer_info(descriptor.digest)
        if info is None:
            info = await asyncio.to_thread(inspect_layer, path, descriptor.media_type)
            self.cache.save_layer_info(descriptor.digest, info)
        return info

    async def download(
        self,
        images: Sequence[tuple[ImageReference, ResolvedImage]],
        task_dir: Path,
        progress: ProgressCallback | None = None,
    ) -> Downloaded:
        """Fetch and verify every blob of the resolved images (one, or a bundle's) into
        ``task_dir/blobs``, each blob once, and write ``task_dir/plan.json``.

        Raises ImageNotFound, RegistryRefused (bad content), RegistryUnavailable,
        StorageError, PermanentFailure (over ``max_image_bytes``, for all images
        together)."""
        what = (
            f"image {images[0][0]}" if len(images) == 1 else f"the bundle of {len(images)} images"
        )
        limit = self._settings.workers.max_image_bytes
        unique = {d.digest: d for _, resolved in images for d in resolved.layers}
        compressed = sum(d.size for d in unique.values())
        if limit and compressed > limit:
            raise PermanentFailure(
                f"{what} has {compressed} bytes of compressed layers, over the limit of "
                f"{limit} bytes"
            )
        for ref, resolved in images:
            if resolved.config.size > MAX_CONFIG_BYTES:
                raise RegistryRefused(f"config of {ref} is larger than {MAX_CONFIG_BYTES} bytes")
        blobs = task_dir / "blobs"
        await asyncio.to_thread(blobs.mkdir, parents=True, exist_ok=True)
        configs = {resolved.config.digest: resolved.config for _, resolved in images}
        total = sum(d.size for d in configs.values()) + compressed
        missing = sum(d.size for d in unique.values() if self.cache.lookup(d.digest) is None)
        await asyncio.to_thread(self.cache.root.mkdir, parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache.root).free
        if missing > free:
            raise StorageError(
                f"not enough disk for the blobs of {what.removeprefix('image ')} in "
                f"{self.cache.root}: "
                f"{missing} bytes needed, {free} free"
            )
        done = 0

        def counted(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        gate = asyncio.Semaphore(self._settings.download.parallel_blobs)
        fetches: dict[str, asyncio.Task[tuple[int, int]]] = {}
        infos: dict[str, LayerInfo] = {}

        async def one(resolved: ResolvedImage, descriptor: Descriptor) -> tuple[int, int]:
            async with gate:
                path = blobs / descriptor.digest.partition(":")[2]
                result = await self._blob(resolved, descriptor, path, counted)
                if descriptor.digest in unique:
                    infos[descriptor.digest] = await self._layer_info(descriptor, path)
                return result

        planned: list[PlanImage] = []
        parsed: list[dict[str, Any]] = []  # each config parsed once, before its layers come
        try:
            for ref, resolved in images:
                # Configs first (they are small): a bad one fails the task before the
                # layers are fetched. A blob two images share is fetched once.
                config_path = blobs / resolved.config.digest.partition(":")[2]
                if resolved.config.digest not in fetches:
                    fetches[resolved.config.digest] = asyncio.create_task(
                        one(resolved, resolved.config)
                    )
                await fetches[resolved.config.digest]
                config = parse_json_document(config_path.read_bytes(), f"config of {ref}")
                parsed.append(config)
                diff_ids = _diff_ids(config, f"config of {ref}")
                if len(diff_ids) != len(resolved.layers):
                    raise RegistryRefused(
                        f"image {ref}: {len(resolved.layers)} layers but {len(diff_ids)} diff_ids"
                    )
                for descriptor in resolved.layers:
                    if descriptor.digest not in fetches:
                        fetches[descriptor.digest] = asyncio.create_task(one(resolved, descriptor))
            results = await asyncio.gather(*fetches.values())
            for (ref, resolved), config in zip(images, parsed, strict=True):
                planned.append(await self._plan_image(ref, resolved, config, blobs, infos))
        except BaseException:
            for task in fetches.values():
                task.cancel()
            await asyncio.gather(*fetches.values(), return_exceptions=True)
            raise
        tar_bytes = sum(info.tar_size for info in infos.values())
        if limit and tar_bytes > limit:
            raise PermanentFailure(
                f"{what} is {tar_bytes} bytes uncompressed, over the limit of {limit} bytes"
            )
        plan = ImagePlan(images=tuple(planned))
        plan_path = task_dir / PLAN_FILE
        part = plan_path.with_name(PLAN_FILE + ".part")
        await asyncio.to_thread(part.write_text, plan.to_json())
        await asyncio.to_thread(part.replace, plan_path)
        await asyncio.to_thread(self.cache.evict)
        return Downloaded(
            plan,
            plan_path,
            tar_bytes,
            fetched_bytes=sum(fetched for fetched, _ in results),
            cached_bytes=sum(cached for _, cached in results),
        )

    async def _plan_image(
        self,
        ref: ImageReference,
        resolved: ResolvedImage,
        config: dict[str, Any],
        blobs: Path,
        infos: dict[str, LayerInfo],
    ) -> PlanImage:
        """The plan entry of one downloaded image: its layers checked against the
        config's diff_ids, and its manifest kept beside its blobs (an OCI layout holds
        it verbatim)."""
        config_blob = resolved.config.digest.partition(":")[2]
        diff_ids = _diff_ids(config, f"config of {ref}")
        layers = []
        for descriptor, diff_id in zip(resolved.layers, diff_ids, strict=True):
            info = infos[descriptor.digest]
            check_diff_id(info, diff_id)
            layers.append(
                PlanLayer(
                    blob=descriptor.digest.partition(":")[2],
                    media_type=descriptor.media_type,
                    digest=descriptor.digest,
                    size=descriptor.size,
                    diff_id=info.diff_id,
                    tar_size=info.tar_size,
                    spliceable=info.spliceable,
                )
            )
        manifest_blob = resolved.manifest.digest.partition(":")[2]
        await asyncio.to_thread((blobs / manifest_blob).write_bytes, resolved.manifest.body)
        return PlanImage(
            reference=str(ref),
            image_id=resolved.config.digest,
            config_blob=config_blob,
            layers=tuple(layers),
            repo_tags=repo_tags(ref),
            ref_name=ref.canonical,
            manifest_digest=resolved.manifest.digest,
            platform=_image_platform(ref, resolved, config),
            manifest_blob=manifest_blob,
            manifest_media_type=resolved.manifest.media_type,
        )


def _diff_ids(config: dict[str, Any], what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and d.startswith("sha256:") for d in diff_ids
    ):
        raise RegistryRefused(f"{what} has no rootfs.diff_ids")
    return [str(d) for d in diff_ids]


def _image_platform(ref: ImageReference, resolved: ResolvedImage, config: dict[str, Any]) -> str:
    """The platform the image is for. A plain manifest (no index) says it in its config
    only: when the caller named another platform it is refused; without a named platform
    it is taken as the engine takes it."""
    if resolved.from_index:
        return resolved.platform
    os_name, arch = config.get("os"), config.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return resolved.platform
    variant = config.get("variant")
    actual = platforms.normalise(os_name, arch, variant if isinstance(variant, str) else "")
    wanted = platforms.parse_platform(resolved.platform)
    if resolved.explicit and not wanted.matches(actual):
        raise ImageNotFound(f"image {ref} has no {wanted} variant; available platforms: {actual}")
    return str(actual)
