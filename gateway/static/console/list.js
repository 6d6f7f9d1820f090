// The list view: the start form, the filters, one page of tasks and live progress for
// the unfinished tasks shown.

import { ApiError, api, API } from "./api.js";
import {
  byId, formatDuration, formatPercent, formatRate, h, notify, setBar, stateText,
} from "./dom.js";
import { t } from "./i18n.js";
import { TERMINAL, TaskProgress } from "./progress.js";
import { eachEvent, follow } from "./sse.js";

const PAGE_SIZES = ["10", "20", "50"];
const MAX_LIVE = 4; // streams kept open at once: browsers allow 6 connections per host
const FILTERS = ["docker_image_name", "username", "state"];

export function reportError(error, where) {
  if (error instanceof ApiError && error.status === 401) {
    notify(t("console.error.auth"));
  } else if (error instanceof ApiError && error.status === 0) {
    notify(t("console.error.network"));
  }
  if (where) {
    where.textContent = error.message;
    where.dataset.kind = "error";
  }
}

/** The list's query from the hash (`#/?state=failed&page=2`). */
export function queryOf(hash) {
  const at = hash.indexOf("?");
  const params = new URLSearchParams(at < 0 ? "" : hash.slice(at + 1));
  const page = Number.parseInt(params.get("page") || "1", 10);
  const size = params.get("page_size") || "10";
  return {
    docker_image_name: params.get("docker_image_name") || "",
    username: params.get("username") || "",
    state: params.get("state") || "",
    page: Number.isFinite(page) && page > 0 ? page : 1,
    page_size: PAGE_SIZES.includes(size) ? size : "10",
  };
}

function hashOf(query) {
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    if (query[name]) {
      params.set(name, query[name]);
    }
  }
  if (query.page > 1) {
    params.set("page", String(query.page));
  }
  if (query.page_size !== "10") {
    params.set("page_size", query.page_size);
  }
  const text = params.toString();
  return text ? `#/?${text}` : "#/";
}

export class ListView {
  constructor() {
    this.view = byId("list-view");
    this.list = byId("task-list");
    this.status = byId("list-status");
    this.query = queryOf("");
    this.live = new Map(); // task id -> AbortController
    this.rows = new Map(); // task id -> {row, progress}
    this.generation = 0;
    this.reloadTimer = null;
    this.bind();
  }

