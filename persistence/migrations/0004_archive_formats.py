"""Archive formats and bundles: the task's archive format, a bundle's images, and the
layer bytes a bundle stored once for several images.

Written by hand in the form ``tortoise makemigrations`` gives. Every column is
nullable, so existing rows need no default; never edit an applied migration.
"""

from __future__ import annotations

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("dcu", "0003_refused_events")]  # noqa: RUF012 - as operations below

    initial = False

    operations = [  # noqa: RUF012 - Tortoise's Migration declares a plain list
        ops.AddField(
            model_name="TaskDetail",
            name="archive_format",
            field=fields.CharField(null=True, max_length=32),
        ),
        ops.AddField(
            model_name="TaskDetail",
            name="images",
            field=fields.JSONField(null=True),
        ),
        ops.AddField(
            model_name="TaskDetail",
            name="shared_bytes",
            field=fields.BigIntField(null=True),
        ),
    ]
