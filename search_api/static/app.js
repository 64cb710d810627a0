// The search page: text search, search by an uploaded or dropped image, paging, a full-size viewer
// with the photo's details, a filter bar (date, place, folder, camera; its choices and counts from
// GET /facets) and the filters the service read from the words of the query shown as removable
// chips; "more like this" / "less like this" on each result add the photo to the query as a
// positive or negative term (the query's terms shown as removable chips) and search again.
// In the viewer, "Why this photo?" lays the heat map of GET /explain (where in the photo the query
// matches) over the photo: while the pointer is on the button (a mouse), or until tapped again.
// "Hide duplicates" asks for results with near duplicates collapsed (`dedupe`), a collapsed result
// showing "+N similar"; the "Duplicates" view lists the groups of GET /duplicates side by side
// with each photo's size and date, so a person can decide what to keep (the page deletes nothing).
// Plain DOM, no framework, no build step; every server string goes through textContent.
// Against a service without metadata (no /facets, no `info`, no `hints`) the extras stay hidden.
"use strict";

const params = new URLSearchParams(location.search);
const PAGE = Math.min(Math.max(parseInt(params.get("per_page") || "24", 10) || 24, 1), 100);
const THUMB = 256;
// ?min_match=N (0..100) hides results below an N% match
const MIN_MATCH = params.has("min_match") ? Number(params.get("min_match")) : null;
const $ = (id) => document.getElementById(id);

// {kind: "text", query, parseHints, chips} | {kind: "image", file}; `chips`: the filters read
// from the query, [{label, kind, filters}]; once one is removed the service reads nothing more
// (parseHints false) and the page sends the remaining ones itself. A text search also has
// `read` (the answer's `terms`: how the service read the query) and, once a photo was added or a
// term removed, `terms` ({positive, negative}: [{text} | {key}, weight]), sent instead of the text.
let current = null;
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
  if (Number.isInteger(hit.duplicates) && hit.duplicates > 0) li.append(similarBadge(hit));
  const meta = infoLine(hit.info);
  if (meta) li.append(meta);
  li.append(feedbackButtons(hit));
  $("results").append(li);
}

// "+N similar": how many near duplicates were collapsed into this result (their names in the title)
function similarBadge(hit) {
  const p = document.createElement("p");
  p.className = "similar";
  p.textContent = `+${hit.duplicates} similar`;
  const names = (Array.isArray(hit.duplicate_keys) ? hit.duplicate_keys : [])
    .map((k) => String(k).split("/").pop());
  const more = hit.duplicates - names.length;
  p.title = "Near duplicates of this photo, hidden: " + names.join(", ") +
    (more > 0 ? ` and ${more} more` : "");
  return p;
}

// a new first page asked for while a search runs: run it when that one is back, and drop its answer
let pending = false;

async function runSearch(append) {
  if (!current) return;
  if (busy) {
    if (!append) pending = true;
    return;
  }
  setBusy(true);
  showError(null);
  const asked = current;  // the search was cleared meanwhile: its answer is dropped
  try {
    let data;
    // filters and parse_hints only when they say something: an older service knows neither
    const filters = requestFilters();
    const filtered = Object.keys(filters).length > 0;
    const dedupe = $("dedupe").checked;
    if (current.kind === "text") {
      data = await call("/search_images_by_text", {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({...(current.terms ? {terms: current.terms} : {query: current.query}),
                              top_k: PAGE, offset: offset,
                              ...(MIN_MATCH === null ? {} : {min_match: MIN_MATCH}),
                              ...(filtered ? {filters: filters} : {}),
                              ...(dedupe ? {dedupe: true} : {}),
                              ...(current.parseHints ? {} : {parse_hints: false})}),
      });
    } else {
      const form = new FormData();
      form.append("image", current.file, current.file.name || "image");
      form.append("top_k", String(PAGE));
      form.append("offset", String(offset));
      if (MIN_MATCH !== null) form.append("min_match", String(MIN_MATCH));
      if (filtered) form.append("filters", JSON.stringify(filters));
      if (dedupe) form.append("dedupe", "true");
      const headers = {};
      const key = $("api-key").value.trim();
      if (key) headers["X-API-Key"] = key;
      data = await call("/search_images_by_image", {method: "POST", body: form, headers: headers});
    }
    if (pending || current !== asked) return;
    if (!append) $("results").replaceChildren();
    if (!append && current.kind === "text" && current.parseHints) {
      current.chips = chipsFrom(data.hints, data.filters);
      showChips();
    }
    if (!append && current.kind === "text" && !current.terms) {
      current.read = data.terms && Array.isArray(data.terms.positive) ? data.terms : null;
      showTerms();
    }
    data.results.forEach(addResult);
    offset += data.results.length;
    const shown = $("results").children.length;
    $("more").hidden = !(data.results.length === PAGE && offset < data.total);
    // what the model was given, when the service took words out of the query
    const encoded = data.encoded_text && current.kind === "text" && data.encoded_text !== current.query
      ? ` for \u201c${data.encoded_text}\u201d` : "";
    const hidden = data.dedupe && data.dedupe !== "none" ? " (near duplicates hidden)" : "";
    $("summary").textContent = shown
      ? `Showing ${shown} of ${data.total} images${encoded}, best match first${hidden}.`
      : (filtered || (current.chips || []).length
        ? "No images match these filters." : "No images found.");
    $("empty-hint").hidden = true;
  } catch (e) {
    if (pending || current !== asked) return;
    if (e.status === 401) {
      $("key-box").hidden = false;
      $("key-box").open = true;
      showError("Image search needs the service's API key: enter it under \u201cAPI key\u201d and try again.");
    } else {
      showError("Search failed: " + e.message);
    }
  } finally {
    setBusy(false);
    if (pending) {
      pending = false;
      offset = 0;
      runSearch(false);
    }
  }
}

