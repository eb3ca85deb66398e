"""Our offline tokenizer against OpenAI's own CLIP tokenizer (clip/simple_tokenizer.py from the PyPI package
openai-clip, loaded by file path: importing the `clip` package itself needs torchvision)."""

import importlib.util
import random
from importlib import metadata
from pathlib import Path

import pytest

from latent_diffusion.models.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def reference():
    dist = metadata.distribution("openai-clip")
    path = Path(dist.locate_file("clip/simple_tokenizer.py"))
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()  # with the vocabulary file of its own package, not ours


def reference_tokenize(ref, text: str) -> list[int]:
    """clip.tokenize(text, truncate=True): [sot] + ids + [eot], cut to 77 keeping the end token, zero-padded."""
    ids = [ref.encoder["<|startoftext|>"], *ref.encode(text), ref.encoder["<|endoftext|>"]]
    if len(ids) > 77:
        ids = ids[:77]
        ids[-1] = ref.encoder["<|endoftext|>"]
    return ids + [0] * (77 - len(ids))


HAND_WRITTEN = [
    "",
    " ",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a horse!!!",
    "masterpiece, best quality, (ultra-detailed:1.2), [sharp focus], {cinematic lighting}",
    "portrait of a woman, 85mm f/1.4, 4k, 8K UHD, trending on artstation",
    "3.14159 2024-11-26 10:30am $100 50% #1 @user",
    "don't can't won't they're we've I'm you'll she'd it's",
    "café naïve résumé façade coöperate",
    "東京の夜景, ネオン, 雨",
    "кот в сапогах",
    "Σ σ ς ß ﬁ İ",
    "emoji 🐱🚀🔥 and ❤️ and 👩‍🚀",
    "tabs\tand\nnew\r\nlines   and    spaces",
    "html entities: &amp; &lt;b&gt; &quot;quoted&quot; &amp;amp;",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "<|startoftext|> special <|endoftext|> tokens typed in",
    "under_score and hyphen-ated and slash/separated and back\\slash",
    "....!!!???,,,;;;:::---___***",
    "zero-width\u200bspace and non\u00a0breaking",
    "fullwidth ＡＢＣ１２３",
    "a " * 100,
    "word " * 80 + "END",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

WORDS = [
    "a", "cat", "dog", "red", "blue", "circle", "square", "on", "the", "background", "photo", "of", "8k",
    "highly", "detailed", "oil", "painting", "by", "greg", "rutkowski", "épée", "Zürich", "naïve", "日本",
    "🐶", "x2", "1080p", "f/2.8", "(best", "quality)", "[blurry]", "--no", "text", "it's", "UPPER", "MiXeD",
    "3d", "render", "octane", "ünïcödé", "ẞ", "ł", "đ", "😀", "&amp;", "a.b.c", "well-known", "#hashtag",
]  # fmt: skip


def generated_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        length = rng.choice([1, 3, 8, 20, 40, 90])
        sep = rng.choice([" ", ", ", " ", "  ", ",", "; "])
        prompts.append(sep.join(rng.choice(WORDS) for _ in range(length)))
    return prompts


PROMPTS = HAND_WRITTEN + generated_prompts(200)


def test_token_ids_equal_openai_clip(reference):
    ours = CLIPTokenizer()
    rows, cut = ours(PROMPTS, pad_token=0)
    assert len(PROMPTS) >= 200
    mismatches = [p for p, row in zip(PROMPTS, rows) if row != reference_tokenize(reference, p)]
    assert mismatches == []
    assert sum(cut) >= 20  # the set really exercises truncation


def test_truncation_keeps_the_end_token():
    rows, cut = CLIPTokenizer()(["word " * 80, "a cat"], pad_token=49407)
    assert cut == [True, False]
    assert len(rows[0]) == 77 and rows[0][0] == 49406 and rows[0][-1] == 49407
    assert rows[0][1:76] == [2653] * 75  # "word</w>", 75 times
    assert rows[1][:4] == [49406, 320, 2368, 49407]
