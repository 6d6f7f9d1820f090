"""``dcu submit``'s plain parts, without servers: the SSE parser, the start request it
builds, its arguments and the lines it prints."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from dcu import cli
from dcu.submit import (
    Options,
    PlainDisplay,
    Refused,
    SseMessage,
    SseParser,
    completion_line,
    human_bytes,
    start_request,
)

# What the gateway writes (gateway.events_api.sse_message), with a keep-alive between.
GATEWAY_STREAM = (
    b'id: e1\nevent: requested\ndata: {"type":"requested","payload":{"username":"ci"}}\n\n'
    b": keep-alive\n\n"
    b'id: e2\nevent: download_started\ndata: {"type":"download_started","payload":{}}\n\n'
)
GATEWAY_MESSAGES = [
    SseMessage("requested", '{"type":"requested","payload":{"username":"ci"}}', "e1"),
    SseMessage("download_started", '{"type":"download_started","payload":{}}', "e2"),
]


def parse(*chunks: bytes) -> tuple[list[SseMessage], SseParser]:
    parser = SseParser()
    messages = [message for chunk in chunks for message in parser.feed(chunk)]
    return messages, parser


class TestSseParser:
    def test_reads_the_gateways_messages_and_counts_its_keep_alives(self) -> None:
        messages, parser = parse(GATEWAY_STREAM)

        assert messages == GATEWAY_MESSAGES
        assert parser.comments == 1
        assert parser.last_event_id == "e2"

    def test_gives_the_same_messages_however_the_bytes_are_split(self) -> None:
        one_byte_at_a_time = [GATEWAY_STREAM[i : i + 1] for i in range(len(GATEWAY_STREAM))]

        messages, _ = parse(*one_byte_at_a_time)

        assert messages == GATEWAY_MESSAGES

    @pytest.mark.parametrize(
        "chunks",
        [
            pytest.param([b"data: a\r\n\r\n"], id="crlf"),
            pytest.param([b"data: a\r", b"\n\r", b"\n"], id="crlf-split-between-chunks"),
            pytest.param([b"data: a\r\r"], id="cr"),
            pytest.param([b"data: a\n\n"], id="lf"),
        ],
    )
    def test_takes_every_line_ending(self, chunks: list[bytes]) -> None:
        messages, _ = parse(*chunks)

        assert messages == [SseMessage("message", "a", None)]

    def test_holds_a_message_until_its_blank_line(self) -> None:
        parser = SseParser()

        assert parser.feed(b"event: uploaded\ndata: x\n") == []
        assert parser.feed(b"\n") == [SseMessage("uploaded", "x", None)]

    def test_joins_data_lines_and_drops_one_space_after_the_colon(self) -> None:
        messages, _ = parse(b"data:  two spaces\ndata:none\ndata\n\n")

        assert messages == [SseMessage("message", " two spaces\nnone\n", None)]

    def test_the_last_event_id_carries_over_and_one_with_nul_is_ignored(self) -> None:
        messages, parser = parse(b"id: a\ndata: 1\n\ndata: 2\n\nid: b\x00c\ndata: 3\n\n")

        assert [message.id for message in messages] == ["a", "a", "a"]
        assert parser.last_event_id == "a"

    def test_a_message_without_data_is_dropped_but_its_id_kept(self) -> None:
        messages, parser = parse(b"id: 7\nevent: nothing\n\ndata: x\n\n")

        assert messages == [SseMessage("message", "x", "7")]  # the event name did not carry
        assert parser.last_event_id == "7"

    def test_reads_retry_and_ignores_unknown_fields(self) -> None:
        messages, parser = parse(b"retry: 1500\nretry: soon\nfoo: bar\ndata: x\n\n")

        assert parser.retry == 1500
        assert messages == [SseMessage("message", "x", None)]

    def test_utf8_split_across_chunks_a_bom_and_bad_bytes(self) -> None:
        text = "data: 下载中\n\n".encode()
        cut = text.index("下".encode()) + 1  # inside the first character

        messages, _ = parse(b"\xef\xbb\xbf" + text[:cut], text[cut:], b"data: \xff\n\n")

        assert messages == [
            SseMessage("message", "下载中", None),
            SseMessage("message", "\ufffd", None),
        ]


def options(*images: str, **fields: object) -> Options:
    values: dict[str, object] = {
        "images": images,
        "server": "http://dcu:8090",
        "token": None,
        "username": "jenkins",
        **fields,
    }
    return Options(**values)  # type: ignore[arg-type]


class TestStartRequest:
    def test_one_image_is_a_start(self) -> None:
        path, body = start_request(options("nginx:1.27", platform="linux/arm64"))

        assert path == "/api/dcu/start"
        assert body == {
            "username": "jenkins",
            "docker_image_name": "nginx:1.27",
            "platform": "linux/arm64",
        }

    def test_several_images_are_a_bundle_with_its_name_and_format(self) -> None:
        path, body = start_request(
            options("nginx:1.27", "redis:7", name="release-1", format="oci-archive")
        )

        assert path == "/api/dcu/bundle"
        assert body == {
            "username": "jenkins",
            "name": "release-1",
            "images": ["nginx:1.27", "redis:7"],
            "format": "oci-archive",
        }

    def test_a_name_makes_one_image_a_bundle(self) -> None:
        path, body = start_request(options("nginx:1.27", name="solo"))

        assert path == "/api/dcu/bundle"
        assert body["images"] == ["nginx:1.27"]

    def test_without_a_username_the_token_names_the_user(self) -> None:
        _, body = start_request(options("nginx", username=None, token="t" * 20))

        assert "username" not in body


def submit_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["submit", *argv])


class TestArguments:
    def test_the_environment_fills_in_server_token_and_user(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DCU_SERVER", "http://gateway:9000/")
        monkeypatch.setenv("DCU_TOKEN", "from-the-environment")
        monkeypatch.setenv("DCU_USERNAME", "pipeline")

        given = Options.from_args(submit_args(["nginx", "--wait", "--timeout", "2.5"]))
        flags = Options.from_args(
            submit_args(["nginx", "--server", "http://other", "--token", "t", "--user", "me"])
        )

        assert (given.server, given.token, given.username) == (
            "http://gateway:9000",
            "from-the-environment",
            "pipeline",
        )
        assert (given.wait, given.timeout) == (True, 2.5)
        assert (flags.server, flags.token, flags.username) == ("http://other", "t", "me")

    def test_the_login_name_is_the_last_resort(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DCU_USERNAME", raising=False)
        monkeypatch.delenv("DCU_TOKEN", raising=False)
        monkeypatch.setenv("LOGNAME", "build-agent")

        assert Options.from_args(submit_args(["nginx"])).username == "build-agent"

    def test_no_username_and_no_token_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DCU_USERNAME", raising=False)
        monkeypatch.delenv("DCU_TOKEN", raising=False)
        monkeypatch.setattr("dcu.submit.login_name", lambda: None)

        with pytest.raises(Refused, match="no username"):
            Options.from_args(submit_args(["nginx"]))

    @pytest.mark.parametrize(
        "argv",
        [
            pytest.param([], id="no-image"),
            pytest.param(["nginx", "--timeout", "0"], id="zero-timeout"),
            pytest.param(["nginx", "--timeout", "nan"], id="nan-timeout"),
            pytest.param(["nginx", "--format", "zip"], id="unknown-format"),
        ],
    )
    def test_bad_usage_exits_2(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exited:
            submit_args(argv)

        assert exited.value.code == 2
        assert "dcu submit: error:" in capsys.readouterr().err


class TestPlainLines:
    def test_one_line_per_stage_change_and_attempts_named(self) -> None:
        err = io.StringIO()
        display = PlainDisplay(err)

        display.accepted("2f1c0a9e-0000-4000-8000-000000000000", "nginx:latest")
        display.event("download_started", {"attempt": 1})
        display.event("progress", {"stage": "download", "bytes_done": 10})
        display.state("downloading")  # polled: the same state again
        display.event("download_started", {"attempt": 2})
        display.event("compress_started", {})
        display.state("uploading")

        assert err.getvalue().splitlines() == [
            "dcu: task 2f1c0a9e-0000-4000-8000-000000000000 accepted: nginx:latest",
            "dcu: 2f1c0a9e downloading nginx:latest",
            "dcu: 2f1c0a9e downloading nginx:latest (attempt 2)",
            "dcu: 2f1c0a9e compressing",
            "dcu: 2f1c0a9e uploading",
        ]

    def test_the_completion_line_names_the_object_size_and_digest(self) -> None:
        status = json.loads(
            '{"duration": 12345, "minio_object_name": "nginx_latest.tar.gz",'
            ' "archive_bytes": 41234567, "archive_sha256": "ab12"}'
        )

        line = completion_line("2f1c0a9e-0000", status, "dcu-artifacts")

        assert line == (
            "dcu: 2f1c0a9e completed in 12.3 s: dcu-artifacts/nginx_latest.tar.gz "
            "(41.2 MB, sha256 ab12)"
        )
        assert [human_bytes(n) for n in (512, 1500, 2_500_000_000)] == [
            "512 B",
            "1.5 kB",
            "2.5 GB",
        ]
