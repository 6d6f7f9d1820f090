"""The task state machine: states, legal transitions, progress and display strings.

Who moves a task out of each state:

* ``idle``: the download actor (to ``downloading``), or any stage that gives up before
  starting (to ``failed``).
* ``downloading``: the compress actor when it starts (to ``compressing``) or the download
  actor when the pull or export fails (to ``failed``).
* ``compressing``: the upload actor when it starts (to ``uploading``) or the compress actor.
* ``uploading``: the upload actor, to ``completed`` or ``failed``.
* ``completed`` and ``failed`` are terminal: nothing moves a task out of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from events import messages


class TaskState(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    COMPRESSING = "compressing"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def progress(self) -> int:
        return PROGRESS[self]

    @property
    def display(self) -> str:
        """The seed's name of the state (Chinese, the default language)."""
        return messages.text(f"state.{self.value}")

    def display_in(self, language: messages.Language) -> str:
        return messages.text(f"state.{self.value}", language)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


PROGRESS: dict[TaskState, int] = {
    TaskState.IDLE: 0,
    TaskState.DOWNLOADING: 25,
    TaskState.COMPRESSING: 50,
    TaskState.UPLOADING: 75,
    TaskState.COMPLETED: 100,
    TaskState.FAILED: -1,
}

# state_display comes from events.messages (``state.<state>``): the seed's state table says
# 下载中/压缩中/上传中 while its status example says 压缩镜像中; the display strings follow the
# example's fuller form consistently for every running stage.

TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED})

LEGAL_TRANSITIONS: frozenset[tuple[TaskState, TaskState]] = frozenset(
    {
        (TaskState.IDLE, TaskState.DOWNLOADING),
        (TaskState.IDLE, TaskState.FAILED),
        (TaskState.DOWNLOADING, TaskState.COMPRESSING),
        (TaskState.DOWNLOADING, TaskState.FAILED),
        (TaskState.COMPRESSING, TaskState.UPLOADING),
        (TaskState.COMPRESSING, TaskState.FAILED),
        (TaskState.UPLOADING, TaskState.COMPLETED),
        (TaskState.UPLOADING, TaskState.FAILED),
    }
)


class Verdict(enum.Enum):
    """What applying a requested state change to a task's current state means."""

    APPLY = "apply"  # legal: record the transition
    ALREADY = "already"  # the task is already there (a redelivered or replayed event)
    ILLEGAL = "illegal"  # refused: record the conflict, leave the task as it is


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    current: TaskState
    target: TaskState

    @property
    def reason(self) -> str:
        if self.verdict is Verdict.ILLEGAL:
            return f"illegal transition {self.current} -> {self.target}"
        return ""


def decide(current: TaskState, target: TaskState) -> Decision:
    """Judge a move from ``current`` to ``target`` without side effects."""
    if current == target:
        return Decision(Verdict.ALREADY, current, target)
    if (current, target) in LEGAL_TRANSITIONS:
        return Decision(Verdict.APPLY, current, target)
    return Decision(Verdict.ILLEGAL, current, target)


def is_legal(current: TaskState, target: TaskState) -> bool:
    return (current, target) in LEGAL_TRANSITIONS
