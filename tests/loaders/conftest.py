"""Real image loaders, each handed out with an empty store.

``containerd`` and ``loader_engine`` (a dockerd of the loaders' own, so emptying it never
touches the images other tests keep in the session's ``docker_engine``) are started once
per session and fail the test, never skip, when they cannot start; ``docker_loader``
empties ``loader_engine`` before and after the test; ``podman_loader`` keeps its storage
under the test's tmp dir and deletes it afterwards. ``loader`` runs a test once per
store-backed loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.docker_engine import DockerEngine
from tests.servers.loaders import (
    Containerd,
    CtrLoader,
    DockerLoader,
    Loader,
    PodmanLoader,
    SkopeoLoader,
)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    server = Containerd(tmp_path_factory.mktemp("containerd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ctr_loader(containerd: Containerd) -> Iterator[CtrLoader]:
    loader = CtrLoader(containerd)
    loader.remove_all()
    try:
        yield loader
    finally:
        loader.remove_all()


@pytest.fixture
def podman_loader(tmp_path: Path) -> Iterator[PodmanLoader]:
    loader = PodmanLoader(tmp_path / "podman")
    try:
        loader.remove_all()
        yield loader
    finally:
        loader.close()


@pytest.fixture(scope="session")
def loader_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    engine = DockerEngine(tmp_path_factory.mktemp("loader-dockerd"))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def docker_loader(loader_engine: DockerEngine) -> Iterator[DockerLoader]:
    loader = DockerLoader(loader_engine)
    loader.remove_all()
    try:
        yield loader
    finally:
        loader.remove_all()


@pytest.fixture
def skopeo_loader(tmp_path: Path) -> SkopeoLoader:
    """skopeo without a registry (``load`` only); build ``SkopeoLoader(registry.address)``
    to ``push``."""
    return SkopeoLoader(workdir=tmp_path)


@pytest.fixture(params=["docker", "podman", "ctr"])
def loader(request: pytest.FixtureRequest) -> Loader:
    """Each store-backed loader in turn, empty."""
    found: Loader = request.getfixturevalue(f"{request.param}_loader")
    return found
