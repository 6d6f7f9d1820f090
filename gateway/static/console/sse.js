// Server-sent events read with fetch(): EventSource cannot send an Authorization header.
//
// `SseParser` follows the HTML standard's event-stream interpretation: lines end with
// CRLF, LF or CR; `:` starts a comment; `id` (without NUL) sets the last event id, `event`
// the type, `data` lines are joined with LF, `retry` sets the reconnection delay; a blank
// line dispatches. `follow` reconnects with `Last-Event-ID` until the caller says the
// stream is done (the task's terminal event) or the server answers 204.

import { ApiError, authHeaders } from "./api.js";

export class SseParser {
  constructor(onMessage, lastEventId = "") {
    this.onMessage = onMessage;
    this.buffer = "";
    this.type = "";
    this.data = [];
    this.lastEventId = lastEventId; // the standard's "last event ID buffer"
    this.dispatchedId = lastEventId; // what a reconnection sends as Last-Event-ID
    this.retry = null;
  }

  /** Feed decoded text; complete lines are interpreted at once. */
  push(text) {
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start);
      const lf = this.buffer.indexOf("\n", start);
      if (cr < 0 && lf < 0) {
        break;
      }
      let end;
      let next;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        if (cr === this.buffer.length - 1) {
          break; // a CR at the end may be the first half of a CRLF: wait for more
        }
        end = cr;
        next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  /** The stream ended: a trailing CR ends its line; an event without its blank line is dropped. */
  end() {
    if (this.buffer.endsWith("\r")) {
      this.line(this.buffer.slice(0, -1));
    }
    this.buffer = "";
    this.type = "";
    this.data = [];
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) {
      return; // a comment (the server's keep-alive)
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    if (field === "event") {
      this.type = value;
    } else if (field === "data") {
      this.data.push(value);
    } else if (field === "id") {
      if (!value.includes("\0")) {
        this.lastEventId = value;
      }
    } else if (field === "retry") {
      if (/^[0-9]+$/.test(value)) {
        this.retry = Number(value);
      }
    }
  }

  dispatch() {
    this.dispatchedId = this.lastEventId;
    const data = this.data;
    const type = this.type || "message";
    this.type = "";
    this.data = [];
    if (data.length === 0) {
      return;
    }
    this.onMessage({ type, data: data.join("\n"), lastEventId: this.lastEventId });
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/**
 * An `onMessage` for `follow` that hands `onEvent` each message's data parsed as JSON
 * (a DCU event), skipping a message whose data is not JSON.
 */
export function eachEvent(onEvent) {
  return (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    onEvent(event);
  };
}

const FIRST_DELAY = 1000;
const MAX_DELAY = 15_000;

/**
 * Read the event stream at `url` until `isDone()` holds after a stream ends, the server
 * answers 204, or `signal` aborts. `onMessage` gets each message; `onConnection` gets
 * "open" and "lost". Throws ApiError when the server refuses the stream (4xx): retrying
 * would not help.
 */
export async function follow(url, { onMessage, onConnection = () => {}, isDone, signal }) {
  let lastEventId = "";
  let delay = FIRST_DELAY;
  while (!signal.aborted) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId) {
      headers["Last-Event-ID"] = lastEventId;
    }
    let response = null;
    try {
      response = await fetch(url, { headers, signal, cache: "no-store", credentials: "omit" });
    } catch {
      response = null;
    }
    if (signal.aborted) {
      return;
    }
    if (response !== null && response.status === 204) {
      return; // we already have the terminal event
    }
    if (response !== null && response.status >= 400 && response.status < 500) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).message || message;
      } catch {
        // not an envelope: keep the status
      }
      throw new ApiError(response.status, message);
    }
    if (response !== null && response.ok && response.body) {
      onConnection("open");
      const parser = new SseParser(onMessage, lastEventId);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) {
            break;
          }
          parser.push(value);
          delay = FIRST_DELAY;
        }
        parser.end();
      } catch {
        // the connection broke: reconnect below
      }
      lastEventId = parser.dispatchedId;
      if (signal.aborted || isDone()) {
        return;
      }
      if (parser.retry !== null) {
        delay = parser.retry;
      }
    }
    onConnection("lost");
    await pause(delay, signal);
    delay = Math.min(delay * 2, MAX_DELAY);
  }
}
