// The ControlNet panel: one unit of the web UI's ControlNet extension. Its lists come from the extension's API
// (/controlnet/module_list, /controlnet/model_list), "Preview the map" shows the preprocessor's map of the control
// image (/controlnet/detect), and the unit goes with txt2img and img2img as the extension's alwayson_scripts entry.
// Loaded after app.js, whose $, api, dataUrl and showError it uses.
"use strict";

let controlImage = null;  // the chosen control image, as a data URL
let controlMask = null;  // and its mask (white = repaint), the inpaint preprocessors'
const modelFree = new Set();  // the modules that take no model ("None"): reference and revision

async function fillControlNet() {
  const [modules, models] = await Promise.all([
    api("/controlnet/module_list?alias_names=true"), api("/controlnet/model_list")]);
  for (const label of modules.module_list) {  // (only those that can run here: `available` is this server's key)
    const detail = modules.module_detail[label];
    if (detail.available) $("cn_module").add(new Option(label, label));
    if (detail.model_free) modelFree.add(label);
  }
  for (const name of models.model_list) $("cn_model").add(new Option(name, name));
}

$("cn_enable").addEventListener("change", () => { $("cn-unit").hidden = !$("cn_enable").checked; });

$("cn-file").addEventListener("change", async () => {
  const file = $("cn-file").files[0];
  controlImage = file ? await dataUrl(file) : null;
  $("cn-preview").removeAttribute("src");
});

$("cn-mask-file").addEventListener("change", async () => {
  const file = $("cn-mask-file").files[0];
  controlMask = file ? await dataUrl(file) : null;
  $("cn-preview").removeAttribute("src");
});

$("cn-preview-button").addEventListener("click", async () => {
  showError("");
  if (!controlImage) return showError("ControlNet: choose a control image");
  try {
    const body = { controlnet_module: $("cn_module").value, controlnet_input_images: [controlImage] };
    if (controlMask) body.controlnet_masks = [controlMask];
    const answer = await api("/controlnet/detect", body);
    $("cn-preview").src = "data:image/png;base64," + answer.images[0];
  } catch (e) {
    showError(e.message);
  }
});

// The request's alwayson_scripts with the unit, where the panel is ticked (else undefined). In img2img a unit
// without its own image takes the init image, as the extension does.
function controlnetScripts() {
  if (!$("cn_enable").checked) return undefined;
  const free = modelFree.has($("cn_module").value);
  if (!free && !$("cn_model").value) {
    throw new Error("ControlNet: no control model here (ldm serve --controlnet-dir)");
  }
  if (!controlImage && mode !== "img2img") throw new Error("ControlNet: choose a control image");
  const unit = { enabled: true, module: $("cn_module").value, model: free ? "None" : $("cn_model").value,
                 weight: Number($("cn_weight").value), guidance_start: Number($("cn_start").value),
                 guidance_end: Number($("cn_end").value), control_mode: $("cn_control_mode").value,
                 resize_mode: $("cn_resize_mode").value, pixel_perfect: $("cn_pixel_perfect").checked,
                 union_control_type: $("cn_union_type").value };
  if (controlImage) unit.image = controlImage;
  if (controlImage && controlMask) unit.mask = controlMask;
  return { ControlNet: { args: [unit] } };
}

fillControlNet().catch((e) => showError("cannot list the ControlNet models: " + e.message));
