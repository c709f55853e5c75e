// convscope explorer: a little vanilla JS over the JSON API (no build step).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const state = {
    image: null,          // id of the current image (upload, bundled photo or frozen webcam frame)
    layer: app.dataset.layer,
    norm: "layer",
    unit: null,
    layout: null,         // activation grid layout from the server
    maxes: null,          // per-unit max activation of the current grid
    cls: null,            // class for the CAM panel (null: top class)
    method: "gradcam",
    stream: null,         // webcam MediaStream while live
    seq: { analyze: 0, unit: 0, cam: 0 },
  };
  const maxUploadMB = parseFloat(app.dataset.maxUpload);
  const hasAtlas = app.dataset.atlas === "1";
  window.explorer = state; // for the end-to-end test and for poking around in the console

  // ------------------------------------------------------------------ helpers

  async function api(url, opts) {
    const r = await fetch(url, opts);
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: r.statusText }; }
    if (!r.ok) {
      const err = new Error((body && (body.error || body.detail)) || `${r.status} ${r.statusText}`);
      err.status = r.status;
      err.retryAfter = parseFloat(r.headers.get("Retry-After") || "1");
      throw err;
    }
    return body;
  }

  let toastTimer = null;
  function toast(msg, kind = "error") {
    const t = $("toast");
    t.textContent = typeof msg === "string" ? msg : (msg.message || String(msg));
    t.className = kind;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, kind === "error" ? 7000 : 2500);
  }

  function setImg(el, src) {
    el.src = src;
    el.hidden = false;
  }

  const fmt = (v, d = 2) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // ------------------------------------------------------------------ choosing an image

  function showStill(id) {
    $("video").hidden = true;
    $("placeholder").hidden = true;
    setImg($("current"), `/api/images/${encodeURIComponent(id)}`);
    document.querySelectorAll(".thumb").forEach((b) => b.classList.toggle("on", b.dataset.id === id));
  }

  const IMAGE_KEY = "convscope.image";  // the current image, kept per tab across the graph page's links

  async function useImage(id) {
    state.image = id;
    try { sessionStorage.setItem(IMAGE_KEY, id); } catch (e) { /* storage off: nothing to remember */ }
    markEmbedding();
    showStill(id);
    await Promise.all([analyze(), loadCam(), state.unit !== null ? loadUnit() : null]);
  }

  $("file").addEventListener("change", async (ev) => {
    const f = ev.target.files[0];
    ev.target.value = "";
    if (!f) return;
    if (f.size > maxUploadMB * 1024 * 1024) {
      toast(`${f.name} is ${(f.size / 1048576).toFixed(1)} MB; this server accepts up to ${maxUploadMB} MB`);
      return;
    }
    stopWebcam(false);
    const form = new FormData();
    form.append("file", f, f.name);
    try {
      const d = await api("/api/image", { method: "POST", body: form });
      await useImage(d.id);
    } catch (e) { toast(e); }
  });

  document.querySelectorAll(".thumb").forEach((b) => b.addEventListener("click", () => {
    stopWebcam(false);
    useImage(b.dataset.id).catch(toast);
  }));

  // ------------------------------------------------------------------ predictions and the activation grid

  function renderPreds(preds) {
    const ol = $("preds");
    ol.innerHTML = "";
    for (const p of preds) {
      const li = document.createElement("li");
      li.className = "pred" + (state.cls === p.index ? " on" : "");
      li.title = `class ${p.index} · logit ${fmt(p.logit)} · click: explain this class`;
      li.innerHTML = `<span class="bar" style="width:${(100 * p.probability).toFixed(1)}%"></span>` +
        `<span class="name">${esc(p.name)}</span><span class="prob">${(100 * p.probability).toFixed(1)}%</span>`;
      li.addEventListener("click", () => { setCamClass(p.index); });
      ol.appendChild(li);
    }
    const sel = $("cam-class");
    const keep = sel.value;
    sel.innerHTML = '<option value="">top class</option>' +
      preds.map((p) => `<option value="${p.index}">${esc(p.name)} (${p.index})</option>`).join("");
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  }

  function renderGrid(a) {
    state.layout = a.layout;
    state.maxes = a.max;
    const g = $("grid");
    setImg(g, a.grid);
    $("grid-empty").hidden = true;
    const L = a.layout;
    g.dataset.cols = L.cols; g.dataset.tile = L.tile; g.dataset.pad = L.pad; g.dataset.units = L.units;
    $("grid-caption").textContent = `${a.layer}: ${a.shape[0]} units, each a ${a.shape[1]}×${a.shape[2]} map` +
      (a.norm === "layer" ? " on one scale for the whole layer (dark: silent)." : ", each stretched to its own range.") +
      " Click a tile to inspect the unit.";
    const chips = $("strongest");
    chips.innerHTML = '<span class="muted">strongest:</span>';
    for (const u of a.strongest) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chip" + (u === state.unit ? " on" : "");
      b.textContent = `${u}`;
      b.title = `unit ${u}: max ${fmt(a.max[u])}`;
      b.addEventListener("click", () => selectUnit(u));
      chips.appendChild(b);
    }
    placeSelection();
  }

  async function analyze() {
    if (!state.image) return;
    const my = ++state.seq.analyze;
    const q = new URLSearchParams({ image: state.image, layer: state.layer, norm: state.norm });
    try {
      const d = await api(`/api/analyze?${q}`);
      if (my !== state.seq.analyze) return;
      renderPreds(d.predictions);
      renderGrid(d.activations);
    } catch (e) { if (my === state.seq.analyze) toast(e); }
  }

  function unitAt(ev) {
    const L = state.layout;
    if (!L) return null;
    const r = $("grid").getBoundingClientRect();
    const x = (ev.clientX - r.left) * L.width / r.width;
    const y = (ev.clientY - r.top) * L.height / r.height;
    const c = Math.floor(x / (L.tile + L.pad));
    const row = Math.floor(y / (L.tile + L.pad));
    if (c < 0 || c >= L.cols || row < 0) return null;
    const u = row * L.cols + c;
    return u < L.units ? u : null;
  }

  function boxStyle(el, u) {
    const L = state.layout;
    const c = u % L.cols, row = Math.floor(u / L.cols);
    el.style.left = `${(100 * c * (L.tile + L.pad)) / L.width}%`;
    el.style.top = `${(100 * row * (L.tile + L.pad)) / L.height}%`;
    el.style.width = `${(100 * L.tile) / L.width}%`;
    el.style.height = `${(100 * L.tile) / L.height}%`;
  }

  function placeSelection() {
    const box = $("sel-box");
    if (state.unit === null || !state.layout || state.unit >= state.layout.units) { box.hidden = true; return; }
    boxStyle(box, state.unit);
    box.hidden = false;
  }

  $("grid").addEventListener("click", (ev) => {
    const u = unitAt(ev);
    if (u !== null) selectUnit(u);
  });
  $("grid").addEventListener("mousemove", (ev) => {
    const u = unitAt(ev);
    const tip = $("hover-tip");
    if (u === null) { tip.hidden = true; return; }
    tip.textContent = `unit ${u} · max ${fmt(state.maxes[u])}`;
    const wrap = $("grid-wrap").getBoundingClientRect();
    tip.style.left = `${ev.clientX - wrap.left + 14}px`;
    tip.style.top = `${ev.clientY - wrap.top + 14}px`;
    tip.hidden = false;
  });
  $("grid").addEventListener("mouseleave", () => { $("hover-tip").hidden = true; });

  document.addEventListener("keydown", (ev) => {
    if (state.unit === null || !state.layout || ["INPUT", "SELECT"].includes(document.activeElement.tagName)) return;
    const L = state.layout;
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -L.cols, ArrowDown: L.cols }[ev.key];
    if (step === undefined) return;
    const u = state.unit + step;
    if (u >= 0 && u < L.units) { ev.preventDefault(); selectUnit(u); }
  });

  function setLayer(name) {
    if (![...$("layer").options].some((o) => o.value === name)) return;
    $("layer").value = name;
    state.layer = name;
    state.unit = null;
    clearUnit();
    markGraph();
    $("embed-run").textContent = `t-SNE of ${name}`;
    try { history.replaceState(null, "", `/?layer=${encodeURIComponent(name)}`); } catch (e) { /* file:// etc. */ }
    if (!state.stream) analyze();
  }

  $("layer").addEventListener("change", (ev) => setLayer(ev.target.value));
  $("norm").addEventListener("change", (ev) => { state.norm = ev.target.value; if (!state.stream) analyze(); });

  // ------------------------------------------------------------------ one unit

  function clearUnit() {
    $("unit-title").textContent = "Unit";
    $("unit-figs").hidden = true;
    $("u-atlas").hidden = true;
    $("unit-stats").textContent = "";
    $("unit-hint").hidden = false;
    $("sel-box").hidden = true;
  }

  function selectUnit(u) {
    state.unit = u;
    placeSelection();
    document.querySelectorAll("#strongest .chip").forEach((c) => c.classList.toggle("on", c.textContent === String(u)));
    $("unit-title").textContent = `Unit ${u} of ${state.layer}`;
    if (!state.stream) loadUnit();
  }

  function showUnitMap(d) {
    $("unit-hint").hidden = true;
    $("unit-figs").hidden = false;
    setImg($("u-act"), d.activation);
    setImg($("u-overlay"), d.overlay);
    $("unit-stats").textContent = `max ${fmt(d.max)} at (${d.argmax[0]}, ${d.argmax[1]}) · mean ${fmt(d.mean, 3)}` +
      (d.max <= 0 ? " · silent on this image: the projections are blank" : "");
  }

  async function loadUnit() {
    if (!state.image || state.unit === null) return;
    const my = ++state.seq.unit;
    const card = $("unit-card");
    card.classList.add("loading");
    const q = new URLSearchParams({ image: state.image, layer: state.layer, unit: state.unit });
    try {
      const d = await api(`/api/unit?${q}`);
      if (my !== state.seq.unit) return;
      $("unit-title").textContent = `Unit ${d.unit} of ${d.layer}`;
      showUnitMap(d);
      setImg($("u-deconv"), d.deconv);
      setImg($("u-guided"), d.guided);
      renderAtlas(d.atlas);
    } catch (e) { if (my === state.seq.unit) toast(e); }
    finally { if (my === state.seq.unit) card.classList.remove("loading"); }
  }

  function renderAtlas(a) {
    const box = $("u-atlas");
    box.hidden = false;
    if (a === null || a === undefined) {
      box.innerHTML = '<h3>Atlas</h3><p class="muted">No atlas loaded. Build one with <code>convscope atlas build</code> ' +
        "and start the server with <code>--atlas DIR</code> to see this unit's maximizing image, top-9 patches and concept.</p>";
      return;
    }
    if (a.missing) { box.innerHTML = `<h3>Atlas</h3><p class="muted">${esc(a.missing)}</p>`; return; }
    const concept = a.concept
      ? `<span class="badge${a.detector ? " det" : ""}" title="Network Dissection label${a.detector ? " (a detector: IoU above the threshold)" : ""}">${esc(a.concept)}</span>`
      : '<span class="muted">no concept label yet</span>';
    const facts = `<div class="atlas-facts">${concept}<dl class="kv">` +
      `<dt>category</dt><dd>${esc(a.category || "—")}</dd><dt>IoU</dt><dd>${fmt(a.iou, 3)}</dd>` +
      `<dt>AM reaches</dt><dd>${fmt(a.am_activation)}</dd><dt>dataset max</dt><dd>${fmt(a.max_activation)}</dd></dl></div>`;
    const am = a.am_image
      ? `<figure class="fig"><img id="u-am" src="${a.am_image}" alt="activation maximization"><figcaption>maximizing image</figcaption></figure>`
      : '<p class="muted">no activation-maximization image yet</p>';
    const top = a.top_image
      ? `<figure class="fig wide"><img id="u-top" src="${a.top_image}" alt="top activations"><figcaption>strongest ` +
        "activations over the atlas' images: DeconvNet projections and patches</figcaption></figure>"
      : '<p class="muted wide">no top-9 patches yet</p>';
    box.innerHTML = `<h3>Atlas <a class="small" href="/atlas/${encodeURIComponent(a.layer)}/${a.unit}">unit page →</a></h3>` +
      `<div class="atlas-grid">${am}${facts}${top}</div>`;
  }

  // ------------------------------------------------------------------ class evidence

  function setCamClass(idx) {
    state.cls = idx;
    $("cam-index").value = idx === null ? "" : idx;
    const sel = $("cam-class");
    sel.value = [...sel.options].some((o) => o.value === String(idx)) ? String(idx) : "";
    document.querySelectorAll("#preds .pred").forEach((li, i) => li.classList.toggle("on", sel.selectedIndex === i + 1));
    loadCam();
  }

  async function loadCam() {
    if (!state.image) return;
    const my = ++state.seq.cam;
    const q = new URLSearchParams({ image: state.image, method: state.method });
    if (state.cls !== null) q.set("cls", state.cls);
    try {
      const d = await api(`/api/cam?${q}`);
      if (my !== state.seq.cam) return;
      setImg($("cam-img"), d.overlay);
      $("cam-caption").textContent = `${d.method === "gradcam" ? "Grad-CAM" : "saliency"} for “${d.name}” (class ${d.class})`;
    } catch (e) { if (my === state.seq.cam) toast(e); }
  }

  $("cam-method").addEventListener("change", (ev) => { state.method = ev.target.value; loadCam(); });
  $("cam-class").addEventListener("change", (ev) => setCamClass(ev.target.value === "" ? null : parseInt(ev.target.value, 10)));
  $("cam-index").addEventListener("change", (ev) => {
    const v = ev.target.value.trim();
    setCamClass(v === "" ? null : parseInt(v, 10));
  });

  // ------------------------------------------------------------------ webcam

  const canvas = document.createElement("canvas");

  async function startWebcam() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      toast("this browser offers no camera here (the page must come from localhost or https)");
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    } catch (e) { toast(`no camera: ${e.message}`); return; }
    const v = $("video");
    v.srcObject = state.stream;
    v.hidden = false;
    $("current").hidden = true;
    $("placeholder").hidden = true;
    $("webcam").textContent = "Stop (freeze frame)";
    $("webcam").classList.add("live");
    document.querySelectorAll(".thumb").forEach((b) => b.classList.remove("on"));
    webcamLoop();
  }

  function stopWebcam(refresh = true) {
    if (!state.stream) return;
    state.stream.getTracks().forEach((t) => t.stop());
    state.stream = null;
    $("webcam").textContent = "Start webcam";
    $("webcam").classList.remove("live");
    $("fps").textContent = "";
    if (refresh && state.image) useImage(state.image).catch(toast);  // the last frame stays: inspect it at leisure
  }

  $("webcam").addEventListener("click", () => (state.stream ? stopWebcam() : startWebcam()));

  async function grabFrame(v) {
    const short = 256;
    const s = short / Math.min(v.videoWidth, v.videoHeight);
    canvas.width = Math.round(v.videoWidth * s);
    canvas.height = Math.round(v.videoHeight * s);
    canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
    return new Promise((res) => canvas.toBlob(res, "image/jpeg", 0.85));
  }

  async function webcamLoop() {
    const v = $("video");
    let fps = 0, last = performance.now();
    while (state.stream) {
      if (!v.videoWidth) { await new Promise((r) => setTimeout(r, 50)); continue; }
      const blob = await grabFrame(v);
      const q = new URLSearchParams({ layer: state.layer, norm: state.norm });
      if (state.unit !== null) q.set("unit", state.unit);
      try {
        const d = await api(`/api/frame?${q}`, { method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" } });
        if (!state.stream) { state.image = d.image; break; }
        state.image = d.image;
        renderPreds(d.predictions);
        renderGrid(d.activations);
        if (d.unit) {
          showUnitMap(d.unit);
          $("u-deconv").hidden = true;
          $("u-guided").hidden = true;
        }
        const now = performance.now();
        const inst = 1000 / (now - last);
        last = now;
        fps = fps ? 0.8 * fps + 0.2 * inst : inst;
        $("fps").textContent = `${fps.toFixed(1)} fps · server ${d.timing.job_ms.toFixed(0)} ms`;
      } catch (e) {
        if (e.status === 503) { await new Promise((r) => setTimeout(r, 1000 * (e.retryAfter || 1))); continue; }
        toast(e);
        stopWebcam(false);
      }
    }
    $("u-deconv").hidden = false;
    $("u-guided").hidden = false;
  }

  // ------------------------------------------------------------------ the graph as the layer picker

  let graphLoaded = false;
  function layerOf(a) {
    try { return new URL(a.getAttribute("href"), location.href).searchParams.get("layer"); } catch (e) { return null; }
  }

  function markGraph() {
    document.querySelectorAll("#graph-view a.link").forEach((a) => a.classList.toggle("on", layerOf(a) === state.layer));
  }

  async function toggleGraph() {
    const card = $("graph-card"), btn = $("graph-toggle");
    card.hidden = !card.hidden;
    btn.setAttribute("aria-expanded", String(!card.hidden));
    if (card.hidden || graphLoaded) { markGraph(); return; }
    try {
      const d = await api("/api/graph");
      $("graph-view").innerHTML = d.svg;      // the server's SVG: names are escaped there
      $("graph-tree-body").innerHTML = d.tree;
      graphLoaded = true;
      markGraph();
      const on = document.querySelector("#graph-view a.link.on");
      if (on) on.scrollIntoView({ block: "nearest", inline: "nearest" });
    } catch (e) {
      card.hidden = true;
      btn.setAttribute("aria-expanded", "false");
      toast(e);
    }
  }

  $("graph-toggle").addEventListener("click", toggleGraph);
  $("graph-card").addEventListener("click", (ev) => {
    const a = ev.target.closest("a");
    const name = a ? layerOf(a) : null;
    if (!name) return;  // the full-page link navigates as usual
    ev.preventDefault();
    setLayer(name);
  });

  // ------------------------------------------------------------------ the embedding of a layer

  const SVGNS = "http://www.w3.org/2000/svg";
  let embedSeq = 0;
  let embedding = null;

  async function loadEmbedding() {
    const my = ++embedSeq;
    const layer = state.layer, source = $("embed-source").value;
    const btn = $("embed-run");
    btn.disabled = true;
    $("embed-caption").textContent = `computing the t-SNE of ${layer} over ` +
      (source === "synthetic" ? "the synthetic scenes" : "the explorer's pictures") + " (once per layer, then cached)…";
    try {
      const d = await api(`/api/embedding?${new URLSearchParams({ layer, source })}`);
      if (my === embedSeq) drawEmbedding(d);
    } catch (e) {
      if (my === embedSeq) { $("embed-caption").textContent = e.message; toast(e); }
    } finally {
      if (my === embedSeq) btn.disabled = false;
    }
  }

  function drawEmbedding(d) {
    embedding = d;
    const svg = $("embed-svg");
    const W = 600, M = 14;
    const xs = d.points.map((p) => p.x), ys = d.points.map((p) => p.y);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const s = (W - 2 * M) / (Math.max(x1 - x0, y1 - y0) || 1);
    const r = d.points.length > 600 ? 3.5 : 5;
    svg.innerHTML = "";
    d.points.forEach((p, i) => {
      const c = document.createElementNS(SVGNS, "circle");
      c.setAttribute("cx", (W / 2 + (p.x - (x0 + x1) / 2) * s).toFixed(1));
      c.setAttribute("cy", (W / 2 - (p.y - (y0 + y1) / 2) * s).toFixed(1));  // y up, as in the report
      c.setAttribute("r", r);
      c.setAttribute("fill", p.colour);
      c.dataset.i = i;
      svg.appendChild(c);
    });
    $("embed-wrap").hidden = false;
    $("embed-legend").innerHTML = d.legend.length ? `<span class="muted">${d.coloured_by === "label" ? "label" : "predicted class"}:</span>` +
      d.legend.map((l) => `<span class="legend-item"><span class="swatch" style="background:${esc(l.colour)}"></span>` +
        `${esc(l.name)} (${l.count})</span>`).join("") : "";
    $("embed-caption").textContent = `${d.n} images by ${d.layer} (${d.features} pooled features), t-SNE seed ${d.seed}` +
      (d.cached ? " · from the cache" : ` · features ${fmt(d.feature_s)} s, t-SNE ${fmt(d.tsne_s)} s`) +
      ". Hover a point for its picture" + (d.source === "images" ? "; click one to open it." : ".");
    markEmbedding();
  }

  function markEmbedding() {
    if (!embedding) return;
    document.querySelectorAll("#embed-svg circle").forEach((c) => {
      const p = embedding.points[+c.dataset.i];
      c.classList.toggle("here", p.image !== null && p.image === state.image);
    });
  }

  function peekAt(ev) {
    const wrap = $("embed-wrap").getBoundingClientRect();
    const peek = $("embed-peek");
    const left = ev.clientX - wrap.left + 14;
    peek.style.left = `${left + 150 > wrap.width ? ev.clientX - wrap.left - 154 : left}px`;
    peek.style.top = `${Math.max(0, ev.clientY - wrap.top - 60)}px`;
  }

  $("embed-svg").addEventListener("mouseover", (ev) => {
    const c = ev.target.closest("circle");
    if (!c || !embedding) return;
    const p = embedding.points[+c.dataset.i];
    if (p.thumbnail) { $("embed-peek-img").src = p.thumbnail; $("embed-peek-img").hidden = false; }
    else $("embed-peek-img").hidden = true;
    $("embed-peek-text").innerHTML = `<b>${esc(p.name)}</b>` +
      (p.label_name !== null ? `<br>label: ${esc(p.label_name)}` : "") +
      (p.prediction_name !== null ? `<br>predicted: ${esc(p.prediction_name)}` : "");
    peekAt(ev);
    $("embed-peek").hidden = false;
  });
  $("embed-svg").addEventListener("mousemove", (ev) => { if (!$("embed-peek").hidden) peekAt(ev); });
  $("embed-svg").addEventListener("mouseout", (ev) => { if (ev.target.closest("circle")) $("embed-peek").hidden = true; });
  $("embed-svg").addEventListener("click", (ev) => {
    const c = ev.target.closest("circle");
    const p = c && embedding ? embedding.points[+c.dataset.i] : null;
    if (!p || !p.image) return;
    stopWebcam(false);
    useImage(p.image).catch(toast);
  });
  $("embed-run").addEventListener("click", loadEmbedding);
  $("embed-run").textContent = `t-SNE of ${state.layer}`;

  // ------------------------------------------------------------------ start: the tab's last image, if the server still has it

  (async () => {
    let id = new URLSearchParams(location.search).get("image");
    try { id = id || sessionStorage.getItem(IMAGE_KEY); } catch (e) { /* no storage */ }
    if (!id || state.image) return;
    const r = await fetch(`/api/images/${encodeURIComponent(id)}`).catch(() => null);
    if (r && r.ok && !state.image) await useImage(id).catch(toast);
    else { try { sessionStorage.removeItem(IMAGE_KEY); } catch (e) { /* no storage */ } }
  })();
})();
