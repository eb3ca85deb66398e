"""IP-Adapter: the CLIP image tower against transformers' `CLIPVisionModelWithProjection`; the U-Net with an
IP-Adapter (base, plus, full face; SD 1.x and SDXL) against diffusers' UNet2DConditionModel with the same file
loaded by its own `_load_ip_adapter_weights` (its converter and IPAdapterAttnProcessor2_0); txt2img with a unit
against diffusers' StableDiffusionPipeline, the image's embedding made by transformers from the extension's
preprocessing written with OpenCV and CLIPImageProcessor; webuiapi's unit through `ldm serve`; the refusals."""

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig
from transformers import CLIPVisionModelWithProjection as TransformersVision

from latent_diffusion import LatentDiffusion
from latent_diffusion.models.clip_vision import (
    VIT_BIGG,
    VIT_H,
    VIT_L,
    CLIPVisionModelWithProjection,
    VisionOutput,
    vision_config_of,
)
from latent_diffusion.models.config import preset
from latent_diffusion.models.ip_adapter import (
    IPAdapter,
    IPAdapterConfig,
    attention_blocks,
    cross_attentions,
    image_prompted,
    region_weights,
)
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.image_prompts import clip_pixels, tower_name
from latent_diffusion.pipeline.images import from_pil
from latent_diffusion.pipeline.loading import Pipeline, load_pipeline
from latent_diffusion.pipeline.plan import resolve
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError
from latent_diffusion.serving.server import create_app
from latent_diffusion.weights.ip_adapter import load_clip_vision, load_ip_adapter
from test_generate import NEGATIVE, PROMPT, SETTINGS, diffusers_pipeline, embeddings
from test_server import call, decode

from conftest import randomize, seeded, tiny_model
from test_reference import diffusers_unet
from test_sdxl import diffusers_xl_unet

EMBED = 48  # the width the tiny adapters take: a tower's projected embedding (base) or hidden states (plus, full)


def transformers_tower(act: str) -> TransformersVision:
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=16, image_size=56,
        patch_size=14, projection_dim=EMBED, hidden_act=act,
    )  # fmt: skip
    with seeded(1):
        return TransformersVision(cfg).eval()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_image_tower_matches_transformers(tmp_path, act):
    theirs = transformers_tower(act)
    torch.save(theirs.state_dict(), tmp_path / "clip.pth")
    ours = load_clip_vision(tmp_path / "clip.pth")  # its config read off the shapes (gelu below ViT-L's width)
    if act == "quick_gelu":  # at tiny width only by its config (`test_full_size_towers_are_read_off_their_shapes`)
        ours = CLIPVisionModelWithProjection(dataclasses.replace(ours.cfg, activation=act))
        ours.load_state_dict(theirs.state_dict())
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.penultimate, expected.hidden_states[-2], atol=1e-5, rtol=0)


# The web UI's ControlNet extension's three configs (annotator/clipvision/__init__.py), as transformers builds them
EXTENSION_TOWERS = {
    "clip_h": (dict(hidden_size=1280, num_hidden_layers=32, intermediate_size=5120, projection_dim=1024, hidden_act="gelu"), VIT_H),
    "clip_g": (dict(hidden_size=1664, num_hidden_layers=48, intermediate_size=8192, projection_dim=1280, hidden_act="gelu"), VIT_BIGG),
    "clip_vitl": (dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, projection_dim=768, hidden_act="quick_gelu"), VIT_L),
}  # fmt: skip


@pytest.mark.parametrize("name", EXTENSION_TOWERS)
def test_full_size_towers_are_read_off_their_shapes(name):
    options, expected = EXTENSION_TOWERS[name]
    with torch.device("meta"):
        theirs = TransformersVision(CLIPVisionConfig(num_attention_heads=16, image_size=224, patch_size=14, **options))
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert vision_config_of(shapes) == expected
    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(expected)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


