// The API client: the bearer token (sessionStorage only) and envelope-aware requests.
//
// The token never goes into local storage, a cookie or a URL: it is kept for this tab's
// session and sent as `Authorization: Bearer <token>`; requests send no cookies.

const TOKEN_KEY = "dcu.token";
export const API = "/api/dcu";

export const token = {
  get() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set(value) {
    sessionStorage.setItem(TOKEN_KEY, value);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
  },
};

/** A refused or failed request: `status` is the HTTP status (0: no answer at all). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const value = token.get();
  if (value) {
    headers.Authorization = `Bearer ${value}`;
  }
  return headers;
}

async function send(url, options) {
  try {
    return await fetch(url, { cache: "no-store", credentials: "omit", ...options });
  } catch (error) {
    if (error.name === "AbortError") {
      throw error;
    }
    throw new ApiError(0, error.message || "network error");
  }
}

async function envelopeOf(response) {
  const type = response.headers.get("Content-Type") || "";
  if (!type.startsWith("application/json")) {
    return null;
  }
  try {
    return await response.json();
  } catch {
    return null;
  }
}

/** `data` of the envelope answering `method path`; throws ApiError with its message. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  const options = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await send(`${API}${path}`, options);
  const envelope = await envelopeOf(response);
  if (!response.ok || envelope === null || envelope.code !== 0) {
    const message = envelope && envelope.message ? envelope.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return envelope.data;
}

function fileNameOf(disposition, fallback) {
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition || "");
  if (!match) {
    return fallback;
  }
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1];
  }
}

/**
 * Where a completed task's archive is: `{url, fileName}` for a presigned S3 link, or
 * `{blob, fileName}` when the gateway serves the file itself (the local store).
 */
export async function locateArchive(taskId, fallbackName) {
  const path = `/console/download/${encodeURIComponent(taskId)}`;
  const response = await send(path, { headers: authHeaders() });
  const type = response.headers.get("Content-Type") || "";
  if (type.startsWith("application/json")) {
    const envelope = await envelopeOf(response);
    if (!response.ok || envelope === null || envelope.code !== 0) {
      const message = envelope && envelope.message ? envelope.message : `HTTP ${response.status}`;
      throw new ApiError(response.status, message);
    }
    return { url: envelope.data.url, fileName: envelope.data.file_name };
  }
  if (!response.ok) {
    throw new ApiError(response.status, `HTTP ${response.status}`);
  }
  const fileName = fileNameOf(response.headers.get("Content-Disposition"), fallbackName);
  return { blob: await response.blob(), fileName };
}

/** Make the browser save `url` (or `blob`) as `fileName`. */
export function saveAs({ url, blob, fileName }) {
  const link = document.createElement("a");
  const href = blob ? URL.createObjectURL(blob) : url;
  link.href = href;
  link.download = fileName;
  link.rel = "noopener";
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  if (blob) {
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
  }
}
