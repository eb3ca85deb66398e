"""`ldm serve` through a real socket: a uvicorn server on a loopback port, spoken to with an HTTP client, answering
the web UI's API paths and shapes; bad input is a 422 and the next good request is served."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from latent_diffusion import save_model
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.loading import load_pipeline
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.serving.server import ServerLimits, create_app


@pytest.fixture(scope="module")
def server(ckpt, serve):
    """(base URL, the served pipeline)."""
    pipeline = load_pipeline(ckpt)
    with serve(create_app(pipeline)) as base:
        yield base, pipeline


def call(base: str, path: str, body=None, raw: bytes | None = None, auth: str | None = None) -> tuple[int, object]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_lists_and_options(server):
    base, _ = server
    status, samplers = call(base, "/sdapi/v1/samplers")
    assert (
        status == 200
        and {"name": "DPM++ 2M SDE", "aliases": ["dpmpp_2m_sde"], "options": {"scheduler": "exponential"}} in samplers
    )
    status, schedulers = call(base, "/sdapi/v1/schedulers")
    assert status == 200 and [s["name"] for s in schedulers][:3] == ["automatic", "uniform", "karras"]
    status, models = call(base, "/sdapi/v1/sd-models")
    assert status == 200 and models[0]["model_name"] == "tiny" and models[0]["title"].startswith("tiny.safetensors [")
    assert call(base, "/sdapi/v1/options")[1]["sd_model_checkpoint"] == models[0]["title"]
    status, progress = call(base, "/sdapi/v1/progress")
    assert status == 200 and progress["progress"] == 0.0 and progress["state"]["sampling_steps"] == 0
    assert call(base, "/sdapi/v1/interrupt", {}) == (200, {})


def test_txt2img_answers_as_the_web_ui_and_equals_the_library(server):
    base, model = server
    body = {"prompt": "a red (circle:1.2)", "negative_prompt": "blue", "seed": 7, "steps": 3, "width": 32,
            "height": 24, "batch_size": 2, "n_iter": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "cfg_scale": 5, "enable_hr": False, "styles": [], "restore_faces": True, "script_args": [],
            "alwayson_scripts": {}, "denoising_strength": 0.75}  # fmt: skip
    status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["ignored"] == ["restore_faces"]
    assert (info["width"], info["height"], info["sampler_name"], info["cfg_scale"]) == (32, 24, "DPM++ 2M", 5.0)
    assert answer["parameters"]["seed"] == 7 and answer["parameters"]["restore_faces"] is True
    images = [decode(b) for b in answer["images"]]
    assert [im.size for im in images] == [(32, 24)] * 4
    assert [im.text["parameters"] for im in images] == info["infotexts"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]

    library = generate(model, GenerationRequest(["a red (circle:1.2)"] * 4, [7, 8, 9, 10], negative_prompts=["blue"] * 4,
                                                width=32, height=24, steps=3, cfg_scale=5.0, batch_size=2))  # fmt: skip
    expected = (library.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(im.tobytes() == e.tobytes() for im, e in zip(images, expected))

    status, png = call(base, "/sdapi/v1/png-info", {"image": "data:image/png;base64," + answer["images"][2]})
    assert status == 200 and png["info"] == info["infotexts"][2] and png["parameters"]["Seed"] == "9"


def test_web_ui_defaults_where_the_request_says_nothing(server):
    base, model = server
    status, answer = call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "seed": 3})
    info = json.loads(answer["info"])
    assert status == 200 and info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0  # the web UI's
    assert (info["width"], info["height"]) == (model.model.cfg.default_size,) * 2  # the model's


@pytest.mark.parametrize(
    "body,message",
    [
        ({"prompt": "x", "sampler_name": "DPM fast"}, "unknown sampler 'DPM fast'; choose one of DDPM, DDIM"),
        ({"prompt": "x", "width": 100000}, "at most 2048 on this server, not 100000"),
        ({"prompt": "x", "steps": 1000}, "steps must be at most 300"),
        ({"prompt": "x", "scheduler": "linear"}, "unknown scheduler 'linear'"),
        ({"prompt": "x", "batch_size": 100, "n_iter": 100}, "batch_size × n_iter must be between 1 and 64"),
        ({"prompt": "<lora:nothing:1>"}, "names no LoRA file here"),
        ({"prompt": "<lora:nothing:1e30>"}, "prompt: <lora:nothing> at a weight of 1e+30 is beyond ±100"),
        ({"prompt": "<lora:nothing:1:unet=-1e30>"}, "prompt: <lora:nothing> at a weight of -1e+30 is beyond ±100"),
        ({"prompt": "x", "steps": "many"}, None),
        ({"prompt": "x", "cfg_scale": "nan"}, "cfg_scale must be between -100 and 100, not nan"),
        ({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": True}}, "CLIP_stop_at_last_layers: a whole"),
        ({"prompt": "x", "refiner_switch_at": float("nan")}, "refiner_switch_at must be in [0, 1], not nan"),
        ({"prompt": "x", "negative_prompt": "y" * 20_001}, "prompt: 20001 characters, over this server's limit of"),
    ],
)  # fmt: skip
def test_bad_input_is_a_422_and_the_server_goes_on(server, body, message):
    base, _ = server
    status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert status == 422
    if message:
        assert message in answer["detail"]
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "seed": 1})[0] == 200


def test_malformed_json_and_images_are_422(server):
    base, _ = server
    assert call(base, "/sdapi/v1/txt2img", raw=b"{not json")[0] == 422
    status, answer = call(base, "/sdapi/v1/png-info", {"image": "not base64!"})
    assert status == 422 and "not a base64-encoded image" in answer["detail"]
    status, answer = call(base, "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["aGVsbG8=é"]})  # not ASCII
    assert status == 422 and answer["detail"] == "init_images[0]: not a base64-encoded image", answer
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "seed": 1})[0] == 200


def png_b64(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_img2img_and_inpainting_equal_the_library(server):
    base, model = server
    picture = Image.new("RGB", (48, 40), (200, 30, 40))
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (0, 0, 24, 40))
    common = {"prompt": "a cat", "seed": 4, "steps": 4, "width": 32, "height": 32, "denoising_strength": 0.5}
    status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": [png_b64(picture)]})
    assert status == 200, answer
    resized = torch.from_numpy(
        np.asarray(picture.resize((32, 32), Image.Resampling.LANCZOS), dtype="float32") / 255
    ).permute(2, 0, 1)[None]
    library = generate(model, GenerationRequest(["a cat"], [4], steps=4, strength=0.5, init_image=resized,
                                                cfg_scale=7.0, sampler="euler"))  # fmt: skip
    expected = (library.images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert decode(answer["images"][0]).tobytes() == expected.tobytes()
    assert "Denoising strength: 0.5" in json.loads(answer["info"])["infotexts"][0]

    # Whole picture, no blur, the original under the mask: the library's inpainting, laid in through the mask.
    plain = {"inpaint_full_res": False, "mask_blur": 0, "inpainting_fill": 1, "inpainting_mask_invert": 1}
    status, answer = call(base, "/sdapi/v1/img2img", {**common, **plain, "mask": png_b64(mask),
                                                      "init_images": ["data:image/png;base64," + png_b64(picture)]})  # fmt: skip
    assert status == 200 and json.loads(answer["info"])["ignored"] == [], answer
    inverted = Image.eval(mask, lambda v: 255 - v).resize((32, 32), Image.Resampling.LANCZOS)
    library = generate(model, GenerationRequest(["a cat"], [4], steps=4, strength=0.5, init_image=resized,
                                                mask=torch.from_numpy(np.asarray(inverted, dtype="float32") / 255)[None, None],
                                                cfg_scale=7.0, sampler="euler"))  # fmt: skip
    expected = (library.images[0] * 255).round().permute(1, 2, 0).numpy()
    inpainted = np.asarray(decode(answer["images"][0])).astype(int)
    assert np.abs(inpainted - expected).max() <= 1  # laid in by PIL in 8 bits here, in float32 by the library
    assert (inpainted[:, :10] == np.asarray(picture.resize((32, 32), Image.Resampling.LANCZOS))[:, :10]).all()

    # The web UI's defaults: only the box around the blurred mask is worked on, and the answer is the whole
    # picture at its own size, unchanged where the blurred mask is 0.
    small = Image.new("L", (48, 40), 0)
    small.paste(255, (30, 8, 38, 16))
    status, answer = call(
        base, "/sdapi/v1/img2img", {**common, "mask": png_b64(small), "init_images": [png_b64(picture)]}
    )
    assert status == 200 and json.loads(answer["info"])["ignored"] == [], answer
    whole = np.asarray(decode(answer["images"][0]))
    assert whole.shape == (40, 48, 3)
    far = np.ones((40, 48), dtype=bool)
    far[: 16 + 10, 30 - 10 :] = False  # the blur (σ 4) reaches 10 pixels
    assert (whole[far] == (200, 30, 40)).all() and (whole[10:14, 32:36] != (200, 30, 40)).any()
    assert call(base, "/sdapi/v1/img2img", {**common, "init_images": []})[0] == 422
    status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": ["aGVsbG8="]})
    assert status == 422 and answer["detail"].startswith("init_images[0]: cannot read the image")
    assert " object at 0x" not in answer["detail"], answer  # Pillow's message holds the BytesIO's repr


def test_api_auth_and_body_limit(ckpt, serve):
    """--api-auth: a wrong or missing password is a 401 and the right one is served; a body over the limit is a 413
    before it is read."""
    with serve(create_app(load_pipeline(ckpt), api_auth="me:secret", limits=ServerLimits(max_body=2000))) as base:
        assert call(base, "/sdapi/v1/samplers")[0] == 401
        assert call(base, "/sdapi/v1/samplers", auth="me:wrong")[0] == 401
        assert call(base, "/sdapi/v1/samplers", auth="me:secret")[0] == 200
        status, answer = call(base, "/sdapi/v1/txt2img", {"prompt": "x" * 5000}, auth="me:secret")
        assert status == 413 and "over 2000 bytes" in answer["detail"]
        chunks = [b'{"prompt": "' + b"x" * 1000, b"x" * 1000, b"x" * 1000 + b'"}', b""]  # no Content-Length
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as client:
            client.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                           b"Authorization: Basic bWU6c2VjcmV0\r\nContent-Type: application/json\r\n\r\n" + body)  # fmt: skip
            answer = client.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 413") and b"over 2000 bytes" in answer
        assert call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1}, auth="me:secret")[0] == 200
        # A header that base64 cannot read (a non-ASCII character, sent as Latin-1) is a wrong password, not a 500.
        request = urllib.request.Request(base + "/sdapi/v1/samplers", headers={"Authorization": "Basic bWU6c2VjcmV0é"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        assert e.value.code == 401


def test_progress_shows_a_preview_and_interrupt_stops_the_job(server):
    """While a job runs, /progress reports its step and a preview image of the model's size; /interrupt ends it
    early, and the answer says so, with the image the running batch had got to (as the web UI answers)."""
    base, model = server
    answer = {}
    job = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 300, "seed": 1, "n_iter": 2}))
    ))  # fmt: skip
    job.start()
    deadline = time.monotonic() + 60
    while (progress := call(base, "/sdapi/v1/progress")[1])["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and job.is_alive(), "the job made no progress"
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 300  # per job, as the web UI
    assert (progress["state"]["job_count"], progress["state"]["job_no"]) == (2, 0)
    assert decode(progress["current_image"]).size == (model.model.cfg.default_size,) * 2
    assert call(base, "/sdapi/v1/interrupt", {}) == (200, {})
    job.join(timeout=60)
    info = json.loads(answer["body"]["info"])
    assert answer["status"] == 200 and info["interrupted"] and len(answer["body"]["images"]) == 1
    assert info["all_seeds"] == [1] and "Seed: 1" in info["infotexts"][0]
    assert decode(answer["body"]["images"][0]).size == (model.model.cfg.default_size,) * 2
    assert call(base, "/sdapi/v1/progress")[1]["state"]["sampling_steps"] == 0


def test_skip_ends_the_running_batch_and_the_job_goes_on(server):
    """/skip (the web UI's Skip): the running batch answers with what it had got to, the next one runs whole, and the
    job is not interrupted. /memory reports the host's RAM and says why there is no CUDA report here."""
    base, pipeline = server
    answer = {}
    body = {"prompt": "x", "steps": 40, "seed": 1, "n_iter": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
    job = threading.Thread(target=lambda: answer.update(zip(("status", "body"), call(base, "/sdapi/v1/txt2img", body))))
    job.start()
    deadline = time.monotonic() + 60
    while call(base, "/sdapi/v1/progress")[1]["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline and job.is_alive(), "the job made no progress"
        time.sleep(0.02)
    assert call(base, "/sdapi/v1/skip", {}) == (200, {})
    job.join(timeout=120)
    info = json.loads(answer["body"]["info"])
    assert answer["status"] == 200 and not info["interrupted"] and info["all_seeds"] == [1, 2]
    library = generate(pipeline, GenerationRequest(["x"], [2], width=32, height=32, steps=40, sampler="euler",
                                                   cfg_scale=7.0)).images[0]  # fmt: skip
    second = np.asarray(decode(answer["body"]["images"][1])).astype(int)
    assert np.abs(second - (library * 255).round().permute(1, 2, 0).numpy().astype(int)).max() <= 1
    memory = call(base, "/sdapi/v1/memory")[1]
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "error" in memory["cuda"]


def test_clients_whose_prompts_differ_in_length_are_not_batched_together(server):
    """A long prompt (two 77-token chunks) and short ones at once: a shared batch would pad the short contexts,
    which changes their images, so each is answered with the image it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    base, _ = server
    long = "a cat, " * 40
    bodies = [{"prompt": long if seed % 2 else "a cat", "steps": 2, "width": 32, "height": 32, "seed": seed}
              for seed in range(8)]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: call(base, "/sdapi/v1/txt2img", body), bodies))
    assert [status for status, _ in answers] == [200] * 8
    for body, (_, answer) in zip(bodies, answers):
        again = call(base, "/sdapi/v1/txt2img", body)[1]
        a, b = (np.asarray(decode(x["images"][0]), dtype=int) for x in (answer, again))
        assert np.abs(a - b).max() <= 1, body["seed"]


def test_concurrent_clients_are_batched_and_each_gets_its_image_and_a_full_queue_is_a_503(server, ckpt, serve):
    """16 clients at once with distinct seeds: all answered, requests merged into shared U-Net batches (counted),
    and each image the one its seed gives alone: every pixel within one 8-bit level. A batched matmul rounds
    floats differently from a batch of one (in the library, image i of a batch of 8 is within 0.003 levels of
    image i alone at this size), which can move a pixel that sits on a rounding boundary by one level. (At 16x16,
    2x2 latents, the tiny model's GroupNorm normalises over 4 numbers and turns such rounding into whole images.) With room for one job, a second request while it
    runs is a 503, and the server serves again once the job is done."""
    from concurrent.futures import ThreadPoolExecutor

    base, _ = server
    body = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda seed: call(base, "/sdapi/v1/txt2img", {**body, "seed": seed}), range(16)))
    assert [status for status, _ in answers] == [200] * 16
    batched = [json.loads(answer["info"])["batched_with"] for _, answer in answers]
    assert max(batched) > 1, batched  # batches formed
    for seed, (_, answer) in enumerate(answers):
        alone = json.loads((again := call(base, "/sdapi/v1/txt2img", {**body, "seed": seed})[1])["info"])
        assert alone["batched_with"] == 1 and alone["all_seeds"] == [seed]
        a, b = (np.asarray(decode(x["images"][0]), dtype=int) for x in (answer, again))
        assert np.abs(a - b).max() <= 1, seed

    with serve(create_app(load_pipeline(ckpt), limits=ServerLimits(max_queue=1))) as small:
        job = threading.Thread(target=call, args=(small, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 300, "seed": 1}))
        job.start()
        deadline = time.monotonic() + 60
        while call(small, "/sdapi/v1/progress")[1]["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline and job.is_alive(), "the job made no progress"
            time.sleep(0.05)
        status, answer = call(small, "/sdapi/v1/txt2img", {"prompt": "y", "steps": 1, "seed": 2})
        assert status == 503 and "the queue is full (1 jobs)" in answer["detail"]
        call(small, "/sdapi/v1/interrupt", {})
        job.join(timeout=60)
        assert call(small, "/sdapi/v1/txt2img", {"prompt": "y", "steps": 1, "seed": 2})[0] == 200


def test_a_lora_reaches_only_the_images_of_the_requests_that_name_it(ckpt, serve, tmp_path):
    """Clients with and without <lora:...> at once: merged into one U-Net batch, the untagged ones sampled on the
    tagged ones' merged weights (22 of 30 images changed, by up to 253 levels). Jobs of different LoRA sets never
    share merged weights: each image is the one its request gets alone, within one 8-bit level (see above)."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    pipeline = load_pipeline(ckpt)
    proj_in = pipeline.model.unet.input_blocks[1][1].proj_in.weight  # (out, in, 1, 1)
    g, key = torch.Generator().manual_seed(0), "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(2, proj_in.shape[1], 1, 1, generator=g),
               f"{key}.lora_up.weight": torch.randn(proj_in.shape[0], 2, 1, 1, generator=g),
               f"{key}.alpha": torch.tensor(2.0)}, tmp_path / "style.safetensors")  # fmt: skip
    pipeline.loras = {"style": tmp_path / "style.safetensors"}
    bodies = [{"prompt": "a cat <lora:style:1>" if seed % 3 == 0 else "a cat", "steps": 2, "width": 32,
               "height": 32, "seed": seed} for seed in range(12)]  # fmt: skip
    with serve(create_app(pipeline)) as base:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda body: call(base, "/sdapi/v1/txt2img", body), bodies))
        assert [status for status, _ in answers] == [200] * 12
        assert max(json.loads(answer["info"])["batched_with"] for _, answer in answers) > 1  # batches formed
        alone = [call(base, "/sdapi/v1/txt2img", body)[1] for body in bodies]
        untagged = call(base, "/sdapi/v1/txt2img", {**bodies[0], "prompt": "a cat"})[1]
        status, answer = call(base, "/sdapi/v1/txt2img", {**bodies[0], "prompt": "a cat <lora:style:1e30>"})
        assert status == 422 and "beyond ±100" in answer["detail"], answer  # (merged, it drove the latents to NaN)
    pixels = [[np.asarray(decode(a["images"][0]), dtype=int) for a in (answer, again)]
              for (_, answer), again in zip(answers, alone)]  # fmt: skip
    for body, (a, b) in zip(bodies, pixels):
        assert np.abs(a - b).max() <= 1, body
    without = np.asarray(decode(untagged["images"][0]), dtype=int)
    assert np.abs(pixels[0][1] - without).max() > 20  # the LoRA changes an image far beyond one level