def tiny_adapter(kind: str, model) -> IPAdapter:
    """An IP-Adapter of `kind` for the model's U-Net, random weights."""
    attentions = cross_attentions(model.model.diffusion_model)
    context = model.cfg.unet.context_dim
    cfg = IPAdapterConfig(
        kind,
        embed_dim=EMBED,
        context_dim=context,
        tokens={"base": 4, "plus": 16, "full": 257}[kind],
        layers=tuple(range(1, 2 * len(attentions), 2)),
        widths=tuple(a.to_k.out_features for a in attentions),
        resampler_dim=128 if kind == "plus" else 0,  # (two heads of 64)
    )
    return randomize(IPAdapter(cfg), seed=7).eval()


def tencent_file(adapter: IPAdapter, path) -> dict:
    """The adapter saved as tencent-ailab's `ip_adapter.bin`: {"image_proj": {...}, "ip_adapter": {...}}."""
    sd = adapter.state_dict()
    parts = {
        part: {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(part + ".")}
        for part in ("image_proj", "ip_adapter")
    }
    torch.save(parts, path)
    return parts


def unet_against_diffusers(tmp_path, variant: str, kind: str, w: float | tuple[float, ...]):
    """One guided pair of U-Net rows with an IP-Adapter at weight w (or per-block weights), ours and diffusers' with
    the same `.bin` loaded by its own `_load_ip_adapter_weights`, each IP processor's scale its layer's weight ->
    (ours, theirs, ours without the adapter, our U-Net, its inputs)."""
    model = tiny_model(variant, seed=3)
    sd = model.state_dict()
    ref = diffusers_xl_unet(model.cfg, sd) if variant == "sdxl" else diffusers_unet(model.cfg, sd)
    parts = tencent_file(tiny_adapter(kind, model), tmp_path / "ip-adapter.bin")
    adapter = load_ip_adapter(tmp_path / "ip-adapter.bin")  # (through the reader's flattening of the parts)
    assert adapter.cfg.kind == kind
    ref._load_ip_adapter_weights([parts])
    unet = model.model.diffusion_model
    blocks = attention_blocks(unet)  # (each IP processor's block, in diffusers' order: checked at full size)
    processors = [p for p in ref.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    for i, processor in enumerate(processors):
        processor.scale = [w[blocks[i]] if isinstance(w, tuple) else w]

    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    image = VisionOutput(
        image_embeds=torch.randn(2, EMBED, generator=g), penultimate=torch.randn(2, 9, EMBED, generator=g)
    )
    kwargs, y = {}, None
    if variant == "sdxl":
        pooled = torch.randn(2, model.cfg.text2.embed_dim, generator=g)
        time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 896]])
        y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
        kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        with image_prompted(unet, [(adapter, adapter.tokens(image), w, None)]):
            ours = unet(x, t, context, y)
        plain = unet(x, t, context, y)
        embeds = image.image_embeds if kind == "base" else image.penultimate
        theirs = ref(
            x, t, encoder_hidden_states=context, added_cond_kwargs={**kwargs, "image_embeds": [embeds[:, None]]}
        )
    return ours, theirs.sample, plain, unet, (x, t, context, y)


@pytest.mark.parametrize("kind", ["base", "plus", "full"])
@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_unet_with_an_ip_adapter_matches_diffusers(tmp_path, variant, kind):
    ours, theirs, plain, unet, inputs = unet_against_diffusers(tmp_path, variant, kind, 0.7)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - plain).abs().mean() > 0.01  # the image prompt really changed the prediction
    with torch.no_grad():
        assert torch.equal(unet(*inputs), plain)  # and the U-Net is itself again afterwards


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_per_block_weights_match_diffusers_per_layer_scales(tmp_path, variant):
    """The extension's advanced weighting of an IP-Adapter unit: a weight per block with cross-attention, each of
    its layers scaled by it (diffusers: each processor's scale), 0 leaving a block as it was."""
    model = tiny_model(variant, seed=3)
    count = 1 + max(attention_blocks(model.model.diffusion_model))
    weights = tuple(float(w) for w in torch.linspace(0, 1.5, count))  # (block 0 at 0)
    ours, theirs, plain, *_ = unet_against_diffusers(tmp_path, variant, "plus", weights)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    scalar = unet_against_diffusers(tmp_path, variant, "plus", 0.75)[0]
    assert (ours - scalar).abs().mean() > 1e-3 and (ours - plain).abs().mean() > 0.01


