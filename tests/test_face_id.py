"""IP-Adapter FaceID and InstantID's adapter (`models/ip_adapter.py` kinds faceid and instantid): txt2img with a unit
against diffusers' StableDiffusionPipeline with the same `.bin` loaded by its own `_load_ip_adapter_weights` and
the face's identity as its image embedding (InsightFace's identity itself is checked against insightface's code in
`test_face_analysis.py`); the files' kinds; the refusals."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from latent_diffusion import LatentDiffusion
from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions
from latent_diffusion.pipeline import face_analysis
from latent_diffusion.pipeline.control import find_control_models
from latent_diffusion.pipeline.control_modules import find_module
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import Pipeline
from latent_diffusion.pipeline.request import ControlUnit, GenerationRequest, RequestError
from latent_diffusion.weights.ip_adapter import load_ip_adapter
from test_face_analysis import packs, portrait
from test_generate import NEGATIVE, PROMPT, SETTINGS, diffusers_pipeline, embeddings
from test_ip_adapter import EMBED, STEPS, H, W, reference_pixels, tencent_file, tiny_tower_file

from conftest import randomize, seeded, tiny_config, tiny_model

MODULE_OF_KIND = {"faceid": "ip-adapter_face_id", "instantid": "instant_id_face_embedding"}


def identity_adapter(kind: str, model) -> IPAdapter:
    """A FaceID (4 tokens) or InstantID (a resampler of 16 queries) adapter taking a 512-wide identity, random."""
    attentions = cross_attentions(model.model.diffusion_model)
    cfg = IPAdapterConfig(
        kind,
        embed_dim=EMBED if kind == "faceid_plus" else 512,  # (faceid_plus: the tower's width; the identity's is 512)
        context_dim=model.cfg.unet.context_dim,
        tokens=16 if kind == "instantid" else 4,
        layers=tuple(range(1, 2 * len(attentions), 2)),
        widths=tuple(a.to_k.out_features for a in attentions),
        resampler_dim=128 if kind == "instantid" else 0,
    )
    with seeded(5):
        return randomize(IPAdapter(cfg), seed=8).eval()


def diffusers_images(pipe, model, identity: torch.Tensor) -> torch.Tensor:
    """diffusers' txt2img of our settings with the identity (1, 1, [1,] 512) as the adapter's image embedding and a
    zero identity for the unconditional half."""
    return pipe(
        prompt_embeds=embeddings(pipe, model, PROMPT), negative_prompt_embeds=embeddings(pipe, model, NEGATIVE),
        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(identity), identity])],
        num_inference_steps=STEPS, guidance_scale=SETTINGS["cfg_scale"], eta=0.0, height=H, width=W,
        generator=torch.Generator().manual_seed(3), output_type="pt",
    ).images  # fmt: skip


@pytest.mark.parametrize("kind", ["faceid", "instantid"])
def test_txt2img_with_a_face_unit_matches_diffusers(tmp_path, kind):
    model = tiny_model("sd1", seed=3)
    controls = tmp_path / "ControlNet"
    controls.mkdir()
    name = "ip-adapter-faceid_sd15" if kind == "faceid" else "ip-adapter_instant_id_sd15"
    parts = tencent_file(identity_adapter(kind, model), controls / f"{name}.bin")
    assert load_ip_adapter(controls / f"{name}.bin").cfg.kind == kind
    folder = packs(tmp_path / "annotators")
    image = torch.from_numpy(portrait()).permute(2, 0, 1)[None].float() / 255
    weight = 0.7
    unit = ControlUnit(name, image, module=MODULE_OF_KIND[kind], weight=weight, processor_res=384)
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=[unit], **SETTINGS)
    request = dataclasses.replace(request, steps=STEPS)
    pipeline = Pipeline(model, controlnets=find_control_models(controls), annotators=folder)
    ours = generate(pipeline, request).images

    face = face_analysis.identity(find_module(MODULE_OF_KIND[kind]), folder, portrait(), 384)
    identity = torch.from_numpy(face)[None, None]  # (1, 1, 512): one image
    if kind == "instantid":
        identity = identity[:, None]  # (1, 1, 1, 512): one image of one state, for the resampler
    pipe = diffusers_pipeline(model, StableDiffusionPipeline)
    pipe.unet._load_ip_adapter_weights([parts])
    pipe.set_ip_adapter_scale(weight)
    with torch.no_grad():
        theirs = diffusers_images(pipe, model, identity)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05  # the face changed the image


def test_face_units_are_refused_in_one_line(tmp_path):
    model = tiny_model("sd1", seed=3)
    controls = tmp_path / "ControlNet"
    controls.mkdir()
    tencent_file(identity_adapter("faceid", model), controls / "ip-adapter-faceid_sd15.bin")
    folder = packs(tmp_path / "annotators")
    pipeline = Pipeline(model, controlnets=find_control_models(controls), annotators=folder)
    image = torch.from_numpy(portrait()).permute(2, 0, 1)[None].float() / 255

    def run(module: str, picture=image, where=pipeline):
        unit = ControlUnit("ip-adapter-faceid_sd15", picture, module=module)
        request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=[unit], **SETTINGS)
        generate(where, dataclasses.replace(request, steps=1))

    with pytest.raises(RequestError, match="takes a face's identity: module ip-adapter_face_id$"):
        run("ip-adapter_clip_sd15")
    with pytest.raises(RequestError, match="InsightFace found no face in the image$"):
        run("ip-adapter_face_id", torch.zeros(1, 3, 64, 64))
    with pytest.raises(
        RequestError, match=r"needs InsightFace's buffalo_l \(det_10g.onnx, w600k_r50.onnx\): no folder"
    ):
        run("ip-adapter_face_id", where=dataclasses.replace(pipeline, annotators=None))
    run("ip-adapter-auto")  # (auto: the face module of the adapter's kind)


def test_instant_ids_controlnet_reads_the_face_tokens_as_its_context(tmp_path, monkeypatch):
    """InstantID: its ControlNet (the file's name says instant_id) is given the InstantID adapter's tokens in the
    prompt's place, the face's on the prompt's rows and no face's on the unconditional rows (the extension's
    `control_context_override`), and must follow that adapter's unit."""
    model = tiny_model("sd1", seed=3)
    controls = tmp_path / "ControlNet"
    controls.mkdir()
    adapter = identity_adapter("instantid", model)
    tencent_file(adapter, controls / "ip-adapter_instant_id_sd15.bin")
    with seeded(2):
        save_file(
            randomize(ControlNet(model.cfg.unet), seed=2).state_dict(), controls / "control_instant_id_sd15.safetensors"
        )
    folder = packs(tmp_path / "annotators")
    pipeline = Pipeline(model, controlnets=find_control_models(controls), annotators=folder)
    image = torch.from_numpy(portrait()).permute(2, 0, 1)[None].float() / 255
    face_unit = ControlUnit("ip-adapter_instant_id_sd15", image, module="instant_id_face_embedding")
    keypoints_unit = ControlUnit("control_instant_id_sd15", image, module="instant_id_face_keypoints")
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, **SETTINGS)
    request = dataclasses.replace(request, steps=2, controls=[face_unit, keypoints_unit])

    contexts = []
    forward = ControlNet.forward
    monkeypatch.setattr(
        ControlNet,
        "forward",
        lambda self, x, hint, t, context, *rest: contexts.append(context) or forward(self, x, hint, t, context, *rest),
    )
    generate(pipeline, request)
    identity = face_analysis.identity(find_module("instant_id_face_embedding"), folder, portrait(), 512)
    with torch.no_grad():
        face = adapter.identity_tokens(torch.from_numpy(identity)[None])[0]
        none = adapter.identity_tokens(torch.zeros(1, 512))[0]
    assert len(contexts) == 2 and all(c.shape == (2, 16, model.cfg.unet.context_dim) for c in contexts)
    for context in contexts:  # (each step: one row of the prompt, one unconditional)
        rows = sorted(
            ("face" if torch.allclose(r, face, atol=1e-5) else "none" if torch.allclose(r, none, atol=1e-5) else "?")
            for r in context
        )
        assert rows == ["face", "none"]

    with pytest.raises(
        RequestError, match="an InstantID ControlNet reads the face's tokens of an InstantID IP-Adapter"
    ):
        generate(pipeline, dataclasses.replace(request, controls=[keypoints_unit]))


