// The page at "/": enroll identities, query a crop, browse and delete identities.
// Plain browser JavaScript talking to the service's JSON API; nothing is loaded from elsewhere.
"use strict";

const PAGE_SIZE = 20;
const API_KEY_STORAGE = "reid-api-key";

const $ = (id) => document.getElementById(id);

const state = {
  pendingCrops: [],   // [{blob, name, url}] waiting to be enrolled
  queryCrops: [],     // [{blob, name, url}]: one crop, or one person's tracklet
  galleryOffset: 0,
  cameraTarget: null, // "enroll" | "query"
  cameraStream: null,
};

// ---- talking to the service ------------------------------------------------

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// FastAPI's own validation errors carry a list of {loc, msg}; the service's carry a string.
function describeDetail(detail) {
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((part) => part !== "body" && part !== "query").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  if (typeof detail === "string") return detail;
  return JSON.stringify(detail);
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, { method, body, headers: apiHeaders() });
  } catch (err) {
    throw new Error(`cannot reach the service (${err.message})`);
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch (_) {
    payload = null;
  }
  if (!response.ok) {
    const detail = payload && payload.detail !== undefined ? describeDetail(payload.detail) : text || response.statusText;
    throw new Error(`${detail} (HTTP ${response.status})`);
  }
  return payload;
}

// ---- small DOM helpers -----------------------------------------------------

function showError(id, err) {
  const el = $(id);
  if (!err) {
    el.hidden = true;
    el.textContent = "";
    return;
  }
  el.textContent = err.message || String(err);
  el.hidden = false;
}

function element(tag, props = {}, children = []) {
  const el = document.createElement(tag);
  Object.assign(el, props);
  for (const child of children) el.append(child);
  return el;
}

function cropImage(entryId, alt) {
  const img = element("img", { src: `/crops/${encodeURIComponent(entryId)}`, alt, loading: "lazy" });
  img.addEventListener("error", () => img.classList.add("missing"), { once: true });
  return img;
}

function crop(blob, name) {
  return { blob, name, url: URL.createObjectURL(blob) };
}

// ---- status ----------------------------------------------------------------

async function refreshStatus() {
  const el = $("service-status");
  try {
    const response = await fetch("/readyz");
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      el.textContent = body.status === "failed" ? `failed: ${body.detail}` : "starting\u2026";
      el.className = body.status === "failed" ? "status bad" : "status";
      if (body.status !== "failed") setTimeout(refreshStatus, 2000);
      return;
    }
    const model = [body.arch, body.backend && body.device ? `${body.backend} on ${body.device}` : body.backend]
      .filter(Boolean).join(" \u00b7 ");
    const threshold = body.match_threshold === null || body.match_threshold === undefined
      ? "no threshold" : `threshold ${body.match_threshold.toFixed(3)}`;
    el.textContent = [model ? `ready \u00b7 ${model}` : "ready", threshold].join(" \u00b7 ");
    el.title = [body.fingerprint ? `model fingerprint ${body.fingerprint}` : "", body.detail || ""]
      .filter(Boolean).join("\n");
    el.className = "status ok";
    if (body.stale_entries) {
      showError("gallery-warning", new Error(
        `${body.stale_entries} gallery entries were made by another model and are left out of queries; ` +
        "run `python -m service reembed` to re-embed them"));
    }
  } catch (_) {
    el.textContent = "offline";
    el.className = "status bad";
  }
}

// ---- enroll ----------------------------------------------------------------

function renderPending() {
  const box = $("enroll-pending");
  box.replaceChildren(...state.pendingCrops.map((c, i) => {
    const remove = element("button", { type: "button", className: "remove", textContent: "\u00d7", title: "remove" });
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(c.url);
      state.pendingCrops.splice(i, 1);
      renderPending();
    });
    return element("figure", { className: "thumb" }, [element("img", { src: c.url, alt: c.name }), remove]);
  }));
}

function addEnrollFiles() {
  const input = $("enroll-files");
  for (const file of input.files) state.pendingCrops.push(crop(file, file.name));
  input.value = "";
  renderPending();
}

async function enroll(event) {
  event.preventDefault();
  showError("enroll-error", null);
  const identity = $("enroll-identity").value.trim();
  if (!identity) return showError("enroll-error", new Error("type the identity's name first"));
  if (state.pendingCrops.length === 0) return showError("enroll-error", new Error("add at least one crop"));

  const form = new FormData();
  form.append("identity", identity);
  const camera = $("enroll-camera").value.trim();
  if (camera !== "") form.append("camera", camera);
  for (const c of state.pendingCrops) form.append("image", c.blob, c.name);

  $("enroll-submit").disabled = true;
  $("enroll-message").textContent = "enrolling\u2026";
  showWarning("enroll-warning", "");
  try {
    const result = await api("POST", "/gallery", form);
    $("enroll-message").textContent =
      `enrolled ${result.entries.length} crop(s) as ${result.identity}; gallery holds ${result.gallery_size}`;
    showWarning("enroll-warning", duplicateWarning(result));
    state.pendingCrops.forEach((c) => URL.revokeObjectURL(c.url));
    state.pendingCrops = [];
    renderPending();
    await refreshGallery();
  } catch (err) {
    $("enroll-message").textContent = "";
    showError("enroll-error", err);
  } finally {
    $("enroll-submit").disabled = false;
  }
}