@pytest.mark.parametrize("name", ["sd-v1.5", "sdxl-base"])
def test_per_block_weights_address_the_extensions_blocks(name):
    """The extension's `transformer_index` of each cross-attention (its `enums.py`): SD 1.5's 16 blocks, input blocks
    1, 2, 4, 5, 7, 8 (0-5), the middle block (6), output blocks 3-11 (7-15); SDXL's 11, input blocks 4, 5, 7, 8
    (0-3), the middle block (4), output blocks 0-5 (5-10), every transformer of a block at its block's weight. In
    the order of `cross_attentions` (input, output, middle)."""
    with torch.device("meta"):
        unet = LatentDiffusion(preset(name)).model.diffusion_model
    if name == "sd-v1.5":
        expected = [0, 1, 2, 3, 4, 5, *range(7, 16), 6]
    else:
        depth = [2, 2, 10, 10, 10, 10, 10, 2, 2, 2]  # input blocks 4, 5, 7, 8, then output blocks 0-5
        expected = [k for k, n in zip([0, 1, 2, 3, 5, 6, 7, 8, 9, 10], depth) for _ in range(n)] + [4] * 10
    assert attention_blocks(unet) == expected


H, W = 64, 48
STEPS = 4


def tiny_tower_file(folder, name: str = "clip_h", width: int = EMBED, projection: int = EMBED) -> TransformersVision:
    """A tiny CLIP image tower that takes CLIP's 224×224 input (4×4 patches of 56), saved as the extension names it
    (`clip_h.pth`, ...)."""
    cfg = CLIPVisionConfig(
        hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16, image_size=224,
        patch_size=56, projection_dim=projection, hidden_act="gelu",
    )  # fmt: skip
    with seeded(5):
        tower = TransformersVision(cfg).eval()
    torch.save(tower.state_dict(), folder / f"{name}.pth")
    return tower


