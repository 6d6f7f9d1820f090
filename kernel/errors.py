"""One error hierarchy for DCU. Callers never see a third-party exception type.

::

    DcuError
    ├── InvalidInput            bad input at the edge (400)
    ├── Unauthorized            missing or wrong token (401)
    ├── NotFound                unknown task (404)
    ├── Conflict                a change that does not fit the current state (409)
    ├── TooManyRequests         a per-user limit is reached; try again later (429)
    ├── PermanentFailure        a stage failure that retrying cannot fix
    │   └── ImageNotFound       the engine or registry says the image does not exist
    ├── ConfigError             settings a command refuses before starting (exit code 2)
    └── UpstreamError           an external system failed (engine, registry, S3, NATS, disk)
        ├── EngineError
        ├── StorageError
        ├── BusError
        └── UpstreamTimeout     also an asyncio.TimeoutError

Subclasses defined beside the code that raises them (``DatabaseError``,
``RegistryRefused``, ``UnstorableEvent``, ``ReplayRefused``...) and the whole tree are
drawn in docs/architecture.md. The HTTP mapping lives in the gateway only.
"""

from __future__ import annotations

import asyncio


class DcuError(Exception):
    """Base of every error DCU raises on purpose."""


class InvalidInput(DcuError):
    pass


class Unauthorized(DcuError):
    pass


class NotFound(DcuError):
    pass


class Conflict(DcuError):
    pass


class TooManyRequests(DcuError):
    pass


class PermanentFailure(DcuError):
    """A stage failure that no retry can fix (the task fails at once)."""


class ImageNotFound(PermanentFailure):
    pass


class ConfigError(DcuError):
    """Settings a command refuses before starting anything (exit code 2)."""


class UpstreamError(DcuError):
    pass


class EngineError(UpstreamError):
    pass


class StorageError(UpstreamError):
    pass


class BusError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    pass
