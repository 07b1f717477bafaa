// The page of `imagen-jax serve`: submits a job, follows its events, shows the results.
// Events are read with fetch (not EventSource) so that an API key can go in a header.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, job: null, abort: null, key: localStorage.getItem("imagen_jax_key") || "" };

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function call(path, options) {
  const response = await fetch(path, options);
  if (response.status === 401) {
    $("keyrow").classList.remove("hidden");
    throw new Error("this server needs an API key");
  }
  return response;
}

async function loadInfo() {
  try {
    const response = await call("/v1/info", { headers: headers(false) });
    if (!response.ok) throw new Error((await response.json()).error.message);
    state.info = await response.json();
  } catch (e) {
    say(e.message, true);
    setTimeout(loadInfo, 2000);
    return;
  }
  const info = state.info;
  $("cascade").textContent = info.stages.map((s) => `${s.stage} ${s.image_size}px`).join(" \u2192 ");
  $("n").max = info.limits.max_n;
  const body = $("stages").querySelector("tbody");
  body.replaceChildren();
  info.stages.forEach((stage, k) => {
    const row = document.createElement("tr");
    const cell = (child) => { const td = document.createElement("td"); td.append(child); row.append(td); };
    cell(`${k + 1}: ${stage.stage} ${stage.image_size}px`);
    const sampler = document.createElement("select");
    sampler.id = `sampler-${k}`;
    for (const name of info.samplers) sampler.append(new Option(name, name, false, name === stage.defaults.sampler));
    cell(sampler);
    const steps = document.createElement("input");
    Object.assign(steps, { id: `steps-${k}`, type: "number", min: 1, max: info.limits.max_steps, value: stage.defaults.steps });
    cell(steps);
    const guidance = document.createElement("input");
    Object.assign(guidance, { id: `guidance-${k}`, type: "number", min: 0, step: 0.5, value: stage.defaults.guidance });
    cell(guidance);
    body.append(row);
  });
  pollReady();
}

async function pollReady() {
  let ready = false;
  try {
    const response = await fetch("/readyz");
    const body = await response.json();
    ready = body.ready;
    $("status").textContent = ready ? "ready" : body.reason;
    $("status").className = "status" + (ready ? " ready" : "");
  } catch (e) {
    $("status").textContent = "unreachable";
    $("status").className = "status down";
  }
  setTimeout(pollReady, ready ? 5000 : 1000);
}

function request() {
  const stages = state.info.stages.map((_, k) => k);
  const body = {
    prompt: $("prompt").value,
    n: Number($("n").value) || 1,
    response_format: "b64_json",
    wait: false,
    sampler: stages.map((k) => $(`sampler-${k}`).value),
    steps: stages.map((k) => Number($(`steps-${k}`).value)),
    guidance_scale: stages.map((k) => Number($(`guidance-${k}`).value)),
  };
  if ($("negative").value) body.negative_prompt = $("negative").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (!state.info) return;
  state.key = $("apikey").value || state.key;
  if ($("apikey").value) localStorage.setItem("imagen_jax_key", state.key);
  const body = request();
  say("queued");
  $("generate").disabled = true;
  try {
    const response = await call("/v1/images/generations", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    const job = await response.json();
    if (!response.ok) throw new Error(job.error.message);
    state.job = job;
    $("cancel").disabled = false;
    showProgress(job);
    await follow(job);
  } catch (e) {
    if (e.name !== "AbortError") say(e.message, true);
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
    state.job = null;
  }
}

function showProgress(job) {
  $("progress").classList.remove("hidden");
  $("preview").removeAttribute("src");
  const bars = $("bars");
  bars.replaceChildren();
  job.settings.forEach((s, k) => {
    const bar = document.createElement("progress");
    Object.assign(bar, { id: `bar-${k}`, max: s.steps, value: 0 });
    bars.append(bar);
  });
  document.body.dataset.progressEvents = "0";
  $("progress-text").textContent = "waiting for a batch";
}

async function follow(job) {
  state.abort = new AbortController();
  const response = await call(`/v1/jobs/${job.id}/events`, { headers: headers(false), signal: state.abort.signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(name, JSON.parse(data));
    }
  }
}

function handle(name, data) {
  if (name === "started") {
    $("progress-text").textContent = "sampling";
  } else if (name === "progress") {
    const bar = $(`bar-${data.stage - 1}`);
    if (bar) { bar.max = data.steps; bar.value = data.step; }
    for (let k = 0; k < data.stage - 1; k++) { const b = $(`bar-${k}`); if (b) b.value = b.max; }
    $("progress-text").textContent = `stage ${data.stage}/${data.stages}, step ${data.step}/${data.steps}` +
      `, ${data.images_done}/${data.n} images done`;
    document.body.dataset.progressEvents = String(Number(document.body.dataset.progressEvents || 0) + 1);
  } else if (name === "preview") {
    $("preview").src = "data:image/png;base64," + data.b64_json;
  } else if (name === "done") {
    say(`done: ${data.n} image${data.n > 1 ? "s" : ""}`);
    $("progress-text").textContent = "done";
    addResult(data);
  } else if (name === "error") {
    say(data.error ? data.error.message : "the job failed", true);
  } else if (name === "cancelled") {
    say("cancelled");
    $("progress-text").textContent = "cancelled";
  }
}

function addResult(job) {
  const card = document.createElement("div");
  card.className = "result";
  const images = document.createElement("div");
  images.className = "images";
  for (const item of job.data) {
    const img = document.createElement("img");
    img.src = item.url || "data:image/png;base64," + item.b64_json;
    img.alt = job.prompt;
    images.append(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const settings = job.settings.map((s, k) => `stage ${k + 1}: ${s.sampler} ${s.steps} steps, guidance ${s.guidance}`);
  meta.textContent = [`"${job.prompt}"` + (job.negative_prompt ? ` (not "${job.negative_prompt}")` : ""),
    `seed ${job.seed}`, ...settings].join("\n");
  card.append(images, meta);
  $("gallery").prepend(card);
}

async function cancel() {
  if (!state.job) return;
  await call(`/v1/jobs/${state.job.id}`, { method: "DELETE", headers: headers(false) });
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  if (state.key) $("apikey").value = state.key;
  loadInfo();
});