def reference_pixels(image: torch.Tensor, mask: np.ndarray | None = None) -> torch.Tensor:
    """The extension's preprocessing written with OpenCV and transformers' CLIPImageProcessor: the image (RGBA with
    the unit's mask as alpha, where it has one) stretched to 224×224 with INTER_AREA, then the processor (bicubic
    resize to 224 and centre crop, which change nothing here, 1/255 and CLIP's statistics) on RGB, then times
    (255 − alpha)/255."""
    rgb = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    resized = cv2.resize(rgb if mask is None else np.dstack([rgb, mask]), (224, 224), interpolation=cv2.INTER_AREA)
    factor = 1.0 if mask is None else torch.from_numpy((255 - resized[..., 3].astype(np.float32)) / 255)
    resized = resized[..., :3]
    processor = CLIPImageProcessor(
        size=224, crop_size=224, do_resize=True, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
        resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip
    return processor(images=resized, return_tensors="pt")["pixel_values"] * factor


def test_the_extensions_preprocessing_with_and_without_a_mask():
    """`clip_pixels` against OpenCV + CLIPImageProcessor as the extension calls them: the unit's image as RGBA, its
    alpha the mask (zeros without one), and with a painted rectangle, whose pixels are zeroed after normalising."""
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(6))
    rgb = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    mask = np.zeros((40, 72), np.uint8)
    torch.testing.assert_close(clip_pixels(rgb), reference_pixels(image, mask), atol=1e-5, rtol=0)
    mask[5:30, 10:40] = 255
    torch.testing.assert_close(clip_pixels(rgb, mask), reference_pixels(image, mask), atol=1e-5, rtol=0)
    assert (clip_pixels(rgb, mask) == 0).float().mean() > 0.2  # the painted part is gone
    torch.testing.assert_close(clip_pixels(rgb), reference_pixels(image), atol=0.05, rtol=0)  # (3-channel rounding)


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_txt2img_with_an_ip_adapter_unit_matches_diffusers(tmp_path, kind):
    """Our txt2img with an IP-Adapter unit against diffusers' StableDiffusionPipeline with the same adapter loaded
    and the image embeddings made by transformers' tower from the extension's preprocessing; the unconditional
    embeddings as IP-Adapter makes them (zeros for base, the states of a zero image for plus)."""
    model = tiny_model("sd1", seed=3)
    controls, towers = tmp_path / "ControlNet", tmp_path / "clip_vision"
    controls.mkdir(), towers.mkdir()
    tower = tiny_tower_file(towers)
    parts = tencent_file(tiny_adapter(kind, model), controls / f"ip-adapter-{kind}_sd15.bin")
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(6))
    weight = 0.8
    unit = ControlUnit(f"ip-adapter-{kind}_sd15", image, module="ip-adapter_clip_sd15", weight=weight)
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=[unit], **SETTINGS)
    request = dataclasses.replace(request, steps=STEPS)
    pipeline = Pipeline(model, controlnets=find_control_models(controls), clip_vision=towers)
    ours = generate(pipeline, request).images

    pipe = diffusers_pipeline(model, StableDiffusionPipeline)
    pipe.unet._load_ip_adapter_weights([parts])
    pipe.set_ip_adapter_scale(weight)
    with torch.no_grad():
        no_mask = np.zeros(image.shape[-2:], np.uint8)  # (the extension's alpha for an unmasked unit)
        seen = tower(pixel_values=reference_pixels(image, no_mask), output_hidden_states=True)
        if kind == "base":
            embeds = torch.cat([torch.zeros_like(seen.image_embeds), seen.image_embeds])[:, None]  # (2, 1, E)
        else:
            none = tower(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True)
            embeds = torch.cat([none.hidden_states[-2], seen.hidden_states[-2]])[:, None]  # (2, 1, 17, E)
        theirs = pipe(
            prompt_embeds=embeddings(pipe, model, PROMPT), negative_prompt_embeds=embeddings(pipe, model, NEGATIVE),
            ip_adapter_image_embeds=[embeds], num_inference_steps=STEPS, guidance_scale=SETTINGS["cfg_scale"],
            eta=0.0, height=H, width=W, generator=torch.Generator().manual_seed(3), output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05  # the image prompt changed the image
    unweighted = dataclasses.replace(request, controls=[dataclasses.replace(unit, weight=0.0)])
    assert torch.equal(generate(pipeline, unweighted).images, plain)  # weight 0: the plain image


def test_a_webuiapi_ip_adapter_unit_through_the_server(ckpt, tiny_models, serve, tmp_path):
    """webuiapi's ControlNetUnit naming an IP-Adapter model and module, sent to `ldm serve` over a real socket: the
    image equals the library's for the same unit, and a module of another kind is a 422 naming the unit."""
    import webuiapi

    controls, towers = tmp_path / "ControlNet", tmp_path / "clip_vision"
    controls.mkdir(), towers.mkdir()
    tiny_tower_file(towers)
    tencent_file(tiny_adapter("base", tiny_models["sd1"]), controls / "ip-adapter_sd15.bin")
    pipeline = load_pipeline(ckpt, controlnets=find_control_models(controls), clip_vision=towers)
    listed = next(iter(pipeline.controlnets))
    picture = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    with serve(create_app(pipeline, tmp_path / "out", controlnet_dir=controls)) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler a", steps=3)
        unit = webuiapi.ControlNetUnit(
            image=picture, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", weight=0.8
        )
        result = api.txt2img(prompt="a red circle", seed=3, width=W, height=H, cfg_scale=5, controlnet_units=[unit],
                             alwayson_scripts={})  # fmt: skip
        body = {"prompt": "a cat", "steps": 2, "width": W, "height": H}
        canny = {"ControlNet": {"args": [{**unit.to_dict(), "module": "canny"}]}}
        refused = call(base, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": canny})
        modules = call(base, "/controlnet/module_list?alias_names=true")[1]["module_detail"]
        no_map = call(base, "/controlnet/detect", {"controlnet_module": "ip-adapter_clip_h",
                                                   "controlnet_input_images": [unit.to_dict()["image"]]})  # fmt: skip
        # several images of their own sizes (the extension's multiple inputs): their tokens averaged
        other = Image.fromarray((np.random.default_rng(2).random((30, 20, 3)) * 255).astype(np.uint8))
        inputs = [{"image": unit.to_dict()["image"]}, {"image": webuiapi.raw_b64_img(other)}]
        several = {"ControlNet": {"args": [{**unit.to_dict(), "image": inputs}]}}
        averaged = call(base, "/sdapi/v1/txt2img", {**body, "seed": 3, "alwayson_scripts": several})
        one = {"ControlNet": {"args": [{**unit.to_dict(), "image": inputs[:1]}]}}
        first_only = call(base, "/sdapi/v1/txt2img", {**body, "seed": 3, "alwayson_scripts": one})
    with serve(create_app(dataclasses.replace(pipeline, clip_vision=None), controlnet_dir=controls)) as base:
        ip_unit = {"ControlNet": {"args": [unit.to_dict()]}}
        no_tower = call(base, "/sdapi/v1/txt2img", {**body, "alwayson_scripts": ip_unit})
        modules_without = call(base, "/controlnet/module_list")[1]["module_detail"]
    assert result.info["infotexts"][0].count(f"Model: {listed}") == 1
    control = ControlUnit(listed, from_pil(picture), module="ip-adapter_clip_sd15", weight=0.8, resize_mode="fill",
                          processor_res=512, threshold_a=64.0, threshold_b=64.0)  # fmt: skip
    request = GenerationRequest(["a red circle"], [3], width=W, height=H, steps=3, sampler="euler_ancestral",
                                eta=1.0, s_noise=1.0, cfg_scale=5.0, controls=[control])  # fmt: skip
    library = generate(pipeline, request).images
    assert (
        np.asarray(result.images[0]).tobytes() == (library[0] * 255).round().byte().permute(1, 2, 0).numpy().tobytes()
    )
    assert len(result.images) == 1  # (no detected map: the extension's IP-Adapter modules return none)
    assert averaged[0] == first_only[0] == 200  # (what the mean is: test_several_inputs_average_their_tokens)
    assert not np.array_equal(*(np.asarray(decode(a[1]["images"][0])) for a in (averaged, first_only)))
    assert refused[0] == 422 and "ControlNet unit 0" in refused[1]["detail"] and "'canny'" in refused[1]["detail"]
    # the page offers a module where it can run: the IP modules where their tower is in the folder
    assert modules["ip-adapter_clip_h"]["available"] and modules["ip-adapter-auto"]["available"]
    assert not modules["ip-adapter_clip_g"]["available"]  # (no clip_g here)
    assert not any(modules_without[m]["available"] for m in ("ip-adapter_clip_sd15", "ip-adapter-auto"))
    assert no_map[0] == 422 and no_map[1]["detail"] == (
        "controlnet_module: ControlNet module 'ip-adapter_clip_h' makes no map: its image goes to a CLIP image tower "
        "(an IP-Adapter's, a style adapter's or revision's)"
    )
    assert no_tower[0] == 422 and no_tower[1]["detail"].startswith("ControlNet unit 0: ControlNet module ")
    assert "--clip-vision-dir" in no_tower[1]["detail"]


def test_several_inputs_average_their_tokens(tmp_path, tiny_models):
    """An IP-Adapter unit's images of their own sizes (a tuple, masks beside them): its tokens, for a prompt's rows and
    the unconditional ones, the mean of each image's alone (the extension's `ImageEmbed.average_of`)."""
    pipeline = adapter_pipeline(tmp_path, tiny_models["sd1"], "plus", "ip-adapter-plus_sd15")
    g = torch.Generator().manual_seed(5)
    images = (torch.rand(1, 3, 40, 56, generator=g), torch.rand(1, 3, 64, 24, generator=g))
    mask = (torch.rand(1, 1, 64, 24, generator=g) > 0.5).float()

    def tokens(image, mask=None):
        unit = ControlUnit("ip-adapter-plus_sd15", image, module="ip-adapter_clip_sd15", mask=mask)
        request = GenerationRequest(["a cat"], [1], width=32, height=32, controls=[unit])
        return resolve(request, pipeline).controls[0].image_tokens

    averaged = tokens(images, (None, mask))
    alone = [tokens(images[0]), tokens(images[1], mask)]
    for i in (0, 1):
        torch.testing.assert_close(averaged[i], (alone[0][i] + alone[1][i]) / 2, atol=1e-6, rtol=0)
    reference = ControlUnit("None", images, module="reference_only")  # (a unit of one image)
    with pytest.raises(RequestError, match="several images of their own sizes are an IP-Adapter unit's inputs"):
        resolve(GenerationRequest(["a cat"], [1], width=32, height=32, controls=[reference]), pipeline)
    with pytest.raises(RequestError, match="2 images take a tuple of as many masks"):
        tokens(images, mask)


def test_units_that_cannot_run_are_refused_in_one_line(tmp_path, tiny_models):
    """No tower folder, a folder without the module's tower, a tower of another width, a module of another kind, an
    adapter of another U-Net, advanced weighting: RequestError naming the unit and the cause, before any sampling."""
    controls, towers, narrow = tmp_path / "ControlNet", tmp_path / "clip_vision", tmp_path / "narrow"
    for folder in (controls, towers, narrow):
        folder.mkdir()
    tiny_tower_file(towers)
    clip_g = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16, image_size=224,
                  patch_size=56, projection_dim=40)  # fmt: skip
    torch.save(TransformersVision(CLIPVisionConfig(**clip_g)).state_dict(), narrow / "clip_g.pth")
    model = tiny_models["sd1"]
    tencent_file(tiny_adapter("base", model), controls / "ip-adapter_sd15.bin")
    tencent_file(tiny_adapter("base", tiny_model("sdxl", seed=1)), controls / "ip-adapter_sdxl.bin")
    models = find_control_models(controls)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cases = [
        (None, "ip-adapter_sd15", "ip-adapter_clip_sd15", None, "is not here: give a folder with --clip-vision-dir"),
        (towers, "ip-adapter_sd15", "ip-adapter_clip_sdxl", None, "the CLIP image tower clip_g .* is not in"),
        (narrow, "ip-adapter_sd15", "ip-adapter_clip_g", None, "takes CLIP image features 48 wide; the tower clip_g gives 40"),
        (towers, "ip-adapter_sd15", "canny", None, "needs an IP-Adapter module"),
        (towers, "ip-adapter_sdxl", "ip-adapter-auto", None, "does not fit this one"),
        (towers, "ip-adapter_sd15", "ip-adapter_clip_sd15", (1.0, 0.5), "one weight per U-Net block with cross-att"),
    ]  # fmt: skip
    for folder, name, module, weighting, message in cases:
        unit = ControlUnit(name, image, module=module, advanced_weighting=weighting, title="IP unit")
        request = GenerationRequest(["a cat"], [1], width=32, height=32, steps=2, controls=[unit])
        with pytest.raises(RequestError, match=message) as raised:
            resolve(request, Pipeline(model, controlnets=models, clip_vision=folder))
        assert str(raised.value).startswith("IP unit: ") and "\n" not in str(raised.value)


SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
)  # fmt: skip