def test_each_request_is_resolved_once_and_a_merged_batch_once(ckpt, serve, monkeypatch):
    """Eight clients at once: each request is resolved against the pipeline once (on arrival; the worker takes that
    plan), each prompt's LoRA tags are parsed once, each merged batch is merged once, and generating a plan resolves
    nothing again."""
    from concurrent.futures import ThreadPoolExecutor

    import latent_diffusion.pipeline.generate as generating
    import latent_diffusion.pipeline.plan as plan
    import latent_diffusion.serving.job_queue as job_queue

    resolved, merged, parsed = [], [], []
    real_resolve, real_merge, real_tags = job_queue.resolve, job_queue.merge, plan.extract_lora_tags
    monkeypatch.setattr(job_queue, "resolve", lambda r, p: resolved.append(r.seeds[0]) or real_resolve(r, p))
    monkeypatch.setattr(job_queue, "merge", lambda plans: merged.append(len(plans)) or real_merge(plans))
    monkeypatch.setattr(plan, "extract_lora_tags", lambda text: parsed.append(text) or real_tags(text))
    monkeypatch.setattr(generating, "resolve", None)  # generate_plan must not call it
    body = {"steps": 1, "width": 32, "height": 32}
    app = create_app(load_pipeline(ckpt), limits=ServerLimits(batch_window=1.0))
    with serve(app) as base, ThreadPoolExecutor(8) as pool:
        ask = lambda seed: call(base, "/sdapi/v1/txt2img", {**body, "prompt": f"cat {seed}", "seed": seed})  # noqa: E731
        answers = list(pool.map(ask, range(8)))
    assert [status for status, _ in answers] == [200] * 8
    batched = [json.loads(answer["info"])["batched_with"] for _, answer in answers]
    assert max(batched) > 1 and sorted(resolved) == list(range(8))
    assert sum(merged) == sum(b > 1 for b in batched) and len(merged) == round(sum(1 / b for b in batched if b > 1))
    assert sorted(parsed) == sorted(f"cat {seed}" for seed in range(8))


