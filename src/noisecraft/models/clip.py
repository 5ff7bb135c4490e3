"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"):
a text transformer and an image encoder trained so that matching (image, caption) pairs have the
most similar embeddings in a batch (§2.3, Figure 3's pseudo-code).

    ids ─ token + position embeddings ─ [pre-LN causal block] × layers ─ final LayerNorm ─┬─ hidden B×L×width
                                                                                          └─ at the first
                            <|endoftext|> ─ pooled B×width ─ text_projection ─ text embedding
    image ─ [conv ─ GroupNorm ─ SiLU] stages ─ global average ─ visual_projection ─ image embedding

Names mirror transformers' checkpoints, so loading is a walk, not a converter: `CLIPTextTransformer`'s state
dict is transformers' `CLIPTextModel` state dict (embeddings.token_embedding, encoder.layers.i.self_attn.q_proj,
..., final_layer_norm), and `CLIPTextEncoder`'s is `CLIPTextModelWithProjection`'s ("text_model." + those, and
text_projection) — a Stable Diffusion text_encoder/model.safetensors loads after `strip_text_model_prefix`.

Pooling: CLIP reads the sentence embedding at the end-of-text token. transformers chooses the position from
config.eos_token_id: when it is 2 (configs written before transformers PR #24773, among them
openai/clip-vit-large-patch14, Stable Diffusion 1.x's encoder) it takes argmax(ids) — the highest id, which for
CLIP's vocabulary is <|endoftext|> = 49407, and torch's argmax returns its first occurrence; otherwise the
first position where ids == eos_token_id. We always take the first end-of-text position (the modern rule), which
equals the legacy rule on every sequence CLIP's tokenizer produces, and still works when added tokens have ids
above 49407. A row with no end-of-text token at all (hand-made ids) is pooled at its last position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NoisecraftError, brief, short_repr as _short
from ..io.checkpoint import load_json, load_weights, save_json, save_weights
from ..settings import check_fields, settings_from_dict, settings_to_dict
from .size_limits import check_parameter_count
from .text_encoder import TEXT_ENCODER_FILE, TextEncoder, _check_prompts
from .tokenizer import CLIPTokenizer

ACTIVATIONS = ("quick_gelu", "gelu")
LOGIT_SCALE_INIT = math.log(1 / 0.07)   # CLIP §2.5: temperature τ initialised to 0.07
# Bounds far above any real text encoder (OpenCLIP ViT-bigG's text tower has 6.9e8 parameters, 32 layers), so that
# a corrupted or hostile config fails with a clear sentence instead of exhausting the memory.
MAX_LAYERS, MAX_LENGTH = 256, 65_536
LOGIT_SCALE_MAX = math.log(100.0)       # ... and clipped so that the logits are scaled by at most 100


@dataclass
class CLIPTextConfig:
    """Everything needed to rebuild a CLIP text transformer; the names map to transformers' CLIPTextConfig
    (width = hidden_size, layers = num_hidden_layers, heads = num_attention_heads, max_length =
    max_position_embeddings, activation = hidden_act)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    intermediate_size: int | None = None     # default 4 · width
    activation: str = "quick_gelu"           # x·σ(1.702x), CLIP's GELU approximation; "gelu" for OpenCLIP models
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None        # a text_projection to this size after pooling (None: no projection)
    eos_token_id: int | None = None          # the pooling token; default vocab_size - 1 (CLIP's <|endoftext|>)

    RULES = (   # field, type, allowed values, None allowed (settings.check_fields)
        ("vocab_size", "int", "[1, inf)", False),
        ("max_length", "int", f"[1, {MAX_LENGTH}]", False),
        ("width", "int", "[1, inf)", False),
        ("layers", "int", f"[1, {MAX_LAYERS}]", False),
        ("heads", "int", "[1, inf)", False),
        ("intermediate_size", "int", "[1, inf)", False),
        ("activation", "str", ACTIVATIONS, False),
        ("layer_norm_eps", "float", "(0, inf)", False),
        ("projection_dim", "int", "[1, inf)", True),
        ("eos_token_id", "int", "[0, inf)", False),
    )

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.width if isinstance(self.width, int) else None
        if self.eos_token_id is None:
            self.eos_token_id = self.vocab_size - 1 if isinstance(self.vocab_size, int) else None
        check_fields(self, self.RULES, "CLIP text")
        if self.width % self.heads:
            raise NoisecraftError(f"text width {self.width} must be divisible by heads {self.heads}; "
                                  f"change --width or --heads.")
        if self.eos_token_id >= self.vocab_size:
            raise NoisecraftError(f"eos_token_id must be a token id in 0..{self.vocab_size - 1}, "
                                  f"got {self.eos_token_id}.")
        # Size the network before a single weight is allocated: coarsely from its matrices, then exactly on the meta
        # device (the text transformer and its projection, as CLIPTextEncoder holds them).
        w = self.width
        at_least = (self.vocab_size + (self.projection_dim or 0)) * w + self.layers * w * (w + self.intermediate_size)
        check_parameter_count(lambda: nn.ModuleList([CLIPTextTransformer(self), _text_projection(self)]), at_least,
                              "a CLIP text transformer", "lower width, layers, vocab_size or projection_dim")

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPTextConfig":
        return settings_from_dict(cls, data, "CLIP text")

    def to_dict(self) -> dict:
        return settings_to_dict(self)


def _text_projection(c: CLIPTextConfig) -> nn.Module | None:
    """The pooled text state -> the CLIP embedding space (transformers' text_projection), when the config has one."""
    return nn.Linear(c.width, c.projection_dim, bias=False) if c.projection_dim else None


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NoisecraftError(f"CLIP setting {name} must be a positive integer, got {_short(value)}.")


# --- the text transformer ----------------------------------------------------------------------

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, §2): x · σ(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding (CLIP §2.4, as GPT-2)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.position_embedding = nn.Embedding(c.max_length, c.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention, softmax(QKᵀ/√d + M)V with M = -∞ above the diagonal, so that a token
    sees only itself and the tokens before it (CLIP §2.4: "masked self-attention")."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.heads
        self.q_proj = nn.Linear(c.width, c.width)
        self.k_proj = nn.Linear(c.width, c.width)
        self.v_proj = nn.Linear(c.width, c.width)
        self.out_proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t):  # B×L×D -> B×heads×L×head_dim
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    """The position-wise feed-forward layer: fc1 → activation → fc2."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.activation = quick_gelu if c.activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(c.width, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """A pre-LayerNorm block: x + Attn(LN₁(x)), then + MLP(LN₂(·)) (GPT-2's arrangement, which CLIP uses)."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.width, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """ids B×L -> (hidden B×L×width after the final LayerNorm, pooled B×width at the first end-of-text token).

    Padding needs no attention mask: padding comes after the end-of-text token, and the causal mask keeps
    every position at or before it from seeing the padding.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialisation for training from scratch: N(0, 0.02) tokens, N(0, 0.01) positions, attention and
        MLP weights with std width^-½ (inputs) and (2·layers·width)^-½ (outputs back into the residual stream)."""
        c = self.config
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        in_std, out_std = c.width ** -0.5, (2 * c.layers * c.width) ** -0.5
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear, std in ((attn.q_proj, in_std), (attn.k_proj, in_std), (attn.v_proj, in_std),
                                (attn.out_proj, out_std), (mlp.fc1, (2 * c.width) ** -0.5), (mlp.fc2, out_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)

    def check_ids(self, ids: torch.Tensor) -> None:
        c = self.config
        if ids.ndim != 2 or ids.dtype != torch.long:
            raise NoisecraftError(f"token ids must be a B×L LongTensor, got {ids.dtype} {tuple(ids.shape)}; "
                                  "use the CLIPTokenizer.")
        if ids.shape[1] > c.max_length:
            raise NoisecraftError(f"got {ids.shape[1]} tokens per prompt but the text encoder has {c.max_length} "
                                  f"positions; tokenize with max_length={c.max_length}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise NoisecraftError(f"token ids must lie in 0..{c.vocab_size - 1}; the tokenizer does not match "
                                  "this text encoder's vocabulary.")

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token in each row (the last position when a row has none)."""
        is_eos = ids == self.config.eos_token_id
        first = is_eos.int().argmax(dim=1)   # argmax returns the first maximal index
        return torch.where(is_eos.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_ids(ids)
        hidden = self.final_layer_norm(self.encoder(self.embeddings(ids)))
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), self.pool_positions(ids)]
        return hidden, pooled


def strip_text_model_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers / Stable Diffusion text-encoder state dict ("text_model.encoder.layers.0...") in the
    CLIPTextTransformer layout: drop the "text_model." prefix and the position_ids buffer older files carry."""
    prefix = "text_model."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()
            if not k.endswith("embeddings.position_ids")}


# --- the image encoder used to train CLIP ------------------------------------------------------

class CLIPImageEncoder(nn.Module):
    """A small convolutional image encoder for training CLIP on small images (in place of CLIP's ResNet or ViT):

        conv 3×3 → [GroupNorm → SiLU → (conv 3×3 stride 2) → GroupNorm → SiLU → conv 3×3] per further width
        → GroupNorm → SiLU → global average pool → B×widths[-1]

    Each stage halves H and W; average pooling makes it work at any image size.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64), groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.GroupNorm(min(groups, w_in), w_in), nn.SiLU(), nn.Conv2d(w_in, w_out, 3, stride=2, padding=1),
                       nn.GroupNorm(min(groups, w_out), w_out), nn.SiLU(), nn.Conv2d(w_out, w_out, 3, padding=1)]
        layers += [nn.GroupNorm(min(groups, widths[-1]), widths[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- the two-tower model and its loss ---------------------------------------------------------

class CLIPModel(nn.Module):
    """Text and image towers with linear projections into one embed_dim space and a learnable logit scale
    (CLIP §2.5: log-parameterised temperature, initialised to 1/0.07 and clipped at 100).

    `encode_text(ids)` and `encode_image(x)` return L2-normalised embeddings; `logit_scale` is the log value.
    Module names follow transformers' CLIPModel for the text side (text_model, text_projection, logit_scale).
    """

    def __init__(self, text_config: CLIPTextConfig, image_channels: int, image_size: int | None = None,
                 embed_dim: int = 128, image_widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        _check_positive("image_channels", image_channels)
        _check_positive("embed_dim", embed_dim)
        if image_size is not None:
            _check_positive("image_size", image_size)
        if not image_widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in image_widths):
            raise NoisecraftError(f"image_widths must be positive integers, got {image_widths!r}.")
        self.text_config = text_config
        self.image_channels, self.image_size, self.embed_dim = image_channels, image_size, embed_dim
        self.image_widths = tuple(image_widths)
        self.text_model = CLIPTextTransformer(text_config)
        self.text_projection = nn.Linear(text_config.width, embed_dim, bias=False)
        self.image_encoder = CLIPImageEncoder(image_channels, self.image_widths)
        self.visual_projection = nn.Linear(self.image_encoder.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        nn.init.normal_(self.text_projection.weight, std=text_config.width ** -0.5)

    def config_dict(self) -> dict:
        return {"text": self.text_config.to_dict(), "image_channels": self.image_channels,
                "image_size": self.image_size, "embed_dim": self.embed_dim, "image_widths": list(self.image_widths)}

    @classmethod
    def from_config_dict(cls, data: dict) -> "CLIPModel":
        known = {"text", "image_channels", "image_size", "embed_dim", "image_widths"}
        if not isinstance(data, dict) or "text" not in data or set(data) - known:
            raise NoisecraftError(f"a CLIP model config needs the keys {sorted(known)} and no others; "
                                  "use the config.json written by train-clip.")
        rest = {k: v for k, v in data.items() if k != "text"}
        if "image_channels" not in rest:
            raise NoisecraftError("a CLIP model config needs image_channels; use the config.json written by "
                                  "train-clip.")
        if "image_widths" in rest:
            widths = rest["image_widths"]
            if (not isinstance(widths, list) or not 1 <= len(widths) <= MAX_LAYERS
                    or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 2 ** 14 for w in widths)):
                raise NoisecraftError(f"CLIP image_widths must be a list of 1 to {MAX_LAYERS} integers in "
                                      f"1..{2 ** 14}, got {_short(widths)}.")
            if any(w % min(8, w) for w in widths):   # the image encoder's GroupNorms use min(8, width) groups
                raise NoisecraftError(f"CLIP image_widths above 8 must be multiples of 8, got {_short(widths)}.")
            rest["image_widths"] = tuple(widths)
        for name in ("image_channels", "embed_dim"):
            if name in rest:
                _check_positive(name, rest[name])
                if rest[name] > 2 ** 16:
                    raise NoisecraftError(f"CLIP setting {name} is {rest[name]}, more than {2 ** 16}; "
                                          "fix or delete the config.")
        return cls(CLIPTextConfig.from_dict(data["text"]), **rest)

    def check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise NoisecraftError(f"the CLIP image encoder expects images N×{self.image_channels}×H×W, got "
                                  f"{tuple(x.shape)}; use images with the channel count it was trained on.")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.check_images(x)
        return F.normalize(self.visual_projection(self.image_encoder(x)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_model(ids)[1]), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(ids)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                     text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Figure 3): logits = exp(t)·Iᵀ·T over the B×B cosine
    similarities of L2-normalised embeddings, loss = ½ (CE over images→texts + CE over texts→images).

    `logit_scale` is the log temperature t, clipped at ln 100. Without `text_ids` the positives are the diagonal.
    With `text_ids` (B ids), every pair with equal ids counts as a positive and the target of a row is uniform
    over its positives (soft-target cross-entropy), for batches with many copies of one caption, as
    class-captioned datasets give.

    Note: when equal ids mean identical texts and the text encoder is deterministic, the copies have identical
    embeddings and this equals the diagonal loss in value and gradient (both directions split their probability
    evenly between exact twins anyway). The ids change the loss when they group texts whose embeddings differ:
    different captions of one class (pass class labels), or text encoders with dropout or augmentation.
    """
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device)
    logits = scale.clamp(max=LOGIT_SCALE_MAX).exp() * image_emb @ text_emb.T   # [i, j]: image i vs text j
    n = logits.shape[0]
    if text_ids is None:
        targets = torch.arange(n, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    if text_ids.shape != (n,):
        raise ValueError(f"text_ids must have shape ({n},), got {tuple(text_ids.shape)}")
    same = (text_ids[:, None] == text_ids[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)   # symmetric, so it serves both directions
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


# --- the text encoder that diffusion models read ----------------------------------------------

class CLIPTextEncoder(TextEncoder):
    """prompts -> (hidden B×L×width, pooled B×pooled_dim): the CLIP tokenizer and text transformer as a TextEncoder.

    `tokens` are the final-LayerNorm hidden states that Stable Diffusion's cross-attention reads (L = max_length,
    padding included); `pooled` is the end-of-text state, through `text_projection` when the config has a
    projection_dim (the CLIP embedding space, unnormalised, as transformers' text_embeds).
    Frozen use is the caller's choice: `load` returns a frozen encoder (TextEncoder.freeze), a fresh one trains.

    A folder written by `save` holds text_encoder.json {"kind": "clip", "config": ...}, model.safetensors (the
    keys of transformers' CLIPTextModelWithProjection) and tokenizer/ (vocab.json + merges.txt).
    """

    def __init__(self, config: CLIPTextConfig, tokenizer: CLIPTokenizer | None = None,
                 text_model: CLIPTextTransformer | None = None):
        """A fresh text transformer for `config`, or `text_model` (already loaded, e.g. Stable Diffusion's)."""
        super().__init__()
        if tokenizer is None:
            tokenizer = CLIPTokenizer.from_bpe_file(max_length=config.max_length)
        if tokenizer.vocab_size > config.vocab_size or tokenizer.eos_id != config.eos_token_id:
            raise NoisecraftError(f"the tokenizer (vocabulary {tokenizer.vocab_size}, end token {tokenizer.eos_id}) "
                                  f"does not fit the text encoder (vocabulary {config.vocab_size}, end token "
                                  f"{config.eos_token_id}); save and load them together.")
        self.config = config
        self.tokenizer = tokenizer
        self.text_model = CLIPTextTransformer(config) if text_model is None else text_model
        self.text_projection = _text_projection(config)
        self.dim = config.width
        self.pooled_dim = config.projection_dim or config.width
        self.max_length = config.max_length

    def token_strings(self, prompt: str) -> list[str]:
        pieces = self.tokenizer.tokenize(prompt)[:self.max_length - 2]
        return ["<|startoftext|>", *pieces, "<|endoftext|>"]

    def tokenize(self, prompts) -> torch.Tensor:
        """B×max_length ids on the encoder's device."""
        return self.tokenizer(_check_prompts(prompts), max_length=self.max_length).to(self.device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.text_model(self.tokenize(prompts))
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    @classmethod
    def from_clip(cls, model: CLIPModel, tokenizer: CLIPTokenizer | None = None) -> "CLIPTextEncoder":
        """The text tower of a trained CLIPModel (weights copied), with its projection into the joint space."""
        config = CLIPTextConfig.from_dict({**model.text_config.to_dict(), "projection_dim": model.embed_dim})
        encoder = cls(config, tokenizer)
        encoder.text_model.load_state_dict(model.text_model.state_dict())
        encoder.text_projection.load_state_dict(model.text_projection.state_dict())
        return encoder.to(model.logit_scale.device)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(self.state_dict(), folder / "model.safetensors")
        self.tokenizer.save(folder / "tokenizer")
        # Written last: a folder with text_encoder.json is complete.
        save_json({"kind": "clip", "config": self.config.to_dict()}, folder / TEXT_ENCODER_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "CLIPTextEncoder":
        """Read a folder written by `save` (frozen: no gradients, evaluation mode)."""
        folder = Path(folder).expanduser()
        info = load_json(folder / TEXT_ENCODER_FILE)
        if not isinstance(info, dict) or info.get("kind") != "clip" or "config" not in info:
            raise NoisecraftError(f"{folder / TEXT_ENCODER_FILE} does not describe a CLIP text encoder; "
                                  "write the folder with CLIPTextEncoder.save.")
        config = CLIPTextConfig.from_dict(info["config"])
        tokenizer_dir = folder / "tokenizer"
        tokenizer = (CLIPTokenizer.from_folder(tokenizer_dir, max_length=config.max_length) if tokenizer_dir.is_dir()
                     else CLIPTokenizer.from_bpe_file(max_length=config.max_length))
        encoder = cls(config, tokenizer)
        try:
            encoder.load_state_dict(load_weights(folder / "model.safetensors"))
        except RuntimeError as e:
            raise NoisecraftError(f"the weights in {folder / 'model.safetensors'} do not fit the config in "
                                  f"{TEXT_ENCODER_FILE} ({brief(e)}); the folder is inconsistent.") from None
        return encoder.freeze()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pooled_dim={self.pooled_dim}, max_length={self.max_length}"
