// patchsae explorer: a page over the JSON API of `patchsae serve` (no build step, no dependencies).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { info: null, image: null, latent: null, patches: [], lastPatch: null };
const KIND_NOTE = {
  "class-selective": "most of its class-level count is in one class",
  "other": "alive, but neither one class nor one position nor dense",
  "positional": "most of its activation mass sits at one token position, whatever the image",
  "dense": "fires on most images",
  "dead": "never fired on the analysed images",
};

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showError(msg) {
  const el = $("#error");
  el.textContent = msg;
  el.hidden = !msg;
}

async function api(path, opts) {
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const msg = (body && body.error) || `${res.status} ${res.statusText}`;
    showError(msg);
    throw new Error(msg);
  }
  showError("");
  return body;
}

function imageUrl(imageId, latent, kind, model) {
  const q = new URLSearchParams({ kind: kind || "image", model: model || "base" });
  if (latent !== null && latent !== undefined) q.set("latent", latent);
  return `/api/images/${imageId}/image.png?${q}`;
}

function badge(kind) {
  return kind ? `<span class="badge kind-${esc(kind)}" title="${esc(KIND_NOTE[kind] || "")}">${esc(kind)}</span>` : "";
}

// ---- bars -----------------------------------------------------------------------------------------------
function bars(rows, opts = {}) {
  if (!rows.length) return '<p class="muted">no active latents</p>';
  const max = Math.max(...rows.map((r) => r.activation));
  const rel = rows.some((r) => r.relative !== undefined);
  return `<div class="bars${rel ? " relative" : ""}">` + rows.map((r) => {
    const w = max > 0 ? (100 * r.activation / max).toFixed(1) : 0;
    const sel = r.latent === state.latent ? " selected" : "";
    const relCell = rel ? `<span class="val rel" title="activation relative to this latent's typical (mean) ` +
      `image-level activation">×${(r.relative || 0).toFixed(1)}</span>` : "";
    return `<div class="bar${sel}" data-latent="${r.latent}" title="latent ${r.latent} (${esc(r.kind || "")})">` +
      `<span>#${r.latent}</span><span class="name">${badge(r.kind)} ${esc(r.label || r.name || "")}</span>` +
      `<div class="track"><div class="fill" style="width:${w}%"></div></div>` +
      `<span class="val">${r.activation.toFixed(3)}</span>${relCell}</div>`;
  }).join("") + "</div>";
}

function bindLatentClicks(root) {
  root.querySelectorAll("[data-latent]").forEach((el) =>
    el.addEventListener("click", () => selectLatent(Number(el.dataset.latent))));
}

function predictionTable(preds, other) {
  const head = other ? "<tr><th>steered</th><th></th><th>original</th></tr>" : "";
  return "<table>" + head + preds.map((p, i) => {
    const o = other ? `<td class="muted">${other[i] ? esc(other[i].class) + " " + (100 * other[i].prob).toFixed(1) + "%" : ""}</td>` : "";
    return `<tr><td>${esc(p.class)}</td><td><span class="prob" style="width:${(60 * p.prob).toFixed(0)}px"></span> ` +
      `${(100 * p.prob).toFixed(1)}%</td>${o}</tr>`;
  }).join("") + "</table>";
}

// ---- image ----------------------------------------------------------------------------------------------
async function showAnalysis(a) {
  state.image = a;
  state.patches = [];
  state.lastPatch = null;
  $("#image-desc").textContent = `${a.desc}` + (a.label ? ` (label: ${a.label})` : "") + ` — id ${a.image_id}`;
  const models = Object.keys(a.models);
  $("#predictions").innerHTML = models.map((m) =>
    (models.length > 1 ? `<h3>${m}</h3>` : "") + predictionTable(a.models[m].predictions)).join("");
  let html;
  if (a.groups) {
    const act = (m) => Object.fromEntries(a.models[m].top_latents.map((r) => [r.latent, r]));
    const base = act("base"), adapted = act("adapted");
    const part = (title, ids, src) => `<div class="group"><h3>${title} (${ids.length})</h3>` +
      bars(ids.map((l) => src[l] || base[l] || adapted[l])) + "</div>";
    html = part("common", a.groups.common, base) + part("base only", a.groups.base_only, base) +
      part("adapted only", a.groups.adapted_only, adapted);
  } else {
    const byRel = document.querySelector("input[name=image-order]:checked").value === "relative";
    html = bars(byRel ? a.models.base.top_relative : a.models.base.top_latents);
  }
  $("#image-latents").innerHTML = html;
  $("#image-latents").classList.remove("muted");
  bindLatentClicks($("#image-latents"));
  $("#patch-latents").innerHTML = '<p class="muted">click a patch of the image</p>';
  $("#steer-result").innerHTML = "";
  updateSteerButton();
  refreshImage();
  drawGrid();
  if (state.latent !== null) selectLatent(state.latent);
}

