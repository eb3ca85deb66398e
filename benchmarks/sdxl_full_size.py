"""A full-size SDXL base file, end to end on this machine: written by this project, read back by it and by diffusers.

1. write: the `sdxl-base` preset with random float16 weights (every matrix scaled by 1/sqrt(fan-in), norms 1,
   biases 0), saved by `save_model` in Stability's layout (6.9 GB, like sd_xl_base_1.0.safetensors), and a local
   diffusers config folder (model_index.json, each component's config, both tokenizers from the vocabulary that
   ships with the package), so that diffusers needs no download.
2. ours (a fresh process): the architecture read off the file's keys equals the preset; `load_model` loads it
   strictly as float32; txt2img at 256x256 for 2 steps; one U-Net call and the conditioning of a prompt are kept.
3. diffusers (a fresh process): `StableDiffusionXLPipeline.from_single_file(file, config=folder,
   local_files_only=True)`; the same U-Net call and prompt encoding, compared with ours.

Each step reports its time and its process's peak memory (VmHWM).

    python benchmarks/sdxl_full_size.py --workdir /tmp/sdxl        # all three steps (about 7 GB on disk)
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def peak_gib() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) / 2**20


def fixed_inputs(cfg):
    """One guided U-Net call's inputs at 32x32 latents (256x256), the same in both processes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, cfg.text2.embed_dim, generator=g)
    time_ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)
    return x, torch.tensor([999, 500]), context, pooled, time_ids


def write(work: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig
    from transformers import CLIPTokenizer as HFTokenizer

    from latent_diffusion import LatentDiffusion, preset, save_model
    from latent_diffusion.models.tokenizer import CLIPTokenizer
    from latent_diffusion.models.yaml_config import to_ldm_config

    start = time.perf_counter()
    cfg = preset("sdxl-base")
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for k, v in model.state_dict().items():
        if v.ndim >= 2:
            weights[k] = (torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5).half()
        else:
            weights[k] = (
                torch.ones(v.shape, dtype=torch.float16) if k.endswith("weight") else torch.zeros(v.shape).half()
            )
    weights["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    model.load_state_dict(weights, strict=True, assign=True)
    save_model(model, work / "sdxl_random.safetensors")
    size = (work / "sdxl_random.safetensors").stat().st_size / 1e9

    folder, sd = work / "diffusers-config", model.state_dict()
    original = {"model": to_ldm_config(cfg)}
    with torch.device("meta"):
        UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, sd)).save_config(folder / "unet")
        AutoencoderKL(**create_vae_diffusers_config_from_ldm(original, sd)).save_config(folder / "vae")
    for name, t, cls in (("text_encoder", cfg.text, "CLIPTextModel"),
                         ("text_encoder_2", cfg.text2, "CLIPTextModelWithProjection")):  # fmt: skip
        CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                       num_attention_heads=t.heads, num_hidden_layers=t.layers, max_position_embeddings=t.max_length,
                       hidden_act=t.activation, projection_dim=t.embed_dim, architectures=[cls]).save_pretrained(
            folder / name)  # fmt: skip
    ours = CLIPTokenizer()
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps(ours.encoder))
    merges = folder / "merges.txt"
    merges.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in ours.bpe_ranks) + "\n")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        HFTokenizer(str(vocab), str(merges), pad_token=pad).save_pretrained(folder / name)
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           timestep_spacing="leading").save_config(folder / "scheduler")  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }))  # fmt: skip
    print(
        f"write: {size:.2f} GB file and the diffusers config folder in {time.perf_counter() - start:.0f} s, "
        f"peak {peak_gib():.1f} GiB"
    )


@torch.no_grad()
def ours_bf16(work: Path, size: int = 64) -> None:
    """The same file loaded as bfloat16 and generating a small image (this CPU emulates bfloat16: slow)."""
    from latent_diffusion import load_model
    from latent_diffusion.pipeline.generate import generate
    from latent_diffusion.pipeline.request import GenerationRequest

    start = time.perf_counter()
    model = load_model(work / "sdxl_random.safetensors", dtype=torch.bfloat16)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    result = generate(model, GenerationRequest([PROMPT], [1], width=size, height=size, steps=2, sampler="euler"))
    assert torch.isfinite(result.images).all()
    print(
        f"ours, bfloat16: loaded strictly in {loaded:.1f} s; txt2img {size}x{size}, 2 Euler steps with CFG "
        f"{result.request.cfg_scale} in {time.perf_counter() - start:.1f} s; peak {peak_gib():.1f} GiB"
    )


