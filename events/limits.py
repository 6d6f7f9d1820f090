"""How long the values DCU accepts and stores may be, each defined once.

The seed's ``dcu_tasks`` columns (SPEC.md section 4) set most of them; the gateway's
validators, the OpenAPI document, the Tortoise models and the repository's checks all
read them from here. (The migrations keep their literal values: they are history.)
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
STREAM_NAME_MAX = 255  # a JetStream stream name (``dcu_refused_events.stream``)
