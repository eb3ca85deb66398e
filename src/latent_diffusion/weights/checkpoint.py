"""Loading and saving models in the original Stable Diffusion layout, from files read by `weights/reader.py`
(which runs no code from them).

- `.safetensors` tensors are views of the file's pages, and the model is built on the `meta` device and takes
  those tensors as its parameters (`assign=True`), so no second full copy exists unless a dtype or device change
  asks for one.
- Without a config, the architecture is read off the keys and shapes (`weights/architecture.py`). Files we write
  carry their exact config in the safetensors metadata, so tiny and custom models round-trip exactly.
- A generation pipeline leaves the autoencoder's encoder in the file until an image is first encoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..devices import release_freed_heap
from ..files import atomic_write
from ..models.config import LatentDiffusionConfig
from ..models.family import EMA, SD1, UNET, VAE
from ..models.ldm import LatentDiffusion
from . import ggml_quants, gguf_files, storage
from .architecture import CONFIG_METADATA_KEY, config_from_argument, infer_config
from .reader import CheckpointError, first_line, is_pickle, read_state_dict, read_tensor, safetensors_index

CLIP = SD1.text_prefixes[0]
# The model this project trains on the built-in shapes data (benchmarks/builtin_model.sh), used when no
# checkpoint is given. Its generation defaults (64x64 images, CFG 1.75) are in its config metadata.
BUILTIN_MODEL = Path(__file__).parents[1] / "assets" / "shapes.safetensors"
# Its ControlNet, trained by `ldm train-controlnet` on the shapes' masks (benchmarks/builtin_controlnet.sh)
BUILTIN_CONTROLNET = Path(__file__).parents[1] / "assets" / "shapes-control.safetensors"
BUILTIN_LORA = Path(__file__).parents[1] / "assets" / "shapes-corners.safetensors"  # teaches it the corners


# Loading ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def empty_modules():
    """Build modules on the meta device with their initialisers skipped: the weights are about to be replaced, and
    the meta versions of `normal_` and the like import torch._dynamo on first use (2-3 s of a process's first load).
    nn.init's functions are swapped for the duration, as transformers' `no_init_weights` does."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]  # normal_, kaiming_uniform_, ...
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def ema_key(unet_key: str) -> str:
    """CompVis's LitEma name of a U-Net weight: `model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b`."""
    return EMA + unet_key[len("model.") :].replace(".", "")


def add_text_model_level(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some SD 1.x files were saved by an older transformers whose CLIPTextModel had no `text_model` level
    (`cond_stage_model.transformer.embeddings.*`); the web UIs read them by adding it, and so do we."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(CLIP) for k in sd) or not any(k.startswith(old) for k in sd):
        return sd
    return {(CLIP + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}


def _ignorable(key: str) -> bool:
    """Keys that original checkpoints carry and our model rebuilds or does not use."""
    return (
        "." not in key  # CompVis's schedule buffers: betas, alphas_cumprod, posterior_variance, ...
        or key.startswith(EMA)  # taken only when ema=True
        or key.endswith("text_model.embeddings.position_ids")  # a buffer older transformers versions saved
    )


def load_model(
    path: str | os.PathLike,
    config=None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ema: bool | None = None,
    parameterization: str | None = None,
    unet_weights_dtype: torch.dtype | str | None = None,
    text_weights_dtype: torch.dtype | str | None = None,
    unet_gguf: str | os.PathLike | None = None,
    for_generation: bool = False,
) -> LatentDiffusion:
    """Load a `.safetensors` or `.ckpt` Stable Diffusion checkpoint in the original layout, or a `.gguf` whole model
    in stable-diffusion.cpp's.

    config: a CompVis inference YAML path, its parsed mapping or a LatentDiffusionConfig; None reads the
    architecture off the keys. ema=True loads the `model_ema.*` weights into the U-Net (an error if the file
    has none); None or False loads `model.diffusion_model.*`. parameterization ("eps" or "v") overrides
    what the config or file name says. unet_weights_dtype, text_weights_dtype: the form to store the U-Net's or
    the text encoders' layer weights in, cast or dequantized to `dtype` as each layer runs (`weights/storage.py`:
    a float8 dtype, float16 or bfloat16, or "Q8_0", quantized here); None: `dtype`.
    A file's float8 tensors are read as they are into such weights, and cast to `dtype` everywhere else.
    unet_gguf: a GGUF U-Net (city96's layout: ComfyUI-GGUF's files) in place of the checkpoint's, which brings the
    autoencoder and text encoders (its own U-Net is not read). A GGUF file's layer weights stay quantized and are
    dequantized to `dtype` as each layer runs (`weights/gguf_files.py`, `weights/ggml_quants.py`).
    for_generation: the autoencoder as generation needs it: its encoder left in the file (meta tensors) until it
    first encodes an image, which txt2img never does (`AutoencoderKL.load_encoder`: the state dict is whole only
    after that), and its layer weights kept as the file has them where that is float16 or bfloat16 and `dtype`
    float32 (`storage.autoencoder_as_filed`).
    """
    sd, metadata, origin, ggml = _read_files(path, unet_gguf, ema)
    cfg = config_from_argument(config) if config is not None else infer_config(sd, metadata, path)
    if parameterization is not None:
        cfg = dataclasses.replace(cfg, parameterization=parameterization)
    model = _empty_model(cfg, path)
    expected = model.state_dict()  # meta tensors: names and shapes only
    stored = _stored_forms(model, unet_weights_dtype, text_weights_dtype, ggml, device, path)
    if ema:
        sd, origin = _with_ema_unet(sd, origin, [k for k in expected if k.startswith(UNET)], path)
    if problem := mismatch(expected, sd, lambda k, have, want: _same_numbers(k, have, want, ggml)):
        raise CheckpointError(f"{path}: does not fit the {cfg.variant} model: {problem}")

    dtypes = {k: stored.get(k, dtype) for k in expected}
    plain = {k: v for k, v in expected.items() if k not in ggml}  # the tensors of a .safetensors or .ckpt file
    if for_generation:
        dtypes |= storage.autoencoder_as_filed(model.first_stage_model, {k: sd[k] for k in plain}, dtype)
    later = {k: v for k, v in plain.items() if for_generation and k.startswith(ENCODER)}
    plain = {k: v for k, v in plain.items() if k not in later}
    weights = _read_weights(path, sd, origin, plain, dtypes, device) if plain else {}
    weights |= gguf_files.weights(model, ggml, expected, device, dtype)
    for key in (k for k, form in dtypes.items() if form == storage.Q8_0):
        ggml_quants.quantize_layer(model.get_submodule(key.rpartition(".")[0]), "Q8_0", expected[key].shape, dtype)
    model.load_state_dict(weights, strict=not later, assign=True)  # (not strict: only `later` is missing)
    if later:
        model.first_stage_model.load_encoder = lambda autoencoder: _read_encoder(autoencoder, path, later)
    storage.cast_as_they_run(model, dtype)
    model.init_schedule(device)
    release_freed_heap()
    return model.eval()


def _empty_model(cfg: LatentDiffusionConfig, path) -> LatentDiffusion:
    """The model of `cfg` on the meta device (`empty_modules`); CheckpointError if the config builds none."""
    try:
        with empty_modules():
            return LatentDiffusion(cfg)
    except (ValueError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config describes no model this project builds ({first_line(e)})") from None


def _stored_forms(model: LatentDiffusion, unet, text, ggml: dict, device, path) -> dict:
    """`storage.stored_keys` (key -> its dtype, or Q8_0), checked against the GGUF keys and the device."""
    try:
        stored = storage.stored_keys(model, unet, text)
        if clash := [k for k in stored if k in ggml]:
            raise ValueError(f"weight storage applies to a checkpoint's weights, not a GGUF file's ({clash[0]})")
        if any(storage.is_fp8(form) for form in stored.values()):
            storage.check_device(device)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return stored


def _read_encoder(autoencoder: nn.Module, path, keys: dict[str, torch.Tensor]) -> None:
    """The encoder's weights `keys` (model keys, `first_stage_model.encoder.*` and `quant_conv.*`) read from the
    checkpoint `path` into `autoencoder`, on its device and in its compute dtype (its norms') as they are now, the
    layer weights kept as filed as the decoder's are."""
    sd, _, origin, _ = _read_files(path, None, None)
    if problem := mismatch(
        keys,
        {k: sd[k] for k in keys if k in sd},
        lambda k, have, want: _same_numbers(k, have, want, {}),
        ignorable=None,
    ):
        raise CheckpointError(f"{path}: changed since it was loaded; its autoencoder's encoder: {problem}")
    at = autoencoder.decoder.norm_out.weight
    dtypes = dict.fromkeys(keys, at.dtype) | storage.autoencoder_as_filed(autoencoder, sd, at.dtype)
    weights = _read_weights(path, sd, origin, keys, dtypes, at.device)
    autoencoder.load_state_dict({k.removeprefix(VAE): v for k, v in weights.items()}, strict=False, assign=True)
    storage.cast_as_they_run(autoencoder, at.dtype)


ENCODER = (VAE + "encoder.", VAE + "quant_conv.")  # the keys only encoding an image uses


def _read_files(path, unet_gguf, ema) -> tuple[dict, dict, dict, dict]:
    """-> (the tensors by key, the checkpoint's metadata, our key -> the file's key, the GGUF files' tensors by key
    (`gguf_files.Stored`), which the first holds as meta tensors of their shape)."""
    if gguf_files.is_gguf(path):
        sd, metadata, ggml = {}, {}, gguf_files.read_gguf(path)
        if gguf_files.is_unet_alone(ggml):
            raise CheckpointError(
                f"{path}: a GGUF U-Net alone: load it as unet_gguf (--unet-gguf) beside a checkpoint that has the "
                "autoencoder and text encoders"
            )
    else:
        (sd, metadata), ggml = read_state_dict(path), {}
    origin = add_text_model_level({k: k for k in sd})  # our key -> the file's key (some files rename a level)
    sd = add_text_model_level(sd)
    if ema and (ggml or unet_gguf is not None):
        raise CheckpointError(f"{unet_gguf or path}: ema=True, but a GGUF file holds no EMA copy of the U-Net")
    if unet_gguf is not None:
        unet = gguf_files.unet_of(gguf_files.read_gguf(unet_gguf), unet_gguf)
        gguf_files.check_family(unet, sd | gguf_files.shapes(ggml), unet_gguf, path)
        sd, ggml = gguf_files.without_unet(sd), gguf_files.without_unet(ggml) | unet
    return sd | gguf_files.shapes(ggml), metadata, origin, ggml


def _same_numbers(key: str, have: torch.Size, want: torch.Size, ggml: dict) -> bool:
    """A tensor fits a key of another shape with the same numbers where files are known to store it so: the VAE's
    attention as Linear weights [c, c] instead of 1x1 convolutions [c, c, 1, 1] (files converted back from
    diffusers), and SDXL's linear proj_in/proj_out as [c, c, 1, 1] (stable-diffusion.cpp's GGUF files)."""
    return ((*have, 1, 1) == want and key.startswith(VAE)) or ((*want, 1, 1) == have and key in ggml)


def _read_weights(path, sd: dict, origin: dict, expected: dict, dtypes: dict, device) -> dict[str, torch.Tensor]:
    """The tensors of `expected`'s keys from `sd`, each a floating-point one in its dtype of `dtypes`, on `device`.
    A tensor that keeps its dtype on the CPU stays a view of the mapped file (a float8 file's weights stored in
    float8 too); one that changes is read from the file into a buffer and converted from there."""
    weights = {}
    with open(path, "rb") as f:
        index = {} if is_pickle(Path(path), f.read(8)) else safetensors_index(path)
        scratch = None  # one buffer of the largest tensor's size, made when a tensor is first read
        for k in expected:
            t = sd[k]
            form = dtypes[k] if t.is_floating_point() else t.dtype
            if (form != t.dtype or torch.device(device).type != "cpu") and origin[k] in index:
                scratch = scratch or bytearray(max(end - start for *_, start, end in index.values()))
                t = read_tensor(f, *index[origin[k]], scratch)  # copied below anyway: leave the mapping alone
            if form == storage.Q8_0:  # quantized from the file's numbers in pieces: only the blocks are made
                weights[k] = ggml_quants.quantize_q8_0(t).to(device)
            else:
                weights[k] = t.to(device=device, dtype=form).reshape(expected[k].shape)  # a copy: `scratch` is free
    return weights


def _with_ema_unet(sd: dict, origin: dict, unet_keys: list[str], path) -> tuple[dict, dict]:
    """The state dict with the U-Net's weights taken from `model_ema.*` (and the file's key of each), all or none."""
    absent = [ema_key(k) for k in unet_keys if ema_key(k) not in sd]
    if len(absent) == len(unet_keys):
        raise CheckpointError(f"{path}: ema=True, but the file has no model_ema.* weights")
    if absent:  # never mix EMA and non-EMA weights silently
        raise CheckpointError(f"{path}: ema=True, but {len(absent)} EMA weights are missing (first: {absent[0]})")
    sd = {**sd, **{k: sd[ema_key(k)] for k in unet_keys}}
    origin = {**origin, **{k: origin[ema_key(k)] for k in unet_keys}}
    return sd, origin


def load_vae(model: LatentDiffusion, path: str | os.PathLike) -> None:
    """A separate autoencoder file into `model.first_stage_model`, as the web UI's VAE selector: CompVis-layout keys
    (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`), or a whole checkpoint's `first_stage_model.*`,
    in the model's dtype and device; a training file's `loss.*` (discriminator) and EMA keys are left out.
    CheckpointError if it does not fit; the model is unchanged then."""
    sd, _ = read_state_dict(path)
    if any(k.startswith(VAE) for k in sd):
        sd = {k.removeprefix(VAE): v for k, v in sd.items() if k.startswith(VAE)}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", EMA)) and "." in k}
    expected = model.first_stage_model.state_dict()
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        raise CheckpointError(f"{path}: a diffusers-format VAE; this takes the original layout (encoder.down.*)")
    if problem := mismatch(expected, sd, lambda k, have, want: have.numel() == want.numel(), ignorable=None):
        raise CheckpointError(f"{path}: not an autoencoder of this model: {problem}")
    weights = {k: sd[k].reshape(v.shape).to(model.device, model.dtype) for k, v in expected.items()}
    model.first_stage_model.load_state_dict(weights, strict=True, assign=True)
    model.first_stage_model.load_encoder = None  # the encoder is this file's now


def mismatch(expected: dict, sd: dict, also_fits, ignorable=_ignorable) -> str:
    """Why `sd` does not load as `expected` ("" when it does): its missing, unexpected (not `ignorable`) and
    wrong-shape keys, a shape fitting when it is the expected one or `also_fits(key, shape, expected shape)`."""
    found = {
        "missing": [k for k in expected if k not in sd],
        "unexpected": [k for k in sd if k not in expected and not (ignorable and ignorable(k))],
        "wrong shape": [
            k
            for k in expected
            if k in sd and sd[k].shape != expected[k].shape and not also_fits(k, sd[k].shape, expected[k].shape)
        ],
    }
    return "; ".join(f"{len(keys)} {name} keys (first: {', '.join(keys[:3])})" for name, keys in found.items() if keys)


# Saving -----------------------------------------------------------------------------------------------------


def save_model(model: LatentDiffusion, path: str | os.PathLike, *, ema_unet: torch.nn.Module | None = None) -> None:
    """Write the model as `.safetensors` in the original layout, atomically (temp file, then rename).

    ema_unet: an EMA copy of the U-Net, written as CompVis's flattened `model_ema.*` keys.
    The config goes into the metadata, so `load_model` rebuilds exactly this architecture.
    """
    save_tensors(checkpoint_tensors(model, ema_unet), path, checkpoint_metadata(model), "save_model")


def checkpoint_tensors(model: LatentDiffusion, ema_unet: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """What `save_model` writes: the model's state dict, and the EMA U-Net's under `model_ema.*`."""
    tensors = dict(model.state_dict())
    if ema_unet is not None:
        tensors |= {ema_key(UNET + k): v for k, v in ema_unet.state_dict().items()}
    return tensors


def checkpoint_metadata(model: LatentDiffusion) -> dict[str, str]:
    """`save_model`'s metadata: the config, so that `load_model` rebuilds exactly this architecture."""
    return {"format": "pt", CONFIG_METADATA_KEY: model.cfg.to_json()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str], by: str) -> None:
    """Write tensors (any device) as `.safetensors` atomically; CheckpointError for another suffix or a missing
    folder (`by`: the writer, named in that error), OSError where the disk fails."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: {by} writes .safetensors files; use that suffix")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the folder {path.parent} does not exist")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        with atomic_write(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except Exception as e:  # an OSError, or safetensors' own error around one: the environment's failure
        raise OSError(f"{path}: cannot write ({first_line(e)})") from None
