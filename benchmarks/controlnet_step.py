"""One classifier-free-guided U-Net evaluation (batch 2) with one ControlNet, ours vs diffusers, same weights and inputs.

SD 1.5-size U-Net and ControlNet with random weights (the zero convolutions perturbed, so the residuals are not
zero); diffusers' UNet2DConditionModel and ControlNetModel get the same weights through diffusers' own single-file
converters. Ours runs through generation's own path (`control_hook.controlled_unet`: the ControlNet, its scaled
residuals, the U-Net); diffusers' as its StableDiffusionControlNetPipeline calls the two models in each step.
Interleaved in one process; medians and the ratio ours/diffusers (below 1.0: ours is faster).

    python benchmarks/controlnet_step.py               # CPU float32 at 256x256
    python benchmarks/controlnet_step.py --size 512    # on a GPU: float16 at 512x512
"""

import argparse

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from latent_diffusion.models.controlnet import ControlNet
from latent_diffusion.pipeline.control import ResolvedControl
from latent_diffusion.pipeline.control_hook import MARK, SamplingClock, controlled_unet, hint_field
from latent_diffusion.pipeline.request import ControlUnit
from unet_step import report, sd15_step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, setting, cfg, model, their_unet = sd15_step(parser)
    device, dtype, size, *_ = setting
    torch.manual_seed(2)
    net = ControlNet(cfg.unet).to(device, dtype).eval()
    with torch.no_grad():
        for conv in [*net.zero_convs, net.middle_block_out]:
            conv[0].weight.normal_(0, 0.02)
    theirs = ControlNetModel(cross_attention_dim=768)  # diffusers' defaults are otherwise SD 1.5's
    converted = convert_controlnet_checkpoint(net.state_dict(), dict(theirs.config))
    theirs.load_state_dict(converted, strict=True)
    theirs = theirs.to(device, dtype).eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
    t = torch.tensor([999, 999], device=device)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    hint = torch.rand(1, 3, size, size, generator=g).to(device, dtype)
    unit = ControlUnit("bench", hint.cpu().float())
    control = ResolvedControl(unit, "bench", net, hint, (), (), soft=False, conditional_only=False)
    ours = controlled_unet(model, [control], SamplingClock(20))
    cond = {"crossattn": context, MARK: torch.ones(2, device=device), hint_field(0): hint.expand(2, -1, -1, -1)}

    def run_ours():
        return ours(x, t, cond)

    def run_theirs():
        down, mid = theirs(x, t, context, hint.expand(2, -1, -1, -1), return_dict=False)
        return their_unet(
            x, t, encoder_hidden_states=context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample

    report("U-Net + ControlNet sd-v1.5", run_ours, run_theirs, setting)


if __name__ == "__main__":
    main()
