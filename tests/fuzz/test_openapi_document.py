"""The OpenAPI document, built from apps that are never started (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from gateway import asyncapi, envelope, openapi
from gateway.app import create_app
from gateway.keys import API, SETTINGS
from kernel.settings import ServerSettings, Settings


def build(max_page_size: int = 100) -> dict[str, Any]:
    settings = Settings(server=ServerSettings(max_page_size=max_page_size))
    return openapi.document(create_app(settings))


def test_the_document_is_valid_openapi() -> None:
    document = build()
    validate(document)
    assert document["openapi"] == openapi.VERSION
    assert document["servers"] == [{"url": API}]


def test_every_route_of_the_app_is_described_by_hand() -> None:
    app = create_app(Settings())
    document = openapi.document(app)
    every = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    routes = {(path.removeprefix(API), method) for path, method in every if path.startswith(API)}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes
    # Outside the API only the console (docs in README) and /metrics (docs/operations.md).
    outside = {path for path, _ in every if not path.startswith(f"{API}/")}
    assert outside == {
        "/",
        "/console/{name}",
        "/console/messages.json",
        "/console/download/{task_id}",
        "/metrics",
    }
    undescribed = sorted(
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if operation.get("x-undescribed")
    )
    assert undescribed == [], "describe these routes in gateway/openapi.py"


def test_the_brief_endpoints_are_there() -> None:
    paths = build()["paths"]
    for path, method in [
        ("/start", "post"),
        ("/status/{task_id}", "get"),
        ("/query", "get"),
        ("/health", "get"),
        ("/events/{task_id}", "get"),
        ("/events/{task_id}/stream", "get"),
        ("/events/stream", "get"),
        ("/openapi.json", "get"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path}"


@pytest.mark.parametrize("limit", [pytest.param(1, id="one"), pytest.param(250, id="250")])
def test_page_size_limit_comes_from_the_settings(limit: int) -> None:
    parameters = build(limit)["paths"]["/query"]["get"]["parameters"]
    page_size = next(p for p in parameters if p["name"] == "page_size")
    assert page_size["schema"]["maximum"] == limit
    assert page_size["schema"]["default"] <= limit


def test_only_registered_routes_appear_and_unknown_ones_are_still_listed() -> None:
    # Given an app with one described route and one nobody described
    app = web.Application()
    app[SETTINGS] = Settings()

    async def handler(request: web.Request) -> web.Response:
        raise NotImplementedError

    app.router.add_post(f"{API}/start", handler)
    app.router.add_get(f"{API}/things/{{thing_id}}/{{part:[a-z]+}}", handler)
    app.router.add_get("/elsewhere", handler)
    # When its document is built
    document = openapi.document(app)
    # Then it lists exactly those under the API, the unknown one as an envelope operation
    assert set(document["paths"]) == {"/start", "/things/{thing_id}/{part}"}
    assert document["paths"]["/start"]["post"]["operationId"] == "startTask"
    unknown = document["paths"]["/things/{thing_id}/{part}"]["get"]
    assert unknown["x-undescribed"] is True
    assert [p["name"] for p in unknown["parameters"]] == ["thing_id", "part"]
    validate(document)


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = document["components"][kind][name]
    return node


def test_every_json_response_is_the_envelope_with_its_status_and_code() -> None:
    document = build()
    for path, method, operation in operations(document):
        if path in {openapi.PATH, asyncapi.PATH}:  # plain documents, not the envelope
            continue
        for status, response in operation["responses"].items():
            response = resolve(document, response)
            content = response.get("content", {})
            if "application/json" not in content:
                assert status in {"200", "204"}, f"{method} {path} {status}"
                continue
            schema = content["application/json"]["schema"]
            envelope_ref, fixed = schema["allOf"]
            assert envelope_ref == {"$ref": "#/components/schemas/Envelope"}
            code = 0 if status.startswith("2") else int(status) * 100
            assert fixed["properties"]["status"]["enum"] == [int(status)]
            assert fixed["properties"]["code"]["enum"] == [code]


def test_documented_error_codes_match_the_error_table() -> None:
    responses = build()["components"]["responses"]
    documented = {}
    for response in responses.values():
        fixed = response["content"]["application/json"]["schema"]["allOf"][1]["properties"]
        documented[fixed["status"]["enum"][0]] = fixed["code"]["enum"][0]
    for status, code in envelope.ERROR_TABLE.values():
        if status in documented:
            assert documented[status] == code, status
    assert documented[405] == envelope.for_status(405, "")["code"]
    assert documented[413] == envelope.for_status(413, "")["code"]


def test_post_operations_accept_an_optional_bearer_token() -> None:
    document = build()
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert "security" not in document
    for path, method, operation in operations(document):
        if method == "post":
            assert operation["security"] == [{}, {"bearerAuth": []}], path
            assert "401" in operation["responses"], path
        else:
            assert "security" not in operation, path