function showWarning(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

// The 201 names other identities the new crops already match above the threshold.
function duplicateWarning(result) {
  const found = result.likely_duplicates || [];
  if (found.length === 0) return "";
  const names = found.map((d) => `${d.identity} (${d.score.toFixed(3)})`).join(", ");
  return `Likely duplicate: these crops already match ${names} above the threshold. ` +
    "Same person under another name? The crops were stored anyway.";
}

// ---- query -----------------------------------------------------------------

function setQueryCrops(crops) {
  state.queryCrops.forEach((c) => URL.revokeObjectURL(c.url));
  state.queryCrops = crops;
  $("query-preview").src = crops.length ? crops[0].url : "";
  $("query-caption").textContent = crops.length > 1 ? `query: ${crops.length} crops` : "query";
}

function renderDecision(result) {
  const el = $("query-decision");
  const best = result.matches[0];
  if (result.decision === null || result.decision === undefined) {
    el.className = "decision none";
    el.textContent = "No decision: the model has no calibrated threshold (set REID_MATCH_THRESHOLD, or calibrate the checkpoint).";
  } else {
    const source = { query: "this query", setting: "REID_MATCH_THRESHOLD", checkpoint: "calibrated" }[result.threshold_source];
    const threshold = `threshold ${result.threshold.toFixed(3)} (${source})`;
    el.className = `decision ${result.decision}`;
    el.replaceChildren(
      element("strong", { textContent: result.decision === "known" ? `Known: ${best.identity}` : "Unknown person" }),
      result.decision === "known"
        ? ` \u2014 score ${best.score.toFixed(3)} \u2265 ${threshold}`
        : ` \u2014 ${best ? `best match ${best.identity} at ${best.score.toFixed(3)} <` : "nobody in the gallery;"} ${threshold}`,
    );
  }
  el.dataset.decision = result.decision || "none";
  el.hidden = false;
}

function renderMatches(result) {
  const list = $("results");
  list.classList.toggle("ranking-only", result.threshold === null);
  if (result.matches.length === 0) {
    list.replaceChildren(element("li", { className: "muted", textContent: "the gallery is empty" }));
    return;
  }
  list.replaceChildren(...result.matches.map((m, i) => {
    const camera = m.camera === null || m.camera === undefined ? "" : ` \u00b7 cam ${m.camera}`;
    const bar = element("span", { className: "bar" });
    bar.style.width = `${Math.max(0, Math.min(1, m.score)) * 100}%`;
    return element("li", { className: m.match ? "match pass" : "match" }, [
      element("span", { className: "rank", textContent: `${i + 1}` }),
      cropImage(m.entry_id, `crop of ${m.identity}`),
      element("span", { className: "identity", textContent: m.identity }),
      element("span", { className: "score", textContent: `${m.score.toFixed(3)}${camera}` }),
      element("span", { className: "meter" }, [bar]),
      element("span", { className: "verdict", textContent: m.match ? "match" : "" }),
    ]);
  }));
}

async function query(event) {
  event.preventDefault();
  showError("query-error", null);
  if (state.queryCrops.length === 0) return showError("query-error", new Error("choose a query crop first"));

  const params = new URLSearchParams({ k: $("query-k").value || "10", by: $("query-by").value });
  const excluded = $("query-exclude-camera").value.trim();
  if (excluded !== "") params.set("exclude_camera", excluded);
  if ($("query-rerank").checked) params.set("rerank", "true");
  const form = new FormData();
  for (const c of state.queryCrops) form.append("image", c.blob, c.name);

  $("query-submit").disabled = true;
  $("query-message").textContent = "searching\u2026";
  try {
    const result = await api("POST", `/query?${params}`, form);
    const crops = result.crops > 1 ? ` for a tracklet of ${result.crops} crops` : "";
    const reranked = result.reranked ? ", re-ranked" : "";
    $("query-message").textContent =
      `${result.matches.length} match(es) from ${result.gallery_size} gallery crops${crops}${reranked}`;
    renderDecision(result);
    renderMatches(result);
    $("query-view").hidden = false;
  } catch (err) {
    $("query-message").textContent = "";
    $("query-view").hidden = true;
    $("query-decision").hidden = true;
    showError("query-error", err);
  } finally {
    $("query-submit").disabled = false;
  }
}

// ---- gallery listing -------------------------------------------------------

async function toggleEntries(identity, row) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("entries")) {
    next.remove();
    return;
  }
  const cell = element("td", { colSpan: 3 });
  const detailRow = element("tr", { className: "entries" }, [cell]);
  row.after(detailRow);
  try {
    const result = await api("GET", `/gallery/${encodeURIComponent(identity)}`);
    cell.append(element("div", { className: "thumbs" }, result.entries.map((e) =>
      element("figure", { className: "thumb" }, [
        cropImage(e.entry_id, `crop of ${identity}`),
        element("figcaption", { textContent: e.camera === null || e.camera === undefined ? "" : `cam ${e.camera}` }),
      ]))));
  } catch (err) {
    cell.append(element("span", { className: "error", textContent: err.message }));
  }
}