function searchText(query, parseHints = true) {
  query = query.trim();
  if (!query) return;
  showDuplicates(false);
  current = {kind: "text", query: query, parseHints: parseHints, chips: [], read: null,
             terms: null};
  showChips();
  showTerms();
  offset = 0;
  $("query-image").hidden = true;
  syncUrl();
  runSearch(false);
}

// the current search again from its first page (a filter changed)
function rerun() {
  syncUrl();
  if (!current) return;
  offset = 0;
  runSearch(false);
}

function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError("That file is not an image.");
    return;
  }
  showDuplicates(false);
  current = {kind: "image", file: file};
  showChips();
  showTerms();
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

let viewerKey = null;
let viewerHit = null;
// whether the service knows photos' metadata (its /health counts them: an older one has no
// /facets nor /images/{key}/info, and the page does not ask), and whether the version it
// serves holds any (its facets offer something)
let serviceHasMetadata = false;
let indexHasMetadata = false;

// --- "Why this photo?": the /explain overlay for the current text query --------------------
const HEAT_SIZE = 768;
let whyPinned = false;

// a term as the typed query language writes it (search_api/query_terms.py)
function typedTerm(t) {
  const weight = t.weight && t.weight !== 1 ? `${t.weight}:` : "";
  if (t.key !== undefined && t.key !== null) return `${weight}key:"${String(t.key).replace(/"/g, "")}"`;
  const text = String(t.text);
  const plain = text === text.trim() && !/[+\-"]/.test(text) && !/^key:/.test(text) &&
    !/^(\d+(\.\d*)?|\.\d+):/.test(text);
  return weight + (plain ? text : `"${text.replace(/"/g, "")}"`);
}

// the current search's query as /explain reads it (null: nothing to explain, e.g. an upload)
function explainQuery() {
  if (!current || current.kind !== "text") return null;
  if (!current.terms) return current.query;
  const pos = (current.terms.positive || []).map(typedTerm);
  const neg = (current.terms.negative || []).map(typedTerm);
  if (!pos.length) return null;
  return pos.join(" + ") + neg.map((t) => " - " + t).join("");
}

function explainUrl(key) {
  const q = explainQuery();
  if (!q) return null;
  const url = new URLSearchParams({key: key, q: q, size: String(HEAT_SIZE)});
  if (!current.parseHints) url.set("parse_hints", "false");
  return "/explain?" + url.toString();
}

function resetWhy() {
  whyPinned = false;
  $("viewer-why").setAttribute("aria-pressed", "false");
  $("viewer-heat").hidden = true;
  $("viewer-heat").removeAttribute("src");
  $("why-note").textContent = "";
  $("viewer-why").hidden = !explainQuery();
}

function showWhy(on) {
  const heat = $("viewer-heat");
  if (!on) {
    heat.hidden = true;
    $("why-note").textContent = "";
    return;
  }
  const url = viewerKey && explainUrl(viewerKey);
  if (!url) return;
  if (heat.getAttribute("src") !== url) {
    $("why-note").textContent = "Finding where it matches\u2026";
    heat.src = url;
  } else if (heat.complete && heat.naturalWidth > 0) {
    $("why-note").textContent = "Warmer: where the photo matches the query best.";
  }
  heat.hidden = false;
}

async function whyFailed() {
  const heat = $("viewer-heat");
  heat.hidden = true;
  const url = heat.getAttribute("src");
  heat.removeAttribute("src");
  let message = "No explanation for this photo.";
  try {  // the service says why (e.g. a model without a spatial map)
    await call(url.replace("/explain?", "/explain?format=json&"));
  } catch (e) {
    message = "No explanation: " + e.message;
  }
  $("why-note").textContent = message;
}

function initWhy() {
  const button = $("viewer-why");
  // a mouse shows the map while it is on the button; a tap (or a click) pins it
  button.addEventListener("pointerenter", (e) => { if (e.pointerType === "mouse" && !whyPinned) showWhy(true); });
  button.addEventListener("pointerleave", (e) => { if (e.pointerType === "mouse" && !whyPinned) showWhy(false); });
  button.addEventListener("click", () => {
    whyPinned = !whyPinned;
    button.setAttribute("aria-pressed", String(whyPinned));
    showWhy(whyPinned);
  });
  $("viewer-heat").addEventListener("load", () => {
    if (!$("viewer-heat").hidden) $("why-note").textContent = "Warmer: where the photo matches the query best.";
  });
  $("viewer-heat").addEventListener("error", () => { if ($("viewer-heat").getAttribute("src")) whyFailed(); });
}

function openViewer(hit) {
  viewerKey = hit.key;
  viewerHit = hit;
  resetWhy();
  $("viewer-less").hidden = !canSubtract();
  showDetails(hit.key);
  $("viewer-img").src = viewerUrl(hit.key);
  $("viewer-img").alt = hit.filename;
  $("viewer-caption").textContent = `#${hit.rank}  ${hit.filename}  ${scoreText(hit)} (${rawScores(hit)})`;
  $("viewer-open").href = imageUrl(hit.key);
  $("viewer").hidden = false;
  $("viewer-close").focus();
}

function closeViewer() {
  viewerKey = null;
  viewerHit = null;
  $("viewer").hidden = true;
  $("viewer-img").removeAttribute("src");
  resetWhy();
}

async function showStatus() {
  try {
    const h = await call("/health");
    const parts = [`${h.vector_count.toLocaleString()} images indexed`];
    if (h.with_date > 0) {
      for (const [field, what] of [["with_date", "a date"], ["with_place", "a place"]]) {
        if (typeof h[field] === "number") parts.push(`${h[field].toLocaleString()} with ${what}`);
      }
    }
    if (h.status !== "ok") parts.push("service degraded: " + (h.store || "no index"));
    $("status").textContent = parts.join(" \u00b7 ");
    if (h.api_key_required) $("key-box").hidden = false;
    serviceHasMetadata = typeof h.with_date === "number";
  } catch (e) {
    $("status").textContent = "The search service is not answering.";
  }
}

// ---- the photo's metadata, as text --------------------------------------------------------

// taken_at: unix seconds, or an ISO date-time (without a zone it is UTC, as the service says)
function takenDate(info) {
  const t = info && info.taken_at;
  let d = null;
  if (typeof t === "number") d = new Date(t * 1000);
  else if (typeof t === "string" && t) {
    d = new Date(/(z|[+-]\d\d:?\d\d)$/i.test(t) || t.length <= 10 ? t : t + "Z");
  }
  return d && !isNaN(d) ? d : null;
}

// Dates are shown in UTC, the clock the date filters use, so a photo shown as 31 July is kept
// by a filter that ends on 31 July.
function dateText(d) {
  return d.toLocaleDateString(undefined, {year: "numeric", month: "short", day: "numeric",
                                          timeZone: "UTC"});
}

function dateTimeText(d, source) {
  const text = d.toLocaleString(undefined, {year: "numeric", month: "long", day: "numeric",
                                            hour: "2-digit", minute: "2-digit", timeZone: "UTC"});
  if (source === "exif-no-offset") return text + " (the camera's clock, no time zone)";
  if (source === "modified") return text + " UTC (when the file was last changed)";
  return text + " UTC";
}

function words(value) {
  return typeof value === "string" && value.trim() ? value.trim() : null;
}

function placeText(info, withRegion) {
  if (!info) return null;
  if (words(info.place)) return words(info.place);
  const parts = [];
  for (const part of [info.city, withRegion ? info.region : null, info.country]) {
    const w = words(part);
    if (w && !parts.includes(w)) parts.push(w);
  }
  return parts.length ? parts.join(", ") : null;
}

function cameraText(info) {
  if (!info) return null;
  if (words(info.camera)) return words(info.camera);
  const make = words(info.camera_make), model = words(info.camera_model);
  if (make && model) {
    return model.toLowerCase().startsWith(make.toLowerCase()) ? model : make + " " + model;
  }
  return make || model;
}

// the date and place under a thumbnail (the camera in its title); null when there is neither
function infoLine(info) {
  if (!info || typeof info !== "object") return null;
  const taken = takenDate(info), place = placeText(info, false), camera = cameraText(info);
  if (!taken && !place) return null;
  const p = document.createElement("p");
  p.className = "meta";
  if (taken) {
    const time = document.createElement("time");
    time.className = "taken";
    time.dateTime = taken.toISOString().slice(0, 10);
    time.textContent = dateText(taken);
    p.append(time);
  }
  if (place) {
    const span = document.createElement("span");
    span.className = "place";
    span.textContent = place;
    p.append(span);
  }
  if (camera) p.title = camera;
  return p;
}

function sizeText(bytes) {
  const units = ["bytes", "KB", "MB", "GB"];
  let n = bytes, i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

// [label, text, field] rows of the details panel, for what the metadata has
function detailRows(key, info) {
  const rows = [["Name", key, "key"]];
  const taken = takenDate(info);
  if (taken) rows.push(["Taken", dateTimeText(taken, info.taken_at_source), "taken_at"]);
  const place = placeText(info, true);
  if (place) rows.push(["Place", place, "place"]);
  if (Number.isFinite(info.lat) && Number.isFinite(info.lon)) {
    rows.push(["Position", `${info.lat.toFixed(5)}, ${info.lon.toFixed(5)}`, "position"]);
  }
  const camera = cameraText(info);
  if (camera) rows.push(["Camera", camera, "camera"]);
  if (Number.isInteger(info.width) && Number.isInteger(info.height)) {
    const shape = info.width > info.height ? "landscape"
      : info.width < info.height ? "portrait" : "square";
    rows.push(["Size", `${info.width} \u00d7 ${info.height} pixels, ${shape}`, "size"]);
  }
  const file = [];
  if (Number.isInteger(info.bytes)) file.push(sizeText(info.bytes));
  if (words(info.content_type)) file.push(info.content_type);
  if (file.length) rows.push(["File", file.join(", "), "file"]);
  if (typeof info.folder === "string") {
    rows.push(["Folder", info.folder || "(top level)", "folder"]);
  }
  return rows;
}

// the details panel of the viewer, from GET /images/{key}/info; hidden when the service has none
async function showDetails(key) {
  $("details").hidden = true;
  $("details-list").replaceChildren();
  if (!indexHasMetadata) return;
  let body;
  try {
    body = await call(imageUrl(key) + "/info");
  } catch (e) {
    return;  // an older service, or a key it does not have
  }
  if (viewerKey !== key || !body || typeof body !== "object") return;
  const info = body.info && typeof body.info === "object" ? body.info : body;
  const rows = detailRows(key, info);
  if (rows.length < 2) return;  // nothing stored but the name
  for (const [label, text, field] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.dataset.field = field;
    dd.textContent = text;
    $("details-list").append(dt, dd);
  }
  $("details").hidden = false;
}

// ---- the filter bar -------------------------------------------------------------------------

// the page's address names filters as GET /search does; `before` is the day after the last one
const FILTER_PARAMS = ["folder", "after", "before", "camera", "country", "region", "city"];
const PLACE_FIELDS = ["country", "region", "city"];

function shiftDay(day, by) {
  const d = new Date(day + "T00:00:00Z");
  if (isNaN(d)) return null;
  d.setUTCDate(d.getUTCDate() + by);
  return d.toISOString().slice(0, 10);
}

// a <select>'s option for `value`, added when the facets did not list it (an address, a chip)
function ensureOption(select, value, text) {
  let option = Array.from(select.options).find((o) => o.value === value);
  if (!option) {
    option = new Option(text, value);
    select.append(option);
  }
  return option;
}

function setPlace(field, value) {
  const select = $("f-place");
  if (!value) { select.value = ""; return; }
  ensureOption(select, field + ":" + value, value).selected = true;
}

// The bar's choices as a PhotoFilter (only the fields that are set); nothing while it is hidden.
function barFilters() {
  const f = {};
  if ($("filter-box").hidden) return f;
  if ($("f-after").value) f.taken_after = $("f-after").value + "T00:00:00";
  const before = $("f-before").value && shiftDay($("f-before").value, 1);
  if (before) f.taken_before = before + "T00:00:00";
  const place = $("f-place").value;
  if (place) {
    const i = place.indexOf(":");
    f[place.slice(0, i)] = place.slice(i + 1);
  }
  if ($("f-folder").value) f.folders = [$("f-folder").value];
  if ($("f-camera").value) f.camera = $("f-camera").value;
  return f;
}

// what a search sends: the bar, plus the chips the page keeps once the service reads no more
function requestFilters() {
  const f = barFilters();
  if (current && current.kind === "text" && !current.parseHints) {
    for (const chip of current.chips) {
      for (const [field, value] of Object.entries(chip.filters)) {
        if (!(field in f)) f[field] = value;
      }
    }
  }
  return f;
}

function filterParams(f) {
  const out = {};
  if (f.taken_after) out.after = String(f.taken_after).slice(0, 10);
  if (f.taken_before) out.before = String(f.taken_before).slice(0, 10);
  if (Array.isArray(f.folders) && f.folders.length) out.folder = f.folders[0];
  for (const field of ["camera", ...PLACE_FIELDS]) if (f[field]) out[field] = f[field];
  return out;
}

// the address says what is searched, so a search can be shared and reloaded as it is
function syncUrl() {
  const url = new URL(location.href);
  for (const name of [...FILTER_PARAMS, "parse_hints", "dedupe", "view"]) {
    url.searchParams.delete(name);
  }
  if ($("dedupe").checked) url.searchParams.set("dedupe", "true");
  if (!$("dup-view").hidden) url.searchParams.set("view", "duplicates");
  url.searchParams.delete("q");
  // photo terms stay out of the address; the text stays while it is still searched
  const text = current && current.kind === "text" && current.query &&
    (!current.terms || current.terms.positive.some((t) => t.text === current.query));
  if (text) {
    url.searchParams.set("q", current.query);
    if (!current.parseHints) url.searchParams.set("parse_hints", "false");
  }
  for (const [name, value] of Object.entries(filterParams(requestFilters()))) {
    url.searchParams.set(name, value);
  }
  history.replaceState(null, "", url);
}

function filtersFromAddress() {
  const day = (v) => (/^\d{4}-\d{2}-\d{2}$/.test(v || "") ? v : "");
  $("f-after").value = day(params.get("after"));
  const before = day(params.get("before"));
  $("f-before").value = before ? shiftDay(before, -1) : "";
  const folder = params.get("folder");
  if (folder) ensureOption($("f-folder"), folder, folder).selected = true;
  const camera = params.get("camera");
  if (camera) ensureOption($("f-camera"), camera, camera).selected = true;
  const field = PLACE_FIELDS.find((name) => params.get(name));
  if (field) setPlace(field, params.get(field));
  yearFromDates();
}

// the year menu follows the dates: a whole year shows as that year, other dates as "Custom"
function yearFromDates() {
  const after = $("f-after").value, to = $("f-before").value;
  const year = after.slice(0, 4);
  if (!after && !to) $("f-year").value = "";
  else if (after === year + "-01-01" && to === year + "-12-31") {
    ensureOption($("f-year"), year, year).selected = true;
  } else ensureOption($("f-year"), "custom", "Custom dates").selected = true;
  const set = Object.keys(barFilters())  // a date range counts once
    .filter((field) => field !== "taken_before" || !$("f-after").value).length;
  $("f-clear").hidden = set === 0;
  $("filter-count").textContent = set ? `(${set} set)` : "";
}

function fillSelect(select, groups) {
  const chosen = select.value;
  const first = select.options[0];
  select.replaceChildren(first);
  for (const [label, field, counts] of groups) {
    if (!counts.length) continue;
    const parent = label ? document.createElement("optgroup") : select;
    if (label) parent.label = label;
    for (const [value, count] of counts) {
      parent.append(new Option(`${value} (${Number(count).toLocaleString()})`,
                               field ? field + ":" + value : value));
    }
    if (label) select.append(parent);
  }
  if (chosen) {
    const i = chosen.indexOf(":");
    const text = select.id === "f-place" ? chosen.slice(i + 1) : chosen;
    ensureOption(select, chosen, text).selected = true;
  }
}

// GET /facets: the bar's choices with how many photos have each; the bar stays hidden when the
// service has no facets (an index made before photos had metadata) or nothing to offer
async function loadFacets() {
  let facets;
  try {
    facets = await call("/facets");
  } catch (e) {
    return;
  }
  const list = (name) => (facets && Array.isArray(facets[name]) ? facets[name] : [])
    .filter((pair) => Array.isArray(pair) && pair[0] !== null && String(pair[0]) !== "")
    .map(([value, count]) => [String(value), count]);  // years are numbers
  const years = list("year"), countries = list("country"), regions = list("region");
  const cities = list("city"), folders = list("folder"), cameras = list("camera");
  fillSelect($("f-year"), [[null, null, years]]);
  fillSelect($("f-place"), [["Countries", "country", countries], ["Regions", "region", regions],
                            ["Cities", "city", cities]]);
  fillSelect($("f-folder"), [[null, null, folders]]);
  fillSelect($("f-camera"), [[null, null, cameras]]);
  indexHasMetadata = [years, countries, regions, cities, folders, cameras].some((l) => l.length);
  $("filter-box").hidden = !indexHasMetadata;
  yearFromDates();
  // open where there is room, or when filters are set; on a phone it starts folded
  $("filter-box").open = !matchMedia("(max-width: 600px)").matches || !$("f-clear").hidden;
}

function initFilterBar() {
  filtersFromAddress();
  $("f-year").addEventListener("change", () => {
    const year = $("f-year").value;
    if (year === "custom") return;
    $("f-after").value = year ? year + "-01-01" : "";
    $("f-before").value = year ? year + "-12-31" : "";
    yearFromDates();
    rerun();
  });
  for (const id of ["f-after", "f-before"]) {
    $(id).addEventListener("change", () => {
      // the pickers offer no end before the start
      $("f-before").min = $("f-after").value;
      $("f-after").max = $("f-before").value;
      yearFromDates();
      rerun();
    });
  }
  for (const id of ["f-place", "f-folder", "f-camera"]) {
    $(id).addEventListener("change", () => { yearFromDates(); rerun(); });
  }
  $("f-clear").addEventListener("click", () => {
    for (const id of ["f-year", "f-after", "f-before", "f-place", "f-folder", "f-camera"]) {
      $(id).value = "";
    }
    yearFromDates();
    $("q").focus();
    rerun();
  });
  $("filter-bar").addEventListener("submit", (e) => e.preventDefault());
}

// ---- filters read from the query, as chips ---------------------------------------------------

// the PhotoFilter fields a hint stands for (its field may name a group: a date, a place)
const TAKEN = ["taken_after", "taken_before"];
const HINT_GROUPS = {taken: TAKEN, date: TAKEN, taken_at: TAKEN, place: [...PLACE_FIELDS, "near"],
                     folder: ["folders"]};

function hintFields(hint) {
  return Object.hasOwn(HINT_GROUPS, hint.field) ? HINT_GROUPS[hint.field] : [String(hint.field)];
}

// One chip per piece of the query (a month gives both ends of a range: one chip), with the
// filter values the service applied for it (its `filters`, in PhotoFilter's own fields), so the
// page can send them itself later.
function chipsFrom(hints, applied) {
  const chips = new Map();
  const known = applied && typeof applied === "object" ? applied : {};
  for (const hint of Array.isArray(hints) ? hints : []) {
    if (!hint || typeof hint !== "object") continue;
    const label = String(hint.text || hint.value || hint.field);
    const chip = chips.get(label) || {label: label, kind: "filter", filters: {}};
    for (const field of hintFields(hint)) {
      const value = Object.hasOwn(known, field) ? known[field] : null;
      if (value === undefined || value === null) continue;
      chip.filters[field] = value;
      if (field.startsWith("taken_")) chip.kind = "date";
      else if (PLACE_FIELDS.includes(field) || field === "near") chip.kind = "place";
    }
    chips.set(label, chip);
  }
  return [...chips.values()];
}

function chipTitle(chip) {
  return Object.entries(chip.filters)
    .map(([field, value]) => `${field} = ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
}

function showChips() {
  const chips = current && current.kind === "text" ? current.chips : [];
  $("chips").replaceChildren();
  chips.forEach((chip, i) => {
    const li = document.createElement("li");
    li.className = "chip";
    li.dataset.kind = chip.kind;
    li.title = chipTitle(chip);
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = chip.kind + ":";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = chip.label;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Remove the ${chip.kind} filter \u201c${chip.label}\u201d`);
    remove.addEventListener("click", () => removeChip(i));
    li.append(kind, label, remove);
    $("chips").append(li);
  });
  $("chips-row").hidden = chips.length === 0;
}