def bomb_png(width: int, height: int) -> str:
    """A 1x1 PNG whose header claims width x height: decoding it would allocate that much."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return base64.b64encode(bytes(data)).decode()


def test_init_images_are_checked_before_they_are_decoded(server):
    """A decompression bomb is refused from its header; URLs are not fetched."""
    base, _ = server
    common = {"prompt": "x", "steps": 4, "width": 32, "height": 32}
    status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": [bomb_png(5000, 5000)]})
    assert status == 422 and "the image is 5000x5000, over the limit of 16777216 pixels" in answer["detail"]
    status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": ["http://127.0.0.1:1/x.png"]})
    assert status == 422 and "URLs are not fetched" in answer["detail"]
    status, answer = call(base, "/sdapi/v1/png-info", {"image": bomb_png(20000, 20000)})  # over PIL's own limit
    assert status == 422 and "not a base64-encoded image" in answer["detail"]
    thin = png_b64(Image.new("RGB", (1, 4096)))  # covering 256x256 would scale it to 256x1048576
    status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": [thin], "resize_mode": 1,
                                                      "width": 256, "height": 256})  # fmt: skip
    assert status == 422 and "would be over the limit of 16777216 pixels" in answer["detail"]
    picture, mask = png_b64(Image.new("RGB", (32, 32))), png_b64(Image.new("L", (32, 32), 255))
    for extra, message in [({"mask_blur": 65}, "mask_blur must be between 0 and 64"),
                           ({"mask_blur_x": -1}, "mask_blur_x must be between 0 and 64 pixels, not -1"),
                           ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding must be between 0 and 8192"),
                           ({"resize_mode": 3}, "3 (latent upscale) is not implemented")]:  # fmt: skip
        status, answer = call(base, "/sdapi/v1/img2img", {**common, "init_images": [picture], "mask": mask, **extra})
        assert status == 422 and message in answer["detail"], answer
    assert call(base, "/sdapi/v1/txt2img", common)[0] == 200


def test_page_schema_and_cors(server, ckpt, serve):
    """The web page and its files are served from the package (and nothing beside them); the OpenAPI schema is at
    /docs; CORS headers only for the origins named."""
    base, _ = server
    with urllib.request.urlopen(base + "/") as response:
        assert response.status == 200 and b'<script src="/web/app.js">' in response.read()
    with urllib.request.urlopen(base + "/web/app.js") as response:
        assert b"/sdapi/v1/" in response.read()
    for path in ("/web/../server.py", "/web/%2e%2e/server.py"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path)
        assert e.value.code == 404
    with urllib.request.urlopen(base + "/docs") as response:
        assert response.status == 200
    with urllib.request.urlopen(base + "/openapi.json") as response:
        assert "/sdapi/v1/txt2img" in json.loads(response.read())["paths"]

    def preflight(url: str) -> str | None:
        request = urllib.request.Request(url + "/sdapi/v1/txt2img", method="OPTIONS", headers={
            "Origin": "http://127.0.0.1:9999", "Access-Control-Request-Method": "POST"})  # fmt: skip
        try:
            with urllib.request.urlopen(request) as response:
                return response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.headers.get("access-control-allow-origin")

    assert preflight(base) is None
    with serve(
        create_app(load_pipeline(ckpt), cors_allow_origins=["http://127.0.0.1:9999"], api_auth="a:b")
    ) as allowed:
        assert preflight(allowed) == "http://127.0.0.1:9999"  # a preflight carries no credentials: not a 401


def test_models_dir_switching(tmp_path, tiny_models, serve):
    """The checkpoints of --models-dir are listed; POST options switches the loaded one (after the jobs before it);
    override_settings switches for one request; an unknown name is a 404 and the model stays."""
    (tmp_path / "sub").mkdir()
    save_model(tiny_models["sd1"], tmp_path / "tiny.safetensors")
    save_model(tiny_models["sd2"], tmp_path / "sub" / "other.safetensors")
    loads = []

    def load(path):
        loads.append(path.name)
        return load_pipeline(path)

    body = {"prompt": "a cat", "seed": 3, "steps": 2, "width": 32, "height": 32}
    with serve(create_app(load(tmp_path / "tiny.safetensors"), load=load, models_dir=tmp_path)) as base:
        models = call(base, "/sdapi/v1/sd-models")[1]
        assert [m["model_name"] for m in models] == ["tiny", "sub/other"]
        assert models[0]["title"].startswith("tiny.safetensors [") and models[1]["title"] == "sub/other.safetensors"
        first = call(base, "/sdapi/v1/txt2img", body)[1]

        assert call(base, "/sdapi/v1/options", {"sd_model_checkpoint": "sub/other"}) == (200, {"ignored": []})
        assert call(base, "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("sub/other.safetensors [")
        other = call(base, "/sdapi/v1/txt2img", body)[1]
        assert json.loads(other["info"])["sd_model_name"] == "other" and other["images"] != first["images"]

        status, again = call(base, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "tiny"}})
        assert status == 200 and again["images"] == first["images"]
        assert json.loads(call(base, "/sdapi/v1/txt2img", body)[1]["info"])["sd_model_name"] == "other"  # restored

        status, answer = call(base, "/sdapi/v1/options", {"sd_model_checkpoint": "../tiny.safetensors"})
        assert status == 404 and "no checkpoint named '../tiny.safetensors'" in answer["detail"]
        status, answer = call(base, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_model_checkpoint": "nope"}})
        assert status == 404
    assert loads == ["tiny.safetensors", "other.safetensors", "tiny.safetensors", "other.safetensors"]


def test_a_checkpoint_that_cannot_be_loaded_is_a_422_naming_it_as_listed(tmp_path, tiny_models, serve):
    """A damaged file of --models-dir, or one refused (a pickle that would run code), chosen by a client in any of
    the three ways: a 422 naming the checkpoint as the list does, never the server's path; the model serves on."""
    import pickle

    save_model(tiny_models["sd1"], tmp_path / "tiny.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10" + bytes(7) + b"not a header")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": print}))
    body = {"prompt": "a cat", "seed": 3, "steps": 1, "width": 32, "height": 32}
    with serve(
        create_app(load_pipeline(tmp_path / "tiny.safetensors"), load=load_pipeline, models_dir=tmp_path)
    ) as base:
        override = {**body, "override_settings": {"sd_model_checkpoint": "broken"}}
        for path, request, name in [
            ("/sdapi/v1/txt2img", override, "broken.safetensors"),
            ("/sdapi/v1/options", {"sd_model_checkpoint": "sub/evil.ckpt"}, "sub/evil.ckpt"),
            ("/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "broken.safetensors"}, "broken.safetensors"),
        ]:
            status, answer = call(base, path, request)
            assert status == 422 and answer["detail"].startswith(f"checkpoint {name}: "), answer
            assert str(tmp_path) not in json.dumps(answer) and " object at 0x" not in answer["detail"], answer
        assert call(base, "/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("tiny.safetensors [")
        assert call(base, "/sdapi/v1/txt2img", body)[0] == 200


def wait_for_step(base: str, step: int = 1) -> None:
    deadline = time.monotonic() + 60
    while call(base, "/sdapi/v1/progress")[1]["state"]["sampling_step"] < step:
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)


def wait_until_idle(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while call(base, "/sdapi/v1/progress")[1]["state"]["sampling_steps"] != 0:
        assert time.monotonic() < deadline, "the job goes on"
        time.sleep(0.05)


def test_a_client_that_leaves_or_times_out_does_not_leave_its_job_running(ckpt, serve):
    """A job whose client disconnects stops (it would run for minutes); one over the request time is answered 503
    and stopped; the server then serves the next request."""
    long = {"prompt": "x", "steps": 10000, "seed": 1, "width": 32, "height": 32}
    with serve(create_app(load_pipeline(ckpt), limits=ServerLimits(max_steps=10000, request_timeout=3))) as base:
        port = int(base.rsplit(":", 1)[1])
        payload = json.dumps(long).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
            wait_for_step(base)
        wait_until_idle(base, seconds=10)  # the job would run for minutes

        started = time.monotonic()
        status, answer = call(base, "/sdapi/v1/txt2img", long)
        assert status == 503 and "took over 3 s and was cancelled" in answer["detail"]
        assert time.monotonic() - started < 15
        wait_until_idle(base, seconds=10)
        # small, so that a loaded machine answers it well inside the 3 s limit (512x512 took over 3 s once in CI)
        assert call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 32, "height": 32})[0] == 200


def test_an_existing_client_works_unchanged(tmp_path, tiny_models, serve):
    """webuiapi, a published Python client of the web UI's API, with its own defaults for every field of the web
    UI's request model: txt2img, img2img with a mask, the lists, model switching, png-info, progress, interrupt.
    None of the values it sends for fields this server does not implement changes the web UI's result, so
    `ignored` stays empty."""
    import webuiapi

    save_model(tiny_models["sd1"], tmp_path / "tiny.safetensors")
    save_model(tiny_models["sd2"], tmp_path / "other.safetensors")
    first = load_pipeline(tmp_path / "tiny.safetensors")
    with serve(create_app(first, load=load_pipeline, models_dir=tmp_path)) as base:
        api = webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", sampler="Euler a", steps=3)
        result = api.txt2img(prompt="a red (circle:1.2)", seed=5, width=32, height=24, batch_size=2, cfg_scale=6)
        assert [im.size for im in result.images] == [(32, 24)] * 2
        assert result.info["all_seeds"] == [5, 6] and result.info["ignored"] == []
        library = generate(first, GenerationRequest(["a red (circle:1.2)"] * 2, [5, 6], width=32, height=24, steps=3,
                                                    sampler="euler_ancestral", eta=1.0, s_noise=1.0, cfg_scale=6.0,
                                                    batch_size=2))  # fmt: skip
        expected = (library.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert all(im.tobytes() == e.tobytes() for im, e in zip(result.images, expected))
        assert api.png_info(result.image).parameters["Seed"] == "5"

        picture = Image.new("RGB", (32, 32), (200, 30, 40))
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (16, 0, 32, 32))
        result = api.img2img(images=[picture], mask_image=mask, prompt="a cat", seed=2, width=32, height=32)
        assert result.image.size == (32, 32)
        assert (np.asarray(result.image)[:, :6] == (200, 30, 40)).all()  # the mask blurred by 4 reaches 10 pixels
        assert result.info["ignored"] == []

        assert sorted(api.util_get_sampler_names())[:3] == ["DDIM", "DDPM", "DPM++ 2M"]
        assert "karras" in api.util_get_scheduler_names()
        assert api.util_get_model_names() == ["other.safetensors", api.util_get_current_model()]
        api.util_set_model("other")
        assert api.util_get_current_model().startswith("other.safetensors [")
        assert api.txt2img(prompt="x", width=32, height=32).info["sd_model_name"] == "other"
        assert api.get_progress()["state"]["sampling_steps"] == 0 and api.interrupt() == {}
        assert api.get_loras() == [] and api.get_embeddings()["loaded"] == {}
        assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
        assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]


