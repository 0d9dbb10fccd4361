// leukolab serve: the page. Plain JavaScript, no libraries, no network access beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { files: [], runs: [], result: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v);
}

function metricsText(run) {
  const m = run.metrics || {};
  const parts = [run.description];
  if (m.evaluation) parts.push("eval: " + Object.entries(m.evaluation).map(([k, v]) => `${k} ${fmt(v)}`).join(", "));
  const hist = Object.entries(m).filter(([k]) => k.startsWith("val_")).map(([k, v]) => `${k} ${fmt(v)}`);
  if (hist.length) parts.push(`best epoch ${m.best_epoch}/${m.epochs}: ` + hist.join(", "));
  return parts.join(" · ");
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadRuns() {
  const res = await fetch("/api/runs");
  const data = await res.json();
  state.runs = data.runs;
  const det = $("detector");
  det.replaceChildren();
  for (const r of data.runs.filter((r) => r.kind === "detector")) {
    det.append(el("option", { value: r.id }, `${r.id}`));
  }
  if (data.default_detector) det.value = data.default_detector;
  const showDet = () => {
    const r = data.runs.find((x) => x.id === det.value);
    $("detector-metrics").textContent = r ? metricsText(r) : "no detector run found (single-cell crops still work)";
  };
  det.addEventListener("change", showDet);
  showDet();
  const box = $("classifiers");
  box.replaceChildren();
  for (const r of data.runs.filter((r) => r.kind !== "detector")) {
    const input = el("input", { type: "checkbox", name: "classifier", value: r.id });
    input.checked = (data.default_classifiers || []).includes(r.id);
    box.append(el("label", {}, input, ` ${r.id} `, el("span", { class: "metrics" }, `(${r.kind}) ${metricsText(r)}`)));
  }
  if (!box.children.length) box.append(el("span", { class: "error" }, "no classifier run found under the runs folder"));
}

function setFiles(list) {
  state.files = Array.from(list);
  $("file-list").textContent = state.files.length
    ? `${state.files.length} file(s): ` + state.files.map((f) => f.name).join(", ") : "";
  $("analyse").disabled = !state.files.length;
}

function setProgress(fraction, text) {
  $("progress").hidden = fraction === null;
  if (fraction !== null) $("progress-bar").value = Math.round(100 * fraction);
  $("progress-text").textContent = text || "";
}

function formData() {
  const fd = new FormData();
  for (const f of state.files) fd.append("files", f, f.name);
  if ($("detector").value) fd.append("detector", $("detector").value);
  for (const c of document.querySelectorAll("input[name=classifier]:checked")) fd.append("classifier", c.value);
  fd.append("mode", document.querySelector("input[name=mode]:checked").value);
  fd.append("score", $("score").value || "0.3");
  for (const k of ["tta", "attention", "keep"]) fd.append(k, $(k).checked ? "true" : "false");
  return fd;
}

function upload(fd) {
  // XMLHttpRequest (not fetch) for upload progress
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/jobs");
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setProgress(0.3 * e.loaded / e.total, `uploading ${Math.round(100 * e.loaded / e.total)} %`);
    };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = { detail: xhr.responseText }; }
      if (xhr.status >= 400) reject(new Error(body.detail || `HTTP ${xhr.status}`));
      else resolve(body);
    };
    xhr.onerror = () => reject(new Error("the server did not answer (is leukolab serve still running?)"));
    xhr.send(fd);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function analyse() {
  showError("");
  $("analyse").disabled = true;
  try {
    let job = await upload(formData());
    while (job.state === "queued" || job.state === "running") {
      setProgress(0.3 + 0.7 * job.done / Math.max(1, job.total), `analysed ${job.done} / ${job.total} image(s)`);
      await sleep(300);
      const res = await fetch(`/api/jobs/${encodeURIComponent(job.job)}`);
      const body = await res.json();
      if (!res.ok) throw new Error(body.detail || `HTTP ${res.status}`);
      job = body;
    }
    if (job.state === "error") throw new Error(job.error);
    setProgress(1, `analysed ${job.total} / ${job.total} image(s)`);
    render(job.result);
  } catch (err) {
    setProgress(null);
    showError(err.message);
  } finally {
    $("analyse").disabled = !state.files.length;
  }
}

function chart(row, result) {
  // horizontal bars: percent of typed cells, with counts
  const box = el("div", { class: "chart" });
  for (const t of result.types) {
    const pct = row[`${t}_pct`];
    box.append(el("span", {}, el("span", { class: "swatch", style: { background: result.colours[t] } }), t),
      el("div", { class: "bar-track" }, el("div", { class: "bar", style: { width: `${pct || 0}%`, background: result.colours[t] } })),
      el("span", {}, `${row[t]} (${pct === null ? "–" : pct.toFixed(1)} %)`));
  }
  return box;
}

