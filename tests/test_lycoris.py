"""LyCORIS's network types (weights/lycoris.py) against the `lycoris-lora` package's own modules: a tiny layer of
the model wrapped by its LohaModule, LokrModule, DiagOFTModule, ButterflyOFTModule or IA3Module with random
weights, their state dict saved under kohya's key names, read by us and merged into the tiny model; the merged
layer's output equals lycoris's forward (within 1e-5, float32) and the weights come back bit for bit.

Where the web UI and lycoris differ (OFT's and BOFT's strength other than 1 with `rescale`; old LyCORIS's
`oft_diag`), the test writes the web UI's formula out instead (`network_oft.py`'s `calc_updown`)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import save_file

from latent_diffusion.weights.lora import LoRAError, apply_lora, read_lora, remove_lora

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3×3, padding 1
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def layer_of(model, key: str):
    unet = model.unet
    return {
        LINEAR: unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q,
        CONV: unet.input_blocks[1][0].in_layers[2],
        TEXT: model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1,
    }[key]


def lycoris_network(cls, module, seed: int, multiplier: float, **options):
    """`cls` wrapped around a copy of `module`, every parameter drawn at random (its init zeroes one factor)."""
    network = cls("x", copy.deepcopy(module), multiplier, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    network.apply_to()
    return network


def input_for(module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(2, module.in_channels, 6, 5, generator=g)
    return torch.randn(2, 7, module.in_features, generator=g)


def check_against_lycoris(tiny_models, tmp_path, key, cls, multiplier=0.7, prefix=None, **options):
    """Merge lycoris's network at `multiplier` through our reader; the layer's output is lycoris's forward."""
    model = copy.deepcopy(tiny_models["sd1"])
    module = layer_of(model, key)
    network = lycoris_network(cls, module, seed=len(key) + len(options), multiplier=multiplier, **options)
    name = key if prefix is None else prefix + key.removeprefix("lora_unet_")
    save_file({f"{name}.{k}": v.contiguous() for k, v in network.state_dict().items()}, tmp_path / "n.safetensors")
    before = module.weight.detach().clone()
    applied = apply_lora(model, read_lora(tmp_path / "n.safetensors"), multiplier)
    assert applied.layers == 1 and applied.warnings == []
    x = input_for(module, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(module(x), network.org_module[0](x), atol=1e-5, rtol=1e-5)
    remove_lora(model, applied)
    assert torch.equal(module.weight, before)


@pytest.mark.parametrize(
    "key, options",
    [
        (LINEAR, {"lora_dim": 4, "alpha": 2}),
        (CONV, {"lora_dim": 4, "alpha": 2}),
        (CONV, {"lora_dim": 2, "alpha": 1, "use_tucker": True}),  # CP: hada_t1, hada_t2
        (TEXT, {"lora_dim": 4, "alpha": 8}),
    ],
)
def test_loha_merges_to_lycoris_forward(tiny_models, tmp_path, key, options):
    check_against_lycoris(tiny_models, tmp_path, key, LohaModule, **options)


@pytest.mark.parametrize(
    "key, options",
    [
        (LINEAR, {"lora_dim": 2, "alpha": 1}),  # w1 full (4, 4), w2 = w2_a · w2_b
        (LINEAR, {"lora_dim": 2, "alpha": 1, "factor": 2, "decompose_both": True}),
        (LINEAR, {"lora_dim": 8, "full_matrix": True}),  # both full: scale 1
        (CONV, {"lora_dim": 2, "alpha": 1}),  # w2_b (r, d·3·3)
        (CONV, {"lora_dim": 2, "alpha": 1, "use_tucker": True}),  # lokr_t2
    ],
)
def test_lokr_merges_to_lycoris_forward(tiny_models, tmp_path, key, options):
    check_against_lycoris(tiny_models, tmp_path, key, LokrModule, **options)


def test_dora_beside_loha_and_lokr_merges_to_lycoris_forward(tiny_models, tmp_path):
    """Magnitudes per input channel (LyCORIS's wd_on_out=False), at strength 1, where lycoris's and the web UI's
    DoRA agree (lycoris interpolates the rescale itself at other strengths; the web UI scales the change)."""
    for cls, key in ((LohaModule, CONV), (LokrModule, LINEAR)):
        options = {"lora_dim": 2, "alpha": 1, "weight_decompose": True, "wd_on_out": False}
        check_against_lycoris(tiny_models, tmp_path, key, cls, multiplier=1.0, **options)


@pytest.mark.parametrize(
    "key, multiplier, options",
    [
        (LINEAR, 0.6, {"lora_dim": 8}),  # 4 blocks of 8: R = (I + Q)(I − Q)⁻¹
        (CONV, 0.6, {"lora_dim": 8, "constraint": 1e-3}),  # ‖Q‖ clamped to α·out
        (LINEAR, 1.0, {"lora_dim": 8, "rescaled": True}),
    ],
)
def test_oft_merges_to_lycoris_forward(tiny_models, tmp_path, key, multiplier, options):
    check_against_lycoris(tiny_models, tmp_path, key, DiagOFTModule, multiplier, **options)


def test_kohya_oft_names_and_boft_merge_to_lycoris_forward(tiny_models, tmp_path):
    """kohya-ss's OFT files name modules `oft_unet_...`; BOFT (4 butterfly stages of 8 blocks of 4) at strength 1,
    where lycoris's per-stage interpolation and the web UI's scaled change agree."""
    check_against_lycoris(tiny_models, tmp_path, LINEAR, DiagOFTModule, 0.5, prefix="oft_unet_", lora_dim=8)
    for key in (LINEAR, CONV):
        check_against_lycoris(tiny_models, tmp_path, key, ButterflyOFTModule, 1.0, lora_dim=4)


@pytest.mark.parametrize("key", [LINEAR, CONV, TEXT])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_merges_to_lycoris_forward(tiny_models, tmp_path, key, on_input):
    check_against_lycoris(tiny_models, tmp_path, key, IA3Module, 0.5, train_on_input=on_input)


def web_ui_oft(w, r, rescale, strength):
    """The web UI's `network_oft.py` for an R given per block: W' = rescale · einsum('k n m, k n ... -> k m ...'),
    ΔW = W' − W, times the strength (finalize_updown)."""
    n, b, _ = r.shape
    turned = torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)
    return w + strength * (rescale.reshape(-1, *[1] * (w.dim() - 1)) * turned - w)