def test_an_inpainting_checkpoint_inpaints_through_the_server(tiny_models, serve):
    """An inpainting model (9 input channels) inpaints with its image and mask (the request checked against the model
    with them, not before they are attached), and draws txt2img as the web UI does."""
    picture = Image.new("RGB", (32, 32), (200, 30, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    with serve(create_app(tiny_models["inpaint"])) as base:
        body = {"prompt": "a cat", "seed": 1, "steps": 2, "width": 32, "height": 32, "init_images": [png_b64(picture)],
                "mask": png_b64(mask), "mask_blur": 0, "inpaint_full_res": False}  # fmt: skip
        status, answer = call(base, "/sdapi/v1/img2img", body)
        assert status == 200, answer
        assert (np.asarray(decode(answer["images"][0]))[:, :14] == (200, 30, 40)).all()
        status, answer = call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 32, "height": 32})
        assert status == 200, answer  # (all of it the hole, as the web UI draws txt2img with such a model)


def test_sdxl_with_the_web_ui_refiner_fields(tmp_path, serve):
    """An SDXL checkpoint served, with the web UI's refiner_checkpoint / refiner_switch_at: the image the library
    gives with that refiner; an unknown refiner is a 404; a refiner of another latent space a 422."""
    from latent_diffusion import LatentDiffusion

    from conftest import tiny_config, tiny_model

    base = tiny_model("sdxl", seed=31)
    refiner = tiny_model("sdxl-refiner", seed=32)
    save_model(base, tmp_path / "base.safetensors")
    save_model(refiner, tmp_path / "refiner.safetensors")
    save_model(LatentDiffusion(tiny_config("sd1")), tmp_path / "sd1.safetensors")
    body = {"prompt": "a red circle", "seed": 4, "steps": 4, "width": 32, "height": 32, "sampler_name": "Euler",
            "refiner_checkpoint": "refiner", "refiner_switch_at": 0.6}  # fmt: skip
    with serve(
        create_app(load_pipeline(tmp_path / "base.safetensors"), load=load_pipeline, models_dir=tmp_path)
    ) as url:
        status, answer = call(url, "/sdapi/v1/txt2img", body)
        assert status == 200, answer
        info = json.loads(answer["info"])
        assert "Refiner switch at: 0.6" in info["infotexts"][0] and "refiner" not in str(info.get("ignored"))
        request = GenerationRequest(["a red circle"], [4], width=32, height=32, steps=4, sampler="euler",
                                    cfg_scale=7.0, refiner_switch=0.6)  # fmt: skip
        expected = generate(load_pipeline(tmp_path / "base.safetensors", refiner=tmp_path / "refiner.safetensors"),
                            request).images  # fmt: skip
        got = torch.from_numpy(np.asarray(decode(answer["images"][0]), dtype=np.float32) / 255).permute(2, 0, 1)
        assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6
        assert call(url, "/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "nope"})[0] == 404
        status, answer = call(url, "/sdapi/v1/txt2img", {**body, "refiner_switch_at": 3})
        assert status == 422 and "refiner_switch" in answer["detail"]
        status, answer = call(url, "/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "sd1"})
        assert status == 422 and "latent space" in answer["detail"]
        assert call(url, "/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "None"})[0] == 200  # the web UI's none


def test_odd_but_harmless_input_is_answered_and_hostile_input_is_a_422(server):
    """Found by a review against a live server: each of these was a 500 (or, for EPS, a file handed to
    Ghostscript). Echoed values that JSON cannot hold come back as null or escaped; base64 broken into lines (as
    base64 tools write it) is read, as the web UI reads it; a mask of another size covers the same picture."""
    base, _ = server
    small = {"prompt": "x", "steps": 1, "seed": 1, "width": 32, "height": 32}
    status, answer = call(base, "/sdapi/v1/txt2img", small | {"foo": float("nan"), "bar": ["\ud800"]})
    assert status == 200 and answer["parameters"]["foo"] is None and answer["parameters"]["bar"] == ["\ud800"]
    status, answer = call(base, "/sdapi/v1/txt2img", small | {"styles": ["\ud800"]})  # (styles are read now)
    assert status == 422 and answer["detail"].startswith("styles: no style '\\ud800' here")  # (the message's repr)
    assert call(base, "/sdapi/v1/options", {"\ud800": 1})[0] == 200
    for body, message in (
        (small | {"cfg_scale": 1e30}, "cfg_scale must be between -100 and 100"),
        (small | {"s_noise": 1e308, "sampler_name": "Euler a"}, "s_noise must be between 0 and 10"),
        (small | {"prompt": "(" * 3000 + "a" + ")" * 3000}, "emphasis weight of 1.51e+124 is beyond ±1000"),
    ):
        status, answer = call(base, "/sdapi/v1/txt2img", body)
        assert status == 422 and message in answer["detail"], answer
    picture = Image.new("RGB", (64, 64), (200, 30, 40))
    lines = base64.encodebytes(base64.b64decode(png_b64(picture))).decode()  # a newline every 76 characters
    mask = Image.new("L", (32, 16), 0)
    mask.paste(255, (0, 0, 16, 16))
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [lines + "\n"], "mask": png_b64(mask),
                                                              "width": 64, "height": 64, "steps": 2})  # fmt: skip
    assert status == 200 and decode(answer["images"][0]).size == (64, 64)
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [png_b64(picture)],
                                                              "mask": png_b64(mask),
                                                              "inpaint_full_res_padding": 2**63})  # fmt: skip
    assert status == 422 and "inpaint_full_res_padding must be between 0 and 8192" in answer["detail"]
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n").decode()
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [eps]})
    assert status == 422 and "cannot read the image" in answer["detail"] and "Ghostscript" not in answer["detail"]
    lab = io.BytesIO()
    Image.new("LAB", (32, 32)).save(lab, format="TIFF")  # a mode Pillow converts to no greyscale
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [png_b64(picture)],
                                                              "mask": base64.b64encode(lab.getvalue()).decode()})  # fmt: skip
    assert status == 422 and answer["detail"].startswith("mask: a LAB image"), answer
    huge_text = PngImagePlugin.PngInfo()
    huge_text.add_text("parameters", "x" * (2 << 20), zip=True)  # decompresses beyond Pillow's limit
    status, answer = call(base, "/sdapi/v1/png-info", {"image": png_b64(picture, pnginfo=huge_text)})
    assert status == 422
    assert call(base, "/sdapi/v1/txt2img", small)[0] == 200


