"""The DCU domain: task states, image references, artifact naming and event schemas.

No service framework here (no NATS, dramatiq or database client), only pydantic for the
event models on the wire: everything is tested in microseconds and shared by the gateway,
the actors and the persistence subscriber. ``gateway.asyncapi`` documents the subjects
(served at ``/api/dcu/asyncapi.json``).
"""
