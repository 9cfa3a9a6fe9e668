// The dashboard's own script: live indicator, confirmation dialogs, telemetry charts.
// Everything else is htmx attributes in the templates.
"use strict";

(function () {
  const body = document.body;

  // [data-live] on body: "on" while the server-sent event stream is open.
  body.addEventListener("htmx:sseOpen", () => { body.dataset.live = "on"; });
  body.addEventListener("htmx:sseError", () => { body.dataset.live = "off"; });
  body.addEventListener("htmx:sseClose", () => { body.dataset.live = "off"; });

  // A button with data-dialog opens that dialog; its [data-confirm] submits the form
  // around it, [data-cancel] closes it.
  document.addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target : null;
    const opener = target && target.closest("button[data-dialog]");
    if (opener) {
      const dialog = document.getElementById(opener.dataset.dialog);
      if (dialog && !dialog.open) dialog.showModal();
      return;
    }
    const cancel = target && target.closest("dialog button[data-cancel]");
    if (cancel) cancel.closest("dialog").close();
  });
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement) {
      form.querySelectorAll("dialog[open]").forEach((d) => d.close());
    }
  }, true);

  // A live refresh would replace an open confirmation dialog under the user's pointer:
  // it waits for the next event instead (one already in flight is not swapped in).
  body.addEventListener("htmx:beforeRequest", (event) => {
    const elt = event.detail.elt;
    const trigger = elt.getAttribute("hx-trigger") || "";
    if (trigger.startsWith("sse:") && elt.querySelector("dialog[open]")) event.preventDefault();
  });
  body.addEventListener("htmx:beforeSwap", (event) => {
    const target = event.detail.target;
    if (target && target.querySelector("dialog[open]")) event.detail.shouldSwap = false;
  });

  // Charts of one device's downsampled telemetry (GET /api/devices/<id>/telemetry).
  const SERIES = {
    fps: [["fps", "fps", "#2563eb"]],
    latency: [
      ["wait", "wait_p95_ms", "#9333ea"],
      ["preprocess", "preprocess_p95_ms", "#0891b2"],
      ["invoke", "invoke_p95_ms", "#2563eb"],
      ["postprocess", "postprocess_p95_ms", "#ca8a04"],
    ],
    errors: [
      ["errors", "errors", "#dc2626"],
      ["dropped", "dropped", "#ea580c"],
    ],
    drift: [["drift (PSI)", "drift_max", "#0d9488"]],
  };
  const REFRESH_MS = 60000;
  const section = document.querySelector(".charts[data-device]");
  if (!section || typeof uPlot === "undefined") return;
  const device = section.dataset.device;
  const range = section.querySelector("select[name=range]");
  const plots = new Map();

  async function draw() {
    const option = range.selectedOptions[0];
    const seconds = Number(option.dataset.seconds);
    const step = Number(option.dataset.step);
    const until = Date.now() / 1000;
    const url = `/api/devices/${encodeURIComponent(device)}/telemetry` +
      `?since=${until - seconds}&until=${until}&step=${step}`;
    let points = [];
    try {
      const answer = await fetch(url, { credentials: "same-origin" });
      if (!answer.ok) throw new Error(`${answer.status}`);
      points = (await answer.json()).points;
    } catch (err) {
      section.dataset.error = String(err);
      return;
    }
    const xs = points.map((p) => p.ts);
    section.querySelectorAll("[data-chart]").forEach((el) => {
      const kind = el.dataset.chart;
      const data = [xs, ...SERIES[kind].map(([, key]) => points.map((p) => p[key] ?? null))];
      const old = plots.get(kind);
      if (old) old.destroy();
      const opts = {
        width: Math.max(280, el.clientWidth),
        height: 180,
        scales: { x: { time: true, min: until - seconds, max: until } },
        series: [{}, ...SERIES[kind].map(([label, , stroke]) => ({ label, stroke, width: 1.5, spanGaps: false }))],
        axes: [{}, { size: 50 }],
      };
      plots.set(kind, new uPlot(opts, data, el));
      el.dataset.drawn = String(points.length);
    });
  }

  range.addEventListener("change", draw);
  window.addEventListener("resize", () => {
    plots.forEach((plot, kind) => {
      const el = section.querySelector(`[data-chart="${kind}"]`);
      plot.setSize({ width: Math.max(280, el.clientWidth), height: 180 });
    });
  });
  draw();
  setInterval(draw, REFRESH_MS);
})();
