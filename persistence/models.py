"""Tortoise models: the seed's ``dcu_tasks`` table and two tables beside it.

* ``dcu_tasks`` has exactly the seed's thirteen columns (SPEC.md section 4).
* ``dcu_task_transitions`` is the transition log: one row per task event judged (applied
  or refused), keyed by the event id so a redelivered event is recognised.
* ``dcu_task_details`` holds facts the seed's table has no column for (image id, sizes,
  checksum, bucket, live progress, platform, manifest digest, reuse), one row per task.

Nothing outside ``persistence`` sees these classes: the repository translates rows into
the frozen records of ``persistence.repository``. Every datetime is timezone-aware UTC.
Changing a model means adding a migration in ``persistence/migrations``.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model

from events.platform import PLATFORM_MAX

APP_LABEL = "dcu"


class DcuTask(Model):
    """One task; ``state`` moves only through guarded updates in the repository."""

    id = fields.IntField(primary_key=True)
    task_id = fields.CharField(max_length=100, unique=True)
    username = fields.CharField(max_length=100, db_index=True)
    docker_image_name = fields.CharField(max_length=500, db_index=True)
    gzip_file_name = fields.CharField(max_length=500, null=True)
    minio_object_name = fields.CharField(max_length=500, null=True)
    state = fields.CharField(max_length=50, db_index=True)
    error_message = fields.CharField(max_length=2000, null=True)
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
    task_id = fields.CharField(max_length=100, db_index=True)
    from_state = fields.CharField(max_length=50, null=True)  # null: creation, unknown task
    to_state = fields.CharField(max_length=50, null=True)  # null: unknown task, no target
    event_id = fields.CharField(max_length=100, unique=True)
    event_type = fields.CharField(max_length=50)
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
    task_id = fields.CharField(max_length=100, unique=True)
    image_id = fields.CharField(max_length=200, null=True)
    tar_bytes = fields.BigIntField(null=True)
    archive_bytes = fields.BigIntField(null=True)
    archive_sha256 = fields.CharField(max_length=64, null=True)
    bucket = fields.CharField(max_length=100, null=True)
    stage = fields.CharField(max_length=20, null=True)
    stage_bytes_done = fields.BigIntField(null=True)
    stage_bytes_total = fields.BigIntField(null=True)
    stage_rate = fields.FloatField(null=True)  # bytes per second
    progress_time = fields.DatetimeField(null=True)
    # From the registry engine (0002): the platform asked for, then the one packaged.
    platform = fields.CharField(max_length=PLATFORM_MAX, null=True)
    manifest_digest = fields.CharField(max_length=100, null=True)
    engine = fields.CharField(max_length=20, null=True)
    # null until the download stage says whether an existing archive was reused.
    reused = fields.BooleanField(null=True)
    fetched_bytes = fields.BigIntField(null=True)
    cached_bytes = fields.BigIntField(null=True)

    class Meta:
        table = "dcu_task_details"
        table_description = "Task facts beyond the seed's columns"
        app = APP_LABEL
