// The Sluice console: polls the admin API and renders what it says.
//
// Everything shown comes from the API and is put into the page as text
// (textContent, attributes, canvas drawing), never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 1500;
  /** How far back the throughput charts reach. */
  const CHART_MS = 5 * 60 * 1000;
  const TOKEN_KEY = "sluice-admin-token";
  /** Dead letters listed at most; the summary still counts them all. */
  const MAX_LETTERS = 200;
  const CAUSE_HEADER = "sluice-dead-letter-cause";
  const REASON_HEADER = "sluice-dead-letter-reason";
  const ATTEMPTS_HEADER = "sluice-attempts";
  const TOPIC_HEADER = "sluice-original-topic";

  const $ = (id) => document.getElementById(id);

  /** An element with attributes, event handlers (`on…`) and children
   * (nodes, or anything else as text). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setText(node, text) {
    const value = text === undefined || text === null ? "-" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  const known = (value) => value !== undefined && value !== null;
  const count = (value) => (known(value) ? String(value) : "-");
  const shortHash = (hash) => (hash ? String(hash).slice(0, 12) : "-");
  const clock = (ms) => (ms ? new Date(ms).toLocaleString() : "-");

  function ago(ms) {
    if (!ms) return "-";
    const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return clock(ms);
  }

  function header(message, name) {
    const pair = (message.headers || []).find((h) => h[0] === name);
    return pair ? pair[1] : undefined;
  }

  // ---- status line ----

  function say(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  // ---- the API ----

  class Unauthorized extends Error {}

  /** Calls the API; the answer's JSON, or an Error with its `error`. */
  async function api(method, path, body, contentType) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    if (contentType) headers["Content-Type"] = contentType;
    const response = await fetch(path, { method, headers, body, cache: "no-store" });
    if (response.status === 401) throw new Unauthorized();
    const text = await response.text();
    let answer = null;
    try {
      answer = text ? JSON.parse(text) : null;
    } catch (_) {
      answer = null;
    }
    if (!response.ok) {
      const why = answer && answer.error ? answer.error : text.trim();
      throw new Error(`${response.status}: ${why || response.statusText}`);
    }
    return answer;
  }

  const routePath = (name, rest) => `api/routes/${encodeURIComponent(name)}${rest}`;
  const pluginPath = (name, rest) => `api/plugins/${encodeURIComponent(name)}${rest}`;

  /** Runs an operator's action: reports its outcome, asks for the token
   * on a 401, and polls at once so the page shows the result. */
  async function act(describe, action) {
    say(`${describe}…`);
    try {
      const answer = await action();
      say(`${describe}: done${answer ? ` (${summarize(answer)})` : ""}`);
    } catch (error) {
      if (error instanceof Unauthorized) {
        needToken("The token was refused.");
        return;
      }
      say(`${describe}: ${error.message}`, true);
    }
    await poll();
  }

  function summarize(answer) {
    if (answer.deployed) return `now ${shortHash(answer.deployed.hash)}`;
    if (answer.unchanged) return `already ${shortHash(answer.unchanged.hash)}`;
    if (answer.current) return `now ${shortHash(answer.current.hash)}`;
    if (answer.shadow) return `candidate ${shortHash(answer.shadow.hash)}`;
    if (known(answer.redriven)) return `${answer.redriven} redriven`;
    if (known(answer.purged)) return `${answer.purged} purged`;
    if (known(answer.paused)) return answer.paused ? "paused" : "running";
    return "ok";
  }

  // ---- the token ----

  /** Set while the prompt is up: the API answers nothing but 401s until
   * a token is entered, so polling waits for one. */
  let waitingForToken = false;

  /** Shows the token prompt and nothing the API said. */
  function needToken(why) {
    waitingForToken = true;
    clearData();
    $("data").hidden = true;
    $("forget-token").hidden = true;
    $("login").hidden = false;
    $("login-why").textContent = why;
    $("updated").textContent = "";
    say("");
    $("token-input").focus();
  }

  function clearData() {
    for (const name of [...routes.keys()]) dropRoute(name);
    for (const name of [...plugins.keys()]) dropPlugin(name);
    closeDeadLetters();
    closeShadowReport();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token-input");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    poll();
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    needToken("Token forgotten.");
  });

  // ---- routes ----

  /** Rows by route name, with what their rate and chart come from. */
  const routes = new Map();

  function addRoute(name) {
    const cell = (className) => el("td", { class: className });
    const row = {
      /** The last poll's `received` count and when it was read. */
      sample: null,
      rates: [],
      cells: {
        name: cell("wrap-narrow"),
        state: cell(),
        received: cell("number received"),
        acked: cell("number acked"),
        rate: cell("number rate"),
        chart: el("td"),
        backlog: cell("number backlog"),
        pending: cell("number pending"),
        inFlight: cell("number in-flight"),
        errors: cell("number errors"),
        deadLettered: cell("number dead-lettered"),
        activity: cell("activity"),
        actions: el("td"),
      },
    };
    row.title = el("strong", {}, name);
    row.detail = el("span", { class: "detail" });
    row.cells.name.append(row.title, row.detail);
    row.canvas = el("canvas", { class: "spark", width: 120, height: 32 });
    row.cells.chart.append(row.canvas);
    row.pause = el(
      "button",
      {
        type: "button",
        "data-action": "pause",
        "data-route": name,
        onclick: () => act(`pause ${name}`, () => api("POST", routePath(name, "/pause"))),
      },
      "Pause",
    );
    row.resume = el(
      "button",
      {
        type: "button",
        "data-action": "resume",
        "data-route": name,
        onclick: () => act(`resume ${name}`, () => api("POST", routePath(name, "/resume"))),
      },
      "Resume",
    );
    const letters = el(
      "button",
      { type: "button", "data-action": "dead-letters", "data-route": name, onclick: () => openDeadLetters(name) },
      "Dead letters",
    );
    row.cells.actions.append(row.pause, row.resume, letters);
    row.tr = el("tr", { "data-route": name }, ...Object.values(row.cells));
    document.querySelector("#routes tbody").append(row.tr);
    routes.set(name, row);
    return row;
  }

  function dropRoute(name) {
    routes.get(name).tr.remove();
    routes.delete(name);
  }

  function renderRoutes(list, now) {
    const seen = new Set();
    for (const route of list) {
      seen.add(route.name);
      renderRoute(routes.get(route.name) || addRoute(route.name), route, now);
    }
    for (const name of [...routes.keys()]) if (!seen.has(name)) dropRoute(name);
    $("no-routes").hidden = list.length > 0;
  }

  function renderRoute(row, route, now) {
    const stats = route.stats || {};
    const c = row.cells;
    setText(
      row.detail,
      `${(route.topics || []).join(", ")} → ${route.plugin ?? "forward"} on ${route.backend}` +
        (route.group ? ` (group ${route.group})` : ""),
    );

    let state = "running";
    if (route.paused) state = "paused";
    else if (route.trouble) state = "trouble";
    setText(c.state, state === "trouble" ? route.trouble : state);
    c.state.className = `state state-${state}`;
    row.pause.hidden = Boolean(route.paused);
    row.resume.hidden = !route.paused;

    setText(c.received, count(stats.received));
    setText(c.acked, count(stats.succeeded));
    // Fields a host may or may not report: shown where present.
    setText(c.backlog, count(route.backlog));
    setText(c.pending, count(route.pending));
    setText(c.inFlight, count(known(route.in_flight) ? route.in_flight : stats.in_flight));
    const pluginErrors = stats.plugin_errors || 0;
    const backendErrors = stats.backend_errors || 0;
    setText(c.errors, String(pluginErrors + backendErrors));
    c.errors.classList.toggle("bad", pluginErrors + backendErrors > 0);
    c.errors.title =
      `plugin ${pluginErrors}, backend ${backendErrors}, ` +
      `retried ${stats.retried || 0}, lease lost ${stats.lease_lost || 0}`;
    setText(c.deadLettered, count(stats.dead_lettered));
    const activity = firstKnown(route.last_activity_ms, stats.last_activity_ms, route.last_activity);
    setText(c.activity, typeof activity === "number" ? ago(activity) : count(activity));

    track(row, stats.received, now);
    const latest = row.rates[row.rates.length - 1];
    setText(c.rate, latest ? latest.rate.toFixed(1) : "-");
    drawChart(row.canvas, row.rates, now);
  }

  function firstKnown(...values) {
    return values.find(known);
  }

  /** Turns successive `received` counts into rates, kept for the chart. */
  function track(row, received, now) {
    if (!known(received)) return;
    const last = row.sample;
    // An action's extra poll comes soon after the last: too soon to tell a
    // rate by, so the last rate stands.
    if (last && received >= last.received && now - last.at < POLL_MS / 3) return;
    // A reload starts the route's counters afresh: start the rate afresh too.
    if (last && received >= last.received) {
      row.rates.push({ at: now, rate: ((received - last.received) * 1000) / (now - last.at) });
    }
    row.sample = { at: now, received };
    while (row.rates.length && row.rates[0].at < now - CHART_MS) row.rates.shift();
  }

  /** A sparkline of the rates over the last CHART_MS, scaled to its peak. */
  function drawChart(canvas, rates, now) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 120;
    const height = canvas.clientHeight || 32;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const style = getComputedStyle(document.documentElement);
    g.strokeStyle = style.getPropertyValue("--line").trim() || "#ccc";
    g.lineWidth = 1;
    g.beginPath();
    g.moveTo(0, height - 0.5);
    g.lineTo(width, height - 0.5);
    g.stroke();
    if (!rates.length) return;
    const peak = Math.max(1, ...rates.map((r) => r.rate));
    const x = (at) => ((at - (now - CHART_MS)) / CHART_MS) * width;
    const y = (rate) => height - 2 - (rate / peak) * (height - 4);
    const accent = style.getPropertyValue("--accent").trim() || "#0969da";
    g.beginPath();
    g.moveTo(x(rates[0].at), height);
    for (const r of rates) g.lineTo(x(r.at), y(r.rate));
    g.lineTo(x(rates[rates.length - 1].at), height);
    g.closePath();
    g.globalAlpha = 0.2;
    g.fillStyle = accent;
    g.fill();
    g.globalAlpha = 1;
    g.beginPath();
    rates.forEach((r, i) => (i ? g.lineTo(x(r.at), y(r.rate)) : g.moveTo(x(r.at), y(r.rate))));
    g.strokeStyle = accent;
    g.lineWidth = 1.5;
    g.stroke();
    canvas.title = `peak ${peak.toFixed(1)} msg/s over the last ${CHART_MS / 60000} min`;
  }

  // ---- plugins ----

  const plugins = new Map();

  function addPlugin(name) {
    const row = { cells: {} };
    for (const key of ["name", "version", "since", "source", "earlier", "error", "shadow", "actions"]) {
      row.cells[key] = el("td");
    }
    row.cells.name.append(el("strong", {}, name));
    row.cells.version.className = "mono version";
    row.cells.shadow.className = "shadow wrap-narrow";
    row.cells.error.className = "wrap-narrow";
    row.cells.source.className = "wrap-narrow";
    const button = (action, label, onclick, className) =>
      el("button", { type: "button", "data-action": action, "data-plugin": name, class: className, onclick }, label);
    row.sample = el("input", {
      type: "number",
      min: "0.01",
      max: "1",
      step: "0.05",
      value: "1",
      title: "Share of messages the shadow candidate handles too",
      "aria-label": `shadow sample of ${name}`,
    });
    row.promote = button("shadow-promote", "Promote", () =>
      act(`promote the shadow of ${name}`, () => api("POST", pluginPath(name, "/shadow/promote"))),
    );
    row.stop = button("shadow-stop", "Stop shadow", () =>
      act(`stop the shadow of ${name}`, () => api("POST", pluginPath(name, "/shadow/stop"))),
    );
    row.report = button("shadow-report", "Report", () => openShadowReport(name));
    // Deploy and shadow each upload a .wasm the operator picks.
    const picker = (action, upload) => {
      const input = el("input", {
        type: "file",
        accept: ".wasm,application/wasm",
        hidden: true,
        "data-action": action,
        "data-plugin": name,
      });
      input.addEventListener("change", () => {
        const file = input.files[0];
        if (file) upload(file);
        input.value = "";
      });
      return input;
    };
    const deployFile = picker("deploy-file", (file) =>
      act(`deploy ${file.name} to ${name}`, () => api("PUT", pluginPath(name, ""), file, "application/wasm")),
    );
    const shadowFile = picker("shadow-file", (file) => {
      const sample = Number(row.sample.value) || 1;
      act(`shadow ${name} with ${file.name}`, () =>
        api("PUT", pluginPath(name, `/shadow?sample=${encodeURIComponent(sample)}`), file, "application/wasm"),
      );
    });
    row.cells.actions.className = "plugin-actions";
    row.cells.actions.append(
      deployFile,
      shadowFile,
      button("deploy", "Deploy…", () => deployFile.click()),
      button("rollback", "Rollback", () => {
        if (confirm(`Roll plugin ${name} back to its previous version?`)) {
          act(`roll back ${name}`, () => api("POST", pluginPath(name, "/rollback")));
        }
      }),
      button("shadow", "Shadow…", () => shadowFile.click()),
      row.sample,
      row.report,
      row.promote,
      row.stop,
    );
    row.tr = el("tr", { "data-plugin": name }, ...Object.values(row.cells));
    document.querySelector("#plugins tbody").append(row.tr);
    plugins.set(name, row);
    return row;
  }

  function dropPlugin(name) {
    plugins.get(name).tr.remove();
    plugins.delete(name);
  }

  function renderPlugins(list, shadows) {
    const seen = new Set();
    list.forEach((plugin, i) => {
      seen.add(plugin.name);
      const row = plugins.get(plugin.name) || addPlugin(plugin.name);
      const c = row.cells;
      const current = plugin.current || {};
      setText(c.version, shortHash(current.hash));
      c.version.title = current.hash || "";
      setText(c.since, clock(current.loaded_at_ms));
      setText(c.source, current.source);
      const earlier = plugin.earlier || [];
      setText(c.earlier, earlier.length ? earlier.map((v) => shortHash(v.hash)).join(", ") : "-");
      setText(c.error, plugin.last_error);
      c.error.classList.toggle("bad", Boolean(plugin.last_error));
      const shadow = shadows[i];
      setText(
        c.shadow,
        shadow
          ? `${shortHash(shadow.candidate && shadow.candidate.hash)} · same ${shadow.same}` +
              ` · different ${shadow.different} · failed ${shadow.candidate_failed}`
          : "-",
      );
      row.promote.disabled = row.stop.disabled = row.report.disabled = !shadow;
      if (shadow && shadowOpen === plugin.name) showShadowReport(shadow);
    });
    for (const name of [...plugins.keys()]) if (!seen.has(name)) dropPlugin(name);
  }

  /** The plugin's shadow run, or null where it has none. */
  async function shadowOf(name) {
    try {
      return await api("GET", pluginPath(name, "/shadow"));
    } catch (error) {
      if (error instanceof Unauthorized) throw error;
      return null;
    }
  }

  // ---- shadow report ----

  let shadowOpen = null;

  async function openShadowReport(name) {
    shadowOpen = name;
    $("sr-plugin").textContent = name;
    $("shadow-report").hidden = false;
    try {
      showShadowReport(await api("GET", pluginPath(name, "/shadow")));
    } catch (error) {
      if (error instanceof Unauthorized) return needToken("The token was refused.");
      $("sr-summary").textContent = error.message;
    }
  }

  function showShadowReport(report) {
    setText(
      $("sr-summary"),
      `Candidate ${shortHash(report.candidate && report.candidate.hash)} on ${Math.round(report.sample * 100)}% ` +
        `of messages: ${report.same} same, ${report.different} different, ${report.candidate_failed} failed.`,
    );
    const body = document.querySelector("#sr-differences tbody");
    body.replaceChildren(
      ...(report.differences || []).map((d) =>
        el(
          "tr",
          {},
          el("td", { class: "mono" }, d.message_id),
          el("td", { class: "number" }, d.attempt),
          el("td", { class: "wrap" }, el("pre", {}, d.live)),
          el("td", { class: "wrap" }, el("pre", {}, d.candidate)),
        ),
      ),
    );
  }

  function closeShadowReport() {
    shadowOpen = null;
    $("shadow-report").hidden = true;
    document.querySelector("#sr-differences tbody").replaceChildren();
    $("sr-summary").textContent = "";
  }

  $("sr-close").addEventListener("click", closeShadowReport);

  // ---- dead letters ----

  /** The route whose dead letters are shown; they are read when opened and
   * after each action, not on every poll, since reading holds them a moment. */
  let lettersOf = null;

  async function openDeadLetters(name) {
    lettersOf = name;
    $("dl-route").textContent = name;
    $("dead-letters").hidden = false;
    await loadDeadLetters();
  }

  let lettersRead = Promise.resolve();

  /** Reads the dead letters again once any read under way is done. */
  function loadDeadLetters() {
    lettersRead = lettersRead.then(readDeadLetters);
    return lettersRead;
  }

  async function readDeadLetters() {
    const name = lettersOf;
    if (!name) return;
    const body = document.querySelector("#dl-messages tbody");
    $("dl-summary").textContent = "Reading…";
    try {
      // One read: reading holds the dead letters a moment, so a second
      // read at the same time would find none.
      const letters = await api("GET", routePath(name, "/dead-letters/messages"));
      if (lettersOf !== name) return;
      $("dl-summary").textContent = summarizeLetters(letters);
      body.replaceChildren(...letters.slice(0, MAX_LETTERS).map(letterRow));
    } catch (error) {
      if (error instanceof Unauthorized) return needToken("The token was refused.");
      $("dl-summary").textContent = error.message;
      body.replaceChildren();
    }
  }

  /** Counts by cause, oldest and newest, as `sluice dlq list` gives them. */
  function summarizeLetters(letters) {
    const causes = new Map();
    for (const letter of letters) {
      const cause = header(letter, CAUSE_HEADER) || "unknown";
      causes.set(cause, (causes.get(cause) || 0) + 1);
    }
    const times = letters.map((letter) => letter.timestamp_ms);
    return (
      `${letters.length} dead letter${letters.length === 1 ? "" : "s"}` +
      (causes.size ? ` (${[...causes].map(([cause, n]) => `${cause} ${n}`).join(", ")})` : "") +
      (times.length ? `, oldest ${clock(Math.min(...times))}, newest ${clock(Math.max(...times))}` : "") +
      (letters.length > MAX_LETTERS ? `; the first ${MAX_LETTERS} shown` : "")
    );
  }

  function letterRow(letter) {
    const payload = known(letter.payload) ? letter.payload : `(binary, base64) ${letter.payload_base64}`;
    const preview = payload.length > 80 ? `${payload.slice(0, 80)}…` : payload;
    const headers = (letter.headers || []).map(([k, v]) => `${k}: ${v}`).join("\n");
    return el(
      "tr",
      {},
      el("td", {}, el("input", { type: "checkbox", "data-id": letter.id, "aria-label": `select ${letter.id}` })),
      el("td", { class: "mono" }, letter.id),
      el("td", {}, header(letter, CAUSE_HEADER) || "-"),
      el("td", { class: "wrap" }, header(letter, REASON_HEADER) || "-"),
      el("td", { class: "number" }, header(letter, ATTEMPTS_HEADER) || "-"),
      el("td", {}, header(letter, TOPIC_HEADER) || "-"),
      el("td", {}, clock(letter.timestamp_ms)),
      el(
        "td",
        { class: "wrap" },
        el(
          "details",
          {},
          el("summary", {}, preview || "(empty)"),
          el("pre", {}, payload),
          el("pre", { class: "detail" }, (letter.key ? `key: ${letter.key}\n` : "") + headers),
        ),
      ),
    );
  }

  function selectedIds() {
    return [...document.querySelectorAll("#dl-messages tbody input:checked")].map((box) => box.dataset.id);
  }

  /** Redrives or purges the selected dead letters, or all of them. */
  async function onLetters(operation, onlySelected) {
    const name = lettersOf;
    const ids = onlySelected ? selectedIds() : [];
    if (onlySelected && !ids.length) return say("Select some dead letters first.", true);
    const which = onlySelected ? `${ids.length} selected dead letter(s)` : "all dead letters";
    if (operation === "purge" && !confirm(`Purge ${which} of route ${name}? They cannot be brought back.`)) return;
    const query = ids.length ? `?id=${encodeURIComponent(ids.join(","))}` : "";
    await act(`${operation} ${which} of ${name}`, () => api("POST", routePath(name, `/dead-letters/${operation}${query}`)));
    await loadDeadLetters();
  }

  function closeDeadLetters() {
    lettersOf = null;
    $("dead-letters").hidden = true;
    document.querySelector("#dl-messages tbody").replaceChildren();
    $("dl-summary").textContent = "";
  }

  $("dl-refresh").addEventListener("click", loadDeadLetters);
  $("dl-redrive-selected").addEventListener("click", () => onLetters("redrive", true));
  $("dl-redrive-all").addEventListener("click", () => onLetters("redrive", false));
  $("dl-purge-selected").addEventListener("click", () => onLetters("purge", true));
  $("dl-purge-all").addEventListener("click", () => onLetters("purge", false));
  $("dl-close").addEventListener("click", closeDeadLetters);

  // ---- polling ----

  let polling = null;

  /** One round of reads; a round already under way is joined, not doubled. */
  function poll() {
    polling = polling || pollOnce().finally(() => (polling = null));
    return polling;
  }

  async function pollOnce() {
    try {
      const [routeList, pluginList] = await Promise.all([api("GET", "api/routes"), api("GET", "api/plugins")]);
      // A host that lists each plugin's shadow (null for none) is asked
      // for reports only of the runs it has.
      const shadows = await Promise.all(
        pluginList.map((p) => (p.shadow === null ? null : shadowOf(p.name))),
      );
      const now = Date.now();
      waitingForToken = false;
      $("login").hidden = true;
      $("data").hidden = false;
      $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
      renderRoutes(routeList, now);
      renderPlugins(pluginList, shadows);
      $("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    } catch (error) {
      if (error instanceof Unauthorized) {
        needToken(
          sessionStorage.getItem(TOKEN_KEY)
            ? "The token was refused."
            : "This host's admin API needs its bearer token.",
        );
      } else {
        say(`Cannot reach the admin API: ${error.message}`, true);
      }
    }
  }

  function schedule() {
    setTimeout(async () => {
      if (!waitingForToken) await poll();
      schedule();
    }, POLL_MS);
  }

  poll();
  schedule();
})();
