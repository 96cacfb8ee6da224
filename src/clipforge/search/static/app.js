// The search page: text queries, image uploads and "more like this", all through the JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const results = $("results");
const message = $("message");

function k() {
  const value = parseInt($("k").value, 10);
  return Number.isFinite(value) && value > 0 ? Math.min(value, 100) : 24;
}

function say(text, isError = false) {
  message.textContent = text;
  message.classList.toggle("error", isError);
}

// Any answer that is not 2xx carries {"error": "..."}: show it instead of results.
async function call(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`server answered ${response.status} without JSON`);
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `server answered ${response.status}`);
  }
  return body;
}

function render(hits, what) {
  results.replaceChildren();
  const template = $("card");
  for (const hit of hits) {
    const card = template.content.firstElementChild.cloneNode(true);
    const img = card.querySelector("img");
    img.src = hit.thumbnail;
    img.alt = hit.caption || hit.path;
    card.querySelector("a.open").href = hit.thumbnail;
    card.querySelector(".score").textContent = hit.score.toFixed(3);
    card.querySelector(".caption").textContent = hit.caption || hit.path.split("/").pop();
    card.title = hit.path;
    card.dataset.id = hit.id;
    card.querySelector(".more").addEventListener("click", () => similar(hit.id, hit.caption || hit.path));
    results.appendChild(card);
  }
  say(hits.length ? `${hits.length} results for ${what}` : `no results for ${what}`);
}

async function run(what, request) {
  say(`searching for ${what}…`);
  try {
    const body = await request();
    render(body.results, what);
  } catch (err) {
    results.replaceChildren();
    say(err.message, true);
  }
}

function searchText(query) {
  const url = `/search?q=${encodeURIComponent(query)}&k=${k()}`;
  return run(`“${query}”`, () => call(url));
}

function searchImage(file) {
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k()));
  return run(`image ${file.name}`, () => call("/search", { method: "POST", body: form }));
}

function similar(id, label) {
  return run(`items like “${label}”`, () => call(`/similar/${id}?k=${k()}`));
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (query) searchText(query);
});

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (file) searchImage(file);
});

const drop = $("image-form");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) searchImage(file);
});

call("/healthz")
  .then((health) => { $("status").textContent = `${health.vectors.toLocaleString()} items · ${health.index} index`; })
  .catch((err) => { $("status").textContent = `not ready: ${err.message}`; });
