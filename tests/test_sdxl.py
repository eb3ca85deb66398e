"""SDXL (base and refiner) in generative-models' layout against diffusers and transformers, built from the same
state dict by diffusers' own single-file converters: the U-Net with its vector conditioning, both text encoders
with the pooled output, and txt2img end to end against StableDiffusionXLPipeline."""

import dataclasses

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from latent_diffusion import LatentDiffusion, from_ldm_config, preset
from latent_diffusion.models.config import TextEncoderConfig
from latent_diffusion.models.yaml_config import to_ldm_config
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.images import from_pil
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import GenerationRequest, HiresFix
from latent_diffusion.prompts.encoding import encode_prompts

from conftest import tiny_model
from test_full_size import shapes
from test_reference import ATOL, diffusers_vae

PROMPT, NEGATIVE = "a small red circle on a blue background", "blurry"


@pytest.fixture(scope="module")
def xl_models():
    return {v: tiny_model(v, seed=11 + i) for i, v in
            enumerate(("sdxl", "sdxl-refiner"))}  # fmt: skip


def diffusers_xl_unet(cfg, sd: dict) -> UNet2DConditionModel:
    unet_cfg = create_unet_diffusers_config_from_ldm({"model": to_ldm_config(cfg)}, sd)
    # diffusers tells SDXL apart by its full context width (2048 or 1280); at tiny width, say so
    unet_cfg |= {"class_embed_type": None, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": cfg.micro_conditioning_width}  # fmt: skip
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    return unet.eval()


def transformers_config(t: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width, num_attention_heads=t.heads,
        max_position_embeddings=t.max_length, hidden_act=t.activation, projection_dim=t.embed_dim,
        num_hidden_layers=t.layers,
    )  # fmt: skip


def transformers_text_encoders(model: LatentDiffusion) -> list:
    """The conditioner's text encoders as transformers models: CLIPTextModel for CLIP ViT-L, and
    CLIPTextModelWithProjection for OpenCLIP ViT-bigG, as diffusers' SDXL pipelines hold them."""
    sd, encoders = model.state_dict(), []
    for i, t in enumerate(model.cfg.texts):
        prefix = f"conditioner.embedders.{i}."
        if t.kind == "clip":
            encoder = CLIPTextModel(transformers_config(t))
            converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)})
        else:
            encoder = CLIPTextModelWithProjection(transformers_config(t))
            converted = convert_open_clip_checkpoint(encoder, sd, prefix=prefix + "model.")
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        if t.kind == "openclip":  # CLIPTextModelWithProjection keeps its encoder under text_model
            converted = {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in converted.items()}
        missing, unexpected = encoder.load_state_dict(converted, strict=False)
        assert missing == [] and unexpected == []
        encoders.append(encoder.eval())
    return encoders


def reference_conditioning(model, encoders, prompt: str):
    """diffusers' SDXL prompt encoding on our token ids: each encoder's penultimate hidden state, concatenated,
    and the last encoder's projected pooled output (text_embeds)."""
    contexts = []
    for encoder, ours in zip(encoders, model.text_encoders):
        tokens, _ = ours.tokenize([prompt])
        out = encoder(tokens, output_hidden_states=True)
        contexts.append(out.hidden_states[-2])
    return torch.cat(contexts, dim=-1), out.text_embeds


@pytest.mark.parametrize("variant", ["sdxl", "sdxl-refiner"])
def test_unet_matches_diffusers(xl_models, variant):
    """The vector y = [pooled | sinusoidal size embeddings] against diffusers' text_time added embedding."""
    model = xl_models[variant]
    ref = diffusers_xl_unet(model.cfg, model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([3, 871])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, model.cfg.text2.embed_dim if model.cfg.text2 else model.cfg.text.embed_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 640, 896]])
    if variant == "sdxl-refiner":  # original size, crop, aesthetic score
        time_ids = torch.tensor([[1024.0, 768, 0, 0, 6], [512, 512, 16, 32, 2.5]])
    names, numbers = model.cfg.micro_conditioning, time_ids.split([2, 2, time_ids.shape[1] - 4], dim=1)
    y = model.conditioner.vector(pooled, dict(zip(names, numbers)))
    with torch.no_grad():
        ours = model(x, t, {"crossattn": context, "vector": y})
        theirs = ref(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
        no_sizes = ref(x, t, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids * 0}).sample  # fmt: skip
    assert ours.shape == (2, 4, 16, 24)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (theirs - no_sizes).abs().mean() > 0.01  # the micro-conditioning really changes the prediction


