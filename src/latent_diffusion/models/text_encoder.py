"""Text encoders that turn prompts into the U-Net's context (b, 77, width), frozen during diffusion training.

Two layouts of the same causal transformer, each matching its checkpoint keys:
- SD 1.x, `cond_stage_model.transformer.text_model.*`: OpenAI CLIP ViT-L/14 in the layout of
  `transformers.CLIPTextModel` (separate q/k/v projections, quick-GELU); last hidden state.
- SD 2.x, `cond_stage_model.model.*`: OpenCLIP ViT-H/14 in open_clip's layout (fused `in_proj`, GELU);
  penultimate layer, then the final layer norm.
- SDXL, `conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*`: CLIP ViT-L/14 and OpenCLIP
  ViT-bigG/14 in these two layouts, both the penultimate layer without the final layer norm; ViT-bigG also gives
  its pooled output (the end token's last hidden state, normed, through `text_projection`).
All run attention through `attention.attention` with a causal mask.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import TextEncoderConfig
from .tokenizer import clip_tokenizer


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return F.gelu


# SD 1.x: transformers' CLIPTextModel layout ---------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """One pre-norm block of transformers' CLIP layout, causal in the text encoder, not in the vision tower."""

    def __init__(self, cfg: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_width, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Holds `text_model` only so that keys read `transformer.text_model.*`, as in SD 1.x checkpoints."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


# SD 2.x: open_clip's text tower layout --------------------------------------------------------------------


class MultiheadSelfAttention(nn.Module):
    """The parameters of torch.nn.MultiheadAttention (`in_proj_weight` = q, k, v stacked), run by `attention`."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, width) -> q, k, v side by side (b, n, 3·width); LoRA training adds its q, k, v adapters here."""
        w, b = self.in_proj_weight.to(x.dtype), self.in_proj_bias.to(x.dtype)  # stored in float8: `weights/storage.py`
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=self.causal))


class ResidualAttentionBlock(nn.Module):
    """open_clip's block (cfg: width, heads, mlp_width, activation); causal in the text tower, not elsewhere (the T2I
    style adapter's, `style_adapter.py`)."""

    def __init__(self, cfg: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = MultiheadSelfAttention(cfg.width, cfg.heads, causal)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.mlp.c_proj = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextTower(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        if cfg.projection:  # CLIP's contrastive head: in SD 2.x checkpoints but unused there; SDXL's pooled text
            self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.embed_dim) * cfg.width**-0.5)
            self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07)


# The embedder both layouts share ---------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """`cond_stage_model`: prompts -> tokens -> context (b, 77, width)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "clip":
            self.transformer = CLIPTextModel(cfg)
        else:
            self.model = OpenCLIPTextTower(cfg)

    def _parts(self):
        """(token embedding, position embedding (77, width), layers, final norm) of either layout."""
        if self.cfg.kind == "clip":
            t = self.transformer.text_model
            e = t.embeddings
            return e.token_embedding, e.position_embedding.weight, t.encoder.layers, t.final_layer_norm
        m = self.model
        return m.token_embedding, m.positional_embedding, m.transformer.resblocks, m.ln_final

    def forward(
        self,
        tokens: torch.Tensor,
        clip_skip: int | None = None,
        vectors: list[list[tuple[int, torch.Tensor]]] | None = None,
        pooled: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens: (b, n) ids, n <= max_length -> (b, n, width): the hidden state `clip_skip` layers from the end
        (the web UI's CLIP skip: 1 = the last layer), then the final layer norm if the config says so. None: the
        model's own choice, the last layer (SD 1.x) or the penultimate (SD 2.x and SDXL; SD 2.x's last block is
        stored in checkpoints unused). vectors: per row, (position, (k, width) tensor) pairs that take the place
        of the token embeddings at positions position..position + k − 1 (textual inversion).
        pooled: also return (b, embed_dim), the last layer's normed hidden state at each row's first end token
        (the highest id, as open_clip finds it) through text_projection, as SDXL's FrozenOpenCLIPEmbedder2."""
        token_embedding, position_embedding, layers, final_norm = self._parts()
        x = token_embedding(tokens).to(position_embedding.dtype)  # (stored narrower under Q8_0: `weights/storage.py`)
        if vectors and any(vectors):
            x = x.clone()
            for row, pairs in enumerate(vectors):
                for position, v in pairs:
                    x[row, position : position + len(v)] = v[: x.shape[1] - position].to(x)
        x = x + position_embedding[: tokens.shape[1]]
        skip = clip_skip if clip_skip is not None else 2 if self.cfg.layer == "penultimate" else 1
        keep = max(1, len(layers) - (skip - 1))
        for layer in layers[:keep]:
            x = layer(x)
        z = final_norm(x) if self.cfg.final_norm else x
        if not pooled:
            return z
        for layer in layers[keep:]:
            x = layer(x)
        end = final_norm(x)[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]  # (b, width)
        return z, end @ self.model.text_projection

    def pad(self, tokens: list[int]) -> list[int]:
        """A chunk padded with the end token -> padded as this family pads: SD 2.x's OpenCLIP puts 0 after the
        first end token (open_clip.tokenize), SD 1.x keeps the end token (CompVis)."""
        end = tokens.index(clip_tokenizer(self.cfg.max_length).eot_id)
        return tokens[: end + 1] + [self.cfg.pad_token] * (len(tokens) - end - 1)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """-> ((b, 77) token ids, whether each prompt was cut to 75 tokens)."""
        rows, cut = clip_tokenizer(self.cfg.max_length)(prompts, self.cfg.pad_token)
        return torch.tensor(rows, dtype=torch.long, device=self.device), cut

    @property
    def device(self) -> torch.device:
        return self._parts()[1].device