function refreshImage() {
  if (!state.image) return;
  const view = document.querySelector("input[name=view]:checked").value;
  const latent = view === "image" ? null : state.latent;
  $("#main-img").src = imageUrl(state.image.image_id, latent, latent === null ? "image" : view);
  $("#main-img").alt = state.image.desc;
}

function drawGrid() {
  const c = $("#grid"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!state.image) return;
  const [rows, cols] = state.image.grid, h = c.height / rows, w = c.width / cols;
  ctx.strokeStyle = "rgba(255,255,255,0.35)";
  for (let r = 1; r < rows; r++) { ctx.beginPath(); ctx.moveTo(0, r * h); ctx.lineTo(c.width, r * h); ctx.stroke(); }
  for (let k = 1; k < cols; k++) { ctx.beginPath(); ctx.moveTo(k * w, 0); ctx.lineTo(k * w, c.height); ctx.stroke(); }
  ctx.lineWidth = 2;
  for (const [r, k] of state.patches) {
    ctx.strokeStyle = state.lastPatch && state.lastPatch[0] === r && state.lastPatch[1] === k ? "#ffd400" : "#ff7f0e";
    ctx.strokeRect(k * w + 1, r * h + 1, w - 2, h - 2);
  }
  ctx.lineWidth = 1;
}

async function clickPatch(ev) {
  if (!state.image) return;
  const c = $("#grid"), rect = c.getBoundingClientRect();
  const [rows, cols] = state.image.grid;
  const row = Math.min(rows - 1, Math.floor((ev.clientY - rect.top) / rect.height * rows));
  const col = Math.min(cols - 1, Math.floor((ev.clientX - rect.left) / rect.width * cols));
  const i = state.patches.findIndex(([r, k]) => r === row && k === col);
  if (i >= 0 && state.lastPatch && state.lastPatch[0] === row && state.lastPatch[1] === col) state.patches.splice(i, 1);
  else if (i < 0) state.patches.push([row, col]);
  state.lastPatch = [row, col];
  drawGrid();
  updateSteerButton();
  const p = await api(`/api/images/${state.image.image_id}/patch?row=${row}&col=${col}&n=6`);
  $("#patch-title").textContent = `Patch (row ${row}, col ${col})`;
  $("#patch-latents").innerHTML = Object.entries(p.models).map(([m, v]) =>
    (Object.keys(p.models).length > 1 ? `<h3>${m}</h3>` : "") + bars(v.top_latents)).join("");
  $("#patch-latents").classList.remove("muted");
  bindLatentClicks($("#patch-latents"));
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  try { showAnalysis(await api("/api/analyze", { method: "POST", body: form })); } catch (e) { /* shown */ }
}

async function loadDataset(index) {
  try { await showAnalysis(await api(`/api/analyze/dataset/${index}`, { method: "POST" })); } catch (e) { /* shown */ }
}

