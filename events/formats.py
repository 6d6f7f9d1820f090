"""The archive formats DCU writes, and what each is called on disk and in the store.

A task's format is chosen in its start request (``format``), defaults to
``storage.archive_format`` and is recorded on the task, in its events, in the object's
metadata (``dcu-format``) and in the file name's suffix. Which loader reads which format
is in ``docs/compatibility.md``; in short:

* ``docker-archive+gzip``: the seed's ``.tar.gz``. ``docker load`` reads it; podman 4.3,
  skopeo 1.9 and ``ctr import`` 1.6 do not (``gunzip -c X | podman load`` does).
* ``docker-archive``: the same tar uncompressed (``.tar``): every loader reads it.
* ``oci-archive``: an OCI image layout in a tar (``.oci.tar``), layer blobs exactly as the
  registry serves them. podman, skopeo and ``ctr`` read it; Docker 20.10 does not.

``docker-archive+zstd`` was measured and left out: ``docker load`` 20.10 refuses a zstd
archive ("archive/tar: invalid tar header").
"""

from __future__ import annotations

import enum


class ArchiveFormat(enum.StrEnum):
    DOCKER_GZIP = "docker-archive+gzip"
    DOCKER = "docker-archive"
    OCI = "oci-archive"

    @property
    def suffix(self) -> str:
        return _SUFFIXES[self]

    @property
    def docker_layout(self) -> bool:
        """A ``docker save`` tar (``manifest.json``, ``<v1id>/layer.tar``) rather than an
        OCI image layout."""
        return self is not ArchiveFormat.OCI


_SUFFIXES: dict[ArchiveFormat, str] = {
    ArchiveFormat.DOCKER_GZIP: ".tar.gz",
    ArchiveFormat.DOCKER: ".tar",
    ArchiveFormat.OCI: ".oci.tar",
}
DEFAULT_FORMAT = ArchiveFormat.DOCKER_GZIP
# Longest first: ``x.oci.tar`` must not be taken for a ``.tar`` of ``x.oci``.
ARCHIVE_SUFFIXES: tuple[str, ...] = tuple(sorted(set(_SUFFIXES.values()), key=len, reverse=True))
