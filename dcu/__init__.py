"""Shared wiring for the DCU service: settings, errors, the NATS bus and the ``dcu`` command."""