// ---- latents --------------------------------------------------------------------------------------------
async function selectLatent(latent) {
  state.latent = latent;
  document.querySelectorAll(".bar[data-latent]").forEach((el) =>
    el.classList.toggle("selected", Number(el.dataset.latent) === latent));
  updateSteerButton();
  refreshImage();
  let d;
  try { d = await api(`/api/latents/${latent}`); } catch (e) { return; }
  $("#latent-title").textContent = `Latent #${d.latent}` + (d.label ? ` — ${d.label}` : "");
  const names = d.names.map((n) => `${esc(n.name)} (${n.score.toFixed(3)})`).join(", ") || "—";
  const q = d.quality;
  let html = `<table class="stats">
    <tr><th>kind</th><td>${badge(d.kind)} <span class="muted">${esc(KIND_NOTE[d.kind] || "")}</span></td></tr>
    <tr><th>names</th><td>${names}${d.kind === "class-selective" ? "" : ' <span class="muted">(not class-selective: a guess)</span>'}</td></tr>
    <tr><th>class selectivity</th><td>${(100 * q.class_share).toFixed(1)}% of its class-level count in ${esc(q.top_class || "—")} ` +
      `(normalised entropy ${q.class_entropy.toFixed(2)})</td></tr>
    <tr><th>spatial concentration</th><td>${(100 * q.position_share).toFixed(1)}% of its activation mass at ${esc(q.position || "—")}</td></tr>
    <tr><th>token density</th><td>${(100 * q.token_frequency).toFixed(2)}% of tokens</td></tr>
    <tr><th>frequency</th><td>${(100 * d.frequency).toFixed(2)}% of ${d.analysed_images} images (${d.fired_images})</td></tr>
    <tr><th>mean activation</th><td>${d.mean_activation.toFixed(4)}</td></tr>
    <tr><th>label entropy</th><td>${d.entropy.toFixed(3)} nats${d.low_entropy ? " (low)" : ""}</td></tr>
    <tr><th>majority label</th><td>${esc(d.majority || "—")}</td></tr></table>`;
  if (state.image) {
    const models = Object.keys(state.image.models);
    html += "<h3>On this image</h3><div class=\"heatmaps\">" + models.map((m) =>
      `<figure><img class="heatmap" data-model="${m}" alt="heatmap of latent ${latent} (${m})" src="${imageUrl(state.image.image_id, latent, "heatmap", m)}">` +
      `<figcaption>${m} heatmap</figcaption></figure>` +
      `<figure><img alt="segmentation (${m})" src="${imageUrl(state.image.image_id, latent, "segmentation", m)}">` +
      `<figcaption>${m} segmentation</figcaption></figure>`).join("") + "</div>";
  }
  const maxCount = Math.max(1, ...d.class_counts.map((c) => c.count));
  const MAX_BARS = 30;  // many classes (ImageNet): the largest counts, in class order
  const shown = d.class_counts.length <= MAX_BARS ? d.class_counts :
    d.class_counts.map((c, i) => [c, i]).sort((a, b) => b[0].count - a[0].count).slice(0, MAX_BARS)
      .sort((a, b) => a[1] - b[1]).map((ci) => ci[0]);
  const note = shown.length < d.class_counts.length ? ` (top ${shown.length} of ${d.class_counts.length} classes)` : "";
  html += `<h3>Class-level counts${note}</h3><div class="bars counts">` + shown.map((c) =>
    `<div class="bar"><span>${esc(c.class)}</span><div class="fill" style="width:${(100 * c.count / maxCount).toFixed(1)}%"></div>` +
    `<span class="val">${c.count}</span></div>`).join("") + "</div>";
  html += `<h3>Reference images (${d.references.length})</h3><div class="refs" id="references">` +
    d.references.map((r) =>
      `<figure><img alt="reference ${r.index}" src="${imageUrl("ds-" + r.index, latent, "heatmap")}" ` +
      `data-index="${r.index}" title="load image ${r.index}"><figcaption>${esc(r.class)} ${r.value.toFixed(3)}</figcaption></figure>`
    ).join("") + "</div>";
  $("#latent-detail").innerHTML = html;
  $("#latent-detail").classList.remove("muted");
  $("#latent-detail").querySelectorAll("img[data-index]").forEach((el) =>
    el.addEventListener("click", () => { $("#ds-index").value = el.dataset.index; loadDataset(el.dataset.index); }));
}

function listItems(rows, extra) {
  return rows.map((r) => `<div class="item" data-latent="${r.latent}">#${r.latent} ${badge(r.kind)} ${esc(r.label || r.name || "")} ` +
    `<span class="muted">f=${r.frequency.toFixed(3)} H=${r.entropy.toFixed(2)}${extra ? extra(r) : ""}</span></div>`).join("");
}

function shownKinds() {
  const kinds = ["class-selective", "other"];
  document.querySelectorAll("input[name=show-kind]:checked").forEach((el) => kinds.push(el.value));
  return kinds;
}

async function search(q) {
  let res;
  const show = shownKinds().join(",");
  try { res = await api(`/api/latents?q=${encodeURIComponent(q)}&limit=100&show=${encodeURIComponent(show)}`); } catch (e) { return; }
  const hidden = Object.entries(res.hidden).filter(([, n]) => n > 0).map(([k, n]) => `${n} ${k}`).join(", ");
  const what = q ? "" : ", most interpretable first (class-selective by selectivity)";
  $("#latent-list").innerHTML = `<p class="muted">${res.total} latents${what}${hidden ? `; hidden: ${esc(hidden)}` : ""}</p>` +
    listItems(res.latents);
  bindLatentClicks($("#latent-list"));
}

async function showClass(c) {
  let res;
  const order = $("#class-order").value;
  try { res = await api(`/api/classes/${c}?order=${order}`); } catch (e) { return; }
  $("#class-latents").innerHTML = listItems(res.latents, (r) => ` count=${r.count} share=${(100 * r.share).toFixed(0)}%`);
  bindLatentClicks($("#class-latents"));
}