@pytest.mark.parametrize(("name", "count"), [("sd-v1.5", 16), ("sdxl-base", 70)])
def test_full_size_cross_attentions_are_numbered_as_diffusers_numbers_them(name, count):
    """The order of `ip_adapter.{2i + 1}`: diffusers' attention processors (down, up, then middle block), each
    attn2's width; SD 1.5's 16 layers (keys 1..31), SDXL's 70 (1..139, the middle block's 121..139)."""
    with torch.device("meta"):
        ours = LatentDiffusion(preset(name)).model.diffusion_model
        theirs = UNet2DConditionModel(**(SDXL_UNET if name == "sdxl-base" else {}))
    widths = [attn.to_q.in_features for attn in cross_attentions(ours)]
    names = [n.removesuffix(".processor") for n in theirs.attn_processors if n.endswith("attn2.processor")]
    assert widths == [theirs.get_submodule(n).to_q.in_features for n in names] and len(widths) == count
    middle = [2 * i + 1 for i, n in enumerate(names) if n.startswith("mid_block")]
    assert middle == ([31] if count == 16 else list(range(121, 140, 2)))


def test_the_modules_towers_are_the_extensions():
    """Its module table (`preprocessor_compiled.py`) and, for ip-adapter-auto, its presets by model name."""
    assert [
        tower_name(m, "x") for m in ("ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl_plus_vith")
    ] == ["clip_h"] * 3
    assert [tower_name(m, "x") for m in ("ip-adapter_clip_sdxl", "ip-adapter_clip_g")] == ["clip_g"] * 2
    auto = {name: tower_name("ip-adapter-auto", f"{name} [0123abcd]") for name in
            ("ip-adapter_sdxl", "ip-adapter_sd15_vit-G", "ip-adapter_sdxl_vit-h", "ip-adapter-plus_sd15")}  # fmt: skip
    assert auto == {"ip-adapter_sdxl": "clip_g", "ip-adapter_sd15_vit-G": "clip_g", "ip-adapter_sdxl_vit-h": "clip_h",
                    "ip-adapter-plus_sd15": "clip_h"}  # fmt: skip


