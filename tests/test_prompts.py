"""Prompts in the web UI's language: the parser against the web UI's own published examples, chunking token by
token, and the weighted, chunked conditioning against transformers' CLIP text model."""

import pytest
import torch

from latent_diffusion.models.tokenizer import clip_tokenizer
from latent_diffusion.pipeline.generate import generate
from latent_diffusion.pipeline.request import GenerationRequest
from latent_diffusion.prompts.encoding import encode_prompts
from latent_diffusion.prompts.syntax import LoraTag, chunk_prompt, extract_lora_tags, parse_emphasis, prompt_schedule

from test_reference import transformers_text_encoder

TOK = clip_tokenizer()
CAT, DOG, COMMA = TOK.encode("cat")[0], TOK.encode("dog")[0], TOK.encode(",")[0]
SOT, EOT = TOK.sot_id, TOK.eot_id


# The examples of the docstring of `parse_prompt_attention` in the web UI's modules/prompt_parser.py.
@pytest.mark.parametrize(
    "text,expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
         [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
          (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ],
)  # fmt: skip
def test_parser_matches_the_web_uis_examples(text, expected):
    assert parse_emphasis(text) == expected


def test_parser_edge_cases():
    assert parse_emphasis("") == [("", 1.0)]
    assert parse_emphasis("[[a]] b") == [("a", 1 / 1.1 / 1.1), (" b", 1.0)]
    assert parse_emphasis("(a:0.5) \\\\ (b:-1)") == [("a", 0.5), (" \\ ", 1.0), ("b", -1.0)]
    assert parse_emphasis("x: y) z]") == [("x: y) z]", 1.0)]  # stray closers and colons are text
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_emphasis("BREAKFAST") == [("BREAKFAST", 1.0)]
    # not numbers, on which the web UI's own parser fails: the colon and the digits stay text, the bracket ×1.1
    assert parse_emphasis("(red:1.2.3)") == [("red:1.2.3", 1.1)]
    assert parse_emphasis("(red:.)") == [("red:.", 1.1)]
    assert parse_emphasis("(a:1.)") == [("a", 1.0)] and parse_emphasis("(a: -.5 )") == [("a", -0.5)]


def test_a_200_token_prompt_is_chunked_token_by_token():
    """Segments of 29 'cat' + ',' (30 tokens). A chunk fills at 75 tokens with its last comma 16 tokens back, so the
    15 tokens after that comma move on: chunks of 60, 60, 60 and 20 prompt tokens, each BOS + 75 + EOS."""
    prompt = ("cat " * 29 + ", ") * 6 + "cat " * 20  # 6 x 30 + 20 = 200 tokens
    chunks = chunk_prompt(prompt, TOK)
    segment = [CAT] * 29 + [COMMA]
    expected = [2 * segment, 2 * segment, 2 * segment, [CAT] * 20]
    assert [c.tokens for c in chunks] == [[SOT, *e, *[EOT] * (75 - len(e)), EOT] for e in expected]
    assert all(c.weights == [1.0] * 77 for c in chunks)


def test_comma_further_back_than_20_tokens_does_not_move_text():
    chunks = chunk_prompt("cat " * 50 + ", " + "dog " * 30, TOK)
    assert chunks[0].tokens == [SOT, *[CAT] * 50, COMMA, *[DOG] * 24, EOT]
    assert chunks[1].tokens[:8] == [SOT, *[DOG] * 6, EOT]


def test_break_and_weights_in_chunks():
    chunks = chunk_prompt("(cat:1.5) BREAK [dog]", TOK)
    assert [c.tokens[:3] for c in chunks] == [[SOT, CAT, EOT], [SOT, DOG, EOT]]
    assert chunks[0].weights[:3] == [1.0, 1.5, 1.0] and chunks[1].weights[1] == pytest.approx(1 / 1.1)
    plain = chunk_prompt("(cat:1.5)", TOK, syntax=False)
    assert plain[0].tokens[1] == TOK.encode("(")[0] and set(plain[0].weights) == {1.0}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_weighted_long_prompt_against_transformers(tiny_models, variant):
    """Each chunk's hidden states come from transformers' CLIPTextModel on the chunk's tokens (padded as the family
    pads), times the weights, rescaled to the unweighted mean; the chunks are concatenated."""
    model = tiny_models[variant]
    ref = transformers_text_encoder(model.cfg, model.state_dict())
    prompt = "a (red:1.4) cat, " + "[sitting] on a mat, " * 20
    ours = encode_prompts(model, [prompt])[0]["crossattn"]
    expected = []
    for chunk in chunk_prompt(prompt, TOK):
        tokens = torch.tensor([model.cond_stage_model.pad(chunk.tokens)])
        with torch.no_grad():
            z = ref(input_ids=tokens).last_hidden_state[0]
        w = torch.tensor(chunk.weights)[:, None]
        expected.append(z * w * (z.mean() / (z * w).mean()))
    assert ours.shape == (1, 77 * len(expected), 32) and len(expected) > 1
    torch.testing.assert_close(ours[0], torch.cat(expected), atol=1e-4, rtol=0)
    if variant == "sd2":
        assert model.cond_stage_model.pad(chunk_prompt("a cat", TOK)[0].tokens)[3:5] == [EOT, 0]


def test_clip_skip_is_the_web_uis(tiny_models):
    """CLIP skip N: transformers' hidden_states[-N], then the final layer norm (1: the last hidden state)."""
    model = tiny_models["sd1"]
    ref = transformers_text_encoder(model.cfg, model.state_dict())
    tokens = torch.tensor([chunk_prompt("a red cat", TOK)[0].tokens])
    with torch.no_grad():
        out = ref(input_ids=tokens, output_hidden_states=True)
        norm = getattr(ref, "final_layer_norm", None) or ref.text_model.final_layer_norm  # transformers 5 / 4
        skip2 = norm(out.hidden_states[-2])
    torch.testing.assert_close(
        encode_prompts(model, ["a red cat"], clip_skip=2)[0]["crossattn"], skip2, atol=1e-4, rtol=0
    )
    torch.testing.assert_close(encode_prompts(model, ["a red cat"], clip_skip=1)[0]["crossattn"], out.last_hidden_state,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_prompt_and_negative_of_different_lengths_are_not_padded(tiny_models, monkeypatch):
    """As the web UI by default ("Pad prompt/negative prompt" off, its pad_cond_uncond): the two run as two U-Net
    calls, each on its own encoding (154 and 77 tokens here), and guidance combines them; prompts of equal length
    still run as one batch."""
    import latent_diffusion.sampling.denoiser as d

    model, calls = tiny_models["sd1"], []
    net = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda x, t, c: calls.append((len(x), c["crossattn"])) or net(x, t, c))
    long = "a cat, " * 40  # two chunks
    common = dict(width=32, height=32, steps=1, sampler="euler", cfg_scale=5.0)
    a = generate(model, GenerationRequest([long], [3], negative_prompts=["blurry"], **common))
    (_, negative), (_, positive) = calls
    assert torch.equal(negative, encode_prompts(model, ["blurry"], negative=True)[0]["crossattn"])
    assert torch.equal(positive, encode_prompts(model, [long])[0]["crossattn"]) and positive.shape[1] == 154
    calls.clear()
    generate(model, GenerationRequest(["a cat"], [3], negative_prompts=["blurry"], **common))
    assert [n for n, _ in calls] == [2]
    # the guided x0 from the two calls, by hand: D = x0(u) + s·(x0(c) − x0(u)), the same as guiding the predictions
    seen = []
    monkeypatch.setattr(d, "x0_from_prediction", lambda x, out, s, p: seen.append(out) or x)
    denoiser = d.Denoiser(net, model.alphas_cumprod, model.parameterization, {"crossattn": positive},
                          {"crossattn": negative}, 5.0)  # fmt: skip
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor(3.0, dtype=torch.float64)
    denoiser(x, sigma)
    t = d.sigma_to_t(sigma, denoiser.log_sigmas).float().expand(1)
    x_in = x * d.c_in(3.0)
    u, c = net(x_in, t, {"crossattn": negative}), net(x_in, t, {"crossattn": positive})
    torch.testing.assert_close(seen[0], u + 5.0 * (c - u), atol=0, rtol=0)
    assert a.images.shape == (1, 3, 32, 32) and a.warnings == []
    request = GenerationRequest(["(cat:1.3)"], [3], clip_skip=2, **common)
    assert "Clip skip: 2" in generate(model, request).infotexts[0]


# The examples of the docstring of `get_learned_conditioning_prompt_schedules` in the web UI's prompt_parser.py.
@pytest.mark.parametrize(
    "text,steps,expected",
    [
        ("test", 10, [(10, "test")]),
        ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
        ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", 10, [(10, "a [unbalanced")]),
        ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", 4, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
        ("[fe|]male", 3, [(1, "female"), (2, "male"), (3, "female")]),
        ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
         "[ in background:0.25] [shoddy:masterful:0.5]", 100,
         [(25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
          (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
          (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
          (75, "fantasy landscape with a lake and an oak in background masterful"),
          (100, "fantasy landscape with a lake and a christmas tree in background masterful")]),
    ],
)  # fmt: skip
def test_prompt_editing_schedules_match_the_web_uis_examples(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


# What the web UI's grammar (prompt_parser.py, parsed by lark 1.1.2 as the web UI pins it) gives for these, with
# its default "Old prompt editing timelines" off; taken from that parser run beside ours.
@pytest.mark.parametrize(
    "text,expected",
    [
        # a number with a point is a fraction of the steps, one without a step number
        ("[a:b:1.0]", [(10, "a")]), ("[a:b:2.5]", [(10, "a")]), ("[a:b:3.]", [(10, "a")]), ("[a:b:0.25]", [(2, "a"), (10, "b")]),
        ("[a:b:1e1]", [(10, "a")]), ("[a:b:+3]", [(3, "a"), (10, "b")]), ("[a:b:-1]", [(10, "b")]), ("[a:b:0]", [(10, "b")]),
        ("[a:b:3 ]", [(3, "a"), (10, "b")]), ("[a:b:\t2]", [(2, "a"), (10, "b")]), ("[a:b:1e400]", [(10, "a")]), ("[a:b:-1e999]", [(10, "b")]),
        # outside the grammar: the text as written, no edit anywhere in it
        ("[a:b:3] cat | dog", [(10, "[a:b:3] cat | dog")]), ("(a|b) [c:d:3]", [(10, "(a|b) [c:d:3]")]),
        ("[a:b:3] x\\", [(10, "[a:b:3] x\\")]), ("[a:b:2]\\\n", [(10, "[a:b:2]\\\n")]),
        ("[a|b:c:3]", [(10, "[a|b:c:3]")]), ("[a:b|c:3]", [(10, "[a:b|c:3]")]),
        ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
        # an edit's parts must be prompts (no bare `:` or unpaired bracket); otherwise its brackets are plain text
        ("[a:[b:c]:3]", [(10, "[a:[b:c]:3]")]), ("[a:b:c:3]", [(10, "[a:b:c:3]")]), ("[(a]:b:2]", [(10, "[(a]:b:2]")]),
        ("[a:(b:1.2):3]", [(3, "a"), (10, "(b:1.2)")]), ("a: b [c:d:2]", [(2, "a: b c"), (10, "a: b d")]),
        ("(a:b:c) [d:e:2]", [(2, "(a:b:c) d"), (10, "(a:b:c) e")]), ("[a\\:b:2]", [(2, ""), (10, "a\\:b")]),
        # alternation with empty options; nesting
        ("[a||b]", [(1, "a"), (2, ""), (3, "b"), (4, "a"), (5, ""), (6, "b"), (7, "a"), (8, ""), (9, "b"), (10, "a")]),
        ("[[a|b]:c:2]", [(1, "a"), (2, "b"), *((k, "c") for k in range(3, 11))]),
    ],
)  # fmt: skip
def test_prompt_editing_follows_the_web_uis_grammar_and_step_rule(text, expected):
    assert prompt_schedule(text, 10) == expected


def test_prompt_editing_survives_brackets_nested_beyond_pythons_recursion_limit():
    text = "(" * 5000 + "[a:b:2]"
    assert prompt_schedule(text, 4) == [(4, text)]


def test_prompt_editing_switches_the_conditioning_at_its_step(tiny_models, monkeypatch):
    """[cat:dog:2] over 4 Euler steps: evaluations 0, 1, 2 see "cat" and evaluation 3 sees "dog" (the web UI counts
    evaluations from 0 and switches after the segment's last step); the same text in both segments changes nothing."""
    import latent_diffusion.pipeline.conditioning as g

    model, seen = tiny_models["sd1"], []
    real = g.Denoiser.__call__
    monkeypatch.setattr(
        g.Denoiser, "__call__", lambda self, x, s: seen.append(self.cond["crossattn"]) or real(self, x, s)
    )
    common = dict(width=32, height=32, steps=4, sampler="euler", cfg_scale=1.0)
    generate(model, GenerationRequest(["[cat:dog:2]"], [1], **common))
    cat, dog = (encode_prompts(model, [w])[0]["crossattn"] for w in ("cat", "dog"))
    assert [torch.equal(c, cat) for c in seen] == [True, True, True, False] and torch.equal(seen[3], dog)
    same = generate(model, GenerationRequest(["[cat:cat:2]"], [1], **common)).images
    assert torch.equal(same, generate(model, GenerationRequest(["cat"], [1], **common)).images)


def test_prompt_editing_counts_as_the_web_ui_for_second_order_samplers_and_img2img(tiny_models, monkeypatch):
    """The web UI builds the schedule over the requested steps, doubled for samplers of two evaluations a step
    (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE), and counts evaluations; img2img keeps the full steps though it runs
    fewer. So [cat:dog:0.5] is half-way through Heun's evaluations, and never reached by img2img at strength 0.5."""
    import latent_diffusion.pipeline.conditioning as g

    model, seen = tiny_models["sd1"], []
    real = g.Denoiser.__call__
    monkeypatch.setattr(
        g.Denoiser, "__call__", lambda self, x, s: seen.append(self.cond["crossattn"]) or real(self, x, s)
    )
    cat = encode_prompts(model, ["cat"])[0]["crossattn"]
    common = dict(width=32, height=32, cfg_scale=1.0)
    generate(model, GenerationRequest(["[cat:dog:0.5]"], [1], steps=4, sampler="heun", **common))
    assert [torch.equal(c, cat) for c in seen] == [True] * 5 + [False] * 2  # 7 evaluations, schedule over 8
    seen.clear()
    image = torch.rand(1, 3, 32, 32)
    generate(model, GenerationRequest(["[cat:dog:0.5]"], [1], steps=8, sampler="euler", init_image=image,
                                      strength=0.5, **common))  # fmt: skip
    assert len(seen) == 5 and all(torch.equal(c, cat) for c in seen)  # (int(0.5 × 8) + 1 steps, as the web UI)


def test_lora_tags_are_taken_out_of_the_prompt():
    """The web UI's extra-network syntax: <lora:name>, <lora:name:w>, <lora:name:te:unet>, te=/unet=; the tag is
    removed from the text, the rest of the prompt is left as written."""
    text, tags = extract_lora_tags("a cat <lora:film grain:0.8>, (sitting:1.2)<lora:detail:0.5:1.5><LyCO:x> here")
    assert text == "a cat , (sitting:1.2) here"
    assert tags == [LoraTag("film grain", 0.8, 0.8), LoraTag("detail", 0.5, 1.5), LoraTag("x", 1.0, 1.0)]
    assert extract_lora_tags("<lora:a:unet=0.3:te=2>")[1] == [LoraTag("a", 2.0, 0.3)]
    assert extract_lora_tags("no tags (here:1.1)") == ("no tags (here:1.1)", [])
    with pytest.raises(ValueError, match="<hypernet:...> networks are not supported here"):
        extract_lora_tags("<hypernet:h:1>")
    with pytest.raises(ValueError, match="the weights of <lora:a:much> are not numbers"):
        extract_lora_tags("<lora:a:much>")


def test_the_variants_of_an_edited_prompt_are_encoded_together_as_the_web_ui(tiny_models, monkeypatch):
    """The web UI encodes a prompt's schedule variants in one batch: the shorter is padded with empty chunks, and
    the emphasis rescaling restores the mean of the whole batch, not of each variant (its "Original" emphasis:
    z·w·mean(z)/mean(z·w) over everything it encodes at once)."""
    import latent_diffusion.sampling.denoiser as d

    model, seen = tiny_models["sd1"], []
    real = d.Denoiser.__init__
    monkeypatch.setattr(
        d.Denoiser, "__init__", lambda self, **k: seen.append(k["cond"]["crossattn"]) or real(self, **k)
    )
    long = "word " * 80  # two chunks
    common = dict(width=32, height=32, steps=4, sampler="euler", cfg_scale=1.0)
    generate(model, GenerationRequest([f"[{long}::2] (cat:1.5)"], [1], **common))
    first, second = seen
    assert first.shape[1] == second.shape[1] == 154  # " (cat:1.5)" alone would be one chunk
    variants = [f"{long} (cat:1.5)", " (cat:1.5)"]
    with torch.no_grad():  # the same tokens, unweighted
        plain = encode_prompts(model, [f"{long} cat", " cat"], syntax=False)[0]["crossattn"]
    for chunk in range(2):  # the web UI's "Original" emphasis over the batch of both variants: z·w·mean(z)/mean(z·w)
        columns = slice(77 * chunk, 77 * (chunk + 1))
        padded = [[*chunk_prompt(v, TOK), *chunk_prompt("", TOK)] for v in variants]  # an empty chunk pads
        weights = torch.tensor([chunks[chunk].weights for chunks in padded])
        z, w = plain[:, columns].double(), weights[..., None].double()
        joint = z * w * z.mean() / (z * w).mean()
        # float32 rounds a mean to about eps·mean|z|, and the rescaling divides by means near 0 in a tiny model
        # (mean z -0.0004 against |z| 0.8 in chunk 0): the tolerance is that relative error, about 3e-4
        rtol = torch.finfo(torch.float32).eps * float(z.abs().mean() / z.mean().abs())
        torch.testing.assert_close(torch.cat([first, second])[:, columns].double(), joint, atol=0, rtol=rtol)
    # per-variant rescaling is told apart: it would leave the second variant's padding chunk (weights all 1) as
    # encoded, where the joint one scales it with the first variant's emphasis
    assert ((z[1] - joint[1]) / joint[1]).abs().max() > 100 * rtol


def test_old_prompt_editing_timelines_as_the_web_ui_read_them_before_1_6(tiny_models):
    """Its use_old_scheduling: a NUMBER below 1 is a fraction, any other a step number, point or not ([a:b:1.0] is
    step 1, not the last step); an infotext of a version before 1.6 with a `[` in its prompt turns it on, as its
    backcompat does, and "Old prompt editing timelines: True" is written and read back."""
    from latent_diffusion.pipeline.infotext import settings_from_infotext

    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:1.0]", 10, before=-1) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, before=-1) == prompt_schedule("[a:b:0.5]", 10)
    common = dict(width=32, height=32, steps=4, sampler="euler", cfg_scale=3.0)
    old = generate(tiny_models["sd1"], GenerationRequest(["[cat:dog:1.0]"], [1], **common, old_edit_timelines=True))
    assert "Old prompt editing timelines: True" in old.infotexts[0]
    new = generate(tiny_models["sd1"], GenerationRequest(["[cat:dog:1.0]"], [1], **common))
    assert not torch.equal(old.images, new.images)
    settings, ignored = settings_from_infotext(old.infotexts[0])
    assert settings["old_edit_timelines"] is True and "Old prompt editing timelines" not in ignored
    for version, prompt, expected in (("v1.5.1", "[a:b:1.0]", True), ("v1.6.0", "[a:b:1.0]", False),
                                      ("v1.5.1", "a b", False)):  # fmt: skip
        settings, _ = settings_from_infotext(f"{prompt}\nSteps: 4, Sampler: Euler, Seed: 1, Version: {version}")
        assert settings.get("old_edit_timelines", False) is expected
