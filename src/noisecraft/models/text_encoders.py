"""Load any text encoder from a folder (or "minilm"): the one place that knows every implementation.

The interface lives in models/text_encoder.py, so the implementations (models/clip.py,
models/hf_text_encoder.py) import it without importing each other or this dispatcher.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NoisecraftError
from ..io.checkpoint import load_json
from .hf_text_encoder import HFTextEncoder, minilm_path
from .text_encoder import TEXT_ENCODER_FILE, TextEncoder

ALIASES = ("minilm",)




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
            from .clip import (
                CLIPTextEncoder,  # lazy: the CLIP model is only needed for CLIP folders
            )

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