def test_deeply_nested_json_is_a_422_before_any_work(server):
    """JSON nested some hundred levels deep in a field this server does not read parses, but echoing it back (and
    checking it for NaN) recursed past Python's limit: a 500 once the images were made. It is refused first."""
    base, _ = server
    deep = b"[" * 900 + b"]" * 900
    small = b'"prompt": "x", "steps": 1, "seed": 1, "width": 32, "height": 32'
    for path, body, field in [
        ("/sdapi/v1/txt2img", b"{" + small + b', "alwayson_scripts": {"a": ' + deep + b"}}", "alwayson_scripts"),
        ("/sdapi/v1/txt2img", b"{" + small + b', "override_settings": {"a": ' + deep + b"}}", "override_settings"),
        ("/sdapi/v1/img2img", b"{" + small + b', "init_images": ["x"], "foo": ' + deep + b"}", "foo"),
    ]:
        status, answer = call(base, path, raw=body)
        assert status == 422 and answer["detail"].startswith(f"{field}: nested over 64 levels deep"), answer
    nested = {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "image": {"image": "x"}}]}}}
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, **nested})[0] == 200  # as clients send


def test_answers_have_the_web_uis_shape(server):
    """png-info's parameters in the web UI's keys (Prompt, Size-1, ...) and items without the infotext; img2img's
    parameters without the images the client sent (unless include_init_images); a null seed is a random one."""
    base, _ = server
    small = {"prompt": "a (red:1.2) cat", "negative_prompt": "dull", "steps": 2, "seed": 4, "width": 32, "height": 24}
    status, answer = call(base, "/sdapi/v1/txt2img", small)
    status, png = call(base, "/sdapi/v1/png-info", {"image": answer["images"][0] + "\n"})
    assert status == 200 and png["items"] == {} and png["info"] == json.loads(answer["info"])["infotexts"][0]
    assert {k: png["parameters"][k] for k in ("Prompt", "Negative prompt", "Seed", "Size-1", "Size-2")} == {
        "Prompt": "a (red:1.2) cat",
        "Negative prompt": "dull",
        "Seed": "4",
        "Size-1": "32",
        "Size-2": "24",
    }
    picture = png_b64(Image.new("RGB", (32, 24), (9, 99, 199)))
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [picture]})
    assert status == 200 and answer["parameters"]["init_images"] is None and answer["parameters"]["mask"] is None
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [picture], "include_init_images": True})
    assert answer["parameters"]["init_images"] == [picture]
    status, answer = call(base, "/sdapi/v1/img2img", small | {"init_images": [picture, picture]})
    assert status == 422 and "init_images: give one image (base64), not 2" in answer["detail"]
    status, answer = call(base, "/sdapi/v1/txt2img", small | {"seed": None})
    assert status == 200 and 0 <= json.loads(answer["info"])["seed"] < 2**32
    status, answer = call(base, "/sdapi/v1/txt2img", small | {"batch_size": -1, "n_iter": -1})
    assert status == 422 and "batch_size and n_iter must be at least 1, not -1 and -1" in answer["detail"]


