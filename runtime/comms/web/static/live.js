// coft live view: polls /api/status and /api/verdicts, shows the MJPEG stream, posts operator actions.
"use strict";

const KEEP = 150;            // verdicts per camera in the chart
const cameras = new Map();   // name -> {section, verdicts: [], lastSeq}
const token = document.getElementById("token");
token.value = sessionStorage.getItem("coft-token") || "";
token.addEventListener("input", () => sessionStorage.setItem("coft-token", token.value));

function text(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" && !Number.isInteger(value) ? value.toPrecision(digits) : String(value);
}

async function getJSON(url) {
  const response = await fetch(url, {cache: "no-store"});
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function act(url, body) {
  const response = await fetch(url, {
    method: "POST", body: JSON.stringify(body || {}),
    headers: {"Content-Type": "application/json", "Authorization": `Bearer ${token.value}`},
  });
  const answer = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function cameraSection(name) {
  if (cameras.has(name)) return cameras.get(name);
  const section = document.getElementById("camera-template").content.firstElementChild.cloneNode(true);
  section.id = `camera-${name}`;
  section.querySelector(".name").textContent = name;
  section.querySelector(".live-image").src = `/api/cameras/${encodeURIComponent(name)}/live.mjpg`;
  const form = section.querySelector(".threshold-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const message = form.querySelector(".threshold-message");
    const value = parseFloat(form.querySelector(".threshold-input").value);
    try {
      const state = await act(`/api/cameras/${encodeURIComponent(name)}/threshold`, {threshold: value});
      message.className = "threshold-message ok";
      message.textContent = `threshold now ${text(state.threshold)} (${state.source})`;
      form.dataset.edited = "";
    } catch (error) {
      message.className = "threshold-message error";
      message.textContent = `refused: ${error.message}`;
    }
  });
  form.querySelector(".threshold-input").addEventListener("input", () => { form.dataset.edited = "1"; });
  document.getElementById("cameras").appendChild(section);
  const camera = {section, verdicts: [], lastSeq: -1};
  cameras.set(name, camera);
  return camera;
}

function badge(element, label, up, detail) {
  element.textContent = `${label}: ${detail}`;
  element.className = `badge ${element.classList[1]} ${up ? "up" : "down"}`;
}

function ago(seconds) {
  if (seconds < 2) return "now";
  if (seconds < 120) return `${Math.round(seconds)} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function showStatus(status) {
  document.getElementById("line").textContent = `line ${status.line}`;
  document.getElementById("model").textContent =
    `model ${status.model_id}` + (status.revision_of ? ` (revision of ${status.revision_of})` : "") +
    ` · ${status.engine} · threshold by ${status.threshold_method}` +
    (status.threshold_promise ? ` (${status.threshold_promise})` : "") +
    (status.commissioning ? ` · COMMISSIONING ${status.commissioning.frames} / ${status.commissioning.of} frames` +
      (status.commissioning.rejects_fired ? "" : " · REJECTS OFF") : "") +
    (status.stalled ? ` · STALLED: ${status.stalled}` : "");
  const banner = document.getElementById("banner");
  const anew = status.outbox_started_anew;
  banner.hidden = !status.outbox_refusing && !anew;
  banner.textContent = status.outbox_refusing ? "The outbox cannot store verdicts (disk full?): see the log."
    : anew ? `New epoch ${status.epoch}: ${anew}. Verdicts not yet sent then are lost; ` +
             "acknowledge with POST /api/outbox/acknowledge (operator token)." : "";
  for (const [name, c] of Object.entries(status.cameras)) {
    const {section} = cameraSection(name);
    badge(section.querySelector(".camera-state"), "camera", c.camera === "delivering", c.camera);
    badge(section.querySelector(".broker-state"), "broker", c.broker_connected,
          c.broker_connected ? "connected" : "disconnected");
    const rows = [["frames", c.frames], ["dropped", c.dropped], ["accepts", c.accepts], ["rejects", c.rejects],
                  ...(c.unfired_rejects ? [["rejects not fired (commissioning)", c.unfired_rejects]] : []),
                  ["outbox depth", c.outbox_depth + (c.outbox_oldest_s ? ` (oldest ${Math.round(c.outbox_oldest_s)} s)` : "")],
                  ["latency p50 / p99", c.latency_p50_ms === null ? "–" : `${c.latency_p50_ms} / ${c.latency_p99_ms} ms`]];
    section.querySelector(".counters").innerHTML = "";
    for (const [label, value] of rows) {
      const row = section.querySelector(".counters").insertRow();
      row.insertCell().textContent = label;
      row.insertCell().textContent = typeof value === "number" ? Math.round(value) : value;
    }
    const form = section.querySelector(".threshold-form");
    if (!form.dataset.edited) form.querySelector(".threshold-input").value = Number(c.threshold.toPrecision(6));
    form.querySelector(".threshold-source").textContent =
      `from ${c.source}; allowed ${text(c.bounds[0])} – ${text(c.bounds[1])}` +
      (status.web_actions ? "" : " · read-only: no operator token configured");
    const last = c.last_verdict;
    section.querySelector(".live-age").textContent = last ?
      `, ${ago(Date.now() / 1000 - last.capture_ts)}` : " (none since the runtime started)";
    const problem = c.last_problem;
    section.querySelector(".problem").textContent = problem ?
      `last problem (${new Date(problem.time * 1000).toLocaleTimeString()}): ${problem.message}` : "";
  }
}

function showVerdicts(camera) {
  const body = camera.section.querySelector(".verdicts tbody");
  body.innerHTML = "";
  for (const v of camera.verdicts.slice(-12).reverse()) {
    const row = body.insertRow();
    row.className = v.verdict;
    for (const value of [v.seq, new Date(v.capture_ts * 1000).toLocaleTimeString(), v.part_id || "–", v.verdict,
                         text(v.score), text(v.threshold), `${v.latency_ms} ms`]) {
      row.insertCell().textContent = value;
    }
  }
  drawChart(camera.section.querySelector(".chart"), camera.verdicts);
}

function drawChart(svg, verdicts) {
  // scores as a line, rejects as red dots, and the threshold each verdict was judged at as a dashed step line
  const scores = verdicts.map((v) => (v.score === null ? NaN : v.score));
  const finite = scores.filter(Number.isFinite);
  if (!finite.length) { svg.innerHTML = ""; return; }
  const thresholds = verdicts.map((v) => v.threshold);
  const top = Math.max(...finite, ...thresholds) * 1.1, bottom = Math.min(...finite, ...thresholds) * 0.9;
  const x = (i) => (verdicts.length < 2 ? 300 : (i / (verdicts.length - 1)) * 600);
  const y = (s) => 140 - ((s - bottom) / (top - bottom || 1)) * 140;
  const line = (values) => values.map((s, i) => (Number.isFinite(s) ? `${x(i).toFixed(1)},${y(s).toFixed(1)}` : ""))
    .filter(Boolean).join(" ");
  const rejects = verdicts.map((v, i) => (v.verdict === "reject" && Number.isFinite(scores[i])
    ? `<circle class="${v.fired === false ? "unfired" : "reject"}" cx="${x(i).toFixed(1)}" cy="${y(scores[i]).toFixed(1)}" r="2.5"/>`
    : "")).join("");
  svg.innerHTML = `<polyline class="threshold" points="${line(thresholds)}"/>` +
    `<polyline class="score" points="${line(scores)}"/>${rejects}`;
  svg.nextElementSibling.textContent = `score of the last ${verdicts.length} frames, ${text(bottom, 3)} to ` +
    `${text(top, 3)}; dashed: the threshold; red dots: rejects; hollow: judged rejects not fired (commissioning)`;
}

async function pollVerdicts() {
  for (const [name, camera] of cameras) {
    const answer = await getJSON(`/api/verdicts?camera=${encodeURIComponent(name)}&after=${camera.lastSeq}&limit=${KEEP}`);
    if (answer.verdicts.length) {
      camera.verdicts = camera.verdicts.concat(answer.verdicts).slice(-KEEP);
      camera.lastSeq = camera.verdicts[camera.verdicts.length - 1].seq;
    }
    showVerdicts(camera);
  }
}

function redrawn(container, keys) {
  // Whether a grid of tiles is drawn anew: unchanged keys keep the tiles (and any message on them).
  const shown = JSON.stringify(keys);
  if (container.dataset.shown === shown) return false;
  container.dataset.shown = shown;
  container.innerHTML = "";
  return true;
}

function newTile(container, data) {
  const tile = document.createElement("div");
  tile.className = "tile";
  Object.assign(tile.dataset, data);
  return container.appendChild(tile);
}

async function pollGallery() {
  const note = document.getElementById("gallery-note");
  const response = await fetch("/api/evidence?limit=24", {cache: "no-store"});
  const answer = await response.json();
  if (!response.ok) { note.textContent = answer.error; return; }
  note.textContent = answer.evidence.length ? "" : "No rejected frames yet.";
  const gallery = document.getElementById("gallery");
  if (!redrawn(gallery, answer.evidence.map((item) => [item.stem, item.marked]))) return;
  for (const item of answer.evidence) {
    const tile = newTile(gallery, {stem: item.stem});
    const v = item.verdict;
    tile.innerHTML = `<a href="${item.raw}" target="_blank"><img loading="lazy" alt="rejected frame"></a>
      <div><b>${item.camera}</b> seq ${v.seq} · score ${text(v.score)} / ${text(v.threshold)} ·
        <a href="${item.raw}" target="_blank">raw frame</a></div>
      <details><summary>verdict JSON</summary><pre></pre></details>
      <button class="mark-good" type="button">good part (false reject)</button>
      <button class="mark-defect" type="button">real defect</button> <span class="feedback"></span>`;
    tile.querySelector("img").src = item.annotated || item.raw;
    tile.querySelector("pre").textContent = JSON.stringify(v, null, 2);
    const feedback = tile.querySelector(".feedback");
    const marked = (label) => {
      feedback.classList.add("marked");
      feedback.textContent = label === "good" ? "marked good" : "marked defect";
      tile.querySelector(label === "good" ? ".mark-good" : ".mark-defect").hidden = true;
      tile.querySelector(label === "good" ? ".mark-defect" : ".mark-good").hidden = false;
    };
    if (item.marked) marked(item.marked);
    for (const label of ["good", "defect"]) {
      tile.querySelector(`.mark-${label}`).addEventListener("click", async () => {
        try {
          await act(`/api/evidence/${encodeURIComponent(item.camera)}/${encodeURIComponent(item.stem)}/${label}`);
          marked(label);
        } catch (error) { feedback.textContent = `refused: ${error.message}`; }
      });
    }
  }
}

async function pollReview() {
  const section = document.getElementById("review-section");
  const response = await fetch("/api/commissioning/review", {cache: "no-store"});
  if (!response.ok) { section.hidden = true; return; }  // not commissioned, or no frames kept: nothing to sort
  const answer = await response.json();
  section.hidden = false;
  document.getElementById("review-promise").textContent = `Promise now: ${answer.promise}.`;
  document.getElementById("review-left").textContent =
    `${answer.left} of ${answer.queue.length} still to sort (${answer.sorted} sorted).`;
  const review = document.getElementById("review");
  if (!redrawn(review, answer.queue.map((item) => [item.file, item.sorted]))) return;
  for (const item of answer.queue) {
    const tile = newTile(review, {file: item.file});
    const url = `/api/commissioning/frames/${encodeURIComponent(item.file)}`;
    tile.innerHTML = `<a href="${url}" target="_blank"><img loading="lazy" alt="commissioning frame"></a>
      <div><b>${item.camera}</b> score ${text(item.score)} / ${text(answer.threshold)}</div>
      <button class="sort-good" type="button">good part</button>
      <button class="sort-defect" type="button">real defect</button> <span class="feedback"></span>`;
    tile.querySelector("img").src = url;
    const feedback = tile.querySelector(".feedback");
    if (item.sorted) {
      feedback.classList.add("marked");
      feedback.textContent = `sorted ${item.sorted}`;
    }
    for (const label of ["good", "defect"]) {
      tile.querySelector(`.sort-${label}`).addEventListener("click", async () => {
        try {
          const answer = await act(`${url}/${label}`);
          review.dataset.shown = "";
          await pollReview();
          if (answer.learning) document.getElementById("review-learning").textContent = answer.learning;
        } catch (error) { feedback.textContent = `refused: ${error.message}`; }
      });
    }
  }
}

async function loop(work, period) {
  for (;;) {
    try { await work(); } catch (error) {
      const banner = document.getElementById("banner");
      banner.hidden = false;
      banner.textContent = `The runtime does not answer (${error.message}); is it running?`;
    }
    await new Promise((resolve) => setTimeout(resolve, period));
  }
}

loop(async () => showStatus(await getJSON("/api/status")), 1000);
loop(pollVerdicts, 1000);
loop(pollGallery, 4000);
loop(pollReview, 4000);
