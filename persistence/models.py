"""Tortoise models: the seed's ``dcu_tasks`` table and two tables beside it.

* ``dcu_tasks`` has exactly the seed's thirteen columns (SPEC.md section 4).
* ``dcu_task_transitions`` is the transition log: one row per task event judged (applied
  or refused), keyed by the event id so a redelivered event is recognised.
* ``dcu_task_details`` holds facts the seed's table has no column for (image id, sizes,
  checksum, bucket, live progress, platform, manifest digest, reuse), one row per task.
* ``dcu_refused_events`` keeps the stream messages persistence could not record at all
  (not an event, an unknown type past its grace, a value no column can hold), one row per
  stream position, so a poison message is terminated without being lost.

Nothing outside ``persistence`` sees these classes: the repository translates rows into
the frozen records of ``persistence.repository``. Every datetime is timezone-aware UTC.
Changing a model means adding a migration in ``persistence/migrations``.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model

from events import limits

APP_LABEL = "dcu"


class DcuTask(Model):
    """One task; ``state`` moves only through guarded updates in the repository."""

    id = fields.IntField(primary_key=True)
    task_id = fields.CharField(max_length=limits.ID_MAX, unique=True)
    username = fields.CharField(max_length=limits.USERNAME_MAX, db_index=True)
    docker_image_name = fields.CharField(max_length=limits.IMAGE_NAME_MAX, db_index=True)
    gzip_file_name = fields.CharField(max_length=limits.OBJECT_NAME_MAX, null=True)
    minio_object_name = fields.CharField(max_length=limits.OBJECT_NAME_MAX, null=True)
    state = fields.CharField(max_length=limits.STATE_MAX, db_index=True)
    error_message = fields.CharField(max_length=limits.ERROR_MESSAGE_MAX, null=True)
    start_time = fields.DatetimeField(db_index=True)
    end_time = fields.DatetimeField(null=True)
    duration = fields.IntField(null=True)  # milliseconds
    # Both are event times, never the wall clock: a replay must rebuild identical rows.
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "dcu_tasks"
        table_description = "DCU tasks (the seed's table)"
        app = APP_LABEL


class TaskTransition(Model):
    """One judged event: ``applied`` says whether it changed the task, ``error`` why not."""

    id = fields.IntField(primary_key=True)
    task_id = fields.CharField(max_length=limits.ID_MAX, db_index=True)
    # from_state null: creation, unknown task; to_state null: unknown task, no target
    from_state = fields.CharField(max_length=limits.STATE_MAX, null=True)
    to_state = fields.CharField(max_length=limits.STATE_MAX, null=True)
    event_id = fields.CharField(max_length=limits.ID_MAX, unique=True)
    event_type = fields.CharField(max_length=limits.STATE_MAX)
    stream_seq = fields.BigIntField(null=True)  # null until the stream delivers it
    time = fields.DatetimeField()
    applied = fields.BooleanField()
    error = fields.TextField(null=True)

    class Meta:
        table = "dcu_task_transitions"
        table_description = "Every task event judged, applied or refused"
        app = APP_LABEL


class TaskDetail(Model):
    """Facts about a task beyond the seed's columns; every field but ``task_id`` optional."""

    id = fields.IntField(primary_key=True)
    task_id = fields.CharField(max_length=limits.ID_MAX, unique=True)
    image_id = fields.CharField(max_length=limits.IMAGE_ID_MAX, null=True)
    tar_bytes = fields.BigIntField(null=True)
    archive_bytes = fields.BigIntField(null=True)
    archive_sha256 = fields.CharField(max_length=limits.SHA256_HEX_LEN, null=True)
    bucket = fields.CharField(max_length=limits.BUCKET_MAX, null=True)
    stage = fields.CharField(max_length=limits.STAGE_MAX, null=True)
    stage_bytes_done = fields.BigIntField(null=True)
    stage_bytes_total = fields.BigIntField(null=True)
    stage_rate = fields.FloatField(null=True)  # bytes per second
    progress_time = fields.DatetimeField(null=True)
    # From the registry engine (0002): the platform asked for, then the one packaged.
    platform = fields.CharField(max_length=limits.PLATFORM_MAX, null=True)
    manifest_digest = fields.CharField(max_length=limits.MANIFEST_DIGEST_MAX, null=True)
    engine = fields.CharField(max_length=limits.STAGE_MAX, null=True)
    # null until the download stage says whether an existing archive was reused.
    reused = fields.BooleanField(null=True)
    fetched_bytes = fields.BigIntField(null=True)
    cached_bytes = fields.BigIntField(null=True)
    # Formats and bundles (0004): the archive format, a bundle's images (a list of
    # ``events.schema.BundleImage`` objects; references only until the download stage
    # names their IDs), and the layer bytes the bundle stored once for several images.
    archive_format = fields.CharField(max_length=limits.FORMAT_MAX, null=True)
    images: fields.JSONField[list[dict[str, object]] | None] = fields.JSONField(null=True)
    shared_bytes = fields.BigIntField(null=True)

    class Meta:
        table = "dcu_task_details"
        table_description = "Task facts beyond the seed's columns"
        app = APP_LABEL


class RefusedEvent(Model):
    """A stream message that is not a recordable event, kept with the reason and its bytes.

    Keyed by its stream position, so a redelivery records it once. ``time`` is the
    message's stream timestamp, never the wall clock: a replay rebuilds identical rows.
    """

    id = fields.IntField(primary_key=True)
    stream = fields.CharField(max_length=limits.STREAM_NAME_MAX)
    stream_seq = fields.BigIntField()
    subject = fields.TextField()
    event_id = fields.CharField(max_length=limits.ID_MAX, null=True)  # null: no readable envelope
    task_id = fields.CharField(max_length=limits.ID_MAX, null=True)
    event_type = fields.CharField(max_length=limits.STATE_MAX, null=True)
    reason = fields.TextField()
    # The message bytes as UTF-8 with backslash escapes, cut at the repository's RAW_MAX
    # (column ``raw``: Tortoise's Model reserves the attribute name).
    raw_text = fields.TextField(source_field="raw")
    raw_truncated = fields.BooleanField()
    time = fields.DatetimeField()

    class Meta:
        table = "dcu_refused_events"
        table_description = "Stream messages persistence refused to record, with the reason"
        app = APP_LABEL
        unique_together = (("stream", "stream_seq"),)
