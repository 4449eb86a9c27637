// vitcache dashboard: polls /api/stats and draws its numbers over time with uPlot.
// Query parameters: ?interval=ms between polls (default 1000), &window=s of each rate (default 10),
// &points=how many polls the charts keep (default 600).
// A server with tokens (--metrics-token-file, --auth-token-file) wants one for /api/stats: open the page
// as /#token=TOKEN (a fragment never leaves the browser: not in server logs, not in a Referer), or type
// it when the page asks. It is kept in this tab's sessionStorage; the fragment leaves the address bar.
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(200, Number(params.get("interval")) || 1000);
const WINDOW_S = Math.max(1, Number(params.get("window")) || 10);
const MAX_POINTS = Math.max(10, Number(params.get("points")) || 600);

const TOKEN_KEY = "vitcache-metrics-token";

const COLORS = { blue: "#2563eb", green: "#0e9f6e", orange: "#f59e0b", red: "#e02424", purple: "#7c3aed", grey: "#52606d" };
const STAGES = ["queue", "preprocess", "forward", "launch", "device", "l2_get"];

// Each chart: its series (label, colour, how to read the value from a stats snapshot, and "videos" for a
// series hidden until the server has answered a video clip: an image-only server keeps its charts).
const CHARTS = {
  "chart-hit-ratio": {
    yRange: [0, 100],
    series: [
      ["overall", COLORS.blue, (s) => pct(s.hit_ratio.overall)],
      ["L1", COLORS.green, (s) => pct(s.hit_ratio.l1)],
      ["L2", COLORS.orange, (s) => pct(s.hit_ratio.l2)],
      ["videos", COLORS.purple, (s) => pct(s.videos.hit_ratio), "videos"],
    ],
  },
  "chart-throughput": {
    series: [
      ["requests/s", COLORS.blue, (s) => s.rates.requests_per_s],
      ["images/s", COLORS.green, (s) => s.rates.images_per_s],
      ["of them videos/s", COLORS.purple, (s) => s.videos.per_s, "videos"],
      ["errors/s", COLORS.red, (s) => s.rates.errors_per_s],
      ["digests not found/s", COLORS.grey, (s) => s.rates.lookups_not_found_per_s],
    ],
  },
  "chart-latency": {
    series: [
      ["p50", COLORS.green, (s) => s.latency_ms.request.p50],
      ["p90", COLORS.orange, (s) => s.latency_ms.request.p90],
      ["p99", COLORS.red, (s) => s.latency_ms.request.p99],
    ],
  },
  "chart-stages": {
    series: STAGES.map((stage, i) => [stage, Object.values(COLORS)[i], (s) => s.latency_ms[stage].p90]),
  },
  "chart-l1": {
    yRange: [0, 100],
    series: [
      ["L1 fill %", COLORS.purple, (s) => pct(s.l1.fill)],
      ["Redis connected (100 = yes)", COLORS.orange, (s) => (s.redis.enabled ? (s.redis.connected ? 100 : 0) : null)],
    ],
  },
  "chart-batch": {
    series: [
      ["images", COLORS.blue, (s) => s.batch.images_mean],
      ["forwards/s", COLORS.grey, (s) => s.rates.forwards_per_s],
    ],
  },
};

const history = { time: [], values: Object.fromEntries(Object.keys(CHARTS).map((id) => [id, CHARTS[id].series.map(() => [])])) };
const plots = {};

function pct(ratio) {
  return ratio === null || ratio === undefined ? null : ratio * 100;
}

function fmt(value, digits = 1, suffix = "") {
  return value === null || value === undefined ? "-" : value.toFixed(digits) + suffix;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}

function chartWidth(el) {
  return Math.max(300, el.clientWidth || el.parentElement.clientWidth - 16);
}

function makePlots() {
  for (const [id, spec] of Object.entries(CHARTS)) {
    const el = document.getElementById(id);
    const opts = {
      width: chartWidth(el),
      height: 220,
      scales: { x: { time: true }, y: spec.yRange ? { range: spec.yRange } : { range: (u, lo, hi) => [0, Math.max(hi || 0, 1e-3) * 1.1] } },
      series: [{}, ...spec.series.map(([label, stroke, , only]) => ({ label, stroke, width: 2, spanGaps: false, show: !only }))],
      axes: [{}, { size: 60 }],
      legend: { live: true },
    };
    plots[id] = new uPlot(opts, [[], ...spec.series.map(() => [])], el);
  }
  window.addEventListener("resize", () => {
    for (const [id, plot] of Object.entries(plots)) {
      plot.setSize({ width: chartWidth(document.getElementById(id)), height: 220 });
    }
  });
}

function record(stats) {
  history.time.push(stats.time);
  for (const [id, spec] of Object.entries(CHARTS)) {
    spec.series.forEach(([, , read], i) => history.values[id][i].push(read(stats) ?? null));
  }
  if (history.time.length > MAX_POINTS) {
    history.time.shift();
    for (const columns of Object.values(history.values)) columns.forEach((c) => c.shift());
  }
  for (const [id, plot] of Object.entries(plots)) {
    plot.setData([history.time, ...history.values[id]]);
    if (stats.videos.total > 0) {
      CHARTS[id].series.forEach(([, , , only], i) => {
        if (only && !plot.series[i + 1].show) plot.setSeries(i + 1, { show: true });
      });
    }
  }
}

