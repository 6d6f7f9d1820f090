"""The generated documents as the running gateway serves them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tests.gateway.conftest import Gateway

ASYNCAPI_SPEC = Path(__file__).resolve().parent.parent / "schemas" / "asyncapi-3.0.0.json"


async def test_asyncapi_json_is_served_for_the_configured_subjects(gateway: Gateway) -> None:
    # Served plain (not in the envelope), valid AsyncAPI 3.0.0, under this gateway's prefix
    status, document = await gateway.get("/asyncapi.json")
    assert status == 200
    jsonschema.Draft7Validator(json.loads(ASYNCAPI_SPEC.read_text())).validate(document)
    prefix = gateway.settings.nats.subject_prefix
    addresses = [channel["address"] for channel in document["channels"].values()]
    assert addresses and all(address.startswith(f"{prefix}.") for address in addresses)
    assert f"{prefix}.task.{{task_id}}.uploaded" in addresses


async def test_openapi_json_lists_the_asyncapi_route(gateway: Gateway) -> None:
    status, document = await gateway.get("/openapi.json")
    assert status == 200
    assert document["paths"]["/asyncapi.json"]["get"]["operationId"] == "getAsyncApi"
