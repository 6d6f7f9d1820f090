"""The HTTP gateway (aiohttp): the seed's four endpoints, publishing StartTask to NATS."""
