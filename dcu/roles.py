"""The worker roles one process can run: the three stages and cleanup.

Kept apart from ``dcu.service`` so that the command-line parser can name them without
importing the service stack (``dcu submit`` and ``dcu fetch`` start in a fraction of the
time ``dcu serve`` takes to import).
"""

from __future__ import annotations

from events.cleanup import CLEANUP_QUEUE
from events.schema import Stage

ROLES: tuple[str, ...] = (*(stage.value for stage in Stage), CLEANUP_QUEUE)
