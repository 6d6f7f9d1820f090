"""Tortoise migrations of the ``dcu`` app, applied in order by ``persistence.database``."""