// The words of a removed chip go back to being words: the service reads no more hints and the
// page sends the other chips' filters itself.
function removeChip(i) {
  if (!current || current.kind !== "text") return;
  current.chips.splice(i, 1);
  current.parseHints = false;
  showChips();
  // the keyboard stays among the chips (or goes back to the query when none is left)
  const left = $("chips").querySelectorAll(".remove");
  (left[Math.min(i, left.length - 1)] || $("q")).focus();
  rerun();
}

// ---- the query's terms: more like this, less like this -------------------------------------

// a negative term needs a positive one beside it: an uploaded image is no term, so a search by
// image offers only "more like this" (which starts a search from that photo)
function canSubtract() {
  return Boolean(current && current.kind === "text");
}

function feedbackButtons(hit) {
  const row = document.createElement("div");
  row.className = "feedback";
  const buttons = [["more", false, "More like this", "Search again, more like"],
                   ["less", true, "Less like this", "Search again, less like"]];
  for (const [cls, negative, text, what] of buttons) {
    if (negative && !canSubtract()) continue;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary " + cls;
    b.textContent = text;
    b.setAttribute("aria-label", `${what} ${hit.filename}`);
    b.title = `${what} this photo`;
    b.addEventListener("click", () => addPhotoTerm(hit.key, negative));
    row.append(b);
  }
  return row;
}