def test_old_lycoris_oft_diag_and_strength_with_rescale_merge_as_the_web_ui(tiny_models, tmp_path):
    """Old LyCORIS's `oft_diag` holds each block's R itself (the web UI's is_R); a `rescale` at a strength other
    than 1 scales the change W' − W, as the web UI does (lycoris interpolates R toward I first)."""
    model = copy.deepcopy(tiny_models["sd1"])
    conv = layer_of(model, CONV)
    g = torch.Generator().manual_seed(5)
    r = torch.linalg.qr(torch.randn(4, 8, 8, generator=g))[0].contiguous()  # 4 orthogonal blocks of 8
    rescale = torch.rand(conv.out_channels, 1, 1, 1, generator=g) + 0.5
    save_file({f"{CONV}.oft_diag": r, f"{CONV}.rescale": rescale}, tmp_path / "o.safetensors")
    w = conv.weight.detach().clone()
    applied = apply_lora(model, read_lora(tmp_path / "o.safetensors"), 0.4)
    torch.testing.assert_close(conv.weight, web_ui_oft(w, r, rescale, 0.4), atol=1e-6, rtol=0)
    remove_lora(model, applied)
    assert torch.equal(conv.weight, w)


def test_network_types_of_another_shape_or_lone_factors(tiny_models, tmp_path):
    """A LoHa made for another width says so (one line, nothing changed); a lone LoKr factor is left out with a
    warning; OFT blocks that are not square are refused when read."""
    model = copy.deepcopy(tiny_models["sd1"])
    g = torch.Generator().manual_seed(6)
    other = {f"{LINEAR}.hada_w{i}_{ab}": torch.randn(*((48, 2) if ab == "a" else (2, 32)), generator=g)
             for i in (1, 2) for ab in "ab"}  # fmt: skip
    save_file(other, tmp_path / "wide.safetensors")
    with pytest.raises(LoRAError, match=r"do not fit .*48×32"):
        apply_lora(model, read_lora(tmp_path / "wide.safetensors"))
    lone = {f"{LINEAR}.lokr_w1": torch.randn(4, 4, generator=g), f"{CONV}.oft_blocks": torch.zeros(4, 8, 8)}
    save_file(lone, tmp_path / "lone.safetensors")
    applied = apply_lora(model, read_lora(tmp_path / "lone.safetensors"))
    assert applied.layers == 1 and "lokr_w1 only" in applied.warnings[0]
    remove_lora(model, applied)
    save_file({f"{CONV}.oft_blocks": torch.zeros(4, 8, 6)}, tmp_path / "bad.safetensors")
    with pytest.raises(LoRAError, match="not square blocks"):
        read_lora(tmp_path / "bad.safetensors")


