"""CompVis inference YAMLs -> our configs, with CompVis's parameter names."""

import pytest
import torch
import yaml

from latent_diffusion import PRESETS, LatentDiffusion, from_ldm_config, preset
from latent_diffusion.models.config import LatentDiffusionConfig
from latent_diffusion.models.yaml_config import to_ldm_config

# configs/stable-diffusion/v1-inference.yaml of CompVis/stable-diffusion (scheduler_config omitted)
V1_INFERENCE = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
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
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

# configs/stable-diffusion/v2-inference-v.yaml of Stability-AI/stablediffusion
V2_INFERENCE_V = """
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
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
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_stock_compvis_yamls_give_the_presets():
    assert from_ldm_config(yaml.safe_load(V1_INFERENCE)) == preset("sd-v1.5")
    assert from_ldm_config(yaml.safe_load(V2_INFERENCE_V)["model"]) == preset("sd-v2.1-768-v")


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_ldm_config_round_trips(name):
    cfg = preset(name)
    assert from_ldm_config(to_ldm_config(cfg)) == cfg
    assert LatentDiffusionConfig.from_json(cfg.to_json()) == cfg


def test_from_ldm_config_builds_the_model_on_the_compvis_keys():
    with torch.device("meta"):
        model = LatentDiffusion.from_ldm_config(yaml.safe_load(V1_INFERENCE)["model"])
    keys = model.state_dict().keys()
    for key in [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    ]:
        assert key in keys, key


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c["params"].pop("unet_config"), "missing 'unet_config'"),
        (lambda c: c["params"]["cond_stage_config"].update(target="x.T5Embedder"), "unsupported text encoder"),
        (lambda c: c["params"].update(parameterization="x0"), "parameterization must be"),
        (lambda c: c["params"]["unet_config"]["params"].update(context_dim=1024), "must equal the text encoder"),
    ],
)
def test_bad_configs_are_named(change, message):
    cfg = yaml.safe_load(V1_INFERENCE)["model"]
    change(cfg)
    with pytest.raises(ValueError, match=message):
        from_ldm_config(cfg)
