"""`ldm serve`'s VAE endpoints and option, and unloading and reloading the models, through a real socket: the image
after `sd_vae` equals the library's with that VAE file loaded over the checkpoint's autoencoder, and "None" gives the
checkpoint's own back."""

import base64
import io

import torch
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.serving.server import create_app
from test_server import call

from conftest import randomize

BODY = {"prompt": "a red circle", "seed": 4, "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}


def served_image(base: str) -> tuple[torch.Tensor, str]:
    status, answer = call(base, "/sdapi/v1/txt2img", BODY)
    assert status == 200, answer
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB")
    return torch.tensor(list(image.getdata())), answer["info"]


def library_image(ckpt, vae=None) -> torch.Tensor:
    request = GenerationRequest(["a red circle"], [4], steps=2, width=32, height=32, sampler="euler", cfg_scale=7.0)
    images = generate(load_pipeline(ckpt, vae=vae), request).images
    as_8_bit = (images[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return as_8_bit.reshape(-1, 3).to(torch.int64)


def test_sd_vae_lists_chooses_and_returns_to_the_checkpoints_own(ckpt, serve, tmp_path, tiny_models):
    folder = tmp_path / "VAE"
    folder.mkdir()
    vae = randomize(AutoencoderKL(tiny_models["sd1"].cfg.autoencoder), seed=9)
    save_file(vae.state_dict(), folder / "sharp.safetensors")
    with serve(create_app(load_pipeline(ckpt), vae_dir=folder)) as base:
        assert call(base, "/sdapi/v1/sd-vae") == (200, [{"model_name": "sharp.safetensors",
                                                         "filename": str(folder / "sharp.safetensors")}])  # fmt: skip
        assert call(base, "/sdapi/v1/options")[1]["sd_vae"] == "Automatic"
        own, _ = served_image(base)

        assert call(base, "/sdapi/v1/options", {"sd_vae": "sharp.safetensors"}) == (200, {"ignored": []})
        assert call(base, "/sdapi/v1/options")[1]["sd_vae"] == "sharp.safetensors"
        sharp, info = served_image(base)
        assert "VAE: sharp.safetensors" in info and "VAE hash: " in info
        assert torch.equal(sharp, library_image(ckpt, vae=folder / "sharp.safetensors"))
        assert not torch.equal(sharp, own)

        status, answer = call(base, "/sdapi/v1/options", {"sd_vae": "blurry.pt"})
        assert (
            status == 422
            and "sd_vae: no VAE 'blurry.pt' here; these are: Automatic, None, sharp.safetensors" in (answer["detail"])
        )
        assert call(base, "/sdapi/v1/options")[1]["sd_vae"] == "sharp.safetensors"

        assert call(base, "/sdapi/v1/options", {"sd_vae": "None"})[0] == 200
        back, info = served_image(base)
        assert torch.equal(back, own) and torch.equal(back, library_image(ckpt)) and "VAE:" not in info

        save_file(vae.state_dict(), folder / "later.safetensors")
        assert call(base, "/sdapi/v1/refresh-vae", {}) == (200, {})
        assert [row["model_name"] for row in call(base, "/sdapi/v1/sd-vae")[1]] == [
            "later.safetensors",
            "sharp.safetensors",
        ]


def test_a_file_that_is_not_an_autoencoder_is_a_422_and_the_old_one_stays(ckpt, serve, tmp_path):
    folder = tmp_path / "VAE"
    folder.mkdir()
    save_file({"encoder.conv_in.weight": torch.zeros(3, 3, 3, 3)}, folder / "broken.safetensors")
    with serve(create_app(load_pipeline(ckpt), vae_dir=folder)) as base:
        own, _ = served_image(base)
        status, answer = call(base, "/sdapi/v1/options", {"sd_vae": "broken.safetensors"})
        assert status == 422 and answer["detail"].startswith("sd_vae broken.safetensors: not an autoencoder of this")
        assert str(folder) not in answer["detail"]  # (the server's path stays its own)
        assert call(base, "/sdapi/v1/options")[1]["sd_vae"] == "Automatic"
        assert torch.equal(served_image(base)[0], own)


def test_unload_moves_the_models_off_and_the_next_job_brings_them_back(ckpt, serve):
    """On this CPU machine the models stay on the CPU (a GPU's would move); what is shown is the bookkeeping: unload
    parks them where they were, a job or /reload-checkpoint brings them back, and the images are as before."""
    app = create_app(load_pipeline(ckpt))
    models = app.app.state.server.models
    with serve(app) as base:
        before, _ = served_image(base)
        assert call(base, "/sdapi/v1/unload-checkpoint", {}) == (200, {})
        assert call(base, "/sdapi/v1/unload-checkpoint", {}) == (200, {})  # (twice: it remembers the first place)
        assert models.parked == torch.device("cpu")
        after, _ = served_image(base)
        assert models.parked is None and torch.equal(before, after)
        assert call(base, "/sdapi/v1/unload-checkpoint", {}) == (200, {})
        assert call(base, "/sdapi/v1/reload-checkpoint", {}) == (200, {})
        assert models.parked is None
        assert call(base, "/sdapi/v1/reload-checkpoint", {}) == (200, {})
        assert torch.equal(served_image(base)[0], before)


def test_show_progress_type_chooses_the_preview(ckpt, serve, monkeypatch):
    """Full decodes the x0 estimate; Approx cheap takes the family's linear map where there is one (here a stand-in,
    the tiny model's autoencoder being none of a family's); Approx NN and TAESD, which need weights, are accepted
    and named in `ignored`; anything else is a 422."""
    from latent_diffusion.serving import server

    cheap = torch.zeros(3, 4, 4)
    monkeypatch.setattr(server, "cheap_preview", lambda model, latent: cheap)
    app = create_app(load_pipeline(ckpt))
    state = app.app.state.server
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with serve(app) as base:
        assert call(base, "/sdapi/v1/options")[1]["show_progress_type"] == "Approx cheap"
        shown = Image.open(io.BytesIO(base64.b64decode(state.preview_of(latent))))
        assert shown.size == (4, 4) and set(shown.convert("RGB").getdata()) == {(128, 128, 128)}
        assert call(base, "/sdapi/v1/options", {"show_progress_type": "Full"}) == (200, {"ignored": []})
        state.preview = None
        full = Image.open(io.BytesIO(base64.b64decode(state.preview_of(latent))))
        assert full.size == (32, 32)  # (the tiny autoencoder's 8x)
        assert call(base, "/sdapi/v1/options", {"show_progress_type": "TAESD"}) == (
            200,
            {"ignored": ["show_progress_type"]},
        )
        status, answer = call(base, "/sdapi/v1/options", {"show_progress_type": "Sharp"})
        assert status == 422 and "show_progress_type: one of Full, Approx cheap, Approx NN, TAESD" in answer["detail"]