def test_a_request_that_goes_non_finite_in_a_shared_batch_fails_alone(ckpt, serve, monkeypatch):
    """If a merged batch turns NaN, each of its jobs runs again alone: the others get their images, and the error
    goes to the one that causes it, with its own seeds only."""
    from concurrent.futures import ThreadPoolExecutor

    import latent_diffusion.serving.job_queue as q

    real = q.generate_plan

    def poisoned(plan, **kw):
        if any("poison" in p for p in plan.request.prompts):
            raise q.NonFiniteError(f"non-finite latents for seeds {plan.request.seeds}")
        return real(plan, **kw)

    monkeypatch.setattr(q, "generate_plan", poisoned)
    with serve(create_app(load_pipeline(ckpt), limits=ServerLimits(batch_window=1.0))) as base:
        bodies = [{"prompt": "poison" if seed == 2 else "a cat", "steps": 1, "width": 32, "height": 32, "seed": seed}
                  for seed in range(4)]  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda body: call(base, "/sdapi/v1/txt2img", body), bodies))
    assert [status for status, _ in answers] == [200, 200, 500, 200]
    assert "seeds [2]" in answers[2][1]["detail"]


def test_a_failure_of_the_server_is_one_line_in_its_log_and_a_500_without_its_paths(ckpt, serve, monkeypatch, capfd):
    """What no handler answers (here, generation failing on a server-side file) is a 500 whose text names no path
    and holds no repr, one line in the server's log instead of a traceback, and the server goes on serving."""
    import latent_diffusion.serving.job_queue as q
    import latent_diffusion.serving.web_ui_api as api

    real = q.generate_plan

    def failing(plan, **kw):
        if "break" in plan.request.prompts[0]:
            raise OSError(f"/srv/secret/models/x.safetensors: cannot read {object()!r}")
        return real(plan, **kw)

    monkeypatch.setattr(q, "generate_plan", failing)
    monkeypatch.setattr(api, "samplers", lambda: [][1])  # a route that fails on its own (IndexError)
    with serve(create_app(load_pipeline(ckpt))) as base:
        capfd.readouterr()
        status, answer = call(base, "/sdapi/v1/txt2img", {"prompt": "break", "steps": 1, "width": 32, "height": 32})
        assert status == 500 and answer["error"] == "InternalError", answer
        assert "/srv" not in json.dumps(answer) and "object at 0x" not in json.dumps(answer)
        status, answer = call(base, "/sdapi/v1/samplers")
        assert status == 500 and answer["detail"].startswith("the server failed on this request (IndexError)")
        assert call(base, "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1, "width": 32, "height": 32})[0] == 200
    log = capfd.readouterr().err
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if line.startswith("ldm serve: error:")]
    assert len(lines) == 2 and "POST /sdapi/v1/txt2img: OSError" in lines[0] and "IndexError" in lines[1], log


