"""The service's settings read ``DCU_*`` variables, but not the clients' ``DCU_SERVER`` and
``DCU_TOKEN`` (a URL and a token for ``dcu submit``/``dcu fetch``), which would otherwise be
read as the whole ``server`` section and refused."""

from __future__ import annotations

import pytest

from kernel.settings import load_settings


def test_client_variables_do_not_reach_the_service_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/config.yaml here: defaults and environment only
    monkeypatch.setenv("DCU_SERVER", "https://dcu.example:8443")
    monkeypatch.setenv("DCU_TOKEN", "client-token")
    monkeypatch.setenv("DCU_SERVER_PORT", "9911")
    monkeypatch.setenv("DCU_LOG_FORMAT", "json")
    settings = load_settings()
    assert settings.server.port == 9911  # the section's own keys still apply
    assert settings.log.format == "json"
    assert settings.server.host == "127.0.0.1"