async function deleteIdentity(identity) {
  if (!window.confirm(`Delete ${identity} and all its crops from the gallery?`)) return;
  showError("gallery-error", null);
  try {
    await api("DELETE", `/gallery/${encodeURIComponent(identity)}`);
    await refreshGallery();
  } catch (err) {
    showError("gallery-error", err);
  }
}

async function refreshGallery() {
  try {
    const page = await api("GET", `/gallery?offset=${state.galleryOffset}&limit=${PAGE_SIZE}`);
    if (page.identities.length === 0 && state.galleryOffset > 0) {
      state.galleryOffset = Math.max(0, state.galleryOffset - PAGE_SIZE);
      return refreshGallery();
    }
    $("identity-rows").replaceChildren(...page.identities.map((item) => {
      const name = element("button", { type: "button", className: "link", textContent: item.identity, title: "show crops" });
      const remove = element("button", { type: "button", className: "danger", textContent: "Delete" });
      const row = element("tr", { className: "identity-row" }, [
        element("td", {}, [name]),
        element("td", { className: "count", textContent: `${item.entries}` }),
        element("td", { className: "actions" }, [remove]),
      ]);
      row.dataset.identity = item.identity;
      name.addEventListener("click", () => toggleEntries(item.identity, row));
      remove.addEventListener("click", () => deleteIdentity(item.identity));
      return row;
    }));
    const last = Math.min(page.offset + page.identities.length, page.total);
    $("gallery-summary").textContent = `${page.total} identit${page.total === 1 ? "y" : "ies"}`;
    $("page-label").textContent = page.total ? `${page.offset + 1}\u2013${last} of ${page.total}` : "empty";
    $("page-prev").disabled = page.offset === 0;
    $("page-next").disabled = last >= page.total;
    showError("gallery-error", null);
  } catch (err) {
    showError("gallery-error", err);
  }
}

// ---- camera ----------------------------------------------------------------

async function openCamera(target) {
  state.cameraTarget = target;
  showError("camera-error", null);
  $("camera-dialog").showModal();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("camera-error", new Error("this browser gives no camera here (it needs https or localhost)"));
    return;
  }
  try {
    state.cameraStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    $("camera-video").srcObject = state.cameraStream;
  } catch (err) {
    showError("camera-error", new Error(`no camera: ${err.message}`));
  }
}

function closeCamera() {
  if (state.cameraStream) state.cameraStream.getTracks().forEach((t) => t.stop());
  state.cameraStream = null;
  $("camera-video").srcObject = null;
  if ($("camera-dialog").open) $("camera-dialog").close();
}

function captureFrame() {
  const video = $("camera-video");
  if (!video.videoWidth) return;
  const canvas = element("canvas", { width: video.videoWidth, height: video.videoHeight });
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => {
    const c = crop(blob, `camera-${Date.now()}.jpg`);
    if (state.cameraTarget === "query") {
      setQueryCrops([c]);
      closeCamera();
    } else {
      state.pendingCrops.push(c);
      renderPending();
    }
  }, "image/jpeg", 0.92);
}

// ---- wiring ----------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  key.addEventListener("change", () => sessionStorage.setItem(API_KEY_STORAGE, key.value.trim()));

  $("enroll-files").addEventListener("change", addEnrollFiles);
  $("enroll-form").addEventListener("submit", enroll);
  $("query-file").addEventListener("change", () => {
    const files = [...$("query-file").files];
    if (files.length) setQueryCrops(files.map((file) => crop(file, file.name)));
  });
  $("query-form").addEventListener("submit", query);
  $("enroll-camera-button").addEventListener("click", () => openCamera("enroll"));
  $("query-camera-button").addEventListener("click", () => openCamera("query"));
  $("camera-capture").addEventListener("click", captureFrame);
  $("camera-close").addEventListener("click", closeCamera);
  $("camera-dialog").addEventListener("close", closeCamera);
  $("page-prev").addEventListener("click", () => {
    state.galleryOffset = Math.max(0, state.galleryOffset - PAGE_SIZE);
    refreshGallery();
  });
  $("page-next").addEventListener("click", () => {
    state.galleryOffset += PAGE_SIZE;
    refreshGallery();
  });

  refreshStatus();
  refreshGallery();
}

document.addEventListener("DOMContentLoaded", start);
