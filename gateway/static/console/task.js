// The task view (#/tasks/<id>): state, live progress, details, the error of a failed task,
// the download button, the state changes and the event history.

import { ApiError, API, api, locateArchive, saveAs } from "./api.js";
import {
  byId, formatBytes, formatDuration, formatPercent, formatRate, formatTime, h, notify, setBar,
  stateText,
} from "./dom.js";
import { t } from "./i18n.js";
import { reportError } from "./list.js";
import { TERMINAL, TaskProgress, targetState } from "./progress.js";
import { eachEvent, follow } from "./sse.js";

const REFRESH_ATTEMPTS = 15;

function summary(event) {
  const p = event.payload || {};
  const bytes = (value) => (typeof value === "number" ? formatBytes(value) : "");
  const seconds = (value) => (typeof value === "number" && value > 0 ? `${value.toFixed(1)} s` : "");
  const parts = {
    requested: () => [p.username, p.docker_image_name, p.platform, p.format],
    download_started: () => [p.worker, p.attempt > 1 ? `#${p.attempt}` : ""],
    compress_started: () => [p.worker, p.attempt > 1 ? `#${p.attempt}` : ""],
    upload_started: () => [p.worker, p.attempt > 1 ? `#${p.attempt}` : ""],
    downloaded: () => [bytes(p.bytes), seconds(p.seconds), p.engine, p.platform],
    compressed: () => [
      `${bytes(p.bytes_in)} → ${bytes(p.bytes_out)}`, p.method, seconds(p.seconds),
    ],
    uploaded: () => [p.minio_object_name, bytes(p.bytes), seconds(p.seconds)],
    failed: () => [p.stage, p.reason],
    progress: () => [p.stage, bytes(p.bytes_done), formatRate(p.rate)],
  }[event.type];
  return (parts ? parts() : []).filter(Boolean).join(" · ");
}

export class TaskView {
  constructor() {
    this.view = byId("task-view");
    this.taskId = null;
    this.controller = null;
    this.task = null;
    this.progress = new TaskProgress();
    this.events = [];
    this.seen = new Set();
    byId("task-download").addEventListener("click", () => this.download());
  }

  hide() {
    this.view.hidden = true;
    this.stop();
    this.taskId = null;
  }

  stop() {
    if (this.controller) {
      this.controller.abort();
      this.controller = null;
    }
  }

  async show(taskId, { focus = false } = {}) {
    this.stop();
    this.taskId = taskId;
    this.controller = new AbortController();
    const { signal } = this.controller;
    this.view.hidden = false;
    this.events = [];
    this.seen = new Set();
    byId("task-heading").textContent = t("console.loading");
    byId("task-download-status").textContent = "";
    let task;
    try {
      task = await api(`/status/${encodeURIComponent(taskId)}`, { signal });
    } catch (error) {
      if (signal.aborted) {
        return;
      }
      byId("task-heading").textContent = error.status === 404
        ? t("console.task.not_found")
        : error.message;
      this.clear();
      reportError(error);
      return;
    }
    if (signal.aborted) {
      return;
    }
    notify("");
    this.progress = new TaskProgress(task);
    this.renderTask(task);
    if (focus) {
      byId("task-heading").focus();
    }
    await this.loadHistory(signal);
    if (!this.progress.terminal && !signal.aborted) {
      this.followLive(signal);
    }
  }

  clear() {
    byId("task-state").textContent = "";
    byId("task-details").replaceChildren();
    byId("task-events").replaceChildren();
    byId("task-transitions").replaceChildren();
    byId("task-error").hidden = true;
    byId("task-download").hidden = true;
    setBar(byId("task-progress"), 0, "idle");
    byId("task-progress-text").textContent = "";
  }

  async loadHistory(signal) {
    let history;
    try {
      history = await api(
        `/events/${encodeURIComponent(this.taskId)}?include_progress=false`, { signal },
      );
    } catch (error) {
      if (!signal.aborted && !(error instanceof ApiError && error.status === 404)) {
        reportError(error);
      }
      return;
    }
    if (signal.aborted) {
      return;
    }
    const note = byId("events-note");
    note.hidden = !history.truncated;
    note.textContent = history.truncated
      ? t("console.task.truncated", { count: history.events.length })
      : "";
    for (const event of history.events) {
      this.record(event);
    }
    this.renderEvents();
  }

  /** Remember a fact (not a progress report) once. */
  record(event) {
    if (event.type === "progress" || this.seen.has(event.event_id)) {
      return false;
    }
    this.seen.add(event.event_id);
    this.events.push(event);
    return true;
  }

  followLive(signal) {
    const url = `${API}/events/${encodeURIComponent(this.taskId)}/stream?include_progress=true`;
    const live = byId("task-progress-text");
    follow(url, {
      signal,
      isDone: () => this.progress.terminal,
      onConnection: (state) => {
        live.dataset.connection = state;
        if (state === "lost") {
          live.textContent = t("console.error.stream");
        }
      },
      onMessage: eachEvent((event) => {
        const wasTerminal = this.progress.terminal;
        this.progress.apply(event);
        if (this.record(event)) {
          this.renderEvents();
        }
        this.paintProgress();
        if (!wasTerminal && this.progress.terminal) {
          this.refresh(signal);
        }
      }),
    }).catch((error) => {
      if (!signal.aborted) {
        reportError(error);
      }
    });
  }

