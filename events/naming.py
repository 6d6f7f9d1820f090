"""Where a task's files and objects live, derived from untrusted references safely.

Every name produced here is a single path component of ``[A-Za-z0-9._-]`` that does not
start with a dot, so it can never be ``..``, a hidden file, or escape its directory,
whatever string it is given (the gateway validates references first; this is the second
line of defence).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import uuid
from pathlib import Path

from events.formats import DEFAULT_FORMAT, ArchiveFormat
from events.limits import SHA256_HEX_LEN

PLAN_FILE = "plan.json"  # the registry engine's download plan, in the task's work dir
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_MAX = 150  # leaves room for the suffix and a hash within a 255-byte file name


class UnsafeName(ValueError):
    """A task id or file name that would not stay inside its directory."""


def archive_stem(reference: str) -> str:
    """``nginx:latest`` -> ``nginx_latest``; ``h:5000/a/b@sha256:..`` -> ``h_5000_a_b_sha256_..``.

    Distinct references may share a stem (``a/b:c`` and ``a_b:c``); each task has its own
    directory, so that costs nothing. Over-long stems are cut and get a hash of the whole.
    """
    stem = _UNSAFE.sub("_", reference).strip("._-") or "image"
    if len(stem) > _STEM_MAX:
        digest = hashlib.sha256(reference.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = f"{stem[:_STEM_MAX]}_{digest}"
    return stem


def archive_file_name(reference: str, fmt: ArchiveFormat = DEFAULT_FORMAT) -> str:
    """``nginx:latest`` -> ``nginx_latest.tar.gz`` (``.tar``, ``.oci.tar`` by format)."""
    return archive_stem(reference) + fmt.suffix


def check_task_id(task_id: str) -> str:
    """Return the canonical form of a UUID task id; raises UnsafeName otherwise."""
    try:
        return str(uuid.UUID(task_id))
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnsafeName(f"task id {task_id!r} is not a UUID") from exc


def archive_path(
    gzip_root: str, task_id: str, reference: str, fmt: ArchiveFormat = DEFAULT_FORMAT
) -> str:
    """The archive's path as recorded in ``gzip_file_name``: ``<root>/<task_id>/<name>``.

    Kept in the configured form (``./data/gzip/...``) rather than resolved, as the seed shows.
    """
    return posixpath.join(gzip_root, check_task_id(task_id), archive_file_name(reference, fmt))


def work_tar_path(work_root: Path, task_id: str) -> Path:
    return work_root / check_task_id(task_id) / "image.tar"


def _prefix_parts(prefix: str) -> list[str]:
    return [p for p in prefix.split("/") if p and p not in {".", ".."}]


def object_name(
    prefix: str, task_id: str, reference: str, fmt: ArchiveFormat = DEFAULT_FORMAT
) -> str:
    """``dcu/<task_id>/nginx_latest.tar.gz``: one object per task, with a readable name."""
    return "/".join(
        [*_prefix_parts(prefix), check_task_id(task_id), archive_file_name(reference, fmt)]
    )


def is_sha256_hex(text: str) -> bool:
    """64 lower-case hex digits: a sha256 as DCU names blobs, reuse keys and cache files."""
    return len(text) == SHA256_HEX_LEN and all(c in "0123456789abcdef" for c in text)


def inside(root: Path, candidate: Path) -> bool:
    """True when ``candidate`` resolves to a path under ``root`` (links followed)."""
    try:
        candidate.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def reuse_pointer_name(prefix: str, key: str) -> str:
    """``dcu/reuse/<key>.json``: the pointer from an archive's content key (64 hex, see
    ``actors.registry_engine.reuse_key``) to the object that holds that archive."""
    if not is_sha256_hex(key):
        raise UnsafeName(f"reuse key {key[:80]!r} is not 64 hex digits")
    return "/".join([*_prefix_parts(prefix), "reuse", f"{key}.json"])
