"""The web console at ``/`` in a real browser, against a real ``dcu serve`` with auth on.

A person types the token, starts a task from the form with the keyboard, watches its
progress bar move on the live event stream, sees it complete with its history, downloads
the archive (sha256 as the API reports it), and the console stays usable on a 360 px
screen, with labelled controls, visible focus and AA contrast; a failed task shows why.
Screenshots go to ``test-artifacts/console`` (or ``$DCU_TEST_ARTIFACTS/console``).
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from events.messages import Language, text
from tests.browser.conftest import TOKEN, USER, ConsolePage, api
from tests.e2e.helpers import STAGE_EVENTS
from tests.polling import wait_until
from tests.servers.dcu_process import DcuProcess
from tests.servers.registry import Registry

PNG = b"\x89PNG\r\n\x1a\n"
TASK_TIMEOUT = 120_000  # ms: the large image, start to completed, on a busy machine

# Records every value the task page's progress bar takes, with the state it was in.
OBSERVE_BAR = """() => {
  window.__seen = [];
  const bar = document.getElementById("task-progress");
  new MutationObserver(() => {
    window.__seen.push({value: Number(bar.getAttribute("value")), state: bar.dataset.state});
  }).observe(bar, {attributes: true, attributeFilter: ["value", "data-state"]});
}"""

# Every visible text whose colour has less than 4.5:1 contrast on its background (the
# first opaque background up the tree; disabled controls are exempt, as WCAG says).
LOW_CONTRAST = """() => {
  const parse = (text) => (text.match(/[\\d.]+/g) || []).map(Number);
  const luminance = ([r, g, b]) => {
    const [R, G, B] = [r, g, b].map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * R + 0.7152 * G + 0.0722 * B;
  };
  const background = (element) => {
    for (let node = element; node; node = node.parentElement) {
      const rgba = parse(getComputedStyle(node).backgroundColor);
      if (rgba.length === 3 || (rgba.length === 4 && rgba[3] === 1)) return rgba.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const element = node.parentElement;
    if (!node.textContent.trim() || !element || !element.checkVisibility()) continue;
    if (element.closest(":disabled")) continue;
    const rect = element.getBoundingClientRect();
    if (rect.width === 0 || rect.height === 0) continue;
    const fg = luminance(parse(getComputedStyle(element).color).slice(0, 3));
    const bg = luminance(background(element));
    const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    if (ratio < 4.5) {
      const text = node.textContent.trim().slice(0, 40);
      low.push(`${element.tagName}.${element.className} "${text}" ${ratio.toFixed(2)}`);
    }
  }
  return low;
}"""


def _screenshot(page: Page, directory: Path, name: str, full_page: bool = True) -> Path:
    path = directory / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG), f"{path} is not a PNG screenshot"


def _api(service: DcuProcess, method: str, path: str, body: Any = None) -> Any:
    status, answer = api(service, method, path, body)
    assert status == 200, (path, status, answer)
    return answer["data"]


def _wait_terminal(service: DcuProcess, task_id: str) -> dict[str, Any]:
    return wait_until(
        lambda: _api(service, "GET", f"/status/{task_id}"),
        until=lambda data: data["state"] in {"completed", "failed"},
        timeout=120,
        what=f"task {task_id} to end",
        interval=0.25,
        describe=lambda: service.log.read_text()[-4000:],
    )


@pytest.fixture(scope="module")
def failed_task(console_service: DcuProcess, registry: Registry) -> dict[str, Any]:
    """A task of an image the registry does not have, started through the API, ended."""
    image = f"{registry.address}/dcu-missing:nope"
    started = _api(console_service, "POST", "/start", {"docker_image_name": image})
    task = _wait_terminal(console_service, started["task_id"])
    assert task["state"] == "failed" and task["error_message"], task
    return task


def test_a_task_from_the_form_to_the_downloaded_archive(
    console_page: ConsolePage,
    failed_task: dict[str, Any],
    pushed_images: Any,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    large = pushed_images["large"].reference
    page = console_page.page

    # Given the console, which loads without a token but cannot list tasks without one
    console_page.open()
    expect(page.locator("#notice")).to_contain_text("A valid token is needed")

    # When the token is typed, the task list appears (the failed task is on it)
    console_page.sign_in()
    expect(page.locator("#notice")).to_be_hidden()
    expect(page.locator(f'[data-task-id="{failed_task["task_id"]}"]')).to_be_visible()
    expect(page.locator("#page-status")).to_contain_text("Page 1 of 1")
    _assert_png(_screenshot(page, artifacts, "list.png"))

    # And the token lives in sessionStorage only: not localStorage, a cookie or the URL
    stored = page.evaluate(
        "() => ({session: sessionStorage.getItem('dcu.token'),"
        " local: JSON.stringify(Object.entries(localStorage)), cookie: document.cookie})"
    )
    assert stored["session"] == TOKEN
    assert TOKEN not in stored["local"] and TOKEN not in stored["cookie"]
    assert page.context.cookies() == []
    assert TOKEN not in page.url

    # When a task is started from the form, submitted with the keyboard
    page.evaluate(OBSERVE_BAR)
    page.get_by_label("Image", exact=True).fill(large)
    page.get_by_label("Archive format").select_option("docker-archive+gzip")
    page.get_by_label("Image", exact=True).focus()
    for _ in range(4):  # platform, format, username, then the Start button
        page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Start", exact=True)).to_be_focused()
    page.keyboard.press("Enter")

    # Then the page of the new task opens and its bar moves with the live events
    page.wait_for_url(re.compile(r"#/tasks/[0-9a-f-]{36}$"))
    task_id = urllib.parse.urlsplit(page.url).fragment.removeprefix("/tasks/")
    expect(page.locator("#task-heading")).to_have_text(large)
    page.wait_for_function(
        "() => new Set(window.__seen.filter((s) => s.value > 0 && s.value < 100)"
        ".map((s) => s.value)).size >= 2",
        timeout=TASK_TIMEOUT,
    )
    _assert_png(_screenshot(page, artifacts, "progress.png"))
    try:
        expect(page.locator("#task-state")).to_have_attribute(
            "data-state", "completed", timeout=TASK_TIMEOUT
        )
    except AssertionError as exc:
        status = api(console_page.service, "GET", f"/status/{task_id}")
        log = console_page.service.log.read_text()[-6000:]
        raise AssertionError(f"{exc}\nthe API says: {status}\n{log}") from None
    seen: list[dict[str, Any]] = page.evaluate("window.__seen")
    done = next(i for i, s in enumerate(seen) if s["state"] == "completed")
    running = [s["value"] for s in seen[:done] if 0 < s["value"] < 100]
    assert len(set(running)) >= 2, seen
    assert running == sorted(running), f"the bar moved back: {running}"
    # figures from progress reports, not only the stage boundaries (a third each)
    assert set(running) - {33.3, 66.7}, running
    assert seen[-1] == {"value": 100, "state": "completed"}

    # And the task page shows it completed, with its events and state changes
    expect(page.locator("#task-state")).to_have_text(re.compile("completed", re.I))
    types = page.locator("#task-events tr").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.type)"
    )
    assert types == STAGE_EVENTS, types
    expect(page.locator("#task-transitions li").last).to_have_attribute("data-state", "completed")
    task = _api(console_page.service, "GET", f"/status/{task_id}")
    assert task["username"] == USER  # the token's name, not anything typed
    expect(page.locator("#task-details")).to_contain_text(task["archive_sha256"])
    _assert_png(_screenshot(page, artifacts, "finished.png"))

    # When the download button is pressed, the archive is saved under its name
    with page.expect_download(timeout=60_000) as started:
        page.get_by_role("button", name="Download archive").click()
    download = started.value
    saved = tmp_path / "archive"
    download.save_as(saved)
    assert download.suggested_filename == Path(task["minio_object_name"]).name
    digest = hashlib.sha256()
    with saved.open("rb") as archive:
        while chunk := archive.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == task["archive_sha256"]
    assert saved.stat().st_size == task["archive_bytes"]

    # And the list shows the task completed
    page.get_by_role("link", name="Back to tasks").click()
    row = page.locator(f'[data-task-id="{task_id}"]')
    expect(row).to_have_attribute("data-state", "completed")
    expect(row.locator("progress")).to_have_attribute("value", "100")


def test_a_failed_task_shows_why(console_page: ConsolePage, failed_task: dict[str, Any]) -> None:
    page = console_page.page
    console_page.open(f"#/tasks/{failed_task['task_id']}")
    console_page.sign_in()

    alert = page.get_by_role("alert").filter(has_text="Why it failed")
    expect(alert).to_be_visible()
    expect(page.locator("#task-error-text")).to_have_text(failed_task["error_message"])
    expect(page.locator("#task-state")).to_have_attribute("data-state", "failed")
    expect(page.get_by_role("button", name="Download archive")).to_be_hidden()
    expect(page.locator("#task-events tr").last).to_have_attribute("data-type", "failed")
    assert page.evaluate(LOW_CONTRAST) == []


def test_every_control_is_labelled_and_reachable_by_keyboard(console_page: ConsolePage) -> None:
    page = console_page.page
    console_page.open()
    console_page.sign_in()
    expect(page.locator("#page-status")).to_contain_text("Page 1")

    controls = page.locator("input, select").evaluate_all(
        "(all) => all.filter((c) => c.checkVisibility()).map((c) => c.id)"
    )
    assert len(controls) >= 9, controls
    for control in controls:
        label = page.locator(f'label[for="{control}"]').inner_text().strip()
        assert label, f"#{control} has no label text"
        found = page.get_by_label(label, exact=True)
        expect(found).to_have_count(1)
        assert found.get_attribute("id") == control, (label, control)

    # every button has a name, and focus moved by Tab is drawn
    names = page.locator("button").evaluate_all(
        "(all) => all.filter((b) => b.checkVisibility()).map((b) => b.textContent.trim())"
    )
    assert names and all(names), names
    page.locator("body").focus()
    outlines = []
    for _ in range(8):
        page.keyboard.press("Tab")
        outlines.append(
            page.evaluate(
                "() => { const s = getComputedStyle(document.activeElement);"
                " return [document.activeElement.id || document.activeElement.tagName,"
                " s.outlineStyle, parseFloat(s.outlineWidth)]; }"
            )
        )
    assert all(style != "none" and width >= 2 for _, style, width in outlines), outlines

    # the progress bars are <progress> elements with a name
    bars = page.locator("#task-list progress")
    assert bars.count() >= 1
    for index in range(bars.count()):
        assert bars.nth(index).get_attribute("aria-label")
    assert page.evaluate(LOW_CONTRAST) == []


def test_the_console_fits_a_narrow_screen(
    console_page: ConsolePage, failed_task: dict[str, Any], artifacts: Path
) -> None:
    page = console_page.page
    page.set_viewport_size({"width": 360, "height": 740})
    console_page.open()
    console_page.sign_in()
    expect(page.locator(f'[data-task-id="{failed_task["task_id"]}"]')).to_be_visible()

    overflow = "() => [document.documentElement.scrollWidth, window.innerWidth]"
    width, viewport = page.evaluate(overflow)
    assert width <= viewport, f"the list scrolls sideways: {width} > {viewport}"
    _assert_png(_screenshot(page, artifacts, "narrow.png"))

    page.locator(f'[data-task-id="{failed_task["task_id"]}"] a').click()
    expect(page.locator("#task-error")).to_be_visible()
    width, viewport = page.evaluate(overflow)
    assert width <= viewport, f"the task page scrolls sideways: {width} > {viewport}"
    _assert_png(_screenshot(page, artifacts, "narrow-task.png"))


# A stream cut in awkward places: CRLF split across chunks, a lone CR as line end, a
# comment, a data field over two lines, an id holding NUL (ignored), a retry, a field
# without a colon (an empty data line), and a last event without its blank line (dropped).
PARSE_STREAM = """async () => {
  const { SseParser } = await import("/console/sse.js");
  const got = [];
  const parser = new SseParser((message) => got.push(message));
  const stream = ": live\\r\\nid: a1\\r\\nevent: requested\\r\\ndata: {\\"n\\": 1}\\r\\n\\r\\n"
    + "retry: 2500\\rid: bad\\u0000id\\revent: progress\\rdata: one\\rdata:two\\r\\r"
    + "data\\n\\n"
    + "id: a3\\nevent: uploaded\\ndata: last";
  for (const piece of stream.match(/[\\s\\S]{1,3}/g)) parser.push(piece);
  parser.end();
  return { got, retry: parser.retry, dispatchedId: parser.dispatchedId };
}"""


def test_the_event_stream_parser_follows_the_standard(console_page: ConsolePage) -> None:
    page = console_page.page
    console_page.open()

    parsed = page.evaluate(PARSE_STREAM)

    assert parsed["got"] == [
        {"type": "requested", "data": '{"n": 1}', "lastEventId": "a1"},
        {"type": "progress", "data": "one\ntwo", "lastEventId": "a1"},
        {"type": "message", "data": "", "lastEventId": "a1"},
    ]
    assert parsed["retry"] == 2500
    assert parsed["dispatchedId"] == "a1"  # the unfinished event's id is not resumed from


FOLLOW = """async () => {
  const { follow } = await import("/console/sse.js");
  const got = [];
  let done = false;
  await follow("/api/dcu/events/00000000-0000-4000-8000-000000000000/stream", {
    signal: new AbortController().signal,
    isDone: () => done,
    onMessage: (message) => {
      got.push(message.type);
      done = message.type === "uploaded";
    },
  });
  return got;
}"""


def test_the_event_stream_reconnects_with_the_last_event_id(console_page: ConsolePage) -> None:
    page = console_page.page
    console_page.open()
    console_page.sign_in()
    requests: list[dict[str, str | None]] = []

    def answer(route: Any) -> None:
        headers = route.request.headers
        requests.append({name: headers.get(name) for name in ("authorization", "last-event-id")})
        if len(requests) == 1:  # two events, then the connection drops before the end
            body = "id: e1\nevent: requested\ndata: {}\n\nid: e2\nevent: progress\ndata: {}\n\n"
        else:
            body = "id: e3\nevent: uploaded\ndata: {}\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/api/dcu/events/*/stream", answer)

    assert page.evaluate(FOLLOW) == ["requested", "progress", "uploaded"]
    assert requests == [
        {"authorization": f"Bearer {TOKEN}", "last-event-id": None},
        {"authorization": f"Bearer {TOKEN}", "last-event-id": "e2"},
    ]


def test_a_chinese_browser_gets_the_chinese_labels(
    browser: Browser, console_service: DcuProcess
) -> None:
    context = browser.new_context(locale="zh-CN")
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{console_service.port}/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate("document.documentElement.lang") == "zh"
        submit = page.get_by_role("button", name=text("console.start.submit", Language.ZH))
        expect(submit).to_be_visible()
        expect(page.get_by_label(text("console.token.label", Language.ZH))).to_be_visible()
        expect(page.locator("#filter-state option[value=failed]")).to_have_text(
            text("state.failed", Language.ZH)
        )
    finally:
        context.close()


# Records the value of every progress bar of the task list as it changes.
OBSERVE_LIST = """() => {
  window.__list = [];
  const list = document.getElementById("task-list");
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.target.tagName === "PROGRESS") {
        const row = change.target.closest("[data-task-id]");
        window.__list.push({task: row.dataset.taskId, value: Number(change.target.value)});
      }
    }
  }).observe(list, {subtree: true, attributes: true, attributeFilter: ["value"]});
}"""


def test_the_list_follows_running_tasks_live(console_page: ConsolePage, pushed_images: Any) -> None:
    page = console_page.page
    console_page.open()
    console_page.sign_in()
    expect(page.locator("#page-status")).to_contain_text("Page 1")
    page.evaluate(OBSERVE_LIST)

    # Given a task started elsewhere (uncompressed: its archive differs from the other
    # test's, so nothing is reused and it takes a few seconds)
    image = pushed_images["large"].reference
    body = {"docker_image_name": image, "format": "docker-archive"}
    task_id = _api(console_page.service, "POST", "/start", body)["task_id"]
    # /query lists a task once the persistence subscriber has recorded its `requested`
    # event, a moment after the start (README); the list shows what /query says
    wait_until(
        lambda: _api(console_page.service, "GET", "/query?page_size=100")["items"],
        until=lambda items: any(item["task_id"] == task_id for item in items),
        timeout=60,
        what=f"task {task_id} to be listed by /query",
        interval=0.05,
    )

    # When the list is refreshed, its row follows the task's live events to the end
    page.get_by_role("button", name="Refresh").click()
    row = page.locator(f'[data-task-id="{task_id}"]')
    expect(row).to_have_attribute("data-state", "completed", timeout=TASK_TIMEOUT)
    values = [s["value"] for s in page.evaluate("window.__list") if s["task"] == task_id]
    assert {v for v in values if 0 < v < 100} - {33.3, 66.7}, values
    expect(row.locator(".badge")).to_have_text("completed")