def adapter_pipeline(tmp_path, model, kind: str, name: str) -> Pipeline:
    """The model with a tiny adapter of `kind` filed as `name`.bin and the tiny clip_h tower beside it."""
    controls, towers = tmp_path / "ControlNet", tmp_path / "clip_vision"
    controls.mkdir(), towers.mkdir()
    tiny_tower_file(towers)
    tencent_file(tiny_adapter(kind, model), controls / f"{name}.bin")
    return Pipeline(model, controlnets=find_control_models(controls), clip_vision=towers)


def test_requests_with_different_image_prompts_share_a_batch(tmp_path, tiny_models):
    """Two requests with the same IP-Adapter unit settings and different images (one a batch of two): their plans'
    batch keys are equal, and the merged batch draws each request's images (its tokens batched as the text is)."""
    from latent_diffusion.pipeline.generate import generate_plan
    from latent_diffusion.pipeline.plan import merge

    pipeline = adapter_pipeline(tmp_path, tiny_models["sd1"], "plus", "ip-adapter-plus_sd15")
    plans = []
    for k, seeds in enumerate(([3], [4, 5])):
        image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(k))
        unit = ControlUnit("ip-adapter-plus_sd15", image, module="ip-adapter_clip_sd15", weight=0.9)
        request = GenerationRequest(["a red circle"] * len(seeds), seeds, width=32, height=32, steps=2,
                                    batch_size=len(seeds), controls=[unit])  # fmt: skip
        plans.append(resolve(request, pipeline))
    assert plans[0].batch_key() == plans[1].batch_key()
    alone = torch.cat([generate_plan(plan).images for plan in plans])
    together = generate_plan(merge(plans)).images
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert not torch.equal(*(plan.controls[0].image_tokens[0] for plan in plans))  # (each its own tokens)


