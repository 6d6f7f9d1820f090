// Small DOM and formatting helpers. Task data is untrusted input: it only ever becomes
// text nodes and attribute values, never markup.

import { currentLanguage, t } from "./i18n.js";

/** An element with `attributes` (null and false left out) and children (strings become text). */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function byId(id) {
  return document.getElementById(id);
}

export function formatBytes(bytes) {
  if (typeof bytes !== "number" || !Number.isFinite(bytes)) {
    return "";
  }
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toLocaleString(currentLanguage(), { maximumFractionDigits: digits })} ${units[unit]}`;
}

export function formatRate(bytesPerSecond) {
  return typeof bytesPerSecond === "number" && bytesPerSecond > 0
    ? `${formatBytes(bytesPerSecond)}/s`
    : "";
}

export function formatDuration(ms) {
  if (typeof ms !== "number" || ms < 0) {
    return "";
  }
  const seconds = ms / 1000;
  if (seconds < 60) {
    return `${seconds.toLocaleString(currentLanguage(), { maximumFractionDigits: 1 })} s`;
  }
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) {
    return `${minutes} min ${Math.round(seconds % 60)} s`;
  }
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** An event's ISO time as local date and time. */
export function formatTime(iso) {
  const moment = new Date(iso);
  if (Number.isNaN(moment.getTime())) {
    return String(iso);
  }
  return moment.toLocaleString(currentLanguage(), {
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
    hour12: false,
  });
}

export function formatPercent(value) {
  return `${Math.round(value)}%`;
}

export function stateText(state) {
  return t(`state.${state}`);
}

/** Set a <progress> to `value` (0-100), as an attribute so observers see each change. */
export function setBar(bar, value, state) {
  const rounded = Math.round(value * 10) / 10;
  if (bar.getAttribute("value") !== String(rounded)) {
    bar.setAttribute("value", String(rounded));
  }
  bar.dataset.state = state;
}

/** The global notice (errors that concern the whole page, e.g. a missing token). */
export function notify(message) {
  const notice = byId("notice");
  notice.textContent = message;
  notice.hidden = !message;
}
