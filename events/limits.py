"""How long the values DCU accepts and stores may be, each defined once.

The seed's ``dcu_tasks`` columns (SPEC.md section 4) set most of them; the gateway's
validators, the OpenAPI document, the Tortoise models and the event models of
``events.schema`` and ``events.cleanup`` (hence the AsyncAPI document) all read them from
here. (The migrations keep their literal values: they are history.)
"""

from __future__ import annotations

ID_MAX = 100  # task and event ids
USERNAME_MAX = 100
IMAGE_NAME_MAX = 500  # ``docker_image_name``, as sent
OBJECT_NAME_MAX = 500  # ``gzip_file_name``, ``minio_object_name``, reused object names
STATE_MAX = 50  # a task state or event type
ERROR_MESSAGE_MAX = 2000
IMAGE_ID_MAX = 200
SHA256_HEX_LEN = 64
BUCKET_MAX = 100
STAGE_MAX = 20  # a stage or engine name
MANIFEST_DIGEST_MAX = 100
PLATFORM_MAX = 64  # ``os/arch/variant``
FORMAT_MAX = 32  # an archive format's name (``events.formats``)
STREAM_NAME_MAX = 255  # a JetStream stream name (``dcu_refused_events.stream``)
COUNT_MAX = 2**63 - 1  # a byte or item count in an event: fits a BIGINT column
CLEANUP_ERRORS_MAX = 20  # error strings a cleanup ``completed`` event lists (plus "… more")
CLEANUP_ERROR_MAX = 200  # characters of one of them
IDEMPOTENCY_KEY_MAX = 200  # characters of an ``Idempotency-Key`` header (POST /start)
PAGE_MAX = 1_000_000  # the ``page`` of ``GET /query`` (its ``page_size``: server.max_page_size)
CLEANUP_TIMEOUT_MAX = 600  # seconds ``POST /cleanup`` may wait for the run's completion
RAW_LOG_MAX = 200  # bytes of an undecodable message shown in a log line
BUNDLE_IMAGES_MAX = 100  # images in one bundle (``server.max_bundle_images`` is at most this)
