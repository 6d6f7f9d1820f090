"""``Accept-Language``: state_display and the envelope's fixed messages in the language the
request prefers (Chinese by default, the seed), with Content-Language and Vary saying so."""

from __future__ import annotations

import json
from typing import Any

import pytest

from events.messages import Language
from gateway.keys import API
from kernel.settings import Settings
from tests.gateway.conftest import Gateway
from tests.timeline import Timeline


async def _get(gateway: Gateway, path: str, language: str | None) -> tuple[Any, Any]:
    headers = {} if language is None else {"Accept-Language": language}
    async with gateway.client.get(f"{API}{path}", headers=headers) as response:
        return response.headers, json.loads(await response.read())


async def _completed(gateway: Gateway) -> str:
    timeline = Timeline()
    await gateway.record(*timeline.happy_path("nginx:latest"))
    return timeline.task_id


async def test_status_speaks_chinese_by_default_and_english_on_request(gateway: Gateway) -> None:
    task_id = await _completed(gateway)
    headers, answer = await _get(gateway, f"/status/{task_id}", None)
    assert answer["data"]["state_display"] == "已完成"
    assert headers["Content-Language"] == "zh"
    assert "Accept-Language" in headers["Vary"]

    headers, answer = await _get(gateway, f"/status/{task_id}", "en-GB,en;q=0.9,zh;q=0.1")
    assert answer["data"]["state_display"] == "completed"
    assert headers["Content-Language"] == "en"


async def test_query_items_follow_the_request_language(gateway: Gateway) -> None:
    await _completed(gateway)
    _, answer = await _get(gateway, "/query", "en")
    assert [item["state_display"] for item in answer["data"]["items"]] == ["completed"]
    _, answer = await _get(gateway, "/query", "zh-CN")
    assert [item["state_display"] for item in answer["data"]["items"]] == ["已完成"]


async def test_start_message_follows_the_request_language(gateway: Gateway) -> None:
    body = json.dumps({"username": "u", "docker_image_name": "nginx:1.25"}).encode()
    headers = {"Content-Type": "application/json"}
    status, answer = await gateway.request("POST", "/start", body, headers)
    assert (status, answer["message"]) == (200, "任务已启动")
    body = json.dumps({"username": "u", "docker_image_name": "nginx:1.26"}).encode()
    status, answer = await gateway.request(
        "POST", "/start", body, headers | {"Accept-Language": "en"}
    )
    assert (status, answer["message"]) == (200, "task started")


async def test_an_error_envelope_says_its_language_too(gateway: Gateway) -> None:
    headers, answer = await _get(gateway, "/status/not-a-uuid", "en")
    assert answer["status"] == 400
    assert headers["Content-Language"] == "en"


class TestEnglishByConfiguration:
    """``server.language: en``: English unless the request asks for Chinese."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        settings.server.language = Language.EN
        return settings

    async def test_default_is_the_configured_language(self, gateway: Gateway) -> None:
        task_id = await _completed(gateway)
        _, answer = await _get(gateway, f"/status/{task_id}", None)
        assert answer["data"]["state_display"] == "completed"
        _, answer = await _get(gateway, f"/status/{task_id}", "fr")
        assert answer["data"]["state_display"] == "completed"
        _, answer = await _get(gateway, f"/status/{task_id}", "zh")
        assert answer["data"]["state_display"] == "已完成"
