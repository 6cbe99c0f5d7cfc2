// glasslstm inspector: type text, watch the next-token distribution and the gates; select a
// span, list the cells that stay on across it, and find where else they are (LSTMVis's match).
// Talks to the JSON API of glasslstm/inspection/server.py. No framework, no build step.
//
// The page opens on the server's example text, already analysed, with the layer's most
// informative cells as the heatmap's rows. Each analysis carries only what is on screen: one
// quantity of one layer for the heatmap's cells; another layer, quantity or cell is fetched
// when chosen.
//
// Hooks for tests and tools: #next[data-text] is the text of the last analysis shown;
// body[data-ready="1"] once the first one is; tokens are #tokens .tok[data-t][data-v]; the
// heatmap's rows #heat-y .tick[data-cell], its columns #heat-x .tick[data-t]; the colour bar's
// ends #colorbar-ticks .tick[data-v].
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 200;
const NAMES = { i: "input gate i_t", f: "forget gate f_t", g: "new information N_t",
                o: "output gate o_t", c: "cell state C_t", h: "hidden state H_t" };
// Diverging colours (ColorBrewer RdBu, as glasslstm's other views): blue below the centre,
// near-white at it, red above.
const NEG = [33, 102, 172], MID = [247, 247, 247], POS = [178, 24, 43];

const state = {
  info: null, data: null, seq: 0, timer: null,
  cells: [], cell: 0,                      // the heatmap's rows; the cell that colours the text
  sel: null, anchor: null, dragging: false,
};

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

function half(b) {                         // IEEE float16 bits -> number
  const sign = b & 0x8000 ? -1 : 1, e = (b >> 10) & 0x1f, f = b & 0x3ff;
  if (e === 0) return sign * f * 2 ** -24;
  if (e === 31) return f ? NaN : sign * Infinity;
  return sign * (1 + f / 1024) * 2 ** (e - 15);
}

function unpack(p) {                       // {shape, dtype, data: base64 little-endian}
  const bin = atob(p.data), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  if (p.dtype === "float16") {
    const out = new Float32Array(bytes.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = half(view.getUint16(2 * i, true));
    return out;
  }
  const out = p.dtype === "int32" ? new Int32Array(bytes.length / 4) : new Float32Array(bytes.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = p.dtype === "int32" ? view.getInt32(4 * i, true) : view.getFloat32(4 * i, true);
  return out;
}

// ------------------------------------------------------------------ display helpers
function show(tok) {                       // a token, visible
  return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/^ $/, "\u2423");
}
function pct(p) { return (100 * p).toFixed(p < 0.1 ? 1 : 0) + "%"; }
function ordinal(n) { return n + (n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd" : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th"); }
function fmt(v) { return Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2); }

function rgb(v, scale) {                   // the colour of a value on the diverging scale
  if (!Number.isFinite(v)) return MID;
  const x = Math.max(-1, Math.min(1, (v - scale.centre) / scale.half));
  const end = x < 0 ? NEG : POS, a = Math.abs(x);
  return MID.map((m, i) => Math.round(m + (end[i] - m) * a));
}
function css(c) { return `rgb(${c[0]}, ${c[1]}, ${c[2]})`; }
function dark(c) { return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 140; }

function value(t, row) { const d = state.data; return d.values[t * d.cells.length + row]; }
function rowOf(cell) { return state.data ? state.data.cells.indexOf(cell) : -1; }

// ------------------------------------------------------------------ analysis
function scheduleAnalyze() {
  clearTimeout(state.timer);
  updateCount();
  state.timer = setTimeout(analyzeNow, DEBOUNCE_MS);
}
function updateCount() {
  const n = $("text").value.length, cap = state.info ? state.info.max_chars : 0;
  $("count").textContent = cap ? `${n} / ${cap} characters` : "";
}

function wantedCells() {                   // the heatmap's rows, the selected cell among them
  let cells = state.cells.slice();
  if (!cells.includes(state.cell)) cells = [state.cell, ...cells];
  return cells.slice(0, state.info.max_cells);
}