@pytest.mark.parametrize("variant", ["sdxl", "sdxl-refiner"])
def test_text_encoders_match_transformers(xl_models, variant):
    model = xl_models[variant]
    encoders = transformers_text_encoders(model)
    prompts = [PROMPT, "", "Ünïcode, 12 cats!"]
    with torch.no_grad():
        cond, _ = encode_prompts(model, prompts, size=(64, 48))
        for i, prompt in enumerate(prompts):
            context, pooled = reference_conditioning(model, encoders, prompt)
            torch.testing.assert_close(cond["crossattn"][i : i + 1], context, atol=ATOL, rtol=0)
            torch.testing.assert_close(cond["vector"][i : i + 1, : pooled.shape[1]], pooled, atol=ATOL, rtol=0)
    assert cond["crossattn"].shape == (3, 77, model.cfg.unet.context_dim)
    assert cond["vector"].shape == (3, model.cfg.unet.adm_in_channels)


def test_an_empty_negative_prompt_is_zeros(xl_models):
    """generative-models' force_zero_embeddings for "txt", as its sampling and the web UI use it for an empty
    negative prompt; the micro-conditioning stays."""
    model = xl_models["sdxl"]
    with torch.no_grad():
        cond, _ = encode_prompts(model, ["", NEGATIVE], size=(64, 64), negative=True)
        positive, _ = encode_prompts(model, ["", NEGATIVE], size=(64, 64))
    pooled = model.cfg.text2.embed_dim
    assert (cond["crossattn"][0] == 0).all() and (cond["vector"][0, :pooled] == 0).all()
    torch.testing.assert_close(cond["vector"][0, pooled:], positive["vector"][0, pooled:])
    torch.testing.assert_close(cond["crossattn"][1], positive["crossattn"][1])


def xl_pipeline(model) -> StableDiffusionXLPipeline:
    sd = model.state_dict()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
    )  # fmt: skip
    clip, big_g = transformers_text_encoders(model)
    return StableDiffusionXLPipeline(
        vae=diffusers_vae(model.cfg, sd), text_encoder=clip, text_encoder_2=big_g, tokenizer=None,
        tokenizer_2=None, unet=diffusers_xl_unet(model.cfg, sd), scheduler=scheduler,
    )  # fmt: skip


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_txt2img_matches_stable_diffusion_xl_pipeline(xl_models, negative):
    """Same tiny weights, same seed, DDIM 10 steps at 64x48: the image diffusers' SDXL pipeline makes, with its
    default micro-conditioning (original = target = the image size, crop (0, 0)). An empty negative prompt is
    diffusers' force_zeros_for_empty_prompt."""
    model = xl_models["sdxl"]
    pipe = xl_pipeline(model)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    with torch.no_grad():
        context, pooled = reference_conditioning(model, encoders, PROMPT)
        negatives = {}
        if negative:
            negatives = dict(zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"),
                                 reference_conditioning(model, encoders, negative)))  # fmt: skip
        theirs = pipe(
            prompt_embeds=context, pooled_prompt_embeds=pooled, **negatives, height=64, width=48,
            num_inference_steps=10, guidance_scale=5.0, eta=0.0, generator=torch.Generator().manual_seed(5),
            output_type="pt",
        ).images  # fmt: skip
    request = GenerationRequest([PROMPT], [5], negative_prompts=[negative], width=48, height=64, steps=10,
                                sampler="ddim")  # fmt: skip
    images = generate(model, request).images
    assert images.shape == theirs.shape == (1, 3, 64, 48)
    torch.testing.assert_close(images, theirs, atol=1e-3, rtol=0)
    assert theirs.std() > 0.01