  bind() {
    const filters = byId("filter-form");
    filters.addEventListener("submit", (event) => {
      event.preventDefault();
      const data = new FormData(filters);
      const query = { ...this.query, page: 1 };
      for (const name of FILTERS) {
        query[name] = String(data.get(name) || "").trim();
      }
      this.navigate(query);
    });
    filters.addEventListener("reset", () => {
      setTimeout(() => this.navigate({ ...queryOf(""), page_size: this.query.page_size }), 0);
    });
    byId("refresh").addEventListener("click", () => this.load());
    byId("page-prev").addEventListener("click", () =>
      this.navigate({ ...this.query, page: Math.max(1, this.query.page - 1) }),
    );
    byId("page-next").addEventListener("click", () =>
      this.navigate({ ...this.query, page: this.query.page + 1 }),
    );
    byId("page-size").addEventListener("change", (event) =>
      this.navigate({ ...this.query, page: 1, page_size: event.target.value }),
    );
    byId("start-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.start(event.target);
    });
  }

  navigate(query) {
    const hash = hashOf(query);
    if (location.hash === hash || (hash === "#/" && location.hash === "")) {
      this.show(query);
    } else {
      location.hash = hash; // the router calls show()
    }
  }

  show(query) {
    this.query = query;
    this.view.hidden = false;
    byId("filter-image").value = query.docker_image_name;
    byId("filter-username").value = query.username;
    byId("filter-state").value = query.state;
    byId("page-size").value = query.page_size;
    return this.load();
  }

  hide() {
    this.view.hidden = true;
    this.stopLive();
    clearTimeout(this.reloadTimer);
  }

  stopLive() {
    for (const controller of this.live.values()) {
      controller.abort();
    }
    this.live.clear();
  }

  async load() {
    const generation = ++this.generation;
    const params = new URLSearchParams();
    for (const name of FILTERS) {
      if (this.query[name]) {
        params.set(name, this.query[name]);
      }
    }
    params.set("page", String(this.query.page));
    params.set("page_size", this.query.page_size);
    this.status.dataset.kind = "";
    this.status.textContent = t("console.loading");
    let page;
    try {
      page = await api(`/query?${params}`);
    } catch (error) {
      if (generation === this.generation) {
        this.stopLive();
        this.list.replaceChildren();
        reportError(error, this.status);
        this.pager(0);
      }
      return;
    }
    if (generation !== this.generation) {
      return; // a newer load is under way
    }
    notify("");
    this.render(page);
  }

  render(page) {
    this.stopLive();
    this.rows.clear();
    this.list.replaceChildren(...page.items.map((task) => this.row(task)));
    this.status.textContent = page.items.length ? "" : t("console.list.empty");
    this.pager(page.total);
    const unfinished = page.items.filter((task) => !TERMINAL.has(task.state));
    for (const task of unfinished.slice(0, MAX_LIVE)) {
      this.follow(task.task_id);
    }
  }

  pager(total) {
    const size = Number(this.query.page_size);
    const pages = Math.max(1, Math.ceil(total / size));
    byId("page-status").textContent = t("console.page.status", {
      page: this.query.page,
      pages,
      total,
    });
    byId("page-prev").disabled = this.query.page <= 1;
    byId("page-next").disabled = this.query.page >= pages;
  }

  row(task) {
    const progress = new TaskProgress(task);
    const bar = h("progress", {
      class: "bar",
      max: "100",
      value: "0",
      "aria-label": t("console.progress.label", { image: task.docker_image_name }),
    });
    const percent = h("span", { class: "progress-text" });
    const badge = h("span", { class: "badge" });
    const meta = [task.username, task.start_time, formatDuration(task.duration)].filter(Boolean);
    const row = h(
      "li",
      { class: "task-row", "data-task-id": task.task_id },
      h(
        "div",
        { class: "task-main" },
        h("a", { class: "task-image", href: `#/tasks/${task.task_id}` }, task.docker_image_name),
        h("p", { class: "task-meta" }, meta.join(" · ")),
        task.state === "failed" && task.error_message
          ? h("p", { class: "task-error" }, task.error_message)
          : null,
      ),
      badge,
      h("div", { class: "task-progress" }, bar, percent),
    );
    const entry = { row, bar, percent, badge, progress, display: task.state_display };
    this.rows.set(task.task_id, entry);
    this.paint(entry);
    return row;
  }

  paint(entry) {
    const { progress } = entry;
    entry.row.dataset.state = progress.state;
    entry.badge.dataset.state = progress.state;
    entry.badge.textContent = entry.display || stateText(progress.state);
    setBar(entry.bar, progress.overall, progress.state);
    const rate = progress.terminal ? "" : formatRate(progress.rate);
    const percent = progress.state === "failed" ? "" : formatPercent(progress.overall);
    entry.percent.textContent = [percent, rate].filter(Boolean).join(" · ");
  }

  follow(taskId) {
    const controller = new AbortController();
    this.live.set(taskId, controller);
    const entry = this.rows.get(taskId);
    const url = `${API}/events/${encodeURIComponent(taskId)}/stream?include_progress=true`;
    follow(url, {
      signal: controller.signal,
      isDone: () => entry.progress.terminal,
      onMessage: eachEvent((event) => {
        const wasTerminal = entry.progress.terminal;
        if (entry.progress.apply(event)) {
          entry.display = null; // the API's display text is for the state it answered
          this.paint(entry);
        }
        if (!wasTerminal && entry.progress.terminal) {
          this.scheduleReload();
        }
      }),
    }).catch(() => {
      // the stream was refused (the list shows what /query said)
    }).finally(() => {
      if (this.live.get(taskId) === controller) {
        this.live.delete(taskId);
      }
    });
  }

  scheduleReload() {
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => {
      if (!this.view.hidden) {
        this.load();
      }
    }, 1500);
  }

  async start(form) {
    const result = byId("start-result");
    const data = new FormData(form);
    const body = { docker_image_name: String(data.get("docker_image_name") || "").trim() };
    for (const name of ["platform", "format", "username"]) {
      const value = String(data.get(name) || "").trim();
      if (value) {
        body[name] = value;
      }
    }
    result.dataset.kind = "";
    result.textContent = t("console.loading");
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const started = await api("/start", { method: "POST", body });
      notify("");
      result.textContent = `${t("console.start.started")}: ${started.task_id}`;
      location.hash = `#/tasks/${started.task_id}`;
    } catch (error) {
      reportError(error, result);
    } finally {
      submit.disabled = false;
    }
  }
}
