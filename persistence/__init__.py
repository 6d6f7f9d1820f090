"""Persistence: the task tables, the repository over them and the stream subscriber.

* ``persistence.database``: open, migrate and close a database (``Database.open``).
* ``persistence.repository``: ``TaskRepository`` and its frozen records.
* ``persistence.subscriber``: ``PersistenceSubscriber`` and ``rebuild_from_stream``.

Nothing here hands out a Tortoise object or exception: records are frozen dataclasses and
database failures are ``persistence.database.DatabaseError`` (an ``UpstreamError``).
"""
