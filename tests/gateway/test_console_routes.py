"""The web console's routes, in process, with ``auth.protect_reads`` on: the page, its
files and its labels load without a token, with the right content types, a strict
Content-Security-Policy and ``nosniff``; the API and the console's download route still
need the token. Also static checks of the files themselves: every module the page imports
is served, no inline script or style, no ``innerHTML``, no token in localStorage or a
cookie, and every label key the page uses is in the message catalogue."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from actors.object_store import ObjectStore, open_store
from events import messages
from events.messages import Language
from gateway import auth, console
from kernel.settings import AuthSettings, Settings
from tests.gateway.conftest import Gateway
from tests.servers.s3 import S3Server
from tests.timeline import Timeline

TOKEN = "console-token-3f9a1c7e5b20"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = "127.0.0.1:5000/team/app:1.0"
OBJECT = "dcu/127.0.0.1_5000_team_app_1.0.tar.gz"  # what Timeline.happy_path uploads
STATIC = console.STATIC
IMPORT = re.compile(r"""^import\s[^;]*?from\s+"\./([A-Za-z0-9_.-]+\.js)";""", re.M | re.S)


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    settings.auth = AuthSettings(
        enabled=True, protect_reads=True, tokens={"console-user": SecretStr(TOKEN)}
    )
    settings.minio.local_path = str(tmp_path / "objects")
    return settings


def _modules(entry: str) -> set[str]:
    """``entry`` and every module it imports, transitively (relative imports only)."""
    found: set[str] = set()
    pending = [entry]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        pending.extend(IMPORT.findall((STATIC / name).read_text()))
    return found


def _assert_secured(headers: object) -> None:
    policy = headers["Content-Security-Policy"]  # type: ignore[index]
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"  # type: ignore[index]


async def test_the_page_loads_without_a_token(gateway: Gateway) -> None:
    async with gateway.client.get("/") as response:
        body = await response.text()
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["ETag"]
        _assert_secured(response.headers)
    assert '<script type="module" src="/console/console.js"></script>' in body


async def test_every_module_and_file_the_page_uses_is_served_with_its_type(
    gateway: Gateway,
) -> None:
    modules = _modules("console.js")
    assert {"api.js", "sse.js", "i18n.js", "list.js", "task.js"} <= modules
    wanted = {name: "text/javascript; charset=utf-8" for name in modules}
    wanted["console.css"] = "text/css; charset=utf-8"
    wanted["favicon.svg"] = "image/svg+xml"
    for name, content_type in sorted(wanted.items()):
        async with gateway.client.get(f"/console/{name}") as response:
            body = await response.read()
            assert response.status == 200, name
            assert response.headers["Content-Type"] == content_type, name
            assert response.headers["Cache-Control"] == "no-cache", name
            _assert_secured(response.headers)
        assert body == (STATIC / name).read_bytes()


async def test_an_unchanged_file_is_revalidated_with_a_304(gateway: Gateway) -> None:
    async with gateway.client.get("/console/console.css") as response:
        etag = response.headers["ETag"]
    async with gateway.client.get(
        "/console/console.css", headers={"If-None-Match": etag}
    ) as response:
        assert response.status == 304
        assert await response.read() == b""


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/console/missing.js", id="unknown"),
        pytest.param("/console/..%2Fconsole.py", id="encoded-traversal"),
        pytest.param("/console/%2e%2e%2f%2e%2e%2fpyproject.toml", id="dot-traversal"),
        pytest.param("/console/.hidden", id="dotfile"),
    ],
)
async def test_only_the_consoles_own_files_are_served(gateway: Gateway, path: str) -> None:
    async with gateway.client.get(path) as response:
        body = await response.read()
        assert response.status == 404
    assert b"aiohttp" not in body and b"[tool." not in body


@pytest.mark.parametrize(
    ("accept", "language"),
    [
        pytest.param("en-US,en;q=0.9", Language.EN, id="english"),
        pytest.param("zh-CN,zh;q=0.9,en;q=0.5", Language.ZH, id="chinese"),
        pytest.param(None, Language.ZH, id="default"),
    ],
)
async def test_the_labels_come_from_the_catalogue_in_the_negotiated_language(
    gateway: Gateway, accept: str | None, language: Language
) -> None:
    headers = {} if accept is None else {"Accept-Language": accept}
    async with gateway.client.get("/console/messages.json", headers=headers) as response:
        answer = await response.json()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert "Accept-Language" in response.headers["Vary"]
        _assert_secured(response.headers)
    assert answer["language"] == language.value
    expected = messages.catalogue(language, "console.") | messages.catalogue(language, "state.")
    assert answer["messages"] == expected
    assert answer["messages"]["console.start.submit"] == messages.text(
        "console.start.submit", language
    )


async def test_the_api_still_needs_the_token(gateway: Gateway) -> None:
    task_id = str(uuid.uuid4())
    for path in ["/api/dcu/query", f"/console/download/{task_id}", f"/api/dcu/status/{task_id}"]:
        async with gateway.client.get(path) as response:
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with gateway.client.get("/api/dcu/query", headers=BEARER) as response:
        assert response.status == 200
    async with gateway.client.get(f"/console/download/{task_id}", headers=BEARER) as response:
        assert response.status == 404  # past the token: no such task


def test_the_open_paths_are_the_consoles_routes() -> None:
    assert auth.CONSOLE_OPEN == console.OPEN_PATHS


async def _completed_with_archive(gateway: Gateway, settings: Settings, data: bytes) -> str:
    store: ObjectStore = open_store(settings.minio)
    source = Path(settings.minio.local_path).parent / f"upload-{uuid.uuid4().hex}"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(data)
    try:
        await store.ensure_bucket()
        await store.put_file(OBJECT, source, {"dcu-sha256": hashlib.sha256(data).hexdigest()})
    finally:
        await store.close()
        source.unlink()
    timeline = Timeline()
    await gateway.record(*timeline.happy_path(IMAGE))
    return timeline.task_id


async def test_the_local_store_gives_the_page_the_file_itself(
    gateway: Gateway, settings: Settings
) -> None:
    data = os.urandom(100_000)
    task_id = await _completed_with_archive(gateway, settings, data)
    async with gateway.client.get(f"/console/download/{task_id}", headers=BEARER) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["X-Checksum-Sha256"] == hashlib.sha256(data).hexdigest()
        assert (
            'filename="127.0.0.1_5000_team_app_1.0.tar.gz"'
            in (response.headers["Content-Disposition"])
        )
    assert body == data


class TestS3:
    @pytest.fixture
    def settings(self, settings: Settings, s3_server: S3Server) -> Settings:
        settings.minio.endpoint = s3_server.endpoint
        settings.minio.access_key = SecretStr(s3_server.access_key)
        settings.minio.secret_key = SecretStr(s3_server.secret_key)
        settings.minio.bucket = f"console-{uuid.uuid4().hex[:12]}"
        return settings

    async def test_s3_gives_the_page_the_presigned_link_as_a_200(
        self, gateway: Gateway, settings: Settings
    ) -> None:
        data = os.urandom(50_000)
        task_id = await _completed_with_archive(gateway, settings, data)
        async with gateway.client.get(
            f"/console/download/{task_id}", headers=BEARER, allow_redirects=False
        ) as response:
            answer = await response.json()
            assert response.status == 200
            assert "Location" not in response.headers
            assert response.headers["X-Checksum-Sha256"] == hashlib.sha256(data).hexdigest()
            assert response.headers["Cache-Control"] == "no-store"
        assert answer["code"] == 0 and answer["status"] == 200
        assert answer["data"]["file_name"] == "127.0.0.1_5000_team_app_1.0.tar.gz"
        url = answer["data"]["url"]
        assert url.startswith(f"http://{settings.minio.endpoint}/{settings.minio.bucket}/")
        assert "X-Amz-Signature=" in url


def test_the_files_have_no_inline_code_and_build_no_markup_from_data() -> None:
    page = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "inline script"
    assert "<style" not in page and " style=" not in page, "inline style"
    assert not re.search(r"\son[a-z]+=", page), "inline event handler"
    for path in sorted(STATIC.glob("*.js")):
        code = path.read_text()
        for forbidden in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"]:
            assert forbidden not in code, f"{path.name} uses {forbidden}"
        for forbidden in ["localStorage", "document.cookie", "eval(", "new Function"]:
            assert forbidden not in code, f"{path.name} uses {forbidden}"


def test_every_label_the_page_uses_is_in_the_catalogue() -> None:
    used = set(
        re.findall(
            r'data-msg(?:-label|-placeholder)?="([^"]+)"', (STATIC / "index.html").read_text()
        )
    )
    for path in sorted(STATIC.glob("*.js")):
        used |= set(re.findall(r"""\bt\(\s*["']([a-z0-9_.]+)["']""", path.read_text()))
    assert len(used) > 40
    missing = sorted(key for key in used if key not in messages.CATALOGUE)
    assert missing == []
    assert all(key.startswith(("console.", "state.")) for key in used)
