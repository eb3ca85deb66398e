// The page's logic: fill the lists from the API, send txt2img / img2img requests, poll /progress for the bar and
// the live preview, show the results with their infotext, reuse a result's settings, and paint inpainting masks.
"use strict";

const $ = (id) => document.getElementById(id);
const api = async (path, body) => {  // a path of the web UI's API ("txt2img"), or a whole one ("/controlnet/...")
  const response = await fetch((path.startsWith("/") ? "" : "/sdapi/v1/") + path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || response.statusText);
  return answer;
};
let mode = "txt2img";

async function fillLists() {
  const [samplers, schedulers, models, options, latentModes, upscalers] = await Promise.all(
    ["samplers", "schedulers", "sd-models", "options", "latent-upscale-modes", "upscalers"].map((path) => api(path)));
  for (const u of [...latentModes, ...upscalers]) $("hr_upscaler").add(new Option(u.name, u.name));
  for (const u of upscalers) $("upscaler_1").add(new Option(u.name, u.name, false, u.name === "Lanczos"));
  const xyz = (await api("script-info")).find((s) => s.name === "x/y/z plot" && !s.is_img2img);
  xyz.args[0].choices.forEach((label, index) => {  // (an axis by its index in the web UI's list)
    if (label === null) return;
    $("xyz_x_type").add(new Option(label, index, false, label === "Steps"));
    $("xyz_y_type").add(new Option(label, index, false, label === "Nothing"));
  });
  for (const s of samplers) $("sampler_name").add(new Option(s.name, s.name, false, s.name === "DPM++ 2M"));
  for (const s of schedulers) $("scheduler").add(new Option(s.label, s.name));
  for (const m of models) {
    $("checkpoint").add(new Option(m.title, m.title, false, m.title === options.sd_model_checkpoint));
  }
}

$("checkpoint").addEventListener("change", async (event) => {
  showError("");
  try { await api("options", { sd_model_checkpoint: event.target.value }); } catch (e) { showError(e.message); }
});

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    mode = tab.dataset.mode;
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    $("image-fields").hidden = mode !== "img2img";
    $("hires-fields").hidden = mode !== "txt2img";  // (the web UI's hires fix is txt2img's)
    $("xyz-fields").hidden = mode !== "txt2img";
    $("generation-fields").hidden = mode === "extras";
    $("extras-fields").hidden = mode !== "extras";
  });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The request: empty number fields are left out, so the server's (the model's) defaults apply; the hires fix's
// fields where it is ticked.
function request() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
                 sampler_name: $("sampler_name").value, scheduler: $("scheduler").value };
  for (const name of ["width", "height", "steps", "cfg_scale", "seed", "batch_size"]) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  if (mode === "txt2img" && $("enable_hr").checked) {
    Object.assign(body, { enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: Number($("hr_scale").value),
                          hr_second_pass_steps: Number($("hr_second_pass_steps").value),
                          denoising_strength: Number($("hr_denoising_strength").value) });
  }
  if (mode === "txt2img" && $("xyz_enable").checked) {  // the grid comes back as the one image
    body.script_name = "X/Y/Z plot";
    body.script_args = [Number($("xyz_x_type").value), $("xyz_x_values").value, [],
                        Number($("xyz_y_type").value), $("xyz_y_values").value, [], 0, "", [], true, false];
  }
  if (mode === "img2img") {
    if (!$("init-canvas").width) throw new Error("choose an init image");
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = Number($("denoising_strength").value);
    if (maskPainted) Object.assign(body, { mask: maskImage(), inpaint_full_res: false });  // whole picture
  }
  const scripts = controlnetScripts();  // (controlnet.js)
  if (scripts) body.alwayson_scripts = scripts;
  return body;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  if (mode === "extras") return upscaleImage();
  let body;
  try { body = request(); } catch (e) { return showError(e.message); }
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").hidden = false;
  let generating = true;
  const poll = async () => {  // the next poll only after the last answer: previews can take a while
    try { await pollProgress(); } catch (e) { /* the next poll tries again */ }
    if (generating) setTimeout(poll, 500);
  };
  setTimeout(poll, 500);
  try {
    const answer = await api(mode, body);
    const info = JSON.parse(answer.info);
    answer.images.forEach((image, i) => {  // the ControlNet detected maps come after the images, without infotext
      if (i < info.infotexts.length) addResult(image, info, i);
      else addFigure(image, "ControlNet detected map", "ControlNet detected map");
    });
  } catch (e) {
    showError(e.message);
  } finally {
    generating = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("progress").hidden = true;
    $("preview").removeAttribute("src");
  }
});