async function analyzeNow() {
  clearTimeout(state.timer);
  const text = $("text").value, seq = ++state.seq;
  if (!text) {
    state.data = null; renderAll(); showError(""); document.body.classList.remove("stale");
    $("next").dataset.text = ""; return;
  }
  try {
    const r = await api("/api/analyze", {
      text, layer: +$("layer").value, quantity: $("quantity").value, cells: wantedCells(), top_k: 10 });
    if (seq !== state.seq) return;         // a newer request is on its way
    r.tokens = Array.from(unpack(r.token_ids), (i) => state.info.vocab[i]);
    r.values = unpack(r.values);
    r.guess_ids = unpack(r.guess_ids);
    r.guess_probs = unpack(r.guess_probs);
    r.target_prob = unpack(r.target_prob);
    state.data = r;
    state.cells = r.cells.slice();
    document.body.classList.remove("stale");
    if (state.sel && state.sel.end > r.tokens.length) clearSelection();
    showError("");
    renderAll();
    $("next").dataset.text = r.text;       // tests and tools wait on this
    document.body.dataset.ready = "1";
  } catch (e) {
    if (seq === state.seq) { showError(e.message); document.body.classList.add("stale"); }
  }
}

function renderAll() { renderNext(); renderCellControls(); renderTokens(); renderHeatmap(); renderSpan(); }

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

function renderCellControls() {
  $("cell").value = state.cell;
  $("cells-shown").value = state.cells.join(", ");
}

function renderTokens() {
  const box = $("tokens"), d = state.data;
  box.replaceChildren();
  if (!d) { $("legend").textContent = ""; return; }
  const q = d.quantity, row = rowOf(state.cell);
  $("legend").textContent = `text coloured by ${NAMES[q]} of cell ${state.cell} in layer ${d.layer}`;
  d.tokens.forEach((tok, t) => {
    const span = document.createElement("span"), v = value(t, row), c = rgb(v, d.scale);
    span.className = "tok";
    span.dataset.t = t;
    span.dataset.v = v;
    span.textContent = tok === "\n" ? "\u21b5\n" : tok;
    span.style.backgroundColor = css(c);
    span.style.color = dark(c) ? "#fff" : "#000";
    span.title = `token ${t} ${JSON.stringify(tok)}: ${q}[${state.cell}] = ${fmt(v)}`;
    if (state.sel && t >= state.sel.start && t < state.sel.end) span.classList.add("sel");
    box.appendChild(span);
  });
}

// ------------------------------------------------------------------ the heatmap and its axes
function niceStep(minTokens) {             // 1, 2, 5, 10, 20, 50, ... >= minTokens
  for (let p = 1; ; p *= 10) for (const m of [1, 2, 5]) if (m * p >= minTokens) return m * p;
}