function differentialTable(result) {
  const table = $("differential");
  table.replaceChildren();
  const cols = ["image", "cells", "background", ...result.types, ...result.types.map((t) => `${t}_pct`)];
  table.append(el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", {}, c)))));
  const body = el("tbody");
  for (const row of result.differential) {
    body.append(el("tr", { class: row.image === "TOTAL" ? "total" : "" }, ...cols.map((c) => el("td", {}, fmt(row[c], 2)))));
  }
  table.append(body);
}

function selectCell(result, fi, ci) {
  const field = result.fields[fi];
  const cell = field.cells[ci];
  document.querySelectorAll(".selected").forEach((n) => n.classList.remove("selected"));
  document.querySelectorAll(`[data-cell="${fi}-${ci}"]`).forEach((n) => n.classList.add("selected"));
  $("cell-title").textContent = `${field.name} · cell ${ci + 1}: ${cell.type} (${(100 * cell.probability).toFixed(1)} %)`;
  $("cell-thumb").src = cell.thumbnail || "";
  $("cell-attention").hidden = !cell.attention;
  if (cell.attention) $("cell-attention").src = cell.attention;
  const probs = $("cell-probs");
  probs.replaceChildren();
  result.classes.forEach((c, k) => {
    const p = cell.probs[k];
    probs.append(el("span", {}, el("span", { class: "swatch", style: { background: result.colours[c] } }), c),
      el("div", { class: "bar-track" }, el("div", { class: "bar", style: { width: `${100 * p}%`, background: result.colours[c] } })),
      el("span", {}, `${(100 * p).toFixed(1)} %`));
  });
  $("cell-detail").hidden = false;
}

function renderField(result, field, fi) {
  const figure = el("div", { class: "figure" });
  if (field.annotated) {
    figure.append(el("img", { class: "annotated", src: field.annotated, alt: `${field.name} with boxes` }));
  }
  field.cells.forEach((cell, ci) => {
    const [x1, y1, x2, y2] = cell.box;
    figure.append(el("div", {
      class: "box", "data-cell": `${fi}-${ci}`, title: `${cell.type} ${(100 * cell.probability).toFixed(1)} %`,
      style: { left: `${100 * x1 / field.width}%`, top: `${100 * y1 / field.height}%`,
               width: `${100 * (x2 - x1) / field.width}%`, height: `${100 * (y2 - y1) / field.height}%` },
      onclick: () => selectCell(result, fi, ci),
    }));
  });
  const rows = field.cells.map((cell, ci) => el("tr", { "data-cell": `${fi}-${ci}`, onclick: () => selectCell(result, fi, ci) },
    el("td", {}, ci + 1),
    el("td", {}, cell.thumbnail ? el("img", { src: cell.thumbnail, alt: "cell" }) : ""),
    el("td", {}, el("span", { class: "swatch", style: { background: result.colours[cell.type] } }), cell.type),
    el("td", {}, (100 * cell.probability).toFixed(1) + " %"),
    el("td", {}, fmt(cell.detector_score))));
  const table = el("table", { class: "cells" },
    el("thead", {}, el("tr", {}, ...["#", "cell", "type", "probability", "detector score"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
  const d = field.differential;
  return el("div", { class: "field" },
    el("h3", {}, `${field.name} — ${d.cells} cell(s), ${d.background} background crop(s)`),
    el("div", { class: "field-body" }, figure,
      el("div", {}, chart(d, result), field.cells.length ? table : el("p", { class: "hint" }, "no cells found"))));
}

function render(result) {
  state.result = result;
  $("results").hidden = false;
  $("download").href = result.zip;
  const t = result.total;
  $("summary").textContent = `${result.fields.length} image(s), ${t.cells} typed cell(s), ${t.background} ` +
    `background crop(s) left out · classifier(s): ${result.classifiers.join(", ")}` +
    (result.detector ? ` · detector: ${result.detector}` : " · single-cell crops") + ` · ${result.seconds} s` +
    (result.kept ? ` · kept on the server in ${result.kept}` : "");
  $("overall-chart").replaceWith(Object.assign(chart(t, result), { id: "overall-chart" }));
  differentialTable(result);
  $("fields").replaceChildren(...result.fields.map((f, i) => renderField(result, f, i)));
}

function init() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => setFiles(e.dataTransfer.files));
  $("analyse").addEventListener("click", analyse);
  $("close-detail").addEventListener("click", () => { $("cell-detail").hidden = true; });
  loadRuns().catch((err) => showError(`cannot list the runs: ${err.message}`));
}

init();