// An image's infotext (its `parameters` text, read by /png-info) into the form, as the web UI's "Send to txt2img".
$("pnginfo-file").addEventListener("change", async () => {
  const file = $("pnginfo-file").files[0];
  if (!file) return;
  showError("");
  try {
    const { parameters: p } = await api("png-info", { image: await dataUrl(file) });
    await listsFilled;
    if (!p.Prompt && !p.Steps) throw new Error(`${file.name} holds no infotext`);
    const fields = { prompt: p.Prompt, negative_prompt: p["Negative prompt"], steps: p.Steps, seed: p.Seed,
                     cfg_scale: p["CFG scale"], width: p["Size-1"], height: p["Size-2"] };
    for (const [name, value] of Object.entries(fields)) if (value !== undefined) $(name).value = value;
    selectByText("sampler_name", p.Sampler);
    selectByText("scheduler", p["Schedule type"]);
    $("enable_hr").checked = p["Hires upscale"] !== undefined;
    if (p["Hires upscale"] !== undefined) $("hr_scale").value = p["Hires upscale"];
    if (p["Hires steps"] !== undefined) $("hr_second_pass_steps").value = p["Hires steps"];
    if (p["Hires upscaler"] !== undefined) selectByText("hr_upscaler", p["Hires upscaler"]);
    if (p["Denoising strength"] !== undefined) {
      $(p["Hires upscale"] !== undefined ? "hr_denoising_strength" : "denoising_strength").value = p["Denoising strength"];
    }
  } catch (e) {
    showError(e.message);
  }
});

function selectByText(id, text) {
  const option = [...$(id).options].find((o) => o.text === text);
  if (option) $(id).value = option.value;
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the file"));
    reader.readAsDataURL(file);
  });
}

// The extras tab: the chosen file upscaled as the web UI's extras tab does, shown with its "Postprocess" fields.
async function upscaleImage() {
  const file = $("extras-file").files[0];
  if (!file) return showError("choose an image");
  $("generate").disabled = true;
  try {
    const image = await dataUrl(file);
    const answer = await api("extra-single-image", { image, upscaler_1: $("upscaler_1").value,
                                                     upscaling_resize: Number($("upscaling_resize").value) });
    const caption = new DOMParser().parseFromString(answer.html_info, "text/html").body.textContent;
    addFigure(answer.image, file.name, caption);
  } catch (e) {
    showError(e.message);
  } finally {
    $("generate").disabled = false;
  }
}

$("interrupt").addEventListener("click", () => api("interrupt", {}));

async function pollProgress() {
  const p = await api("progress");
  $("progress-bar").value = p.progress;
  $("progress-text").textContent = p.state.sampling_steps
    ? `step ${p.state.sampling_step} of ${p.state.sampling_steps}, ${p.eta_relative.toFixed(1)} s left` : "waiting";
  if (p.current_image) $("preview").src = "data:image/png;base64," + p.current_image;
}

function addFigure(image, alt, text) {
  const figure = document.createElement("figure");
  const img = new Image();
  img.src = "data:image/png;base64," + image;
  img.alt = alt;
  const caption = document.createElement("figcaption");
  caption.textContent = text;
  figure.append(img, caption);
  $("gallery").prepend(figure);
  return figure;
}

function addResult(image, info, i) {
  const figure = addFigure(image, info.all_prompts[i], info.infotexts[i]);
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Reuse settings";
  reuse.addEventListener("click", () => {
    const values = { prompt: info.prompt, negative_prompt: info.negative_prompt, seed: info.all_seeds[i],
                     steps: info.steps, cfg_scale: info.cfg_scale, width: info.width, height: info.height,
                     sampler_name: info.sampler_name, scheduler: info.scheduler };
    for (const [name, value] of Object.entries(values)) $(name).value = value;
    $("batch_size").value = 1;
  });
  figure.append(reuse);
}

// img2img: the init image on one canvas, the mask painted in white on a transparent canvas above it.
let maskPainted = false;
$("init-file").addEventListener("change", () => {
  const file = $("init-file").files[0];
  if (!file) return;
  const img = new Image();
  img.onload = () => {
    for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(img, 0, 0);
    maskPainted = false;
    URL.revokeObjectURL(img.src);
  };
  img.src = URL.createObjectURL(file);
});

let lastPoint = null;  // where the stroke was at the previous pointer event
function paint(event) {
  if (!(event.buttons & 1)) { lastPoint = null; return; }
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const point = [(event.clientX - box.left) * scale, (event.clientY - box.top) * scale];
  const context = canvas.getContext("2d");
  context.strokeStyle = "white";
  context.lineCap = "round";
  context.lineWidth = Number($("brush").value) * scale;
  context.beginPath();
  context.moveTo(...(lastPoint || point));
  context.lineTo(...point);
  context.stroke();
  lastPoint = point;
  maskPainted = true;
}
$("mask-canvas").addEventListener("pointerdown", paint);
$("mask-canvas").addEventListener("pointermove", paint);
$("mask-canvas").addEventListener("pointerup", () => { lastPoint = null; });
$("clear-mask").addEventListener("click", () => {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
});

// The web UI's mask: white = repaint, black = keep, the init image's size.
function maskImage() {
  const canvas = document.createElement("canvas");
  canvas.width = $("mask-canvas").width;
  canvas.height = $("mask-canvas").height;
  const context = canvas.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage($("mask-canvas"), 0, 0);
  return canvas.toDataURL("image/png");
}

// (an infotext read before the lists are filled waits for them: its sampler and upscaler are picked from them)
const listsFilled = fillLists().catch((e) => showError("cannot reach the API: " + e.message));
