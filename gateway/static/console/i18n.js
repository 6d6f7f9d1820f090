// Labels from the gateway's one message catalogue (GET /console/messages.json), in the
// language the browser's Accept-Language asks for. Every label is set as text, never HTML.

let texts = {};
let language = "zh";

/** Fetch the catalogue; sets <html lang>. Throws when the gateway cannot be reached. */
export async function loadMessages() {
  const response = await fetch("/console/messages.json", {
    headers: { Accept: "application/json" },
    credentials: "omit",
  });
  if (!response.ok) {
    throw new Error(`GET /console/messages.json: HTTP ${response.status}`);
  }
  const body = await response.json();
  texts = body.messages || {};
  language = body.language || language;
  document.documentElement.lang = language;
  return language;
}

export function currentLanguage() {
  return language;
}

/** The text of `key` with `{name}` placeholders filled from `values`; the key if unknown. */
export function t(key, values = {}) {
  const text = Object.hasOwn(texts, key) ? texts[key] : key;
  return text.replace(/\{(\w+)\}/g, (whole, name) =>
    Object.hasOwn(values, name) ? String(values[name]) : whole,
  );
}

/** Fill `data-msg` (text), `data-msg-label` (aria-label) and `data-msg-placeholder`. */
export function translate(root = document) {
  for (const element of root.querySelectorAll("[data-msg]")) {
    element.textContent = t(element.dataset.msg);
  }
  for (const element of root.querySelectorAll("[data-msg-label]")) {
    element.setAttribute("aria-label", t(element.dataset.msgLabel));
  }
  for (const element of root.querySelectorAll("[data-msg-placeholder]")) {
    element.setAttribute("placeholder", t(element.dataset.msgPlaceholder));
  }
}
