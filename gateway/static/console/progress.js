// A task's progress from its events: the state it is in, the running stage's share and
// one overall figure for the bar. The three stages (download, compress, upload) each
// take a third of the bar; the bar never moves back while the task runs.

export const STAGES = ["download", "compress", "upload"];
export const TERMINAL = new Set(["completed", "failed"]);

const TARGET_STATE = {
  requested: "idle",
  download_started: "downloading",
  compress_started: "compressing",
  upload_started: "uploading",
  uploaded: "completed",
  failed: "failed",
};
const STAGE_OF_STATE = { downloading: "download", compressing: "compress", uploading: "upload" };
const STAGE_DONE = { downloaded: "download", compressed: "compress" };

function overallOf(stage, fraction) {
  const index = STAGES.indexOf(stage);
  if (index < 0) {
    return 0;
  }
  return ((index + Math.min(1, Math.max(0, fraction))) * 100) / STAGES.length;
}

/** The state an event moves its task into, or null. */
export function targetState(type) {
  return TARGET_STATE[type] || null;
}

export class TaskProgress {
  /** From a task as GET /status answers it (`state`, `stage`, `stage_progress`...). */
  constructor(task = {}) {
    this.state = task.state || "idle";
    this.stage = task.stage || STAGE_OF_STATE[this.state] || null;
    this.stagePercent = typeof task.stage_progress === "number" ? task.stage_progress : null;
    this.rate = typeof task.stage_rate === "number" ? task.stage_rate : null;
    this.reason = task.error_message || null;
    if (this.state === "completed") {
      this.overall = 100;
    } else if (STAGE_OF_STATE[this.state]) {
      this.overall = overallOf(STAGE_OF_STATE[this.state], (this.stagePercent || 0) / 100);
    } else {
      this.overall = 0;
    }
  }

  get terminal() {
    return TERMINAL.has(this.state);
  }

  /** Apply one event (a parsed event object); returns whether anything changed. */
  apply(event) {
    const before = JSON.stringify(this);
    const payload = event.payload || {};
    const target = targetState(event.type);
    if (this.terminal && event.type !== "failed" && event.type !== "uploaded") {
      return false; // a late progress report after the end changes nothing
    }
    if (target !== null) {
      this.state = target;
    }
    if (STAGE_OF_STATE[target]) {
      this.stage = STAGE_OF_STATE[target];
      this.stagePercent = 0;
      this.rate = null;
      this.raise(overallOf(this.stage, 0));
    } else if (event.type === "progress") {
      this.stage = payload.stage || this.stage;
      this.rate = typeof payload.rate === "number" ? payload.rate : null;
      if (payload.bytes_total > 0) {
        const fraction = Math.min(1, payload.bytes_done / payload.bytes_total);
        this.stagePercent = fraction * 100;
        this.raise(overallOf(this.stage, fraction));
      }
    } else if (STAGE_DONE[event.type]) {
      this.stage = STAGE_DONE[event.type];
      this.stagePercent = 100;
      this.raise(overallOf(this.stage, 1));
    } else if (event.type === "uploaded") {
      this.overall = 100;
      this.stagePercent = 100;
      this.rate = null;
    } else if (event.type === "failed") {
      this.stage = payload.stage || this.stage;
      this.reason = payload.reason || this.reason;
      this.rate = null;
    }
    return JSON.stringify(this) !== before;
  }

  raise(value) {
    this.overall = Math.max(this.overall, value);
  }
}
