"""One classifier-free-guided U-Net evaluation (batch 2) with an IP-Adapter, ours vs diffusers, same weights and inputs.

SD 1.5-size U-Net with random weights and a random IP-Adapter of the kind asked for (base: 4 tokens from the image
embedding; plus: 16 from the resampler), the image's CLIP output random too. diffusers' UNet2DConditionModel takes
the adapter through its own `_load_ip_adapter_weights` and projects the image embedding inside every evaluation,
as its pipelines run it; ours runs generation's own path (`control_hook.controlled_unet`), whose tokens were made
once when the unit was resolved, as the web UI's ControlNet extension keeps them. Interleaved in one process;
medians and the ratio ours/diffusers (below 1.0: ours is faster).

    python benchmarks/ip_adapter_step.py                      # CPU float32 at 256x256, base
    python benchmarks/ip_adapter_step.py --kind plus
    python benchmarks/ip_adapter_step.py --size 512           # on a GPU: float16 at 512x512
"""

import argparse

import torch

from latent_diffusion.models.clip_vision import VisionOutput
from latent_diffusion.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions
from latent_diffusion.pipeline.control import ResolvedControl
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, token_fields
from latent_diffusion.pipeline.request import ControlUnit
from unet_step import report, sd15_step

EMBED, HIDDEN = 1024, 1280  # OpenCLIP ViT-H/14's projected embedding and hidden widths (SD 1.5's IP-Adapters)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["base", "plus"], default="base")
    args, setting, _, model, their_unet = sd15_step(parser)
    device, dtype, size, *_ = setting
    unet = model.model.diffusion_model
    attentions = cross_attentions(unet)
    plus = args.kind == "plus"
    adapter_cfg = IPAdapterConfig(
        args.kind,
        embed_dim=HIDDEN if plus else EMBED,
        context_dim=768,
        tokens=16 if plus else 4,
        layers=tuple(range(1, 2 * len(attentions), 2)),
        widths=tuple(a.to_k.out_features for a in attentions),
        resampler_dim=768 if plus else 0,
    )
    torch.manual_seed(2)
    adapter = IPAdapter(adapter_cfg).to(device, dtype).eval()
    sd = adapter.state_dict()
    parts = {
        p: {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(p + ".")} for p in ("image_proj", "ip_adapter")
    }
    their_unet._load_ip_adapter_weights([parts])
    their_unet.to(device, dtype)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
    t = torch.tensor([999, 999], device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    clip = torch.randn(2, 257, HIDDEN, generator=g) if plus else torch.randn(2, EMBED, generator=g)  # (uncond, cond)
    clip = clip.to(device, dtype)
    with torch.inference_mode():
        outputs = [VisionOutput(image_embeds=c, penultimate=c) for c in clip[:, None]]
        uncond, tokens = (adapter.tokens(o) for o in outputs)
    unit = ControlUnit("bench", torch.zeros(1, 3, 8, 8), module="ip-adapter_clip_sd15")
    control = ResolvedControl(
        unit, "bench", adapter, torch.empty(1, 0, 0, 0), (), (), soft=False, conditional_only=False,
        image_tokens=(tokens, uncond),
    )  # fmt: skip
    ours = controlled_unet(model, [control], SamplingClock(20))
    cond = {"crossattn": context, MARK: torch.tensor([0.0, 1.0], device=device)}
    cond |= {name: t.expand(2, *t.shape[1:]) for name, t in zip(token_fields(0), (tokens, uncond))}  # (rows' fields)

    def run_ours():
        return ours(x, t, cond)

    def run_theirs():
        embeds = {"image_embeds": [clip[:, None]]}  # (2, 1, E) or (2, 1, 257, E): row 0 unconditional
        return their_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=embeds).sample

    report(f"U-Net + IP-Adapter ({args.kind}) sd-v1.5", run_ours, run_theirs, setting)


if __name__ == "__main__":
    main()