def test_networks_on_one_weight_apply_in_turn(tiny_models, tmp_path):
    """An (IA)³ change depends on W: over a LoRA it scales the LoRA's W' (the web UI applies its networks one after
    another onto the weight), and both come off in reverse order bit for bit."""
    model = copy.deepcopy(tiny_models["sd1"])
    linear = layer_of(model, LINEAR)
    g = torch.Generator().manual_seed(7)
    down, up, v = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), torch.randn(32, generator=g)
    save_file({f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up}, tmp_path / "l.safetensors")
    save_file({f"{LINEAR}.weight": v, f"{LINEAR}.on_input": torch.tensor(0)}, tmp_path / "i.safetensors")
    w = linear.weight.detach().clone()
    first = apply_lora(model, read_lora(tmp_path / "l.safetensors"), 0.5)
    second = apply_lora(model, read_lora(tmp_path / "i.safetensors"), 0.3)
    lora = w + 0.5 * up @ down
    torch.testing.assert_close(linear.weight, lora + 0.3 * lora * v[:, None], atol=1e-5, rtol=0)
    remove_lora(model, second)
    remove_lora(model, first)
    assert torch.equal(linear.weight, w)
    x = input_for(linear, 1)
    assert torch.equal(linear(x), F.linear(x, w, linear.bias))


def test_embeddings_bundled_in_a_lora_are_usable_while_it_is_named(tiny_models, tmp_path):
    """`bundle_emb.NAME.string_to_param.*` beside a LoRA's layers: a prompt that names the LoRA uses NAME's vectors
    (its "TI hashes" entry the LoRA's name, as the web UI writes it); one that does not keeps NAME as text; an
    embeddings folder's own NAME wins over the bundled one."""
    from latent_diffusion.pipeline.loading import Pipeline
    from latent_diffusion.pipeline.plan import infotext_fields, resolve
    from latent_diffusion.pipeline.request import GenerationRequest
    from latent_diffusion.weights.embeddings import Embedding

    model = tiny_models["sd1"]
    width = model.cfg.unet.context_dim
    g = torch.Generator().manual_seed(8)
    vectors = torch.randn(2, width, generator=g)
    save_file({f"{LINEAR}.weight": torch.randn(32, generator=g), f"{LINEAR}.on_input": torch.tensor(0),
               "bundle_emb.sparkle.string_to_param.*": vectors,
               "bundle_emb.wide.string_to_param.*": torch.randn(1, width + 1, generator=g)},
              tmp_path / "shiny.safetensors")  # fmt: skip
    pipeline = Pipeline(model, loras={"shiny": tmp_path / "shiny.safetensors"})
    common = dict(steps=2, width=24, height=24)
    plan = resolve(GenerationRequest(["a sparkle cat <lora:shiny:0.5>", "a sparkle cat"], [1, 2], **common), pipeline)
    tagged, plain = plan.prompts.values()
    used = [e for chunk in next(iter(tagged.parts[0].chunks.values())) for _, e in chunk.embeddings]
    assert [e.name for e in used] == ["sparkle"] and torch.equal(used[0].vectors, vectors)
    assert not any(chunk.embeddings for chunk in next(iter(plain.parts[0].chunks.values())))
    assert infotext_fields(plan)["TI hashes"] == "sparkle: shiny"
    own = Embedding("sparkle", torch.randn(1, width, generator=g), tmp_path / "sparkle.pt")
    pipeline.embeddings = {"sparkle": own}
    plan = resolve(GenerationRequest(["a sparkle cat <lora:shiny:0.5>"], [1], **common), pipeline)
    assert [
        e for chunk in plan.prompts[plan.request.prompts[0]].parts[0].chunks.popitem()[1] for _, e in chunk.embeddings
    ] == [own]
