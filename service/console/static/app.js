// ood-serve console: plain JavaScript over the public HTTP API (no framework, no build step, no CDN).
// Classification models: POST /v1/models/{model}/score; segmentation models: POST .../segment?format=npy with the
// map at the displayed size, drawn as a heat map over the image; GET .../drift for the drift panel.
"use strict";

const KEY_STORAGE = "ood-serve-api-key";
const MAX_OVERLAY_SIDE = 384; // segmentation maps are asked for at most this many pixels per side
const state = { models: [], model: null, driftTimer: null, redraws: [] };
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const answer = await fetch(new URL(path, document.baseURI), { ...options, headers });
  const type = answer.headers.get("content-type") || "";
  const body = type.includes("json") ? await answer.json() : await answer.text();
  if (!answer.ok) {
    let detail = typeof body === "object" && body ? body.detail || body.title : String(body);
    if (answer.status === 401) detail = "this service needs an API key for reads: enter it above";
    if (answer.status === 403) detail = "the API key was refused";
    throw new ApiError(answer.status, `${answer.status}: ${detail}`);
  }
  return body;
}

function setStatus(text, isError = false) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  return value.toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`;
}

// ---------------------------------------------------------------- models and detectors
async function loadModels() {
  try {
    const answer = await api("v1/models");
    state.models = answer.models;
  } catch (error) {
    setStatus(`Cannot list the models: ${error.message}`, true);
    if (error.status === 503) setTimeout(loadModels, 2000); // warming up
    if (error.status === 401 || error.status === 403) $("#key").focus();
    return;
  }
  const select = $("#model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => el("option", { value: m.name, text: `${m.name} (${m.task})` })));
  if (state.models.some((m) => m.name === previous)) select.value = previous;
  setStatus(state.models.length ? "Choose or drop images to score them." : "The service serves no model.");
  selectModel();
}

function selectModel() {
  const model = state.models.find((m) => m.name === $("#model").value) || null;
  state.model = model;
  const box = $("#detectors");
  box.replaceChildren(el("legend", { text: "Detectors" }));
  if (!model) return;
  document.body.classList.toggle("segmentation", model.task === "segmentation");
  const [height, width] = model.input_size;
  $("#model-info").textContent = `${model.task}, ${model.classes.length} classes, input ${height}x${width}, ${model.device}`;
  for (const name of model.detectors) {
    const input = el("input", { type: "checkbox", name: "detector", value: name });
    input.checked = true;
    box.append(el("label", {}, input, ` ${name}`));
  }
  clearResults();
  refreshDrift();
}

function clearResults() {
  $("#results").replaceChildren();
  state.redraws = [];
}

function chosenDetectors() {
  return [...document.querySelectorAll('input[name="detector"]:checked')].map((input) => input.value);
}

function scoringQuery(extra = {}) {
  const params = new URLSearchParams(extra);
  const detectors = chosenDetectors();
  if (detectors.length) params.set("detectors", detectors.join(","));
  const threshold = $("#threshold").value.trim();
  const tpr = $("#tpr").value.trim();
  if (threshold) params.set("threshold", threshold);
  else if (tpr) params.set("tpr", tpr);
  return params;
}

// ---------------------------------------------------------------- scoring
async function scoreFiles(files) {
  const model = state.model;
  if (!model || !files.length) return;
  if (!chosenDetectors().length) {
    setStatus("Choose at least one detector.", true);
    return;
  }
  clearResults();
  setStatus(`Scoring ${files.length} image(s)…`);
  try {
    if (model.task === "segmentation") {
      for (const file of files) await segmentFile(model, file);
    } else {
      await classifyFiles(model, files);
    }
    setStatus(`Scored ${files.length} image(s) with ${model.name}.`);
  } catch (error) {
    setStatus(`Scoring failed: ${error.message}`, true);
  }
  refreshDrift();
}

async function classifyFiles(model, files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const answer = await api(`v1/models/${encodeURIComponent(model.name)}/score?${scoringQuery()}`, {
    method: "POST",
    body: form,
  });
  answer.results.forEach((result, index) => $("#results").append(classificationCard(files[index], result)));
}

function classificationCard(file, result) {
  const rows = Object.entries(result.detectors).map(([name, v]) => {
    const verdict = v.is_ood === null ? "no threshold" : v.is_ood ? "OOD" : "ID";
    return el(
      "tr",
      { "data-detector": name },
      el("td", { text: name }),
      el("td", { text: fmt(v.score) }),
      el("td", { text: fmt(v.threshold) }),
      el("td", { class: "verdict", "data-ood": v.is_ood, text: verdict }),
      el("td", { text: fmt(v.p_value) }),
    );
  });
  const flagged = Object.entries(result.detectors).filter(([, v]) => v.is_ood).map(([name]) => name);
  const summary = flagged.length ? `OOD for ${flagged.join(", ")}` : "in distribution for every detector";
  const p = result.prediction;
  return el(
    "article",
    { class: "card result", "data-file": file.name },
    el("h3", { text: file.name }),
    el(
      "div",
      { class: "head" },
      el("img", { class: "thumb", src: URL.createObjectURL(file), alt: file.name }),
      el(
        "div",
        {},
        el("div", { class: "prediction", text: `prediction ${p.label} (${pct(p.probability)})` }),
        el("div", { class: "summary verdict", "data-ood": flagged.length > 0, text: summary }),
      ),
    ),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ...["detector", "score", "threshold", "verdict", "p-value"].map((t) => el("th", { text: t })))),
      el("tbody", {}, ...rows),
    ),
  );
}

// ---------------------------------------------------------------- segmentation
function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(`${file.name} is not an image this browser can show`));
    image.src = URL.createObjectURL(file);
  });
}

function overlaySize(image) {
  const scale = Math.min(1, MAX_OVERLAY_SIDE / Math.max(image.naturalWidth, image.naturalHeight));
  return [Math.max(1, Math.round(image.naturalHeight * scale)), Math.max(1, Math.round(image.naturalWidth * scale))];
}

async function segmentFile(model, file) {
  const image = await loadImage(file);
  const [height, width] = overlaySize(image);
  const form = new FormData();
  form.append("files", file, file.name);
  const query = scoringQuery({ format: "npy", size: `${height}x${width}` });
  const answer = await api(`v1/models/${encodeURIComponent(model.name)}/segment?${query}`, { method: "POST", body: form });
  const result = answer.results[0];
  const figures = Object.entries(result.detectors).map(([name, verdict]) => overlayFigure(image, name, verdict));
  $("#results").append(
    el(
      "article",
      { class: "card result", "data-file": file.name },
      el("h3", { text: `${file.name} (${result.width}x${result.height})` }),
      el("div", { class: "maps" }, ...figures),
    ),
  );
}

function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

// A float16 .npy array (the /segment "npy" map format): header, then rows of little-endian halves.
function parseNpy(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const major = bytes[6];
  const start = major === 1 ? 10 : 12;
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const shape = header.match(/'shape':\s*\((\d+),\s*(\d+)\)/);
  if (!header.includes("'<f2'") || !shape) throw new Error("unexpected map encoding");
  const [height, width] = [Number(shape[1]), Number(shape[2])];
  const offset = start + headerLength;
  const values = new Float32Array(height * width);
  for (let i = 0; i < values.length; i++) values[i] = halfToFloat(view.getUint16(offset + 2 * i, true));
  return { height, width, values };
}

const RAMP = [
  [0.0, [0, 0, 4]],
  [0.25, [87, 16, 110]],
  [0.5, [188, 55, 84]],
  [0.75, [249, 142, 9]],
  [1.0, [252, 255, 164]],
]; // an inferno-like colour ramp

function colour(t) {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 1));
  for (let i = 1; i < RAMP.length; i++) {
    const [x1, c1] = RAMP[i];
    const [x0, c0] = RAMP[i - 1];
    if (x <= x1) {
      const f = (x - x0) / (x1 - x0);
      return c0.map((c, k) => Math.round(c + f * (c1[k] - c)));
    }
  }
  return RAMP[RAMP.length - 1][1];
}

function drawOverlay(canvas, image, map, threshold, opacity) {
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, map.width, map.height);
  let low = Infinity;
  let high = -Infinity;
  for (const v of map.values) {
    if (Number.isFinite(v)) {
      low = Math.min(low, v);
      high = Math.max(high, v);
    }
  }
  const span = high > low ? high - low : 1;
  const layer = new ImageData(map.width, map.height);
  map.values.forEach((v, i) => {
    const [r, g, b] = colour((v - low) / span);
    const above = threshold !== null && v > threshold;
    layer.data.set([r, g, b, Math.round(255 * opacity * (threshold === null || above ? 1 : 0.25))], 4 * i);
  });
  const scratch = el("canvas", { width: map.width, height: map.height });
  scratch.getContext("2d").putImageData(layer, 0, 0);
  context.drawImage(scratch, 0, 0);
  return [low, high];
}

// The colour ramp from the map's minimum to its maximum, with a white tick at the threshold.
function legendBar(low, high, threshold) {
  const legend = el("canvas", { class: "legend", width: 256, height: 10 });
  const context = legend.getContext("2d");
  for (let x = 0; x < 256; x++) {
    const [r, g, b] = colour(x / 255);
    context.fillStyle = `rgb(${r}, ${g}, ${b})`;
    context.fillRect(x, 0, 1, 10);
  }
  if (threshold !== null && high > low) {
    const x = Math.round((255 * (threshold - low)) / (high - low));
    if (x >= 0 && x <= 255) {
      context.fillStyle = "#ffffff";
      context.fillRect(Math.max(0, x - 1), 0, 3, 10);
    }
  }
  return legend;
}

function overlayFigure(image, name, verdict) {
  const map = parseNpy(verdict.map.data);
  const canvas = el("canvas", { class: "overlay", width: map.width, height: map.height, "data-detector": name });
  const redraw = () => drawOverlay(canvas, image, map, verdict.threshold, Number($("#opacity").value));
  const [low, high] = redraw();
  state.redraws.push(redraw);
  const legend = legendBar(low, high, verdict.threshold);
  const flagged = verdict.ood_share !== null && verdict.ood_share > 0;
  return el(
    "figure",
    { "data-detector": name },
    canvas,
    legend,
    el("div", { class: "legend-labels" }, el("span", { text: fmt(low, 2) }), el("span", { text: fmt(high, 2) })),
    el(
      "figcaption",
      {},
      el("strong", { text: name }),
      " ",
      el("span", { class: "ood-share verdict", "data-ood": flagged, text: `OOD share ${pct(verdict.ood_share)}` }),
      el("br"),
      `threshold ${fmt(verdict.threshold)} (white tick), max score ${fmt(verdict.max_score)}; pixels over the threshold are opaque`,
    ),
  );
}

// ---------------------------------------------------------------- drift
async function refreshDrift() {
  const model = state.model;
  if (!model) return;
  const body = $("#drift tbody");
  try {
    const answer = await api(`v1/models/${encodeURIComponent(model.name)}/drift`);
    $("#drift-info").textContent = `${model.name}, alarm below p = ${answer.alpha}`;
    body.replaceChildren(
      ...Object.entries(answer.detectors).map(([name, d]) => {
        const status = d.note ? d.note : d.filled === 0 ? "no images yet" : d.drifting ? "DRIFTING" : "ok";
        return el(
          "tr",
          { "data-detector": name },
          el("td", { text: name }),
          el("td", { class: "filled", text: `${d.filled} / ${d.window}` }),
          el("td", { text: pct(d.ood_share) }),
          el("td", { text: pct(d.expected_share) }),
          el("td", { class: "share-p", text: fmt(d.share_p_value) }),
          el("td", { text: fmt(d.ks_statistic) }),
          el("td", { class: "ks-p", text: fmt(d.ks_p_value) }),
          el("td", { class: "drift-status", "data-ood": d.filled ? d.drifting : null, text: status }),
        );
      }),
    );
  } catch (error) {
    $("#drift-info").textContent = `cannot read the drift: ${error.message}`;
  }
}

// ---------------------------------------------------------------- wiring
function start() {
  $("#key").value = apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#key").value.trim());
    loadModels();
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("#key").value = "";
  });
  $("#model").addEventListener("change", selectModel);
  $("#files").addEventListener("change", (event) => {
    scoreFiles([...event.target.files]);
    event.target.value = "";
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    scoreFiles([...event.dataTransfer.files].filter((file) => file.type.startsWith("image/") || !file.type));
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("#files").click();
  });
  $("#opacity").addEventListener("input", () => state.redraws.forEach((redraw) => redraw()));
  $("#refresh-drift").addEventListener("click", refreshDrift);
  fetch(new URL("docs", document.baseURI)).then(
    (answer) => answer.ok || $("#docs-link").remove(), // not served when reads need a key
    () => $("#docs-link").remove(),
  );
  state.driftTimer = setInterval(() => {
    if (document.visibilityState === "visible") refreshDrift();
  }, 10000);
  loadModels();
}

document.addEventListener("DOMContentLoaded", start);
