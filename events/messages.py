"""The one message catalogue: every fixed text DCU shows a person, in each language.

Chinese is the default (the seed's ``任务已启动`` and state names); English is given to a
request that asks for it with ``Accept-Language`` or by the ``server.language`` setting.
Keys are dotted: ``state.<state>`` for ``state_display``, ``api.*`` for the envelope's fixed
messages, ``console.*`` for the web console's labels. Error messages that explain a
refusal (``images[1]: repository name must be lowercase``) quote input and technical terms
and stay English in every language.

``Accept-Language`` is parsed here (RFC 9110 §12.5.4: a list of ranges with ``q`` weights)
rather than with a library: the only candidates (Babel, werkzeug) are large frameworks for a
15-line job, and DCU needs only the primary subtag of two languages.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Language(enum.StrEnum):
    ZH = "zh"
    EN = "en"


DEFAULT_LANGUAGE = Language.ZH

# key -> text per language; every key has every language (tests/unit/test_messages.py)
CATALOGUE: Mapping[str, Mapping[Language, str]] = {
    # envelope messages
    "api.success": {Language.ZH: "success", Language.EN: "success"},
    "api.started": {Language.ZH: "任务已启动", Language.EN: "task started"},
    # state_display (the seed's table, in the status example's fuller form)
    "state.idle": {Language.ZH: "等待中", Language.EN: "waiting"},
    "state.downloading": {Language.ZH: "下载镜像中", Language.EN: "downloading image"},
    "state.compressing": {Language.ZH: "压缩镜像中", Language.EN: "compressing image"},
    "state.uploading": {Language.ZH: "上传镜像中", Language.EN: "uploading image"},
    "state.completed": {Language.ZH: "已完成", Language.EN: "completed"},
    "state.failed": {Language.ZH: "失败", Language.EN: "failed"},
}


def text(key: str, language: Language = DEFAULT_LANGUAGE) -> str:
    """The text of ``key`` in ``language``; KeyError for a key the catalogue lacks."""
    return CATALOGUE[key][language]


def catalogue(language: Language, prefix: str = "") -> dict[str, str]:
    """Every text whose key starts with ``prefix``, in ``language`` (for the console)."""
    return {key: texts[language] for key, texts in CATALOGUE.items() if key.startswith(prefix)}


def negotiate(accept_language: str | None, default: Language = DEFAULT_LANGUAGE) -> Language:
    """The language ``Accept-Language`` prefers among ours, else ``default``.

    ``en-US,en;q=0.9,zh;q=0.1`` gives English; ``*`` or no match gives ``default``; a range
    with ``q=0`` is refused, not chosen; a malformed weight counts as 0. Ties keep the
    header's order.
    """
    if not accept_language:
        return default
    best: tuple[float, Language] | None = None
    for item in accept_language.split(",")[:32]:  # a bounded header: at most 32 ranges
        tag, _, params = item.strip().partition(";")
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        primary = tag.strip().lower().split("-", 1)[0]
        try:
            language = Language(primary)
        except ValueError:
            continue
        if weight > 0 and (best is None or weight > best[0]):
            best = (weight, language)
    return default if best is None else best[1]