def test_a_units_per_block_weights_reach_generation(tmp_path, tiny_models):
    """Advanced weighting on an IP-Adapter unit replaces its weight, as the extension's: every block at 0.8 draws what
    weight 0.8 draws, every block at 0 the plain image, and other weights per block another image."""
    model = tiny_models["sd1"]
    pipeline = adapter_pipeline(tmp_path, model, "base", "ip-adapter_sd15")
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    blocks = 1 + max(attention_blocks(model.model.diffusion_model))

    def drawn(**unit) -> torch.Tensor:
        units = [ControlUnit("ip-adapter_sd15", image, module="ip-adapter_clip_sd15", **unit)] if unit else []
        return generate(
            pipeline, GenerationRequest(["a cat"], [3], width=32, height=32, steps=2, controls=units)
        ).images

    weighted = drawn(weight=0.8)
    assert torch.equal(drawn(weight=0.3, advanced_weighting=(0.8,) * blocks), weighted)
    assert torch.equal(drawn(weight=0.8, advanced_weighting=(0.0,) * blocks), drawn())
    assert not torch.equal(drawn(advanced_weighting=(0.0,) * (blocks - 1) + (0.8,)), weighted)


def ref_ip_region(mask, latent_width, latent_height, out, rows):  # plugable_ipadapter.py apply_effective_region_mask
    _, sequence_length, _ = out.shape
    factor = math.sqrt(sequence_length / (latent_width * latent_height))
    mask_h, mask_w = int(latent_height * factor), int(latent_width * factor)
    mask = torch.nn.functional.interpolate(mask, size=(mask_h, mask_w), mode="bilinear").squeeze()
    mask = mask.repeat(rows, 1, 1)
    mask = mask.view(mask.shape[0], -1, 1).repeat(1, 1, out.shape[2])
    return out * mask