// the terms searched now: those the page sends, else those the service read from the text
function currentTerms() {
  if (!current || current.kind !== "text") return null;
  return current.terms || current.read;
}

function copyTerms(terms) {
  const term = (t) => (t.key !== undefined && t.key !== null
    ? {key: String(t.key), weight: t.weight ?? 1} : {text: String(t.text), weight: t.weight ?? 1});
  return {positive: (terms.positive || []).map(term), negative: (terms.negative || []).map(term)};
}

// The photo as a positive (more like it) or negative (less like it) term of the query; the
// same photo on the other side moves over. Rocchio-style: the service sums the terms.
function addPhotoTerm(key, negative) {
  let terms;
  if (current && current.kind === "text") {
    terms = copyTerms(currentTerms() || {positive: current.query ? [{text: current.query}] : []});
  } else {  // from an uploaded image's results, or nothing: a search from this photo
    if (negative) return;
    current = {kind: "text", query: "", parseHints: true, chips: [], read: null, terms: null};
    $("query-image").hidden = true;
    terms = {positive: [], negative: []};
    showChips();
  }
  const other = (t) => t.key !== key;
  terms.positive = terms.positive.filter(other);
  terms.negative = terms.negative.filter(other);
  (negative ? terms.negative : terms.positive).push({key: key, weight: 1});
  current.terms = terms;
  showTerms();
  rerun();
}

