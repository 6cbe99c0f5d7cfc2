// glasslstm inspector: type text, watch the next-token distribution and the gates; select a
// span, list the cells that stay on across it, and find where else they do (LSTMVis's match).
// Talks to the JSON API of glasslstm/inspect/server.py. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 200;
const UNIT = new Set(["i", "f", "o"]);                    // sigmoid gates live in [0, 1]
const NAMES = { i: "input gate", f: "forget gate", g: "candidate N", o: "output gate",
                c: "cell state C", h: "hidden state H" };

const state = { info: null, data: null, seq: 0, timer: null, sel: null, anchor: null, dragging: false };

// ------------------------------------------------------------------ talking to the server
function showError(msg) { $("error").textContent = msg; $("error").hidden = !msg; }

async function api(path, body) {
  let resp;
  try {
    resp = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error("cannot reach the glasslstm server; is `glasslstm serve` still running?");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON: described below */ }
  if (!resp.ok) throw new Error((data && data.error) || `the server answered ${resp.status}`);
  return data;
}

// ------------------------------------------------------------------ display helpers
function show(tok) {                                       // a token, visible
  return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/^ $/, "\u2423");
}
function pct(p) { return (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%"; }

function colour(v, q, scale) {                             // white -> blue (and -> red below 0)
  if (UNIT.has(q)) return `rgba(30, 136, 229, ${Math.max(0, Math.min(1, v)).toFixed(3)})`;
  const a = Math.min(1, Math.abs(v) / scale);
  return v >= 0 ? `rgba(30, 136, 229, ${a.toFixed(3)})` : `rgba(229, 57, 53, ${a.toFixed(3)})`;
}
function scaleOf(values, q) {                              // c is unbounded: scale by its max |c|
  if (q !== "c") return 1;
  let m = 1e-6;
  for (const row of values) for (const v of row) m = Math.max(m, Math.abs(v));
  return m;
}

// ------------------------------------------------------------------ analysis
function scheduleAnalyze() {
  clearTimeout(state.timer);
  const n = $("text").value.length, cap = state.info ? state.info.max_chars : 0;
  $("count").textContent = cap ? `${n} / ${cap} characters` : "";
  state.timer = setTimeout(analyzeNow, DEBOUNCE_MS);
}

async function analyzeNow() {
  const text = $("text").value, seq = ++state.seq;
  if (!text) {
    state.data = null; renderAll(); showError(""); document.body.classList.remove("stale");
    $("next").dataset.text = ""; return;
  }
  try {
    const data = await api("/api/analyze", {
      text, layer: +$("layer").value || 0, quantities: [$("quantity").value], top_k: 10 });
    if (seq !== state.seq) return;                        // a newer request is on its way
    state.data = data;
    document.body.classList.remove("stale");
    if (state.sel && state.sel.end > data.tokens.length) clearSelection();
    showError("");
    renderAll();
    $("next").dataset.text = data.text;                    // tests and tools wait on this
  } catch (e) {
    if (seq === state.seq) { showError(e.message); document.body.classList.add("stale"); }
  }
}

function renderAll() { renderNext(); renderTokens(); renderHeatmap(); renderSpan(); }

function renderNext() {
  const box = $("next");
  box.replaceChildren();
  if (!state.data) { box.innerHTML = '<p class="muted">type some text</p>'; return; }
  for (const { token, prob } of state.data.next) {
    const row = document.createElement("div");
    row.className = "row bar";
    row.innerHTML = '<span class="label"></span><div class="track"><div class="fill"></div></div><span class="pct"></span>';
    row.querySelector(".label").textContent = show(token);
    row.querySelector(".fill").style.width = (100 * prob).toFixed(1) + "%";
    row.querySelector(".pct").textContent = pct(prob);
    row.title = `P(${JSON.stringify(token)}) = ${prob}`;
    box.appendChild(row);
  }
}

function currentValues() {
  const d = state.data, q = $("quantity").value;
  return d && d.gates[q] ? d.gates[q] : null;
}

function currentCell() {
  const h = state.info ? state.info.hidden_size : 1;
  let c = Math.floor(+$("cell").value || 0);
  c = Math.max(0, Math.min(h - 1, c));
  if (String(c) !== $("cell").value) $("cell").value = c;
  return c;
}

function renderTokens() {
  const box = $("tokens"), d = state.data, vals = currentValues();
  box.replaceChildren();
  if (!d || !vals) return;
  const q = $("quantity").value, cell = currentCell(), scale = scaleOf(vals, q);
  $("legend").textContent = `${NAMES[q]}, cell ${cell}` + (q === "c" ? ` (|c| up to ${scale.toFixed(2)})` : "");
  d.tokens.forEach((tok, t) => {
    const span = document.createElement("span");
    const v = vals[t][cell];
    span.className = "tok";
    span.dataset.t = t;
    span.dataset.v = v;
    span.textContent = tok === "\n" ? "\u21b5\n" : tok;
    span.style.backgroundColor = colour(v, q, scale);
    span.title = `token ${t} ${JSON.stringify(tok)}: ${q}[${cell}] = ${v}`;
    if (state.sel && t >= state.sel.start && t < state.sel.end) span.classList.add("sel");
    box.appendChild(span);
  });
}

function renderHeatmap() {
  const cv = $("heatmap"), d = state.data, vals = currentValues();
  if (!d || !vals) { cv.width = cv.height = 0; return; }
  const T = d.tokens.length, H = vals[0].length, q = $("quantity").value, scale = scaleOf(vals, q);
  const w = Math.max(2, Math.min(12, Math.floor(720 / T))), h = Math.max(1, Math.min(8, Math.floor(256 / H)));
  cv.width = T * w; cv.height = H * h;
  cv.dataset.w = w; cv.dataset.h = h;
  const g = cv.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, cv.width, cv.height);
  for (let t = 0; t < T; t++) for (let k = 0; k < H; k++) {
    g.fillStyle = colour(vals[t][k], q, scale);
    g.fillRect(t * w, k * h, w, h);
  }
  g.strokeStyle = "#ff9800"; g.lineWidth = 1;
  g.strokeRect(0.5, currentCell() * h + 0.5, cv.width - 1, Math.max(1, h - 1));
  if (state.sel) g.strokeRect(state.sel.start * w + 0.5, 0.5, (state.sel.end - state.sel.start) * w - 1, cv.height - 1);
}

function showTokenInfo(t) {
  const d = state.data;
  if (!d || !d.top[t]) return;
  const guesses = d.top[t].slice(0, 5).map((g) => `${show(g.token)} ${pct(g.prob)}`).join("  ");
  const target = d.target_prob[t];
  $("tok-info").textContent = `after token ${t} ${JSON.stringify(d.tokens[t])}: ${guesses}` +
    (target === null ? "" : `   (actual next ${JSON.stringify(d.tokens[t + 1])}: ${pct(target)})`);
}

// ------------------------------------------------------------------ span selection
function clearSelection() { state.sel = null; state.anchor = null; }

function select(a, b) {
  state.sel = { start: Math.min(a, b), end: Math.max(a, b) + 1 };
  for (const el of $("tokens").children) {
    const t = +el.dataset.t;
    el.classList.toggle("sel", t >= state.sel.start && t < state.sel.end);
  }
  renderHeatmap(); renderSpan();
}

function renderSpan() {
  const d = state.data, s = state.sel;
  $("span").textContent = d && s
    ? `span [${s.start}, ${s.end}): ${JSON.stringify(d.tokens.slice(s.start, s.end).join(""))} (${s.end - s.start} tokens)`
    : "select tokens above: click, shift-click or drag";
}

function tokenIndex(ev) {
  const el = ev.target.closest(".tok");
  return el ? +el.dataset.t : null;
}

function spanRequest() {
  if (!state.data || !state.sel) throw new Error("select a span of tokens first (click, shift-click or drag over the text)");
  const threshold = parseFloat($("threshold").value);
  if (!Number.isFinite(threshold)) throw new Error("the threshold must be a number, e.g. 0.5");
  return { text: state.data.text, layer: +$("layer").value || 0, start: state.sel.start,
           end: state.sel.end, threshold, quantity: $("on-quantity").value };
}

async function cellsOn() {
  try {
    const r = await api("/api/cells_on", spanRequest());
    showError("");
    const ul = $("cells");
    ul.replaceChildren();
    if (!r.cells.length) {
      const li = document.createElement("li");
      li.className = "empty muted";
      li.textContent = `no cell stays above ${r.threshold} across ${JSON.stringify(r.span)}`;
      ul.appendChild(li);
    }
    for (const c of r.cells) {
      const li = document.createElement("li"), b = document.createElement("button");
      li.className = "cell";
      li.dataset.cell = c.cell;
      b.type = "button";
      b.textContent = `cell ${c.cell} \u00b7 min ${c.min} \u00b7 mean ${c.mean}`;
      b.title = "show this cell in the gate view";
      b.addEventListener("click", () => {
        $("cell").value = c.cell;
        if ($("quantity").value !== r.quantity) { $("quantity").value = r.quantity; analyzeNow(); }
        else { renderTokens(); renderHeatmap(); }
      });
      li.appendChild(b);
      ul.appendChild(li);
    }
  } catch (e) { showError(e.message); }
}

async function match() {
  try {
    $("match-info").textContent = "searching\u2026 (the first search analyses the match text)";
    const r = await api("/api/match", spanRequest());
    showError("");
    $("match-info").textContent = `${r.matches.length} spans of ${r.source}` +
      ` (${r.searched_tokens} tokens${r.searched_truncated ? ", cut" : ""}) where cells ` +
      `${r.cells.join(", ")} are all above ${r.threshold}:`;
    const ol = $("matches");
    ol.replaceChildren();
    for (const m of r.matches) {
      const li = document.createElement("li"), score = document.createElement("span"),
            mark = document.createElement("mark");
      li.className = "match";
      score.className = "score";
      score.textContent = `${m.score.toFixed(2)}`;
      score.title = `tokens ${m.start}..${m.end}; ${m.cells_on} cells on across it`;
      const flat = (s) => s.replace(/\n/g, "\u21b5");         // one line per match
      mark.textContent = flat(m.span);
      li.append(score, "\u2026" + flat(m.before), mark, flat(m.after) + "\u2026");
      ol.appendChild(li);
    }
  } catch (e) { $("match-info").textContent = ""; showError(e.message); }
}

// ------------------------------------------------------------------ wiring
async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) { showError(e.message); return; }
  const info = state.info;
  $("model").textContent = `${info.name} \u00b7 ${info.level} level \u00b7 ${info.num_layers} \u00d7 ${info.hidden_size} cells`;
  for (let k = 0; k < info.num_layers; k++) $("layer").add(new Option(`${k}`, k));
  for (const q of info.quantities) $("quantity").add(new Option(`${q}: ${NAMES[q] || q}`, q, false, q === "h"));
  $("quantity").value = "h";
  $("cell").max = info.hidden_size - 1;
  $("match").disabled = !info.match;
  if (!info.match) $("match").title = "no match text: start glasslstm serve on a run directory or with --data";

  $("text").addEventListener("input", scheduleAnalyze);
  $("layer").addEventListener("change", analyzeNow);
  $("quantity").addEventListener("change", analyzeNow);
  $("cell").addEventListener("input", () => { renderTokens(); renderHeatmap(); });
  $("cells-on").addEventListener("click", cellsOn);
  $("match").addEventListener("click", match);

  const toks = $("tokens");
  toks.addEventListener("mousedown", (ev) => {
    const t = tokenIndex(ev);
    if (t === null) return;
    ev.preventDefault();
    if (ev.shiftKey && state.anchor !== null) { select(state.anchor, t); return; }
    state.anchor = t; state.dragging = true; select(t, t);
  });
  toks.addEventListener("mouseover", (ev) => {
    const t = tokenIndex(ev);
    if (t === null) return;
    showTokenInfo(t);
    if (state.dragging) select(state.anchor, t);
  });
  document.addEventListener("mouseup", () => { state.dragging = false; });
  $("heatmap").addEventListener("click", (ev) => {
    const cv = $("heatmap"), r = cv.getBoundingClientRect();
    const k = Math.floor((ev.clientY - r.top) * (cv.height / r.height) / (+cv.dataset.h || 1));
    const t = Math.floor((ev.clientX - r.left) * (cv.width / r.width) / (+cv.dataset.w || 1));
    $("cell").value = k;
    renderTokens(); renderHeatmap(); showTokenInfo(t);
  });
  scheduleAnalyze();
}

document.addEventListener("DOMContentLoaded", init);
