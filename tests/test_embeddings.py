"""Textual inversion: each file format gives the same hidden states as writing its vectors into the token-embedding
table by hand; an embedding never straddles two chunks; files for another width or that would run code are
skipped with a notice; the command line reads a folder of them and names them in the infotext."""

import copy
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_diffusion.models.tokenizer import clip_tokenizer
from latent_diffusion.pipeline.infotext import parse_parameters
from latent_diffusion.prompts.encoding import encode_prompts
from latent_diffusion.prompts.syntax import CHUNK, chunk_prompt
from latent_diffusion.weights.embeddings import load_embeddings, read_embedding
from test_cli import run


def write(path, vectors: torch.Tensor, fmt: str):
    """An embedding file in one of the formats people share."""
    if fmt == "webui":  # the web UI's own .pt
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 3000,
                    "sd_checkpoint": None, "sd_checkpoint_name": None}, path)  # fmt: skip
    elif fmt == "parameterdict":  # the original code's .pt: a pickled ParameterDict
        torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}, path)
    elif fmt == "diffusers":  # learned_embeds.bin: {token: (width,)}
        torch.save({"<my-concept>": vectors[0]}, path)
    else:
        save_file({"emb_params": vectors.contiguous()}, path)
    return path


def by_hand(model, prompt_before: str, vectors: torch.Tensor) -> torch.Tensor:
    """The reference: the prompt's tokens, then len(vectors) token ids whose rows of the token-embedding table are
    overwritten with the vectors, in a copy of the text encoder."""
    encoder = copy.deepcopy(model.cond_stage_model)
    table = encoder._parts()[0].weight
    tokenizer = clip_tokenizer(77)
    free = list(range(1000, 1000 + len(vectors)))
    with torch.no_grad():
        table[free] = vectors
    tokens = [tokenizer.sot_id, *tokenizer.encode(prompt_before), *free]
    tokens += [tokenizer.eot_id] * (77 - len(tokens))
    return encoder(torch.tensor([encoder.pad(tokens)]))


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt,suffix", [("webui", ".pt"), ("parameterdict", ".pt"), ("diffusers", ".bin"),
                                        ("safetensors", ".safetensors")])  # fmt: skip
def test_embedding_file_matches_vectors_written_by_hand(tiny_models, tmp_path, variant, fmt, suffix):
    model = tiny_models[variant]
    width = model.cfg.text.width
    count = 1 if fmt == "diffusers" else 3
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(1))
    write(tmp_path / f"shiny-thing{suffix}", vectors, fmt)
    embeddings, notices = load_embeddings(tmp_path, width)
    assert notices == [] and list(embeddings) == ["shiny-thing"]
    ours = encode_prompts(model, ["a photo of shiny-thing"], embeddings=embeddings)[0]["crossattn"]
    torch.testing.assert_close(ours, by_hand(model, "a photo of", vectors), atol=1e-6, rtol=0)
    plain = encode_prompts(tiny_models[variant], ["a photo of shiny-thing"])[0]["crossattn"]
    assert not torch.allclose(ours, plain)


def test_embedding_never_straddles_two_chunks(tiny_models, tmp_path):
    model = tiny_models["sd1"]
    write(tmp_path / "wide.safetensors", torch.randn(3, model.cfg.text.width), "safetensors")
    embeddings, _ = load_embeddings(tmp_path, model.cfg.text.width)
    tokenizer = clip_tokenizer(77)
    prompt = "cat " * (CHUNK - 1) + "wide"  # 74 tokens, then an embedding of 3 vectors
    chunks = chunk_prompt(prompt, tokenizer, embeddings=embeddings)
    assert len(chunks) == 2 and chunks[0].embeddings == []
    assert chunks[1].embeddings == [(1, embeddings["wide"])] and chunks[1].tokens[1:4] == [0, 0, 0]
    assert chunks[0].tokens[75] == tokenizer.eot_id  # the first chunk is padded where the embedding would not fit


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw bytes below
def test_unusable_embedding_files_are_skipped_with_a_notice(tmp_path):
    write(tmp_path / "other-family.safetensors", torch.randn(2, 1024), "safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "two.safetensors").write_bytes(b"")
    save_file({"a": torch.randn(1, 768), "b": torch.randn(1, 768)}, tmp_path / "two.safetensors")

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_param": {"*": RunsCode()}}, tmp_path / "evil.pt")
    write(tmp_path / "good.pt", torch.randn(1, 768), "webui")
    embeddings, notices = load_embeddings(tmp_path, 768)
    assert list(embeddings) == ["good"]
    text = "\n".join(notices)
    assert "other-family.safetensors has vectors of width 1024; this model's text encoder takes 768" in text
    assert "evil.pt: refused: its pickle would import or call" in text and not marker.exists()
    assert "broken.pt: refused" in text
    assert "two.safetensors: not a textual-inversion embedding" in text
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")


def test_command_line_reads_an_embeddings_folder(tmp_path, ckpt, tiny_models, capsys):
    folder = tmp_path / "emb"
    folder.mkdir()
    write(folder / "shiny.pt", torch.randn(2, tiny_models["sd1"].cfg.text.width), "webui")
    common = ["--ckpt", ckpt, "--width", 24, "--height", 24, "--steps", 1, "--quiet"]
    assert (
        run("txt2img", *common, "--prompt", "a shiny cat", "--embeddings-dir", folder, "--outdir", tmp_path / "a") == 0
    )
    with Image.open(next((tmp_path / "a").iterdir())) as im:
        text = im.text["parameters"]
    shorthash = load_embeddings(folder, 32)[0]["shiny"].shorthash  # the file's SHA-256, as the web UI's
    assert parse_parameters(text)["TI hashes"] == f"shiny: {shorthash}" and f'TI hashes: "shiny: {shorthash}"' in text
    assert run("txt2img", *common, "--prompt", "a cat", "--embeddings-dir", tmp_path / "nope", "--outdir",
               tmp_path / "b") == 2  # fmt: skip
    assert "--embeddings-dir" in capsys.readouterr().err and not (tmp_path / "b").exists()
