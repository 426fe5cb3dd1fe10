/* Small hand-drawn SVG charts for the dashboard. No dependencies. */
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = {
    cloud: "#38bdf8", local: "#34d399", failover: "#fbbf24",
    training: "#a78bfa", eval: "#f472b6", bad: "#f87171", muted: "#5b6b89",
  };

  function el(tag, attrs, children) {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function text(x, y, content, attrs) {
    const node = el("text", Object.assign({ x, y }, attrs || {}));
    node.textContent = content;
    return node;
  }

  function title(content) {
    const node = el("title");
    node.textContent = content;
    return node;
  }

  function frame(width, height, label) {
    return el("svg", {
      class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label,
      preserveAspectRatio: "xMidYMid meet",
    });
  }

  function clock(ts, withSeconds) {
    const d = new Date(ts * 1000);
    const parts = { hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) parts.second = "2-digit";
    return d.toLocaleTimeString([], parts);
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  // x-axis labels for [t0, t1] along [left, right]
  function timeTicks(svg, t0, t1, left, right, y) {
    const count = 4;
    const seconds = t1 - t0 < 600;
    for (let i = 0; i <= count; i++) {
      const t = t0 + ((t1 - t0) * i) / count;
      const x = left + ((right - left) * i) / count;
      const anchor = i === 0 ? "start" : i === count ? "end" : "middle";
      svg.appendChild(text(x, y, clock(t, seconds), { "text-anchor": anchor }));
    }
  }

  function yGrid(svg, top, bottom, left, right, max, format) {
    for (const f of [0, 0.5, 1]) {
      const y = bottom - (bottom - top) * f;
      svg.appendChild(el("line", { class: "grid-line", x1: left, x2: right, y1: y, y2: y }));
      svg.appendChild(text(left - 6, y + 3, format(max * f), { "text-anchor": "end" }));
    }
  }

  /* 100%-stacked bars: who answered, interval by interval. */
  function shareBars(points, opts) {
    const W = 420, H = 150, L = 34, R = W - 6, T = 8, B = H - 20;
    const svg = frame(W, H, "traffic share by backend over time");
    const { t0, t1, interval } = opts;
    yGrid(svg, T, B, L, R, 100, (v) => `${Math.round(v)}%`);
    const span = Math.max(t1 - t0, 1);
    const barWidth = Math.max(1.5, ((R - L) * interval) / span - 1);
    for (const p of points) {
      const total = p.cloud + p.local + p.failover;
      if (!total || p.t < t0) continue;
      const x = L + ((p.t - t0) / span) * (R - L) - barWidth;
      let y = B;
      for (const key of ["cloud", "local", "failover"]) {
        if (!p[key]) continue;
        const h = ((B - T) * p[key]) / total;
        y -= h;
        const rect = el("rect", { x: Math.max(L, x), y, width: barWidth, height: h, fill: COLORS[key], opacity: 0.9 });
        rect.appendChild(title(`${clock(p.t)} · ${key}: ${p[key]} of ${total}`));
        svg.appendChild(rect);
      }
    }
    timeTicks(svg, t0, t1, L, R, H - 4);
    return svg;
  }

  /* Requests per second (area) with 5xx errors (red) underneath. */
  function rateArea(points, opts) {
    const W = 420, H = 110, L = 34, R = W - 6, T = 8, B = H - 20;
    const svg = frame(W, H, "requests per second");
    const { t0, t1, interval } = opts;
    const span = Math.max(t1 - t0, 1);
    const visible = points.filter((p) => p.t >= t0);
    const rate = (p) => (p.cloud + p.local + p.failover) / interval;
    const max = niceMax(Math.max(0, ...visible.map(rate)));
    yGrid(svg, T, B, L, R, max, (v) => (max < 10 ? v.toFixed(1) : Math.round(v)));
    const xy = (p, v) => [L + ((p.t - t0) / span) * (R - L), B - ((B - T) * v) / max];
    if (visible.length) {
      const line = visible.map((p) => xy(p, rate(p)));
      const area = [[line[0][0], B], ...line, [line[line.length - 1][0], B]];
      svg.appendChild(el("path", { d: "M" + area.map((q) => q.join(",")).join("L") + "Z", fill: "rgba(56,189,248,.18)" }));
      svg.appendChild(el("path", { d: "M" + line.map((q) => q.join(",")).join("L"), fill: "none", stroke: COLORS.cloud, "stroke-width": 1.8 }));
      const errors = visible.filter((p) => p.errors > 0);
      for (const p of errors) {
        const [x, y] = xy(p, p.errors / interval);
        const dot = el("circle", { cx: x, cy: y, r: 3, fill: COLORS.bad });
        dot.appendChild(title(`${clock(p.t)} · ${p.errors} errors (5xx)`));
        svg.appendChild(dot);
      }
    }
    timeTicks(svg, t0, t1, L, R, H - 4);
    return svg;
  }

  /* p50 / p95 latency lines. */
  function latencyLines(points, opts) {
    const W = 420, H = 110, L = 40, R = W - 6, T = 8, B = H - 20;
    const svg = frame(W, H, "latency p50 and p95");
    const { t0, t1 } = opts;
    const span = Math.max(t1 - t0, 1);
    const visible = points.filter((p) => p.t >= t0 && p.p95_ms !== null && p.p95_ms !== undefined);
    const max = niceMax(Math.max(1, ...visible.map((p) => p.p95_ms)));
    yGrid(svg, T, B, L, R, max, (v) => (v >= 1000 ? `${(v / 1000).toFixed(1)}s` : v < 10 ? `${v.toFixed(1)}ms` : `${Math.round(v)}ms`));
    for (const [key, color, width] of [["p95_ms", COLORS.eval, 1.6], ["p50_ms", COLORS.local, 1.8]]) {
      const pts = visible.map((p) => [L + ((p.t - t0) / span) * (R - L), B - ((B - T) * p[key]) / max]);
      if (pts.length === 1) svg.appendChild(el("circle", { cx: pts[0][0], cy: pts[0][1], r: 2.5, fill: color }));
      if (pts.length > 1) svg.appendChild(el("path", { d: "M" + pts.map((q) => q.join(",")).join("L"), fill: "none", stroke: color, "stroke-width": width }));
    }
    timeTicks(svg, t0, t1, L, R, H - 4);
    return svg;
  }

  /* Judged scores (dots), their rolling mean (line) and the threshold (dashed). */
  function scoreChart(scores, threshold, window, rollingThreshold) {
    const W = 420, H = 150, L = 30, R = W - 8, T = 8, B = H - 18;
    const svg = frame(W, H, "judge scores against the threshold");
    yGrid(svg, T, B, L, R, 100, (v) => Math.round(v));
    const y = (v) => B - ((B - T) * v) / 100;
    svg.appendChild(el("line", { class: "threshold", x1: L, x2: R, y1: y(threshold), y2: y(threshold) }));
    svg.appendChild(text(R, y(threshold) - 4, `pass ${Math.round(threshold)}`, { "text-anchor": "end", fill: COLORS.failover }));
    if (rollingThreshold !== undefined && Math.abs(rollingThreshold - threshold) >= 1) {
      svg.appendChild(el("line", { class: "threshold rolling", x1: L, x2: R, y1: y(rollingThreshold), y2: y(rollingThreshold) }));
      svg.appendChild(text(R, y(rollingThreshold) + 11, `rolling ${Math.round(rollingThreshold)}`, { "text-anchor": "end", fill: "#cbd5e1" }));
    }
    const judged = scores.filter((s) => s.score !== null && s.score !== undefined);
    const n = Math.max(judged.length, 2);
    const x = (i) => L + ((R - L) * i) / (n - 1);
    const rolling = [];
    judged.forEach((s, i) => {
      const from = Math.max(0, i - window + 1);
      const slice = judged.slice(from, i + 1);
      rolling.push([x(i), y(slice.reduce((a, b) => a + b.score, 0) / slice.length)]);
    });
    if (rolling.length > 1) {
      svg.appendChild(el("path", { d: "M" + rolling.map((q) => q.join(",")).join("L"), fill: "none", stroke: "#e2e8f0", "stroke-width": 2, opacity: 0.9 }));
    }
    judged.forEach((s, i) => {
      const color = s.passed ? COLORS.local : COLORS.bad;
      const dot = el("circle", { cx: x(i), cy: y(s.score), r: 3.2, fill: color, opacity: 0.85 });
      dot.appendChild(title(`${clock(s.ts)} · ${s.phase} · score ${s.score.toFixed(1)} · ${s.passed ? "pass" : "fail"}`));
      svg.appendChild(dot);
    });
    svg.appendChild(text(L, H - 3, judged.length ? `${judged.length} judged` : "no judged answers yet", { "text-anchor": "start" }));
    return svg;
  }

  /* The route's modes as coloured segments over time. */
  function modeBand(history, currentMode, t0, t1) {
    const W = 860, H = 46, L = 4, R = W - 4, T = 6, B = 28;
    const svg = frame(W, H, "mode history");
    const span = Math.max(t1 - t0, 1);
    const x = (t) => L + ((Math.max(t, t0) - t0) / span) * (R - L);
    const segments = [];
    let mode = history.length ? history[0].from : currentMode;
    let start = t0;
    for (const h of history) {
      if (h.from === h.to) continue;
      segments.push([mode, start, h.ts, h.reason]);
      mode = h.to;
      start = h.ts;
    }
    segments.push([mode, start, t1, "now"]);
    for (const [m, a, b, why] of segments) {
      if (b < t0) continue;
      const rect = el("rect", { x: x(a), y: T, width: Math.max(2, x(b) - x(a)), height: B - T, rx: 4, fill: COLORS[m] || COLORS.muted, opacity: 0.85 });
      rect.appendChild(title(`${m}: ${clock(a)} – ${clock(b)}`));
      svg.appendChild(rect);
      if (x(b) - x(a) > 60) svg.appendChild(text(x(a) + 8, T + 15, m.toUpperCase(), { fill: "#04111f", "font-weight": 700 }));
    }
    timeTicks(svg, t0, t1, L, R, H - 3);
    return svg;
  }

  /* A tiny line, e.g. a training loss curve. */
  function sparkline(values, color) {
    const W = 260, H = 44, P = 3;
    const svg = frame(W, H, "training loss");
    const nums = values.filter((v) => typeof v === "number");
    if (nums.length < 2) return svg;
    const max = Math.max(...nums), min = Math.min(...nums);
    const pts = nums.map((v, i) => [P + ((W - 2 * P) * i) / (nums.length - 1), P + ((H - 2 * P) * (max - v)) / Math.max(max - min, 1e-9)]);
    svg.appendChild(el("path", { d: "M" + pts.map((q) => q.join(",")).join("L"), fill: "none", stroke: color || COLORS.training, "stroke-width": 2 }));
    return svg;
  }

  window.Charts = { COLORS, shareBars, rateArea, latencyLines, scoreChart, modeBand, sparkline, clock };
})();
