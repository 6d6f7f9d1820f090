"""S3 over TLS with a private CA (``minio.ca_file``), against moto serving a certificate
signed by a CA made for the test."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from actors.object_store import S3ObjectStore
from kernel.errors import StorageError
from kernel.settings import MinioSettings
from tests.polling import wait_until
from tests.security.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.servers.base import ManagedProcess, ServerStartError, free_port, log_tail, port_open
from tests.servers.s3 import moto_server_binary

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class TlsS3:
    endpoint: str
    ca_file: Path


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsS3]:
    # Given a CA of our own and a certificate it signed for 127.0.0.1
    root = tmp_path_factory.mktemp("tls-s3")
    openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=DCU test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)  # fmt: skip
    openssl("req", *EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
            cwd=root)  # fmt: skip
    (root / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
            cwd=root)  # fmt: skip
    # and moto serving S3 over TLS with it
    port = free_port()
    argv = [moto_server_binary(), "-H", "127.0.0.1", "-p", str(port)]
    argv += ["-c", str(root / "server.pem"), "-k", str(root / "server.key")]
    process = ManagedProcess(argv, log=root / "moto.log")
    try:
        wait_until(
            lambda: port_open(port),
            timeout=60,
            what="moto over TLS",
            error=ServerStartError,
            describe=lambda: log_tail(process.log),
        )
        yield TlsS3(endpoint=f"127.0.0.1:{port}", ca_file=root / "ca.pem")
    finally:
        process.stop()


def settings(server: TlsS3, **overrides: object) -> MinioSettings:
    values: dict[str, object] = {
        "endpoint": server.endpoint,
        "use_ssl": True,
        "access_key": S3_ACCESS_KEY,
        "secret_key": S3_SECRET_KEY,
        "bucket": "dcu-tls",
        "connect_timeout": 5,
        "read_timeout": 10,
    }
    return MinioSettings.model_validate({**values, **overrides})


async def test_the_private_ca_is_trusted(tls_s3: TlsS3, tmp_path: Path) -> None:
    store = S3ObjectStore(settings(tls_s3, ca_file=str(tls_s3.ca_file)))
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"x" * 1000)
    try:
        info = await store.put_file("dcu/t/a.tar.gz", archive, {"dcu-task-id": "t"})
        assert info.size == 1002
        assert store.location == f"https://{tls_s3.endpoint}/dcu-tls"
    finally:
        await store.close()


async def test_without_the_ca_the_certificate_is_refused(tls_s3: TlsS3) -> None:
    store = S3ObjectStore(settings(tls_s3))
    try:
        with pytest.raises(StorageError) as caught:
            await store.ensure_bucket()
    finally:
        await store.close()
    message = str(caught.value)
    assert message.startswith(f"S3 at https://{tls_s3.endpoint}/dcu-tls: bucket check failed")
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert S3_ACCESS_KEY not in message and S3_SECRET_KEY not in message


async def test_a_bad_ca_file_is_a_storage_error(tls_s3: TlsS3, tmp_path: Path) -> None:
    for bad in (tmp_path / "missing.pem", tmp_path / "garbage.pem"):
        if bad.name == "garbage.pem":
            bad.write_text("not a certificate\n")
        store = S3ObjectStore(settings(tls_s3, ca_file=str(bad)))
        with pytest.raises(StorageError, match=re.escape(f"cannot load minio.ca_file {bad}")):
            await store.ensure_bucket()
        await store.close()


def test_a_ca_file_needs_tls() -> None:
    with pytest.raises(ValidationError, match=r"minio.ca_file is set but minio.use_ssl is false"):
        MinioSettings(ca_file="/etc/ssl/ca.pem", use_ssl=False)
