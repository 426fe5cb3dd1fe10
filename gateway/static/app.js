/* Understudy dashboard: polls ../admin/dashboard and draws one card per route.
   Everything that comes from the gateway is inserted as text, never as HTML. */
"use strict";

(function () {
  const POLL_MS = 3000;
  const WINDOW_S = 15 * 60;
  const API = "../admin/dashboard";
  const C = window.Charts;
  const signatures = new Map();

  // --- tiny DOM helpers ------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);

  function money(value) {
    if (!value) return "$0";
    if (value >= 100) return `$${value.toFixed(0)}`;
    if (value >= 1) return `$${value.toFixed(2)}`;
    return `$${value.toPrecision(2)}`;
  }
  function ms(value) {
    if (value === null || value === undefined) return "–";
    return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(value < 10 ? 1 : 0)} ms`;
  }
  function pct(part, total) {
    return total ? `${Math.round((100 * part) / total)}%` : "–";
  }
  function ago(ts, now) {
    const s = Math.max(0, Math.round(now - ts));
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.round(s / 60)}m ago`;
    if (s < 86400) return `${Math.round(s / 3600)}h ago`;
    return `${Math.round(s / 86400)}d ago`;
  }

  // --- status and totals -----------------------------------------------------------------
  function setStatus(kind, message) {
    $("status-dot").className = `dot ${kind}`;
    $("status-text").textContent = message;
  }
  function banner(message) {
    const node = $("banner");
    node.textContent = message || "";
    node.classList.toggle("hidden", !message);
  }
  function toast(message, bad) {
    const node = h("div", { class: bad ? "toast bad" : "toast", role: "status" }, message);
    document.body.appendChild(node);
    setTimeout(() => node.remove(), 4000);
  }

  function windowOf(data) {
    const t1 = data.generated_at;
    const t0 = Math.min(t1 - 60, Math.max(t1 - WINDOW_S, data.started_at));
    return { t0, t1, interval: data.interval_s };
  }

  function sumPoints(points, since) {
    const total = { cloud: 0, local: 0, failover: 0, errors: 0 };
    for (const p of points) {
      if (p.t < since) continue;
      for (const key of Object.keys(total)) total[key] += p[key];
    }
    return total;
  }

  function renderTotals(data) {
    const now = data.generated_at;
    const minute = Math.min(60, Math.max(now - data.started_at, data.interval_s));
    let requests = 0, local = 0, all = 0, worstP95 = null, spend = 0, saved = 0;
    for (const route of data.routes) {
      const lastMinute = sumPoints(route.series, now - 60);
      requests += lastMinute.cloud + lastMinute.local + lastMinute.failover;
      const window = sumPoints(route.series, now - WINDOW_S);
      local += window.local + window.failover;
      all += window.cloud + window.local + window.failover;
      for (const p of route.series) {
        if (p.t >= now - 60 && p.p95_ms !== null && (worstP95 === null || p.p95_ms > worstP95)) worstP95 = p.p95_ms;
      }
      spend += route.totals.cost_usd;
      saved += route.totals.net_saved_usd;
    }
    $("kpi-rps").textContent = (requests / minute).toFixed(requests / minute < 10 ? 2 : 0);
    $("kpi-p95").textContent = ms(worstP95);
    $("kpi-local").textContent = pct(local, all);
    $("kpi-spend").textContent = money(spend);
    $("kpi-saved").textContent = money(saved);
    const backend = data.local_backend ? ` · local backend ${data.local_backend}` : " · local backend off";
    const when = new Date(now * 1000).toLocaleTimeString([], { hour12: false });
    setStatus(data.ready ? "ok" : "warn", `${data.ready ? "ready" : "starting"}${backend} · updated ${when}`);
  }

  // --- a route card ----------------------------------------------------------------------
  async function pin(route, mode) {
    try {
      const response = await fetch(`../admin/routes/${encodeURIComponent(route)}/mode`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ mode }),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
      toast(mode === "auto" ? `${route}: back to the adaptive cycle` : `${route}: pinned to ${mode}`);
      poll();
    } catch (err) {
      toast(`${route}: ${err.message}`, true);
    }
  }

  function header(route) {
    const badges = [
      h("span", { class: `badge mode mode-${route.mode}`, dataset: { role: "mode", mode: route.mode } }, route.mode),
    ];
    if (route.serving !== route.mode) {
      badges.push(h("span", { class: `badge mode-${route.serving}`, dataset: { role: "serving" } }, `serving ${route.serving}`));
    }
    if (route.pinned) badges.push(h("span", { class: "badge pin", dataset: { role: "pinned" } }, `pinned: ${route.pinned}`));
    // A route that cannot learn says so on its card, not only in a log.
    if (route.blocked) badges.push(h("span", { class: "badge fail", dataset: { role: "blocked" }, title: route.blocked }, "stalled"));
    const target = route.upstream_model ? ["→", h("code", {}, route.upstream_model)] : [];
    const match = route.match.length ? route.match.map((m) => h("code", {}, m)) : [h("code", {}, "everything else")];
    const t = route.totals.requests;
    const totals = h("span", { class: "pin-label" },
      `${t.cloud + t.local + t.failover} requests since start · all time: ${money(route.totals.cost_usd)} spent · ${money(route.totals.cost_saved_usd)} saved · ${money(route.totals.judge_cost_usd)} judging · ${money(route.totals.net_saved_usd)} net`);
    const children = [h("h2", {}, route.name), h("span", { class: "match" }, match, target), ...badges, h("span", { class: "spacer" }), totals];
    if (route.adapt) {
      const current = route.pinned || "auto";
      const buttons = ["cloud", "auto", "local"].map((mode) =>
        h("button", {
          type: "button", class: mode === current ? "on" : "", "aria-pressed": mode === current ? "true" : "false",
          disabled: mode === "local" && route.active_adapter === null && route.pinned !== "local",
          title: mode === "auto" ? "let the adaptive cycle decide" : `always answer from the ${mode}`,
          onclick: () => pin(route.name, mode),
        }, mode === "auto" ? "Auto" : mode[0].toUpperCase() + mode.slice(1)));
      children.push(h("span", { class: "pin-label" }, "Pin"), h("div", { class: "pin-controls", role: "group", "aria-label": "pin mode" }, buttons));
    }
    return h("header", {}, children);
  }

  function panel(title, aside, body, span) {
    return h("section", { class: `panel${span ? ` span-${span}` : ""}` }, h("h3", {}, title, aside ? h("span", { class: "aside" }, aside) : null), body);
  }

  function historyPanel(route, now) {
    const history = route.history || [];
    // From a little before the first transition, so a recent cycle is not squashed to a sliver.
    const first = history.length ? history[0].ts : now - 300;
    const t0 = Math.min(first - Math.max(20, 0.25 * (now - first)), now - 60);
    const items = history.slice(-6).reverse().map((entry) =>
      h("li", {},
        h("time", {}, C.clock(entry.ts)),
        h("span", { class: "arrow" },
          entry.from === entry.to
            ? h("span", { class: "swatch-text" }, "pin")
            : [h("span", { class: `swatch-text m-${entry.from}` }, entry.from), " → ", h("span", { class: `swatch-text m-${entry.to}` }, entry.to)]),
        h("span", { class: "reason", title: entry.reason }, entry.reason)));
    const body = [C.modeBand(history, route.mode, t0, now)];
    body.push(items.length ? h("ol", { class: "transitions" }, items) : h("div", { class: "empty" }, "No transitions yet: the route is collecting answers from the cloud."));
    return panel("Mode history", `${history.filter((e) => e.from !== e.to).length} transitions`, body, 3);
  }

  function trafficPanel(route, win) {
    const total = sumPoints(route.series, win.t0);
    const all = total.cloud + total.local + total.failover;
    const legend = h("div", { class: "legend" }, ["cloud", "local", "failover"].map((key) =>
      h("span", {}, h("i", { class: `sw-${key}` }), `${key} `, h("span", { class: "v" }, pct(total[key], all)))));
    legend.querySelectorAll("i").forEach((node, i) => { node.style.background = C.COLORS[["cloud", "local", "failover"][i]]; });
    const body = all ? [C.shareBars(route.series, win), legend] : [h("div", { class: "empty" }, "No traffic in this window."), legend];
    return panel("Traffic share", `${all} requests`, body);
  }

  function ratePanel(route, win) {
    const last = route.series.filter((p) => p.p95_ms !== null).slice(-1)[0];
    const body = [
      C.rateArea(route.series, win),
      h("div", { class: "legend" },
        h("span", {}, h("i", { class: "sw-p50" }), "p50 ", h("span", { class: "v" }, ms(last ? last.p50_ms : null))),
        h("span", {}, h("i", { class: "sw-p95" }), "p95 ", h("span", { class: "v" }, ms(last ? last.p95_ms : null)))),
      C.latencyLines(route.series, win),
    ];
    body[1].querySelector(".sw-p50").style.background = C.COLORS.local;
    body[1].querySelector(".sw-p95").style.background = C.COLORS.eval;
    return panel("Requests / s and latency", null, body);
  }

  function scorePanel(route) {
    const score = route.rolling_score;
    const good = score !== null && score >= route.rolling_threshold;
    const big = h("div", {},
      h("span", { class: "big", dataset: { role: "score" } }, score === null ? "–" : score.toFixed(1)),
      h("span", { class: "muted" }, ` / ${Math.round(route.rolling_threshold)} to stay local`),
      route.pass_rate === null ? null : h("span", { class: "muted" }, ` · ${Math.round(route.pass_rate * 100)}% passed`));
    if (score !== null) big.firstChild.style.color = good ? C.COLORS.local : C.COLORS.bad;
    const chart = C.scoreChart(route.scores, route.threshold, route.window_size, route.rolling_threshold);
    return panel("Judge score", `rolling mean over ${route.window_size}`, [big, chart]);
  }

  function trainingPanel(route, now) {
    const body = [];
    const job = route.job;
    if (job && (job.status === "queued" || job.status === "training")) {
      const share = job.total_steps ? job.current_step / job.total_steps : 0;
      const bar = h("div", { class: "progress" }, h("div", {}));
      bar.firstChild.style.width = `${Math.round(share * 100)}%`;
      body.push(
        h("div", {}, h("span", { class: "badge mode-training", dataset: { role: "job" } }, job.status), " ", h("code", {}, job.job_id || "")),
        bar,
        h("dl", { class: "kv" },
          h("dt", {}, "step"), h("dd", {}, `${job.current_step} / ${job.total_steps || "?"} (${Math.round(share * 100)}%)`),
          h("dt", {}, "epoch"), h("dd", {}, `${(job.current_epoch || 0).toFixed(2)} / ${job.total_epochs || "?"}`),
          h("dt", {}, "loss"), h("dd", {}, job.loss === null ? "–" : job.loss.toFixed(4))));
    } else {
      body.push(h("div", { class: "muted" }, job && job.status === "error" ? `Last job failed: ${job.message}` : "No training job running."));
    }
    const latest = route.latest_adapter;
    if (latest) {
      body.push(h("dl", { class: "kv" },
        h("dt", {}, "latest"), h("dd", {}, `v${latest.version}`),
        h("dt", {}, "trained"), h("dd", {}, latest.created_at ? ago(Date.parse(latest.created_at) / 1000, now) : "–"),
        h("dt", {}, "samples"), h("dd", {}, latest.sample_count === undefined ? "–"
          : latest.synthetic_count ? `${latest.real_count} real + ${latest.synthetic_count} synthetic` : String(latest.sample_count)),
        h("dt", {}, "train loss"), h("dd", {}, typeof latest.train_loss === "number" ? latest.train_loss.toFixed(4) : "–")));
      if (latest.stop_reason) body.push(h("div", { class: "muted", dataset: { role: "stop-reason" } }, `${latest.steps_run ?? "?"} / ${latest.planned_steps ?? "?"} steps · ${latest.stop_reason}`));
      const curve = (Array.isArray(latest.loss_curve) ? latest.loss_curve : latest.loss_history || [])
        .map((p) => (typeof p === "number" ? p : p && p.loss)).filter((v) => typeof v === "number");
      if (curve.length > 1) body.push(C.sparkline(curve));
    }
    const chips = [];
    if (route.active_adapter !== null) chips.push(h("span", { class: "badge mode-local" }, `serving-ready v${route.active_adapter}`));
    if (route.candidate_adapter !== null) chips.push(h("span", { class: "badge mode-eval" }, `candidate v${route.candidate_adapter}`));
    if (chips.length) body.push(h("div", { class: "chips" }, chips));
    if (route.blocked) body.push(h("div", { class: "reason", dataset: { role: "blocked-reason" } }, route.blocked));
    // A route collecting pairs says how far it is from its next job, so a thin route shows.
    if (route.adapt && route.mode === "cloud" && route.pending_pairs !== null && route.min_samples) {
      body.push(h("div", { class: "muted", dataset: { role: "pending-pairs" } },
        `next training at ${route.min_samples} new pairs: ${Math.min(route.pending_pairs, route.min_samples)} collected`));
    }
    if (route.eval_deadline) body.push(h("div", { class: "muted" }, `eval decides by ${new Date(route.eval_deadline * 1000).toLocaleTimeString([], { hour12: false })}`));
    return panel("Training", route.job ? route.job.status : null, body);
  }

  function evalCard(ev, now) {
    const verdict = ev.passed === null ? "error" : ev.passed ? "pass" : "fail";
    const score = ev.score === null ? "" : ` ${ev.score.toFixed(0)}`;
    return h("article", { class: "eval" },
      h("div", { class: "head" },
        h("span", { class: `badge ${verdict}` }, `${verdict}${score}`),
        h("span", { class: "badge" }, ev.phase),
        ev.adapter_version === null ? null : h("span", {}, `adapter v${ev.adapter_version}`),
        h("span", { class: "when" }, ago(ev.ts, now))),
      h("div", { class: "question" }, ev.question || "(no user message)"),
      h("div", { class: "answers" },
        h("div", { class: "answer cloud" }, h("div", { class: "who" }, "Cloud"), h("pre", {}, ev.cloud_answer)),
        h("div", { class: "answer local" }, h("div", { class: "who" }, "Local"), h("pre", {}, ev.local_answer === null ? "—" : ev.local_answer))),
      ev.reason || ev.error ? h("div", { class: "reason" }, ev.error ? `judge error: ${ev.error}` : ev.reason) : null);
  }

  function evalsPanel(route, now) {
    const body = route.evals.length
      ? h("div", { class: "evals" }, route.evals.slice(0, 4).map((ev) => evalCard(ev, now)))
      : h("div", { class: "empty" }, "No evaluations yet: they start once an adapter is trained.");
    return panel("Recent evals", "the cloud's answer and the local model's, side by side", body, 2);
  }

  function card(route, data) {
    const win = windowOf(data);
    const now = data.generated_at;
    const panels = route.adapt
      ? [historyPanel(route, now), trafficPanel(route, win), ratePanel(route, win), scorePanel(route), trainingPanel(route, now), evalsPanel(route, now)]
      : [trafficPanel(route, win), ratePanel(route, win),
        panel("Adaptive cycle", null, h("div", { class: "muted" }, "Off for this route: it proxies and logs. Set ", h("code", {}, "adapt: true"), " in gateway.yaml to let it learn."))];
    return h("article", { class: "route", id: `route-${route.name}`, dataset: { route: route.name, mode: route.mode, serving: route.serving } },
      header(route), h("div", { class: "grid" }, panels));
  }

  function render(data) {
    renderTotals(data);
    const main = $("routes");
    const names = new Set(data.routes.map((r) => r.name));
    for (const node of Array.from(main.children)) {
      if (!names.has(node.dataset.route)) { node.remove(); signatures.delete(node.dataset.route); }
    }
    data.routes.forEach((route, index) => {
      // Redrawn when the route changes, and every 15 s anyway so time axes keep moving.
      const signature = `${Math.floor(data.generated_at / 15)}:${JSON.stringify(route)}`;
      const existing = main.querySelector(`[data-route="${CSS.escape(route.name)}"]`);
      if (existing && signatures.get(route.name) === signature) return;
      const fresh = card(route, data);
      if (existing) existing.replaceWith(fresh);
      else main.insertBefore(fresh, main.children[index] || null);
      signatures.set(route.name, signature);
    });
  }

  // --- polling ---------------------------------------------------------------------------
  let timer = null;
  async function poll() {
    clearTimeout(timer);
    try {
      const response = await fetch(API, { credentials: "same-origin", cache: "no-store", headers: { accept: "application/json" } });
      if (response.status === 401 || response.status === 403) {
        setStatus("bad", "signed out");
        banner("Your session has ended: reload the page to sign in again.");
      } else if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      } else {
        banner("");
        render(await response.json());
      }
    } catch (err) {
      setStatus("bad", `gateway unreachable (${err.message}); retrying`);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  poll();
})();