function termLabel(term) {
  return term.key !== undefined ? term.key.split("/").pop() : term.text;
}

// The terms as chips, + or -, each removable; shown when there is more than one typed text.
function showTerms() {
  const terms = currentTerms();
  const list = terms ? [...terms.positive.map((t) => [t, false]),
                        ...terms.negative.map((t) => [t, true])] : [];
  const shown = list.length > 1 || list.some(([t]) => t.key !== undefined);
  $("terms").replaceChildren();
  if (shown) list.forEach(([term, negative], i) => {
    const photo = term.key !== undefined && term.key !== null;
    const li = document.createElement("li");
    li.className = "chip term";
    li.dataset.sign = negative ? "negative" : "positive";
    li.dataset.kind = photo ? "photo" : "text";
    if (photo) li.dataset.key = term.key;
    li.title = (negative ? "less like " : "like ") + (photo ? term.key : `\u201c${term.text}\u201d`) +
      (term.weight && term.weight !== 1 ? ` (weight ${term.weight})` : "");
    const sign = document.createElement("span");
    sign.className = "sign";
    sign.textContent = negative ? "\u2212" : "+";
    sign.setAttribute("aria-label", negative ? "less like" : "like");
    li.append(sign);
    if (photo) {
      const img = document.createElement("img");
      img.alt = "";
      img.src = imageUrl(term.key, THUMB);
      li.append(img);
    }
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = termLabel(term);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Remove \u201c${termLabel(term)}\u201d from the search`);
    remove.addEventListener("click", () => removeTerm(i));
    li.append(label, remove);
    $("terms").append(li);
  });
  $("terms-row").hidden = !shown;
}

// Without the term the search runs again; with no positive term left there is nothing to search.
function removeTerm(i) {
  const terms = currentTerms();
  if (!terms) return;
  const next = copyTerms(terms);
  const positives = next.positive.length;
  if (i < positives) next.positive.splice(i, 1);
  else next.negative.splice(i - positives, 1);
  if (!next.positive.length) {
    clearSearch();
    $("q").focus();
    return;
  }
  current.terms = next;
  showTerms();
  const left = $("terms").querySelectorAll(".remove");
  (left[Math.min(i, left.length - 1)] || $("q")).focus();
  rerun();
}

function clearSearch() {
  current = null;
  offset = 0;
  showChips();
  showTerms();
  $("results").replaceChildren();
  $("more").hidden = true;
  $("summary").textContent = "";
  $("empty-hint").hidden = false;
  syncUrl();
}

// ---- the Duplicates view: GET /duplicates, groups side by side ---------------------------------

const GROUPS_PAGE = Math.min(PAGE, 10);  // groups per page (?per_page= lowers it)
let groupsOffset = 0;
let groupsBusy = false;

function showDuplicates(on) {
  $("dup-view").hidden = !on;
  $("search-view").hidden = on;
  $("dup-btn").setAttribute("aria-pressed", String(on));
  if (on) {
    closeViewer();
    groupsOffset = 0;
    $("dup-groups").replaceChildren();
    loadGroups();
  }
  syncUrl();
}

function pixels(photo) {
  return Number.isInteger(photo.width) && Number.isInteger(photo.height)
    ? photo.width * photo.height : -1;
}

function dupPhoto(photo, largest) {
  const li = document.createElement("li");
  li.className = "dup-photo";
  li.dataset.key = String(photo.key);
  const name = String(photo.key).split("/").pop();
  const a = document.createElement("a");
  a.className = "thumb";
  a.href = imageUrl(String(photo.key));
  a.target = "_blank";
  a.rel = "noopener";
  a.title = photo.key + " (opens the original)";
  const img = document.createElement("img");
  img.decoding = "async";
  img.alt = name;
  img.src = imageUrl(String(photo.key), THUMB);
  img.addEventListener("error", () => li.classList.add("broken"));
  a.append(img);
  const label = document.createElement("p");
  label.className = "name";
  label.textContent = name;
  const size = document.createElement("p");
  size.className = "size";
  size.textContent = pixels(photo) >= 0
    ? `${photo.width} × ${photo.height}` : "size unknown";
  if (largest) {
    li.classList.add("largest");
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "largest";
    size.append(" ", badge);
  }
  const date = document.createElement("p");
  date.className = "date";
  const taken = takenDate(photo);
  if (taken) {
    const time = document.createElement("time");
    time.dateTime = taken.toISOString();
    time.textContent = dateText(taken);
    date.append(time);
  } else date.textContent = "no date";
  li.append(a, label, size, date);
  return li;
}

function dupGroup(group) {
  const li = document.createElement("li");
  li.className = "dup-group";
  li.dataset.size = String(group.size);
  const head = document.createElement("p");
  head.className = "dup-head";
  const shown = Array.isArray(group.photos) ? group.photos : [];
  head.textContent = `${group.size} photos` +
    (shown.length < group.size ? ` (${shown.length} shown)` : "") +
    (typeof group.similarity === "number"
      ? ` · similarity at least ${group.similarity.toFixed(2)}` : "");
  const most = Math.max(...shown.map(pixels));
  const largest = shown.filter((p) => pixels(p) === most).length === 1 && most > 0;
  const list = document.createElement("ul");
  list.className = "dup-photos";
  for (const photo of shown) list.append(dupPhoto(photo, largest && pixels(photo) === most));
  li.append(head, list);
  return li;
}

async function loadGroups() {
  if (groupsBusy) return;
  groupsBusy = true;
  $("dup-more").disabled = true;
  try {
    const data = await call(`/duplicates?offset=${groupsOffset}&limit=${GROUPS_PAGE}`);
    if ($("dup-view").hidden) return;
    const groups = Array.isArray(data.groups) ? data.groups : [];
    groups.forEach((g) => $("dup-groups").append(dupGroup(g)));
    groupsOffset += groups.length;
    $("dup-more").hidden = groupsOffset >= data.total_groups || !groups.length;
    $("dup-summary").textContent = data.total_groups
      ? `${data.total_photos.toLocaleString()} photos in ${data.total_groups.toLocaleString()} ` +
        `groups of near duplicates; showing ${groupsOffset.toLocaleString()} groups, largest ` +
        "first. Nothing is deleted here: keep what you like."
      : "No near duplicates were found.";
  } catch (e) {
    $("dup-more").hidden = true;
    $("dup-summary").textContent = "No duplicates to show: " + e.message;
  } finally {
    groupsBusy = false;
    $("dup-more").disabled = false;
  }
}

async function init() {
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchText($("q").value);
  });
  $("file").addEventListener("change", (e) => {
    searchImage(e.target.files[0]);
    e.target.value = "";
  });
  $("more").addEventListener("click", () => runSearch(true));
  $("dedupe").checked = params.get("dedupe") === "true";
  $("dedupe").addEventListener("change", rerun);
  $("dup-btn").addEventListener("click", () => showDuplicates($("dup-view").hidden));
  $("dup-more").addEventListener("click", loadGroups);
  $("viewer-close").addEventListener("click", closeViewer);
  initWhy();
  for (const [id, negative] of [["viewer-more", false], ["viewer-less", true]]) {
    $(id).addEventListener("click", () => {
      const hit = viewerHit;
      closeViewer();
      if (hit) addPhotoTerm(hit.key, negative);
    });
  }
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

  initFilterBar();
  await showStatus();
  // before the first search: the bar may carry filters from the address
  if (serviceHasMetadata) await loadFacets();
  const q = params.get("q");
  if (params.get("view") === "duplicates") showDuplicates(true);
  else if (q) {
    $("q").value = q;
    searchText(q, params.get("parse_hints") !== "false");
  }
}

init();
