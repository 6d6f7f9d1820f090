// The DCU web console: labels, the token, and the hash router between the list view
// (#/ with its filters as a query) and the task view (#/tasks/<id>).

import { token } from "./api.js";
import { byId, notify } from "./dom.js";
import { loadMessages, t, translate } from "./i18n.js";
import { ListView, queryOf } from "./list.js";
import { TaskView } from "./task.js";

const TASK_ROUTE = /^#\/tasks\/([0-9A-Fa-f-]{32,36})$/;

let list;
let task;
let routed = false;

function showTokenState() {
  const state = byId("token-state");
  const set = Boolean(token.get());
  state.dataset.state = set ? "set" : "unset";
  state.textContent = t(set ? "console.token.set" : "console.token.unset");
}

function bindToken() {
  const form = byId("token-form");
  const input = byId("token");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      input.focus();
      return;
    }
    token.set(value);
    input.value = "";
    showTokenState();
    notify("");
    route();
  });
  byId("token-forget").addEventListener("click", () => {
    token.clear();
    input.value = "";
    showTokenState();
    route();
  });
  showTokenState();
}

function route() {
  const hash = location.hash;
  const match = TASK_ROUTE.exec(hash);
  const focus = routed; // move focus on navigation, not on the first load
  routed = true;
  if (match) {
    list.hide();
    task.show(match[1], { focus });
  } else {
    task.hide();
    document.title = t("console.title");
    list.show(queryOf(hash));
    if (focus && hash.startsWith("#/") && !hash.includes("?")) {
      byId("main").focus();
    }
  }
}

async function boot() {
  const boot = byId("boot");
  try {
    await loadMessages();
  } catch (error) {
    boot.textContent = `DCU: ${error.message}`;
    return;
  }
  translate();
  document.title = t("console.title");
  boot.remove();
  bindToken();
  list = new ListView();
  task = new TaskView();
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "true";
}

boot();
