"""Fixture images, built by the real engine and pushed to the test registry.

Nothing can be pulled from the internet, so every image is built here from a
directory of files with ``FROM scratch`` and one ``COPY layerN/ /`` per layer
(containers cannot ``RUN`` on these machines). A layer is a mapping of relative path
to either literal bytes or an ``int``: that many bytes of *mixed* data, half
repetitive text, half seeded random bytes, so it compresses partially and is the
same in every run. Build contexts are cached on disk by content.

After pushing, the local tag is removed from the engine (``docker image rm``) so a
later ``docker pull`` of the reference genuinely pulls from the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.servers.docker_engine import DockerEngine
from tests.servers.registry import Registry

LayerSpec = Mapping[str, bytes | int]
"""Relative file path -> literal content, or a size in bytes of mixed data."""

CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageSpec:
    repo: str
    tag: str
    layers: tuple[LayerSpec, ...]

    @property
    def total_bytes(self) -> int:
        return sum(
            len(content) if isinstance(content, bytes) else content
            for layer in self.layers
            for content in layer.values()
        )


@dataclass(frozen=True)
class PushedImage:
    """An image that exists in the registry (and no longer in the engine).

    ``size_bytes`` is the engine's uncompressed image size (``docker image inspect
    --format {{.Size}}``) measured before the local copy was removed.
    """

    reference: str
    """``127.0.0.1:PORT/repo:tag``"""
    image_id: str
    """``sha256:...``: the config digest; a pull of ``reference`` yields the same ID."""
    digest_reference: str
    """``127.0.0.1:PORT/repo@sha256:...``: the manifest digest in the registry."""
    size_bytes: int

    @property
    def digest(self) -> str:
        return self.digest_reference.rpartition("@")[2]

    @property
    def repository(self) -> str:
        """``127.0.0.1:PORT/repo`` without tag."""
        return self.digest_reference.rpartition("@")[0]

    @property
    def tag(self) -> str:
        return self.reference.rpartition(":")[2]


SMALL = ImageSpec(
    repo="dcu-small",
    tag="1.0",
    layers=(
        {
            "hello.txt": b"hello from the DCU test fixtures\n",
            "etc/dcu/config.json": b'{"name": "dcu-small", "version": "1.0"}\n',
            "data/blob.bin": 4096,
        },
    ),
)

LARGE = ImageSpec(
    repo="dcu-large",
    tag="latest",
    layers=tuple(
        {f"large/layer{i}/a.bin": 50_000_000, f"large/layer{i}/b.bin": 25_000_000} for i in range(4)
    ),
)
"""About 300 MB in 4 layers of mixed data; gzip shrinks it to roughly 55%."""

NESTED = ImageSpec(
    repo="team/sub/app",
    tag="v1.2.3-rc.1",
    layers=(
        {"app/VERSION": b"1.2.3-rc.1\n", "app/bin/app": 65_536},
        {"app/config.yml": b"listen: 127.0.0.1:8080\nlevel: info\n", "app/share/data.bin": 1 << 20},
    ),
)

FIXTURE_IMAGES: Mapping[str, ImageSpec] = {"small": SMALL, "large": LARGE, "nested": NESTED}


def write_mixed(path: Path, size: int, *, name: str | None = None) -> None:
    """Write ``size`` bytes, each 1 MiB chunk half text lines and half seeded random.

    The content depends only on ``name`` (default: the file name) and ``size``.
    """
    seed = zlib.crc32(f"{name or path.name}:{size}".encode())
    rng = random.Random(seed)
    line_count = CHUNK // 2 // 64 + 1
    text = "".join(
        f"{n:08d} INFO dcu.fixture seed={seed:010d} the quick brown fox jumps\n"
        for n in range(line_count)
    ).encode()
    with path.open("wb") as out:
        remaining = size
        while remaining > 0:
            length = min(CHUNK, remaining)
            half = length // 2
            out.write(text[:half])
            out.write(rng.randbytes(length - half))
            remaining -= length


def _checked_path(relative: str) -> PurePosixPath:
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(f"layer paths must be relative and stay inside the layer: {relative!r}")
    return path


def _context_key(layers: Sequence[LayerSpec]) -> str:
    described = [
        {
            path: (
                "bytes:" + hashlib.sha256(content).hexdigest()
                if isinstance(content, bytes)
                else f"mixed:{content}"
            )
            for path, content in sorted(layer.items())
        }
        for layer in layers
    ]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def build_context(cache_dir: Path, layers: Sequence[LayerSpec]) -> Path:
    """The build context directory for ``layers``, written once and reused by content."""
    if not layers or not all(layers):
        raise ValueError("an image needs at least one layer and no empty layer")
    context = cache_dir / f"context-{_context_key(layers)}"
    if context.is_dir():
        return context
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    try:
        dockerfile = ["FROM scratch"]
        for index, layer in enumerate(layers):
            dockerfile.append(f"COPY layer{index}/ /")
            for relative, content in layer.items():
                target = partial / f"layer{index}" / _checked_path(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    write_mixed(target, content, name=f"layer{index}/{relative}")
        (partial / "Dockerfile").write_text("\n".join(dockerfile) + "\n")
        partial.rename(context)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return context


def build_and_push(
    engine: DockerEngine,
    registry: Registry,
    repo: str,
    tag: str,
    layers: Sequence[LayerSpec],
    *,
    cache_dir: Path | None = None,
) -> PushedImage:
    """Build ``layers`` into ``<registry>/<repo>:<tag>``, push it, and untag it locally.

    ``cache_dir`` keeps build contexts between calls (pass a session tmp dir); without
    it a temporary context is written and deleted. Raises ``DockerCommandError``.
    """
    reference = f"{registry.address}/{repo}:{tag}"
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dcu-ctx-")))
        context = build_context(cache_dir, layers)
        engine.docker("build", "--quiet", "--tag", reference, str(context))
        inspected = json.loads(
            engine.docker("image", "inspect", "--format", "{{json .}}", reference).stdout
        )
        engine.docker("push", "--quiet", reference)
        repo_digests = json.loads(
            engine.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference).stdout
        )
        prefix = f"{registry.address}/{repo}@sha256:"
        digest_reference = next((d for d in repo_digests if d.startswith(prefix)), None)
        if digest_reference is None:
            raise RuntimeError(f"push of {reference} recorded no digest: {repo_digests}")
        engine.docker("image", "rm", reference)
    return PushedImage(
        reference=reference,
        image_id=str(inspected["Id"]),
        digest_reference=digest_reference,
        size_bytes=int(inspected["Size"]),
    )


def push_spec(
    engine: DockerEngine, registry: Registry, spec: ImageSpec, *, cache_dir: Path | None = None
) -> PushedImage:
    return build_and_push(engine, registry, spec.repo, spec.tag, spec.layers, cache_dir=cache_dir)


class PushedImages(Mapping[str, PushedImage]):
    """The session's fixture images by name (``small``, ``large``, ``nested``).

    Each image is built and pushed on first access only, so a test that reads
    ``pushed_images["small"]`` never waits for LARGE. Names are case-insensitive.
    """

    def __init__(
        self,
        engine: DockerEngine,
        registry: Registry,
        cache_dir: Path,
        specs: Mapping[str, ImageSpec] = FIXTURE_IMAGES,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.cache_dir = cache_dir
        self.specs = dict(specs)
        self.build_seconds: dict[str, float] = {}
        self._built: dict[str, PushedImage] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> PushedImage:
        key = name.lower()
        spec = self.specs[key]
        with self._lock:
            if key not in self._built:
                started = time.monotonic()
                self._built[key] = push_spec(
                    self.engine, self.registry, spec, cache_dir=self.cache_dir
                )
                self.build_seconds[key] = time.monotonic() - started
            return self._built[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def small(self) -> PushedImage:
        return self["small"]

    @property
    def large(self) -> PushedImage:
        return self["large"]

    @property
    def nested(self) -> PushedImage:
        return self["nested"]

    @property
    def small_by_digest(self) -> str:
        return small_by_digest(self)


def small_by_digest(images: Mapping[str, PushedImage]) -> str:
    """``127.0.0.1:PORT/dcu-small@sha256:...``: SMALL referenced by manifest digest."""
    return images["small"].digest_reference
