"""``GET /query`` over rows in the database: filters, order and pages, in process.

The rows are recorded from events (as the persistence subscriber records them), so no
task has to run; ``tests/e2e/test_pipeline.py`` lists tasks that really completed.
"""

from __future__ import annotations

from datetime import timedelta

from tests.e2e.helpers import STATUS_FIELDS
from tests.gateway.conftest import Gateway
from tests.timeline import T0, Timeline

SMALL = "127.0.0.1:5000/dcu-small:1.0"
NESTED = "127.0.0.1:5000/team/sub/app:v1.2.3-rc.1"


async def record_tasks(gateway: Gateway) -> list[str]:
    """Five tasks, each started a minute after the one before: alice's SMALL (completed),
    bob's SMALL (completed), alice's NESTED (failed), alice's SMALL (idle), bob's NESTED
    (completed). Returns their ids, oldest first."""
    ids = []
    plans = [
        ("alice", SMALL, "completed"),
        ("bob", SMALL, "completed"),
        ("alice", NESTED, "failed"),
        ("alice", SMALL, "idle"),
        ("bob", NESTED, "completed"),
    ]
    for index, (user, image, end) in enumerate(plans):
        timeline = Timeline(start=T0 + timedelta(minutes=index))
        if end == "completed":
            events = timeline.happy_path(image, user)
        elif end == "failed":
            events = [timeline.requested(image, user), timeline.failed()]
        else:
            events = [timeline.requested(image, user)]
        await gateway.record(*events)
        ids.append(timeline.task_id)
    return ids


async def test_query_filters_orders_and_pages_the_rows(gateway: Gateway) -> None:
    ids = await record_tasks(gateway)

    # Every task, newest first, in pages that split that order
    status, body = await gateway.get("/query?page_size=2")
    assert status == 200, body
    assert body["data"]["total"] == 5
    pages = [body["data"]["items"]]
    for page in (2, 3):
        status, body = await gateway.get(f"/query?page_size=2&page={page}")
        assert status == 200, body
        assert body["data"]["total"] == 5
        pages.append(body["data"]["items"])
    assert [[item["task_id"] for item in items] for items in pages] == [
        [ids[4], ids[3]],
        [ids[2], ids[1]],
        [ids[0]],
    ]
    assert all(STATUS_FIELDS <= set(item) for items in pages for item in items)

    # Past the last page: the total, and no items
    status, body = await gateway.get("/query?page_size=2&page=4")
    assert status == 200, body
    assert body["data"] == {"total": 5, "items": []}

    # Filters combine: a user, an image substring (any case), a state
    status, body = await gateway.get("/query?username=alice&docker_image_name=DCU-small")
    assert status == 200, body
    assert [item["task_id"] for item in body["data"]["items"]] == [ids[3], ids[0]]
    status, body = await gateway.get("/query?state=completed&username=bob")
    assert status == 200, body
    assert body["data"]["total"] == 2
    assert {item["state"] for item in body["data"]["items"]} == {"completed"}
    status, body = await gateway.get("/query?state=failed")
    assert status == 200, body
    [failed] = body["data"]["items"]
    assert (failed["task_id"], failed["username"]) == (ids[2], "alice")
    assert failed["error_message"]
