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
    # the web console's labels (gateway.console serves them as /console/messages.json)
    "console.title": {Language.ZH: "DCU 控制台", Language.EN: "DCU console"},
    "console.tagline": {
        Language.ZH: "容器镜像离线打包",
        Language.EN: "Container images packaged for offline delivery",
    },
    "console.skip": {Language.ZH: "跳到主要内容", Language.EN: "Skip to main content"},
    "console.loading": {Language.ZH: "加载中…", Language.EN: "Loading…"},
    "console.error.auth": {
        Language.ZH: "需要有效的令牌：请在上方输入 API 令牌",  # noqa: RUF001
        Language.EN: "A valid token is needed: enter your API token above",
    },
    "console.error.network": {
        Language.ZH: "无法连接到服务",
        Language.EN: "Cannot reach the service",
    },
    "console.error.stream": {
        Language.ZH: "实时更新中断，正在重新连接…",  # noqa: RUF001
        Language.EN: "Live updates lost, reconnecting…",
    },
    "console.token.label": {Language.ZH: "API 令牌", Language.EN: "API token"},
    "console.token.hint": {
        Language.ZH: "只保存在本标签页的会话中，关闭标签页即清除",  # noqa: RUF001
        Language.EN: "Kept in this tab's session only, gone when the tab closes",
    },
    "console.token.save": {Language.ZH: "使用令牌", Language.EN: "Use token"},
    "console.token.forget": {Language.ZH: "清除令牌", Language.EN: "Forget token"},
    "console.token.set": {Language.ZH: "已设置令牌", Language.EN: "Token set"},
    "console.token.unset": {Language.ZH: "未设置令牌", Language.EN: "No token"},
    "console.start.heading": {Language.ZH: "新建任务", Language.EN: "Start a task"},
    "console.start.image": {Language.ZH: "镜像", Language.EN: "Image"},
    "console.start.image_hint": {
        Language.ZH: "镜像引用，例如 nginx:latest 或 registry:5000/team/app:1.2",  # noqa: RUF001
        Language.EN: "An image reference, e.g. nginx:latest or registry:5000/team/app:1.2",
    },
    "console.start.platform": {
        Language.ZH: "平台（可选）",  # noqa: RUF001
        Language.EN: "Platform (optional)",
    },
    "console.start.platform_hint": {
        Language.ZH: "os/架构，例如 linux/arm64；留空使用服务的默认平台",  # noqa: RUF001
        Language.EN: "os/architecture, e.g. linux/arm64; empty: the service's default",
    },
    "console.start.format": {Language.ZH: "归档格式", Language.EN: "Archive format"},
    "console.start.username": {Language.ZH: "用户名", Language.EN: "Username"},
    "console.start.username_hint": {
        Language.ZH: "使用令牌时任务属于令牌的名字",
        Language.EN: "With a token, the task belongs to the token's name",
    },
    "console.start.submit": {Language.ZH: "开始打包", Language.EN: "Start"},
    "console.start.started": {Language.ZH: "任务已启动", Language.EN: "Task started"},
    "console.format.docker_gzip": {
        Language.ZH: "docker-archive+gzip（.tar.gz）",  # noqa: RUF001
        Language.EN: "docker-archive+gzip (.tar.gz)",
    },
    "console.format.docker": {
        Language.ZH: "docker-archive（.tar）",  # noqa: RUF001
        Language.EN: "docker-archive (.tar)",
    },
    "console.format.oci": {
        Language.ZH: "oci-archive（.oci.tar）",  # noqa: RUF001
        Language.EN: "oci-archive (.oci.tar)",
    },
    "console.start.format_hint": {
        Language.ZH: "docker load 读取 .tar.gz；podman、skopeo、ctr 读取 .tar 和 .oci.tar",  # noqa: RUF001
        Language.EN: "docker load reads .tar.gz; podman, skopeo and ctr read .tar and .oci.tar",
    },
    "console.tasks.heading": {Language.ZH: "任务", Language.EN: "Tasks"},
    "console.filter.image": {Language.ZH: "镜像名包含", Language.EN: "Image name contains"},
    "console.filter.username": {Language.ZH: "用户", Language.EN: "User"},
    "console.filter.state": {Language.ZH: "状态", Language.EN: "State"},
    "console.filter.any": {Language.ZH: "全部", Language.EN: "Any"},
    "console.filter.apply": {Language.ZH: "筛选", Language.EN: "Filter"},
    "console.filter.reset": {Language.ZH: "重置", Language.EN: "Reset"},
    "console.list.refresh": {Language.ZH: "刷新", Language.EN: "Refresh"},
    "console.list.empty": {Language.ZH: "没有符合条件的任务", Language.EN: "No tasks match"},
    "console.list.started": {Language.ZH: "开始于", Language.EN: "Started"},
    "console.list.duration": {Language.ZH: "耗时", Language.EN: "Duration"},
    "console.list.user": {Language.ZH: "用户", Language.EN: "User"},
    "console.page.prev": {Language.ZH: "上一页", Language.EN: "Previous"},
    "console.page.next": {Language.ZH: "下一页", Language.EN: "Next"},
    "console.page.size": {Language.ZH: "每页", Language.EN: "Per page"},
    "console.page.status": {
        Language.ZH: "第 {page} / {pages} 页 · 共 {total} 个任务",
        Language.EN: "Page {page} of {pages} · {total} in all",
    },
    "console.progress.label": {Language.ZH: "{image} 的进度", Language.EN: "Progress of {image}"},
    "console.stage.download": {Language.ZH: "下载", Language.EN: "download"},
    "console.stage.compress": {Language.ZH: "压缩", Language.EN: "compress"},
    "console.stage.upload": {Language.ZH: "上传", Language.EN: "upload"},
    "console.task.back": {Language.ZH: "返回任务列表", Language.EN: "Back to tasks"},
    "console.task.details": {Language.ZH: "详细信息", Language.EN: "Details"},
    "console.task.id": {Language.ZH: "任务 ID", Language.EN: "Task ID"},
    "console.task.user": {Language.ZH: "用户", Language.EN: "User"},
    "console.task.state": {Language.ZH: "状态", Language.EN: "State"},
    "console.task.platform": {Language.ZH: "平台", Language.EN: "Platform"},
    "console.task.format": {Language.ZH: "格式", Language.EN: "Format"},
    "console.task.started": {Language.ZH: "开始时间", Language.EN: "Started"},
    "console.task.ended": {Language.ZH: "结束时间", Language.EN: "Ended"},
    "console.task.duration": {Language.ZH: "耗时", Language.EN: "Duration"},
    "console.task.file": {Language.ZH: "文件", Language.EN: "File"},
    "console.task.size": {Language.ZH: "归档大小", Language.EN: "Archive size"},
    "console.task.sha256": {Language.ZH: "SHA-256", Language.EN: "SHA-256"},
    "console.task.engine": {Language.ZH: "下载引擎", Language.EN: "Download engine"},
    "console.task.reused": {Language.ZH: "复用已有归档", Language.EN: "Reused an existing archive"},
    "console.task.stage": {Language.ZH: "当前阶段", Language.EN: "Current stage"},
    "console.task.rate": {Language.ZH: "速度", Language.EN: "Rate"},
    "console.task.error": {Language.ZH: "失败原因", Language.EN: "Why it failed"},
    "console.task.download": {Language.ZH: "下载归档", Language.EN: "Download archive"},
    "console.task.preparing": {
        Language.ZH: "正在准备下载…",
        Language.EN: "Preparing the download…",
    },
    "console.task.download_started": {Language.ZH: "下载已开始", Language.EN: "Download started"},
    "console.task.not_found": {Language.ZH: "没有这个任务", Language.EN: "No such task"},
    "console.task.transitions": {Language.ZH: "状态变化", Language.EN: "State changes"},
    "console.task.events": {Language.ZH: "事件记录", Language.EN: "Event history"},
    "console.task.truncated": {
        Language.ZH: "只显示前 {count} 个事件",
        Language.EN: "Only the first {count} events are shown",
    },
    "console.task.live": {Language.ZH: "实时更新中", Language.EN: "Updating live"},
    "console.event.time": {Language.ZH: "时间", Language.EN: "Time"},
    "console.event.type": {Language.ZH: "事件", Language.EN: "Event"},
    "console.event.detail": {Language.ZH: "内容", Language.EN: "Detail"},
    "console.yes": {Language.ZH: "是", Language.EN: "yes"},
    "console.no": {Language.ZH: "否", Language.EN: "no"},
    "console.page.nav": {Language.ZH: "分页", Language.EN: "Pages"},
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
