"""Schema-driven fuzzing of a real ``dcu serve`` from its own OpenAPI document.

Every operation but the SSE streams (they never end), ``POST /cleanup`` (its own tests
cover it) and the document itself is fuzzed by schemathesis: valid and invalid inputs,
its coverage cases and methods the path does not take. Each response must not be a 5xx,
must be the envelope (``status`` equal to the HTTP status, ``code`` 0 exactly for 2xx)
and must match what the document says (status code, content type, headers, schema).

``positive_data_acceptance`` is left out on purpose: the document gives the shapes of the
inputs, while the handlers go further (the image-reference grammar, printable non-blank
usernames) and answer 400 for what a shape alone allows; the 400 is documented.

The hypothesis properties then hit ``POST /start`` with hostile field values and bodies.
"""

from __future__ import annotations

import json
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, Response
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway import asyncapi, openapi
from gateway.app import create_app
from kernel.settings import ServerSettings, Settings
from tests.fuzz.conftest import MAX_EXAMPLES, MAX_PAGE_SIZE, Tally
from tests.servers.dcu_process import DcuProcess

ENVELOPE_KEYS = {"code", "status", "message", "data"}
MAX_BODY_BYTES = ServerSettings().max_body_bytes  # the fuzzed service keeps the default


def check_envelope(status: int, body: Any) -> None:
    """The envelope contract: the four keys, ``status`` mirrored, ``code`` 0 iff 2xx."""
    assert isinstance(body, dict), f"not a JSON object: {body!r:.200}"
    assert set(body) == ENVELOPE_KEYS, f"keys {sorted(body)}"
    assert body["status"] == status, f"envelope status {body['status']} != HTTP {status}"
    assert isinstance(body["code"], int)
    assert isinstance(body["message"], str)
    assert (body["code"] == 0) == (200 <= status < 300), f"code {body['code']} for {status}"