function renderHeatmap() {
  const cv = $("heatmap"), d = state.data, ys = $("heat-y"), xs = $("heat-x");
  ys.replaceChildren(); xs.replaceChildren(); $("colorbar-ticks").replaceChildren();
  if (!d) { cv.width = cv.height = 0; $("heat-title").textContent = ""; return; }
  const T = d.tokens.length, K = d.cells.length;
  const w = Math.max(2, Math.min(14, Math.floor(900 / T))), h = Math.max(6, Math.min(16, Math.floor(320 / K)));
  cv.width = T * w; cv.height = K * h;
  cv.dataset.w = w; cv.dataset.h = h;
  const g = cv.getContext("2d"), img = g.createImageData(cv.width, cv.height);
  for (let k = 0; k < K; k++) for (let t = 0; t < T; t++) {
    const c = rgb(value(t, k), d.scale);
    for (let y = k * h; y < (k + 1) * h; y++) for (let x = t * w; x < (t + 1) * w; x++) {
      const o = 4 * (y * cv.width + x);
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
  }
  g.putImageData(img, 0, 0);
  g.strokeStyle = "#000"; g.lineWidth = 1;
  const row = rowOf(state.cell);
  if (row >= 0) g.strokeRect(0.5, row * h + 0.5, cv.width - 1, h - 1);
  if (state.sel) { g.strokeStyle = "#ff9800"; g.strokeRect(state.sel.start * w + 0.5, 0.5, (state.sel.end - state.sel.start) * w - 1, cv.height - 1); }

  // y axis: one label per row where they fit, the selected cell always
  const every = Math.max(1, Math.ceil(12 / h));
  ys.style.height = cv.height + "px";
  d.cells.forEach((cell, k) => {
    if (k % every && cell !== state.cell) return;
    const tick = document.createElement("span");
    tick.className = "tick" + (cell === state.cell ? " current" : "");
    tick.dataset.cell = cell;
    tick.textContent = cell;
    tick.style.top = (k * h + h / 2) + "px";
    ys.appendChild(tick);
  });
  // x axis: every token's text where there is room, else positions at a round step
  xs.style.width = cv.width + "px";
  const labelTokens = w >= 10, step = labelTokens ? 1 : niceStep(Math.ceil(48 / w));
  for (let t = 0; t < T; t += step) {
    const tick = document.createElement("span");
    tick.className = "tick" + (labelTokens ? " token" : "");
    tick.dataset.t = t;
    tick.textContent = labelTokens ? show(d.tokens[t]) : t;
    tick.title = `token ${t}: ${JSON.stringify(d.tokens[t])}`;
    tick.style.left = (t * w + w / 2) + "px";
    xs.appendChild(tick);
  }
  const informative = arraysEqual(d.cells, informativeCells(d.layer));
  $("heat-title").textContent = `${NAMES[d.quantity]} (${d.quantity}) in layer ${d.layer}: ` +
    `${K} cells (rows) over ${T} tokens (columns)` +
    (informative ? `, the layer's most informative first (${state.info.informative.measure}, on ${state.info.informative.source})` : "");
  renderColorbar(d);
}

function renderColorbar(d) {
  const s = d.scale, cv = $("colorbar-canvas"), g = cv.getContext("2d");
  for (let x = 0; x < cv.width; x++) {
    g.fillStyle = css(rgb(s.min + (s.max - s.min) * (x + 0.5) / cv.width, s));
    g.fillRect(x, 0, 1, cv.height);
  }
  const ticks = $("colorbar-ticks");
  for (const [v, where] of [[s.min, 0], [s.centre, 50], [s.max, 100]]) {
    const tick = document.createElement("span");
    tick.className = "tick";
    tick.dataset.v = v;
    tick.textContent = (where === 0 && s.clipped > 0 ? "\u2264 " : where === 100 && s.clipped > 0 ? "\u2265 " : "") + fmt(v);
    tick.style.left = where + "%";
    ticks.appendChild(tick);
  }
  $("colorbar-caption").textContent = `${d.quantity}: centred on ${s.centre} (white), ` +
    `blue below, red above; the ends are the ${ordinal(s.percentiles[0])}/${ordinal(s.percentiles[1])} ` +
    `percentiles of the values shown (${(100 * s.clipped).toFixed(1)}% of them clipped)`;
}

function informativeCells(layer) { return state.info.informative.layers[layer].map((c) => c.cell); }
function arraysEqual(a, b) { return a.length === b.length && a.every((x, i) => x === b[i]); }

function showTokenInfo(t, row) {
  const d = state.data;
  if (!d || !(t >= 0 && t < d.tokens.length)) return;
  const vocab = state.info.vocab, n = d.guess_ids.length / d.tokens.length, parts = [];
  for (let j = 0; j < n; j++) parts.push(`${show(vocab[d.guess_ids[t * n + j]])} ${pct(d.guess_probs[t * n + j])}`);
  const target = d.target_prob[t];
  const cell = row === undefined ? "" : `   cell ${d.cells[row]}: ${d.quantity} = ${fmt(value(t, row))}`;
  $("tok-info").textContent = `after token ${t} ${JSON.stringify(d.tokens[t])}: ${parts.join("  ")}` +
    (Number.isFinite(target) ? `   (actual next ${JSON.stringify(d.tokens[t + 1])}: ${pct(target)})` : "") + cell;
}

function heatCell(ev) {
  const cv = $("heatmap"), r = cv.getBoundingClientRect();
  return {
    t: Math.floor((ev.clientX - r.left) * (cv.width / r.width) / (+cv.dataset.w || 1)),
    row: Math.floor((ev.clientY - r.top) * (cv.height / r.height) / (+cv.dataset.h || 1)),
  };
}

function chooseCell(cell, quantity) {      // colour the text by `cell`; fetch if not on screen
  state.cell = cell;
  const refetch = (quantity && quantity !== $("quantity").value) || rowOf(cell) < 0;
  if (quantity) $("quantity").value = quantity;
  if (refetch) analyzeNow(); else { renderCellControls(); renderTokens(); renderHeatmap(); }
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

function number(id, what, lo) {
  const v = Number($(id).value);
  if (!Number.isInteger(v) || v < lo) throw new Error(`${what} must be a whole number >= ${lo}`);
  return v;
}

function spanRequest() {
  if (!state.data || !state.sel) throw new Error("select a span of tokens first (click, shift-click or drag over the text)");
  const threshold = parseFloat($("threshold").value);
  if (!Number.isFinite(threshold)) throw new Error("the threshold must be a number, e.g. 0.5");
  return { text: state.data.text, layer: state.data.layer, start: state.sel.start,
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
      b.title = "colour the text by this cell";
      b.addEventListener("click", () => chooseCell(c.cell, r.quantity));
      li.appendChild(b);
      ul.appendChild(li);
    }
  } catch (e) { showError(e.message); }
}

async function match() {
  try {
    const body = { ...spanRequest(), pattern_cells: number("pattern-cells", "pattern cells", 1),
                   tolerance: number("tolerance", "the tolerance", 0) };
    $("match-info").textContent = "searching\u2026";
    const r = await api("/api/match", body);
    showError("");
    $("match-info").textContent = `${r.matches.length} spans of ${r.source}` +
      ` (${r.searched_tokens} tokens${r.searched_truncated ? ", cut" : ""}) where at least ` +
      `${r.need} of cells ${r.cells.join(", ")} are above ${r.threshold} at every token ` +
      `(the ${r.cells.length} of the span's ${r.cells_on_span} on-cells that are on least often ` +
      `there; tolerance ${r.tolerance}):`;
    const ol = $("matches");
    ol.replaceChildren();
    for (const m of r.matches) {
      const li = document.createElement("li"), score = document.createElement("span"),
            mark = document.createElement("mark");
      li.className = "match";
      score.className = "score";
      score.textContent = `${m.score.toFixed(2)}`;
      score.title = `tokens ${m.start}..${m.end}; on average ${(100 * m.coverage).toFixed(0)}% of the pattern's cells on`;
      const flat = (s) => s.replace(/\n/g, "\u21b5");   // one line per match
      mark.textContent = flat(m.span);
      li.append(score, "\u2026" + flat(m.before), mark, flat(m.after) + "\u2026");
      ol.appendChild(li);
    }
  } catch (e) { $("match-info").textContent = ""; showError(e.message); }
}

// ------------------------------------------------------------------ wiring
function resetCells() {
  state.cells = informativeCells(+$("layer").value);
  state.cell = state.cells[0];
}

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) { showError(e.message); return; }
  const info = state.info;
  $("model").textContent = `${info.name} \u00b7 ${info.level} level \u00b7 ${info.num_layers} \u00d7 ${info.hidden_size} cells`;
  for (let k = 0; k < info.num_layers; k++) $("layer").add(new Option(`${k}`, k));
  $("layer").value = info.num_layers - 1;  // the last layer: what the prediction reads
  for (const q of info.quantities) $("quantity").add(new Option(`${q}: ${NAMES[q] || q}`, q));
  $("quantity").value = "h";
  $("cell").max = info.hidden_size - 1;
  $("pattern-cells").value = info.pattern_cells;
  $("tolerance").value = info.tolerance;
  $("match").disabled = !info.match;
  if (!info.match) $("match").title = info.match_error || "no match text: start glasslstm serve on a run directory or with --data";
  resetCells();

  $("text").addEventListener("input", scheduleAnalyze);
  $("layer").addEventListener("change", () => { resetCells(); analyzeNow(); });
  $("quantity").addEventListener("change", analyzeNow);
  $("cell").addEventListener("change", () => {
    const c = Math.floor(Number($("cell").value));
    if (!(c >= 0 && c < info.hidden_size)) { showError(`the cell must be a number in 0..${info.hidden_size - 1}`); return; }
    chooseCell(c);
  });
  $("cells-shown").addEventListener("change", () => {
    const parts = $("cells-shown").value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (!parts.length || parts.some((c) => !Number.isInteger(c) || c < 0 || c >= info.hidden_size)) {
      showError(`list cells as numbers in 0..${info.hidden_size - 1} separated by commas`); return;
    }
    state.cells = [...new Set(parts)].slice(0, info.max_cells);
    if (!state.cells.includes(state.cell)) state.cell = state.cells[0];
    analyzeNow();
  });
  $("informative").addEventListener("click", () => { resetCells(); analyzeNow(); });
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
  $("heatmap").addEventListener("mousemove", (ev) => {
    const { t, row } = heatCell(ev);
    if (state.data && row >= 0 && row < state.data.cells.length) showTokenInfo(t, row);
  });
  $("heatmap").addEventListener("click", (ev) => {
    const { row } = heatCell(ev);
    if (state.data && row >= 0 && row < state.data.cells.length) chooseCell(state.data.cells[row]);
  });

  $("text").value = info.example;          // never an empty page: the example, analysed
  updateCount();
  analyzeNow();
}

document.addEventListener("DOMContentLoaded", init);