def wide_context_model():
    """The tiny SD 1.x model with a 64-wide text encoder and context: FaceID plus's perceiver has context/64 heads."""
    cfg = tiny_config("sd1")
    cfg.text = dataclasses.replace(cfg.text, width=64, mlp_width=128)
    cfg.unet = dataclasses.replace(cfg.unet, context_dim=64)
    with seeded(4):
        return randomize(LatentDiffusion(cfg), seed=4).eval()


@pytest.mark.parametrize("name", ["ip-adapter-faceid-plus_sd15", "ip-adapter-faceid-plusv2_sd15"])
def test_txt2img_with_a_faceid_plus_unit_matches_diffusers(tmp_path, name):
    """FaceID plus: the identity's tokens refined by a perceiver on clip_h's penultimate states of the unit's whole
    image (as the extension's `face_id_plus` makes them), plus the identity's tokens themselves in v2 (the file's name
    says v2: the extension's `shortcut`); the unconditional rows a zero identity's on a zero image's states. Against
    diffusers' pipeline with its FaceID plus projection given the same CLIP states (its `clip_embeds`)."""
    model = wide_context_model()
    controls, towers = tmp_path / "ControlNet", tmp_path / "clip_vision"
    controls.mkdir(), towers.mkdir()
    tower = tiny_tower_file(towers)
    parts = tencent_file(identity_adapter("faceid_plus", model), controls / f"{name}.bin")
    adapter = load_ip_adapter(controls / f"{name}.bin")
    assert (adapter.cfg.kind, adapter.cfg.shortcut) == ("faceid_plus", "v2" in name)
    folder = packs(tmp_path / "annotators")
    image = torch.from_numpy(portrait()).permute(2, 0, 1)[None].float() / 255
    weight = 0.9
    unit = ControlUnit(name, image, module="ip-adapter_face_id_plus", weight=weight)
    request = GenerationRequest([PROMPT], [3], [NEGATIVE], width=W, height=H, controls=[unit], **SETTINGS)
    request = dataclasses.replace(request, steps=STEPS)
    pipeline = Pipeline(model, controlnets=find_control_models(controls), clip_vision=towers, annotators=folder)
    ours = generate(pipeline, request).images

    face = face_analysis.identity(find_module("ip-adapter_face_id_plus"), folder, portrait(), 512)
    identity = torch.from_numpy(face)[None, None]  # (1, 1, 512)
    pipe = diffusers_pipeline(model, StableDiffusionPipeline)
    pipe.unet._load_ip_adapter_weights([parts])
    pipe.set_ip_adapter_scale(weight)
    with torch.no_grad():
        no_mask = np.zeros(image.shape[-2:], np.uint8)
        seen = tower(pixel_values=reference_pixels(image, no_mask), output_hidden_states=True).hidden_states[-2]
        none = tower(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds, projection.shortcut = torch.cat([none, seen])[:, None], "v2" in name
        theirs = diffusers_images(pipe, model, identity)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    plain = generate(model, dataclasses.replace(request, controls=[])).images
    assert (ours - plain).abs().max() > 0.05


def test_a_faceid_unit_through_the_server_with_ip_adapter_auto(tmp_path, serve):
    """A web UI client's FaceID unit with module ip-adapter-auto, through a real socket: the model's kind picks the
    face module, and no CLIP tower is asked for (none is in the pipeline)."""
    from PIL import Image

    from latent_diffusion.serving.server import create_app
    from test_controlnet_api import b64
    from test_server import call

    model = tiny_model("sd1", seed=3)
    controls = tmp_path / "ControlNet"
    controls.mkdir()
    tencent_file(identity_adapter("faceid", model), controls / "ip-adapter-faceid_sd15.bin")
    pipeline = Pipeline(model, controlnets=find_control_models(controls), annotators=packs(tmp_path / "annotators"))
    unit = {"enabled": True, "module": "ip-adapter-auto", "model": "ip-adapter-faceid_sd15", "weight": 0.8}
    unit["image"] = b64(Image.fromarray(portrait()))
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "width": W, "height": H}
    with serve(create_app(pipeline, controlnet_dir=controls)) as base:
        status, answer = call(base, "/sdapi/v1/txt2img", body | {"alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        plain = call(base, "/sdapi/v1/txt2img", body)[1]
    assert status == 200 and answer["images"][0] != plain["images"][0]


def test_instant_id_requests_with_different_faces_share_a_batch(tmp_path):
    """Two InstantID requests (adapter and ControlNet units) with different faces, one a batch of two: their plans'
    batch keys are equal, and the merged batch draws each request's images: every row's ControlNet reads its own
    face's tokens."""
    from latent_diffusion.pipeline.generate import generate_plan
    from latent_diffusion.pipeline.plan import merge, resolve

    model = tiny_model("sd1", seed=3)
    controls = tmp_path / "ControlNet"
    controls.mkdir()
    tencent_file(identity_adapter("instantid", model), controls / "ip-adapter_instant_id_sd15.bin")
    with seeded(2):
        state = randomize(ControlNet(model.cfg.unet), seed=2).state_dict()
    save_file(state, controls / "control_instant_id_sd15.safetensors")
    pipeline = Pipeline(model, controlnets=find_control_models(controls), annotators=packs(tmp_path / "annotators"))
    plans = []
    for seeds, flip in (([3], False), ([4, 5], True)):
        face = portrait()[:, ::-1].copy() if flip else portrait()  # (the faces, and so their tokens, differ)
        image = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255
        units = [
            ControlUnit("ip-adapter_instant_id_sd15", image, module="instant_id_face_embedding"),
            ControlUnit("control_instant_id_sd15", image, module="instant_id_face_keypoints"),
        ]
        request = GenerationRequest([PROMPT] * len(seeds), seeds, width=W, height=H, steps=2,
                                    batch_size=len(seeds), controls=units)  # fmt: skip
        plans.append(resolve(request, pipeline))
    assert plans[0].batch_key() == plans[1].batch_key()
    alone = torch.cat([generate_plan(plan).images for plan in plans])
    together = generate_plan(merge(plans)).images
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert not torch.equal(*(plan.controls[0].image_tokens[0] for plan in plans))