function setText(id, text, cls) {
  const el = document.getElementById(id);
  el.textContent = text;
  if (cls !== undefined) el.className = "value " + cls;
}

function render(stats) {
  const m = stats.model;
  setText("model", `${m.model} · ${m.family} · ${m.dtype} on ${m.device}`);
  const hits = stats.hit_ratio;
  setText("tile-hit-ratio", fmt(pct(hits.overall), 1, " %"));
  setText("tile-hit-tiers", `L1 ${fmt(pct(hits.l1), 1, " %")} · L2 ${fmt(pct(hits.l2), 1, " %")}`);
  setText("tile-requests-rate", fmt(stats.rates.requests_per_s));
  setText("tile-requests-total", `${stats.totals.requests} total`);
  setText("tile-images-rate", fmt(stats.rates.images_per_s));
  setText(
    "tile-images-total",
    `${stats.totals.images} total · hit ratio ${fmt(pct(stats.totals.hit_ratio), 1, " %")} · ${stats.totals.lookups_not_found} digests not found`,
  );
  const videos = stats.videos;
  const videoText = `of them ${videos.total} videos · hit ratio ${fmt(pct(videos.hit_ratio_total), 1, " %")} · ${videos.tokens} tokens`;
  setText("tile-videos", videos.total > 0 ? videoText : "");
  setText("tile-p99", fmt(stats.latency_ms.request.p99, 2, " ms"));
  setText("tile-p50", `p50 ${fmt(stats.latency_ms.request.p50, 2, " ms")}`);
  const l1 = stats.l1;
  setText("tile-l1-fill", fmt(pct(l1.fill), 2, " %"));
  setText("tile-l1-detail", `${bytes(l1.bytes)} of ${bytes(l1.capacity_bytes)} · ${l1.entries} entries · ${l1.evictions} evicted`);
  const redis = stats.redis;
  if (!redis.enabled) setText("tile-redis", "off", "");
  else setText("tile-redis", redis.connected ? "connected" : "DOWN", redis.connected ? "ok" : "bad");
  setText("tile-redis-detail", `${redis.errors} errors · ${redis.corrupt_entries} corrupt`);
  setText("tile-batch", fmt(stats.batch.images_mean, 1, " img"));
  setText("tile-batch-detail", `${fmt(stats.batch.patches_mean, 0)} patches · ${fmt(stats.rates.forwards_per_s)} fwd/s`);
  setText("tile-errors-rate", fmt(stats.rates.errors_per_s));
  const gpus = (stats.gpus || []).filter((g) => g.device.startsWith("cuda"));
  const gpuText = gpus.map((g) => `${g.device} ${g.alive ? `busy ${fmt(pct(g.busy_fraction), 0, "%")}, ${bytes(g.allocated_bytes)}` : "DOWN"}`);
  setText("tile-in-flight", [`${stats.requests_in_flight} in flight`, ...gpuText].join(" · "));

  const latency = document.querySelector("#table-latency tbody");
  latency.replaceChildren(
    ...Object.entries(stats.latency_ms).map(([stage, q]) => row([stage, fmt(q.p50, 3), fmt(q.p90, 3), fmt(q.p95, 3), fmt(q.p99, 3)])),
  );
  const errors = Object.entries(stats.errors_by_code);
  const errorRows = errors.length ? errors.map(([code, n]) => row([code, String(n)])) : [row(["none", ""])];
  document.querySelector("#table-errors tbody").replaceChildren(...errorRows);
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const text of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  return tr;
}

function takeTokenFromFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("token")) return;
  sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
  window.history.replaceState(null, "", location.pathname + location.search); // "history" is the charts' here
}

function askForToken(reason) {
  setText("status", `this server wants a metrics token (${reason})`);
  document.getElementById("status").className = "bad";
  document.getElementById("token-form").hidden = false;
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token-input");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
});

async function poll() {
  try {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(`api/stats?window=${WINDOW_S}`, { cache: "no-store", headers });
    if (response.status === 401 || response.status === 403) {
      askForToken((await response.text()).trim());
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    document.getElementById("token-form").hidden = true;
    const stats = await response.json();
    render(stats);
    record(stats);
    document.body.dataset.polls = String(Number(document.body.dataset.polls) + 1);
    setText("status", `updated ${new Date(stats.time * 1000).toLocaleTimeString()} · rates over ${stats.window_s.toFixed(0)} s`);
    document.getElementById("status").className = "muted";
  } catch (err) {
    setText("status", `cannot reach the server: ${err.message}`);
    document.getElementById("status").className = "bad";
  } finally {
    setTimeout(poll, INTERVAL_MS);
  }
}

takeTokenFromFragment();
makePlots();
poll();