def hostile_inputs() -> list[tuple[str, object]]:
    """(path, body: JSON, or bytes sent as they are) for every kind of bad input the tests above send."""
    small = {"prompt": "x", "steps": 1, "width": 32, "height": 32}
    image = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    lab, png = io.BytesIO(), io.BytesIO()
    Image.new("LAB", (32, 32)).save(lab, format="TIFF")
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    lab, png = (base64.b64encode(f.getvalue()).decode() for f in (lab, png))
    deep: object = 1
    for _ in range(900):
        deep = [deep]
    txt2img = [
        {"sampler_name": "DPM fast"}, {"width": 100000}, {"width": -8}, {"width": 33}, {"steps": 1000},
        {"steps": 0}, {"steps": "many"}, {"scheduler": "linear"}, {"batch_size": 100, "n_iter": 100},
        {"batch_size": 0}, {"seed": -5}, {"seed": 2**70}, {"cfg_scale": "nan"}, {"cfg_scale": 1e30},
        {"eta": -1}, {"s_noise": 1e308, "sampler_name": "Euler a"}, {"refiner_switch_at": 3},
        {"refiner_checkpoint": "nope"}, {"override_settings": {"sd_model_checkpoint": "nope"}},
        {"override_settings": {"CLIP_stop_at_last_layers": True}}, {"override_settings": {"x": deep}},
        {"extra": deep}, {"prompt": "<lora:nothing:1>"}, {"prompt": "<lora:nothing:1e30>"},
        {"prompt": "<lyco:x:1>"}, {"prompt": "(" * 3000 + "a" + ")" * 3000}, {"prompt": "\ud800"},
        {"negative_prompt": "y" * 20_001}, {"prompt": None}, {"prompt": 5},
    ]  # fmt: skip
    img2img = [
        {"init_images": []}, {"init_images": [png, png]}, {"init_images": [image]},
        {"init_images": ["https://example.com/a.png"]}, {"init_images": [bomb_png(100000, 100000)]},
        {"init_images": ["aGVsbG8=é"]}, {"mask": lab}, {"mask": png[:40]}, {"mask_blur_x": -1},
        {"mask_blur": 65}, {"resize_mode": 3}, {"inpainting_fill": 9}, {"inpaint_full_res_padding": -1},
        {"denoising_strength": 0}, {"denoising_strength": 2}, {"extra": deep},
    ]  # fmt: skip
    other = [
        ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}),
        ("/sdapi/v1/options", {"sd_model_checkpoint": 5}),
        ("/sdapi/v1/png-info", {"image": "not base64!"}),
        ("/sdapi/v1/png-info", {"image": image}),
        ("/sdapi/v1/png-info", {}),
        ("/sdapi/v1/txt2img", b"{not json"),
        ("/sdapi/v1/txt2img", b"[]"),
        ("/sdapi/v1/txt2img", b'"a string"'),
        ("/sdapi/v1/txt2img", b"\xff\xfe"),
        ("/sdapi/v1/progress?skip_current_image=maybe", None),
        ("/sdapi/v1/extra-single-image", {"image": image, "upscaler_1": "Lanczos"}),
        ("/sdapi/v1/extra-single-image", {"image": png, "upscaler_1": "4x-UltraSharp"}),
        ("/sdapi/v1/extra-single-image", {"image": png, "upscaler_1": "Lanczos", "upscaling_resize": 1e9}),
        ("/sdapi/v1/extra-single-image", {"image": png, "upscaler_1": "Lanczos", "upscaling_resize": "nan"}),
        ("/sdapi/v1/extra-single-image", {"image": bomb_png(100000, 100000), "upscaler_1": "Lanczos"}),
        ("/sdapi/v1/extra-batch-images", {"imageList": [{"data": png}]}),
        ("/sdapi/v1/extra-batch-images", {"imageList": [{"data": png, "name": "a"}] * 100, "upscaler_1": "Lanczos"}),
        ("/sdapi/v1/nothing-here", None),
    ]
    return [
        *[("/sdapi/v1/txt2img", small | change) for change in txt2img],
        *[("/sdapi/v1/img2img", small | {"init_images": [png]} | change) for change in img2img],
        *other,
    ]


