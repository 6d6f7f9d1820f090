from __future__ import annotations

import itertools

import pytest

from events.states import LEGAL_TRANSITIONS, TaskState, Verdict, decide, is_legal

SEED_LEGAL = {
    ("idle", "downloading"),
    ("idle", "failed"),
    ("downloading", "compressing"),
    ("downloading", "failed"),
    ("compressing", "uploading"),
    ("compressing", "failed"),
    ("uploading", "completed"),
    ("uploading", "failed"),
}

ALL_PAIRS = list(itertools.product(TaskState, TaskState))


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS, ids=lambda s: s.value)
def test_every_pair_is_judged_as_the_seed_says(current: TaskState, target: TaskState) -> None:
    decision = decide(current, target)
    if current == target:
        assert decision.verdict is Verdict.ALREADY
    elif (current.value, target.value) in SEED_LEGAL:
        assert decision.verdict is Verdict.APPLY
        assert is_legal(current, target)
    else:
        assert decision.verdict is Verdict.ILLEGAL
        assert not is_legal(current, target)
        assert decision.reason == f"illegal transition {current} -> {target}"


def test_legal_table_is_exactly_the_seed() -> None:
    assert {(a.value, b.value) for a, b in LEGAL_TRANSITIONS} == SEED_LEGAL


@pytest.mark.parametrize("state", [TaskState.COMPLETED, TaskState.FAILED])
def test_terminal_states_have_no_way_out(state: TaskState) -> None:
    assert state.terminal
    assert not any(is_legal(state, other) for other in TaskState)


@pytest.mark.parametrize(
    ("state", "progress", "display"),
    [
        ("idle", 0, "等待中"),
        ("downloading", 25, "下载镜像中"),
        ("compressing", 50, "压缩镜像中"),
        ("uploading", 75, "上传镜像中"),
        ("completed", 100, "已完成"),
        ("failed", -1, "失败"),
    ],
)
def test_progress_and_display(state: str, progress: int, display: str) -> None:
    assert TaskState(state).progress == progress
    assert TaskState(state).display == display