  /**
   * The task's final answer (archive, checksum, error) once its terminal event came. The
   * stream can be ahead of the database, which records the event a moment later: until
   * /status says the task ended too, ask again (the page keeps what the events said).
   */
  async refresh(signal) {
    for (let attempt = 0; attempt < REFRESH_ATTEMPTS && !signal.aborted; attempt += 1) {
      let task;
      try {
        task = await api(`/status/${encodeURIComponent(this.taskId)}`, { signal });
      } catch (error) {
        if (!signal.aborted) {
          reportError(error);
        }
        return;
      }
      if (signal.aborted) {
        return;
      }
      if (TERMINAL.has(task.state)) {
        this.progress = new TaskProgress(task);
        this.renderTask(task);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(200 * 2 ** attempt, 2000)));
    }
  }

  renderTask(task) {
    this.task = task;
    document.title = `${task.docker_image_name} · DCU`;
    byId("task-heading").textContent = task.docker_image_name;
    this.paintProgress(task.state_display);
    const rows = [
      ["console.task.id", task.task_id, "mono"],
      ["console.task.user", task.username],
      ["console.task.platform", task.platform],
      ["console.task.format", task.format],
      ["console.task.started", task.start_time],
      ["console.task.ended", task.end_time],
      ["console.task.duration", formatDuration(task.duration)],
      ["console.task.file", task.minio_object_name || task.gzip_file_name, "mono"],
      ["console.task.size", formatBytes(task.archive_bytes)],
      ["console.task.sha256", task.archive_sha256, "mono"],
      ["console.task.engine", task.engine],
      [
        "console.task.reused",
        typeof task.reused === "boolean" ? t(task.reused ? "console.yes" : "console.no") : "",
      ],
    ];
    byId("task-details").replaceChildren(
      ...rows
        .filter(([, value]) => value !== null && value !== undefined && value !== "")
        .map(([key, value, kind]) =>
          h("div", { class: "detail" }, h("dt", {}, t(key)), h("dd", { class: kind }, value)),
        ),
    );
    byId("task-download").hidden = task.state !== "completed";
  }

  paintProgress(display) {
    const progress = this.progress;
    const badge = byId("task-state");
    badge.dataset.state = progress.state;
    badge.textContent = display || stateText(progress.state);
    const bar = byId("task-progress");
    bar.setAttribute(
      "aria-label",
      t("console.progress.label", { image: this.task ? this.task.docker_image_name : "" }),
    );
    setBar(bar, progress.overall, progress.state);
    const parts = [progress.state === "failed" ? "" : formatPercent(progress.overall)];
    if (!progress.terminal && progress.stage) {
      const stage = t(`console.stage.${progress.stage}`);
      const share = progress.stagePercent === null ? "" : ` ${formatPercent(progress.stagePercent)}`;
      parts.push(`${stage}${share}`);
      parts.push(formatRate(progress.rate));
    }
    const text = byId("task-progress-text");
    text.dataset.connection = "";
    text.textContent = parts.filter(Boolean).join(" · ");
    const failed = progress.state === "failed";
    const reason = (this.task && this.task.error_message) || progress.reason;
    byId("task-error").hidden = !(failed && reason);
    byId("task-error-text").textContent = failed && reason ? reason : "";
    byId("task-download").hidden = progress.state !== "completed" || !this.task
      || this.task.state !== "completed";
  }

  renderEvents() {
    const events = this.events; // stream order: the history, then live events
    byId("task-events").replaceChildren(
      ...events.map((event) =>
        h(
          "tr",
          { "data-type": event.type },
          h("td", { "data-label": t("console.event.time") }, formatTime(event.time)),
          h("td", { class: "mono", "data-label": t("console.event.type") }, event.type),
          h("td", { "data-label": t("console.event.detail") }, summary(event)),
        ),
      ),
    );
    let state = null;
    const changes = [];
    for (const event of events) {
      const target = targetState(event.type);
      if (target === null || target === state) {
        continue;
      }
      changes.push(
        h(
          "li",
          { "data-state": target },
          h("span", { class: "timeline-time" }, formatTime(event.time)),
          h(
            "span",
            { class: "timeline-change" },
            state === null ? stateText(target) : `${stateText(state)} → ${stateText(target)}`,
          ),
        ),
      );
      state = target;
    }
    byId("task-transitions").replaceChildren(...changes);
  }

  async download() {
    const status = byId("task-download-status");
    const button = byId("task-download");
    status.dataset.kind = "";
    status.textContent = t("console.task.preparing");
    button.disabled = true;
    try {
      const fallback = this.task && (this.task.gzip_file_name || "archive");
      const where = await locateArchive(this.taskId, fallback);
      saveAs(where);
      status.textContent = `${t("console.task.download_started")}: ${where.fileName}`;
    } catch (error) {
      reportError(error, status);
    } finally {
      button.disabled = false;
    }
  }
}