def test_no_client_input_is_answered_with_a_5xx(server):
    """Every kind of bad input above, through one loop: a 4xx each (none a 5xx), and the server goes on serving."""
    base, _ = server
    answers = []
    for path, body in hostile_inputs():
        raw = body if isinstance(body, bytes) else None
        status, _ = call(base, path, None if raw is not None else body, raw=raw)
        answers.append((status, path, str(body)[:80]))
    assert all(400 <= status < 500 for status, *_ in answers), [a for a in answers if not 400 <= a[0] < 500]
    assert call(base, "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 1, "width": 32, "height": 32})[0] == 200


def test_an_interrupt_lets_a_batch_that_clients_share_finish(ckpt, serve):
    """Two clients' requests merged into one U-Net batch: an interrupt (the web UI's API names no job, so it may come
    from either client or a third) lets the shared batch finish, and neither answer is cut short. A job that runs
    alone stops (test_progress_shows_a_preview_and_interrupt_stops_the_job)."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "a cat", "steps": 100, "width": 32, "height": 32}
    app = create_app(load_pipeline(ckpt), limits=ServerLimits(batch_window=1.0))
    with serve(app) as base, ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(call, base, "/sdapi/v1/txt2img", {**body, "seed": seed}) for seed in (1, 2)]
        deadline = time.monotonic() + 60
        while call(base, "/sdapi/v1/progress")[1]["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.02)
        assert call(base, "/sdapi/v1/interrupt", {}) == (200, {})
        infos = [json.loads(future.result()[1]["info"]) for future in pending]
    assert [info["batched_with"] for info in infos] == [2, 2]
    assert not any(info["interrupted"] for info in infos)


def test_a_damaged_lora_file_is_a_422_naming_its_tag_not_the_servers_path(ckpt, serve, tmp_path):
    pipeline = load_pipeline(ckpt)
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    pipeline.loras = {"broken": tmp_path / "broken.safetensors"}
    with serve(create_app(pipeline)) as base:
        body = {"prompt": "a cat <lora:broken:1>", "steps": 1, "width": 32, "height": 32}
        status, answer = call(base, "/sdapi/v1/txt2img", body)
    assert status == 422 and answer["detail"].startswith("<lora:broken>: not a readable"), answer
    assert str(tmp_path) not in json.dumps(answer)


def test_refresh_reads_the_lora_and_embedding_folders_again(ckpt, serve, tmp_path):
    """`ldm serve` started with empty folders: a LoRA and an embedding copied in afterwards are listed and usable
    after /refresh-loras (or /refresh-embeddings), as in the web UI; a real `ldm serve` process."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    loras, embeddings = tmp_path / "Lora", tmp_path / "embeddings"
    loras.mkdir(), embeddings.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "latent_diffusion.cli", "serve", "--ckpt", str(ckpt), "--port",
                               str(port), "--lora-dir", str(loras), "--embeddings-dir", str(embeddings)],
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert call(base, "/sdapi/v1/loras")[1] == []
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.3)
        pipeline = load_pipeline(ckpt)
        proj_in = pipeline.model.unet.input_blocks[1][1].proj_in.weight
        g, key = torch.Generator().manual_seed(0), "lora_unet_down_blocks_0_attentions_0_proj_in"
        save_file({f"{key}.lora_down.weight": torch.randn(2, proj_in.shape[1], 1, 1, generator=g),
                   f"{key}.lora_up.weight": torch.randn(proj_in.shape[0], 2, 1, 1, generator=g)},
                  loras / "late.safetensors")  # fmt: skip
        width = pipeline.model.cfg.unet.context_dim
        save_file({"emb_params": torch.randn(1, width, generator=g)}, embeddings / "shiny.safetensors")
        body = {"prompt": "a shiny cat <lora:late:1>", "steps": 2, "width": 32, "height": 32, "seed": 1}
        assert call(base, "/sdapi/v1/txt2img", body)[0] == 422  # not there yet
        assert call(base, "/sdapi/v1/refresh-loras", {}) == (200, {})
        assert [lora["name"] for lora in call(base, "/sdapi/v1/loras")[1]] == ["late"]
        assert "shiny" in call(base, "/sdapi/v1/embeddings")[1]["loaded"]
        status, answer = call(base, "/sdapi/v1/txt2img", body)
        assert status == 200 and "Lora hashes" in json.loads(answer["info"])["infotexts"][0]
        assert call(base, "/sdapi/v1/refresh-embeddings", {}) == (200, {})
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_preview_is_the_web_uis_cheap_approximation_where_the_autoencoder_is_its_familys(tiny_models):
    """SD's and SDXL's autoencoders: the web UI's `cheap_approximation` (its coefficients and einsum, written out);
    an autoencoder of its own (the tiny test model's, the built-in model's): None, decoded in full instead."""
    from latent_diffusion import LatentDiffusion, preset
    from latent_diffusion.serving.server import cheap_preview

    web_ui = {
        "sd-v1.5": [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
        "sdxl-base": [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
                      [-0.3730, -0.2499, -0.2088]],
    }  # fmt: skip
    sample = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))
    for name, coeffs in web_ui.items():
        with torch.device("meta"):  # (only the config is read)
            model = LatentDiffusion(preset(name))
        expected = torch.einsum("...lxy,lr -> ...rxy", sample, torch.tensor(coeffs))
        torch.testing.assert_close(cheap_preview(model, sample), expected)
    assert cheap_preview(tiny_models["sd1"], sample) is None