def envelope(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Schemathesis check: every response but a HEAD is the envelope, documented or not."""
    if response.request.method == "HEAD":
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{response.status_code} body is not JSON: {response.content!r:.200}"
        ) from None
    check_envelope(response.status_code, body)
    return True


def request(
    service: DcuProcess,
    method: str,
    path: str,
    data: bytes | None = None,
    *,
    enveloped: bool = True,
) -> tuple[int, Any]:
    """Send one request; the answer must be JSON, and the envelope unless told otherwise."""
    req = urllib.request.Request(
        f"{service.base_url}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise AssertionError(f"{status} body is not JSON: {raw[:200]!r}") from None
    if enveloped:
        check_envelope(status, body)
    return status, body


def task_total(service: DcuProcess) -> int:
    status, body = request(service, "GET", "/query?page_size=1")
    assert status == 200, body
    total = body["data"]["total"]
    assert isinstance(total, int)
    return total


def fuzzed_document() -> dict[str, Any]:
    """The document of an app configured like ``fuzz_service``; the app is never started,
    only its routes are read. ``test_the_service_serves_the_fuzzed_document`` proves the
    running service serves exactly this."""
    settings = Settings(server=ServerSettings(max_page_size=MAX_PAGE_SIZE))
    return openapi.document(create_app(settings))


# Loaded at collection so schemathesis can make one test per operation; its lazy loader
# (``schemathesis.pytest.from_fixture``) fails on pytest 9.2 ('Function' object has no
# attribute '_nodeid'), so the requests go to the fixture's process through ``base_url``.
schema = (
    schemathesis.openapi.from_dict(
        fuzzed_document(),
        config=schemathesis.Config.from_dict(
            {"request-timeout": 30, "generation": {"database": "none"}}
        ),
    )
    .exclude(path_regex=r"/stream$")
    .exclude(path="/cleanup")
    .exclude(path=openapi.PATH)
    .exclude(path=asyncapi.PATH)  # plain documents, not the envelope
)


def test_the_service_serves_the_fuzzed_document(fuzz_service: DcuProcess) -> None:
    status, served = request(fuzz_service, "GET", openapi.PATH, enveloped=False)
    assert status == 200
    assert served == fuzzed_document()
    parameters = served["paths"]["/query"]["get"]["parameters"]
    page_size = next(p for p in parameters if p["name"] == "page_size")
    assert page_size["schema"]["maximum"] == MAX_PAGE_SIZE


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_its_document(
    case: Case[Any], fuzz_service: DcuProcess, tally: Tally
) -> None:
    tally.add(case.operation.label)
    case.call_and_validate(
        base_url=fuzz_service.base_url,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[envelope],
    )


# --- regressions: what fuzzing and reading the handlers turned up ------------------------


def test_a_405_names_the_methods_the_path_takes(fuzz_service: DcuProcess) -> None:
    req = urllib.request.Request(f"{fuzz_service.base_url}/health", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    with caught.value as response:
        assert response.code == 405
        check_envelope(405, json.loads(response.read()))
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        pytest.param("page=%D9%A3", "page must be an integer", id="arabic-indic-digit"),
        pytest.param("page_size=%EF%BC%95", "page_size must be an integer", id="fullwidth-digit"),
        pytest.param("page=%2B3", "page must be an integer", id="plus-sign"),
        pytest.param("page=%203", "page must be an integer", id="leading-space"),
        pytest.param("page=1_0", "page must be an integer", id="underscore"),
        pytest.param("page=" + "9" * 5000, "page must be between", id="5000-digits"),
        pytest.param("page=-1", "page must be between", id="negative"),
        pytest.param("username=a" + "%20" * 120, "longer than 100", id="long-with-spaces"),
    ],
)
def test_query_refuses_what_its_document_refuses(
    fuzz_service: DcuProcess, query: str, fragment: str
) -> None:
    status, body = request(fuzz_service, "GET", f"/query?{query}")
    assert status == 400, body
    assert fragment in body["message"]


def test_start_measures_the_username_as_sent(fuzz_service: DcuProcess) -> None:
    before = task_total(fuzz_service)
    body = json.dumps({"username": "a" + " " * 120, "docker_image_name": "nginx"}).encode()
    status, answer = request(fuzz_service, "POST", "/start", body)
    assert status == 400, answer
    assert "longer than 100" in answer["message"]
    assert task_total(fuzz_service) == before


# --- POST /start with hostile input ------------------------------------------------------


HOSTILE = [
    "..",
    "../",
    "../../../../etc/passwd",
    "nginx/../../../etc",
    "/etc/passwd",
    "nginx;rm -rf /",
    "nginx:latest;reboot",
    ";",
    "$(id)",
    "`id`",
    "nginx|cat",
    "nginx&&id",
    "nginx\x00",
    "nginx\n",
    "nginx\r\nX-Injected: 1",
    "\u202enginx",  # right-to-left override
    "\ufeffnginx",  # byte order mark
    "nginx\u200b",  # zero-width space
    "\uff4e\uff47\uff49\uff4e\uff58",  # fullwidth "nginx"
    "ngin\u0445",  # Cyrillic ha for x
    "NGINX",
    " nginx",
    "nginx ",
    "%2e%2e%2f",
    "nginx@sha256:" + "0" * 64,
    "a" * 10_000,
    "é" * 10_000,
    "nginx:" + "a" * 10_000,
    "a/" * 5_000,
]
SEPARATORS = "/:@._-"

texts = st.one_of(
    st.text(),  # any code point but surrogates, control characters included
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]), min_size=1),
    st.sampled_from(HOSTILE),
    st.builds(lambda ch: ch * 10_000, st.characters(exclude_categories=["Cs"])),
    st.text(string.ascii_lowercase + string.digits + SEPARATORS, min_size=1, max_size=40),
    # references the grammar accepts, so some requests do create tasks
    st.from_regex(r"[a-z0-9]{1,12}(/[a-z0-9]{1,12})?(:[a-zA-Z0-9._-]{1,20})?", fullmatch=True),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
fields = st.one_of(texts, json_values)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(username=fields, image=fields, ascii_only=st.booleans())
def test_start_answers_200_or_400_and_400_creates_nothing(
    fuzz_service: DcuProcess, tally: Tally, username: Any, image: Any, ascii_only: bool
) -> None:
    tally.add("property POST /start fields")
    # Given the number of tasks
    before = task_total(fuzz_service)
    # When the fields are posted (JSON \u escapes or raw UTF-8)
    payload = {"username": username, "docker_image_name": image}
    body = json.dumps(payload, ensure_ascii=ascii_only).encode()
    status, answer = request(fuzz_service, "POST", "/start", body)
    # Then it is 200 or 400 (413 past the body limit), and only a 200 creates a task
    expected = {413} if len(body) > MAX_BODY_BYTES else {200, 400}
    assert status in expected, answer
    after = task_total(fuzz_service)
    if status != 200:
        assert after == before, f"a refused request created a task: {answer}"
        assert answer["message"]
        return
    # the row is written by the persistence subscriber, a moment after the answer
    deadline = time.monotonic() + 30
    while after != before + 1 and time.monotonic() < deadline:
        assert after <= before + 1, f"one start created {after - before} tasks"
        time.sleep(0.02)
        after = task_total(fuzz_service)
    assert after == before + 1
    assert isinstance(username, str)
    assert isinstance(image, str)
    assert len(username) <= 100
    assert username.strip()
    assert username.strip().isprintable()
    assert 1 <= len(image) <= 500
    assert "../" not in image
    assert "/.." not in image
    assert not any(ch in image for ch in ";|&$`\\ \t\r\n\x00%")
    assert image.isascii()
    status, task = request(fuzz_service, "GET", f"/status/{answer['data']['task_id']}")
    assert status == 200, task
    assert task["data"]["docker_image_name"] == image


bodies = st.one_of(
    st.binary(max_size=2_000),
    st.text(max_size=2_000).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from([b"", b"{", b"null", b"[]", b'{"username": "u"}', b"\xff\xfe{}"]),
    st.just(b'{"username": "u", "docker_image_name": "' + b"a" * 70_000 + b'"}'),
)


@settings(
    max_examples=MAX_EXAMPLES // 2,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(body=bodies)
def test_start_refuses_malformed_bodies(
    fuzz_service: DcuProcess, tally: Tally, body: bytes
) -> None:
    tally.add("property POST /start bodies")
    before = task_total(fuzz_service)
    status, answer = request(fuzz_service, "POST", "/start", body)
    assert status in {400, 413}, answer
    assert task_total(fuzz_service) == before


# Raw query strings: any bytes, percent-encoded, under the parameter names the read
# endpoints know and some they do not. Schema-following fuzzing never sends a NUL, a
# lone UTF-8 continuation byte or a 5 000-digit page number; a query must still never
# reach a 5xx (issue 8, finding 11).
HOSTILE_VALUES = [b"\x00", b"\xff", b"9" * 5001, b"-1", b"1e309", b"%", b"\xed\xa0\x80"]
QUERY_KEYS = ["docker_image_name", "username", "state", "page", "page_size", "include_progress"]
raw_queries = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(QUERY_KEYS), st.binary(max_size=12)),
        st.one_of(
            st.binary(max_size=60),
            st.sampled_from(
                [b"\x00", b"\xff", b"9" * 5001, b"-1", b"1e309", b"%", b"\xed\xa0\x80"]
            ),
        ),
    ),
    max_size=4,
)


def _encode(pairs: list[tuple[str | bytes, bytes]]) -> str:
    def part(value: str | bytes) -> str:
        raw = value.encode() if isinstance(value, str) else value
        return urllib.parse.quote_from_bytes(raw, safe="")

    return "&".join(f"{part(key)}={part(value)}" for key, value in pairs)


@settings(
    max_examples=MAX_EXAMPLES // 2,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    pairs=raw_queries,
    path=st.sampled_from(
        ["/query", "/events/8f6d1a4e-3b0c-4c1a-9d7e-2f5b6a7c8d9e", "/status/x", "/health"]
    ),
)
def test_raw_queries_never_answer_a_server_error(
    fuzz_service: DcuProcess, tally: Tally, pairs: list[tuple[str | bytes, bytes]], path: str
) -> None:
    tally.add("property raw query strings")
    status, answer = request(fuzz_service, "GET", f"{path}?{_encode(pairs)}")
    assert status < 500, answer
    assert status in {200, 400, 404}, answer
    if status == 400:
        assert answer["message"]