SD_XL_BASE_YAML = """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def test_generative_models_yaml_is_the_preset():
    """generative-models' `configs/inference/sd_xl_base.yaml` (as published) and the refiner's differences."""
    base = yaml.safe_load(SD_XL_BASE_YAML)
    assert from_ldm_config(base) == preset("sdxl-base")
    p = base["model"]["params"]
    p["network_config"]["params"] |= {"adm_in_channels": 2560, "model_channels": 384, "channel_mult": [1, 2, 4, 4],
                                      "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280]}  # fmt: skip
    models = p["conditioner_config"]["params"]["emb_models"]
    models[4]["input_key"] = "aesthetic_score"
    del models[0]
    assert from_ldm_config(base) == preset("sdxl-refiner")


@pytest.mark.parametrize("name", ["sdxl-base", "sdxl-refiner"])
def test_full_size_preset_has_the_keys_and_shapes_the_converters_expect(name):
    """On the meta device: every key and shape is what diffusers' converters map onto diffusers' and transformers'
    full-size SDXL models (diffusers recognises SDXL's U-Net from the config on its own at this width), and the
    parameter counts are theirs (the U-Net 2.57 B for the base); nothing is left over."""
    cfg = preset(name)
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    sd = model.state_dict()
    original = {"model": to_ldm_config(cfg)}
    unet_cfg = create_unet_diffusers_config_from_ldm(original, sd)
    assert unet_cfg["addition_embed_type"] == "text_time"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        texts = [(CLIPTextModel if t.kind == "clip" else CLIPTextModelWithProjection)(transformers_config(t))
                 for t in cfg.texts]  # fmt: skip
    assert shapes(convert_ldm_unet_checkpoint(sd, unet_cfg)) == shapes(unet.state_dict())
    assert sum(p.numel() for p in model.model.parameters()) == sum(p.numel() for p in unet.parameters())
    if name == "sdxl-base":
        assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    for i, (t, text) in enumerate(zip(cfg.texts, texts)):
        prefix = f"conditioner.embedders.{i}."
        if t.kind == "clip":
            converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(prefix)})
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        else:
            converted = convert_open_clip_checkpoint(text, sd, prefix=prefix + "model.")
            converted = {(k if k.startswith("text_projection") else "text_model." + k.removeprefix("text_model.")): v
                         for k, v in converted.items()}  # fmt: skip
        assert shapes(converted) == shapes(text.state_dict())
        extra = 1 if t.kind == "openclip" else 0  # open_clip's logit_scale, which transformers' text model lacks
        count = sum(p.numel() for p in model.text_encoders[i].parameters())
        assert count == sum(p.numel() for p in text.parameters()) + extra
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) for k in sd)


def test_refiner_flow_matches_diffusers_ensemble_of_experts(xl_models):
    """Base to 80 % of the timestep range, the refiner the rest, the refiner's autoencoder decodes: diffusers'
    StableDiffusionXLPipeline(denoising_end=0.8) then StableDiffusionXLImg2ImgPipeline(denoising_start=0.8)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base, refiner = xl_models["sdxl"], xl_models["sdxl-refiner"]
    pipe = xl_pipeline(base)
    sd = refiner.state_dict()
    (big_g,) = transformers_text_encoders(refiner)
    refine = StableDiffusionXLImg2ImgPipeline(
        vae=diffusers_vae(refiner.cfg, sd), text_encoder=None, text_encoder_2=big_g, tokenizer=None, tokenizer_2=None,
        unet=diffusers_xl_unet(refiner.cfg, sd), scheduler=pipe.scheduler, requires_aesthetics_score=True,
    )  # fmt: skip
    settings = dict(num_inference_steps=10, guidance_scale=5.0, eta=0.0, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        embeds = {}
        for model, encoders, key in ((base, [pipe.text_encoder, pipe.text_encoder_2], "base"),
                                     (refiner, [big_g], "refiner")):  # fmt: skip
            (c, p), (nc, npool) = (reference_conditioning(model, encoders, text) for text in (PROMPT, NEGATIVE))
            embeds[key] = dict(prompt_embeds=c, pooled_prompt_embeds=p, negative_prompt_embeds=nc,
                               negative_pooled_prompt_embeds=npool)  # fmt: skip
        latents = pipe(**embeds["base"], height=64, width=48, denoising_end=0.8, output_type="latent", **settings)
        theirs = refine(**embeds["refiner"], image=latents.images, denoising_start=0.8, output_type="pt",
                        **settings).images  # fmt: skip
    request = GenerationRequest([PROMPT], [9], negative_prompts=[NEGATIVE], width=48, height=64, steps=10,
                                sampler="ddim", refiner_switch=0.8)  # fmt: skip
    result = generate(Pipeline(base, refiner=refiner), request)
    torch.testing.assert_close(result.images, theirs, atol=1e-3, rtol=0)
    alone = generate(base, request).images
    assert (alone - theirs).abs().max() > 0.01  # the refiner's part really made a difference
    assert "Refiner switch at: 0.8" in result.infotexts[0]


def test_hires_fix_with_the_refiner_in_the_web_uis_order(xl_models):
    """The web UI's default ("hires_fix_refiner_pass": second pass): the first pass is the base model's alone, the
    refiner takes over within the hires pass. So the hires image is (the web UI's identity) img2img, with the
    refiner, of the base model's own first pass enlarged; and the refiner really changed it."""
    base, refiner = xl_models["sdxl"], xl_models["sdxl-refiner"]
    settings = dict(negative_prompts=[NEGATIVE], steps=4, sampler="euler", refiner_switch=0.5)
    hires = HiresFix(scale=1.5, upscaler="Nearest", steps=4, strength=0.6)
    request = GenerationRequest([PROMPT], [9], width=32, height=32, **settings, hires=hires)
    result = generate(Pipeline(base, refiner=refiner), request)
    first = generate(base, GenerationRequest([PROMPT], [9], width=32, height=32, **settings)).images
    pixels = (first * 255).to(torch.uint8)  # the web UI's 8-bit truncation, then PIL's nearest 1.5x
    enlarged = from_pil(Image.fromarray(pixels[0].permute(1, 2, 0).numpy()).resize((48, 48), Image.NEAREST))
    img2img = GenerationRequest([PROMPT], [9], width=48, height=48, **settings, init_image=enlarged, strength=0.6,
                                step_count="fixed")  # fmt: skip
    torch.testing.assert_close(
        result.images, generate(Pipeline(base, refiner=refiner), img2img).images, atol=1e-6, rtol=0
    )
    without = generate(base, dataclasses.replace(request, hires=hires))
    assert (without.images - result.images).abs().max() > 0.01
    assert "Refiner switch at: 0.5" in result.infotexts[0] and "Hires upscaler: Nearest" in result.infotexts[0]


def test_command_line_with_refiner_and_separate_vae(tmp_path, xl_models, capsys):
    """`ldm info` names the conditioner's parts; txt2img with --refiner gives the refiner flow's image and
    --vae decodes with another autoencoder file (CompVis keys, attention stored linear-shaped as some are)."""
    from PIL import Image
    from safetensors.torch import save_file

    from latent_diffusion import save_model
    from latent_diffusion.cli import main
    from latent_diffusion.pipeline.images import from_pil

    base, refiner = xl_models["sdxl"], xl_models["sdxl-refiner"]
    save_model(base, tmp_path / "base.safetensors")
    save_model(refiner, tmp_path / "refiner.safetensors")
    assert main(["info", str(tmp_path / "base.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "variant sdxl (SDXL, eps-prediction)" in out and "conditioner.embedders.1" in out and "pooled into y" in out

    flags = ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--width", "48", "--height", "64", "--steps", "6",
             "--sampler", "ddim", "--seed", "3", "--quiet"]  # fmt: skip
    assert main(["txt2img", "--ckpt", str(tmp_path / "base.safetensors"), "--refiner", str(tmp_path / "refiner.safetensors"),
                 *flags, "--outdir", str(tmp_path / "refined")]) == 0  # fmt: skip
    (path,) = (tmp_path / "refined").iterdir()
    request = GenerationRequest(
        [PROMPT], [3], negative_prompts=[NEGATIVE], width=48, height=64, steps=6, sampler="ddim"
    )
    expected = generate(Pipeline(base, refiner=refiner), request).images
    with Image.open(path) as image:
        assert (from_pil(image) - expected).abs().max() <= 1 / 255 + 1e-6  # 8-bit rounding
        assert "Refiner: refiner [" in image.text["parameters"]

    vae = {k.removeprefix("first_stage_model."): v for k, v in refiner.state_dict().items()
           if k.startswith("first_stage_model.")}  # fmt: skip
    vae = {k: v[:, :, 0, 0].contiguous() if ".attn_1." in k and v.ndim == 4 else v for k, v in vae.items()}
    save_file(vae, tmp_path / "other_vae.safetensors")
    assert main(["txt2img", "--ckpt", str(tmp_path / "base.safetensors"), "--vae", str(tmp_path / "other_vae.safetensors"),
                 *flags, "--outdir", str(tmp_path / "vae")]) == 0  # fmt: skip
    (path,) = (tmp_path / "vae").iterdir()
    with_vae = LatentDiffusion(base.cfg).eval()
    with_vae.load_state_dict({**base.state_dict(), **{"first_stage_model." + k: v for k, v in
                                                      refiner.first_stage_model.state_dict().items()}})  # fmt: skip
    with Image.open(path) as image:
        assert (from_pil(image) - generate(with_vae, request).images).abs().max() <= 1 / 255 + 1e-6
        assert "VAE: other_vae.safetensors" in image.text["parameters"]
    # a whole checkpoint as the VAE file: its first_stage_model.* (as the web UI's VAE selector reads one)
    assert main(["txt2img", "--ckpt", str(tmp_path / "base.safetensors"), "--vae", str(tmp_path / "refiner.safetensors"),
                 *flags, "--outdir", str(tmp_path / "vae2")]) == 0  # fmt: skip
    (again,) = (tmp_path / "vae2").iterdir()
    with Image.open(path) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()

    assert main(["txt2img", "--ckpt", str(tmp_path / "base.safetensors"), "--refiner", str(tmp_path / "nothing"),
                 *flags, "--outdir", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "--refiner" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_sdxl_embedding_gives_each_text_encoder_its_part(tmp_path, xl_models):
    """An SDXL embedding file holds `clip_l` and `clip_g` vectors: the first text encoder takes the first, the second
    the other, in place of the name's tokens (the pooled output sees them too)."""
    from safetensors.torch import save_file

    from latent_diffusion.models.tokenizer import clip_tokenizer
    from latent_diffusion.prompts.syntax import chunk_prompt
    from latent_diffusion.weights.embeddings import load_embeddings

    model = xl_models["sdxl"]
    g = torch.Generator().manual_seed(4)
    clip_l, clip_g = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)
    (tmp_path / "emb").mkdir()
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "emb" / "shiny.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "emb" / "sd1-only.safetensors")
    embeddings, notices = load_embeddings(tmp_path / "emb", model.cfg.unet.context_dim)
    assert list(embeddings) == ["shiny"] and len(notices) == 1 and "width 32" in notices[0]
    with torch.no_grad():
        cond, _ = encode_prompts(model, ["a shiny cat"], size=(64, 64), embeddings=embeddings)
        plain, _ = encode_prompts(model, ["a shiny cat"], size=(64, 64))  # "shiny" as words
    (chunk,) = chunk_prompt("a shiny cat", clip_tokenizer(77), True, embeddings)
    (position, _), *_ = chunk.embeddings
    contexts = []
    with torch.no_grad():
        for encoder, vectors in zip(model.text_encoders, (clip_l, clip_g)):
            tokens = torch.tensor([encoder.pad(chunk.tokens)])
            out = encoder(tokens, None, [[(position, vectors)]], pooled=encoder.cfg.pooled)
            contexts.append(out[0] if encoder.cfg.pooled else out)
    torch.testing.assert_close(cond["crossattn"], torch.cat(contexts, dim=-1))
    torch.testing.assert_close(cond["vector"][:, :40], out[1])
    assert (cond["crossattn"] - plain["crossattn"]).abs().max() > 0.01


def test_sdxl_lora_matches_diffusers(xl_models, tmp_path):
    """A diffusers-format SDXL LoRA on every Linear and Conv2d of the U-Net and both text encoders (`text_encoder`,
    `text_encoder_2`), merged by ours and by diffusers' `load_lora_weights` + `fuse_lora`; the same file in kohya's
    spelling (`lora_unet_`, `lora_te1_`, `lora_te2_`) merges the same weights."""
    import copy

    from safetensors.torch import save_file
    from torch import nn

    from latent_diffusion.weights.lora import apply_lora, read_lora, remove_lora

    model = copy.deepcopy(xl_models["sdxl"])
    pipe = xl_pipeline(model)
    g = torch.Generator().manual_seed(6)
    peft, kohya = {}, {}
    for part, root in (
        ("unet", pipe.unet),
        ("text_encoder", pipe.text_encoder),
        ("text_encoder_2", pipe.text_encoder_2),
    ):
        for path, m in root.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or path == "text_projection":
                continue  # (ViT-bigG's projection is a plain matrix in the original layout, as in kohya's files)
            if isinstance(m, nn.Conv2d):
                down = torch.randn(4, m.in_channels, *m.kernel_size, generator=g) / m.weight[0].numel() ** 0.5
                up = torch.randn(m.out_channels, 4, 1, 1, generator=g) * 0.15
            else:
                down = torch.randn(4, m.in_features, generator=g) / m.in_features**0.5
                up = torch.randn(m.out_features, 4, generator=g) * 0.15
            peft[f"{part}.{path}.lora_A.weight"], peft[f"{part}.{path}.lora_B.weight"] = down, up
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part]
            name = prefix + (path if part == "unet" else "text_model." + path.removeprefix("text_model.")).replace(
                ".", "_"
            )
            kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = down, up
    save_file(peft, tmp_path / "peft.safetensors")
    save_file(kohya, tmp_path / "kohya.safetensors")

    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=0.7)
    applied = apply_lora(model, read_lora(tmp_path / "peft.safetensors"), 0.7)
    assert applied.warnings == [] and applied.layers == len(peft) // 2
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 871])
    context, pooled = torch.randn(2, 77, 80, generator=g), torch.randn(2, 40, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
    with torch.no_grad():
        ours = model(x, t, {"crossattn": context, "vector": y})
        theirs = pipe.unet(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        cond, _ = encode_prompts(model, [PROMPT], size=(64, 64))
        context, pooled = reference_conditioning(model, [pipe.text_encoder, pipe.text_encoder_2], PROMPT)
        torch.testing.assert_close(cond["crossattn"], context, atol=ATOL, rtol=0)
        torch.testing.assert_close(cond["vector"][:, :40], pooled, atol=ATOL, rtol=0)
    remove_lora(model, applied)
    again = apply_lora(model, read_lora(tmp_path / "kohya.safetensors"), 0.7)
    assert again.warnings == [] and again.layers == len(kohya) // 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k


def test_fine_tuning_feeds_each_images_size_and_crop(tmp_path, xl_models):
    """SDXL fine-tuning: y holds each image's original size and center crop (generative-models' original_size_as_tuple
    and crop_coords_top_left) and the training size as the target; a dropped caption is zeros (text and pooled);
    the text encoders and the autoencoder stay as they were, the U-Net moves."""
    from PIL import Image

    from latent_diffusion import load_model, save_model
    from latent_diffusion.training.config import TrainConfig
    from latent_diffusion.training.data import ImageCaptionFolder
    from latent_diffusion.training.diffusion import build_cache, train
    from latent_diffusion.training.step import Run, make_batch

    model = xl_models["sdxl"]
    save_model(model, tmp_path / "xl.safetensors")
    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(48, 32), (32, 64), (40, 40), (96, 32)]):
        Image.new("RGB", (w, h), (60 * i, 90, 200 - 40 * i)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a picture number {i}")
    # 48x32 at 16: scaled by 1/2 to 24x16, cropped 4 from the left; 32x64: 16x32, 8 from the top; 96x32: 48x16, 16
    folder = ImageCaptionFolder(data, 16)
    assert [(it.original_size, it.crop) for it in map(folder.load, range(4))] == [
        ((32, 48), (0, 4)), ((64, 32), (8, 0)), ((40, 40), (0, 0)), ((32, 96), (0, 16))]  # fmt: skip

    cfg = TrainConfig(outdir=str(tmp_path / "run"), data=str(data), ckpt=str(tmp_path / "xl.safetensors"), image_size=16,
                      batch_size=4, steps=2, save_every=2, ema_decay=0, prompt_dropout=0.0, quiet=True, device="cpu",
                      lr=1e-3, warmup=1, gradient_checkpointing=True)  # fmt: skip
    with torch.no_grad():
        cache = build_cache(model, folder, torch.device("cpu"), cfg, quiet=True)
        run = Run(cfg, model, folder, cache, torch.device("cpu"), 0, 1)
        batch = make_batch(run, 0, slice(0, 4))
        order = [cache["captions"][cache["caption"][i]] for i in range(4)]
        for row in range(4):
            i = next(
                i
                for i in range(4)
                if torch.equal(batch.cond["crossattn"][row], cache["embeddings"][cache["caption"][i]])
            )
            _, pooled = model.get_text_conditioning([order[i]], pooled=True)
            expected = model.conditioner.vector(pooled, {
                "original_size": torch.tensor([folder.load(i).original_size], dtype=torch.float32),
                "crop_coords": torch.tensor([folder.load(i).crop], dtype=torch.float32),
                "target_size": torch.tensor([[16.0, 16.0]])})  # fmt: skip
            torch.testing.assert_close(batch.cond["vector"][row : row + 1], expected)
        run.cfg = TrainConfig(**{**cfg.__dict__, "prompt_dropout": 1.0})
        dropped = make_batch(run, 0, slice(0, 4))
        assert (dropped.cond["crossattn"] == 0).all() and (dropped.cond["vector"][:, :40] == 0).all()
        torch.testing.assert_close(dropped.cond["vector"][:, 40:], batch.cond["vector"][:, 40:])

    tuned = load_model(train(cfg))
    a, b = model.state_dict(), tuned.state_dict()
    for prefix in ("first_stage_model.", "conditioner."):
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)), prefix
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert sum(not torch.equal(a[k], b[k]) for k in unet) > 0.9 * len(unet)


def test_gradient_checkpointing_gives_the_same_gradients(xl_models):
    import copy

    model = copy.deepcopy(xl_models["sdxl"]).train()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    cond = {"crossattn": torch.randn(2, 77, 80, generator=g), "vector": torch.randn(2, 88, generator=g)}
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.unet.checkpointing = checkpointing
        model(x, t, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in model.unet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_prompt_editing_counts_steps_over_base_and_refiner(xl_models):
    """The web UI counts prompt-editing steps over both models: with the model as its own refiner, the switch
    changes nothing, whichever side of it the edit falls."""
    model = xl_models["sdxl"]
    for switch in (0.3, 0.7):
        request = GenerationRequest(["[a red circle:a blue square:0.5]"], [2], width=32, height=32, steps=6,
                                    sampler="euler", refiner_switch=switch)  # fmt: skip
        alone = generate(model, request).images
        torch.testing.assert_close(generate(Pipeline(model, refiner=model), request).images, alone, atol=0, rtol=0)
