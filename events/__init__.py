"""The DCU domain: task states, image references, artifact naming and event schemas.

Plain Python only: nothing here imports a framework, so it is tested in microseconds and
shared by the gateway, the actors and the persistence subscriber.
"""
