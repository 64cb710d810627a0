// The search page: text search, search by an uploaded or dropped image, paging, a full-size viewer.
// Plain DOM, no framework, no build step; every server string goes through textContent.
"use strict";

const params = new URLSearchParams(location.search);
const PAGE = Math.min(Math.max(parseInt(params.get("per_page") || "24", 10) || 24, 1), 100);
const THUMB = 256;
// ?min_match=N (0..100) hides results below an N% match
const MIN_MATCH = params.has("min_match") ? Number(params.get("min_match")) : null;
const $ = (id) => document.getElementById(id);

let current = null; // {kind: "text", query} | {kind: "image", file}
let offset = 0;
let busy = false;

function imageUrl(key, size) {
  const path = key.split("/").map(encodeURIComponent).join("/");
  return "/images/" + path + (size ? "?size=" + size : "");
}

function errorText(body, status) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d) && d.length) {
    return d.map((e) => {
      const where = (e.loc || []).filter((p) => p !== "body").join(".");
      return (where ? where + ": " : "") + e.msg;
    }).join("; ");
  }
  return "the service answered HTTP " + status;
}

async function call(url, options) {
  let r;
  try {
    r = await fetch(url, options);
  } catch (e) {
    throw new Error("the search service is not answering");
  }
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    const err = new Error(errorText(body, r.status));
    err.status = r.status;
    throw err;
  }
  return body;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function setBusy(on) {
  busy = on;
  document.body.classList.toggle("busy", on);
  $("search-btn").disabled = on;
  $("more").disabled = on;
}

// The one number shown for a hit. Its `match` (0-100, calibrated on the model's dev captions) when
// the model has a match scale; else the ranking score itself, so the numbers still fall along
// the list (the plain cosine would not, under hubness correction).
function scoreText(hit) {
  if (hit.match !== null && hit.match !== undefined) return `${Math.round(hit.match)}% match`;
  return "score " + hit.score.toFixed(3);
}

function rawScores(hit) {
  return `ranking score ${hit.score.toFixed(3)}, cosine ${hit.similarity.toFixed(3)}`;
}

function scoreTitle(hit) {
  const raw = rawScores(hit);
  if (hit.match === null || hit.match === undefined) return raw;
  return `scores at least as well as ${Math.round(hit.match)}% of true caption matches ` +
    `(${raw})`;
}

function addResult(hit) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.key = hit.key;
  li.dataset.score = String(hit.score);
  li.dataset.similarity = String(hit.similarity);
  if (hit.match !== null && hit.match !== undefined) li.dataset.match = String(hit.match);

  const btn = document.createElement("button");
  btn.type = "button";
  btn.className = "thumb";
  btn.title = hit.filename + " (click for the full image)";
  const img = document.createElement("img");
  img.decoding = "async";
  img.alt = hit.filename;
  img.src = imageUrl(hit.key, THUMB);
  img.addEventListener("error", () => li.classList.add("broken"));
  btn.append(img);
  btn.addEventListener("click", () => openViewer(hit));

  const cap = document.createElement("div");
  cap.className = "caption";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + hit.rank;
  const score = document.createElement("span");
  score.className = "score";
  // one number that falls along the list; the raw figures are in the title
  score.textContent = scoreText(hit);
  score.title = scoreTitle(hit);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = hit.filename;
  cap.append(rank, name, score);

  li.append(btn, cap);
  $("results").append(li);
}

async function runSearch(append) {
  if (busy || !current) return;
  setBusy(true);
  showError(null);
  try {
    let data;
    if (current.kind === "text") {
      data = await call("/search_images_by_text", {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({query: current.query, top_k: PAGE, offset: offset,
                              ...(MIN_MATCH === null ? {} : {min_match: MIN_MATCH})}),
      });
    } else {
      const form = new FormData();
      form.append("image", current.file, current.file.name || "image");
      form.append("top_k", String(PAGE));
      form.append("offset", String(offset));
      if (MIN_MATCH !== null) form.append("min_match", String(MIN_MATCH));
      const headers = {};
      const key = $("api-key").value.trim();
      if (key) headers["X-API-Key"] = key;
      data = await call("/search_images_by_image", {method: "POST", body: form, headers: headers});
    }
    if (!append) $("results").replaceChildren();
    data.results.forEach(addResult);
    offset += data.results.length;
    const shown = $("results").children.length;
    $("more").hidden = !(data.results.length === PAGE && offset < data.total);
    $("summary").textContent = shown
      ? `Showing ${shown} of ${data.total} images, best match first.`
      : "No images found.";
    $("empty-hint").hidden = true;
  } catch (e) {
    if (e.status === 401) {
      $("key-box").hidden = false;
      $("key-box").open = true;
      showError("Image search needs the service's API key: enter it under \u201cAPI key\u201d and try again.");
    } else {
      showError("Search failed: " + e.message);
    }
  } finally {
    setBusy(false);
  }
}

function searchText(query) {
  query = query.trim();
  if (!query) return;
  current = {kind: "text", query: query};
  offset = 0;
  $("query-image").hidden = true;
  const url = new URL(location.href);
  url.searchParams.set("q", query);
  history.replaceState(null, "", url);
  runSearch(false);
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError("That file is not an image.");
    return;
  }
  current = {kind: "image", file: file};
  offset = 0;
  const thumb = $("query-thumb");
  if (thumb.src.startsWith("blob:")) URL.revokeObjectURL(thumb.src);
  thumb.src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  runSearch(false);
}

// what a browser shows as it is; HEIC, TIFF and camera RAW are shown as a large JPEG instead
const BROWSER_SHOWS = /\.(jpe?g|png|webp|gif|bmp|avif)$/i;
const VIEWER_SIZE = 1024;

function viewerUrl(key) {
  return BROWSER_SHOWS.test(key) ? imageUrl(key) : imageUrl(key, VIEWER_SIZE);
}

function openViewer(hit) {
  $("viewer-img").src = viewerUrl(hit.key);
  $("viewer-img").alt = hit.filename;
  $("viewer-caption").textContent = `#${hit.rank}  ${hit.filename}  ${scoreText(hit)} (${rawScores(hit)})`;
  $("viewer-open").href = imageUrl(hit.key);
  $("viewer").hidden = false;
  $("viewer-close").focus();
}

function closeViewer() {
  $("viewer").hidden = true;
  $("viewer-img").removeAttribute("src");
}

async function showStatus() {
  try {
    const h = await call("/health");
    const parts = [`${h.vector_count.toLocaleString()} images indexed`];
    if (h.status !== "ok") parts.push("service degraded: " + (h.store || "no index"));
    $("status").textContent = parts.join(" \u00b7 ");
    if (h.api_key_required) $("key-box").hidden = false;
  } catch (e) {
    $("status").textContent = "The search service is not answering.";
  }
}

function init() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchText($("q").value);
  });
  $("file").addEventListener("change", (e) => {
    searchImage(e.target.files[0]);
    e.target.value = "";
  });
  $("more").addEventListener("click", () => runSearch(true));
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeViewer(); });

  const key = sessionStorage.getItem("apiKey");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => sessionStorage.setItem("apiKey", $("api-key").value));

  // drop an image anywhere on the page, or paste one
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    $("drop").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop").hidden = true;
  });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = Array.from((e.clipboardData && e.clipboardData.items) || [])
      .find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) searchImage(item.getAsFile());
  });

  showStatus();
  const q = params.get("q");
  if (q) {
    $("q").value = q;
    searchText(q);
  }
}

init();
