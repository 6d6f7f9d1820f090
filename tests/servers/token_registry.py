"""Registries with non-default configuration, and one behind Docker-style token auth.

``ConfiguredRegistry`` is ``Registry`` with extra top-level configuration sections
merged in (e.g. ``ALLOW_FOREIGN_URLS``: distribution refuses any manifest with layer
``urls`` unless ``validation.manifests.urls.allow`` is set).

``TokenAuthRegistry`` runs ``docker-registry`` with ``auth.token`` and its own token
server (``TokenServer``, ``http.server`` in a thread on a free loopback port), the way
Docker Hub works: the registry answers ``401`` with ``WWW-Authenticate: Bearer
realm=...,service=...[,scope=...]``, the client asks the realm for a token with HTTP
Basic credentials, then sends ``Authorization: Bearer <token>``. Tokens are JWTs signed
with an EC P-256 key whose self-signed certificate is the registry's ``rootcertbundle``;
the header carries the certificate in ``x5c``, which distribution 2.8 verifies against
that bundle. The token server records every request so tests can assert on what a
client sent.

Token policy (Docker Hub's, simplified): good credentials get the actions they ask for
on any repository (and ``registry:catalog:*``); no credentials get a token with empty
access (``anonymous="empty"``, Docker Hub's answer for a private repository) or a 401
(``anonymous="refuse"``), except pull on ``public_repositories``; wrong credentials get
401. ``fail_next`` makes the next N token requests answer 503.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers.base import free_port
from tests.servers.oci import auth_headers, fetch_manifest, request
from tests.servers.registry import Registry

ALLOW_FOREIGN_URLS: Mapping[str, Any] = {
    "validation": {"manifests": {"urls": {"allow": ["^https?://"]}}}
}
"""Extra configuration that lets manifests with foreign (``urls``) layers in."""

SERVICE = "dcu-test-registry"
ISSUER = "dcu-test-issuer"


@dataclass
class ConfiguredRegistry(Registry):
    """A ``Registry`` whose configuration gets ``extra_config`` sections merged in."""

    extra_config: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def registry_config(self) -> dict[str, Any]:
        return {**super().registry_config(), **self.extra_config}


# --- the token server -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    path: str
    authorization: str | None
    """The ``Authorization`` header exactly as received."""
    username: str | None
    """The Basic (or OAuth2 form) user name, ``None`` when anonymous."""
    service: str | None
    scopes: tuple[str, ...]
    status: int
    access: tuple[dict[str, Any], ...]
    """What the issued token grants (empty when refused)."""
    form: Mapping[str, str] = field(default_factory=dict)
    """The form fields of an OAuth2 ``POST`` (password masked)."""


@dataclass(frozen=True)
class SigningKey:
    """An EC P-256 key and its self-signed certificate (the registry's root bundle)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = ISSUER) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def x5c(self) -> list[str]:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return [base64.b64encode(der).decode()]


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:team/app:pull,push`` -> an access entry; ``None`` if malformed.

    The name may itself hold a colon (``repository:host:5000/app:pull``): the type is
    up to the first colon, the actions after the last one.
    """
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass
class TokenServer:
    """Issues registry tokens on ``http://127.0.0.1:<port>/token`` (GET, or OAuth2 POST)."""

    signing_key: SigningKey
    users: Mapping[str, str] = field(default_factory=lambda: {"dcu": "dcu-secret"})
    service: str = SERVICE
    issuer: str = ISSUER
    anonymous: Literal["empty", "refuse"] = "empty"
    public_repositories: frozenset[str] = frozenset()
    token_lifetime: int = 300
    fail_next: int = 0
    """Answer this many coming token requests with 503 (then work again)."""
    port: int = field(default_factory=free_port)
    requests: list[TokenRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> TokenServer:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def recorded(self) -> list[TokenRequest]:
        with self._lock:
            return list(self.requests)

    def issue(self, subject: str, service: str, access: Sequence[dict[str, Any]]) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service,
            "exp": now + self.token_lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": list(access),
        }
        return jwt.encode(
            claims, self.signing_key.key, algorithm="ES256", headers={"x5c": self.signing_key.x5c}
        )

    def grant(self, username: str | None, scopes: Sequence[str]) -> list[dict[str, Any]]:
        granted = []
        for scope in scopes:
            entry = parse_scope(scope)
            if entry is None:
                continue
            if username is not None:
                granted.append(entry)
            elif entry["type"] == "repository" and entry["name"] in self.public_repositories:
                actions = [a for a in entry["actions"] if a == "pull"]
                if actions:
                    granted.append({**entry, "actions": actions})
        return granted

    def answer(
        self,
        method: str,
        path: str,
        authorization: str | None,
        params: Mapping[str, list[str]],
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for one token request; records it."""
        scopes = tuple(
            part for value in params.get("scope", []) for part in value.split(" ") if part
        )
        service = next(iter(params.get("service", [])), None)
        form: dict[str, str] = {}
        username: str | None = None
        password: str | None = None
        if method == "POST":  # OAuth2 password grant, as the Docker engine may send
            form = {key: values[0] for key, values in params.items() if values}
            if form.get("grant_type") == "password":
                username, password = form.get("username"), form.get("password", "")
            if "password" in form:
                form["password"] = "***"
        if authorization is not None:
            username, password = _basic_credentials(authorization)
        status, body, access = self._decide(username, password, service, scopes)
        with self._lock:
            self.requests.append(
                TokenRequest(
                    method=method,
                    path=path,
                    authorization=authorization,
                    username=username,
                    service=service,
                    scopes=scopes,
                    status=status,
                    access=tuple(access),
                    form=form,
                )
            )
        return status, body

    def _decide(
        self,
        username: str | None,
        password: str | None,
        service: str | None,
        scopes: Sequence[str],
    ) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503, {"details": "token service unavailable (injected)"}, []
        if username is not None and self.users.get(username) != password:
            return 401, {"details": "incorrect username or password"}, []
        if username is None and self.anonymous == "refuse":
            granted = self.grant(None, scopes)
            if not granted:
                return 401, {"details": "authentication required"}, []
        access = self.grant(username, scopes)
        token = self.issue(username or "", service or self.service, access)
        issued_at = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_lifetime,
            "issued_at": issued_at,
        }
        return 200, body, access


def _basic_credentials(authorization: str) -> tuple[str | None, str | None]:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    username, _, password = decoded.partition(":")
    return username, password


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            self._serve("GET", parts.path, urllib.parse.parse_qs(parts.query))

        def do_POST(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode(errors="replace")
            params = urllib.parse.parse_qs(parts.query)
            for key, values in urllib.parse.parse_qs(body).items():
                params.setdefault(key, []).extend(values)
            self._serve("POST", parts.path, params)

        def _serve(self, method: str, path: str, params: Mapping[str, list[str]]) -> None:
            if path != "/token":
                self._send(404, {"details": f"no such path {path}"})
                return
            status, body = server.answer(method, path, self.headers.get("Authorization"), params)
            self._send(status, body)

        def _send(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="dcu-test-token-server"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # requests are recorded in ``server.requests``

    return Handler


# --- the registry ---------------------------------------------------------------------


@dataclass
class TokenAuthRegistry(ConfiguredRegistry):
    """``docker-registry`` with ``auth.token`` and a ``TokenServer`` of its own.

    ``username``/``password`` are the one account the token server knows (more via
    ``token_server.users``). ``stop`` stops both servers.
    """

    username: str = field(default="dcu", kw_only=True)
    password: str = field(default="dcu-secret", kw_only=True)
    anonymous: Literal["empty", "refuse"] = field(default="empty", kw_only=True)
    public_repositories: frozenset[str] = field(default=frozenset(), kw_only=True)
    token_server: TokenServer | None = field(default=None, kw_only=True)

    @property
    def service(self) -> str:
        return SERVICE

    @property
    def cert_bundle(self) -> Path:
        return self.root / "token-root.pem"

    @property
    def tokens(self) -> TokenServer:
        if self.token_server is None:
            raise RuntimeError("TokenAuthRegistry.start() has not been called")
        return self.token_server

    def registry_config(self) -> dict[str, Any]:
        config = super().registry_config()
        config["auth"] = {
            "token": {
                "realm": self.tokens.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert_bundle),
            }
        }
        return config

    def start(self) -> TokenAuthRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        self.cert_bundle.write_bytes(key.certificate_pem)
        self.token_server = TokenServer(
            key,
            users={self.username: self.password},
            anonymous=self.anonymous,
            public_repositories=self.public_repositories,
        ).start()
        try:
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            probe = request("GET", f"{self.url}/v2/", timeout=1.0)
        except OSError:
            return False
        return probe.status == 401 and probe.headers.get("www-authenticate", "").startswith(
            "Bearer "
        )

    def auth_headers(
        self, repo: str | None = None, actions: Sequence[str] = ("pull",), **kwargs: Any
    ) -> dict[str, str]:
        """A Bearer header for ``repo`` with this registry's account (the token dance)."""
        return auth_headers(
            self.url, repo, actions, username=self.username, password=self.password, **kwargs
        )

    def catalog(self) -> list[str]:
        headers = self.auth_headers(scope="registry:catalog:*")
        answer = request("GET", f"{self.url}/v2/_catalog?n=1000", headers=headers)
        if answer.status != 200:
            raise RuntimeError(f"catalog: HTTP {answer.status}: {answer.body[:500]!r}")
        return list(answer.json()["repositories"])

    def manifest(self, repo: str, reference: str) -> dict[str, Any]:
        answer = fetch_manifest(self.url, repo, reference, self.auth_headers(repo))
        if answer.status != 200:
            raise RuntimeError(f"manifest {repo}:{reference}: HTTP {answer.status}")
        manifest: dict[str, Any] = answer.json()
        return manifest

    def stop(self) -> None:
        super().stop()
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None