@torch.no_grad()
def ours(work: Path) -> None:
    from latent_diffusion import load_model, preset
    from latent_diffusion.pipeline.generate import generate
    from latent_diffusion.pipeline.request import GenerationRequest
    from latent_diffusion.prompts.encoding import encode_prompts
    from latent_diffusion.weights.architecture import infer_config
    from latent_diffusion.weights.checkpoint import read_state_dict

    path = work / "sdxl_random.safetensors"
    inferred = infer_config(read_state_dict(path)[0])  # the keys alone, without our config metadata
    assert inferred == preset("sdxl-base"), "the architecture read off the keys is not the sdxl-base preset"
    start = time.perf_counter()
    model = load_model(path)  # strict: every key and shape
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    result = generate(model, GenerationRequest([PROMPT], [1], width=256, height=256, steps=2, sampler="euler"))
    generated = time.perf_counter() - start
    assert torch.isfinite(result.images).all()
    x, t, context, pooled, time_ids = fixed_inputs(model.cfg)
    y = model.conditioner.vector(pooled, dict(zip(model.cfg.micro_conditioning, time_ids.split(2, dim=1))))
    cond, _ = encode_prompts(model, [PROMPT], size=(256, 256))
    torch.save({"unet": model(x, t, {"crossattn": context, "vector": y}), "context": cond["crossattn"],
                "pooled": cond["vector"][:, :1280], "tokens": [e.tokenize([PROMPT])[0] for e in model.text_encoders]},
               work / "ours.pt")  # fmt: skip
    print(
        f"ours: keys read as the sdxl-base preset; loaded strictly as float32 in {loaded:.1f} s; txt2img 256x256, "
        f"2 Euler steps with CFG {result.request.cfg_scale} in {generated:.1f} s; peak {peak_gib():.1f} GiB"
    )


@torch.no_grad()
def theirs(work: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(work / "sdxl_random.safetensors"), config=str(work / "diffusers-config"), local_files_only=True,
        torch_dtype=torch.float32,
    )  # fmt: skip
    loaded = time.perf_counter() - start
    saved = torch.load(work / "ours.pt")
    from latent_diffusion import preset

    x, t, context, pooled, time_ids = fixed_inputs(preset("sdxl-base"))
    out = pipe.unet(x, t, encoder_hidden_states=context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
    tokens_l, tokens_g = saved["tokens"]
    hidden_l = pipe.text_encoder(tokens_l, output_hidden_states=True).hidden_states[-2]
    out_g = pipe.text_encoder_2(tokens_g, output_hidden_states=True)
    differences = {
        "U-Net": (out - saved["unet"]).abs().max().item(),
        "context": (torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1) - saved["context"]).abs().max().item(),
        "pooled": (out_g.text_embeds - saved["pooled"]).abs().max().item(),
    }
    print(
        f"diffusers: from_single_file with the local config, no download, in {loaded:.1f} s; max |ours - theirs| "
        + ", ".join(f"{k} {v:.1e}" for k, v in differences.items())
        + f"; peak {peak_gib():.1f} GiB"
    )
    assert all(v < 1e-3 for v in differences.values()), differences


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/sdxl-full-size")
    parser.add_argument(
        "--step",
        choices=["write", "ours", "theirs", "ours-bf16"],
        help="one step (default: write, ours, theirs, each in a fresh process)",
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.step:
        torch.set_grad_enabled(False)
        {"write": write, "ours": ours, "theirs": theirs, "ours-bf16": ours_bf16}[args.step](work)
        return
    from machine import machine  # benchmarks/machine.py

    print(f"SDXL base, full size, random weights ({machine()}, torch {torch.__version__})")
    for step in ("write", "ours", "theirs"):
        subprocess.run([sys.executable, __file__, "--workdir", str(work), "--step", step], check=True)


if __name__ == "__main__":
    main()