def test_a_region_mask_weighs_the_image_prompt_on_each_layers_grid():
    """effective_region_mask on an IP-Adapter: its attention output times the mask at the layer's grid, as the
    extension finds it where the latent halves evenly (16x8: 128, 32, 8, 2 places); an odd latent's grids are the
    U-Net's, rounding up (13x7 -> 7x4 -> 4x2 -> 2x1)."""
    mask = torch.rand(1, 1, 37, 23, generator=torch.Generator().manual_seed(0))
    for n in (128, 32, 8, 2):
        out = torch.randn(2, n, 5, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(out * region_weights(mask, (16, 8), n), ref_ip_region(mask, 8, 16, out, 2))
    for n, grid in ((91, (13, 7)), (28, (7, 4)), (8, (4, 2)), (2, (2, 1))):
        expected = F.interpolate(mask, size=grid, mode="bilinear").reshape(1, n, 1)
        torch.testing.assert_close(region_weights(mask, (13, 7), n), expected)


def test_a_units_region_mask_reaches_generation(tmp_path, tiny_models):
    """A white region is no region; a black one leaves the image prompt nothing; a half one is another image."""
    pipeline = adapter_pipeline(tmp_path, tiny_models["sd1"], "base", "ip-adapter_sd15")
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))

    def drawn(**unit) -> torch.Tensor:
        units = [ControlUnit("ip-adapter_sd15", image, module="ip-adapter_clip_sd15", **unit)] if unit else []
        request = GenerationRequest(["a cat"], [3], width=32, height=32, steps=2, controls=units)
        return generate(pipeline, request).images

    weighted, half = drawn(weight=0.8), torch.ones(1, 1, 10, 10)
    half[..., 5:] = 0
    assert torch.equal(drawn(weight=0.8, region=torch.ones(1, 1, 7, 9)), weighted)
    torch.testing.assert_close(drawn(weight=0.8, region=torch.zeros(1, 1, 7, 9)), drawn(), atol=1e-6, rtol=0)
    assert (drawn(weight=0.8, region=half) - weighted).abs().max() > 1e-3