// ---- steering -------------------------------------------------------------------------------------------
function updateSteerButton() {
  const where = document.querySelector("input[name=steer-where]:checked").value;
  $("#steer-run").disabled = !(state.image && state.latent !== null && (where === "all" || state.patches.length));
}

async function steer() {
  const where = document.querySelector("input[name=steer-where]:checked").value;
  const scale = Number($("#steer-scale").value);
  const body = { image_id: state.image.image_id, latent: state.latent, scale,
                 patches: where === "all" ? null : state.patches };
  const models = Object.keys(state.image.models);
  let html = "";
  for (const m of models) {
    let r;
    try {
      r = await api("/api/steer", { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify({ ...body, model: m }) });
    } catch (e) { return; }
    html += `<h3>${models.length > 1 ? m + ": " : ""}latent #${r.latent} × ${r.scale} on ${r.tokens} tokens</h3>` +
      predictionTable(r.steered, r.original);
  }
  $("#steer-result").innerHTML = html;
  $("#steer-result").classList.remove("muted");
}

// ---- start ----------------------------------------------------------------------------------------------
async function init() {
  const info = await api("/api/info");
  state.info = info;
  $("#run-info").textContent = `run ${info.run} · ${info.model} block ${info.layer} · ${info.d_sae} latents · ` +
    `${info.grid[0]}×${info.grid[1]} patches` + (info.adapted ? ` · adapted: ${info.adapted_model}` : "") +
    (info.sae_origin ? ` · SAE imported (${info.sae_origin.format}) from ${info.sae_origin.source}` : "");
  if ((info.layers || []).length > 1) {  // a multi-layer run: switch block on the server, then start over there
    $("#layer").innerHTML = info.layers.map((l) => `<option value="${l}"${l === info.layer ? " selected" : ""}>${l}</option>`).join("");
    $("#layer-choice").hidden = false;
    $("#layer").addEventListener("change", async (ev) => {
      try { await api(`/api/layer/${ev.target.value}`, { method: "POST" }); location.reload(); }
      catch (e) { ev.target.value = info.layer; /* shown */ }
    });
  }
  $("#ds-index").max = Math.max(0, info.dataset.size - 1);
  $("#class-select").innerHTML = info.class_names.map((c, i) => `<option value="${i}">${esc(c)}</option>`).join("");
  $("#figures").innerHTML = info.figures.map((f) =>
    `<a href="/api/figures/${encodeURIComponent(f)}" target="_blank"><img src="/api/figures/${encodeURIComponent(f)}" alt="${esc(f)}"></a>`).join("");
  $("#file").addEventListener("change", (ev) => { if (ev.target.files.length) upload(ev.target.files[0]); });
  $("#ds-load").addEventListener("click", () => loadDataset($("#ds-index").value));
  $("#ds-random").addEventListener("click", () => {
    const i = Math.floor(Math.random() * Math.max(1, info.dataset.size));
    $("#ds-index").value = i;
    loadDataset(i);
  });
  $("#grid").addEventListener("click", clickPatch);
  $("#clear-patches").addEventListener("click", () => { state.patches = []; state.lastPatch = null; drawGrid(); updateSteerButton(); });
  document.querySelectorAll("input[name=view]").forEach((el) => el.addEventListener("change", refreshImage));
  document.querySelectorAll("input[name=steer-where]").forEach((el) => el.addEventListener("change", updateSteerButton));
  $("#steer-scale").addEventListener("input", () => { $("#steer-value").textContent = `${Number($("#steer-scale").value).toFixed(1)}×`; });
  $("#steer-scale").addEventListener("change", () => { if (!$("#steer-run").disabled) steer(); });
  $("#steer-run").addEventListener("click", steer);
  let timer = null;
  $("#search").addEventListener("input", (ev) => { clearTimeout(timer); timer = setTimeout(() => search(ev.target.value), 200); });
  $("#class-select").addEventListener("change", (ev) => showClass(ev.target.value));
  $("#class-order").addEventListener("change", () => showClass($("#class-select").value));
  document.querySelectorAll("input[name=show-kind]").forEach((el) => el.addEventListener("change", () => search($("#search").value)));
  document.querySelectorAll("input[name=image-order]").forEach((el) => el.addEventListener("change", () => { if (state.image) showAnalysis(state.image); }));
  search("");
  showClass(0);
  // a first visit shows something: dataset image 0, analysed as if picked (before `ready`, so a later pick
  // or upload cannot be overwritten by this one); without the run's dataset the page waits for an upload
  if (info.dataset.size > 0) await loadDataset(Number($("#ds-index").value) || 0);
  document.body.dataset.ready = "1";
}

init().catch((e) => showError(String(e.message || e)));
